//! The three real binaries end to end: event in, the exact POST out, the
//! reply in the channel; and the loop guard.

use std::time::Duration;

use swallow_tests::handler::{Answer, HandlerServer};
use swallow_tests::*;

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_example_start_to_finish() {
    let stack = TestStack::new("e2e-seed").await.unwrap();
    let handler = HandlerServer::start(|r, _| {
        let text = r
            .form()
            .into_iter()
            .find(|(k, _)| k == "text")
            .map(|(_, v)| v)
            .unwrap_or_default();
        if text.contains("swallow") {
            Answer::text("African or European?")
        } else {
            Answer::json(serde_json::json!({"text": "Ni!", "username": "Knight"}))
        }
    })
    .await;
    let dir = TempDir::new("e2e-seed");
    let path = ConfigToml::on(&stack)
        .loopback()
        .integration(
            Integration::new("googlebot")
                .channel("#test")
                .trigger_words(&["googlebot:"])
                .url(handler.url("/googlebot"))
                .token("XXXXXXXXXXXXXXXXXX")
                .set("bot_name", "Google Bot")
                .set("icon_emoji", ":bird:"),
        )
        .write(&dir);
    let mut out = listen_outbound(&stack).await.unwrap();
    let _pipeline = Pipeline::spawn(&path).await.unwrap();

    stack
        .publish_event(&chat_event(
            "googlebot: What is the air-speed velocity of an unladen swallow?",
            "1355517523.000005",
        ))
        .await
        .unwrap();
    let post = handler.until(1, T, "the POST").await.remove(0);
    assert_eq!(
        post.body_str(),
        "token=XXXXXXXXXXXXXXXXXX&team_id=T0001&team_domain=example&service_id=googlebot\
         &channel_id=C2147483705&channel_name=test&timestamp=1355517523.000005&user_id=U2147483697\
         &user_name=Steve&text=googlebot%3A+What+is+the+air-speed+velocity+of+an+unladen+swallow%3F\
         &trigger_word=googlebot%3A"
    );
    out.until(1, T, "the reply in the channel").await;
    let reply = &out.json()[0];
    assert_eq!(reply["text"], "African or European?");
    assert_eq!(reply["username"], "Google Bot");
    assert_eq!(reply["icon_emoji"], ":bird:");
    assert_eq!(reply["channel_id"], "C2147483705");
    assert_eq!(reply["in_reply_to"], "1355517523.000005");
    assert_eq!(reply["delivery_id"], post.header("webhook-id").unwrap());
    assert_eq!(out.got[0].routing_key.as_str(), "T0001.C2147483705");

    stack
        .publish_event(&chat_event("googlebot: your name?", "1355517524.000001"))
        .await
        .unwrap();
    out.until(2, T, "the second reply").await;
    assert_eq!(
        out.json()[1]["username"],
        "Knight",
        "the answer's username overrides bot_name"
    );
    assert_eq!(out.json()[1]["text"], "Ni!");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_never_triggers_an_integration() {
    let stack = TestStack::new("e2e-loop").await.unwrap();
    // A channel-only integration that answers every message it gets.
    let handler = HandlerServer::start(|_, _| Answer::text("I answer everything")).await;
    let dir = TempDir::new("e2e-loop");
    let path = ConfigToml::on(&stack)
        .loopback()
        .integration(
            Integration::new("parrot")
                .channel("C2147483705")
                .url(handler.url("/parrot"))
                .token("p"),
        )
        .write(&dir);
    let mut out = listen_outbound(&stack).await.unwrap();
    let pipeline = Pipeline::spawn(&path).await.unwrap();

    stack.publish_event(&chat_event("hello", "1.000001")).await.unwrap();
    out.until(1, T, "the reply").await;
    // The chat platform posts the reply into the channel, and so publishes it
    // as a chat event like any other message, bot marks included.
    let posted = &out.json()[0];
    let mut echoed = chat_event(posted["text"].as_str().unwrap(), "2.000001");
    echoed["bot_id"] = posted["bot_id"].clone();
    echoed["subtype"] = posted["subtype"].clone();
    echoed["user_name"] = posted["username"].clone();
    stack.publish_event(&echoed).await.unwrap();
    wait_for(T, "the matcher to ignore the bot's message", || async {
        let n = metric(
            pipeline.matcher.ops_addr,
            "swallow_events_ignored_total",
            &[("reason", "bot")],
        )
        .await
        .ok()?;
        (n == 1.0).then_some(())
    })
    .await;
    assert_eq!(
        metric(pipeline.matcher.ops_addr, "swallow_events_received_total", &[])
            .await
            .unwrap(),
        2.0
    );
    out.settle(Duration::from_millis(500)).await;
    assert_eq!(handler.count(), 1, "the handler saw the human message only");
    assert_eq!(out.got.len(), 1, "one reply, no loop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threads_and_multiple_urls_end_to_end() {
    let stack = TestStack::new("e2e-threads").await.unwrap();
    let a =
        HandlerServer::start(|_, _| Answer::json(serde_json::json!({"text": "from a", "response_type": "comment"})))
            .await;
    let b = HandlerServer::start(|_, _| Answer::text("from b")).await;
    let dir = TempDir::new("e2e-threads");
    let path = ConfigToml::on(&stack)
        .loopback()
        .integration(
            Integration::new("two")
                .trigger_words(&["two:"])
                .urls(&[&a.url("/a"), &b.url("/b")]),
        )
        .write(&dir);
    let mut out = listen_outbound(&stack).await.unwrap();
    let _pipeline = Pipeline::spawn(&path).await.unwrap();

    stack
        .publish_event(&chat_event("two: top level", "10.000001"))
        .await
        .unwrap();
    let mut in_thread = chat_event("two: in a thread", "11.000001");
    in_thread["thread_ts"] = "9.000001".into();
    stack.publish_event(&in_thread).await.unwrap();

    a.until(2, T, "POSTs to the first URL").await;
    let posts_b = b.until(2, T, "POSTs to the second URL").await;
    let threaded = posts_b
        .iter()
        .find(|r| r.form().iter().any(|(k, v)| k == "text" && v == "two: in a thread"))
        .expect("the threaded message reached b");
    assert!(
        threaded.form().contains(&("thread_ts".into(), "9.000001".into())),
        "the POST says the thread"
    );
    out.until(4, T, "four replies (two URLs × two messages)").await;
    out.settle(Duration::from_millis(300)).await;
    assert_eq!(out.got.len(), 4);
    let replies = out.json();
    let thread_of = |text: &str, in_reply_to: &str| -> serde_json::Value {
        replies
            .iter()
            .find(|r| r["text"] == text && r["in_reply_to"] == in_reply_to)
            .unwrap_or_else(|| panic!("no reply {text:?} to {in_reply_to}: {replies:?}"))["thread_ts"]
            .clone()
    };
    assert_eq!(
        thread_of("from a", "10.000001"),
        "10.000001",
        "comment: threaded under the trigger"
    );
    assert_eq!(
        thread_of("from b", "10.000001"),
        serde_json::Value::Null,
        "plain answer: in the channel"
    );
    assert_eq!(
        thread_of("from a", "11.000001"),
        "9.000001",
        "a message in a thread is answered there"
    );
    assert_eq!(thread_of("from b", "11.000001"), "9.000001");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_replay_and_reload_end_to_end() {
    let stack = TestStack::new("e2e-dead").await.unwrap();
    let healthy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = healthy.clone();
    let flaky = HandlerServer::start(move |_, _| {
        if flag.load(std::sync::atomic::Ordering::SeqCst) {
            Answer::text("better now")
        } else {
            Answer::status(500)
        }
    })
    .await;
    let late = HandlerServer::start(|_, _| Answer::status(200)).await;
    let dir = TempDir::new("e2e-dead");
    let base = ConfigToml::on(&stack)
        .top("reload_interval_ms", 200)
        .loopback()
        .responder_rate(10000.0)
        .integration(
            Integration::new("flaky")
                .channel("C2147483705")
                .url(flaky.url("/flaky"))
                .set("max_attempts", 1)
                .rate_limit(10000.0, 10000),
        );
    let path = base.write(&dir);
    let mut out = listen_outbound(&stack).await.unwrap();
    let pipeline = Pipeline::spawn(&path).await.unwrap();

    // Dead letters, then replay once the handler is healthy.
    for i in 0..3 {
        stack
            .publish_event(&chat_event("hello", &format!("{i}.000001")))
            .await
            .unwrap();
    }
    wait_for(T, "three dead letters", || async {
        (stack.queue_len(&stack.topology.deliveries_dead_queue()).await.ok()? == 3).then_some(())
    })
    .await;
    healthy.store(true, std::sync::atomic::Ordering::SeqCst);
    let said = run_command("swallow-deliverer", &path, &["replay"]);
    assert!(said.starts_with("moved 3 dead job(s)"), "{said}");
    out.until(3, T, "replies after the replay").await;
    assert!(out.json().iter().all(|r| r["text"] == "better now"));

    // Reload while traffic flows: an integration added to the file fires
    // for the messages after the reload; none of the first one's is lost.
    let publisher = async {
        for i in 0..200 {
            stack
                .publish_event(&chat_event("traffic", &format!("{}.000002", 100 + i)))
                .await
                .unwrap();
            if i == 50 {
                let added = Integration::new("late")
                    .channel("#test")
                    .url(late.url("/late"))
                    .token("l")
                    .rate_limit(10000.0, 10000);
                base.clone().integration(added).write(&dir);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    publisher.await;
    out.until(203, T, "a reply for every message").await;
    wait_for(T, "the added integration to fire", || async {
        (late.count() > 50).then_some(())
    })
    .await;
    for stage in [&pipeline.matcher, &pipeline.deliverer, &pipeline.responder] {
        let ok = metric(stage.ops_addr, "swallow_config_reloads_total", &[("result", "ok")])
            .await
            .unwrap();
        assert!(ok >= 1.0, "every stage reloaded the file");
    }
}
