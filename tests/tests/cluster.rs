//! A RabbitMQ cluster and what a stage must do about it (issue #14):
//! several broker addresses, a confirm that never comes, TLS, and a
//! three-node cluster of private nodes losing a node under load.

use std::time::{Duration, Instant};

use swallow_tests::cluster::*;
use swallow_tests::handler::{Answer, HandlerServer};
use swallow_tests::*;

/// One channel-only integration that matches every event; limits out of
/// the way; `[broker]` given whole by the test.
fn config_with_broker(broker: &str, handler_url: &str) -> String {
    format!(
        "reload_interval_ms = 500\n{broker}\n[deliverer]\nallow_networks = [\"127.0.0.0/8\"]\n[responder]\nper_channel_per_second = 100000.0\nper_channel_burst = 100000\n\n[[integrations]]\nid = \"cluster\"\nteam_id = \"T0001\"\nchannel = \"C2147483705\"\nurls = [\"{handler_url}\"]\ntoken = \"t\"\nrate_limit = {{ per_second = 100000.0, burst = 100000 }}\n"
    )
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
    let dir = tempdir("addrs");
    let broker = format!("[broker]\nurl = \"{dead},{live}\"\nprefix = \"{}\"\n", stack.prefix);
    let path = write_config(&dir, &config_with_broker(&broker, "http://127.0.0.1:9/unused"));
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
    let _ = std::fs::remove_dir_all(dir);
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
    let dir = tempdir("unconfirmed");
    let broker = |url: &str| {
        format!(
            "[broker]\nurl = \"{url}\"\nprefix = \"{}\"\nheartbeat_s = 2\n",
            stack.prefix
        )
    };
    let direct = write_config(&dir, &config_with_broker(&broker(&stack.url), &handler.url("/hook")));
    let relay_dir = dir.join("relay");
    std::fs::create_dir_all(&relay_dir).unwrap();
    let relayed = write_config(
        &relay_dir,
        &config_with_broker(&broker(&relay.url), &handler.url("/hook")),
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
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_whose_confirm_never_comes_fails_after_two_heartbeats() {
    use swallow_shared::broker::{self, ConfirmedPublisher, PublishError};
    let relay = ConfirmSwallowingRelay::start(&broker_url().await).await.unwrap();
    let toml = format!("[broker]\nurl = \"{}\"\nheartbeat_s = 3\n", relay.url);
    let config = swallow_shared::config::Config::parse(&toml, None).unwrap();
    let connection = broker::connect(&config.broker, "swallow-test unconfirmed")
        .await
        .unwrap();
    let publisher = ConfirmedPublisher::open(&connection).await.unwrap();
    let queue = format!("t-unconfirmed-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let declare = lapin::options::QueueDeclareOptions {
        auto_delete: true,
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
