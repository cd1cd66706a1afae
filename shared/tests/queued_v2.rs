//! Message version 2 (docs/contract.md §3): a delivery job or reply that
//! carries the platform its event came from. The fixtures in `fixtures/v2`
//! must be understood by every later reader, byte for byte as written; a
//! message without a platform is still written as version 1, so a stage of
//! the previous version running beside this one during a rolling upgrade
//! takes it as before, and refuses (dead-letters as `unsupported_version`,
//! to be replayed) only what it would otherwise send to the wrong place.

use swallow_shared::ChatEvent;
use swallow_shared::wire::messages::{DeliveryJob, MESSAGE_VERSION, ReplyJob, version_for};

mod common;

fn same_again<T: serde::Serialize + serde::de::DeserializeOwned>(name: &str) -> T {
    common::same_again("v2", name)
}

#[test]
fn a_delivery_job_from_slack() {
    let j: DeliveryJob = same_again("delivery_slack.json");
    assert_eq!(j.v, 2);
    assert_eq!(j.event.platform.as_deref(), Some("slack"));
    assert_eq!(j.event.channel_name, "test");
}

#[test]
fn a_reply_to_slack_parked_for_a_retry() {
    let r: ReplyJob = same_again("reply_slack.json");
    assert_eq!(r.v, 2);
    assert_eq!(r.platform.as_deref(), Some("slack"));
    assert_eq!(r.event_thread_ts.as_deref(), Some("1355517500.000001"));
    assert_eq!(r.retry.attempt, 1);
}

#[test]
fn only_a_message_with_a_platform_is_written_as_version_2() {
    const { assert!(MESSAGE_VERSION >= 2) };
    assert_eq!(version_for(None), 1);
    assert_eq!(version_for(Some("slack")), 2);
    let mut event: ChatEvent = serde_json::from_str(
        r#"{"team_id":"T0001","channel_id":"C1","user_id":"U1","ts":"1.000001","text":"googlebot: hi"}"#,
    )
    .unwrap();
    let direct = DeliveryJob::encode_new(&event, "googlebot", 0, "http://127.0.0.1:9/h", "googlebot:", 1);
    let direct: serde_json::Value = serde_json::from_slice(&direct).unwrap();
    assert_eq!(direct["v"], 1);
    assert!(direct["event"].get("platform").is_none(), "version 1 bytes, as before");
    event.platform = Some("slack".into());
    let from_slack = DeliveryJob::encode_new(&event, "googlebot", 0, "http://127.0.0.1:9/h", "googlebot:", 1);
    let from_slack: DeliveryJob = serde_json::from_slice(&from_slack).unwrap();
    assert_eq!(from_slack.v, 2);
    assert_eq!(from_slack.event.platform.as_deref(), Some("slack"));
    // The same message yields the same webhook-id however it came in.
    assert_eq!(
        from_slack.delivery_id,
        serde_json::from_value::<DeliveryJob>(direct).unwrap().delivery_id
    );
}
