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

/// A CA, and a certificate it signed for `names`, as PEM files in `dir`
/// (`<stem>.pem`, `<stem>.key`); returns the CA's issuer to sign more.
struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().unwrap();
        TestCa {
            issuer: rcgen::CertifiedIssuer::self_signed(params, key).unwrap(),
        }
    }

    fn write(&self, dir: &std::path::Path, stem: &str) -> std::path::PathBuf {
        let path = dir.join(format!("{stem}.pem"));
        std::fs::write(&path, self.issuer.pem()).unwrap();
        path
    }

    /// Signs a certificate for `names`; writes `<stem>.pem` and `<stem>.key`.
    fn sign(&self, dir: &std::path::Path, stem: &str, names: &[&str]) -> (std::path::PathBuf, std::path::PathBuf) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, stem);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (pem, key_path) = (dir.join(format!("{stem}.pem")), dir.join(format!("{stem}.key")));
        std::fs::write(&pem, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (pem, key_path)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_a_ca_and_a_client_certificate_and_a_wrong_ca_is_a_clear_error() {
    let certs = tempdir("tls-certs");
    let ca = TestCa::new("swallow test CA");
    let ca_file = ca.write(&certs, "ca");
    let (server_pem, server_key) = ca.sign(&certs, "server", &["localhost", "127.0.0.1"]);
    let (client_pem, client_key) = ca.sign(&certs, "client", &["swallow-client"]);
    let wrong_ca = TestCa::new("another CA").write(&certs, "wrong-ca");
    chown_to_rabbitmq(&certs).unwrap();
    let tls_port = free_addr().port();
    // Mutual TLS: the node refuses a client without a certificate its CA signed.
    let conf = format!(
        "listeners.ssl.default = 127.0.0.1:{tls_port}\nssl_options.cacertfile = {}\nssl_options.certfile = {}\nssl_options.keyfile = {}\nssl_options.verify = verify_peer\nssl_options.fail_if_no_peer_cert = true\n",
        ca_file.display(),
        server_pem.display(),
        server_key.display()
    );
    let node = Node::new(&node_stem(), 1, &conf).unwrap();
    node.start().await.expect("starting a node with a TLS listener");
    let url = format!("amqps://guest:guest@127.0.0.1:{tls_port}/%2f");
    let broker_toml = |ca: &std::path::Path| {
        format!(
            "[broker]\nurl = \"{url}\"\nprefix = \"t-tls\"\nheartbeat_s = 2\nca_file = \"{}\"\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
            ca.display(),
            client_pem.display(),
            client_key.display()
        )
    };
    let parse = |text: &str| swallow_shared::config::Config::parse(text, None).unwrap();

    // The library's connect, then a stage over TLS.
    let good = parse(&broker_toml(&ca_file));
    let connection = swallow_shared::broker::connect(&good.broker, "swallow-test tls")
        .await
        .expect("connecting over TLS with the CA and the client certificate");
    let channel = connection.create_channel().await.unwrap();
    drop(channel);
    let dir = tempdir("tls");
    let path = write_config(
        &dir,
        &config_with_broker(&broker_toml(&ca_file), "http://127.0.0.1:9/unused"),
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
    let wrong = parse(&broker_toml(&wrong_ca));
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
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(certs);
}
