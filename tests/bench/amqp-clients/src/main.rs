//! lapin against amqprs on a stage's hot path: consume a
//! persistent message from a quorum queue, publish it to another with a
//! publisher confirm awaited, then acknowledge it; one task per message, as
//! the stages do. The process's CPU per message is the figure; the two
//! clients run alternately, in one process, on the same broker.
//!
//! `cargo run --release -- --messages 50000 --rounds 3` (in this directory;
//! it is not a workspace member, so `cargo test --workspace` skips it).
//! `cargo run --features faults -- --faults` runs the fault checks instead
//! (`faults.rs`).

#[cfg(feature = "faults")]
mod faults;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use futures_util::StreamExt as _;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 5672)]
    port: u16,
    /// Messages relayed per run.
    #[arg(long, default_value_t = 50_000)]
    messages: usize,
    /// Runs of each client, alternating.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    #[arg(long, default_value_t = 256)]
    prefetch: u16,
    /// Body size in bytes (a delivery job is about 400).
    #[arg(long, default_value_t = 400)]
    bytes: usize,
    /// Run the fault checks (built with `--features faults`), not the benchmark.
    #[arg(long)]
    faults: bool,
}

/// This process's user + system CPU seconds so far.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    // After the command: state is field 3, utime 14, stime 15 (1-based).
    let ticks = |i: usize| fields.get(i - 3).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(14) + ticks(15)) / 100.0
}

fn url(args: &Args) -> String {
    format!("amqp://guest:guest@{}:{}/%2f", args.host, args.port)
}

/// Declares the two quorum queues and fills the first (with lapin).
async fn prepare(args: &Args, a: &str, b: &str) -> anyhow::Result<()> {
    use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
    use lapin::types::{AMQPValue, FieldTable, LongString};
    let conn = lapin::Connection::connect(&url(args), lapin::ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let mut quorum = FieldTable::default();
    quorum.insert("x-queue-type".into(), AMQPValue::LongString(LongString::from("quorum")));
    for q in [a, b] {
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.queue_declare(q.into(), durable, quorum.clone()).await?;
        ch.queue_purge(q.into(), Default::default()).await?;
    }
    ch.confirm_select(Default::default()).await?;
    let body = vec![b'x'; args.bytes];
    let mut pending = std::collections::VecDeque::new();
    for _ in 0..args.messages {
        if pending.len() >= 1_000 {
            let c: lapin::PublisherConfirm = pending.pop_front().expect("one is pending");
            c.await?;
        }
        let props = lapin::BasicProperties::default().with_delivery_mode(2);
        pending.push_back(
            ch.basic_publish("".into(), a.into(), BasicPublishOptions::default(), &body, props)
                .await?,
        );
    }
    for c in pending {
        c.await?;
    }
    conn.close(200, "".into()).await?;
    Ok(())
}

async fn delete(args: &Args, queues: &[&str]) -> anyhow::Result<()> {
    let conn = lapin::Connection::connect(&url(args), lapin::ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    for q in queues {
        ch.queue_delete((*q).into(), Default::default()).await?;
    }
    conn.close(200, "".into()).await?;
    Ok(())
}

/// The relay with lapin, as the stages use it: one channel consuming, one
/// in confirm mode publishing (mandatory), the confirm awaited per message.
async fn relay_lapin(args: &Args, from: &str, to: &str) -> anyhow::Result<()> {
    use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions};
    let conn = lapin::Connection::connect(&url(args), lapin::ConnectionProperties::default()).await?;
    let consume = conn.create_channel().await?;
    consume.basic_qos(args.prefetch, BasicQosOptions::default()).await?;
    let publish = conn.create_channel().await?;
    publish.confirm_select(Default::default()).await?;
    let mut consumer = consume
        .basic_consume(
            from.into(),
            "".into(),
            BasicConsumeOptions::default(),
            Default::default(),
        )
        .await?;
    let mut tasks = tokio::task::JoinSet::new();
    let mut started = 0;
    while started < args.messages {
        let delivery = consumer.next().await.context("consumer ended")??;
        started += 1;
        let publish = publish.clone();
        let to = to.to_owned();
        tasks.spawn(async move {
            let options = BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            };
            let props = lapin::BasicProperties::default().with_delivery_mode(2);
            let confirm = publish
                .basic_publish("".into(), to.as_str().into(), options, &delivery.data, props)
                .await?
                .await?;
            anyhow::ensure!(confirm.is_ack() && confirm.take_message().is_none(), "not confirmed");
            delivery.ack(BasicAckOptions::default()).await?;
            Ok(())
        });
        while let Some(done) = tasks.try_join_next() {
            done??;
        }
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    conn.close(200, "".into()).await?;
    Ok(())
}

/// Publisher confirms for amqprs, which leaves them to the application:
/// tags are counted in publish order (the publish is sent under the same
/// lock), and the channel's callback resolves them.
#[derive(Default, Clone)]
struct Confirms {
    pending: Arc<Mutex<BTreeMap<u64, tokio::sync::oneshot::Sender<bool>>>>,
}

impl Confirms {
    fn settle(&self, tag: u64, multiple: bool, ok: bool) {
        let mut pending = self.pending.lock().expect("confirms lock");
        if multiple {
            let rest = pending.split_off(&(tag + 1));
            for (_, tx) in std::mem::replace(&mut *pending, rest) {
                let _ = tx.send(ok);
            }
        } else if let Some(tx) = pending.remove(&tag) {
            let _ = tx.send(ok);
        }
    }
}

struct ConfirmCallback(Confirms);

#[async_trait::async_trait]
impl amqprs::callbacks::ChannelCallback for ConfirmCallback {
    async fn close(
        &mut self,
        _: &amqprs::channel::Channel,
        _: amqprs::CloseChannel,
    ) -> std::result::Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn cancel(
        &mut self,
        _: &amqprs::channel::Channel,
        _: amqprs::Cancel,
    ) -> std::result::Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn flow(
        &mut self,
        _: &amqprs::channel::Channel,
        active: bool,
    ) -> std::result::Result<bool, amqprs::error::Error> {
        Ok(active)
    }
    async fn publish_ack(&mut self, _: &amqprs::channel::Channel, ack: amqprs::Ack) {
        self.0.settle(ack.delivery_tag(), ack.mutiple(), true);
    }
    async fn publish_nack(&mut self, _: &amqprs::channel::Channel, nack: amqprs::Nack) {
        self.0.settle(nack.delivery_tag(), nack.multiple(), false);
    }
    async fn publish_return(
        &mut self,
        _: &amqprs::channel::Channel,
        _: amqprs::Return,
        _: amqprs::BasicProperties,
        _: Vec<u8>,
    ) {
    }
}

/// The same relay with amqprs (tokio-native: no I/O thread of its own).
async fn relay_amqprs(args: &Args, from: &str, to: &str) -> anyhow::Result<()> {
    use amqprs::channel::{
        BasicAckArguments, BasicConsumeArguments, BasicPublishArguments, BasicQosArguments, ConfirmSelectArguments,
    };
    use amqprs::connection::{Connection, OpenConnectionArguments};
    let conn = Connection::open(&OpenConnectionArguments::new(&args.host, args.port, "guest", "guest")).await?;
    let consume = conn.open_channel(None).await?;
    consume
        .basic_qos(BasicQosArguments::new(0, args.prefetch, false))
        .await?;
    let publish = conn.open_channel(None).await?;
    let confirms = Confirms::default();
    publish.register_callback(ConfirmCallback(confirms.clone())).await?;
    publish.confirm_select(ConfirmSelectArguments::default()).await?;
    let publish = Arc::new((publish, tokio::sync::Mutex::new(0u64)));
    let consume = Arc::new(consume);
    let (_, mut rx) = consume
        .basic_consume_rx(BasicConsumeArguments::new(from, "relay"))
        .await?;
    let mut tasks = tokio::task::JoinSet::new();
    let mut started = 0;
    while started < args.messages {
        let message = rx.recv().await.context("consumer ended")?;
        started += 1;
        let (publish, consume, confirms, to) = (publish.clone(), consume.clone(), confirms.clone(), to.to_owned());
        tasks.spawn(async move {
            let tag = message.deliver.context("a delivery")?.delivery_tag();
            let body = message.content.unwrap_or_default();
            let (tx, rx) = tokio::sync::oneshot::channel();
            {
                let mut next = publish.1.lock().await;
                *next += 1;
                confirms.pending.lock().expect("confirms lock").insert(*next, tx);
                let mut args = BasicPublishArguments::new("", &to);
                args.mandatory(true);
                let props = amqprs::BasicProperties::default().with_persistence(true).finish();
                publish.0.basic_publish(props, body, args).await?;
            }
            anyhow::ensure!(rx.await?, "nacked");
            consume.basic_ack(BasicAckArguments::new(tag, false)).await?;
            Ok(())
        });
        while let Some(done) = tasks.try_join_next() {
            done??;
        }
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    conn.close().await?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.faults {
        #[cfg(feature = "faults")]
        return faults::run(&args).await;
        #[cfg(not(feature = "faults"))]
        anyhow::bail!("the fault checks need `--features faults`");
    }
    let a = format!("amqp-clients-{}-a", std::process::id());
    let b = format!("amqp-clients-{}-b", std::process::id());
    let mut rows: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    for round in 1..=args.rounds {
        for client in ["lapin", "amqprs"] {
            prepare(&args, &a, &b).await?;
            let (cpu, wall) = (cpu_seconds(), Instant::now());
            let relayed = match client {
                "lapin" => tokio::time::timeout(Duration::from_secs(300), relay_lapin(&args, &a, &b)).await,
                _ => tokio::time::timeout(Duration::from_secs(300), relay_amqprs(&args, &a, &b)).await,
            };
            relayed.context("a run took over 300 s")??;
            let (cpu, wall) = (cpu_seconds() - cpu, wall.elapsed().as_secs_f64());
            let us = cpu / args.messages as f64 * 1e6;
            let rate = args.messages as f64 / wall;
            println!("round {round} {client:>6}: {us:6.1} µs CPU per message, {rate:6.0} msg/s");
            rows.entry(client).or_default().push((us, rate));
        }
    }
    delete(&args, &[&a, &b]).await?;
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (lapin, amqprs) = (&rows["lapin"], &rows["amqprs"]);
    let cpu = |r: &Vec<(f64, f64)>| median(r.iter().map(|x| x.0).collect());
    let rate = |r: &Vec<(f64, f64)>| median(r.iter().map(|x| x.1).collect());
    println!(
        "medians: lapin {:.1} µs, {:.0} msg/s; amqprs {:.1} µs, {:.0} msg/s; amqprs ÷ lapin CPU per message {:.2}",
        cpu(lapin),
        rate(lapin),
        cpu(amqprs),
        rate(amqprs),
        cpu(amqprs) / cpu(lapin)
    );
    Ok(())
}
