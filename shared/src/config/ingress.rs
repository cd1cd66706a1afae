//! `[ingress]`: the matcher's listener for chat platforms (docs/contract.md
//! §9), and `[ingress.slack]`, Slack's Events API. Raw structs are strict
//! (`deny_unknown_fields`); secrets may come from files, read (and hashed,
//! for the reload check) by the configuration's own secret reader.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
use url::Url;

use super::errors::{FieldError, at};
use super::secrets::SecretFiles;
use super::units::{parse_addr, parse_http_url};

/// Where the ingress listens unless `listen` says otherwise.
pub const DEFAULT_INGRESS_ADDR: &str = "0.0.0.0:9110";
/// Slack's Web API.
pub const DEFAULT_SLACK_API_BASE: &str = "https://slack.com/api";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIngress {
    listen: Option<String>,
    slack: Option<RawSlackIngress>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSlackIngress {
    signing_secret: Option<OneOrMany>,
    signing_secret_file: Option<PathBuf>,
    bot_token: Option<String>,
    bot_token_file: Option<PathBuf>,
    api_base: Option<String>,
}

/// `signing_secret = "…"` or `signing_secret = ["…", "…"]` (rotation).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// The validated `[ingress]` table: present only when configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressConfig {
    /// `listen` (`SWALLOW_INGRESS_ADDR` overrides).
    pub listen: SocketAddr,
    pub slack: Option<SlackIngress>,
}

/// `[ingress.slack]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlackIngress {
    /// Its Web API (`chat.postMessage`, `conversations.info`, …).
    pub api_base: Url,
    /// What a reload check may change: the secrets.
    pub secrets: SlackSecrets,
}

/// The Slack secrets in force; re-read from their files at every reload check.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct SlackSecrets {
    /// A request is genuine when signed with any of these (one per line of
    /// `signing_secret_file`: old and new during a rotation).
    pub signing_secrets: Vec<String>,
    /// The bot token (`xoxb-…`) for names and replies.
    pub bot_token: String,
}

impl std::fmt::Debug for SlackSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlackSecrets")
            .field("signing_secrets", &self.signing_secrets.len())
            .field("bot_token", &"<redacted>")
            .finish()
    }
}

/// Validates `[ingress]`; errors are `(field, message)`.
pub(super) fn validate(raw: RawIngress, files: &SecretFiles) -> Result<IngressConfig, FieldError> {
    let listen = raw.listen.unwrap_or_else(|| DEFAULT_INGRESS_ADDR.into());
    let listen = parse_addr(&listen).map_err(at("ingress.listen"))?;
    let Some(s) = raw.slack else {
        return Err((
            "ingress".into(),
            "an ingress needs a platform: add [ingress.slack]".into(),
        ));
    };
    let field = |f: &str| format!("ingress.slack.{f}");
    let base = s.api_base.unwrap_or_else(|| DEFAULT_SLACK_API_BASE.into());
    let api_base = parse_http_url(&base).map_err(|m| (field("api_base"), m))?;
    let inline = match s.signing_secret {
        None => None,
        Some(OneOrMany::One(one)) => Some(vec![one]),
        Some(OneOrMany::Many(many)) => Some(many),
    };
    // A file holds one secret per line; blank lines are skipped.
    let joined = inline.as_ref().map(|list| list.join("\n"));
    let signing_secrets: Vec<String> = files
        .secret(joined, s.signing_secret_file.as_deref(), "signing_secret")
        .map_err(|(f, m)| (field(&f), m))?
        .map(|text| {
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    if signing_secrets.is_empty() {
        return Err((
            field("signing_secret"),
            "[ingress.slack] needs signing_secret (one or a list) or signing_secret_file".into(),
        ));
    }
    if inline.is_some_and(|list| list.iter().any(|l| l.trim().is_empty() || l.contains('\n'))) {
        return Err((field("signing_secret"), "a secret may not be empty".into()));
    }
    let bot_token = files
        .secret(s.bot_token, s.bot_token_file.as_deref(), "bot_token")
        .map_err(|(f, m)| (field(&f), m))?
        .map(|t| t.trim().to_owned());
    let Some(bot_token) = bot_token.filter(|t| !t.is_empty()) else {
        return Err((
            field("bot_token"),
            "[ingress.slack] needs bot_token or bot_token_file (the bot's xoxb-… token)".into(),
        ));
    };
    if !bot_token.starts_with("xoxb-") {
        return Err((field("bot_token"), "a bot token starts with \"xoxb-\"".into()));
    }
    Ok(IngressConfig {
        listen,
        slack: Some(SlackIngress {
            api_base,
            secrets: SlackSecrets {
                signing_secrets,
                bot_token,
            },
        }),
    })
}

#[cfg(test)]
mod tests {
    use crate::Config;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, None).map_err(|e| e.to_string())
    }

    #[test]
    fn off_unless_configured() {
        assert!(parse("").unwrap().ingress.is_none());
    }

    #[test]
    fn a_slack_ingress_with_a_rotation() {
        let c = parse(
            "[ingress]\nlisten = \"127.0.0.1:9110\"\n[ingress.slack]\nsigning_secret = [\"old\", \"new\"]\nbot_token = \"xoxb-1\"\n",
        )
        .unwrap();
        let i = c.ingress.unwrap();
        assert_eq!(i.listen.to_string(), "127.0.0.1:9110");
        let s = i.slack.unwrap();
        assert_eq!(s.secrets.signing_secrets, ["old", "new"]);
        assert_eq!(s.api_base.as_str(), "https://slack.com/api");
        assert!(!format!("{s:?}").contains("xoxb-1"), "the token is never shown");
    }

    #[test]
    fn mistakes_name_their_field() {
        for (text, want) in [
            ("[ingress]\n", "ingress: an ingress needs a platform"),
            ("[ingress]\nport = 1\n", "ingress.port: unknown field"),
            (
                "[ingress.slack]\nbot_token = \"xoxb-1\"\n",
                "ingress.slack.signing_secret: ",
            ),
            ("[ingress.slack]\nsigning_secret = \"s\"\n", "ingress.slack.bot_token: "),
            (
                "[ingress.slack]\nsigning_secret = \"s\"\nbot_token = \"xoxp-1\"\n",
                "starts with \"xoxb-\"",
            ),
            (
                "[ingress.slack]\nsigning_secret = \"s\"\nbot_token = \"xoxb-1\"\napi_base = \"ftp://x\"\n",
                "ingress.slack.api_base",
            ),
            (
                "[ingress.slack]\nsigning_secret = \"s\"\nsigning_secret_file = \"f\"\nbot_token = \"xoxb-1\"\n",
                "not both",
            ),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn secret_files_hold_one_secret_a_line() {
        let dir = std::env::temp_dir().join(format!("swallow-ingress-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("signing"), "old\n\nnew\n").unwrap();
        std::fs::write(dir.join("token"), "xoxb-2\n").unwrap();
        let path = dir.join("swallow.toml");
        let text = "[ingress.slack]\nsigning_secret_file = \"signing\"\nbot_token_file = \"token\"\n";
        let c = Config::parse(text, Some(&path)).unwrap();
        let s = c.ingress.unwrap().slack.unwrap();
        assert_eq!(s.secrets.signing_secrets, ["old", "new"]);
        assert_eq!(s.secrets.bot_token, "xoxb-2");
        assert_eq!(c.secret_files.len(), 2, "both files are watched by the reload check");
        let _ = std::fs::remove_dir_all(dir);
    }
}
