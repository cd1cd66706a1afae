//! What every stage does to start and run: its metrics registry with the
//! common metrics, the operations listener (bound first, so a taken port
//! fails the start), the watched integrations, a connection name operators
//! can find, the delivery log's appender, and the supervisor that runs the
//! stage's session on every connection until shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use lapin::Connection;
use prometheus::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::{ops, reload};
use crate::broker::{Health, SessionError, Supervisor};
use crate::config::{Config, Integrations, Stage};
use crate::delivery_log::{self, AppenderTarget, DeliveryLog};
use crate::metrics::CommonMetrics;

/// The operations listener could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("binding the metrics/health listener on {addr}: {source}")]
pub struct ListenError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// A stage that makes HTTP requests (the deliverer, the responder) could
/// not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("building the HTTP client: {0}")]
    Client(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl StartError {
    /// The HTTP client could not be built.
    pub fn client(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        StartError::Client(Box::new(error))
    }
}

/// A stage being started: register the stage's own metrics on `registry`,
/// then [`StageParts::run`] it.
pub struct StageParts {
    stage: Stage,
    pub registry: Registry,
    pub common: CommonMetrics,
    pub health: Health,
    /// The integrations in force, updated on every valid reload.
    pub integrations: watch::Receiver<Arc<Integrations>>,
    /// The responder's Slack token in force, updated on every valid reload.
    pub slack_token: watch::Receiver<Arc<str>>,
    /// `[ingress.slack]`'s secrets in force, updated on every valid reload.
    pub slack_ingress: watch::Receiver<Arc<crate::config::SlackSecrets>>,
    /// `[ingress.matrix]`'s tokens in force, updated on every valid reload.
    pub matrix_ingress: watch::Receiver<Arc<crate::config::MatrixSecrets>>,
    /// The delivery log; the stage keeps clones where it records steps.
    pub log: DeliveryLog,
    appender: Option<JoinHandle<()>>,
    ops_addr: SocketAddr,
    ops_task: JoinHandle<()>,
}

impl StageParts {
    pub async fn new(stage: Stage, config: &Config, shutdown: &CancellationToken) -> Result<Self, ListenError> {
        let registry = Registry::new();
        let common = CommonMetrics::new(&registry);
        let health = Health::default();
        let addr = match stage {
            Stage::Matcher => config.matcher.http_addr,
            Stage::Deliverer => config.deliverer.http_addr,
            Stage::Responder => config.responder.http_addr,
        };
        let (ops_addr, ops_task) = ops::serve(addr, registry.clone(), health.clone(), shutdown.clone())
            .await
            .map_err(|source| ListenError { addr, source })?;
        info!(stage = stage.name(), %ops_addr, "listening for /metrics, /healthz, /readyz");
        let watched = reload::watch_config(config, common.clone(), shutdown.clone());
        let target = AppenderTarget {
            broker: config.broker.clone(),
            connection_name: format!("swallow-{}-log {} {}", stage.name(), config.broker.prefix, short_id()),
            stream: config.broker.topology().log_stream(),
            config: config.delivery_log.clone(),
        };
        let (log, appender) = delivery_log::start(target, &registry);
        Ok(StageParts {
            stage,
            registry,
            common,
            health,
            integrations: watched.integrations,
            slack_token: watched.slack_token,
            slack_ingress: watched.slack_ingress,
            matrix_ingress: watched.matrix_ingress,
            log,
            appender,
            ops_addr,
            ops_task,
        })
    }

    /// Runs `session` on a fresh broker connection, again after every
    /// failure, until `shutdown`.
    pub fn run<F, Fut>(self, config: &Config, shutdown: CancellationToken, mut session: F) -> Running
    where
        F: FnMut(Arc<Connection>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), SessionError>> + Send + 'static,
    {
        let name = self.stage.name();
        let connection_name = format!("swallow-{name} {} {}", config.broker.prefix, short_id());
        let supervisor = Supervisor {
            broker: config.broker.clone(),
            connection_name: connection_name.clone(),
            shutdown,
            health: self.health,
            metrics: self.common,
        };
        let ops_task = self.ops_task;
        let appender = self.appender;
        drop(self.log);
        let task = tokio::spawn(async move {
            supervisor.run(&mut session).await;
            // The stage's handles on the log go with its session; the
            // appender then publishes what it holds and ends.
            drop(session);
            if let Some(appender) = appender {
                let _ = tokio::time::timeout(delivery_log::LINGER, appender).await;
            }
            let _ = ops_task.await;
            info!(stage = name, "stopped");
        });
        Running {
            ops_addr: self.ops_addr,
            connection_name,
            task,
        }
    }
}

fn short_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
}

/// A started stage.
pub struct Running {
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub ops_addr: SocketAddr,
    /// The broker connection's `connection_name`.
    pub connection_name: String,
    task: JoinHandle<()>,
}

impl Running {
    /// Waits until the stage has stopped (after shutdown).
    pub async fn join(self) {
        let _ = self.task.await;
    }
}
