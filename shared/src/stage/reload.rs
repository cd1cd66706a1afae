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
pub(crate) struct Watched {
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
pub(crate) fn watch_config(config: &Config, metrics: CommonMetrics, shutdown: CancellationToken) -> Watched {
    let initial = config.integrations.clone();
    metrics.integrations_loaded.set(initial.list.len() as i64);
    let (integrations, rx) = watch::channel(initial);
    let (slack_token_tx, token_rx) = watch::channel(Arc::from(slack_token(config).unwrap_or_default()));
    let (slack_ingress_tx, ingress_rx) = watch::channel(Arc::new(slack_ingress(config)));
    let (matrix_ingress_tx, matrix_rx) = watch::channel(Arc::new(matrix_ingress(config)));
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
        let last_bytes = tokio::fs::read(&path).await.ok();
        // The secret files the last valid parse read. The stage started from
        // a parse of its own: when the file still holds that text, its
        // secret files are the last parse's, and a check parses again only
        // on a change (with 10,000 integrations a parse costs a fifth of a
        // second and its own peak of memory). Otherwise none, so that the
        // first check parses whatever it finds.
        let last_secrets = last_bytes
            .as_deref()
            .is_some_and(|bytes| content_hash(bytes) == parsed_hash)
            .then_some(parsed_secrets);
        let mut watcher = Watcher {
            path,
            metrics,
            integrations,
            slack_token: slack_token_tx,
            slack_ingress: slack_ingress_tx,
            matrix_ingress: matrix_ingress_tx,
            last_bytes,
            last_error: None,
            last_secrets,
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            if !watcher.check().await {
                return;
            }
        }
    });
    watched
}

/// The reload loop's state between checks.
struct Watcher {
    path: PathBuf,
    metrics: CommonMetrics,
    integrations: watch::Sender<Arc<Integrations>>,
    slack_token: watch::Sender<Arc<str>>,
    slack_ingress: watch::Sender<Arc<SlackSecrets>>,
    matrix_ingress: watch::Sender<Arc<MatrixSecrets>>,
    last_bytes: Option<Vec<u8>>,
    last_error: Option<String>,
    last_secrets: Option<Vec<(PathBuf, u64)>>,
}

impl Watcher {
    /// One check of the file and its secret files; false once the stage no
    /// longer listens.
    async fn check(&mut self) -> bool {
        let Ok(bytes) = tokio::fs::read(&self.path).await else {
            return true;
        };
        let changed = self.last_bytes.as_ref() != Some(&bytes);
        // Nothing to parse again when neither the file nor a secret file
        // it names changed (with 10,000 integrations a parse is most of
        // an idle stage's CPU).
        let secrets_unchanged = match self.last_secrets.as_deref() {
            Some(files) => unchanged(files).await,
            None => false,
        };
        if !changed && secrets_unchanged {
            return true;
        }
        self.last_bytes = Some(bytes.clone());
        let parsed = String::from_utf8(bytes)
            .map_err(|_| format!("{}: not UTF-8", self.path.display()))
            .and_then(|text| Config::parse(&text, Some(&self.path)).map_err(|e| e.to_string()));
        match parsed {
            Ok(config) => self.apply(config, changed),
            Err(message) => {
                self.last_secrets = None;
                if changed || self.last_error.as_ref() != Some(&message) {
                    self.metrics.config_reloads.with_label_values(&["error"]).inc();
                    error!(error = %message, "configuration reload refused; the integrations in force stay");
                    self.last_error = Some(message);
                }
                true
            }
        }
    }

    /// Puts a valid configuration in force: the secrets, then the
    /// integrations; false once the stage no longer listens.
    fn apply(&mut self, config: Config, changed: bool) -> bool {
        let path = self.path.display();
        self.last_error = None;
        self.last_secrets = Some(config.secret_files.clone());
        let token_changed = slack_token(&config).is_some_and(|new| replace(&self.slack_token, new, |t| Arc::from(t)));
        if token_changed {
            info!(path = %path, "responder.slack_token reloaded");
        }
        let ingress_changed = replace(&self.slack_ingress, &slack_ingress(&config), |s| Arc::new(s.clone()));
        if ingress_changed {
            info!(path = %path, "ingress.slack secrets reloaded");
        }
        let matrix_changed = replace(&self.matrix_ingress, &matrix_ingress(&config), |s| Arc::new(s.clone()));
        if matrix_changed {
            info!(path = %path, "ingress.matrix tokens reloaded");
        }
        let secrets_changed = token_changed || ingress_changed || matrix_changed;
        if !changed && !secrets_changed && *config.integrations == **self.integrations.borrow() {
            return true;
        }
        let count = config.integrations.list.len();
        self.metrics.config_reloads.with_label_values(&["ok"]).inc();
        self.metrics.integrations_loaded.set(count as i64);
        info!(path = %path, integrations = count, "configuration reloaded");
        self.integrations.send(config.integrations).is_ok()
    }
}

/// Sends `new` when it differs from what `tx` holds; whether it did.
fn replace<T: PartialEq + ?Sized>(tx: &watch::Sender<Arc<T>>, new: &T, make: impl FnOnce(&T) -> Arc<T>) -> bool {
    tx.send_if_modified(|now| {
        let differs = **now != *new;
        if differs {
            *now = make(new);
        }
        differs
    })
}
