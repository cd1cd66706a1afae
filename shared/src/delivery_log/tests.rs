use lapin::types::{AMQPValue, LongString};
use prometheus::IntCounter;
use tokio::sync::mpsc;

use super::appender::Batch;
use super::record::{REDACTED_KEPT, redact_url_kept, truncate};
use super::*;
use crate::wire::DeliveryJob;

fn job() -> DeliveryJob {
    serde_json::from_str(
        r#"{"delivery_id":"msg_1","integration_id":"googlebot","url":"http://h/x","trigger_word":"googlebot:",
               "event":{"team_id":"T1","channel_id":"C1","user_id":"U1","ts":"1355517523.000005",
                        "text":"googlebot: a private question"},
               "created_at_ms":1,"attempt":2}"#,
    )
    .unwrap()
}

#[test]
fn a_job_record_carries_ids_and_never_the_text() {
    let r = LogRecord::job(Outcome::Retried, &job())
        .with_attempt(Some(503), "5xx", Duration::from_millis(42))
        .with_error(&"e".repeat(5000));
    let json = serde_json::to_string(&r).unwrap();
    assert!(!json.contains("private question"), "{json}");
    assert_eq!(r.stage, "deliverer");
    assert_eq!(r.outcome, "retried");
    assert_eq!(r.event_ts, "1355517523.000005");
    assert_eq!(r.delivery_id, "msg_1");
    assert_eq!((r.attempt, r.status, r.duration_ms), (Some(2), Some(503), Some(42)));
    assert_eq!(r.error.as_ref().unwrap().len(), MAX_ERROR_BYTES);
    // `at`: RFC 3339, UTC, milliseconds.
    assert_eq!(r.at.len(), "2026-01-01T00:00:00.000Z".len(), "{}", r.at);
    assert!(r.at.ends_with('Z') && r.at.parse::<jiff::Timestamp>().is_ok());
    let fields: Vec<String> = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&json)
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert_eq!(fields.len(), 14, "{fields:?}");
    assert!(!json.contains("raw_url"));
}

#[test]
fn urls_lose_credentials_and_queries_also_in_errors() {
    let mut j = job();
    j.url = "https://bot:s3cret@hooks.example.com/bot?key=s3cret#x".into();
    let r = LogRecord::job(Outcome::Retried, &j)
        .with_error("connect: error sending request for url (https://bot:s3cret@hooks.example.com/bot?key=s3cret#x)");
    assert_eq!(r.url.as_deref(), Some("https://bot:***@hooks.example.com/bot"));
    let json = serde_json::to_string(&r).unwrap();
    assert!(!json.contains("s3cret"), "{json}");
    assert!(
        json.contains("for url (https://bot:***@hooks.example.com/bot)"),
        "{json}"
    );
}

#[test]
fn kept_redactions_are_the_same_and_stay_bounded() {
    let url = "https://bot:s3cret@kept.example.com/bot?key=s3cret";
    let first = redact_url_kept(url);
    assert_eq!(first, "https://bot:***@kept.example.com/bot");
    assert_eq!(redact_url_kept(url), first, "the kept answer");
    // Past the bound, everything is forgotten and answered afresh.
    for i in 0..REDACTED_KEPT + 10 {
        let u = format!("http://u{i}:p@h{i}.example.com/x?q");
        assert_eq!(redact_url_kept(&u), format!("http://u{i}:***@h{i}.example.com/x"));
    }
    assert_eq!(redact_url_kept(url), first);
    assert_eq!(redact_url_kept("not a url?key=s3cret"), "not a url");
}

#[test]
fn errors_are_cut_on_a_character_boundary() {
    assert_eq!(truncate("ééé", 3), "é");
    assert_eq!(truncate("abc", 10), "abc");
}

#[test]
fn matched_names_its_job_and_stages_follow_outcomes() {
    let j = job();
    let r = LogRecord::matched(&j.event, "g", &j.delivery_id, "http://user:pw@h/x?q=1");
    assert_eq!(
        (r.stage.as_str(), r.integration_id.as_str(), r.delivery_id.as_str()),
        ("matcher", "g", "msg_1")
    );
    assert_eq!(r.url.as_deref(), Some("http://user:***@h/x"));
    assert_eq!(Outcome::ReplyDead.stage(), "responder");
    assert_eq!(Outcome::CircuitOpen.name(), "circuit_open");
    let r = LogRecord::job(Outcome::Delivered, &job()).with_outcome(Outcome::Dead);
    assert_eq!((r.stage.as_str(), r.outcome.as_str()), ("deliverer", "dead"));
}

#[test]
fn versions_1_and_2_are_read_and_others_skipped() {
    assert!(readable(Some("1")) && readable(Some("2")) && readable(Some(BATCH_VERSION)));
    assert!(!readable(Some("3")) && !readable(None));
}

/// A version 2 batch (the fixture): a `matched` record per job, with its
/// delivery id and URL, then the job's own steps.
#[test]
fn version_2_batches_are_read() {
    let fixture = concat!(
        r#"{"at":"2026-11-28T04:00:00.100Z","stage":"matcher","outcome":"matched","team_id":"T1","channel_id":"C1","event_ts":"1.2","integration_id":"g","delivery_id":"msg_1","url":"http://h/"}"#,
        "\n",
        r#"{"at":"2026-11-28T04:00:00.123Z","stage":"deliverer","outcome":"delivered","team_id":"T1","channel_id":"C1","event_ts":"1.2","integration_id":"g","delivery_id":"msg_1","url":"http://h/","attempt":1,"status":200,"class":"2xx","duration_ms":12}"#,
        "\n"
    );
    let records = parse_batch(fixture.as_bytes());
    assert_eq!(records.len(), 2);
    assert!(records.iter().all(|r| r.delivery_id == "msg_1"));
    assert_eq!(records[0].outcome, "matched");
    assert_eq!(records[0].url.as_deref(), Some("http://h/"));
}

/// A batch written by version 1 (the fixture) is read by this build;
/// lines that are not records are skipped, unknown fields ignored.
#[test]
fn version_1_batches_are_read() {
    let fixture = concat!(
        r#"{"at":"2026-11-28T04:00:00.123Z","stage":"deliverer","outcome":"delivered","team_id":"T1","channel_id":"C1","event_ts":"1.2","integration_id":"g","delivery_id":"msg_1","url":"http://h/","attempt":1,"status":200,"class":"2xx","duration_ms":12}"#,
        "\n",
        "not a record\n",
        r#"{"at":"2026-11-28T04:00:00.200Z","stage":"responder","outcome":"reply_posted","team_id":"T1","channel_id":"C1","event_ts":"1.2","integration_id":"g","delivery_id":"msg_1","a_later_field":1}"#,
        "\n"
    );
    let records = parse_batch(fixture.as_bytes());
    assert_eq!(records.len(), 2);
    assert_eq!(records[0].status, Some(200));
    assert_eq!(records[1].outcome, "reply_posted");
    let mut batch = Batch::default();
    batch.push(&records[0]);
    assert_eq!(parse_batch(&batch.body), vec![records[0].clone()]);
}

#[test]
fn retention_arguments() {
    let c = DeliveryLogConfig::default();
    assert_eq!(c.segment_bytes(), (1 << 30) / 8);
    let args = c.stream_arguments();
    let get = |k: &str| args.inner().get(k).cloned();
    assert_eq!(
        get("x-max-age"),
        Some(AMQPValue::LongString(LongString::from("604800s")))
    );
    assert_eq!(get("x-max-length-bytes"), Some(AMQPValue::LongLongInt(1 << 30)));
    let small = DeliveryLogConfig { max_bytes: 1000, ..c };
    assert_eq!(small.segment_bytes(), 4096);
}

#[test]
fn a_full_queue_drops_and_counts() {
    let dropped = IntCounter::new("d", "d").unwrap();
    let (tx, _rx) = mpsc::channel(1);
    let log = DeliveryLog {
        tx: Some(tx),
        dropped: dropped.clone(),
    };
    log.record(LogRecord::job(Outcome::Delivered, &job()));
    log.record(LogRecord::job(Outcome::Delivered, &job()));
    assert_eq!(dropped.get(), 1);
    DeliveryLog::disabled(dropped.clone()).record(LogRecord::job(Outcome::Dead, &job()));
    assert_eq!(dropped.get(), 1, "a disabled log drops nothing: it records nothing");
}
