//! `TestStack`: one test's own corner of the broker, under a unique prefix
//! deleted when the stack is dropped.

use std::time::Duration;

use anyhow::Context as _;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use crate::{Collector, Topology, broker_url};

/// One test's own corner of the broker: a unique prefix whose exchanges and
/// queues are deleted when the stack is dropped.
pub struct TestStack {
    pub url: String,
    pub prefix: String,
    pub topology: Topology,
    pub connection: Connection,
    pub channel: Channel,
    _running: crate::watchdog::Running,
}

impl TestStack {
    pub async fn new(name: &str) -> anyhow::Result<TestStack> {
        Self::on(name, broker_url().await).await
    }

    /// A stack on the broker at `url`.
    pub async fn on(name: &str, url: String) -> anyhow::Result<TestStack> {
        let prefix = format!("t-{name}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        Self::with_prefix(url, prefix).await
    }

    /// A stack with a given prefix (e.g. to reconnect after a broker restart).
    pub async fn with_prefix(url: String, prefix: String) -> anyhow::Result<TestStack> {
        let topology = Topology::new(&prefix);
        let connection = bounded(
            "connecting",
            Connection::connect(
                &url,
                ConnectionProperties::default().with_connection_name(format!("swallow-test {prefix}").into()),
            ),
        )
        .await?
        .with_context(|| format!("connecting to {url}"))?;
        let channel = connection.create_channel().await?;
        channel.confirm_select(Default::default()).await?;
        topology.declare(&channel).await.context("declaring the topology")?;
        Ok(TestStack {
            url,
            prefix,
            topology,
            connection,
            channel,
            _running: crate::watchdog::running(),
        })
    }

    /// Publishes raw bytes to `<prefix>.events`, persistent, confirmed.
    pub async fn publish_event_bytes(&self, body: &[u8]) -> anyhow::Result<()> {
        self.publish_events_bytes(&[body.to_vec()]).await
    }

    pub async fn publish_event(&self, event: &serde_json::Value) -> anyhow::Result<()> {
        self.publish_event_bytes(&serde_json::to_vec(event)?).await
    }

    /// Publishes many raw events, then waits for all confirms.
    pub async fn publish_events_bytes(&self, bodies: &[Vec<u8>]) -> anyhow::Result<()> {
        bounded("publishing events", self.publish_all(bodies)).await?
    }

    async fn publish_all(&self, bodies: &[Vec<u8>]) -> anyhow::Result<()> {
        let mut confirms = Vec::with_capacity(bodies.len());
        for body in bodies {
            confirms.push(
                self.channel
                    .basic_publish(
                        self.topology.events_exchange().as_str().into(),
                        "chat.message".into(),
                        BasicPublishOptions::default(),
                        body,
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await?,
            );
        }
        for c in confirms {
            anyhow::ensure!(c.await?.is_ack(), "event publish not confirmed");
        }
        Ok(())
    }

    /// Publishes raw bytes straight to `queue` (through the default
    /// exchange), persistent, confirmed.
    pub async fn publish_to_queue(&self, queue: &str, body: &[u8]) -> anyhow::Result<()> {
        let persistent = BasicProperties::default().with_delivery_mode(2);
        self.publish_confirmed("", queue, body, persistent).await
    }

    /// Publishes one raw event with `properties` of the test's choosing
    /// (headers, say), confirmed.
    pub async fn publish_event_with(&self, body: &[u8], properties: BasicProperties) -> anyhow::Result<()> {
        let exchange = self.topology.events_exchange();
        self.publish_confirmed(&exchange, "chat.message", body, properties)
            .await
    }

    async fn publish_confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> anyhow::Result<()> {
        bounded("publishing", async {
            let confirm = self
                .channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions::default(),
                    body,
                    properties,
                )
                .await?;
            anyhow::ensure!(
                confirm.await?.is_ack(),
                "publish to {exchange} ({routing_key}) not confirmed"
            );
            Ok(())
        })
        .await?
    }

    /// Starts draining `queue` into a collector (acking what it takes).
    pub async fn drain(&self, queue: &str) -> anyhow::Result<Collector> {
        self.drain_many(&[queue.to_owned()]).await
    }

    /// Drains every delivery shard's queue into one collector.
    pub async fn drain_jobs(&self) -> anyhow::Result<Collector> {
        self.drain_many(&self.topology.delivery_queues()).await
    }

    /// Starts draining several queues into one collector.
    pub async fn drain_many(&self, queues: &[String]) -> anyhow::Result<Collector> {
        let channel = self.connection.create_channel().await?;
        channel.basic_qos(1000, BasicQosOptions::default()).await?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        for queue in queues {
            let mut consumer = channel
                .basic_consume(
                    queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            let tx = tx.clone();
            let keep = channel.clone();
            tokio::spawn(async move {
                let _keep = keep;
                while let Some(Ok(delivery)) = consumer.next().await {
                    let _ = delivery.ack(BasicAckOptions::default()).await;
                    if tx.send(delivery).is_err() {
                        return;
                    }
                }
            });
        }
        Ok(Collector::new(rx))
    }

    /// Messages ready in `queue` now.
    pub async fn queue_len(&self, queue: &str) -> anyhow::Result<u32> {
        Ok(swallow_shared::broker::ready_count(&self.connection, queue).await?)
    }
}

/// How long the test's own broker operations may take: a broker that
/// blocks publishers (a resource alarm) or never answers fails the test
/// here, saying so, instead of hanging it.
const BROKER_BOUND: Duration = Duration::from_secs(60);

async fn bounded<T>(what: &str, f: impl std::future::Future<Output = T>) -> anyhow::Result<T> {
    tokio::time::timeout(BROKER_BOUND, f)
        .await
        .map_err(|_| anyhow::anyhow!("{what}: the broker did not answer within {BROKER_BOUND:?}"))
}

impl Drop for TestStack {
    fn drop(&mut self) {
        let own = format!("{}.test-outbound", self.topology.prefix());
        let queues = self.topology.queues().into_iter().chain([own]).collect();
        crate::delete_declared_blocking(&self.url, queues, self.topology.exchanges());
    }
}
