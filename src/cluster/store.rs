//! The port the lease manager needs from a store: membership rows, lease rows
//! with their epochs, and the store's own clock. Storage implements it on
//! Postgres (`storage/leases.rs`); the tests below implement it in memory.

use gavel_actors::ports::{BoxFuture, ShardLease};

#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct LeaseRow {
    pub shard: i32,
    pub owner: String,
    pub epoch: i64,
    pub expires_at_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct MemberRow {
    pub node_id: String,
    pub advertise_url: String,
    pub last_seen_ms: i64,
}

/// Everything a node needs to decide what to own, read at one moment.
#[derive(Clone, Debug)]
pub struct ClusterRows {
    /// The database's clock when this was read.
    pub now_ms: i64,
    pub members: Vec<MemberRow>,
    pub leases: Vec<LeaseRow>,
}

/// One shard's lease with its owner's address, and the database's clock.
#[derive(Clone, Debug)]
pub struct ShardOwner {
    pub now_ms: i64,
    pub lease: LeaseRow,
    pub owner: Option<MemberRow>,
}

/// A lease store that could not be asked.
#[derive(Debug, thiserror::Error)]
#[error("lease store: {0}")]
pub struct LeaseStoreError(pub String);

/// Every time is the store's clock (milliseconds), never a node's.
pub trait LeaseStore: Send + Sync + 'static {
    /// Says `node_id` is alive and where to reach it; returns the store's clock.
    fn heartbeat<'a>(&'a self, node_id: &'a str, advertise_url: &'a str)
    -> BoxFuture<'a, Result<i64, LeaseStoreError>>;
    /// Every member and lease, read at one moment, with the store's clock then.
    fn read(&self) -> BoxFuture<'_, Result<ClusterRows, LeaseStoreError>>;
    /// Extends the leases `node_id` holds at the epochs given; returns the shards renewed.
    fn renew<'a>(
        &'a self,
        node_id: &'a str,
        held: &'a [ShardLease],
        lease_ms: i64,
    ) -> BoxFuture<'a, Result<Vec<u32>, LeaseStoreError>>;
    /// Takes each shard that is free (expired, released, never owned) or
    /// `node_id`'s own, raising its epoch; returns the leases taken.
    fn take<'a>(
        &'a self,
        node_id: &'a str,
        shards: &'a [u32],
        lease_ms: i64,
    ) -> BoxFuture<'a, Result<Vec<ShardLease>, LeaseStoreError>>;
    /// Gives a lease up at once (if still `node_id`'s at that epoch).
    fn release<'a>(&'a self, node_id: &'a str, lease: ShardLease) -> BoxFuture<'a, Result<bool, LeaseStoreError>>;
    /// Removes `node_id` from the members and gives up every lease it owns,
    /// all at once (one transaction: a node holds a hundred leases, and a
    /// round trip each under load took seconds). Called once the node writes
    /// no more, so it gives up every epoch it owns, also one it took without
    /// learning of it (a take cut short at shutdown). Returns the shards
    /// released.
    fn leave<'a>(&'a self, node_id: &'a str) -> BoxFuture<'a, Result<Vec<u32>, LeaseStoreError>>;
    /// One shard's lease with its owner's membership row.
    fn owner_of(&self, shard: u32) -> BoxFuture<'_, Result<Option<ShardOwner>, LeaseStoreError>>;
}
