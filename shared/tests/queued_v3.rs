//! Message version 3 (docs/contract.md §3): a delivery job or reply from a
//! platform other than Slack (Matrix). The event carries its `event_id`,
//! the `webhook-id` is derived from it, and the reply's `in_reply_to` is
//! it. The fixtures in `fixtures/v3` must be understood by every later
//! reader, byte for byte as written; a version 2 stage refuses them
//! (`unsupported_version`, replayable) rather than send a reply where it
//! cannot post it.

use swallow_shared::ChatEvent;
use swallow_shared::wire::messages::{DeliveryJob, MESSAGE_VERSION, ReplyJob, version_for};

mod common;

fn same_again<T: serde::Serialize + serde::de::DeserializeOwned>(name: &str) -> T {
    common::same_again("v3", name)
}

#[test]
fn a_delivery_job_from_matrix() {
    let j: DeliveryJob = same_again("delivery_matrix.json");
    assert_eq!(j.v, 3);
    assert_eq!(j.event.platform.as_deref(), Some("matrix"));
    assert_eq!(j.event.event_id.as_deref(), Some("$abc:example.org"));
    assert_eq!(j.event.channel_alias.as_deref(), Some("#test:example.org"));
    assert_eq!(
        swallow_shared::wire::event::ts_to_millis(&j.event.ts),
        Some(1_355_517_523_005)
    );
    assert_eq!(j.delivery_id, DeliveryJob::delivery_id_for(&j.event, "googlebot", 0));
}

#[test]
fn a_reply_to_matrix_parked_for_a_retry() {
    let r: ReplyJob = same_again("reply_matrix.json");
    assert_eq!(r.v, 3);
    assert_eq!(r.platform.as_deref(), Some("matrix"));
    assert_eq!(r.in_reply_to, "$abc:example.org");
    assert_eq!(r.event_thread_ts.as_deref(), Some("$root"));
}

#[test]
fn the_event_id_names_the_delivery() {
    assert_eq!(MESSAGE_VERSION, 3);
    assert_eq!(version_for(Some("matrix")), 3);
    let event = |event_id: &str| -> ChatEvent {
        serde_json::from_value(
            serde_json::json!({"team_id": "example.org", "channel_id": "!r:example.org",
            "user_id": "@a:example.org", "ts": "1355517523.005000", "text": "x", "platform": "matrix",
            "event_id": event_id}),
        )
        .unwrap()
    };
    // Two messages in the same millisecond are two deliveries.
    let (a, b) = (event("$a"), event("$b"));
    assert_ne!(
        DeliveryJob::delivery_id_for(&a, "g", 0),
        DeliveryJob::delivery_id_for(&b, "g", 0)
    );
    let bytes = DeliveryJob::encode_new(&a, "g", 0, "http://127.0.0.1:9/h", "", 1);
    let job: DeliveryJob = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(job.v, 3);
    assert_eq!(job.event, a);
}
