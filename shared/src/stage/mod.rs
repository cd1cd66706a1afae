//! What every stage binary does around its own work: start ([`parts`]:
//! registry, ops listener, watched configuration, delivery log, supervised
//! connection), the command line ([`cli`]), the ops listener ([`ops`]),
//! configuration reload ([`reload`]), shutdown on signals ([`shutdown`]) and
//! its own log lines ([`logging`]).

pub mod cli;
pub mod logging;
pub mod ops;
pub mod parts;
pub mod reload;
pub mod shutdown;

pub use parts::{ListenError, Running, StageParts, StartError};
