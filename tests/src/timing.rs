//! Bounded waits and the timing assertions of rate-limit tests.

use std::future::Future;
use std::time::{Duration, Instant};

/// Polls `check` until it returns `Some`, or fails the test after `timeout`
/// saying what was awaited.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        // A check that never returns (a peer that accepts and never
        // answers) ends at the deadline like one that keeps saying no.
        if let Ok(Some(v)) = tokio::time::timeout_at(deadline, check()).await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How late the broker may hand back a message parked on the delay ladder
/// in these tests. Usually it is a few milliseconds; on a loaded CI machine
/// a stall of 1.6 s was seen.
pub const LADDER_LATENESS: Duration = Duration::from_secs(3);

/// How much later than the deliverer took its token a request may be timed
/// by the handler: `at` is when the test's handler saw each request, and on
/// a loaded two-core machine one request's trip through loopback and the
/// handler's task can lag another's by tens of milliseconds (a stretch of
/// 0.79 s once held 15 requests where the bucket's own count allowed 14.98
/// with 10 ms of this).
pub const ARRIVAL_JITTER: Duration = Duration::from_millis(100);

/// Fails unless the times `at` (in order) keep a token bucket of
/// `per_second` and `burst`: in every stretch from one request to a later
/// one, at most `burst + per_second × (its length + ARRIVAL_JITTER) +
/// slack` requests. `slack` is the limit's allowance for messages using
/// their slots a little late (`pacing::slot_grace`, one token at rates up
/// to 4/s).
pub fn assert_within_limit(at: &[Instant], per_second: f64, burst: u32, slack: f64, what: &str) {
    let offsets: Vec<f64> = at.iter().map(|t| (*t - at[0]).as_secs_f64()).collect();
    for (j, from) in offsets.iter().enumerate() {
        for (i, to) in offsets.iter().enumerate().skip(j) {
            let count = (i - j + 1) as f64;
            let allowed = f64::from(burst) + per_second * (to - from + ARRIVAL_JITTER.as_secs_f64()) + slack;
            assert!(
                count <= allowed,
                "{what}: {count} requests from {from:.2} s to {to:.2} s, more than the limit allows ({allowed:.2}): {offsets:.2?}"
            );
        }
    }
}

/// Fails unless the times `at` of a backlog sent from the start keep the
/// limit (`assert_within_limit`, one token of slack) and span about what the
/// limit makes them: the burst at once, then one per interval. Never less;
/// more only by the slots the broker's lateness made messages miss.
pub fn assert_paced(at: &[Instant], per_second: f64, burst: u32, what: &str) {
    assert_within_limit(at, per_second, burst, 1.0, what);
    let span = (at[at.len() - 1] - at[0]).as_secs_f64();
    let want = at.len().saturating_sub(burst as usize) as f64 / per_second;
    let most = want + LADDER_LATENESS.as_secs_f64();
    assert!(
        (want - 0.2..=most).contains(&span),
        "{what}: the last came {span:.2} s after the first, expected {want} s (at most {most} s)"
    );
}
