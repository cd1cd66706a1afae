//! A private RabbitMQ node with a configuration of the test's choosing (a
//! TLS listener, a member of a cluster), and the faults a node can suffer
//! (SIGKILL, SIGSTOP).
//!
//! A node's ports are picked free, then bound by the node seconds later, at
//! boot; meanwhile another process can take one (a test's server, the
//! Erlang VM of a `rabbitmqctl`). A node whose VM stops while it boots
//! fails at once with the reason from its log, and [`Node::boot`] tries
//! fresh ports when a port was taken.

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

/// How many times [`Node::boot`] starts a node whose port was taken.
const BOOT_TRIES: usize = 3;

/// A private RabbitMQ node on free ports, with extra `rabbitmq.conf` lines.
/// Stopped (and its directory deleted) on drop.
pub struct Node {
    pub name: String,
    pub port: u16,
    dist_port: u16,
    /// The TLS listener's port, for a node made by [`Node::with_tls`].
    pub tls_port: Option<u16>,
    extra_conf: String,
    pub dir: crate::TempDir,
}

impl Node {
    /// Prepares a node named `<stem><n>@localhost` (not started).
    pub fn new(stem: &str, n: usize, extra_conf: &str) -> anyhow::Result<Node> {
        Self::with_plugins(stem, n, &[], extra_conf)
    }

    /// As [`Node::new`], with `plugins` enabled.
    pub fn with_plugins(stem: &str, n: usize, plugins: &[&str], extra_conf: &str) -> anyhow::Result<Node> {
        let name = format!("{stem}{n}@localhost");
        let dir = TempDir::new(&format!("{stem}{n}"));
        std::fs::write(dir.join("plugins"), format!("[{}].\n", plugins.join(",")))?;
        let node = Node {
            name,
            port: free_addr().port(),
            dist_port: free_addr().port(),
            tls_port: None,
            extra_conf: extra_conf.to_owned(),
            dir,
        };
        node.write_conf()?;
        Ok(node)
    }

    /// As [`Node::new`], with a TLS listener on [`Node::tls_port`];
    /// `ssl_options` are its `ssl_options.*` lines.
    pub fn with_tls(stem: &str, n: usize, ssl_options: &str) -> anyhow::Result<Node> {
        let mut node = Self::new(stem, n, ssl_options)?;
        node.tls_port = Some(free_addr().port());
        node.write_conf()?;
        Ok(node)
    }

    /// Writes `rabbitmq.conf` for the node's ports (the machine's own
    /// rabbitmq.conf pins the shared broker's listener).
    fn write_conf(&self) -> anyhow::Result<()> {
        let mut conf = format!("listeners.tcp.local = 127.0.0.1:{}\n", self.port);
        if let Some(tls_port) = self.tls_port {
            conf.push_str(&format!("listeners.ssl.default = 127.0.0.1:{tls_port}\n"));
        }
        conf.push_str(&self.extra_conf);
        std::fs::write(self.dir.join("rabbitmq.conf"), conf)?;
        chown_to_rabbitmq(&self.dir)
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Starts the node for the first time: as [`Node::start`], and when a
    /// port was taken before the node bound it, again on fresh ports (said
    /// on stderr), at most three times.
    pub async fn boot(&mut self) -> anyhow::Result<()> {
        let mut attempt = 1;
        loop {
            let Err(error) = self.start().await else {
                return Ok(());
            };
            if attempt == BOOT_TRIES || !self.stopped_for_a_taken_port() {
                return Err(error);
            }
            attempt += 1;
            eprintln!("{error:#}\n(starting {} again on fresh ports)", self.name);
            self.port = free_addr().port();
            self.dist_port = free_addr().port();
            self.tls_port = self.tls_port.map(|_| free_addr().port());
            self.write_conf()?;
            // The next boot's log and pid file only.
            let _ = std::fs::remove_dir_all(self.dir.join("log"));
            let _ = std::fs::remove_file(self.dir.join("pid"));
        }
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

    /// Waits until the node accepts AMQP connections; fails at once, with
    /// the errors from its log, when its VM has stopped.
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
            if !self.vm_running() {
                bail!("node {} stopped while starting: {}", self.name, self.log_errors());
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "node {} did not accept connections within {timeout:?}: {}",
                    self.name,
                    self.log_errors()
                );
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

    /// Whether a process of this node runs: the VM, or the script starting
    /// it (both have the node's name in their environment; epmd, which the
    /// first node on a machine may start, is not the node).
    fn vm_running(&self) -> bool {
        let needle = format!("RABBITMQ_NODENAME={}\0", self.name);
        let of_node = |proc: &Path| {
            std::fs::read_to_string(proc.join("comm")).is_ok_and(|comm| comm.trim() != "epmd")
                && std::fs::read(proc.join("environ"))
                    .is_ok_and(|env| env.windows(needle.len()).any(|w| w == needle.as_bytes()))
        };
        std::fs::read_dir("/proc")
            .map(|dir| dir.flatten().any(|entry| of_node(&entry.path())))
            .unwrap_or(true)
    }

    /// Whether the node's VM stopped because a port was taken: its log says
    /// so, or it has no log (the distribution port, taken, stops the VM
    /// before it logs).
    fn stopped_for_a_taken_port(&self) -> bool {
        !self.vm_running() && (self.log_text().contains("eaddrinuse") || !self.dir.join("log").exists())
    }

    /// The node's log, empty when it has none yet.
    fn log_text(&self) -> String {
        let log = self.dir.join("log").join(format!("{}.log", self.name));
        std::fs::read_to_string(log).unwrap_or_default()
    }

    /// The `[error]` lines of the node's log, or what to look at when there
    /// are none (a VM that stops before it logs: its distribution port taken).
    fn log_errors(&self) -> String {
        let log = self.log_text();
        let errors: Vec<&str> = log.lines().filter(|l| l.contains("[error]")).take(8).collect();
        if errors.is_empty() {
            format!(
                "no error in its log (ports {}, distribution {})",
                self.port, self.dist_port
            )
        } else {
            errors.join("\n")
        }
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
