//! Fault tests: the three real binaries under load while stages are killed,
//! connections are forced closed, the broker restarts, the handler misbehaves
//! and stages are asked to stop. Each is bounded in count and time, and
//! reports lost and duplicated counts; lost must be 0.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use rand::Rng;
use swallow_tests::handler::{Answer, Chaos, HandlerServer, chaos_server};
use swallow_tests::*;

/// A configuration where one channel-only integration matches every event,
/// with limits out of the way so the faults are what is tested.
fn config(stack: &TestStack, url: &str, load: impl FnOnce(Integration) -> Integration) -> ConfigToml {
    ConfigToml::on(stack)
        .top("reload_interval_ms", 500)
        .set("broker", "prefetch", 64)
        .loopback()
        .responder_rate(100000.0)
        .integration(load(
            Integration::new("load")
                .channel("C2147483705")
                .url(url)
                .rate_limit(100000.0, 100000),
        ))
}

fn events(range: std::ops::Range<usize>) -> Vec<Vec<u8>> {
    range
        .map(|i| serde_json::to_vec(&chat_event(&format!("message {i}"), &format!("{i}.000001"))).unwrap())
        .collect()
}

/// Publishes `bodies` at a steady pace over about `over`.
async fn steady(stack: &TestStack, bodies: Vec<Vec<u8>>, over: Duration) {
    let batches = 40usize;
    let per = bodies.len().div_ceil(batches);
    for chunk in bodies.chunks(per) {
        stack.publish_events_bytes(chunk).await.expect("publishing events");
        tokio::time::sleep(over / batches as u32).await;
    }
}

/// Distinct `webhook-id`s the handler saw / distinct replies that came out.
fn unique_posts(handler: &HandlerServer) -> BTreeSet<String> {
    handler
        .requests()
        .iter()
        .filter_map(|r| r.header("webhook-id").map(str::to_owned))
        .collect()
}

fn unique_replies(out: &Collector) -> BTreeSet<String> {
    out.json()
        .iter()
        .map(|r| r["delivery_id"].as_str().unwrap().to_owned())
        .collect()
}

/// Waits until `n` distinct POSTs and `n` distinct replies, then reports.
async fn expect_all(what: &str, n: usize, handler: &HandlerServer, out: &mut Collector, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    while (unique_posts(handler).len() < n || unique_replies(out).len() < n) && tokio::time::Instant::now() < deadline {
        out.settle(Duration::from_millis(250)).await;
    }
    let posts = unique_posts(handler).len();
    let replies = unique_replies(out).len();
    println!(
        "{what}: POSTs {} ({} duplicates), replies {} ({} duplicates), lost POSTs {}, lost replies {}",
        handler.count(),
        handler.count() - posts,
        out.got.len(),
        out.got.len() - replies,
        n - posts,
        n - replies
    );
    assert_eq!(posts, n, "{what}: lost {} POSTs", n - posts);
    assert_eq!(replies, n, "{what}: lost {} replies", n - replies);
}

fn respawn(bin: &str, path: &Path) -> StageProcess {
    StageProcess::spawn(bin, path, &HashMap::new()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_each_stage_under_load_loses_nothing() {
    let stack = TestStack::new("fault-kill").await.unwrap();
    let handler = HandlerServer::start(|_, _| Answer::text("ok")).await;
    let dir = TempDir::new("fault-kill");
    let path = write_config(&dir, &config(&stack, &handler.url("/load"), |i| i).to_string());
    let mut out = listen_outbound(&stack).await.unwrap();
    let mut p = Pipeline::spawn(&path).await.unwrap();
    const N: usize = 5000;

    let load = steady(&stack, events(0..N), Duration::from_secs(10));
    let chaos = async {
        for stage in ["swallow-matcher", "swallow-deliverer", "swallow-responder"] {
            let pause = rand::rng().random_range(1000..2500);
            tokio::time::sleep(Duration::from_millis(pause)).await;
            let process = match stage {
                "swallow-matcher" => &mut p.matcher,
                "swallow-deliverer" => &mut p.deliverer,
                _ => &mut p.responder,
            };
            process.kill().await;
            *process = respawn(stage, &path);
            process.ready(Duration::from_secs(30)).await;
        }
    };
    tokio::join!(load, chaos);
    expect_all("sigkill each stage", N, &handler, &mut out, Duration::from_secs(120)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_closed_connections_are_recovered_under_load() {
    let stack = TestStack::new("fault-close").await.unwrap();
    let handler = HandlerServer::start(|_, _| Answer::text("ok")).await;
    let dir = TempDir::new("fault-close");
    let path = write_config(&dir, &config(&stack, &handler.url("/load"), |i| i).to_string());
    let mut out = listen_outbound(&stack).await.unwrap();
    let p = Pipeline::spawn(&path).await.unwrap();
    const N: usize = 2000;
    let load = steady(&stack, events(0..N), Duration::from_secs(6));
    let close = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        // Every stage's connection (their names carry the test's prefix).
        let closed = close_connections_matching(&format!("swallow-matcher {}", stack.prefix))
            .await
            .unwrap()
            + close_connections_matching(&format!("swallow-deliverer {}", stack.prefix))
                .await
                .unwrap()
            + close_connections_matching(&format!("swallow-responder {}", stack.prefix))
                .await
                .unwrap();
        assert_eq!(closed, 3, "one connection per stage");
    };
    tokio::join!(load, close);
    expect_all("forced close", N, &handler, &mut out, Duration::from_secs(90)).await;
    for stage in [&p.matcher, &p.deliverer, &p.responder] {
        assert!(
            metric(stage.ops_addr, "swallow_broker_reconnects_total", &[])
                .await
                .unwrap()
                >= 1.0
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_is_survived_and_readyz_tells() {
    let broker = OwnBroker::start()
        .await
        .expect("starting a broker node of the test's own");
    let stack = TestStack::on("fault-restart", broker.url()).await.unwrap();
    let handler = HandlerServer::start(|_, _| Answer::text("ok")).await;
    let dir = TempDir::new("fault-restart");
    let path = write_config(&dir, &config(&stack, &handler.url("/load"), |i| i).to_string());
    let (queue, mut out) = listen_outbound_durable(&stack).await.unwrap();
    let p = Pipeline::spawn(&path).await.unwrap();
    const N: usize = 1000;
    stack.publish_events_bytes(&events(0..N)).await.unwrap();
    handler.until(50, Duration::from_secs(30), "the first deliveries").await;

    broker.stop().await.unwrap();
    let not_ready = |addr| async move {
        let r = reqwest::get(format!("http://{addr}/readyz")).await.ok()?;
        (r.status() == 503).then_some(())
    };
    for (name, stage) in [
        ("matcher", &p.matcher),
        ("deliverer", &p.deliverer),
        ("responder", &p.responder),
    ] {
        let what = format!("the {name}'s /readyz to say 503 without a broker");
        wait_for(Duration::from_secs(30), &what, || not_ready(stage.ops_addr)).await;
    }
    broker.boot().await.unwrap();
    for stage in [&p.matcher, &p.deliverer, &p.responder] {
        stage.ready(Duration::from_secs(90)).await;
    }
    // The test's own connection died with the broker: reconnect and drain
    // the (durable) listening queue again, keeping what arrived before.
    let stack2 = TestStack::with_prefix(broker.url(), stack.prefix.clone())
        .await
        .unwrap();
    let mut out2 = stack2.drain(&queue).await.unwrap();
    out.settle(Duration::from_millis(200)).await; // what the old listener took and acked
    out2.got.append(&mut out.got);
    stack2.publish_events_bytes(&events(N..N + 500)).await.unwrap();
    expect_all("broker restart", N + 500, &handler, &mut out2, Duration::from_secs(120)).await;
    drop(stack2);
    drop(stack);
    drop(broker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chaos_handler_ends_every_delivery_delivered_or_dead() {
    let stack = TestStack::new("fault-chaos").await.unwrap();
    let (addr, _count, _task) = chaos_server(|_| {
        let roll: f64 = rand::rng().random();
        if roll < 0.30 {
            Chaos::Error500
        } else if roll < 0.40 {
            Chaos::Slow(Duration::from_millis(600))
        } else if roll < 0.45 {
            Chaos::Reset
        } else {
            Chaos::Ok
        }
    })
    .await;
    let dir = TempDir::new("fault-chaos");
    // The breaker off: a handler failing 45% of the time opens it often,
    // and jobs waiting for its probes would outlast this test's deadline
    // (they are not lost; `failing_handlers.rs` tests the breaker). Here:
    // retries and dead letters alone.
    let path = config(&stack, &format!("http://{addr}/chaos"), |i| {
        i.set("max_attempts", 3)
            .set("timeout_ms", 300)
            .set("circuit_failures", 0)
    })
    .write(&dir);
    let mut out = listen_outbound(&stack).await.unwrap();
    let mut dead = stack.drain(&stack.topology.deliveries_dead_queue()).await.unwrap();
    let p = Pipeline::spawn(&path).await.unwrap();
    const N: usize = 1000;
    stack.publish_events_bytes(&events(0..N)).await.unwrap();
    let ended = |out: &Collector, dead: &Collector| unique_replies(out).len() + dead.got.len();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while ended(&out, &dead) < N && tokio::time::Instant::now() < deadline {
        out.settle(Duration::from_millis(200)).await;
        dead.settle(Duration::from_millis(50)).await;
    }
    let delivered = unique_replies(&out);
    let dead_ids: BTreeSet<String> = dead
        .json()
        .iter()
        .map(|j| j["delivery_id"].as_str().unwrap().to_owned())
        .collect();
    println!(
        "chaos: {} delivered, {} dead, {} missing",
        delivered.len(),
        dead_ids.len(),
        N - delivered.len() - dead_ids.len()
    );
    assert!(delivered.is_disjoint(&dead_ids), "no delivery both delivered and dead");
    assert_eq!(delivered.len() + dead_ids.len(), N, "every delivery ended");
    let addr = p.deliverer.ops_addr;
    let delivered_metric = metric(addr, "swallow_deliveries_total", &[("outcome", "delivered")])
        .await
        .unwrap();
    let dead_metric = metric(addr, "swallow_deliveries_total", &[("outcome", "dead")])
        .await
        .unwrap();
    assert_eq!(delivered_metric as usize, delivered.len());
    assert_eq!(dead_metric as usize, dead_ids.len());
    assert!(dead_ids.len() > 10, "with 45% failures and 3 attempts some must die");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_zero_quickly_and_loses_nothing() {
    let stack = TestStack::new("fault-term").await.unwrap();
    let handler = HandlerServer::start(|_, _| Answer::text("ok").after(Duration::from_millis(50))).await;
    let dir = TempDir::new("fault-term");
    let path = write_config(&dir, &config(&stack, &handler.url("/load"), |i| i).to_string());
    let mut out = listen_outbound(&stack).await.unwrap();
    let mut p = Pipeline::spawn(&path).await.unwrap();
    const N: usize = 2000;
    stack.publish_events_bytes(&events(0..N)).await.unwrap();
    handler
        .until(200, Duration::from_secs(30), "deliveries under way")
        .await;
    let term_at = std::time::Instant::now();
    for stage in [&p.matcher, &p.deliverer, &p.responder] {
        stage.signal("TERM").unwrap();
    }
    for (name, stage) in [
        ("matcher", &mut p.matcher),
        ("deliverer", &mut p.deliverer),
        ("responder", &mut p.responder),
    ] {
        let status = tokio::time::timeout(Duration::from_secs(10), stage.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{name} did not exit within 10 s of SIGTERM"))
            .unwrap();
        assert_eq!(status.code(), Some(0), "{name} exits 0 on SIGTERM");
    }
    let _again = Pipeline::spawn(&path).await.unwrap();
    expect_all("sigterm", N, &handler, &mut out, Duration::from_secs(90)).await;
    let mut seen: HashMap<String, Vec<i128>> = HashMap::new();
    for r in handler.requests() {
        let ms = if r.at >= term_at {
            (r.at - term_at).as_millis() as i128
        } else {
            -((term_at - r.at).as_millis() as i128)
        };
        seen.entry(r.header("webhook-id").unwrap_or("").to_owned())
            .or_default()
            .push(ms);
    }
    let twice: Vec<_> = seen.iter().filter(|(_, at)| at.len() > 1).collect();
    // Work under way is finished and acknowledged, not handed back: a stop
    // that dropped it would repeat every attempt in flight (64 here) and
    // every job parked but not yet acknowledged. A few repeats remain
    // possible: a quorum queue under load can lose the last acks of a
    // closing channel (see `consume::SETTLE_LINGER`).
    println!("sigterm: {} delivery ids POSTed twice: {twice:?}", twice.len());
    assert!(
        twice.len() <= 20,
        "SIGTERM made {} duplicate POSTs (ms after SIGTERM of each POST): {twice:?}",
        twice.len()
    );
    out.settle(Duration::from_millis(300)).await;
    assert!(
        out.got.len() <= N + 20,
        "SIGTERM made {} duplicate replies",
        out.got.len() - N
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_ends_a_stopping_deliverer_and_its_job_is_delivered_later() {
    let stack = TestStack::new("fault-term2").await.unwrap();
    // The first POST hangs for longer than the deliverer's grace period, so
    // its graceful stop would wait 20 s; later ones are answered at once.
    let handler = HandlerServer::start(|_, n| {
        let answer = Answer::text("ok");
        if n == 0 {
            answer.after(Duration::from_secs(60))
        } else {
            answer
        }
    })
    .await;
    let dir = TempDir::new("fault-term2");
    let path = write_config(
        &dir,
        &config(&stack, &handler.url("/load"), |i| i.set("timeout_ms", 90000)).to_string(),
    );
    let mut out = listen_outbound(&stack).await.unwrap();
    let mut p = Pipeline::spawn(&path).await.unwrap();
    stack.publish_events_bytes(&events(0..1)).await.unwrap();
    handler.until(1, Duration::from_secs(30), "the POST under way").await;

    p.deliverer.signal("TERM").unwrap();
    // Still finishing its work: the first SIGTERM alone does not end it.
    let early = tokio::time::timeout(Duration::from_secs(1), p.deliverer.child.wait()).await;
    assert!(early.is_err(), "the deliverer waits for its attempt under way");
    p.deliverer.signal("TERM").unwrap();
    let status = tokio::time::timeout(Duration::from_secs(5), p.deliverer.child.wait())
        .await
        .expect("the deliverer exits within 5 s of a second SIGTERM")
        .unwrap();
    assert_eq!(status.code(), Some(1), "a forced stop exits 1");

    // The job was not acknowledged: a new deliverer takes it and delivers it.
    let _again = respawn("swallow-deliverer", &path);
    expect_all("second sigterm", 1, &handler, &mut out, Duration::from_secs(60)).await;
    assert_eq!(handler.count(), 2, "the hung POST, then the one that was answered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_whose_broker_stops_answering_still_exits_after_its_grace_period() {
    let stack = TestStack::new("fault-stuck").await.unwrap();
    let relay = FreezableRelay::start(&stack.url).await.unwrap();
    let dir = TempDir::new("fault-stuck");
    // The matcher connects through the relay.
    let config = config(&stack, "http://127.0.0.1:9/unused", |i| i).set("broker", "url", &relay.url);
    let path = config.write(&dir);
    let mut matcher = StageProcess::spawn("swallow-matcher", &path, &HashMap::new()).unwrap();
    matcher.ready(Duration::from_secs(30)).await;

    // The broker no longer answers: a graceful stop would wait forever on
    // cancelling its consumer. The matcher's grace is 10 s, its margin 5 s.
    relay.freeze();
    let term_at = std::time::Instant::now();
    matcher.signal("TERM").unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), matcher.child.wait())
        .await
        .expect("the matcher exits within 30 s of SIGTERM with its broker stuck")
        .unwrap();
    let took = term_at.elapsed();
    assert_eq!(status.code(), Some(1), "a forced stop exits 1");
    assert!(
        took >= Duration::from_secs(14),
        "the matcher waited out its grace and margin first (exited after {took:?})"
    );
}

/// A handler task that panics does not lose or strand its delivery: the
/// consumer loop hands it back to the broker (requeued, so it comes again,
/// marked redelivered) at once, and goes on with the others. One that
/// panics after its ack hands nothing back (a second settlement of the same
/// delivery would close the channel).
#[tokio::test]
async fn a_panicking_handler_hands_its_delivery_back() {
    use swallow_shared::broker::ConfirmedPublisher;
    use swallow_shared::broker::consume::{QueueOptions, Settler, consume_queue};

    let stack = TestStack::new("panic").await.unwrap();
    let queue = stack.topology.replies_queue();
    let channel = stack.connection.create_channel().await.unwrap();
    stack.topology.declare(&channel).await.unwrap();
    let publisher = ConfirmedPublisher::open(&stack.connection).await.unwrap();
    for body in ["first", "boom", "boom-after-ack", "last"] {
        publisher
            .publish("", &queue, body.as_bytes(), Default::default())
            .await
            .unwrap();
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let handle = move |delivery: lapin::message::Delivery, _: ConfirmedPublisher, settler: Settler| {
        let tx = tx.clone();
        async move {
            let body = String::from_utf8_lossy(&delivery.data).into_owned();
            if body == "boom" && !delivery.redelivered {
                panic!("the handler panicked on purpose");
            }
            settler.ack().await?;
            let _ = tx.send((body.clone(), delivery.redelivered));
            if body == "boom-after-ack" {
                panic!("the handler panicked after its ack, on purpose");
            }
            Ok(())
        }
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let options = QueueOptions {
        stage: "test",
        queue: &queue,
        prefetch: 10,
        stop: &stop,
        grace: Duration::from_secs(5),
    };
    let consuming = consume_queue(&channel, &publisher, options, || {}, handle);
    let watch = async {
        let mut got = HashMap::new();
        while got.len() < 4 {
            let next = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
            let (body, redelivered) = next
                .expect("all four handled within 10 s: the panicked one was not handed back")
                .expect("the handler is alive");
            got.insert(body, redelivered);
        }
        stop.cancel();
        got
    };
    let (consumed, got) = tokio::join!(consuming, watch);
    consumed.expect("the loop went on after the panic and stopped cleanly");
    assert_eq!(got.get("boom"), Some(&true), "the panicked delivery came back: {got:?}");
    assert_eq!(
        got.get("boom-after-ack"),
        Some(&false),
        "a delivery acknowledged before its panic is not handed back: {got:?}"
    );
    assert_eq!(got.len(), 4, "{got:?}");
    assert_eq!(stack.queue_len(&queue).await.unwrap(), 0, "nothing left unacknowledged");
}

/// Publishes from many tasks on one confirmed channel are confirmed each as
/// the broker answered it. lapin numbers a publish (its delivery tag) and
/// queues its frames in two steps; two threads publishing at once could be
/// numbered in one order and sent in the other, and then a nack would be
/// credited to the other publish: the stage would ack a message the broker
/// refused (lost), and retry one it took. Half of the publishes here go to a
/// queue that refuses every message (`x-max-length = 0`, `reject-publish`),
/// half to one that takes them; large bodies widen the window between the
/// two steps.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_publish_gets_its_own_confirm_when_many_tasks_share_a_channel() {
    use lapin::options::QueueDeclareOptions;
    use lapin::types::{AMQPValue, FieldTable};
    use swallow_shared::broker::{ConfirmedPublisher, PublishError};

    let stack = TestStack::new("confirm-order").await.unwrap();
    let takes = stack.topology.events_invalid_queue();
    // Deleted with the stack (its test-outbound name).
    let refuses = format!("{}.test-outbound", stack.prefix);
    stack.topology.declare(&stack.channel).await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
    args.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
    let options = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    stack
        .channel
        .queue_declare(refuses.as_str().into(), options, args)
        .await
        .unwrap();

    let publisher = ConfirmedPublisher::open(&stack.connection).await.unwrap();
    const TASKS: usize = 8;
    const EACH: usize = 150;
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..TASKS {
        let publisher = publisher.clone();
        let (takes, refuses) = (takes.clone(), refuses.clone());
        tasks.spawn(async move {
            let mut wrong = Vec::new();
            for i in 0..EACH {
                // Alternate per task and per message, so that refused and
                // taken publishes are under way together on both threads.
                let refused = (t + i) % 2 == 0;
                let (queue, body) = if refused {
                    (&refuses, vec![b'r'; 300 * 1024])
                } else {
                    (&takes, format!("{t}-{i}").into_bytes())
                };
                let outcome = publisher
                    .send("", queue, &body, Default::default())
                    .await
                    .expect("sent")
                    .confirmed()
                    .await;
                match (refused, outcome) {
                    (true, Err(PublishError::Nacked { .. })) | (false, Ok(())) => {}
                    (refused, other) => wrong.push(format!("task {t} message {i}, refused={refused}: {other:?}")),
                }
            }
            wrong
        });
    }
    let mut wrong = Vec::new();
    while let Some(done) = tokio::time::timeout(Duration::from_secs(120), tasks.join_next())
        .await
        .expect("every publish confirmed within 120 s")
    {
        wrong.extend(done.unwrap());
    }
    assert!(
        wrong.is_empty(),
        "{} of {} publishes were credited another publish's confirm, e.g. {:?}",
        wrong.len(),
        TASKS * EACH,
        &wrong[..wrong.len().min(3)]
    );
    // The queue's count follows its log: awaited, bounded.
    let want = TASKS * EACH / 2;
    let taken = wait_for(Duration::from_secs(10), "the taken messages in their queue", || async {
        let taken = stack.queue_len(&takes).await.unwrap() as usize;
        (taken >= want).then_some(taken)
    })
    .await;
    assert_eq!(taken, want, "every publish confirmed as taken is in its queue");
}
