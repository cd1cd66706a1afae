//! The real binaries as child processes, their configuration files,
//! free ports, readiness and `/metrics` scraping.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;

use crate::wait_for;

/// A chat event like the seed's, with the given text and ts.
pub fn chat_event(text: &str, ts: &str) -> serde_json::Value {
    serde_json::json!({
        "team_id": "T0001", "team_domain": "example", "channel_id": "C2147483705",
        "channel_name": "test", "channel_type": "public", "user_id": "U2147483697",
        "user_name": "Steve", "ts": ts, "thread_ts": null, "text": text,
        "bot_id": null, "subtype": null
    })
}

/// A new delivery job's bytes, as the matcher would publish it, for
/// `chat_event(text, ts)` and `integration`'s URL `url`.
pub fn delivery_job(integration: &str, text: &str, ts: &str, url: &str) -> Vec<u8> {
    use swallow_shared::wire::messages::{DeliveryJob, now_millis};
    let event = swallow_shared::ChatEvent::parse(&serde_json::to_vec(&chat_event(text, ts)).unwrap()).unwrap();
    DeliveryJob::encode_new(&event, integration, 0, url, "", now_millis())
}

/// Writes a configuration file into `dir` and returns its path.
pub fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("swallow.toml");
    std::fs::write(&path, text).expect("writing the test configuration");
    path
}

/// Runs `bin --config <config> <args…>` (a command such as `replay`) to
/// its end; fails the test unless it succeeds, and returns what it printed.
pub fn run_command(bin: &str, config: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new(bin_path(bin))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {bin}: {e}"));
    assert!(
        out.status.success(),
        "{bin} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A free loopback port (bound, then released).
pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    l.local_addr().unwrap()
}

/// The path of a workspace binary built next to the test executable.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace` (cargo test --workspace builds it)",
        path.display()
    );
    path
}

/// A stage binary run as a child process; killed when dropped.
pub struct StageProcess {
    pub child: tokio::process::Child,
    pub ops_addr: SocketAddr,
    name: String,
}

impl StageProcess {
    /// Spawns `bin` with `--config config` and its listener on a free port.
    pub fn spawn(bin: &str, config: &Path, env: &HashMap<String, String>) -> anyhow::Result<StageProcess> {
        let ops_addr = free_addr();
        let mut cmd = tokio::process::Command::new(bin_path(bin));
        cmd.arg("--config")
            .arg(config)
            .env("SWALLOW_HTTP_ADDR", ops_addr.to_string())
            .env_remove("AMQP_URL")
            .env_remove("SWALLOW_PREFIX")
            .env(
                "RUST_LOG",
                std::env::var("SWALLOW_TEST_LOG").unwrap_or_else(|_| "error".into()),
            )
            .envs(env)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let child = cmd.spawn().with_context(|| format!("spawning {bin}"))?;
        Ok(StageProcess {
            child,
            ops_addr,
            name: bin.to_owned(),
        })
    }

    /// Waits until `/readyz` answers 200.
    pub async fn ready(&self, timeout: Duration) {
        let url = format!("http://{}/readyz", self.ops_addr);
        let what = format!("{} to be ready", self.name);
        wait_for(timeout, &what, || async {
            let r = reqwest::get(&url).await.ok()?;
            r.status().is_success().then_some(())
        })
        .await
    }

    /// SIGKILL, and wait for the process to be gone.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Sends a signal (e.g. `TERM`) with `kill(1)`.
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self.child.id().context("process already gone")?;
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()?;
        anyhow::ensure!(status.success(), "kill -{signal} {pid} failed");
        Ok(())
    }
}

/// Reads a metric (summing over its label sets that contain `labels`) from a
/// `/metrics` endpoint.
pub async fn metric(ops_addr: SocketAddr, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
    let text = reqwest::get(format!("http://{ops_addr}/metrics")).await?.text().await?;
    Ok(metric_in(&text, name, labels))
}

/// Sums the samples of `name` in Prometheus text whose labels include `labels`.
pub fn metric_in(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = match series.split_once('{') {
                Some((m, r)) => (m, r),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let all = labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            all.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// The three real binaries, started on one configuration file.
pub struct Pipeline {
    pub matcher: StageProcess,
    pub deliverer: StageProcess,
    pub responder: StageProcess,
}

impl Pipeline {
    /// Spawns the three stages and waits until each is ready.
    pub async fn spawn(config: &Path) -> anyhow::Result<Pipeline> {
        let env = HashMap::new();
        let p = Pipeline {
            matcher: StageProcess::spawn("swallow-matcher", config, &env)?,
            deliverer: StageProcess::spawn("swallow-deliverer", config, &env)?,
            responder: StageProcess::spawn("swallow-responder", config, &env)?,
        };
        for stage in [&p.matcher, &p.deliverer, &p.responder] {
            stage.ready(Duration::from_secs(30)).await;
        }
        Ok(p)
    }
}
