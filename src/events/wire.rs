//! What crosses Redis pub/sub: one committed event of an auction, with the
//! auction's state right after it, from the node that owns the auction.
//! MessagePack via rmp-serde; change only together with `EVENTS_VERSION`.

use gavel_actors::{AuctionState, Event, TimestampMs};
use serde::{Deserialize, Serialize};

/// A node drops envelopes of any other version (and counts them as gaps).
pub const EVENTS_VERSION: u16 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventEnvelope {
    pub version: u16,
    /// The node that committed it, and the lease epoch it held the shard under.
    pub node: String,
    pub epoch: i64,
    /// When the owner handed it to Redis (its wall clock), for the lag metric.
    pub sent_at_ms: TimestampMs,
    pub event: Event,
    pub state: AuctionState,
}

/// A node's watcher counts, sent every second on the viewers channel: every
/// auction it has watchers of, and a zero for each it had at the last report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewerReport {
    pub version: u16,
    pub node: String,
    pub counts: Vec<(uuid::Uuid, u64)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_envelope_survives_messagepack() {
        let state = crate::events::tests::auction();
        let envelope = EventEnvelope {
            version: EVENTS_VERSION,
            node: "node-a".to_owned(),
            epoch: 3,
            sent_at_ms: 1_800_000_000_000,
            event: Event::Ended { seq: 0, winner: None, final_price: None, reserve_met: false },
            state,
        };
        let bytes = rmp_serde::to_vec_named(&envelope).unwrap();
        assert_eq!(rmp_serde::from_slice::<EventEnvelope>(&bytes).unwrap(), envelope);
    }
}
