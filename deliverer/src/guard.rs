//! The circuit breakers (`circuit`) applied to jobs: a job whose URL's
//! circuit is open waits on the ladder, uncharged, until the probe's result
//! is in (one trip, rounded up to a ladder step), or dies `circuit_open` when
//! its `max_age` runs out first; each attempt tells the circuit how the
//! handler fared; each change of state is logged and counted.

use std::ops::ControlFlow;
use std::time::Duration;

use tracing::{info, warn};

use swallow_shared::config::Integration;
use swallow_shared::job::lifecycle::{DeadReason, Disposition, ParkReason, Step};
use swallow_shared::topology;
use swallow_shared::wire::messages::{DeliveryJob, now_millis};

use crate::Context;
use crate::attempt::{Attempted, Outcome};
use crate::circuit::{Admission, CircuitState, Transition, Verdict};

/// A job past its `max_age` while its URL's circuit is open is dead with
/// reason `circuit_open` and the last real error.
pub(crate) fn aged_behind_open_circuit(
    ctx: &Context,
    job: DeliveryJob,
    integration: &Integration,
    now: u64,
) -> Step<DeliveryJob> {
    if now < job.retry.deadline_ms(integration.max_age) || !ctx.circuits.is_open((&job.integration_id, &job.url)) {
        return ControlFlow::Continue(job);
    }
    let last = job.retry.last_error.as_deref().unwrap_or("no attempt made");
    let detail = format!("its URL's circuit was open until max_age_s; last error: {last}");
    ControlFlow::Break(Disposition::dead(job, DeadReason::CircuitOpen, detail))
}

/// The circuit's word on `job`: go (`false`), go as the circuit's probe
/// (`true`), or park until the probe's result is in.
pub(crate) fn admit(
    ctx: &Context,
    integration: &Integration,
    mut job: DeliveryJob,
    now: u64,
    deadline: u64,
) -> Step<DeliveryJob, (DeliveryJob, bool)> {
    let key = (job.integration_id.as_str(), job.url.as_str());
    let (admission, transition) = ctx
        .circuits
        .admit(key, integration.circuit_failures, integration.timeout, now);
    if let Some(t) = transition {
        note(ctx, &job.integration_id, &job.url, t);
    }
    let (until_ms, last_error) = match admission {
        Admission::Go => return ControlFlow::Continue((job, false)),
        Admission::Probe => return ControlFlow::Continue((job, true)),
        Admission::Wait { until_ms, last_error } => (until_ms, last_error),
    };
    // One trip on the ladder, rounded up: a little late costs nothing here,
    // and thousands of waiting jobs bouncing would cost the broker (and
    // everyone's jobs behind them in the shard).
    let one_trip = topology::one_trip(Duration::from_millis(until_ms.saturating_sub(now)));
    let until = (now + one_trip.as_millis() as u64).min(deadline).max(now + 1);
    // A held rate-limit slot would be long gone by then.
    job.retry.rate_reserved = false;
    job.retry.slot_missed = false;
    job.retry.not_before_ms = Some(until);
    job.retry.last_error.get_or_insert(last_error);
    let wait = Duration::from_millis(until - now);
    ControlFlow::Break(Disposition::park(job, wait, ParkReason::CircuitOpen))
}

/// Tells the job's circuit how the handler fared in `attempted`.
pub(crate) fn record(ctx: &Context, job: &DeliveryJob, integration: &Integration, attempted: &Attempted) {
    let error = match (&attempted.outcome, attempted.status) {
        (Outcome::Retry { error, .. }, _) => error.clone(),
        (_, Some(status)) => format!("HTTP {status}"),
        _ => attempted.class.to_owned(),
    };
    let verdict = Verdict::of(attempted.status, attempted.class);
    let key = (job.integration_id.as_str(), job.url.as_str());
    let threshold = integration.circuit_failures;
    if let Some(t) = ctx
        .circuits
        .record(key, threshold, verdict, &error, now_millis(), rand::random())
    {
        note(ctx, &job.integration_id, &job.url, t);
    }
}

/// One log line and the metrics for a circuit's change of state.
fn note(ctx: &Context, integration: &str, url: &str, t: Transition) {
    ctx.metrics.circuit_transitions.with_label_values(&[t.to.label()]).inc();
    ctx.metrics.circuits_open.set(ctx.circuits.open() as i64);
    let url = swallow_shared::redact::url(url);
    let last_error = &t.last_error;
    match t.to {
        CircuitState::Open => {
            warn!(integration, %url, %last_error, "circuit opened: the URL's jobs wait for a probe")
        }
        CircuitState::HalfOpen => info!(integration, %url, %last_error, "circuit half-open: one probe goes"),
        CircuitState::Closed => info!(integration, %url, %last_error, "circuit closed: the handler answers again"),
    }
}
