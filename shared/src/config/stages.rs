//! `[matcher]`, `[deliverer]` and `[responder]`: each stage's own settings.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use super::env;
use super::errors::{FieldError, at};
use super::rate::{OnLimit, RateLimit, check_rate};
use super::secrets::SecretFiles;
use super::units::{parse_addr, parse_http_url, positive};

/// Consecutive failed attempts that open a circuit, unless configured.
pub const DEFAULT_CIRCUIT_FAILURES: u32 = 5;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMatcher {
    http_addr: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDeliverer {
    http_addr: Option<String>,
    concurrency: Option<usize>,
    per_integration_concurrency: Option<usize>,
    allow_networks: Option<Vec<String>>,
    circuit_failures: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawResponder {
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

/// `[responder] sink`: which kind of [`Sink`] replies go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
enum SinkKind {
    #[default]
    Amqp,
    Slack,
    Webhook,
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

/// A stage's listener address: the file's, else `default`.
fn http_addr(field: &str, value: Option<String>, default: &str) -> Result<SocketAddr, FieldError> {
    parse_addr(value.as_deref().unwrap_or(default)).map_err(at(field))
}

impl RawMatcher {
    pub(super) fn validate(self) -> Result<MatcherConfig, FieldError> {
        Ok(MatcherConfig {
            http_addr: http_addr("matcher.http_addr", self.http_addr, "0.0.0.0:9101")?,
        })
    }
}

impl RawDeliverer {
    pub(super) fn validate(self) -> Result<DelivererConfig, FieldError> {
        let mut allow_networks = Vec::new();
        for (i, net) in self.allow_networks.unwrap_or_default().iter().enumerate() {
            let parsed = net
                .parse::<ipnet::IpNet>()
                .or_else(|_| net.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    (
                        format!("deliverer.allow_networks[{i}]"),
                        format!("{net:?} is not a network such as 127.0.0.0/8"),
                    )
                })?;
            allow_networks.push(parsed);
        }
        let concurrency = positive(self.concurrency, 256).map_err(at("deliverer.concurrency"))?;
        let per_integration_concurrency =
            positive(self.per_integration_concurrency, 64).map_err(at("deliverer.per_integration_concurrency"))?;
        Ok(DelivererConfig {
            http_addr: http_addr("deliverer.http_addr", self.http_addr, "0.0.0.0:9102")?,
            concurrency,
            // One integration can hold no more than all the attempts there are.
            per_integration_concurrency: per_integration_concurrency.min(concurrency),
            allow_networks,
            circuit_failures: self.circuit_failures.unwrap_or(DEFAULT_CIRCUIT_FAILURES),
        })
    }
}

impl RawResponder {
    pub(super) fn validate(self, files: &SecretFiles) -> Result<ResponderConfig, FieldError> {
        let per_channel = RateLimit {
            per_second: self.per_channel_per_second.unwrap_or(1.0),
            burst: self.per_channel_burst.unwrap_or(5),
            on_limit: OnLimit::Delay,
        };
        check_rate(
            &per_channel,
            ["responder.per_channel_per_second", "responder.per_channel_burst"],
        )?;
        Ok(ResponderConfig {
            http_addr: http_addr("responder.http_addr", self.http_addr.clone(), "0.0.0.0:9103")?,
            per_channel,
            max_attempts: positive(self.max_attempts, 8).map_err(at("responder.max_attempts"))?,
            max_age: Duration::from_secs(positive(self.max_age_s, 600).map_err(at("responder.max_age_s"))?),
            timeout: Duration::from_millis(positive(self.timeout_ms, 5000).map_err(at("responder.timeout_ms"))?),
            sink: self.sink(files)?,
        })
    }

    fn sink(self, files: &SecretFiles) -> Result<Sink, FieldError> {
        match self.sink.unwrap_or_default() {
            SinkKind::Amqp => Ok(Sink::Amqp),
            SinkKind::Slack => {
                let base = self.slack_api_base.unwrap_or_else(|| "https://slack.com/api".into());
                let api_base = parse_http_url(&base).map_err(at("responder.slack_api_base"))?;
                let token = files
                    .secret(self.slack_token, self.slack_token_file.as_deref(), "slack_token")
                    .map_err(|(field, m)| (format!("responder.{field}"), m))?
                    .or_else(env::slack_token);
                let Some(token) = token else {
                    return Err(at("responder.slack_token")(
                        "sink = \"slack\" needs slack_token, slack_token_file or SWALLOW_SLACK_TOKEN".into(),
                    ));
                };
                Ok(Sink::Slack { api_base, token })
            }
            SinkKind::Webhook => {
                let Some(u) = self.webhook_url else {
                    return Err(at("responder.webhook_url")(
                        "sink = \"webhook\" needs webhook_url".into(),
                    ));
                };
                Ok(Sink::Webhook {
                    url: parse_http_url(&u).map_err(at("responder.webhook_url"))?,
                })
            }
        }
    }
}
