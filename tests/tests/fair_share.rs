//! Fair queueing of the attempt permits, with the real deliverer: jobs
//! that wait in memory for their turn are never lost or duplicated when the
//! deliverer stops (SIGTERM: they leave for the delay ladder, the attempt
//! under way finishes), and a quick integration's burst is served between
//! a slow one's attempts instead of behind them.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use swallow_tests::handler::{Answer, HandlerServer, Recorded};
use swallow_tests::*;

const T: Duration = Duration::from_secs(60);

fn text_of(r: &Recorded) -> String {
    r.field("text")
}

fn job(integration: &str, text: &str, ts: &str, url: &str) -> Vec<u8> {
    delivery_job(integration, text, ts, url)
}

fn config(stack: &TestStack, concurrency: usize, slow: &str, quick: &str) -> ConfigToml {
    let integration = |id: &str, url: &str| {
        Integration::new(id)
            .channel("C2147483705")
            .url(url)
            .set("timeout_ms", 20000)
            .set("rate_limit", rate_limit(1000.0, 1000))
    };
    ConfigToml::on(stack)
        .set("broker", "shards", 1)
        .set("deliverer", "concurrency", concurrency)
        .set("deliverer", "per_integration_concurrency", concurrency)
        .loopback()
        .integration(integration("slow", slow))
        .integration(integration("slow2", slow))
        .integration(integration("quick", quick))
}

/// Four permits, all held by two slow integrations' attempts (three, and
/// one in the headroom): the quick integration's jobs wait in memory.
/// SIGTERM: the waiting jobs go to the ladder at once (and from its
/// shortest step back to the shard), the attempts under way finish, the
/// deliverer exits 0; the next deliverer delivers every waiting job
/// exactly once. The slow handler answers only when the test lets it, so
/// nothing here races a clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_waiting_for_a_permit_leave_for_the_ladder_on_shutdown_and_are_delivered_once() {
    let stack = TestStack::new("fair-drain").await.unwrap();
    let release = tokio_util::sync::CancellationToken::new();
    let gate = release.clone();
    let handler = HandlerServer::start(move |r, _| {
        if text_of(r).starts_with("slow") {
            Answer::status(200).until(&gate)
        } else {
            Answer::status(200)
        }
    })
    .await;
    let (slow, quick) = (handler.url("/slow"), handler.url("/quick"));
    let dir = TempDir::new("fair-drain");
    let path = config(&stack, 4, &slow, &quick).write(&dir);
    let deliverer = StageProcess::spawn("swallow-deliverer", &path, &HashMap::new()).unwrap();
    deliverer.ready(T).await;
    let shard = stack.topology.delivery_shard_queue(0);
    for i in 0..3 {
        let body = job("slow", &format!("slow {i}"), &format!("1.00000{i}"), &slow);
        stack.publish_to_queue(&shard, &body).await.unwrap();
    }
    // The second slow integration's job only once the first's three are
    // under way: handled at the same time, it could take the third's
    // permit, and the third would then wait in line (the headroom rule).
    handler.until(3, T, "the first slow integration's attempts").await;
    stack
        .publish_to_queue(&shard, &job("slow2", "slow 3", "1.000009", &slow))
        .await
        .unwrap();
    handler.until(4, T, "the slow attempts").await;
    for i in 0..4 {
        let body = job("quick", &format!("quick {i}"), &format!("2.00000{i}"), &quick);
        stack.publish_to_queue(&shard, &body).await.unwrap();
    }
    // Every quick job is in the deliverer, waiting for a permit.
    wait_for(T, "the quick jobs taken from the queue", || async {
        (stack.queue_len(&shard).await.ok()? == 0).then_some(())
    })
    .await;
    assert_eq!(
        handler.count(),
        4,
        "the quick jobs wait while the slow attempts hold the permits: {:?}",
        handler
            .requests()
            .iter()
            .map(|r| (text_of(r), r.at))
            .collect::<Vec<_>>()
    );
    deliverer.signal("TERM").unwrap();
    let stopped = Instant::now();
    // The waiting jobs leave for the ladder while the slow attempts still
    // hold every permit, and come back to the shard from its shortest step.
    wait_for(T, "the waiting quick jobs back in the shard", || async {
        (stack.queue_len(&shard).await.ok()? == 4).then_some(())
    })
    .await;
    release.cancel();
    let mut deliverer = deliverer;
    let status = tokio::time::timeout(T, deliverer.child.wait())
        .await
        .expect("the deliverer stops")
        .unwrap();
    assert!(status.success(), "a clean stop: {status:?}");
    assert!(
        stopped.elapsed() < Duration::from_secs(10),
        "the waiting jobs did not hold the stop: {:?}",
        stopped.elapsed()
    );
    let texts: Vec<String> = handler.requests().iter().map(text_of).collect();
    assert!(
        texts.iter().filter(|t| t.starts_with("slow")).count() == 4 && texts.len() == 4,
        "the attempts under way finished, and only they: {texts:?}"
    );
    // The next deliverer finds them back in the queue (from the ladder).
    let next = StageProcess::spawn("swallow-deliverer", &path, &HashMap::new()).unwrap();
    next.ready(T).await;
    handler.until(8, T, "the quick jobs, after the restart").await;
    // None twice: what left for the ladder was acknowledged once parked.
    wait_for(T, "the shard to be empty", || async {
        (stack.queue_len(&shard).await.ok()? == 0).then_some(())
    })
    .await;
    let mut quick_texts: Vec<String> = handler
        .requests()
        .iter()
        .map(text_of)
        .filter(|t| t.starts_with("quick"))
        .collect();
    quick_texts.sort();
    assert_eq!(quick_texts, (0..4).map(|i| format!("quick {i}")).collect::<Vec<_>>());
    assert_eq!(handler.count(), 8, "nothing delivered twice");
    drop(next);
}

/// Four permits, a slow integration with many jobs (each attempt 2 s), and
/// a quick one's burst of five behind them: the quick jobs wait in memory
/// and each goes at the next release of a permit its integration may
/// take, so the burst is through long before the slow attempts end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quick_integrations_burst_is_served_between_a_slow_ones_attempts() {
    let stack = TestStack::new("fair-burst").await.unwrap();
    let handler = HandlerServer::start(|r, _| {
        if text_of(r).starts_with("slow") {
            Answer::status(200).after(Duration::from_secs(2))
        } else {
            Answer::status(200)
        }
    })
    .await;
    let (slow, quick) = (handler.url("/slow"), handler.url("/quick"));
    let dir = TempDir::new("fair-burst");
    let path = config(&stack, 4, &slow, &quick).write(&dir);
    let deliverer = StageProcess::spawn("swallow-deliverer", &path, &HashMap::new()).unwrap();
    deliverer.ready(T).await;
    let shard = stack.topology.delivery_shard_queue(0);
    for i in 0..8 {
        let body = job("slow", &format!("slow {i}"), &format!("1.00000{i}"), &slow);
        stack.publish_to_queue(&shard, &body).await.unwrap();
    }
    // Three slow attempts under way: the fourth permit is headroom.
    handler.until(3, T, "the slow attempts").await;
    let sent = Instant::now();
    for i in 0..5 {
        let body = job("quick", &format!("quick {i}"), &format!("2.00000{i}"), &quick);
        stack.publish_to_queue(&shard, &body).await.unwrap();
    }
    wait_for(T, "the quick burst", || async {
        let quick = handler
            .requests()
            .iter()
            .filter(|r| text_of(r).starts_with("quick"))
            .count();
        (quick == 5).then_some(())
    })
    .await;
    assert!(
        sent.elapsed() < Duration::from_millis(1500),
        "the burst went between the slow attempts, not behind them: {:?}",
        sent.elapsed()
    );
    drop(deliverer);
}
