//! SIGTERM/SIGINT become a cancelled token that every task of a stage
//! watches; a stage that does not stop in time is ended.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// How long after its grace period a stopping stage may still take (to hand
/// back what is left and close its channels) before it is ended.
pub(crate) const STOP_MARGIN: Duration = Duration::from_secs(5);

/// A token cancelled on the first SIGTERM or SIGINT. The stage then has
/// `grace` + [`STOP_MARGIN`] to stop by itself; after that, or on a second
/// signal, the process exits at once with status 1. Nothing is lost: what it
/// had not acknowledged goes back to the broker's queues when its
/// connection drops. (A graceful stop can hang where the broker stops
/// reading from the connection, as RabbitMQ's flow control may.)
pub(crate) fn on_signal(grace: Duration) -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let mut signals = Signals::new();
        let name = signals.next().await;
        info!(signal = name, "shutting down: stop consuming, finish in-flight work");
        cancel.cancel();
        let deadline = grace + STOP_MARGIN;
        let why = tokio::select! {
            again = signals.next() => format!("a second {again}"),
            _ = tokio::time::sleep(deadline) => format!("not stopped {}s after {name}", deadline.as_secs()),
        };
        error!(reason = %why, "exiting now; unacknowledged work goes back to the broker's queues");
        std::process::exit(1);
    });
    token
}

#[cfg(unix)]
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    fn new() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        Signals {
            term: signal(SignalKind::terminate()).expect("SIGTERM handler"),
            int: signal(SignalKind::interrupt()).expect("SIGINT handler"),
        }
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn new() -> Self {
        Signals
    }

    async fn next(&mut self) -> &'static str {
        let _ = tokio::signal::ctrl_c().await;
        "ctrl-c"
    }
}
