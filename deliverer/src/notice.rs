//! The failure notice: with `on_failure = "notify"`, a dead-lettered
//! delivery also sends one short bot message into the triggering message's
//! channel (in its thread, if it was in one), at most one per integration
//! per channel per `failure_notice_interval_s`.
//!
//! The notice is a reply like any other (the responder paces, retries,
//! dead-letters and bot-marks it) whose text is swallow's own words: the
//! status or the error class, the attempts and the delivery id. It never
//! quotes the handler's answer or swallow's error text (which may hold the
//! URL), so a handler cannot make swallow post arbitrary text or mentions.
//!
//! The interval is kept by the deliverer that owns the integration's shard,
//! in memory: after a restart or a hand-over one more notice may come early.

use swallow_shared::config::{Integration, OnFailure};
use swallow_shared::job::lifecycle::{DeadLetter, Disposition};
use swallow_shared::wire::messages::{DeliveryJob, HandlerAnswer, ReplyJob, RetryState, now_millis, version_for};

use crate::Context;

/// Adds a notice to a dead letter when the job's integration wants one and
/// its channel had none within the interval; says whether it did.
pub(crate) fn attach(ctx: &Context, mut disposition: Disposition<DeliveryJob>) -> (Disposition<DeliveryJob>, bool) {
    let Disposition::Dead(DeadLetter {
        reason,
        status,
        body: Ok(job),
        notice,
        ..
    }) = &mut disposition
    else {
        return (disposition, false);
    };
    let integrations = ctx.integrations.borrow().clone();
    let Some(integration) = integrations.get(&job.integration_id) else {
        return (disposition, false);
    };
    if integration.on_failure != OnFailure::Notify {
        return (disposition, false);
    }
    let key = (job.integration_id.clone(), job.event.channel_id.clone());
    let now = now_millis();
    {
        let mut last = ctx.notices.lock().expect("notices lock");
        let interval = integration.failure_notice_interval.as_millis() as u64;
        if last.get(&key).is_some_and(|&at| now < at + interval) {
            return (disposition, false);
        }
        last.insert(key, now);
    }
    let reply = notice_for(integration, job, reason.as_str(), *status, now);
    let body = serde_json::to_vec(&reply).expect("a reply always serializes");
    *notice = Some((ctx.replies_queue.clone(), body));
    (disposition, true)
}

fn notice_for(integration: &Integration, job: &DeliveryJob, reason: &str, status: Option<u16>, now: u64) -> ReplyJob {
    let text = notice_text(&integration.bot_name, job, reason, status);
    ReplyJob {
        v: version_for(job.event.platform.as_deref()),
        delivery_id: job.delivery_id.clone(),
        integration_id: job.integration_id.clone(),
        team_id: job.event.team_id.clone(),
        channel_id: job.event.channel_id.clone(),
        in_reply_to: job.event.event_id.clone().unwrap_or_else(|| job.event.ts.clone()),
        event_thread_ts: job.event.thread_ts.clone(),
        answer: HandlerAnswer {
            text,
            ..HandlerAnswer::default()
        },
        platform: job.event.platform.clone(),
        retry: RetryState::new(now),
    }
}

/// swallow's own words for why the integration could not answer.
pub(crate) fn notice_text(name: &str, job: &DeliveryJob, reason: &str, status: Option<u16>) -> String {
    let last = match status {
        Some(code) => format!("its handler answered HTTP {code}"),
        None => match job.retry.last_error.as_deref().and_then(|e| e.split(':').next()) {
            Some("timeout") => "its handler did not answer in time".to_owned(),
            Some("connect") => "its handler could not be reached".to_owned(),
            Some(e) if e.starts_with("HTTP ") && e[5..].chars().all(|c| c.is_ascii_digit()) => {
                format!("its handler answered {e}")
            }
            _ => "its handler failed".to_owned(),
        },
    };
    let why = match reason {
        "gone" => "its handler answered HTTP 410 Gone".to_owned(),
        "blocked_destination" => "its handler's address is not allowed".to_owned(),
        "circuit_open" => format!("{last}, and kept failing"),
        _ => last,
    };
    let attempts = match job.retry.attempt {
        1 => "1 attempt".to_owned(),
        n => format!("{n} attempts"),
    };
    format!(
        "{name} could not answer this message: {why} ({attempts}; delivery {}).",
        job.delivery_id
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(attempt: u32, last_error: Option<&str>) -> DeliveryJob {
        let event =
            serde_json::from_str(r#"{"team_id":"T","channel_id":"C","user_id":"U","ts":"1.2","text":"x"}"#).unwrap();
        DeliveryJob {
            v: 1,
            delivery_id: "msg_1".into(),
            integration_id: "g".into(),
            url: "http://user:secret@127.0.0.1:9/hook?key=k".into(),
            trigger_word: String::new(),
            event,
            retry: RetryState {
                attempt,
                last_error: last_error.map(str::to_owned),
                ..RetryState::new(0)
            },
        }
    }

    #[test]
    fn the_notice_says_why_in_swallows_own_words() {
        assert_eq!(
            notice_text("Google Bot", &job(2, Some("HTTP 500")), "max_attempts", Some(500)),
            "Google Bot could not answer this message: its handler answered HTTP 500 (2 attempts; delivery msg_1)."
        );
        let refused = "connect: error sending request for url (http://user:secret@127.0.0.1:9/hook?key=k)";
        let text = notice_text("g", &job(8, Some(refused)), "max_attempts", None);
        assert_eq!(
            text,
            "g could not answer this message: its handler could not be reached (8 attempts; delivery msg_1)."
        );
        assert!(!text.contains("secret") && !text.contains("key=k"));
        assert!(
            notice_text("g", &job(1, Some("timeout: deadline")), "circuit_open", None)
                .contains("did not answer in time, and kept failing (1 attempt;")
        );
        assert!(notice_text("g", &job(1, None), "gone", Some(410)).contains("410 Gone"));
    }
}
