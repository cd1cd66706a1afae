//! `ConfigToml`: swallow's configuration file, built up by a test: the
//! top-level keys, the `[broker]`, `[matcher]`, `[deliverer]`,
//! `[responder]` (and any other) tables and the `[[integrations]]`, each
//! value written as TOML. One builder for every test and the load
//! generator, so that a configuration reads as what it sets.
//!
//! ```ignore
//! let path = ConfigToml::on(&stack)
//!     .set("deliverer", "allow_networks", LOOPBACK)
//!     .integration(Integration::new("googlebot").channel("#test").url(handler.url("/hook")))
//!     .write(&dir);
//! ```

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::TestStack;

/// What a test's handlers on loopback need the deliverer to allow.
pub const LOOPBACK: &[&str] = &["127.0.0.0/8"];

/// A value written as TOML: strings quoted and escaped, floats with their
/// decimal point, arrays of these; `Raw` as given (an inline table, say).
pub trait TomlValue {
    fn toml(&self) -> String;
}

/// TOML text written as given, e.g. `Raw("{ per_second = 1.0, burst = 5 }")`.
pub struct Raw<S>(pub S);

impl<S: AsRef<str>> TomlValue for Raw<S> {
    fn toml(&self) -> String {
        self.0.as_ref().to_owned()
    }
}

impl TomlValue for str {
    fn toml(&self) -> String {
        // A JSON string is a TOML basic string.
        serde_json::to_string(self).expect("a string encodes")
    }
}

impl TomlValue for String {
    fn toml(&self) -> String {
        self.as_str().toml()
    }
}

impl TomlValue for f64 {
    fn toml(&self) -> String {
        format!("{self:?}")
    }
}

macro_rules! integers {
    ($($t:ty),*) => {$(
        impl TomlValue for $t {
            fn toml(&self) -> String {
                self.to_string()
            }
        }
    )*};
}
integers!(i32, i64, u16, u32, u64, usize, bool);

impl<T: TomlValue + ?Sized> TomlValue for &T {
    fn toml(&self) -> String {
        (**self).toml()
    }
}

impl<T: TomlValue> TomlValue for [T] {
    fn toml(&self) -> String {
        let items: Vec<String> = self.iter().map(TomlValue::toml).collect();
        format!("[{}]", items.join(", "))
    }
}

impl<T: TomlValue, const N: usize> TomlValue for [T; N] {
    fn toml(&self) -> String {
        self[..].toml()
    }
}

impl<T: TomlValue> TomlValue for Vec<T> {
    fn toml(&self) -> String {
        self[..].toml()
    }
}

/// An inline `{ per_second = …, burst = … }` rate limit.
pub fn rate_limit(per_second: f64, burst: u32) -> Raw<String> {
    Raw(format!("{{ per_second = {per_second:?}, burst = {burst} }}"))
}

/// Key-value lines in the order they were set (a key set again replaces
/// its value in place).
#[derive(Clone, Default)]
struct Lines(Vec<(String, String)>);

impl Lines {
    fn set(&mut self, key: &str, value: String) {
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = value,
            None => self.0.push((key.to_owned(), value)),
        }
    }

    fn write(&self, out: &mut String) {
        for (k, v) in &self.0 {
            let _ = writeln!(out, "{k} = {v}");
        }
    }
}

/// swallow's configuration file, built up key by key.
#[derive(Clone, Default)]
pub struct ConfigToml {
    top: Lines,
    tables: Vec<(String, Lines)>,
    integrations: Vec<Integration>,
    raw: String,
}

impl ConfigToml {
    /// An empty configuration (every key at its default).
    pub fn new() -> ConfigToml {
        ConfigToml::default()
    }

    /// `[broker]` with the stack's broker URL and prefix.
    pub fn on(stack: &TestStack) -> ConfigToml {
        ConfigToml::new().broker(&stack.url, &stack.prefix)
    }

    /// `[broker]` with `url` and `prefix`.
    pub fn broker(self, url: &str, prefix: &str) -> ConfigToml {
        self.set("broker", "url", url).set("broker", "prefix", prefix)
    }

    /// A top-level key (before every table), e.g. `reload_interval_ms`.
    pub fn top(mut self, key: &str, value: impl TomlValue) -> ConfigToml {
        self.top.set(key, value.toml());
        self
    }

    /// `key = value` in `[table]` (tables in the order first set).
    pub fn set(mut self, table: &str, key: &str, value: impl TomlValue) -> ConfigToml {
        let value = value.toml();
        match self.tables.iter_mut().find(|(t, _)| t == table) {
            Some((_, lines)) => lines.set(key, value),
            None => {
                let mut lines = Lines::default();
                lines.set(key, value);
                self.tables.push((table.to_owned(), lines));
            }
        }
        self
    }

    /// `[deliverer] allow_networks = ["127.0.0.0/8"]`: handlers on loopback.
    pub fn loopback(self) -> ConfigToml {
        self.set("deliverer", "allow_networks", LOOPBACK)
    }

    /// `[responder]` replies unthrottled for a test's pace (`per_second`
    /// per channel, as the burst too).
    pub fn responder_rate(self, per_second: f64) -> ConfigToml {
        self.set("responder", "per_channel_per_second", per_second).set(
            "responder",
            "per_channel_burst",
            per_second as u64,
        )
    }

    /// An `[[integrations]]` table.
    pub fn integration(mut self, integration: Integration) -> ConfigToml {
        self.integrations.push(integration);
        self
    }

    /// TOML written as given after everything else: for the tests of
    /// what a malformed or unusual file does.
    pub fn raw(mut self, text: &str) -> ConfigToml {
        self.raw.push_str(text);
        self
    }

    /// Writes the file as `swallow.toml` into `dir` and returns its path.
    pub fn write(&self, dir: &Path) -> PathBuf {
        crate::write_config(dir, &self.to_string())
    }
}

impl std::fmt::Display for ConfigToml {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut out = String::new();
        self.top.write(&mut out);
        for (table, lines) in &self.tables {
            let _ = writeln!(out, "[{table}]");
            lines.write(&mut out);
        }
        for integration in &self.integrations {
            out.push_str("\n[[integrations]]\n");
            out.push_str(&integration.to_string());
        }
        if !self.raw.is_empty() {
            out.push('\n');
            out.push_str(&self.raw);
        }
        f.write_str(&out)
    }
}

/// One `[[integrations]]` table: `id` and, unless changed, `team_id =
/// "T0001"` (the team of `chat_event`) and `token = "t"`.
#[derive(Clone)]
pub struct Integration {
    lines: Lines,
    raw: String,
}

impl Integration {
    pub fn new(id: &str) -> Integration {
        let mut lines = Lines::default();
        lines.set("id", id.toml());
        lines.set("team_id", "T0001".toml());
        Integration {
            lines,
            raw: String::new(),
        }
        .token("t")
    }

    /// Any key of the table.
    pub fn set(mut self, key: &str, value: impl TomlValue) -> Integration {
        self.lines.set(key, value.toml());
        self
    }

    pub fn team(self, team_id: &str) -> Integration {
        self.set("team_id", team_id)
    }

    pub fn channel(self, channel: &str) -> Integration {
        self.set("channel", channel)
    }

    pub fn trigger_words(self, words: &[&str]) -> Integration {
        self.set("trigger_words", words)
    }

    /// `urls = [url]`.
    pub fn url(self, url: impl AsRef<str>) -> Integration {
        self.set("urls", [url.as_ref()])
    }

    pub fn urls(self, urls: &[&str]) -> Integration {
        self.set("urls", urls)
    }

    pub fn token(self, token: &str) -> Integration {
        self.set("token", token)
    }

    /// Leaves `key` out (`token`, say, for a test of `token_file`).
    pub fn unset(mut self, key: &str) -> Integration {
        self.lines.0.retain(|(k, _)| k != key);
        self
    }

    /// Lines of TOML written as given at the table's end: for the tests of
    /// what an invalid or unusual integration does.
    pub fn raw(mut self, lines: &str) -> Integration {
        self.raw.push_str(lines);
        if !lines.ends_with('\n') {
            self.raw.push('\n');
        }
        self
    }

    /// `rate_limit = { per_second, burst }`.
    pub fn rate_limit(self, per_second: f64, burst: u32) -> Integration {
        self.set("rate_limit", rate_limit(per_second, burst))
    }
}

impl std::fmt::Display for Integration {
    /// The table's keys (without its `[[integrations]]` header).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut out = String::new();
        self.lines.write(&mut out);
        out.push_str(&self.raw);
        f.write_str(&out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configuration_reads_as_swallow_parses_it() {
        let text = ConfigToml::new()
            .broker("amqp://guest:guest@127.0.0.1:5672/%2f", "t-config")
            .top("reload_interval_ms", 100)
            .loopback()
            .responder_rate(1000.0)
            .integration(
                Integration::new("bot")
                    .channel("#test")
                    .trigger_words(&["bot:", "say \"hi\""])
                    .url("http://127.0.0.1:9/hook")
                    .rate_limit(5.0, 2)
                    .set("max_attempts", 2),
            )
            .to_string();
        let config = swallow_shared::config::Config::parse(&text, None).expect(&text);
        assert!(text.starts_with("reload_interval_ms = 100\n[broker]\n"), "{text}");
        assert_eq!(config.integrations.list.len(), 1, "{text}");
        assert_eq!(config.integrations.list[0].trigger_words, ["bot:", "say \"hi\""]);
        assert_eq!(config.reload_interval, std::time::Duration::from_millis(100));
    }
}
