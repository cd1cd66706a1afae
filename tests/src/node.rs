//! A private RabbitMQ node with a configuration of the test's choosing (a
//! TLS listener, a member of a cluster), and the faults a node can suffer
//! (SIGKILL, SIGSTOP).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use lapin::{Connection, ConnectionProperties};

use crate::{TempDir, free_addr};

/// How long a `rabbitmqctl` query may take: one against a frozen node
/// would never return.
const CTL_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a node may take to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// A private RabbitMQ node on free ports, with extra `rabbitmq.conf` lines.
/// Stopped (and its directory deleted) on drop.
pub struct Node {
    pub name: String,
    pub port: u16,
    dist_port: u16,
    pub dir: crate::TempDir,
}

impl Node {
    /// Prepares a node named `<stem><n>@localhost` (not started).
    pub fn new(stem: &str, n: usize, extra_conf: &str) -> anyhow::Result<Node> {
        Self::with_plugins(stem, n, &[], extra_conf)
    }

    /// As [`Node::new`], with `plugins` enabled.
    pub fn with_plugins(stem: &str, n: usize, plugins: &[&str], extra_conf: &str) -> anyhow::Result<Node> {
        let port = free_addr().port();
        let dist_port = free_addr().port();
        let name = format!("{stem}{n}@localhost");
        let dir = TempDir::new(&format!("{stem}{n}"));
        std::fs::write(dir.join("plugins"), format!("[{}].\n", plugins.join(",")))?;
        // The machine's rabbitmq.conf pins the shared broker's listener.
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.local = 127.0.0.1:{port}\n{extra_conf}"),
        )?;
        chown_to_rabbitmq(&dir)?;
        Ok(Node {
            name,
            port,
            dist_port,
            dir,
        })
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Starts the Erlang VM (detached) and waits until the node accepts
    /// AMQP connections.
    pub async fn start(&self) -> anyhow::Result<()> {
        let in_dir = |file: &str| self.dir.join(file).into_os_string();
        let settings = [
            ("NODENAME", self.name.clone().into()),
            ("NODE_PORT", self.port.to_string().into()),
            ("DIST_PORT", self.dist_port.to_string().into()),
            ("MNESIA_BASE", in_dir("mnesia")),
            ("LOG_BASE", in_dir("log")),
            ("PID_FILE", in_dir("pid")),
            ("ENABLED_PLUGINS_FILE", in_dir("plugins")),
            ("CONFIG_FILE", in_dir("rabbitmq.conf")),
        ];
        let status = tokio::process::Command::new("rabbitmq-server")
            .arg("-detached")
            .envs(settings.map(|(name, value)| (format!("RABBITMQ_{name}"), value)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .status();
        let status = tokio::time::timeout(CTL_TIMEOUT, status)
            .await
            .with_context(|| format!("rabbitmq-server -detached for {} did not return", self.name))?
            .context("running rabbitmq-server (these tests need a local RabbitMQ installation)")?;
        anyhow::ensure!(status.success(), "rabbitmq-server -detached failed for {}", self.name);
        self.until_accepting(Duration::from_secs(90)).await
    }

    /// Waits until the node accepts AMQP connections.
    pub async fn until_accepting(&self, timeout: Duration) -> anyhow::Result<()> {
        let url = self.url();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let attempt = tokio::time::timeout(
                Duration::from_secs(5),
                Connection::connect(&url, ConnectionProperties::default()),
            );
            if let Ok(Ok(c)) = attempt.await {
                let _ = c.close(200, "".into()).await;
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("node {} did not accept connections within {timeout:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Runs `rabbitmqctl -n <node> args…`; fails with its output, or when
    /// it has not answered within 30 s (one against a frozen node never
    /// would).
    pub async fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        self.ctl_within(CTL_TIMEOUT, args).await
    }

    /// As [`Node::ctl`], bounded by `timeout`.
    pub async fn ctl_within(&self, timeout: Duration, args: &[&str]) -> anyhow::Result<String> {
        let out = tokio::process::Command::new("rabbitmqctl")
            .args(["-q", "-n", &self.name])
            .args(args)
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(timeout, out)
            .await
            .with_context(|| {
                format!(
                    "rabbitmqctl -n {} {} did not answer within {timeout:?}",
                    self.name,
                    args.join(" ")
                )
            })?
            .context("running rabbitmqctl")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        anyhow::ensure!(
            out.status.success(),
            "rabbitmqctl -n {} {}: {}{}",
            self.name,
            args.join(" "),
            text,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(text)
    }

    /// The OS process id of the node's Erlang VM.
    pub fn pid(&self) -> anyhow::Result<u32> {
        let text = std::fs::read_to_string(self.dir.join("pid")).context("reading the node's pid file")?;
        text.trim().parse().context("the node's pid file holds a number")
    }

    /// Sends `signal` (`KILL`, `STOP`, `CONT`) to the node's Erlang VM.
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self.pid()?;
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()?;
        anyhow::ensure!(status.success(), "kill -{signal} {pid} ({}) failed", self.name);
        Ok(())
    }

    /// SIGKILL, then wait until the VM is gone.
    pub async fn kill(&self) -> anyhow::Result<()> {
        let pid = self.pid()?;
        self.signal("KILL")?;
        let proc = PathBuf::from(format!("/proc/{pid}"));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while proc.exists() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// A graceful stop of the whole node, bounded.
    pub async fn stop(&self) -> anyhow::Result<()> {
        self.ctl_within(STOP_TIMEOUT, &["stop"]).await.map(|_| ())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // A frozen node cannot stop: wake it first, kill it if stop fails.
        let _ = self.signal("CONT");
        let stopped = std::process::Command::new("timeout")
            .arg(STOP_TIMEOUT.as_secs().to_string())
            .args(["rabbitmqctl", "-q", "-n", &self.name, "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !stopped {
            let _ = self.signal("KILL");
        }
        // `dir` goes after this, with the fields.
    }
}

/// Gives `dir` to the `rabbitmq` user: the server drops to it.
pub fn chown_to_rabbitmq(dir: &Path) -> anyhow::Result<()> {
    let status = std::process::Command::new("chown")
        .args(["-R", "rabbitmq:rabbitmq"])
        .arg(dir)
        .status()?;
    anyhow::ensure!(status.success(), "chown of {} to rabbitmq failed", dir.display());
    Ok(())
}

/// A name stem unique to this test run, for node names (`swc<random>`).
pub fn node_stem() -> String {
    format!("swc{}n", &uuid::Uuid::new_v4().simple().to_string()[..6])
}
