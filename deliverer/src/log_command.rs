//! `swallow-deliverer log`: reads the delivery log (the stream
//! `<prefix>.log`, see `swallow_shared::delivery_log`) from a point in time
//! and prints the records that pass the filters, oldest first.
//!
//! The stream is read over AMQP 0.9.1 from `x-stream-offset` = the start
//! time (a stream attaches at the first chunk at or after it; records
//! before the start in that chunk are filtered out here). To know where
//! "now" ends without `--follow`, the command first appends an empty marker
//! message of its own to the stream (no records) and reads until it meets
//! it: everything committed before the command started comes before the
//! marker, whatever the load, so it never stops early and never waits on a
//! timeout. Stages flush records up to ~100 ms after their step, and each
//! stage flushes on its own, so the stream is only roughly in time order:
//! records are printed in `at` order once the stream has reached
//! [`STREAM_DISORDER`] past them (so memory holds seconds of records, not
//! days), and with `--follow` each new one is held [`FOLLOW_HOLD`].

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use futures_util::StreamExt;
use jiff::Timestamp;
use lapin::BasicProperties;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use tokio_util::sync::CancellationToken;

use swallow_shared::Config;
use swallow_shared::broker::{self, ConfirmedPublisher, PublishError};
use swallow_shared::delivery_log::{self, LogRecord, VERSION_HEADER};

/// How long `--follow` holds a record before printing it, so that records
/// flushed a little later by another stage are printed in time order.
pub const FOLLOW_HOLD: Duration = Duration::from_millis(300);
/// How far the stream's order may stray from the records' `at`: a batch
/// is flushed up to 100 ms after its first record and waits for its confirm.
pub const STREAM_DISORDER: Duration = Duration::from_secs(2);
/// The header of the command's own end-of-reading marker.
const MARKER_HEADER: &str = "x-swallow-log-marker";
/// How much earlier than the start the stream is attached (seconds).
const ATTACH_EARLY_S: i64 = 60;
/// The default start: this long ago.
pub const DEFAULT_SINCE: &str = "10m";

/// A `--since` or `--from` the command cannot use.
#[derive(Debug, thiserror::Error)]
#[error("{flag} {value:?}: {message}")]
pub struct BadArgument {
    pub flag: &'static str,
    pub value: String,
    pub message: String,
}

/// The start time from `--since D` or `--from T` (default: 10 minutes ago).
pub fn start_time(since: Option<&str>, from: Option<&str>, now: Timestamp) -> Result<Timestamp, BadArgument> {
    if let Some(from) = from {
        return from.trim().parse::<Timestamp>().map_err(|_| BadArgument {
            flag: "--from",
            value: from.into(),
            message: "not an RFC 3339 time such as 2026-11-28T04:00:00Z".into(),
        });
    }
    let text = since.unwrap_or(DEFAULT_SINCE);
    let bad = |message: String| BadArgument {
        flag: "--since",
        value: text.into(),
        message,
    };
    let d = swallow_shared::config::parse_duration(text)
        .map_err(|_| bad("not a duration such as 90s, 10m, 2h or 7d".into()))?;
    let d = jiff::SignedDuration::try_from(d).map_err(|e| bad(e.to_string()))?;
    now.checked_sub(d).map_err(|_| bad("too far back".into()))
}

/// Which records to print.
#[derive(Debug, Clone, Default)]
pub struct Filters {
    pub integration: Option<String>,
    pub delivery: Option<String>,
    pub event: Option<String>,
    pub channel: Option<String>,
}

impl Filters {
    pub fn pass(&self, r: &LogRecord) -> bool {
        let eq = |want: &Option<String>, got: &str| want.as_deref().is_none_or(|w| w == got);
        // A version 1 `matched` record lists every integration the event
        // matched; version 2 writes one per job.
        let integration = self
            .integration
            .as_deref()
            .is_none_or(|w| r.integration_id == w || r.integration_id.split(',').any(|i| i == w));
        integration
            && eq(&self.delivery, &r.delivery_id)
            && eq(&self.event, &r.event_ts)
            && eq(&self.channel, &r.channel_id)
    }
}

/// What to read and how to print it.
#[derive(Debug, Clone)]
pub struct LogQuery {
    pub from: Timestamp,
    pub filters: Filters,
    pub follow: bool,
    pub json: bool,
}

/// The log could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LogCommandError {
    #[error("reading the delivery log {stream}: {source}")]
    Broker { stream: String, source: lapin::Error },
    #[error("reading the delivery log {stream}: {source}")]
    Connect {
        stream: String,
        source: swallow_shared::broker::ConnectError,
    },
    #[error("the delivery log {stream} does not exist (no stage has run with [log] enabled = true): {source}")]
    NoStream { stream: String, source: lapin::Error },
    #[error("marking the end of the delivery log {stream}: {source}")]
    Marker { stream: String, source: PublishError },
    #[error("the broker ended the reading of {0}")]
    Ended(String),
    #[error("printing: {0}")]
    Print(#[from] std::io::Error),
}

/// Records read, held until they may be printed in time order: by `at`,
/// then (within one millisecond) in pipeline order of their stages, then in
/// reading order.
#[derive(Default)]
pub struct InOrder {
    held: BTreeMap<(Timestamp, u8, u64), LogRecord>,
    seq: u64,
}

impl InOrder {
    pub fn push(&mut self, at: Timestamp, record: LogRecord) {
        self.seq += 1;
        let stage = match record.stage.as_str() {
            "matcher" => 0,
            "deliverer" => 1,
            _ => 2,
        };
        self.held.insert((at, stage, self.seq), record);
    }

    /// The records at or before `until`, oldest first.
    pub fn take_until(&mut self, until: Timestamp) -> Vec<LogRecord> {
        let later = self.held.split_off(&(until, u8::MAX, u64::MAX));
        std::mem::replace(&mut self.held, later).into_values().collect()
    }

    pub fn take_all(&mut self) -> Vec<LogRecord> {
        std::mem::take(&mut self.held).into_values().collect()
    }
}

/// Connects, leaves a marker at the stream's end unless following (the
/// read stops there), and attaches a consumer a little before `query.from`.
async fn attach(
    config: &Config,
    query: &LogQuery,
    stream: &str,
) -> Result<(lapin::Connection, lapin::Consumer, Option<String>), LogCommandError> {
    let stream = stream.to_owned();
    let broker_err = |source| LogCommandError::Broker {
        stream: stream.clone(),
        source,
    };
    let connection = broker::connect(&config.broker, "swallow-deliverer log")
        .await
        .map_err(|source| LogCommandError::Connect {
            stream: stream.clone(),
            source,
        })?;
    let channel = delivery_log::stream_exists(&connection, &stream)
        .await
        .map_err(|source| LogCommandError::NoStream {
            stream: stream.clone(),
            source,
        })?;
    let marker = if query.follow {
        None
    } else {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let publisher = ConfirmedPublisher::open(&connection).await.map_err(broker_err)?;
        let mut headers = FieldTable::default();
        broker::set_header(&mut headers, MARKER_HEADER, id.as_str());
        publisher
            .publish("", &stream, b"", BasicProperties::default().with_headers(headers))
            .await
            .map_err(|source| LogCommandError::Marker {
                stream: stream.clone(),
                source,
            })?;
        Some(id)
    };
    channel
        .basic_qos(1000, BasicQosOptions::default())
        .await
        .map_err(broker_err)?;
    // A minute early (at most now): the broker's clock may be behind ours,
    // and the marker must not be skipped. Earlier records are filtered out.
    let attach = query.from.min(Timestamp::now()).as_second() - ATTACH_EARLY_S;
    let mut args = FieldTable::default();
    args.insert("x-stream-offset".into(), AMQPValue::Timestamp(attach.max(0) as u64));
    let consumer = channel
        .basic_consume(
            stream.as_str().into(),
            "swallow-deliverer-log".into(),
            BasicConsumeOptions::default(),
            args,
        )
        .await
        .map_err(broker_err)?;
    Ok((connection, consumer, marker))
}

/// Reads and prints; returns how many records were printed. With `follow`,
/// reads until `stop`.
pub async fn run(
    config: &Config,
    query: &LogQuery,
    out: &mut impl Write,
    stop: CancellationToken,
) -> Result<usize, LogCommandError> {
    let stream = config.broker.topology().log_stream();
    let broker_err = |source| LogCommandError::Broker {
        stream: stream.clone(),
        source,
    };
    let (connection, mut consumer, marker) = attach(config, query, &stream).await?;
    let mut printer = Printer::new(query.json);
    let mut order = InOrder::default();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let disorder = jiff::SignedDuration::try_from(STREAM_DISORDER).expect("small");
    let mut latest: Option<Timestamp> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick(), if query.follow => {
                let until = Timestamp::now() - jiff::SignedDuration::try_from(FOLLOW_HOLD).expect("small");
                printer.print(out, order.take_until(until))?;
            }
            next = consumer.next() => {
                let delivery = match next {
                    Some(Ok(d)) => d,
                    Some(Err(source)) => return Err(broker_err(source)),
                    None => return Err(LogCommandError::Ended(stream)),
                };
                delivery.ack(BasicAckOptions::default()).await.map_err(broker_err)?;
                if marker.is_some() && broker::header_str(&delivery.properties, MARKER_HEADER) == marker {
                    break;
                }
                if !delivery_log::readable(broker::header_str(&delivery.properties, VERSION_HEADER).as_deref()) {
                    continue; // another reader's marker, or a format this build does not know
                }
                for record in delivery_log::parse_batch(&delivery.data) {
                    let Ok(at) = record.at.parse::<Timestamp>() else { continue };
                    latest = latest.max(Some(at));
                    if at >= query.from && query.filters.pass(&record) {
                        order.push(at, record);
                    }
                }
                if let Some(latest) = latest {
                    printer.print(out, order.take_until(latest - disorder))?;
                }
            }
        }
    }
    printer.print(out, order.take_all())?;
    let _ = connection.close(200, "log read".into()).await;
    Ok(printer.printed)
}

/// Prints records as a table (with a header before the first) or as JSON lines.
struct Printer {
    json: bool,
    printed: usize,
}

impl Printer {
    fn new(json: bool) -> Self {
        Printer { json, printed: 0 }
    }

    fn print(&mut self, out: &mut impl Write, records: Vec<LogRecord>) -> std::io::Result<()> {
        for r in records {
            if self.json {
                serde_json::to_writer(&mut *out, &r)?;
                writeln!(out)?;
            } else {
                if self.printed == 0 {
                    writeln!(out, "{}", table_header())?;
                }
                writeln!(out, "{}", table_row(&r))?;
            }
            self.printed += 1;
        }
        out.flush()
    }
}

const ERROR_WIDTH: usize = 40;

fn table_header() -> String {
    format!(
        "{:<24}  {:<9}  {:<16}  {:<12}  {:>6}  {:>8}  {:<ERROR_WIDTH$}  {}",
        "TIME", "STAGE", "INTEGRATION", "OUTCOME", "STATUS", "DURATION", "ERROR", "DELIVERY"
    )
}

/// One record as a table row: time, stage, integration, outcome, status,
/// duration, error (cut to fit), delivery id.
pub fn table_row(r: &LogRecord) -> String {
    let status = r.status.map(|s| s.to_string()).unwrap_or_else(|| "-".into());
    let duration = r.duration_ms.map(|d| format!("{d}ms")).unwrap_or_else(|| "-".into());
    let error = r.error.as_deref().unwrap_or("-").replace(['\n', '\r'], " ");
    let error = if error.chars().count() > ERROR_WIDTH {
        let cut: String = error.chars().take(ERROR_WIDTH - 1).collect();
        format!("{cut}…")
    } else {
        error
    };
    let delivery = if r.delivery_id.is_empty() { "-" } else { &r.delivery_id };
    format!(
        "{:<24}  {:<9}  {:<16}  {:<12}  {:>6}  {:>8}  {:<ERROR_WIDTH$}  {}",
        r.at, r.stage, r.integration_id, r.outcome, status, duration, error, delivery
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(at: &str, outcome: &str, integration: &str, delivery: &str) -> LogRecord {
        serde_json::from_value(serde_json::json!({
            "at": at, "stage": "deliverer", "outcome": outcome, "team_id": "T1", "channel_id": "C1",
            "event_ts": "1.2", "integration_id": integration, "delivery_id": delivery,
        }))
        .unwrap()
    }

    #[test]
    fn start_times() {
        let now: Timestamp = "2026-11-28T04:00:00Z".parse().unwrap();
        assert_eq!(
            start_time(None, None, now).unwrap(),
            "2026-11-28T03:50:00Z".parse::<Timestamp>().unwrap()
        );
        assert_eq!(
            start_time(Some("2h"), None, now).unwrap(),
            "2026-11-28T02:00:00Z".parse::<Timestamp>().unwrap()
        );
        assert_eq!(
            start_time(None, Some("2026-11-28T05:00:00+02:00"), now).unwrap(),
            "2026-11-28T03:00:00Z".parse::<Timestamp>().unwrap()
        );
        let e = start_time(Some("10 parsecs"), None, now).unwrap_err().to_string();
        assert!(e.starts_with("--since \"10 parsecs\": "), "{e}");
        let e = start_time(None, Some("yesterday"), now).unwrap_err().to_string();
        assert!(e.starts_with("--from \"yesterday\": "), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn filters() {
        let matched = record("2026-11-28T04:00:00.000Z", "matched", "a,b", "");
        let delivered = record("2026-11-28T04:00:00.010Z", "delivered", "b", "msg_1");
        let f = |integration: Option<&str>, delivery: Option<&str>| Filters {
            integration: integration.map(Into::into),
            delivery: delivery.map(Into::into),
            ..Default::default()
        };
        assert!(f(Some("a"), None).pass(&matched));
        assert!(!f(Some("a"), None).pass(&delivered));
        assert!(f(Some("b"), None).pass(&delivered));
        assert!(f(None, Some("msg_1")).pass(&delivered));
        assert!(
            !f(None, Some("msg_1")).pass(&matched),
            "a version 1 matched record has no delivery id"
        );
        let matched_v2 = record("2026-11-28T04:00:00.000Z", "matched", "b", "msg_1");
        assert!(
            f(None, Some("msg_1")).pass(&matched_v2),
            "version 2: the match is in the delivery's story"
        );
        assert!(f(Some("b"), Some("msg_1")).pass(&matched_v2));
        assert!(!f(Some("a"), None).pass(&matched_v2));
        let event = Filters {
            event: Some("1.3".into()),
            ..Default::default()
        };
        assert!(!event.pass(&delivered));
    }

    #[test]
    fn records_come_out_oldest_first() {
        let mut order = InOrder::default();
        let t = |s: &str| s.parse::<Timestamp>().unwrap();
        for (at, outcome) in [(".200", "b"), (".100", "a"), (".200", "c"), (".300", "d")] {
            let at = format!("2026-11-28T04:00:00{at}Z");
            order.push(t(&at), record(&at, outcome, "", ""));
        }
        // Within one millisecond, the matcher's record comes before the deliverer's.
        let mut matched = record("2026-11-28T04:00:00.200Z", "matched", "", "");
        matched.stage = "matcher".into();
        order.push(t("2026-11-28T04:00:00.200Z"), matched);
        let first: Vec<String> = order
            .take_until(t("2026-11-28T04:00:00.200Z"))
            .into_iter()
            .map(|r| r.outcome)
            .collect();
        assert_eq!(
            first,
            ["a", "matched", "b", "c"],
            "equal times keep their reading order"
        );
        let rest: Vec<String> = order.take_all().into_iter().map(|r| r.outcome).collect();
        assert_eq!(rest, ["d"]);
    }

    #[test]
    fn table_rows_stay_on_one_line() {
        let mut r = record("2026-11-28T04:00:00.010Z", "retried", "googlebot", "msg_1");
        r.status = Some(503);
        r.duration_ms = Some(12);
        r.error = Some(format!("line one\nline two {}", "x".repeat(100)));
        let row = table_row(&r);
        assert!(!row.contains('\n'));
        assert!(
            row.contains("503") && row.contains("12ms") && row.ends_with("msg_1"),
            "{row}"
        );
        assert_eq!(table_header().split_whitespace().count(), 8);
    }
}
