//! The per-user bid rate limit: a token bucket per user, refilled at `rate`
//! per second up to a burst of twice that. Kept in memory, sharded to keep lock
//! hold times short, and bounded: idle buckets (full again) are dropped when a
//! shard grows past its cap.

use std::collections::HashMap;
use std::sync::Mutex;

use uuid::Uuid;

const SHARDS: usize = 16;
const MAX_USERS_PER_SHARD: usize = 65_536;

struct Bucket {
    tokens: f64,
    updated_ms: i64,
}

pub struct RateLimiter {
    rate_per_sec: u32,
    shards: Vec<Mutex<HashMap<Uuid, Bucket>>>,
}

impl RateLimiter {
    /// `rate_per_sec == 0` turns the limit off.
    pub fn new(rate_per_sec: u32) -> RateLimiter {
        RateLimiter { rate_per_sec, shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect() }
    }

    /// Takes one token for `user`; `Err(seconds)` tells when to retry.
    pub fn check(&self, user: Uuid, now_ms: i64) -> Result<(), u64> {
        if self.rate_per_sec == 0 {
            return Ok(());
        }
        let rate = f64::from(self.rate_per_sec);
        let burst = rate * 2.0;
        let shard = &self.shards[(user.as_u128() % SHARDS as u128) as usize];
        let mut buckets = shard.lock().expect("rate limiter lock");
        if buckets.len() >= MAX_USERS_PER_SHARD && !buckets.contains_key(&user) {
            buckets.retain(|_, bucket| bucket.tokens + (now_ms - bucket.updated_ms) as f64 / 1000.0 * rate < burst);
        }
        let bucket = buckets.entry(user).or_insert(Bucket { tokens: burst, updated_ms: now_ms });
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
        let limiter = RateLimiter::new(5);
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
        let limiter = RateLimiter::new(0);
        for _ in 0..1000 {
            assert_eq!(limiter.check(Uuid::from_u128(1), 0), Ok(()));
        }
    }
}
