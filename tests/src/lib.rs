//! Test support shared by swallow's integration, end-to-end and fault tests:
//! finding a real broker, an isolated prefix per test (deleted afterwards),
//! publishing chat events, draining queues, spawning the real binaries and
//! bounded waits with clear failure messages.
//!
//! One module per concern, everything re-exported here: `broker` (finding
//! it, forcing connections closed), `stack` (`TestStack`), `collector`,
//! `processes` (the real binaries, configs, metrics), `own_broker` (a private
//! node), `relay` (a freezable relay), `timing` (waits and rate assertions),
//! `tls` (a test CA), `watchdog` (a test that hangs fails its binary), and
//! the handler, chat and googlebot helpers.

mod broker;
pub mod cluster;
mod collector;
pub mod handler;
mod own_broker;
mod processes;
pub mod prometheus;
mod relay;
pub mod slack_api;
mod stack;
pub mod synapse;
mod timing;
pub mod tls;
mod watchdog;

pub use broker::*;
pub use collector::*;
pub use own_broker::*;
pub use processes::*;
pub use relay::*;
pub use stack::*;
pub use swallow_shared::Topology;
pub use swallow_tools::{chat, googlebot, wait_ready};
pub use timing::*;
