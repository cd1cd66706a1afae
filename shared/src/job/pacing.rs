//! Token buckets that hand out *reservations*: when no token is free, the
//! caller learns how long until its turn and holds that slot, so a burst of
//! waiting messages is spread one interval apart instead of all retrying at
//! the same moment. Used per integration (deliverer) and per channel
//! (responder).
//!
//! A parked message comes back from the broker a little after its slot, or
//! much later when the broker stalled or no stage was consuming. One that
//! misses its slot by more than [`slot_grace`] takes a new token or slot
//! (once; its old slot's capacity passed unused and is not given back), so a
//! backlog of late messages is spread at the limit again instead of going
//! all at once.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::RateLimit;
use crate::wire::messages::Slot;

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
    pub(crate) fn set_limit(&mut self, limit: &RateLimit) {
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

    /// The turn of a message that may hold a slot (see [`Slot`]): it goes
    /// on a slot it holds unless it missed that slot by more than
    /// [`slot_grace`] for the first time; then, and when it holds none, it
    /// takes a token or reserves the next slot, at most `max_wait` away.
    /// Sends therefore exceed the limit by at most the grace's worth of
    /// tokens, unless messages miss their second slots too (they go then, so
    /// that a broker that is always late cannot starve them).
    /// `now_ms` is the wall clock the slots are written in.
    pub fn turn(&self, key: &K, limit: &RateLimit, slot: Slot<'_>, now_ms: u64, max_wait: Duration) -> Turn {
        self.turn_at(key, limit, slot, (Instant::now(), now_ms), max_wait)
    }

    fn turn_at(&self, key: &K, limit: &RateLimit, slot: Slot<'_>, at: (Instant, u64), max_wait: Duration) -> Turn {
        let (now, now_ms) = at;
        let mut missed = false;
        if *slot.reserved {
            let late = Duration::from_millis(now_ms.saturating_sub(slot.not_before_ms.unwrap_or(now_ms)));
            if *slot.missed || late <= slot_grace(limit) {
                *slot.reserved = false;
                *slot.missed = false;
                return Turn::Go;
            }
            missed = true;
        }
        match self.reserve(key, limit, now, max_wait) {
            Admission::Now => {
                *slot.reserved = false;
                *slot.missed = false;
                Turn::Go
            }
            Admission::After(wait) => {
                *slot.reserved = true;
                *slot.missed = missed;
                *slot.not_before_ms = Some(now_ms + wait.as_millis() as u64);
                Turn::Wait { wait, missed }
            }
            Admission::TooLong(wait) => Turn::TooLong(wait),
        }
    }
}

/// What [`RateLimiter::turn`] decided.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Turn {
    /// Go now.
    Go,
    /// Park until the reserved slot, `wait` from now (`not_before_ms` is
    /// set); `missed` when the message had missed its earlier slot.
    Wait { wait: Duration, missed: bool },
    /// The next slot is past the caller's limit; nothing was taken.
    TooLong(Duration),
}

/// How long after its slot a parked message is brought back: half its
/// grace, the other half left for the broker's own lateness. Coming back
/// on a step that ends within this saves the ladder trips that would
/// otherwise approach the slot exactly (see `topology::park_for`).
pub(crate) fn park_leeway(limit: &RateLimit) -> Duration {
    slot_grace(limit) / 2
}

/// How late a message may use its slot: one interval of the limit, and at
/// least 250 ms, the broker's usual lateness and more. Messages going up to
/// this late may come closer together than the interval, by at most one
/// token's worth.
pub fn slot_grace(limit: &RateLimit) -> Duration {
    Duration::from_secs_f64(1.0 / limit.per_second).max(Duration::from_millis(250))
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

    /// A message's rate-limit fields, as a parked message carries them.
    #[derive(Default)]
    struct Msg {
        reserved: bool,
        missed: bool,
        not_before_ms: Option<u64>,
    }

    impl Msg {
        fn turn(&mut self, r: &RateLimiter<&str>, l: &RateLimit, now: Instant, now_ms: u64) -> Turn {
            let slot = Slot {
                reserved: &mut self.reserved,
                missed: &mut self.missed,
                not_before_ms: &mut self.not_before_ms,
            };
            r.turn_at(&"k", l, slot, (now, now_ms), Duration::from_secs(600))
        }
    }

    #[test]
    fn a_slot_is_used_on_time_and_replaced_when_missed_once() {
        let (r, l, t0) = (RateLimiter::new(), limit(1.0, 1), Instant::now());
        let ms0 = 1_000_000;
        let at = |s: f64| (t0 + Duration::from_secs_f64(s), ms0 + (s * 1000.0) as u64);
        let mut first = Msg::default();
        assert_eq!(first.turn(&r, &l, at(0.0).0, at(0.0).1), Turn::Go);
        // Three more wait one interval apart, holding slots at 1, 2 and 3 s.
        let mut waiting: Vec<Msg> = (0..3).map(|_| Msg::default()).collect();
        for (k, m) in waiting.iter_mut().enumerate() {
            let want = Duration::from_secs(k as u64 + 1);
            assert_eq!(
                m.turn(&r, &l, at(0.0).0, at(0.0).1),
                Turn::Wait {
                    wait: want,
                    missed: false
                }
            );
            assert!(m.reserved && !m.missed);
            assert_eq!(m.not_before_ms, Some(ms0 + want.as_millis() as u64));
        }
        // The first comes back 0.2 s late: within the grace, it goes.
        assert_eq!(waiting[0].turn(&r, &l, at(1.2).0, at(1.2).1), Turn::Go);
        assert!(!waiting[0].reserved);
        // The second comes back 1.5 s late: it takes the next free slot,
        // after the third's (at 4 s).
        let (now, now_ms) = at(3.5);
        assert_eq!(
            waiting[1].turn(&r, &l, now, now_ms),
            Turn::Wait {
                wait: Duration::from_millis(500),
                missed: true
            }
        );
        assert!(waiting[1].reserved && waiting[1].missed);
        // Late again, it goes anyway: a slot is missed at most once.
        assert_eq!(waiting[1].turn(&r, &l, at(9.0).0, at(9.0).1), Turn::Go);
        assert!(!waiting[1].reserved && !waiting[1].missed);
    }

    #[test]
    fn a_backlog_of_missed_slots_is_spread_again() {
        // A new process (a fresh bucket) meets ten messages whose slots passed
        // long ago: the burst goes, the rest wait one interval apart.
        let (r, l, t0) = (RateLimiter::new(), limit(1.0, 2), Instant::now());
        let mut turns = Vec::new();
        for _ in 0..10 {
            let mut m = Msg {
                reserved: true,
                missed: false,
                not_before_ms: Some(1_000),
            };
            turns.push(m.turn(&r, &l, t0, 60_000));
        }
        assert_eq!(turns[..2], [Turn::Go, Turn::Go]);
        for (k, t) in turns[2..].iter().enumerate() {
            let want = Duration::from_secs(k as u64 + 1);
            assert_eq!(
                *t,
                Turn::Wait {
                    wait: want,
                    missed: true
                },
                "message {}",
                k + 2
            );
        }
    }

    #[test]
    fn the_grace_is_one_interval_and_at_least_a_quarter_second() {
        assert_eq!(slot_grace(&limit(1.0, 5)), Duration::from_secs(1));
        assert_eq!(slot_grace(&limit(0.1, 5)), Duration::from_secs(10));
        assert_eq!(slot_grace(&limit(100.0, 5)), Duration::from_millis(250));
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
