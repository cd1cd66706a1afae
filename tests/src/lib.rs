//! Test support shared by swallow's end-to-end and fault tests and the load
//! generator: finding a real broker, an isolated prefix per test (deleted
//! afterwards), publishing chat events, draining queues, spawning the real
//! binaries and bounded waits with clear failure messages. tests/README.md
//! maps the modules.
//!
//! One module per concern; what the tests use is re-exported here by name.

mod broker;
mod chat_side;
mod cluster;
mod collector;
mod config;
pub mod handler;
mod logged_stage;
mod node;
mod own_broker;
mod processes;
pub mod prometheus;
mod relay;
pub mod slack_api;
mod stack;
pub mod synapse;
mod temp;
mod timing;
pub mod tls;
mod watchdog;

pub use broker::{broker_url, close_connection_named, close_connections_matching, delete_declared_blocking};
pub use chat_side::ChatSide;
pub use cluster::{Cluster, busiest};
pub use collector::{Collector, header, listen_outbound, listen_outbound_durable, listen_outbound_for};
pub use config::{ConfigToml, Integration, LOOPBACK, Raw, TomlValue, rate_limit};
pub use logged_stage::LoggedStage;
pub use node::{Node, chown_to_rabbitmq, node_stem};
pub use own_broker::OwnBroker;
pub use processes::{
    Pipeline, StageProcess, bin_path, chat_event, delivery_job, free_addr, metric, metric_in, run_command, write_config,
};
pub use relay::{ConfirmSwallowingRelay, FreezableRelay};
pub use stack::TestStack;
pub use swallow_shared::Topology;
pub use swallow_tools::{chat, googlebot, wait_ready};
pub use temp::TempDir;
pub use timing::{ARRIVAL_JITTER, LADDER_LATENESS, assert_paced, assert_within_limit, wait_for};
