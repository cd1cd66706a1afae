//! The consumer loop every stage runs on its connection: one task per
//! delivery (at most `prefetch` at once, the broker's qos bounds it), each
//! acknowledging its delivery only after its effect is confirmed. On
//! shutdown the consumer is cancelled first, then the tasks under way are
//! given `grace` to finish; whatever is left is handed back to the broker
//! (unacknowledged, so redelivered). When the channel broke, the tasks are
//! handed back at once: lapin calls on a broken connection may never answer,
//! and a stage must not stay "ready" waiting for them. A handler that panics
//! hands its delivery back (requeued) and the loop goes on.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{DeliveryTag, FieldTable};
use lapin::{Channel, Connection};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{ConfirmedPublisher, Health, SessionError};
use crate::Topology;

/// Where a handler settles its delivery: the channel it came on, and its
/// delivery tag. lapin's `Delivery::ack` sends through its internal task,
/// which spawns a task of its own to send it: two more tasks woken, often
/// on the other thread, for every message (BENCHMARKS.md, "Acks sent on the
/// channel"). A `Settler` sends on the channel directly, and settles a
/// delivery once: the panic guard hands back only what was not acked (a
/// second settlement of one delivery tag closes the channel).
pub struct Settler {
    channel: Channel,
    tag: DeliveryTag,
    /// Set once the delivery is settled, by either side.
    settled: Arc<AtomicBool>,
}

impl Settler {
    fn new(channel: &Channel, delivery: &Delivery) -> Settler {
        Settler {
            channel: channel.clone(),
            tag: delivery.delivery_tag,
            settled: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The same delivery's settler, for the panic guard.
    fn share(&self) -> Settler {
        Settler {
            channel: self.channel.clone(),
            tag: self.tag,
            settled: self.settled.clone(),
        }
    }

    /// Acknowledges the delivery (once; a second call does nothing).
    pub async fn ack(&self) -> Result<(), lapin::Error> {
        if self.settled.swap(true, Ordering::Relaxed) {
            return Ok(());
        }
        self.channel.basic_ack(self.tag, BasicAckOptions::default()).await
    }

    /// Hands the delivery back to the broker (requeued), unless it was
    /// already settled.
    async fn hand_back(&self) -> Result<(), lapin::Error> {
        if self.settled.swap(true, Ordering::Relaxed) {
            return Ok(());
        }
        let requeue = BasicNackOptions {
            requeue: true,
            ..Default::default()
        };
        self.channel.basic_nack(self.tag, requeue).await
    }
}

/// What [`consume`] needs besides the handler.
pub struct ConsumeOptions<'a> {
    pub stage: &'static str,
    pub topology: &'a Topology,
    pub queue: &'a str,
    pub prefetch: u16,
    pub health: &'a Health,
    pub shutdown: &'a CancellationToken,
    pub grace: Duration,
}

/// What [`consume_queue`] needs besides the channels and the handler.
#[derive(Clone, Copy)]
pub struct QueueOptions<'a> {
    /// The stage's name, for logs.
    pub stage: &'static str,
    pub queue: &'a str,
    /// Deliveries (and so handler tasks) under way at most.
    pub prefetch: u16,
    /// Cancelled to stop consuming.
    pub stop: &'a CancellationToken,
    /// How long work under way may finish after `stop`.
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
    H: Fn(Delivery, ConfirmedPublisher, Settler) -> Fut,
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
    topology.declare_on(&connection).await?;
    let channel = connection.create_channel().await?;
    let publisher = ConfirmedPublisher::open(&connection).await?;
    let ready = || health.set_ready(true);
    let options = QueueOptions {
        stage,
        queue,
        prefetch,
        stop: shutdown,
        grace,
    };
    let result = consume_queue(&channel, &publisher, options, ready, handle).await;
    health.set_ready(false);
    if result.is_ok() {
        let _ = publisher.channel().close(200, "stopping".into()).await;
        let _ = channel.close(200, "stopping".into()).await;
    }
    result
}

/// Consumes `options.queue` on `channel` until `options.stop` (`Ok`, after
/// the work under way finished or `grace` ran out) or a broker failure
/// (`Err`). `on_consuming` runs once the consumer is registered.
pub async fn consume_queue<H, Fut>(
    channel: &Channel,
    publisher: &ConfirmedPublisher,
    options: QueueOptions<'_>,
    on_consuming: impl FnOnce(),
    handle: H,
) -> Result<(), SessionError>
where
    H: Fn(Delivery, ConfirmedPublisher, Settler) -> Fut,
    Fut: Future<Output = Result<(), SessionError>> + Send + 'static,
{
    let QueueOptions {
        stage,
        queue,
        prefetch,
        stop,
        ..
    } = options;
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
                    let settler = Settler::new(channel, &delivery);
                    tasks.spawn(guarded(stage, delivery, publisher.clone(), settler, &handle));
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
    finish(channel, &mut tasks, options).await;
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

/// The handler's task for one delivery. A handler that panics has not
/// settled its delivery: the panic is logged with its message and the
/// delivery handed back to the broker (requeued) at once, instead of being
/// left unacknowledged, holding a prefetch place until the channel closes.
fn guarded<H, Fut>(
    stage: &'static str,
    delivery: Delivery,
    publisher: ConfirmedPublisher,
    settler: Settler,
    handle: &H,
) -> impl Future<Output = Result<(), SessionError>> + Send + 'static
where
    H: Fn(Delivery, ConfirmedPublisher, Settler) -> Fut,
    Fut: Future<Output = Result<(), SessionError>> + Send + 'static,
{
    let guard = settler.share();
    let tag = delivery.delivery_tag;
    // Boxed: the task then holds a pointer, not the handler's whole state
    // machine (kilobytes), which would otherwise be copied on every spawn.
    let work = Box::pin(AssertUnwindSafe(handle(delivery, publisher, settler)).catch_unwind());
    async move {
        let panic = match work.await {
            Ok(result) => return result,
            Err(panic) => panic,
        };
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into());
        error!(stage, delivery_tag = tag, panic = %message, "handler panicked; handing its delivery back unless it was acknowledged");
        guard.hand_back().await?;
        Ok(())
    }
}

/// Lets the work under way finish: on shutdown for `grace`, after a
/// failure too if the channel is still open. On a broken channel it cannot
/// acknowledge, and calls on it may never answer: it is handed back (the
/// broker requeues it) at once.
async fn finish(channel: &Channel, tasks: &mut JoinSet<Result<(), SessionError>>, options: QueueOptions<'_>) {
    let wait = if channel.status().connected() {
        options.grace
    } else {
        Duration::ZERO
    };
    let drained = tokio::time::timeout(wait, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        warn!(
            stage = options.stage,
            queue = options.queue,
            left = tasks.len(),
            "handing unfinished work back to the broker"
        );
        tasks.abort_all();
    }
    while tasks.join_next().await.is_some() {}
}

/// How long a stopping consumer keeps its channel open after its last ack.
const SETTLE_LINGER: Duration = Duration::from_millis(300);
