//! Jobs queued by swallow 0.1 (message version 1) must still be understood:
//! the fixtures in `fixtures/v1` were written by the 0.1 code's serializer,
//! byte for byte as it published them. Each is decoded with today's types,
//! its fields checked, and written again: the bytes must be identical, so a
//! job that passes through a new deliverer or responder and back onto a
//! queue reads the same to an old one still running during a rollout.

use swallow_shared::wire::messages::{DeliveryJob, ReplyJob};

mod common;

fn fixture(name: &str) -> Vec<u8> {
    common::fixture("v1", name)
}

fn delivery(name: &str) -> DeliveryJob {
    let bytes = fixture(name);
    let job: DeliveryJob = serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("decoding {name}: {e}"));
    let again = serde_json::to_vec(&job).expect("a job serializes");
    assert_eq!(
        String::from_utf8_lossy(&again),
        String::from_utf8_lossy(&bytes),
        "{name}: re-serialized differently"
    );
    job
}

fn reply(name: &str) -> ReplyJob {
    let bytes = fixture(name);
    let reply: ReplyJob = serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("decoding {name}: {e}"));
    let again = serde_json::to_vec(&reply).expect("a reply serializes");
    assert_eq!(
        String::from_utf8_lossy(&again),
        String::from_utf8_lossy(&bytes),
        "{name}: re-serialized differently"
    );
    reply
}

#[test]
fn a_fresh_delivery_job() {
    let j = delivery("delivery_fresh.json");
    assert_eq!((j.v, j.integration_id.as_str()), (1, "googlebot"));
    assert_eq!(j.delivery_id, "msg_2fa16a155610540a8cf3a195600b290f");
    assert_eq!(j.url, "http://127.0.0.1:8080/hook");
    assert_eq!(j.trigger_word, "googlebot:");
    assert_eq!(j.event.ts, "1355517523.000005");
    assert_eq!(j.event.thread_ts, None);
    assert_eq!(j.retry.created_at_ms, 1_764_300_000_000);
    assert_eq!(j.retry.attempt, 0);
    assert_eq!(j.retry.not_before_ms, None);
    assert!(!j.retry.rate_reserved && !j.retry.slot_missed);
    assert_eq!(j.retry.last_error, None);
}

#[test]
fn a_delivery_job_parked_for_a_retry() {
    let j = delivery("delivery_retry.json");
    assert_eq!(j.retry.attempt, 2);
    assert_eq!(j.retry.not_before_ms, Some(1_764_300_004_000));
    assert!(!j.retry.rate_reserved && !j.retry.slot_missed);
    assert_eq!(j.retry.last_error.as_deref(), Some("HTTP 503 Service Unavailable"));
}

#[test]
fn a_delivery_job_holding_a_rate_limit_slot() {
    let j = delivery("delivery_rate_reserved.json");
    assert_eq!(j.retry.attempt, 0);
    assert_eq!(j.retry.not_before_ms, Some(1_764_300_000_250));
    assert!(j.retry.rate_reserved);
    assert!(!j.retry.slot_missed);
}

#[test]
fn a_delivery_job_with_every_field() {
    let j = delivery("delivery_full.json");
    assert_eq!(j.delivery_id, "msg_73a9576147bc536b84f54fd855e8da98");
    assert_eq!(j.trigger_word, "");
    assert_eq!(j.event.thread_ts.as_deref(), Some("1355517500.000001"));
    assert_eq!(j.event.channel_type.as_deref(), Some("channel"));
    assert_eq!(j.event.bot_id.as_deref(), Some("B0001"));
    assert_eq!(j.retry.attempt, 3);
    assert_eq!(j.retry.not_before_ms, Some(1_764_300_009_500));
    assert!(j.retry.rate_reserved && j.retry.slot_missed);
    assert_eq!(j.retry.last_error.as_deref(), Some("timed out after 10s \"quoted\" é"));
}

#[test]
fn a_delivery_job_from_before_versions_and_attempts() {
    let bytes = fixture("delivery_without_v_or_attempt.json");
    let j: DeliveryJob = serde_json::from_slice(&bytes).expect("decodes");
    assert_eq!((j.v, j.retry.attempt, j.retry.not_before_ms), (1, 0, None));
    assert!(!j.retry.rate_reserved && !j.retry.slot_missed && j.retry.last_error.is_none());
}

#[test]
fn a_fresh_reply() {
    let r = reply("reply_fresh.json");
    assert_eq!((r.v, r.integration_id.as_str()), (1, "googlebot"));
    assert_eq!((r.team_id.as_str(), r.channel_id.as_str()), ("T0001", "C2147483705"));
    assert_eq!(r.in_reply_to, "1355517523.000005");
    assert_eq!(r.event_thread_ts, None);
    assert_eq!(r.answer.text, "African or European?");
    assert_eq!(r.retry.created_at_ms, 1_764_300_000_100);
    assert_eq!(r.retry.attempt, 0);
    assert_eq!(r.retry.not_before_ms, None);
    assert!(!r.retry.rate_reserved && !r.retry.slot_missed);
    assert_eq!(r.retry.last_error, None);
}

#[test]
fn a_reply_parked_for_a_retry() {
    let r = reply("reply_retry.json");
    assert_eq!(r.retry.attempt, 1);
    assert_eq!(r.retry.not_before_ms, Some(1_764_300_001_100));
    assert_eq!(r.retry.last_error.as_deref(), Some("connect: connection refused"));
}

#[test]
fn a_reply_with_every_field() {
    let r = reply("reply_full.json");
    assert_eq!(r.event_thread_ts.as_deref(), Some("1355517500.000001"));
    assert_eq!(r.answer.username.as_deref(), Some("Tim"));
    assert_eq!(r.answer.response_type.as_deref(), Some("comment"));
    assert_eq!(r.answer.thread_ts.as_deref(), Some("1355517400.000002"));
    assert!(r.answer.attachments.is_some());
    assert_eq!(r.retry.attempt, 4);
    assert_eq!(r.retry.not_before_ms, Some(1_764_300_016_000));
    assert!(r.retry.rate_reserved && r.retry.slot_missed);
    assert_eq!(r.retry.last_error.as_deref(), Some("HTTP 429: ratelimited"));
}
