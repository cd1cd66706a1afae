//! A private RabbitMQ node for a test that must stop its broker.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use lapin::{Connection, ConnectionProperties};

use crate::{free_addr, tempdir};

/// A RabbitMQ node of a test's own, on free ports, that the test may stop
/// and start again without disturbing the shared broker. Stopped on drop.
pub struct OwnBroker {
    pub node: String,
    pub port: u16,
    dir: PathBuf,
}

impl OwnBroker {
    /// Starts a node and waits until it accepts connections.
    pub async fn start() -> anyhow::Result<OwnBroker> {
        Self::start_with(&[], "").await
    }

    /// Starts a node with `plugins` enabled and `extra_conf` appended to its
    /// rabbitmq.conf; waits until it accepts connections.
    pub async fn start_with(plugins: &[&str], extra_conf: &str) -> anyhow::Result<OwnBroker> {
        let port = free_addr().port();
        let dist = free_addr().port();
        let node = format!("swallow-t{port}@localhost");
        let dir = tempdir("rabbit");
        std::fs::write(dir.join("plugins"), format!("[{}].\n", plugins.join(",")))?;
        // The machine's rabbitmq.conf pins the shared broker's listener: the
        // node gets a configuration file of its own.
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.local = 127.0.0.1:{port}\n{extra_conf}"),
        )?;
        let status = std::process::Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(&dir)
            .status()?;
        anyhow::ensure!(status.success(), "chown of {} to rabbitmq failed", dir.display());
        let broker = OwnBroker { node, port, dir };
        std::fs::write(broker.dir.join("dist_port"), dist.to_string())?;
        broker.boot().await?;
        Ok(broker)
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Starts the node (again) with its data directory; waits until it answers.
    pub async fn boot(&self) -> anyhow::Result<()> {
        let dist = std::fs::read_to_string(self.dir.join("dist_port"))?;
        let d = &self.dir;
        let status = tokio::process::Command::new("rabbitmq-server")
            .arg("-detached")
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", dist.trim())
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_PID_FILE", d.join("pid"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("plugins"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .context("running rabbitmq-server (fault tests need a local RabbitMQ installation)")?;
        anyhow::ensure!(status.success(), "rabbitmq-server -detached failed");
        let url = self.url();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(c) = Connection::connect(&url, ConnectionProperties::default()).await {
                let _ = c.close(200, "".into()).await;
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("node {} did not accept connections within 60 s", self.node);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Stops the node (the whole Erlang VM).
    pub async fn stop(&self) -> anyhow::Result<()> {
        let status = tokio::process::Command::new("rabbitmqctl")
            .args(["-q", "-n", &self.node, "stop"])
            .stdout(Stdio::null())
            .status()
            .await?;
        anyhow::ensure!(status.success(), "rabbitmqctl -n {} stop failed", self.node);
        Ok(())
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["-q", "-n", &self.node, "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
