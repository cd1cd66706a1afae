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
pub mod circuit;
pub mod destination;
mod metrics;
mod notice;
pub mod permits;
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
use swallow_shared::messages::{DeliveryJob, MESSAGE_VERSION, ReplyJob, now_millis};
use swallow_shared::metrics::GaugeHold;
use swallow_shared::pacing::{RateLimiter, Slot, Turn};
use swallow_shared::retry::{RetryBudget, RetryDecision, RetrySchedule};
use swallow_shared::stage::{ListenError, Running, StageParts};
use swallow_shared::{Config, Integrations, Stage, Topology, delay};

pub use attempt::{MAX_ANSWER_BYTES, Outcome, parse_answer};
use circuit::{Admission, Circuits, Transition, Verdict};
use destination::{AddressPolicy, GuardedResolver};
use metrics::DelivererMetrics;
use permits::AttemptPermits;

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
        integrations: parts.integrations.clone(),
        client,
        policy,
        limiter: RateLimiter::new(),
        permits: AttemptPermits::new(
            config.deliverer.concurrency,
            config.deliverer.per_integration_concurrency,
        ),
        circuits: Circuits::new(),
        notices: Mutex::new(HashMap::new()),
        schedule: RetrySchedule::default(),
        metrics,
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
    integrations: watch::Receiver<Arc<Integrations>>,
    client: reqwest::Client,
    policy: AddressPolicy,
    limiter: RateLimiter<String>,
    /// `[deliverer] concurrency` HTTP attempts under way at once, fairly shared.
    permits: Arc<AttemptPermits>,
    /// Circuit breakers per (integration, URL) of the shards held.
    circuits: Circuits,
    /// When each (integration, channel) last got a failure notice (ms).
    notices: Mutex<HashMap<(String, String), u64>>,
    schedule: RetrySchedule,
    metrics: DelivererMetrics,
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
            // The next owner starts with its circuits closed.
            let queue = ctx.topology.delivery_shard_queue(*k);
            ctx.circuits.retain(|id| ctx.topology.delivery_queue_for(id) != queue);
            ctx.metrics.circuits_open.set(ctx.circuits.open() as i64);
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
        /// A failure notice for the channel (`on_failure = "notify"`).
        notice: Option<ReplyJob>,
    },
}

async fn handle(delivery: Delivery, ctx: Arc<Context>, publisher: ConfirmedPublisher) -> Result<(), SessionError> {
    let action = notice::attach(&ctx, decide(&delivery, &ctx).await);
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
            notice,
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
            if let Some(notice) = notice {
                let body = serde_json::to_vec(&notice).expect("a reply always serializes");
                publisher
                    .publish("", &ctx.replies_queue, &body, broker::persistent_json())
                    .await?;
                ctx.metrics.notices.inc();
            }
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

fn dead(job: DeliveryJob, reason: &'static str, detail: String) -> Action {
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
        notice: None,
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
                notice: None,
            };
        }
    };
    if job.v > MESSAGE_VERSION {
        let detail = format!("job version {} is newer than this deliverer ({MESSAGE_VERSION})", job.v);
        return dead(job, "unsupported_version", detail);
    }

    // Not due yet: back on the ladder (or a short wait here).
    if let Some(wait) = delay::wait_until_due(job.not_before_ms).await {
        ctx.metrics.deferred.with_label_values(&["schedule"]).inc();
        return Action::Park { job, wait };
    }

    let integrations = ctx.integrations.borrow().clone();
    let Some(integration) = integrations.get(&job.integration_id).cloned() else {
        let detail = format!("integration {:?} is not in the configuration", job.integration_id);
        return dead(job, "unknown_integration", detail);
    };
    let now = now_millis();
    let deadline = job.created_at_ms + integration.max_age.as_millis() as u64;
    if now >= deadline {
        let detail = job.last_error.clone().unwrap_or_else(|| "no attempt made".into());
        if ctx.circuits.is_open((&job.integration_id, &job.url)) {
            let detail = format!("its URL's circuit was open until max_age_s; last error: {detail}");
            return dead(job, "circuit_open", detail);
        }
        return dead(job, "max_age", format!("older than max_age_s; last error: {detail}"));
    }
    let probe = match admit(ctx, &integration, &mut job, now, deadline) {
        Ok(probe) => probe,
        Err(wait) => return Action::Park { job, wait },
    };

    // The integration's rate limit: a token now, a reserved slot, or a drop.
    let limit = &integration.rate_limit;
    let key = &integration.id;
    if probe {
        // A circuit's one probe goes without a token: the jobs that waited
        // behind it then meet a full bucket.
    } else if limit.on_limit == OnLimit::Drop {
        // A job marked reserved here was admitted and then waited for a
        // busy integration: it goes, however late.
        if !std::mem::take(&mut job.rate_reserved) && !ctx.limiter.try_take(key, limit, Instant::now()) {
            ctx.metrics.deliveries.with_label_values(&["dropped"]).inc();
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
                return Action::Park { job, wait };
            }
            Turn::TooLong(wait) => {
                let detail = format!("rate limited: the next slot is {wait:?} away, past max_age_s");
                return dead(job, "max_age", detail);
            }
        }
    }

    // Isolation: an integration with many attempts under way waits its turn
    // on the ladder instead of holding more of the shared slots.
    let Ok(_permit) = ctx.permits.acquire(&integration.id).await else {
        ctx.metrics.deferred.with_label_values(&["busy"]).inc();
        job.rate_reserved = true; // it already paid its token
        job.not_before_ms = Some(now + BUSY_WAIT.as_millis() as u64);
        return Action::Park { job, wait: BUSY_WAIT };
    };

    let under_way = GaugeHold::new(&ctx.metrics.in_flight);
    let started = Instant::now();
    let attempted = attempt::attempt(&ctx.client, &ctx.policy, &job, &integration).await;
    ctx.metrics.duration.observe(started.elapsed().as_secs_f64());
    drop(under_way);
    ctx.metrics.attempts.with_label_values(&[attempted.class]).inc();
    record_health(ctx, &job, &integration, &attempted);
    job.attempt += 1;
    after_attempt(ctx, job, &integration, attempted)
}

fn after_attempt(
    ctx: &Context,
    mut job: DeliveryJob,
    integration: &Integration,
    attempted: attempt::Attempted,
) -> Action {
    let status = attempted.status;
    match attempted.outcome {
        Outcome::Delivered { answer } => {
            ctx.metrics.deliveries.with_label_values(&["delivered"]).inc();
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
        Outcome::Gone => dead_after(
            job,
            "gone",
            "HTTP 410 Gone: the handler asked for no more retries".into(),
            status,
        ),
        Outcome::Blocked(detail) => dead_after(job, "blocked_destination", detail, status),
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
                RetryDecision::GiveUp { reason, detail } => dead_after(job, reason, detail, status),
                RetryDecision::RetryIn(wait) => {
                    ctx.metrics.deliveries.with_label_values(&["retried"]).inc();
                    job.not_before_ms = Some(now + wait.as_millis() as u64);
                    Action::Park { job, wait }
                }
            }
        }
    }
}

/// The circuit's word on `job`: `Ok(false)` go, `Ok(true)` go as the
/// circuit's probe, `Err(wait)` park until the next probe time (or the
/// job's `max_age`), uncharged.
fn admit(
    ctx: &Context,
    integration: &Integration,
    job: &mut DeliveryJob,
    now: u64,
    deadline: u64,
) -> Result<bool, Duration> {
    let key = (job.integration_id.as_str(), job.url.as_str());
    let (admission, transition) = ctx
        .circuits
        .admit(key, integration.circuit_failures, integration.timeout, now);
    if let Some(t) = transition {
        note_transition(ctx, &job.integration_id, &job.url, t);
    }
    match admission {
        Admission::Go => Ok(false),
        Admission::Probe => Ok(true),
        Admission::Wait { until_ms, last_error } => {
            ctx.metrics.deferred.with_label_values(&["circuit_open"]).inc();
            // One trip on the ladder, rounded up: a little late costs nothing
            // here, and thousands of waiting jobs bouncing would cost the
            // broker (and everyone's jobs behind them in the shard).
            let one_trip = swallow_shared::topology::one_trip(Duration::from_millis(until_ms.saturating_sub(now)));
            let until = (now + one_trip.as_millis() as u64).min(deadline).max(now + 1);
            // A held rate-limit slot would be long gone by then.
            job.rate_reserved = false;
            job.slot_missed = false;
            job.not_before_ms = Some(until);
            if job.last_error.is_none() {
                job.last_error = Some(last_error);
            }
            Err(Duration::from_millis(until - now))
        }
    }
}

/// Tells the circuit what the attempt said about the handler.
fn record_health(ctx: &Context, job: &DeliveryJob, integration: &Integration, attempted: &attempt::Attempted) {
    let error = match (&attempted.outcome, attempted.status) {
        (Outcome::Retry { error, .. }, _) => error.clone(),
        (_, Some(status)) => format!("HTTP {status}"),
        _ => attempted.class.to_owned(),
    };
    let verdict = Verdict::of(attempted.status, attempted.class);
    let key = (job.integration_id.as_str(), job.url.as_str());
    if let Some(t) = ctx.circuits.record(
        key,
        integration.circuit_failures,
        verdict,
        &error,
        now_millis(),
        rand::random(),
    ) {
        note_transition(ctx, &job.integration_id, &job.url, t);
    }
}

/// One log line and the metrics for a circuit's change of state.
fn note_transition(ctx: &Context, integration: &str, url: &str, t: Transition) {
    ctx.metrics.circuit_transitions.with_label_values(&[t.to.label()]).inc();
    ctx.metrics.circuits_open.set(ctx.circuits.open() as i64);
    let url = redact_url(url);
    match t.to {
        circuit::CircuitState::Open => {
            warn!(integration, url = %url, last_error = %t.last_error, "circuit opened: the handler's jobs wait for a probe")
        }
        circuit::CircuitState::HalfOpen => {
            info!(integration, url = %url, last_error = %t.last_error, "circuit half-open: one probe goes")
        }
        circuit::CircuitState::Closed => {
            info!(integration, url = %url, last_error = %t.last_error, "circuit closed: the handler answers again")
        }
    }
}

/// A handler URL for a log line: no credentials, no query (it may hold a key).
fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_password(None);
            let _ = u.set_username("");
            u.set_query(None);
            u.to_string()
        }
        Err(_) => "(invalid URL)".into(),
    }
}
