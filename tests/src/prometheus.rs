//! A real Prometheus server for the tests (Debian's `prometheus` package),
//! the rewrite that makes the production alerting rules run in seconds, and
//! the check that a test's external tools are installed.
//!
//! The rules are the production overlay's, not a copy: the test reads
//! `prometheus-rules.yaml` and changes only what [`shorten_rules`] documents,
//! so a broken metric name or expression fails the test as it would fail in
//! production.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};

/// The variable that lets a machine without the tools skip the checks that
/// need them (refused under `CI=true`).
pub const SKIP_VAR: &str = "SWALLOW_SKIP_MISSING_TOOLS";

/// Whether every `(program, how to install it)` in `tools` is installed.
/// A missing one fails the test, naming how to install it and [`SKIP_VAR`];
/// with `SWALLOW_SKIP_MISSING_TOOLS=1` (and not under `CI=true`) it returns
/// false instead, and the caller skips its checks saying so.
pub fn tools_installed(tools: &[(&str, &str)]) -> bool {
    let missing: Vec<String> = tools
        .iter()
        .filter(|(program, _)| !on_path(program))
        .map(|(program, install)| format!("{program} ({install})"))
        .collect();
    if missing.is_empty() {
        return true;
    }
    let missing = missing.join(", ");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("missing on CI: {missing}; .ci/run installs them");
    }
    if std::env::var(SKIP_VAR).is_ok_and(|v| v == "1") {
        // Straight to stderr, past the test harness's capture, so that the
        // skip shows in a plain `cargo test` run, not only with --nocapture.
        let line = format!("SKIPPED ({SKIP_VAR}=1): {} needs {missing}\n", test_name());
        let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
        return false;
    }
    panic!("missing: {missing}; install them, or set {SKIP_VAR}=1 to skip the checks that need them");
}

/// The running test's name (libtest names its thread after the test).
fn test_name() -> String {
    std::thread::current().name().unwrap_or("a test").to_owned()
}

fn on_path(program: &str) -> bool {
    if program.contains('/') {
        return Path::new(program).exists();
    }
    std::env::var_os("PATH").is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// Metric names starting with `prefix` used in a rules file or a dashboard,
/// as written there (a histogram's `_bucket` included).
pub fn metric_names(text: &str, prefix: &str) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut names = BTreeSet::new();
    let mut i = 0;
    while let Some(at) = text[i..].find(prefix) {
        let start = i + at;
        let mut end = start + prefix.len();
        while end < bytes.len() && word(bytes[end]) {
            end += 1;
        }
        // Not inside a longer word (e.g. a file name like "swallow-dashboard").
        if !start.checked_sub(1).is_some_and(|p| word(bytes[p]) || bytes[p] == b'-') {
            names.insert(text[start..end].to_owned());
        }
        i = end;
    }
    names
}

/// A threshold the test lowers so that it can bring the condition about in
/// seconds: in the rule `alert`, `from` becomes `to` (exactly once).
pub struct Threshold {
    pub alert: &'static str,
    pub from: &'static str,
    pub to: &'static str,
}

/// The rules of a `PrometheusRule` manifest as a Prometheus rule file, run
/// 60 times faster: its `spec` (which is a rule file's `groups:`), with every
/// duration in minutes (`[15m]`, `[30m:1m]`, `for: 5m`) read as seconds, and
/// the `thresholds` changed. Fails when a threshold is not found once, so a
/// change to the rules cannot silently leave the test on the old ones.
pub fn shorten_rules(manifest: &str, thresholds: &[Threshold]) -> anyhow::Result<String> {
    let spec = manifest
        .lines()
        .skip_while(|l| *l != "spec:")
        .skip(1)
        .map(|l| l.strip_prefix("  ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    anyhow::ensure!(spec.contains("groups:"), "no spec.groups in the PrometheusRule");
    let mut rules = minutes_as_seconds(&spec);
    for t in thresholds {
        let start = rules
            .find(&format!("alert: {}\n", t.alert))
            .with_context(|| format!("no alert {}", t.alert))?;
        let end = rules[start + 1..]
            .find("- alert:")
            .map_or(rules.len(), |e| start + 1 + e);
        let rule = &rules[start..end];
        anyhow::ensure!(
            rule.matches(t.from).count() == 1,
            "{:?} is not in the rule {} exactly once",
            t.from,
            t.alert
        );
        let changed = rule.replacen(t.from, t.to, 1);
        rules.replace_range(start..end, &changed);
    }
    Ok(rules)
}

/// `5m` -> `5s` wherever a number of minutes stands alone.
fn minutes_as_seconds(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < bytes.len() {
        let starts_number = bytes[i].is_ascii_digit() && (i == 0 || !bytes[i - 1].is_ascii_alphanumeric());
        if starts_number {
            let mut end = i;
            while end < bytes.len() && bytes[end].is_ascii_digit() {
                end += 1;
            }
            let minutes = end < bytes.len()
                && bytes[end] == b'm'
                && bytes.get(end + 1).is_none_or(|b| !b.is_ascii_alphanumeric());
            out.push_str(&text[i..end]);
            if minutes {
                out.push('s');
                end += 1;
            }
            i = end;
        } else {
            let c = text[i..].chars().next().expect("in bounds");
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// A Prometheus server on a loopback port with storage in a temporary
/// directory; killed (and its directory removed) when dropped.
pub struct Prometheus {
    pub addr: std::net::SocketAddr,
    child: tokio::process::Child,
    dir: crate::TempDir,
    http: reqwest::Client,
}

/// One alert as `/api/v1/alerts` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    pub name: String,
    /// `pending` or `firing`.
    pub state: String,
}

impl Prometheus {
    /// Starts Prometheus scraping `jobs` (`(job name, host:port targets)`,
    /// each on `/metrics`) every second and evaluating `rules` (a rule
    /// file's text) every second; waits until it is ready.
    pub async fn start(jobs: &[(&str, Vec<String>)], rules: &str) -> anyhow::Result<Prometheus> {
        let dir = crate::TempDir::new("prometheus");
        std::fs::write(dir.join("rules.yaml"), rules)?;
        let mut config = format!(
            "global: {{scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}}\nrule_files: [{}]\nscrape_configs:\n",
            dir.join("rules.yaml").display()
        );
        for (job, targets) in jobs {
            let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs: [{{targets: [{}]}}]\n",
                targets.join(", ")
            ));
        }
        std::fs::write(dir.join("prometheus.yml"), &config)?;
        let addr = crate::free_addr();
        let log = std::fs::File::create(dir.join("prometheus.log"))?;
        let child = tokio::process::Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting prometheus (Debian: apt-get install prometheus)")?;
        let mut prometheus = Prometheus {
            addr,
            child,
            dir,
            // Bounded: a query that hangs fails the test instead.
            http: reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let ready = prometheus.http.get(format!("http://{addr}/-/ready")).send().await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                return Ok(prometheus);
            }
            if let Ok(Some(status)) = prometheus.child.try_wait() {
                bail!("prometheus exited ({status}) at start:\n{}", prometheus.log());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("prometheus not ready within 30 s:\n{}", prometheus.log());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// What Prometheus logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    async fn api(&self, path: &str, query: &[(&str, &str)]) -> anyhow::Result<serde_json::Value> {
        let url = reqwest::Url::parse_with_params(&format!("http://{}/api/v1/{path}", self.addr), query)?;
        let text = self
            .http
            .get(url.clone())
            .send()
            .await
            .with_context(|| format!("GET {url}"))?
            .text()
            .await
            .with_context(|| format!("GET {url}"))?;
        let body: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("GET {url}: not JSON: {text}"))?;
        anyhow::ensure!(body["status"] == "success", "GET {url}: {body}");
        Ok(body["data"].clone())
    }

    /// The series an instant query returns now.
    pub async fn query(&self, expr: &str) -> anyhow::Result<Vec<serde_json::Value>> {
        let data = self.api("query", &[("query", expr)]).await?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// Every metric name Prometheus holds.
    pub async fn metric_names(&self) -> anyhow::Result<BTreeSet<String>> {
        let data = self.api("label/__name__/values", &[]).await?;
        Ok(data
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect())
    }

    /// The alerts now pending or firing.
    pub async fn alerts(&self) -> anyhow::Result<Vec<Alert>> {
        let data = self.api("alerts", &[]).await?;
        Ok(data["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| Alert {
                name: a["labels"]["alertname"].as_str().unwrap_or_default().to_owned(),
                state: a["state"].as_str().unwrap_or_default().to_owned(),
            })
            .collect())
    }

    /// Waits until every alert in `names` has been seen firing (not
    /// necessarily all at once: one may resolve before another fires); fails
    /// the test after `timeout`, saying which were not and what was active.
    pub async fn until_fired(&self, names: &[&str], timeout: Duration) {
        let mut seen = BTreeSet::new();
        self.until_alerts(names, timeout, "firing", |alerts, name| {
            if alerts.iter().any(|a| a.name == name && a.state == "firing") {
                seen.insert(name.to_owned());
            }
            seen.contains(name)
        })
        .await
    }

    /// Waits until no alert in `names` is pending or firing.
    pub async fn until_resolved(&self, names: &[&str], timeout: Duration) {
        self.until_alerts(names, timeout, "resolved", |alerts, name| {
            !alerts.iter().any(|a| a.name == name)
        })
        .await
    }

    async fn until_alerts(
        &self,
        names: &[&str],
        timeout: Duration,
        what: &str,
        mut done: impl FnMut(&[Alert], &str) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let alerts = self.alerts().await.expect("reading /api/v1/alerts");
            let waiting: Vec<&str> = names.iter().copied().filter(|n| !done(&alerts, n)).collect();
            if waiting.is_empty() {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("timed out after {timeout:?} waiting for {waiting:?} to be {what}; alerts now: {alerts:?}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        // `dir` goes after this, with the fields.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minutes_become_seconds_and_nothing_else_changes() {
        assert_eq!(
            minutes_as_seconds("rate(x_total[15m]) [30m:1m] for: 5m 2xx 5 min 10ms swallow_m1m"),
            "rate(x_total[15s]) [30s:1s] for: 5s 2xx 5 min 10ms swallow_m1m"
        );
    }

    #[test]
    fn rules_are_taken_from_the_spec_and_thresholds_must_match_once() {
        let manifest = "kind: PrometheusRule\nspec:\n  groups:\n    - name: g\n      rules:\n        - alert: A\n          expr: x > 30\n          for: 15m\n        - alert: B\n          expr: y > 30\n";
        let t = |from| Threshold {
            alert: "A",
            from,
            to: "> 1",
        };
        let rules = shorten_rules(manifest, &[t("> 30")]).unwrap();
        assert!(rules.starts_with("groups:\n  - name: g"), "{rules}");
        assert!(
            rules.contains("alert: A\n        expr: x > 1\n        for: 15s"),
            "{rules}"
        );
        assert!(rules.contains("expr: y > 30"), "{rules}");
        assert!(shorten_rules(manifest, &[t("> 40")]).is_err());
    }

    #[test]
    fn metric_names_are_found_whole() {
        let names = metric_names(
            "sum(rate(swallow_a_total[5m])) swallow-dashboard.json x_swallow_b",
            "swallow_",
        );
        assert_eq!(names.into_iter().collect::<Vec<_>>(), ["swallow_a_total"]);
    }
}
