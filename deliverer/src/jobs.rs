//! One delivery job's visit to the deliverer: the checks only the deliverer
//! makes (a known integration, its URL's circuit, its rate limit or
//! `on_limit = "drop"`, its turn for an attempt permit), the HTTP
//! attempt, and what the attempt means (for the job and for the circuit). Opening the job, retries, and carrying the decision out durably
//! before the ack are the shared lifecycle's (`swallow_shared::job::lifecycle`).

use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::FutureExt as _;
use futures_util::future::Either;
use lapin::message::Delivery;
use tokio_util::sync::CancellationToken;

use swallow_shared::broker::consume::Settler;
use swallow_shared::broker::{ConfirmedPublisher, SessionError};
use swallow_shared::config::{Integration, OnLimit};
use swallow_shared::delivery_log::{LogRecord, Outcome as Step};
use swallow_shared::job::lifecycle::{
    self, DeadLetter, DeadReason, Disposition, Failure, ParkReason, Step as Next, take_turn, within_max_age,
};
use swallow_shared::metrics::GaugeHold;
use swallow_shared::topology::DELAY_STEP_MIN;
use swallow_shared::wire::messages::{self, DeliveryJob, ReplyJob, RetryState, now_millis};

use crate::attempt::{self, Attempted, Outcome};
use crate::permits::ParkWhy;
use crate::{Context, guard, notice};

/// How long a job waits on the ladder when its integration already has
/// `per_integration_concurrency` jobs holding or waiting for a permit, or
/// its shard's waiting jobs are at their bound.
const BUSY_WAIT: Duration = Duration::from_millis(800);

/// The shard a job came from: its number (jobs wait for a permit in their
/// shard's share of the prefetch) and the token cancelled when the shard
/// is given up or the deliverer stops (a waiting job then leaves for the
/// ladder, so that the shard's hand-over does not wait for its turn).
#[derive(Clone)]
pub(crate) struct OnShard {
    pub(crate) k: u32,
    pub(crate) stop: CancellationToken,
}

/// Handles one delivery of a job, from its bytes to its ack.
///
/// An `async move` block, not an `async fn`, here and in `attempt_admitted`:
/// an `async fn` keeps each argument twice for as long as it runs (its own,
/// and the local it is moved into), and a delivery is 432 bytes, a job 448
/// (BENCHMARKS.md, "A request under way: its futures' bytes").
#[allow(clippy::manual_async_fn, reason = "an async fn keeps each argument twice")]
pub(crate) fn handle(
    delivery: Delivery,
    ctx: Arc<Context>,
    publisher: ConfirmedPublisher,
    settler: Settler,
    shard: OnShard,
) -> impl Future<Output = Result<(), SessionError>> + Send + 'static {
    async move {
        let noticed = AtomicBool::new(false);
        let settled = lifecycle::handle(
            &delivery,
            &settler,
            &publisher,
            &ctx.topology,
            |job: &DeliveryJob| {
                let integrations = ctx.integrations.borrow();
                lifecycle::slot_leeway(job, integrations.get(&job.integration_id).map(|i| &i.rate_limit))
            },
            |job| {
                decide(job, &ctx, &shard).map(|decided| {
                    let (disposition, with_notice) = notice::attach(&ctx, decided);
                    noticed.store(with_notice, Ordering::Relaxed);
                    disposition
                })
            },
            |opened| record_unattempted(&ctx, opened),
        )
        .await?;
        ctx.metrics.count(settled);
        if noticed.load(Ordering::Relaxed) {
            ctx.metrics.notices.inc();
        }
        Ok(())
    }
}

/// The deliverer's decision on a job: settled by its checks at once, or
/// after an attempt.
fn decide<'a>(
    job: DeliveryJob,
    ctx: &'a Context,
    shard: &'a OnShard,
) -> impl Future<Output = Disposition<DeliveryJob>> + Send + 'a {
    match admit(job, ctx) {
        ControlFlow::Continue((job, integration, probe)) => {
            Either::Left(attempt_admitted(job, integration, probe, ctx, shard))
        }
        ControlFlow::Break(settled) => {
            record_unattempted(ctx, &settled);
            Either::Right(std::future::ready(settled))
        }
    }
}

/// An admitted job's attempt, once its turn for a permit came, and what
/// the attempt means.
#[allow(clippy::manual_async_fn, reason = "an async fn keeps each argument twice")]
fn attempt_admitted<'a>(
    mut job: DeliveryJob,
    integration: Arc<Integration>,
    probe: bool,
    ctx: &'a Context,
    shard: &'a OnShard,
) -> impl Future<Output = Disposition<DeliveryJob>> + Send + 'a {
    async move {
        // Isolation: the job waits in its integration's line for its turn
        // (see `permits`), or on the ladder when its integration has its
        // share in hand or in line, or its shard is crowded or stopping.
        let permit = match ctx.permits.acquire(&integration.id, shard.k, &shard.stop).await {
            Ok(permit) => permit,
            Err(why) => {
                let wait = if why == ParkWhy::Stopping {
                    DELAY_STEP_MIN
                } else {
                    BUSY_WAIT
                };
                job.retry.hold_token_for(wait, now_millis()); // it already paid its token
                return Disposition::park(job, wait, ParkReason::Busy);
            }
        };
        // It may have waited for its turn while its URL's circuit opened: a
        // job behind an open circuit is never attempted.
        if !probe && ctx.circuits.is_open((&job.integration_id, &job.url)) {
            let now = now_millis();
            let deadline = job.retry.deadline_ms(integration.max_age);
            match guard::admit(ctx, &integration, job, now, deadline) {
                ControlFlow::Continue((admitted, _)) => job = admitted,
                ControlFlow::Break(parked) => {
                    drop(permit);
                    record_unattempted(ctx, &parked);
                    return parked;
                }
            }
        }
        let attempted = {
            let _permit = permit;
            let _under_way = GaugeHold::new(&ctx.metrics.in_flight);
            let started = Instant::now();
            let attempted = attempt::attempt(&ctx.client, &ctx.policy, &job, &integration).await;
            (attempted, started.elapsed())
        };
        let (attempted, took) = attempted;
        ctx.metrics.duration.observe(took.as_secs_f64());
        ctx.metrics.attempts.with_label_values(&[attempted.class]).inc();
        guard::record(ctx, &job, &integration, &attempted);
        // The record counts this attempt (the job's count goes up in `after_attempt`).
        let mut step = LogRecord::job(Step::Delivered, &job).with_attempt(attempted.status, attempted.class, took);
        step.attempt = Some(job.retry.attempt + 1);
        let disposition = after_attempt(ctx, job, &integration, attempted);
        record_attempt(ctx, step, &disposition);
        disposition
    }
}

/// The delivery log's record of an attempt: delivered, retried or dead.
fn record_attempt(ctx: &Context, step: LogRecord, disposition: &Disposition<DeliveryJob>) {
    let step = match disposition {
        Disposition::Park { job, .. } => step
            .with_outcome(Step::Retried)
            .with_error(job.retry.last_error.as_deref().unwrap_or("")),
        Disposition::Dead(letter) => step.with_outcome(Step::Dead).with_error(&letter.detail),
        _ => step,
    };
    ctx.log.record(step);
}

/// The delivery log's record of a visit without an attempt: parked for a
/// rate-limit slot or behind an open circuit, or dead.
fn record_unattempted(ctx: &Context, disposition: &Disposition<DeliveryJob>) {
    let record = match disposition {
        Disposition::Park {
            job,
            why: ParkReason::RateLimited,
            ..
        } => LogRecord::job(Step::RateLimited, job),
        Disposition::Park {
            job,
            why: ParkReason::CircuitOpen,
            ..
        } => LogRecord::job(Step::CircuitOpen, job).with_error(job.retry.last_error.as_deref().unwrap_or("")),
        Disposition::Dead(DeadLetter {
            body: Ok(job), detail, ..
        }) => LogRecord::job(Step::Dead, job).with_error(detail),
        _ => return,
    };
    ctx.log.record(record);
}

/// The deliverer's own checks before an attempt: the integration is known,
/// the job is not too old, its URL's circuit and its rate limit let it go.
fn admit(job: DeliveryJob, ctx: &Context) -> Next<DeliveryJob, (DeliveryJob, Arc<Integration>, bool)> {
    let integrations = ctx.integrations.borrow().clone();
    let Some(integration) = integrations.get(&job.integration_id).cloned() else {
        let detail = format!("integration {:?} is not in the configuration", job.integration_id);
        return ControlFlow::Break(Disposition::dead(job, DeadReason::UnknownIntegration, detail));
    };
    let now = now_millis();
    let job = guard::aged_behind_open_circuit(ctx, job, &integration, now)?;
    let (job, deadline) = within_max_age(job, integration.max_age, now)?;
    let (mut job, probe) = guard::admit(ctx, &integration, job, now, deadline)?;
    let limit = &integration.rate_limit;
    if probe {
        // A circuit's one probe goes without a token: the jobs that waited
        // behind it then meet a full bucket.
    } else if limit.on_limit == OnLimit::Drop {
        // A job marked reserved here was admitted and then waited for a
        // busy integration: it goes, however late.
        if !std::mem::take(&mut job.retry.rate_reserved)
            && !ctx.limiter.try_take(&integration.id, limit, Instant::now())
        {
            ctx.log.record(LogRecord::job(Step::Dropped, &job));
            return ControlFlow::Break(Disposition::Dropped);
        }
    } else {
        job = take_turn(job, &ctx.limiter, &integration.id, limit, now, deadline)?;
    }
    ControlFlow::Continue((job, integration, probe))
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
                v: messages::version_for(job.event.platform.as_deref()),
                delivery_id: job.delivery_id,
                integration_id: job.integration_id,
                team_id: job.event.team_id,
                channel_id: job.event.channel_id,
                in_reply_to: job.event.event_id.unwrap_or(job.event.ts),
                event_thread_ts: job.event.thread_ts,
                answer,
                platform: job.event.platform,
                retry: RetryState::new(now_millis()),
            };
            Disposition::Forward {
                queue: ctx.replies_queue.clone(),
                body: messages::to_json(&reply, reply.answer.text.len()),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` returns, from its type alone.
    fn future_size3<F: Fn(A, B, C) -> R, A, B, C, R>(_: &F) -> usize {
        std::mem::size_of::<R>()
    }

    fn future_size5<F: Fn(A, B, C, D, E) -> R, A, B, C, D, E, R>(_: &F) -> usize {
        std::mem::size_of::<R>()
    }

    /// Every request under way holds these two futures (boxed): written as
    /// `async fn`s they kept the delivery and the job twice or three times,
    /// 2,496 and 2,384 bytes (BENCHMARKS.md, "A request under way: its
    /// futures' bytes"). The bounds leave room for the libraries' types to
    /// grow a little, not for a second copy of a job (448 bytes).
    #[test]
    fn a_request_under_way_holds_its_delivery_and_its_job_once() {
        let task = future_size5(&handle);
        let decision = future_size3(&decide);
        assert!(task <= 1_700, "the delivery's task is {task} bytes");
        assert!(decision <= 1_150, "the decision is {decision} bytes");
    }
}
