//! What the delay ladder costs the broker, side by side in one run: a plain
//! hop through a quorum queue (publish, deliver, ack) against parking a
//! message on a step (publish onto a quorum queue with a message TTL),
//! holding parked messages, and one whole trip (park, expire, dead-letter
//! back to a quorum queue, deliver, ack). The steps are declared as the
//! stages declare them (`at-least-once` dead-lettering, which a message
//! nothing may lose needs), and once more with `at-most-once` to show what
//! that guarantee costs.

use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use lapin::options::{BasicAckOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::{broker_pid, consume, cpu_seconds};

/// A delivery job's size on the wire (see the bytes-per-hop step).
const BODY: usize = 400;
/// The longest step's TTL: parked messages stay for the whole measurement.
const LONG: Duration = Duration::from_millis(409_600);
/// The shortest step's TTL: a trip.
const SHORT: Duration = Duration::from_millis(100);
/// How long holding is watched.
const HOLD: Duration = Duration::from_secs(5);

/// The broker's CPU seconds while `work` runs (`None` without its pid).
async fn broker_cpu<T>(work: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<(T, Option<f64>)> {
    let broker = broker_pid();
    let before = broker.and_then(cpu_seconds);
    let out = work.await?;
    let cpu = broker.and_then(cpu_seconds).zip(before).map(|(a, b)| a - b);
    Ok((out, cpu))
}

/// Publishes `count` persistent messages to `exchange` with `key`, keeping
/// at most `window` unconfirmed; returns once all are confirmed.
async fn publish(ch: &Channel, (exchange, key): (&str, &str), count: usize, window: usize) -> anyhow::Result<()> {
    let body = vec![b'x'; BODY];
    let mut confirms = std::collections::VecDeque::new();
    for _ in 0..count {
        while confirms.len() >= window {
            let c: lapin::PublisherConfirm = confirms.pop_front().expect("a confirm is waiting");
            anyhow::ensure!(c.await?.is_ack(), "the broker refused a publish to {exchange:?}");
        }
        confirms.push_back(
            ch.basic_publish(
                exchange.into(),
                key.into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?,
        );
    }
    for c in confirms {
        anyhow::ensure!(c.await?.is_ack(), "the broker refused a publish to {exchange:?}");
    }
    Ok(())
}

/// Consumes and acknowledges `count` messages from `queue` (in batches), or
/// fails after 120 s.
async fn drain(conn: &Connection, queue: &str, count: usize) -> anyhow::Result<()> {
    let mut consumer = consume(conn, queue, 500).await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = None;
    for got in 1..=count {
        let left = deadline.saturating_duration_since(Instant::now());
        let d = match tokio::time::timeout(left, consumer.next()).await {
            Ok(Some(d)) => d?,
            Ok(None) => anyhow::bail!("the consumer of {queue} ended after {got} messages"),
            Err(_) => anyhow::bail!("only {got} of {count} messages came back to {queue} within 120 s"),
        };
        if got % 100 == 0 {
            d.ack(BasicAckOptions { multiple: true }).await?;
            last = None;
        } else {
            last = Some(d);
        }
    }
    if let Some(d) = last {
        d.ack(BasicAckOptions { multiple: true }).await?;
    }
    Ok(())
}

/// Declares a step: a fanout exchange and its quorum queue `name`, whose
/// messages expire after `ttl` and are dead-lettered by their routing key.
async fn declare_step(ch: &Channel, name: &str, ttl: Duration, strategy: &str) -> anyhow::Result<()> {
    let options = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(name.into(), ExchangeKind::Fanout, options, FieldTable::default())
        .await?;
    let mut args = FieldTable::default();
    let text = |s: &str| AMQPValue::LongString(LongString::from(s));
    args.insert("x-queue-type".into(), text("quorum"));
    args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl.as_millis() as i64));
    args.insert("x-dead-letter-exchange".into(), text(""));
    args.insert("x-dead-letter-strategy".into(), text(strategy));
    args.insert("x-overflow".into(), text("reject-publish"));
    ch.queue_declare(
        name.into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await?;
    ch.queue_bind(
        name.into(),
        name.into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    Ok(())
}

async fn delete_step(ch: &Channel, name: &str) {
    let _ = ch.queue_delete(name.into(), Default::default()).await;
    let _ = ch.exchange_delete(name.into(), Default::default()).await;
}

fn per_message_us(cpu: Option<f64>, count: usize) -> Option<f64> {
    cpu.map(|s| s / count as f64 * 1e6)
}

fn shown(us: Option<f64>) -> String {
    us.map_or("?".into(), |v| format!("{v:.0}"))
}

/// The whole step: `count` messages through each path.
pub async fn measure(url: &str, count: usize, window: usize) -> anyhow::Result<serde_json::Value> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(Default::default()).await?;
    let prefix = format!("swallow-load-ladder-{}", std::process::id());
    let target = format!("{prefix}-target");
    swallow_shared::topology::declare_quorum_queue(&ch, &target).await?;
    let result = measure_on(&conn, &ch, &prefix, &target, count, window).await;
    let _ = ch.queue_delete(target.as_str().into(), Default::default()).await;
    for strategy in ["at-least-once", "at-most-once"] {
        delete_step(&ch, &format!("{prefix}-{strategy}-long")).await;
        delete_step(&ch, &format!("{prefix}-{strategy}-short")).await;
    }
    let _ = conn.close(200, "".into()).await;
    result
}

async fn measure_on(
    conn: &Connection,
    ch: &Channel,
    prefix: &str,
    target: &str,
    count: usize,
    window: usize,
) -> anyhow::Result<serde_json::Value> {
    let ((), idle) = broker_cpu(async {
        tokio::time::sleep(HOLD).await;
        Ok(())
    })
    .await?;
    let ((), hop) = broker_cpu(async {
        publish(ch, ("", target), count, window).await?;
        drain(conn, target, count).await
    })
    .await?;
    let hop = per_message_us(hop, count);
    println!(
        "    {count} messages of {BODY} bytes; a plain quorum-queue hop: {} µs broker CPU per message",
        shown(hop)
    );
    let mut rows = serde_json::Map::new();
    for strategy in ["at-least-once", "at-most-once"] {
        let long = format!("{prefix}-{strategy}-long");
        declare_step(ch, &long, LONG, strategy).await?;
        let ((), park) = broker_cpu(publish(ch, (&long, target), count, window)).await?;
        let ((), held) = broker_cpu(async {
            tokio::time::sleep(HOLD).await;
            Ok(())
        })
        .await?;
        delete_step(ch, &long).await;
        let short = format!("{prefix}-{strategy}-short");
        declare_step(ch, &short, SHORT, strategy).await?;
        let ((), trip) = broker_cpu(async {
            publish(ch, (&short, target), count, window).await?;
            drain(conn, target, count).await
        })
        .await?;
        delete_step(ch, &short).await;
        let park = per_message_us(park, count);
        let trip = per_message_us(trip, count);
        // Broker CPU per second while the parked messages sat, beyond idle.
        let hold_ms_per_s = held
            .zip(idle)
            .map(|(held, idle)| (held - idle) / HOLD.as_secs_f64() * 1e3);
        println!(
            "    {strategy}: park {} µs per message, a whole trip {} µs ({:.1}× the plain hop); holding {count} parked: {} ms CPU per second beyond idle",
            shown(park),
            shown(trip),
            trip.zip(hop).map_or(f64::NAN, |(t, h)| t / h),
            hold_ms_per_s.map_or("?".into(), |v| format!("{v:.1}")),
        );
        rows.insert(
            strategy.into(),
            serde_json::json!({
                "park_us_per_msg": park, "trip_us_per_msg": trip,
                "trip_over_hop": trip.zip(hop).map(|(t, h)| t / h),
                "holding_ms_cpu_per_s_beyond_idle": hold_ms_per_s,
            }),
        );
    }
    Ok(serde_json::json!({
        "messages": count, "body_bytes": BODY, "hop_us_per_msg": hop, "steps": rows,
    }))
}
