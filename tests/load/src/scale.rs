//! The realistic-scale step: `n` integrations (one in five sharing a channel
//! with four others, trigger words of several lengths), events spread over
//! them Zipf-like (exponent 1), the default rate limit (1/s, burst 5) so that
//! the hottest integrations park jobs on the delay ladder, and 1% of the
//! handlers slow (they answer after 1 s). Offered at a fixed rate for a fixed
//! time, on a fresh stack for each `n`; the figures are taken over that
//! window (the ladder's backlog is left to the stack's teardown).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use lapin::{Connection, ConnectionProperties};
use rand::SeedableRng as _;
use rand_distr::Distribution as _;
use swallow_shared::Topology;
use swallow_shared::config::RateLimit;
use swallow_shared::job::pacing::{Admission, TokenBucket};
use swallow_tests::Integration;

use crate::{
    Confirmed, Stack, broker_pid, cpu_seconds, handler, listen_replies, micros_now, percentiles, post_latencies,
};

/// The default `max_age_s`: how far ahead the deliverer reserves a slot.
const MAX_AGE: Duration = Duration::from_secs(600);
/// Every hundredth handler answers after this long.
const SLOW: Duration = Duration::from_secs(1);

/// Integration `k`'s trigger word: `b<k>`, padded to one of five lengths.
fn trigger(k: usize) -> String {
    let pad = ["", "x", "xyz", "longer", "a-much-longer-word"][k % 5];
    format!("b{k}{pad}:")
}

/// Integration `k`'s channel: one in five share theirs with four others.
fn channel(k: usize) -> String {
    if k.is_multiple_of(5) {
        format!("CS{}", k / 25)
    } else {
        format!("C{k}")
    }
}

fn integrations(n: usize, fast: std::net::SocketAddr, slow: std::net::SocketAddr) -> Vec<Integration> {
    (0..n)
        .map(|k| {
            let url = if k % 100 == 99 {
                format!("http://{slow}/i{k}")
            } else {
                format!("http://{fast}/i{k}")
            };
            Integration::new(&format!("i{k}"))
                .channel(&channel(k))
                .trigger_words(&[&trigger(k)])
                .url(url)
        })
        .collect()
}

fn event(k: usize, text: &str) -> Vec<u8> {
    let now = micros_now();
    serde_json::to_vec(&serde_json::json!({
        "team_id": "T0001", "channel_id": channel(k), "user_id": "U2147483697",
        "ts": format!("{}.{:06}", now / 1_000_000, now % 1_000_000), "text": text,
    }))
    .unwrap()
}

/// One size: `n` integrations, `rate` events/s for `seconds`.
pub async fn measure_one(url: &str, n: usize, rate: f64, seconds: u64) -> anyhow::Result<serde_json::Value> {
    let (fast, fast_seen) = handler(Duration::ZERO).await;
    let (slow, slow_seen) = handler(SLOW).await;
    let stack = Stack::with_integrations(url, &format!("scale{n}"), integrations(n, fast, slow)).await?;
    let topology = Topology::new(&stack.prefix);
    // A chat platform takes the replies.
    let (replies, _) = listen_replies(url, &topology).await?;
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let mut events = Confirmed::open(&conn, (&topology.events_exchange(), "")).await?;
    let zipf = rand_distr::Zipf::new(n as f64, 1.0)?;
    // Seeded, so that each size sees the same spread in every run.
    let mut rng = rand::rngs::StdRng::seed_from_u64(n as u64);
    // Each event's text (unique), its integration, when it was published,
    // and whether its integration's token bucket had a token for it then:
    // an event under the limit. The buckets are the deliverer's own
    // (`pacing::TokenBucket`, the default limit), so an event that finds
    // none reserves the next slot as its job will, and the events after it
    // queue behind that reservation.
    let mut sent: HashMap<String, (usize, u128, bool)> = HashMap::new();
    let limit = RateLimit::default();
    let mut buckets: HashMap<usize, TokenBucket> = HashMap::new();
    let broker = broker_pid();
    let broker_before = broker.and_then(cpu_seconds);
    let tick = Duration::from_millis(10);
    let per_tick = rate * tick.as_secs_f64();
    let mut ticker = tokio::time::interval(tick);
    let started = Instant::now();
    let mut owed = 0.0;
    let mut seq = 0u64;
    while started.elapsed() < Duration::from_secs(seconds) {
        ticker.tick().await;
        owed += per_tick;
        while owed >= 1.0 {
            owed -= 1.0;
            seq += 1;
            let k = (zipf.sample(&mut rng) as usize).clamp(1, n) - 1;
            let text = format!("{} e{seq}", trigger(k));
            let body = event(k, &text);
            let at = micros_now();
            let now = Instant::now();
            let bucket = buckets.entry(k).or_insert_with(|| TokenBucket::new(&limit, now));
            let under = bucket.reserve(now, MAX_AGE) == Admission::Now;
            sent.insert(text, (k, at, under));
            events.publish(&body).await?;
        }
        events.confirmed().await?;
    }
    let window = started.elapsed().as_secs_f64();
    // The POSTs due within the window land within a second or so of it.
    tokio::time::sleep(SLOW + Duration::from_millis(500)).await;
    let broker_cpu = broker.and_then(cpu_seconds).zip(broker_before).map(|(a, b)| a - b);
    let posts = fast_seen.lock().unwrap().len() + slow_seen.lock().unwrap().len();
    let replies = *replies.lock().unwrap();
    // The events that found a token, to fast handlers; and how many
    // integrations were over their limit at least once.
    let under: HashMap<String, u128> = sent
        .iter()
        .filter(|(_, (k, _, under))| *under && k % 100 != 99)
        .map(|(text, (_, at, _))| (text.clone(), *at))
        .collect();
    let mut over: Vec<usize> = sent.values().filter(|e| !e.2).map(|e| e.0).collect();
    over.sort_unstable();
    over.dedup();
    let over = over.len();
    let latency = percentiles(post_latencies(&under, &fast_seen));
    let mut ladder = serde_json::Map::new();
    let mut ladder_total = 0u64;
    for step in 0..swallow_shared::topology::DELAY_STEPS {
        let queue = topology.delay_step_name(step);
        let depth = swallow_shared::broker::ready_count(&conn, &queue).await.unwrap_or(0);
        ladder_total += u64::from(depth);
        if depth > 0 {
            ladder.insert(queue.rsplit('.').next().unwrap_or_default().to_owned(), depth.into());
        }
    }
    // What the ladder is doing: jobs parked for a rate-limit slot, and the
    // trips back onto it of jobs not yet due (each a publish, a dead-letter
    // and a delivery for the broker).
    let deliverer = "swallow-deliverer";
    let parked = stack
        .metric_with(deliverer, "swallow_deliveries_total", &[("outcome", "rate_limited")])
        .await;
    let trips = stack
        .metric_with(deliverer, "swallow_jobs_deferred_total", &[("reason", "schedule")])
        .await;
    let rss: serde_json::Map<String, serde_json::Value> = stack
        .rss()
        .into_iter()
        .map(|(stage, peak, _)| (stage, peak.into()))
        .collect();
    let broker_ms_per_1k = broker_cpu.map(|cpu| cpu / sent.len().max(1) as f64 * 1e6);
    println!(
        "    {n} integrations: {:.0} POSTs/s for {:.0} events/s offered ({over} integrations over their limit); \
         under-limit event → POST p99 {} ms; broker {} ms CPU per 1,000 events; ladder holds {ladder_total} \
         ({parked:.0} jobs parked for a slot, {trips:.0} more trips); peak RSS (MiB) {}",
        posts as f64 / window,
        sent.len() as f64 / window,
        latency["p99"],
        broker_ms_per_1k.map_or("?".into(), |v| format!("{v:.1}")),
        rss.iter()
            .map(|(stage, mib)| format!("{stage} {:.0}", mib.as_f64().unwrap_or(0.0)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = conn.close(200, "".into()).await;
    stack.stop().await;
    Ok(serde_json::json!({
        "integrations": n, "offered_msgs_per_s": sent.len() as f64 / window,
        "posts_per_s": posts as f64 / window, "replies_per_s": replies as f64 / window,
        "integrations_over_limit": over,
        "events_under_limit": under.len(),
        "under_limit_event_to_post_ms": latency, "broker_ms_per_1k_events": broker_ms_per_1k,
        "peak_rss_mib": rss, "ladder_depth": ladder_total, "ladder_by_step": ladder,
        "parked_for_a_slot": parked, "ladder_trips_not_due": trips,
    }))
}

/// The step at every size in `sizes`.
pub async fn measure(url: &str, sizes: &[usize], rate: f64, seconds: u64) -> anyhow::Result<serde_json::Value> {
    let mut rows = Vec::new();
    for &n in sizes {
        rows.push(measure_one(url, n, rate, seconds).await?);
    }
    Ok(serde_json::json!({ "rate": rate, "seconds": seconds, "sizes": rows }))
}
