//! Integration options end to end with the real binaries:
//! `channel_types`, secrets read from files and re-read at reload, several
//! signing secrets, custom headers, and logs a pipeline can read. Each bad
//! value is refused with its exact line, and nothing is lost.

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use swallow_tests::handler::{Answer, HandlerServer};
use swallow_tests::*;

const T: Duration = Duration::from_secs(30);

/// The matcher and the deliverer on `config`, both ready.
async fn match_and_deliver(config: &Path) -> (StageProcess, StageProcess) {
    let env = HashMap::new();
    let matcher = StageProcess::spawn("swallow-matcher", config, &env).unwrap();
    let deliverer = StageProcess::spawn("swallow-deliverer", config, &env).unwrap();
    matcher.ready(T).await;
    deliverer.ready(T).await;
    (matcher, deliverer)
}

/// A configuration for `stack` whose handlers are allowed on loopback.
fn config_for(stack: &TestStack) -> ConfigToml {
    ConfigToml::on(stack).top("reload_interval_ms", 100).loopback()
}

/// An integration on `bot:` without a token: each test gives its own, or
/// its `token_file`, in `extra` (TOML lines, written as given).
fn integration(id: &str, url: &str, extra: &str) -> Integration {
    Integration::new(id)
        .unset("token")
        .trigger_words(&["bot:"])
        .url(url)
        .raw(extra)
}

fn event_in(channel_type: Option<&str>, ts: &str) -> serde_json::Value {
    let mut e = chat_event("bot: hello", ts);
    e["channel_type"] = channel_type.map_or(serde_json::Value::Null, Into::into);
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_channels_and_dms_fire_only_the_integrations_that_allow_them() {
    let stack = TestStack::new("opt-types").await.unwrap();
    let handler = HandlerServer::start(|_, _| Answer::status(200)).await;
    let dir = TempDir::new("opt-types");
    let path = config_for(&stack)
        .integration(integration("public", &handler.url("/public"), "token = \"t\""))
        .integration(integration(
            "private",
            &handler.url("/private"),
            "token = \"t\"\nchannel_types = [\"private\"]",
        ))
        .integration(integration(
            "dm",
            &handler.url("/dm"),
            "token = \"t\"\nchannel_types = [\"im\"]",
        ))
        .write(&dir);
    let (matcher, _deliverer) = match_and_deliver(&path).await;

    let cases = [
        (Some("private"), "/private"),
        (Some("im"), "/dm"),
        (None, "/public"),
        (Some("public"), "/public"),
        (Some("mpim"), ""),
    ];
    for (i, (kind, _)) in cases.iter().enumerate() {
        stack
            .publish_event(&event_in(*kind, &format!("1700000000.00000{i}")))
            .await
            .unwrap();
    }
    // Four POSTs are due; the group DM fires none: the matcher ignores it.
    wait_for(T, "the matcher to ignore the group DM", || async {
        let ignored = metric(
            matcher.ops_addr,
            "swallow_events_ignored_total",
            &[("reason", "not_public")],
        )
        .await
        .ok()?;
        (ignored == 1.0).then_some(())
    })
    .await;
    handler.until(4, T, "the four POSTs").await;
    let mut got: Vec<(String, String)> = handler
        .requests()
        .iter()
        .map(|r| {
            let ts = r.form().into_iter().find(|(k, _)| k == "timestamp").unwrap().1;
            (ts, r.path.clone())
        })
        .collect();
    got.sort();
    let want: Vec<(String, String)> = cases
        .iter()
        .enumerate()
        .filter(|(_, (_, p))| !p.is_empty())
        .map(|(i, (_, p))| (format!("1700000000.00000{i}"), (*p).to_owned()))
        .collect();
    assert_eq!(
        got, want,
        "each event fired only the integration that allows its channel type"
    );
}

/// Replaces `path`'s content at once, as a Kubernetes Secret update does.
fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A secret file being rotated under a running stage.
struct Rotation<'a> {
    stack: &'a TestStack,
    /// The secret file.
    file: &'a Path,
    /// The stage that reads it: its reload checks are counted here.
    ops: std::net::SocketAddr,
    /// Where the secret shows: the server that receives the requests.
    server: &'a HandlerServer,
    /// The secret as one request carries it.
    shown: fn(&handler::Recorded) -> String,
}

impl Rotation<'_> {
    async fn reloads(&self, result: &str) -> f64 {
        metric(self.ops, "swallow_config_reloads_total", &[("result", result)])
            .await
            .unwrap()
    }

    /// Publishes an event; the secret the request it causes (the `n`th) carries.
    async fn next_shows(&self, n: usize, ts: &str) -> String {
        self.stack.publish_event(&event_in(None, ts)).await.unwrap();
        let requests = self.server.until(n, T, "the request after the event").await;
        (self.shown)(&requests[n - 1])
    }

    /// First what the file holds at start, then, for each step (what to
    /// write, the reload check's result, what the next request carries): the
    /// rotated secret is the next request's, and a refused file (empty)
    /// keeps the one in force.
    async fn check(&self, at_start: &str, steps: &[(&str, &str, &str)]) {
        assert_eq!(self.next_shows(1, "1700000001.000001").await, at_start);
        for (i, (content, result, want)) in steps.iter().enumerate() {
            replace_file(self.file, content);
            let what = format!("the reload check ({result}) after writing {content:?}");
            wait_for(T, &what, || async { (self.reloads(result).await >= 1.0).then_some(()) }).await;
            let shown = self.next_shows(i + 2, &format!("1700000001.00001{i}")).await;
            assert_eq!(&shown, want, "after writing {content:?}");
        }
        assert_eq!(
            self.reloads("ok").await,
            1.0,
            "the refused file was not counted as a reload"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_file_changed_is_the_token_of_the_next_post_and_a_bad_one_keeps_the_old() {
    let stack = TestStack::new("opt-tokfile").await.unwrap();
    let handler = HandlerServer::start(|_, _| Answer::status(200)).await;
    let dir = TempDir::new("opt-tokfile");
    let token = dir.join("token");
    std::fs::write(&token, "first-token\n").unwrap();
    let path = config_for(&stack)
        .integration(integration("filed", &handler.url("/filed"), "token_file = \"token\""))
        .write(&dir);
    let (_matcher, deliverer) = match_and_deliver(&path).await;
    let rotation = Rotation {
        stack: &stack,
        file: &token,
        ops: deliverer.ops_addr,
        server: &handler,
        shown: |r| r.form().into_iter().find(|(k, _)| k == "token").unwrap().1,
    };
    rotation
        .check(
            "first-token",
            &[
                ("second-token\n", "ok", "second-token"),
                ("\n", "error", "second-token"),
            ],
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slack_token_file_changed_is_the_token_of_the_next_reply_and_a_bad_one_keeps_the_old() {
    let stack = TestStack::new("opt-slacktok").await.unwrap();
    let handler = HandlerServer::start(|_, _| Answer::json(serde_json::json!({"text": "hi"}))).await;
    let slack = HandlerServer::start(|_, _| Answer::json(serde_json::json!({"ok": true}))).await;
    let dir = TempDir::new("opt-slacktok");
    let token = dir.join("slack-token");
    std::fs::write(&token, "xoxb-first\n").unwrap();
    let path = config_for(&stack)
        .set("responder", "sink", "slack")
        .set("responder", "slack_api_base", slack.url("/api"))
        .set("responder", "slack_token_file", "slack-token")
        .responder_rate(100.0)
        .integration(integration("hook", &handler.url("/hook"), "token = \"t\""))
        .write(&dir);
    let (_matcher, _deliverer) = match_and_deliver(&path).await;
    let responder = StageProcess::spawn("swallow-responder", &path, &HashMap::new()).unwrap();
    responder.ready(T).await;
    let rotation = Rotation {
        stack: &stack,
        file: &token,
        ops: responder.ops_addr,
        server: &slack,
        shown: |r| r.header("authorization").unwrap_or_default().to_owned(),
    };
    rotation
        .check(
            "Bearer xoxb-first",
            &[
                ("xoxb-second\n", "ok", "Bearer xoxb-second"),
                ("", "error", "Bearer xoxb-second"),
            ],
        )
        .await;
}

const SECRET_1: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const SECRET_2: &str = "whsec_c2Vjb25kIHNlY3JldCBmb3Igcm90YXRpb24=";
const SECRET_3: &str = "whsec_dGhpcmQgc2VjcmV0LCBub3QgY29uZmlndXJlZA==";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_signed_with_two_secrets_verifies_with_each_and_carries_custom_headers() {
    let stack = TestStack::new("opt-sign").await.unwrap();
    let handler = HandlerServer::start(|_, _| Answer::status(200)).await;
    let dir = TempDir::new("opt-sign");
    std::fs::write(dir.join("secrets"), format!("{SECRET_2}\n")).unwrap();
    let path = config_for(&stack)
        .integration(
            Integration::new("listed")
                .trigger_words(&["bot:"])
                .url(handler.url("/listed"))
                .set("signing_secret", [SECRET_1, SECRET_2])
                .set("headers", Raw(r#"{ "X-Api-Key" = "k-123", "X-Tenant" = "acme" }"#)),
        )
        .integration(
            Integration::new("filed")
                .trigger_words(&["bot:"])
                .url(handler.url("/filed"))
                .set("signing_secret_file", "secrets"),
        )
        .write(&dir);
    let (_matcher, _deliverer) = match_and_deliver(&path).await;
    stack.publish_event(&event_in(None, "1700000002.000001")).await.unwrap();
    let posts = handler.until(2, T, "the two POSTs").await;
    let verify = |post: &handler::Recorded, secret: &str| {
        standardwebhooks::Webhook::new(secret)
            .unwrap()
            .verify(&post.body, &post.headers)
    };
    let listed = posts.iter().find(|p| p.path == "/listed").unwrap();
    let signatures = listed.header("webhook-signature").unwrap();
    assert_eq!(signatures.split(' ').count(), 2, "{signatures}");
    for (i, signature) in signatures.split(' ').enumerate() {
        // Each entry alone verifies with its own secret.
        let mut one = listed.clone();
        one.headers.insert("webhook-signature", signature.parse().unwrap());
        let secret = [SECRET_1, SECRET_2][i];
        verify(&one, secret).unwrap_or_else(|e| panic!("signature {i} with its secret: {e:?}"));
    }
    verify(listed, SECRET_1).unwrap();
    verify(listed, SECRET_2).unwrap();
    assert!(
        verify(listed, SECRET_3).is_err(),
        "a secret not configured must not verify"
    );
    assert_eq!(listed.header("x-api-key"), Some("k-123"));
    assert_eq!(listed.header("x-tenant"), Some("acme"));

    let filed = posts.iter().find(|p| p.path == "/filed").unwrap();
    verify(filed, SECRET_2).unwrap();
    assert!(verify(filed, SECRET_1).is_err());
    assert_eq!(filed.header("x-api-key"), None);
}

#[test]
fn each_bad_option_is_refused_at_start_with_its_exact_line() {
    let dir = TempDir::new("opt-refuse");
    std::fs::write(dir.join("empty"), "\n").unwrap();
    let path = dir.join("swallow.toml");
    let d = dir.display();
    let cases = [
        (
            "token = \"t\"\nchannel_types = [\"dm\"]".to_owned(),
            "channel_types[0]: unknown variant `dm`, expected one of `public`, `private`, `im`, `mpim`".to_owned(),
        ),
        (
            "token = \"t\"\ntoken_file = \"token\"".into(),
            "token_file: give token or token_file, not both".into(),
        ),
        (
            "token_file = \"missing\"".into(),
            format!("token_file: reading {d}/missing: No such file or directory (os error 2)"),
        ),
        (
            "token_file = \"empty\"".into(),
            format!("token_file: {d}/empty is empty"),
        ),
        (
            "token = \"t\"\nsigning_secret_file = \"empty\"".into(),
            format!("signing_secret_file: {d}/empty is empty"),
        ),
        (
            "token = \"t\"\nheaders = { \"Content-Type\" = \"text/plain\" }".into(),
            "headers.\"Content-Type\": swallow sets this header itself; it cannot be configured".into(),
        ),
        (
            "token = \"t\"\nheaders = { \"webhook-id\" = \"mine\" }".into(),
            "headers.\"webhook-id\": swallow sets this header itself; it cannot be configured".into(),
        ),
        (
            "token = \"t\"\nheaders = { \"X Api Key\" = \"k\" }".into(),
            "headers.\"X Api Key\": is not a valid header name".into(),
        ),
        (
            "token = \"t\"\nheaders = { \"X-Api-Key\" = \"é\" }".into(),
            "headers.\"X-Api-Key\": the value must be visible ASCII or spaces, without line breaks".into(),
        ),
    ];
    for stage in ["swallow-matcher", "swallow-deliverer"] {
        for (extra, want) in &cases {
            let text = format!(
                "[[integrations]]\n{}",
                integration("hook", "http://127.0.0.1:1/", extra)
            );
            std::fs::write(&path, &text).unwrap();
            let out = std::process::Command::new(bin_path(stage))
                .arg("--config")
                .arg(&path)
                .env("SWALLOW_HTTP_ADDR", "127.0.0.1:0")
                .output()
                .unwrap();
            let want = format!(
                "{stage}: error: loading integrations from {}: integration \"hook\": {want}\n",
                path.display()
            );
            assert_eq!(String::from_utf8_lossy(&out.stderr), want, "for:\n{text}");
            assert_eq!(out.status.code(), Some(2));
        }
    }
}

/// Runs the matcher with stderr to a file through a start, an invalid event
/// and a SIGTERM; returns what it wrote.
async fn stderr_of_a_run(stack: &TestStack, dir: &Path, log_format: Option<&str>) -> String {
    let path = config_for(stack)
        .integration(integration("hook", "http://127.0.0.1:1/", "token = \"t\""))
        .write(dir);
    let log = dir.join(format!("stderr-{}", log_format.unwrap_or("text")));
    let ops = free_addr();
    let mut cmd = tokio::process::Command::new(bin_path("swallow-matcher"));
    cmd.arg("--config")
        .arg(&path)
        .env("SWALLOW_HTTP_ADDR", ops.to_string())
        .env("RUST_LOG", "info")
        .env_remove("SWALLOW_LOG_FORMAT")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true);
    if let Some(format) = log_format {
        cmd.env("SWALLOW_LOG_FORMAT", format);
    }
    let mut child = cmd.spawn().unwrap();
    assert!(
        wait_ready(&format!("http://{ops}/readyz"), T).await,
        "the matcher never got ready"
    );
    // An invalid event makes a warning with fields.
    stack.publish_event_bytes(b"not json").await.unwrap();
    wait_for(T, "the invalid event to be counted", || async {
        (metric(ops, "swallow_events_invalid_total", &[]).await.ok()? >= 1.0).then_some(())
    })
    .await;
    let pid = child.id().unwrap();
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let status = tokio::time::timeout(T, child.wait())
        .await
        .expect("the matcher stops")
        .unwrap();
    assert!(status.success(), "{status}");
    std::fs::read_to_string(log).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_to_a_file_have_no_escape_codes_and_json_lines_parse() {
    let stack = TestStack::new("opt-logs").await.unwrap();
    let dir = TempDir::new("opt-logs");

    let text = stderr_of_a_run(&stack, &dir, None).await;
    assert!(text.lines().count() >= 4, "{text}");
    assert!(text.contains("starting"), "{text}");
    assert!(!text.contains('\x1b'), "escape sequences in a file:\n{text:?}");

    let json = stderr_of_a_run(&stack, &dir, Some("json")).await;
    let lines: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect();
    assert!(lines.len() >= 4, "{json}");
    for line in &lines {
        for key in ["time", "level", "message"] {
            assert!(line[key].as_str().is_some_and(|v| !v.is_empty()), "{key} in {line}");
        }
        assert_eq!(line["stage"], "matcher", "{line}");
        assert!(line["fields"].is_object(), "{line}");
    }
    let starting = lines
        .iter()
        .find(|l| l["message"] == "starting")
        .expect("a starting line");
    assert_eq!(starting["fields"]["integrations"], 1);
    assert!(
        lines.iter().any(|l| l["level"] == "WARN" || l["level"] == "ERROR"),
        "the invalid event is logged: {json}"
    );

    // A configuration that cannot be loaded stops the stage with one line in
    // the format asked for, though logging never started.
    let path = ConfigToml::new().set("broker", "prefetch", 0).write(&dir);
    let out = std::process::Command::new(bin_path("swallow-matcher"))
        .arg("--config")
        .arg(&path)
        .env("SWALLOW_LOG_FORMAT", "json")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    let line: serde_json::Value =
        serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("not JSON ({e}): {stderr:?}"));
    assert_eq!(
        (&line["level"], &line["stage"]),
        (&"ERROR".into(), &"matcher".into()),
        "{line}"
    );
    let message = line["message"].as_str().unwrap_or_default();
    assert!(message.contains("broker.prefetch"), "{line}");
}
