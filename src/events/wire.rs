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
/// With them, where its own auctions watched on other nodes stand (`heads`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewerReport {
    pub version: u16,
    pub node: String,
    pub counts: Vec<(uuid::Uuid, u64)>,
    /// Absent from the reports of nodes of earlier releases.
    #[serde(default)]
    pub heads: Vec<AuctionHead>,
}

/// Where an auction stood after its owner's last event, which the owner
/// published at least a second before (`redis.rs`): a node whose watchers
/// were shown less missed events, and resynchronises them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuctionHead {
    pub auction_id: uuid::Uuid,
    pub seq: u64,
    /// 0 scheduled, 1 active, 2 ended or cancelled (`events::Version`).
    pub stage: u8,
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

    /// Nodes of the release before send watcher counts without heads; this
    /// release reads them, and they read its reports (unknown fields are skipped).
    #[test]
    fn viewer_reports_with_and_without_heads_cross_releases() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Before {
            version: u16,
            node: String,
            counts: Vec<(uuid::Uuid, u64)>,
        }
        let before =
            Before { version: EVENTS_VERSION, node: "node-a".to_owned(), counts: vec![(uuid::Uuid::nil(), 3)] };
        let read: ViewerReport = rmp_serde::from_slice(&rmp_serde::to_vec_named(&before).unwrap()).unwrap();
        assert_eq!((read.counts, read.heads), (before.counts.clone(), Vec::new()));
        let now = ViewerReport {
            version: EVENTS_VERSION,
            node: "node-b".to_owned(),
            counts: Vec::new(),
            heads: vec![AuctionHead { auction_id: uuid::Uuid::nil(), seq: 7, stage: 2 }],
        };
        let read: Before = rmp_serde::from_slice(&rmp_serde::to_vec_named(&now).unwrap()).unwrap();
        assert_eq!(read.node, "node-b");
    }
}
