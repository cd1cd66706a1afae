//! The one life of a job in a stage that retries (the deliverer's delivery
//! jobs, the responder's replies): opened from the broker's bytes (parsed,
//! version checked, sent back to the ladder while not due), checked
//! against its age and its rate limit, attempted by the stage, and then
//! settled in exactly one [`Disposition`].
//!
//! [`carry_out`] is the only place a disposition becomes durable: whatever
//! it publishes (a reply for the next stage, the job parked on the delay
//! ladder, a dead letter) is confirmed by the broker *before* the delivery
//! is acknowledged, so a crash at any point redelivers and nothing
//! acknowledged is lost. It returns what was done as a [`Settled`], which
//! the stage counts once, there.

use std::ops::ControlFlow;
use std::time::Duration;

use lapin::message::Delivery;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::warn;

pub use super::disposition::{DeadLetter, DeadReason, Disposition, ParkReason, Settled, Step};
use super::pacing::{RateLimiter, Turn};
use super::park;
pub use super::retry::RetryLimits;
use super::retry::{RetryDecision, RetrySchedule};
use crate::Topology;
use crate::broker::consume::Settler;
use crate::broker::{self, ConfirmedPublisher, SessionError};
use crate::config::RateLimit;
use crate::wire::messages::{DeliveryJob, MESSAGE_VERSION, ReplyJob, RetryState, channel_key, now_millis};

/// A message that leads the life above.
pub trait Job: Serialize + DeserializeOwned + Send + 'static {
    /// What it is called in errors and logs ("delivery job", "reply").
    const KIND: &'static str;
    /// The dead-letter reason for bytes that are not this kind of job.
    const INVALID: DeadReason;
    fn version(&self) -> u32;
    fn retry(&self) -> &RetryState;
    fn retry_mut(&mut self) -> &mut RetryState;
    fn integration_id(&self) -> &str;
    fn delivery_id(&self) -> &str;
    /// The work queue a parked job comes back to.
    fn home_queue(&self, topology: &Topology) -> String;
    /// Where jobs of this kind are dead-lettered.
    fn dead_queue(topology: &Topology) -> String;
    /// Where it was going, for its dead letter's headers (`url`, `channel`).
    fn destination(&self) -> (&'static str, String);
}

/// The accessors both job types have alike.
macro_rules! job_fields {
    () => {
        fn version(&self) -> u32 {
            self.v
        }
        fn retry(&self) -> &RetryState {
            &self.retry
        }
        fn retry_mut(&mut self) -> &mut RetryState {
            &mut self.retry
        }
        fn integration_id(&self) -> &str {
            &self.integration_id
        }
        fn delivery_id(&self) -> &str {
            &self.delivery_id
        }
    };
}

impl Job for DeliveryJob {
    const KIND: &'static str = "delivery job";
    const INVALID: DeadReason = DeadReason::InvalidJob;
    job_fields!();
    fn home_queue(&self, topology: &Topology) -> String {
        topology.delivery_queue_for(&self.integration_id)
    }
    fn dead_queue(topology: &Topology) -> String {
        topology.deliveries_dead_queue()
    }
    fn destination(&self) -> (&'static str, String) {
        ("url", self.url.clone())
    }
}

impl Job for ReplyJob {
    const KIND: &'static str = "reply";
    const INVALID: DeadReason = DeadReason::InvalidReply;
    job_fields!();
    fn home_queue(&self, topology: &Topology) -> String {
        topology.replies_queue()
    }
    fn dead_queue(topology: &Topology) -> String {
        topology.replies_dead_queue()
    }
    fn destination(&self) -> (&'static str, String) {
        ("channel", channel_key(&self.team_id, &self.channel_id))
    }
}

/// Opens a delivery's bytes as a `J`: not one, or from a newer version,
/// is dead; one not due yet goes back on the ladder (a remainder too
/// short to park is waited out here), allowed to come back as late as
/// `leeway` says for it (see [`slot_leeway`]).
pub async fn open<J: Job>(data: &[u8], leeway: impl FnOnce(&J) -> Duration) -> Step<J> {
    let job: J = match serde_json::from_slice(data) {
        Ok(job) => job,
        Err(e) => {
            return ControlFlow::Break(Disposition::Dead(DeadLetter {
                reason: J::INVALID,
                detail: format!("not a {}: {e}", J::KIND),
                status: None,
                body: Err(data.to_vec()),
                notice: None,
            }));
        }
    };
    if job.version() > MESSAGE_VERSION {
        let detail = format!(
            "{} version {} is newer than this build's ({MESSAGE_VERSION})",
            J::KIND,
            job.version()
        );
        return ControlFlow::Break(Disposition::dead(job, DeadReason::UnsupportedVersion, detail));
    }
    match park::wait_until_due(job.retry().not_before_ms, || leeway(&job)).await {
        Some(wait) => ControlFlow::Break(Disposition::park(job, wait, ParkReason::NotDue)),
        None => ControlFlow::Continue(job),
    }
}

/// A job past `max_age` at `now_ms` is dead; otherwise its deadline (ms
/// since epoch) comes with it.
pub fn within_max_age<J: Job>(job: J, max_age: Duration, now_ms: u64) -> Step<J, (J, u64)> {
    let deadline = job.retry().deadline_ms(max_age);
    if now_ms < deadline {
        return ControlFlow::Continue((job, deadline));
    }
    let last = job.retry().last_error.as_deref().unwrap_or("no attempt made");
    let detail = format!("older than max_age_s; last error: {last}");
    ControlFlow::Break(Disposition::dead(job, DeadReason::MaxAge, detail))
}

/// How late a job may come back from the ladder: a job holding a
/// rate-limit slot under `limit`, by [`pacing::park_leeway`]; any other not
/// at all (a retry's or a circuit's wait is its own).
pub fn slot_leeway<J: Job>(job: &J, limit: Option<&RateLimit>) -> Duration {
    match limit {
        Some(limit) if job.retry().rate_reserved => super::pacing::park_leeway(limit),
        _ => Duration::ZERO,
    }
}

/// The job's turn under `limit` (see [`RateLimiter::turn`]): go, park for
/// the slot it reserved (coming back within its leeway after it), or die
/// when that slot is past its deadline.
pub fn take_turn<J: Job, K: std::hash::Hash + Eq + Clone>(
    mut job: J,
    limiter: &RateLimiter<K>,
    key: &K,
    limit: &RateLimit,
    now_ms: u64,
    deadline_ms: u64,
) -> Step<J> {
    let max_wait = Duration::from_millis(deadline_ms.saturating_sub(now_ms));
    match limiter.turn(key, limit, job.retry_mut().slot(), now_ms, max_wait) {
        Turn::Go => ControlFlow::Continue(job),
        Turn::Wait { wait, missed } => {
            let why = if missed {
                ParkReason::MissedSlot
            } else {
                ParkReason::RateLimited
            };
            let wait = crate::topology::park_for(wait, super::pacing::park_leeway(limit));
            ControlFlow::Break(Disposition::park(job, wait, why))
        }
        Turn::TooLong(wait) => {
            let detail = format!("rate limited: the next slot is {wait:?} away, past max_age_s");
            ControlFlow::Break(Disposition::dead(job, DeadReason::MaxAge, detail))
        }
    }
}

/// A failed attempt, as the stage saw it.
#[derive(Debug, Clone)]
pub struct Failure {
    pub error: String,
    /// What the far side asked for with `Retry-After`.
    pub retry_after: Option<Duration>,
    /// The attempt's HTTP status, when there was one.
    pub status: Option<u16>,
}

/// After a failed attempt (already counted in `attempt`): park the job for
/// the schedule's next wait, or dead-letter it when its attempts or its age
/// are spent.
pub fn retry_or_dead<J: Job>(
    mut job: J,
    schedule: &RetrySchedule,
    limits: RetryLimits,
    failure: Failure,
) -> Disposition<J> {
    let now = now_millis();
    let retry = job.retry_mut();
    retry.last_error = Some(failure.error.clone());
    match schedule.after_failure(
        limits,
        retry.created_at_ms,
        retry.attempt,
        failure.retry_after,
        now,
        &failure.error,
    ) {
        RetryDecision::GiveUp { reason, detail } => Disposition::dead_after(job, reason, detail, failure.status),
        RetryDecision::RetryIn(wait) => {
            retry.not_before_ms = Some(now + wait.as_millis() as u64);
            Disposition::park(job, wait, ParkReason::Retry)
        }
    }
}

/// Carries `disposition` out for the delivery `settler` settles: what it
/// publishes is confirmed by the broker first, the delivery acknowledged
/// after. The one place a stage's job is acknowledged.
pub(crate) async fn carry_out<J: Job>(
    settler: &Settler,
    disposition: Disposition<J>,
    publisher: &ConfirmedPublisher,
    topology: &Topology,
) -> Result<Settled, SessionError> {
    let settled = disposition.settled();
    match disposition {
        Disposition::Done | Disposition::Dropped => {}
        Disposition::Forward { queue, body } => {
            publisher.publish("", &queue, &body, broker::persistent_json()).await?;
        }
        Disposition::Park { job, wait, .. } => {
            let body = serde_json::to_vec(&job).expect("a job always serializes");
            let home = job.home_queue(topology);
            park::park(publisher, topology, &home, &body, broker::persistent_json(), wait).await?;
        }
        Disposition::Dead(letter) => dead_letter(letter, publisher, topology).await?,
    }
    settler.ack().await?;
    Ok(settled)
}

async fn dead_letter<J: Job>(
    letter: DeadLetter<J>,
    publisher: &ConfirmedPublisher,
    topology: &Topology,
) -> Result<(), SessionError> {
    let DeadLetter {
        reason,
        detail,
        status,
        body,
        notice,
    } = letter;
    let mut headers = vec![("reason", reason.as_str().to_owned()), ("error", detail.clone())];
    if let Some(status) = status {
        headers.push(("status", status.to_string()));
    }
    let mut integration = String::new();
    let bytes = match body {
        Ok(job) => {
            integration = job.integration_id().to_owned();
            headers.push(("integration", integration.clone()));
            headers.push(("delivery-id", job.delivery_id().to_owned()));
            headers.push(("attempts", job.retry().attempt.to_string()));
            headers.push(job.destination());
            serde_json::to_vec(&job).expect("a job always serializes")
        }
        Err(raw) => raw,
    };
    park::dead_letter(publisher, &J::dead_queue(topology), &bytes, &headers).await?;
    if let Some((queue, body)) = notice {
        publisher.publish("", &queue, &body, broker::persistent_json()).await?;
    }
    warn!(kind = J::KIND, reason = reason.as_str(), error = %detail, integration, "dead-lettered");
    Ok(())
}

/// The whole life of one delivery: [`open`] it, let the stage's `decide`
/// settle it, [`carry_out`] the result. `opened` sees what opening settled
/// by itself (a job not due yet, or dead: unreadable or of a newer version),
/// so that the stage can record it as it records its own decisions.
pub async fn handle<J, F, Fut>(
    delivery: &Delivery,
    settler: &Settler,
    publisher: &ConfirmedPublisher,
    topology: &Topology,
    leeway: impl FnOnce(&J) -> Duration,
    decide: F,
    opened: impl FnOnce(&Disposition<J>),
) -> Result<Settled, SessionError>
where
    J: Job,
    F: FnOnce(J) -> Fut,
    Fut: Future<Output = Disposition<J>>,
{
    // The stage's decision and the carrying out are boxed, each only while
    // under way: a job then holds the state of the step it is in, not room
    // for the largest step (the attempt, the confirmed publish) throughout.
    // Nothing is awaited inside the match on the opened job: the `Step`
    // it matches (528 bytes in the deliverer) would be kept through that
    // await, and, being kept through two, in every state of this future.
    let next = match open::<J>(&delivery.data, leeway).await {
        ControlFlow::Continue(job) => Ok(Box::pin(decide(job))),
        ControlFlow::Break(settled) => {
            opened(&settled);
            Err(Box::pin(carry_out(settler, settled, publisher, topology)))
        }
    };
    let disposition = match next {
        Ok(deciding) => deciding.await,
        Err(carrying) => return carrying.await,
    };
    Box::pin(carry_out(settler, disposition, publisher, topology)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(attempt: u32, created_at_ms: u64) -> ReplyJob {
        serde_json::from_value(serde_json::json!({
            "delivery_id": "d", "integration_id": "g", "team_id": "T", "channel_id": "C",
            "in_reply_to": "1.0", "answer": {"text": "hi"},
            "created_at_ms": created_at_ms, "attempt": attempt,
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn opening_refuses_garbage_and_newer_versions_and_parks_what_is_not_due() {
        let garbage = open::<ReplyJob>(b"{", |_| Duration::ZERO).await;
        assert!(matches!(
            garbage,
            ControlFlow::Break(Disposition::Dead(DeadLetter { reason: DeadReason::InvalidReply, body: Err(ref b), .. })) if b == b"{"
        ));
        let mut newer = serde_json::to_value(reply(0, 1)).unwrap();
        newer["v"] = (MESSAGE_VERSION + 1).into();
        let opened = open::<ReplyJob>(newer.to_string().as_bytes(), |_| Duration::ZERO).await;
        assert_eq!(
            opened.break_value().map(|d| d.settled()),
            Some(Settled::Dead(DeadReason::UnsupportedVersion))
        );
        let mut later = reply(0, 1);
        later.retry.not_before_ms = Some(now_millis() + 5_000);
        let opened = open::<ReplyJob>(&serde_json::to_vec(&later).unwrap(), |_| Duration::ZERO).await;
        assert_eq!(
            opened.break_value().map(|d| d.settled()),
            Some(Settled::Parked(ParkReason::NotDue))
        );
        let due = open::<ReplyJob>(&serde_json::to_vec(&reply(2, 1)).unwrap(), |_| Duration::ZERO).await;
        assert!(matches!(due, ControlFlow::Continue(r) if r.retry.attempt == 2));
    }

    #[test]
    fn age_and_retries_settle_in_the_right_place() {
        let old = within_max_age(reply(0, 1_000), Duration::from_secs(1), 2_000);
        assert_eq!(
            old.break_value().map(|d| d.settled()),
            Some(Settled::Dead(DeadReason::MaxAge))
        );
        assert!(matches!(
            within_max_age(reply(0, 1_000), Duration::from_secs(1), 1_999),
            ControlFlow::Continue((_, 2_000))
        ));

        let limits = RetryLimits {
            max_attempts: 3,
            max_age: Duration::from_secs(3600),
        };
        let failure = Failure {
            error: "HTTP 503".into(),
            retry_after: None,
            status: Some(503),
        };
        let schedule = RetrySchedule::default();
        match retry_or_dead(reply(1, now_millis()), &schedule, limits, failure.clone()) {
            Disposition::Park {
                job,
                why: ParkReason::Retry,
                ..
            } => {
                assert_eq!(job.retry.last_error.as_deref(), Some("HTTP 503"));
                assert!(job.retry.not_before_ms.is_some());
            }
            other => panic!("expected a retry, got {other:?}"),
        }
        match retry_or_dead(reply(3, now_millis()), &schedule, limits, failure) {
            Disposition::Dead(d) => {
                assert_eq!((d.reason, d.status), (DeadReason::MaxAttempts, Some(503)));
            }
            other => panic!("expected a dead letter, got {other:?}"),
        }
    }

    #[test]
    fn reasons_are_their_labels() {
        let labels: Vec<&str> = DeadReason::DELIVERY.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            labels,
            [
                "max_attempts",
                "max_age",
                "circuit_open",
                "gone",
                "blocked_destination",
                "unknown_integration",
                "invalid_job",
                "unsupported_version"
            ]
        );
        assert_eq!(DeadReason::Rejected.to_string(), "rejected");
    }
}
