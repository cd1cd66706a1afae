//! The delivery log: every step a matched message takes, as a
//! JSON record in the RabbitMQ stream `<prefix>.log`, so that "I said
//! `googlebot: …` and nothing happened — why?" is answered by one command
//! (`swallow-deliverer log`) instead of three stages' logs.
//!
//! The log must never cost a delivery anything. A stage records through a
//! [`DeliveryLog`] handle: `record()` is not async and never waits — it puts
//! the record on a bounded in-memory queue, or drops it and counts it in
//! `swallow_log_records_dropped_total` when the queue is full. One appender
//! task per process takes the records, batches them (up to
//! [`BATCH_RECORDS`] records or [`BATCH_BYTES`] bytes, at most
//! [`FLUSH_INTERVAL`] after the first) into one stream message of
//! newline-separated JSON, and publishes it with a confirm on a connection of
//! its own, so broker flow control on the log never slows the stage's own
//! connection. A batch the broker does not confirm, or that finds no broker,
//! is dropped and counted: the log is best effort, deliveries are not. A
//! process killed with SIGKILL loses at most the records not yet flushed.
//!
//! Records carry ids, never the message text, tokens, secrets or a
//! handler's response body: chat messages can be private, and the log is
//! kept for days.
//!
//! Retention is the stream's: `x-max-age` and `x-max-length-bytes` from
//! `[delivery_log] max_age` and `max_bytes`, set when the stream is first declared.
//! RabbitMQ refuses to re-declare a queue with other arguments, so a stage
//! that finds the stream with other retention keeps using it as it is and
//! says so in one warning (see README, "Why didn't the bot answer?").

mod appender;
mod record;
mod stream;
#[cfg(test)]
mod tests;

use std::time::Duration;

pub use appender::{AppenderTarget, DeliveryLog, start};
pub use record::{LogRecord, Outcome, parse_batch};
pub use stream::{DeliveryLogConfig, stream_exists};

/// How long a record waits for others before its batch is published.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// Records per stream message at most.
pub const BATCH_RECORDS: usize = 256;
/// Bytes per stream message at most (a batch is flushed once it reaches this).
pub const BATCH_BYTES: usize = 128 * 1024;
/// Records waiting for the appender at most; more are dropped and counted.
pub const QUEUE_RECORDS: usize = 16 * 1024;
/// The longest `error` a record keeps.
pub const MAX_ERROR_BYTES: usize = 1024;
/// The header naming a batch's format version; readers skip versions they
/// do not know.
pub const VERSION_HEADER: &str = "x-swallow-log";
/// The batch format this build writes: newline-separated [`LogRecord`]s.
/// Version 2: a `matched` record per delivery job (one integration, the
/// job's `delivery_id` and URL); version 1 wrote one per event, listing the
/// integrations comma-separated, with an empty `delivery_id`.
pub const BATCH_VERSION: &str = "2";
/// The batch formats this build reads: the records are the same shape, only
/// what a `matched` record covers differs.
pub const READ_VERSIONS: [&str; 2] = ["1", BATCH_VERSION];

/// Whether a batch with this `x-swallow-log` header is one this build reads.
pub fn readable(version: Option<&str>) -> bool {
    version.is_some_and(|v| READ_VERSIONS.contains(&v))
}
/// How long a stopping stage waits for its last records to be published.
pub const LINGER: Duration = Duration::from_secs(2);
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
