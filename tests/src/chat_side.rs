//! The chat platform's side of a test on a cluster: events published and
//! replies taken on connections that move to the next node when theirs
//! fails.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use lapin::{Connection, ConnectionProperties};

/// The chat platform's side of a test on the cluster: publishes chat events
/// and takes the replies, each on a connection of its own that moves to the
/// next node when its node fails, so the test's own traffic survives the
/// faults it makes. What it publishes is confirmed (an event whose confirm
/// is lost is published again: at least once, like any publisher).
pub struct ChatSide {
    urls: Vec<String>,
    topology: swallow_shared::Topology,
    /// Events published and confirmed so far (event `i` has ts `i.000001`).
    pub published: Arc<std::sync::atomic::AtomicUsize>,
    /// The `delivery_id` of every reply taken, in arrival order.
    pub replies: Arc<std::sync::Mutex<Vec<String>>>,
    listener: tokio::task::JoinHandle<()>,
}

/// How long the chat side waits for a node's answer before moving on.
const CHAT_SIDE_BOUND: Duration = Duration::from_secs(5);

impl ChatSide {
    /// Declares the topology, binds a durable quorum queue of the test's own
    /// to `<prefix>.chat.outbound` and starts taking replies from it.
    pub async fn start(node_urls: &[String], prefix: &str) -> anyhow::Result<ChatSide> {
        // Heartbeats, so that a frozen node is left within seconds.
        let urls: Vec<String> = node_urls.iter().map(|u| format!("{u}?heartbeat=2")).collect();
        let topology = swallow_shared::Topology::new(prefix);
        let queue = format!("{prefix}.test-outbound");
        let (connection, channel) = connect_any(&urls, 0).await?;
        topology.declare(&channel).await?;
        swallow_shared::topology::declare_quorum_queue(&channel, &queue).await?;
        channel
            .queue_bind(
                queue.as_str().into(),
                topology.chat_outbound_exchange().as_str().into(),
                "#".into(),
                Default::default(),
                Default::default(),
            )
            .await?;
        let _ = connection.close(200, "".into()).await;
        let replies: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
        let listener = tokio::spawn(take_replies(urls.clone(), queue, replies.clone()));
        Ok(ChatSide {
            urls,
            topology,
            published: Arc::default(),
            replies,
            listener,
        })
    }

    /// Publishes events one after another, `per_second`, until `stop`.
    pub async fn publish_until(&self, per_second: u32, stop: tokio_util::sync::CancellationToken) {
        let mut at = 1;
        let mut link: Option<(Connection, lapin::Channel)> = None;
        let mut tick = tokio::time::interval(Duration::from_secs(1) / per_second);
        while !stop.is_cancelled() {
            tick.tick().await;
            let i = self.published.load(Ordering::SeqCst);
            let event = crate::chat_event(&format!("message {i}"), &format!("{i}.000001"));
            let body = serde_json::to_vec(&event).expect("an event serializes");
            loop {
                if link.is_none() {
                    match connect_any(&self.urls, at).await {
                        Ok(l) => link = Some(l),
                        Err(_) => {
                            at += 1;
                            continue;
                        }
                    }
                }
                let (_, channel) = link.as_ref().expect("connected above");
                let exchange = self.topology.events_exchange();
                let sent = tokio::time::timeout(CHAT_SIDE_BOUND, async {
                    let confirm = channel
                        .basic_publish(
                            exchange.as_str().into(),
                            "chat.message".into(),
                            Default::default(),
                            &body,
                            lapin::BasicProperties::default().with_delivery_mode(2),
                        )
                        .await?
                        .await?;
                    Ok::<bool, lapin::Error>(confirm.is_ack())
                })
                .await;
                if let Ok(Ok(true)) = sent {
                    break;
                }
                // This node failed us: the same event again, on the next.
                link = None;
                at += 1;
            }
            self.published.fetch_add(1, Ordering::SeqCst);
        }
    }

    pub fn replies(&self) -> Vec<String> {
        self.replies.lock().unwrap().clone()
    }
}

impl Drop for ChatSide {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

/// Connects to the first node that answers, from `urls[at % len]` on, and
/// opens a channel in confirm mode.
async fn connect_any(urls: &[String], at: usize) -> anyhow::Result<(Connection, lapin::Channel)> {
    let mut last = None;
    for k in 0..urls.len() {
        let url = &urls[(at + k) % urls.len()];
        let attempt = async {
            let connection = Connection::connect(url, ConnectionProperties::default()).await?;
            let channel = connection.create_channel().await?;
            channel.confirm_select(Default::default()).await?;
            Ok::<_, lapin::Error>((connection, channel))
        };
        match tokio::time::timeout(CHAT_SIDE_BOUND, attempt).await {
            Ok(Ok(link)) => return Ok(link),
            Ok(Err(e)) => last = Some(anyhow::Error::from(e)),
            Err(_) => last = Some(anyhow::anyhow!("{url}: no answer")),
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no node")))
}

/// Takes replies from `queue`, acknowledging each once recorded; on any
/// failure moves to the next node.
async fn take_replies(urls: Vec<String>, queue: String, replies: Arc<std::sync::Mutex<Vec<String>>>) {
    use futures_util::StreamExt;
    let mut at = 0;
    loop {
        at += 1;
        let Ok((_connection, channel)) = connect_any(&urls, at).await else {
            continue;
        };
        let consumer = channel
            .basic_consume(queue.as_str().into(), "".into(), Default::default(), Default::default())
            .await;
        let Ok(mut consumer) = consumer else { continue };
        while let Some(Ok(delivery)) = consumer.next().await {
            let reply: serde_json::Value = serde_json::from_slice(&delivery.data).unwrap_or_default();
            let id = reply["delivery_id"].as_str().unwrap_or_default().to_owned();
            replies.lock().unwrap().push(id);
            let acked = tokio::time::timeout(CHAT_SIDE_BOUND, delivery.ack(Default::default())).await;
            if !matches!(acked, Ok(Ok(_))) {
                break;
            }
        }
    }
}
