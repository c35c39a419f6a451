//! The recent-keys policy of one auction: a bounded map from `(user, key)` to
//! what the first request with that key got. Pure and generic over the stored
//! outcome, so the actor can keep answers, or waiters for answers not yet
//! durable. Older keys (evicted here) are found in the store by the caller.

use std::collections::{HashMap, VecDeque};

use super::state::UserId;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct IdempotencyKey {
    pub user_id: UserId,
    pub key: String,
}

/// What a lookup found.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup<'a, T> {
    /// First time this key is seen (as far as this cache knows).
    Miss,
    /// Same key, same request: answer with the first outcome.
    Hit(&'a mut T),
    /// Same key for a different request: a client bug.
    Mismatch,
}

struct Entry<T> {
    fingerprint: u64,
    outcome: T,
}

/// Keeps at most `capacity` keys; the oldest insertion goes first.
pub struct RecentKeys<T> {
    capacity: usize,
    entries: HashMap<IdempotencyKey, Entry<T>>,
    insertion_order: VecDeque<IdempotencyKey>,
}

impl<T> RecentKeys<T> {
    pub fn new(capacity: usize) -> Self {
        assert!(capacity > 0, "a cache of nothing cannot deduplicate");
        RecentKeys { capacity, entries: HashMap::new(), insertion_order: VecDeque::new() }
    }

    pub fn lookup(&mut self, key: &IdempotencyKey, fingerprint: u64) -> Lookup<'_, T> {
        match self.entries.get_mut(key) {
            None => Lookup::Miss,
            Some(entry) if entry.fingerprint != fingerprint => Lookup::Mismatch,
            Some(entry) => Lookup::Hit(&mut entry.outcome),
        }
    }

    /// Records or replaces the outcome for `key`. At capacity the oldest entry
    /// that `is_pinned` does not hold is evicted; pinned entries (requests still
    /// in flight, whose duplicates must find them) are never evicted, so the
    /// cache may exceed its capacity by the number of pinned entries (which the
    /// caller bounds).
    pub fn insert(&mut self, key: IdempotencyKey, fingerprint: u64, outcome: T, is_pinned: impl Fn(&T) -> bool) {
        if let Some(entry) = self.entries.get_mut(&key) {
            *entry = Entry { fingerprint, outcome };
            return;
        }
        if self.entries.len() >= self.capacity {
            let evictable = self
                .insertion_order
                .iter()
                .position(|candidate| self.entries.get(candidate).is_some_and(|entry| !is_pinned(&entry.outcome)));
            if let Some(position) = evictable
                && let Some(oldest) = self.insertion_order.remove(position)
            {
                self.entries.remove(&oldest);
            }
        }
        self.insertion_order.push_back(key.clone());
        self.entries.insert(key, Entry { fingerprint, outcome });
        debug_assert_eq!(self.entries.len(), self.insertion_order.len());
    }

    pub fn get_mut(&mut self, key: &IdempotencyKey) -> Option<&mut T> {
        self.entries.get_mut(key).map(|entry| &mut entry.outcome)
    }

    /// Forgets `key` (its write was never made) and returns what it held.
    pub fn remove(&mut self, key: &IdempotencyKey) -> Option<T> {
        let entry = self.entries.remove(key)?;
        self.insertion_order.retain(|candidate| candidate != key);
        Some(entry.outcome)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn key(n: u128, text: &str) -> IdempotencyKey {
        IdempotencyKey { user_id: Uuid::from_u128(n), key: text.to_owned() }
    }

    #[test]
    fn same_key_same_request_hits_and_other_request_mismatches() {
        let mut keys = RecentKeys::new(4);
        assert_eq!(keys.lookup(&key(1, "a"), 7), Lookup::Miss);
        keys.insert(key(1, "a"), 7, "first", |_| false);
        assert_eq!(keys.lookup(&key(1, "a"), 7), Lookup::Hit(&mut "first"));
        assert_eq!(keys.lookup(&key(1, "a"), 8), Lookup::Mismatch);
        assert_eq!(keys.lookup(&key(2, "a"), 7), Lookup::Miss, "keys are per user");
    }

    #[test]
    fn the_oldest_key_is_evicted_at_capacity() {
        let mut keys = RecentKeys::new(2);
        keys.insert(key(1, "a"), 1, 1, |_| false);
        keys.insert(key(1, "b"), 1, 2, |_| false);
        keys.insert(key(1, "c"), 1, 3, |_| false);
        assert_eq!(keys.len(), 2);
        assert_eq!(keys.lookup(&key(1, "a"), 1), Lookup::Miss);
        assert_eq!(keys.lookup(&key(1, "c"), 1), Lookup::Hit(&mut 3));
    }

    #[test]
    fn pinned_entries_are_never_evicted() {
        // Odd outcomes stand for requests still in flight.
        let pinned = |outcome: &i32| outcome % 2 == 1;
        let mut keys = RecentKeys::new(2);
        keys.insert(key(1, "a"), 1, 1, pinned);
        keys.insert(key(1, "b"), 1, 2, pinned);
        keys.insert(key(1, "c"), 1, 3, pinned);
        assert_eq!(keys.lookup(&key(1, "a"), 1), Lookup::Hit(&mut 1), "in flight: kept although oldest");
        assert_eq!(keys.lookup(&key(1, "b"), 1), Lookup::Miss, "the oldest evictable went instead");
        keys.insert(key(1, "d"), 1, 5, pinned);
        assert_eq!(keys.len(), 3, "over capacity rather than forget a request in flight");
        assert_eq!(keys.lookup(&key(1, "a"), 1), Lookup::Hit(&mut 1));
        assert_eq!(keys.lookup(&key(1, "c"), 1), Lookup::Hit(&mut 3));
    }
}
