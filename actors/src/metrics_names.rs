//! Names of the metrics this crate records (the server describes and exports
//! them). Units go last in the name.

pub const COMMIT_BATCH_SIZE: &str = "gavel_commit_batch_size";
pub const COMMIT_LATENCY_SECONDS: &str = "gavel_commit_latency_seconds";
pub const COMMIT_FAILURES_TOTAL: &str = "gavel_commit_failures_total";
/// Commits started beside an overdue one (`PersistenceSettings::hedge_after`).
pub const COMMIT_HEDGES_TOTAL: &str = "gavel_commit_hedges_total";
pub const LIVE_AUCTIONS: &str = "gavel_live_auctions";
/// Auction actors stopped while their auction stays open, by `reason`: `idle`
/// (no write for `idle_after`) or `room` (too many live, `max_live_auctions`).
pub const PASSIVATIONS_TOTAL: &str = "gavel_passivations_total";
/// Bid and cancel calls admitted to auction actors and not answered yet.
pub const ACTOR_MAILBOX_DEPTH: &str = "gavel_actor_mailbox_depth";
/// Writes the store refused as invalid (not retried; their auctions reload).
pub const WRITES_REFUSED_TOTAL: &str = "gavel_writes_refused_total";
