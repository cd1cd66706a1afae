//! `[log]`, the stages' own log lines on stderr, and `[delivery_log]`, the
//! delivery log stream's switch and retention (see `crate::delivery_log`).
//! Files written before the two were separate keep the stream's keys under
//! `[log]`; they are still read, with a warning.

use std::time::Duration;

use serde::Deserialize;

use super::errors::{FieldError, at};
use super::units::{RawBytes, parse_duration};

/// `[log]`. `enabled`, `max_age` and `max_bytes` belong to
/// `[delivery_log]` and are read here only from older files.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    format: Option<LogFormat>,
    enabled: Option<bool>,
    max_age: Option<String>,
    max_bytes: Option<RawBytes>,
}

/// `[delivery_log]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDeliveryLog {
    enabled: Option<bool>,
    max_age: Option<String>,
    max_bytes: Option<RawBytes>,
}

/// The `[log]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogConfig {
    /// `SWALLOW_LOG_FORMAT` overrides it.
    pub format: LogFormat,
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// For people: one line per event, coloured only on a terminal.
    #[default]
    Text,
    /// For log pipelines: one JSON object per line.
    Json,
}

/// The `[delivery_log]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryLogConfig {
    /// Whether the stages append to the delivery log stream `<prefix>.log`.
    pub enabled: bool,
    /// The stream's retention: records older than this go...
    pub max_age: Duration,
    /// ...and so do the oldest when the stream is larger than this.
    pub max_bytes: u64,
}

impl Default for DeliveryLogConfig {
    fn default() -> Self {
        DeliveryLogConfig {
            enabled: true,
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_bytes: 1 << 30,
        }
    }
}

/// What the two tables give, and a warning when `[log]` still holds the
/// delivery log's keys.
pub(super) fn validate(
    log: RawLog,
    delivery_log: Option<RawDeliveryLog>,
) -> Result<(LogConfig, DeliveryLogConfig, Option<String>), FieldError> {
    let old = RawDeliveryLog {
        enabled: log.enabled,
        max_age: log.max_age,
        max_bytes: log.max_bytes,
    };
    let old_given = old.enabled.is_some() || old.max_age.is_some() || old.max_bytes.is_some();
    let (raw, table, warning) = match delivery_log {
        Some(_) if old_given => {
            return Err(at("log")(
                "enabled, max_age and max_bytes belong to [delivery_log]; give them there only".into(),
            ));
        }
        Some(new) => (new, "delivery_log", None),
        None if old_given => (
            old,
            "log",
            Some("[log] enabled / max_age / max_bytes are read from [log] for now; move them to [delivery_log]".into()),
        ),
        None => (old, "delivery_log", None),
    };
    let format = LogConfig {
        format: log.format.unwrap_or_default(),
    };
    Ok((format, raw.validate(table)?, warning))
}

impl RawDeliveryLog {
    fn validate(self, table: &str) -> Result<DeliveryLogConfig, FieldError> {
        let defaults = DeliveryLogConfig::default();
        let field = |name: &str| format!("{table}.{name}");
        let max_age = match self.max_age {
            None => defaults.max_age,
            Some(text) => parse_duration(&text).map_err(|m| (field("max_age"), m))?,
        };
        let max_bytes = match self.max_bytes {
            None => defaults.max_bytes,
            Some(raw) => raw.bytes().map_err(|m| (field("max_bytes"), m))?,
        };
        if max_age < Duration::from_secs(1) {
            return Err((field("max_age"), "must be at least 1s".into()));
        }
        if max_bytes == 0 {
            return Err((field("max_bytes"), "must be more than 0".into()));
        }
        Ok(DeliveryLogConfig {
            enabled: self.enabled.unwrap_or(defaults.enabled),
            max_age,
            max_bytes,
        })
    }
}
