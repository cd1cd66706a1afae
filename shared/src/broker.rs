//! The broker connection: connecting with a name operators can find,
//! publishing with confirms, and the supervisor loop that reconnects with
//! backoff and resumes a stage's session without restarting the process.
//!
//! A session owns one connection. When anything on it fails, the session
//! returns an error, the supervisor drops the connection (the broker then
//! requeues every unacknowledged delivery, so nothing in flight is lost),
//! waits, reconnects, re-declares the topology and starts a new session.
//!
//! A RabbitMQ cluster is several addresses (`[broker] url` holds them
//! comma-separated). A stage starts at a random one, so that replicas spread
//! over the nodes, and moves to the next on every failed connect or lost
//! connection; it waits only once every address has failed in a row. A node
//! that stops answering without closing its sockets (frozen, partitioned) is
//! noticed by AMQP heartbeats, a connect that never completes by a bound, and
//! a publish whose confirm never comes by a bound: each is a failure, never a
//! hang, so unacknowledged work goes back to the queue.

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use lapin::Confirmation;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::BrokerConfig;
use crate::metrics::CommonMetrics;

/// Whether the stage is connected and consuming, for `/readyz`; and, for
/// a stage with more to it (the matcher's ingress), whether that part is too.
#[derive(Debug, Clone, Default)]
pub struct Health(Arc<AtomicBool>, Arc<std::sync::OnceLock<Health>>);

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst) && self.1.get().is_none_or(Health::is_ready)
    }
    /// From now on ready only while `part` is ready too (set once).
    pub fn also_requires(&self, part: Health) {
        let _ = self.1.set(part);
    }
}

/// The broker's addresses, in the order configured: one or more `amqp://`
/// or `amqps://` URLs. Shown (`Display`, `Debug`) without their passwords.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerUrls(Vec<String>);

impl BrokerUrls {
    /// Parses `url[,url...]` (a comma inside a password is written `%2C`).
    pub fn parse(text: &str) -> Result<BrokerUrls, String> {
        let urls: Vec<String> = text
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect();
        if urls.is_empty() {
            return Err("no broker URL".into());
        }
        for (i, url) in urls.iter().enumerate() {
            amqp_uri(url).map_err(|e| format!("URL {} ({}): {e}", i + 1, redact(url)))?;
        }
        Ok(BrokerUrls(urls))
    }

    pub fn list(&self) -> &[String] {
        &self.0
    }
}

impl fmt::Display for BrokerUrls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: Vec<String> = self.0.iter().map(|u| redact(u)).collect();
        f.write_str(&shown.join(","))
    }
}

impl fmt::Debug for BrokerUrls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BrokerUrls({self})")
    }
}

/// Parses one URL. The host is taken as written: `AMQPUri` alone turns an
/// IP address into `localhost`, which a TLS certificate for the IP fails.
fn amqp_uri(url: &str) -> Result<AMQPUri, String> {
    let mut uri: AMQPUri = url.parse()?;
    if let Some(host) = url::Url::parse(url).ok().as_ref().and_then(url::Url::host_str) {
        uri.authority.host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
    }
    Ok(uri)
}

/// A connection that could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connecting to {url}: {source}")]
    Broker { url: String, source: lapin::Error },
    #[error("connecting to {url}: no answer within {after:?}")]
    Timeout { url: String, after: Duration },
    #[error("connecting to {url}: {message}")]
    Url { url: String, message: String },
    #[error("connecting to {url}: reading {what} {path}: {source}")]
    TlsFile {
        url: String,
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How long the broker may stay silent where an answer is due before it
/// counts as failed: a connect (a frozen node accepts TCP and never
/// answers), a publish's confirm (a node that died after taking it). The
/// same as a missed heartbeat: two heartbeats, at least 5 s; 30 s without.
pub fn silence_bound(heartbeat_s: u16) -> Duration {
    match heartbeat_s {
        0 => Duration::from_secs(30),
        h => Duration::from_secs(2 * u64::from(h)).max(Duration::from_secs(5)),
    }
}

/// The largest frame a stage asks the broker for, unless the URL sets its
/// own `?frame_max=`. lapin keeps room for 32 frames to read and 32 to
/// write on every connection: 4 MiB each way at RabbitMQ's default of
/// 128 KiB, touched as the messages stream through, where swallow's
/// messages are a few KiB; a larger one (a reply of up to 1 MiB) goes in
/// several frames. At 16 KiB the room is 512 KiB each way (BENCHMARKS.md,
/// "Smaller AMQP frames").
pub const FRAME_MAX: u32 = 16 * 1024;

/// Opens a connection to one address, with the configured heartbeat (unless
/// the URL sets its own `?heartbeat=`), frames of at most [`FRAME_MAX`]
/// (unless it sets `?frame_max=`) and, for `amqps://`, the configured
/// CA and client certificate. Its `connection_name` (shown by `rabbitmqctl
/// list_connections name client_properties`) identifies the stage.
pub async fn connect_to(url: &str, broker: &BrokerConfig, connection_name: &str) -> Result<Connection, ConnectError> {
    let shown = redact(url);
    let mut uri = amqp_uri(url).map_err(|message| ConnectError::Url {
        url: shown.clone(),
        message,
    })?;
    uri.query.heartbeat.get_or_insert(broker.heartbeat_s);
    uri.query.frame_max.get_or_insert(FRAME_MAX);
    let tls = match uri.scheme {
        AMQPScheme::AMQPS => tls_config(broker).map_err(|(what, path, source)| ConnectError::TlsFile {
            url: shown.clone(),
            what,
            path,
            source,
        })?,
        AMQPScheme::AMQP => OwnedTLSConfig::default(),
    };
    let props = ConnectionProperties::default().with_connection_name(LongString::from(connection_name));
    let after = silence_bound(broker.heartbeat_s);
    let runtime = lapin::runtime::default_runtime().map_err(|source| ConnectError::Broker {
        url: shown.clone(),
        source,
    })?;
    match tokio::time::timeout(after, Connection::connect_uri_with_config(uri, props, tls, runtime)).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(source)) => Err(ConnectError::Broker { url: shown, source }),
        Err(_) => Err(ConnectError::Timeout { url: shown, after }),
    }
}

/// The TLS settings for `amqps://`: the CA that signed the broker's
/// certificate (else the system's roots) and, for mutual TLS, the client's
/// certificate and key (PEM). Read at every connect, so renewed files apply.
fn tls_config(broker: &BrokerConfig) -> Result<OwnedTLSConfig, (&'static str, PathBuf, std::io::Error)> {
    let read = |what: &'static str, path: &Path| std::fs::read(path).map_err(|e| (what, path.to_owned(), e));
    let cert_chain = match &broker.ca_file {
        Some(path) => Some(String::from_utf8_lossy(&read("the CA file", path)?).into_owned()),
        None => None,
    };
    let identity = match (&broker.client_cert_file, &broker.client_key_file) {
        (Some(cert), Some(key)) => Some(OwnedIdentity::PKCS8 {
            pem: read("the client certificate", cert)?,
            key: read("the client key", key)?,
        }),
        _ => None,
    };
    Ok(OwnedTLSConfig { identity, cert_chain })
}

/// Connects to the first address that answers, trying each once, starting
/// at a random one; for tools that connect once (replay, the chat tool).
pub async fn connect(broker: &BrokerConfig, connection_name: &str) -> Result<Connection, ConnectError> {
    let mut addresses = Addresses::new(&broker.urls);
    let mut last = None;
    for _ in 0..broker.urls.list().len() {
        match connect_to(addresses.next_url(), broker, connection_name).await {
            Ok(connection) => return Ok(connection),
            Err(error) => {
                warn!(%error, "cannot connect to the broker");
                last = Some(error);
            }
        }
    }
    Err(last.expect("BrokerUrls holds at least one URL"))
}

/// Takes a broker's addresses in turn, from a random one.
struct Addresses<'a> {
    urls: &'a [String],
    next: usize,
}

impl<'a> Addresses<'a> {
    fn new(urls: &'a BrokerUrls) -> Self {
        let urls = urls.list();
        Addresses {
            urls,
            next: rand::random_range(0..urls.len()),
        }
    }

    fn next_url(&mut self) -> &'a str {
        let url = &self.urls[self.next % self.urls.len()];
        self.next = (self.next + 1) % self.urls.len();
        url
    }
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
    #[error("publishing to {target}: no confirm within {after:?}")]
    Unconfirmed { target: String, after: Duration },
    #[error("publishing to {target}: the publisher stopped")]
    Stopped { target: String },
    #[error("publishing to {target}: a publish of its batch failed ({error})")]
    Batch { target: String, error: String },
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
/// A confirm that does not come within [`silence_bound`] of the
/// connection's heartbeat is a failure: the input is not acknowledged.
/// Cloned for every delivery's task: a clone is one reference count, not a
/// lapin `Channel`'s dozen.
#[derive(Clone)]
pub struct ConfirmedPublisher(Arc<PublisherChannel>);

struct PublisherChannel {
    channel: Channel,
    bound: Duration,
    /// Held while a publish is numbered and queued (see `send`).
    numbering: std::sync::Mutex<()>,
}

/// A publish sent and waiting for the broker's confirm.
pub struct PendingConfirm {
    target: String,
    confirm: lapin::PublisherConfirm,
    bound: Duration,
}

impl PendingConfirm {
    /// Waits for the broker's answer as it came: the target, acked or not,
    /// and the returned message lapin attached to this confirm, which may
    /// be another publish's (see [`MatchedReturns`]).
    async fn outcome(self) -> Result<(String, bool, Option<lapin::message::BasicReturnMessage>), PublishError> {
        let target = self.target;
        match tokio::time::timeout(self.bound, self.confirm).await {
            Err(_) => Err(PublishError::Unconfirmed {
                target,
                after: self.bound,
            }),
            Ok(Err(source)) => Err(PublishError::Broker { target, source }),
            Ok(Ok(Confirmation::Ack(back))) => Ok((target, true, back)),
            Ok(Ok(Confirmation::Nack(back))) => Ok((target, false, back)),
            Ok(Ok(Confirmation::NotRequested)) => Ok((target, true, None)),
        }
    }

    /// Waits until the broker has taken responsibility for the message.
    pub async fn confirmed(self) -> Result<(), PublishError> {
        match self.outcome().await? {
            (target, _, Some(returned)) => Err(PublishError::Unroutable {
                target,
                reply: returned.reply_text.to_string(),
            }),
            (target, false, None) => Err(PublishError::Nacked { target }),
            (_, true, None) => Ok(()),
        }
    }
}

impl ConfirmedPublisher {
    pub async fn open(connection: &Connection) -> Result<Self, lapin::Error> {
        let channel = connection.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        let bound = silence_bound(connection.configuration().heartbeat());
        Ok(ConfirmedPublisher(Arc::new(PublisherChannel {
            channel,
            bound,
            numbering: std::sync::Mutex::new(()),
        })))
    }

    /// Sends a message; the returned value resolves when it is confirmed.
    /// Sending many and then awaiting all pipelines the confirms.
    ///
    /// The call itself returns once the connection's I/O thread has written
    /// the message, a round trip to that thread and a socket write of its
    /// own. To send several, use [`ConfirmedPublisher::send_all`].
    pub async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<PendingConfirm, PublishError> {
        let target = target(exchange, routing_key);
        let options = BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        };
        let publish = self
            .0
            .channel
            .basic_publish(exchange.into(), routing_key.into(), options, body, properties);
        let mut publish = std::pin::pin!(publish);
        // lapin numbers a publish (the delivery tag its confirm will carry)
        // and queues its frames in two steps, both in the first poll. Two
        // threads publishing on this channel at once could be numbered in
        // one order and sent in the other, and the broker numbers them as
        // sent: each would get the other's confirm, and a nacked message
        // would be taken as confirmed (its source acked: lost). Polled
        // under this lock, no other publish comes between the two steps.
        let first = std::future::poll_fn(|cx| {
            let _numbering = self
                .0
                .numbering
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            std::task::Poll::Ready(publish.as_mut().poll(cx))
        })
        .await;
        let sent = match first {
            std::task::Poll::Ready(sent) => sent,
            std::task::Poll::Pending => publish.await,
        };
        match sent {
            Ok(confirm) => Ok(PendingConfirm {
                target,
                confirm,
                bound: self.0.bound,
            }),
            Err(source) => Err(PublishError::Broker { target, source }),
        }
    }

    /// Sends several messages, `(exchange, routing key, body, properties)`,
    /// together rather than each awaited in turn: each takes its delivery
    /// tag and queues its frames in one step (under the channel's lock, so
    /// publishes from other threads cannot come between), in the order
    /// given, and one write carries them all. The confirms come back in
    /// the same order.
    pub async fn send_all<'a>(
        &self,
        messages: impl IntoIterator<Item = (&'a str, &'a str, &'a [u8], BasicProperties)>,
    ) -> Result<Vec<PendingConfirm>, PublishError> {
        futures_util::future::try_join_all(
            messages
                .into_iter()
                .map(|(exchange, routing_key, body, properties)| self.send(exchange, routing_key, body, properties)),
        )
        .await
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
        &self.0.channel
    }
}

/// How a publish's destination is named in errors. Built for every publish
/// (its confirm may fail later), so joined rather than `format!`ted, which
/// costs about a thousand instructions more.
fn target(exchange: &str, routing_key: &str) -> String {
    if exchange.is_empty() {
        return routing_key.to_owned();
    }
    [exchange, " (", routing_key, ")"].concat()
}

/// A publisher for messages that may come back unroutable: those to an
/// exchange that others bind to (`chat.outbound`). AMQP's `basic.return`
/// names no publish, and a broker that confirms several publishes at once
/// (`multiple`) leaves the client unable to tell which of them came back;
/// lapin hands the return to whichever confirm it resolves first (a park on
/// the same channel was once reported unroutable, and the reply that came
/// back reported confirmed). So these publishes go on a channel of their
/// own, in batches: a batch is published at once (pipelined), its confirms
/// are all awaited before the next batch starts, and the messages returned
/// within it, wherever lapin put them, are matched to their publishes by
/// their bytes. A return always comes before its publish's confirm, so every
/// return of a batch is in hand when its last confirm is. Messages sent
/// while a batch is under way go in the next one.
pub struct MatchedReturns {
    requests: tokio::sync::mpsc::UnboundedSender<Request>,
}

struct Request {
    exchange: String,
    routing_key: String,
    body: Vec<u8>,
    properties: BasicProperties,
    done: tokio::sync::oneshot::Sender<Result<(), PublishError>>,
}

impl MatchedReturns {
    /// Starts the batching task on `connection` (its channel is opened with
    /// the first batch); it ends when this value is dropped.
    pub fn start(connection: Arc<Connection>, max_batch: usize) -> Self {
        let (requests, batches) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(publish_batches(connection, batches, max_batch.max(1)));
        MatchedReturns { requests }
    }

    /// Publishes a message (mandatory) and waits for its confirm; an
    /// unroutable one is [`PublishError::Unroutable`]. The body is kept
    /// until then, to be matched against what comes back.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: Vec<u8>,
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let (done, outcome) = tokio::sync::oneshot::channel();
        let request = Request {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            body,
            properties,
            done,
        };
        let stopped = || PublishError::Stopped {
            target: target(exchange, routing_key),
        };
        self.requests.send(request).map_err(|_| stopped())?;
        outcome.await.unwrap_or_else(|_| Err(stopped()))
    }
}

async fn publish_batches(
    connection: Arc<Connection>,
    mut batches: tokio::sync::mpsc::UnboundedReceiver<Request>,
    max_batch: usize,
) {
    let mut publisher: Option<ConfirmedPublisher> = None;
    let mut batch = Vec::with_capacity(max_batch);
    while batches.recv_many(&mut batch, max_batch).await > 0 {
        let outcomes = publish_batch(&connection, &mut publisher, &batch).await;
        for (request, outcome) in batch.drain(..).zip(outcomes) {
            let _ = request.done.send(outcome);
        }
    }
    if let Some(publisher) = publisher {
        let _ = publisher.channel().close(200, "stopping".into()).await;
    }
}

/// One batch: every message published, every confirm awaited, the returns
/// matched by bytes. When the channel failed for any of them, all of the
/// batch fail (a return may have been on the failed confirm), and the next
/// batch opens a new channel.
async fn publish_batch(
    connection: &Connection,
    publisher: &mut Option<ConfirmedPublisher>,
    batch: &[Request],
) -> Vec<Result<(), PublishError>> {
    let result = async {
        let channel = match publisher {
            Some(channel) => channel.clone(),
            None => publisher
                .insert(
                    ConfirmedPublisher::open(connection)
                        .await
                        .map_err(|source| PublishError::Broker {
                            target: "the channel for messages that may come back".into(),
                            source,
                        })?,
                )
                .clone(),
        };
        let sent = channel
            .send_all(batch.iter().map(|r| {
                (
                    r.exchange.as_str(),
                    r.routing_key.as_str(),
                    r.body.as_slice(),
                    r.properties.clone(),
                )
            }))
            .await?;
        let mut acked = Vec::with_capacity(batch.len());
        let mut returned = Vec::new();
        for pending in sent {
            let (_, ack, back) = pending.outcome().await?;
            acked.push(ack);
            returned.extend(back);
        }
        Ok::<_, PublishError>((acked, returned))
    }
    .await;
    let (acked, mut returned) = match result {
        Ok(outcome) => outcome,
        Err(error) => {
            if let Some(broken) = publisher.take() {
                let channel = broken.channel().clone();
                tokio::spawn(async move {
                    let _ = channel.close(200, "replaced".into()).await;
                });
            }
            let error = error.to_string();
            return batch
                .iter()
                .map(|r| {
                    Err(PublishError::Batch {
                        target: target(&r.exchange, &r.routing_key),
                        error: error.clone(),
                    })
                })
                .collect();
        }
    };
    batch
        .iter()
        .zip(acked)
        .map(|(r, ack)| {
            // Named only for an error.
            let named = || target(&r.exchange, &r.routing_key);
            if let Some(i) = returned
                .iter()
                .position(|m: &lapin::message::BasicReturnMessage| m.delivery.data == r.body)
            {
                let back = returned.swap_remove(i);
                return Err(PublishError::Unroutable {
                    target: named(),
                    reply: back.reply_text.to_string(),
                });
            }
            if ack {
                Ok(())
            } else {
                Err(PublishError::Nacked { target: named() })
            }
        })
        .collect()
}

/// Why a session ended other than by shutdown.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error(transparent)]
    Connect(#[from] ConnectError),
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
    pub broker: BrokerConfig,
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
        let mut addresses = Addresses::new(&self.broker.urls);
        let count = self.broker.urls.list().len();
        // Failed connects and sessions since the last wait: another address
        // is tried at once, the backoff waits only once all have failed.
        let mut failed = 0;
        let mut first = true;
        loop {
            if self.shutdown.is_cancelled() {
                return;
            }
            if !first {
                self.metrics.broker_reconnects.inc();
            }
            first = false;
            let url = addresses.next_url();
            let connected = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                c = connect_to(url, &self.broker, &self.connection_name) => c,
            };
            match connected {
                Ok(connection) => {
                    let connection = Arc::new(connection);
                    info!(connection = %self.connection_name, broker = %redact(url), "connected to the broker");
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
                            warn!(%error, broker = %redact(url), "broker session ended; reconnecting");
                            if started.elapsed() > Duration::from_secs(10) {
                                backoff = schedule.build();
                                failed = 0;
                            }
                        }
                    }
                }
                Err(error) => warn!(%error, "cannot connect to the broker"),
            }
            failed += 1;
            if failed < count {
                continue;
            }
            failed = 0;
            let wait = backoff.next().unwrap_or(Duration::from_secs(10));
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// A broker URL, or several comma-separated, without their passwords, for
/// logs. Text that is not a URL is hidden from its `://` to its last `@`.
pub fn redact(urls: &str) -> String {
    let shown: Vec<String> = urls.split(',').map(redact_one).collect();
    shown.join(",")
}

fn redact_one(url: &str) -> String {
    match url::Url::parse(url.trim()) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(_) => url.to_owned(),
        Err(_) => match (url.find("://"), url.rfind('@')) {
            (Some(start), Some(at)) if at > start => format!("{}***{}", &url[..start + 3], &url[at..]),
            _ => url.to_owned(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_password_of_a_list_is_redacted() {
        let shown = redact("amqp://a:secret1@h1:5672/%2f,amqps://b:secret2@h2:5671/%2f");
        assert_eq!(shown, "amqp://a:***@h1:5672/%2f,amqps://b:***@h2:5671/%2f");
        let urls = BrokerUrls::parse("amqp://a:secret1@h1/%2f, amqp://b:secret2@h2/%2f").unwrap();
        for text in [urls.to_string(), format!("{urls:?}")] {
            assert!(!text.contains("secret"), "{text}");
            assert!(text.contains("h1") && text.contains("h2"), "{text}");
        }
    }

    #[test]
    fn text_that_is_not_a_url_keeps_no_password() {
        assert_eq!(redact("amqp://u:p@ss@[bad"), "amqp://***@[bad");
        assert_eq!(redact("amqp://localhost"), "amqp://localhost");
    }

    #[test]
    fn a_list_is_parsed_in_order_and_checked() {
        let urls = BrokerUrls::parse("amqp://u:p@127.0.0.1:5673/%2f,amqps://u:p@node2:5671/%2f,").unwrap();
        assert_eq!(urls.list().len(), 2);
        assert!(urls.list()[1].starts_with("amqps://"));
        let error = BrokerUrls::parse("amqp://u:p@h1/%2f,http://u:secret@h2/").unwrap_err();
        assert!(error.contains("URL 2") && !error.contains("secret"), "{error}");
        assert!(BrokerUrls::parse(" , ").is_err());
    }

    #[test]
    fn an_ip_address_stays_the_host() {
        assert_eq!(
            amqp_uri("amqps://u:p@127.0.0.1:5671/%2f").unwrap().authority.host,
            "127.0.0.1"
        );
        assert_eq!(amqp_uri("amqp://u:p@[::1]:5672/%2f").unwrap().authority.host, "::1");
        assert_eq!(amqp_uri("amqp://u:p@node1:5672/%2f").unwrap().authority.host, "node1");
    }

    #[test]
    fn addresses_are_taken_in_turn_from_a_random_one() {
        let urls = BrokerUrls::parse("amqp://h1,amqp://h2,amqp://h3").unwrap();
        let mut starts = std::collections::BTreeSet::new();
        for _ in 0..100 {
            let mut a = Addresses::new(&urls);
            let round: Vec<&str> = (0..4).map(|_| a.next_url()).collect();
            assert_eq!(round[0], round[3], "after all three, the first again");
            let distinct: std::collections::BTreeSet<_> = round[..3].iter().collect();
            assert_eq!(distinct.len(), 3, "each once per round: {round:?}");
            starts.insert(round[0]);
        }
        assert_eq!(starts.len(), 3, "every address is sometimes first");
    }

    #[test]
    fn silence_is_bounded_by_two_heartbeats() {
        assert_eq!(silence_bound(10), Duration::from_secs(20));
        assert_eq!(silence_bound(1), Duration::from_secs(5));
        assert_eq!(silence_bound(0), Duration::from_secs(30));
    }
}
