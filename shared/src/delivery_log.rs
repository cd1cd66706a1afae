//! The delivery log (issue #15): every step a matched message takes, as a
//! JSON record in the RabbitMQ stream `<prefix>.log`, so that "I said
//! `googlebot: …` and nothing happened — why?" is answered by one command
//! (`swallow-deliverer log`) instead of three stages' logs.
//!
//! The log must never cost a delivery anything. A stage records through a
//! [`DeliveryLog`] handle: `record()` is not async and never waits — it puts
//! the record on a bounded in-memory queue, or drops it and counts it in
//! `swallow_log_records_dropped_total` when the queue is full. One appender
//! task per process takes the records, batches them (up to
//! [`BATCH_RECORDS`] records or [`BATCH_BYTES`] bytes, at most
//! [`FLUSH_INTERVAL`] after the first) into one stream message of
//! newline-separated JSON, and publishes it with a confirm on a connection of
//! its own, so broker flow control on the log never slows the stage's own
//! connection. A batch the broker does not confirm, or that finds no broker,
//! is dropped and counted: the log is best effort, deliveries are not. A
//! process killed with SIGKILL loses at most the records not yet flushed.
//!
//! Records carry ids, never the message text, tokens, secrets or a
//! handler's response body: chat messages can be private, and the log is
//! kept for days.
//!
//! Retention is the stream's: `x-max-age` and `x-max-length-bytes` from
//! `[log] max_age` and `max_bytes`, set when the stream is first declared.
//! RabbitMQ refuses to re-declare a queue with other arguments, so a stage
//! that finds the stream with other retention keeps using it as it is and
//! says so in one warning (see README, "Why didn't the bot answer?").

use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use prometheus::{IntCounter, Registry};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::broker::{self, ConfirmedPublisher};
use crate::event::ChatEvent;
use crate::messages::{DeliveryJob, ReplyJob};

/// How long a record waits for others before its batch is published.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// Records per stream message at most.
pub const BATCH_RECORDS: usize = 256;
/// Bytes per stream message at most (a batch is flushed once it reaches this).
pub const BATCH_BYTES: usize = 128 * 1024;
/// Records waiting for the appender at most; more are dropped and counted.
pub const QUEUE_RECORDS: usize = 16 * 1024;
/// The longest `error` a record keeps.
pub const MAX_ERROR_BYTES: usize = 1024;
/// The header naming a batch's format version; readers skip versions they
/// do not know.
pub const VERSION_HEADER: &str = "x-swallow-log";
/// The batch format this build writes: newline-separated [`LogRecord`]s.
/// Version 2: a `matched` record per delivery job (one integration, the
/// job's `delivery_id` and URL); version 1 wrote one per event, listing the
/// integrations comma-separated, with an empty `delivery_id`.
pub const BATCH_VERSION: &str = "2";
/// The batch formats this build reads: the records are the same shape, only
/// what a `matched` record covers differs.
pub const READ_VERSIONS: [&str; 2] = ["1", BATCH_VERSION];

/// Whether a batch with this `x-swallow-log` header is one this build reads.
pub fn readable(version: Option<&str>) -> bool {
    version.is_some_and(|v| READ_VERSIONS.contains(&v))
}
/// How long a stopping stage waits for its last records to be published.
pub const LINGER: Duration = Duration::from_secs(2);
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub use crate::config::LogConfig;

impl LogConfig {
    /// Segment size of the stream: retention removes whole segments, so a
    /// segment is an eighth of `max_bytes` (at least 4 KiB, at most
    /// RabbitMQ's default of 500 MB).
    pub fn segment_bytes(&self) -> u64 {
        (self.max_bytes / 8).clamp(4096, 500_000_000)
    }

    /// The stream's queue arguments.
    pub fn stream_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        let text = |s: String| AMQPValue::LongString(LongString::from(s));
        args.insert("x-queue-type".into(), text("stream".into()));
        args.insert("x-max-age".into(), text(format!("{}s", self.max_age.as_secs().max(1))));
        args.insert(
            "x-max-length-bytes".into(),
            AMQPValue::LongLongInt(self.max_bytes.min(i64::MAX as u64) as i64),
        );
        args.insert(
            "x-stream-max-segment-size-bytes".into(),
            AMQPValue::LongLongInt(self.segment_bytes() as i64),
        );
        args
    }
}

/// Parses a duration such as `10m`, `2h`, `7d`, `1w` or `90 seconds`
/// (a day is 24 hours).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let explain = || format!("{text:?} is not a duration such as 90s, 10m, 2h or 7d");
    let span: jiff::Span = text.trim().parse().map_err(|_| explain())?;
    let signed = span
        .to_duration(jiff::SpanRelativeTo::days_are_24_hours())
        .map_err(|_| explain())?;
    Duration::try_from(signed).map_err(|_| format!("{text:?} is negative"))
}

/// Parses a size: a number of bytes, or a number with `KiB`, `MiB`, `GiB`,
/// `KB`, `MB` or `GB`.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let unit_bytes: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(format!("{text:?} is not a size such as 1GiB, 500MB or 1048576")),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size such as 1GiB, 500MB or 1048576"))?;
    n.checked_mul(unit_bytes)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// What happened at one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The matcher made a delivery job of an event (one record per job).
    Matched,
    Delivered,
    Retried,
    Dead,
    /// `on_limit = "drop"` and no token.
    Dropped,
    /// Parked for a rate-limit slot.
    RateLimited,
    /// Not attempted: the integration's circuit breaker is open.
    CircuitOpen,
    ReplyPosted,
    ReplyRetried,
    ReplyDead,
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Matched => "matched",
            Outcome::Delivered => "delivered",
            Outcome::Retried => "retried",
            Outcome::Dead => "dead",
            Outcome::Dropped => "dropped",
            Outcome::RateLimited => "rate_limited",
            Outcome::CircuitOpen => "circuit_open",
            Outcome::ReplyPosted => "reply_posted",
            Outcome::ReplyRetried => "reply_retried",
            Outcome::ReplyDead => "reply_dead",
        }
    }

    /// The stage that records this outcome.
    pub fn stage(self) -> &'static str {
        match self {
            Outcome::Matched => "matcher",
            Outcome::ReplyPosted | Outcome::ReplyRetried | Outcome::ReplyDead => "responder",
            _ => "deliverer",
        }
    }
}

/// One record of the log. `stage` and `outcome` are text, so a reader
/// shows outcomes added by later versions as they are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    /// When the step was taken: RFC 3339, UTC, milliseconds.
    pub at: String,
    pub stage: String,
    pub outcome: String,
    pub team_id: String,
    pub channel_id: String,
    /// The triggering message's `ts`.
    pub event_ts: String,
    /// For `matched` in version 1 batches, every integration matched,
    /// comma-separated.
    pub integration_id: String,
    /// The POST's `webhook-id`; never empty in version 2 (empty for
    /// version 1's `matched`).
    pub delivery_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The URL as configured, to take out of error messages (never written).
    #[serde(skip)]
    raw_url: Option<String>,
}

/// Now, as a record's `at`.
pub fn now_rfc3339() -> String {
    format!("{:.3}", jiff::Timestamp::now())
}

impl LogRecord {
    fn new(outcome: Outcome, team_id: &str, channel_id: &str, event_ts: &str, integration_id: &str) -> Self {
        LogRecord {
            at: now_rfc3339(),
            stage: outcome.stage().into(),
            outcome: outcome.name().into(),
            team_id: team_id.into(),
            channel_id: channel_id.into(),
            event_ts: event_ts.into(),
            integration_id: integration_id.into(),
            delivery_id: String::new(),
            url: None,
            attempt: None,
            status: None,
            class: None,
            duration_ms: None,
            error: None,
            raw_url: None,
        }
    }

    /// The matcher made the job `delivery_id` of `event`, for
    /// `integration_id`'s URL `url`.
    pub fn matched(event: &ChatEvent, integration_id: &str, delivery_id: &str, url: &str) -> Self {
        LogRecord {
            delivery_id: delivery_id.into(),
            url: Some(redact_url_kept(url)),
            ..LogRecord::new(
                Outcome::Matched,
                &event.team_id,
                &event.channel_id,
                &event.ts,
                integration_id,
            )
        }
    }

    /// A step of a delivery job: its ids, URL and attempts made so far.
    pub fn job(outcome: Outcome, job: &DeliveryJob) -> Self {
        let e = &job.event;
        LogRecord {
            delivery_id: job.delivery_id.clone(),
            url: Some(redact_url_kept(&job.url)),
            raw_url: Some(job.url.clone()),
            attempt: Some(job.retry.attempt),
            ..LogRecord::new(outcome, &e.team_id, &e.channel_id, &e.ts, &job.integration_id)
        }
    }

    /// A step of a reply: its ids and attempts made so far.
    pub fn reply(outcome: Outcome, reply: &ReplyJob) -> Self {
        LogRecord {
            delivery_id: reply.delivery_id.clone(),
            attempt: Some(reply.retry.attempt),
            ..LogRecord::new(
                outcome,
                &reply.team_id,
                &reply.channel_id,
                &reply.in_reply_to,
                &reply.integration_id,
            )
        }
    }

    /// The same step's record with another outcome (and stage).
    pub fn with_outcome(mut self, outcome: Outcome) -> Self {
        self.stage = outcome.stage().into();
        self.outcome = outcome.name().into();
        self
    }

    /// What the HTTP attempt gave: its status (if any), class and duration.
    pub fn with_attempt(mut self, status: Option<u16>, class: &str, duration: Duration) -> Self {
        self.status = status;
        self.class = Some(class.into());
        self.duration_ms = Some(duration.as_millis() as u64);
        self
    }

    pub fn with_duration(mut self, duration: Duration) -> Self {
        self.duration_ms = Some(duration.as_millis() as u64);
        self
    }

    /// swallow's own words on what went wrong (with the URL as in `url`),
    /// cut to [`MAX_ERROR_BYTES`].
    pub fn with_error(mut self, error: &str) -> Self {
        let error = match (&self.raw_url, &self.url) {
            (Some(raw), Some(shown)) if raw != shown => error.replace(raw.as_str(), shown),
            _ => error.to_owned(),
        };
        self.error = Some(truncate(&error, MAX_ERROR_BYTES).into());
        self
    }
}

/// A handler URL without what may be a secret: credentials, query and
/// fragment (`https://hooks.example.com/bot`).
pub fn redact_url(text: &str) -> String {
    match url::Url::parse(text) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_query(None);
            u.set_fragment(None);
            u.to_string()
        }
        Err(_) => "(not a URL)".into(),
    }
}

/// How many URLs [`redact_url_kept`] keeps the answer for; past that they
/// are all forgotten and kept again as they come.
const REDACTED_KEPT: usize = 4096;

/// [`redact_url`] for the URL of every job record: parsing it costs about
/// 6,000 instructions, more than the rest of the record, and a job's URL
/// is one of the configuration's, so the answers are kept.
fn redact_url_kept(text: &str) -> String {
    static KEPT: std::sync::LazyLock<std::sync::Mutex<std::collections::HashMap<String, String>>> =
        std::sync::LazyLock::new(Default::default);
    let lock = || KEPT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(redacted) = lock().get(text) {
        return redacted.clone();
    }
    let redacted = redact_url(text);
    let mut kept = lock();
    if kept.len() >= REDACTED_KEPT {
        kept.clear();
    }
    kept.insert(text.to_owned(), redacted.clone());
    redacted
}

/// `text` cut to at most `max` bytes, on a character boundary.
fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The records of one stream message of format [`BATCH_VERSION`]; lines
/// that are not records are skipped.
pub fn parse_batch(body: &[u8]) -> Vec<LogRecord> {
    body.split(|b| *b == b'\n')
        .filter(|line| !line.is_empty())
        .filter_map(|line| serde_json::from_slice(line).ok())
        .collect()
}

/// Records collected for one stream message.
#[derive(Default)]
struct Batch {
    body: Vec<u8>,
    records: u64,
}

impl Batch {
    fn push(&mut self, record: &LogRecord) {
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
    tx: Option<mpsc::Sender<LogRecord>>,
    dropped: IntCounter,
}

impl DeliveryLog {
    /// A log that records nothing (`[log] enabled = false`).
    pub fn disabled(dropped: IntCounter) -> Self {
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
    pub config: LogConfig,
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

/// Declares the log stream with the configured retention. A stream that
/// exists with other arguments is used as it is, with a warning.
pub async fn declare_stream(connection: &Connection, stream: &str, config: &LogConfig) -> Result<(), lapin::Error> {
    let channel = connection.create_channel().await?;
    let options = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    match channel
        .queue_declare(stream.into(), options, config.stream_arguments())
        .await
    {
        Ok(_) => {
            let _ = channel.close(200, "declared".into()).await;
            Ok(())
        }
        Err(error) => {
            // The broker closed the channel; see whether the stream is there.
            stream_exists(connection, stream).await?;
            warn!(
                stream,
                %error,
                "delivery log: the stream exists with other retention arguments; keeping them (see README: changing the log's retention)"
            );
            Ok(())
        }
    }
}

/// Succeeds when `stream` exists (a passive declare on a channel of its own).
pub async fn stream_exists(connection: &Connection, stream: &str) -> Result<Channel, lapin::Error> {
    let channel = connection.create_channel().await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    channel
        .queue_declare(stream.into(), passive, FieldTable::default())
        .await?;
    Ok(channel)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> DeliveryJob {
        serde_json::from_str(
            r#"{"delivery_id":"msg_1","integration_id":"googlebot","url":"http://h/x","trigger_word":"googlebot:",
               "event":{"team_id":"T1","channel_id":"C1","user_id":"U1","ts":"1355517523.000005",
                        "text":"googlebot: a private question"},
               "created_at_ms":1,"attempt":2}"#,
        )
        .unwrap()
    }

    #[test]
    fn a_job_record_carries_ids_and_never_the_text() {
        let r = LogRecord::job(Outcome::Retried, &job())
            .with_attempt(Some(503), "5xx", Duration::from_millis(42))
            .with_error(&"e".repeat(5000));
        let json = serde_json::to_string(&r).unwrap();
        assert!(!json.contains("private question"), "{json}");
        assert_eq!(r.stage, "deliverer");
        assert_eq!(r.outcome, "retried");
        assert_eq!(r.event_ts, "1355517523.000005");
        assert_eq!(r.delivery_id, "msg_1");
        assert_eq!((r.attempt, r.status, r.duration_ms), (Some(2), Some(503), Some(42)));
        assert_eq!(r.error.as_ref().unwrap().len(), MAX_ERROR_BYTES);
        // `at`: RFC 3339, UTC, milliseconds.
        assert_eq!(r.at.len(), "2026-01-01T00:00:00.000Z".len(), "{}", r.at);
        assert!(r.at.ends_with('Z') && r.at.parse::<jiff::Timestamp>().is_ok());
        let fields: Vec<String> = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&json)
            .unwrap()
            .keys()
            .cloned()
            .collect();
        assert_eq!(fields.len(), 14, "{fields:?}");
        assert!(!json.contains("raw_url"));
    }

    #[test]
    fn urls_lose_credentials_and_queries_also_in_errors() {
        let mut j = job();
        j.url = "https://bot:s3cret@hooks.example.com/bot?key=s3cret#x".into();
        let r = LogRecord::job(Outcome::Retried, &j).with_error(
            "connect: error sending request for url (https://bot:s3cret@hooks.example.com/bot?key=s3cret#x)",
        );
        assert_eq!(r.url.as_deref(), Some("https://hooks.example.com/bot"));
        let json = serde_json::to_string(&r).unwrap();
        assert!(!json.contains("s3cret"), "{json}");
        assert!(json.contains("for url (https://hooks.example.com/bot)"), "{json}");
        assert_eq!(
            redact_url("http://127.0.0.1:8088/googlebot"),
            "http://127.0.0.1:8088/googlebot"
        );
    }

    #[test]
    fn kept_redactions_are_the_same_and_stay_bounded() {
        let url = "https://bot:s3cret@kept.example.com/bot?key=s3cret";
        let first = redact_url_kept(url);
        assert_eq!(first, "https://kept.example.com/bot");
        assert_eq!(redact_url_kept(url), first, "the kept answer");
        // Past the bound, everything is forgotten and answered afresh.
        for i in 0..REDACTED_KEPT + 10 {
            let u = format!("http://u{i}:p@h{i}.example.com/x?q");
            assert_eq!(redact_url_kept(&u), format!("http://h{i}.example.com/x"));
        }
        assert_eq!(redact_url_kept(url), first);
        assert_eq!(redact_url_kept("not a url"), "(not a URL)");
    }

    #[test]
    fn errors_are_cut_on_a_character_boundary() {
        assert_eq!(truncate("ééé", 3), "é");
        assert_eq!(truncate("abc", 10), "abc");
    }

    #[test]
    fn matched_names_its_job_and_stages_follow_outcomes() {
        let j = job();
        let r = LogRecord::matched(&j.event, "g", &j.delivery_id, "http://user:pw@h/x?q=1");
        assert_eq!(
            (r.stage.as_str(), r.integration_id.as_str(), r.delivery_id.as_str()),
            ("matcher", "g", "msg_1")
        );
        assert_eq!(r.url.as_deref(), Some("http://h/x"));
        assert_eq!(Outcome::ReplyDead.stage(), "responder");
        assert_eq!(Outcome::CircuitOpen.name(), "circuit_open");
        let r = LogRecord::job(Outcome::Delivered, &job()).with_outcome(Outcome::Dead);
        assert_eq!((r.stage.as_str(), r.outcome.as_str()), ("deliverer", "dead"));
    }

    #[test]
    fn versions_1_and_2_are_read_and_others_skipped() {
        assert!(readable(Some("1")) && readable(Some("2")) && readable(Some(BATCH_VERSION)));
        assert!(!readable(Some("3")) && !readable(None));
    }

    /// A version 2 batch (the fixture): a `matched` record per job, with its
    /// delivery id and URL, then the job's own steps.
    #[test]
    fn version_2_batches_are_read() {
        let fixture = concat!(
            r#"{"at":"2026-11-28T04:00:00.100Z","stage":"matcher","outcome":"matched","team_id":"T1","channel_id":"C1","event_ts":"1.2","integration_id":"g","delivery_id":"msg_1","url":"http://h/"}"#,
            "\n",
            r#"{"at":"2026-11-28T04:00:00.123Z","stage":"deliverer","outcome":"delivered","team_id":"T1","channel_id":"C1","event_ts":"1.2","integration_id":"g","delivery_id":"msg_1","url":"http://h/","attempt":1,"status":200,"class":"2xx","duration_ms":12}"#,
            "\n"
        );
        let records = parse_batch(fixture.as_bytes());
        assert_eq!(records.len(), 2);
        assert!(records.iter().all(|r| r.delivery_id == "msg_1"));
        assert_eq!(records[0].outcome, "matched");
        assert_eq!(records[0].url.as_deref(), Some("http://h/"));
    }

    /// A batch written by version 1 (the fixture) is read by this build;
    /// lines that are not records are skipped, unknown fields ignored.
    #[test]
    fn version_1_batches_are_read() {
        let fixture = concat!(
            r#"{"at":"2026-11-28T04:00:00.123Z","stage":"deliverer","outcome":"delivered","team_id":"T1","channel_id":"C1","event_ts":"1.2","integration_id":"g","delivery_id":"msg_1","url":"http://h/","attempt":1,"status":200,"class":"2xx","duration_ms":12}"#,
            "\n",
            "not a record\n",
            r#"{"at":"2026-11-28T04:00:00.200Z","stage":"responder","outcome":"reply_posted","team_id":"T1","channel_id":"C1","event_ts":"1.2","integration_id":"g","delivery_id":"msg_1","a_later_field":1}"#,
            "\n"
        );
        let records = parse_batch(fixture.as_bytes());
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].status, Some(200));
        assert_eq!(records[1].outcome, "reply_posted");
        let mut batch = Batch::default();
        batch.push(&records[0]);
        assert_eq!(parse_batch(&batch.body), vec![records[0].clone()]);
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86400)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("ten minutes").is_err());
        assert!(parse_duration("-5m").is_err());
        assert!(parse_duration("1 month").is_err(), "months have no fixed length");
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert_eq!(parse_bytes("500MB"), Ok(500_000_000));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("1 TB").is_err());
        assert!(parse_bytes("GiB").is_err());
    }

    #[test]
    fn retention_arguments() {
        let c = LogConfig::default();
        assert_eq!(c.segment_bytes(), (1 << 30) / 8);
        let args = c.stream_arguments();
        let get = |k: &str| args.inner().get(k).cloned();
        assert_eq!(
            get("x-max-age"),
            Some(AMQPValue::LongString(LongString::from("604800s")))
        );
        assert_eq!(get("x-max-length-bytes"), Some(AMQPValue::LongLongInt(1 << 30)));
        let small = LogConfig { max_bytes: 1000, ..c };
        assert_eq!(small.segment_bytes(), 4096);
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let dropped = IntCounter::new("d", "d").unwrap();
        let (tx, _rx) = mpsc::channel(1);
        let log = DeliveryLog {
            tx: Some(tx),
            dropped: dropped.clone(),
        };
        log.record(LogRecord::job(Outcome::Delivered, &job()));
        log.record(LogRecord::job(Outcome::Delivered, &job()));
        assert_eq!(dropped.get(), 1);
        DeliveryLog::disabled(dropped.clone()).record(LogRecord::job(Outcome::Dead, &job()));
        assert_eq!(dropped.get(), 1, "a disabled log drops nothing: it records nothing");
    }
}
