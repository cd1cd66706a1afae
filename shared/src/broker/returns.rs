//! Publishes that may come back unroutable, matched to their returns.

use std::sync::Arc;

use lapin::{BasicProperties, Connection};

use super::publish::{ConfirmedPublisher, PublishError, target};

/// A publisher for messages that may come back unroutable: those to an
/// exchange that others bind to (`chat.outbound`). AMQP's `basic.return`
/// names no publish, and a broker that confirms several publishes at once
/// (`multiple`) leaves the client unable to tell which of them came back;
/// lapin hands the return to whichever confirm it resolves first (a park on
/// the same channel was once reported unroutable, and the reply that came
/// back reported confirmed). So these publishes go on a channel of their
/// own, in batches: a batch is published at once (pipelined), its confirms
/// are all awaited before the next batch starts, and the messages returned
/// within it, wherever lapin put them, are matched to their publishes by
/// their bytes. A return always comes before its publish's confirm, so every
/// return of a batch is in hand when its last confirm is. Messages sent
/// while a batch is under way go in the next one.
pub struct MatchedReturns {
    requests: tokio::sync::mpsc::UnboundedSender<Request>,
}

struct Request {
    exchange: String,
    routing_key: String,
    body: Vec<u8>,
    properties: BasicProperties,
    done: tokio::sync::oneshot::Sender<Result<(), PublishError>>,
}

impl MatchedReturns {
    /// Starts the batching task on `connection` (its channel is opened with
    /// the first batch); it ends when this value is dropped.
    pub fn start(connection: Arc<Connection>, max_batch: usize) -> Self {
        let (requests, batches) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(publish_batches(connection, batches, max_batch.max(1)));
        MatchedReturns { requests }
    }

    /// Publishes a message (mandatory) and waits for its confirm; an
    /// unroutable one is [`PublishError::Unroutable`]. The body is kept
    /// until then, to be matched against what comes back.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: Vec<u8>,
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let (done, outcome) = tokio::sync::oneshot::channel();
        let request = Request {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            body,
            properties,
            done,
        };
        let stopped = || PublishError::Stopped {
            target: target(exchange, routing_key),
        };
        self.requests.send(request).map_err(|_| stopped())?;
        outcome.await.unwrap_or_else(|_| Err(stopped()))
    }
}

async fn publish_batches(
    connection: Arc<Connection>,
    mut batches: tokio::sync::mpsc::UnboundedReceiver<Request>,
    max_batch: usize,
) {
    let mut publisher: Option<ConfirmedPublisher> = None;
    let mut batch = Vec::with_capacity(max_batch);
    while batches.recv_many(&mut batch, max_batch).await > 0 {
        let outcomes = publish_batch(&connection, &mut publisher, &batch).await;
        for (request, outcome) in batch.drain(..).zip(outcomes) {
            let _ = request.done.send(outcome);
        }
    }
    if let Some(publisher) = publisher {
        let _ = publisher.channel().close(200, "stopping".into()).await;
    }
}

/// Sends a batch on the publisher's channel (opened first when there is
/// none) and awaits every confirm: whether each was acked, and every
/// message that came back.
async fn send_batch(
    connection: &Connection,
    publisher: &mut Option<ConfirmedPublisher>,
    batch: &[Request],
) -> Result<(Vec<bool>, Vec<lapin::message::BasicReturnMessage>), PublishError> {
    let channel = match publisher {
        Some(channel) => channel.clone(),
        None => publisher
            .insert(
                ConfirmedPublisher::open(connection)
                    .await
                    .map_err(|source| PublishError::Broker {
                        target: "the channel for messages that may come back".into(),
                        source,
                    })?,
            )
            .clone(),
    };
    let sent = channel
        .send_all(batch.iter().map(|r| {
            (
                r.exchange.as_str(),
                r.routing_key.as_str(),
                r.body.as_slice(),
                r.properties.clone(),
            )
        }))
        .await?;
    let mut acked = Vec::with_capacity(batch.len());
    let mut returned = Vec::new();
    for pending in sent {
        let (_, ack, back) = pending.outcome().await?;
        acked.push(ack);
        returned.extend(back);
    }
    Ok((acked, returned))
}

/// One batch: every message published, every confirm awaited, the returns
/// matched by bytes. When the channel failed for any of them, all of the
/// batch fail (a return may have been on the failed confirm), and the next
/// batch opens a new channel.
async fn publish_batch(
    connection: &Connection,
    publisher: &mut Option<ConfirmedPublisher>,
    batch: &[Request],
) -> Vec<Result<(), PublishError>> {
    let result = send_batch(connection, publisher, batch).await;
    let (acked, mut returned) = match result {
        Ok(outcome) => outcome,
        Err(error) => {
            if let Some(broken) = publisher.take() {
                let channel = broken.channel().clone();
                tokio::spawn(async move {
                    let _ = channel.close(200, "replaced".into()).await;
                });
            }
            let error = error.to_string();
            return batch
                .iter()
                .map(|r| {
                    Err(PublishError::Batch {
                        target: target(&r.exchange, &r.routing_key),
                        error: error.clone(),
                    })
                })
                .collect();
        }
    };
    batch
        .iter()
        .zip(acked)
        .map(|(r, ack)| {
            // Named only for an error.
            let named = || target(&r.exchange, &r.routing_key);
            if let Some(i) = returned
                .iter()
                .position(|m: &lapin::message::BasicReturnMessage| m.delivery.data == r.body)
            {
                let back = returned.swap_remove(i);
                return Err(PublishError::Unroutable {
                    target: named(),
                    reply: back.reply_text.to_string(),
                });
            }
            if ack {
                Ok(())
            } else {
                Err(PublishError::Nacked { target: named() })
            }
        })
        .collect()
}
