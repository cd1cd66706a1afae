//! Failing handlers, with the three real binaries: circuit breakers, the fair
//! share of attempt permits, and the notice in the channel.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use swallow_tests::handler::{Answer, HandlerServer, Recorded, refused_addr};
use swallow_tests::*;

const T: Duration = Duration::from_secs(30);

/// The scenario: this many integrations whose handlers hang...
const HANGING: usize = 80;
/// ...beside one healthy integration, each sent this many events a second...
const EVENTS_PER_SECOND: u64 = 4;
/// ...for this long.
const SENDING: Duration = Duration::from_secs(20);

fn text_of(r: &Recorded) -> String {
    r.field("text")
}

fn event_in(channel: &str, text: &str, ts: &str) -> serde_json::Value {
    let mut event = chat_event(text, ts);
    event["channel_id"] = channel.into();
    event["channel_name"] = channel.to_lowercase().into();
    event
}

/// An integration firing on every message in `channel`.
/// (The one-second timeout and five a second of the circuits test.)
fn channel_integration(id: &str, channel: &str, url: &str) -> Integration {
    Integration::new(id)
        .channel(channel)
        .url(url)
        .set("timeout_ms", 1000)
        .rate_limit(5.0, 10)
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_handlers_open_their_circuits_and_delay_no_one_else() {
    let stack = TestStack::new("circuits").await.unwrap();
    let healed = Arc::new(AtomicBool::new(false));
    let hanging = {
        let healed = healed.clone();
        HandlerServer::start(move |_, _| {
            if healed.load(Ordering::SeqCst) {
                Answer::status(200)
            } else {
                Answer::status(200).after(Duration::from_secs(8))
            }
        })
        .await
    };
    let healthy = HandlerServer::start(|_, _| Answer::status(200)).await;
    let mut config =
        ConfigToml::on(&stack)
            .loopback()
            .integration(channel_integration("healthy", "COK", &healthy.url("/ok")));
    for i in 0..HANGING {
        let url = hanging.url(&format!("/h{i}"));
        config = config.integration(channel_integration(&format!("hang{i}"), &format!("CH{i}"), &url));
    }
    let dir = TempDir::new("circuits");
    let path = config.write(&dir);
    let pipeline = Pipeline::spawn(&path).await.unwrap();
    let deliverer = pipeline.deliverer.ops_addr;

    // Every channel gets EVENTS_PER_SECOND events a second for SENDING.
    let started = Instant::now();
    let mut sent_healthy: HashMap<String, Instant> = HashMap::new();
    let mut sent_hanging: HashMap<usize, HashSet<String>> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / EVENTS_PER_SECOND));
    let mut n = 0u64;
    while started.elapsed() < SENDING {
        tick.tick().await;
        n += 1;
        let ts = format!("1700000000.{n:06}");
        let mut bodies = Vec::new();
        for i in 0..HANGING {
            let text = format!("h{i} #{n}");
            bodies.push(serde_json::to_vec(&event_in(&format!("CH{i}"), &text, &ts)).unwrap());
            sent_hanging.entry(i).or_default().insert(text);
        }
        stack.publish_events_bytes(&bodies).await.unwrap();
        let text = format!("ok #{n}");
        stack.publish_event(&event_in("COK", &text, &ts)).await.unwrap();
        sent_healthy.insert(text, Instant::now());
    }
    let open = metric(deliverer, "swallow_circuits_open", &[]).await.unwrap();
    assert_eq!(open as usize, HANGING, "every hanging handler's circuit is open");

    // The healthy integration: every event, promptly.
    let want = sent_healthy.len();
    let got = wait_for(T, "every healthy event POSTed", || {
        let got = healthy.requests();
        async move {
            let distinct: HashSet<String> = got.iter().map(text_of).collect();
            (distinct.len() >= want).then_some(got)
        }
    })
    .await;
    let latencies: Vec<f64> = got
        .iter()
        .filter_map(|r| {
            sent_healthy
                .get(&text_of(r))
                .map(|sent| (r.at - *sent).as_secs_f64() * 1000.0)
        })
        .collect();
    let repeats = got.len() - want;
    let slow: Vec<String> = got
        .iter()
        .filter_map(|r| {
            let sent = sent_healthy.get(&text_of(r))?;
            let ms = (r.at - *sent).as_millis();
            (ms > 250).then(|| format!("{:.1}s:{ms}ms", (*sent - started).as_secs_f64()))
        })
        .collect();
    eprintln!("slow healthy POSTs (sent at: latency): {slow:?}");
    let distinct: HashSet<String> = got.iter().map(text_of).collect();
    assert_eq!(distinct.len(), sent_healthy.len(), "every healthy event was POSTed");
    for reason in ["circuit_open", "busy", "schedule", "missed_slot"] {
        let n = metric(deliverer, "swallow_jobs_deferred_total", &[("reason", reason)])
            .await
            .unwrap();
        eprintln!("deferred {reason}: {n}");
    }
    let p50 = percentile(latencies.clone(), 0.5);
    let p90 = percentile(latencies.clone(), 0.9);
    let p99 = percentile(latencies, 0.99);
    let attempts_while_hanging = hanging.count();
    eprintln!(
        "healthy event → POST beside {HANGING} hanging handlers: p50 {p50:.1} ms, p90 {p90:.1} ms, p99 {p99:.1} ms, \
         {repeats} repeated; \
         {attempts_while_hanging} attempts reached the hanging handlers"
    );
    // Held up behind the hanging handlers (as before circuits and the fair
    // share: p50 7.9 s, p99 13.6 s), the healthy integration's POSTs wait out
    // their attempts' 1,000 ms timeout, most of them. The bounds are in those
    // terms, not in a machine's speed: these are debug builds, and on a slow
    // shared two-core machine (the broker and four processes, 80
    // integrations' jobs bouncing on the delay ladder at ~800 visits/s) the
    // stages saturate in bursts as the circuits open and probe (over twelve
    // runs on one such machine: p50 50-77 ms, p90 93-623 ms where printed,
    // p99 130-1,650 ms; on a fast quiet one, p99 41 ms). The release build's figure
    // against the healthy integration alone is `swallow-load --failing-only`.
    assert!(
        p50 < 250.0,
        "the healthy integration's p50 event → POST was {p50:.1} ms: it waited behind hanging handlers"
    );
    assert!(
        p90 < 1_000.0,
        "the healthy integration's p90 event → POST was {p90:.1} ms: a hanging attempt's whole timeout"
    );
    assert!(
        p99 < 3_000.0,
        "the healthy integration's p99 event → POST was {p99:.1} ms: three of the hanging handlers' timeouts"
    );
    assert!(
        attempts_while_hanging < HANGING * 15,
        "{attempts_while_hanging} attempts went to hanging handlers: the circuits did not stop them"
    );

    // Heal: the next probes close the circuits and the waiting jobs arrive,
    // within each integration's rate limit; nothing is lost.
    let healed_at = Instant::now();
    healed.store(true, Ordering::SeqCst);
    wait_for(
        Duration::from_secs(120),
        "every circuit to close after the heal",
        || async {
            let open = metric(deliverer, "swallow_circuits_open", &[]).await.ok()?;
            (open == 0.0).then_some(())
        },
    )
    .await;
    let mut dead = stack.drain(&stack.topology.deliveries_dead_queue()).await.unwrap();
    let expected: usize = sent_hanging.values().map(HashSet::len).sum();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        dead.settle(Duration::from_millis(200)).await;
        let after: HashSet<String> = hanging
            .requests()
            .iter()
            .filter(|r| r.at >= healed_at)
            .map(text_of)
            .collect();
        if after.len() + dead.got.len() >= expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "timed out: of {expected} hanging integrations' events, {} were delivered after the heal and {} dead-lettered",
            after.len(),
            dead.got.len()
        );
    }
    let requests = hanging.requests();
    for i in 0..HANGING {
        let path = format!("/h{i}");
        let mine: Vec<&Recorded> = requests
            .iter()
            .filter(|r| r.path == path && r.at >= healed_at)
            .collect();
        let delivered: HashSet<String> = mine.iter().map(|r| text_of(r)).collect();
        let dead_here = dead
            .json()
            .iter()
            .filter(|j| j["integration_id"] == format!("hang{i}"))
            .count();
        assert_eq!(
            delivered.len() + dead_here,
            sent_hanging[&i].len(),
            "hang{i}: every event delivered after the heal or dead-lettered"
        );
        let at: Vec<Instant> = mine.iter().map(|r| r.at).collect();
        assert_within_limit(&at, 5.0, 10, 1.0, &format!("hang{i} after the heal"));
    }
    let closed = metric(deliverer, "swallow_circuit_transitions_total", &[("to", "closed")])
        .await
        .unwrap();
    assert!(closed >= HANGING as f64, "{closed} transitions to closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_delivery_posts_one_notice_per_interval() {
    let stack = TestStack::new("notice").await.unwrap();
    // The handler's body must never reach the channel.
    let handler = HandlerServer::start(|_, _| Answer::status(500).body("<!channel> the handler's own words")).await;
    let dir = TempDir::new("notice");
    let path = ConfigToml::on(&stack)
        .loopback()
        .integration(
            Integration::new("googlebot")
                .channel("#test")
                .url(handler.url("/googlebot"))
                .set("bot_name", "Google Bot")
                .set("max_attempts", 2)
                .set("on_failure", "notify"),
        )
        .write(&dir);
    let mut out = listen_outbound(&stack).await.unwrap();
    let mut dead = stack.drain(&stack.topology.deliveries_dead_queue()).await.unwrap();
    let _pipeline = Pipeline::spawn(&path).await.unwrap();

    let mut first = chat_event("googlebot: anyone?", "1355517523.000005");
    first["thread_ts"] = "1355517500.000001".into();
    stack.publish_event(&first).await.unwrap();
    dead.until(1, T, "the first delivery dead-lettered").await;
    out.until(1, T, "the notice").await;
    let notice = &out.json()[0];
    let text = notice["text"].as_str().unwrap();
    let delivery_id = header(&dead.got[0], "x-swallow-delivery-id").unwrap();
    assert!(text.contains("HTTP 500"), "the notice gives the status: {text}");
    assert!(text.contains("2 attempts"), "the notice gives the attempts: {text}");
    assert!(text.contains(&delivery_id), "the notice gives the delivery id: {text}");
    assert!(!text.contains("handler's own words") && !text.contains("<!"), "{text}");
    assert_eq!(notice["username"], "Google Bot");
    assert_eq!(
        notice["thread_ts"], "1355517500.000001",
        "in the triggering message's thread"
    );
    assert_eq!(notice["channel_id"], "C2147483705");

    // A second failure within the interval: dead-lettered, no second notice.
    stack
        .publish_event(&chat_event("googlebot: still there?", "1355517524.000001"))
        .await
        .unwrap();
    dead.until(2, T, "the second delivery dead-lettered").await;
    let quiet = out.settle(Duration::from_secs(3)).await;
    assert_eq!(quiet.len(), 1, "one notice per integration per channel per interval");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_ages_out_behind_an_open_circuit_is_dead_with_circuit_open() {
    let stack = TestStack::new("circuit-age").await.unwrap();
    let url = format!("http://{}/nobody", refused_addr());
    let dir = TempDir::new("circuit-age");
    let path = ConfigToml::on(&stack)
        .loopback()
        .integration(
            Integration::new("googlebot")
                .channel("#test")
                .url(&url)
                .set("circuit_failures", 1)
                .set("max_age_s", 4),
        )
        .write(&dir);
    let mut dead = stack.drain(&stack.topology.deliveries_dead_queue()).await.unwrap();
    let pipeline = Pipeline::spawn(&path).await.unwrap();
    stack
        .publish_event(&chat_event("googlebot: first", "1355517523.000001"))
        .await
        .unwrap();
    wait_for(T, "the circuit to open after one refused connection", || async {
        let open = metric(pipeline.deliverer.ops_addr, "swallow_circuits_open", &[])
            .await
            .ok()?;
        (open == 1.0).then_some(())
    })
    .await;
    stack
        .publish_event(&chat_event("googlebot: second", "1355517523.000002"))
        .await
        .unwrap();
    dead.until(2, T, "both jobs dead-lettered").await;
    let reasons: Vec<String> = dead
        .got
        .iter()
        .map(|d| header(d, "x-swallow-reason").unwrap())
        .collect();
    assert!(
        reasons.iter().any(|r| r == "circuit_open"),
        "a job aged out behind the open circuit: {reasons:?}"
    );
    for d in &dead.got {
        if header(d, "x-swallow-reason").as_deref() == Some("circuit_open") {
            let error = header(d, "x-swallow-error").unwrap();
            assert!(error.contains("connect"), "the last real error is kept: {error}");
        }
    }
}
