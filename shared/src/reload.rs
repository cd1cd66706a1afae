//! Reloading the integrations when the file or a secret file it names
//! changes (a Kubernetes ConfigMap or Secret update swaps a symlink, so the
//! files are polled by content rather than watched by inode): every check
//! reads and validates them again, and the integrations change when the
//! result differs. An invalid file, or a secret file that is missing or
//! empty, is refused with a log line and a metric (once per distinct
//! error), and the integrations in force stay.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::config::{Config, Integrations};
use crate::metrics::CommonMetrics;

/// Starts watching `path` (when there is one) and returns the integrations in
/// force, updated on every valid change.
pub fn watch_integrations(
    path: Option<PathBuf>,
    initial: Arc<Integrations>,
    interval: Duration,
    metrics: CommonMetrics,
    shutdown: CancellationToken,
) -> watch::Receiver<Arc<Integrations>> {
    metrics.integrations_loaded.set(initial.list.len() as i64);
    let (tx, rx) = watch::channel(initial);
    let Some(path) = path else { return rx };
    tokio::spawn(async move {
        let mut last_bytes = tokio::fs::read(&path).await.ok();
        let mut last_error: Option<String> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            let Ok(bytes) = tokio::fs::read(&path).await else {
                continue;
            };
            let changed = last_bytes.as_ref() != Some(&bytes);
            last_bytes = Some(bytes.clone());
            let parsed = String::from_utf8(bytes)
                .map_err(|_| format!("{}: not UTF-8", path.display()))
                .and_then(|text| Config::parse(&text, Some(&path)).map_err(|e| e.to_string()));
            match parsed {
                Ok(config) => {
                    last_error = None;
                    if !changed && *config.integrations == **tx.borrow() {
                        continue;
                    }
                    let count = config.integrations.list.len();
                    metrics.config_reloads.with_label_values(&["ok"]).inc();
                    metrics.integrations_loaded.set(count as i64);
                    info!(path = %path.display(), integrations = count, "configuration reloaded");
                    if tx.send(config.integrations).is_err() {
                        return;
                    }
                }
                Err(message) => {
                    if !changed && last_error.as_ref() == Some(&message) {
                        continue;
                    }
                    metrics.config_reloads.with_label_values(&["error"]).inc();
                    error!(error = %message, "configuration reload refused; the integrations in force stay");
                    last_error = Some(message);
                }
            }
        }
    });
    rx
}
