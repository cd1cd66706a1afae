//! The delivery log end to end: the three real binaries append
//! records to the stream `<prefix>.log`, and `swallow-deliverer log` reads
//! them back: outcomes and statuses in order, filters, --follow, retention,
//! and what a SIGKILL may cost.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use swallow_shared::delivery_log::{self, AppenderTarget, DeliveryLogConfig, LogRecord, Outcome};
use swallow_tests::handler::{Answer, HandlerServer};
use swallow_tests::*;
use tokio::io::AsyncBufReadExt;

const T: Duration = Duration::from_secs(30);
const TOKEN: &str = "XXXXXXXXXXXXXXXXXX";
/// What the failing handlers answer: it must never reach the log.
const BODY: &str = "HANDLER-BODY-NOT-FOR-THE-LOG";

/// `swallow-deliverer --config FILE log ARGS…`: exit code, stdout, stderr.
async fn log_command(config: &Path, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(bin_path("swallow-deliverer"))
        .arg("--config")
        .arg(config)
        .arg("log")
        .args(args)
        .env_remove("AMQP_URL")
        .env_remove("SWALLOW_PREFIX")
        .env("RUST_LOG", "error")
        .output()
        .await
        .expect("running swallow-deliverer log");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `log --json ARGS…`, which must succeed: its records, in printed order.
async fn log_json(config: &Path, args: &[&str]) -> (Vec<LogRecord>, String) {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (code, stdout, stderr) = log_command(config, &all).await;
    assert_eq!(code, 0, "log {all:?} failed: {stderr}");
    let records = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a record ({e}): {l}")))
        .collect();
    (records, stdout)
}

fn outcomes(records: &[LogRecord], event_ts: &str) -> Vec<String> {
    records
        .iter()
        .filter(|r| r.event_ts == event_ts)
        .map(|r| r.outcome.clone())
        .collect()
}

fn integration(id: &str, word: &str, url: &str) -> Integration {
    Integration::new(id)
        .channel("#test")
        .trigger_words(&[word])
        .url(url)
        .token(TOKEN)
        .rate_limit(100.0, 100)
}

/// A stack with one integration, `googlebot`, whose handler answers 200:
/// the stack, the handler, a directory and the configuration file in it.
async fn one_integration(name: &str) -> (TestStack, HandlerServer, TempDir, std::path::PathBuf) {
    let stack = TestStack::new(name).await.unwrap();
    let handler = HandlerServer::start(|_, _| Answer::status(200)).await;
    let dir = TempDir::new(name);
    let path = ConfigToml::on(&stack)
        .loopback()
        .integration(integration("googlebot", "googlebot:", &handler.url("/")))
        .write(&dir);
    (stack, handler, dir, path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_tells_what_happened_to_each_delivery() {
    let stack = TestStack::new("dlog-e2e").await.unwrap();
    let flaky_calls = Arc::new(AtomicUsize::new(0));
    let calls = flaky_calls.clone();
    let handler = HandlerServer::start(move |r, _| match r.path.as_str() {
        "/ok" => Answer::text("African or European?"),
        "/flaky" if calls.fetch_add(1, Ordering::SeqCst) == 0 => Answer::status(500).body(BODY),
        "/flaky" => Answer::text("I don't know that!"),
        _ => Answer::status(500).body(BODY),
    })
    .await;
    let dir = TempDir::new("dlog-e2e");
    let path = ConfigToml::on(&stack)
        .loopback()
        .integration(integration("okbot", "okbot:", &handler.url("/ok")))
        .integration(integration("flakybot", "flakybot:", &handler.url("/flaky")))
        .integration(integration("deadbot", "deadbot:", &handler.url("/down")).set("max_attempts", 2))
        .write(&dir);
    let mut out = listen_outbound(&stack).await.unwrap();
    let mut dead = stack.drain(&stack.topology.deliveries_dead_queue()).await.unwrap();
    let _pipeline = Pipeline::spawn(&path).await.unwrap();

    let (ok, flaky, gone) = ("1355517523.000001", "1355517523.000002", "1355517523.000003");
    let secret_text = "What is the air-speed velocity of an unladen swallow?";
    for (word, ts) in [("okbot:", ok), ("flakybot:", flaky), ("deadbot:", gone)] {
        let event = chat_event(&format!("{word} {secret_text}"), ts);
        stack.publish_event(&event).await.unwrap();
    }
    // An event nobody matches is not recorded.
    stack
        .publish_event(&chat_event("nobody: hello", "1355517523.000004"))
        .await
        .unwrap();
    // A job and a reply of a newer version than this build's: dead at once,
    // and recorded.
    let (newer_ts, newer_reply_ts) = ("1355517523.000005", "1355517523.000006");
    let mut newer = serde_json::to_value(job("newer-job")).unwrap();
    newer["v"] = 99.into();
    newer["integration_id"] = "okbot".into();
    newer["event"]["ts"] = newer_ts.into();
    newer["event"]["channel_id"] = "C2147483705".into();
    let queue = stack.topology.delivery_queue_for("okbot");
    stack
        .publish_to_queue(&queue, newer.to_string().as_bytes())
        .await
        .unwrap();
    let newer_reply = serde_json::json!({
        "v": 99, "delivery_id": "newer-reply", "integration_id": "okbot", "team_id": "T0001",
        "channel_id": "C2147483705", "in_reply_to": newer_reply_ts, "answer": {"text": "hi"}, "created_at_ms": 1,
    });
    let replies = stack.topology.replies_queue();
    stack
        .publish_to_queue(&replies, newer_reply.to_string().as_bytes())
        .await
        .unwrap();
    out.until(2, T, "the two replies").await;
    dead.until(2, T, "the dead-lettered delivery and the newer job").await;

    // Records reach the stream within about a flush interval of their step.
    let (records, stdout) = wait_for(T, "every step's record in the log", || async {
        let (records, stdout) = log_json(&path, &[]).await;
        let done = outcomes(&records, ok).contains(&"reply_posted".to_owned())
            && outcomes(&records, flaky).contains(&"reply_posted".to_owned())
            && outcomes(&records, gone).contains(&"dead".to_owned())
            && outcomes(&records, newer_ts).contains(&"dead".to_owned())
            && outcomes(&records, newer_reply_ts).contains(&"reply_dead".to_owned());
        done.then_some((records, stdout))
    })
    .await;

    assert_eq!(outcomes(&records, ok), ["matched", "delivered", "reply_posted"]);
    assert_eq!(
        outcomes(&records, flaky),
        ["matched", "retried", "delivered", "reply_posted"]
    );
    assert_eq!(outcomes(&records, gone), ["matched", "retried", "dead"]);
    assert!(
        outcomes(&records, "1355517523.000004").is_empty(),
        "unmatched events are not recorded"
    );
    let at: Vec<&str> = records.iter().map(|r| r.at.as_str()).collect();
    assert!(at.windows(2).all(|w| w[0] <= w[1]), "oldest first: {at:?}");

    let step = |ts: &str, outcome: &str| {
        records
            .iter()
            .find(|r| r.event_ts == ts && r.outcome == outcome)
            .unwrap_or_else(|| panic!("no {outcome} record for {ts}"))
            .clone()
    };
    let delivered = step(ok, "delivered");
    assert_eq!(
        (
            delivered.stage.as_str(),
            delivered.status,
            delivered.attempt,
            delivered.class.as_deref()
        ),
        ("deliverer", Some(200), Some(1), Some("2xx"))
    );
    assert_eq!(delivered.url.as_deref(), Some(handler.url("/ok").as_str()));
    assert!(delivered.duration_ms.is_some());
    assert_eq!(
        (delivered.team_id.as_str(), delivered.channel_id.as_str()),
        ("T0001", "C2147483705")
    );
    let post = handler.requests().into_iter().find(|r| r.path == "/ok").unwrap();
    assert_eq!(Some(delivered.delivery_id.as_str()), post.header("webhook-id"));
    assert_eq!(step(ok, "matched").integration_id, "okbot");
    assert_eq!(
        step(ok, "matched").delivery_id,
        delivered.delivery_id,
        "the match names its job"
    );
    assert_eq!(step(ok, "reply_posted").stage, "responder");
    let retried = step(flaky, "retried");
    assert_eq!(
        (retried.status, retried.attempt, retried.error.as_deref()),
        (Some(500), Some(1), Some("HTTP 500"))
    );
    assert_eq!(step(flaky, "delivered").status, Some(200));
    assert_eq!(step(flaky, "delivered").attempt, Some(2));
    let died = step(gone, "dead");
    assert_eq!((died.status, died.attempt), (Some(500), Some(2)));
    assert!(died.error.as_deref().unwrap().contains("HTTP 500"), "{died:?}");
    for (ts, outcome, stage) in [
        (newer_ts, "dead", "deliverer"),
        (newer_reply_ts, "reply_dead", "responder"),
    ] {
        let newer = step(ts, outcome);
        assert_eq!(newer.stage, stage);
        let error = newer.error.as_deref().unwrap_or_default();
        assert!(error.contains("version 99 is newer"), "{newer:?}");
    }

    // Ids, never the message, the token or the handler's body.
    for secret in [secret_text, TOKEN, BODY] {
        assert!(!stdout.contains(secret), "the log shows {secret:?}:\n{stdout}");
    }
    // Exactly the fields of a record, one object per line.
    for line in stdout.lines() {
        let object: serde_json::Map<String, serde_json::Value> = serde_json::from_str(line).unwrap();
        let known = [
            "at",
            "stage",
            "outcome",
            "team_id",
            "channel_id",
            "event_ts",
            "integration_id",
            "delivery_id",
            "url",
            "attempt",
            "status",
            "class",
            "duration_ms",
            "error",
        ];
        assert!(object.keys().all(|k| known.contains(&k.as_str())), "{line}");
    }

    // Filters.
    let (by_integration, _) = log_json(&path, &["--integration", "flakybot"]).await;
    assert_eq!(
        by_integration.iter().map(|r| r.outcome.as_str()).collect::<Vec<_>>(),
        ["matched", "retried", "delivered", "reply_posted"]
    );
    // One delivery's whole story, from its match.
    let (by_delivery, _) = log_json(&path, &["--delivery", &died.delivery_id]).await;
    assert_eq!(
        by_delivery.iter().map(|r| r.outcome.as_str()).collect::<Vec<_>>(),
        ["matched", "retried", "dead"]
    );
    assert!(
        records.iter().all(|r| !r.delivery_id.is_empty()),
        "no record without a delivery id"
    );
    let (by_event, _) = log_json(&path, &["--event", ok, "--channel", "C2147483705"]).await;
    assert_eq!(by_event.len(), 3);
    assert!(by_event.iter().all(|r| r.event_ts == ok));
    let (code, nothing, _) = log_command(&path, &["--json", "--integration", "nobody"]).await;
    assert_eq!(
        (code, nothing.as_str()),
        (0, ""),
        "a filter that matches nothing prints nothing"
    );
    let (code, nothing, _) = log_command(&path, &["--from", "2100-01-01T00:00:00Z"]).await;
    assert_eq!((code, nothing.as_str()), (0, ""), "nothing after a future start");
    let (by_time, _) = log_json(&path, &["--since", "1h", "--channel", "C2147483705"]).await;
    assert_eq!(by_time.len(), records.len());

    // The table: a header and one line per record.
    let (code, table, _) = log_command(&path, &["--event", gone]).await;
    assert_eq!(code, 0);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    assert!(lines[0].starts_with("TIME") && lines[0].contains("DELIVERY"), "{table}");
    assert!(
        lines[3].contains("deadbot") && lines[3].contains("dead") && lines[3].contains("500"),
        "{table}"
    );

    // A bad duration or time: one line naming the flag, exit 2.
    for args in [["--since", "10 parsecs"], ["--from", "yesterday"]] {
        let (code, stdout, stderr) = log_command(&path, &args).await;
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert_eq!(stdout, "");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(args[0]), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_prints_a_new_record_within_a_second() {
    let (stack, handler, _dir, path) = one_integration("dlog-follow").await;
    let _pipeline = Pipeline::spawn(&path).await.unwrap();
    let stream = stack.topology.log_stream();
    wait_for(T, "the stages to declare the log stream", || async {
        stack.queue_len(&stream).await.ok()
    })
    .await;
    let mut follow = tokio::process::Command::new(bin_path("swallow-deliverer"))
        .arg("--config")
        .arg(&path)
        .args(["log", "--follow", "--json"])
        .env_remove("AMQP_URL")
        .env_remove("SWALLOW_PREFIX")
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(follow.stdout.take().unwrap()).lines();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let record: LogRecord = serde_json::from_str(&line).expect("--follow --json prints records");
            if tx.send((Instant::now(), record)).is_err() {
                return;
            }
        }
    });

    // The first shows that the reader is attached; the second is timed.
    stack
        .publish_event(&chat_event("googlebot: one", "1.000001"))
        .await
        .unwrap();
    delivered_line(&mut rx, "1.000001").await;
    stack
        .publish_event(&chat_event("googlebot: two", "1.000002"))
        .await
        .unwrap();
    let printed = delivered_line(&mut rx, "1.000002").await;
    let posted = handler.until(2, T, "the second POST").await[1].at;
    let after = printed.saturating_duration_since(posted);
    assert!(after < Duration::from_secs(1), "printed {after:?} after the POST");

    // Ctrl-C ends it cleanly.
    let pid = follow.id().unwrap();
    std::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), follow.wait())
        .await
        .expect("--follow did not stop on SIGINT")
        .unwrap();
    assert!(status.success(), "{status}");
}

/// When `--follow` printed the `delivered` record of the event `ts`.
async fn delivered_line(rx: &mut tokio::sync::mpsc::UnboundedReceiver<(Instant, LogRecord)>, ts: &str) -> Instant {
    loop {
        let next = tokio::time::timeout(T, rx.recv()).await;
        let (at, record) = next
            .unwrap_or_else(|_| panic!("no delivered record for {ts} within {T:?}"))
            .expect("--follow ended");
        if record.event_ts == ts && record.outcome == "delivered" {
            return at;
        }
    }
}

/// A delivery job of `integration` with this delivery id, for records made
/// by the test itself.
fn job(delivery_id: &str) -> swallow_shared::wire::messages::DeliveryJob {
    serde_json::from_value(serde_json::json!({
        "delivery_id": delivery_id, "integration_id": "googlebot", "url": "http://127.0.0.1:9/",
        "trigger_word": "googlebot:", "created_at_ms": 1,
        "event": {"team_id": "T0001", "channel_id": "C1", "user_id": "U1", "ts": "1.000001", "text": "x"}
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_records_go_and_the_command_still_works() {
    let stack = TestStack::new("dlog-retention").await.unwrap();
    let dir = TempDir::new("dlog-retention");
    let path = ConfigToml::on(&stack).write(&dir);
    // 64 KiB kept, in 8 KiB segments; about 700 KiB written in small batches.
    let registry = ::prometheus::Registry::new();
    let target = AppenderTarget {
        broker: swallow_shared::Config::parse(&ConfigToml::on(&stack).to_string(), None)
            .unwrap()
            .broker,
        connection_name: format!("swallow-test-log {}", stack.prefix),
        stream: stack.topology.log_stream(),
        config: DeliveryLogConfig {
            enabled: true,
            max_age: Duration::from_secs(3600),
            max_bytes: 64 * 1024,
        },
    };
    let (log, appender) = delivery_log::start(target, &registry);
    let n = 2000;
    for round in 0..20 {
        for i in round * 100..(round + 1) * 100 {
            log.record(LogRecord::job(Outcome::Delivered, &job(&format!("msg_{i:04}"))));
        }
        tokio::time::sleep(delivery_log::FLUSH_INTERVAL * 2).await;
    }
    drop(log);
    tokio::time::timeout(T, appender.unwrap())
        .await
        .expect("the appender flushed and ended")
        .unwrap();
    assert_eq!(dropped(&registry), 0.0);

    let kept = wait_for(T, "retention to remove the oldest records", || async {
        let (records, _) = log_json(&path, &["--since", "1h"]).await;
        let ids: BTreeSet<String> = records.into_iter().map(|r| r.delivery_id).collect();
        (!ids.contains("msg_0000")).then_some(ids)
    })
    .await;
    assert!(kept.contains(&format!("msg_{:04}", n - 1)), "the newest record is kept");
    assert!(
        kept.len() < n / 2,
        "{} of {n} records kept with max_bytes = 64 KiB",
        kept.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_deliverer_loses_at_most_its_unflushed_records_and_no_delivery() {
    let (stack, handler, _dir, path) = one_integration("dlog-kill").await;
    let mut pipeline = Pipeline::spawn(&path).await.unwrap();
    let events = 40;
    let publisher = async {
        for i in 0..events {
            let ts = format!("2.{i:06}");
            stack.publish_event(&chat_event("googlebot: hi", &ts)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let killer = async {
        handler.until(events / 2, T, "half of the POSTs").await;
        pipeline.deliverer.kill().await;
        Instant::now()
    };
    let ((), killed_at) = tokio::join!(publisher, killer);
    let second = StageProcess::spawn("swallow-deliverer", &path, &HashMap::new()).unwrap();
    second.ready(T).await;

    // No delivery lost: every event reached the handler. (The killed
    // deliverer's unacknowledged jobs are POSTed again by the second.)
    let posted_at = wait_for(T, "a POST for every event", || async {
        let mut last: BTreeMap<String, Instant> = BTreeMap::new();
        for r in handler.requests() {
            let ts = r.form().into_iter().find(|(k, _)| k == "timestamp").unwrap().1;
            last.insert(ts, r.at);
        }
        (last.len() == events).then_some(last)
    })
    .await;
    // The second deliverer's records are flushed within a flush interval;
    // wait until every event it POSTed has its record.
    let records = wait_for(T, "the second deliverer's records", || async {
        let (records, _) = log_json(&path, &["--since", "1h"]).await;
        let recorded: BTreeSet<String> = records
            .iter()
            .filter(|r| r.outcome == "delivered")
            .map(|r| r.event_ts.clone())
            .collect();
        let all_later = posted_at
            .iter()
            .filter(|(_, at)| **at > killed_at)
            .all(|(ts, _)| recorded.contains(ts));
        all_later.then_some(recorded)
    })
    .await;
    // Missing: only deliveries made by the killed deliverer just before it
    // was killed (its last, unflushed batch; a margin for a loaded machine).
    let margin = delivery_log::FLUSH_INTERVAL + Duration::from_millis(400);
    for (ts, at) in &posted_at {
        if !records.contains(ts) {
            let before = killed_at.saturating_duration_since(*at);
            assert!(
                before < margin,
                "the delivery of {ts}, POSTed {before:?} before the kill, has no record"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_log_drops_and_counts_and_never_waits() {
    let registry = ::prometheus::Registry::new();
    let target = AppenderTarget {
        broker: swallow_shared::Config::parse(
            &ConfigToml::new()
                .set("broker", "url", format!("amqp://guest:guest@{}/%2f", free_addr()))
                .to_string(),
            None,
        )
        .unwrap()
        .broker,
        connection_name: "swallow-test-log unreachable".into(),
        stream: "t-dlog-unreachable.log".into(),
        config: DeliveryLogConfig::default(),
    };
    let (log, _appender) = delivery_log::start(target, &registry);
    let n = 20_000;
    let record = LogRecord::job(Outcome::Delivered, &job("msg_1"));
    let started = Instant::now();
    for _ in 0..n {
        log.record(record.clone());
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "{n} records took {took:?} to record");
    wait_for(T, "every record counted as dropped", || async {
        (dropped(&registry) == n as f64).then_some(())
    })
    .await;
}

/// `swallow_log_records_dropped_total` on `registry`.
fn dropped(registry: &::prometheus::Registry) -> f64 {
    let text = ::prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    metric_in(&text, "swallow_log_records_dropped_total", &[])
}
