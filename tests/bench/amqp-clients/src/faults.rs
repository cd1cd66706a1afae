//! What each client does when something goes wrong, against a real
//! RabbitMQ: the other half of the bar for switching clients ("every fault test
//! passes with it"). Each check states what swallow's stages rely on, then
//! what lapin and amqprs were seen to do. The first four use the shared
//! broker (queues of their own, deleted after); the node checks start a
//! private node on free ports, freeze it (SIGSTOP) and kill it (SIGKILL).
//!
//! `cargo run --features faults -- --faults` (in this directory).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::StreamExt as _;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};

use crate::{Args, ConfirmCallback, Confirms, url};

/// Panics seen anywhere in the process (a client's own tasks included).
static PANICS: AtomicUsize = AtomicUsize::new(0);

/// One check's row.
struct Row {
    check: &'static str,
    needed: &'static str,
    lapin: String,
    amqprs: String,
}

pub async fn run(args: &Args) -> anyhow::Result<()> {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        previous(info);
    }));
    let q = format!("amqp-clients-faults-{}", std::process::id());
    let mut rows = vec![
        row(
            "a delivered message with a header that is not UTF-8",
            "both messages delivered, the connection open (bad input never stops a stage)",
            non_utf8_lapin(args, &q),
            non_utf8_amqprs(args, &q),
        )
        .await,
        row(
            "a publish after the broker closed its channel (404 on a missing exchange)",
            "the first publish's confirm fails, the second publish fails; no silent Ok",
            closed_channel_lapin(args, &q),
            closed_channel_amqprs(args, &q),
        )
        .await,
        row(
            "an RPC abandoned by a timeout, then another on the same channel",
            "no panic; the next RPC answered (every broker call is bounded)",
            abandoned_lapin(args, &q),
            abandoned_amqprs(args, &q),
        )
        .await,
        row(
            "the consumed queue deleted by someone else",
            "the consumer ends (the session restarts and re-declares)",
            deleted_lapin(args, &q),
            deleted_amqprs(args, &q),
        )
        .await,
    ];
    let (frozen, killed) = node_checks().await?;
    rows.push(frozen);
    rows.push(killed);
    crate::delete(args, &[&q]).await?;
    println!("| check | what swallow needs | lapin 4 | amqprs 2 |");
    println!("|---|---|---|---|");
    for r in rows {
        println!("| {} | {} | {} | {} |", r.check, r.needed, r.lapin, r.amqprs);
    }
    Ok(())
}

/// Runs one check with lapin, then with amqprs.
async fn row(
    check: &'static str,
    needed: &'static str,
    lapin: impl std::future::Future<Output = anyhow::Result<String>>,
    amqprs: impl std::future::Future<Output = anyhow::Result<String>>,
) -> Row {
    let lapin = outcome(lapin.await);
    let amqprs = outcome(amqprs.await);
    Row {
        check,
        needed,
        lapin,
        amqprs,
    }
}

fn outcome(result: anyhow::Result<String>) -> String {
    result.unwrap_or_else(|e| format!("error: {e:#}"))
}

/// Panics since `before`, as a suffix.
fn panics_since(before: usize) -> String {
    match PANICS.load(Ordering::SeqCst) - before {
        0 => String::new(),
        n => format!("; **{n} panic(s)**"),
    }
}

/// Declares `q` afresh and puts `count` messages in it, the first with a
/// header whose bytes are not UTF-8 when `bad_header`.
async fn fill(url: &str, q: &str, count: usize, bad_header: bool) -> anyhow::Result<()> {
    let (conn, ch) = lapin_channel(url).await?;
    ch.queue_declare(q.into(), QueueDeclareOptions::default(), FieldTable::default())
        .await?;
    ch.queue_purge(q.into(), Default::default()).await?;
    ch.confirm_select(Default::default()).await?;
    for i in 0..count {
        let mut headers = FieldTable::default();
        if i == 0 && bad_header {
            headers.insert(
                "x-bad".into(),
                AMQPValue::LongString(LongString::from(vec![0xff, 0xfe])),
            );
        }
        let props = lapin::BasicProperties::default().with_headers(headers);
        ch.basic_publish("".into(), q.into(), BasicPublishOptions::default(), b"m", props)
            .await?
            .await?;
    }
    conn.close(200, "".into()).await?;
    Ok(())
}

const WAIT: Duration = Duration::from_secs(5);

async fn non_utf8_lapin(args: &Args, q: &str) -> anyhow::Result<String> {
    fill(&url(args), q, 2, true).await?;
    let (conn, ch) = lapin_channel(&url(args)).await?;
    let no_ack = BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    let mut consumer = ch
        .basic_consume(q.into(), "".into(), no_ack, FieldTable::default())
        .await?;
    let mut got = 0;
    while got < 2 {
        match tokio::time::timeout(WAIT, consumer.next()).await {
            Ok(Some(Ok(_))) => got += 1,
            _ => break,
        }
    }
    let open = conn.status().connected();
    let _ = conn.close(200, "".into()).await;
    Ok(format!("{got} of 2 delivered; connection open: {open}"))
}

/// A lapin connection to `url` and a channel on it.
async fn lapin_channel(url: &str) -> anyhow::Result<(lapin::Connection, lapin::Channel)> {
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    Ok((conn, ch))
}

/// An amqprs connection and a channel on it, its callback resolving
/// `confirms` and answering `cancel` with `Ok` (without which a consumer's
/// receiver never ends on a cancel).
async fn amqprs_channel(
    host: &str,
    port: u16,
    heartbeat: Option<u16>,
    confirms: Confirms,
) -> anyhow::Result<(amqprs::connection::Connection, amqprs::channel::Channel)> {
    let mut open = amqprs::connection::OpenConnectionArguments::new(host, port, "guest", "guest");
    if let Some(h) = heartbeat {
        open.heartbeat(h);
    }
    let conn = amqprs::connection::Connection::open(&open).await?;
    let ch = conn.open_channel(None).await?;
    ch.register_callback(ConfirmCallback(confirms)).await?;
    Ok((conn, ch))
}

/// Closes an amqprs connection that is still open (one the broker closed
/// has nothing to close).
async fn close_amqprs(conn: amqprs::connection::Connection) {
    if conn.is_open() {
        let _ = conn.close().await;
    }
}

async fn non_utf8_amqprs(args: &Args, q: &str) -> anyhow::Result<String> {
    use amqprs::channel::BasicConsumeArguments;
    fill(&url(args), q, 2, true).await?;
    let (conn, ch) = amqprs_channel(&args.host, args.port, None, Confirms::default()).await?;
    let mut consume = BasicConsumeArguments::new(q, "faults");
    consume.no_ack = true;
    // The broker delivers as soon as it has answered the consume: the
    // message may be decoded before the call returns.
    let (_, mut rx) = match ch.basic_consume_rx(consume).await {
        Ok(consuming) => consuming,
        Err(e) => {
            return Ok(format!(
                "0 of 2 delivered: the consume failed ({e}); connection open: {}",
                conn.is_open()
            ));
        }
    };
    let mut got = 0;
    while got < 2 {
        match tokio::time::timeout(WAIT, rx.recv()).await {
            Ok(Some(_)) => got += 1,
            _ => break,
        }
    }
    let open = conn.is_open();
    close_amqprs(conn).await;
    Ok(format!("{got} of 2 delivered; connection open: {open}"))
}

async fn closed_channel_lapin(args: &Args, q: &str) -> anyhow::Result<String> {
    fill(&url(args), q, 0, false).await?;
    let (conn, ch) = lapin_channel(&url(args)).await?;
    ch.confirm_select(Default::default()).await?;
    let props = lapin::BasicProperties::default;
    let first = match ch
        .basic_publish(
            "no-such-exchange".into(),
            q.into(),
            BasicPublishOptions::default(),
            b"m",
            props(),
        )
        .await
    {
        Err(e) => format!("first publish: error ({e})"),
        Ok(confirm) => match tokio::time::timeout(WAIT, confirm).await {
            Err(_) => "first confirm: none within 5 s".to_owned(),
            Ok(Err(e)) => format!("first confirm: error ({e})"),
            Ok(Ok(c)) => format!("first confirm: **{}**", if c.is_ack() { "ack" } else { "nack" }),
        },
    };
    let second = match ch
        .basic_publish("".into(), q.into(), BasicPublishOptions::default(), b"m", props())
        .await
    {
        Err(e) => format!("second publish: error ({e})"),
        Ok(_) => "second publish: **Ok**".to_owned(),
    };
    let open = conn.status().connected();
    let _ = conn.close(200, "".into()).await;
    Ok(format!("{first}; {second}; connection open: {open}"))
}

async fn closed_channel_amqprs(args: &Args, q: &str) -> anyhow::Result<String> {
    use amqprs::channel::{BasicPublishArguments, ConfirmSelectArguments};
    fill(&url(args), q, 0, false).await?;
    let confirms = Confirms::default();
    let (conn, ch) = amqprs_channel(&args.host, args.port, None, confirms.clone()).await?;
    ch.confirm_select(ConfirmSelectArguments::default()).await?;
    let props = amqprs::BasicProperties::default;
    // Tags are the application's to count (see `Confirms`).
    let (tx, first_confirm) = tokio::sync::oneshot::channel();
    confirms.pending.lock().expect("confirms lock").insert(1, tx);
    let first = match ch
        .basic_publish(
            props(),
            b"m".to_vec(),
            BasicPublishArguments::new("no-such-exchange", q),
        )
        .await
    {
        Err(e) => format!("first publish: error ({e})"),
        Ok(()) => match tokio::time::timeout(WAIT, first_confirm).await {
            Err(_) => "first confirm: none within 5 s".to_owned(),
            Ok(Err(_)) => "first confirm: dropped unanswered".to_owned(),
            Ok(Ok(ack)) => format!("first confirm: **{}**", if ack { "ack" } else { "nack" }),
        },
    };
    let second = match ch
        .basic_publish(props(), b"m".to_vec(), BasicPublishArguments::new("", q))
        .await
    {
        Err(e) => format!("second publish: error ({e})"),
        Ok(()) => "second publish: **Ok**".to_owned(),
    };
    // What the broker makes of frames on a closed channel shows a moment later.
    let deadline = Instant::now() + Duration::from_secs(2);
    while conn.is_open() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let open = conn.is_open();
    close_amqprs(conn).await;
    Ok(format!("{first}; {second}; connection open 2 s later: {open}"))
}

async fn abandoned_lapin(args: &Args, q: &str) -> anyhow::Result<String> {
    fill(&url(args), q, 0, false).await?;
    let before = PANICS.load(Ordering::SeqCst);
    let (conn, ch) = lapin_channel(&url(args)).await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let mut abandoned = 0;
    for _ in 0..20 {
        let declare = ch.queue_declare(q.into(), passive, FieldTable::default());
        if tokio::time::timeout(Duration::from_micros(50), declare).await.is_err() {
            abandoned += 1;
        }
    }
    let next = tokio::time::timeout(WAIT, ch.queue_declare(q.into(), passive, FieldTable::default())).await;
    let next = match next {
        Err(_) => "**no answer within 5 s**".to_owned(),
        Ok(Err(e)) => format!("**error** ({e})"),
        Ok(Ok(_)) => "answered".to_owned(),
    };
    let _ = conn.close(200, "".into()).await;
    Ok(format!(
        "{abandoned} of 20 abandoned; the next: {next}{}",
        panics_since(before)
    ))
}

async fn abandoned_amqprs(args: &Args, q: &str) -> anyhow::Result<String> {
    use amqprs::channel::QueueDeclareArguments;
    fill(&url(args), q, 0, false).await?;
    let before = PANICS.load(Ordering::SeqCst);
    let (conn, ch) = amqprs_channel(&args.host, args.port, None, Confirms::default()).await?;
    let passive = || QueueDeclareArguments::new(q).passive(true).finish();
    let mut abandoned = 0;
    for _ in 0..20 {
        if tokio::time::timeout(Duration::from_micros(50), ch.queue_declare(passive()))
            .await
            .is_err()
        {
            abandoned += 1;
        }
    }
    let next = match tokio::time::timeout(WAIT, ch.queue_declare(passive())).await {
        Err(_) => "**no answer within 5 s**".to_owned(),
        Ok(Err(e)) => format!("**error** ({e})"),
        Ok(Ok(_)) => "answered".to_owned(),
    };
    close_amqprs(conn).await;
    Ok(format!(
        "{abandoned} of 20 abandoned; the next: {next}{}",
        panics_since(before)
    ))
}

async fn deleted_lapin(args: &Args, q: &str) -> anyhow::Result<String> {
    fill(&url(args), q, 0, false).await?;
    let (conn, ch) = lapin_channel(&url(args)).await?;
    let mut consumer = ch
        .basic_consume(
            q.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let deleted = Instant::now();
    crate::delete(args, &[q]).await?;
    let seen = match tokio::time::timeout(WAIT, consumer.next()).await {
        Err(_) => "**not ended within 5 s**".to_owned(),
        Ok(None) => format!("ended after {:.0} ms", deleted.elapsed().as_secs_f64() * 1e3),
        Ok(Some(Err(e))) => format!(
            "ended with an error after {:.0} ms ({e})",
            deleted.elapsed().as_secs_f64() * 1e3
        ),
        Ok(Some(Ok(_))) => "**a delivery**".to_owned(),
    };
    let _ = conn.close(200, "".into()).await;
    Ok(seen)
}

async fn deleted_amqprs(args: &Args, q: &str) -> anyhow::Result<String> {
    use amqprs::channel::BasicConsumeArguments;
    fill(&url(args), q, 0, false).await?;
    let (conn, ch) = amqprs_channel(&args.host, args.port, None, Confirms::default()).await?;
    let (_, mut rx) = ch.basic_consume_rx(BasicConsumeArguments::new(q, "faults")).await?;
    let deleted = Instant::now();
    crate::delete(args, &[q]).await?;
    let seen = match tokio::time::timeout(WAIT, rx.recv()).await {
        Err(_) => "**not ended within 5 s**".to_owned(),
        Ok(None) => format!("ended after {:.0} ms", deleted.elapsed().as_secs_f64() * 1e3),
        Ok(Some(_)) => "**a delivery**".to_owned(),
    };
    close_amqprs(conn).await;
    Ok(seen)
}

/// How long after `from` a client's consumer noticed, bounded at 30 s.
async fn noticed<F: std::future::Future<Output = ()>>(from: Instant, ended: F) -> String {
    match tokio::time::timeout(Duration::from_secs(30), ended).await {
        Ok(()) => format!("noticed after {:.1} s", from.elapsed().as_secs_f64()),
        Err(_) => "**not noticed within 30 s**".to_owned(),
    }
}

/// A lapin consumer on `q` of `node`, with heartbeats every 2 s; resolves
/// when it ends or fails.
async fn lapin_watch(node_url: &str, q: &str) -> anyhow::Result<impl std::future::Future<Output = ()> + use<>> {
    let (conn, ch) = lapin_channel(&format!("{node_url}?heartbeat=2")).await?;
    ch.queue_declare(q.into(), QueueDeclareOptions::default(), FieldTable::default())
        .await?;
    let mut consumer = ch
        .basic_consume(
            q.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(async move {
        let _keep = (conn, ch);
        while let Some(Ok(_)) = consumer.next().await {}
    })
}

/// The same with amqprs: its consumer's receiver ending, or its
/// network-failure signal, whichever comes first.
async fn amqprs_watch(port: u16, q: &str) -> anyhow::Result<impl std::future::Future<Output = ()> + use<>> {
    use amqprs::channel::{BasicConsumeArguments, QueueDeclareArguments};
    let (conn, ch) = amqprs_channel("127.0.0.1", port, Some(2), Confirms::default()).await?;
    ch.queue_declare(QueueDeclareArguments::new(q)).await?;
    let (_, mut rx) = ch.basic_consume_rx(BasicConsumeArguments::new(q, "faults")).await?;
    let conn = Arc::new(conn);
    let failure = conn.clone();
    Ok(async move {
        let _keep = ch;
        tokio::select! {
            _ = async { while rx.recv().await.is_some() {} } => {}
            _ = failure.listen_network_io_failure() => {}
        }
    })
}

/// A private node frozen (SIGSTOP) under a consumer of each client, then
/// killed (SIGKILL): when does each notice?
async fn node_checks() -> anyhow::Result<(Row, Row)> {
    use swallow_tests::{Node, node_stem};
    let mut node = Node::new(&node_stem(), 1, "")?;
    node.boot().await.context("starting a private node")?;
    let q = "amqp-clients-faults-node";
    let mut frozen = Vec::new();
    for client in ["lapin", "amqprs"] {
        let watch: std::pin::Pin<Box<dyn std::future::Future<Output = ()>>> = match client {
            "lapin" => Box::pin(lapin_watch(&node.url(), q).await?),
            _ => Box::pin(amqprs_watch(node.port, q).await?),
        };
        node.signal("STOP")?;
        let from = Instant::now();
        frozen.push(noticed(from, watch).await);
        node.signal("CONT")?;
        node.until_accepting(Duration::from_secs(60)).await?;
    }
    let (lapin, amqprs) = (lapin_watch(&node.url(), q).await?, amqprs_watch(node.port, q).await?);
    node.kill().await?;
    let from = Instant::now();
    let (lapin_killed, amqprs_killed) = tokio::join!(noticed(from, lapin), noticed(from, amqprs));
    let frozen_row = Row {
        check: "a node frozen (SIGSTOP) under a consumer, heartbeat 2 s",
        needed: "the consumer ends within two heartbeats (4 s), so the stage moves to another node",
        lapin: frozen.remove(0),
        amqprs: frozen.remove(0),
    };
    let killed_row = Row {
        check: "a node killed (SIGKILL) under a consumer",
        needed: "the consumer ends at once",
        lapin: lapin_killed,
        amqprs: amqprs_killed,
    };
    Ok((frozen_row, killed_row))
}
