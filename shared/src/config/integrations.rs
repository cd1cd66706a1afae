//! `[[integrations]]`: each table deserialized on its own (so an error names
//! the integration by id, or by position when the id is missing) and then
//! validated one concern at a time.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use super::errors::{ConfigError, FieldError, at, from_value};
use super::rate::{RateLimit, RawRateLimit, check_rate};
use super::secrets::{SecretFiles, signing_key};
use super::units::{parse_http_url, positive};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIntegration {
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

/// How the POST's fields are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContentType {
    /// `application/x-www-form-urlencoded`, as Slack's outgoing webhooks.
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

/// How an error names the integration at `index`: its id, quoted, or its
/// position (`#2`) when it has none.
fn integration_name(id: Option<&str>, index: usize) -> String {
    match id.filter(|id| !id.is_empty()) {
        Some(id) => format!("{id:?}"),
        None => format!("#{}", index + 1),
    }
}

/// The `[[integrations]]` array, each table deserialized on its own.
pub(super) fn raw_integrations_of(value: Option<toml::Value>, path: &Path) -> Result<Vec<RawIntegration>, ConfigError> {
    let tables = match value {
        None => return Ok(Vec::new()),
        Some(toml::Value::Array(tables)) => tables,
        Some(other) => {
            return Err(ConfigError::field(
                path,
                at("integrations")(format!(
                    "must be an array of tables ([[integrations]]), found {}",
                    other.type_str()
                )),
            ));
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

/// Validates every integration in file order; ids must be unique.
pub(super) fn validate_integrations(
    raw: Vec<RawIntegration>,
    path: &Path,
    files: &SecretFiles,
    circuit_failures: u32,
) -> Result<Integrations, ConfigError> {
    let mut seen = HashSet::new();
    let mut list = Vec::with_capacity(raw.len());
    for (index, r) in raw.into_iter().enumerate() {
        let shown_id = integration_name(r.id.as_deref(), index);
        let err = |(field, message): FieldError| ConfigError::Integration {
            path: path.to_owned(),
            integration: shown_id.clone(),
            field,
            message,
        };
        let integration = r.validate(files, circuit_failures).map_err(err)?;
        if !seen.insert(integration.id.clone()) {
            return Err(err(at("id")("duplicate id: every integration needs its own".into())));
        }
        list.push(Arc::new(integration));
    }
    Ok(Integrations { list })
}

/// Fields an error about a missing or empty required value names.
fn required(value: Option<String>, field: &str, what: &str) -> Result<String, FieldError> {
    value
        .filter(|v| !v.is_empty())
        .ok_or_else(|| at(field)(format!("required{what}, and must not be empty")))
}

impl RawIntegration {
    fn validate(self, files: &SecretFiles, circuit_failures: u32) -> Result<Integration, FieldError> {
        let id = required(self.id.clone(), "id", "")?;
        let team_id = required(self.team_id.clone(), "team_id", "")?;
        let (channel, trigger_words, trigger_match) = self.matching()?;
        let token = files.secret(self.token.clone(), self.token_file.as_deref(), "token")?;
        let token = required(token, "token", " (or token_file)")?;
        let rate_limit = self.rate_limit.map(RawRateLimit::over_defaults).unwrap_or_default();
        check_rate(&rate_limit, ["rate_limit.per_second", "rate_limit.burst"])?;
        let channel_types = self.channel_types.unwrap_or_else(|| vec![ChannelType::Public]);
        if channel_types.is_empty() {
            return Err(at("channel_types")(
                "must name at least one of \"public\", \"private\", \"im\", \"mpim\" (leave it out for public only)"
                    .into(),
            ));
        }
        let failure_notice_interval_s = self.failure_notice_interval_s.unwrap_or(300);
        if failure_notice_interval_s == 0 {
            return Err(at("failure_notice_interval_s")("must be at least 1".into()));
        }
        if self.icon_url.is_some() && self.icon_emoji.is_some() {
            return Err(at("icon_emoji")("give icon_url or icon_emoji, not both".into()));
        }
        Ok(Integration {
            bot_name: self.bot_name.filter(|b| !b.is_empty()).unwrap_or_else(|| id.clone()),
            urls: handler_urls(self.urls.unwrap_or_default())?,
            signing_keys: signing_keys(self.signing_secret, self.signing_secret_file.as_deref(), files)?,
            headers: custom_headers(self.headers.unwrap_or_default())?,
            timeout: Duration::from_millis(positive(self.timeout_ms, 5000).map_err(at("timeout_ms"))?),
            max_attempts: positive(self.max_attempts, 8).map_err(at("max_attempts"))?,
            max_age: Duration::from_secs(positive(self.max_age_s, 600).map_err(at("max_age_s"))?),
            id,
            team_id,
            channel,
            channel_types,
            trigger_words,
            token,
            icon_url: self.icon_url,
            icon_emoji: self.icon_emoji,
            content_type: self.content_type.unwrap_or_default(),
            trigger_match,
            case_sensitive: self.case_sensitive.unwrap_or(false),
            rate_limit,
            circuit_failures: self.circuit_failures.unwrap_or(circuit_failures),
            on_failure: self.on_failure.unwrap_or_default(),
            failure_notice_interval: Duration::from_secs(failure_notice_interval_s),
        })
    }

    /// What the integration fires on: its channel, its trigger words (at
    /// least one of the two) and how the words are matched.
    fn matching(&self) -> Result<(Option<ChannelRef>, Vec<String>, TriggerMatch), FieldError> {
        let channel = self.channel.as_deref().map(channel_ref).transpose()?;
        let trigger_words = self.trigger_words.clone().unwrap_or_default();
        for (i, w) in trigger_words.iter().enumerate() {
            if w.trim().is_empty() {
                return Err((format!("trigger_words[{i}]"), "must not be empty".into()));
            }
        }
        if channel.is_none() && trigger_words.is_empty() {
            return Err(at("trigger_words")(
                "required when no channel is given (an integration needs a channel, trigger words, or both)".into(),
            ));
        }
        let trigger_match = self.trigger_match.unwrap_or_default();
        if trigger_match == TriggerMatch::Word
            && let Some(i) = trigger_words.iter().position(|w| w.chars().any(char::is_whitespace))
        {
            return Err((
                format!("trigger_words[{i}]"),
                "with trigger_match = \"word\" a trigger word must not contain whitespace".into(),
            ));
        }
        Ok((channel, trigger_words, trigger_match))
    }
}

/// `channel = "#name"`, `channel = "C2147483705"`, a Matrix room id
/// (`"!abc:example.org"`, an id) or a Matrix alias (`"#room:example.org"`:
/// a name kept whole, `#` included, matched against the room's canonical
/// alias).
fn channel_ref(text: &str) -> Result<ChannelRef, FieldError> {
    let c = text.trim();
    if c.starts_with('#') && c.contains(':') {
        if c.len() < 4 || c.starts_with("#:") || c.ends_with(':') {
            return Err(at("channel")("a Matrix alias is \"#room:server\"".into()));
        }
        Ok(ChannelRef::Name(c.to_owned()))
    } else if let Some(name) = c.strip_prefix('#') {
        if name.is_empty() {
            return Err(at("channel")("\"#\" needs a channel name after it".into()));
        }
        Ok(ChannelRef::Name(name.to_owned()))
    } else if c.is_empty() {
        Err(at("channel")("must not be empty (leave it out instead)".into()))
    } else {
        Ok(ChannelRef::Id(c.to_owned()))
    }
}

/// `urls = [...]`: at least one, each an absolute http(s) URL.
fn handler_urls(raw: Vec<String>) -> Result<Vec<Url>, FieldError> {
    if raw.is_empty() {
        return Err(at("urls")("at least one handler URL is required".into()));
    }
    raw.iter()
        .enumerate()
        .map(|(i, u)| parse_http_url(u).map_err(|m| (format!("urls[{i}]"), m)))
        .collect()
}

/// The keys of `signing_secret` (one or a list) and `signing_secret_file`
/// (one per line); each error names the secret at fault.
fn signing_keys(
    inline: Option<OneOrMany>,
    file: Option<&Path>,
    files: &SecretFiles,
) -> Result<Vec<Vec<u8>>, FieldError> {
    let inline_too = inline.is_some();
    let secrets: Vec<(String, String)> = match inline {
        None => Vec::new(),
        Some(OneOrMany::One(s)) => vec![("signing_secret".to_owned(), s)],
        Some(OneOrMany::Many(list)) => list
            .into_iter()
            .enumerate()
            .map(|(i, s)| (format!("signing_secret[{i}]"), s))
            .collect(),
    };
    let mut keys = Vec::with_capacity(secrets.len());
    for (field, s) in secrets {
        keys.push(signing_key(&s).map_err(|m| (field, m))?);
    }
    if let Some(file) = file {
        keys.extend(files.secret_lines(inline_too, file, "signing_secret", signing_key)?);
    }
    Ok(keys)
}

/// Headers swallow sets itself on every POST; an integration may not.
const OWN_HEADERS: &[&str] = &["content-type", "content-length", "host", "user-agent"];

/// Checks `headers = { … }`: valid names and values, none of swallow's own.
fn custom_headers(headers: BTreeMap<String, String>) -> Result<Vec<(http::HeaderName, http::HeaderValue)>, FieldError> {
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
