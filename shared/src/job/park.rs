//! Where a message goes when it is not finished: parked on the delay ladder
//! (see `topology`) to come back to `queue` after the longest step that does
//! not overshoot `wait` (the consumer re-parks it for whatever remains, as
//! its `not_before_ms` says), or dead-lettered with headers saying why.

use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::FieldTable;

use crate::broker::{self, ConfirmedPublisher, PublishError};
use crate::topology::{Topology, park_for, step_for};

/// Publishes `body` to come back to `queue` in about `wait` (confirmed).
/// Waits shorter than the shortest step go straight back to `queue`.
pub async fn park(
    publisher: &ConfirmedPublisher,
    topology: &Topology,
    queue: &str,
    body: &[u8],
    properties: BasicProperties,
    wait: Duration,
) -> Result<(), PublishError> {
    match step_for(wait) {
        Some(step) => {
            let exchange = topology.delay_step_name(step);
            publisher.publish(&exchange, queue, body, properties).await
        }
        None => publisher.publish("", queue, body, properties).await,
    }
}

/// For a message due at `not_before_ms`, which may come back up to
/// `late_ok()` after that (see [`park_for`]; asked only when it parks):
/// `Some(wait)` when it should go back on the ladder for that long;
/// otherwise waits out a remainder too short to park (under 100 ms) and
/// returns `None`: it is due.
pub(crate) async fn wait_until_due(not_before_ms: Option<u64>, late_ok: impl FnOnce() -> Duration) -> Option<Duration> {
    let now = crate::wire::now_millis();
    let due = not_before_ms.filter(|&due| due > now)?;
    let wait = Duration::from_millis(due - now);
    if step_for(wait).is_some() {
        return Some(park_for(wait, late_ok()));
    }
    tokio::time::sleep(wait).await;
    None
}

/// Publishes `body` to the dead-letter queue `queue`, persistent, with
/// `x-swallow-<name>` headers (`reason`, `error`, `attempts`, …).
pub(crate) async fn dead_letter(
    publisher: &ConfirmedPublisher,
    queue: &str,
    body: &[u8],
    headers: &[(&str, String)],
) -> Result<(), PublishError> {
    let mut table = FieldTable::default();
    for (name, value) in headers {
        broker::set_header(&mut table, &format!("x-swallow-{name}"), value.clone());
    }
    publisher
        .publish("", queue, body, broker::persistent_json().with_headers(table))
        .await
}
