//! A stage binary whose log the test reads: `RUST_LOG=info` written to a
//! file, for the tests that look for what a stage said (the cluster tests).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;

use crate::{bin_path, free_addr, wait_ready};

/// A stage binary run as a child process with its log (`RUST_LOG=info`)
/// written to a file the test reads; killed when dropped.
pub struct LoggedStage {
    pub child: tokio::process::Child,
    pub ops_addr: SocketAddr,
    pub log: PathBuf,
    pub name: String,
}

impl LoggedStage {
    /// Spawns `bin` with `--config config`, its log in `dir`.
    pub fn spawn(bin: &str, config: &Path, dir: &Path) -> anyhow::Result<LoggedStage> {
        let ops_addr = free_addr();
        let log = dir.join(format!("{bin}-{}.log", ops_addr.port()));
        let file = std::fs::File::create(&log)?;
        let child = tokio::process::Command::new(bin_path(bin))
            .arg("--config")
            .arg(config)
            .env("SWALLOW_HTTP_ADDR", ops_addr.to_string())
            .env_remove("AMQP_URL")
            .env_remove("SWALLOW_PREFIX")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {bin}"))?;
        Ok(LoggedStage {
            child,
            ops_addr,
            log,
            name: bin.to_owned(),
        })
    }

    /// Waits until `/readyz` answers 200; fails the test after `timeout`
    /// with the stage's log.
    pub async fn ready(&self, timeout: Duration) {
        if !wait_ready(&format!("http://{}/readyz", self.ops_addr), timeout).await {
            panic!(
                "{} not ready within {timeout:?}; its log:\n{}",
                self.name,
                self.log_text()
            );
        }
    }

    pub async fn is_ready(&self) -> bool {
        reqwest::get(format!("http://{}/readyz", self.ops_addr))
            .await
            .is_ok_and(|r| r.status().is_success())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
