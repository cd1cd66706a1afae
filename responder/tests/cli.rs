//! The binary refuses a bad `[responder]` table with one clear message.
//! (An integration test of this package is also what makes `cargo test
//! --workspace` build the `swallow-responder` binary the end-to-end tests
//! run.)

use std::process::Command;

#[test]
fn refuses_a_slack_sink_without_a_token() {
    let dir = std::env::temp_dir().join(format!("swallow-rcli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    std::fs::write(&path, "[responder]\nsink = \"slack\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_swallow-responder"))
        .arg("--config")
        .arg(&path)
        .env_remove("SWALLOW_SLACK_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("responder.slack_token: sink = \"slack\" needs slack_token"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
