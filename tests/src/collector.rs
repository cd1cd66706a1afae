//! Draining queues: `Collector`, delivery headers, and a queue of the
//! test's own on `<prefix>.chat.outbound`.

use std::time::Duration;

use lapin::message::Delivery;
use lapin::types::FieldTable;

use crate::TestStack;

/// Messages taken from a queue, in arrival order.
pub struct Collector {
    rx: tokio::sync::mpsc::UnboundedReceiver<Delivery>,
    pub got: Vec<Delivery>,
}

impl Collector {
    /// Collects what arrives on `rx`.
    pub(crate) fn new(rx: tokio::sync::mpsc::UnboundedReceiver<Delivery>) -> Self {
        Collector { rx, got: Vec::new() }
    }

    /// Waits until at least `n` messages have arrived in all; fails the test
    /// after `timeout`, saying how many did.
    pub async fn until(&mut self, n: usize, timeout: Duration, what: &str) -> &[Delivery] {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.got.len() < n {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(d)) => self.got.push(d),
                Ok(None) => panic!("the consumer of {what} ended after {} of {n}", self.got.len()),
                Err(_) => panic!("timed out after {timeout:?}: {} of {n} {what}", self.got.len()),
            }
        }
        &self.got
    }

    /// Takes messages until `done` holds; fails the test after `timeout`,
    /// saying what was awaited and how many messages had arrived.
    pub async fn until_with(&mut self, timeout: Duration, what: &str, done: impl Fn(&Collector) -> bool) {
        let deadline = tokio::time::Instant::now() + timeout;
        while !done(self) {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(d)) => self.got.push(d),
                Ok(None) => panic!("the consumer ended while waiting for {what}"),
                Err(_) => panic!(
                    "timed out after {timeout:?} waiting for {what} ({} messages)",
                    self.got.len()
                ),
            }
            // Take what else has arrived before checking again (checks may be costly).
            while let Ok(d) = self.rx.try_recv() {
                self.got.push(d);
            }
        }
    }

    /// Takes whatever arrives within `quiet` of the last message.
    pub async fn settle(&mut self, quiet: Duration) -> &[Delivery] {
        while let Ok(Some(d)) = tokio::time::timeout(quiet, self.rx.recv()).await {
            self.got.push(d);
        }
        &self.got
    }

    /// Parses every message taken as JSON.
    pub fn json(&self) -> Vec<serde_json::Value> {
        self.got
            .iter()
            .map(|d| serde_json::from_slice(&d.data).expect("message is JSON"))
            .collect()
    }
}

/// A header of a delivery as text.
pub fn header(delivery: &Delivery, name: &str) -> Option<String> {
    swallow_shared::broker::header_str(&delivery.properties, name)
}

/// Binds a queue of the test's own to `<prefix>.chat.outbound` (as a chat
/// platform would) and drains it.
pub async fn listen_outbound(stack: &TestStack) -> anyhow::Result<Collector> {
    listen_outbound_for(stack, "#").await
}

/// Like [`listen_outbound`], for the replies whose routing key (`<team>.<channel>`)
/// matches `binding` only: the others have no route.
pub async fn listen_outbound_for(stack: &TestStack, binding: &str) -> anyhow::Result<Collector> {
    let name = format!(
        "{}.test-outbound-{}",
        stack.prefix,
        &uuid::Uuid::new_v4().simple().to_string()[..6]
    );
    let options = lapin::options::QueueDeclareOptions {
        auto_delete: true,
        ..Default::default()
    };
    stack
        .channel
        .queue_declare(name.as_str().into(), options, FieldTable::default())
        .await?;
    bind_outbound(stack, &name, binding).await?;
    stack.drain(&name).await
}

/// Like [`listen_outbound`], with a durable quorum queue named
/// `<prefix>.test-outbound` that outlives a broker restart; drain it again
/// with [`TestStack::drain`] after one. Deleted when the stack is dropped.
pub async fn listen_outbound_durable(stack: &TestStack) -> anyhow::Result<(String, Collector)> {
    let name = format!("{}.test-outbound", stack.prefix);
    swallow_shared::topology::declare_quorum_queue(&stack.channel, &name).await?;
    bind_outbound(stack, &name, "#").await?;
    Ok((name.clone(), stack.drain(&name).await?))
}

/// Binds `name` to `<prefix>.chat.outbound` with `binding`.
async fn bind_outbound(stack: &TestStack, name: &str, binding: &str) -> anyhow::Result<()> {
    stack
        .channel
        .queue_bind(
            name.into(),
            stack.topology.chat_outbound_exchange().as_str().into(),
            binding.into(),
            Default::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}
