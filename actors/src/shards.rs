//! Shards and the leases this node holds on them. Auctions map to a fixed
//! number of shards by a stable hash of their id; a node writes for a shard
//! only under a lease whose epoch (fencing token) the store checks inside every
//! commit. This module keeps the node's own view of its leases: which shards it
//! holds at which epoch, and until when that view can be trusted.
//!
//! The view is an optimisation and a courtesy, never the safety net: a node
//! that believes it holds a lease it lost is stopped by the store's epoch
//! check. The view only lets a node stop taking bids for a shard before the
//! store would refuse them, and tell clients where to go instead.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use tokio::time::Instant;

use crate::auction::state::AuctionId;

/// The fixed number of shards auctions map to.
pub const SHARD_COUNT: u32 = 256;

/// A stable hash of the auction id (FNV-1a over its bytes) onto `0..SHARD_COUNT`.
/// Stable across builds and nodes: it decides ownership in a cluster.
pub fn shard_of(id: AuctionId) -> u32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in id.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % u64::from(SHARD_COUNT)) as u32
}

/// Which shard an auction lives in, and the lease epoch (fencing token) under
/// which this node writes for that shard. Every write carries it; the store
/// refuses a write whose epoch is no longer the shard's current one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ShardLease {
    pub shard: u32,
    pub epoch: i64,
}

/// The shard leases this node holds: an epoch per shard (0 when not held) and
/// one deadline for all of them. Leases are renewed together, so one deadline
/// says how long the last renewal vouches for them; past it the node takes no
/// new writes until the next renewal succeeds. Reads are lock-free atomics: the
/// bid path asks once per bid.
pub struct Leases {
    epochs: Vec<AtomicI64>,
    /// Milliseconds after `base` until which the leases are trusted;
    /// `u64::MAX`: without expiry (a single embedded node).
    valid_until_ms: AtomicU64,
    base: Instant,
}

impl Leases {
    /// No lease held; once granted, leases never expire unless `trust_until` is called.
    pub fn none() -> Self {
        Leases {
            epochs: (0..SHARD_COUNT).map(|_| AtomicI64::new(0)).collect(),
            valid_until_ms: AtomicU64::new(u64::MAX),
            base: Instant::now(),
        }
    }

    pub fn grant(&self, shard: u32, epoch: i64) {
        assert!(epoch > 0, "epochs start at 1");
        self.epochs[shard as usize].store(epoch, Ordering::Release);
    }

    /// Forgets the lease of `shard`; returns the epoch it had, if held.
    pub fn revoke(&self, shard: u32) -> Option<i64> {
        let epoch = self.epochs[shard as usize].swap(0, Ordering::AcqRel);
        (epoch > 0).then_some(epoch)
    }

    /// The last renewal vouches for the leases until `deadline`.
    pub fn trust_until(&self, deadline: Instant) {
        let ms = deadline.saturating_duration_since(self.base).as_millis();
        self.valid_until_ms.store(u64::try_from(ms).unwrap_or(u64::MAX - 1), Ordering::Release);
    }

    /// Whether the leases held can be written under now.
    pub fn trusted(&self) -> bool {
        let until = self.valid_until_ms.load(Ordering::Acquire);
        until == u64::MAX || (self.base.elapsed().as_millis() as u64) < until
    }

    /// The lease to write `shard` under: held, and vouched for by the last renewal.
    pub fn lease_for(&self, shard: u32) -> Option<ShardLease> {
        let epoch = self.epoch_of(shard)?;
        self.trusted().then_some(ShardLease { shard, epoch })
    }

    /// The epoch held for `shard`, trusted or not.
    pub fn epoch_of(&self, shard: u32) -> Option<i64> {
        let epoch = self.epochs[shard as usize].load(Ordering::Acquire);
        (epoch > 0).then_some(epoch)
    }

    /// Whether `lease` is still the one held, and trusted: a write under it may be taken.
    pub fn still_holds(&self, lease: ShardLease) -> bool {
        self.epoch_of(lease.shard) == Some(lease.epoch) && self.trusted()
    }

    /// Every lease held, trusted or not.
    pub fn held(&self) -> Vec<ShardLease> {
        (0..SHARD_COUNT).filter_map(|shard| self.epoch_of(shard).map(|epoch| ShardLease { shard, epoch })).collect()
    }

    pub fn held_count(&self) -> usize {
        self.epochs.iter().filter(|epoch| epoch.load(Ordering::Acquire) > 0).count()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use uuid::Uuid;

    #[test]
    fn shards_are_stable_and_spread() {
        assert_eq!(shard_of(Uuid::from_u128(1)), shard_of(Uuid::from_u128(1)));
        let mut seen = std::collections::HashSet::new();
        for n in 0..10_000u128 {
            let shard = shard_of(Uuid::from_u128(n * 7_919));
            assert!(shard < SHARD_COUNT);
            seen.insert(shard);
        }
        assert_eq!(seen.len(), SHARD_COUNT as usize);
    }

    #[test]
    fn the_documented_hash_of_a_known_id() {
        // docs/API.md gives this example; clients may compute shards themselves.
        let id = Uuid::parse_str("01936f5e-0000-7000-8000-000000000000").unwrap();
        assert_eq!(shard_of(id), 248);
    }

    #[test]
    fn grant_revoke_and_epochs() {
        let leases = Leases::none();
        assert_eq!(leases.lease_for(3), None);
        leases.grant(3, 7);
        assert_eq!(leases.lease_for(3), Some(ShardLease { shard: 3, epoch: 7 }));
        assert!(leases.still_holds(ShardLease { shard: 3, epoch: 7 }));
        assert!(!leases.still_holds(ShardLease { shard: 3, epoch: 6 }), "an older epoch is not held");
        assert_eq!(leases.held_count(), 1);
        assert_eq!(leases.revoke(3), Some(7));
        assert_eq!(leases.revoke(3), None);
        assert!(!leases.still_holds(ShardLease { shard: 3, epoch: 7 }));
    }

    #[tokio::test(start_paused = true)]
    async fn leases_are_not_trusted_past_the_last_renewal() {
        let leases = Leases::none();
        leases.grant(1, 1);
        leases.trust_until(Instant::now() + Duration::from_secs(10));
        assert!(leases.lease_for(1).is_some());
        tokio::time::advance(Duration::from_millis(9_999)).await;
        assert!(leases.lease_for(1).is_some());
        tokio::time::advance(Duration::from_millis(2)).await;
        assert_eq!(leases.lease_for(1), None, "past the deadline nothing is written");
        assert_eq!(leases.epoch_of(1), Some(1), "the epoch is still known, for renewal");
        leases.trust_until(Instant::now() + Duration::from_secs(10));
        assert!(leases.lease_for(1).is_some(), "a renewal makes it usable again");
    }
}
