//! The consumer loop every stage runs on its connection: one task per
//! delivery (at most `prefetch` at once, the broker's qos bounds it), each
//! acknowledging its delivery only after its effect is confirmed. On
//! shutdown the consumer is cancelled first, then the tasks under way are
//! given `grace` to finish; whatever is left is handed back to the broker
//! (unacknowledged, so redelivered). When the channel broke, the tasks are
//! handed back at once: lapin calls on a broken connection may never answer,
//! and a stage must not stay "ready" waiting for them.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::Topology;
use crate::broker::{ConfirmedPublisher, Health, SessionError};

/// What the loop needs besides the handler.
pub struct ConsumeOptions<'a> {
    pub stage: &'static str,
    pub topology: &'a Topology,
    pub queue: &'a str,
    pub prefetch: u16,
    pub health: &'a Health,
    pub shutdown: &'a CancellationToken,
    pub grace: Duration,
}

/// Declares the topology, consumes `queue` and runs `handle` for every
/// delivery until shutdown (`Ok`) or a broker failure (`Err`).
pub async fn consume<H, Fut>(
    connection: Arc<Connection>,
    options: ConsumeOptions<'_>,
    handle: H,
) -> Result<(), SessionError>
where
    H: Fn(Delivery, ConfirmedPublisher) -> Fut,
    Fut: Future<Output = Result<(), SessionError>> + Send + 'static,
{
    let ConsumeOptions {
        stage,
        topology,
        queue,
        prefetch,
        health,
        shutdown,
        grace,
    } = options;
    let channel = connection.create_channel().await?;
    topology.declare(&channel).await?;
    let publisher = ConfirmedPublisher::open(&connection).await?;
    let ready = || health.set_ready(true);
    let result = consume_queue(
        &channel, &publisher, stage, queue, prefetch, shutdown, grace, ready, handle,
    )
    .await;
    health.set_ready(false);
    if result.is_ok() {
        let _ = publisher.channel().close(200, "stopping".into()).await;
        let _ = channel.close(200, "stopping".into()).await;
    }
    result
}

/// Consumes `queue` on `channel` until `stop` (`Ok`, after the work under way
/// finished or `grace` ran out) or a broker failure (`Err`). `on_consuming`
/// runs once the consumer is registered.
#[allow(clippy::too_many_arguments)]
pub async fn consume_queue<H, Fut>(
    channel: &Channel,
    publisher: &ConfirmedPublisher,
    stage: &'static str,
    queue: &str,
    prefetch: u16,
    stop: &CancellationToken,
    grace: Duration,
    on_consuming: impl FnOnce(),
    handle: H,
) -> Result<(), SessionError>
where
    H: Fn(Delivery, ConfirmedPublisher) -> Fut,
    Fut: Future<Output = Result<(), SessionError>> + Send + 'static,
{
    channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    on_consuming();
    info!(stage, queue, prefetch, "consuming");

    let mut tasks: JoinSet<Result<(), SessionError>> = JoinSet::new();
    let result = loop {
        tokio::select! {
            _ = stop.cancelled() => break Ok(()),
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Ok(Err(error)) = done {
                    break Err(error);
                }
            }
            next = consumer.next() => match next {
                None => break Err(SessionError::ConsumerEnded(queue.to_owned())),
                Some(Err(error)) => break Err(error.into()),
                Some(Ok(delivery)) => {
                    tasks.spawn(handle(delivery, publisher.clone()));
                }
            },
        }
    };
    if result.is_ok() {
        // Take no more; what was delivered but not started is requeued when
        // the channel closes, what was started may finish and acknowledge.
        let _ = channel
            .basic_cancel(consumer.tag(), BasicCancelOptions::default())
            .await;
        info!(
            stage,
            queue,
            in_flight = tasks.len(),
            "stopping: finishing work under way"
        );
    }
    // Work under way may finish and acknowledge while the channel works: on
    // shutdown for `grace`, after a failure too if the channel is still open.
    // On a broken channel it cannot acknowledge, and calls on it may never
    // answer: it is handed back (the broker requeues it) at once.
    let wait = if channel.status().connected() {
        grace
    } else {
        Duration::ZERO
    };
    let drained = tokio::time::timeout(wait, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        warn!(
            stage,
            queue,
            left = tasks.len(),
            "handing unfinished work back to the broker"
        );
        tasks.abort_all();
    }
    while tasks.join_next().await.is_some() {}
    drop(consumer);
    if result.is_ok() {
        // A round trip on the channel: when it returns, the broker's channel
        // has taken every ack sent before it. A quorum queue may still hold
        // some back (RabbitMQ 3.x stashes settlements while a channel has
        // many commands pending with the queue, and drops the stash when the
        // channel closes, so those messages are redelivered): give it a
        // moment to apply them. This narrows duplicates on a graceful stop;
        // at least once stays the guarantee.
        let _ = channel.basic_qos(prefetch, BasicQosOptions::default()).await;
        tokio::time::sleep(SETTLE_LINGER).await;
    }
    result
}

/// How long a stopping consumer keeps its channel open after its last ack.
const SETTLE_LINGER: Duration = Duration::from_millis(300);
