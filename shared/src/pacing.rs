//! Token buckets that hand out *reservations*: when no token is free, the
//! caller learns how long until its turn and holds that slot, so a burst of
//! waiting messages is spread one interval apart instead of all retrying at
//! the same moment. Used per integration (deliverer) and per channel
//! (responder).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::RateLimit;

/// One token bucket: `burst` tokens, refilled at `per_second`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    per_second: f64,
    burst: f64,
    /// Tokens available at `at`; negative when slots are reserved ahead.
    tokens: f64,
    at: Instant,
}

/// What a bucket said.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Admission {
    /// A token was taken: go now.
    Now,
    /// A token is reserved for `wait` from now.
    After(Duration),
    /// The wait would exceed the caller's limit; nothing was taken.
    TooLong(Duration),
}

impl TokenBucket {
    pub fn new(limit: &RateLimit, now: Instant) -> Self {
        TokenBucket {
            per_second: limit.per_second,
            burst: limit.burst as f64,
            tokens: limit.burst as f64,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        self.at = now;
    }

    /// Takes a token if one is free now; never reserves.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Takes a token now or reserves the next free one, unless that is more
    /// than `max_wait` away.
    pub fn reserve(&mut self, now: Instant, max_wait: Duration) -> Admission {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Admission::Now;
        }
        let wait = Duration::from_secs_f64((1.0 - self.tokens) / self.per_second);
        if wait > max_wait {
            return Admission::TooLong(wait);
        }
        self.tokens -= 1.0;
        Admission::After(wait)
    }

    /// Adopts a changed limit, keeping the tokens (capped at the new burst).
    pub fn set_limit(&mut self, limit: &RateLimit) {
        self.per_second = limit.per_second;
        self.burst = limit.burst as f64;
        self.tokens = self.tokens.min(self.burst);
    }
}

/// One bucket per key.
#[derive(Debug, Default)]
pub struct RateLimiter<K> {
    buckets: Mutex<HashMap<K, TokenBucket>>,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    pub fn new() -> Self {
        RateLimiter {
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn with_bucket<T>(&self, key: &K, limit: &RateLimit, now: Instant, f: impl FnOnce(&mut TokenBucket) -> T) -> T {
        let mut buckets = self.buckets.lock().expect("rate limiter lock");
        let bucket = buckets
            .entry(key.clone())
            .or_insert_with(|| TokenBucket::new(limit, now));
        if bucket.per_second != limit.per_second || bucket.burst != limit.burst as f64 {
            bucket.set_limit(limit);
        }
        f(bucket)
    }

    pub fn try_take(&self, key: &K, limit: &RateLimit, now: Instant) -> bool {
        self.with_bucket(key, limit, now, |b| b.try_take(now))
    }

    pub fn reserve(&self, key: &K, limit: &RateLimit, now: Instant, max_wait: Duration) -> Admission {
        self.with_bucket(key, limit, now, |b| b.reserve(now, max_wait))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OnLimit;

    fn limit(per_second: f64, burst: u32) -> RateLimit {
        RateLimit {
            per_second,
            burst,
            on_limit: OnLimit::Delay,
        }
    }

    #[test]
    fn burst_then_one_interval_apart() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(&limit(1.0, 5), t0);
        let max = Duration::from_secs(600);
        for _ in 0..5 {
            assert_eq!(b.reserve(t0, max), Admission::Now);
        }
        for k in 1..=15u64 {
            match b.reserve(t0, max) {
                Admission::After(w) => assert!((w.as_secs_f64() - k as f64).abs() < 1e-6, "slot {k}: {w:?}"),
                other => panic!("slot {k}: {other:?}"),
            }
        }
        // 30 s later the reservations are used up and the bucket is full again.
        let later = t0 + Duration::from_secs(30);
        for _ in 0..5 {
            assert_eq!(b.reserve(later, max), Admission::Now);
        }
    }

    #[test]
    fn too_long_takes_nothing_and_try_take_never_reserves() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(&limit(2.0, 1), t0);
        assert!(b.try_take(t0));
        assert!(!b.try_take(t0));
        assert_eq!(
            b.reserve(t0, Duration::from_millis(100)),
            Admission::TooLong(Duration::from_millis(500))
        );
        assert_eq!(
            b.reserve(t0, Duration::from_secs(1)),
            Admission::After(Duration::from_millis(500))
        );
        assert!(b.try_take(t0 + Duration::from_millis(1500)));
    }

    #[test]
    fn limiter_keeps_one_bucket_per_key() {
        let r = RateLimiter::new();
        let t0 = Instant::now();
        let l = limit(1.0, 1);
        assert!(r.try_take(&"a", &l, t0));
        assert!(!r.try_take(&"a", &l, t0));
        assert!(r.try_take(&"b", &l, t0));
    }
}
