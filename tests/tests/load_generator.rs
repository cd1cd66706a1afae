//! The load generator's (tests/load) stacks and floors delete what they
//! declared even when dropped without `stop`, and its HTTP/2 handler speaks
//! HTTP/2 over TLS: its `stages` module compiled here, so that `cargo test
//! --workspace` checks them without building the generator and its plotting.

use std::time::Duration;

use lapin::{Connection, ConnectionProperties};
use swallow_shared::Topology;

// The generator's own uses of the module are in its binary.
#[allow(dead_code)]
#[path = "../load/src/stages.rs"]
mod stages;

use stages::{Floor, Stack, handler_h2};

/// The memory step's HTTP/2 handler speaks HTTP/2 over TLS to a client
/// that trusts the CA it wrote, and notes each POST's text.
#[tokio::test(flavor = "multi_thread")]
async fn the_http2_handler_answers_over_tls_in_http2() {
    let (addr, seen, ca_file, _certs) = handler_h2(Duration::ZERO).await.unwrap();
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&ca_file).unwrap()).unwrap();
    let client = reqwest::Client::builder().add_root_certificate(ca).build().unwrap();
    let answer = client
        .post(format!("https://{addr}/load"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("text=load+h2+1")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.version(), reqwest::Version::HTTP_2, "negotiated by ALPN");
    assert_eq!(answer.text().await.unwrap(), "{\"text\":\"ok\"}");
    assert!(
        seen.lock().unwrap().contains_key("load h2 1"),
        "the POST's text was noted"
    );
}

/// Whether `queue` exists (a passive declare, on a channel of its own:
/// a missing queue closes the channel).
async fn exists(conn: &Connection, queue: &str) -> bool {
    let ch = conn.create_channel().await.unwrap();
    let options = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    ch.queue_declare(queue.into(), options, Default::default())
        .await
        .is_ok()
}

/// A step that ends early (an error, `?`) drops its stack and floor
/// without `stop`: they still delete what was declared for them.
#[tokio::test(flavor = "multi_thread")]
async fn a_stack_or_floor_dropped_without_stop_deletes_its_queues() {
    let url = swallow_tests::broker_url().await;
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();

    let floor = Floor::start(&url).await.unwrap();
    let (a, b) = (floor.a.clone(), floor.b.clone());
    assert!(
        exists(&conn, &a).await && exists(&conn, &b).await,
        "the floor declared its queues"
    );
    drop(floor);
    assert!(!exists(&conn, &a).await, "{a} left behind by a dropped floor");
    assert!(!exists(&conn, &b).await, "{b} left behind by a dropped floor");

    let prefix = format!("load-droptest-{}", std::process::id());
    let topology = Topology::new(&prefix);
    topology.declare(&conn.create_channel().await.unwrap()).await.unwrap();
    let queues = topology.queues();
    assert!(exists(&conn, &queues[0]).await, "the topology was declared");
    let stack = Stack {
        prefix: prefix.clone(),
        children: Vec::new(),
        dir: swallow_tests::TempDir::new(&prefix),
        url: url.clone(),
        env: Vec::new(),
    };
    drop(stack);
    for q in &queues {
        assert!(!exists(&conn, q).await, "{q} left behind by a dropped stack");
    }
    let _ = conn.close(200, "".into()).await;
}
