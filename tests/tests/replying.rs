//! The responder against the real broker, and real HTTP servers on loopback
//! playing Slack's Web API and an incoming webhook.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use swallow_shared::Config;
use swallow_tests::handler::{Answer, HandlerServer};
use swallow_tests::*;
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(30);

fn integration() -> Integration {
    Integration::new("googlebot")
        .channel("#test")
        .url("http://127.0.0.1:9/")
        .set("bot_name", "Google Bot")
        .set("icon_emoji", ":bird:")
}

/// The stack's broker, the responder on a free port, [`integration`].
fn base(stack: &TestStack) -> ConfigToml {
    ConfigToml::on(stack)
        .set("responder", "http_addr", "127.0.0.1:0")
        .integration(integration())
}

fn config(toml: ConfigToml) -> Config {
    let text = toml.to_string();
    Config::parse(&text, None).expect("test config")
}

fn reply(ts: &str, channel: &str, answer: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "v": 1,
        "delivery_id": format!("msg_{channel}_{ts}"),
        "integration_id": "googlebot",
        "team_id": "T0001",
        "channel_id": channel,
        "in_reply_to": ts,
        "answer": answer,
        "created_at_ms": swallow_shared::wire::messages::now_millis(),
    })
}

async fn publish_replies(stack: &TestStack, replies: &[serde_json::Value]) {
    let mut confirms = Vec::new();
    for r in replies {
        confirms.push(
            stack
                .channel
                .basic_publish(
                    "".into(),
                    stack.topology.replies_queue().as_str().into(),
                    Default::default(),
                    &serde_json::to_vec(r).unwrap(),
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

async fn outbound_queue(stack: &TestStack) -> Collector {
    listen_outbound(stack).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_sink_posts_exactly_the_contract_fields() {
    let stack = TestStack::new("rsp-amqp").await.unwrap();
    let mut out = outbound_queue(&stack).await;
    let shutdown = CancellationToken::new();
    let responder = swallow_responder::start(config(base(&stack)), shutdown.clone())
        .await
        .unwrap();
    publish_replies(
        &stack,
        &[
            reply(
                "1355517523.000005",
                "C2147483705",
                serde_json::json!({"text": "African or European?"}),
            ),
            reply(
                "2.0",
                "C2147483705",
                serde_json::json!({"text": "Ni!", "username": "Tim", "icon_url": "http://127.0.0.1/t.png",
                                   "response_type": "comment", "attachments": [{"text": "att"}]}),
            ),
        ],
    )
    .await;
    out.until(2, T, "outbound replies").await;
    for d in &out.got {
        assert_eq!(d.routing_key.as_str(), "T0001.C2147483705");
        assert_eq!(d.properties.delivery_mode(), &Some(2));
    }
    let mut v = out.json();
    // Replies are posted concurrently: order them by the message they answer.
    v.sort_by_key(|r| r["in_reply_to"] == "2.0");
    let keys: BTreeSet<&str> = v[0].as_object().unwrap().keys().map(String::as_str).collect();
    let want: BTreeSet<&str> = [
        "team_id",
        "channel_id",
        "thread_ts",
        "text",
        "username",
        "icon_url",
        "icon_emoji",
        "attachments",
        "integration_id",
        "delivery_id",
        "in_reply_to",
        "bot_id",
        "subtype",
    ]
    .into();
    assert_eq!(keys, want);
    assert_eq!(v[0]["text"], "African or European?");
    assert_eq!(v[0]["username"], "Google Bot");
    assert_eq!(v[0]["icon_emoji"], ":bird:");
    assert_eq!(v[0]["thread_ts"], serde_json::Value::Null);
    assert_eq!(v[0]["in_reply_to"], "1355517523.000005");
    assert_eq!(v[0]["delivery_id"], "msg_C2147483705_1355517523.000005");
    assert_eq!(v[0]["subtype"], "bot_message");
    assert_eq!(v[1]["username"], "Tim");
    assert_eq!(v[1]["icon_url"], "http://127.0.0.1/t.png");
    assert_eq!(v[1]["icon_emoji"], serde_json::Value::Null);
    assert_eq!(v[1]["thread_ts"], "2.0", "comment: a thread reply to the trigger");
    assert_eq!(v[1]["attachments"], serde_json::json!([{"text": "att"}]));
    let m = metric(responder.ops_addr, "swallow_replies_total", &[("outcome", "posted")])
        .await
        .unwrap();
    assert_eq!(m, 2.0);
    assert_eq!(
        metric(responder.ops_addr, "swallow_end_to_end_latency_seconds_count", &[])
            .await
            .unwrap(),
        2.0
    );
    shutdown.cancel();
    responder.join().await;
}

/// Replies to a channel no chat platform takes (nothing bound for its
/// routing key) come back from the broker unroutable. AMQP's return names
/// no publish, and a broker that confirms several publishes at once leaves
/// the client unable to tell which came back: lapin hands the return to one
/// of them, not always the right one. Posted amid other replies and parks
/// on one channel, a return reported on a park ended the session (the
/// replies under way redelivered), and the reply that came back was
/// counted posted. Each must be told apart: the routed ones posted once,
/// the others retried and dead-lettered, the session never dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_reply_is_retried_and_never_taken_for_another() {
    let stack = TestStack::new("rsp-noroute").await.unwrap();
    let mut out = listen_outbound_for(&stack, "T0001.CA").await.unwrap();
    let mut dead = stack.drain(&stack.topology.replies_dead_queue()).await.unwrap();
    let shutdown = CancellationToken::new();
    let responder_toml = base(&stack).set("responder", "max_attempts", 3).responder_rate(1000.0);
    let responder = swallow_responder::start(config(responder_toml), shutdown.clone())
        .await
        .unwrap();
    const EACH: usize = 150;
    let replies: Vec<serde_json::Value> = (0..EACH)
        .flat_map(|i| ["CA", "CB"].map(|channel| reply(&format!("{i}.0"), channel, serde_json::json!({"text": "hi"}))))
        .collect();
    publish_replies(&stack, &replies).await;
    dead.until(EACH, T, "dead replies to the channel nobody takes").await;
    out.settle(Duration::from_millis(500)).await;
    let routed: Vec<String> = out
        .json()
        .iter()
        .map(|r| r["delivery_id"].as_str().unwrap().to_owned())
        .collect();
    let distinct: BTreeSet<&String> = routed.iter().collect();
    assert_eq!(distinct.len(), EACH, "every reply to CA arrives");
    assert!(
        routed.iter().all(|id| id.starts_with("msg_CA_")),
        "only CA's replies have a route"
    );
    for d in &dead.got {
        assert_eq!(header(d, "x-swallow-reason").as_deref(), Some("max_attempts"));
        let error = header(d, "x-swallow-error").unwrap_or_default();
        assert!(error.contains("unroutable"), "dead for being unroutable: {error}");
        let body: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
        assert_eq!(body["channel_id"], "CB", "only CB's replies are dead");
    }
    let ops = responder.ops_addr;
    assert_eq!(
        metric(ops, "swallow_replies_total", &[("outcome", "posted")])
            .await
            .unwrap(),
        EACH as f64,
        "posted counts CA's replies, none of CB's"
    );
    assert_eq!(
        metric(ops, "swallow_broker_reconnects_total", &[]).await.unwrap(),
        0.0,
        "an unroutable reply never ends the broker session"
    );
    assert_eq!(routed.len(), EACH, "no reply redelivered and posted twice");
    shutdown.cancel();
    responder.join().await;
}

/// Replies that could not be posted (no route for their channel) are moved
/// back by `swallow-responder replay` once the channel takes them: of one
/// integration, at most N, the rest left, each posted once with its
/// delivery id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_replies_are_replayed_once_their_channel_takes_them() {
    let stack = TestStack::new("rsp-replay").await.unwrap();
    let dead_queue = stack.topology.replies_dead_queue();
    let dir = TempDir::new("rsp-replay");
    let toml = base(&stack).set("responder", "max_attempts", 1).responder_rate(1000.0);
    let path = write_config(&dir, &toml.to_string());
    let shutdown = CancellationToken::new();
    let responder = swallow_responder::start(config(toml), shutdown.clone()).await.unwrap();
    let replies: Vec<serde_json::Value> = (0..3)
        .map(|i| {
            reply(
                &format!("{i}.0"),
                "CR",
                serde_json::json!({"text": format!("late {i}")}),
            )
        })
        .collect();
    publish_replies(&stack, &replies).await;
    wait_for(T, "three dead replies (no route to CR)", || async {
        (stack.queue_len(&dead_queue).await.ok()? == 3).then_some(())
    })
    .await;

    let mut out = listen_outbound_for(&stack, "T0001.CR").await.unwrap();
    let replay = |args: &[&str]| run_command("swallow-responder", &path, &[&["replay"], args].concat());
    let said = replay(&["--integration", "nobody"]);
    assert!(
        said.starts_with("moved 0 dead reply job(s)") && said.contains(&format!("left 3 in {dead_queue}")),
        "{said}"
    );
    let said = replay(&["--limit", "1"]);
    assert!(said.starts_with("moved 1 dead reply job(s)"), "{said}");
    out.until(1, T, "the first replayed reply").await;
    let said = replay(&["--integration", "googlebot"]);
    assert!(said.starts_with("moved 2 dead reply job(s)"), "{said}");
    out.until(3, T, "every replayed reply").await;
    out.settle(Duration::from_millis(500)).await;
    let ids: BTreeSet<String> = out
        .json()
        .iter()
        .map(|r| r["delivery_id"].as_str().unwrap().to_owned())
        .collect();
    let expected: BTreeSet<String> = (0..3).map(|i| format!("msg_CR_{i}.0")).collect();
    assert_eq!(ids, expected, "each posted with its own delivery id");
    assert_eq!(out.got.len(), 3, "each posted once");
    assert_eq!(stack.queue_len(&dead_queue).await.unwrap(), 0, "none left dead");
    shutdown.cancel();
    responder.join().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_sink_retries_ok_false_honours_retry_after_and_dead_letters() {
    let stack = TestStack::new("rsp-slack").await.unwrap();
    let slack = HandlerServer::start(|r, _| {
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
        match body["text"].as_str().unwrap_or("") {
            "flaky" => {
                // ok:false first, ok:true afterwards.
                Answer::json(serde_json::json!({"ok": FLAKY.fetch_add(1, std::sync::atomic::Ordering::SeqCst) > 0, "error": "internal_error"}))
            }
            "busy" => {
                if BUSY.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                    Answer::status(429).header("retry-after", "2")
                } else {
                    Answer::json(serde_json::json!({"ok": true}))
                }
            }
            "broken" => Answer::status(500),
            "gone" => Answer::json(serde_json::json!({"ok": false, "error": "channel_not_found"})),
            _ => Answer::json(serde_json::json!({"ok": true})),
        }
    })
    .await;
    static FLAKY: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    static BUSY: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let responder_toml = base(&stack)
        .set("responder", "sink", "slack")
        .set("responder", "slack_api_base", slack.url("/api"))
        .set("responder", "slack_token", "xoxb-test")
        .set("responder", "max_attempts", 3)
        .responder_rate(100.0);
    let shutdown = CancellationToken::new();
    let responder = swallow_responder::start(config(responder_toml), shutdown.clone())
        .await
        .unwrap();
    let mut dead = stack.drain(&stack.topology.replies_dead_queue()).await.unwrap();
    publish_replies(
        &stack,
        &[
            reply(
                "1.0",
                "C1",
                serde_json::json!({"text": "flaky", "response_type": "comment"}),
            ),
            reply("2.0", "C2", serde_json::json!({"text": "busy"})),
            reply("3.0", "C3", serde_json::json!({"text": "broken"})),
            reply("4.0", "C4", serde_json::json!({"text": "gone"})),
        ],
    )
    .await;
    dead.until(2, T, "dead replies").await;
    let reasons: BTreeSet<(String, String)> = dead
        .got
        .iter()
        .map(|d| {
            (
                header(d, "x-swallow-reason").unwrap(),
                header(d, "x-swallow-attempts").unwrap(),
            )
        })
        .collect();
    assert_eq!(
        reasons,
        [
            ("max_attempts".to_owned(), "3".to_owned()),
            ("rejected".to_owned(), "1".to_owned())
        ]
        .into()
    );
    wait_for(T, "two replies posted", || async {
        (metric(responder.ops_addr, "swallow_replies_total", &[("outcome", "posted")])
            .await
            .ok()?
            == 2.0)
            .then_some(())
    })
    .await;
    // Each reply counted once, by what became of it: the refused one is
    // `rejected`, not also `dead`.
    let ops = responder.ops_addr;
    wait_for(T, "one reply counted dead and one rejected, once each", || async move {
        let dead = metric(ops, "swallow_replies_total", &[("outcome", "dead")])
            .await
            .ok()?;
        let rejected = metric(ops, "swallow_replies_total", &[("outcome", "rejected")])
            .await
            .ok()?;
        (dead == 1.0 && rejected == 1.0).then_some(())
    })
    .await;
    let reqs = slack.requests();
    let text_of = |r: &swallow_tests::handler::Recorded| {
        serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["text"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let flaky: Vec<_> = reqs.iter().filter(|r| text_of(r) == "flaky").collect();
    assert_eq!(flaky.len(), 2, "ok:false was retried once");
    let f = &flaky[0];
    assert_eq!(f.path, "/api/chat.postMessage");
    assert_eq!(f.header("authorization"), Some("Bearer xoxb-test"));
    let body: serde_json::Value = serde_json::from_slice(&f.body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"channel": "C1", "text": "flaky", "username": "Google Bot", "icon_emoji": ":bird:", "thread_ts": "1.0"})
    );
    let busy: Vec<_> = reqs.iter().filter(|r| text_of(r) == "busy").collect();
    assert_eq!(busy.len(), 2);
    let gap = (busy[1].at - busy[0].at).as_secs_f64();
    assert!(gap >= 2.0, "retry {gap:.2} s after 429 with Retry-After: 2");
    assert_eq!(reqs.iter().filter(|r| text_of(r) == "broken").count(), 3);
    shutdown.cancel();
    responder.join().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_sink_and_per_channel_pacing() {
    let stack = TestStack::new("rsp-webhook").await.unwrap();
    let hook = HandlerServer::start(|_, _| Answer::status(200).body("ok")).await;
    let responder_toml =
        base(&stack)
            .set("responder", "sink", "webhook")
            .set("responder", "webhook_url", hook.url("/hooks/abc"));
    let shutdown = CancellationToken::new();
    let responder = swallow_responder::start(config(responder_toml), shutdown.clone())
        .await
        .unwrap();
    // 10 replies to one channel (paced 1/s, burst 5) and one to another.
    let mut replies: Vec<_> = (0..10)
        .map(|i| reply(&format!("{i}.0"), "C1", serde_json::json!({"text": format!("r{i}")})))
        .collect();
    replies.push(reply("99.0", "C2", serde_json::json!({"text": "other channel"})));
    publish_replies(&stack, &replies).await;
    let reqs = hook.until(11, T, "webhook posts").await;
    assert!(reqs.iter().all(|r| r.path == "/hooks/abc"));
    let other = reqs
        .iter()
        .position(|r| r.body_str().contains("other channel"))
        .unwrap();
    assert!(
        other <= 5,
        "the other channel is not held behind C1's pace (position {other})"
    );
    let c1: Vec<_> = reqs.iter().filter(|r| r.body_str().contains("\"C1\"")).collect();
    let at: Vec<_> = c1.iter().map(|r| r.at).collect();
    assert_paced(&at, 1.0, 5, "replies to C1");
    let body: serde_json::Value = serde_json::from_slice(&c1[0].body).unwrap();
    assert_eq!(body["username"], "Google Bot");
    assert_eq!(body["channel"], "C1");
    shutdown.cancel();
    responder.join().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_no_reply() {
    let stack = TestStack::new("rsp-kill").await.unwrap();
    let mut out = outbound_queue(&stack).await;
    let dir = TempDir::new("responder");
    let path = ConfigToml::on(&stack)
        .responder_rate(10000.0)
        .integration(integration())
        .write(&dir);
    let mut responder = StageProcess::spawn("swallow-responder", &path, &HashMap::new()).unwrap();
    responder.ready(T).await;
    let replies: Vec<_> = (0..2000)
        .map(|i| {
            reply(
                &format!("{i}.0"),
                &format!("C{}", i % 50),
                serde_json::json!({"text": "ok"}),
            )
        })
        .collect();
    let publish = publish_replies(&stack, &replies);
    let kill = async {
        out.until(200, T, "replies before the kill").await;
        responder.kill().await;
    };
    tokio::join!(publish, kill);
    let restarted = StageProcess::spawn("swallow-responder", &path, &HashMap::new()).unwrap();
    restarted.ready(T).await;
    // A reply posted twice has the same body, so distinct bodies count replies.
    let unique = |c: &Collector| -> usize { c.got.iter().map(|d| &d.data).collect::<BTreeSet<_>>().len() };
    out.until_with(Duration::from_secs(60), "every reply after the restart", |c| {
        unique(c) == 2000
    })
    .await;
    println!("responder sigkill: {} posted, {} unique", out.got.len(), unique(&out));
}
