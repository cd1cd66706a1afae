//! Slack's Events API: the request signature, the few payload fields
//! swallow reads, and the conversion of a `message` event into a chat event
//! (docs/contract.md §3, §9).
//!
//! A serde layer of our own rather than `slack-morphism`'s models: swallow
//! reads a dozen fields of three payloads, and unknown event types and
//! subtypes must pass through as "not a message", never as a parse error.

use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

use swallow_shared::ChatEvent;

/// The platform name events from Slack carry (`"platform": "slack"`).
pub const PLATFORM: &str = "slack";

/// How far a request's timestamp may be from now (Slack's own advice).
pub const MAX_SKEW_S: i64 = 5 * 60;

/// Why a request's signature was refused (a bounded log field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadSignature {
    Missing,
    Stale,
    Mismatch,
}

impl BadSignature {
    pub fn as_str(self) -> &'static str {
        match self {
            BadSignature::Missing => "missing signature or timestamp",
            BadSignature::Stale => "timestamp more than 5 minutes from now",
            BadSignature::Mismatch => "signature matches no signing secret",
        }
    }
}

/// Checks `X-Slack-Signature` (`v0=` + hex HMAC-SHA256 of
/// `v0:<timestamp>:<body>`) against every secret, in constant time, and
/// the timestamp against `now_s`.
pub fn verify(
    secrets: &[String],
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now_s: i64,
) -> Result<(), BadSignature> {
    let (Some(timestamp), Some(signature)) = (timestamp, signature) else {
        return Err(BadSignature::Missing);
    };
    let ts: i64 = timestamp.trim().parse().map_err(|_| BadSignature::Missing)?;
    if (now_s - ts).abs() > MAX_SKEW_S {
        return Err(BadSignature::Stale);
    }
    let given = signature
        .strip_prefix("v0=")
        .and_then(decode_hex)
        .ok_or(BadSignature::Mismatch)?;
    // `verify_slice` compares in constant time.
    let matches = secrets
        .iter()
        .any(|secret| mac_for(secret, timestamp, body).verify_slice(&given).is_ok());
    if matches { Ok(()) } else { Err(BadSignature::Mismatch) }
}

fn mac_for(secret: &str, timestamp: &str, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes a key of any length");
    mac.update(b"v0:");
    mac.update(timestamp.as_bytes());
    mac.update(b":");
    mac.update(body);
    mac
}

/// The `X-Slack-Signature` Slack would send (for tests and the stand-in).
pub fn sign(secret: &str, timestamp: &str, body: &[u8]) -> String {
    let bytes = mac_for(secret, timestamp, body).finalize().into_bytes();
    let mut out = String::with_capacity(3 + 2 * bytes.len());
    out.push_str("v0=");
    for b in bytes {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The outer payload: `url_verification`, `event_callback`, or another
/// type (counted, answered 200).
#[derive(Debug, Deserialize)]
pub struct Envelope {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub challenge: Option<String>,
    #[serde(default)]
    pub team_id: Option<String>,
    #[serde(default)]
    pub event_id: Option<String>,
    #[serde(default)]
    pub event: Option<InnerEvent>,
}

/// The inner event; only `message` events are read further.
#[derive(Debug, Deserialize)]
pub struct InnerEvent {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub subtype: Option<String>,
    #[serde(default)]
    pub channel: Option<String>,
    #[serde(default)]
    pub channel_type: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub bot_id: Option<String>,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub ts: Option<String>,
    #[serde(default)]
    pub thread_ts: Option<String>,
    /// The user's team, which in a shared channel may not be the app's.
    #[serde(default)]
    pub team: Option<String>,
}

/// Message subtypes that are messages someone posted: published (a bot's
/// with its `bot_id`/`subtype`, for the matcher's loop guard). Edits
/// (`message_changed`), deletions and the rest are not messages to match.
const POSTED_SUBTYPES: &[&str] = &["bot_message", "thread_broadcast", "file_share", "me_message"];

/// A `message` event as the chat event swallow matches, names left empty
/// (they are looked up next); `None` when it is not a posted message.
pub fn to_chat_event(team_id: &str, e: &InnerEvent) -> Option<ChatEvent> {
    if e.kind != "message" {
        return None;
    }
    if let Some(sub) = e.subtype.as_deref()
        && !POSTED_SUBTYPES.contains(&sub)
    {
        return None;
    }
    let channel = e.channel.as_deref().filter(|c| !c.is_empty())?;
    let ts = e.ts.as_deref().filter(|t| !t.is_empty())?;
    // A bot's message may have no user; the loop guard needs it anyway.
    let user = e
        .user
        .as_deref()
        .filter(|u| !u.is_empty())
        .or(e.bot_id.as_deref())
        .filter(|u| !u.is_empty())?;
    let channel_type = match e.channel_type.as_deref() {
        Some("channel") | None => "public",
        Some("group") => "private",
        Some("im") => "im",
        Some("mpim") => "mpim",
        Some(_) => "private",
    };
    Some(ChatEvent {
        team_id: team_id.to_owned(),
        team_domain: String::new(),
        channel_id: channel.to_owned(),
        channel_name: String::new(),
        channel_type: Some(channel_type.to_owned()),
        user_id: user.to_owned(),
        user_name: String::new(),
        ts: ts.to_owned(),
        thread_ts: e.thread_ts.clone().filter(|t| !t.is_empty()),
        text: e.text.clone().unwrap_or_default(),
        bot_id: e.bot_id.clone().filter(|b| !b.is_empty()),
        subtype: e.subtype.clone(),
        platform: Some(PLATFORM.to_owned()),
        event_id: None,
        channel_alias: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Slack's documented example ("Verifying requests from Slack").
    const SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
    const TS: &str = "1531420618";
    const BODY: &str = "token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
    const SIGNATURE: &str = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503";

    #[test]
    fn slacks_documented_example() {
        assert_eq!(sign(SECRET, TS, BODY.as_bytes()), SIGNATURE);
        let now = 1_531_420_618 + 60;
        let secrets = ["another".to_owned(), SECRET.to_owned()];
        assert_eq!(
            verify(&secrets, Some(TS), Some(SIGNATURE), BODY.as_bytes(), now),
            Ok(())
        );
    }

    #[test]
    fn refusals() {
        let secrets = [SECRET.to_owned()];
        let body = BODY.as_bytes();
        let now = 1_531_420_618;
        let check = |ts, sig, body, now| verify(&secrets, ts, sig, body, now);
        assert_eq!(check(None, Some(SIGNATURE), body, now), Err(BadSignature::Missing));
        assert_eq!(check(Some(TS), None, body, now), Err(BadSignature::Missing));
        assert_eq!(
            check(Some(TS), Some(SIGNATURE), body, now + MAX_SKEW_S + 1),
            Err(BadSignature::Stale)
        );
        assert_eq!(
            check(Some(TS), Some(SIGNATURE), b"token=changed", now),
            Err(BadSignature::Mismatch)
        );
        assert_eq!(check(Some(TS), Some("v0=zz"), body, now), Err(BadSignature::Mismatch));
        assert_eq!(
            check(Some(TS), Some(&SIGNATURE.replace("v0=", "v1=")), body, now),
            Err(BadSignature::Mismatch)
        );
        let other = ["not-the-secret".to_owned()];
        assert_eq!(
            verify(&other, Some(TS), Some(SIGNATURE), body, now),
            Err(BadSignature::Mismatch)
        );
    }

    fn inner(json: serde_json::Value) -> InnerEvent {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn messages_become_chat_events() {
        let e = inner(serde_json::json!({
            "type": "message", "channel": "C1", "user": "U1", "text": "googlebot: hi",
            "ts": "1355517523.000005", "channel_type": "group", "event_ts": "1"
        }));
        let c = to_chat_event("T1", &e).unwrap();
        assert_eq!(
            (c.team_id.as_str(), c.channel_id.as_str(), c.user_id.as_str()),
            ("T1", "C1", "U1")
        );
        assert_eq!(c.channel_type.as_deref(), Some("private"));
        assert_eq!(c.platform.as_deref(), Some("slack"));
        for (kind, want) in [("channel", "public"), ("im", "im"), ("mpim", "mpim")] {
            let e = inner(serde_json::json!({"type": "message", "channel": "C1", "user": "U1",
                "text": "x", "ts": "1.0", "channel_type": kind}));
            assert_eq!(to_chat_event("T1", &e).unwrap().channel_type.as_deref(), Some(want));
        }
        let bot = inner(serde_json::json!({"type": "message", "subtype": "bot_message",
            "channel": "C1", "bot_id": "B1", "text": "x", "ts": "1.0"}));
        let c = to_chat_event("T1", &bot).unwrap();
        assert!(c.is_from_bot(), "the loop guard sees it");
        for sub in ["message_changed", "message_deleted", "channel_join"] {
            let e = inner(serde_json::json!({"type": "message", "subtype": sub, "channel": "C1",
                "user": "U1", "text": "x", "ts": "1.0"}));
            assert!(to_chat_event("T1", &e).is_none(), "{sub}");
        }
        let other = inner(serde_json::json!({"type": "reaction_added", "user": "U1"}));
        assert!(to_chat_event("T1", &other).is_none());
    }
}
