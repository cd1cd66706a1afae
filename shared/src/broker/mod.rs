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

pub mod connect;
pub mod consume;
mod publish;
mod returns;
mod supervisor;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, Consumer};

pub use connect::{ConnectError, FRAME_MAX, connect, silence_bound};
pub use publish::{ConfirmedPublisher, PendingConfirm, PublishError};
pub use returns::MatchedReturns;
pub use supervisor::{SessionError, Supervisor};

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
