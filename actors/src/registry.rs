//! The auction actors running on this node, found by auction and grouped by
//! shard: one map per shard, each behind its own lock, so lookups of different
//! shards never contend and all actors of a shard can be told at once to retire
//! when the shard is handed over or lost.
//!
//! An entry is a cell that is filled once the actor has started, so that two
//! callers activating the same auction at once start one actor between them.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use ractor::ActorId;
use tokio::sync::OnceCell;

use crate::auction::state::AuctionId;
use crate::auction_actor::{AuctionHandle, Directory};
use crate::shards::{SHARD_COUNT, shard_of};

pub type Slot = Arc<OnceCell<AuctionHandle>>;

pub struct Registry {
    shards: Vec<Mutex<HashMap<AuctionId, Slot>>>,
    /// Entries over all shards: actors started or starting.
    len: AtomicUsize,
}

impl Default for Registry {
    fn default() -> Self {
        Registry { shards: (0..SHARD_COUNT).map(|_| Mutex::new(HashMap::new())).collect(), len: AtomicUsize::new(0) }
    }
}

/// Entries `sample` takes from each shard it visits.
const SAMPLE_PER_SHARD: usize = 4;

impl Registry {
    fn shard(&self, shard: u32) -> MutexGuard<'_, HashMap<AuctionId, Slot>> {
        self.shards[shard as usize].lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The auction's slot, made empty if there was none.
    pub fn slot(&self, auction_id: AuctionId) -> Slot {
        match self.shard(shard_of(auction_id)).entry(auction_id) {
            Entry::Occupied(entry) => entry.get().clone(),
            Entry::Vacant(entry) => {
                self.len.fetch_add(1, Ordering::AcqRel);
                entry.insert(Slot::default()).clone()
            }
        }
    }

    /// The running actor of the auction, if one has started.
    pub fn live_handle(&self, auction_id: AuctionId) -> Option<AuctionHandle> {
        self.shard(shard_of(auction_id)).get(&auction_id).and_then(|slot| slot.get().cloned())
    }

    /// Removes `slot` if it is still the auction's and was never filled (its actor failed to start).
    pub fn remove_unfilled(&self, auction_id: AuctionId, slot: &Slot) {
        let mut shard = self.shard(shard_of(auction_id));
        if shard.get(&auction_id).is_some_and(|existing| Arc::ptr_eq(existing, slot) && existing.get().is_none()) {
            shard.remove(&auction_id);
            self.len.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Removes the entry of `actor` (and only of that actor).
    pub fn forget(&self, auction_id: AuctionId, actor: ActorId) {
        let mut shard = self.shard(shard_of(auction_id));
        let is_this_actor =
            shard.get(&auction_id).and_then(|slot| slot.get()).is_some_and(|handle| handle.actor.get_id() == actor);
        if is_this_actor {
            shard.remove(&auction_id);
            self.len.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Every running actor.
    pub fn handles(&self) -> Vec<AuctionHandle> {
        (0..SHARD_COUNT).flat_map(|shard| self.handles_of_shard(shard)).collect()
    }

    /// The running actors of one shard.
    pub fn handles_of_shard(&self, shard: u32) -> Vec<AuctionHandle> {
        self.shard(shard).values().filter_map(|slot| slot.get().cloned()).collect()
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    /// Up to `count` running actors, a few from each of the shards visited,
    /// chosen by `seed` (any random number): where the visit starts, the
    /// stride over the shards, and where in each shard it looks.
    pub fn sample(&self, seed: u64, count: usize) -> Vec<AuctionHandle> {
        let mut sampled = Vec::with_capacity(count);
        let start = seed as u32 % SHARD_COUNT;
        // Odd, so the visit reaches every shard (their count is a power of two).
        let stride = ((seed >> 32) as u32 % SHARD_COUNT) | 1;
        for visit in 0..SHARD_COUNT {
            if sampled.len() >= count {
                break;
            }
            let shard = self.shard(start.wrapping_add(visit.wrapping_mul(stride)) % SHARD_COUNT);
            if shard.is_empty() {
                continue;
            }
            let skip = (seed >> 16) as usize % shard.len();
            let wanted = SAMPLE_PER_SHARD.min(count - sampled.len());
            sampled.extend(shard.values().skip(skip).filter_map(|slot| slot.get().cloned()).take(wanted));
        }
        sampled
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Directory for Registry {
    fn stopped(&self, auction_id: AuctionId, actor: ActorId) {
        self.forget(auction_id, actor);
    }
}
