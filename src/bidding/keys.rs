//! Idempotency keys at the edge: a write that carries a key is first looked
//! up in the store, where every accepted write's key is committed with it. A
//! hit is answered from the store (the first answer again); a key used for a
//! different request is refused. Keys of writes still in flight, and of
//! rejections, live in their auction's actor (`auction/idempotency.rs`), which
//! is where two concurrent requests with one key for one auction meet; one key
//! in flight for two different requests is refused here first
//! (`KeysInFlight`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use uuid::Uuid;

use crate::storage::{Db, KeyRow};

/// The keyed bids and cancels this node has taken in and not yet answered,
/// by user and key. A second write under a key in flight that asks for
/// something else (another auction, amount or kind) is refused at once:
/// sent on, both would be applied by their auctions, the store would refuse
/// one at its commit, and the bids other bidders made on top of that one
/// would be refused with it. Taken before the store's check of the key, so a
/// write that comes after the first's answer finds its key in the store.
/// Holds no more entries than requests in flight. Writes under one key that
/// enter at two nodes at once meet only in the store.
#[derive(Default)]
pub struct KeysInFlight {
    entries: Mutex<HashMap<(Uuid, String), InFlight>>,
}

/// One key in flight.
struct InFlight {
    fingerprint: u64,
    /// Requests holding it: the first, and the same request sent again.
    holders: usize,
    /// Whether one of its holders has been charged to the bidder's rate.
    charged: bool,
}

/// Copies of one request in flight that ride on its charge to the rate
/// limit; more are charged as new bids. A retry while the first is in flight
/// is answered with the first's answer and places nothing, but each copy
/// still goes to the auction: without a bound, copies would bypass the rate.
const FREE_COPIES: usize = 4;

impl KeysInFlight {
    /// Holds `key` for this request, or `None` when a request in flight holds
    /// it for another (the same request again goes on: its auction answers
    /// both alike).
    pub fn hold(self: &Arc<Self>, user_id: Uuid, key: &str, request_fingerprint: u64) -> Option<KeyHeld> {
        let id = (user_id, key.to_owned());
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = entries.entry(id.clone()).or_insert(InFlight {
            fingerprint: request_fingerprint,
            holders: 0,
            charged: false,
        });
        if entry.fingerprint != request_fingerprint {
            return None;
        }
        entry.holders += 1;
        let holders_before = entry.holders - 1;
        Some(KeyHeld { keys: self.clone(), id, holders_before })
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

/// A key held while its request is in flight; let go when dropped.
pub struct KeyHeld {
    keys: Arc<KeysInFlight>,
    /// (user, key), as `KeysInFlight` keys it.
    id: (Uuid, String),
    /// Requests that held the key when this one took it.
    holders_before: usize,
}

impl KeyHeld {
    /// Whether this request is a copy of one in flight that was charged to
    /// the rate already (and one of the first `FREE_COPIES`): it is not
    /// charged again. A copy of one refused for the rate, or not yet past
    /// it, is charged as a bid.
    pub fn rides_on_a_charged_copy(&self) -> bool {
        self.holders_before > 0
            && self.holders_before <= FREE_COPIES
            && self.with_entry(|entry| entry.charged).unwrap_or(false)
    }

    /// Records that this request was charged to the rate.
    pub fn charged(&self) {
        self.with_entry(|entry| entry.charged = true);
    }

    fn with_entry<T>(&self, on: impl FnOnce(&mut InFlight) -> T) -> Option<T> {
        let mut entries = self.keys.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.get_mut(&self.id).map(on)
    }
}

impl Drop for KeyHeld {
    fn drop(&mut self) {
        let mut entries = self.keys.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = entries.get_mut(&self.id) {
            entry.holders -= 1;
            if entry.holders == 0 {
                entries.remove(&self.id);
            }
        }
    }
}

/// What the store knows of a key.
pub enum KeyCheck {
    /// No write was made under it (yet).
    Fresh,
    /// The same request was made before and took effect: answer as it was answered.
    Replay(KeyRow),
    /// The key was used for a different request.
    Reused,
}

/// Looks `key` up for `user_id`; `kind` is the kind of write (`bid`, `cancel`, `create`).
pub async fn check(
    db: &Db,
    user_id: Uuid,
    key: Option<&str>,
    request_fingerprint: u64,
    kind: &str,
) -> Result<KeyCheck, sqlx::Error> {
    let Some(key) = key else {
        return Ok(KeyCheck::Fresh);
    };
    Ok(match db.key(user_id, key).await? {
        None => KeyCheck::Fresh,
        Some(stored) if stored.fingerprint as u64 != request_fingerprint || stored.kind != kind => KeyCheck::Reused,
        Some(stored) => KeyCheck::Replay(stored),
    })
}

/// A stable 64-bit fingerprint (FNV-1a) of what a request asks for, so a
/// key reused for a different request is told apart from a retry. Every node
/// computes the same one.
pub fn fingerprint(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.iter().chain(std::iter::once(&0xffu8)) {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    hash
}

/// The fingerprint of a bid.
pub fn bid_fingerprint(auction_id: Uuid, amount: i64, max_amount: Option<i64>) -> u64 {
    let max_text = max_amount.map(|max| max.to_string()).unwrap_or_default();
    fingerprint(&[b"bid", auction_id.as_bytes(), amount.to_string().as_bytes(), max_text.as_bytes()])
}

/// The fingerprint of a cancel.
pub fn cancel_fingerprint(auction_id: Uuid) -> u64 {
    fingerprint(&[b"cancel", auction_id.as_bytes()])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_in_flight_refuses_another_request_and_lets_the_same_one_through_until_all_are_answered() {
        let keys = Arc::new(KeysInFlight::default());
        let (alice, bob) = (Uuid::now_v7(), Uuid::now_v7());
        let (on_x, on_y) = (bid_fingerprint(Uuid::now_v7(), 100, None), bid_fingerprint(Uuid::now_v7(), 100, None));

        let first = keys.hold(alice, "k", on_x).expect("a fresh key is held");
        assert!(!first.rides_on_a_charged_copy(), "the first is charged");
        assert!(keys.hold(alice, "k", on_y).is_none(), "another auction under the key in flight");
        let retry = keys.hold(alice, "k", on_x).expect("the same request again goes on");
        assert!(keys.hold(bob, "k", on_y).is_some(), "keys are per user");
        drop(first);
        assert!(keys.hold(alice, "k", on_y).is_none(), "held while any request holding it is in flight");
        drop(retry);
        assert_eq!(keys.len(), 0, "an answered key is let go");
        assert!(keys.hold(alice, "k", on_y).is_some(), "then the store decides");
    }

    #[test]
    fn a_copy_rides_on_the_first_requests_charge_only_once_it_was_charged_and_only_a_few_do() {
        let keys = Arc::new(KeysInFlight::default());
        let alice = Uuid::now_v7();
        let bid = bid_fingerprint(Uuid::now_v7(), 100, None);

        let first = keys.hold(alice, "k", bid).unwrap();
        let early_copy = keys.hold(alice, "k", bid).unwrap();
        assert!(!early_copy.rides_on_a_charged_copy(), "the first is not past the rate yet (or was refused)");
        first.charged();
        let copies: Vec<KeyHeld> = (0..FREE_COPIES + 1).map(|_| keys.hold(alice, "k", bid).unwrap()).collect();
        let riding = copies.iter().filter(|copy| copy.rides_on_a_charged_copy()).count();
        assert_eq!(riding, FREE_COPIES - 1, "the early copy counts among the free ones; past them, charged");

        drop((first, early_copy, copies));
        let next = keys.hold(alice, "k", bid).unwrap();
        let copy = keys.hold(alice, "k", bid).unwrap();
        assert!(!copy.rides_on_a_charged_copy(), "a key let go forgets its charge");
        drop(next);
    }
}
