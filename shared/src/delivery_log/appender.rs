//! The appender: records queued without waiting, batched, and published
//! with confirms to the stream on a connection of its own.

use std::time::Duration;

use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Connection};
use prometheus::{IntCounter, Registry};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::stream::declare_stream;
use super::*;
use crate::broker::{self, ConfirmedPublisher};

/// Records collected for one stream message.
#[derive(Default)]
pub(super) struct Batch {
    pub(super) body: Vec<u8>,
    records: u64,
}

impl Batch {
    pub(super) fn push(&mut self, record: &LogRecord) {
        serde_json::to_writer(&mut self.body, record).expect("a record always serializes");
        self.body.push(b'\n');
        self.records += 1;
    }
    fn full(&self) -> bool {
        self.records as usize >= BATCH_RECORDS || self.body.len() >= BATCH_BYTES
    }
    /// Empty again, keeping the buffer's room.
    fn clear(&mut self) {
        self.body.clear();
        self.records = 0;
    }
}

/// A stage's way into the log: cheap to clone, and [`DeliveryLog::record`]
/// never waits.
#[derive(Clone)]
pub struct DeliveryLog {
    pub(super) tx: Option<mpsc::Sender<LogRecord>>,
    pub(super) dropped: IntCounter,
}

impl DeliveryLog {
    /// A log that records nothing (`[delivery_log] enabled = false`).
    pub(crate) fn disabled(dropped: IntCounter) -> Self {
        DeliveryLog { tx: None, dropped }
    }

    /// Queues a record for the next batch; drops and counts it if the queue
    /// is full or the appender is gone.
    pub fn record(&self, record: LogRecord) {
        if let Some(tx) = &self.tx
            && tx.try_send(record).is_err()
        {
            self.dropped.inc();
        }
    }
}

/// Where the appender publishes.
pub struct AppenderTarget {
    /// The broker's addresses (and TLS settings) from `[broker]`.
    pub broker: crate::config::BrokerConfig,
    pub connection_name: String,
    /// The stream, `<prefix>.log`.
    pub stream: String,
    pub config: DeliveryLogConfig,
}

/// Registers `swallow_log_records_dropped_total` and starts the appender
/// (unless the log is disabled). The appender ends, after publishing what
/// it holds, once every clone of the handle is dropped.
pub fn start(target: AppenderTarget, registry: &Registry) -> (DeliveryLog, Option<JoinHandle<()>>) {
    let dropped = crate::metrics::counter(
        registry,
        "swallow_log_records_dropped_total",
        "Delivery log records dropped: the log's queue was full or the broker did not take them.",
    );
    if !target.config.enabled {
        return (DeliveryLog::disabled(dropped), None);
    }
    let (tx, rx) = mpsc::channel(QUEUE_RECORDS);
    let task = tokio::spawn(append(rx, target, dropped.clone()));
    (DeliveryLog { tx: Some(tx), dropped }, Some(task))
}

/// The appender's connection to the broker.
struct Link {
    connection: Connection,
    publisher: ConfirmedPublisher,
}

async fn append(mut rx: mpsc::Receiver<LogRecord>, target: AppenderTarget, dropped: IntCounter) {
    // Connect at once, so that the stream exists as soon as a stage runs.
    let mut link = match tokio::time::timeout(CONNECT_TIMEOUT, open_link(&target)).await {
        Ok(Ok(l)) => Some(l),
        _ => None,
    };
    let mut retry_at = tokio::time::Instant::now();
    let mut backoff = Duration::from_millis(500);
    // One buffer for every batch, so that each does not grow its own.
    let mut batch = Batch::default();
    loop {
        let Some(first) = rx.recv().await else { break };
        batch.clear();
        batch.push(&first);
        let flush = tokio::time::sleep(FLUSH_INTERVAL);
        tokio::pin!(flush);
        let mut closed = false;
        while !batch.full() {
            tokio::select! {
                biased;
                next = rx.recv() => match next {
                    Some(record) => batch.push(&record),
                    None => { closed = true; break; }
                },
                _ = &mut flush => break,
            }
        }
        if link.is_none() && tokio::time::Instant::now() >= retry_at {
            match tokio::time::timeout(CONNECT_TIMEOUT, open_link(&target)).await {
                Ok(Ok(l)) => {
                    link = Some(l);
                    backoff = Duration::from_millis(500);
                }
                Ok(Err(error)) => {
                    warn!(%error, stream = %target.stream, "delivery log: cannot reach the broker; dropping records")
                }
                Err(_) => warn!(stream = %target.stream, "delivery log: connecting timed out; dropping records"),
            }
            if link.is_none() {
                retry_at = tokio::time::Instant::now() + backoff;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
        let published = match &link {
            Some(l) => publish(l, &target.stream, &batch.body).await,
            None => false,
        };
        if !published {
            dropped.inc_by(batch.records);
            if let Some(l) = link.take() {
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    l.connection.close(200, "log batch failed".into()),
                )
                .await;
            }
        }
        if closed {
            break;
        }
    }
    if let Some(l) = link {
        let _ = tokio::time::timeout(Duration::from_secs(2), l.connection.close(200, "stage stopping".into())).await;
    }
}

async fn publish(link: &Link, stream: &str, body: &[u8]) -> bool {
    let mut headers = FieldTable::default();
    broker::set_header(&mut headers, VERSION_HEADER, BATCH_VERSION);
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(ShortString::from("application/x-ndjson"))
        .with_headers(headers);
    let sent = link.publisher.publish("", stream, body, properties);
    match tokio::time::timeout(CONFIRM_TIMEOUT, sent).await {
        Ok(Ok(())) => true,
        Ok(Err(error)) => {
            warn!(%error, "delivery log: batch not taken; dropping it");
            false
        }
        Err(_) => {
            warn!(stream, "delivery log: no confirm in time; dropping the batch");
            false
        }
    }
}

async fn open_link(target: &AppenderTarget) -> Result<Link, String> {
    let connection = broker::connect(&target.broker, &target.connection_name)
        .await
        .map_err(|e| e.to_string())?;
    declare_stream(&connection, &target.stream, &target.config)
        .await
        .map_err(|e| e.to_string())?;
    let publisher = ConfirmedPublisher::open(&connection).await.map_err(|e| e.to_string())?;
    info!(stream = %target.stream, "delivery log: appending");
    Ok(Link { connection, publisher })
}
