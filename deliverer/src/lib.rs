//! `swallow-deliverer`: turns delivery jobs into the seed's HTTP POSTs and
//! handler answers into replies for the responder.
//!
//! Every job ends each visit to the deliverer in exactly one durable place
//! before it is acknowledged: delivered (and its reply, if any, confirmed on
//! `<prefix>.replies`), parked on the delay ladder for a retry or a
//! rate-limit slot (confirmed), dead-lettered (confirmed), or dropped by an
//! `on_limit = "drop"` integration. Nothing waits in memory holding a broker
//! delivery except the HTTP attempt itself, so a slow or failing handler
//! takes at most `per_integration_concurrency` of the `concurrency` slots and
//! never delays anyone else's jobs.

mod attempt;
pub mod destination;
pub mod log_command;
mod metrics;
pub mod replay;
pub mod request;
pub mod shards;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::collections::BTreeSet;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use swallow_shared::broker::{self, ConfirmedPublisher, Health, SessionError};
use swallow_shared::config::{Integration, OnLimit};
use swallow_shared::consume::consume_queue;
use swallow_shared::delivery_log::{DeliveryLog, LogRecord, Outcome as Step};
use swallow_shared::messages::{DeliveryJob, MESSAGE_VERSION, ReplyJob, now_millis};
use swallow_shared::metrics::GaugeHold;
use swallow_shared::pacing::{RateLimiter, Slot, Turn};
use swallow_shared::retry::{RetryBudget, RetryDecision, RetrySchedule};
use swallow_shared::stage::{ListenError, Running, StageParts};
use swallow_shared::{Config, Integrations, Stage, Topology, delay};

pub use attempt::{MAX_ANSWER_BYTES, Outcome, parse_answer};
use destination::{AddressPolicy, GuardedResolver};
use metrics::DelivererMetrics;

/// How long shutdown waits for HTTP attempts under way before handing them
/// back to the broker (they are redelivered).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);
/// How long a job waits when its integration already has
/// `per_integration_concurrency` attempts under way.
const BUSY_WAIT: Duration = Duration::from_millis(800);

/// The deliverer could not start.
#[derive(Debug, thiserror::Error)]
pub enum DelivererError {
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("building the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// A started deliverer.
pub type Deliverer = Running;

/// Runs the deliverer until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), DelivererError> {
    start(config, shutdown).await?.join().await;
    Ok(())
}

/// The HTTP client for handlers: keep-alive pool, no redirects, no proxy,
/// the SSRF guard in its resolver.
pub fn http_client(policy: &AddressPolicy) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .user_agent(swallow_shared::USER_AGENT)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .dns_resolver(GuardedResolver::new(policy.clone()))
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(64)
        .tcp_nodelay(true)
        .build()
}

/// Starts the deliverer and returns once its listener is bound.
pub async fn start(config: Config, shutdown: CancellationToken) -> Result<Deliverer, DelivererError> {
    let policy = AddressPolicy::new(config.deliverer.allow_networks.clone());
    let client = http_client(&policy)?;
    let parts = StageParts::new(Stage::Deliverer, &config, &shutdown).await?;
    let metrics = DelivererMetrics::new(&parts.registry);
    let topology = Topology::of(&config.broker);
    let ctx = Arc::new(Context {
        replica_id: uuid::Uuid::new_v4().simple().to_string(),
        dead_queue: topology.deliveries_dead_queue(),
        replies_queue: topology.replies_queue(),
        topology,
        prefetch: config.deliverer.concurrency.min(u16::MAX as usize) as u16,
        per_integration: config.deliverer.per_integration_concurrency,
        integrations: parts.integrations.clone(),
        client,
        policy,
        limiter: RateLimiter::new(),
        in_flight: Mutex::new(HashMap::new()),
        slots: tokio::sync::Semaphore::new(config.deliverer.concurrency),
        schedule: RetrySchedule::default(),
        metrics,
        log: parts.log.clone(),
        health: parts.health.clone(),
        shutdown: shutdown.clone(),
    });
    Ok(parts.run(&config, shutdown, move |connection| session(connection, ctx.clone())))
}

struct Context {
    topology: Topology,
    /// This replica's id in the deliverers' membership.
    replica_id: String,
    dead_queue: String,
    replies_queue: String,
    prefetch: u16,
    per_integration: usize,
    integrations: watch::Receiver<Arc<Integrations>>,
    client: reqwest::Client,
    policy: AddressPolicy,
    limiter: RateLimiter<String>,
    in_flight: Mutex<HashMap<String, usize>>,
    /// `[deliverer] concurrency`: HTTP attempts under way at once.
    slots: tokio::sync::Semaphore,
    schedule: RetrySchedule,
    metrics: DelivererMetrics,
    /// The delivery log: one record per attempt and per drop, park or dead letter.
    log: DeliveryLog,
    health: Health,
    shutdown: CancellationToken,
}

/// One connection's worth of work: announce this replica, keep the shards
/// the assignment gives it (see `shards`), serve each on its own channel.
async fn session(connection: Arc<Connection>, ctx: Arc<Context>) -> Result<(), SessionError> {
    let channel = connection.create_channel().await?;
    ctx.topology.declare(&channel).await?;
    let publisher = ConfirmedPublisher::open(&connection).await?;
    let exchange = ctx.topology.deliverers_exchange();
    let mut announcements = broker::subscribe(&channel, &exchange, "").await?;
    ctx.health.set_ready(true);
    info!(replica = %ctx.replica_id, shards = ctx.topology.shards(), "deliverer consuming its shards");

    let mut seen: HashMap<String, Instant> = HashMap::new();
    let mut held: HashMap<u32, HeldShard> = HashMap::new();
    let mut tick = tokio::time::interval(shards::TICK);
    let result = loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => break Ok(()),
            next = announcements.next() => match next {
                Some(Ok(d)) => {
                    if let Ok(id) = std::str::from_utf8(&d.data) {
                        seen.insert(id.to_owned(), Instant::now());
                    }
                }
                Some(Err(e)) => break Err(e.into()),
                None => break Err(SessionError::ConsumerEnded(exchange.clone())),
            },
            _ = tick.tick() => {
                if let Err(e) = channel
                    .basic_publish(exchange.as_str().into(), "".into(), BasicPublishOptions::default(), ctx.replica_id.as_bytes(), BasicProperties::default())
                    .await
                {
                    break Err(e.into());
                }
                if let Err(e) = rebalance(&connection, &ctx, &publisher, &mut seen, &mut held).await {
                    break Err(e);
                }
            }
        }
    };
    ctx.health.set_ready(false);
    if result.is_ok() {
        // Shutdown: each shard finishes its work under way and releases its lease.
        for shard in held.values() {
            shard.stop.cancel();
        }
        for (_, shard) in held.drain() {
            let _ = shard.task.await;
        }
    } else {
        // The connection is gone: nothing can be acknowledged or released on
        // it any more (and calls on it may never answer); the broker requeues
        // the shards' unacknowledged jobs and frees their leases by itself.
        for (_, shard) in held.drain() {
            shard.task.abort();
        }
    }
    ctx.metrics.shards_held.set(0);
    if result.is_ok() {
        let _ = publisher.channel().close(200, "stopping".into()).await;
        let _ = channel.close(200, "stopping".into()).await;
    }
    result
}

/// A shard this replica serves (or is giving up).
struct HeldShard {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), SessionError>>,
}

/// Brings the shards held in line with the assignment for the members seen.
async fn rebalance(
    connection: &Arc<Connection>,
    ctx: &Arc<Context>,
    publisher: &ConfirmedPublisher,
    seen: &mut HashMap<String, Instant>,
    held: &mut HashMap<u32, HeldShard>,
) -> Result<(), SessionError> {
    // Shards given up (or failed) are done once their task has finished.
    let finished: Vec<u32> = held
        .iter()
        .filter(|(_, h)| h.task.is_finished())
        .map(|(k, _)| *k)
        .collect();
    for k in finished {
        let shard = held.remove(&k).expect("listed above");
        match shard.task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(e) => return Err(SessionError::Other(format!("shard {k}: {e}"))),
        }
    }
    seen.insert(ctx.replica_id.clone(), Instant::now());
    seen.retain(|_, at| at.elapsed() < shards::MEMBER_TTL);
    let members: BTreeSet<String> = seen.keys().cloned().collect();
    let integrations = ctx.integrations.borrow().clone();
    let weights = shards::shard_weights(&ctx.topology, &integrations);
    let mine = shards::assign(&weights, &members)
        .remove(&ctx.replica_id)
        .unwrap_or_default();
    ctx.metrics.members.set(members.len() as i64);

    for (k, shard) in held.iter() {
        if !mine.contains(k) && !shard.stop.is_cancelled() {
            info!(shard = k, "giving the shard up to another replica");
            shard.stop.cancel();
        }
    }
    // Each shard may bring up to `concurrency` jobs; `slots` bounds the
    // attempts under way across all shards.
    let prefetch = ctx.prefetch;
    for &k in &mine {
        if held.contains_key(&k) {
            continue;
        }
        let lease_channel = connection.create_channel().await?;
        let lease = ctx.topology.shard_lease_queue(k);
        let granted = lease_channel
            .queue_declare(
                lease.as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        if granted.is_err() {
            // Another replica still holds it (a broker error closed the
            // lease channel); try again on a later tick.
            continue;
        }
        let stop = ctx.shutdown.child_token();
        let task = tokio::spawn(serve_shard(
            lease_channel,
            ctx.clone(),
            publisher.clone(),
            k,
            prefetch,
            stop.clone(),
        ));
        held.insert(k, HeldShard { stop, task });
    }
    let serving = held.values().filter(|h| !h.stop.is_cancelled()).count();
    ctx.metrics.shards_held.set(serving as i64);
    Ok(())
}

/// Serves shard `k` until `stop`, then releases its lease.
async fn serve_shard(
    channel: lapin::Channel,
    ctx: Arc<Context>,
    publisher: ConfirmedPublisher,
    k: u32,
    prefetch: u16,
    stop: CancellationToken,
) -> Result<(), SessionError> {
    let queue = ctx.topology.delivery_shard_queue(k);
    let handler_ctx = ctx.clone();
    let result = consume_queue(
        &channel,
        &publisher,
        "deliverer",
        &queue,
        prefetch,
        &stop,
        SHUTDOWN_GRACE,
        || {},
        |delivery, publisher| handle(delivery, handler_ctx.clone(), publisher),
    )
    .await;
    if result.is_ok() {
        let lease = ctx.topology.shard_lease_queue(k);
        let _ = channel
            .queue_delete(lease.as_str().into(), QueueDeleteOptions::default())
            .await;
        let _ = channel.close(200, "shard released".into()).await;
    }
    result
}

/// What to do with a job, decided before anything is acknowledged.
enum Action {
    /// Done (delivered without reply, or dropped).
    Ack,
    Reply(ReplyJob),
    Park {
        job: DeliveryJob,
        wait: Duration,
    },
    Dead {
        body: Vec<u8>,
        reason: &'static str,
        detail: String,
        status: Option<u16>,
        job: Option<DeliveryJob>,
    },
}

async fn handle(delivery: Delivery, ctx: Arc<Context>, publisher: ConfirmedPublisher) -> Result<(), SessionError> {
    let action = decide(&delivery, &ctx).await;
    match action {
        Action::Ack => {}
        Action::Reply(reply) => {
            let body = serde_json::to_vec(&reply).expect("a reply always serializes");
            publisher
                .publish("", &ctx.replies_queue, &body, broker::persistent_json())
                .await?;
            ctx.metrics.replies_queued.inc();
        }
        Action::Park { job, wait } => {
            let body = serde_json::to_vec(&job).expect("a job always serializes");
            delay::park(
                &publisher,
                &ctx.topology,
                &ctx.topology.delivery_queue_for(&job.integration_id),
                &body,
                broker::persistent_json(),
                wait,
            )
            .await?;
        }
        Action::Dead {
            body,
            reason,
            detail,
            status,
            job,
        } => {
            let mut headers = vec![("reason", reason.to_owned()), ("error", detail.clone())];
            if let Some(status) = status {
                headers.push(("status", status.to_string()));
            }
            if let Some(job) = &job {
                headers.push(("integration", job.integration_id.clone()));
                headers.push(("delivery-id", job.delivery_id.clone()));
                headers.push(("attempts", job.attempt.to_string()));
                headers.push(("url", job.url.clone()));
            }
            delay::dead_letter(&publisher, &ctx.dead_queue, &body, &headers).await?;
            ctx.metrics.deliveries.with_label_values(&["dead"]).inc();
            ctx.metrics.dead.with_label_values(&[reason]).inc();
            warn!(
                reason,
                error = %detail,
                integration = job.as_ref().map(|j| j.integration_id.as_str()).unwrap_or(""),
                "delivery dead-lettered"
            );
        }
    }
    delivery.ack(BasicAckOptions::default()).await?;
    Ok(())
}

/// Dead-letters a job that was not attempted on this visit.
fn dead(ctx: &Context, job: DeliveryJob, reason: &'static str, detail: String) -> Action {
    ctx.log.record(LogRecord::job(Step::Dead, &job).with_error(&detail));
    dead_after(job, reason, detail, None)
}

/// Dead-letters a job, keeping the last attempt's HTTP status for the headers.
fn dead_after(job: DeliveryJob, reason: &'static str, detail: String, status: Option<u16>) -> Action {
    Action::Dead {
        body: serde_json::to_vec(&job).expect("a job always serializes"),
        reason,
        detail,
        status,
        job: Some(job),
    }
}

async fn decide(delivery: &Delivery, ctx: &Context) -> Action {
    let mut job: DeliveryJob = match serde_json::from_slice(&delivery.data) {
        Ok(job) => job,
        Err(e) => {
            return Action::Dead {
                body: delivery.data.clone(),
                reason: "invalid_job",
                detail: format!("not a delivery job: {e}"),
                status: None,
                job: None,
            };
        }
    };
    if job.v > MESSAGE_VERSION {
        let detail = format!("job version {} is newer than this deliverer ({MESSAGE_VERSION})", job.v);
        return dead(ctx, job, "unsupported_version", detail);
    }

    // Not due yet: back on the ladder (or a short wait here).
    if let Some(wait) = delay::wait_until_due(job.not_before_ms).await {
        ctx.metrics.deferred.with_label_values(&["schedule"]).inc();
        return Action::Park { job, wait };
    }

    let integrations = ctx.integrations.borrow().clone();
    let Some(integration) = integrations.get(&job.integration_id).cloned() else {
        let detail = format!("integration {:?} is not in the configuration", job.integration_id);
        return dead(ctx, job, "unknown_integration", detail);
    };
    let now = now_millis();
    let deadline = job.created_at_ms + integration.max_age.as_millis() as u64;
    if now >= deadline {
        let detail = job.last_error.clone().unwrap_or_else(|| "no attempt made".into());
        return dead(
            ctx,
            job,
            "max_age",
            format!("older than max_age_s; last error: {detail}"),
        );
    }

    // The integration's rate limit: a token now, a reserved slot, or a drop.
    let limit = &integration.rate_limit;
    let key = &integration.id;
    if limit.on_limit == OnLimit::Drop {
        // A job marked reserved here was admitted and then waited for a
        // busy integration: it goes, however late.
        if !std::mem::take(&mut job.rate_reserved) && !ctx.limiter.try_take(key, limit, Instant::now()) {
            ctx.metrics.deliveries.with_label_values(&["dropped"]).inc();
            ctx.log.record(LogRecord::job(Step::Dropped, &job));
            return Action::Ack;
        }
    } else {
        let slot = Slot {
            reserved: &mut job.rate_reserved,
            missed: &mut job.slot_missed,
            not_before_ms: &mut job.not_before_ms,
        };
        match ctx
            .limiter
            .turn(key, limit, slot, now, Duration::from_millis(deadline - now))
        {
            Turn::Go => {}
            Turn::Wait { wait, missed } => {
                let counter = if missed {
                    ctx.metrics.deferred.with_label_values(&["missed_slot"])
                } else {
                    ctx.metrics.deliveries.with_label_values(&["rate_limited"])
                };
                counter.inc();
                ctx.log.record(LogRecord::job(Step::RateLimited, &job));
                return Action::Park { job, wait };
            }
            Turn::TooLong(wait) => {
                let detail = format!("rate limited: the next slot is {wait:?} away, past max_age_s");
                return dead(ctx, job, "max_age", detail);
            }
        }
    }

    // Isolation: an integration with many attempts under way waits its turn
    // on the ladder instead of holding more of the shared slots.
    let Some(_slot) = InFlightSlot::take(ctx, &integration.id) else {
        ctx.metrics.deferred.with_label_values(&["busy"]).inc();
        job.rate_reserved = true; // it already paid its token
        job.not_before_ms = Some(now + BUSY_WAIT.as_millis() as u64);
        return Action::Park { job, wait: BUSY_WAIT };
    };

    let _attempt_slot = ctx.slots.acquire().await.expect("the semaphore is never closed");
    let under_way = GaugeHold::new(&ctx.metrics.in_flight);
    let started = Instant::now();
    let attempted = attempt::attempt(&ctx.client, &ctx.policy, &job, &integration).await;
    let took = started.elapsed();
    ctx.metrics.duration.observe(took.as_secs_f64());
    drop(under_way);
    ctx.metrics.attempts.with_label_values(&[attempted.class]).inc();
    job.attempt += 1;
    let step = LogRecord::job(Step::Delivered, &job).with_attempt(attempted.status, attempted.class, took);
    after_attempt(ctx, job, &integration, attempted, step)
}

fn after_attempt(
    ctx: &Context,
    mut job: DeliveryJob,
    integration: &Integration,
    attempted: attempt::Attempted,
    step: LogRecord,
) -> Action {
    let status = attempted.status;
    let dead_step = |detail: &str| ctx.log.record(step.clone().with_outcome(Step::Dead).with_error(detail));
    match attempted.outcome {
        Outcome::Delivered { answer } => {
            ctx.metrics.deliveries.with_label_values(&["delivered"]).inc();
            ctx.log.record(step.clone());
            match answer {
                None => Action::Ack,
                Some(answer) => Action::Reply(ReplyJob {
                    v: MESSAGE_VERSION,
                    delivery_id: job.delivery_id,
                    integration_id: job.integration_id,
                    team_id: job.event.team_id,
                    channel_id: job.event.channel_id,
                    in_reply_to: job.event.ts,
                    event_thread_ts: job.event.thread_ts,
                    answer,
                    created_at_ms: now_millis(),
                    attempt: 0,
                    not_before_ms: None,
                    rate_reserved: false,
                    slot_missed: false,
                    last_error: None,
                }),
            }
        }
        Outcome::Gone => {
            let detail = "HTTP 410 Gone: the handler asked for no more retries";
            dead_step(detail);
            dead_after(job, "gone", detail.into(), status)
        }
        Outcome::Blocked(detail) => {
            dead_step(&detail);
            dead_after(job, "blocked_destination", detail, status)
        }
        Outcome::Retry { error, retry_after } => {
            job.last_error = Some(error.clone());
            let budget = RetryBudget {
                max_attempts: integration.max_attempts,
                max_age: integration.max_age,
                created_at_ms: job.created_at_ms,
            };
            let now = now_millis();
            match ctx
                .schedule
                .after_failure(budget, job.attempt, retry_after, now, &error)
            {
                RetryDecision::GiveUp { reason, detail } => {
                    dead_step(&detail);
                    dead_after(job, reason, detail, status)
                }
                RetryDecision::RetryIn(wait) => {
                    ctx.metrics.deliveries.with_label_values(&["retried"]).inc();
                    ctx.log.record(step.with_outcome(Step::Retried).with_error(&error));
                    job.not_before_ms = Some(now + wait.as_millis() as u64);
                    Action::Park { job, wait }
                }
            }
        }
    }
}

/// One of an integration's `per_integration_concurrency` attempt slots.
struct InFlightSlot<'a> {
    ctx: &'a Context,
    id: String,
}

impl<'a> InFlightSlot<'a> {
    fn take(ctx: &'a Context, id: &str) -> Option<Self> {
        let mut map = ctx.in_flight.lock().expect("in-flight lock");
        let n = map.entry(id.to_owned()).or_insert(0);
        if *n >= ctx.per_integration {
            return None;
        }
        *n += 1;
        Some(InFlightSlot { ctx, id: id.to_owned() })
    }
}

impl Drop for InFlightSlot<'_> {
    fn drop(&mut self) {
        let mut map = self.ctx.in_flight.lock().expect("in-flight lock");
        if let Some(n) = map.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.id);
            }
        }
    }
}
