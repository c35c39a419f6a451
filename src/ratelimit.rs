//! Token-bucket rate limits, kept in memory: bids per user (refilled at
//! `rate` per second up to a burst of twice that), and sign-ins per client
//! address and per username (so many a minute, in a burst at most). Sharded
//! to keep lock hold times short, and bounded: idle buckets (full again) are
//! dropped when a shard grows past its cap.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::Mutex;

use uuid::Uuid;

const SHARDS: usize = 16;
const MAX_KEYS_PER_SHARD: usize = 65_536;

struct Bucket {
    tokens: f64,
    updated_ms: i64,
}

pub struct RateLimiter<K = Uuid> {
    /// Tokens added a second; 0: no limit.
    rate_per_sec: f64,
    burst: f64,
    hasher: RandomState,
    shards: Vec<Mutex<HashMap<K, Bucket>>>,
}

impl<K: Hash + Eq> RateLimiter<K> {
    /// `rate_per_sec` a second, bursts of twice that; 0 turns the limit off.
    pub fn new(rate_per_sec: u32) -> RateLimiter<K> {
        Self::with(f64::from(rate_per_sec), f64::from(rate_per_sec) * 2.0)
    }

    /// `count` a minute, all of them at once at most; 0 turns the limit off.
    pub fn per_minute(count: u32) -> RateLimiter<K> {
        Self::with(f64::from(count) / 60.0, f64::from(count))
    }

    fn with(rate_per_sec: f64, burst: f64) -> RateLimiter<K> {
        RateLimiter {
            rate_per_sec,
            burst,
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    /// Takes one token for `key`; `Err(seconds)` tells when to retry.
    pub fn check(&self, key: K, now_ms: i64) -> Result<(), u64> {
        if self.rate_per_sec == 0.0 {
            return Ok(());
        }
        let (rate, burst) = (self.rate_per_sec, self.burst);
        let shard = &self.shards[(self.hasher.hash_one(&key) % SHARDS as u64) as usize];
        let mut buckets = shard.lock().expect("rate limiter lock");
        if buckets.len() >= MAX_KEYS_PER_SHARD && !buckets.contains_key(&key) {
            buckets.retain(|_, bucket| bucket.tokens + (now_ms - bucket.updated_ms) as f64 / 1000.0 * rate < burst);
        }
        let bucket = buckets.entry(key).or_insert(Bucket { tokens: burst, updated_ms: now_ms });
        let elapsed_secs = (now_ms - bucket.updated_ms).max(0) as f64 / 1000.0;
        bucket.tokens = (bucket.tokens + elapsed_secs * rate).min(burst);
        bucket.updated_ms = now_ms;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let wait_secs = (1.0 - bucket.tokens) / rate;
            Err(wait_secs.ceil().max(1.0) as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_a_burst_of_twice_the_rate_then_refills() {
        let limiter: RateLimiter = RateLimiter::new(5);
        let user = Uuid::from_u128(1);
        for _ in 0..10 {
            assert_eq!(limiter.check(user, 0), Ok(()));
        }
        assert_eq!(limiter.check(user, 0), Err(1));
        assert_eq!(limiter.check(Uuid::from_u128(2), 0), Ok(()), "buckets are per user");
        assert_eq!(limiter.check(user, 200), Ok(()), "one token back after 200 ms at 5/s");
        assert!(limiter.check(user, 200).is_err());
    }

    #[test]
    fn zero_turns_the_limit_off() {
        let limiter: RateLimiter = RateLimiter::new(0);
        for _ in 0..1000 {
            assert_eq!(limiter.check(Uuid::from_u128(1), 0), Ok(()));
        }
    }

    #[test]
    fn per_minute_allows_the_count_at_once_then_one_every_sixtieth_of_a_minute() {
        let limiter = RateLimiter::per_minute(6);
        for _ in 0..6 {
            assert_eq!(limiter.check("ann", 0), Ok(()));
        }
        assert_eq!(limiter.check("ann", 0), Err(10), "one token back in 10 s at 6 a minute");
        assert_eq!(limiter.check("bob", 0), Ok(()), "buckets are per key");
        assert_eq!(limiter.check("ann", 9_000), Err(1));
        for _ in 0..6 {
            assert_eq!(limiter.check("cat", 0), Ok(()));
        }
        assert_eq!(limiter.check("cat", 10_000), Ok(()));
        assert!(limiter.check("cat", 10_000).is_err());
    }
}
