//! A Matrix homeserver as a chat platform, end to end: a real Synapse with
//! swallow registered as its application service (the file
//! `swallow-matcher matrix-registration` prints), the real binaries, a real
//! broker and the example handler. Skipped, saying so, without Synapse
//! (see `swallow_tests::synapse`); a failure under `CI=true`.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use swallow_tests::handler::{Answer, HandlerServer, Recorded};
use swallow_tests::synapse::{MatrixUser, SERVER_NAME, Synapse, enc, venv_or_skip};
use swallow_tests::*;

const T: Duration = Duration::from_secs(30);
const SEED: &str = "googlebot: What is the air-speed velocity of an unladen swallow?";
const AS_TOKEN: &str = "swallow-test-as-token";
const HS_TOKEN: &str = "swallow-test-hs-token";
const BOT: &str = "@swallow:localhost";
const GOOGLE_BOT: &str = "@swallow_google_bot:localhost";

fn field(r: &Recorded, name: &str) -> String {
    r.field(name)
}

/// A test's pipeline with a Matrix ingress, a homeserver, a user and a
/// public room (`#<name>:localhost`, named "test") the bot was invited to.
struct Setup {
    _stack: TestStack,
    handler: HandlerServer,
    ingress: std::net::SocketAddr,
    matcher: StageProcess,
    _deliverer: StageProcess,
    responder: StageProcess,
    /// The stages' configuration, and the responder's.
    path: std::path::PathBuf,
    responder_path: std::path::PathBuf,
    synapse: Synapse,
    steve: MatrixUser,
    room: String,
    _dir: TempDir,
}

impl Setup {
    async fn start(name: &str) -> Option<Setup> {
        Self::start_with(name, |base| base.to_owned()).await
    }

    /// As [`Setup::start`], the responder reaching the homeserver at
    /// `responder_base(<its URL>)` (a proxy of the test's).
    async fn start_with(name: &str, responder_base: impl Fn(&str) -> String) -> Option<Setup> {
        let venv = venv_or_skip()?;
        let dir = TempDir::new(name);
        let stack = TestStack::new(name).await.unwrap();
        let handler = HandlerServer::start(|r, _| Answer::text(&googlebot::answer(&field(r, "text")))).await;
        let ingress = free_addr();
        let homeserver = free_addr();
        // The homeserver's port is its own choice: the configuration names
        // a placeholder until Synapse runs, then the real one.
        let config = |homeserver_url: &str| {
            ConfigToml::on(&stack)
                .top("reload_interval_ms", 200)
                .set("broker", "heartbeat_s", 2)
                .loopback()
                .set("ingress", "listen", ingress.to_string())
                .set("ingress.matrix", "homeserver_url", homeserver_url)
                .set("ingress.matrix", "server_name", SERVER_NAME)
                .set("ingress.matrix", "as_token", AS_TOKEN)
                .set("ingress.matrix", "hs_token", HS_TOKEN)
                .set("ingress.matrix", "registration_url", format!("http://{ingress}"))
                .integration(
                    Integration::new("googlebot")
                        .team(SERVER_NAME)
                        .channel(&format!("#{name}:{SERVER_NAME}"))
                        .trigger_words(&["googlebot:"])
                        .url(handler.url("/googlebot"))
                        .token("XXXXXXXXXXXXXXXXXX")
                        .set("bot_name", "Google Bot"),
                )
        };
        let path = config(&format!("http://{homeserver}")).write(&dir);
        let registration = dir.join("swallow-registration.yaml");
        let output = std::process::Command::new(bin_path("swallow-matcher"))
            .arg("--config")
            .arg(&path)
            .arg("matrix-registration")
            .output()
            .expect("running swallow-matcher matrix-registration");
        assert!(
            output.status.success(),
            "matrix-registration: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        std::fs::write(&registration, &output.stdout).unwrap();
        let synapse = Synapse::start(&venv, &dir, &registration).await.unwrap();
        config(&synapse.base).write(&dir);
        let responder_dir = dir.join("responder");
        std::fs::create_dir_all(&responder_dir).unwrap();
        let responder_path = config(&responder_base(&synapse.base)).write(&responder_dir);
        let env = std::collections::HashMap::new();
        let matcher = StageProcess::spawn("swallow-matcher", &path, &env).unwrap();
        let deliverer = StageProcess::spawn("swallow-deliverer", &path, &env).unwrap();
        let responder = StageProcess::spawn("swallow-responder", &responder_path, &env).unwrap();
        for stage in [&matcher, &deliverer, &responder] {
            stage.ready(T).await;
        }
        let steve = synapse.user("steve", "Steve").await.unwrap();
        let room = steve.create_public_room("test", name).await.unwrap();
        steve.invite(&room, BOT).await.unwrap();
        steve
            .until_joined(&room, BOT, T)
            .await
            .unwrap_or_else(|e| panic!("the bot joins when invited: {e}{}", synapse.output_tail()));
        Some(Setup {
            _stack: stack,
            handler,
            ingress,
            matcher,
            _deliverer: deliverer,
            responder,
            path,
            responder_path,
            synapse,
            steve,
            room,
            _dir: dir,
        })
    }

    /// Waits for a message from `sender` with `body` in the room, as Steve sees it.
    async fn until_message(&self, sender: &str, body: &str) -> Value {
        let started = Instant::now();
        loop {
            let messages = self.steve.messages(&self.room).await.unwrap();
            if let Some(m) = messages
                .iter()
                .find(|m| m["sender"] == sender && m["content"]["body"] == body)
            {
                return m.clone();
            }
            assert!(
                started.elapsed() < T,
                "no {body:?} from {sender} in the room within {T:?}; it holds: {:#?}",
                messages
                    .iter()
                    .map(|m| (m["sender"].clone(), m["content"]["body"].clone()))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for the seed's answer, then asks a later question and waits
    /// for its answer, as Steve sees them.
    async fn until_answered_then_a_later_question(&self) {
        self.until_message(GOOGLE_BOT, "African or European?").await;
        self.steve
            .send(&self.room, "googlebot: What is your quest?", None)
            .await
            .unwrap();
        self.until_message(GOOGLE_BOT, "To seek the Holy Grail.").await;
    }

    /// How many messages from `sender` with `body` the room holds, as Steve sees it.
    async fn count_messages(&self, sender: &str, body: &str) -> usize {
        self.steve
            .messages(&self.room)
            .await
            .unwrap()
            .iter()
            .filter(|m| m["sender"] == sender && m["content"]["body"] == body)
            .count()
    }

    fn ingress_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.ingress)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_example_through_a_homeserver_and_back() {
    let Some(s) = Setup::start("matrix-seed").await else {
        return;
    };
    let asked = s.steve.send(&s.room, SEED, None).await.unwrap();
    let post = &s.handler.until(1, T, "POST from the Matrix message").await[0];
    for (name, want) in [
        ("team_id", SERVER_NAME),
        ("channel_id", s.room.as_str()),
        ("channel_name", "test"),
        ("user_id", "@steve:localhost"),
        ("user_name", "Steve"),
        ("text", SEED),
        ("trigger_word", "googlebot:"),
    ] {
        assert_eq!(field(post, name), want, "{name}");
    }
    let ts = field(post, "timestamp");
    assert!(
        ts.split_once('.').is_some_and(|(s, f)| s.len() == 10 && f.len() == 6),
        "the ts is Slack-shaped: {ts}"
    );
    assert!(post.header("webhook-id").is_some_and(|id| id.starts_with("msg_")));

    let reply = s.until_message(GOOGLE_BOT, "African or European?").await;
    assert!(reply["content"].get("m.relates_to").is_none(), "not threaded: {reply}");
    assert_eq!(
        s.steve.display_name_in(&s.room, GOOGLE_BOT).await.unwrap(),
        "Google Bot",
        "shown under the integration's name"
    );

    // In a thread, the answer is in that thread.
    s.steve
        .send(&s.room, "googlebot: What is your quest?", Some(&asked))
        .await
        .unwrap();
    let post = &s.handler.until(2, T, "POST from the threaded message").await[1];
    assert_eq!(field(post, "thread_ts"), asked);
    let reply = s.until_message(GOOGLE_BOT, "To seek the Holy Grail.").await;
    assert_eq!(reply["content"]["m.relates_to"]["rel_type"], "m.thread", "{reply}");
    assert_eq!(reply["content"]["m.relates_to"]["event_id"], asked.as_str(), "{reply}");
    assert_eq!(s.handler.count(), 2, "one POST a message");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swallows_own_users_never_trigger_and_transactions_count_once() {
    let Some(s) = Setup::start("matrix-own").await else {
        return;
    };
    // The bot and a virtual user write a trigger word: nothing fires.
    let bot = MatrixUser::appservice(&s.synapse.base, AS_TOKEN, BOT);
    bot.send(&s.room, "googlebot: from the bot itself", None).await.unwrap();
    let register = json!({"type": "m.login.application_service", "username": "swallow_google_bot"});
    let _ = bot.call(reqwest::Method::POST, "/register", &register).await;
    let virtual_user = MatrixUser::appservice(&s.synapse.base, AS_TOKEN, GOOGLE_BOT);
    virtual_user
        .call(reqwest::Method::POST, &format!("/join/{}", enc(&s.room)), &json!({}))
        .await
        .unwrap();
    virtual_user
        .send(&s.room, "googlebot: from a virtual user", None)
        .await
        .unwrap();
    // Steve's message after them: once it is posted, theirs were seen and ignored.
    s.steve
        .send(&s.room, "googlebot: What is your name?", None)
        .await
        .unwrap();
    let posts = s.handler.until(1, T, "POST from Steve's message").await;
    s.until_message(GOOGLE_BOT, "It is Arthur, King of the Britons.").await;
    assert_eq!(posts.len(), 1, "only Steve's message fired");
    assert_eq!(field(&posts[0], "user_id"), "@steve:localhost");

    // The homeserver's token, checked before anything is read.
    let client = reqwest::Client::new();
    let txn = |id: &str, event_id: &str| {
        let body = json!({"events": [{"type": "m.room.message", "event_id": event_id, "room_id": s.room,
            "sender": "@steve:localhost", "origin_server_ts": 1_355_517_523_000u64,
            "content": {"msgtype": "m.text", "body": SEED}}]});
        client
            .put(s.ingress_url(&format!("/_matrix/app/v1/transactions/{id}")))
            .json(&body)
            .timeout(Duration::from_secs(10))
    };
    let missing = txn("t-1", "$made-up-1").send().await.unwrap();
    assert_eq!(missing.status(), 401);
    assert_eq!(missing.json::<Value>().await.unwrap()["errcode"], "M_MISSING_TOKEN");
    let wrong = txn("t-1", "$made-up-1").bearer_auth("not-it").send().await.unwrap();
    assert_eq!(wrong.status(), 403);
    assert_eq!(wrong.json::<Value>().await.unwrap()["errcode"], "M_FORBIDDEN");
    // The same transaction twice: answered both times, published once.
    for _ in 0..2 {
        let ok = txn("t-1", "$made-up-1").bearer_auth(HS_TOKEN).send().await.unwrap();
        assert_eq!(ok.status(), 200);
        assert_eq!(ok.json::<Value>().await.unwrap(), json!({}));
    }
    // Another transaction carrying the same event (a retry under another
    // id): not published again either.
    let again = txn("t-2", "$made-up-1").bearer_auth(HS_TOKEN).send().await.unwrap();
    assert_eq!(again.status(), 200);
    let posts = s.handler.until(2, T, "POST from the pushed transaction").await;
    let ping = client
        .post(s.ingress_url("/_matrix/app/v1/ping"))
        .bearer_auth(HS_TOKEN)
        .json(&json!({"transaction_id": "p"}))
        .send()
        .await
        .unwrap();
    assert_eq!(ping.status(), 200);
    for path in [
        "/_matrix/app/v1/users/%40someone%3Alocalhost",
        "/_matrix/app/v1/rooms/%23a%3Alocalhost",
    ] {
        let r = client
            .get(s.ingress_url(path))
            .bearer_auth(HS_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{path}");
        assert_eq!(r.json::<Value>().await.unwrap()["errcode"], "M_NOT_FOUND");
    }
    // Every POST so far has arrived (the ping came after the transactions
    // were confirmed and the handler answered); none more is on its way
    // once Steve's next message is the third.
    s.steve
        .send(&s.room, "googlebot: What is your favourite colour?", None)
        .await
        .unwrap();
    let posts_now = s.handler.until(3, T, "POST from Steve's last message").await;
    assert_eq!(posts.len(), 2);
    let mut texts: Vec<String> = posts_now.iter().map(|p| field(p, "text")).collect();
    texts.sort();
    assert_eq!(
        texts,
        [
            "googlebot: What is the air-speed velocity of an unladen swallow?",
            "googlebot: What is your favourite colour?",
            "googlebot: What is your name?",
        ],
        "the pushed event once"
    );
}

/// The open TCP connections to `port` on loopback with bytes waiting to be
/// read (from /proc/net/tcp): a request sent to a process that is not
/// reading.
fn unread_requests_to(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let local_port = cols
                .get(1)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            let rx_queue = cols
                .get(4)
                .and_then(|q| q.split(':').nth(1))
                .and_then(|q| u64::from_str_radix(q, 16).ok());
            // State 01: established.
            local_port == Some(port) && cols.get(3) == Some(&"01") && rx_queue.is_some_and(|n| n > 0)
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_matcher_killed_while_the_homeserver_pushes_loses_nothing() {
    let Some(mut s) = Setup::start("matrix-matcher-killed").await else {
        return;
    };
    // Stopped, the matcher takes the homeserver's connection (the kernel
    // does) but never reads the transaction; killed then, it never answers.
    s.matcher.signal("STOP").unwrap();
    s.steve.send(&s.room, SEED, None).await.unwrap();
    wait_for(
        T,
        "the homeserver's transaction to reach the stopped matcher",
        || async { (unread_requests_to(s.ingress.port()) > 0).then_some(()) },
    )
    .await;
    s.matcher.kill().await;
    assert_eq!(s.handler.count(), 0, "nothing was published by the killed matcher");
    // A new matcher on the same address: the homeserver's retry reaches it.
    s.matcher = StageProcess::spawn("swallow-matcher", &s.path, &std::collections::HashMap::new()).unwrap();
    s.matcher.ready(T).await;
    s.handler.until(1, T, "POST from the transaction sent again").await;
    // A later message is answered after it: the first was published once.
    s.until_answered_then_a_later_question().await;
    let posts = s.handler.until(2, T, "POST from the later message").await;
    assert_eq!(posts.len(), 2, "lost 0, duplicated 0");
    let answered = s.count_messages(GOOGLE_BOT, "African or European?").await;
    assert_eq!(answered, 1, "answered once");
}

/// A proxy to the homeserver for the responder: the first time a reply
/// is sent, it is passed on, and the responder is killed before it hears
/// the answer (so before it acknowledges the reply).
struct KillingProxy {
    addr: std::net::SocketAddr,
    /// The responder to kill (its pid); 0: none.
    victim: std::sync::Arc<std::sync::atomic::AtomicU32>,
    /// The paths of the sends passed on.
    sends: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl KillingProxy {
    /// Bound at once (on the test's runtime), serving from then on.
    fn start(upstream: String) -> KillingProxy {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let victim = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let sends = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (v, sent) = (victim.clone(), sends.clone());
        let client = reqwest::Client::new();
        let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
            let (v, sent, client, upstream) = (v.clone(), sent.clone(), client.clone(), upstream.clone());
            async move {
                let (parts, body) = request.into_parts();
                let body = axum::body::to_bytes(body, 1 << 20).await.unwrap_or_default();
                let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").to_owned();
                let mut forward = client
                    .request(parts.method.clone(), format!("{upstream}{path}"))
                    .body(body);
                if let Some(auth) = parts.headers.get("authorization") {
                    forward = forward.header("authorization", auth);
                }
                forward = forward.header("content-type", "application/json");
                let response = forward.send().await.unwrap();
                let status = response.status().as_u16();
                let bytes = response.bytes().await.unwrap_or_default();
                if parts.method == axum::http::Method::PUT && path.contains("/send/m.room.message/") {
                    sent.lock().unwrap().push(path);
                    let pid = v.swap(0, Ordering::SeqCst);
                    if pid != 0 {
                        let _ = std::process::Command::new("kill")
                            .args(["-KILL", &pid.to_string()])
                            .status();
                    }
                }
                (axum::http::StatusCode::from_u16(status).unwrap(), bytes.to_vec())
            }
        });
        tokio::spawn(async move { axum::serve(listener, app).await });
        KillingProxy { addr, victim, sends }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_responder_killed_after_posting_shows_the_reply_once() {
    let upstream = std::sync::Arc::new(std::sync::Mutex::new(None::<KillingProxy>));
    let slot = upstream.clone();
    let Some(mut s) = Setup::start_with("matrix-responder-killed", move |base| {
        let proxy = KillingProxy::start(base.to_owned());
        let url = format!("http://{}", proxy.addr);
        *slot.lock().unwrap() = Some(proxy);
        url
    })
    .await
    else {
        return;
    };
    let proxy = upstream.lock().unwrap().take().unwrap();
    let pid = s.responder.child.id().unwrap();
    proxy.victim.store(pid, std::sync::atomic::Ordering::SeqCst);
    s.steve.send(&s.room, SEED, None).await.unwrap();
    s.handler.until(1, T, "POST from the message").await;
    // The reply was sent, and its responder killed before the answer.
    wait_for(T, "the reply's send to pass the proxy", || async {
        (!proxy.sends.lock().unwrap().is_empty()).then_some(())
    })
    .await;
    let _ = s.responder.child.wait().await;
    s.responder = StageProcess::spawn(
        "swallow-responder",
        &s.responder_path,
        &std::collections::HashMap::new(),
    )
    .unwrap();
    s.responder.ready(T).await;
    wait_for(T, "the reply to be sent again by the new responder", || async {
        (proxy.sends.lock().unwrap().len() >= 2).then_some(())
    })
    .await;
    let sends = proxy.sends.lock().unwrap().clone();
    assert_eq!(sends[0], sends[1], "the same transaction id, sent again");
    // A later reply through the same responder: the first is settled by then.
    s.until_answered_then_a_later_question().await;
    let shown = s.count_messages(GOOGLE_BOT, "African or European?").await;
    assert_eq!(shown, 1, "the reply appears once");
}
