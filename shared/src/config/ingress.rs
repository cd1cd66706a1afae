//! `[ingress]`: the matcher's listener for chat platforms (docs/contract.md
//! §9), `[ingress.slack]`, Slack's Events API, and `[ingress.matrix]`, a
//! Matrix homeserver's Application Service API. Raw structs are strict
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
    matrix: Option<RawMatrixIngress>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatrixIngress {
    homeserver_url: Option<String>,
    server_name: Option<String>,
    as_token: Option<String>,
    as_token_file: Option<PathBuf>,
    hs_token: Option<String>,
    hs_token_file: Option<PathBuf>,
    sender_localpart: Option<String>,
    registration_url: Option<String>,
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
    pub matrix: Option<MatrixIngress>,
}

/// The bot's localpart unless `sender_localpart` says otherwise.
pub const DEFAULT_SENDER_LOCALPART: &str = "swallow";

/// `[ingress.matrix]`: swallow as an application service of one homeserver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MatrixIngress {
    /// The client-server API's base (`https://matrix.example.org`).
    pub homeserver_url: Url,
    /// The homeserver's name: the `:server` of its ids, and the events' `team_id`.
    pub server_name: String,
    /// The bot's localpart; swallow's virtual users are `<it>_<name>`.
    pub sender_localpart: String,
    /// The ingress's public URL, for the registration file.
    pub registration_url: Option<Url>,
    /// What a reload check may change: the tokens.
    pub secrets: MatrixSecrets,
}

impl MatrixIngress {
    /// `@<sender_localpart>:<server_name>`.
    pub fn bot_user_id(&self) -> String {
        format!("@{}:{}", self.sender_localpart, self.server_name)
    }
}

/// The Matrix tokens in force; re-read from their files at every reload check.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct MatrixSecrets {
    /// swallow's token towards the homeserver (client-server API).
    pub as_token: String,
    /// The homeserver's token towards swallow (its transactions carry it).
    pub hs_token: String,
}

impl std::fmt::Debug for MatrixSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MatrixSecrets")
            .field("as_token", &"<redacted>")
            .field("hs_token", &"<redacted>")
            .finish()
    }
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
    if raw.slack.is_none() && raw.matrix.is_none() {
        return Err((
            "ingress".into(),
            "an ingress needs a platform: add [ingress.slack], [ingress.matrix] or both".into(),
        ));
    }
    let matrix = raw.matrix.map(|m| validate_matrix(m, files)).transpose()?;
    let slack = raw.slack.map(|s| validate_slack(s, files)).transpose()?;
    Ok(IngressConfig { listen, slack, matrix })
}

fn validate_matrix(m: RawMatrixIngress, files: &SecretFiles) -> Result<MatrixIngress, FieldError> {
    let field = |f: &str| format!("ingress.matrix.{f}");
    let Some(base) = m.homeserver_url else {
        return Err((field("homeserver_url"), "[ingress.matrix] needs homeserver_url".into()));
    };
    let homeserver_url = parse_http_url(&base).map_err(|e| (field("homeserver_url"), e))?;
    let server_name = m.server_name.map(|s| s.trim().to_owned()).unwrap_or_default();
    if server_name.is_empty() || server_name.contains(['/', ' ', '@', '#', '!']) {
        return Err((
            field("server_name"),
            "[ingress.matrix] needs server_name, the homeserver's name (e.g. \"example.org\")".into(),
        ));
    }
    let sender_localpart = m.sender_localpart.unwrap_or_else(|| DEFAULT_SENDER_LOCALPART.into());
    let valid = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "._=-/".contains(c);
    if sender_localpart.is_empty() || !sender_localpart.chars().all(valid) {
        return Err((
            field("sender_localpart"),
            "a localpart is lowercase letters, digits and ._=-/".into(),
        ));
    }
    let registration_url = m
        .registration_url
        .map(|u| parse_http_url(&u).map_err(|e| (field("registration_url"), e)))
        .transpose()?;
    let token = |inline, file: Option<PathBuf>, name: &str| {
        let value = files
            .secret(inline, file.as_deref(), name)
            .map_err(|(f, e)| (field(&f), e))?
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty());
        value.ok_or_else(|| (field(name), format!("[ingress.matrix] needs {name} or {name}_file")))
    };
    let as_token = token(m.as_token, m.as_token_file, "as_token")?;
    let hs_token = token(m.hs_token, m.hs_token_file, "hs_token")?;
    if as_token == hs_token {
        return Err((field("hs_token"), "as_token and hs_token must differ".into()));
    }
    Ok(MatrixIngress {
        homeserver_url,
        server_name,
        sender_localpart,
        registration_url,
        secrets: MatrixSecrets { as_token, hs_token },
    })
}

fn validate_slack(s: RawSlackIngress, files: &SecretFiles) -> Result<SlackIngress, FieldError> {
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
    Ok(SlackIngress {
        api_base,
        secrets: SlackSecrets {
            signing_secrets,
            bot_token,
        },
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
    fn a_matrix_ingress() {
        let c = parse(
            "[ingress.matrix]\nhomeserver_url = \"http://127.0.0.1:8008\"\nserver_name = \"example.org\"\nas_token = \"a\"\nhs_token = \"h\"\n",
        )
        .unwrap();
        let i = c.ingress.unwrap();
        assert!(i.slack.is_none());
        let m = i.matrix.unwrap();
        assert_eq!(m.bot_user_id(), "@swallow:example.org");
        assert_eq!((m.secrets.as_token.as_str(), m.secrets.hs_token.as_str()), ("a", "h"));
        assert!(!format!("{m:?}").contains("\"a\""), "tokens are never shown");
        for (text, want) in [
            (
                "server_name = \"x\"\nas_token = \"a\"\nhs_token = \"h\"\n",
                "ingress.matrix.homeserver_url",
            ),
            (
                "homeserver_url = \"http://h/\"\nas_token = \"a\"\nhs_token = \"h\"\n",
                "ingress.matrix.server_name",
            ),
            (
                "homeserver_url = \"http://h/\"\nserver_name = \"x\"\nhs_token = \"h\"\n",
                "ingress.matrix.as_token",
            ),
            (
                "homeserver_url = \"http://h/\"\nserver_name = \"x\"\nas_token = \"a\"\nhs_token = \"a\"\n",
                "must differ",
            ),
            (
                "homeserver_url = \"http://h/\"\nserver_name = \"x\"\nas_token = \"a\"\nhs_token = \"h\"\nsender_localpart = \"Bot\"\n",
                "ingress.matrix.sender_localpart",
            ),
        ] {
            let err = parse(&format!("[ingress.matrix]\n{text}")).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err}");
        }
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
