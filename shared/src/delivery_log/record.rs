//! One record of the log, its JSON, and a batch's bytes read back.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::*;
use crate::wire::{ChatEvent, DeliveryJob, ReplyJob};

/// What happened at one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The matcher made a delivery job of an event (one record per job).
    Matched,
    Delivered,
    Retried,
    Dead,
    /// `on_limit = "drop"` and no token.
    Dropped,
    /// Parked for a rate-limit slot.
    RateLimited,
    /// Not attempted: the integration's circuit breaker is open.
    CircuitOpen,
    ReplyPosted,
    ReplyRetried,
    ReplyDead,
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Matched => "matched",
            Outcome::Delivered => "delivered",
            Outcome::Retried => "retried",
            Outcome::Dead => "dead",
            Outcome::Dropped => "dropped",
            Outcome::RateLimited => "rate_limited",
            Outcome::CircuitOpen => "circuit_open",
            Outcome::ReplyPosted => "reply_posted",
            Outcome::ReplyRetried => "reply_retried",
            Outcome::ReplyDead => "reply_dead",
        }
    }

    /// The stage that records this outcome.
    pub fn stage(self) -> &'static str {
        match self {
            Outcome::Matched => "matcher",
            Outcome::ReplyPosted | Outcome::ReplyRetried | Outcome::ReplyDead => "responder",
            _ => "deliverer",
        }
    }
}

/// One record of the log. `stage` and `outcome` are text, so a reader
/// shows outcomes added by later versions as they are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    /// When the step was taken: RFC 3339, UTC, milliseconds.
    pub at: String,
    pub stage: String,
    pub outcome: String,
    pub team_id: String,
    pub channel_id: String,
    /// The triggering message's `ts`.
    pub event_ts: String,
    /// For `matched` in version 1 batches, every integration matched,
    /// comma-separated.
    pub integration_id: String,
    /// The POST's `webhook-id`; never empty in version 2 (empty for
    /// version 1's `matched`).
    pub delivery_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The URL as configured, to take out of error messages (never written).
    #[serde(skip)]
    raw_url: Option<String>,
}

/// Now, as a record's `at`.
pub(crate) fn now_rfc3339() -> String {
    format!("{:.3}", jiff::Timestamp::now())
}

impl LogRecord {
    fn new(outcome: Outcome, team_id: &str, channel_id: &str, event_ts: &str, integration_id: &str) -> Self {
        LogRecord {
            at: now_rfc3339(),
            stage: outcome.stage().into(),
            outcome: outcome.name().into(),
            team_id: team_id.into(),
            channel_id: channel_id.into(),
            event_ts: event_ts.into(),
            integration_id: integration_id.into(),
            delivery_id: String::new(),
            url: None,
            attempt: None,
            status: None,
            class: None,
            duration_ms: None,
            error: None,
            raw_url: None,
        }
    }

    /// The matcher made the job `delivery_id` of `event`, for
    /// `integration_id`'s URL `url`.
    pub fn matched(event: &ChatEvent, integration_id: &str, delivery_id: &str, url: &str) -> Self {
        LogRecord {
            delivery_id: delivery_id.into(),
            url: Some(redact_url_kept(url)),
            ..LogRecord::new(
                Outcome::Matched,
                &event.team_id,
                &event.channel_id,
                &event.ts,
                integration_id,
            )
        }
    }

    /// A step of a delivery job: its ids, URL and attempts made so far.
    pub fn job(outcome: Outcome, job: &DeliveryJob) -> Self {
        let e = &job.event;
        LogRecord {
            delivery_id: job.delivery_id.clone(),
            url: Some(redact_url_kept(&job.url)),
            raw_url: Some(job.url.clone()),
            attempt: Some(job.retry.attempt),
            ..LogRecord::new(outcome, &e.team_id, &e.channel_id, &e.ts, &job.integration_id)
        }
    }

    /// A step of a reply: its ids and attempts made so far.
    pub fn reply(outcome: Outcome, reply: &ReplyJob) -> Self {
        LogRecord {
            delivery_id: reply.delivery_id.clone(),
            attempt: Some(reply.retry.attempt),
            ..LogRecord::new(
                outcome,
                &reply.team_id,
                &reply.channel_id,
                &reply.in_reply_to,
                &reply.integration_id,
            )
        }
    }

    /// The same step's record with another outcome (and stage).
    pub fn with_outcome(mut self, outcome: Outcome) -> Self {
        self.stage = outcome.stage().into();
        self.outcome = outcome.name().into();
        self
    }

    /// What the HTTP attempt gave: its status (if any), class and duration.
    pub fn with_attempt(mut self, status: Option<u16>, class: &str, duration: Duration) -> Self {
        self.status = status;
        self.class = Some(class.into());
        self.duration_ms = Some(duration.as_millis() as u64);
        self
    }

    pub fn with_duration(mut self, duration: Duration) -> Self {
        self.duration_ms = Some(duration.as_millis() as u64);
        self
    }

    /// swallow's own words on what went wrong (with the URL as in `url`),
    /// cut to [`MAX_ERROR_BYTES`].
    pub fn with_error(mut self, error: &str) -> Self {
        let error = match (&self.raw_url, &self.url) {
            (Some(raw), Some(shown)) if raw != shown => error.replace(raw.as_str(), shown),
            _ => error.to_owned(),
        };
        self.error = Some(truncate(&error, MAX_ERROR_BYTES).into());
        self
    }
}

/// How many URLs [`redact_url_kept`] keeps the answer for; past that they
/// are all forgotten and kept again as they come.
pub(super) const REDACTED_KEPT: usize = 4096;

/// [`crate::redact::url`] for the URL of every job record: parsing it costs about
/// 6,000 instructions, more than the rest of the record, and a job's URL
/// is one of the configuration's, so the answers are kept.
pub(super) fn redact_url_kept(text: &str) -> String {
    static KEPT: std::sync::LazyLock<std::sync::Mutex<std::collections::HashMap<String, String>>> =
        std::sync::LazyLock::new(Default::default);
    let lock = || KEPT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(redacted) = lock().get(text) {
        return redacted.clone();
    }
    let redacted = crate::redact::url(text);
    let mut kept = lock();
    if kept.len() >= REDACTED_KEPT {
        kept.clear();
    }
    kept.insert(text.to_owned(), redacted.clone());
    redacted
}

/// `text` cut to at most `max` bytes, on a character boundary.
pub(super) fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The records of one stream message of format [`BATCH_VERSION`]; lines
/// that are not records are skipped.
pub fn parse_batch(body: &[u8]) -> Vec<LogRecord> {
    body.split(|b| *b == b'\n')
        .filter(|line| !line.is_empty())
        .filter_map(|line| serde_json::from_slice(line).ok())
        .collect()
}
