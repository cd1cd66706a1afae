//! A RabbitMQ cluster and what a stage must do about it:
//! several broker addresses, a confirm that never comes, TLS, and a
//! three-node cluster of private nodes losing a node under load.

use std::time::{Duration, Instant};

use swallow_tests::handler::{Answer, HandlerServer};
use swallow_tests::tls::TestCa;
use swallow_tests::*;

/// One channel-only integration that matches every event; limits out of
/// the way; `[broker]` set by the test in `broker`.
fn config_with_broker(broker: ConfigToml, handler_url: &str) -> String {
    broker
        .top("reload_interval_ms", 500)
        .loopback()
        .responder_rate(100000.0)
        .integration(
            Integration::new("cluster")
                .channel("C2147483705")
                .url(handler_url)
                .rate_limit(100000.0, 100000),
        )
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_skips_an_address_that_refuses_and_logs_no_password() {
    let stack = TestStack::new("addrs").await.unwrap();
    let refused = free_addr();
    let dead = format!("amqp://guest:hunter2@127.0.0.1:{}/%2f", refused.port());
    let live = stack.url.clone();
    assert!(
        live.contains("guest:guest@"),
        "the shared broker's URL carries a password"
    );
    let dir = TempDir::new("addrs");
    let broker = ConfigToml::new().broker(&format!("{dead},{live}"), &stack.prefix);
    let path = write_config(&dir, &config_with_broker(broker, "http://127.0.0.1:9/unused"));
    // Each starts at a random address: with four, one starting at the
    // refusing one is all but certain (15/16), and each must get through.
    let mut matchers = Vec::new();
    for _ in 0..4 {
        matchers.push(LoggedStage::spawn("swallow-matcher", &path, &dir).unwrap());
    }
    for m in &matchers {
        m.ready(Duration::from_secs(30)).await;
    }
    let logs: Vec<String> = matchers.iter().map(LoggedStage::log_text).collect();
    for log in &logs {
        assert!(
            !log.contains("hunter2") && !log.contains("guest:guest@"),
            "a password in the log:\n{log}"
        );
        assert!(log.contains("connected to the broker"), "{log}");
    }
    let tried_dead = logs
        .iter()
        .filter(|l| l.contains("cannot connect to the broker"))
        .count();
    println!("addresses: {tried_dead} of 4 matchers started at the refusing address and moved on");
    let starting = logs[0].lines().find(|l| l.contains("starting")).unwrap_or_default();
    assert_eq!(
        starting.matches("guest:***@").count(),
        2,
        "both addresses, redacted: {starting}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirm_that_never_comes_fails_the_attempt_and_the_job_comes_back() {
    let stack = TestStack::new("unconfirmed").await.unwrap();
    let relay = std::sync::Arc::new(ConfirmSwallowingRelay::start(&stack.url).await.unwrap());
    let swallow_at = std::sync::Arc::new(std::sync::Mutex::new(None));
    let (r, at) = (relay.clone(), swallow_at.clone());
    // The first POST's answer goes back to the deliverer, whose reply
    // publish then reaches the broker but its confirm never comes back.
    let handler = HandlerServer::start(move |_, n| {
        if n == 0 {
            r.swallow_answers();
            *at.lock().unwrap() = Some(Instant::now());
        }
        Answer::text("ok")
    })
    .await;
    let dir = TempDir::new("unconfirmed");
    let broker = |url: &str| {
        ConfigToml::new()
            .broker(url, &stack.prefix)
            .set("broker", "heartbeat_s", 2)
    };
    let direct = write_config(&dir, &config_with_broker(broker(&stack.url), &handler.url("/hook")));
    let relay_dir = dir.join("relay");
    std::fs::create_dir_all(&relay_dir).unwrap();
    let relayed = write_config(
        &relay_dir,
        &config_with_broker(broker(&relay.url), &handler.url("/hook")),
    );
    let mut out = listen_outbound(&stack).await.unwrap();
    let matcher = LoggedStage::spawn("swallow-matcher", &direct, &dir).unwrap();
    let responder = LoggedStage::spawn("swallow-responder", &direct, &dir).unwrap();
    let deliverer = LoggedStage::spawn("swallow-deliverer", &relayed, &dir).unwrap();
    for stage in [&matcher, &responder, &deliverer] {
        stage.ready(Duration::from_secs(30)).await;
    }

    stack.publish_event(&chat_event("hello", "1.000001")).await.unwrap();
    let posts = handler
        .until(2, Duration::from_secs(40), "the POST again after the lost confirm")
        .await;
    let swallowed = swallow_at
        .lock()
        .unwrap()
        .expect("the first POST swallowed the answers");
    let again = posts[1].at - swallowed;
    assert_eq!(
        posts[0].header("webhook-id"),
        posts[1].header("webhook-id"),
        "the same delivery, POSTed again"
    );
    println!("unconfirmed: the job came back and was POSTed again {again:?} after its confirm was lost");
    assert!(
        again < Duration::from_secs(20),
        "the lost confirm counted as failed within the bound ({again:?})"
    );
    deliverer.ready(Duration::from_secs(30)).await;
    out.until(1, Duration::from_secs(30), "the reply").await;
    out.settle(Duration::from_secs(1)).await;
    assert!(
        out.got.len() <= 2,
        "at most the reply whose confirm was lost, then the one for the retry"
    );
    let log = deliverer.log_text();
    assert!(log.contains("broker session ended"), "{log}");
    drop(handler);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_whose_confirm_never_comes_fails_after_two_heartbeats() {
    use swallow_shared::broker::{self, ConfirmedPublisher, PublishError};
    let relay = ConfirmSwallowingRelay::start(&broker_url().await).await.unwrap();
    let toml = ConfigToml::new()
        .set("broker", "url", &relay.url)
        .set("broker", "heartbeat_s", 3)
        .to_string();
    let config = swallow_shared::config::Config::parse(&toml, None).unwrap();
    let connection = broker::connect(&config.broker, "swallow-test unconfirmed")
        .await
        .unwrap();
    let publisher = ConfirmedPublisher::open(&connection).await.unwrap();
    let queue = format!("t-unconfirmed-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    // Exclusive: the broker deletes it when this connection ends, however
    // the test ends (auto-delete would need a consumer to have come and gone).
    let declare = lapin::options::QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    };
    publisher
        .channel()
        .queue_declare(queue.as_str().into(), declare, Default::default())
        .await
        .unwrap();
    publisher
        .publish("", &queue, b"first", broker::persistent_json())
        .await
        .expect("confirmed while the broker answers");

    // Heartbeats still pass both ways, so the connection looks alive: only
    // the bound on the confirm can tell.
    relay.swallow_answers();
    let sent = Instant::now();
    let result = publisher
        .publish("", &queue, b"second", broker::persistent_json())
        .await;
    let took = sent.elapsed();
    println!("unconfirmed publish: {result:?} after {took:?}");
    assert!(
        matches!(result, Err(PublishError::Unconfirmed { .. })),
        "an unconfirmed publish is a failure: {result:?}"
    );
    assert!(
        (Duration::from_secs(6)..Duration::from_secs(9)).contains(&took),
        "given up after two heartbeats (6 s), took {took:?}"
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), connection.close(200, "".into())).await;
}

/// The nodes these tests start pick free ports and bind them seconds later;
/// a port taken meanwhile (another test, a `rabbitmqctl`'s VM) must cost a
/// second boot, not a test that waits out its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_node_whose_port_was_taken_boots_on_fresh_ports() {
    let mut node = Node::new(&node_stem(), 1, "").unwrap();
    let taken = node.port;
    let _holder = std::net::TcpListener::bind(("127.0.0.1", taken)).expect("taking the node's port");
    let started = Instant::now();
    node.boot().await.expect("the node boots on other ports");
    println!("node: booted on port {} after {:?}", node.port, started.elapsed());
    assert_ne!(node.port, taken, "the node moved off the taken port");
    let connection = lapin::Connection::connect(&node.url(), lapin::ConnectionProperties::default())
        .await
        .expect("the node accepts connections on its new port");
    let _ = connection.close(200, "".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_a_ca_and_a_client_certificate_and_a_wrong_ca_is_a_clear_error() {
    let certs = TempDir::new("tls-certs");
    let ca = TestCa::new("swallow test CA");
    let ca_file = ca.write(&certs, "ca");
    let (server_pem, server_key) = ca.sign(&certs, "server", &["localhost", "127.0.0.1"]);
    let (client_pem, client_key) = ca.sign(&certs, "client", &["swallow-client"]);
    let wrong_ca = TestCa::new("another CA").write(&certs, "wrong-ca");
    chown_to_rabbitmq(&certs).unwrap();
    // Mutual TLS: the node refuses a client without a certificate its CA signed.
    let ssl_options = format!(
        "ssl_options.cacertfile = {}\nssl_options.certfile = {}\nssl_options.keyfile = {}\nssl_options.verify = verify_peer\nssl_options.fail_if_no_peer_cert = true\n",
        ca_file.display(),
        server_pem.display(),
        server_key.display()
    );
    let mut node = Node::with_tls(&node_stem(), 1, &ssl_options).unwrap();
    node.boot().await.expect("starting a node with a TLS listener");
    let tls_port = node.tls_port.expect("a TLS port");
    let url = format!("amqps://guest:guest@127.0.0.1:{tls_port}/%2f");
    let broker_toml = |ca: &std::path::Path| {
        ConfigToml::new()
            .broker(&url, "t-tls")
            .set("broker", "heartbeat_s", 2)
            .set("broker", "ca_file", ca.display().to_string())
            .set("broker", "client_cert_file", client_pem.display().to_string())
            .set("broker", "client_key_file", client_key.display().to_string())
    };
    let parse = |text: &str| swallow_shared::config::Config::parse(text, None).unwrap();

    // The library's connect, then a stage over TLS.
    let good = parse(&broker_toml(&ca_file).to_string());
    let connection = swallow_shared::broker::connect(&good.broker, "swallow-test tls")
        .await
        .expect("connecting over TLS with the CA and the client certificate");
    let channel = connection.create_channel().await.unwrap();
    drop(channel);
    let dir = TempDir::new("tls");
    let path = write_config(
        &dir,
        &config_with_broker(broker_toml(&ca_file), "http://127.0.0.1:9/unused"),
    );
    let matcher = LoggedStage::spawn("swallow-matcher", &path, &dir).unwrap();
    matcher.ready(Duration::from_secs(30)).await;
    let listed = node
        .ctl(&["list_connections", "ssl", "client_properties"])
        .await
        .unwrap();
    let line = listed
        .lines()
        .find(|l| l.contains("swallow-matcher t-tls"))
        .unwrap_or_default();
    assert!(line.starts_with("true"), "the matcher's connection is TLS: {listed}");

    // A wrong CA: a clear error, at once, not a hang.
    let wrong = parse(&broker_toml(&wrong_ca).to_string());
    let started = Instant::now();
    let error = swallow_shared::broker::connect(&wrong.broker, "swallow-test wrong ca")
        .await
        .expect_err("a broker certificate from another CA is refused")
        .to_string();
    println!("tls: wrong CA refused after {:?}: {error}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(5), "refused at once");
    assert!(
        error.contains("certificate") || error.contains("UnknownIssuer"),
        "{error}"
    );
    assert!(!error.contains("guest:guest"), "{error}");
    let _ = connection.close(200, "".into()).await;
    drop(matcher);
    drop(node);
}

/// What one fault cost, measured under load.
struct FaultReport {
    name: &'static str,
    events: usize,
    lost_posts: usize,
    lost_replies: usize,
    duplicate_posts: usize,
    duplicate_replies: usize,
    first_post_after: Duration,
    longest_pause: Duration,
}

impl std::fmt::Display for FaultReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<44} events {:>5}  lost POSTs {}  lost replies {}  duplicate POSTs {:>3}  duplicate replies {:>3}  first POST after the fault {:>6.2} s  longest pause in POSTs {:>6.2} s",
            self.name,
            self.events,
            self.lost_posts,
            self.lost_replies,
            self.duplicate_posts,
            self.duplicate_replies,
            self.first_post_after.as_secs_f64(),
            self.longest_pause.as_secs_f64()
        )
    }
}

fn distinct_posts(handler: &HandlerServer) -> std::collections::BTreeSet<String> {
    handler
        .requests()
        .iter()
        .filter_map(|r| r.header("webhook-id").map(str::to_owned))
        .collect()
}

/// Runs `fault` (which returns when it struck) while events flow at 20/s
/// from 3 s before it to 3 s after it has finished; then waits until every
/// event published is POSTed and its reply posted, and every stage is
/// ready again, the same processes.
async fn under_load(
    name: &'static str,
    chat: &ChatSide,
    handler: &HandlerServer,
    stages: &mut [LoggedStage],
    fault: impl std::future::Future<Output = Instant>,
) -> FaultReport {
    let posts_before = handler.count();
    let distinct_posts_before = distinct_posts(handler).len();
    let replies_before = chat.replies();
    let distinct_replies_before = replies_before.iter().collect::<std::collections::BTreeSet<_>>().len();
    let events_before = chat.published.load(std::sync::atomic::Ordering::SeqCst);
    let stop = tokio_util::sync::CancellationToken::new();
    let struck = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let at = fault.await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop.cancel();
        at
    };
    let ((), fault_at) = tokio::join!(chat.publish_until(20, stop.clone()), struck);
    let n = chat.published.load(std::sync::atomic::Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(120);
    let distinct_replies = || {
        chat.replies()
            .into_iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    };
    while (distinct_posts(handler).len() < n || distinct_replies() < n) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for stage in stages.iter_mut() {
        assert!(
            stage.child.try_wait().unwrap().is_none(),
            "{name}: {} exited:\n{}",
            stage.name,
            stage.log_text()
        );
        stage.ready(Duration::from_secs(60)).await;
    }
    let mut after: Vec<Instant> = handler
        .requests()
        .iter()
        .map(|r| r.at)
        .filter(|at| *at > fault_at)
        .collect();
    after.sort();
    let first_post_after = after.first().map_or(Duration::MAX, |at| *at - fault_at);
    let longest_pause = std::iter::once(fault_at)
        .chain(after.iter().copied())
        .collect::<Vec<_>>()
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    let posts = distinct_posts(handler).len();
    let replies = chat.replies();
    let distinct_replies = replies.iter().collect::<std::collections::BTreeSet<_>>().len();
    let report = FaultReport {
        name,
        events: n - events_before,
        lost_posts: n.saturating_sub(posts),
        lost_replies: n.saturating_sub(distinct_replies),
        duplicate_posts: (handler.count() - posts_before) - (posts - distinct_posts_before),
        duplicate_replies: (replies.len() - replies_before.len()) - (distinct_replies - distinct_replies_before),
        first_post_after,
        longest_pause,
    };
    println!("{report}");
    report
}

/// The last "connected to the broker" line of a stage's log.
fn last_connected(log: &std::path::Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let line = text.lines().rev().find(|l| l.contains("connected to the broker"));
    line.unwrap_or_default().to_owned()
}

/// Whether `name` is one of the delivery shards' queues (`<prefix>.deliveries.<k>`).
fn is_delivery_shard(prefix: &str, name: &str) -> bool {
    name.strip_prefix(&format!("{prefix}.deliveries."))
        .is_some_and(|k| k.parse::<u32>().is_ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_loses_nothing_when_nodes_fail_under_load() {
    let began = Instant::now();
    let cluster = Cluster::start()
        .await
        .expect("starting and joining three private RabbitMQ nodes");
    println!(
        "cluster: three nodes up and joined in {:.1} s",
        began.elapsed().as_secs_f64()
    );
    let prefix = format!("t-cluster-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let handler = HandlerServer::start(|_, _| Answer::text("ok")).await;
    let node_urls: Vec<String> = cluster.nodes.iter().map(Node::url).collect();
    let chat = ChatSide::start(&node_urls, &prefix).await.unwrap();
    let dir = TempDir::new("cluster");
    let broker = ConfigToml::new()
        .broker(&cluster.urls(), &prefix)
        .set("broker", "heartbeat_s", 2)
        .set("broker", "prefetch", 64);
    let path = write_config(&dir, &config_with_broker(broker, &handler.url("/hook")));
    let mut stages = Vec::new();
    for bin in ["swallow-matcher", "swallow-deliverer", "swallow-responder"] {
        stages.push(LoggedStage::spawn(bin, &path, &dir).unwrap());
    }
    for stage in &stages {
        stage.ready(Duration::from_secs(60)).await;
    }
    // Quorum queues have a member on every node.
    let members = cluster.ctl(0, &["list_queues", "name", "members"]).await.unwrap();
    let shard = members
        .lines()
        .find(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|q| is_delivery_shard(&prefix, q))
        })
        .expect("a delivery shard's queue");
    for node in &cluster.nodes {
        assert!(
            shard.contains(&node.name),
            "{} has a member on {}: {shard}",
            shard,
            node.name
        );
    }

    let mut reports = Vec::new();
    let stage_node = async |via: usize| {
        let counts = cluster.connections_per_node(via, &prefix).await.unwrap();
        println!("cluster: stage connections per node {counts:?}");
        busiest(&counts)
    };

    // 1. SIGKILL of the node the stages are connected to (most of them), then start it again.
    let victim = stage_node(0).await;
    let fault = async { cluster.kill_for(victim, Duration::from_secs(5)).await.unwrap() };
    let name = "SIGKILL the stages' node, start it again";
    reports.push(under_load(name, &chat, &handler, &mut stages, fault).await);

    // 2. SIGSTOP of the stages' node for 30 s, then SIGCONT.
    let victim = stage_node((victim + 1) % 3).await;
    // The queues on the way of an event that the frozen node leads stall
    // until it wakes (or is declared down).
    let topology = Topology::new(&prefix);
    let path = [
        topology.events_queue(),
        topology.delivery_queue_for("cluster"),
        topology.replies_queue(),
        format!("{prefix}.test-outbound"),
    ];
    let mut led = Vec::new();
    for queue in &path {
        let leads = cluster
            .leaders_per_node((victim + 1) % 3, |q| q == queue)
            .await
            .unwrap();
        if leads[victim] > 0 {
            led.push(queue.clone());
        }
    }
    println!(
        "cluster: freezing node {}, which leads {led:?} of the event's path",
        victim + 1
    );
    let logs: Vec<std::path::PathBuf> = stages.iter().map(|s| s.log.clone()).collect();
    let victim_port = format!(":{}/", cluster.nodes[victim].port);
    let fault = async {
        cluster.nodes[victim].signal("STOP").unwrap();
        let at = Instant::now();
        // Each stage that was on the frozen node leaves it for another.
        let on_victim = || {
            logs.iter()
                .filter(|log| last_connected(log).contains(&victim_port))
                .count()
        };
        while on_victim() > 0 && at.elapsed() < Duration::from_secs(20) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let left = at.elapsed();
        println!(
            "cluster: every stage left the frozen node within {:.1} s",
            left.as_secs_f64()
        );
        assert_eq!(on_victim(), 0, "a stage still on the frozen node after 20 s");
        tokio::time::sleep(Duration::from_secs(30).saturating_sub(left)).await;
        cluster.nodes[victim].signal("CONT").unwrap();
        at
    };
    let name = "SIGSTOP the stages' node 30 s, SIGCONT";
    reports.push(under_load(name, &chat, &handler, &mut stages, fault).await);

    // 3. A rolling restart: each node stopped and started, back (and no
    //    quorum queue critical) before the next.
    let fault = async {
        let mut at = None;
        for i in 0..cluster.nodes.len() {
            let via = (i + 1) % 3;
            cluster
                .until_not_quorum_critical(i, Duration::from_secs(90))
                .await
                .unwrap();
            at.get_or_insert_with(Instant::now);
            cluster.nodes[i].stop().await.unwrap();
            cluster.nodes[i].start().await.expect("a restarted node starts again");
            let deadline = Instant::now() + Duration::from_secs(60);
            while cluster.running_nodes(via).await.unwrap_or(0) < 3 {
                assert!(Instant::now() < deadline, "node {} did not rejoin within 60 s", i + 1);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        at.expect("three nodes restarted")
    };
    let name = "rolling restart of the three nodes";
    reports.push(under_load(name, &chat, &handler, &mut stages, fault).await);

    // 4. SIGKILL of the node leading most delivery shards' queues.
    cluster
        .until_not_quorum_critical(0, Duration::from_secs(90))
        .await
        .unwrap();
    let leaders = cluster
        .leaders_per_node(0, |q| is_delivery_shard(&prefix, q))
        .await
        .unwrap();
    println!("cluster: delivery shard leaders per node {leaders:?}");
    let fault = async {
        cluster
            .kill_for(busiest(&leaders), Duration::from_secs(5))
            .await
            .unwrap()
    };
    let name = "SIGKILL the delivery queues' leader node";
    reports.push(under_load(name, &chat, &handler, &mut stages, fault).await);

    println!("cluster: all four faults in {:.0} s:", began.elapsed().as_secs_f64());
    for report in &reports {
        println!("  {report}");
    }
    for report in &reports {
        assert_eq!(report.lost_posts, 0, "{report}");
        assert_eq!(report.lost_replies, 0, "{report}");
    }
    drop(stages);
    drop(chat);
    drop(cluster);
}

/// A stage's connection asks for frames of at most 16 KiB (lapin keeps room
/// for 32 of them each way on every connection), unless the URL sets its
/// own `frame_max`; a message many frames long still goes through whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_ask_for_small_frames_unless_the_url_sets_them() {
    use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
    use swallow_shared::broker;
    let url = broker_url().await;
    let parse = |url: &str| {
        swallow_shared::config::Config::parse(&ConfigToml::new().set("broker", "url", url).to_string(), None).unwrap()
    };
    let small = broker::connect(&parse(&url).broker, "swallow-test frames")
        .await
        .unwrap();
    assert_eq!(small.configuration().frame_max(), broker::FRAME_MAX);
    let set = format!("{url}{}frame_max=65536", if url.contains('?') { '&' } else { '?' });
    let large = broker::connect(&parse(&set).broker, "swallow-test frames set")
        .await
        .unwrap();
    assert_eq!(large.configuration().frame_max(), 65_536, "the URL's frame_max is kept");
    drop(large);

    // An exclusive queue: the broker deletes it with the connection.
    let channel = small.create_channel().await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let options = QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    };
    let queue = channel
        .queue_declare("".into(), options, Default::default())
        .await
        .unwrap();
    let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    channel
        .basic_publish(
            "".into(),
            queue.name().as_str().into(),
            BasicPublishOptions::default(),
            &body,
            Default::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let got = channel
        .basic_get(queue.name().as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the message is in the queue");
    assert!(
        got.delivery.data == body,
        "a 300,000-byte message, 19 frames, comes back whole"
    );
}
