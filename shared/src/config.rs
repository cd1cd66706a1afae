//! The one configuration file all three stages read (CONTRACT §1–§2).
//!
//! The file is parsed into strict raw structs (unknown fields are errors, so a
//! typo is never a silent default), then validated into [`Config`] and
//! [`Integration`]s. Every error names the file, the integration and the field,
//! because the person reading it is an operator looking at a crash-looping pod.
//! Environment variables (`AMQP_URL`, `SWALLOW_PREFIX`, `SWALLOW_HTTP_ADDR`)
//! are applied by [`Config::apply_env`], separately, so tests can build a
//! config without touching the process environment.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;
use url::Url;

use crate::delivery_log::{self, LogConfig};

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
    #[error("loading integrations from {path}: integration {id:?}: {field}: {message}")]
    Integration {
        path: PathBuf,
        id: String,
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
    integrations: Vec<RawIntegration>,
    #[serde(default)]
    log: RawLog,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBroker {
    url: Option<String>,
    prefix: Option<String>,
    prefetch: Option<u16>,
    shards: Option<u32>,
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
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResponder {
    http_addr: Option<String>,
    sink: Option<String>,
    slack_api_base: Option<String>,
    slack_token: Option<String>,
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
    content_type: Option<String>,
    trigger_match: Option<String>,
    case_sensitive: Option<bool>,
    rate_limit: Option<RawRateLimit>,
    timeout_ms: Option<u64>,
    max_attempts: Option<u32>,
    max_age_s: Option<u64>,
    signing_secret: Option<String>,
}

/// `[log]`: the delivery log (see `delivery_log`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    enabled: Option<bool>,
    max_age: Option<String>,
    max_bytes: Option<RawBytes>,
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
    on_limit: Option<String>,
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
    pub integrations: Arc<Integrations>,
    /// `[log]`: the delivery log's switch and retention.
    pub log: LogConfig,
}

#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub url: String,
    pub prefix: String,
    /// Unacknowledged deliveries a consumer may hold (basic.qos).
    pub prefetch: u16,
    /// Delivery shards: the unit of work one deliverer replica owns at a time.
    pub shards: u32,
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
#[derive(Debug, Default)]
pub struct Integrations {
    pub list: Vec<Arc<Integration>>,
}

impl Integrations {
    pub fn get(&self, id: &str) -> Option<&Arc<Integration>> {
        self.list.iter().find(|i| i.id == id)
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentType {
    Form,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TriggerMatch {
    /// The text begins with the word (Slack's rule).
    Prefix,
    /// The first whitespace-separated word equals the word.
    Word,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnLimit {
    Delay,
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
#[derive(Debug, Clone)]
pub struct Integration {
    pub id: String,
    pub team_id: String,
    pub channel: Option<ChannelRef>,
    pub trigger_words: Vec<String>,
    pub urls: Vec<Url>,
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
    /// The decoded key of a `whsec_…` secret.
    pub signing_key: Option<Vec<u8>>,
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
        let raw: RawFile = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: shown.clone(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
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
        let broker = BrokerConfig {
            url: raw.broker.url.unwrap_or_else(|| DEFAULT_AMQP_URL.into()),
            prefix,
            prefetch: raw.broker.prefetch.unwrap_or(256).max(1),
            shards: raw.broker.shards.unwrap_or(crate::topology::DEFAULT_SHARDS),
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
        let concurrency = raw.deliverer.concurrency.unwrap_or(256);
        if concurrency == 0 {
            return Err(field_err("deliverer.concurrency", "must be at least 1".into()));
        }
        let deliverer = DelivererConfig {
            http_addr: addr("deliverer.http_addr", raw.deliverer.http_addr, "0.0.0.0:9102")?,
            concurrency,
            per_integration_concurrency: raw
                .deliverer
                .per_integration_concurrency
                .unwrap_or(64)
                .clamp(1, concurrency),
            allow_networks,
        };
        let r = raw.responder;
        let sink = match r.sink.as_deref().unwrap_or("amqp") {
            "amqp" => Sink::Amqp,
            "slack" => {
                let base = r.slack_api_base.unwrap_or_else(|| "https://slack.com/api".into());
                let api_base = parse_http_url(&base).map_err(|m| field_err("responder.slack_api_base", m))?;
                let token = r
                    .slack_token
                    .or_else(|| std::env::var("SWALLOW_SLACK_TOKEN").ok())
                    .unwrap_or_default();
                if token.is_empty() {
                    return Err(field_err(
                        "responder.slack_token",
                        "sink = \"slack\" needs slack_token (or SWALLOW_SLACK_TOKEN)".into(),
                    ));
                }
                Sink::Slack { api_base, token }
            }
            "webhook" => {
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
            other => {
                return Err(field_err(
                    "responder.sink",
                    format!("{other:?} is not one of \"amqp\", \"slack\", \"webhook\""),
                ));
            }
        };
        let per_channel = RateLimit {
            per_second: r.per_channel_per_second.unwrap_or(1.0),
            burst: r.per_channel_burst.unwrap_or(5),
            on_limit: OnLimit::Delay,
        };
        check_rate(&per_channel).map_err(|m| field_err("responder.per_channel_per_second", m))?;
        let responder = ResponderConfig {
            http_addr: addr("responder.http_addr", r.http_addr, "0.0.0.0:9103")?,
            sink,
            per_channel,
            max_attempts: r.max_attempts.unwrap_or(8).max(1),
            max_age: Duration::from_secs(r.max_age_s.unwrap_or(600).max(1)),
            timeout: Duration::from_millis(r.timeout_ms.unwrap_or(5000).max(1)),
        };
        let log = raw.log.validate().map_err(|(field, m)| field_err(field, m))?;
        let integrations = validate_integrations(raw.integrations, &shown)?;
        Ok(Config {
            path: path.map(Path::to_owned),
            reload_interval: Duration::from_millis(raw.reload_interval_ms.unwrap_or(2000).max(50)),
            broker,
            matcher,
            deliverer,
            responder,
            integrations: Arc::new(integrations),
            log,
        })
    }

    /// Applies `AMQP_URL`, `SWALLOW_PREFIX` and `SWALLOW_HTTP_ADDR` (for `stage`).
    pub fn apply_env(&mut self, stage: Stage) -> Result<(), ConfigError> {
        if let Some(url) = env_nonempty("AMQP_URL") {
            self.broker.url = url;
        }
        if let Some(prefix) = env_nonempty("SWALLOW_PREFIX") {
            check_prefix(&prefix).map_err(|message| ConfigError::Env {
                name: "SWALLOW_PREFIX",
                message,
            })?;
            self.broker.prefix = prefix;
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

fn check_rate(rate: &RateLimit) -> Result<(), String> {
    if !(rate.per_second.is_finite() && rate.per_second >= MIN_PER_SECOND) {
        return Err(format!(
            "per_second must be a number of at least {MIN_PER_SECOND:.6} (one an hour), not {}",
            rate.per_second
        ));
    }
    if rate.burst == 0 {
        return Err("burst must be at least 1".into());
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

fn validate_integrations(raw: Vec<RawIntegration>, path: &Path) -> Result<Integrations, ConfigError> {
    let mut seen = HashSet::new();
    let mut list = Vec::with_capacity(raw.len());
    for (index, r) in raw.into_iter().enumerate() {
        let id = r.id.clone().unwrap_or_default();
        let shown_id = if id.is_empty() {
            format!("#{}", index + 1)
        } else {
            id.clone()
        };
        let err = |field: &str, message: String| ConfigError::Integration {
            path: path.to_owned(),
            id: shown_id.clone(),
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
        let token = r.token.unwrap_or_default();
        if token.is_empty() {
            return Err(err("token", "required, and must not be empty".into()));
        }
        let content_type = match r.content_type.as_deref().unwrap_or("form") {
            "form" => ContentType::Form,
            "json" => ContentType::Json,
            other => return Err(err("content_type", format!("{other:?} is not \"form\" or \"json\""))),
        };
        let trigger_match = match r.trigger_match.as_deref().unwrap_or("prefix") {
            "prefix" => TriggerMatch::Prefix,
            "word" => TriggerMatch::Word,
            other => return Err(err("trigger_match", format!("{other:?} is not \"prefix\" or \"word\""))),
        };
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
            rate_limit.on_limit = match rl.on_limit.as_deref().unwrap_or("delay") {
                "delay" => OnLimit::Delay,
                "drop" => OnLimit::Drop,
                other => {
                    return Err(err(
                        "rate_limit.on_limit",
                        format!("{other:?} is not \"delay\" or \"drop\""),
                    ));
                }
            };
        }
        check_rate(&rate_limit).map_err(|m| err("rate_limit", m))?;
        let timeout_ms = r.timeout_ms.unwrap_or(5000);
        if timeout_ms == 0 {
            return Err(err("timeout_ms", "must be at least 1".into()));
        }
        let max_attempts = r.max_attempts.unwrap_or(8);
        if max_attempts == 0 {
            return Err(err("max_attempts", "must be at least 1".into()));
        }
        let max_age_s = r.max_age_s.unwrap_or(600);
        if max_age_s == 0 {
            return Err(err("max_age_s", "must be at least 1".into()));
        }
        let signing_key = match r.signing_secret {
            None => None,
            Some(s) => {
                let Some(b64) = s.strip_prefix("whsec_") else {
                    return Err(err("signing_secret", "must start with \"whsec_\"".into()));
                };
                let key = base64::engine::general_purpose::STANDARD.decode(b64).map_err(|e| {
                    err(
                        "signing_secret",
                        format!("the part after \"whsec_\" is not base64: {e}"),
                    )
                })?;
                if key.is_empty() {
                    return Err(err("signing_secret", "the key is empty".into()));
                }
                Some(key)
            }
        };
        if r.icon_url.is_some() && r.icon_emoji.is_some() {
            return Err(err("icon_emoji", "give icon_url or icon_emoji, not both".into()));
        }
        list.push(Arc::new(Integration {
            bot_name: r.bot_name.filter(|b| !b.is_empty()).unwrap_or_else(|| id.clone()),
            id,
            team_id,
            channel,
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
            signing_key,
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
        assert!(i.signing_key.is_some());
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
                "rate_limit: per_second must be a number of at least 0.000278 (one an hour), not 0",
            ),
            (
                "rate_limit = {}",
                "rate_limit = { per_second = 1e-300 }",
                "rate_limit: per_second must be a number of at least",
            ),
            (
                "rate_limit = {}",
                "rate_limit = { burst = 0 }",
                "rate_limit: burst must be at least 1",
            ),
            (
                "rate_limit = {}",
                "rate_limit = { on_limit = \"wait\" }",
                "rate_limit.on_limit: \"wait\" is not",
            ),
            (
                "token = \"t\"",
                "token = \"t\"\nsigning_secret = \"abc\"",
                "signing_secret: must start with \"whsec_\"",
            ),
            (
                "token = \"t\"",
                "token = \"t\"\ncontent_type = \"xml\"",
                "content_type: \"xml\"",
            ),
            (
                "token = \"t\"",
                "token = \"t\"\ntrigger_word = [\"x\"]",
                "unknown field `trigger_word`",
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
    fn duplicate_ids_are_refused() {
        let one =
            "[[integrations]]\nid = \"a\"\nteam_id = \"T1\"\nchannel = \"C1\"\nurls = [\"http://x/\"]\ntoken = \"t\"\n";
        let got = error_of(&format!("{one}{one}"));
        assert!(got.contains("integration \"a\": id: duplicate id"), "{got}");
    }

    #[test]
    fn bad_sink_and_prefix_are_refused() {
        assert!(error_of("[responder]\nsink = \"irc\"").contains("responder.sink"));
        assert!(error_of("[responder]\nsink = \"webhook\"").contains("responder.webhook_url"));
        assert!(error_of("[broker]\nprefix = \"a b\"").contains("broker.prefix"));
        assert!(error_of("[deliverer]\nallow_networks = [\"nope\"]").contains("deliverer.allow_networks[0]"));
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
        assert!(error_of("[log]\nretention = 1").contains("unknown field `retention`"));
    }
}
