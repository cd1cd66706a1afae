//! The messages that travel between stages over the broker.
//!
//! Every message carries a version `v`. Readers accept any version up to the
//! one they know and ignore fields they do not know, so a new field can be
//! rolled out stage by stage; a message from a newer major version is
//! dead-lettered rather than misread.

use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::event::ChatEvent;

/// The newest version of [`DeliveryJob`] and [`ReplyJob`] this build
/// reads and writes (docs/contract.md §3).
///
/// Version 2 adds the platform a message came from (the event's
/// `platform`, the reply's `platform`): a stage of version 1 would ignore
/// it and send the reply to its own sink, so a message that has one is
/// written as version 2, which version 1 refuses (dead-letters as
/// `unsupported_version`, to be replayed) rather than misroutes. A message
/// without one is written as version 1, exactly as before, so the previous
/// version keeps taking everything that does not come through an ingress.
///
/// Version 3 is version 2 for platforms other than Slack (Matrix): the
/// event carries an `event_id`, the `webhook-id` is derived from it rather
/// than from `ts`, and the reply's `in_reply_to` is that id. A stage of
/// version 2 would send such a reply nowhere it can post; it refuses it
/// (`unsupported_version`, to be replayed) instead.
pub const MESSAGE_VERSION: u32 = 3;

/// The version a message is written in: 1 without a platform, 2 from
/// Slack's ingress, 3 from any other.
pub fn version_for(platform: Option<&str>) -> u32 {
    match platform {
        None => 1,
        Some("slack") => 2,
        Some(_) => 3,
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A message without `v` is version 1 (docs/contract.md §3).
fn version() -> u32 {
    1
}

/// One POST to make: a matched event, for one integration, to one URL.
///
/// On the wire the retry state's fields sit beside the others, where version
/// 1 put them: flattened when written, and read through [`wire`], whose
/// decode structs spell them out (serde's `flatten` would buffer the whole
/// job, event included, in an intermediate tree on every decode).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "wire::DeliveryJobIn")]
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
    /// Age, attempts and the wait on the ladder; inline in the JSON.
    #[serde(flatten)]
    pub retry: RetryState,
}

impl DeliveryJob {
    /// The JSON of a new job (version [`MESSAGE_VERSION`], not yet attempted),
    /// written from borrowed parts: the matcher makes one per matched URL and
    /// need not copy the event into each.
    pub fn encode_new(
        event: &ChatEvent,
        integration_id: &str,
        url_index: usize,
        url: &str,
        trigger_word: &str,
        created_at_ms: u64,
    ) -> Vec<u8> {
        let retry = RetryState::new(created_at_ms);
        let job = wire::DeliveryJobOut {
            v: version_for(event.platform.as_deref()),
            delivery_id: &Self::delivery_id_for(event, integration_id, url_index),
            integration_id,
            url,
            trigger_word,
            event,
            retry: &retry,
        };
        let e = event;
        let strings = e.text.len()
            + e.team_domain.len()
            + e.channel_name.len()
            + e.user_name.len()
            + url.len()
            + trigger_word.len();
        to_json(&job, strings)
    }

    /// The deterministic `webhook-id` of one (event, integration, URL): a
    /// UUID v5 of the five joined by NULs (the event's `event_id` in place
    /// of its `ts` when it has one: a Matrix event's id is unique, its
    /// millisecond timestamp need not be). Built by appending, not with
    /// `format!`, which cost as much as the SHA-1 (one per matched URL).
    pub fn delivery_id_for(event: &ChatEvent, integration_id: &str, url_index: usize) -> String {
        let index = url_index.to_string();
        let key = [
            event.team_id.as_str(),
            &event.channel_id,
            event.event_id.as_deref().unwrap_or(&event.ts),
            integration_id,
            &index,
        ]
        .join("\u{0}");
        let id = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, key.as_bytes());
        ["msg_", id.simple().encode_lower(&mut uuid::Uuid::encode_buffer())].concat()
    }
}

/// The JSON of a message whose strings come to about `strings` bytes,
/// written into a buffer sized for it once: `serde_json::to_vec` starts at
/// 128 bytes and doubles, copying a job (about 400 bytes) twice and a
/// reply once on the way to their size.
pub fn to_json(value: &impl Serialize, strings: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(strings + JSON_OVERHEAD);
    serde_json::to_writer(&mut out, value).expect("swallow's messages always serialize");
    out
}

/// Room in [`to_json`]'s buffer for what a message holds besides its long
/// strings: field names, ids, timestamps, the retry state.
const JSON_OVERHEAD: usize = 384;

/// `<team_id>.<channel_id>`: the routing key of a reply published to
/// `<prefix>.chat.outbound` (docs/contract.md §6), how a reply's channel
/// is named in its dead letter, and the key `swallow-chat` publishes
/// events under.
pub fn channel_key(team_id: &str, channel_id: &str) -> String {
    [team_id, ".", channel_id].concat()
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
/// Its retry state is inline on the wire, like [`DeliveryJob`]'s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "wire::ReplyJobIn")]
pub struct ReplyJob {
    #[serde(default = "version")]
    pub v: u32,
    pub delivery_id: String,
    pub integration_id: String,
    pub team_id: String,
    pub channel_id: String,
    /// The triggering message's `ts` (its `event_id` when it has one, version 3).
    pub in_reply_to: String,
    /// The triggering message's thread, when it was in one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_thread_ts: Option<String>,
    pub answer: HandlerAnswer,
    /// The platform the triggering event came from (version 2); the
    /// responder posts the reply there rather than to its sink.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    /// Inline in the JSON, like [`DeliveryJob::retry`].
    #[serde(flatten)]
    pub retry: RetryState,
}

/// The jobs as JSON: every field of version 1, in its order, the retry
/// state's spelled out at the top level. Readers ignore fields they do not
/// know (a newer minor version's), as before.
mod wire {
    use serde::{Deserialize, Serialize};

    use super::{DeliveryJob, HandlerAnswer, ReplyJob, RetryState, version};
    use crate::wire::event::ChatEvent;

    /// A new job written from borrowed parts ([`DeliveryJob::encode_new`]);
    /// the same JSON as [`DeliveryJob`]'s (`flatten` on a serializer lays
    /// the retry state's fields out in place and costs nothing on decode).
    #[derive(Serialize)]
    pub(super) struct DeliveryJobOut<'a> {
        pub v: u32,
        pub delivery_id: &'a str,
        pub integration_id: &'a str,
        pub url: &'a str,
        pub trigger_word: &'a str,
        pub event: &'a ChatEvent,
        #[serde(flatten)]
        pub retry: &'a RetryState,
    }

    /// A decode struct: the job's own fields, then [`RetryState`]'s as its
    /// own (not flattened: serde's `flatten` decodes through a buffered
    /// copy of the whole object), and `retry()` to take those out.
    macro_rules! decoded_with_retry {
        ($name:ident { $($(#[$attr:meta])* $field:ident : $ty:ty),* $(,)? }) => {
            #[derive(Deserialize)]
            pub(super) struct $name {
                $( $(#[$attr])* $field: $ty, )*
                created_at_ms: u64,
                #[serde(default)]
                attempt: u32,
                #[serde(default)]
                not_before_ms: Option<u64>,
                #[serde(default)]
                rate_reserved: bool,
                #[serde(default)]
                slot_missed: bool,
                #[serde(default)]
                last_error: Option<String>,
            }

            impl $name {
                fn retry(&mut self) -> RetryState {
                    RetryState {
                        created_at_ms: self.created_at_ms,
                        attempt: self.attempt,
                        not_before_ms: self.not_before_ms,
                        rate_reserved: self.rate_reserved,
                        slot_missed: self.slot_missed,
                        last_error: self.last_error.take(),
                    }
                }
            }
        };
    }

    decoded_with_retry!(DeliveryJobIn {
        #[serde(default = "version")]
        v: u32,
        delivery_id: String,
        integration_id: String,
        url: String,
        trigger_word: String,
        event: ChatEvent,
    });

    impl From<DeliveryJobIn> for DeliveryJob {
        fn from(mut j: DeliveryJobIn) -> Self {
            DeliveryJob {
                retry: j.retry(),
                v: j.v,
                delivery_id: j.delivery_id,
                integration_id: j.integration_id,
                url: j.url,
                trigger_word: j.trigger_word,
                event: j.event,
            }
        }
    }

    decoded_with_retry!(ReplyJobIn {
        #[serde(default = "version")]
        v: u32,
        delivery_id: String,
        integration_id: String,
        team_id: String,
        channel_id: String,
        in_reply_to: String,
        #[serde(default)]
        event_thread_ts: Option<String>,
        answer: HandlerAnswer,
        #[serde(default)]
        platform: Option<String>,
    });

    impl From<ReplyJobIn> for ReplyJob {
        fn from(mut j: ReplyJobIn) -> Self {
            ReplyJob {
                retry: j.retry(),
                v: j.v,
                delivery_id: j.delivery_id,
                integration_id: j.integration_id,
                team_id: j.team_id,
                channel_id: j.channel_id,
                in_reply_to: j.in_reply_to,
                event_thread_ts: j.event_thread_ts,
                answer: j.answer,
                platform: j.platform,
            }
        }
    }
}

/// Where a job stands in its life: how old it is, the attempts made, when it
/// may next be tried and whether it holds a rate-limit slot for then. Both
/// job types carry it (flattened into their JSON, so the fields sit where
/// version 1 put them); the stages read and change it only through its
/// methods and `job::lifecycle`.
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

    /// The rate-limit fields, for `job::pacing::RateLimiter::turn`.
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

/// The rate-limit fields a parked message carries.
pub struct Slot<'a> {
    /// It holds a token for the slot at `not_before_ms`.
    pub reserved: &'a mut bool,
    /// It already missed a slot once and took a new one.
    pub missed: &'a mut bool,
    pub not_before_ms: &'a mut Option<u64>,
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
        // The ids of every version so far: a handler deduplicates on them,
        // across a deploy too.
        assert_eq!(a, "msg_403c7f13e0e858c18f56de38e5f5bd2c");
        assert_eq!(
            DeliveryJob::delivery_id_for(&e, "googlebot", 12),
            "msg_4808d83855a55928bb2a5e521a38c6d2"
        );
    }

    #[test]
    fn a_new_job_encodes_as_the_job_it_is() {
        let e: ChatEvent = serde_json::from_str(
            r#"{"team_id":"T","channel_id":"C","user_id":"U","ts":"1.2","text":"x","thread_ts":"1.1"}"#,
        )
        .unwrap();
        let bytes = DeliveryJob::encode_new(&e, "g", 1, "http://127.0.0.1:9/h", "x", 42);
        // Without a platform a job is written as version 1, as before.
        let job = DeliveryJob {
            v: 1,
            delivery_id: DeliveryJob::delivery_id_for(&e, "g", 1),
            integration_id: "g".into(),
            url: "http://127.0.0.1:9/h".into(),
            trigger_word: "x".into(),
            event: e,
            retry: RetryState::new(42),
        };
        assert_eq!(bytes, serde_json::to_vec(&job).unwrap());
        assert_eq!(serde_json::from_slice::<DeliveryJob>(&bytes).unwrap(), job);
    }

    #[test]
    fn a_job_missing_a_required_field_is_refused() {
        let err = serde_json::from_str::<DeliveryJob>(
            r#"{"delivery_id":"d","integration_id":"g","url":"http://x/","trigger_word":"",
               "event":{"team_id":"T","channel_id":"C","user_id":"U","ts":"1","text":"x"}}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("created_at_ms"), "{err}");
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
