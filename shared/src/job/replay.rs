//! `replay`: moves dead jobs back into line — `swallow-deliverer replay`
//! the delivery jobs, `swallow-responder replay` the replies.
//!
//! It looks at each message that was in the kind's dead queue when it
//! started (at most once), moves the ones that match into their work queue
//! as fresh jobs (attempts and age reset, the same delivery id), confirmed
//! before each dead copy is acknowledged, and leaves the rest where they
//! were: it returns once they are back in the queue.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;

use super::lifecycle::Job;
use crate::broker::{self, ConfirmedPublisher, SessionError};
use crate::config::BrokerConfig;
use crate::wire::messages::{RetryState, now_millis};

/// What a replay did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Replayed {
    pub moved: usize,
    /// Of those moved, the ones the broker had set aside past the delivery
    /// limit (their handling killed the stage that took them): moved back,
    /// they may do it again.
    pub past_delivery_limit: usize,
    /// Looked at and left in the dead queue (another integration, or not a job).
    pub left: usize,
    /// The dead queue it looked at.
    pub dead_queue: String,
}

/// Why the broker itself dead-lettered a message: the reason of the newest
/// `x-death` entry (`delivery_limit` for a message set aside past the
/// work queue's delivery limit). Swallow's own dead letters have none.
pub fn broker_death_reason(properties: &lapin::BasicProperties) -> Option<String> {
    use lapin::types::AMQPValue;
    if broker::header_str(properties, "x-swallow-reason").is_some() {
        return None;
    }
    let headers = properties.headers().as_ref()?;
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
        return None;
    };
    match deaths.as_slice().first()? {
        AMQPValue::FieldTable(newest) => match newest.inner().get("reason")? {
            AMQPValue::LongString(reason) => Some(String::from_utf8_lossy(reason.as_bytes()).into_owned()),
            _ => None,
        },
        _ => None,
    }
}

/// Moves up to `limit` dead `J`s (of `integration`, when given) back into
/// their work queue; `program` names the connection.
pub async fn replay<J: Job>(
    config: &BrokerConfig,
    program: &str,
    integration: Option<&str>,
    limit: Option<usize>,
) -> Result<Replayed, SessionError> {
    let topology = config.topology();
    let connection = broker::connect(config, &format!("{program} replay")).await?;
    topology.declare_on(&connection).await?;
    let channel = connection.create_channel().await?;
    let dead = J::dead_queue(&topology);
    let present = broker::ready_count(&connection, &dead).await? as usize;
    let mut done = Replayed {
        dead_queue: dead.clone(),
        ..Replayed::default()
    };
    if present == 0 || limit == Some(0) {
        let _ = connection.close(200, "replay done".into()).await;
        return Ok(done);
    }
    let publisher = ConfirmedPublisher::open(&connection).await?;
    channel
        .basic_qos(present.min(10_000) as u16, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            dead.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut seen = 0;
    while seen < present && limit.is_none_or(|l| done.moved < l) {
        // Known to be there: a long wait means someone else holds them.
        let next = match tokio::time::timeout(NEXT_WAIT, consumer.next()).await {
            Ok(Some(next)) => next?,
            _ => break,
        };
        seen += 1;
        let job = serde_json::from_slice::<J>(&next.data);
        // A job the broker set aside has no `x-swallow-*` headers: its own
        // integration id says.
        let wanted = integration.is_none_or(|id| {
            broker::header_str(&next.properties, "x-swallow-integration").as_deref() == Some(id)
                || job.as_ref().is_ok_and(|job| job.integration_id() == id)
        });
        match (wanted, job) {
            (true, Ok(mut job)) => {
                *job.retry_mut() = RetryState::new(now_millis());
                let body = serde_json::to_vec(&job).expect("a job always serializes");
                let work = job.home_queue(&topology);
                publisher.publish("", &work, &body, broker::persistent_json()).await?;
                next.ack(BasicAckOptions::default()).await?;
                done.moved += 1;
                if broker_death_reason(&next.properties).as_deref() == Some("delivery_limit") {
                    done.past_delivery_limit += 1;
                }
            }
            // Left unacknowledged: back in the dead queue when the channel closes.
            _ => done.left += 1,
        }
    }
    // Hand back what was looked at and left (the broker requeues a closed
    // channel's unacknowledged messages), then wait until the queue shows it
    // again: a replay run right after this one must find it there.
    let _ = channel.close(200, "replay done".into()).await;
    wait_until_back(&connection, &dead, present - done.moved).await?;
    let _ = connection.close(200, "replay done".into()).await;
    Ok(done)
}

impl Replayed {
    /// What the replay did, in words for the operator who ran it: `noun`
    /// is what a job is called there ("job", "reply job"), `stage` the kind
    /// of process a poison one kills ("deliverer").
    pub fn report(&self, noun: &str, stage: &str) -> String {
        let mut text = format!(
            "moved {} dead {noun}(s) back into line; left {} in {}",
            self.moved, self.left, self.dead_queue
        );
        if self.past_delivery_limit > 0 {
            text.push_str(&format!(
                "\n{} of them had been set aside by the broker past the delivery limit \
                 (x-death reason delivery_limit): each was taken by a {stage} that died before finishing it",
                self.past_delivery_limit
            ));
        }
        text
    }
}

/// Waits (up to [`REQUEUE_WAIT`]) until `queue` shows `back` messages ready.
async fn wait_until_back(connection: &lapin::Connection, queue: &str, back: usize) -> Result<(), SessionError> {
    let deadline = tokio::time::Instant::now() + REQUEUE_WAIT;
    while tokio::time::Instant::now() < deadline && (broker::ready_count(connection, queue).await? as usize) < back {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// How long a replay waits for the next of the dead jobs it counted (a
/// loaded broker may pause for seconds).
const NEXT_WAIT: Duration = Duration::from_secs(10);

/// How long a replay waits for the dead jobs it left to be back in the queue.
const REQUEUE_WAIT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::Replayed;

    #[test]
    fn the_report_says_what_moved_and_what_was_set_aside() {
        let done = Replayed {
            moved: 3,
            past_delivery_limit: 0,
            left: 2,
            dead_queue: "p.replies.dead".to_owned(),
        };
        assert_eq!(
            done.report("reply job", "responder"),
            "moved 3 dead reply job(s) back into line; left 2 in p.replies.dead"
        );
        let poisoned = Replayed {
            past_delivery_limit: 1,
            dead_queue: "p.deliveries.dead".to_owned(),
            ..done
        };
        let text = poisoned.report("job", "deliverer");
        assert!(
            text.ends_with("1 of them had been set aside by the broker past the delivery limit (x-death reason delivery_limit): each was taken by a deliverer that died before finishing it"),
            "{text}"
        );
    }
}
