//! The binary refuses a bad configuration file with one clear message.

use std::process::Command;

#[test]
fn refuses_an_invalid_file_naming_file_integration_and_field() {
    let dir = std::env::temp_dir().join(format!("swallow-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    std::fs::write(
        &path,
        "[[integrations]]\nid = \"googlebot\"\nteam_id = \"T1\"\ntrigger_words = [\"g\"]\nurls = [\"/hook\"]\ntoken = \"t\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_swallow-matcher"))
        .arg("--config")
        .arg(&path)
        .env("SWALLOW_HTTP_ADDR", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let want = format!(
        "loading integrations from {}: integration \"googlebot\": urls[0]: \"/hook\": relative URL without a base",
        path.display()
    );
    assert!(stderr.contains(&want), "stderr was:\n{stderr}");
    assert_eq!(
        stderr.lines().filter(|l| l.contains("error:")).count(),
        1,
        "one message:\n{stderr}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn refuses_to_start_without_a_configuration() {
    let out = Command::new(env!("CARGO_BIN_EXE_swallow-matcher"))
        .env_remove("SWALLOW_CONFIG")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--config"));
}
