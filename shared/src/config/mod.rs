//! The one configuration file all three stages read (docs/contract.md §1–§2).
//!
//! The file is parsed into strict raw structs (unknown fields are errors, so a
//! typo is never a silent default), then validated table by table into
//! [`Config`] and [`Integration`]s: one file per table here, each with its
//! raw struct and its `validate`. Every error names the file, the
//! integration and the field ([`errors`]). The environment is read in one
//! place, [`env`], and applied separately ([`Config::apply_env`]), so tests
//! can build a configuration without touching the process environment.

mod broker;
pub mod env;
mod errors;
mod ingress;
mod integrations;
mod log;
mod rate;
mod secrets;
mod stages;
mod units;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

pub(crate) use broker::amqp_uri;
pub use broker::{BrokerConfig, BrokerUrls};
pub use errors::ConfigError;
use errors::{FieldError, at, from_value, syntax_error};
pub use ingress::{
    DEFAULT_INGRESS_ADDR, DEFAULT_SENDER_LOCALPART, DEFAULT_SLACK_API_BASE, IngressConfig, MatrixIngress,
    MatrixSecrets, SlackIngress, SlackSecrets,
};
pub use integrations::{ChannelRef, ChannelType, ContentType, Integration, Integrations, OnFailure, TriggerMatch};
pub use log::{DeliveryLogConfig, LogConfig, LogFormat};
pub use rate::{MIN_PER_SECOND, OnLimit, RateLimit};
pub use stages::{DEFAULT_CIRCUIT_FAILURES, DelivererConfig, MatcherConfig, ResponderConfig, Sink};
pub use units::{parse_bytes, parse_duration};

/// The default broker URL when neither the file nor `AMQP_URL` gives one.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The default name prefix of every exchange and queue.
pub const DEFAULT_PREFIX: &str = "swallow";
/// The shortest `reload_interval_ms`: polling faster only burns CPU.
const MIN_RELOAD_INTERVAL_MS: u64 = 50;

/// Which stage is reading the configuration; picks the listener address that
/// `SWALLOW_HTTP_ADDR` overrides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Matcher,
    Deliverer,
    Responder,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Matcher => "matcher",
            Stage::Deliverer => "deliverer",
            Stage::Responder => "responder",
        }
    }
}

/// The file's tables but `[[integrations]]`, which are read one by one.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    reload_interval_ms: Option<u64>,
    #[serde(default)]
    broker: broker::RawBroker,
    #[serde(default)]
    matcher: stages::RawMatcher,
    #[serde(default)]
    deliverer: stages::RawDeliverer,
    #[serde(default)]
    responder: stages::RawResponder,
    #[serde(default)]
    log: log::RawLog,
    delivery_log: Option<log::RawDeliveryLog>,
    ingress: Option<ingress::RawIngress>,
}

/// Everything a stage needs to start, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the file came from (`None` when built in memory by a test).
    pub path: Option<PathBuf>,
    /// How often the file is checked for changes (top-level `reload_interval_ms`).
    pub reload_interval: Duration,
    pub broker: BrokerConfig,
    pub matcher: MatcherConfig,
    pub deliverer: DelivererConfig,
    pub responder: ResponderConfig,
    /// `[log]`: the stages' own log lines.
    pub log: LogConfig,
    /// `[delivery_log]`: the delivery log's switch and retention.
    pub delivery_log: DeliveryLogConfig,
    /// `[ingress]`: the matcher's listener for chat platforms; off when absent.
    pub ingress: Option<IngressConfig>,
    pub integrations: Arc<Integrations>,
    /// The secret files it read (`token_file`, `signing_secret_file`,
    /// `slack_token_file`) and a hash of each one's content, so that a reload
    /// check can tell whether any changed without parsing the file again.
    pub secret_files: Vec<(PathBuf, u64)>,
    /// A hash of the text this was parsed from, so that the reload watcher
    /// does not parse the same file again at its first check.
    pub text_hash: u64,
    /// What is accepted but should change (a deprecated key), for the stage
    /// to log once it has started logging.
    pub warnings: Vec<String>,
}

/// A hash of a file's content, to see whether it changed.
pub(crate) fn content_hash(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}

impl Config {
    /// Reads and validates the file at `path`. Environment variables are not
    /// applied: call [`Config::apply_env`] for that.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, Some(path))
    }

    /// Parses and validates configuration text; `path` is only used in errors.
    pub fn parse(text: &str, path: Option<&Path>) -> Result<Config, ConfigError> {
        let shown = path.map(Path::to_owned).unwrap_or_else(|| PathBuf::from("<memory>"));
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError::Parse {
            path: shown.clone(),
            message: syntax_error(text, &e),
        })?;
        // The integrations are deserialized one by one, so an error in one
        // names it (by id, or by position when the id is missing).
        let raw_integrations = table.remove("integrations");
        let raw: RawFile = from_value(toml::Value::Table(table)).map_err(|e| ConfigError::field(&shown, e))?;
        let raw_integrations = integrations::raw_integrations_of(raw_integrations, &shown)?;
        // Secret files named by a relative path are found next to the file.
        let files = secrets::SecretFiles::new(path.and_then(Path::parent).map(Path::to_owned).unwrap_or_default());
        let mut config = raw.validate(&files).map_err(|e| ConfigError::field(&shown, e))?;
        let integrations =
            integrations::validate_integrations(raw_integrations, &shown, &files, config.deliverer.circuit_failures)?;
        config.path = path.map(Path::to_owned);
        config.integrations = Arc::new(integrations);
        config.secret_files = files.into_read();
        config.text_hash = content_hash(text.as_bytes());
        Ok(config)
    }

    pub(crate) fn http_addr_mut(&mut self, stage: Stage) -> &mut SocketAddr {
        match stage {
            Stage::Matcher => &mut self.matcher.http_addr,
            Stage::Deliverer => &mut self.deliverer.http_addr,
            Stage::Responder => &mut self.responder.http_addr,
        }
    }
}

impl RawFile {
    /// Every table but the integrations, which the caller adds.
    fn validate(self, files: &secrets::SecretFiles) -> Result<Config, FieldError> {
        let reload_interval_ms = self.reload_interval_ms.unwrap_or(2000);
        if reload_interval_ms < MIN_RELOAD_INTERVAL_MS {
            return Err(at("reload_interval_ms")(format!(
                "must be at least {MIN_RELOAD_INTERVAL_MS}, not {reload_interval_ms}"
            )));
        }
        let (log, delivery_log, warning) = log::validate(self.log, self.delivery_log)?;
        Ok(Config {
            path: None,
            reload_interval: Duration::from_millis(reload_interval_ms),
            broker: self.broker.validate()?,
            matcher: self.matcher.validate()?,
            deliverer: self.deliverer.validate()?,
            responder: self.responder.validate(files)?,
            log,
            delivery_log,
            ingress: self.ingress.map(|i| ingress::validate(i, files)).transpose()?,
            integrations: Default::default(),
            secret_files: Vec::new(),
            text_hash: 0,
            warnings: warning.into_iter().collect(),
        })
    }
}

/// A name prefix must be usable in every queue name.
fn check_prefix(prefix: &str) -> Result<(), String> {
    let ok = !prefix.is_empty()
        && prefix.len() <= 100
        && prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{prefix:?} must be 1–100 characters of letters, digits, '-', '_' or '.'"
        ))
    }
}

#[cfg(test)]
mod tests;
