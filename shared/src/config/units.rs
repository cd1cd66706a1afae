//! The units a configuration value is written in: durations (`7d`), sizes
//! (`1GiB`), positive counts, and http(s) URLs.

use std::time::Duration;

use serde::Deserialize;
use url::Url;

/// Parses a duration such as `10m`, `2h`, `7d`, `1w` or `90 seconds`
/// (a day is 24 hours).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let explain = || format!("{text:?} is not a duration such as 90s, 10m, 2h or 7d");
    let span: jiff::Span = text.trim().parse().map_err(|_| explain())?;
    let signed = span
        .to_duration(jiff::SpanRelativeTo::days_are_24_hours())
        .map_err(|_| explain())?;
    Duration::try_from(signed).map_err(|_| format!("{text:?} is negative"))
}

/// Parses a size: a number of bytes, or a number with `KiB`, `MiB`, `GiB`,
/// `KB`, `MB` or `GB`.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let unit_bytes: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(format!("{text:?} is not a size such as 1GiB, 500MB or 1048576")),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size such as 1GiB, 500MB or 1048576"))?;
    n.checked_mul(unit_bytes)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// A size as the file gives it: a number of bytes, or text such as `"1GiB"`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RawBytes {
    Number(u64),
    Text(String),
}

impl RawBytes {
    pub(super) fn bytes(self) -> Result<u64, String> {
        match self {
            RawBytes::Number(n) => Ok(n),
            RawBytes::Text(text) => parse_bytes(&text),
        }
    }
}

/// `value` (or `default` when absent) if it is at least 1: a count or a
/// duration of 0 would stop the stage's work, so it is refused, not raised.
pub(super) fn positive<T>(value: Option<T>, default: T) -> Result<T, String>
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

/// An absolute http or https URL with a host.
pub(super) fn parse_http_url(text: &str) -> Result<Url, String> {
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

/// A socket address such as `0.0.0.0:9101`.
pub(super) fn parse_addr(text: &str) -> Result<std::net::SocketAddr, String> {
    text.parse()
        .map_err(|e| format!("{text:?} is not a socket address: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86400)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("ten minutes").is_err());
        assert!(parse_duration("-5m").is_err());
        assert!(parse_duration("1 month").is_err(), "months have no fixed length");
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert_eq!(parse_bytes("500MB"), Ok(500_000_000));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("1 TB").is_err());
        assert!(parse_bytes("GiB").is_err());
    }
}
