//! Rate limits: an integration's `rate_limit = { … }` and the responder's
//! per-channel pace, both token buckets (`crate::job::pacing`).

use serde::Deserialize;

/// What a job over its integration's rate limit does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnLimit {
    /// Wait durably for a slot, up to the job's `max_age`.
    #[default]
    Delay,
    /// Slack's behaviour: the job is dropped.
    Drop,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
    pub on_limit: OnLimit,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            per_second: 1.0,
            burst: 5,
            on_limit: OnLimit::Delay,
        }
    }
}

/// `rate_limit = { per_second, burst, on_limit }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRateLimit {
    per_second: Option<f64>,
    burst: Option<u32>,
    on_limit: Option<OnLimit>,
}

impl RawRateLimit {
    /// The limit this table gives over the defaults.
    pub(super) fn over_defaults(self) -> RateLimit {
        let defaults = RateLimit::default();
        RateLimit {
            per_second: self.per_second.unwrap_or(defaults.per_second),
            burst: self.burst.unwrap_or(defaults.burst),
            on_limit: self.on_limit.unwrap_or_default(),
        }
    }
}

/// The slowest rate limit: one an hour.
pub const MIN_PER_SECOND: f64 = 1.0 / 3600.0;

/// Checks a rate limit whose two numbers are the fields `names` (per second,
/// burst); on error, the field that is wrong and why.
pub(super) fn check_rate(rate: &RateLimit, names: [&str; 2]) -> Result<(), (String, String)> {
    if !(rate.per_second.is_finite() && rate.per_second >= MIN_PER_SECOND) {
        return Err((
            names[0].to_owned(),
            format!(
                "must be a number of at least {MIN_PER_SECOND:.6} (one an hour), not {}",
                rate.per_second
            ),
        ));
    }
    if rate.burst == 0 {
        return Err((names[1].to_owned(), "must be at least 1, not 0".into()));
    }
    Ok(())
}
