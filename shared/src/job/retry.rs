//! The retry schedule (docs/contract.md §5): exponential from about 1 s, doubling,
//! capped at 5 minutes, with full jitter, and at least a `Retry-After`.
//!
//! The exponential ceilings come from `backon`'s builder (the maintained
//! successor of the unmaintained `backoff` crate). Full jitter (a uniform
//! draw between zero and the ceiling) is applied on top, because backon's
//! own jitter only adds to the delay. Retries are durable, so the schedule
//! is computed from the attempt number carried in the message, not from an
//! in-memory iterator.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use rand::Rng;

use super::disposition::DeadReason;
use crate::config::Integration;

#[derive(Debug, Clone, Copy)]
pub struct RetrySchedule {
    pub first: Duration,
    pub cap: Duration,
}

impl Default for RetrySchedule {
    fn default() -> Self {
        RetrySchedule {
            first: Duration::from_secs(1),
            cap: Duration::from_secs(300),
        }
    }
}

impl RetrySchedule {
    /// The most the wait after failed attempt number `attempt` (1-based) can be.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        ExponentialBuilder::default()
            .with_min_delay(self.first)
            .with_max_delay(self.cap)
            .with_factor(2.0)
            .without_max_times()
            .build()
            .nth(attempt.saturating_sub(1).min(64) as usize)
            .unwrap_or(self.cap)
    }

    /// The wait after failed attempt `attempt`: full jitter under the ceiling,
    /// but never less than what the handler asked for with `Retry-After`.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let ceiling = self.ceiling(attempt);
        let jittered = Duration::from_secs_f64(rand::rng().random_range(0.0..=ceiling.as_secs_f64()));
        match retry_after {
            Some(at_least) => jittered.max(at_least.min(self.cap)),
            None => jittered,
        }
    }
}

/// A `Retry-After` header value: seconds, or an HTTP date.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum RetryDecision {
    /// Try again after this long.
    RetryIn(Duration),
    /// Stop: `reason` is `MaxAttempts` or `MaxAge`.
    GiveUp { reason: DeadReason, detail: String },
}

/// How many attempts and how long a job gets, counted from when it was
/// made.
#[derive(Debug, Clone, Copy)]
pub struct RetryLimits {
    pub max_attempts: u32,
    pub max_age: Duration,
}

impl From<&Integration> for RetryLimits {
    fn from(integration: &Integration) -> Self {
        RetryLimits {
            max_attempts: integration.max_attempts,
            max_age: integration.max_age,
        }
    }
}

impl RetrySchedule {
    /// Decides after failed attempt number `attempts` (1-based) whose error
    /// was `error`, at `now_ms`.
    pub(crate) fn after_failure(
        &self,
        limits: RetryLimits,
        created_at_ms: u64,
        attempts: u32,
        retry_after: Option<Duration>,
        now_ms: u64,
        error: &str,
    ) -> RetryDecision {
        if attempts >= limits.max_attempts {
            return RetryDecision::GiveUp {
                reason: DeadReason::MaxAttempts,
                detail: format!("{attempts} attempts; last: {error}"),
            };
        }
        let wait = self.delay(attempts, retry_after);
        let deadline = created_at_ms + limits.max_age.as_millis() as u64;
        if now_ms + wait.as_millis() as u64 >= deadline {
            return RetryDecision::GiveUp {
                reason: DeadReason::MaxAge,
                detail: format!("the next attempt would be past max_age_s; last: {error}"),
            };
        }
        RetryDecision::RetryIn(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_seconds_and_dates() {
        assert_eq!(parse_retry_after(" 2"), Some(Duration::from_secs(2)));
        let later = std::time::SystemTime::now() + Duration::from_secs(120);
        let got = parse_retry_after(&httpdate::fmt_http_date(later)).unwrap();
        assert!(
            got > Duration::from_secs(100) && got <= Duration::from_secs(120),
            "{got:?}"
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn gives_up_on_attempts_or_age() {
        let s = RetrySchedule::default();
        let limits = RetryLimits {
            max_attempts: 3,
            max_age: Duration::from_secs(10),
        };
        let made = 1_000_000;
        assert!(
            matches!(s.after_failure(limits, made, 1, None, 1_000_000, "e"), RetryDecision::RetryIn(w) if w <= Duration::from_secs(1))
        );
        assert!(matches!(
            s.after_failure(limits, made, 3, None, 1_000_000, "e"),
            RetryDecision::GiveUp {
                reason: DeadReason::MaxAttempts,
                ..
            }
        ));
        let late = s.after_failure(limits, made, 1, Some(Duration::from_secs(20)), 1_000_000, "HTTP 429");
        assert!(
            matches!(
                late,
                RetryDecision::GiveUp {
                    reason: DeadReason::MaxAge,
                    ..
                }
            ),
            "{late:?}"
        );
    }

    #[test]
    fn ceilings_double_from_one_second_to_five_minutes() {
        let s = RetrySchedule::default();
        let got: Vec<u64> = (1..=11).map(|a| s.ceiling(a).as_secs()).collect();
        assert_eq!(got, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(s.ceiling(1000), Duration::from_secs(300));
    }

    #[test]
    fn delays_stay_under_the_ceiling_and_honour_retry_after() {
        let s = RetrySchedule::default();
        for attempt in 1..=10 {
            for _ in 0..100 {
                assert!(s.delay(attempt, None) <= s.ceiling(attempt));
            }
        }
        for _ in 0..100 {
            assert!(s.delay(1, Some(Duration::from_secs(2))) >= Duration::from_secs(2));
        }
        assert_eq!(
            s.delay(1, Some(Duration::from_secs(3600))).as_secs(),
            300,
            "Retry-After is capped"
        );
    }
}
