//! Every read of the process environment, in one place. The file is parsed
//! without it ([`Config::parse`](super::Config::parse) is pure, so tests build
//! configurations without touching the environment); a stage then applies
//! the overrides with [`Config::apply_env`]. Besides these, clap reads
//! `SWALLOW_CONFIG` (the `--config` argument's default) itself.
//!
//! | variable | overrides |
//! |---|---|
//! | `AMQP_URL` | `[broker] url` |
//! | `SWALLOW_PREFIX` | `[broker] prefix` |
//! | `SWALLOW_HTTP_ADDR` | the stage's `http_addr` |
//! | `SWALLOW_INGRESS_ADDR` | `[ingress] listen` (the matcher) |
//! | `SWALLOW_LOG_FORMAT` | `[log] format` |
//! | `SWALLOW_SLACK_TOKEN` | the Slack sink's token, when the file names none |
//! | `RUST_LOG` | which log lines are written (default `info`) |

use std::net::SocketAddr;

use super::{Config, ConfigError, LogFormat, Stage, check_prefix};
use crate::config::BrokerUrls;

/// A variable's value, unless it is unset or empty.
fn nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// `SWALLOW_SLACK_TOKEN`, the Slack sink's token when the file names none.
pub(super) fn slack_token() -> Option<String> {
    nonempty("SWALLOW_SLACK_TOKEN")
}

/// `RUST_LOG`: which log lines are written (default `info`).
pub(crate) fn log_filter() -> String {
    nonempty("RUST_LOG").unwrap_or_else(|| "info".into())
}

/// The format `SWALLOW_LOG_FORMAT` asks for, if it names one.
pub fn log_format() -> Result<Option<LogFormat>, ConfigError> {
    let Some(format) = nonempty("SWALLOW_LOG_FORMAT") else {
        return Ok(None);
    };
    match format.trim() {
        "text" => Ok(Some(LogFormat::Text)),
        "json" => Ok(Some(LogFormat::Json)),
        _ => Err(ConfigError::Env {
            name: "SWALLOW_LOG_FORMAT",
            message: format!("{format:?} is not one of \"text\", \"json\""),
        }),
    }
}

impl Config {
    /// Applies `AMQP_URL`, `SWALLOW_PREFIX`, `SWALLOW_LOG_FORMAT`,
    /// `SWALLOW_INGRESS_ADDR` (the matcher) and `SWALLOW_HTTP_ADDR` (for `stage`).
    pub fn apply_env(&mut self, stage: Stage) -> Result<(), ConfigError> {
        if let Some(url) = nonempty("AMQP_URL") {
            self.broker.urls = BrokerUrls::parse(&url).map_err(|message| ConfigError::Env {
                name: "AMQP_URL",
                message,
            })?;
        }
        if let Some(prefix) = nonempty("SWALLOW_PREFIX") {
            check_prefix(&prefix).map_err(|message| ConfigError::Env {
                name: "SWALLOW_PREFIX",
                message,
            })?;
            self.broker.prefix = prefix;
        }
        if let Some(format) = log_format()? {
            self.log.format = format;
        }
        if let (Stage::Matcher, Some(addr)) = (stage, nonempty("SWALLOW_INGRESS_ADDR")) {
            let invalid = |message: String| ConfigError::Env {
                name: "SWALLOW_INGRESS_ADDR",
                message,
            };
            let Some(ingress) = self.ingress.as_mut() else {
                return Err(invalid("set, but the file has no [ingress] table".into()));
            };
            ingress.listen = addr
                .parse()
                .map_err(|e| invalid(format!("{addr:?} is not a socket address: {e}")))?;
        }
        if let Some(addr) = nonempty("SWALLOW_HTTP_ADDR") {
            let parsed = addr.parse::<SocketAddr>().map_err(|e| ConfigError::Env {
                name: "SWALLOW_HTTP_ADDR",
                message: format!("{addr:?} is not a socket address: {e}"),
            })?;
            *self.http_addr_mut(stage) = parsed;
        }
        Ok(())
    }
}
