//! The one line a stage prints when its configuration file is invalid
//! (README, Configuration): the file, the integration (id, or position when
//! the id is missing), the field, and for an unknown field the closest known
//! one. Run with the real binary, as an operator sees it (every stage binary
//! loads its file through the same `swallow_shared::stage::cli::run_stage`).

use std::process::Command;

/// Runs `swallow-matcher` on a file holding `text`; its exit code and stderr.
fn refusal(text: &str) -> (Option<i32>, String, String) {
    let dir = std::env::temp_dir().join(format!("swallow-cfgerr-{}", uuid_like()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("swallow.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_swallow-matcher"))
        .arg("--config")
        .arg(&path)
        .env("SWALLOW_HTTP_ADDR", "127.0.0.1:0")
        .env_remove("RUST_LOG")
        .env_remove("SWALLOW_SLACK_TOKEN")
        .env_remove("SWALLOW_LOG_FORMAT")
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        path.display().to_string(),
    )
}

fn uuid_like() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    format!("{}-{nanos}", std::process::id())
}

const GOOD: &str = "[[integrations]]\nid = \"googlebot\"\nteam_id = \"T0001\"\nchannel = \"#test\"\nurls = [\"http://127.0.0.1:8080/\"]\ntoken = \"t\"\n";

#[test]
fn each_invalid_file_gets_its_exact_line() {
    let cases: &[(String, &str)] = &[
        (
            "[[integrations]]\nid = \"googlebot\"\nteam_id = \"T0001\"\ntrigger_word = [\"googlebot:\"]\nurls = [\"http://127.0.0.1:8080/\"]\ntoken = \"t\"\n".into(),
            "loading integrations from {path}: integration \"googlebot\": trigger_word: unknown field; did you mean `trigger_words`?",
        ),
        (
            format!("{GOOD}[[integrations]]\nteam_id = \"T0001\"\nchannel = \"C1\"\nurl = [\"http://127.0.0.1:8080/\"]\n"),
            "loading integrations from {path}: integration #2: url: unknown field; did you mean `urls`?",
        ),
        (
            format!("{GOOD}[[integrations]]\nteam_id = \"T0001\"\nchannel = \"C1\"\nurls = [\"http://127.0.0.1:8080/\"]\ntoken = \"t\"\n"),
            "loading integrations from {path}: integration #2: id: required, and must not be empty",
        ),
        (
            format!("{GOOD}content_type = \"xml\"\n"),
            "loading integrations from {path}: integration \"googlebot\": content_type: unknown variant `xml`, expected `form` or `json`",
        ),
        (
            format!("{GOOD}rate_limit = {{ on_limit = \"wait\" }}\n"),
            "loading integrations from {path}: integration \"googlebot\": rate_limit.on_limit: unknown variant `wait`, expected `delay` or `drop`",
        ),
        (
            format!("{GOOD}max_attempts = 0\n"),
            "loading integrations from {path}: integration \"googlebot\": max_attempts: must be at least 1, not 0",
        ),
        (
            format!("[deliverer]\nconcurency = 8\n{GOOD}"),
            "loading configuration from {path}: deliverer.concurency: unknown field; did you mean `concurrency`?",
        ),
        (
            format!("[broker]\nprefetch = 0\n{GOOD}"),
            "loading configuration from {path}: broker.prefetch: must be at least 1, not 0",
        ),
        (
            format!("[responder]\nsink = \"irc\"\n{GOOD}"),
            "loading configuration from {path}: responder.sink: unknown variant `irc`, expected one of `amqp`, `slack`, `webhook`",
        ),
        (
            format!("[responder]\nsink = \"slack\"\n{GOOD}"),
            "loading configuration from {path}: responder.slack_token: sink = \"slack\" needs slack_token, slack_token_file or SWALLOW_SLACK_TOKEN",
        ),
        (
            format!("{GOOD}token = \"again\"\n"),
            "loading configuration from {path}: line 7, column 1: duplicate key",
        ),
    ];
    for (text, want) in cases {
        let (code, stderr, path) = refusal(text);
        let want = format!("swallow-matcher: error: {}\n", want.replace("{path}", &path));
        assert_eq!(stderr, want, "for the file:\n{text}");
        assert_eq!(code, Some(2), "{stderr}");
    }
}
