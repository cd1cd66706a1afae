//! The messages that travel between stages over the broker.
//!
//! Every message carries a version `v`. Readers accept any version up to the
//! one they know and ignore fields they do not know, so a new field can be
//! rolled out stage by stage; a message from a newer major version is
//! dead-lettered rather than misread.

use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::event::ChatEvent;
use crate::pacing::Slot;

/// The version of [`DeliveryJob`] and [`ReplyJob`] this build writes.
pub const MESSAGE_VERSION: u32 = 1;

/// Milliseconds since the Unix epoch, now.
pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn version() -> u32 {
    MESSAGE_VERSION
}

/// One POST to make: a matched event, for one integration, to one URL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveryJob {
    #[serde(default = "version")]
    pub v: u32,
    /// The POST's `webhook-id`. Derived from the event, integration and URL,
    /// so a redelivered event produces the same id and handlers can de-duplicate.
    pub delivery_id: String,
    pub integration_id: String,
    pub url: String,
    /// The trigger word that matched; empty when the channel alone matched.
    pub trigger_word: String,
    pub event: ChatEvent,
    /// Age, attempts and the wait on the ladder; flattened, so the JSON is
    /// what version 1 always wrote.
    #[serde(flatten)]
    pub retry: RetryState,
}

impl DeliveryJob {
    /// The deterministic `webhook-id` of one (event, integration, URL).
    pub fn delivery_id_for(event: &ChatEvent, integration_id: &str, url_index: usize) -> String {
        let key = format!(
            "{}\u{0}{}\u{0}{}\u{0}{}\u{0}{}",
            event.team_id, event.channel_id, event.ts, integration_id, url_index
        );
        format!(
            "msg_{}",
            uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, key.as_bytes()).simple()
        )
    }
}

/// What a handler answered, as far as replies go (docs/contract.md §5).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HandlerAnswer {
    #[serde(default)]
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icon_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icon_emoji: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attachments: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread_ts: Option<String>,
}

/// A reply to post into a channel, made by the deliverer for the responder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplyJob {
    #[serde(default = "version")]
    pub v: u32,
    pub delivery_id: String,
    pub integration_id: String,
    pub team_id: String,
    pub channel_id: String,
    /// The triggering message's `ts`.
    pub in_reply_to: String,
    /// The triggering message's thread, when it was in one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_thread_ts: Option<String>,
    pub answer: HandlerAnswer,
    /// Flattened like [`DeliveryJob::retry`].
    #[serde(flatten)]
    pub retry: RetryState,
}

/// Where a job stands in its life: how old it is, the attempts made, when it
/// may next be tried and whether it holds a rate-limit slot for then. Both
/// job types carry it (flattened into their JSON, so the fields sit where
/// version 1 put them); the stages read and change it only through its
/// methods and [`crate::lifecycle`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetryState {
    /// When the job was made (ms since epoch); `max_age` counts from here.
    pub created_at_ms: u64,
    /// Attempts made so far.
    #[serde(default)]
    pub attempt: u32,
    /// Not to be attempted before this time (ms since epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before_ms: Option<u64>,
    /// The job already holds a rate-limit token for `not_before_ms`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rate_reserved: bool,
    /// It missed a reserved slot once and took a new one (see `pacing`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub slot_missed: bool,
    /// What went wrong on the last attempt, for the dead-letter headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl RetryState {
    /// A job made at `created_at_ms`, not yet attempted.
    pub fn new(created_at_ms: u64) -> Self {
        RetryState {
            created_at_ms,
            attempt: 0,
            not_before_ms: None,
            rate_reserved: false,
            slot_missed: false,
            last_error: None,
        }
    }

    /// When a job of this age is too old under `max_age` (ms since epoch).
    pub fn deadline_ms(&self, max_age: Duration) -> u64 {
        self.created_at_ms + max_age.as_millis() as u64
    }

    /// The rate-limit fields, for [`crate::pacing::RateLimiter::turn`].
    pub fn slot(&mut self) -> Slot<'_> {
        Slot {
            reserved: &mut self.rate_reserved,
            missed: &mut self.slot_missed,
            not_before_ms: &mut self.not_before_ms,
        }
    }

    /// Parks the job for `wait` from `now_ms` holding the token it already
    /// paid (an integration busy with attempts: it keeps its turn).
    pub fn hold_token_for(&mut self, wait: Duration, now_ms: u64) {
        self.rate_reserved = true;
        self.not_before_ms = Some(now_ms + wait.as_millis() as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_ids_are_stable_and_distinct() {
        let e: ChatEvent =
            serde_json::from_str(r#"{"team_id":"T","channel_id":"C","user_id":"U","ts":"1.2","text":"x"}"#).unwrap();
        let a = DeliveryJob::delivery_id_for(&e, "g", 0);
        assert_eq!(a, DeliveryJob::delivery_id_for(&e, "g", 0));
        assert_ne!(a, DeliveryJob::delivery_id_for(&e, "g", 1));
        assert_ne!(a, DeliveryJob::delivery_id_for(&e, "h", 0));
        assert!(a.starts_with("msg_"));
    }

    #[test]
    fn older_and_newer_fields_are_tolerated() {
        let j: DeliveryJob = serde_json::from_str(
            r#"{"delivery_id":"d","integration_id":"g","url":"http://x/","trigger_word":"",
               "event":{"team_id":"T","channel_id":"C","user_id":"U","ts":"1","text":"x"},
               "created_at_ms":1,"a_future_field":true}"#,
        )
        .unwrap();
        assert_eq!(j.v, 1);
        assert_eq!(j.retry, RetryState::new(1));
    }
}
