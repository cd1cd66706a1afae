//! Slack's Events API through the matcher's ingress, end to end: the real
//! binaries, a real broker, the example handler, and a stand-in for Slack's
//! Web API (names, `chat.postMessage`).

use std::time::{Duration, Instant};

use swallow_matcher::ingress::slack::sign;
use swallow_tests::handler::{Answer, HandlerServer, Recorded};
use swallow_tests::slack_api::{Lookups, SlackApi};
use swallow_tests::*;

const T: Duration = Duration::from_secs(30);
const SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
const SEED: &str = "googlebot: What is the air-speed velocity of an unladen swallow?";

/// The example handler: googlebot's answers.
async fn googlebot() -> HandlerServer {
    HandlerServer::start(|r, _| {
        let text = field(r, "text");
        Answer::text(&googlebot::answer(&text))
    })
    .await
}

fn field(r: &Recorded, name: &str) -> String {
    r.field(name)
}

/// A test's pipeline with a Slack ingress.
struct Setup {
    /// Its prefix, deleted when the test ends.
    _stack: TestStack,
    api: SlackApi,
    handler: HandlerServer,
    ingress: std::net::SocketAddr,
    pipeline: Pipeline,
    _dir: TempDir,
}

impl Setup {
    /// `integration` is the `[[integrations]]` table's matching lines.
    async fn start(name: &str, broker: Option<String>, integration: &str) -> Setup {
        let secrets = ("signing_secret", Raw(format!("[\"an-old-secret\", \"{SECRET}\"]")));
        Self::start_in(TempDir::new(name), name, broker, integration, secrets).await
    }

    /// As [`Setup::start`], in `dir`, with `[ingress.slack]`'s signing
    /// secret field and its value.
    async fn start_in(
        dir: TempDir,
        name: &str,
        broker: Option<String>,
        integration: &str,
        secrets: (&str, Raw<String>),
    ) -> Setup {
        let stack = match broker {
            Some(url) => TestStack::on(name, url).await.unwrap(),
            None => TestStack::new(name).await.unwrap(),
        };
        let api = SlackApi::start().await;
        let handler = googlebot().await;
        let ingress = free_addr();
        let path = ConfigToml::on(&stack)
            .top("reload_interval_ms", 200)
            .set("broker", "heartbeat_s", 2)
            .loopback()
            .set("ingress", "listen", ingress.to_string())
            .set("ingress.slack", secrets.0, secrets.1)
            .set("ingress.slack", "bot_token", "xoxb-test")
            .set("ingress.slack", "api_base", api.api_base())
            .integration(
                Integration::new("googlebot")
                    .token("XXXXXXXXXXXXXXXXXX")
                    .raw(integration)
                    .url(handler.url("/googlebot"))
                    .set("bot_name", "Google Bot")
                    .set("icon_emoji", ":bird:"),
            )
            .write(&dir);
        let pipeline = Pipeline::spawn(&path).await.unwrap();
        Setup {
            _stack: stack,
            api,
            handler,
            ingress,
            pipeline,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.ingress)
    }

    /// POSTs `body` signed with `secret` at `ts` (Unix seconds).
    async fn post(&self, body: &[u8], secret: &str, ts: i64, retry: Option<u32>) -> reqwest::Response {
        let ts = ts.to_string();
        let mut request = reqwest::Client::new()
            .post(self.url("/slack/events"))
            .timeout(Duration::from_secs(10))
            .header("content-type", "application/json")
            .header("x-slack-request-timestamp", &ts)
            .header("x-slack-signature", sign(secret, &ts, body))
            .body(body.to_vec());
        if let Some(n) = retry {
            request = request
                .header("x-slack-retry-num", n.to_string())
                .header("x-slack-retry-reason", "http_timeout");
        }
        request.send().await.expect("the ingress answers")
    }

    /// As [`Setup::post`], the client's error given back.
    async fn try_post(&self, body: &[u8], secret: &str, ts: i64) -> reqwest::Result<reqwest::Response> {
        let ts = ts.to_string();
        reqwest::Client::new()
            .post(self.url("/slack/events"))
            .timeout(Duration::from_secs(10))
            .header("x-slack-request-timestamp", &ts)
            .header("x-slack-signature", sign(secret, &ts, body))
            .body(body.to_vec())
            .send()
            .await
    }

    /// The status the ingress answers to a request's head alone that
    /// announces `length` bytes of body, none of which is sent.
    async fn status_of_head_only(&self, length: usize) -> u16 {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut stream = tokio::net::TcpStream::connect(self.ingress).await.unwrap();
        let head = format!(
            "POST /slack/events HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ncontent-length: {length}\r\n\r\n",
            self.ingress
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut answer = vec![0; 64];
        let n = tokio::time::timeout(T, stream.read(&mut answer))
            .await
            .expect("an answer before the body is sent")
            .unwrap();
        let line = String::from_utf8_lossy(&answer[..n]).into_owned();
        line.split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("{line:?}"))
    }

    async fn ingress_metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric(self.pipeline.matcher.ops_addr, name, labels).await.unwrap()
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// An `event_callback` carrying one message.
fn message(event_id: &str, text: &str, ts: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "token": "unused", "team_id": "T0001", "api_app_id": "A0001", "type": "event_callback",
        "event_id": event_id, "event_time": 1_355_517_523,
        "event": {"type": "message", "channel": "C2147483705", "user": "U2147483697", "text": text,
                  "ts": ts, "event_ts": ts, "channel_type": "channel"}
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_example_through_slack_and_back() {
    let s = Setup::start(
        "slack-seed",
        None,
        "channel = \"#test\"\ntrigger_words = [\"googlebot:\"]\n",
    )
    .await;

    let challenge = br#"{"token":"x","challenge":"3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P","type":"url_verification"}"#;
    let r = s.post(challenge, SECRET, now(), None).await;
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        body["challenge"],
        "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"
    );

    let event = message("Ev0001", SEED, "1355517523.000005");
    let r = s.post(&event, SECRET, now(), None).await;
    assert_eq!(r.status(), 200, "answered once confirmed");
    let post = s.handler.until(1, T, "the POST").await.remove(0);
    assert_eq!(
        post.body_str(),
        "token=XXXXXXXXXXXXXXXXXX&team_id=T0001&team_domain=example&service_id=googlebot\
         &channel_id=C2147483705&channel_name=test&timestamp=1355517523.000005&user_id=U2147483697\
         &user_name=Steve&text=googlebot%3A+What+is+the+air-speed+velocity+of+an+unladen+swallow%3F\
         &trigger_word=googlebot%3A",
        "the seed's POST, the names resolved through the Web API"
    );
    let posted = s.api.until_posted(1, T, "the reply by chat.postMessage").await;
    let reply = &posted[0];
    assert_eq!(reply.authorization.as_deref(), Some("Bearer xoxb-test"));
    assert_eq!(reply.body["channel"], "C2147483705");
    assert_eq!(reply.body["text"], "African or European?");
    assert_eq!(reply.body["username"], "Google Bot");
    assert_eq!(reply.body["icon_emoji"], ":bird:");

    // Slack retries what it did not see answered: the same event again is
    // answered without publishing it again.
    let r = s.post(&event, SECRET, now(), Some(1)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        s.ingress_metric("swallow_ingress_events_total", &[("result", "duplicate")])
            .await,
        1.0
    );
    // A later message arrives after it; the first one was POSTed once.
    let r = s
        .post(
            &message("Ev0002", "googlebot: your quest?", "1355517524.000001"),
            SECRET,
            now(),
            None,
        )
        .await;
    assert_eq!(r.status(), 200);
    let posts = s.handler.until(2, T, "the second POST").await;
    assert_eq!(field(&posts[1], "text"), "googlebot: your quest?");
    let first_id = posts[0].header("webhook-id").unwrap().to_owned();
    assert_eq!(
        posts
            .iter()
            .filter(|p| p.header("webhook-id") == Some(first_id.as_str()))
            .count(),
        1
    );
    s.api.until_posted(2, T, "the second reply").await;
    assert_eq!(
        s.ingress_metric("swallow_ingress_events_total", &[("result", "published")])
            .await,
        2.0
    );
    assert_eq!(
        s.ingress_metric("swallow_ingress_requests_total", &[("result", "challenge")])
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_stale_and_oversized_requests_are_refused_and_nothing_is_published() {
    let s = Setup::start("slack-refusals", None, "trigger_words = [\"googlebot:\"]\n").await;
    let event = message("Ev0101", SEED, "1355517600.000001");
    let client = reqwest::Client::new();

    let unsigned = client
        .post(s.url("/slack/events"))
        .body(event.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(unsigned.status(), 401, "no signature");
    let mut tampered = event.clone();
    *tampered.last_mut().unwrap() = b' ';
    let ts = now().to_string();
    let forged = client
        .post(s.url("/slack/events"))
        .header("x-slack-request-timestamp", &ts)
        .header("x-slack-signature", sign(SECRET, &ts, &event))
        .body(tampered)
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 401, "a body that is not the one signed");
    // Well past the five minutes either way: the test's clock and the
    // ingress's read whole seconds apart, and a second may turn between.
    assert_eq!(s.post(&event, SECRET, now() - 330, None).await.status(), 401, "stale");
    assert_eq!(
        s.post(&event, SECRET, now() + 330, None).await.status(),
        401,
        "from the future"
    );
    assert_eq!(
        s.post(&event, "not-a-secret-we-know", now(), None).await.status(),
        401,
        "unknown secret"
    );
    // Over 1 MiB: refused on its Content-Length, before any of the body is
    // sent (so none of it is read); and one sent whole is refused too.
    assert_eq!(s.status_of_head_only((1 << 20) + 1).await, 413);
    let big = vec![b' '; (1 << 20) + 1];
    match s.try_post(&big, SECRET, now()).await {
        Ok(r) => assert_eq!(r.status(), 413),
        // Answered before the client finished writing: the ingress closed
        // the connection on the rest of the body, as it should.
        Err(e) => assert!(e.is_request() || e.is_body(), "{e}"),
    }
    let elsewhere = client.post(s.url("/slack/other")).body("{}").send().await.unwrap();
    assert_eq!(elsewhere.status(), 404);
    assert_eq!(
        s.ingress_metric("swallow_ingress_requests_total", &[("result", "unauthorized")])
            .await,
        5.0
    );

    // A genuine one after them is the only POST the handler sees.
    let genuine = message("Ev0102", "googlebot: your name?", "1355517600.000002");
    assert_eq!(s.post(&genuine, SECRET, now(), None).await.status(), 200);
    let posts = s.handler.until(1, T, "the genuine event's POST").await;
    s.api.until_posted(1, T, "its reply").await;
    assert_eq!(s.handler.count(), 1, "{posts:?}");
    assert_eq!(field(&posts[0], "text"), "googlebot: your name?");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_failing_and_rate_limited_lookups_still_answer_in_time() {
    let s = Setup::start("slack-lookups", None, "trigger_words = [\"googlebot:\"]\n").await;

    s.api.set_delay(Duration::from_secs(6));
    let started = Instant::now();
    let r = s
        .post(&message("Ev0201", SEED, "1355517700.000001"), SECRET, now(), None)
        .await;
    let took = started.elapsed();
    assert_eq!(r.status(), 200);
    assert!(
        took < Duration::from_secs(3),
        "answered in {took:?}, within Slack's 3 s"
    );
    let post = s.handler.until(1, T, "the POST without names").await.remove(0);
    assert_eq!(field(&post, "channel_name"), "");
    assert_eq!(field(&post, "user_name"), "");
    assert_eq!(field(&post, "team_domain"), "");
    assert!(
        s.ingress_metric("swallow_ingress_lookups_total", &[("result", "timeout")])
            .await
            >= 3.0
    );

    // Slack says 429: the event goes on without names, and no lookup is
    // made until its Retry-After has passed.
    s.api.set_delay(Duration::ZERO);
    s.api.set_lookups(Lookups::RateLimited);
    let r = s
        .post(&message("Ev0202", SEED, "1355517700.000002"), SECRET, now(), None)
        .await;
    assert_eq!(r.status(), 200);
    s.handler.until(2, T, "the second POST").await;
    let calls = s.api.lookup_calls();
    let r = s
        .post(&message("Ev0203", SEED, "1355517700.000003"), SECRET, now(), None)
        .await;
    assert_eq!(r.status(), 200);
    let posts = s.handler.until(3, T, "the third POST").await;
    assert_eq!(field(&posts[2], "user_name"), "");
    assert_eq!(s.api.lookup_calls(), calls, "no lookups while rate-limited");
    assert!(
        s.ingress_metric("swallow_ingress_lookups_total", &[("result", "rate_limited")])
            .await
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_away_is_a_503_and_the_retry_after_it_is_back_is_delivered() {
    let broker = OwnBroker::start().await.expect("a private RabbitMQ node");
    let s = Setup::start("slack-503", Some(broker.url()), "trigger_words = [\"googlebot:\"]\n").await;
    let event = message("Ev0301", SEED, "1355517800.000001");

    broker.stop().await.unwrap();
    let started = Instant::now();
    let r = s.post(&event, SECRET, now(), None).await;
    assert_eq!(r.status(), 503, "nothing acknowledged that could be lost");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    let ready = reqwest::get(format!("http://{}/readyz", s.pipeline.matcher.ops_addr))
        .await
        .unwrap();
    assert_eq!(ready.status(), 503, "the ingress is not ready without a broker");

    broker.boot().await.unwrap();
    s.pipeline.matcher.ready(Duration::from_secs(60)).await;
    let r = s.post(&event, SECRET, now(), Some(1)).await;
    assert_eq!(r.status(), 200, "the platform's retry");
    let post = s.handler.until(1, T, "the retried event's POST").await.remove(0);
    assert_eq!(field(&post, "text"), SEED);
    assert!(
        s.ingress_metric("swallow_ingress_events_total", &[("result", "unavailable")])
            .await
            >= 1.0
    );
    drop(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_signing_secret_file_is_read_again_without_a_restart() {
    let dir = TempDir::new("slack-rotation");
    let file = dir.join("slack-signing-secrets");
    std::fs::write(&file, "an-old-secret\n").unwrap();
    let s = Setup::start_in(
        dir,
        "slack-rotation",
        None,
        "trigger_words = [\"googlebot:\"]\n",
        ("signing_secret_file", Raw("\"slack-signing-secrets\"".into())),
    )
    .await;
    let event = |n: usize| message(&format!("Ev04{n:02}"), SEED, &format!("1355517900.{n:06}"));
    assert_eq!(
        s.post(&event(0), SECRET, now(), None).await.status(),
        401,
        "not yet a secret"
    );
    assert_eq!(s.post(&event(1), "an-old-secret", now(), None).await.status(), 200);
    // The app's secret rotated: the old and the new one, a line each.
    std::fs::write(&file, format!("an-old-secret\n{SECRET}\n")).unwrap();
    let mut n = 2;
    wait_for(T, "the new signing secret to be read", || {
        n += 1;
        let body = event(n);
        let s = &s;
        async move { (s.post(&body, SECRET, now(), None).await.status() == 200).then_some(()) }
    })
    .await;
    assert_eq!(
        s.post(&event(99), "an-old-secret", now(), None).await.status(),
        200,
        "the old one too"
    );
    s.handler.until(3, T, "the POSTs of the three events accepted").await;
}
