//! One delivery job's visit to the deliverer: the checks only the deliverer
//! makes (a known integration, its rate limit or `on_limit = "drop"`, its
//! share of the attempt permits), the HTTP attempt, and what the attempt
//! means. Opening the job, retries, and carrying the decision out durably
//! before the ack are the shared lifecycle's (`swallow_shared::lifecycle`).

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::message::Delivery;

use swallow_shared::broker::{ConfirmedPublisher, SessionError};
use swallow_shared::config::{Integration, OnLimit};
use swallow_shared::lifecycle::{self, DeadReason, Disposition, Failure, ParkReason, Step, take_turn, within_max_age};
use swallow_shared::messages::{DeliveryJob, MESSAGE_VERSION, ReplyJob, RetryState, now_millis};
use swallow_shared::metrics::GaugeHold;

use crate::Context;
use crate::attempt::{self, Attempted, Outcome};

/// How long a job waits when its integration already has
/// `per_integration_concurrency` attempts under way.
const BUSY_WAIT: Duration = Duration::from_millis(800);

/// Handles one delivery of a job, from its bytes to its ack.
pub(crate) async fn handle(
    delivery: Delivery,
    ctx: Arc<Context>,
    publisher: ConfirmedPublisher,
) -> Result<(), SessionError> {
    let settled = lifecycle::handle(&delivery, &publisher, &ctx.topology, |job| decide(job, &ctx)).await?;
    ctx.metrics.count(settled);
    Ok(())
}

async fn decide(job: DeliveryJob, ctx: &Context) -> Disposition<DeliveryJob> {
    let (job, integration, permit) = match admit(job, ctx) {
        ControlFlow::Continue(admitted) => admitted,
        ControlFlow::Break(settled) => return settled,
    };
    let attempted = {
        let _permit = permit;
        let _attempt_permit = ctx
            .attempt_permits
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let _under_way = GaugeHold::new(&ctx.metrics.in_flight);
        let started = Instant::now();
        let attempted = attempt::attempt(&ctx.client, &ctx.policy, &job, &integration).await;
        ctx.metrics.duration.observe(started.elapsed().as_secs_f64());
        attempted
    };
    ctx.metrics.attempts.with_label_values(&[attempted.class]).inc();
    after_attempt(ctx, job, &integration, attempted)
}

/// The deliverer's own checks before an attempt: the integration is known,
/// the job is not too old, its rate limit lets it go, and its integration
/// has a permit free.
fn admit<'a>(
    job: DeliveryJob,
    ctx: &'a Context,
) -> Step<DeliveryJob, (DeliveryJob, Arc<Integration>, IntegrationPermit<'a>)> {
    let integrations = ctx.integrations.borrow().clone();
    let Some(integration) = integrations.get(&job.integration_id).cloned() else {
        let detail = format!("integration {:?} is not in the configuration", job.integration_id);
        return ControlFlow::Break(Disposition::dead(job, DeadReason::UnknownIntegration, detail));
    };
    let now = now_millis();
    let (mut job, deadline) = within_max_age(job, integration.max_age, now)?;
    let limit = &integration.rate_limit;
    if limit.on_limit == OnLimit::Drop {
        // A job marked reserved here was admitted and then waited for a
        // busy integration: it goes, however late.
        if !std::mem::take(&mut job.retry.rate_reserved)
            && !ctx.limiter.try_take(&integration.id, limit, Instant::now())
        {
            return ControlFlow::Break(Disposition::Dropped);
        }
    } else {
        job = take_turn(job, &ctx.limiter, &integration.id, limit, now, deadline)?;
    }
    // Isolation: an integration with many attempts under way waits its turn
    // on the ladder instead of holding more of the shared permits.
    let Some(permit) = IntegrationPermit::take(ctx, &integration.id) else {
        job.retry.hold_token_for(BUSY_WAIT, now); // it already paid its token
        return ControlFlow::Break(Disposition::park(job, BUSY_WAIT, ParkReason::Busy));
    };
    ControlFlow::Continue((job, integration, permit))
}

/// What an attempt means for the job.
fn after_attempt(
    ctx: &Context,
    mut job: DeliveryJob,
    integration: &Integration,
    attempted: Attempted,
) -> Disposition<DeliveryJob> {
    job.retry.attempt += 1;
    let status = attempted.status;
    match attempted.outcome {
        Outcome::Delivered { answer: None } => Disposition::Done,
        Outcome::Delivered { answer: Some(answer) } => {
            let reply = ReplyJob {
                v: MESSAGE_VERSION,
                delivery_id: job.delivery_id,
                integration_id: job.integration_id,
                team_id: job.event.team_id,
                channel_id: job.event.channel_id,
                in_reply_to: job.event.ts,
                event_thread_ts: job.event.thread_ts,
                answer,
                retry: RetryState::new(now_millis()),
            };
            Disposition::Forward {
                queue: ctx.replies_queue.clone(),
                body: serde_json::to_vec(&reply).expect("a reply always serializes"),
            }
        }
        Outcome::Gone => Disposition::dead_after(
            job,
            DeadReason::Gone,
            "HTTP 410 Gone: the handler asked for no more retries",
            status,
        ),
        Outcome::Blocked(detail) => Disposition::dead_after(job, DeadReason::BlockedDestination, detail, status),
        Outcome::Retry { error, retry_after } => {
            let failure = Failure {
                error,
                retry_after,
                status,
            };
            lifecycle::retry_or_dead(job, &ctx.schedule, integration.into(), failure)
        }
    }
}

/// Attempts under way per integration, bounded by `per_integration_concurrency`.
#[derive(Default)]
pub(crate) struct IntegrationAttempts(Mutex<HashMap<String, usize>>);

/// One of an integration's `per_integration_concurrency` attempt permits.
struct IntegrationPermit<'a> {
    ctx: &'a Context,
    id: String,
}

impl<'a> IntegrationPermit<'a> {
    fn take(ctx: &'a Context, id: &str) -> Option<Self> {
        let mut map = ctx.under_way.0.lock().expect("attempts-under-way lock");
        let n = map.entry(id.to_owned()).or_insert(0);
        if *n >= ctx.per_integration {
            return None;
        }
        *n += 1;
        Some(IntegrationPermit { ctx, id: id.to_owned() })
    }
}

impl Drop for IntegrationPermit<'_> {
    fn drop(&mut self) {
        let mut map = self.ctx.under_way.0.lock().expect("attempts-under-way lock");
        if let Some(n) = map.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.id);
            }
        }
    }
}
