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
    let dir = tempdir("e2e-seed");
    let path = write_config(
        &dir,
        &format!(
            "{}[deliverer]\nallow_networks = [\"127.0.0.0/8\"]\n\n[[integrations]]\nid = \"googlebot\"\nteam_id = \"T0001\"\nchannel = \"#test\"\ntrigger_words = [\"googlebot:\"]\nurls = [\"{}\"]\ntoken = \"XXXXXXXXXXXXXXXXXX\"\nbot_name = \"Google Bot\"\nicon_emoji = \":bird:\"\n",
            stack.broker_toml(),
            handler.url("/googlebot")
        ),
    );
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
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_never_triggers_an_integration() {
    let stack = TestStack::new("e2e-loop").await.unwrap();
    // A channel-only integration that answers every message it gets.
    let handler = HandlerServer::start(|_, _| Answer::text("I answer everything")).await;
    let dir = tempdir("e2e-loop");
    let path = write_config(
        &dir,
        &format!(
            "{}[deliverer]\nallow_networks = [\"127.0.0.0/8\"]\n\n[[integrations]]\nid = \"parrot\"\nteam_id = \"T0001\"\nchannel = \"C2147483705\"\nurls = [\"{}\"]\ntoken = \"p\"\n",
            stack.broker_toml(),
            handler.url("/parrot")
        ),
    );
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
    let _ = std::fs::remove_dir_all(dir);
}
