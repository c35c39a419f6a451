//! Which users exist, for the bid path: a valid token names a user, but that
//! user may have been deleted from the database since (by an operator, or a
//! restore). Such a user's writes are refused (`401`) instead of reaching the
//! store. The answer is cached per user for `FRESH_FOR` (and a user is known
//! from registering or logging in on this node), so a bidder costs one read a
//! while, not one per bid; a user deleted is refused within that time. When the
//! store cannot be asked, the token is trusted: rejections need no database,
//! and the commit is what stands between a write and the store anyway.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::storage::Db;

/// How long a user found in the store is taken to exist without asking again.
pub const FRESH_FOR: Duration = Duration::from_secs(30);
/// Users remembered at most; past it the cache starts over.
const CAPACITY: usize = 200_000;

#[derive(Default)]
pub struct KnownUsers {
    /// Read on every bid (shared), written once per user per `FRESH_FOR`.
    seen: RwLock<HashMap<Uuid, Instant>>,
}

impl KnownUsers {
    /// `user_id` exists (it was just registered, or just logged in).
    pub fn remember(&self, user_id: Uuid) {
        let mut seen = self.seen.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if seen.len() >= CAPACITY {
            seen.clear();
        }
        seen.insert(user_id, Instant::now());
    }

    /// Whether `user_id` was found within `FRESH_FOR` (no store read).
    pub fn is_fresh(&self, user_id: Uuid) -> bool {
        let seen = self.seen.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        seen.get(&user_id).is_some_and(|at| at.elapsed() < FRESH_FOR)
    }

    /// Whether `user_id` exists: from the cache while fresh, else from the store.
    pub async fn exists(&self, db: &Db, user_id: Uuid) -> Result<bool, sqlx::Error> {
        if self.is_fresh(user_id) {
            return Ok(true);
        }
        let found = db.user_by_id(user_id).await?.is_some();
        if found {
            self.remember(user_id);
        } else {
            self.seen.write().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&user_id);
        }
        Ok(found)
    }
}
