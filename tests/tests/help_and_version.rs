//! Each stage binary describes itself: `--help` says what that stage does
//! and how to run it, `--version` gives the binary's own name and version
//! (not the shared library's).

use std::process::Command;

use swallow_tests::bin_path;

fn run(bin: &str, arg: &str) -> String {
    let out = Command::new(bin_path(bin)).arg(arg).output().unwrap();
    assert!(out.status.success(), "{bin} {arg}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn help_and_version_describe_each_binary() {
    for stage in ["matcher", "deliverer", "responder"] {
        let bin = format!("swallow-{stage}");
        let help = run(&bin, "--help");
        assert!(help.starts_with(&format!("swallow's {stage}: ")), "{help}");
        let usage = format!("Usage: {bin} --config <FILE>");
        for part in [usage.as_str(), "[env: SWALLOW_CONFIG=]", "AMQP_URL (the broker)"] {
            assert!(help.contains(part), "no {part:?} in:\n{help}");
        }
        assert!(!help.contains("What every swallow stage shares"), "{help}");
        assert_eq!(run(&bin, "--version"), format!("{bin} {}\n", env!("CARGO_PKG_VERSION")));
    }
}
