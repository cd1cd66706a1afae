//! Three deliverer replicas on one broker: rate limits hold across them, work
//! spreads evenly, a killed replica's shards move to the others, and a new
//! replica takes its share.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use swallow_tests::handler::{Answer, HandlerServer};
use swallow_tests::*;

const T: Duration = Duration::from_secs(30);

/// Integrations in channel C1 of team T1, each with its rate limit
/// (`per_second`, burst), on `handler` under `/<id>`.
fn config(stack: &TestStack, handler: &HandlerServer, integrations: &[(String, (f64, u32))]) -> String {
    integrations
        .iter()
        .fold(ConfigToml::on(stack).loopback(), |toml, (id, (per_second, burst))| {
            toml.integration(
                Integration::new(id)
                    .team("T1")
                    .channel("C1")
                    .url(handler.url(&format!("/{id}")))
                    .rate_limit(*per_second, *burst),
            )
        })
        .to_string()
}

const FAST: (f64, u32) = (10000.0, 10000);

async fn publish(stack: &TestStack, handler: &HandlerServer, id: &str, from: usize, n: usize) {
    let mut confirms = Vec::new();
    for i in from..from + n {
        let mut event = chat_event("hello", &format!("{i}.0"));
        event.as_object_mut().unwrap().retain(|_, v| !v.is_null());
        let job = serde_json::json!({
            "delivery_id": format!("msg_{id}_{i}"), "integration_id": id, "url": handler.url(&format!("/{id}")),
            "trigger_word": "", "event": event, "created_at_ms": swallow_shared::wire::messages::now_millis(),
        });
        confirms.push(
            stack
                .channel
                .basic_publish(
                    "".into(),
                    stack.topology.delivery_queue_for(id).as_str().into(),
                    Default::default(),
                    &serde_json::to_vec(&job).unwrap(),
                    lapin::BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .unwrap(),
        );
    }
    for c in confirms {
        assert!(c.await.unwrap().is_ack());
    }
}

fn spawn(path: &Path) -> StageProcess {
    StageProcess::spawn("swallow-deliverer", path, &HashMap::new()).unwrap()
}

async fn gauge(p: &StageProcess, name: &str) -> f64 {
    metric(p.ops_addr, name, &[]).await.unwrap_or(0.0)
}

/// Waits until the live replicas agree there are `n` of them and hold all
/// shards between them, each at least one.
async fn settled(replicas: &[&StageProcess], shards: u32, within: Duration) {
    wait_for(within, "the replicas to share out the shards", || async {
        let mut held = 0.0;
        for r in replicas {
            if gauge(r, "swallow_deliverer_members").await != replicas.len() as f64 {
                return None;
            }
            let h = gauge(r, "swallow_deliverer_shards_held").await;
            if h < 1.0 {
                return None;
            }
            held += h;
        }
        (held == shards as f64).then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_holds_across_three_replicas() {
    let stack = TestStack::new("scale-rate").await.unwrap();
    let handler = HandlerServer::start(|_, _| Answer::status(200)).await;
    let mut integrations = vec![("limited".to_owned(), (2.0, 5))];
    integrations.extend((0..20).map(|i| (format!("other{i}"), FAST)));
    let dir = TempDir::new("scale-rate");
    let path = write_config(&dir, &config(&stack, &handler, &integrations));
    let replicas = [spawn(&path), spawn(&path), spawn(&path)];
    for r in &replicas {
        r.ready(T).await;
    }
    settled(&replicas.iter().collect::<Vec<_>>(), stack.topology.shards(), T).await;

    publish(&stack, &handler, "limited", 0, 150).await;
    for i in 0..20 {
        publish(&stack, &handler, &format!("other{i}"), 0, 50).await;
    }
    let first = handler
        .until(1, T, "the first delivery")
        .await
        .into_iter()
        .find(|r| r.path == "/limited");
    let started = first.map(|r| r.at).unwrap_or_else(Instant::now);
    tokio::time::sleep_until((started + Duration::from_secs(30)).into()).await;
    let limited = handler
        .requests()
        .iter()
        .filter(|r| r.path == "/limited" && r.at <= started + Duration::from_secs(30))
        .count();
    let others = handler
        .requests()
        .iter()
        .filter(|r| r.path.starts_with("/other"))
        .count();
    let allowance = 2.0 * 30.0 + 5.0;
    println!("rate limit across 3 replicas: {limited} in 30 s (allowance {allowance}), others {others}");
    assert!(
        limited as f64 <= 1.1 * allowance,
        "{limited} deliveries exceed 1.1 × {allowance}"
    );
    assert!(limited >= 50, "the limited integration kept flowing ({limited})");
    assert_eq!(others, 1000, "the other integrations flowed meanwhile");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_spreads_evenly_over_three_replicas() {
    let stack = TestStack::new("scale-spread").await.unwrap();
    let handler = HandlerServer::start(|_, _| Answer::status(200)).await;
    let integrations: Vec<_> = (0..30).map(|i| (format!("busy{i}"), FAST)).collect();
    let dir = TempDir::new("scale-spread");
    let path = write_config(&dir, &config(&stack, &handler, &integrations));
    let replicas = [spawn(&path), spawn(&path), spawn(&path)];
    for r in &replicas {
        r.ready(T).await;
    }
    settled(&replicas.iter().collect::<Vec<_>>(), stack.topology.shards(), T).await;
    for (id, _) in &integrations {
        publish(&stack, &handler, id, 0, 50).await;
    }
    handler.until(1500, Duration::from_secs(60), "deliveries").await;
    let mut shares = Vec::new();
    for r in &replicas {
        shares.push(
            metric(r.ops_addr, "swallow_deliveries_total", &[("outcome", "delivered")])
                .await
                .unwrap(),
        );
    }
    let total: f64 = shares.iter().sum();
    println!("shares over 3 replicas: {shares:?} of {total}");
    assert_eq!(total, 1500.0);
    for s in &shares {
        let f = s / total;
        assert!(
            (0.20..=0.47).contains(&f),
            "a replica carried {:.0}% of the deliveries: {shares:?}",
            f * 100.0
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_is_replaced_and_a_new_one_takes_its_share() {
    let stack = TestStack::new("scale-kill").await.unwrap();
    let handler = HandlerServer::start(|_, _| Answer::status(200)).await;
    let integrations: Vec<_> = (0..30).map(|i| (format!("busy{i}"), FAST)).collect();
    let dir = TempDir::new("scale-kill");
    let path = write_config(&dir, &config(&stack, &handler, &integrations));
    let mut replicas = vec![spawn(&path), spawn(&path), spawn(&path)];
    for r in &replicas {
        r.ready(T).await;
    }
    settled(&replicas.iter().collect::<Vec<_>>(), stack.topology.shards(), T).await;

    // Steady load while one replica is killed.
    let load = async {
        for round in 0..10 {
            for (id, _) in &integrations {
                publish(&stack, &handler, id, round * 10, 10).await;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    let kill = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        replicas[0].kill().await;
        let killed_at = Instant::now();
        let rest: Vec<&StageProcess> = replicas[1..].iter().collect();
        settled(&rest, stack.topology.shards(), Duration::from_secs(10)).await;
        println!("the other replicas took over all shards in {:?}", killed_at.elapsed());
    };
    tokio::join!(load, kill);
    let all: usize = 30 * 100;
    let unique = |h: &HandlerServer| -> usize {
        h.requests()
            .iter()
            .filter_map(|r| r.header("webhook-id").map(str::to_owned))
            .collect::<BTreeSet<_>>()
            .len()
    };
    wait_for(
        Duration::from_secs(60),
        "every job delivered after the kill",
        || async { (unique(&handler) == all).then_some(()) },
    )
    .await;
    println!("kill: {} POSTs, {} unique of {all}", handler.count(), unique(&handler));

    // A replica added later takes its share within 30 s.
    replicas.remove(0);
    let newcomer = spawn(&path);
    newcomer.ready(T).await;
    let added_at = Instant::now();
    let live: Vec<&StageProcess> = replicas.iter().chain([&newcomer]).collect();
    settled(&live, stack.topology.shards(), Duration::from_secs(30)).await;
    println!("the new replica took its share in {:?}", added_at.elapsed());
    for (id, _) in &integrations {
        publish(&stack, &handler, id, 1000, 10).await;
    }
    wait_for(T, "the new replica to deliver", || async {
        let n = metric(
            newcomer.ops_addr,
            "swallow_deliveries_total",
            &[("outcome", "delivered")],
        )
        .await
        .ok()?;
        (n > 0.0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matchers_and_responders_scale_out_without_duplicates() {
    let stack = TestStack::new("scale-mr").await.unwrap();
    let handler = HandlerServer::start(|_, _| Answer::text("ok")).await;
    let dir = TempDir::new("scale-mr");
    let path = ConfigToml::on(&stack)
        .loopback()
        .responder_rate(100000.0)
        .integration(
            Integration::new("all")
                .channel("C2147483705")
                .url(handler.url("/all"))
                .rate_limit(FAST.0, FAST.1),
        )
        .write(&dir);
    let mut out = listen_outbound(&stack).await.unwrap();
    let stages: Vec<StageProcess> = [
        "swallow-matcher",
        "swallow-matcher",
        "swallow-deliverer",
        "swallow-responder",
        "swallow-responder",
    ]
    .iter()
    .map(|bin| StageProcess::spawn(bin, &path, &HashMap::new()).unwrap())
    .collect();
    for s in &stages {
        s.ready(T).await;
    }
    const N: usize = 2000;
    let bodies: Vec<Vec<u8>> = (0..N)
        .map(|i| serde_json::to_vec(&chat_event(&format!("m{i}"), &format!("{i}.000001"))).unwrap())
        .collect();
    for chunk in bodies.chunks(200) {
        stack.publish_events_bytes(chunk).await.unwrap();
    }
    out.until(N, Duration::from_secs(60), "replies").await;
    out.settle(Duration::from_millis(500)).await;
    assert_eq!(handler.count(), N, "one POST per event, no duplicates");
    assert_eq!(out.got.len(), N, "one reply per event, no duplicates");
    let matched = [
        metric(stages[0].ops_addr, "swallow_events_received_total", &[])
            .await
            .unwrap(),
        metric(stages[1].ops_addr, "swallow_events_received_total", &[])
            .await
            .unwrap(),
    ];
    let posted = [
        metric(stages[3].ops_addr, "swallow_replies_total", &[("outcome", "posted")])
            .await
            .unwrap(),
        metric(stages[4].ops_addr, "swallow_replies_total", &[("outcome", "posted")])
            .await
            .unwrap(),
    ];
    println!("two matchers took {matched:?} events, two responders posted {posted:?} replies");
    assert_eq!(matched.iter().sum::<f64>(), N as f64);
    assert_eq!(posted.iter().sum::<f64>(), N as f64);
    assert!(
        matched.iter().all(|&m| m > 0.0) && posted.iter().all(|&p| p > 0.0),
        "both replicas of each stage worked"
    );
}
