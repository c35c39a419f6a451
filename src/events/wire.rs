//! What goes through Redis: on pub/sub, one committed event of an auction,
//! with the auction's state right after it, from the node that owns the
//! auction; under a key per auction, its latest committed snapshot.
//! MessagePack via rmp-serde; change only together with `EVENTS_VERSION`.

use gavel_actors::{AuctionState, Event, TimestampMs, UserRef};
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

/// An auction as committed, kept by its owner under
/// `gavel:<database id>:snapshot:<auction id>` (`snapshots.rs`). Readers use it
/// only when its `seq` and status are the store's: it is never newer than the
/// store, and may be older.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuctionSnapshot {
    pub version: u16,
    pub node: String,
    pub epoch: i64,
    pub written_at_ms: TimestampMs,
    /// What the state does not hold: fixed at creation.
    pub title: String,
    pub description: String,
    pub currency: String,
    pub state: AuctionState,
    /// The last bids up to `state.seq` (at most ten), newest first.
    pub recent_bids: Vec<SnapshotBid>,
}

/// A bid as a snapshot shows it (the fields of the bid history). Amounts in
/// minor units.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotBid {
    pub seq: u64,
    pub bidder: UserRef,
    pub amount: i64,
    pub max_amount: i64,
    pub placed_at_ms: TimestampMs,
    pub current_price: i64,
    pub leader: UserRef,
    pub end_at_ms: TimestampMs,
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
