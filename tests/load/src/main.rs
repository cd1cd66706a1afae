//! `swallow-load`: the load generator behind BENCHMARKS.md.
//!
//! Runs the three release binaries (next to this one) against a broker with a
//! fast keep-alive handler on loopback, and reports in one run:
//! 1. the broker's ceiling: persistent messages of the same size through one
//!    durable quorum queue, publisher confirms and manual acks;
//! 2. pipeline throughput: matched events → POST received → reply on
//!    `<prefix>.chat.outbound`, sustained;
//! 3. matcher throughput for unmatched events;
//! 4. latency percentiles at half the measured pipeline rate, beside the
//!    broker's own latency for the same two queue hops at the same rate;
//! 5. each stage's peak RSS, and with 10,000 deliveries in flight;
//! 6. an offered-load sweep (25% to 200% of the measured rate), drawn to a
//!    PNG: replies out and p99 event → POST (swallow's and the broker's
//!    alone) against events offered, and the broker's CPU per reply at each
//!    step;
//! 7. the delivery log's cost: pipeline throughput with `[log] enabled =
//!    false` and `true`, side by side in alternating rounds (`--log-only`
//!    runs just this);
//! 8. realistic scale: 100, 1,000 and 10,000 integrations, events spread
//!    Zipf-like over them, the default rate limit, 1% of handlers slow
//!    (`--scale-only` runs just this);
//! 9. with `--bytes-only` only: bytes per hop (an event's, a delivery job's
//!    and a reply's size on the wire) and the broker's CPU per message at
//!    its ceiling for several sizes;
//! 10. with `--ladder-only` only: what the delay ladder costs the broker
//!     (parking, holding, a whole trip) beside a plain queue hop;
//! 11. with `--latency-only --latency-rate R` only: step 4 in alternating
//!     rounds (the stages, then the broker alone, at R events/s), reported
//!     per round and as medians;
//! 12. the ingress (after step 2 in a full run; `--ingress-only` runs the
//!     ceiling and this, `--pipeline-only --ingress-only` steps 1, 2 and
//!     this): signed Slack Events API requests per second one matcher's
//!     ingress accepts (200, the event confirmed by the broker), beside the
//!     ceiling and the pipeline's throughput.
//!
//! Built and run with the benchmarks' profile (`dist`, as the image), the
//! stages first (the image's package set, whose dependencies are built as
//! this one's) so that they sit next to it:
//!
//! ```text
//! cargo build --profile dist -p swallow-matcher -p swallow-deliverer -p swallow-responder -p swallow-tools
//! cargo run --profile dist -p swallow-load -- [FLAGS]
//! ```
//!
//! Every loop is bounded in count and time; all traffic is on loopback.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicPublishOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use swallow_shared::Topology;

mod bytes;
mod failing;
mod ingress;
mod ladder;
mod latency;
mod plot;
mod scale;
mod stages;

use stages::*;

#[derive(Parser)]
#[command(about = "Measure swallow against the broker's own ceiling")]
struct Args {
    #[arg(long, env = "AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
    /// Seconds of sustained load for the ceiling and the pipeline.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Messages kept in flight by the publishers.
    #[arg(long, default_value_t = 2000)]
    window: usize,
    /// Where to write the results as JSON.
    #[arg(long, default_value = "target/swallow-load.json")]
    out: PathBuf,
    /// Where to draw the offered-load sweep (PNG).
    #[arg(long, default_value = "target/swallow-load.png")]
    plot: PathBuf,
    /// Seconds of load at each step of the sweep.
    #[arg(long, default_value_t = 8)]
    sweep_seconds: u64,
    /// Run only the failing-handlers step (a healthy integration alone and
    /// beside hanging handlers) and print its figures.
    #[arg(long)]
    failing_only: bool,
    /// Hanging integrations in the failing-handlers step.
    #[arg(long, default_value_t = 80)]
    hanging: usize,
    /// With `--failing-only`: the bursts variant instead, K events at once
    /// each second to every other integration, then K to the healthy one;
    /// the others quick, then hanging (see `failing::measure_bursts`).
    #[arg(long, value_name = "K", requires = "failing_only")]
    healthy_burst: Option<usize>,
    /// Only redraw the plot from a results file of an earlier run.
    #[arg(long, value_name = "JSON")]
    replot: Option<PathBuf>,
    /// Rounds of the delivery log comparison (each: one stack with the log
    /// off, one with it on, `--log-seconds` of load each).
    #[arg(long, default_value_t = 3)]
    log_rounds: usize,
    /// Seconds of load per stack in the delivery log comparison.
    #[arg(long, default_value_t = 15)]
    log_seconds: u64,
    /// Only measure the delivery log's cost.
    #[arg(long)]
    log_only: bool,
    /// Numbers of integrations in the realistic-scale step.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    scale_sizes: Vec<usize>,
    /// Leave the realistic-scale step out of a full run.
    #[arg(long)]
    no_scale: bool,
    /// Events per second offered in the realistic-scale step.
    #[arg(long, default_value_t = 500.0)]
    scale_rate: f64,
    /// Seconds of load at each size of the realistic-scale step.
    #[arg(long, default_value_t = 20)]
    scale_seconds: u64,
    /// Only run the realistic-scale step.
    #[arg(long)]
    scale_only: bool,
    /// Only measure the broker's ceiling and pipeline throughput (steps 1
    /// and 2), e.g. to compare two builds' stages with `--bin-dir`.
    #[arg(long)]
    pipeline_only: bool,
    /// Only measure the broker's ceiling, then signed Slack Events API
    /// requests per second one matcher's ingress accepts; with
    /// `--pipeline-only`, the pipeline's throughput between the two.
    #[arg(long)]
    ingress_only: bool,
    /// Concurrent keep-alive HTTP/1.1 clients in the ingress step.
    #[arg(long, default_value_t = 32)]
    ingress_clients: usize,
    /// Where the stage binaries are (default: next to this one).
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
    /// Only measure bytes per hop: the sizes of an event, a delivery job and
    /// a reply on the wire, and the broker's CPU per message by size.
    #[arg(long)]
    bytes_only: bool,
    /// Only measure what the delay ladder costs the broker: parking a
    /// message, holding parked ones and a whole trip, beside a plain hop.
    #[arg(long)]
    ladder_only: bool,
    /// Messages through each path of the ladder step.
    #[arg(long, default_value_t = 5_000)]
    ladder_messages: usize,
    /// Only measure the stages' memory with 10,000 deliveries in flight
    /// (step 5), e.g. to compare two builds' deliverers with `--bin-dir`.
    #[arg(long)]
    memory_only: bool,
    /// Only measure latency, in rounds: p99 event → POST at
    /// `--latency-rate`, then the broker alone on the same two hops at the
    /// same rate, `--latency-rounds` times; prints each round's ratio and
    /// the medians.
    #[arg(long, requires = "latency_rate")]
    latency_only: bool,
    /// Events per second offered in the latency rounds (the full run uses
    /// half of the pipeline's measured throughput).
    #[arg(long, value_name = "MSGS_PER_S")]
    latency_rate: Option<f64>,
    /// Rounds of the latency comparison.
    #[arg(long, default_value_t = 3)]
    latency_rounds: usize,
    /// Seconds of load per side in each latency round.
    #[arg(long, default_value_t = 20)]
    latency_seconds: u64,
    /// Run the latency rounds' stages with the delivery log off
    /// (`[log] enabled = false`), to see what the log adds.
    #[arg(long)]
    latency_log_off: bool,
}

/// The sweep's steps, as fractions of the measured pipeline throughput.
const SWEEP: &[f64] = &[0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0];

/// CPU seconds (user + system) process `pid` has used so far, from
/// `/proc/<pid>/stat` (`None` where there is no such process or no /proc).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name (in parentheses, may hold spaces);
    // utime and stime are the 14th and 15th fields of the line.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0) // USER_HZ, 100 on Linux
}

/// The local broker's process (RabbitMQ's `beam.smp`), when it runs here.
fn broker_pid() -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
        (comm.trim() == "beam.smp").then_some(pid)
    })
}

/// CPU seconds used so far by each named process.
fn cpu_snapshot(pids: &[(String, u32)]) -> Vec<(String, f64)> {
    pids.iter()
        .filter_map(|(name, pid)| Some((name.clone(), cpu_seconds(*pid)?)))
        .collect()
}

/// The broker's ceiling: publish with confirms (a window in flight) into one
/// durable quorum queue while a consumer acks manually; messages/s through,
/// and messages through in all.
async fn ceiling(url: &str, seconds: u64, window: usize, size: usize) -> anyhow::Result<(f64, u64)> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let queue = format!("swallow-load-ceiling-{}", std::process::id());
    let ch = conn.create_channel().await?;
    swallow_shared::topology::declare_quorum_queue(&ch, &queue).await?;
    let pub_ch = conn.create_channel().await?;
    pub_ch.confirm_select(Default::default()).await?;
    let mut consumer = consume(&conn, &queue, 500).await?;
    let consumed = Arc::new(Mutex::new(0u64));
    let counter = consumed.clone();
    // Acknowledge in batches (`multiple`), the cheapest way to consume: the
    // ceiling is the broker's, not a slow consumer's.
    let drain = tokio::spawn(async move {
        let mut unacked = 0;
        loop {
            let next = tokio::time::timeout(Duration::from_millis(5), consumer.next()).await;
            let d = match next {
                Ok(Some(Ok(d))) => d,
                Ok(_) => return,
                Err(_) => continue,
            };
            unacked += 1;
            *counter.lock().unwrap() += 1;
            if unacked >= 100 {
                let _ = d.ack(BasicAckOptions { multiple: true }).await;
                unacked = 0;
            }
        }
    });
    let body = vec![b'x'; size];
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut confirms = std::collections::VecDeque::new();
    let warm = Instant::now() + Duration::from_secs(2);
    let mut start_count = None;
    while Instant::now() < deadline {
        if start_count.is_none() && Instant::now() > warm {
            start_count = Some((Instant::now(), *consumed.lock().unwrap()));
        }
        while confirms.len() >= window {
            let c: lapin::PublisherConfirm = confirms.pop_front().unwrap();
            c.await?;
        }
        let props = BasicProperties::default().with_delivery_mode(2);
        confirms.push_back(
            pub_ch
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    props,
                )
                .await?,
        );
    }
    let (t0, c0) = start_count.unwrap_or((Instant::now(), 0));
    let total = *consumed.lock().unwrap();
    let rate = (total - c0) as f64 / t0.elapsed().as_secs_f64();
    for c in confirms {
        let _ = c.await;
    }
    drain.abort();
    let ch2 = conn.create_channel().await?;
    let _ = ch2.queue_delete(queue.as_str().into(), Default::default()).await;
    let _ = conn.close(200, "".into()).await;
    Ok((rate, total))
}

/// Step 5: [`memory`] with the default limits and with all 10,000 at once;
/// each stage's peak RSS goes into `rss`, the attempts under way into `results`.
async fn memory_step(
    url: &str,
    conn: &Connection,
    rss: &mut serde_json::Map<String, serde_json::Value>,
    results: &mut serde_json::Map<String, serde_json::Value>,
) -> anyhow::Result<()> {
    let cases = [
        ("default_limits", None, Http::One),
        ("all_at_once", Some(12_000), Http::One),
        ("all_at_once_http2", Some(12_000), Http::Two),
        // One integration may hold three quarters of the permits: 13,400
        // lets all 10,000 be under way at once, the figure the memory step is about.
        ("ten_thousand_http2", Some(13_400), Http::Two),
    ];
    for (label, concurrency, http) in cases {
        let (hwm, in_flight_max, events) = memory(url, conn, concurrency, http).await?;
        println!("    {label}: {events} events, at most {in_flight_max} HTTP attempts under way; peak RSS (MiB):");
        for (stage, peak, _) in &hwm {
            println!("      {stage}: {peak:.1}");
            let entry = rss.entry(stage.clone()).or_insert_with(|| serde_json::json!({}));
            entry[format!("peak_mib_{label}")] = (*peak).into();
        }
        results.insert(format!("in_flight_max_{label}"), in_flight_max.into());
        results.insert("in_flight_events".into(), events.into());
    }
    Ok(())
}

/// How the memory step's handler speaks.
#[derive(Clone, Copy, PartialEq)]
enum Http {
    /// HTTP/1.1 without TLS: a connection per request under way.
    One,
    /// HTTP/2 over TLS (ALPN): the requests share a connection.
    Two,
}

/// Queues 10,000 jobs (matcher only), then starts a deliverer on the
/// backlog against a handler that answers after 1 s; returns each stage's
/// peak RSS, the most attempts seen under way, and the events sent.
async fn memory(
    url: &str,
    conn: &Connection,
    concurrency: Option<usize>,
    http: Http,
) -> anyhow::Result<(Vec<(String, f64, f64)>, f64, usize)> {
    let delay = Duration::from_secs(1);
    // The CA's directory, when there is one, goes when `memory` returns.
    let (handler_url, seen, ca_file, _certs) = match http {
        Http::One => {
            let (addr, seen) = handler(delay).await;
            (format!("http://{addr}"), seen, None, None)
        }
        Http::Two => {
            let (addr, seen, ca_file, certs) = handler_h2(delay).await?;
            (format!("https://{addr}"), seen, Some(ca_file), Some(certs))
        }
    };
    let name = match (concurrency, http) {
        (None, _) => "mem-default",
        (Some(_), Http::One) => "mem-all",
        (Some(_), Http::Two) => "mem-h2",
    };
    let stages = ["swallow-matcher", "swallow-responder"];
    let mut stack = Stack::start_at(url, &handler_url, name, concurrency, &stages, true).await?;
    if let Some(ca_file) = &ca_file {
        // The deliverer trusts the platform's roots, and these (rustls reads
        // `SSL_CERT_FILE` on Linux).
        stack.env.push(("SSL_CERT_FILE".into(), ca_file.display().to_string()));
    }
    let topology = Topology::new(&stack.prefix);
    // A chat platform takes the replies.
    let _replies = listen_replies(url, &topology).await?;
    let none = Arc::new(Mutex::new(0u64));
    let sent = drive(
        conn,
        (&topology.events_exchange(), "load"),
        "load",
        2,
        usize::MAX,
        Some(5000.0),
        &none,
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while stack.metric("swallow-matcher", "swallow_jobs_published_total").await < sent.len() as f64
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stack.add("swallow-deliverer").await?;
    let mut in_flight_max: f64 = 0.0;
    // All at once: until every request arrived. Default limits: 15 s of the
    // steady state (the backlog takes minutes at 64 attempts per second).
    let limit = if concurrency.is_some() { 60 } else { 15 };
    let deadline = Instant::now() + Duration::from_secs(limit);
    while seen.lock().unwrap().len() < sent.len() && Instant::now() < deadline {
        let now = stack.metric("swallow-deliverer", "swallow_deliveries_in_flight").await;
        in_flight_max = in_flight_max.max(now);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let hwm = stack.rss();
    stack.stop().await;
    Ok((hwm, in_flight_max, sent.len()))
}

/// Listens on the stack's outbound exchange as the chat platform: the
/// replies counted, and when each arrived by the triggering event's ts
/// (`in_reply_to`; the reply texts are all alike).
async fn listen_replies(url: &str, topology: &Topology) -> anyhow::Result<(Arc<Mutex<u64>>, ReplyTimes)> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let mut stream = Box::pin(swallow_tests::chat::listen(&conn, topology).await?);
    let (count, times): (Arc<Mutex<u64>>, ReplyTimes) = Default::default();
    let (counter, noted) = (count.clone(), times.clone());
    tokio::spawn(async move {
        let _conn = conn;
        while let Some(reply) = stream.next().await {
            let at = micros_now();
            *counter.lock().unwrap() += 1;
            if let Some(ts) = reply["in_reply_to"].as_str() {
                noted.lock().unwrap().push((ts.to_owned(), at));
            }
        }
    });
    Ok((count, times))
}

type ReplyTimes = Arc<Mutex<Vec<(String, u128)>>>;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // Interrupted, the run is dropped, and with it the stages it started
    // (their queues, named `load-…`, are left behind).
    tokio::select! {
        done = bench(args) => done,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted; the stages were stopped"),
        _ = terminate.recv() => anyhow::bail!("terminated; the stages were stopped"),
    }
}

async fn bench(args: Args) -> anyhow::Result<()> {
    if let Some(json) = &args.replot {
        let results: serde_json::Value = serde_json::from_slice(&std::fs::read(json)?)?;
        plot::draw(&results, &args.plot)?;
        println!("plot written to {}", args.plot.display());
        return Ok(());
    }
    let url = args.amqp_url.clone();
    if let Some(dir) = &args.bin_dir {
        let _ = BIN_DIR.set(dir.clone());
    }
    if let Some(k) = args.healthy_burst {
        println!(
            "failing handlers, bursts: a healthy integration's {k} events at once, alone, then behind {} others' {k} each…",
            args.hanging
        );
        let figures = failing::measure_bursts(&url, args.hanging, k, 20).await?;
        println!("{}", serde_json::to_string(&figures)?);
        return Ok(());
    }
    if args.failing_only {
        println!(
            "failing handlers: a healthy integration alone, then beside {} hanging ones…",
            args.hanging
        );
        let figures = failing::measure(&url, args.hanging, 20).await?;
        println!("{}", serde_json::to_string(&figures)?);
        return Ok(());
    }
    let size = event_body(123456, "load").len();
    let mut results = serde_json::Map::new();
    if args.bytes_only {
        println!("bytes per hop…");
        let figures = bytes::measure(&url, args.seconds.min(20), args.window).await?;
        results.insert("bytes_per_hop".into(), figures);
        return write_results(&args.out, results);
    }
    if args.ladder_only {
        println!("what the delay ladder costs the broker…");
        let figures = ladder::measure(&url, args.ladder_messages, args.window).await?;
        results.insert("ladder".into(), figures);
        return write_results(&args.out, results);
    }
    if args.scale_only {
        println!("realistic scale at {} events/s…", args.scale_rate);
        let figures = scale::measure(&url, &args.scale_sizes, args.scale_rate, args.scale_seconds).await?;
        results.insert("scale".into(), figures);
        return write_results(&args.out, results);
    }
    if let (true, Some(rate)) = (args.latency_only, args.latency_rate) {
        println!(
            "latency at {rate:.0} msg/s: {} rounds of {} s (the stages), then {} s (the broker alone)…",
            args.latency_rounds, args.latency_seconds, args.latency_seconds
        );
        let figures = latency::measure(
            &url,
            rate,
            args.latency_seconds.min(60),
            args.latency_rounds.min(10),
            args.latency_log_off,
        )
        .await?;
        results.insert("latency_rounds".into(), figures);
        return write_results(&args.out, results);
    }
    if args.memory_only {
        println!("memory with 10,000 deliveries in flight…");
        let conn = Connection::connect(&url, ConnectionProperties::default()).await?;
        let mut rss = serde_json::Map::new();
        memory_step(&url, &conn, &mut rss, &mut results).await?;
        results.insert("rss".into(), rss.into());
        let _ = conn.close(200, "".into()).await;
        return write_results(&args.out, results);
    }
    if args.log_only {
        println!("the delivery log's cost…");
        let cost = log_cost(&url, args.log_seconds, args.window, args.log_rounds).await?;
        results.insert("delivery_log".into(), cost);
        return write_results(&args.out, results);
    }

    println!("1/6 broker ceiling ({size}-byte persistent messages, one quorum queue, confirms, manual acks)…");
    let broker = broker_pid();
    let broker_cpu = broker.and_then(cpu_seconds);
    let (ceiling, through) = ceiling(&url, args.seconds.min(20), args.window, size).await?;
    // The broker's CPU per message at its ceiling: what one hop costs it.
    let broker_per_msg = broker
        .and_then(cpu_seconds)
        .zip(broker_cpu)
        .map(|(after, before)| (after - before) / through.max(1) as f64);
    println!("    ceiling: {ceiling:.0} msg/s");
    if let Some(per) = broker_per_msg {
        println!("    broker CPU at the ceiling: {:.1} ms per 1,000 messages", per * 1e6);
    }
    results.insert("ceiling_msgs_per_s".into(), ceiling.into());
    if args.ingress_only && !args.pipeline_only {
        ingress_step(&args, ceiling, None, &mut results).await?;
        return write_results(&args.out, results);
    }

    // 2. Pipeline throughput.
    println!("2/6 pipeline throughput for {} s…", args.seconds);
    let (addr, _seen) = handler(Duration::ZERO).await;
    let stack = Stack::start(&url, addr, "pipe", Some(512)).await?;
    let topology = Topology::new(&stack.prefix);
    let conn = Connection::connect(&url, ConnectionProperties::default()).await?;
    let (replies, _) = listen_replies(&url, &topology).await?;
    let mut processes = stack.pids();
    processes.extend(broker.map(|pid| ("broker".to_owned(), pid)));
    processes.push(("swallow-load (publisher, handler, chat)".to_owned(), std::process::id()));
    let cpu_before = cpu_snapshot(&processes);
    let t0 = Instant::now();
    let sent = drive(
        &conn,
        (&topology.events_exchange(), "load"),
        "load",
        args.seconds,
        args.window,
        None,
        &replies,
    )
    .await?;
    let published = sent.len() as f64;
    let wait_until = Instant::now() + Duration::from_secs(60);
    while (*replies.lock().unwrap() as f64) < published && Instant::now() < wait_until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let through = *replies.lock().unwrap();
    let throughput = through as f64 / elapsed;
    let cpu_after = cpu_snapshot(&processes);
    let hops = 3.0;
    println!(
        "    pipeline: {throughput:.0} matched msg/s end to end ({:.2} × ceiling; target ≥ 0.8 × ceiling/{hops} = {:.0})",
        throughput / ceiling,
        0.8 * ceiling / hops
    );
    results.insert("pipeline_msgs_per_s".into(), throughput.into());
    results.insert("pipeline_ratio_to_ceiling".into(), (throughput / ceiling).into());
    // Where the machine's CPU went: per process, ms per 1,000 matched
    // messages and cores busy on average.
    let mut cpu = serde_json::Map::new();
    for ((name, before), (_, after)) in cpu_before.iter().zip(&cpu_after) {
        let used = after - before;
        let per_1k = used / through.max(1) as f64 * 1e6;
        println!(
            "    CPU {name}: {per_1k:.1} ms per 1,000 messages, {:.2} cores",
            used / elapsed
        );
        cpu.insert(
            name.clone(),
            serde_json::json!({"ms_per_1k_msgs": per_1k, "cores": used / elapsed}),
        );
    }
    if let (Some(per), Some(broker)) = (broker_per_msg, cpu.get("broker")) {
        let hops = broker["ms_per_1k_msgs"].as_f64().unwrap_or(0.0) / (per * 1e6);
        println!("    the broker spends as much on one matched message as on {hops:.2} messages at its ceiling");
        results.insert("broker_cost_in_ceiling_messages".into(), hops.into());
        results.insert("broker_ms_per_1k_at_ceiling".into(), (per * 1e6).into());
    }
    results.insert("pipeline_cpu".into(), cpu.into());
    // The ingress beside the pipeline (its own matcher; the pipeline's
    // stages sit idle meanwhile).
    if !args.pipeline_only || args.ingress_only {
        ingress_step(&args, ceiling, Some(throughput), &mut results).await?;
    }
    if args.pipeline_only {
        stack.stop().await;
        return write_results(&args.out, results);
    }
    let rss_after_load = stack.rss();

    // 3. Matcher, unmatched.
    println!("3/6 matcher throughput for unmatched events…");
    let before = stack.metric("swallow-matcher", "swallow_events_received_total").await;
    let n_unmatched = 50_000u64;
    let mut events = Confirmed::open(&conn, (&topology.events_exchange(), "x")).await?;
    let t1 = Instant::now();
    for i in 0..n_unmatched {
        events.publish(&event_body(i, "nothing matches")).await?;
    }
    events.confirmed().await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while stack.metric("swallow-matcher", "swallow_events_received_total").await < before + n_unmatched as f64
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let unmatched = n_unmatched as f64 / t1.elapsed().as_secs_f64();
    println!(
        "    matcher, unmatched: {unmatched:.0} msg/s ({:.2} × ceiling; target ≥ 0.8)",
        unmatched / ceiling
    );
    results.insert("matcher_unmatched_msgs_per_s".into(), unmatched.into());
    results.insert(
        "matcher_unmatched_ratio_to_ceiling".into(),
        (unmatched / ceiling).into(),
    );

    // 4. Latency at half the measured rate.
    let half = (throughput / 2.0).max(1.0);
    println!("4/6 latency at {half:.0} msg/s for 20 s, then the offered-load sweep…");
    let (addr2, seen2) = handler(Duration::ZERO).await;
    stack.stop().await;
    let stack = Stack::start(&url, addr2, "lat", Some(512)).await?;
    let topology = Topology::new(&stack.prefix);
    let (lat_replies, lat_times) = listen_replies(&url, &topology).await?;
    let sent = drive(
        &conn,
        (&topology.events_exchange(), "load"),
        "load",
        20,
        usize::MAX,
        Some(half),
        &lat_replies,
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while (*lat_replies.lock().unwrap() as usize) < sent.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let to_post = post_latencies(&sent, &seen2);
    // Reply latency from the event's ts (its publish time, to the microsecond).
    let to_reply: Vec<f64> = lat_times
        .lock()
        .unwrap()
        .iter()
        .filter_map(|(ts, at)| {
            let (s, us) = ts.split_once('.')?;
            let published = s.parse::<u128>().ok()? * 1_000_000 + us.parse::<u128>().ok()?;
            Some((*at as f64 - published as f64) / 1000.0)
        })
        .collect();
    let post_p = percentiles(to_post);
    let reply_p = percentiles(to_reply);
    println!("    event → POST (ms): {post_p}");
    println!("    event → reply (ms): {reply_p}");
    // The same rate through the broker alone (the stages idle meanwhile).
    let floor = Floor::start(&url).await?;
    let floor_p = floor.measure("floor", half, 20).await?;
    println!("    the broker alone, same two hops (ms): {floor_p}");
    results.insert("half_load_msgs_per_s".into(), half.into());
    results.insert("latency_event_to_post_ms".into(), post_p);
    results.insert("latency_event_to_reply_ms".into(), reply_p);
    results.insert("latency_broker_floor_ms".into(), floor_p);

    // 6 (on the same stages). The sweep: each step paced at a fraction of the
    // measured rate, then drained; what came out and how long POSTs took.
    println!("    sweep: {} steps of {} s…", SWEEP.len(), args.sweep_seconds);
    let mut sweep = Vec::new();
    for (n, fraction) in SWEEP.iter().enumerate() {
        let offered = (throughput * fraction).max(1.0);
        let before = *lat_replies.lock().unwrap();
        let broker_before = broker_pid().and_then(cpu_seconds);
        let t = Instant::now();
        let text = format!("load s{n}");
        let sent = drive(
            &conn,
            (&topology.events_exchange(), "load"),
            &text,
            args.sweep_seconds,
            usize::MAX,
            Some(offered),
            &lat_replies,
        )
        .await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while ((*lat_replies.lock().unwrap() - before) as usize) < sent.len() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let replies = *lat_replies.lock().unwrap() - before;
        let achieved = replies as f64 / t.elapsed().as_secs_f64();
        // The broker's CPU per reply at this rate (the drain included):
        // what a matched message costs it when it is not at full stretch.
        let broker_us = broker_pid()
            .and_then(cpu_seconds)
            .zip(broker_before)
            .map(|(after, before)| (after - before) / replies.max(1) as f64 * 1e6);
        let p = percentiles(post_latencies(&sent, &seen2));
        let floor_p = floor
            .measure(&format!("floor s{n}"), offered, args.sweep_seconds)
            .await?;
        println!(
            "    offered {offered:.0}/s ({:.0}%): {achieved:.0} replies/s, event → POST p99 {} ms (broker alone {} ms); broker {} µs CPU per reply",
            fraction * 100.0,
            p["p99"],
            floor_p["p99"],
            broker_us.map_or("?".into(), |v| format!("{v:.0}"))
        );
        sweep.push(serde_json::json!({
            "fraction": fraction, "offered_msgs_per_s": offered,
            "achieved_msgs_per_s": achieved, "event_to_post_ms": p, "broker_floor_ms": floor_p,
            "broker_us_per_reply": broker_us,
        }));
    }
    floor.stop().await;
    // Overload: what comes out past capacity, against what came out at it.
    let at = |fraction: f64| {
        sweep
            .iter()
            .find(|s| s["fraction"].as_f64() == Some(fraction))
            .and_then(|s| s["achieved_msgs_per_s"].as_f64())
    };
    let mut overload = serde_json::Map::new();
    for over in [1.25, 1.5, 2.0] {
        if let (Some(past), Some(full)) = (at(over), at(1.0)) {
            println!("    replies/s at {:.0}% ÷ at 100%: {:.2}", over * 100.0, past / full);
            overload.insert(format!("{:.0}", over * 100.0), (past / full).into());
        }
    }
    results.insert("overload_ratio_to_full".into(), overload.into());
    results.insert("sweep".into(), sweep.into());
    stack.stop().await;

    // 5. Memory with 10,000 deliveries in flight (the handler answers after
    // 1 s): with the default limits, where the deliverer holds at most
    // `concurrency` attempts and the rest wait in the broker; and with the
    // limits raised so that all 10,000 are HTTP requests under way at once.
    println!("5/6 memory with 10,000 deliveries in flight…");
    let mut rss = serde_json::Map::new();
    for (stage, hwm_load, _) in &rss_after_load {
        rss.insert(stage.clone(), serde_json::json!({"peak_mib_throughput": hwm_load}));
    }
    memory_step(&url, &conn, &mut rss, &mut results).await?;
    for (stage, hwm_load, _) in &rss_after_load {
        println!("    {stage}: {hwm_load:.1} after the throughput run");
    }
    results.insert("rss".into(), rss.into());

    println!(
        "6/6 failing handlers: a healthy integration alone, then beside {} hanging ones…",
        args.hanging
    );
    results.insert(
        "failing_handlers".into(),
        failing::measure(&url, args.hanging, 20).await?,
    );

    let _ = conn.close(200, "".into()).await;

    if args.log_rounds > 0 {
        println!("+ the delivery log's cost…");
        let cost = log_cost(&url, args.log_seconds, args.window, args.log_rounds).await?;
        results.insert("delivery_log".into(), cost);
    }
    if !args.no_scale {
        println!("+ realistic scale at {} events/s…", args.scale_rate);
        let figures = scale::measure(&url, &args.scale_sizes, args.scale_rate, args.scale_seconds).await?;
        results.insert("scale".into(), figures);
    }
    let plot_from = serde_json::Value::Object(results.clone());
    write_results(&args.out, results)?;
    plot::draw(&plot_from, &args.plot)?;
    println!("plot written to {}", args.plot.display());
    Ok(())
}

/// The ingress step ([`ingress::measure`]) for `--seconds` (at most 20).
async fn ingress_step(
    args: &Args,
    ceiling: f64,
    pipeline: Option<f64>,
    results: &mut serde_json::Map<String, serde_json::Value>,
) -> anyhow::Result<()> {
    let seconds = args.seconds.min(20);
    println!(
        "+ ingress: signed Slack events from {} keep-alive clients for {seconds} s…",
        args.ingress_clients
    );
    let figures = ingress::measure(&args.amqp_url, seconds, args.ingress_clients, ceiling, pipeline).await?;
    results.insert("ingress".into(), figures);
    Ok(())
}

fn write_results(out: &Path, results: serde_json::Map<String, serde_json::Value>) -> anyhow::Result<()> {
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(out, serde_json::to_string_pretty(&serde_json::Value::Object(results))?)?;
    println!("results written to {}", out.display());
    Ok(())
}

/// The delivery log's cost: pipeline throughput (as in step 2) on fresh
/// stacks with `[log] enabled = false` and `true`, alternating, `rounds`
/// times each, so that both see the same machine; the medians and their
/// ratio.
async fn log_cost(url: &str, seconds: u64, window: usize, rounds: usize) -> anyhow::Result<serde_json::Value> {
    let (addr, _seen) = handler(Duration::ZERO).await;
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for enabled in [false, true] {
            let name = format!("log-{}-{round}", if enabled { "on" } else { "off" });
            let stack = Stack::start_configured(url, addr, &name, Some(512), ALL_STAGES, enabled).await?;
            let topology = Topology::new(&stack.prefix);
            let (replies, _) = listen_replies(url, &topology).await?;
            let mut processes = stack.pids();
            processes.extend(broker_pid().map(|pid| ("broker".to_owned(), pid)));
            let cpu_before = cpu_snapshot(&processes);
            let t0 = Instant::now();
            let exchange = topology.events_exchange();
            let sent = drive(&conn, (&exchange, "load"), "load", seconds, window, None, &replies).await?;
            let deadline = Instant::now() + Duration::from_secs(60);
            while (*replies.lock().unwrap() as usize) < sent.len() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let through = *replies.lock().unwrap();
            let rate = through as f64 / t0.elapsed().as_secs_f64();
            // CPU per 1,000 matched messages, by process.
            let cpu: Vec<String> = cpu_before
                .iter()
                .zip(cpu_snapshot(&processes))
                .map(|((name, before), (_, after))| {
                    let short = name.trim_start_matches("swallow-");
                    format!("{short} {:.0}", (after - before) / through.max(1) as f64 * 1e6)
                })
                .collect();
            let mut dropped = 0.0;
            for stage in ALL_STAGES {
                dropped += stack.metric(stage, "swallow_log_records_dropped_total").await;
            }
            println!(
                "    round {}: log {}: {rate:.0} msg/s (records dropped: {dropped}); CPU ms per 1,000 messages: {}",
                round + 1,
                if enabled { "on " } else { "off" },
                cpu.join(", ")
            );
            stack.stop().await;
            if enabled { &mut on } else { &mut off }.push(rate);
        }
    }
    let _ = conn.close(200, "".into()).await;
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let (m_off, m_on) = (median(&mut off), median(&mut on));
    let ratio = if m_off > 0.0 { m_on / m_off } else { 0.0 };
    println!("    median: off {m_off:.0} msg/s, on {m_on:.0} msg/s: {ratio:.3} × (target ≥ 0.95)");
    Ok(serde_json::json!({
        "seconds_per_round": seconds, "off_msgs_per_s": off, "on_msgs_per_s": on,
        "median_off": m_off, "median_on": m_on, "ratio_on_to_off": ratio,
    }))
}
