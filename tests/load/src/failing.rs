//! The failing-handlers step: a healthy integration's event → POST latency
//! alone, then beside `hanging` integrations whose handlers hang (they
//! answer after 8 s; `timeout_ms = 1000`), each channel sent 4 events a
//! second, on a fresh stack each time (so each run starts with every
//! circuit closed). The ratio of the p99s is what slow handlers cost
//! everyone else. Beside them twice: with every channel's event published
//! in the same instant, right after the healthy one (synchronized bursts,
//! the worst case), and with the hanging channels' events spread evenly over
//! each quarter second (independent channels).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use lapin::{Connection, ConnectionProperties};
use swallow_shared::Topology;
use swallow_tests::Integration;

use crate::{Confirmed, Stack, handler, listen_replies, micros_now, percentiles, post_latencies};

const EVENTS_PER_SECOND: u64 = 4;
fn integration(id: &str, channel: &str, url: &str) -> Integration {
    Integration::new(id)
        .channel(channel)
        .url(url)
        .set("timeout_ms", 1000)
        .rate_limit(5.0, 10)
}

fn event(channel: &str, text: &str) -> Vec<u8> {
    let now = micros_now();
    serde_json::to_vec(&serde_json::json!({
        "team_id": "T0001", "channel_id": channel, "channel_name": channel.to_lowercase(),
        "user_id": "U2147483697", "ts": format!("{}.{:06}", now / 1_000_000, now % 1_000_000),
        "text": text,
    }))
    .unwrap()
}

/// A fresh stack with `integrations`, a chat platform taking its replies,
/// and a connection with a confirmed publisher to its events exchange.
async fn start(
    url: &str,
    name: &str,
    integrations: Vec<Integration>,
) -> anyhow::Result<(Stack, Connection, Confirmed)> {
    let stack = Stack::with_integrations(url, name, integrations).await?;
    let topology = Topology::new(&stack.prefix);
    listen_replies(url, &topology).await?;
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let events = Confirmed::open(&conn, (&topology.events_exchange(), "")).await?;
    Ok((stack, conn, events))
}

/// One run: `hanging` integrations sent events beside the healthy one, in
/// bursts or `spread` over each tick.
async fn run(
    url: &str,
    hanging: usize,
    seconds: u64,
    name: &str,
    spread: bool,
) -> anyhow::Result<(serde_json::Value, u64)> {
    let (healthy_addr, seen) = handler(Duration::ZERO).await;
    let (hanging_addr, _) = handler(Duration::from_secs(8)).await;
    let mut integrations = vec![integration("healthy", "COK", &format!("http://{healthy_addr}/ok"))];
    for i in 0..hanging {
        integrations.push(integration(
            &format!("hang{i}"),
            &format!("CH{i}"),
            &format!("http://{hanging_addr}/h{i}"),
        ));
    }
    let (stack, conn, mut events) = start(url, name, integrations).await?;
    let mut sent: HashMap<String, u128> = HashMap::new();
    let started = Instant::now();
    let period = Duration::from_millis(1000 / EVENTS_PER_SECOND);
    let mut tick = tokio::time::interval(period);
    let mut n = 0u64;
    while started.elapsed() < Duration::from_secs(seconds) {
        let at = tick.tick().await;
        n += 1;
        // The healthy event first, stamped as it goes.
        let text = format!("ok {n}");
        sent.insert(text.clone(), micros_now());
        events.publish(&event("COK", &text)).await?;
        for i in 0..hanging {
            if spread {
                tokio::time::sleep_until(at + period.mul_f64((i as f64 + 0.5) / hanging as f64)).await;
            }
            events.publish(&event(&format!("CH{i}"), &format!("h{i} {n}"))).await?;
        }
        events.confirmed().await?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.lock().unwrap().len() < sent.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let attempts_hanging = stack
        .metric("swallow-deliverer", "swallow_delivery_attempts_total")
        .await as u64
        - seen.lock().unwrap().len() as u64;
    let latencies = post_latencies(&sent, &seen);
    let _ = conn.close(200, "".into()).await;
    stack.stop().await;
    Ok((percentiles(latencies), attempts_hanging))
}

/// The step: alone, then beside `hanging` hanging handlers, in bursts and
/// spread.
pub async fn measure(url: &str, hanging: usize, seconds: u64) -> anyhow::Result<serde_json::Value> {
    let (alone, _) = run(url, 0, seconds, "healthy-alone", false).await?;
    println!("    healthy alone: p50 {} ms, p99 {} ms", alone["p50"], alone["p99"]);
    let mut figures = serde_json::json!({
        "hanging": hanging, "seconds": seconds, "events_per_second_each": EVENTS_PER_SECOND,
        "healthy_alone_ms": alone,
    });
    for (spread, name, key) in [(false, "healthy-beside", "bursts"), (true, "healthy-spread", "spread")] {
        let (beside, attempts) = run(url, hanging, seconds, name, spread).await?;
        let ratio = beside["p99"].as_f64().unwrap_or(f64::NAN) / alone["p99"].as_f64().unwrap_or(f64::NAN);
        println!(
            "    healthy beside {hanging} hanging handlers ({key}): p50 {} ms, p99 {} ms, p99 ÷ alone {ratio:.2} (target ≤ 2); \
             {attempts} attempts reached the hanging handlers",
            beside["p50"], beside["p99"]
        );
        figures[key] =
            serde_json::json!({"healthy_beside_ms": beside, "p99_ratio": ratio, "attempts_to_hanging": attempts});
    }
    Ok(figures)
}

/// Who sends beside the healthy integration in the bursts variant, and how
/// their burst reaches the broker.
#[derive(Clone, Copy)]
struct Beside {
    /// Integrations beside the healthy one, each sent `k` events a second.
    others: usize,
    /// Their handlers hang (`timeout_ms = 1000`, `max_attempts = 3`);
    /// otherwise they answer at once, like the healthy one.
    hang: bool,
    /// The healthy burst is sent once the broker confirmed theirs (their
    /// events are in the inbox, ahead of it); otherwise it follows theirs
    /// on the wire at once, and its latency includes the broker taking
    /// their whole burst in first.
    confirmed_first: bool,
}

/// The bursts variant: each second, `k` events to each of the other
/// integrations (5/s with a burst of 10 each), then `k` to the healthy one
/// (1000/s, burst 1000) at once, behind them. The healthy integration has
/// several events under way at once, so this is what the fair queueing of
/// the attempt permits is for. Returns the healthy events' event → POST
/// latencies and how many of them were delivered of how many sent.
async fn run_bursts(
    url: &str,
    beside: Beside,
    k: usize,
    seconds: u64,
    name: &str,
) -> anyhow::Result<(serde_json::Value, usize, usize)> {
    let (healthy_addr, seen) = handler(Duration::ZERO).await;
    let delay = if beside.hang {
        Duration::from_secs(8)
    } else {
        Duration::ZERO
    };
    let (others_addr, _) = handler(delay).await;
    let mut integrations = vec![
        Integration::new("healthy")
            .channel("COK")
            .url(format!("http://{healthy_addr}/ok"))
            .rate_limit(1000.0, 1000),
    ];
    for i in 0..beside.others {
        integrations.push(
            integration(
                &format!("hang{i}"),
                &format!("CH{i}"),
                &format!("http://{others_addr}/h{i}"),
            )
            .set("max_attempts", 3),
        );
    }
    let (stack, conn, mut events) = start(url, name, integrations).await?;
    let mut sent: HashMap<String, u128> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    for n in 0..seconds {
        tick.tick().await;
        for i in 0..beside.others {
            for j in 0..k {
                events
                    .publish(&event(&format!("CH{i}"), &format!("h{i} {n}.{j}")))
                    .await?;
            }
        }
        if beside.confirmed_first {
            events.confirmed().await?;
        }
        // The healthy integration's burst, stamped as each event goes.
        for j in 0..k {
            let text = format!("ok {n}.{j}");
            sent.insert(text.clone(), micros_now());
            let body = event("COK", &text);
            events.publish(&body).await?;
        }
        events.confirmed().await?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.lock().unwrap().len() < sent.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let delivered = seen.lock().unwrap().len();
    let latencies = post_latencies(&sent, &seen);
    let _ = conn.close(200, "".into()).await;
    stack.stop().await;
    Ok((percentiles(latencies), delivered, sent.len()))
}

/// The bursts variant's step, in one run: the healthy integration's bursts
/// of `k` alone; behind `others` integrations' bursts of `k` whose handlers
/// answer at once (what the volume alone costs); behind as many whose
/// handlers hang, their burst on the wire just ahead of the healthy one;
/// and the same once the broker confirmed their burst. The difference
/// between quick and hanging neighbours is what slow handlers cost.
pub async fn measure_bursts(url: &str, others: usize, k: usize, seconds: u64) -> anyhow::Result<serde_json::Value> {
    let runs = [
        (
            "alone",
            "alone",
            Beside {
                others: 0,
                hang: false,
                confirmed_first: false,
            },
        ),
        (
            "beside_quick",
            "beside {others} quick handlers, their burst just ahead",
            Beside {
                others,
                hang: false,
                confirmed_first: false,
            },
        ),
        (
            "beside_hanging",
            "beside {others} hanging handlers, their burst just ahead",
            Beside {
                others,
                hang: true,
                confirmed_first: false,
            },
        ),
        (
            "beside_hanging_confirmed_first",
            "beside {others} hanging handlers, their burst confirmed first",
            Beside {
                others,
                hang: true,
                confirmed_first: true,
            },
        ),
    ];
    let mut figures = serde_json::json!({"others": others, "seconds": seconds, "burst": k});
    for (key, what, beside) in runs {
        let (latency, delivered, sent) = run_bursts(url, beside, k, seconds, &format!("bursts-{key}")).await?;
        let what = what.replace("{others}", &others.to_string());
        println!(
            "    healthy {what}, {k} at once each second: p50 {} ms, p90 {} ms, p99 {} ms ({delivered}/{sent} delivered)",
            latency["p50"], latency["p90"], latency["p99"]
        );
        figures[key] = serde_json::json!({"healthy_ms": latency, "delivered": delivered, "sent": sent});
    }
    Ok(figures)
}
