//! Chat events as the chat platform publishes them (docs/contract.md §3), and the
//! check that turns raw bytes into one or into a reason it is invalid.

use serde::{Deserialize, Serialize};

/// Events larger than this go to `<prefix>.events.invalid`.
pub const MAX_EVENT_BYTES: usize = 64 * 1024;

/// One chat message. `team_id`, `channel_id`, `user_id`, `ts` and `text` are
/// required; everything else defaults to empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatEvent {
    pub team_id: String,
    #[serde(default)]
    pub team_domain: String,
    pub channel_id: String,
    #[serde(default)]
    pub channel_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel_type: Option<String>,
    pub user_id: String,
    #[serde(default)]
    pub user_name: String,
    pub ts: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread_ts: Option<String>,
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bot_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subtype: Option<String>,
    /// The chat platform whose ingress received it (`"slack"`); absent for
    /// events published directly. Replies go back to it (docs/contract.md §6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    /// The platform's own id of the message when `ts` is not one (a Matrix
    /// event id, `$…`): the `webhook-id` is derived from it, and a reply
    /// threads under it (docs/contract.md §3, §9).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    /// The room's canonical alias (`#room:server`) on Matrix, which an
    /// integration's `channel` may name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel_alias: Option<String>,
}

/// Why an event was refused. The variant is a bounded metric label; the
/// message is the `x-swallow-error` header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidEvent {
    #[error("too_large: event is {0} bytes, the limit is 65536")]
    TooLarge(usize),
    #[error("not_json: {0}")]
    NotJson(String),
    #[error("bad_field: {0}")]
    BadField(String),
}

impl InvalidEvent {
    /// A short, bounded reason for metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            InvalidEvent::TooLarge(_) => "too_large",
            InvalidEvent::NotJson(_) => "not_json",
            InvalidEvent::BadField(_) => "bad_field",
        }
    }
}

impl ChatEvent {
    /// Parses an event from the bytes of a broker message.
    pub fn parse(bytes: &[u8]) -> Result<ChatEvent, InvalidEvent> {
        if bytes.len() > MAX_EVENT_BYTES {
            return Err(InvalidEvent::TooLarge(bytes.len()));
        }
        let event: ChatEvent = serde_json::from_slice(bytes).map_err(|e| {
            use serde_json::error::Category;
            match e.classify() {
                Category::Data => InvalidEvent::BadField(e.to_string()),
                _ => InvalidEvent::NotJson(e.to_string()),
            }
        })?;
        for (name, value) in [
            ("team_id", &event.team_id),
            ("channel_id", &event.channel_id),
            ("user_id", &event.user_id),
            ("ts", &event.ts),
        ] {
            if value.is_empty() {
                return Err(InvalidEvent::BadField(format!("`{name}` must not be empty")));
            }
        }
        Ok(event)
    }

    /// Whether a bot posted it (a reply of ours, or any other bot): such
    /// messages never trigger, so a reply cannot loop.
    pub fn is_from_bot(&self) -> bool {
        self.bot_id.as_deref().is_some_and(|b| !b.is_empty()) || self.subtype.as_deref() == Some("bot_message")
    }
}

/// A Slack `ts` ("1355517523.000005") as milliseconds since the epoch.
pub fn ts_to_millis(ts: &str) -> Option<u64> {
    let secs: f64 = ts.parse().ok()?;
    (secs.is_finite() && secs > 0.0).then_some((secs * 1000.0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_event_parses() {
        let raw = br#"{"team_id":"T0001","team_domain":"example","channel_id":"C2147483705",
 "channel_name":"test","channel_type":"public","user_id":"U2147483697",
 "user_name":"Steve","ts":"1355517523.000005","thread_ts":null,
 "text":"googlebot: What is the air-speed velocity of an unladen swallow?",
 "bot_id":null,"subtype":null}"#;
        let e = ChatEvent::parse(raw).unwrap();
        assert_eq!(e.user_name, "Steve");
        assert!(!e.is_from_bot());
        assert_eq!(ts_to_millis(&e.ts), Some(1_355_517_523_000));
    }

    #[test]
    fn invalid_events_say_why() {
        let cases: &[(&[u8], &str)] = &[
            (b"not json", "not_json"),
            (b"{\"team_id\":\"T\"", "not_json"),
            (b"\xff\xfe{}", "not_json"),
            (
                b"{\"team_id\":\"T\",\"channel_id\":\"C\",\"user_id\":\"U\",\"text\":\"x\"}",
                "bad_field: missing field `ts`",
            ),
            (
                b"{\"team_id\":\"T\",\"channel_id\":\"C\",\"user_id\":\"U\",\"ts\":\"\",\"text\":\"x\"}",
                "bad_field: `ts` must not be empty",
            ),
            (
                b"{\"team_id\":1,\"channel_id\":\"C\",\"user_id\":\"U\",\"ts\":\"1\",\"text\":\"x\"}",
                "bad_field: invalid type",
            ),
            (b"[1,2]", "bad_field"),
        ];
        for (raw, want) in cases {
            let got = ChatEvent::parse(raw).unwrap_err().to_string();
            assert!(got.starts_with(want), "{:?}: got {got}", String::from_utf8_lossy(raw));
        }
        let big = vec![b' '; MAX_EVENT_BYTES + 1];
        assert_eq!(ChatEvent::parse(&big).unwrap_err().reason(), "too_large");
    }
}
