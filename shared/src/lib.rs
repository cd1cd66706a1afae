//! What two or more swallow stages share: configuration, the messages that
//! cross the broker, the topology, the broker connection and its recovery,
//! the operations listener, shutdown, logging, reload, the pacing and retry
//! logic, the one lifecycle of a job that is retried (`lifecycle`), and the
//! delivery log every stage appends to (`delivery_log`).

pub mod broker;
pub mod cli;
pub mod config;
pub mod consume;
pub mod delay;
pub mod delivery_log;
pub mod event;
pub mod ingress_config;
pub mod lifecycle;
pub mod logging;
pub mod messages;
pub mod metrics;
pub mod ops;
pub mod pacing;
pub mod reload;
pub mod retry;
pub mod shutdown;
pub mod stage;
pub mod topology;

pub use config::{Config, Integration, Integrations, Stage};
pub use event::ChatEvent;
pub use topology::Topology;

/// `swallow/<version>`, the User-Agent of every request swallow makes.
pub const USER_AGENT: &str = concat!("swallow/", env!("CARGO_PKG_VERSION"));
