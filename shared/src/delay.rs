//! Parking a message on the delay ladder (see `topology`): it comes back to
//! `queue` after the longest step that does not overshoot `wait`; the
//! consumer re-parks it for whatever remains (its `not_before_ms` says).

use std::time::Duration;

use lapin::BasicProperties;

use crate::broker::{ConfirmedPublisher, PublishError};
use crate::topology::{Topology, step_for};

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
