//! Auction rows for `GET /api/v1/auctions/{id}`, kept in memory between
//! changes. Every change to an auction reaches this node's event sink after
//! it is durable and before anyone is answered, and invalidates the entry
//! there (`InvalidatingSink`); a read that raced with a change cannot put its
//! older row back, because each entry carries a version that the change
//! bumps. Bounded: at most `capacity` entries, evicted arbitrarily.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use gavel_actors::ports::EventSink;
use gavel_actors::{AuctionState, Event};
use uuid::Uuid;

use crate::storage::AuctionRow;

const SHARDS: usize = 16;

pub struct ReadCache {
    shards: Vec<Mutex<HashMap<Uuid, Slot>>>,
    per_shard: usize,
    versions: AtomicU64,
}

struct Slot {
    version: u64,
    row: Option<Arc<AuctionRow>>,
}

fn shard_index(id: Uuid) -> usize {
    (id.as_u64_pair().1 as usize) % SHARDS
}

/// A miss: what the reader must show when it brings the row back.
pub struct Ticket {
    version: u64,
}

impl ReadCache {
    pub fn new(capacity: usize) -> ReadCache {
        ReadCache {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: capacity.div_ceil(SHARDS).max(1),
            versions: AtomicU64::new(1),
        }
    }

    fn shard(&self, id: Uuid) -> std::sync::MutexGuard<'_, HashMap<Uuid, Slot>> {
        self.shards[shard_index(id)].lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The cached row, or a ticket to fill it with one read from the store.
    pub fn get(&self, id: Uuid) -> Result<Arc<AuctionRow>, Ticket> {
        let mut shard = self.shard(id);
        if let Some(slot) = shard.get(&id) {
            return slot.row.clone().ok_or(Ticket { version: slot.version });
        }
        if shard.len() >= self.per_shard
            && let Some(victim) = shard.keys().next().copied()
        {
            shard.remove(&victim);
        }
        let version = self.versions.fetch_add(1, Ordering::Relaxed);
        shard.insert(id, Slot { version, row: None });
        Err(Ticket { version })
    }

    /// Keeps `row`, read after `ticket` was given, unless the auction changed
    /// (or its entry was evicted) in between.
    pub fn fill(&self, id: Uuid, ticket: Ticket, row: AuctionRow) -> Arc<AuctionRow> {
        let row = Arc::new(row);
        if let Some(slot) = self.shard(id).get_mut(&id)
            && slot.version == ticket.version
        {
            slot.row = Some(row.clone());
        }
        row
    }

    /// Forgets every row (this node gained or lost shards: rows of auctions
    /// another node changed meanwhile may be stale). A read in flight finds
    /// its entry gone and keeps nothing.
    pub fn clear(&self) {
        for shard in &self.shards {
            shard.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
        }
    }

    pub fn invalidate(&self, id: Uuid) {
        let mut shard = self.shard(id);
        if let Some(slot) = shard.get_mut(&id) {
            slot.version = self.versions.fetch_add(1, Ordering::Relaxed);
            slot.row = None;
        }
    }
}

/// Invalidates the cached row of every auction that changed, then passes the
/// event on.
pub struct InvalidatingSink {
    pub cache: Arc<ReadCache>,
    pub next: Arc<dyn EventSink>,
}

impl EventSink for InvalidatingSink {
    fn publish(&self, event: &Event, state: &AuctionState) {
        self.cache.invalidate(state.id);
        self.next.publish(event, state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: Uuid, price: i64) -> AuctionRow {
        AuctionRow {
            id,
            seller_id: Uuid::nil(),
            seller_username: "sally".to_owned(),
            title: "t".to_owned(),
            description: String::new(),
            currency: "EUR".to_owned(),
            starting_price: 1,
            reserve_price: None,
            min_increment: 1,
            soft_close_secs: 0,
            start_at_ms: 0,
            end_at_ms: 1,
            status: "active".to_owned(),
            current_price: price,
            leader_id: None,
            leader_username: None,
            leader_max: None,
            bid_count: 0,
            seq: 0,
            winner_id: None,
            winner_username: None,
            final_price: None,
        }
    }

    #[test]
    fn a_read_that_raced_with_a_change_is_not_kept() {
        let cache = ReadCache::new(64);
        let id = Uuid::now_v7();
        let Err(ticket) = cache.get(id) else { panic!("empty cache") };
        // The store is read (old price), then the auction changes...
        cache.invalidate(id);
        cache.fill(id, ticket, row(id, 1));
        // ...so the old row was not kept: the next read goes to the store.
        let Err(ticket) = cache.get(id) else { panic!("the stale row was cached") };
        cache.fill(id, ticket, row(id, 2));
        assert_eq!(cache.get(id).ok().map(|row| row.current_price), Some(2));
        cache.invalidate(id);
        assert!(cache.get(id).is_err(), "a change empties the entry");
    }

    #[test]
    fn a_read_in_flight_across_a_clear_is_not_kept() {
        let cache = ReadCache::new(64);
        let id = Uuid::now_v7();
        let Err(ticket) = cache.get(id) else { panic!("empty cache") };
        cache.clear();
        cache.fill(id, ticket, row(id, 1));
        assert!(cache.get(id).is_err(), "the row read before the clear was dropped");
    }

    #[test]
    fn entries_are_bounded() {
        let cache = ReadCache::new(32);
        for _ in 0..10_000 {
            let _ = cache.get(Uuid::now_v7());
        }
        let total: usize = cache.shards.iter().map(|shard| shard.lock().unwrap().len()).sum();
        assert!(total <= 32 + SHARDS, "{total} entries");
    }

    #[test]
    fn a_read_whose_entry_was_evicted_meanwhile_is_not_kept() {
        // One entry per shard: another auction of the same shard evicts the
        // first for certain (with more, which one goes is arbitrary).
        let cache = ReadCache::new(SHARDS);
        let first = Uuid::now_v7();
        let Err(ticket) = cache.get(first) else { panic!("empty cache") };
        let neighbour = std::iter::repeat_with(Uuid::now_v7)
            .find(|id| shard_index(*id) == shard_index(first))
            .expect("uuids land in every shard");
        let _ = cache.get(neighbour);
        // `first` was evicted (and could have changed unseen): its read is dropped.
        cache.fill(first, ticket, row(first, 1));
        assert!(cache.get(first).is_err());
    }
}
