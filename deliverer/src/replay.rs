//! `swallow-deliverer replay`: moves dead jobs back into line.
//!
//! It looks at each message that was in `<prefix>.deliveries.dead` when it
//! started (at most once), moves the ones that match into
//! their delivery shard's queue as fresh jobs (attempts and age reset, the same
//! `webhook-id`), confirmed before each dead copy is acknowledged, and leaves
//! the rest where they were.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::FieldTable;

use swallow_shared::broker::{self, ConfirmedPublisher, SessionError};
use swallow_shared::messages::{DeliveryJob, now_millis};
use swallow_shared::{Config, Topology};

/// What a replay did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Replayed {
    pub moved: usize,
    /// Looked at and left in the dead queue (another integration, or not a job).
    pub left: usize,
}

/// Moves up to `limit` dead jobs (of `integration`, when given) back.
pub async fn replay(
    config: &Config,
    integration: Option<&str>,
    limit: Option<usize>,
) -> Result<Replayed, SessionError> {
    let topology = Topology::of(&config.broker);
    let connection = broker::connect(&config.broker.url, "swallow-deliverer replay").await?;
    let channel = connection.create_channel().await?;
    topology.declare(&channel).await?;
    let dead = topology.deliveries_dead_queue();
    let queue = channel
        .queue_declare(
            dead.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let present = queue.message_count() as usize;
    let mut done = Replayed::default();
    if present == 0 || limit == Some(0) {
        let _ = connection.close(200, "replay done".into()).await;
        return Ok(done);
    }
    let publisher = ConfirmedPublisher::open(&connection).await?;
    channel
        .basic_qos(present.min(10_000) as u16, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            dead.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut seen = 0;
    while seen < present && limit.is_none_or(|l| done.moved < l) {
        let next = match tokio::time::timeout(Duration::from_secs(2), consumer.next()).await {
            Ok(Some(next)) => next?,
            _ => break,
        };
        seen += 1;
        let wanted = integration
            .is_none_or(|id| broker::header_str(&next.properties, "x-swallow-integration").as_deref() == Some(id));
        let job = serde_json::from_slice::<DeliveryJob>(&next.data);
        match (wanted, job) {
            (true, Ok(mut job)) => {
                job.attempt = 0;
                job.created_at_ms = now_millis();
                job.not_before_ms = None;
                job.rate_reserved = false;
                job.last_error = None;
                let body = serde_json::to_vec(&job).expect("a job always serializes");
                let work = topology.delivery_queue_for(&job.integration_id);
                publisher.publish("", &work, &body, broker::persistent_json()).await?;
                next.ack(BasicAckOptions::default()).await?;
                done.moved += 1;
            }
            // Left unacknowledged: back in the dead queue when the channel closes.
            _ => done.left += 1,
        }
    }
    let _ = channel.close(200, "replay done".into()).await;
    let _ = connection.close(200, "replay done".into()).await;
    Ok(done)
}
