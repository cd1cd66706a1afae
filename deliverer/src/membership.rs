//! The deliverer's session on one connection: it announces this replica on
//! `<prefix>.deliverers`, hears the others, and every tick brings the shards
//! it serves in line with the assignment (see `shards` for the rules):
//! taking a shard's exclusive lease before consuming it, and giving one up
//! only after its work under way has finished.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use lapin::options::{BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use tokio_util::sync::CancellationToken;
use tracing::info;

use swallow_shared::broker::consume::{QueueOptions, consume_queue};
use swallow_shared::broker::{self, ConfirmedPublisher, SessionError};

use crate::{Context, SHUTDOWN_GRACE, jobs, shards};

/// One connection's worth of work: announce this replica, keep the shards
/// the assignment gives it (see `shards`), serve each on its own channel.
pub(crate) async fn session(connection: Arc<Connection>, ctx: Arc<Context>) -> Result<(), SessionError> {
    ctx.topology.declare_on(&connection).await?;
    let channel = connection.create_channel().await?;
    let publisher = ConfirmedPublisher::open(&connection).await?;
    let exchange = ctx.topology.deliverers_exchange();
    let mut announcements = broker::subscribe(&channel, &exchange, "").await?;
    ctx.health.set_ready(true);
    info!(replica = %ctx.replica_id, shards = ctx.topology.shards(), "deliverer consuming its shards");

    let mut seen: HashMap<String, Instant> = HashMap::new();
    let mut held: HashMap<u32, HeldShard> = HashMap::new();
    let mut tick = tokio::time::interval(shards::TICK);
    let result = loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => break Ok(()),
            next = announcements.next() => match next {
                Some(Ok(d)) => {
                    if let Ok(id) = std::str::from_utf8(&d.data) {
                        seen.insert(id.to_owned(), Instant::now());
                    }
                }
                Some(Err(e)) => break Err(e.into()),
                None => break Err(SessionError::ConsumerEnded(exchange.clone())),
            },
            _ = tick.tick() => {
                if let Err(e) = channel
                    .basic_publish(exchange.as_str().into(), "".into(), BasicPublishOptions::default(), ctx.replica_id.as_bytes(), BasicProperties::default())
                    .await
                {
                    break Err(e.into());
                }
                // Bounded: a broker that stops answering (and still sends
                // heartbeats) would hold the session here for good.
                let bound = broker::silence_bound(connection.configuration().heartbeat());
                match tokio::time::timeout(bound, rebalance(&connection, &ctx, &publisher, &mut seen, &mut held)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => break Err(e),
                    Err(_) => break Err(SessionError::Other(format!("the broker did not answer within {bound:?} (taking shards)"))),
                }
            }
        }
    };
    ctx.health.set_ready(false);
    release(held, result.is_ok()).await;
    ctx.metrics.shards_held.set(0);
    if result.is_ok() {
        let _ = publisher.channel().close(200, "stopping".into()).await;
        let _ = channel.close(200, "stopping".into()).await;
    }
    result
}

/// Lets go of every shard held: on shutdown (`graceful`) each finishes its
/// work under way and releases its lease; when the connection is gone,
/// nothing can be acknowledged or released on it any more (and calls on it
/// may never answer), so the tasks are aborted and the broker requeues the
/// shards' unacknowledged jobs and frees their leases by itself.
async fn release(mut held: HashMap<u32, HeldShard>, graceful: bool) {
    if graceful {
        for shard in held.values() {
            shard.stop.cancel();
        }
        for (_, shard) in held.drain() {
            let _ = shard.task.await;
        }
    } else {
        for (_, shard) in held.drain() {
            shard.task.abort();
        }
    }
}

/// A shard this replica serves (or is giving up).
struct HeldShard {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), SessionError>>,
}

/// Forgets the circuits no job has asked about for a while, so that an idle
/// circuit does not stay open, and alerting, for ever.
fn forget_idle_circuits(ctx: &Context) {
    let forgotten = ctx.circuits.forget_idle(swallow_shared::wire::messages::now_millis());
    if forgotten.is_empty() {
        return;
    }
    for (integration, url) in &forgotten {
        let url = swallow_shared::redact::url(url);
        info!(
            %integration,
            %url,
            idle_s = crate::circuit::IDLE_FORGET.as_secs(),
            "open circuit forgotten: no job asked for it in idle_s (the next one is attempted)"
        );
    }
    ctx.metrics.circuits_open.set(ctx.circuits.open() as i64);
}

/// Brings the shards held in line with the assignment for the members seen.
async fn rebalance(
    connection: &Arc<Connection>,
    ctx: &Arc<Context>,
    publisher: &ConfirmedPublisher,
    seen: &mut HashMap<String, Instant>,
    held: &mut HashMap<u32, HeldShard>,
) -> Result<(), SessionError> {
    reap_finished(held).await?;
    seen.insert(ctx.replica_id.clone(), Instant::now());
    seen.retain(|_, at| at.elapsed() < shards::MEMBER_TTL);
    let members: BTreeSet<String> = seen.keys().cloned().collect();
    let integrations = ctx.integrations.borrow().clone();
    let weights = shards::shard_weights(&ctx.topology, &integrations);
    let mine = shards::assign(&weights, &members)
        .remove(&ctx.replica_id)
        .unwrap_or_default();
    ctx.metrics.members.set(members.len() as i64);

    for (k, shard) in held.iter() {
        if !mine.contains(k) && !shard.stop.is_cancelled() {
            info!(shard = k, "giving the shard up to another replica");
            shard.stop.cancel();
            // The next owner starts with its circuits closed.
            let queue = ctx.topology.delivery_shard_queue(*k);
            ctx.circuits.retain(|id| ctx.topology.delivery_queue_for(id) != queue);
            ctx.metrics.circuits_open.set(ctx.circuits.open() as i64);
        }
    }
    forget_idle_circuits(ctx);
    for &k in &mine {
        if !held.contains_key(&k)
            && let Some(shard) = take_shard(connection, ctx, publisher, k).await?
        {
            held.insert(k, shard);
        }
    }
    let serving = held.values().filter(|h| !h.stop.is_cancelled()).count();
    ctx.metrics.shards_held.set(serving as i64);
    Ok(())
}

/// Shards given up (or failed) are done once their task has finished; a
/// failed one fails the session.
async fn reap_finished(held: &mut HashMap<u32, HeldShard>) -> Result<(), SessionError> {
    let finished: Vec<u32> = held
        .iter()
        .filter(|(_, h)| h.task.is_finished())
        .map(|(k, _)| *k)
        .collect();
    for k in finished {
        let shard = held.remove(&k).expect("listed above");
        match shard.task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(e) => return Err(SessionError::Other(format!("shard {k}: {e}"))),
        }
    }
    Ok(())
}

/// Takes shard `k`'s lease and starts serving it, or `None` when another
/// replica still holds the lease (a broker error closed the lease channel;
/// it is tried again on a later tick). Each shard may bring up to twice
/// `concurrency` jobs (attempts under way and jobs waiting for a turn);
/// `permits` bounds the attempts under way across all shards.
async fn take_shard(
    connection: &Arc<Connection>,
    ctx: &Arc<Context>,
    publisher: &ConfirmedPublisher,
    k: u32,
) -> Result<Option<HeldShard>, SessionError> {
    let lease_channel = connection.create_channel().await?;
    let lease = ctx.topology.shard_lease_queue(k);
    let exclusive = QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    };
    let granted = lease_channel
        .queue_declare(lease.as_str().into(), exclusive, FieldTable::default())
        .await;
    if granted.is_err() {
        return Ok(None);
    }
    let stop = ctx.shutdown.child_token();
    let task = tokio::spawn(serve_shard(
        lease_channel,
        ctx.clone(),
        publisher.clone(),
        k,
        stop.clone(),
    ));
    Ok(Some(HeldShard { stop, task }))
}

/// Serves shard `k` until `stop`, then releases its lease.
async fn serve_shard(
    channel: Channel,
    ctx: Arc<Context>,
    publisher: ConfirmedPublisher,
    k: u32,
    stop: CancellationToken,
) -> Result<(), SessionError> {
    let queue = ctx.topology.delivery_shard_queue(k);
    let options = QueueOptions {
        stage: "deliverer",
        queue: &queue,
        prefetch: ctx.prefetch,
        stop: &stop,
        grace: SHUTDOWN_GRACE,
    };
    let handler_ctx = ctx.clone();
    let shard = jobs::OnShard { k, stop: stop.clone() };
    let result = consume_queue(
        &channel,
        &publisher,
        options,
        || {},
        |delivery, publisher, settler| jobs::handle(delivery, handler_ctx.clone(), publisher, settler, shard.clone()),
    )
    .await;
    if result.is_ok() {
        let lease = ctx.topology.shard_lease_queue(k);
        let _ = channel
            .queue_delete(lease.as_str().into(), QueueDeleteOptions::default())
            .await;
        let _ = channel.close(200, "shard released".into()).await;
    }
    result
}
