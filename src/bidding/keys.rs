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
    /// (user, key) → (fingerprint, requests holding it).
    entries: Mutex<HashMap<(Uuid, String), (u64, usize)>>,
}

impl KeysInFlight {
    /// Holds `key` for this request, or `None` when a request in flight holds
    /// it for another (the same request again goes on: its auction answers
    /// both alike).
    pub fn hold(self: &Arc<Self>, user_id: Uuid, key: &str, request_fingerprint: u64) -> Option<KeyHeld> {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = entries.entry((user_id, key.to_owned())).or_insert((request_fingerprint, 0));
        if entry.0 != request_fingerprint {
            return None;
        }
        entry.1 += 1;
        Some(KeyHeld { keys: self.clone(), user_id, key: key.to_owned(), joins_another: entry.1 > 1 })
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

/// A key held while its request is in flight; let go when dropped.
pub struct KeyHeld {
    keys: Arc<KeysInFlight>,
    user_id: Uuid,
    key: String,
    joins_another: bool,
}

impl KeyHeld {
    /// Whether another request, the same as this one, held the key already.
    pub fn joins_another(&self) -> bool {
        self.joins_another
    }
}

impl Drop for KeyHeld {
    fn drop(&mut self) {
        let mut entries = self.keys.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let id = (self.user_id, std::mem::take(&mut self.key));
        if let Some(entry) = entries.get_mut(&id) {
            entry.1 -= 1;
            if entry.1 == 0 {
                entries.remove(&id);
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
        assert!(!first.joins_another());
        assert!(keys.hold(alice, "k", on_y).is_none(), "another auction under the key in flight");
        let retry = keys.hold(alice, "k", on_x).expect("the same request again goes on");
        assert!(retry.joins_another(), "and joins the first");
        assert!(keys.hold(bob, "k", on_y).is_some(), "keys are per user");
        drop(first);
        assert!(keys.hold(alice, "k", on_y).is_none(), "held while any request holding it is in flight");
        drop(retry);
        assert_eq!(keys.len(), 0, "an answered key is let go");
        assert!(keys.hold(alice, "k", on_y).is_some(), "then the store decides");
    }
}
