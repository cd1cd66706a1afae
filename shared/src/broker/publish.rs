//! Publishing with confirms: [`ConfirmedPublisher`], the channel every
//! stage's hops go through.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection};

use super::connect::silence_bound;

/// A publish the broker did not take.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("publishing to {target}: {source}")]
    Broker { target: String, source: lapin::Error },
    #[error("publishing to {target}: the broker refused the message (nack)")]
    Nacked { target: String },
    #[error("publishing to {target}: unroutable ({reply})")]
    Unroutable { target: String, reply: String },
    #[error("publishing to {target}: no confirm within {after:?}")]
    Unconfirmed { target: String, after: Duration },
    #[error("publishing to {target}: the publisher stopped")]
    Stopped { target: String },
    #[error("publishing to {target}: a publish of its batch failed ({error})")]
    Batch { target: String, error: String },
}

/// A channel in confirm mode. Every publish is mandatory: an unroutable
/// message is an error, never a silent drop.
/// A confirm that does not come within [`silence_bound`] of the
/// connection's heartbeat is a failure: the input is not acknowledged.
/// Cloned for every delivery's task: a clone is one reference count, not a
/// lapin `Channel`'s dozen.
#[derive(Clone)]
pub struct ConfirmedPublisher(Arc<PublisherChannel>);

struct PublisherChannel {
    channel: Channel,
    bound: Duration,
    /// Held while a publish is numbered and queued (see `send`).
    numbering: std::sync::Mutex<()>,
}

/// A publish sent and waiting for the broker's confirm.
pub struct PendingConfirm {
    target: String,
    confirm: lapin::PublisherConfirm,
    bound: Duration,
}

impl PendingConfirm {
    /// Waits for the broker's answer as it came: the target, acked or not,
    /// and the returned message lapin attached to this confirm, which may
    /// be another publish's (see [`MatchedReturns`]).
    pub(super) async fn outcome(
        self,
    ) -> Result<(String, bool, Option<lapin::message::BasicReturnMessage>), PublishError> {
        let target = self.target;
        match tokio::time::timeout(self.bound, self.confirm).await {
            Err(_) => Err(PublishError::Unconfirmed {
                target,
                after: self.bound,
            }),
            Ok(Err(source)) => Err(PublishError::Broker { target, source }),
            Ok(Ok(Confirmation::Ack(back))) => Ok((target, true, back)),
            Ok(Ok(Confirmation::Nack(back))) => Ok((target, false, back)),
            Ok(Ok(Confirmation::NotRequested)) => Ok((target, true, None)),
        }
    }

    /// Waits until the broker has taken responsibility for the message.
    pub async fn confirmed(self) -> Result<(), PublishError> {
        match self.outcome().await? {
            (target, _, Some(returned)) => Err(PublishError::Unroutable {
                target,
                reply: returned.reply_text.to_string(),
            }),
            (target, false, None) => Err(PublishError::Nacked { target }),
            (_, true, None) => Ok(()),
        }
    }
}

impl ConfirmedPublisher {
    pub async fn open(connection: &Connection) -> Result<Self, lapin::Error> {
        let channel = connection.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        let bound = silence_bound(connection.configuration().heartbeat());
        Ok(ConfirmedPublisher(Arc::new(PublisherChannel {
            channel,
            bound,
            numbering: std::sync::Mutex::new(()),
        })))
    }

    /// Sends a message; the returned value resolves when it is confirmed.
    /// Sending many and then awaiting all pipelines the confirms.
    ///
    /// The call itself returns once the connection's I/O thread has written
    /// the message, a round trip to that thread and a socket write of its
    /// own. To send several, use [`ConfirmedPublisher::send_all`].
    pub async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<PendingConfirm, PublishError> {
        let target = target(exchange, routing_key);
        let options = BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        };
        let publish = self
            .0
            .channel
            .basic_publish(exchange.into(), routing_key.into(), options, body, properties);
        let mut publish = std::pin::pin!(publish);
        // lapin numbers a publish (the delivery tag its confirm will carry)
        // and queues its frames in two steps, both in the first poll. Two
        // threads publishing on this channel at once could be numbered in
        // one order and sent in the other, and the broker numbers them as
        // sent: each would get the other's confirm, and a nacked message
        // would be taken as confirmed (its source acked: lost). Polled
        // under this lock, no other publish comes between the two steps.
        let first = std::future::poll_fn(|cx| {
            let _numbering = self
                .0
                .numbering
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            std::task::Poll::Ready(publish.as_mut().poll(cx))
        })
        .await;
        let sent = match first {
            std::task::Poll::Ready(sent) => sent,
            std::task::Poll::Pending => publish.await,
        };
        match sent {
            Ok(confirm) => Ok(PendingConfirm {
                target,
                confirm,
                bound: self.0.bound,
            }),
            Err(source) => Err(PublishError::Broker { target, source }),
        }
    }

    /// Sends several messages, `(exchange, routing key, body, properties)`,
    /// together rather than each awaited in turn: each takes its delivery
    /// tag and queues its frames in one step (under the channel's lock, so
    /// publishes from other threads cannot come between), in the order
    /// given, and one write carries them all. The confirms come back in
    /// the same order.
    pub async fn send_all<'a>(
        &self,
        messages: impl IntoIterator<Item = (&'a str, &'a str, &'a [u8], BasicProperties)>,
    ) -> Result<Vec<PendingConfirm>, PublishError> {
        futures_util::future::try_join_all(
            messages
                .into_iter()
                .map(|(exchange, routing_key, body, properties)| self.send(exchange, routing_key, body, properties)),
        )
        .await
    }

    /// Sends a message and waits for its confirm.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        self.send(exchange, routing_key, body, properties)
            .await?
            .confirmed()
            .await
    }

    pub fn channel(&self) -> &Channel {
        &self.0.channel
    }
}

/// How a publish's destination is named in errors. Built for every publish
/// (its confirm may fail later), so joined rather than `format!`ted, which
/// costs about a thousand instructions more.
pub(super) fn target(exchange: &str, routing_key: &str) -> String {
    if exchange.is_empty() {
        return routing_key.to_owned();
    }
    [exchange, " (", routing_key, ")"].concat()
}
