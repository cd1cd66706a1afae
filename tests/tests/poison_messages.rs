//! A message that kills a stage is set aside after `[broker]
//! delivery_limit` deliveries instead of killing every replica for ever;
//! and a stage started against work queues an earlier version declared
//! (without the limit) still starts.
//!
//! The crash is a real SIGKILL from outside, as an OOM kill would be: the
//! deliverer (the responder) is killed each time the poisoned job's POST
//! reaches the handler (the poisoned reply's, the chat platform's webhook),
//! which never answers it, before the stage can acknowledge it, and started
//! again as a supervisor would. No test hook runs inside the stage. The
//! matcher makes no outside call while it holds an event, so nothing
//! outside can kill it at that moment each time: for the events inbox, a
//! consumer whose connection is cut before it acknowledges (what the broker
//! sees of a SIGKILL) stands in for it.

use std::collections::HashMap;
use std::time::Duration;

use lapin::options::{BasicGetOptions, BasicNackOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use swallow_shared::job::replay;
use swallow_shared::wire::messages::DeliveryJob;
use swallow_tests::handler::{Answer, HandlerServer, Recorded};
use swallow_tests::*;

const T: Duration = Duration::from_secs(60);
const LIMIT: u32 = 2;

fn text_of(r: &Recorded) -> String {
    r.field("text")
}

fn job(text: &str, ts: &str, url: &str) -> Vec<u8> {
    delivery_job("poisoned", text, ts, url)
}

/// The `x-death` entries the broker wrote, newest first, as (reason, queue).
fn deaths(d: &lapin::message::Delivery) -> Vec<(String, String)> {
    let Some(headers) = d.properties.headers() else {
        return Vec::new();
    };
    let Some(AMQPValue::FieldArray(entries)) = headers.inner().get("x-death") else {
        return Vec::new();
    };
    let text = |t: &FieldTable, k: &str| match t.inner().get(k) {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        _ => String::new(),
    };
    entries
        .as_slice()
        .iter()
        .filter_map(|e| match e {
            AMQPValue::FieldTable(t) => Some((text(t, "reason"), text(t, "queue"))),
            _ => None,
        })
        .collect()
}

/// Deletes the work queues the stack declared (with the default limit).
async fn delete_work_queues(stack: &TestStack) {
    for (queue, _) in stack.topology.work_queues() {
        stack
            .channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .unwrap();
    }
}

/// Kills `stage` (the stage `binary` run with `config`) each time `posted`
/// counts another POST of the poisoned message, before it can acknowledge
/// it, and starts it again as a supervisor would, until the broker set the
/// message aside in `dead`; asserts that took exactly `LIMIT + 1` crashes.
/// Returns the stage running after, and the crashes.
async fn kill_at_each_post(
    stack: &TestStack,
    dead: &str,
    (binary, mut stage): (&str, StageProcess),
    config: &std::path::Path,
    posted: impl Fn() -> usize,
) -> (StageProcess, usize) {
    let mut kills = 0;
    loop {
        let seen = wait_for(T, "the poisoned message's POST, or its dead letter", || async {
            if stack.queue_len(dead).await.ok()? > 0 {
                return Some(None);
            }
            (posted() > kills).then_some(Some(()))
        })
        .await;
        if seen.is_none() {
            break;
        }
        assert!(
            kills <= LIMIT as usize + 1,
            "{kills} crashes of {binary} and the message is not set aside"
        );
        stage.kill().await;
        kills += 1;
        stage = StageProcess::spawn(binary, config, &HashMap::new()).unwrap();
        stage.ready(T).await;
    }
    assert_eq!(
        kills,
        LIMIT as usize + 1,
        "the broker sets a message aside when it is returned more than delivery_limit times"
    );
    (stage, kills)
}

/// The set-aside message, taken (unacknowledged) from `dead` on `channel`,
/// after checking that its `x-death` says why and from which queue.
async fn set_aside(channel: &lapin::Channel, dead: &str, from: &str) -> lapin::message::BasicGetMessage {
    let got = wait_for(T, "the poisoned message in the dead queue", || async {
        channel.basic_get(dead.into(), BasicGetOptions::default()).await.ok()?
    })
    .await;
    assert_eq!(
        deaths(&got.delivery).first(),
        Some(&("delivery_limit".to_owned(), from.to_owned())),
        "x-death says why and where: {:?}",
        got.delivery.properties.headers()
    );
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_kills_the_deliverer_is_set_aside_and_the_jobs_behind_it_go() {
    let stack = TestStack::new("poison").await.unwrap();
    // The stack declared the work queues with the default limit; the
    // deliverer declares them with this test's.
    delete_work_queues(&stack).await;
    let handler = HandlerServer::start(|r, _| {
        if text_of(r).starts_with("poison") {
            Answer::status(200).after(Duration::from_secs(600))
        } else {
            Answer::status(200)
        }
    })
    .await;
    let url = handler.url("/hook");
    let dir = TempDir::new("poison");
    // One shard, two attempts at a time: the jobs behind the poisoned one
    // go beside it; the deliverer is killed only once they are settled, so
    // that each crash returns the poisoned job alone (a crash counts a
    // delivery of every job the deliverer held).
    let config = ConfigToml::on(&stack)
        .set("broker", "shards", 1)
        .set("broker", "delivery_limit", LIMIT)
        .set("deliverer", "concurrency", 2)
        .loopback()
        .integration(
            Integration::new("poisoned")
                .channel("C2147483705")
                .url(&url)
                .set("rate_limit", rate_limit(100.0, 100)),
        )
        .write(&dir);
    let deliverer = StageProcess::spawn("swallow-deliverer", &config, &HashMap::new()).unwrap();
    deliverer.ready(T).await;
    let shard = stack.topology.delivery_shard_queue(0);
    stack
        .publish_to_queue(&shard, &job("poison pill", "1.000001", &url))
        .await
        .unwrap();
    for i in 0..3 {
        stack
            .publish_to_queue(&shard, &job(&format!("fine {i}"), &format!("2.00000{i}"), &url))
            .await
            .unwrap();
    }
    let dead = stack.topology.deliveries_dead_queue();
    let poisoned = |h: &HandlerServer| h.requests().iter().filter(|r| text_of(r).starts_with("poison")).count();
    let fine = |h: &HandlerServer, word: &str| h.requests().iter().filter(|r| text_of(r).starts_with(word)).count();
    let delivered = |p: &StageProcess| {
        let ops = p.ops_addr;
        async move {
            metric(ops, "swallow_deliveries_total", &[("outcome", "delivered")])
                .await
                .ok()
        }
    };
    wait_for(T, "the three jobs behind the poisoned one, delivered", || async {
        (fine(&handler, "fine") == 3 && delivered(&deliverer).await? >= 3.0).then_some(())
    })
    .await;
    let (mut deliverer, kills) = kill_at_each_post(&stack, &dead, ("swallow-deliverer", deliverer), &config, || {
        poisoned(&handler)
    })
    .await;
    // Looked at, then handed back for `replay` below.
    let looking = stack.connection.create_channel().await.unwrap();
    let got = set_aside(&looking, &dead, &shard).await;
    let d = &got.delivery;
    let set_aside: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
    assert_eq!(set_aside["event"]["text"], "poison pill", "the job, unchanged");
    // The deliverer stays up and goes on with the jobs that come next.
    for i in 0..3 {
        stack
            .publish_to_queue(&shard, &job(&format!("next {i}"), &format!("3.00000{i}"), &url))
            .await
            .unwrap();
    }
    wait_for(T, "the jobs published after it was set aside", || async {
        (fine(&handler, "next") == 3).then_some(())
    })
    .await;
    assert!(
        deliverer.child.try_wait().unwrap().is_none(),
        "the deliverer is still running"
    );
    assert_eq!(poisoned(&handler), kills, "the set-aside job was not delivered again");
    assert_eq!(
        replay::broker_death_reason(&d.properties).as_deref(),
        Some("delivery_limit")
    );
    deliverer.kill().await;

    // `replay` finds it by its integration (it has no x-swallow-* headers)
    // and says it was set aside past the delivery limit.
    let requeue = BasicNackOptions {
        requeue: true,
        ..Default::default()
    };
    looking.basic_nack(d.delivery_tag, requeue).await.unwrap();
    let cfg = swallow_shared::Config::load(&config).unwrap();
    let done = replay::replay::<DeliveryJob>(&cfg.broker, "swallow-test", Some("poisoned"), None)
        .await
        .unwrap();
    assert_eq!((done.moved, done.past_delivery_limit, done.left), (1, 1, 0));
}

/// The same for the replies queue: a reply whose post kills the responder
/// each time (SIGKILLed when the chat platform's webhook receives it) is
/// set aside in the replies' dead queue, and the replies behind it and
/// after it are posted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_that_kills_the_responder_is_set_aside_and_the_replies_behind_it_go() {
    let stack = TestStack::new("poison-rsp").await.unwrap();
    delete_work_queues(&stack).await;
    let hook = HandlerServer::start(|r, _| {
        if r.body_str().contains("poison") {
            Answer::status(200).after(Duration::from_secs(600))
        } else {
            Answer::status(200).body("ok")
        }
    })
    .await;
    let dir = TempDir::new("poison-rsp");
    let config = ConfigToml::on(&stack)
        .set("broker", "delivery_limit", LIMIT)
        .set("responder", "sink", "webhook")
        .set("responder", "webhook_url", hook.url("/hooks/chat"))
        .responder_rate(1000.0)
        .integration(
            Integration::new("poisoned")
                .channel("C2147483705")
                .url("http://127.0.0.1:9/"),
        )
        .write(&dir);
    let responder = StageProcess::spawn("swallow-responder", &config, &HashMap::new()).unwrap();
    responder.ready(T).await;
    let replies = stack.topology.replies_queue();
    // Each in a channel of its own: a channel's replies keep their order.
    let reply = |text: &str, channel: &str| {
        serde_json::to_vec(&serde_json::json!({
            "v": 1, "delivery_id": format!("msg_{text}"), "integration_id": "bot",
            "team_id": "T0001", "channel_id": channel, "in_reply_to": "1.000001",
            "answer": {"text": text},
            "created_at_ms": swallow_shared::wire::messages::now_millis(),
        }))
        .unwrap()
    };
    stack
        .publish_to_queue(&replies, &reply("poison reply", "CP"))
        .await
        .unwrap();
    for i in 0..3 {
        let (text, channel) = (format!("fine {i}"), format!("C{i}"));
        stack.publish_to_queue(&replies, &reply(&text, &channel)).await.unwrap();
    }
    let posted = |word: &str| hook.requests().iter().filter(|r| r.body_str().contains(word)).count();
    // Killed only once they are acknowledged (counted after the ack), so
    // that each crash returns the poisoned reply alone.
    let ops = responder.ops_addr;
    wait_for(T, "the three replies behind the poisoned one, posted", || async {
        let acked = metric(ops, "swallow_replies_total", &[("outcome", "posted")])
            .await
            .ok()?;
        (posted("fine") == 3 && acked >= 3.0).then_some(())
    })
    .await;
    let dead = stack.topology.replies_dead_queue();
    let (responder, kills) = kill_at_each_post(&stack, &dead, ("swallow-responder", responder), &config, || {
        posted("poison reply")
    })
    .await;
    let looking = stack.connection.create_channel().await.unwrap();
    let got = set_aside(&looking, &dead, &replies).await;
    let set_aside: serde_json::Value = serde_json::from_slice(&got.delivery.data).unwrap();
    assert_eq!(set_aside["answer"]["text"], "poison reply", "the reply, unchanged");
    for i in 0..3 {
        let (text, channel) = (format!("next {i}"), format!("C{i}"));
        stack.publish_to_queue(&replies, &reply(&text, &channel)).await.unwrap();
    }
    wait_for(T, "the replies published after it was set aside", || async {
        (posted("next") == 3).then_some(())
    })
    .await;
    let mut responder = responder;
    assert!(
        responder.child.try_wait().unwrap().is_none(),
        "the responder is still running"
    );
    assert_eq!(
        posted("poison reply"),
        kills,
        "the set-aside reply was not posted again"
    );
    responder.kill().await;

    // `swallow-responder replay` moves it back, and says it had been set
    // aside by the broker.
    let requeue = BasicNackOptions {
        requeue: true,
        ..Default::default()
    };
    looking.basic_nack(got.delivery.delivery_tag, requeue).await.unwrap();
    let said = run_command("swallow-responder", &config, &["replay"]);
    assert!(
        said.starts_with("moved 1 dead reply job(s)") && said.contains("taken by a responder that died"),
        "{said}"
    );
    assert_eq!(stack.queue_len(&replies).await.unwrap(), 1, "the reply is back in line");
}

/// The events inbox: an event whose consumer dies before acknowledging it,
/// each time, is set aside in the invalid queue; the matcher then matches
/// the events behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_whose_consumer_dies_each_time_is_set_aside_and_the_events_behind_it_go() {
    let stack = TestStack::new("poison-inbox").await.unwrap();
    delete_work_queues(&stack).await;
    let dir = TempDir::new("poison-inbox");
    let config = ConfigToml::on(&stack)
        .set("broker", "delivery_limit", LIMIT)
        .integration(Integration::new("g").channel("C2147483705").url("http://127.0.0.1:9/x"))
        .write(&dir);
    // The matcher declares the inbox (with this test's limit), then is gone.
    let mut matcher = StageProcess::spawn("swallow-matcher", &config, &HashMap::new()).unwrap();
    matcher.ready(T).await;
    matcher.kill().await;
    let inbox = stack.topology.events_queue();
    stack
        .publish_event(&chat_event("poison pill", "1.000001"))
        .await
        .unwrap();
    for i in 0..=LIMIT {
        // Taken on a connection of its own, which is then cut unacknowledged.
        let conn = lapin::Connection::connect(&stack.url, Default::default())
            .await
            .unwrap();
        let channel = conn.create_channel().await.unwrap();
        let got = wait_for(T, "the poisoned event, delivered again", || async {
            channel
                .basic_get(inbox.as_str().into(), BasicGetOptions::default())
                .await
                .ok()?
        })
        .await;
        let event: serde_json::Value = serde_json::from_slice(&got.delivery.data).unwrap();
        assert_eq!(event["text"], "poison pill", "delivery {}", i + 1);
        drop(got);
        conn.close(320, "a crash".into()).await.unwrap();
    }
    let looking = stack.connection.create_channel().await.unwrap();
    let got = set_aside(&looking, &stack.topology.events_invalid_queue(), &inbox).await;
    let event: serde_json::Value = serde_json::from_slice(&got.delivery.data).unwrap();
    assert_eq!(event["text"], "poison pill", "the event, unchanged");
    let mut jobs = stack.drain_jobs().await.unwrap();
    let matcher = StageProcess::spawn("swallow-matcher", &config, &HashMap::new()).unwrap();
    matcher.ready(T).await;
    for i in 0..3 {
        stack
            .publish_event(&chat_event(&format!("next {i}"), &format!("2.00000{i}")))
            .await
            .unwrap();
    }
    jobs.until(3, T, "the jobs of the events behind it").await;
    assert_eq!(
        stack.queue_len(&inbox).await.unwrap(),
        0,
        "the set-aside event did not come back"
    );
    drop(matcher);
}

/// Queues declared the earlier way (quorum, no delivery limit): the stage
/// cannot declare them again with the limit (PRECONDITION_FAILED), so it
/// declares them passively, warns, and works; the policies the warning
/// names give them the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_starts_against_work_queues_declared_without_a_limit() {
    let stack = TestStack::new("legacy").await.unwrap();
    let mut quorum = FieldTable::default();
    quorum.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    delete_work_queues(&stack).await;
    for (queue, _) in stack.topology.work_queues() {
        stack
            .channel
            .queue_declare(queue.as_str().into(), durable, quorum.clone())
            .await
            .unwrap();
    }
    // Declaring them with the limit is refused, as the broker does.
    let probe = stack.connection.create_channel().await.unwrap();
    let (queue, dead) = &stack.topology.work_queues()[0];
    let refused = probe
        .queue_declare(queue.as_str().into(), durable, stack.topology.work_queue_args(dead))
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("PRECONDITION"), "{refused}");

    let dir = TempDir::new("legacy");
    let config = ConfigToml::on(&stack)
        .integration(Integration::new("g").channel("C2147483705").url("http://127.0.0.1:9/x"))
        .write(&dir);
    let mut env = HashMap::new();
    env.insert("RUST_LOG".to_owned(), "warn".to_owned());
    let matcher = StageProcess::spawn("swallow-matcher", &config, &env).unwrap();
    matcher.ready(T).await;
    let mut jobs = stack.drain_jobs().await.unwrap();
    stack.publish_event(&chat_event("hello", "3.000001")).await.unwrap();
    jobs.until(1, T, "the job the matcher made").await;
    drop(matcher);
    drop(jobs);

    // The policies apply to exactly the work queues.
    {
        for (name, pattern, definition) in stack.topology.delivery_limit_policies() {
            let out = std::process::Command::new("timeout")
                .args(["30", "rabbitmqctl", "set_policy", "--apply-to", "queues"])
                .args([name.as_str(), pattern.as_str(), definition.as_str()])
                .output()
                .unwrap();
            assert!(out.status.success(), "set_policy {name}: {out:?}");
        }
        let listed = wait_for(T, "the policies on the work queues", || async {
            let out = std::process::Command::new("timeout")
                .args(["30", "rabbitmqctl", "list_queues", "-q", "name", "policy"])
                .output()
                .ok()?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let with_policy = stack
                .topology
                .work_queues()
                .iter()
                .filter(|(q, _)| {
                    text.lines()
                        .any(|l| l.starts_with(&format!("{q}\t")) && l.contains("delivery-limit"))
                })
                .count();
            (with_policy == stack.topology.work_queues().len()).then_some(text)
        })
        .await;
        for dead in [
            stack.topology.events_invalid_queue(),
            stack.topology.deliveries_dead_queue(),
        ] {
            let line = listed
                .lines()
                .find(|l| l.starts_with(&format!("{dead}\t")))
                .unwrap_or("");
            assert!(!line.contains("delivery-limit"), "no policy on {dead}: {line}");
        }
        for (name, ..) in stack.topology.delivery_limit_policies() {
            let _ = std::process::Command::new("timeout")
                .args(["30", "rabbitmqctl", "clear_policy", name.as_str()])
                .output();
        }
    }
}
