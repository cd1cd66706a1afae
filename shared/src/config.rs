//! The one configuration file all three stages read (docs/contract.md §1–§2).
//!
//! The file is parsed into strict raw structs (unknown fields are errors, so a
//! typo is never a silent default), then validated into [`Config`] and
//! [`Integration`]s. Every error names the file, the integration and the field,
//! because the person reading it is an operator looking at a crash-looping pod.
//! Environment variables (`AMQP_URL`, `SWALLOW_PREFIX`, `SWALLOW_HTTP_ADDR`)
//! are applied by [`Config::apply_env`], separately, so tests can build a
//! config without touching the process environment.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;
use url::Url;

use crate::delivery_log;
use crate::topology::{DEFAULT_SHARDS, Topology};

/// The default broker URL when neither the file nor `AMQP_URL` gives one.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The default name prefix of every exchange and queue.
pub const DEFAULT_PREFIX: &str = "swallow";

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

/// A configuration file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading configuration {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("loading configuration from {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("loading integrations from {path}: integration {integration}: {field}: {message}")]
    Integration {
        path: PathBuf,
        /// `"googlebot"` (quoted), or `#2` when the id is missing.
        integration: String,
        field: String,
        message: String,
    },
    #[error("loading configuration from {path}: {field}: {message}")]
    Field {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error("environment variable {name}: {message}")]
    Env { name: &'static str, message: String },
}

// ---------------------------------------------------------------------------
// Raw file format
// ---------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    reload_interval_ms: Option<u64>,
    #[serde(default)]
    broker: RawBroker,
    #[serde(default)]
    matcher: RawMatcher,
    #[serde(default)]
    deliverer: RawDeliverer,
    #[serde(default)]
    responder: RawResponder,
    #[serde(default)]
    log: RawLog,
}

/// `[log]`: how the stages write their own log lines, and the delivery
/// log stream (see `delivery_log`): its switch and retention.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<LogFormat>,
    enabled: Option<bool>,
    max_age: Option<String>,
    max_bytes: Option<RawBytes>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBroker {
    url: Option<String>,
    prefix: Option<String>,
    prefetch: Option<u16>,
    shards: Option<u32>,
    delivery_limit: Option<u32>,
    heartbeat_s: Option<u16>,
    ca_file: Option<PathBuf>,
    client_cert_file: Option<PathBuf>,
    client_key_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatcher {
    http_addr: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeliverer {
    http_addr: Option<String>,
    concurrency: Option<usize>,
    per_integration_concurrency: Option<usize>,
    allow_networks: Option<Vec<String>>,
    circuit_failures: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResponder {
    http_addr: Option<String>,
    sink: Option<SinkKind>,
    slack_api_base: Option<String>,
    slack_token: Option<String>,
    slack_token_file: Option<PathBuf>,
    webhook_url: Option<String>,
    per_channel_per_second: Option<f64>,
    per_channel_burst: Option<u32>,
    max_attempts: Option<u32>,
    max_age_s: Option<u64>,
    timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIntegration {
    id: Option<String>,
    team_id: Option<String>,
    channel: Option<String>,
    trigger_words: Option<Vec<String>>,
    urls: Option<Vec<String>>,
    token: Option<String>,
    bot_name: Option<String>,
    icon_url: Option<String>,
    icon_emoji: Option<String>,
    content_type: Option<ContentType>,
    trigger_match: Option<TriggerMatch>,
    case_sensitive: Option<bool>,
    rate_limit: Option<RawRateLimit>,
    timeout_ms: Option<u64>,
    max_attempts: Option<u32>,
    max_age_s: Option<u64>,
    signing_secret: Option<OneOrMany>,
    token_file: Option<PathBuf>,
    signing_secret_file: Option<PathBuf>,
    channel_types: Option<Vec<ChannelType>>,
    headers: Option<BTreeMap<String, String>>,
    circuit_failures: Option<u32>,
    on_failure: Option<OnFailure>,
    failure_notice_interval_s: Option<u64>,
}

/// `signing_secret = "whsec_…"` or `signing_secret = ["whsec_…", "whsec_…"]`.
#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a \"whsec_…\" string or a list of them")]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// A size: a number of bytes, or text such as `"1GiB"`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawBytes {
    Number(u64),
    Text(String),
}

impl RawLog {
    fn validate(self) -> Result<LogConfig, (&'static str, String)> {
        let defaults = LogConfig::default();
        let max_age = match self.max_age {
            None => defaults.max_age,
            Some(text) => delivery_log::parse_duration(&text).map_err(|m| ("log.max_age", m))?,
        };
        let max_bytes = match self.max_bytes {
            None => defaults.max_bytes,
            Some(RawBytes::Number(n)) => n,
            Some(RawBytes::Text(text)) => delivery_log::parse_bytes(&text).map_err(|m| ("log.max_bytes", m))?,
        };
        if max_age < Duration::from_secs(1) {
            return Err(("log.max_age", "must be at least 1s".into()));
        }
        if max_bytes == 0 {
            return Err(("log.max_bytes", "must be more than 0".into()));
        }
        Ok(LogConfig {
            format: self.format.unwrap_or_default(),
            enabled: self.enabled.unwrap_or(defaults.enabled),
            max_age,
            max_bytes,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    per_second: Option<f64>,
    burst: Option<u32>,
    on_limit: Option<OnLimit>,
}

// ---------------------------------------------------------------------------
// Validated configuration
// ---------------------------------------------------------------------------

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
    /// `[log]`: the stages' log lines, and the delivery log's switch and
    /// retention.
    pub log: LogConfig,
    pub integrations: Arc<Integrations>,
    /// The secret files it read (`token_file`, `signing_secret_file`,
    /// `slack_token_file`) and a hash of each one's content, so that a reload
    /// check can tell whether any changed without parsing the file again.
    pub secret_files: Vec<(PathBuf, u64)>,
    /// A hash of the text this was parsed from, so that the reload watcher
    /// does not parse the same file again at its first check.
    pub text_hash: u64,
}

/// A hash of a file's content, to see whether it changed.
pub fn content_hash(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}

/// The `[log]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// `SWALLOW_LOG_FORMAT` overrides it.
    pub format: LogFormat,
    /// Whether the stages append to the delivery log stream `<prefix>.log`.
    pub enabled: bool,
    /// The stream's retention: records older than this go...
    pub max_age: Duration,
    /// ...and so do the oldest when the stream is larger than this.
    pub max_bytes: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            enabled: true,
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_bytes: 1 << 30,
        }
    }
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

#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// One address, or a cluster's several: tried in turn from a random one.
    pub urls: crate::broker::BrokerUrls,
    /// AMQP heartbeat: a node silent for two of them is given up (0: the broker's).
    pub heartbeat_s: u16,
    /// For `amqps://`: the CA of the broker's certificate (else the system's roots).
    pub ca_file: Option<PathBuf>,
    /// For mutual TLS: the client's certificate and key (PEM), both or neither.
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    pub prefix: String,
    /// Unacknowledged deliveries a consumer may hold (basic.qos).
    pub prefetch: u16,
    /// Delivery shards: the unit of work one deliverer replica owns at a time.
    pub shards: u32,
    /// Deliveries of one message from a work queue before the broker sets
    /// it aside in the stage's dead (or invalid) queue (`x-delivery-limit`).
    pub delivery_limit: u32,
}

impl BrokerConfig {
    /// The exchanges and queues this configuration describes.
    pub fn topology(&self) -> Topology {
        Topology::with_shards(&self.prefix, self.shards).with_delivery_limit(self.delivery_limit)
    }
}

#[derive(Debug, Clone)]
pub struct MatcherConfig {
    pub http_addr: SocketAddr,
}

#[derive(Debug, Clone)]
pub struct DelivererConfig {
    pub http_addr: SocketAddr,
    pub concurrency: usize,
    pub per_integration_concurrency: usize,
    pub allow_networks: Vec<ipnet::IpNet>,
    /// The default of integrations' `circuit_failures`.
    pub circuit_failures: u32,
}

/// Where the responder posts replies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    Amqp,
    Slack { api_base: Url, token: String },
    Webhook { url: Url },
}

#[derive(Debug, Clone)]
pub struct ResponderConfig {
    pub http_addr: SocketAddr,
    pub sink: Sink,
    pub per_channel: RateLimit,
    pub max_attempts: u32,
    pub max_age: Duration,
    pub timeout: Duration,
}

/// The validated `[[integrations]]`, in file order.
#[derive(Debug, Default, PartialEq)]
pub struct Integrations {
    pub list: Vec<Arc<Integration>>,
}

impl Integrations {
    pub fn get(&self, id: &str) -> Option<&Arc<Integration>> {
        self.list.iter().find(|i| i.id == id)
    }
}

/// A kind of conversation an event can come from (its `channel_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelType {
    Public,
    Private,
    /// A direct message.
    Im,
    /// A group direct message.
    Mpim,
}

impl ChannelType {
    /// The kind of an event's `channel_type`; absent or empty is public,
    /// anything unknown is none of them.
    pub fn of_event(channel_type: Option<&str>) -> Option<ChannelType> {
        match channel_type.unwrap_or("") {
            "" | "public" => Some(ChannelType::Public),
            "private" => Some(ChannelType::Private),
            "im" => Some(ChannelType::Im),
            "mpim" => Some(ChannelType::Mpim),
            _ => None,
        }
    }
}

/// Which channel an integration listens to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelRef {
    /// A channel id such as `C2147483705`.
    Id(String),
    /// A channel name, given as `#test` in the file, stored without the `#`.
    Name(String),
}

/// `[responder] sink`: which kind of [`Sink`] replies go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
enum SinkKind {
    #[default]
    Amqp,
    Slack,
    Webhook,
}

/// How the POST's fields are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContentType {
    /// `application/x-www-form-urlencoded`, as the seed.
    #[default]
    Form,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TriggerMatch {
    /// The text begins with the word (Slack's rule).
    #[default]
    Prefix,
    /// The first whitespace-separated word equals the word.
    Word,
}

/// What an integration does when a delivery is dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// Nothing in the channel (dead letter, metrics and log only).
    #[default]
    Quiet,
    /// A short notice in the channel, at most one per channel per
    /// `failure_notice_interval`.
    Notify,
}

/// What a job over its integration's rate limit does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnLimit {
    /// Wait durably for a slot, up to the job's `max_age`.
    #[default]
    Delay,
    /// Slack's behaviour: the job is dropped.
    Drop,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
    pub on_limit: OnLimit,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            per_second: 1.0,
            burst: 5,
            on_limit: OnLimit::Delay,
        }
    }
}

/// One validated `[[integrations]]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct Integration {
    pub id: String,
    pub team_id: String,
    pub channel: Option<ChannelRef>,
    /// The kinds of conversation it fires in (default: public channels).
    pub channel_types: Vec<ChannelType>,
    pub trigger_words: Vec<String>,
    pub urls: Vec<Url>,
    /// From `token`, or read from `token_file`.
    pub token: String,
    pub bot_name: String,
    pub icon_url: Option<String>,
    pub icon_emoji: Option<String>,
    pub content_type: ContentType,
    pub trigger_match: TriggerMatch,
    pub case_sensitive: bool,
    pub rate_limit: RateLimit,
    pub timeout: Duration,
    pub max_attempts: u32,
    pub max_age: Duration,
    /// The decoded keys of the `whsec_…` secrets; every POST is signed with
    /// each (several while a secret is being rotated).
    pub signing_keys: Vec<Vec<u8>>,
    /// Headers added to every POST.
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// Consecutive failed attempts that open a URL's circuit (0: never).
    pub circuit_failures: u32,
    pub on_failure: OnFailure,
    pub failure_notice_interval: Duration,
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
        let raw: RawFile = from_value(toml::Value::Table(table)).map_err(|(field, message)| ConfigError::Field {
            path: shown.clone(),
            field,
            message,
        })?;
        let raw_integrations = raw_integrations_of(raw_integrations, &shown)?;
        // Secret files named by a relative path are found next to the file.
        let files = SecretFiles::new(path.and_then(Path::parent).map(Path::to_owned).unwrap_or_default());
        let field_err = |field: &str, message: String| ConfigError::Field {
            path: shown.clone(),
            field: field.to_owned(),
            message,
        };
        let addr = |field: &str, value: Option<String>, default: &str| {
            let v = value.unwrap_or_else(|| default.to_owned());
            v.parse::<SocketAddr>()
                .map_err(|e| field_err(field, format!("{v:?} is not a socket address: {e}")))
        };

        let prefix = raw.broker.prefix.unwrap_or_else(|| DEFAULT_PREFIX.into());
        check_prefix(&prefix).map_err(|m| field_err("broker.prefix", m))?;
        let url = raw.broker.url.unwrap_or_else(|| DEFAULT_AMQP_URL.into());
        let urls = crate::broker::BrokerUrls::parse(&url).map_err(|m| field_err("broker.url", m))?;
        let tls_files = [
            ("broker.ca_file", &raw.broker.ca_file),
            ("broker.client_cert_file", &raw.broker.client_cert_file),
            ("broker.client_key_file", &raw.broker.client_key_file),
        ];
        for (field, file) in tls_files {
            if let Some(path) = file {
                std::fs::metadata(path).map_err(|e| field_err(field, format!("{}: {e}", path.display())))?;
            }
        }
        if raw.broker.client_cert_file.is_some() != raw.broker.client_key_file.is_some() {
            return Err(field_err(
                "broker.client_key_file",
                "client_cert_file and client_key_file go together".into(),
            ));
        }
        let broker = BrokerConfig {
            urls,
            heartbeat_s: raw.broker.heartbeat_s.unwrap_or(10),
            ca_file: raw.broker.ca_file,
            client_cert_file: raw.broker.client_cert_file,
            client_key_file: raw.broker.client_key_file,
            prefix,
            prefetch: positive(raw.broker.prefetch, 256).map_err(|m| field_err("broker.prefetch", m))?,
            shards: raw.broker.shards.unwrap_or(DEFAULT_SHARDS),
            delivery_limit: positive(raw.broker.delivery_limit, crate::topology::DEFAULT_DELIVERY_LIMIT)
                .map_err(|m| field_err("broker.delivery_limit", m))?,
        };
        if !(1..=1024).contains(&broker.shards) {
            return Err(field_err(
                "broker.shards",
                format!("{} is not between 1 and 1024", broker.shards),
            ));
        }
        let matcher = MatcherConfig {
            http_addr: addr("matcher.http_addr", raw.matcher.http_addr, "0.0.0.0:9101")?,
        };
        let mut allow_networks = Vec::new();
        for (i, net) in raw.deliverer.allow_networks.unwrap_or_default().iter().enumerate() {
            let parsed = net
                .parse::<ipnet::IpNet>()
                .or_else(|_| net.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    field_err(
                        &format!("deliverer.allow_networks[{i}]"),
                        format!("{net:?} is not a network such as 127.0.0.0/8"),
                    )
                })?;
            allow_networks.push(parsed);
        }
        let concurrency =
            positive(raw.deliverer.concurrency, 256).map_err(|m| field_err("deliverer.concurrency", m))?;
        let per_integration_concurrency = positive(raw.deliverer.per_integration_concurrency, 64)
            .map_err(|m| field_err("deliverer.per_integration_concurrency", m))?;
        let deliverer = DelivererConfig {
            http_addr: addr("deliverer.http_addr", raw.deliverer.http_addr, "0.0.0.0:9102")?,
            concurrency,
            // One integration can hold no more than all the attempts there are.
            per_integration_concurrency: per_integration_concurrency.min(concurrency),
            allow_networks,
            circuit_failures: raw.deliverer.circuit_failures.unwrap_or(DEFAULT_CIRCUIT_FAILURES),
        };
        let r = raw.responder;
        let sink = match r.sink.unwrap_or_default() {
            SinkKind::Amqp => Sink::Amqp,
            SinkKind::Slack => {
                let base = r.slack_api_base.unwrap_or_else(|| "https://slack.com/api".into());
                let api_base = parse_http_url(&base).map_err(|m| field_err("responder.slack_api_base", m))?;
                let token = files
                    .secret(r.slack_token, r.slack_token_file.as_deref(), "slack_token")
                    .map_err(|(field, m)| field_err(&format!("responder.{field}"), m))?
                    .or_else(|| env_nonempty("SWALLOW_SLACK_TOKEN"));
                let Some(token) = token else {
                    return Err(field_err(
                        "responder.slack_token",
                        "sink = \"slack\" needs slack_token, slack_token_file or SWALLOW_SLACK_TOKEN".into(),
                    ));
                };
                Sink::Slack { api_base, token }
            }
            SinkKind::Webhook => {
                let Some(u) = r.webhook_url else {
                    return Err(field_err(
                        "responder.webhook_url",
                        "sink = \"webhook\" needs webhook_url".into(),
                    ));
                };
                Sink::Webhook {
                    url: parse_http_url(&u).map_err(|m| field_err("responder.webhook_url", m))?,
                }
            }
        };
        let per_channel = RateLimit {
            per_second: r.per_channel_per_second.unwrap_or(1.0),
            burst: r.per_channel_burst.unwrap_or(5),
            on_limit: OnLimit::Delay,
        };
        check_rate(
            &per_channel,
            ["responder.per_channel_per_second", "responder.per_channel_burst"],
        )
        .map_err(|(field, m)| field_err(field, m))?;
        let responder = ResponderConfig {
            http_addr: addr("responder.http_addr", r.http_addr, "0.0.0.0:9103")?,
            sink,
            per_channel,
            max_attempts: positive(r.max_attempts, 8).map_err(|m| field_err("responder.max_attempts", m))?,
            max_age: Duration::from_secs(positive(r.max_age_s, 600).map_err(|m| field_err("responder.max_age_s", m))?),
            timeout: Duration::from_millis(
                positive(r.timeout_ms, 5000).map_err(|m| field_err("responder.timeout_ms", m))?,
            ),
        };
        let reload_interval_ms = raw.reload_interval_ms.unwrap_or(2000);
        if reload_interval_ms < MIN_RELOAD_INTERVAL_MS {
            return Err(field_err(
                "reload_interval_ms",
                format!("must be at least {MIN_RELOAD_INTERVAL_MS}, not {reload_interval_ms}"),
            ));
        }
        let reload_interval = Duration::from_millis(reload_interval_ms);
        let integrations = validate_integrations(raw_integrations, &shown, &files, deliverer.circuit_failures)?;
        let log = raw.log.validate().map_err(|(field, m)| field_err(field, m))?;
        Ok(Config {
            path: path.map(Path::to_owned),
            reload_interval,
            broker,
            matcher,
            deliverer,
            responder,
            log,
            integrations: Arc::new(integrations),
            secret_files: files.read.into_inner(),
            text_hash: content_hash(text.as_bytes()),
        })
    }

    /// Applies `AMQP_URL`, `SWALLOW_PREFIX`, `SWALLOW_LOG_FORMAT` and
    /// `SWALLOW_HTTP_ADDR` (for `stage`).
    pub fn apply_env(&mut self, stage: Stage) -> Result<(), ConfigError> {
        if let Some(url) = env_nonempty("AMQP_URL") {
            self.broker.urls = crate::broker::BrokerUrls::parse(&url).map_err(|message| ConfigError::Env {
                name: "AMQP_URL",
                message,
            })?;
        }
        if let Some(prefix) = env_nonempty("SWALLOW_PREFIX") {
            check_prefix(&prefix).map_err(|message| ConfigError::Env {
                name: "SWALLOW_PREFIX",
                message,
            })?;
            self.broker.prefix = prefix;
        }
        if let Some(format) = env_nonempty("SWALLOW_LOG_FORMAT") {
            self.log.format = match format.as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                _ => {
                    return Err(ConfigError::Env {
                        name: "SWALLOW_LOG_FORMAT",
                        message: format!("{format:?} is not one of \"text\", \"json\""),
                    });
                }
            };
        }
        if let Some(addr) = env_nonempty("SWALLOW_HTTP_ADDR") {
            let parsed = addr.parse::<SocketAddr>().map_err(|e| ConfigError::Env {
                name: "SWALLOW_HTTP_ADDR",
                message: format!("{addr:?} is not a socket address: {e}"),
            })?;
            *self.http_addr_mut(stage) = parsed;
        }
        Ok(())
    }

    pub fn http_addr_mut(&mut self, stage: Stage) -> &mut SocketAddr {
        match stage {
            Stage::Matcher => &mut self.matcher.http_addr,
            Stage::Deliverer => &mut self.deliverer.http_addr,
            Stage::Responder => &mut self.responder.http_addr,
        }
    }
}

/// Reads the secret files a configuration names, relative to its
/// directory, and notes each one it read with a hash of its content.
struct SecretFiles {
    base_dir: PathBuf,
    read: std::cell::RefCell<Vec<(PathBuf, u64)>>,
}

impl SecretFiles {
    fn new(base_dir: PathBuf) -> Self {
        SecretFiles {
            base_dir,
            read: Default::default(),
        }
    }

    fn path(&self, file: &Path) -> PathBuf {
        self.base_dir.join(file)
    }

    /// The secret `name`: given `inline`, or read from `file` now (a
    /// trailing newline trimmed); `None` when neither is set. On error, the
    /// field at fault (`<name>_file`) and why, the path included.
    fn secret(
        &self,
        inline: Option<String>,
        file: Option<&Path>,
        name: &str,
    ) -> Result<Option<String>, (String, String)> {
        let Some(file) = file else { return Ok(inline) };
        let field = format!("{name}_file");
        if inline.is_some() {
            return Err((field, format!("give {name} or {name}_file, not both")));
        }
        let path = self.path(file);
        let bytes = std::fs::read(&path).map_err(|e| (field.clone(), format!("reading {}: {e}", path.display())))?;
        let hash = content_hash(&bytes);
        let text = String::from_utf8(bytes).map_err(|_| (field.clone(), format!("{} is not UTF-8", path.display())))?;
        let text = text.strip_suffix('\n').unwrap_or(&text);
        let text = text.strip_suffix('\r').unwrap_or(text);
        if text.trim().is_empty() {
            return Err((field, format!("{} is empty", path.display())));
        }
        self.read.borrow_mut().push((path, hash));
        Ok(Some(text.to_owned()))
    }
}

/// Decodes one `whsec_…` secret into its key.
fn signing_key(secret: &str) -> Result<Vec<u8>, String> {
    let Some(b64) = secret.trim().strip_prefix("whsec_") else {
        return Err("must start with \"whsec_\"".into());
    };
    let key = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| format!("the part after \"whsec_\" is not base64: {e}"))?;
    if key.is_empty() {
        return Err("the key is empty".into());
    }
    Ok(key)
}

/// Headers swallow sets itself on every POST; an integration may not.
const OWN_HEADERS: &[&str] = &["content-type", "content-length", "host", "user-agent"];

/// Checks `headers = { … }`: valid names and values, none of swallow's own.
fn custom_headers(
    headers: BTreeMap<String, String>,
) -> Result<Vec<(http::HeaderName, http::HeaderValue)>, (String, String)> {
    let mut out = Vec::with_capacity(headers.len());
    for (name, value) in headers {
        let field = format!("headers.{name:?}");
        let parsed = http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| (field.clone(), "is not a valid header name".to_owned()))?;
        if OWN_HEADERS.contains(&parsed.as_str()) || parsed.as_str().starts_with("webhook-") {
            return Err((field, "swallow sets this header itself; it cannot be configured".into()));
        }
        // `http` lets bytes above ASCII through (obs-text); handlers and
        // proxies read them inconsistently, so only visible ASCII is taken.
        let value = value
            .chars()
            .all(|c| c == ' ' || c.is_ascii_graphic())
            .then(|| http::HeaderValue::from_str(&value).ok())
            .flatten()
            .ok_or_else(|| {
                (
                    field.clone(),
                    "the value must be visible ASCII or spaces, without line breaks".to_owned(),
                )
            })?;
        out.push((parsed, value));
    }
    Ok(out)
}

/// The shortest `reload_interval_ms`: polling faster only burns CPU.
const MIN_RELOAD_INTERVAL_MS: u64 = 50;

/// `value` (or `default` when absent) if it is at least 1: a count or a
/// duration of 0 would stop the stage's work, so it is refused, not raised.
fn positive<T>(value: Option<T>, default: T) -> Result<T, String>
where
    T: Copy + Default + PartialEq + std::fmt::Display,
{
    let v = value.unwrap_or(default);
    if v == T::default() {
        Err("must be at least 1, not 0".into())
    } else {
        Ok(v)
    }
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

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

/// The slowest rate limit: one an hour.
pub const MIN_PER_SECOND: f64 = 1.0 / 3600.0;

/// Checks a rate limit whose two numbers are the fields `names` (per second,
/// burst); on error, the field that is wrong and why.
fn check_rate(rate: &RateLimit, names: [&'static str; 2]) -> Result<(), (&'static str, String)> {
    if !(rate.per_second.is_finite() && rate.per_second >= MIN_PER_SECOND) {
        return Err((
            names[0],
            format!(
                "must be a number of at least {MIN_PER_SECOND:.6} (one an hour), not {}",
                rate.per_second
            ),
        ));
    }
    if rate.burst == 0 {
        return Err((names[1], "must be at least 1, not 0".into()));
    }
    Ok(())
}

fn parse_http_url(text: &str) -> Result<Url, String> {
    let url = Url::parse(text).map_err(|e| format!("{text:?}: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "{text:?}: scheme must be http or https, not {:?}",
            url.scheme()
        ));
    }
    if url.host().is_none() {
        return Err(format!("{text:?}: no host"));
    }
    Ok(url)
}

/// How an error names the integration at `index`: its id, quoted, or its
/// position (`#2`) when it has none.
fn integration_name(id: Option<&str>, index: usize) -> String {
    match id.filter(|id| !id.is_empty()) {
        Some(id) => format!("{id:?}"),
        None => format!("#{}", index + 1),
    }
}

/// The `[[integrations]]` array, each table deserialized on its own.
fn raw_integrations_of(value: Option<toml::Value>, path: &Path) -> Result<Vec<RawIntegration>, ConfigError> {
    let tables = match value {
        None => return Ok(Vec::new()),
        Some(toml::Value::Array(tables)) => tables,
        Some(other) => {
            return Err(ConfigError::Field {
                path: path.to_owned(),
                field: "integrations".into(),
                message: format!(
                    "must be an array of tables ([[integrations]]), found {}",
                    other.type_str()
                ),
            });
        }
    };
    let mut list = Vec::with_capacity(tables.len());
    for (index, value) in tables.into_iter().enumerate() {
        let id = value.get("id").and_then(toml::Value::as_str).map(str::to_owned);
        let integration = from_value(value).map_err(|(field, message)| ConfigError::Integration {
            path: path.to_owned(),
            integration: integration_name(id.as_deref(), index),
            field,
            message,
        })?;
        list.push(integration);
    }
    Ok(list)
}

/// Deserializes `value`; on error, the dotted path of the field at fault and
/// a message without TOML's caret diagram. An unknown field gets the closest
/// known one as a suggestion.
fn from_value<T: serde::de::DeserializeOwned>(value: toml::Value) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        let message = e.into_inner().message().trim_end().replace('\n', "; ");
        (field, unknown_field_hint(&message).unwrap_or(message))
    })
}

/// serde's "unknown field `x`, expected one of `a`, `b`" as "unknown field;
/// did you mean `a`?" (or the list of known fields when none is close).
fn unknown_field_hint(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    let (unknown, expected) = rest.split_once('`')?;
    let known: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    let closest = known
        .iter()
        .map(|k| (strsim::levenshtein(unknown, k), *k))
        .min()
        .filter(|(distance, k)| *distance <= 2.max(k.len() / 3));
    Some(match closest {
        Some((_, k)) => format!("unknown field; did you mean `{k}`?"),
        None if known.is_empty() => "unknown field; this table has no fields".into(),
        None => format!("unknown field; the known fields are `{}`", known.join("`, `")),
    })
}

/// A TOML syntax error as one line: where, then what.
fn syntax_error(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim_end().replace('\n', "; ");
    match error.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message,
    }
}

/// Consecutive failed attempts that open a circuit, unless configured.
pub const DEFAULT_CIRCUIT_FAILURES: u32 = 5;

fn validate_integrations(
    raw: Vec<RawIntegration>,
    path: &Path,
    files: &SecretFiles,
    circuit_failures: u32,
) -> Result<Integrations, ConfigError> {
    let mut seen = HashSet::new();
    let mut list = Vec::with_capacity(raw.len());
    for (index, r) in raw.into_iter().enumerate() {
        let id = r.id.clone().unwrap_or_default();
        let shown_id = integration_name(Some(&id), index);
        let err = |field: &str, message: String| ConfigError::Integration {
            path: path.to_owned(),
            integration: shown_id.clone(),
            field: field.to_owned(),
            message,
        };
        if id.is_empty() {
            return Err(err("id", "required, and must not be empty".into()));
        }
        if !seen.insert(id.clone()) {
            return Err(err("id", "duplicate id: every integration needs its own".into()));
        }
        let team_id = r.team_id.unwrap_or_default();
        if team_id.is_empty() {
            return Err(err("team_id", "required, and must not be empty".into()));
        }
        let channel = match r.channel {
            None => None,
            Some(c) => {
                let c = c.trim().to_owned();
                if let Some(name) = c.strip_prefix('#') {
                    if name.is_empty() {
                        return Err(err("channel", "\"#\" needs a channel name after it".into()));
                    }
                    Some(ChannelRef::Name(name.to_owned()))
                } else if c.is_empty() {
                    return Err(err("channel", "must not be empty (leave it out instead)".into()));
                } else {
                    Some(ChannelRef::Id(c))
                }
            }
        };
        let trigger_words = r.trigger_words.unwrap_or_default();
        for (i, w) in trigger_words.iter().enumerate() {
            if w.trim().is_empty() {
                return Err(err(&format!("trigger_words[{i}]"), "must not be empty".into()));
            }
        }
        if channel.is_none() && trigger_words.is_empty() {
            return Err(err(
                "trigger_words",
                "required when no channel is given (an integration needs a channel, trigger words, or both)".into(),
            ));
        }
        let raw_urls = r.urls.unwrap_or_default();
        if raw_urls.is_empty() {
            return Err(err("urls", "at least one handler URL is required".into()));
        }
        let mut urls = Vec::with_capacity(raw_urls.len());
        for (i, u) in raw_urls.iter().enumerate() {
            urls.push(parse_http_url(u).map_err(|m| err(&format!("urls[{i}]"), m))?);
        }
        let token = files
            .secret(r.token, r.token_file.as_deref(), "token")
            .map_err(|(field, m)| err(&field, m))?
            .unwrap_or_default();
        if token.is_empty() {
            return Err(err("token", "required (or token_file), and must not be empty".into()));
        }
        let content_type = r.content_type.unwrap_or_default();
        let trigger_match = r.trigger_match.unwrap_or_default();
        if trigger_match == TriggerMatch::Word
            && let Some(i) = trigger_words.iter().position(|w| w.chars().any(char::is_whitespace))
        {
            return Err(err(
                &format!("trigger_words[{i}]"),
                "with trigger_match = \"word\" a trigger word must not contain whitespace".into(),
            ));
        }
        let mut rate_limit = RateLimit::default();
        if let Some(rl) = r.rate_limit {
            if let Some(v) = rl.per_second {
                rate_limit.per_second = v;
            }
            if let Some(v) = rl.burst {
                rate_limit.burst = v;
            }
            rate_limit.on_limit = rl.on_limit.unwrap_or_default();
        }
        check_rate(&rate_limit, ["rate_limit.per_second", "rate_limit.burst"]).map_err(|(field, m)| err(field, m))?;
        let timeout_ms = positive(r.timeout_ms, 5000).map_err(|m| err("timeout_ms", m))?;
        let max_attempts = positive(r.max_attempts, 8).map_err(|m| err("max_attempts", m))?;
        let max_age_s = positive(r.max_age_s, 600).map_err(|m| err("max_age_s", m))?;
        // Each inline secret with the field an error about it names.
        let inline_secrets = r.signing_secret.is_some();
        let secrets: Vec<(String, String)> = match r.signing_secret {
            None => Vec::new(),
            Some(OneOrMany::One(s)) => vec![("signing_secret".to_owned(), s)],
            Some(OneOrMany::Many(list)) => list
                .into_iter()
                .enumerate()
                .map(|(i, s)| (format!("signing_secret[{i}]"), s))
                .collect(),
        };
        let mut signing_keys = Vec::with_capacity(secrets.len());
        for (field, s) in &secrets {
            signing_keys.push(signing_key(s).map_err(|m| err(field, m))?);
        }
        if let Some(file) = &r.signing_secret_file {
            // Given inline too, `secret` refuses the pair.
            let text = files
                .secret(inline_secrets.then(String::new), Some(file), "signing_secret")
                .map_err(|(field, m)| err(&field, m))?
                .unwrap_or_default();
            for (i, line) in text.lines().map(str::trim).filter(|l| !l.is_empty()).enumerate() {
                signing_keys.push(signing_key(line).map_err(|m| {
                    err(
                        "signing_secret_file",
                        format!("{}: secret {}: {m}", files.path(file).display(), i + 1),
                    )
                })?);
            }
        }
        let channel_types = r.channel_types.unwrap_or_else(|| vec![ChannelType::Public]);
        if channel_types.is_empty() {
            return Err(err(
                "channel_types",
                "must name at least one of \"public\", \"private\", \"im\", \"mpim\" (leave it out for public only)"
                    .into(),
            ));
        }
        let headers = custom_headers(r.headers.unwrap_or_default()).map_err(|(field, m)| err(&field, m))?;
        let failure_notice_interval_s = r.failure_notice_interval_s.unwrap_or(300);
        if failure_notice_interval_s == 0 {
            return Err(err("failure_notice_interval_s", "must be at least 1".into()));
        }
        if r.icon_url.is_some() && r.icon_emoji.is_some() {
            return Err(err("icon_emoji", "give icon_url or icon_emoji, not both".into()));
        }
        list.push(Arc::new(Integration {
            bot_name: r.bot_name.filter(|b| !b.is_empty()).unwrap_or_else(|| id.clone()),
            id,
            team_id,
            channel,
            channel_types,
            trigger_words,
            urls,
            token,
            icon_url: r.icon_url,
            icon_emoji: r.icon_emoji,
            content_type,
            trigger_match,
            case_sensitive: r.case_sensitive.unwrap_or(false),
            rate_limit,
            timeout: Duration::from_millis(timeout_ms),
            max_attempts,
            max_age: Duration::from_secs(max_age_s),
            signing_keys,
            headers,
            circuit_failures: r.circuit_failures.unwrap_or(circuit_failures),
            on_failure: r.on_failure.unwrap_or_default(),
            failure_notice_interval: Duration::from_secs(failure_notice_interval_s),
        }));
    }
    Ok(Integrations { list })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r##"
[[integrations]]
id = "googlebot"
team_id = "T0001"
channel = "#test"
trigger_words = ["googlebot:"]
urls = ["http://127.0.0.1:8080/hook"]
token = "XXXXXXXXXXXXXXXXXX"
signing_secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
rate_limit = { per_second = 2.0, burst = 3, on_limit = "drop" }
"##;

    #[test]
    fn parses_a_good_file_with_defaults() {
        let c = Config::parse(GOOD, None).unwrap();
        assert_eq!(c.broker.prefix, "swallow");
        let i = &c.integrations.list[0];
        assert_eq!(i.channel, Some(ChannelRef::Name("test".into())));
        assert_eq!(i.bot_name, "googlebot");
        assert_eq!(i.content_type, ContentType::Form);
        assert_eq!(i.trigger_match, TriggerMatch::Prefix);
        assert!(!i.case_sensitive);
        assert_eq!(i.rate_limit.burst, 3);
        assert_eq!(i.rate_limit.on_limit, OnLimit::Drop);
        assert_eq!(i.timeout, Duration::from_millis(5000));
        assert_eq!(i.max_attempts, 8);
        assert_eq!(i.signing_keys.len(), 1);
        assert_eq!(i.channel_types, [ChannelType::Public]);
        assert_eq!(c.responder.sink, Sink::Amqp);
    }

    fn error_of(text: &str) -> String {
        Config::parse(text, Some(Path::new("/etc/swallow/swallow.toml")))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn errors_name_the_file_the_integration_and_the_field() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "urls = [\"http://x/\"]",
                "urls = [\"/relative\"]",
                "integration \"googlebot\": urls[0]: \"/relative\": relative URL without a base",
            ),
            (
                "urls = [\"http://x/\"]",
                "urls = [\"ftp://x/\"]",
                "urls[0]: \"ftp://x/\": scheme must be http or https",
            ),
            ("urls = [\"http://x/\"]", "urls = []", "urls: at least one handler URL"),
            (
                "token = \"t\"",
                "token = \"\"",
                "integration \"googlebot\": token: required",
            ),
            (
                "channel = \"#test\"\n",
                "",
                "integration \"googlebot\": trigger_words: required when no channel",
            ),
            (
                "rate_limit = {}",
                "rate_limit = { per_second = 0.0 }",
                "rate_limit.per_second: must be a number of at least 0.000278 (one an hour), not 0",
            ),
            (
                "rate_limit = {}",
                "rate_limit = { per_second = 1e-300 }",
                "rate_limit.per_second: must be a number of at least",
            ),
            (
                "rate_limit = {}",
                "rate_limit = { burst = 0 }",
                "rate_limit.burst: must be at least 1, not 0",
            ),
            (
                "rate_limit = {}",
                "rate_limit = { on_limit = \"wait\" }",
                "unknown variant `wait`, expected `delay` or `drop`",
            ),
            (
                "token = \"t\"",
                "token = \"t\"\nsigning_secret = \"abc\"",
                "signing_secret: must start with \"whsec_\"",
            ),
            (
                "token = \"t\"",
                "token = \"t\"\ncontent_type = \"xml\"",
                "unknown variant `xml`, expected `form` or `json`",
            ),
            (
                "token = \"t\"",
                "token = \"t\"\ntrigger_word = [\"x\"]",
                "integration \"googlebot\": trigger_word: unknown field; did you mean `trigger_words`?",
            ),
        ];
        let base = "[[integrations]]\nid = \"googlebot\"\nteam_id = \"T1\"\nchannel = \"#test\"\nurls = [\"http://x/\"]\ntoken = \"t\"\nrate_limit = {}\n";
        for (from, to, want) in cases {
            let text = base.replacen(from, to, 1);
            let got = error_of(&text);
            assert!(got.contains("/etc/swallow/swallow.toml"), "{got}");
            assert!(
                got.contains(want),
                "for {to:?}: got {got:?}, want it to contain {want:?}"
            );
        }
    }

    #[test]
    fn the_shipped_configurations_are_valid() {
        for (name, text) in [
            ("deploy/example.toml", include_str!("../../deploy/example.toml")),
            ("deploy/compose.toml", include_str!("../../deploy/compose.toml")),
        ] {
            let c = Config::parse(text, Some(Path::new(name))).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(c.integrations.list[0].id, "googlebot", "{name}");
        }
    }

    #[test]
    fn errors_are_one_line_naming_the_integration_and_the_closest_field() {
        let one =
            "[[integrations]]\nid = \"a\"\nteam_id = \"T1\"\nchannel = \"C1\"\nurls = [\"http://x/\"]\ntoken = \"t\"\n";
        let file = "loading configuration from /etc/swallow/swallow.toml";
        let integrations = "loading integrations from /etc/swallow/swallow.toml";
        for (text, want) in [
            (
                format!("{one}[[integrations]]\nteam_id = \"T1\"\ntrigger_wrds = [\"x\"]\n"),
                format!("{integrations}: integration #2: trigger_wrds: unknown field; did you mean `trigger_words`?"),
            ),
            (
                format!("{one}rate_limit = {{ per_secnd = 1.0 }}\n"),
                format!(
                    "{integrations}: integration \"a\": rate_limit.per_secnd: unknown field; did you mean `per_second`?"
                ),
            ),
            (
                format!("{one}colour = \"red\"\n"),
                format!(
                    "{integrations}: integration \"a\": colour: unknown field; the known fields are `id`, `team_id`,"
                ),
            ),
            (
                format!("{one}timeout_ms = \"5s\"\n"),
                format!("{integrations}: integration \"a\": timeout_ms: invalid type: string \"5s\", expected u64"),
            ),
            (
                "[deliverer]\nconcurency = 4\n".into(),
                format!("{file}: deliverer.concurency: unknown field; did you mean `concurrency`?"),
            ),
            (
                "[broker]\nurl = \"amqp://x\"\nprefix = swallow\n".into(),
                format!("{file}: line 3, column 10: "),
            ),
            (
                "integrations = 3\n".into(),
                format!("{file}: integrations: must be an array of tables ([[integrations]]), found integer"),
            ),
        ] {
            let got = error_of(&text);
            assert!(got.starts_with(&want), "got  {got}\nwant {want}");
            assert!(!got.contains('\n') && !got.contains('|'), "one line: {got}");
        }
    }

    #[test]
    fn integration_options_and_their_errors() {
        let dir = std::env::temp_dir().join(format!("swallow-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("swallow.toml");
        std::fs::write(dir.join("token"), "from-file\n").unwrap();
        std::fs::write(dir.join("empty"), "\n").unwrap();
        std::fs::write(
            dir.join("secrets"),
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\nwhsec_AAAAAAAAAAAAAAAAAAAAAAAA\n",
        )
        .unwrap();
        let one = "[[integrations]]\nid = \"a\"\nteam_id = \"T1\"\nchannel = \"C1\"\nurls = [\"http://x/\"]\n";
        let parse = |extra: &str| Config::parse(&format!("{one}{extra}\n"), Some(&path));
        let good = parse(
            "token_file = \"token\"\nsigning_secret_file = \"secrets\"\nchannel_types = [\"im\", \"private\"]\nheaders = { \"X-Api-Key\" = \"k1\" }",
        )
        .unwrap();
        let i = &good.integrations.list[0];
        assert_eq!(i.token, "from-file");
        assert_eq!(i.signing_keys.len(), 2);
        assert_eq!(i.channel_types, [ChannelType::Im, ChannelType::Private]);
        assert_eq!(i.headers[0].0, "x-api-key");
        assert_eq!(i.headers[0].1, "k1");
        // The secret files read, each with its content's hash, for the
        // reload check.
        let read: Vec<(PathBuf, u64)> = ["token", "secrets"]
            .iter()
            .map(|f| (dir.join(f), content_hash(&std::fs::read(dir.join(f)).unwrap())))
            .collect();
        assert_eq!(good.secret_files, read);
        let list =
            parse("token = \"t\"\nsigning_secret = [\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\", \"whsec_AAAA\"]")
                .unwrap();
        assert_eq!(list.integrations.list[0].signing_keys.len(), 2);
        assert!(list.secret_files.is_empty(), "no secret file named");

        let shown = path.display();
        let d = dir.display();
        for (extra, want) in [
            (
                "token = \"t\"\nchannel_types = [\"dm\"]".to_owned(),
                "channel_types[0]: unknown variant `dm`, expected one of `public`, `private`, `im`, `mpim`".to_owned(),
            ),
            (
                "token = \"t\"\ntoken_file = \"token\"".into(),
                "token_file: give token or token_file, not both".into(),
            ),
            (
                "token_file = \"nope\"".into(),
                format!("token_file: reading {d}/nope: No such file"),
            ),
            (
                "token_file = \"empty\"".into(),
                format!("token_file: {d}/empty is empty"),
            ),
            (
                "token = \"t\"\nsigning_secret_file = \"token\"".into(),
                format!("signing_secret_file: {d}/token: secret 1: must start with \"whsec_\""),
            ),
            (
                "token = \"t\"\nsigning_secret = \"whsec_AAAA\"\nsigning_secret_file = \"secrets\"".into(),
                "signing_secret_file: give signing_secret or signing_secret_file, not both".into(),
            ),
            (
                "token = \"t\"\nsigning_secret = [\"whsec_AAAA\", \"nope\"]".into(),
                "signing_secret[1]: must start with \"whsec_\"".into(),
            ),
            (
                "token = \"t\"\nheaders = { \"User-Agent\" = \"me\" }".into(),
                "headers.\"User-Agent\": swallow sets this header itself".into(),
            ),
            (
                "token = \"t\"\nheaders = { \"Webhook-Signature\" = \"v1,x\" }".into(),
                "headers.\"Webhook-Signature\": swallow sets this header itself".into(),
            ),
            (
                "token = \"t\"\nheaders = { \"X Key\" = \"v\" }".into(),
                "headers.\"X Key\": is not a valid header name".into(),
            ),
            (
                "token = \"t\"\nheaders = { \"X-Key\" = \"a\\nb\" }".into(),
                "headers.\"X-Key\": the value must be visible ASCII".into(),
            ),
        ] {
            let got = parse(&extra).unwrap_err().to_string();
            let want = format!("loading integrations from {shown}: integration \"a\": {want}");
            assert!(got.starts_with(&want), "got  {got}\nwant {want}");
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_log_table_picks_the_format() {
        assert_eq!(Config::parse("", None).unwrap().log.format, LogFormat::Text);
        assert_eq!(
            Config::parse("[log]\nformat = \"json\"", None).unwrap().log.format,
            LogFormat::Json
        );
        assert!(
            error_of("[log]\nformat = \"xml\"")
                .ends_with("log.format: unknown variant `xml`, expected `text` or `json`")
        );
    }

    #[test]
    fn duplicate_ids_are_refused() {
        let one =
            "[[integrations]]\nid = \"a\"\nteam_id = \"T1\"\nchannel = \"C1\"\nurls = [\"http://x/\"]\ntoken = \"t\"\n";
        let got = error_of(&format!("{one}{one}"));
        assert!(got.contains("integration \"a\": id: duplicate id"), "{got}");
    }

    #[test]
    fn enumerated_fields_list_the_allowed_values() {
        let base =
            "[[integrations]]\nid = \"a\"\nteam_id = \"T1\"\nchannel = \"C1\"\nurls = [\"http://x/\"]\ntoken = \"t\"\n";
        for (line, want) in [
            (
                "content_type = \"xml\"",
                "unknown variant `xml`, expected `form` or `json`",
            ),
            (
                "trigger_match = \"any\"",
                "unknown variant `any`, expected `prefix` or `word`",
            ),
            (
                "rate_limit = { on_limit = \"wait\" }",
                "unknown variant `wait`, expected `delay` or `drop`",
            ),
        ] {
            let got = error_of(&format!("{base}{line}\n"));
            assert!(got.contains(want), "{line}: {got}");
        }
        let got = error_of("[responder]\nsink = \"irc\"");
        assert!(
            got.contains("unknown variant `irc`, expected one of `amqp`, `slack`, `webhook`"),
            "{got}"
        );
    }

    #[test]
    fn a_zero_where_a_positive_number_is_needed_is_refused_not_raised() {
        for (text, field) in [
            ("[broker]\nprefetch = 0", "broker.prefetch"),
            ("[deliverer]\nconcurrency = 0", "deliverer.concurrency"),
            (
                "[deliverer]\nper_integration_concurrency = 0",
                "deliverer.per_integration_concurrency",
            ),
            ("[responder]\nmax_attempts = 0", "responder.max_attempts"),
            ("[responder]\nmax_age_s = 0", "responder.max_age_s"),
            ("[responder]\ntimeout_ms = 0", "responder.timeout_ms"),
            ("[responder]\nper_channel_burst = 0", "responder.per_channel_burst"),
        ] {
            let got = error_of(text);
            assert!(
                got.ends_with(&format!("{field}: must be at least 1, not 0")),
                "{text}: {got}"
            );
        }
        assert!(error_of("reload_interval_ms = 0").ends_with("reload_interval_ms: must be at least 50, not 0"));
    }

    #[test]
    fn bad_sink_and_prefix_are_refused() {
        assert!(error_of("[responder]\nsink = \"webhook\"").contains("responder.webhook_url"));
        assert!(error_of("[broker]\nprefix = \"a b\"").contains("broker.prefix"));
        assert!(error_of("[deliverer]\nallow_networks = [\"nope\"]").contains("deliverer.allow_networks[0]"));
    }

    #[test]
    fn the_delivery_limit_defaults_to_20_and_is_positive() {
        let c = Config::parse("", None).unwrap();
        assert_eq!(c.broker.delivery_limit, 20);
        let c = Config::parse("[broker]\ndelivery_limit = 3\n", None).unwrap();
        assert_eq!(c.broker.delivery_limit, 3);
        let args = c.broker.topology().work_queue_args("x");
        assert_eq!(
            args.inner().get("x-delivery-limit"),
            Some(&lapin::types::AMQPValue::LongLongInt(3))
        );
        assert!(error_of("[broker]\ndelivery_limit = 0").ends_with("broker.delivery_limit: must be at least 1, not 0"));
    }

    #[test]
    fn broker_addresses_heartbeat_and_tls_files() {
        let c = Config::parse("", None).unwrap();
        assert_eq!(c.broker.urls.list(), [DEFAULT_AMQP_URL]);
        assert_eq!(c.broker.heartbeat_s, 10);
        let two = "[broker]\nurl = \"amqp://u:p1@n1:5672/%2f,amqp://u:p2@n2:5672/%2f\"\nheartbeat_s = 2\n";
        let c = Config::parse(two, None).unwrap();
        assert_eq!(c.broker.urls.list().len(), 2);
        assert_eq!(c.broker.heartbeat_s, 2);
        let bad = error_of("[broker]\nurl = \"amqp://u:p@n1/%2f,ftp://u:secret@n2/\"");
        assert!(bad.contains("broker.url: URL 2") && !bad.contains("secret"), "{bad}");
        let missing = error_of("[broker]\nca_file = \"/nonexistent/ca.pem\"");
        assert!(missing.contains("broker.ca_file: /nonexistent/ca.pem"), "{missing}");
        let alone = error_of("[broker]\nclient_cert_file = \"/etc/hostname\"");
        assert!(alone.contains("broker.client_key_file"), "{alone}");
    }

    #[test]
    fn circuit_and_failure_notice_options() {
        let c = Config::parse("[deliverer]\ncircuit_failures = 3\n", None).unwrap();
        assert_eq!(c.deliverer.circuit_failures, 3);
        let text = "[[integrations]]\nid = \"g\"\nteam_id = \"T\"\nchannel = \"C1\"\nurls = [\"https://example.com/\"]\ntoken = \"t\"\n";
        let i = &Config::parse(text, None).unwrap().integrations.list[0];
        assert_eq!(
            (i.circuit_failures, i.on_failure),
            (DEFAULT_CIRCUIT_FAILURES, OnFailure::Quiet)
        );
        assert_eq!(i.failure_notice_interval, Duration::from_secs(300));
        let notify = format!("{text}circuit_failures = 0\non_failure = \"notify\"\nfailure_notice_interval_s = 60\n");
        let i = &Config::parse(&notify, None).unwrap().integrations.list[0];
        assert_eq!((i.circuit_failures, i.on_failure), (0, OnFailure::Notify));
        assert_eq!(i.failure_notice_interval, Duration::from_secs(60));
        let loud = error_of(&format!("{text}on_failure = \"loud\"\n"));
        assert!(
            loud.contains("on_failure") && loud.contains("quiet") && loud.contains("notify"),
            "{loud}"
        );
        assert!(error_of(&format!("{text}failure_notice_interval_s = 0\n")).contains("failure_notice_interval_s"));
    }

    #[test]
    fn the_log_table() {
        let c = Config::parse("", None).unwrap();
        assert_eq!(c.log, LogConfig::default());
        let c = Config::parse(
            "[log]\nenabled = false\nmax_age = \"2d\"\nmax_bytes = \"10MiB\"\n",
            None,
        )
        .unwrap();
        assert_eq!(
            c.log,
            LogConfig {
                format: LogFormat::Text,
                enabled: false,
                max_age: Duration::from_secs(2 * 86400),
                max_bytes: 10 << 20
            }
        );
        assert_eq!(
            Config::parse("[log]\nmax_bytes = 4096\n", None).unwrap().log.max_bytes,
            4096
        );
        assert!(error_of("[log]\nmax_age = \"soon\"").contains("log.max_age: \"soon\" is not a duration"));
        assert!(error_of("[log]\nmax_bytes = \"1 TB\"").contains("log.max_bytes"));
        assert!(error_of("[log]\nmax_bytes = 0").contains("log.max_bytes: must be more than 0"));
        assert!(error_of("[log]\nretention = 1").contains("log.retention: unknown field"));
    }
}
