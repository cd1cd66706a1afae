//! deploy/ checked offline: the manifests render and validate, the alerting
//! rules pass promtool, each stage's /metrics passes `promtool check
//! metrics`, and every metric the rules and the dashboard use is one the
//! stages really export.
//!
//! The tools (kubectl, promtool, kubernetes-validate) are installed by
//! `.ci/run`. A missing one fails the test, naming how to install it; outside
//! CI, `SWALLOW_SKIP_MISSING_TOOLS=1` skips the checks that need it instead
//! (and says so), never silently.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use swallow_tests::prometheus::{metric_names, tools_installed};
use swallow_tests::*;

const KUBECTL: (&str, &str) = ("kubectl", "Debian: apt-get install kubernetes-client");
const PROMTOOL: (&str, &str) = ("promtool", "Debian: apt-get install prometheus");
const VALIDATE: (&str, &str) = ("kubernetes-validate", "PyPI: pip install kubernetes-validate");

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

#[test]
fn manifests_render_validate_and_rules_pass_promtool() {
    if !tools_installed(&[KUBECTL, PROMTOOL, VALIDATE]) {
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
    metric_names(&text, "swallow_")
        .into_iter()
        .map(|name| {
            ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .map_or(name.clone(), str::to_owned)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_metrics_pass_promtool_and_cover_the_rules_and_dashboard() {
    let stack = TestStack::new("deploy").await.unwrap();
    let dir = TempDir::new("deploy");
    let path = ConfigToml::on(&stack)
        .integration(
            Integration::new("a")
                .team("T1")
                .channel("C1")
                .url("http://127.0.0.1:9/"),
        )
        .write(&dir);
    let p = Pipeline::spawn(&path).await.unwrap();
    let mut exported = BTreeSet::new();
    let promtool = tools_installed(&[PROMTOOL]);
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
}
