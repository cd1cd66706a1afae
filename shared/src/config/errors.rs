//! How a configuration that cannot be used is reported: one line naming the
//! file, the integration and the field, with the closest known field for a
//! typo, because the person reading it is an operator looking at a
//! crash-looping pod.

use std::path::{Path, PathBuf};

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

/// A field of a table and what is wrong with it; the caller knows the file.
pub(super) type FieldError = (String, String);

/// A [`FieldError`] for a field named by a constant.
pub(super) fn at(field: &str) -> impl FnOnce(String) -> FieldError + '_ {
    move |message| (field.to_owned(), message)
}

impl ConfigError {
    pub(super) fn field(path: &Path, (field, message): FieldError) -> Self {
        ConfigError::Field {
            path: path.to_owned(),
            field,
            message,
        }
    }
}

/// Deserializes `value`; on error, the dotted path of the field at fault and
/// a message without TOML's caret diagram. An unknown field gets the closest
/// known one as a suggestion.
pub(super) fn from_value<T: serde::de::DeserializeOwned>(value: toml::Value) -> Result<T, FieldError> {
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
pub(super) fn syntax_error(text: &str, error: &toml::de::Error) -> String {
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
