//! Idempotency keys at the edge: a write that carries a key is first looked
//! up in the store, where every accepted write's key is committed with it. A
//! hit is answered from the store (the first answer again); a key used for a
//! different request is refused. Keys of writes still in flight, and of
//! rejections, live in their auction's actor (`auction/idempotency.rs`), which
//! is where two concurrent requests with one key meet.

use uuid::Uuid;

use crate::storage::{Db, KeyRow};

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
