//! The stages' own log lines, on stderr: text for people (coloured only on
//! a terminal, so a file or a pipe gets no escape sequences) or, with
//! `SWALLOW_LOG_FORMAT=json` / `[log] format = "json"`, one JSON object per
//! line for a log pipeline: `time`, `level`, `stage`, `message`, `fields`.

use std::fmt;
use std::io::IsTerminal as _;
use std::sync::OnceLock;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime as _, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::config::LogFormat;

/// The format logging was started with, for [`super::cli::fail`]'s last line.
static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// Starts logging to stderr in `format`, filtered by `RUST_LOG` (default
/// `info`). The AMQP client's own log lines are off unless `RUST_LOG` names
/// `lapin`: swallow logs the broker errors that matter itself, and lapin
/// reports expected events (a shard lease held by another replica, a
/// closing channel) as errors.
pub(crate) fn init(stage: &'static str, format: LogFormat) {
    let spec = crate::config::env::log_filter();
    let spec = if spec.contains("lapin") {
        spec
    } else {
        format!("{spec},lapin=off")
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(spec))
        .with_writer(std::io::stderr);
    let started = match format {
        LogFormat::Text => builder
            .with_target(false)
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder.event_format(JsonLine { stage }).try_init(),
    };
    if started.is_ok() {
        let _ = FORMAT.set(format);
    }
}

/// The format logging was started with; before it starts (a configuration
/// that cannot be loaded), the one `SWALLOW_LOG_FORMAT` asks for, so that a
/// stage in a JSON-logging pod says why it did not start in JSON too.
pub fn format() -> LogFormat {
    FORMAT
        .get()
        .copied()
        .unwrap_or_else(|| crate::config::env::log_format().ok().flatten().unwrap_or_default())
}

/// One JSON log line, as [`JsonLine`] writes them, for a message that is
/// not a tracing event (the error that stops a stage).
pub(crate) fn json_line(stage: &str, level: &str, message: &str) -> String {
    let mut line = Map::new();
    line.insert("time".into(), now().into());
    line.insert("level".into(), level.into());
    line.insert("stage".into(), stage.into());
    line.insert("message".into(), message.into());
    line.insert("fields".into(), Value::Object(Map::new()));
    Value::Object(line).to_string()
}

fn now() -> String {
    let mut time = String::new();
    let _ = SystemTime.format_time(&mut Writer::new(&mut time));
    time
}

/// Formats each event as one JSON object.
struct JsonLine {
    stage: &'static str,
}

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, _ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let mut line = Map::new();
        line.insert("time".into(), now().into());
        line.insert("level".into(), event.metadata().level().as_str().into());
        line.insert("stage".into(), self.stage.into());
        line.insert("message".into(), fields.message.unwrap_or_default().into());
        line.insert("fields".into(), Value::Object(fields.other));
        writeln!(writer, "{}", Value::Object(line))
    }
}

/// An event's fields: `message` apart, the others as JSON values.
#[derive(Default)]
struct Fields {
    message: Option<String>,
    other: Map<String, Value>,
}

impl Fields {
    fn put(&mut self, field: &Field, value: Value) {
        if field.name() == "message" {
            self.message = Some(match value {
                Value::String(s) => s,
                other => other.to_string(),
            });
        } else {
            self.other.insert(field.name().to_owned(), value);
        }
    }
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, format!("{value:?}").into());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, value.to_string().into());
    }
}
