//! The production overlay's alerts, dashboard and KEDA triggers against the
//! real thing: a real Prometheus (Debian's `prometheus`) scrapes the three
//! running stages and a RabbitMQ node of the test's own, whose
//! `rabbitmq_prometheus` exporter is configured as the production
//! `RabbitmqCluster` configures it (`return_per_object_metrics = true`,
//! scraped on `/metrics`). It evaluates the overlay's own rules, run 60 times
//! faster by the rewrite `prometheus::shorten_rules` documents (every minute
//! a second; the latency threshold 30 s lowered to 1 s so that a handler
//! answering in 1.5 s crosses it). The test brings each alert's condition
//! about for real, sees it firing on `/api/v1/alerts`, ends the condition and
//! sees it resolve.
//!
//! The node uses the prefix `swallow`, as production does, so the rules'
//! queue names are used as written. Wall time: about 2 to 3 minutes.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use swallow_tests::handler::{Answer, HandlerServer};
use swallow_tests::prometheus::{Prometheus, Threshold, metric_names, shorten_rules, tools_installed};
use swallow_tests::*;

/// Long enough for a shortened alert to fire (window and `for:` of at most
/// 15 s, plus RabbitMQ's 5 s statistics interval) or resolve, under load.
const ALERT_WAIT: Duration = Duration::from_secs(90);

/// More than the NotConsuming alerts' 1000 messages.
const BACKLOG: usize = 1100;

fn overlay(file: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/k8s/overlays/production")
        .join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The configuration: three integrations on one handler, answering a text
/// at once, with 500 (one attempt, so each is dead-lettered), and after 1.5 s.
fn config_text(stack: &TestStack, handler: &HandlerServer) -> String {
    let integration = |id: &str| {
        Integration::new(id)
            .trigger_words(&[&format!("{id}:")])
            .url(handler.url(&format!("/{id}")))
            .rate_limit(100000.0, 100000)
    };
    ConfigToml::on(stack)
        .top("reload_interval_ms", 200)
        .loopback()
        .responder_rate(100000.0)
        .integration(integration("ok"))
        // Its circuit off, so that every event dies at once.
        .integration(integration("dead").set("max_attempts", 1).set("circuit_failures", 0))
        .integration(integration("broken").set("circuit_failures", 1).set("timeout_ms", 1000))
        .integration(integration("slow").set("timeout_ms", 10000))
        .to_string()
}

/// Events whose `ts` is now, so that the end-to-end latency is real.
fn events(word: &str, n: usize) -> Vec<Vec<u8>> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
    (0..n)
        .map(|i| serde_json::to_vec(&chat_event(&format!("{word} {i}"), &format!("{now:.6}"))).unwrap())
        .collect()
}

/// The three stages, each always on the same port so that Prometheus keeps
/// scraping it across a restart.
struct Stages {
    config: std::path::PathBuf,
    addrs: [SocketAddr; 3],
    running: [Option<StageProcess>; 3],
}

const BINS: [&str; 3] = ["swallow-matcher", "swallow-deliverer", "swallow-responder"];

impl Stages {
    async fn start(config: &Path) -> Stages {
        let mut stages = Stages {
            config: config.to_owned(),
            addrs: [free_addr(), free_addr(), free_addr()],
            running: [None, None, None],
        };
        for i in 0..3 {
            stages.restart(i).await;
        }
        stages
    }

    async fn restart(&mut self, i: usize) {
        let env = HashMap::from([("SWALLOW_HTTP_ADDR".to_owned(), self.addrs[i].to_string())]);
        let mut stage = StageProcess::spawn(BINS[i], &self.config, &env).unwrap();
        stage.ops_addr = self.addrs[i];
        stage.ready(Duration::from_secs(30)).await;
        self.running[i] = Some(stage);
    }

    async fn stop(&mut self, i: usize) {
        let mut stage = self.running[i].take().expect("the stage runs");
        stage.kill().await;
    }
}

/// Publishes `bodies` and waits until the queues `queues` hold more than
/// 1000 ready messages between them.
async fn pile_up(stack: &TestStack, bodies: Vec<Vec<u8>>, queues: &[String], what: &str) {
    stack.publish_events_bytes(&bodies).await.unwrap();
    wait_for(Duration::from_secs(60), what, || async {
        let mut total = 0;
        for q in queues {
            total += stack.queue_len(q).await.ok()?;
        }
        (total > 1000).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_fire_and_resolve_and_the_dashboard_has_data_in_a_real_prometheus() {
    if !tools_installed(&[
        ("prometheus", "Debian: apt-get install prometheus"),
        ("rabbitmq-server", "Debian: apt-get install rabbitmq-server"),
    ]) {
        return;
    }
    let started = std::time::Instant::now();
    let exporter = free_addr().port();
    // As the production RabbitmqCluster: the plugin (which the operator
    // enables) with per-object metrics; here on loopback and a free port.
    let broker = OwnBroker::start_with(
        &["rabbitmq_prometheus"],
        &format!(
            "prometheus.return_per_object_metrics = true\nprometheus.tcp.ip = 127.0.0.1\nprometheus.tcp.port = {exporter}\n"
        ),
    )
    .await
    .unwrap();
    let stack = Arc::new(TestStack::with_prefix(broker.url(), "swallow".into()).await.unwrap());
    // `/broken` fails until healed, for the circuit alert.
    let healed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let heal = healed.clone();
    let handler = HandlerServer::start(move |r, _| match r.path.as_str() {
        "/dead" => Answer::status(500),
        "/broken" if !heal.load(std::sync::atomic::Ordering::SeqCst) => Answer::status(500),
        "/slow" => Answer::text("slowly").after(Duration::from_millis(1500)),
        _ => Answer::text("ok"),
    })
    .await;
    // A chat platform takes the replies (an unroutable reply is retried).
    let _replies = listen_outbound(&stack).await.unwrap();
    let dir = TempDir::new("alerts");
    let good = config_text(&stack, &handler);
    let path = write_config(&dir, &good);
    let mut stages = Stages::start(&path).await;

    let rules = shorten_rules(
        &overlay("prometheus-rules.yaml"),
        &[Threshold {
            alert: "SwallowEndToEndLatencyHigh",
            from: "> 30",
            to: "> 1",
        }],
    )
    .unwrap();
    let prometheus = Prometheus::start(
        &[
            ("swallow", stages.addrs.iter().map(ToString::to_string).collect()),
            ("rabbitmq", vec![format!("127.0.0.1:{exporter}")]),
        ],
        &rules,
    )
    .await
    .unwrap();
    // Some traffic, and every target scraped a few times.
    stack.publish_events_bytes(&events("ok:", 20)).await.unwrap();
    wait_for(Duration::from_secs(30), "the queues in Prometheus", || async {
        let up = prometheus.query("sum(up) == 4").await.ok()?;
        let queues = prometheus
            .query("rabbitmq_queue_messages_ready{queue=\"swallow.replies\"}")
            .await
            .ok()?;
        (!up.is_empty() && !queues.is_empty()).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(6)).await; // rate windows of 5 s fill

    // (4) Every dashboard panel's queries return series.
    let dashboard: serde_json::Value = serde_json::from_str(&overlay("swallow-dashboard.json")).unwrap();
    let mut empty = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap_or("?");
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap().replace("$__rate_interval", "5s");
            assert!(
                !expr.contains('$'),
                "panel {title:?}: a template variable not filled in: {expr}"
            );
            if prometheus.query(&expr).await.unwrap().is_empty() {
                empty.push(format!("{title:?}: {expr}"));
            }
        }
    }
    assert!(empty.is_empty(), "dashboard panels without data:\n{}", empty.join("\n"));

    // (5) The metrics the rules and the dashboard use, and the KEDA
    // triggers' queues, are what the broker and the stages export.
    let exported = prometheus.metric_names().await.unwrap();
    for file in ["prometheus-rules.yaml", "swallow-dashboard.json"] {
        let text = overlay(file);
        let used: BTreeSet<String> = ["swallow_", "rabbitmq_"]
            .iter()
            .flat_map(|p| metric_names(&text, p))
            .collect();
        // A histogram's own name (in a description) stands for its series.
        let unknown: Vec<_> = used
            .iter()
            .filter(|n| !exported.contains(*n) && !exported.contains(&format!("{n}_bucket")))
            .collect();
        assert!(unknown.is_empty(), "{file} uses metrics nothing exports: {unknown:?}");
    }
    let keda = overlay("keda.yaml");
    let mut triggers = 0;
    for doc in keda.split("\n---") {
        let Some(queue) = doc.lines().find_map(|l| l.trim().strip_prefix("queueName: ")) else {
            continue;
        };
        let regex = doc.contains("useRegex: \"true\"");
        let selector = if regex { "=~" } else { "=" };
        let expr = format!("rabbitmq_queue_messages_ready{{queue{selector}`{queue}`}}");
        let found = prometheus.query(&expr).await.unwrap();
        assert!(!found.is_empty(), "keda.yaml: no queue {queue} on the broker ({expr})");
        triggers += 1;
    }
    assert_eq!(triggers, 3, "keda.yaml has a trigger per stage");
    // A quiet pipeline raises nothing.
    let active = prometheus.alerts().await.unwrap();
    assert!(active.is_empty(), "alerts active before any fault: {active:?}");
    let checks_done = started.elapsed();

    // (3) Dead letters and the failure ratio (500 with max_attempts = 1), the
    // latency (a handler answering in 1.5 s) and a refused configuration,
    // all at once: they do not disturb one another.
    let load = [
        "SwallowCircuitOpen",
        "SwallowDeadLettersGrowing",
        "SwallowDeliveryFailureRatioHigh",
        "SwallowEndToEndLatencyHigh",
        "SwallowConfigReloadFailing",
    ];
    std::fs::write(&path, "this is not = [valid").unwrap();
    let until = tokio::time::Instant::now() + ALERT_WAIT;
    let traffic = {
        let stack = stack.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            while tokio::time::Instant::now() < until {
                tick.tick().await;
                let mut bodies = events("dead:", 2);
                bodies.extend(events("slow:", 1));
                bodies.extend(events("broken:", 1));
                stack.publish_events_bytes(&bodies).await.unwrap();
            }
        })
    };
    prometheus.until_fired(&load, ALERT_WAIT).await;
    traffic.abort();
    let _ = traffic.await;
    std::fs::write(&path, &good).unwrap();
    // The jobs waiting behind the open circuit come back for a probe, which
    // now succeeds: the circuit closes.
    healed.store(true, std::sync::atomic::Ordering::SeqCst);
    prometheus.until_resolved(&load, ALERT_WAIT).await;
    let load_done = started.elapsed();

    // A stage stopped while its queue holds more than 1000 messages: first
    // the responder (replies pile up), then the deliverer (jobs), then the
    // matcher (events no integration matches, so cheap to clear).
    stages.stop(2).await;
    pile_up(
        &stack,
        events("ok:", BACKLOG),
        &[stack.topology.replies_queue()],
        "replies to pile up",
    )
    .await;
    stages.stop(1).await;
    pile_up(
        &stack,
        events("ok:", BACKLOG),
        &stack.topology.delivery_queues(),
        "jobs to pile up",
    )
    .await;
    stages.stop(0).await;
    let unmatched = (0..BACKLOG)
        .map(|i| {
            let mut e = chat_event(&format!("nobody {i}"), "1.0");
            e["team_id"] = "T9999".into();
            serde_json::to_vec(&e).unwrap()
        })
        .collect();
    pile_up(&stack, unmatched, &[stack.topology.events_queue()], "events to pile up").await;
    let stopped = [
        "SwallowMatcherNotConsuming",
        "SwallowDelivererNotConsuming",
        "SwallowResponderNotConsuming",
    ];
    prometheus.until_fired(&stopped, ALERT_WAIT).await;
    for i in 0..3 {
        stages.restart(i).await;
    }
    prometheus.until_resolved(&stopped, ALERT_WAIT).await;
    let stopped_done = started.elapsed();

    // The broker gone: every stage loses its connection; back: resolved.
    broker.stop().await.unwrap();
    prometheus.until_fired(&["SwallowBrokerDisconnected"], ALERT_WAIT).await;
    broker.boot().await.unwrap();
    prometheus
        .until_resolved(&["SwallowBrokerDisconnected"], ALERT_WAIT)
        .await;
    eprintln!(
        "alerts test: dashboard and KEDA checked at {checks_done:.0?}, load alerts done at {load_done:.0?}, \
         stopped stages at {stopped_done:.0?}, broker at {:.0?}",
        started.elapsed()
    );
    drop(stages);
}
