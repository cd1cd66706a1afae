//! deploy/ checked offline: the manifests render and validate, the alerting
//! rules pass promtool, each stage's /metrics passes `promtool check
//! metrics`, and every metric the rules and the dashboard use is one the
//! stages really export.
//!
//! The tools (kubectl, promtool, kubernetes-validate) are installed by
//! `.ci/run`; without them, outside CI, the checks that need them are skipped
//! with a message.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use swallow_tests::*;

fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var("CI").is_err(),
            "{tool} is needed on CI (.ci/run installs it)"
        );
        eprintln!("skipped: {tool} is not installed");
    }
    found
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

#[test]
fn manifests_render_validate_and_rules_pass_promtool() {
    let validate = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !validate {
        assert!(
            std::env::var("CI").is_err(),
            "kubernetes-validate is needed on CI (.ci/run installs it)"
        );
        eprintln!("skipped: kubernetes-validate (PyPI) is not installed");
    }
    if !(validate && have("kubectl") && have("promtool")) {
        return;
    }
    let out = Command::new("bash")
        .arg(repo().join("deploy/check.sh"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "deploy/check.sh failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `swallow_*` names used in a file, without histogram suffixes.
fn used_metrics(path: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("swallow_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase() || bytes[end] == b'_' || bytes[end].is_ascii_digit())
        {
            end += 1;
        }
        let name = &text[start..end];
        let name = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        // Skip words like "swallow_dashboard" in file names.
        if !start
            .checked_sub(1)
            .is_some_and(|p| bytes[p].is_ascii_alphanumeric() || bytes[p] == b'-')
        {
            names.insert(name.to_owned());
        }
        i = end;
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_metrics_pass_promtool_and_cover_the_rules_and_dashboard() {
    let stack = TestStack::new("deploy").await.unwrap();
    let dir = tempdir("deploy");
    let path = write_config(
        &dir,
        &format!(
            "{}[[integrations]]\nid = \"a\"\nteam_id = \"T1\"\nchannel = \"C1\"\nurls = [\"http://127.0.0.1:9/\"]\ntoken = \"t\"\n",
            stack.broker_toml()
        ),
    );
    let p = Pipeline::spawn(&path).await.unwrap();
    let mut exported = BTreeSet::new();
    let promtool = have("promtool");
    for (name, stage) in [
        ("matcher", &p.matcher),
        ("deliverer", &p.deliverer),
        ("responder", &p.responder),
    ] {
        let text = reqwest::get(format!("http://{}/metrics", stage.ops_addr))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                exported.insert(rest.split_whitespace().next().unwrap().to_owned());
            }
        }
        assert!(
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .all(|l| l.starts_with("swallow_"))
        );
        if promtool {
            let mut child = Command::new("promtool")
                .args(["check", "metrics"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "promtool check metrics on the {name}'s /metrics:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let k = repo().join("deploy/k8s/overlays/production");
    for file in ["prometheus-rules.yaml", "swallow-dashboard.json"] {
        let used = used_metrics(&k.join(file));
        assert!(!used.is_empty(), "{file} uses swallow metrics");
        let unknown: Vec<_> = used.difference(&exported).collect();
        assert!(unknown.is_empty(), "{file} uses metrics no stage exports: {unknown:?}");
    }
    let _ = std::fs::remove_dir_all(dir);
}
