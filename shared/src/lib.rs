//! What two or more swallow stages share, in folders that depend one way
//! (each only on those above it):
//!
//! - [`redact`], [`metrics`] — leaves: URLs without secrets, metric helpers.
//! - [`config`] — the configuration file, validated; the environment.
//! - [`topology`] — every exchange and queue name and their declaration.
//! - [`wire`] — what crosses the broker: chat events and the versioned jobs.
//! - [`broker`] — connections, confirmed publishing, returns, the supervisor
//!   that reconnects, and the consumer loop.
//! - [`delivery_log`] — the delivery log stream: records and the appender.
//! - [`job`] — the one life of a retried job: lifecycle, dispositions,
//!   retry schedule, pacing, parking on the delay ladder.
//! - [`stage`] — what every stage binary does: start (parts), command line,
//!   the ops listener, reload, shutdown, logging.

pub mod broker;
pub mod config;
pub mod delivery_log;
pub mod job;
pub mod metrics;
pub mod redact;
pub mod stage;
pub mod topology;
pub mod wire;

pub use config::{Config, Integration, Integrations, Stage};
pub use topology::Topology;
pub use wire::event::ChatEvent;

/// `swallow/<version>`, the User-Agent of every request swallow makes.
pub const USER_AGENT: &str = concat!("swallow/", env!("CARGO_PKG_VERSION"));
