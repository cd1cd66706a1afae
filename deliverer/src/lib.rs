//! `swallow-deliverer`: turns delivery jobs into the seed's HTTP POSTs and
//! handler answers into replies for the responder.
//!
//! Every job ends each visit to the deliverer in exactly one durable place
//! before it is acknowledged: delivered (and its reply, if any, confirmed on
//! `<prefix>.replies`), parked on the delay ladder for a retry or a
//! rate-limit slot (confirmed), dead-lettered (confirmed), or dropped by an
//! `on_limit = "drop"` integration. Nothing waits in memory holding a broker
//! delivery except the HTTP attempt itself, so a slow or failing handler
//! takes at most `per_integration_concurrency` of the `concurrency` attempt
//! permits and never delays anyone else's jobs.
//!
//! `membership` serves the shards this replica holds; `jobs` handles each
//! job on them.

mod attempt;
pub mod destination;
mod jobs;
mod membership;
mod metrics;
pub mod replay;
pub mod request;
pub mod shards;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use swallow_shared::broker::Health;
use swallow_shared::pacing::RateLimiter;
use swallow_shared::retry::RetrySchedule;
use swallow_shared::stage::{Running, StageParts, StartError};
use swallow_shared::{Config, Integrations, Stage, Topology};

pub use attempt::{MAX_ANSWER_BYTES, Outcome, parse_answer};
use destination::{AddressPolicy, GuardedResolver};
use metrics::DelivererMetrics;

/// How long shutdown waits for HTTP attempts under way before handing them
/// back to the broker (they are redelivered).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// The deliverer could not start.
pub type DelivererError = StartError;

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
    let client = http_client(&policy).map_err(StartError::client)?;
    let parts = StageParts::new(Stage::Deliverer, &config, &shutdown).await?;
    let metrics = DelivererMetrics::new(&parts.registry);
    let topology = Topology::of(&config.broker);
    let ctx = Arc::new(Context {
        replica_id: uuid::Uuid::new_v4().simple().to_string(),
        replies_queue: topology.replies_queue(),
        topology,
        prefetch: config.deliverer.concurrency.min(u16::MAX as usize) as u16,
        per_integration: config.deliverer.per_integration_concurrency,
        integrations: parts.integrations.clone(),
        client,
        policy,
        limiter: RateLimiter::new(),
        under_way: jobs::IntegrationAttempts::default(),
        attempt_permits: tokio::sync::Semaphore::new(config.deliverer.concurrency),
        schedule: RetrySchedule::default(),
        metrics,
        health: parts.health.clone(),
        shutdown: shutdown.clone(),
    });
    Ok(parts.run(&config, shutdown, move |connection| {
        membership::session(connection, ctx.clone())
    }))
}

struct Context {
    topology: Topology,
    /// This replica's id in the deliverers' membership.
    replica_id: String,
    replies_queue: String,
    prefetch: u16,
    per_integration: usize,
    integrations: watch::Receiver<Arc<Integrations>>,
    client: reqwest::Client,
    policy: AddressPolicy,
    limiter: RateLimiter<String>,
    under_way: jobs::IntegrationAttempts,
    /// `[deliverer] concurrency`: HTTP attempts under way at once.
    attempt_permits: tokio::sync::Semaphore,
    schedule: RetrySchedule,
    metrics: DelivererMetrics,
    health: Health,
    shutdown: CancellationToken,
}
