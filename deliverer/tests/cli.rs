//! The binary's command line: a clear refusal of a bad file, and the flags
//! of `replay` and `log`.

use std::process::Command;

#[test]
fn refuses_an_invalid_file_naming_file_integration_and_field() {
    let dir = std::env::temp_dir().join(format!("swallow-dcli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    std::fs::write(
        &path,
        "[[integrations]]\nid = \"googlebot\"\nteam_id = \"T1\"\nchannel = \"C1\"\nurls = [\"http://x/\"]\ntoken = \"t\"\nrate_limit = { per_second = -1.0 }\n",
    )
    .unwrap();
    for args in [&[][..], &["replay"][..], &["log"][..]] {
        let out = Command::new(env!("CARGO_BIN_EXE_swallow-deliverer"))
            .arg("--config")
            .arg(&path)
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("integration \"googlebot\": rate_limit.per_second: must be a number of at least 0.000278 (one an hour), not -1"),
            "{stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn replay_documents_its_flags() {
    let out = Command::new(env!("CARGO_BIN_EXE_swallow-deliverer"))
        .args(["replay", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--integration") && help.contains("--limit"), "{help}");
}

#[test]
fn log_documents_its_flags() {
    let out = Command::new(env!("CARGO_BIN_EXE_swallow-deliverer"))
        .args(["log", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--since",
        "--from",
        "--integration",
        "--delivery",
        "--event",
        "--channel",
        "--follow",
        "--json",
    ] {
        assert!(help.contains(flag), "{flag}: {help}");
    }
}
