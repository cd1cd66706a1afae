//! Each tool runs and describes itself. (As an integration test of this
//! package it also makes `cargo test --workspace` build the tools' binaries,
//! which the test suite's quick-start test runs.)

use std::process::Command;

#[test]
fn each_tool_prints_its_help() {
    for (name, path) in [
        ("swallow-chat", env!("CARGO_BIN_EXE_swallow-chat")),
        ("swallow-googlebot", env!("CARGO_BIN_EXE_swallow-googlebot")),
        ("swallow-quickstart", env!("CARGO_BIN_EXE_swallow-quickstart")),
    ] {
        let out = Command::new(path).arg("--help").output().expect("running the tool");
        assert!(
            out.status.success(),
            "{name} --help failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.contains("Usage:"), "{name} --help printed no usage: {help}");
    }
}
