//! The matcher against the real broker: exact jobs, invalid input, reload,
//! SIGKILL, a forced connection close, and headers whose bytes are not
//! UTF-8.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};
use swallow_shared::Config;
use swallow_tests::*;
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(30);

/// The four integrations the matcher tests match against.
fn integrations(toml: ConfigToml) -> ConfigToml {
    toml.integration(
        Integration::new("googlebot")
            .channel("#test")
            .trigger_words(&["googlebot:", "google"])
            .urls(&["http://127.0.0.1:9/a", "http://127.0.0.1:9/b"])
            .token("XXXXXXXXXXXXXXXXXX"),
    )
    .integration(
        Integration::new("watcher")
            .channel("C2147483705")
            .url("http://127.0.0.1:9/watch")
            .token("w"),
    )
    .integration(
        Integration::new("deploy")
            .trigger_words(&["deploy"])
            .set("trigger_match", "word")
            .url("http://127.0.0.1:9/deploy")
            .token("d"),
    )
    .integration(
        Integration::new("elsewhere")
            .team("T0002")
            .trigger_words(&["googlebot:"])
            .url("http://127.0.0.1:9/else")
            .token("e"),
    )
}

/// The stack's broker, a quick reload, the matcher on a free port and
/// [`integrations`].
fn config(stack: &TestStack) -> Config {
    let text = integrations(ConfigToml::on(stack).top("reload_interval_ms", 100).set(
        "matcher",
        "http_addr",
        "127.0.0.1:0",
    ))
    .to_string();
    Config::parse(&text, None).expect("test config")
}

/// A stack of its own with a matcher on [`integrations`], its jobs and its
/// invalid events drained.
async fn matcher_draining(
    name: &str,
) -> (
    TestStack,
    CancellationToken,
    swallow_matcher::Matcher,
    Collector,
    Collector,
) {
    let stack = TestStack::new(name).await.unwrap();
    let shutdown = CancellationToken::new();
    let matcher = swallow_matcher::start(config(&stack), shutdown.clone()).await.unwrap();
    let jobs = stack.drain_jobs().await.unwrap();
    let invalid = stack.drain(&stack.topology.events_invalid_queue()).await.unwrap();
    (stack, shutdown, matcher, jobs, invalid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_become_exactly_the_expected_jobs() {
    let stack = TestStack::new("match-exact").await.unwrap();
    let shutdown = CancellationToken::new();
    let matcher = swallow_matcher::start(config(&stack), shutdown.clone()).await.unwrap();
    let mut jobs = stack.drain_jobs().await.unwrap();

    let mut seed = chat_event(
        "googlebot: What is the air-speed velocity of an unladen swallow?",
        "1355517523.000005",
    );
    stack.publish_event(&seed).await.unwrap();
    stack.publish_event(&chat_event("deploy now", "2.0")).await.unwrap();
    stack.publish_event(&chat_event("nothing to see", "3.0")).await.unwrap();
    let mut bot = chat_event("googlebot: loop?", "4.0");
    bot["bot_id"] = "B1".into();
    stack.publish_event(&bot).await.unwrap();
    let mut private = chat_event("googlebot: secret", "5.0");
    private["channel_type"] = "private".into();
    stack.publish_event(&private).await.unwrap();
    seed["team_id"] = "T0002".into();
    seed["ts"] = "6.0".into();
    stack.publish_event(&seed).await.unwrap();

    // seed: googlebot ×2 URLs + watcher; "deploy now": watcher + deploy;
    // "nothing": watcher; bot: none; private: none; T0002: elsewhere.
    jobs.until(7, T, "delivery jobs").await;
    jobs.settle(Duration::from_millis(500)).await;
    let got: BTreeSet<(String, String, String, String)> = jobs
        .json()
        .iter()
        .map(|j| {
            (
                j["event"]["ts"].as_str().unwrap().to_owned(),
                j["integration_id"].as_str().unwrap().to_owned(),
                j["url"].as_str().unwrap().to_owned(),
                j["trigger_word"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let want: BTreeSet<(String, String, String, String)> = [
        ("1355517523.000005", "googlebot", "http://127.0.0.1:9/a", "googlebot:"),
        ("1355517523.000005", "googlebot", "http://127.0.0.1:9/b", "googlebot:"),
        ("1355517523.000005", "watcher", "http://127.0.0.1:9/watch", ""),
        ("2.0", "watcher", "http://127.0.0.1:9/watch", ""),
        ("2.0", "deploy", "http://127.0.0.1:9/deploy", "deploy"),
        ("3.0", "watcher", "http://127.0.0.1:9/watch", ""),
        ("6.0", "elsewhere", "http://127.0.0.1:9/else", "googlebot:"),
    ]
    .into_iter()
    .map(|(a, b, c, d)| (a.into(), b.into(), c.into(), d.into()))
    .collect();
    assert_eq!(got, want);
    assert_eq!(jobs.got.len(), 7, "no extra jobs");
    let first = &jobs.json()[0];
    assert_eq!(first["v"], 1);
    assert!(first["delivery_id"].as_str().unwrap().starts_with("msg_"));
    assert!(
        jobs.got.iter().all(|d| d.properties.delivery_mode() == &Some(2)),
        "jobs are persistent"
    );

    let m = |name, labels: &'static [(&'static str, &'static str)]| metric(matcher.ops_addr, name, labels);
    assert_eq!(m("swallow_events_received_total", &[]).await.unwrap(), 6.0);
    assert_eq!(m("swallow_events_matched_total", &[]).await.unwrap(), 4.0);
    assert_eq!(
        m("swallow_events_ignored_total", &[("reason", "bot")]).await.unwrap(),
        1.0
    );
    assert_eq!(
        m("swallow_events_ignored_total", &[("reason", "not_public")])
            .await
            .unwrap(),
        1.0
    );
    assert_eq!(m("swallow_jobs_published_total", &[]).await.unwrap(), 7.0);
    assert_eq!(m("swallow_integrations_loaded", &[]).await.unwrap(), 4.0);
    shutdown.cancel();
    matcher.join().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_events_go_to_invalid_and_never_stop_the_matcher() {
    let (stack, shutdown, matcher, mut jobs, mut invalid) = matcher_draining("match-invalid").await;

    let big_text = "x".repeat(1024 * 1024);
    let mut bodies = Vec::new();
    let mut expected_reason = HashMap::new();
    for i in 0..2000usize {
        if i % 2 == 0 {
            // Valid: matches "deploy" only (channel C9 is nobody's).
            let mut e = chat_event("deploy it", &format!("{i}.0"));
            e["channel_id"] = "C9".into();
            e["channel_name"] = "nine".into();
            bodies.push(serde_json::to_vec(&e).unwrap());
        } else {
            let (body, reason): (Vec<u8>, &str) = match (i / 2) % 4 {
                0 => (format!("not json {i}").into_bytes(), "not_json"),
                1 => {
                    let mut b = format!("{{\"team_id\":\"T0001\",\"channel_id\":\"C9\",\"user_id\":\"U\",\"ts\":\"{i}\",\"text\":\"deploy ").into_bytes();
                    b.extend_from_slice(b"\xff\xfe\"}");
                    (b, "not_json")
                }
                2 => (
                    format!("{{\"team_id\":\"T0001\",\"channel_id\":\"C9\",\"text\":\"deploy {i}\"}}").into_bytes(),
                    "bad_field",
                ),
                _ => (
                    serde_json::to_vec(&chat_event(&format!("deploy {big_text}"), &format!("{i}"))).unwrap(),
                    "too_large",
                ),
            };
            expected_reason.insert(body.clone(), reason);
            bodies.push(body);
        }
    }
    for chunk in bodies.chunks(200) {
        stack.publish_events_bytes(chunk).await.unwrap();
    }
    jobs.until(1000, Duration::from_secs(90), "jobs for the valid events")
        .await;
    invalid.until(1000, Duration::from_secs(90), "invalid events").await;
    jobs.settle(Duration::from_millis(300)).await;
    invalid.settle(Duration::from_millis(300)).await;
    let ts: BTreeSet<String> = jobs
        .json()
        .iter()
        .map(|j| j["event"]["ts"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ts.len(), 1000, "every valid event matched once");
    assert_eq!(invalid.got.len(), 1000);
    for d in &invalid.got {
        let reason = expected_reason
            .get(&d.data)
            .expect("the invalid copy is byte for byte the event");
        let error = header(d, "x-swallow-error").expect("x-swallow-error header");
        assert!(error.starts_with(reason), "{error} should start with {reason}");
        assert_eq!(header(d, "x-swallow-routing-key").as_deref(), Some("chat.message"));
    }
    // Still consuming: one more valid event becomes a job.
    stack.publish_event(&chat_event("deploy again", "last")).await.unwrap();
    jobs.until(1002, T, "jobs after the malformed flood").await; // watcher + deploy
    let r = reqwest::get(format!("http://{}/readyz", matcher.ops_addr))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        metric(matcher.ops_addr, "swallow_events_invalid_total", &[])
            .await
            .unwrap(),
        1000.0
    );
    assert_eq!(
        metric(
            matcher.ops_addr,
            "swallow_events_invalid_total",
            &[("reason", "too_large")]
        )
        .await
        .unwrap(),
        250.0
    );
    shutdown.cancel();
    matcher.join().await;
}

/// A header's value is bytes in AMQP, UTF-8 or not: a client that insists
/// on UTF-8 drops its connection on such an event, before the stage sees
/// it, again at every redelivery (BENCHMARKS.md, "amqprs under faults").
/// Here the event is matched like any other, an invalid one goes to the
/// invalid queue with the header kept byte for byte, and the matcher
/// never leaves its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_that_are_not_utf8_are_carried_and_never_drop_the_connection() {
    let (stack, shutdown, matcher, mut jobs, mut invalid) = matcher_draining("match-bytes").await;
    let bytes = LongString::from(vec![0xff, 0xfe, b'x']);
    let mut headers = FieldTable::default();
    headers.insert("x-bytes".into(), AMQPValue::LongString(bytes.clone()));
    let properties = BasicProperties::default().with_delivery_mode(2).with_headers(headers);
    let event = serde_json::to_vec(&chat_event("deploy now", "b1")).unwrap();
    stack.publish_event_with(&event, properties.clone()).await.unwrap();
    stack.publish_event_with(b"not json", properties).await.unwrap();

    // "deploy now": watcher + deploy.
    jobs.until(2, T, "the jobs of the event with a header of bytes").await;
    invalid.until(1, T, "the invalid event with a header of bytes").await;
    jobs.settle(Duration::from_millis(300)).await;
    assert_eq!(jobs.got.len(), 2, "no extra jobs");
    let copy = &invalid.got[0];
    assert_eq!(copy.data, b"not json");
    let kept = copy
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-bytes").cloned());
    assert_eq!(kept, Some(AMQPValue::LongString(bytes)), "the header, byte for byte");
    let error = header(copy, "x-swallow-error").expect("x-swallow-error header");
    assert!(error.starts_with("not_json"), "{error}");
    assert_eq!(
        metric(matcher.ops_addr, "swallow_broker_reconnects_total", &[])
            .await
            .unwrap(),
        0.0,
        "the matcher kept its connection"
    );
    shutdown.cancel();
    matcher.join().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_reload_while_events_flow_loses_none() {
    let stack = TestStack::new("match-reload").await.unwrap();
    let dir = TempDir::new("matcher");
    let first = integrations(ConfigToml::on(&stack).top("reload_interval_ms", 50).set(
        "matcher",
        "http_addr",
        "127.0.0.1:0",
    ));
    let path = first.write(&dir);
    let config = Config::load(&path).unwrap();
    let shutdown = CancellationToken::new();
    let matcher = swallow_matcher::start(config, shutdown.clone()).await.unwrap();
    let mut jobs = stack.drain_jobs().await.unwrap();
    let added = first.clone().integration(
        Integration::new("late")
            .trigger_words(&["deploy"])
            .url("http://127.0.0.1:9/late")
            .token("l"),
    );

    let publisher = async {
        for i in 0..600 {
            let mut e = chat_event("deploy", &format!("{i}.0"));
            e["channel_id"] = "C9".into();
            stack.publish_event(&e).await.unwrap();
            match i {
                200 => std::fs::write(&path, added.to_string()).unwrap(),
                // An invalid file is refused; the integrations in force stay.
                400 => std::fs::write(
                    &path,
                    added.clone().raw("[[integrations]]\nid = \"broken\"\n").to_string(),
                )
                .unwrap(),
                _ => {}
            }
            if i % 50 == 0 {
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
        }
    };
    publisher.await;
    wait_for(T, "the refused reload to be counted", || async {
        (metric(matcher.ops_addr, "swallow_config_reloads_total", &[("result", "error")])
            .await
            .ok()?
            >= 1.0)
            .then_some(())
    })
    .await;
    let deploy_ts = |jobs: &Collector, id: &str| -> BTreeSet<String> {
        jobs.json()
            .iter()
            .filter(|j| j["integration_id"] == id)
            .map(|j| j["event"]["ts"].as_str().unwrap().to_owned())
            .collect()
    };
    jobs.until_with(T, "a job for each of the 600 events", |j| {
        deploy_ts(j, "deploy").len() == 600
    })
    .await;
    jobs.settle(Duration::from_millis(300)).await;
    let late = deploy_ts(&jobs, "late");
    assert!(
        late.len() >= 100,
        "the added integration fired for events after the reload ({} times)",
        late.len()
    );
    assert!(
        late.contains("599.0"),
        "the added integration stayed in force after the refused file"
    );
    assert_eq!(
        metric(matcher.ops_addr, "swallow_config_reloads_total", &[("result", "ok")])
            .await
            .unwrap(),
        1.0
    );
    assert_eq!(
        metric(matcher.ops_addr, "swallow_integrations_loaded", &[])
            .await
            .unwrap(),
        5.0
    );
    shutdown.cancel();
    matcher.join().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_no_event() {
    let stack = TestStack::new("match-kill").await.unwrap();
    let dir = TempDir::new("matcher");
    let path = integrations(ConfigToml::on(&stack)).write(&dir);
    let mut jobs = stack.drain_jobs().await.unwrap();
    let mut matcher = StageProcess::spawn("swallow-matcher", &path, &HashMap::new()).unwrap();
    matcher.ready(T).await;

    let bodies: Vec<Vec<u8>> = (0..3000)
        .map(|i| {
            let mut e = chat_event("deploy", &format!("{i}.0"));
            e["channel_id"] = "C9".into();
            serde_json::to_vec(&e).unwrap()
        })
        .collect();
    let publish = stack.publish_events_bytes(&bodies);
    let kill = async {
        jobs.until(300, T, "jobs before the kill").await;
        matcher.kill().await;
    };
    let (published, ()) = tokio::join!(publish, kill);
    published.unwrap();
    let restarted = StageProcess::spawn("swallow-matcher", &path, &HashMap::new()).unwrap();
    restarted.ready(T).await;
    let unique = |jobs: &Collector| -> BTreeSet<String> {
        jobs.got
            .iter()
            .map(|d| {
                serde_json::from_slice::<serde_json::Value>(&d.data).unwrap()["delivery_id"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    };
    jobs.until_with(Duration::from_secs(60), "a job for each of the 3000 events", |j| {
        unique(j).len() == 3000
    })
    .await;
    jobs.settle(Duration::from_millis(300)).await;
    let got = unique(&jobs);
    let duplicates = jobs.got.len() - got.len();
    println!(
        "sigkill: {} jobs, {} unique, {duplicates} duplicates",
        jobs.got.len(),
        got.len()
    );
    assert_eq!(got.len(), 3000, "lost {} events", 3000 - got.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_connection_close_is_recovered() {
    let stack = TestStack::new("match-reconnect").await.unwrap();
    let shutdown = CancellationToken::new();
    let matcher = swallow_matcher::start(config(&stack), shutdown.clone()).await.unwrap();
    let mut jobs = stack.drain_jobs().await.unwrap();
    let ready = |addr| async move {
        reqwest::get(format!("http://{addr}/readyz"))
            .await
            .ok()
            .map(|r| r.status().is_success())
    };
    wait_for(T, "the matcher to be ready", || async {
        ready(matcher.ops_addr).await.filter(|r| *r)
    })
    .await;
    stack.publish_event(&chat_event("deploy one", "1.0")).await.unwrap();
    jobs.until(2, T, "jobs before the close").await;

    close_connection_named(&matcher.connection_name).await.unwrap();
    wait_for(T, "a reconnect to be counted", || async {
        (metric(matcher.ops_addr, "swallow_broker_reconnects_total", &[])
            .await
            .ok()?
            >= 1.0)
            .then_some(())
    })
    .await;
    stack.publish_event(&chat_event("deploy two", "2.0")).await.unwrap();
    jobs.until(4, T, "jobs after the reconnect").await;
    wait_for(T, "/readyz to be true again", || async {
        ready(matcher.ops_addr).await.filter(|r| *r)
    })
    .await;
    shutdown.cancel();
    matcher.join().await;
}
