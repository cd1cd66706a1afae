//! The supervisor: connect, run a session, back off, reconnect, forever.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use lapin::Connection;
use lapin::types::ShortString;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Health;
use super::connect::{Addresses, ConnectError, connect_to};
use super::publish::PublishError;
use crate::config::BrokerConfig;
use crate::metrics::CommonMetrics;

/// Why a session ended other than by shutdown.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error("the broker cancelled the consumer of {0}")]
    ConsumerEnded(String),
    #[error("{0}")]
    Other(String),
}

/// How long the supervisor waits for the broker to answer a connection close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the supervisor needs to know about the stage it runs.
pub struct Supervisor {
    pub broker: BrokerConfig,
    pub connection_name: String,
    pub shutdown: CancellationToken,
    pub health: Health,
    pub metrics: CommonMetrics,
}

impl Supervisor {
    /// Runs `session` on a fresh connection (shared so the session can hand
    /// it to its tasks), again and again, until shutdown.
    /// A session returns `Ok` only when it stopped for shutdown.
    pub async fn run<F, Fut>(self, mut session: F)
    where
        F: FnMut(Arc<Connection>) -> Fut,
        Fut: Future<Output = Result<(), SessionError>>,
    {
        let schedule = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(4))
            .with_jitter()
            .without_max_times();
        let mut backoff = schedule.build();
        let mut addresses = Addresses::new(&self.broker.urls);
        let count = self.broker.urls.list().len();
        // Failed connects and sessions since the last wait: another address
        // is tried at once, the backoff waits only once all have failed.
        let mut failed = 0;
        let mut first = true;
        loop {
            if self.shutdown.is_cancelled() {
                return;
            }
            if !first {
                self.metrics.broker_reconnects.inc();
            }
            first = false;
            let url = addresses.next_url();
            let connected = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                c = connect_to(url, &self.broker, &self.connection_name) => c,
            };
            match connected {
                Ok(connection) => {
                    let connection = Arc::new(connection);
                    info!(connection = %self.connection_name, broker = %crate::redact::url(url), "connected to the broker");
                    self.metrics.broker_connected.set(1);
                    let started = Instant::now();
                    let result = session(connection.clone()).await;
                    self.health.set_ready(false);
                    self.metrics.broker_connected.set(0);
                    // Bounded: on a connection that broke midway the close
                    // may never be answered.
                    let close = connection.close(200, ShortString::from("swallow stage stopping"));
                    let _ = tokio::time::timeout(CLOSE_TIMEOUT, close).await;
                    match result {
                        Ok(()) => {
                            info!(connection = %self.connection_name, "disconnected from the broker");
                            return;
                        }
                        Err(error) => {
                            warn!(%error, broker = %crate::redact::url(url), "broker session ended; reconnecting");
                            if started.elapsed() > Duration::from_secs(10) {
                                backoff = schedule.build();
                                failed = 0;
                            }
                        }
                    }
                }
                Err(error) => warn!(%error, "cannot connect to the broker"),
            }
            failed += 1;
            if failed < count {
                continue;
            }
            failed = 0;
            let wait = backoff.next().unwrap_or(Duration::from_secs(10));
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}
