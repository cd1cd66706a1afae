//! `swallow-matcher`: consumes chat events and publishes one delivery job per
//! (matched integration, URL).
//!
//! The consumer loop follows one rule: an event is acknowledged only after
//! every job it produced (or its copy in `<prefix>.events.invalid`) is
//! confirmed by the broker. A crash at any point therefore redelivers the
//! event; its jobs carry deterministic `webhook-id`s, so the duplicates that
//! at-least-once delivery allows can be recognised downstream.

pub mod index;
pub mod ingress;
mod metrics;

use std::sync::Arc;

use std::time::Duration;

use lapin::Connection;
use lapin::message::Delivery;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use swallow_shared::broker::consume::{ConsumeOptions, Settler, consume};
use swallow_shared::broker::{self, ConfirmedPublisher, Health, SessionError};
use swallow_shared::delivery_log::{DeliveryLog, LogRecord};
use swallow_shared::stage::{ListenError, Running, StageParts};
use swallow_shared::wire::messages::{DeliveryJob, now_millis};
use swallow_shared::{ChatEvent, Config, Stage, Topology};

pub use index::{IntegrationIndex, Match};
use metrics::MatcherMetrics;

/// How long shutdown waits for events being matched (publishing their jobs
/// takes milliseconds; this only bounds a stuck broker).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The matcher could not start.
#[derive(Debug, thiserror::Error)]
pub enum MatcherError {
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error(transparent)]
    Ingress(#[from] ingress::IngressError),
}

/// A started matcher.
pub type Matcher = Running;

/// Runs the matcher until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), MatcherError> {
    start(config, shutdown).await?.join().await;
    Ok(())
}

/// Starts the matcher and returns once its listener is bound.
pub async fn start(config: Config, shutdown: CancellationToken) -> Result<Matcher, MatcherError> {
    let parts = StageParts::new(Stage::Matcher, &config, &shutdown).await?;
    let metrics = MatcherMetrics::new(&parts.registry);
    let index = index_updates(parts.integrations.clone(), shutdown.clone());
    let topology = config.broker.topology();
    let ingress_metrics = ingress::Metrics::new(&parts.registry);
    let ingress = match &config.ingress {
        Some(ingress_config) => {
            let ingress = ingress::start(
                ingress_config,
                topology.events_exchange(),
                ingress_metrics,
                parts.slack_ingress.clone(),
                parts.matrix_ingress.clone(),
                shutdown.clone(),
            )
            .await?;
            parts.health.also_requires(ingress.health.clone());
            Some(ingress.link)
        }
        None => None,
    };
    let ctx = Arc::new(Context {
        invalid: topology.events_invalid_queue(),
        topology,
        prefetch: config.broker.prefetch,
        index,
        metrics,
        log: parts.log.clone(),
        health: parts.health.clone(),
        shutdown: shutdown.clone(),
        ingress,
    });
    Ok(parts.run(&config, shutdown, move |connection| session(connection, ctx.clone())))
}

/// Rebuilds the index whenever the integrations change.
fn index_updates(
    mut integrations: watch::Receiver<Arc<swallow_shared::Integrations>>,
    shutdown: CancellationToken,
) -> watch::Receiver<Arc<IntegrationIndex>> {
    let first = Arc::new(IntegrationIndex::new(&integrations.borrow_and_update()));
    let (tx, rx) = watch::channel(first);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = integrations.changed() => if changed.is_err() { return },
            }
            let next = Arc::new(IntegrationIndex::new(&integrations.borrow_and_update()));
            if tx.send(next).is_err() {
                return;
            }
        }
    });
    rx
}

struct Context {
    topology: Topology,
    invalid: String,
    prefetch: u16,
    index: watch::Receiver<Arc<IntegrationIndex>>,
    metrics: MatcherMetrics,
    log: DeliveryLog,
    health: Health,
    shutdown: CancellationToken,
    /// Where this session's publisher goes for the ingress, when there is one.
    ingress: Option<ingress::LinkSlot>,
}

/// One connection's worth of consuming.
async fn session(connection: Arc<Connection>, ctx: Arc<Context>) -> Result<(), SessionError> {
    let queue = ctx.topology.events_queue();
    let options = ConsumeOptions {
        stage: "matcher",
        topology: &ctx.topology,
        queue: &queue,
        prefetch: ctx.prefetch,
        health: &ctx.health,
        shutdown: &ctx.shutdown,
        grace: SHUTDOWN_GRACE,
    };
    // The ingress publishes on a channel of its own on this connection, for
    // as long as the session lasts.
    if let Some(slot) = &ctx.ingress {
        let publisher = ConfirmedPublisher::open(&connection).await?;
        slot.send_replace(Some(ingress::Link {
            publisher,
            connection: connection.clone(),
        }));
    }
    let consumed = consume(connection, options, |delivery, publisher, settler| {
        handle(delivery, ctx.clone(), publisher, settler)
    })
    .await;
    if let Some(slot) = &ctx.ingress {
        slot.send_replace(None);
    }
    consumed
}

/// Turns one event into confirmed jobs (or a confirmed invalid copy), then acks it.
async fn handle(
    delivery: Delivery,
    ctx: Arc<Context>,
    publisher: ConfirmedPublisher,
    settler: Settler,
) -> Result<(), SessionError> {
    ctx.metrics.events_received.inc();
    match ChatEvent::parse(&delivery.data) {
        Err(invalid) => {
            ctx.metrics.events_invalid.with_label_values(&[invalid.reason()]).inc();
            warn!(error = %invalid, routing_key = %delivery.routing_key, "invalid event sent to the invalid queue");
            let mut headers = delivery.properties.headers().clone().unwrap_or_default();
            broker::set_header(&mut headers, "x-swallow-error", invalid.to_string());
            broker::set_header(&mut headers, "x-swallow-routing-key", delivery.routing_key.as_str());
            let properties = delivery.properties.clone().with_headers(headers).with_delivery_mode(2);
            publisher.publish("", &ctx.invalid, &delivery.data, properties).await?;
        }
        Ok(event) => {
            let index = ctx.index.borrow().clone();
            match index.match_event(&event) {
                Err(ignored) => ctx.metrics.events_ignored.with_label_values(&[ignored.reason()]).inc(),
                Ok(matches) => {
                    ctx.metrics.events_matched.inc();
                    // Stamped now, before any job exists, so they read first:
                    // one per job, each with the job's delivery id.
                    let event_ref = &event;
                    let steps: Vec<LogRecord> = matches
                        .iter()
                        .flat_map(|m| {
                            let id = m.integration.id.as_str();
                            m.integration.urls.iter().enumerate().map(move |(i, url)| {
                                let delivery_id = DeliveryJob::delivery_id_for(event_ref, id, i);
                                LogRecord::matched(event_ref, id, &delivery_id, url.as_str())
                            })
                        })
                        .collect();
                    let created_at_ms = now_millis();
                    let jobs: Vec<(String, Vec<u8>)> = matches
                        .iter()
                        .flat_map(|m| {
                            m.integration.urls.iter().enumerate().map(|(i, url)| {
                                let body = DeliveryJob::encode_new(
                                    &event,
                                    &m.integration.id,
                                    i,
                                    url.as_str(),
                                    &m.trigger_word,
                                    created_at_ms,
                                );
                                (ctx.topology.delivery_queue_for(&m.integration.id), body)
                            })
                        })
                        .collect();
                    let pending = publisher
                        .send_all(
                            jobs.iter()
                                .map(|(queue, body)| ("", queue.as_str(), body.as_slice(), broker::persistent_json())),
                        )
                        .await?;
                    let count = pending.len() as u64;
                    for confirm in pending {
                        confirm.confirmed().await?;
                    }
                    ctx.metrics.jobs_published.inc_by(count);
                    for step in steps {
                        ctx.log.record(step);
                    }
                }
            }
        }
    }
    settler.ack().await?;
    Ok(())
}
