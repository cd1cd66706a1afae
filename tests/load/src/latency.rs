//! Latency in rounds (`--latency-only`): the full run's latency step (p99
//! event → POST at a paced rate, beside the broker alone carrying the same
//! two hops at the same rate) repeated, alternating the two, so that a
//! ratio can be reported as a median of rounds on a noisy machine rather
//! than one draw. The stages run throughout; they idle while the broker
//! alone is measured.

use std::time::{Duration, Instant};

use lapin::{Connection, ConnectionProperties};
use swallow_shared::Topology;

use crate::{ALL_STAGES, Floor, Stack, drive, handler, listen_replies, percentiles, post_latencies};

/// The median of `v` (the mean of the middle two for an even count).
fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// `rounds` rounds at `rate` events/s, `seconds` of load for the stages and
/// as many for the broker alone in each.
/// `log_off` runs the stages without the delivery log.
pub async fn measure(
    url: &str,
    rate: f64,
    seconds: u64,
    rounds: usize,
    log_off: bool,
) -> anyhow::Result<serde_json::Value> {
    let (addr, seen) = handler(Duration::ZERO).await;
    let stack = Stack::start_configured(url, addr, "latr", Some(512), ALL_STAGES, !log_off).await?;
    let topology = Topology::new(&stack.prefix);
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let (replies, _) = listen_replies(url, &topology).await?;
    let floor = Floor::start(url).await?;
    let (mut ratios, mut p99s, mut floors, mut out) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        // The stack's integration triggers on "load".
        let text = format!("load r{round}");
        let sent = drive(
            &conn,
            (&topology.events_exchange(), "load"),
            &text,
            seconds,
            usize::MAX,
            Some(rate),
            &replies,
        )
        .await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while post_latencies(&sent, &seen).len() < sent.len() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let post = percentiles(post_latencies(&sent, &seen));
        let alone = floor.measure(&format!("floor r{round}"), rate, seconds).await?;
        let (p, f) = (post["p99"].as_f64(), alone["p99"].as_f64());
        anyhow::ensure!(
            p.is_some() && f.is_some(),
            "round {round}: no latencies (POSTs seen {}, of {} sent)",
            post["n"],
            sent.len()
        );
        let (p, f) = (p.unwrap_or_default(), f.unwrap_or_default());
        println!(
            "    round {round}: p99 event → POST {p:.1} ms, the broker alone {f:.1} ms: {:.2}×",
            p / f
        );
        ratios.push(p / f);
        p99s.push(p);
        floors.push(f);
        out.push(serde_json::json!({"event_to_post_ms": post, "broker_floor_ms": alone}));
    }
    stack.stop().await;
    floor.stop().await;
    let _ = conn.close(200, "".into()).await;
    let (ratio, p99, alone) = (median(ratios), median(p99s), median(floors));
    println!(
        "    medians of {rounds} rounds: p99 event → POST {:.1} ms, the broker alone {:.1} ms, ratio {:.2}× (target ≤ 1.8× and ≤ 10 ms)",
        p99.unwrap_or(f64::NAN),
        alone.unwrap_or(f64::NAN),
        ratio.unwrap_or(f64::NAN)
    );
    Ok(serde_json::json!({
        "rate_msgs_per_s": rate,
        "delivery_log": !log_off,
        "seconds": seconds,
        "rounds": out,
        "median_p99_event_to_post_ms": p99,
        "median_p99_broker_floor_ms": alone,
        "median_ratio": ratio,
    }))
}

#[cfg(test)]
mod tests {
    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(super::median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(super::median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(super::median(vec![]), None);
    }
}
