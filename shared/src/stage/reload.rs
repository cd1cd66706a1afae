//! Reloading the integrations when the file or a secret file it names
//! changes (a Kubernetes ConfigMap or Secret update swaps a symlink, so the
//! files are polled by content rather than watched by inode): every check
//! reads them, parses and validates the file again when any of them differs
//! from what the last parse read, and the integrations change when the
//! result differs. An invalid file, or a secret file that is missing or
//! empty, is refused with a log line and a metric (once per distinct
//! error), and the integrations in force stay. The responder's Slack token
//! (`[responder] slack_token_file`) is re-read the same way.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::config::{Config, Integrations, Sink, content_hash};
use crate::config::{MatrixSecrets, SlackSecrets};
use crate::metrics::CommonMetrics;

/// What a reload check can change while a stage runs.
pub struct Watched {
    /// The integrations in force.
    pub integrations: watch::Receiver<Arc<Integrations>>,
    /// The Slack token in force: `[responder] slack_token`, the file
    /// `slack_token_file` names, or `SWALLOW_SLACK_TOKEN`; empty unless the
    /// sink is Slack.
    pub slack_token: watch::Receiver<Arc<str>>,
    /// `[ingress.slack]`'s secrets in force (signing secrets, bot token),
    /// re-read from their files like the rest; empty without one.
    pub slack_ingress: watch::Receiver<Arc<SlackSecrets>>,
    /// `[ingress.matrix]`'s tokens in force, re-read the same way; empty without one.
    pub matrix_ingress: watch::Receiver<Arc<MatrixSecrets>>,
}

fn matrix_ingress(config: &Config) -> MatrixSecrets {
    let matrix = config.ingress.as_ref().and_then(|i| i.matrix.as_ref());
    matrix.map(|m| m.secrets.clone()).unwrap_or_default()
}

fn slack_ingress(config: &Config) -> SlackSecrets {
    let slack = config.ingress.as_ref().and_then(|i| i.slack.as_ref());
    slack.map(|s| s.secrets.clone()).unwrap_or_default()
}

/// Whether every secret file still holds what it held (by hash).
async fn unchanged(files: &[(PathBuf, u64)]) -> bool {
    for (path, hash) in files {
        if !tokio::fs::read(path)
            .await
            .is_ok_and(|bytes| content_hash(&bytes) == *hash)
        {
            return false;
        }
    }
    true
}

fn slack_token(config: &Config) -> Option<&str> {
    match &config.responder.sink {
        Sink::Slack { token, .. } => Some(token),
        _ => None,
    }
}

/// Starts watching the configuration file `config.path` (when there is one)
/// and returns what is in force, updated on every valid change.
pub fn watch_config(config: &Config, metrics: CommonMetrics, shutdown: CancellationToken) -> Watched {
    let initial = config.integrations.clone();
    metrics.integrations_loaded.set(initial.list.len() as i64);
    let (tx, rx) = watch::channel(initial);
    let (token_tx, token_rx) = watch::channel(Arc::from(slack_token(config).unwrap_or_default()));
    let (ingress_tx, ingress_rx) = watch::channel(Arc::new(slack_ingress(config)));
    let (matrix_tx, matrix_rx) = watch::channel(Arc::new(matrix_ingress(config)));
    let watched = Watched {
        integrations: rx,
        slack_token: token_rx,
        slack_ingress: ingress_rx,
        matrix_ingress: matrix_rx,
    };
    let interval = config.reload_interval;
    let Some(path) = config.path.clone() else {
        return watched;
    };
    let (parsed_hash, parsed_secrets) = (config.text_hash, config.secret_files.clone());
    tokio::spawn(async move {
        let mut last_bytes = tokio::fs::read(&path).await.ok();
        let mut last_error: Option<String> = None;
        // The secret files the last valid parse read. The stage started from
        // a parse of its own: when the file still holds that text, its
        // secret files are the last parse's, and a check parses again only
        // on a change (with 10,000 integrations a parse costs a fifth of a
        // second and its own peak of memory). Otherwise none, so that the
        // first check parses whatever it finds.
        let mut last_secrets: Option<Vec<(PathBuf, u64)>> = last_bytes
            .as_deref()
            .is_some_and(|bytes| content_hash(bytes) == parsed_hash)
            .then_some(parsed_secrets);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            let Ok(bytes) = tokio::fs::read(&path).await else {
                continue;
            };
            let changed = last_bytes.as_ref() != Some(&bytes);
            // Nothing to parse again when neither the file nor a secret file
            // it names changed (with 10,000 integrations a parse is most of
            // an idle stage's CPU).
            let secrets_unchanged = match last_secrets.as_deref() {
                Some(files) => unchanged(files).await,
                None => false,
            };
            if !changed && secrets_unchanged {
                continue;
            }
            last_bytes = Some(bytes.clone());
            let parsed = String::from_utf8(bytes)
                .map_err(|_| format!("{}: not UTF-8", path.display()))
                .and_then(|text| Config::parse(&text, Some(&path)).map_err(|e| e.to_string()));
            match parsed {
                Ok(config) => {
                    last_error = None;
                    last_secrets = Some(config.secret_files.clone());
                    let token_changed = slack_token(&config).is_some_and(|new| {
                        token_tx.send_if_modified(|token| {
                            let differs = **token != *new;
                            if differs {
                                *token = Arc::from(new);
                            }
                            differs
                        })
                    });
                    if token_changed {
                        info!(path = %path.display(), "responder.slack_token reloaded");
                    }
                    let secrets = slack_ingress(&config);
                    let ingress_changed = ingress_tx.send_if_modified(|now| {
                        let differs = **now != secrets;
                        if differs {
                            *now = Arc::new(secrets);
                        }
                        differs
                    });
                    if ingress_changed {
                        info!(path = %path.display(), "ingress.slack secrets reloaded");
                    }
                    let tokens = matrix_ingress(&config);
                    let matrix_changed = matrix_tx.send_if_modified(|now| {
                        let differs = **now != tokens;
                        if differs {
                            *now = Arc::new(tokens);
                        }
                        differs
                    });
                    if matrix_changed {
                        info!(path = %path.display(), "ingress.matrix tokens reloaded");
                    }
                    if !changed && !token_changed && !ingress_changed && *config.integrations == **tx.borrow() {
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
                    last_secrets = None;
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
    watched
}
