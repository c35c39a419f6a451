//! The ports this crate needs from the outside world, implemented by the server:
//! a clock (the only source of `now`), a store (load an auction, make a batch of
//! writes durable), and a sink for events that have become durable. Keeping them
//! as small traits is what keeps the rules and the actors free of SQL and HTTP.

use std::future::Future;
use std::pin::Pin;

use crate::auction::state::{AuctionId, AuctionState, BidPlaced, Event, TimestampMs, UserId};
pub use crate::shards::{SHARD_COUNT, ShardLease, shard_of};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Wall-clock time in milliseconds since the Unix epoch. Tests may drive their own.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> TimestampMs;
}

/// An idempotency key recorded with the write it produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRecord {
    pub user_id: UserId,
    pub key: String,
    pub fingerprint: u64,
}

/// One change to make durable: the auction's state right after it, the
/// accepted bid if it was one, and the idempotency key that asked for it.
/// Applying the same `Write` twice leaves the store as applying it once (rows
/// are keyed by auction and seq, the auction row gets absolute values), which
/// makes retrying a commit of unknown outcome safe. The store moves an
/// auction row only forward (to a later seq, or at the same seq to a later
/// stage: scheduled, active, ended or cancelled), so an attempt given up on
/// that still runs later, after newer writes, changes nothing.
#[derive(Clone, Debug)]
pub struct Write {
    pub lease: ShardLease,
    /// When the command was applied.
    pub at_ms: TimestampMs,
    pub auction: AuctionState,
    pub bid: Option<BidPlaced>,
    pub key: Option<KeyRecord>,
}

/// A key found in the store for an auction's recent bids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredKey {
    pub record: KeyRecord,
    pub seq: u64,
}

/// What activation needs: the state and the most recent idempotency keys.
#[derive(Clone, Debug)]
pub struct LoadedAuction {
    pub state: AuctionState,
    pub recent_keys: Vec<StoredKey>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The writer no longer holds these leases (shard and epoch) of the
    /// batch: nothing of the batch was written. Its writes under them must not
    /// be retried; the others may be (a batch can hold writes under two
    /// epochs of one shard: of a lease the node lost, and of the one it took
    /// again since).
    #[error("lease epochs no longer current: {leases:?}")]
    Fenced { leases: Vec<ShardLease> },
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store refused the batch as invalid (a constraint or a value it does
    /// not take): retrying it as it is can never succeed. Nothing was written.
    #[error("store refused the batch as invalid: {0}")]
    Invalid(String),
    /// An idempotency key of the batch is stored already for another write.
    /// Nothing was written; like `Invalid`, retrying it as it is cannot succeed.
    #[error("an idempotency key of the batch was used for another write")]
    KeyReused,
}

pub trait Store: Send + Sync + 'static {
    /// Loads an auction with its recent idempotency keys; `None` when unknown.
    fn load_auction(&self, id: AuctionId) -> BoxFuture<'_, Result<Option<LoadedAuction>, StoreError>>;

    /// Writes every change of the batch in one transaction, after checking
    /// inside it that every lease epoch named is still current.
    fn commit<'a>(&'a self, batch: &'a [Write]) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Auctions not yet in a final state whose start or end is at or before
    /// `horizon_ms`: the ones a node must activate so their timers run. At
    /// most `limit` of them, the earliest due first (by `(at_ms, id)`), after
    /// `after` when given: a page of them, the next page after its last.
    fn due_auctions(
        &self,
        horizon_ms: TimestampMs,
        after: Option<DueAuction>,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<DueAuction>, StoreError>>;
}

/// An auction whose start (scheduled) or end (active) comes at `at_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DueAuction {
    pub at_ms: TimestampMs,
    pub id: AuctionId,
}

/// Receives every event once it is durable, per auction in order, with the
/// auction's state right after it. The WebSocket fan-out and the cluster's
/// pub/sub plug in here.
pub trait EventSink: Send + Sync + 'static {
    fn publish(&self, event: &Event, state: &AuctionState);
}

/// A sink that drops everything, for nodes (and tests) with nobody listening.
pub struct NoEvents;

impl EventSink for NoEvents {
    fn publish(&self, _event: &Event, _state: &AuctionState) {}
}
