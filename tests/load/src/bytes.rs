//! Bytes per hop: the size on the wire of what each hop carries (an event, a
//! delivery job, a reply), taken from a real stack, and what a message's
//! size costs the broker: its CPU per message at its ceiling for several
//! sizes, side by side in one run. The slope says what shrinking the job or
//! the reply would save per matched message.

use std::time::{Duration, Instant};

use lapin::options::{BasicGetOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use swallow_shared::Topology;

use crate::{Stack, broker_pid, ceiling, cpu_seconds, event_body, handler};

/// The message sizes the ceiling is measured at.
const SIZES: &[usize] = &[200, 600, 1_200, 2_400];

/// The first message `queue` holds within 10 s: its body and header bytes.
async fn first_message(conn: &Connection, queue: &str) -> anyhow::Result<(usize, usize)> {
    let ch = conn.create_channel().await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(m) = ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await? {
            let headers = m.delivery.properties.headers().as_ref().map_or(0, header_bytes);
            return Ok((m.delivery.data.len(), headers));
        }
        anyhow::ensure!(Instant::now() < deadline, "nothing arrived on {queue} within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The size of a header table as AMQP encodes it (each entry: the name's
/// length and bytes, a type tag, the value).
fn header_bytes(table: &FieldTable) -> usize {
    table
        .inner()
        .iter()
        .map(|(name, value)| {
            let value = match value {
                AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
                AMQPValue::ShortString(s) => 1 + s.as_str().len(),
                AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) | AMQPValue::Boolean(_) => 1,
                AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
                AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
                _ => 8,
            };
            1 + name.as_str().len() + 1 + value
        })
        .sum()
}

/// Publishes one load event to the stack's events exchange, confirmed.
async fn publish_one(conn: &Connection, topology: &Topology) -> anyhow::Result<usize> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(Default::default()).await?;
    let body = event_body(1, "load");
    ch.basic_publish(
        topology.events_exchange().as_str().into(),
        "load".into(),
        BasicPublishOptions::default(),
        &body,
        BasicProperties::default().with_delivery_mode(2),
    )
    .await?
    .await?;
    Ok(body.len())
}

/// The sizes on the wire, then the broker's CPU per message by size.
pub async fn measure(url: &str, seconds: u64, window: usize) -> anyhow::Result<serde_json::Value> {
    let (addr, _) = handler(Duration::ZERO).await;
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    // The matcher alone: the job stays on its queue.
    let mut stack = Stack::start_stages(url, addr, "bytes", None, &["swallow-matcher"]).await?;
    let topology = Topology::new(&stack.prefix);
    let event = publish_one(&conn, &topology).await?;
    let (job, job_headers) = first_message(&conn, &topology.delivery_queue_for("load")).await?;
    // With the deliverer: the reply stays on its queue (no responder).
    stack.add("swallow-deliverer").await?;
    publish_one(&conn, &topology).await?;
    let (reply, reply_headers) = first_message(&conn, &topology.replies_queue()).await?;
    stack.stop().await;
    println!(
        "    on the wire (body bytes, +header bytes): event {event}, delivery job {job} (+{job_headers}), reply {reply} (+{reply_headers})"
    );
    let mut by_size = Vec::new();
    let broker = broker_pid();
    for &size in SIZES {
        let before = broker.and_then(cpu_seconds);
        let (rate, through) = ceiling(url, seconds, window, size).await?;
        let per_msg_us = broker
            .and_then(cpu_seconds)
            .zip(before)
            .map(|(after, before)| (after - before) / through.max(1) as f64 * 1e6);
        println!(
            "    {size}-byte messages: ceiling {rate:.0} msg/s, broker {} µs CPU per message",
            per_msg_us.map_or("?".into(), |v| format!("{v:.1}"))
        );
        by_size.push(serde_json::json!({"bytes": size, "ceiling_msgs_per_s": rate, "broker_us_per_msg": per_msg_us}));
    }
    let _ = conn.close(200, "".into()).await;
    Ok(serde_json::json!({
        "event_bytes": event, "job_bytes": job, "job_header_bytes": job_headers,
        "reply_bytes": reply, "reply_header_bytes": reply_headers, "ceiling_by_size": by_size,
    }))
}
