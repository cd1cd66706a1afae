//! The deliverer against the real broker and real handlers on loopback.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use swallow_shared::Config;
use swallow_tests::handler::{Answer, HandlerServer, Recorded, refused_addr, resetting_server};
use swallow_tests::*;
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(30);
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// An integration on `googlebot:` posting to `url`.
fn integration(id: &str, url: &str) -> Integration {
    Integration::new(id)
        .trigger_words(&["googlebot:"])
        .url(url)
        .token("XXXXXXXXXXXXXXXXXX")
}

/// The stack's broker and the deliverer on a free port.
fn base(stack: &TestStack) -> ConfigToml {
    ConfigToml::on(stack).set("deliverer", "http_addr", "127.0.0.1:0")
}

fn config(toml: ConfigToml) -> Config {
    let text = toml.to_string();
    Config::parse(&text, None).expect("test config")
}

/// A delivery job for the seed's message, as the matcher makes it.
fn job(integration: &str, url: &str, ts: &str) -> serde_json::Value {
    let mut event = chat_event("googlebot: What is the air-speed velocity of an unladen swallow?", ts);
    event.as_object_mut().unwrap().retain(|_, v| !v.is_null());
    serde_json::json!({
        "v": 1,
        "delivery_id": format!("msg_{integration}_{ts}"),
        "integration_id": integration,
        "url": url,
        "trigger_word": "googlebot:",
        "event": event,
        "created_at_ms": swallow_shared::wire::messages::now_millis(),
    })
}

async fn publish_jobs(stack: &TestStack, jobs: &[serde_json::Value]) {
    let mut confirms = Vec::new();
    for job in jobs {
        let body = serde_json::to_vec(job).unwrap();
        let queue = stack
            .topology
            .delivery_queue_for(job["integration_id"].as_str().unwrap());
        confirms.push(
            stack
                .channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    Default::default(),
                    &body,
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

struct Running {
    deliverer: swallow_deliverer::Deliverer,
    shutdown: CancellationToken,
}

impl Running {
    async fn start(config: Config) -> Running {
        let shutdown = CancellationToken::new();
        let deliverer = swallow_deliverer::start(config, shutdown.clone()).await.unwrap();
        Running { deliverer, shutdown }
    }
    async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric(self.deliverer.ops_addr, name, labels).await.unwrap()
    }
    async fn stop(self) {
        self.shutdown.cancel();
        self.deliverer.join().await;
    }
}

fn gaps(requests: &[Recorded]) -> Vec<f64> {
    requests.windows(2).map(|w| (w[1].at - w[0].at).as_secs_f64()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_post_exactly_and_its_reply() {
    let stack = TestStack::new("dlv-seed").await.unwrap();
    let handler = HandlerServer::start(|_, _| {
        Answer::json(serde_json::json!({"text": "African or European?", "username": "Tim", "response_type": "comment"}))
    })
    .await;
    let url = handler.url("/hook");
    let d = Running::start(config(
        base(&stack)
            .loopback()
            .integration(integration("googlebot", &url).set("signing_secret", SECRET)),
    ))
    .await;
    let mut replies = stack.drain(&stack.topology.replies_queue()).await.unwrap();
    publish_jobs(&stack, &[job("googlebot", &url, "1355517523.000005")]).await;

    let req = handler.until(1, T, "the POST").await.remove(0);
    assert_eq!(req.method, "POST");
    assert_eq!(req.path, "/hook");
    assert_eq!(req.header("content-type"), Some("application/x-www-form-urlencoded"));
    assert_eq!(
        req.header("user-agent"),
        Some(concat!("swallow/", env!("CARGO_PKG_VERSION")))
    );
    assert_eq!(
        req.body_str(),
        "token=XXXXXXXXXXXXXXXXXX&team_id=T0001&team_domain=example&service_id=googlebot\
         &channel_id=C2147483705&channel_name=test&timestamp=1355517523.000005&user_id=U2147483697\
         &user_name=Steve&text=googlebot%3A+What+is+the+air-speed+velocity+of+an+unladen+swallow%3F\
         &trigger_word=googlebot%3A"
    );
    let id = req.header("webhook-id").unwrap();
    assert_eq!(id, "msg_googlebot_1355517523.000005");
    let ts = req.header("webhook-timestamp").unwrap();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        now.abs_diff(ts.parse::<u64>().unwrap()) < 30,
        "webhook-timestamp {ts} is now"
    );
    // Verify the signature independently.
    let key = base64::engine::general_purpose::STANDARD
        .decode(SECRET.trim_start_matches("whsec_"))
        .unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(&req.body);
    let want = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    );
    assert_eq!(req.header("webhook-signature"), Some(want.as_str()));

    replies.until(1, T, "the reply").await;
    let reply = &replies.json()[0];
    assert_eq!(reply["answer"]["text"], "African or European?");
    assert_eq!(reply["answer"]["username"], "Tim");
    assert_eq!(reply["answer"]["response_type"], "comment");
    assert_eq!(reply["delivery_id"], id);
    assert_eq!(reply["in_reply_to"], "1355517523.000005");
    assert_eq!(reply["channel_id"], "C2147483705");
    assert_eq!(
        d.metric("swallow_deliveries_total", &[("outcome", "delivered")]).await,
        1.0
    );
    assert_eq!(
        d.metric("swallow_delivery_attempts_total", &[("class", "2xx")]).await,
        1.0
    );
    assert_eq!(d.metric("swallow_replies_queued_total", &[]).await, 1.0);
    assert_eq!(d.metric("swallow_delivery_duration_seconds_count", &[]).await, 1.0);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_content_type_and_threads() {
    let stack = TestStack::new("dlv-json").await.unwrap();
    let handler = HandlerServer::start(|_, _| Answer::status(200)).await;
    let url = handler.url("/j");
    let d = Running::start(config(
        base(&stack)
            .loopback()
            .integration(integration("j", &url).set("content_type", "json")),
    ))
    .await;
    let mut j = job("j", &url, "7.0");
    j["event"]["thread_ts"] = "6.0".into();
    publish_jobs(&stack, &[j]).await;
    let req = handler.until(1, T, "the POST").await.remove(0);
    assert_eq!(req.header("content-type"), Some("application/json"));
    let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
    assert_eq!(body["thread_ts"], "6.0");
    assert_eq!(body["token"], "XXXXXXXXXXXXXXXXXX");
    assert!(req.header("webhook-signature").is_none(), "no secret, no signature");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_until_delivered_with_the_same_webhook_id() {
    let stack = TestStack::new("dlv-retry").await.unwrap();
    let handler = HandlerServer::start(|_, n| {
        if n < 2 {
            Answer::status(500)
        } else {
            Answer::status(200)
        }
    })
    .await;
    let url = handler.url("/r");
    let d = Running::start(config(base(&stack).loopback().integration(integration("r", &url)))).await;
    publish_jobs(&stack, &[job("r", &url, "1.0")]).await;
    let reqs = handler.until(3, T, "three attempts").await;
    let ids: BTreeSet<_> = reqs
        .iter()
        .map(|r| r.header("webhook-id").unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 1, "one webhook-id across retries");
    let g = gaps(&reqs);
    // Full jitter under ceilings of 1 s then 2 s, plus however late the
    // broker hands the parked job back (the schedule's own distribution is
    // unit-tested in swallow_shared::job::retry).
    let late = LADDER_LATENESS.as_secs_f64();
    assert!(
        g[0] <= 1.0 + late && g[1] <= 2.0 + late,
        "gaps {g:?} within the schedule's ceilings (1 s, 2 s) and {late} s of broker lateness"
    );
    wait_for(T, "the delivery to be counted", || async {
        (d.metric("swallow_deliveries_total", &[("outcome", "delivered")]).await == 1.0).then_some(())
    })
    .await;
    assert_eq!(
        d.metric("swallow_deliveries_total", &[("outcome", "retried")]).await,
        2.0
    );
    assert_eq!(
        d.metric("swallow_delivery_attempts_total", &[("class", "5xx")]).await,
        2.0
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_dead_lettered_saying_why() {
    let stack = TestStack::new("dlv-dead").await.unwrap();
    let always_500 = HandlerServer::start(|_, _| Answer::status(500)).await;
    let slow = HandlerServer::start(|_, _| Answer::status(200).after(Duration::from_secs(2))).await;
    let gone = HandlerServer::start(|_, _| Answer::status(410)).await;
    let redirect = HandlerServer::start(|r, _| {
        if r.path == "/elsewhere" {
            Answer::status(200)
        } else {
            Answer::status(302).header("location", "/elsewhere")
        }
    })
    .await;
    let (reset_addr, resets, _reset_task) = resetting_server().await;
    let refused = refused_addr();
    let toml = base(&stack)
        .loopback()
        .integration(integration("always500", &always_500.url("/")).set("max_attempts", 3))
        .integration(
            integration("slow", &slow.url("/"))
                .set("max_attempts", 2)
                .set("timeout_ms", 300),
        )
        .integration(integration("gone", &gone.url("/")))
        .integration(integration("redirect", &redirect.url("/")).set("max_attempts", 1))
        .integration(integration("reset", &format!("http://{reset_addr}/")).set("max_attempts", 2))
        .integration(integration("refused", &format!("http://{refused}/")).set("max_attempts", 2));
    let d = Running::start(config(toml)).await;
    let mut dead = stack.drain(&stack.topology.deliveries_dead_queue()).await.unwrap();
    publish_jobs(
        &stack,
        &[
            job("always500", &always_500.url("/"), "1"),
            job("slow", &slow.url("/"), "2"),
            job("gone", &gone.url("/"), "3"),
            job("redirect", &redirect.url("/"), "4"),
            job("reset", &format!("http://{reset_addr}/"), "5"),
            job("refused", &format!("http://{refused}/"), "6"),
        ],
    )
    .await;
    dead.until(6, Duration::from_secs(60), "dead letters").await;
    let by_integration: HashMap<String, &lapin::message::Delivery> = dead
        .got
        .iter()
        .map(|d| (header(d, "x-swallow-integration").unwrap(), d))
        .collect();
    let h = |id: &str, name: &str| header(by_integration[id], name).unwrap_or_default();
    assert_eq!(h("always500", "x-swallow-reason"), "max_attempts");
    assert_eq!(h("always500", "x-swallow-status"), "500");
    assert_eq!(h("always500", "x-swallow-attempts"), "3");
    assert_eq!(always_500.count(), 3);
    assert_eq!(h("slow", "x-swallow-reason"), "max_attempts");
    assert!(
        h("slow", "x-swallow-error").contains("timeout"),
        "{}",
        h("slow", "x-swallow-error")
    );
    assert_eq!(h("gone", "x-swallow-reason"), "gone");
    assert_eq!(h("gone", "x-swallow-attempts"), "1");
    assert_eq!(gone.count(), 1, "410: no retry");
    assert_eq!(h("redirect", "x-swallow-status"), "302");
    assert!(
        redirect.requests().iter().all(|r| r.path != "/elsewhere"),
        "redirect not followed"
    );
    assert_eq!(h("reset", "x-swallow-reason"), "max_attempts");
    assert_eq!(h("reset", "x-swallow-attempts"), "2");
    assert!(*resets.lock().unwrap() >= 2, "the resetting server saw both attempts");
    assert_eq!(h("refused", "x-swallow-reason"), "max_attempts");
    let refused_error = h("refused", "x-swallow-error");
    assert!(
        refused_error.contains("connect: ") && refused_error.contains("refused"),
        "{refused_error}"
    );
    let body: serde_json::Value = serde_json::from_slice(&by_integration["always500"].data).unwrap();
    assert_eq!(body["delivery_id"], "msg_always500_1", "the dead letter is the job");
    assert_eq!(d.metric("swallow_deliveries_total", &[("outcome", "dead")]).await, 6.0);
    assert_eq!(
        d.metric("swallow_deliveries_dead_total", &[("reason", "gone")]).await,
        1.0
    );
    assert!(
        d.metric("swallow_delivery_attempts_total", &[("class", "timeout")])
            .await
            >= 2.0
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured_and_odd_answers_post_nothing() {
    let stack = TestStack::new("dlv-answers").await.unwrap();
    let limited = HandlerServer::start(|_, n| {
        if n == 0 {
            Answer::status(429).header("retry-after", "2")
        } else {
            Answer::status(200)
        }
    })
    .await;
    let huge = HandlerServer::start(|_, _| {
        let mut text = String::from("{\"text\":\"");
        text.push_str(&"a".repeat(1024 * 1024 + 10));
        text.push_str("\"}");
        Answer::status(200)
            .body(text)
            .header("content-type", "application/json")
    })
    .await;
    let not_json = HandlerServer::start(|_, _| Answer::status(200).body("thanks!")).await;
    let empty_text = HandlerServer::start(|_, _| Answer::json(serde_json::json!({"text": ""}))).await;
    let toml = base(&stack)
        .loopback()
        .integration(integration("limited", &limited.url("/")))
        .integration(integration("huge", &huge.url("/")))
        .integration(integration("notjson", &not_json.url("/")))
        .integration(integration("emptytext", &empty_text.url("/")));
    let d = Running::start(config(toml)).await;
    let mut replies = stack.drain(&stack.topology.replies_queue()).await.unwrap();
    publish_jobs(
        &stack,
        &[
            job("limited", &limited.url("/"), "1"),
            job("huge", &huge.url("/"), "2"),
            job("notjson", &not_json.url("/"), "3"),
            job("emptytext", &empty_text.url("/"), "4"),
        ],
    )
    .await;
    let reqs = limited.until(2, T, "the attempt after Retry-After").await;
    let gap = gaps(&reqs)[0];
    assert!(gap >= 2.0, "the retry came {gap:.3} s after a 429 with Retry-After: 2");
    wait_for(T, "four deliveries", || async {
        (d.metric("swallow_deliveries_total", &[("outcome", "delivered")]).await == 4.0).then_some(())
    })
    .await;
    replies.settle(Duration::from_millis(500)).await;
    assert!(
        replies.got.is_empty(),
        "no reply for huge, non-JSON or empty-text answers"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_delays_a_burst_and_drop_drops() {
    let stack = TestStack::new("dlv-rate").await.unwrap();
    let paced = HandlerServer::start(|_, _| Answer::status(200)).await;
    let dropping = HandlerServer::start(|_, _| Answer::status(200)).await;
    let toml = base(&stack)
        .loopback()
        .integration(integration("paced", &paced.url("/")).rate_limit(1.0, 5))
        .integration(integration("dropping", &dropping.url("/")).set(
            "rate_limit",
            Raw(r#"{ per_second = 0.1, burst = 5, on_limit = "drop" }"#),
        ));
    let d = Running::start(config(toml)).await;
    let jobs: Vec<_> = (0..20)
        .map(|i| job("paced", &paced.url("/"), &format!("{i}")))
        .collect();
    let drops: Vec<_> = (0..20)
        .map(|i| job("dropping", &dropping.url("/"), &format!("{i}")))
        .collect();
    publish_jobs(&stack, &[jobs, drops].concat()).await;
    let reqs = paced.until(20, Duration::from_secs(40), "paced deliveries").await;
    let at: Vec<Instant> = reqs.iter().map(|r| r.at).collect();
    assert_paced(&at, 1.0, 5, "paced deliveries");
    assert_eq!(dropping.count(), 5, "burst of 5, the rest dropped");
    assert_eq!(
        d.metric("swallow_deliveries_total", &[("outcome", "dropped")]).await,
        15.0
    );
    assert_eq!(
        d.metric("swallow_deliveries_total", &[("outcome", "rate_limited")])
            .await,
        15.0
    );
    d.stop().await;
}

/// Jobs holding rate-limit slots come back while no deliverer is running and
/// wait in their queue; the next deliverer spreads them at the limit again
/// instead of POSTing the whole backlog at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_missed_while_no_deliverer_ran_are_spread_again() {
    let stack = TestStack::new("dlv-missed").await.unwrap();
    let paced = HandlerServer::start(|_, _| Answer::status(200)).await;
    let cfg = || {
        config(
            base(&stack)
                .loopback()
                .integration(integration("paced", &paced.url("/")).rate_limit(1.0, 2)),
        )
    };
    let first = Running::start(cfg()).await;
    let jobs: Vec<_> = (0..10)
        .map(|i| job("paced", &paced.url("/"), &format!("{i}")))
        .collect();
    publish_jobs(&stack, &jobs).await;
    // Two go at once; eight reserve slots 1 s apart, up to 8 s away.
    wait_for(T, "eight jobs to reserve slots", || async {
        let n = first
            .metric("swallow_deliveries_total", &[("outcome", "rate_limited")])
            .await;
        (n == 8.0).then_some(())
    })
    .await;
    first.stop().await;
    // Every job is POSTed (one whose slot came before the deliverer had
    // stopped) or back in its queue, waiting.
    let queue = stack.topology.delivery_queue_for("paced");
    let before = wait_for(T, "the reserved jobs to come back to their queue", || async {
        let queued = stack.queue_len(&queue).await.ok()? as usize;
        (paced.count() + queued == 10).then_some(paced.count())
    })
    .await;
    // Let the last slot pass by more than its grace (1 s) for certain.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let second = Running::start(cfg()).await;
    let reqs = paced.until(10, T, "all ten POSTs").await;
    let backlog: Vec<Instant> = reqs[before..].iter().map(|r| r.at).collect();
    // At the restart the fresh bucket's burst goes at once, and beside it
    // the job whose reserved slot is still within its grace and the one
    // whose slot falls due next, when the restart lands just before it:
    // two more than the burst, never the whole backlog.
    assert_within_limit(&backlog, 1.0, 2, 2.0, "the backlog after the restart");
    // The fresh bucket's burst (and what it refills meanwhile) goes at once;
    // the rest take new slots.
    let missed = second
        .metric("swallow_jobs_deferred_total", &[("reason", "missed_slot")])
        .await;
    assert!((1.0..=6.0).contains(&missed), "{missed} late jobs took new slots");
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_integration_does_not_delay_another() {
    let stack = TestStack::new("dlv-isolation").await.unwrap();
    let slow = HandlerServer::start(|_, _| Answer::status(200).after(Duration::from_secs(4))).await;
    let fast = HandlerServer::start(|_, _| Answer::status(200)).await;
    let toml = base(&stack)
        .loopback()
        .integration(
            integration("slow", &slow.url("/"))
                .rate_limit(1000.0, 1000)
                .set("timeout_ms", 10000),
        )
        .integration(integration("fast", &fast.url("/")).rate_limit(1000.0, 1000));
    let d = Running::start(config(toml)).await;
    let slow_jobs: Vec<_> = (0..200).map(|i| job("slow", &slow.url("/"), &format!("{i}"))).collect();
    publish_jobs(&stack, &slow_jobs).await;
    slow.until(10, T, "the slow handler to be busy").await;
    let fast_jobs: Vec<_> = (0..100).map(|i| job("fast", &fast.url("/"), &format!("{i}"))).collect();
    let started = Instant::now();
    publish_jobs(&stack, &fast_jobs).await;
    fast.until(100, T, "the fast integration's deliveries").await;
    let took = started.elapsed();
    let slow_done = d.metric("swallow_deliveries_total", &[("outcome", "delivered")]).await as i64 - 100;
    println!("fast: 100 delivered in {took:?} while slow had {slow_done} of 200 done");
    assert!(slow_done < 200, "slow was still backlogged ({slow_done} of 200 done)");
    assert!(took < Duration::from_secs(10), "fast took {took:?}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_and_loopback_destinations_are_refused_unless_allowed() {
    let stack = TestStack::new("dlv-ssrf").await.unwrap();
    let handler = HandlerServer::start(|_, _| Answer::status(200)).await;
    let port = handler.addr.port();
    let urls = [
        format!("http://127.0.0.1:{port}/"),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        "http://10.0.0.1/".to_owned(),
        format!("http://[::1]:{port}/"),
        format!("http://[::ffff:127.0.0.1]:{port}/"),
        format!("http://localhost:{port}/"),
    ];
    let with_integrations = |toml: ConfigToml| {
        urls.iter()
            .enumerate()
            .fold(toml, |toml, (i, u)| toml.integration(integration(&format!("i{i}"), u)))
    };
    let d = Running::start(config(with_integrations(base(&stack)))).await;
    let mut dead = stack.drain(&stack.topology.deliveries_dead_queue()).await.unwrap();
    let jobs: Vec<_> = urls
        .iter()
        .enumerate()
        .map(|(i, u)| job(&format!("i{i}"), u, "1"))
        .collect();
    publish_jobs(&stack, &jobs).await;
    dead.until(urls.len(), T, "refused destinations").await;
    for d in &dead.got {
        assert_eq!(header(d, "x-swallow-reason").as_deref(), Some("blocked_destination"));
        assert_eq!(header(d, "x-swallow-attempts").as_deref(), Some("1"));
    }
    assert_eq!(handler.count(), 0, "nothing reached the handler");
    d.stop().await;

    // Allowed explicitly, loopback is delivered.
    let d = Running::start(config(with_integrations(base(&stack).set(
        "deliverer",
        "allow_networks",
        ["127.0.0.0/8", "::1/128"],
    ))))
    .await;
    publish_jobs(&stack, &[job("i0", &urls[0], "2"), job("i5", &urls[5], "2")]).await;
    handler.until(2, T, "allowed deliveries").await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_retry_survives_sigkill_and_replay_brings_dead_jobs_back() {
    let stack = TestStack::new("dlv-durable").await.unwrap();
    let healthy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = healthy.clone();
    let handler = HandlerServer::start(move |r, _| {
        if flag.load(std::sync::atomic::Ordering::SeqCst) {
            Answer::status(200)
        } else if r.path == "/retry" {
            // Come back no sooner than 3 s: the deliverer is killed meanwhile.
            Answer::status(503).header("retry-after", "3")
        } else {
            Answer::status(500)
        }
    })
    .await;
    let dir = TempDir::new("deliverer");
    let path = ConfigToml::on(&stack)
        .loopback()
        .integration(integration("retry", &handler.url("/retry")))
        .integration(integration("dead", &handler.url("/dead")).set("max_attempts", 1))
        .write(&dir);
    let mut deliverer = StageProcess::spawn("swallow-deliverer", &path, &HashMap::new()).unwrap();
    deliverer.ready(T).await;
    let mut dead_jobs: Vec<_> = (0..5)
        .map(|i| job("dead", &handler.url("/dead"), &format!("{i}")))
        .collect();
    dead_jobs.push(job("retry", &handler.url("/retry"), "r"));
    publish_jobs(&stack, &dead_jobs).await;
    handler.until(6, T, "first attempts").await;
    // Wait until the retry job is parked on the ladder and the others are
    // dead, then kill the deliverer.
    wait_for(T, "the retry to be parked", || async {
        (metric(
            deliverer.ops_addr,
            "swallow_deliveries_total",
            &[("outcome", "retried")],
        )
        .await
        .ok()?
            == 1.0)
            .then_some(())
    })
    .await;
    wait_for(T, "five dead letters", || async {
        (stack.queue_len(&stack.topology.deliveries_dead_queue()).await.ok()? == 5).then_some(())
    })
    .await;
    deliverer.kill().await;
    healthy.store(true, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await; // the parked retry falls due while nobody runs
    assert_eq!(handler.requests().iter().filter(|r| r.path == "/retry").count(), 1);
    let restarted = StageProcess::spawn("swallow-deliverer", &path, &HashMap::new()).unwrap();
    restarted.ready(T).await;
    let reqs = handler.until(7, T, "the retry after the restart").await;
    let retry: Vec<_> = reqs.iter().filter(|r| r.path == "/retry").collect();
    assert_eq!(retry.len(), 2);
    assert_eq!(retry[0].header("webhook-id"), retry[1].header("webhook-id"));

    // Replay: two of the five dead jobs first, then the rest.
    let replay = |args: &[&str]| run_command("swallow-deliverer", &path, &[&["replay"], args].concat());
    let out = replay(&["--integration", "dead", "--limit", "2"]);
    assert!(out.starts_with("moved 2 dead job(s)"), "{out}");
    handler.until(9, T, "two replayed deliveries").await;
    let out = replay(&["--integration", "nobody"]);
    assert!(
        out.starts_with("moved 0 dead job(s)") && out.contains("left 3"),
        "{out}"
    );
    let out = replay(&[]);
    assert!(out.starts_with("moved 3 dead job(s)"), "{out}");
    let reqs = handler.until(12, T, "all replayed deliveries").await;
    let dead_ok: BTreeSet<_> = reqs[6..]
        .iter()
        .filter(|r| r.path == "/dead")
        .map(|r| r.header("webhook-id").unwrap().to_owned())
        .collect();
    assert_eq!(dead_ok.len(), 5, "each dead job delivered once after replay");
    assert_eq!(
        stack.queue_len(&stack.topology.deliveries_dead_queue()).await.unwrap(),
        0
    );
}

/// A handler that speaks HTTP/2 over TLS gets the deliverer's requests in
/// HTTP/2, many at once over one connection: the client learns what the
/// connection speaks (ALPN) through its connector's boxed stream, and the
/// stream carries the whole exchange.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_handler_gets_its_requests_over_one_connection() {
    use std::sync::atomic::Ordering;
    const AT_ONCE: usize = 50;
    let (server, versions, client) = recording_tls_handler(hyper::Version::HTTP_2, "dlv-h2").await;
    let post = |i: usize| client.request(hook_post(server.addr, i));
    // The first request opens the connection; the rest share it at once.
    let first = tokio::time::timeout(T, post(0))
        .await
        .expect("the first request is answered within 30 s")
        .expect("the first request is answered");
    assert_eq!(first.version(), hyper::Version::HTTP_2, "ALPN chose HTTP/2");
    let rest = tokio::time::timeout(T, futures_util::future::join_all((1..=AT_ONCE).map(post)))
        .await
        .expect("the requests are answered within 30 s");
    for answer in rest {
        let answer = answer.expect("each request is answered");
        assert_eq!(answer.status(), 200);
        assert_eq!(answer.version(), hyper::Version::HTTP_2);
    }
    let versions = versions.lock().unwrap().clone();
    assert_eq!(versions.len(), AT_ONCE + 1, "the handler saw every request");
    assert!(versions.iter().all(|v| *v == hyper::Version::HTTP_2), "{versions:?}");
    assert_eq!(
        server.connections.load(Ordering::SeqCst),
        1,
        "every request went over the first one's connection"
    );
    assert_eq!(
        client.http2_connections(),
        1,
        "the connection is the client's own, not hyper-util's pool's"
    );
}

/// The deliverer's HTTP client, trusting the test CA whose certificate is
/// at `ca_file`, allowed to reach loopback.
fn client_trusting(ca_file: &std::path::Path) -> swallow_deliverer::HttpClient {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(ca_file).unwrap()).unwrap();
    let tls =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let allow_loopback = swallow_deliverer::destination::AddressPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]);
    swallow_deliverer::http_client_with(&allow_loopback, 4, tls)
}

/// A handler over TLS speaking `version` only, which records the version
/// each request came in, and the deliverer's client trusting its CA.
async fn recording_tls_handler(
    version: hyper::Version,
    name: &str,
) -> (
    swallow_tests::tls::TlsServer,
    std::sync::Arc<std::sync::Mutex<Vec<hyper::Version>>>,
    swallow_deliverer::HttpClient,
) {
    let versions = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = versions.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |request: axum::extract::Request| async move {
            seen.lock().unwrap().push(request.version());
            "{\"text\":\"ok\"}"
        }),
    );
    let dir = TempDir::new(name);
    let server = swallow_tests::tls::serve_tls(hyper_util::service::TowerToHyperService::new(app), &dir, version)
        .await
        .unwrap();
    let client = client_trusting(&server.ca_file);
    (server, versions, client)
}

fn hook_post(addr: std::net::SocketAddr, i: usize) -> hyper::Request<http_body_util::Full<bytes::Bytes>> {
    hyper::Request::post(format!("https://{addr}/hook"))
        .body(http_body_util::Full::new(bytes::Bytes::from(format!("text={i}"))))
        .unwrap()
}

/// A TLS handler that speaks only HTTP/1.1 gets every request in HTTP/1.1:
/// asked on the first request, its answer (ALPN) sends the origin's
/// requests to the pooled client, which reuses its connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_tls_handler_gets_http1_and_pooled_connections() {
    use std::sync::atomic::Ordering;
    let (server, versions, client) = recording_tls_handler(hyper::Version::HTTP_11, "dlv-h1tls").await;
    for i in 0..20 {
        let answer = tokio::time::timeout(T, client.request(hook_post(server.addr, i)))
            .await
            .expect("each request is answered within 30 s")
            .expect("each request is answered");
        assert_eq!(answer.status(), 200);
        assert_eq!(answer.version(), hyper::Version::HTTP_11);
        // The answer is read, so that its connection goes back to the pool.
        http_body_util::BodyExt::collect(answer.into_body()).await.unwrap();
    }
    let versions = versions.lock().unwrap().clone();
    assert_eq!(versions.len(), 20, "the handler saw every request");
    assert!(versions.iter().all(|v| *v == hyper::Version::HTTP_11), "{versions:?}");
    // The first request's question (one connection, closed unused), then
    // the pool's connections, reused by the requests one after another (a
    // connection goes back to the pool from a task of its own, so a request
    // may now and then find none idle and open one). Asked again each time,
    // or not pooled, every request would open one or two.
    let opened = server.connections.load(Ordering::SeqCst);
    assert!(opened <= 10, "{opened} connections for 20 requests one after another");
    assert_eq!(client.http2_connections(), 0);
}

/// When an HTTP/2 handler drops its connection (a restart), the next
/// requests go over a new one: the closed connection is not kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_handlers_dropped_connection_is_replaced() {
    use std::sync::atomic::Ordering;
    let (server, versions, client) = recording_tls_handler(hyper::Version::HTTP_2, "dlv-h2drop").await;
    let answer = tokio::time::timeout(T, client.request(hook_post(server.addr, 0)))
        .await
        .expect("the first request is answered within 30 s")
        .expect("the first request is answered");
    assert_eq!(answer.version(), hyper::Version::HTTP_2);
    assert_eq!(server.connections.load(Ordering::SeqCst), 1);
    server.close_connections();
    // A request sent while the client has not yet seen the connection
    // close may fail with it (as with any client); within a few seconds
    // requests succeed again, over a new connection.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let sent = tokio::time::timeout(T, client.request(hook_post(server.addr, 1)))
            .await
            .expect("a request is answered or fails within 30 s");
        if sent.is_ok() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no request succeeded within 10 s of the handler dropping its connection: {sent:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    for i in 2..22 {
        let answer = tokio::time::timeout(T, client.request(hook_post(server.addr, i)))
            .await
            .expect("each request is answered within 30 s")
            .expect("each request after the new connection is answered");
        assert_eq!(answer.version(), hyper::Version::HTTP_2);
    }
    let opened = server.connections.load(Ordering::SeqCst);
    assert!(
        (2..=3).contains(&opened),
        "{opened} connections: the first, then one new one (and perhaps the pooled client's, for a request that raced the close)"
    );
    assert!(versions.lock().unwrap().len() >= 21);
    assert_eq!(client.http2_connections(), 1, "the new connection is the client's own");
}
