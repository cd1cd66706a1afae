//! The broker connection: connecting with a name operators can find,
//! publishing with confirms, and the supervisor loop that reconnects with
//! backoff and resumes a stage's session without restarting the process.
//!
//! A session owns one connection. When anything on it fails, the session
//! returns an error, the supervisor drops the connection (the broker then
//! requeues every unacknowledged delivery, so nothing in flight is lost),
//! waits, reconnects, re-declares the topology and starts a new session.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use lapin::Confirmation;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::CommonMetrics;

/// Whether the stage is connected and consuming, for `/readyz`.
#[derive(Debug, Clone, Default)]
pub struct Health(Arc<AtomicBool>);

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Opens a connection whose `connection_name` (shown by `rabbitmqctl
/// list_connections name client_properties`) identifies the stage.
pub async fn connect(url: &str, connection_name: &str) -> Result<Connection, lapin::Error> {
    let props = ConnectionProperties::default().with_connection_name(LongString::from(connection_name));
    Connection::connect(url, props).await
}

/// A publish the broker did not take.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("publishing to {target}: {source}")]
    Broker { target: String, source: lapin::Error },
    #[error("publishing to {target}: the broker refused the message (nack)")]
    Nacked { target: String },
    #[error("publishing to {target}: unroutable ({reply})")]
    Unroutable { target: String, reply: String },
}

/// Subscribes `channel` to `exchange`: a server-named queue of its own
/// (exclusive, gone with the channel's connection) bound with
/// `routing_key`, consumed without acks. For traffic that is only of use
/// while the subscriber is there (membership announcements, a listener).
pub async fn subscribe(channel: &Channel, exchange: &str, routing_key: &str) -> Result<Consumer, lapin::Error> {
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            queue.name().clone(),
            exchange.into(),
            routing_key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .basic_consume(
            queue.name().clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
}

/// Messages ready in `queue` now (a passive declare on a channel of its own).
pub async fn ready_count(connection: &Connection, queue: &str) -> Result<u32, lapin::Error> {
    let channel = connection.create_channel().await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let q = channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await?;
    let _ = channel.close(200, "counted".into()).await;
    Ok(q.message_count())
}

/// Properties of a persistent JSON message.
pub fn persistent_json() -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(ShortString::from("application/json"))
}

/// Adds a string header to a header table.
pub fn set_header(headers: &mut FieldTable, name: &str, value: impl Into<String>) {
    headers.insert(
        ShortString::from(name),
        AMQPValue::LongString(LongString::from(value.into())),
    );
}

/// Reads a header as a string, if present and textual.
pub fn header_str(props: &BasicProperties, name: &str) -> Option<String> {
    let headers = props.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        other => Some(format!("{other:?}")),
    }
}

/// A channel in confirm mode. Every publish is mandatory: an unroutable
/// message is an error, never a silent drop.
#[derive(Clone)]
pub struct ConfirmedPublisher {
    channel: Channel,
}

/// A publish sent and waiting for the broker's confirm.
pub struct PendingConfirm {
    target: String,
    confirm: lapin::PublisherConfirm,
}

impl PendingConfirm {
    /// Waits until the broker has taken responsibility for the message.
    pub async fn confirmed(self) -> Result<(), PublishError> {
        let target = self.target;
        match self.confirm.await {
            Ok(Confirmation::Ack(None)) | Ok(Confirmation::NotRequested) => Ok(()),
            Ok(Confirmation::Ack(Some(returned))) | Ok(Confirmation::Nack(Some(returned))) => {
                Err(PublishError::Unroutable {
                    target,
                    reply: returned.reply_text.to_string(),
                })
            }
            Ok(Confirmation::Nack(None)) => Err(PublishError::Nacked { target }),
            Err(source) => Err(PublishError::Broker { target, source }),
        }
    }
}

impl ConfirmedPublisher {
    pub async fn open(connection: &Connection) -> Result<Self, lapin::Error> {
        let channel = connection.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(ConfirmedPublisher { channel })
    }

    /// Sends a message; the returned value resolves when it is confirmed.
    /// Sending many and then awaiting all pipelines the confirms.
    pub async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<PendingConfirm, PublishError> {
        let target = if exchange.is_empty() {
            routing_key.to_owned()
        } else {
            format!("{exchange} ({routing_key})")
        };
        let options = BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        };
        match self
            .channel
            .basic_publish(exchange.into(), routing_key.into(), options, body, properties)
            .await
        {
            Ok(confirm) => Ok(PendingConfirm { target, confirm }),
            Err(source) => Err(PublishError::Broker { target, source }),
        }
    }

    /// Sends a message and waits for its confirm.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        self.send(exchange, routing_key, body, properties)
            .await?
            .confirmed()
            .await
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }
}

/// Why a session ended other than by shutdown.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error("the broker cancelled the consumer of {0}")]
    ConsumerEnded(String),
    #[error("{0}")]
    Other(String),
}

/// How long the supervisor waits for the broker to answer a connection close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the supervisor needs to know about the stage it runs.
pub struct Supervisor {
    pub url: String,
    pub connection_name: String,
    pub shutdown: CancellationToken,
    pub health: Health,
    pub metrics: CommonMetrics,
}

impl Supervisor {
    /// Runs `session` on a fresh connection (shared so the session can hand
    /// it to its tasks), again and again, until shutdown.
    /// A session returns `Ok` only when it stopped for shutdown.
    pub async fn run<F, Fut>(self, mut session: F)
    where
        F: FnMut(Arc<Connection>) -> Fut,
        Fut: Future<Output = Result<(), SessionError>>,
    {
        let schedule = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(4))
            .with_jitter()
            .without_max_times();
        let mut backoff = schedule.build();
        let mut first = true;
        loop {
            if self.shutdown.is_cancelled() {
                return;
            }
            if !first {
                self.metrics.broker_reconnects.inc();
            }
            first = false;
            let connected = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                c = connect(&self.url, &self.connection_name) => c,
            };
            match connected {
                Ok(connection) => {
                    let connection = Arc::new(connection);
                    info!(connection = %self.connection_name, "connected to the broker");
                    self.metrics.broker_connected.set(1);
                    let started = Instant::now();
                    let result = session(connection.clone()).await;
                    self.health.set_ready(false);
                    self.metrics.broker_connected.set(0);
                    // Bounded: on a connection that broke midway the close
                    // may never be answered.
                    let close = connection.close(200, ShortString::from("swallow stage stopping"));
                    let _ = tokio::time::timeout(CLOSE_TIMEOUT, close).await;
                    match result {
                        Ok(()) => {
                            info!(connection = %self.connection_name, "disconnected from the broker");
                            return;
                        }
                        Err(error) => {
                            warn!(%error, "broker session ended; reconnecting");
                            if started.elapsed() > Duration::from_secs(10) {
                                backoff = schedule.build();
                            }
                        }
                    }
                }
                Err(error) => warn!(%error, url = %redact(&self.url), "cannot connect to the broker"),
            }
            let wait = backoff.next().unwrap_or(Duration::from_secs(10));
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// The URL without its password, for logs.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}
