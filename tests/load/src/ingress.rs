//! The ingress step: signed Slack Events API requests per second that ONE
//! matcher's ingress (`POST /slack/events`) accepts, i.e. answers 200 once
//! the event is confirmed by the broker.
//!
//! K concurrent clients, each on one HTTP/1.1 keep-alive connection, post
//! for a bounded number of seconds; every request carries one
//! `event_callback` with one `message` event, its own `event_id` and `ts`
//! (nothing is a duplicate). The events are matched by one integration
//! (trigger word `load`), so the matcher does its usual work behind the
//! ingress (matching, publishing a delivery job); only the matcher runs, the
//! jobs wait in `<prefix>.jobs` and go with the prefix when the step ends.
//! A stand-in for Slack's Web API answers the name lookups (team, channel,
//! user), so that after the first request they come from the matcher's
//! cache.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use swallow_tests::slack_api::SlackApi;
use swallow_tests::{ConfigToml, Integration};

use crate::stages::{Stack, percentiles};

/// The signing secret the step's matcher is configured with.
const SECRET: &str = "swallow-load-signing-secret";

/// Slack's request signature: `v0=` and the hex HMAC-SHA256 of
/// `v0:<timestamp>:<body>` under the signing secret.
pub(crate) fn sign(secret: &str, timestamp: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(b"v0:");
    mac.update(timestamp.as_bytes());
    mac.update(b":");
    mac.update(body);
    let mut out = String::from("v0=");
    for b in mac.finalize().into_bytes() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// The `i`th message's `ts`: `base` seconds and `i` in microseconds past
/// them, so that every request of a run has its own.
pub(crate) fn event_ts(base: u64, i: u64) -> String {
    format!("{}.{:06}", base + i / 1_000_000, i % 1_000_000)
}

/// The `i`th request's body: an `event_callback` with one `message` event,
/// `event_id` unique to the run (`run`) and to `i`.
pub(crate) fn slack_message(run: u32, base: u64, i: u64, text: &str) -> Vec<u8> {
    let ts = event_ts(base, i);
    serde_json::to_vec(&serde_json::json!({
        "token": "unused", "team_id": "T0001", "api_app_id": "A0001", "type": "event_callback",
        "event_id": format!("Ev{run:08X}{i:010}"), "event_time": base,
        "event": {"type": "message", "channel": "C2147483705", "user": "U2147483697",
                  "text": format!("{text} {i}"), "ts": ts, "event_ts": ts, "channel_type": "channel"}
    }))
    .expect("a message encodes")
}

/// What the clients saw.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Counts {
    pub(crate) ok: u64,
    pub(crate) refused: u64,
    pub(crate) failed: u64,
}

/// `numerator ÷ denominator`, or `None` when there is nothing to divide by.
pub(crate) fn ratio(numerator: f64, denominator: f64) -> Option<f64> {
    (denominator > 0.0 && numerator.is_finite()).then(|| numerator / denominator)
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// One matcher with a Slack ingress (and a stand-in Web API), on a prefix of
/// its own; the ingress's address.
async fn start(url: &str) -> anyhow::Result<(Stack, SlackApi, std::net::SocketAddr)> {
    let api = SlackApi::start().await;
    let listen = swallow_tests::free_addr();
    let config = |prefix: &str| {
        ConfigToml::new()
            .broker(url, prefix)
            .loopback()
            .set("ingress", "listen", listen.to_string())
            .set("ingress.slack", "signing_secret", SECRET)
            .set("ingress.slack", "bot_token", "xoxb-load")
            .set("ingress.slack", "api_base", api.api_base())
            .integration(
                Integration::new("load")
                    .trigger_words(&["load"])
                    .set("trigger_match", "word")
                    // Nothing listens there: no deliverer runs in this step.
                    .url("http://127.0.0.1:9/load")
                    .rate_limit(1000000.0, 1000000),
            )
    };
    let stack = Stack::launch(url, "ingress", config, &["swallow-matcher"]).await?;
    Ok((stack, api, listen))
}

/// Posts `body` signed now; the status, or `None` when the request failed.
async fn post(client: &reqwest::Client, endpoint: &str, body: Vec<u8>) -> Option<u16> {
    let ts = unix_seconds().to_string();
    let signature = sign(SECRET, &ts, &body);
    let response = client
        .post(endpoint)
        .header("content-type", "application/json")
        .header("x-slack-request-timestamp", &ts)
        .header("x-slack-signature", signature)
        .body(body)
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    // Read to the end, so that the connection is kept for the next one.
    let _ = response.bytes().await;
    Some(status)
}

/// The step: `clients` keep-alive clients for `seconds`; the figures as JSON
/// (`ceiling` and `pipeline`, msg/s, for the ratios when measured).
pub(crate) async fn measure(
    url: &str,
    seconds: u64,
    clients: usize,
    ceiling: f64,
    pipeline: Option<f64>,
) -> anyhow::Result<serde_json::Value> {
    let (stack, api, listen) = start(url).await?;
    let endpoint = format!("http://{listen}/slack/events");
    let run = std::process::id();
    let base = unix_seconds();
    let next = Arc::new(AtomicU64::new(0));
    let new_client = || {
        reqwest::Client::builder()
            .http1_only()
            .pool_max_idle_per_host(1)
            .timeout(Duration::from_secs(10))
            .build()
    };
    // One request first, so that the names are cached before the clock runs.
    let warm = post(
        &new_client()?,
        &endpoint,
        slack_message(run, base, next.fetch_add(1, Ordering::Relaxed), "load"),
    )
    .await;
    anyhow::ensure!(
        warm == Some(200),
        "the ingress answered the first request with {warm:?}"
    );
    let lookups_after_warm = api.lookup_calls();

    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..clients.max(1) {
        let (client, endpoint, next) = (new_client()?, endpoint.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut counts = Counts::default();
            let mut took = Vec::new();
            while Instant::now() < deadline {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let t = Instant::now();
                match post(&client, &endpoint, slack_message(run, base, i, "load")).await {
                    Some(200) => {
                        counts.ok += 1;
                        took.push(t.elapsed().as_secs_f64() * 1000.0);
                    }
                    Some(_) => counts.refused += 1,
                    None => counts.failed += 1,
                }
            }
            (counts, took)
        }));
    }
    let mut counts = Counts::default();
    let mut took = Vec::new();
    for task in tasks {
        let (c, t) = task.await?;
        counts.ok += c.ok;
        counts.refused += c.refused;
        counts.failed += c.failed;
        took.extend(t);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let accepted = counts.ok as f64 / elapsed;
    let metric = |result: &'static str| {
        let stack = &stack;
        async move {
            stack
                .metric_with(
                    "swallow-matcher",
                    "swallow_ingress_events_total",
                    &[("platform", "slack"), ("result", result)],
                )
                .await
        }
    };
    let (published, duplicate) = (metric("published").await, metric("duplicate").await);
    let lookups = api.lookup_calls();
    stack.stop().await;

    let latency = percentiles(took);
    let to_ceiling = ratio(accepted, ceiling);
    let to_pipeline = pipeline.and_then(|p| ratio(accepted, p));
    println!(
        "    ingress: {accepted:.0} accepted/s ({} × 200, {} other statuses, {} failed; {clients} keep-alive clients, {seconds} s, matched events, matcher only)",
        counts.ok, counts.refused, counts.failed
    );
    println!("    request → 200 (ms): {latency}");
    println!(
        "    ingress ÷ ceiling: {}; ingress ÷ pipeline: {}",
        to_ceiling.map_or("?".into(), |r| format!("{r:.2}")),
        to_pipeline.map_or("not measured".into(), |r| format!(
            "{r:.2} (target ≥ 1: the ingress is not the bottleneck)"
        ))
    );
    println!(
        "    matcher: {published} events published, {duplicate} duplicates; Web API lookups: {lookups} ({lookups_after_warm} after the first request)"
    );
    Ok(serde_json::json!({
        "seconds": seconds, "clients": clients, "events": "matched by one integration (matcher only)",
        "accepted": counts.ok, "refused": counts.refused, "failed": counts.failed,
        "accepted_per_s": accepted, "request_to_200_ms": latency,
        "ratio_to_ceiling": to_ceiling, "ratio_to_pipeline": to_pipeline,
        "matcher_published": published, "matcher_duplicates": duplicate,
        "web_api_lookups": lookups,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_as_slack_documents() {
        // Slack's "Verifying requests from Slack" example.
        let body = b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
        assert_eq!(
            sign("8f742231b10e8888abcd99yyyzzz85a5", "1531420618", body),
            "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503"
        );
    }

    #[test]
    fn every_request_has_its_own_ts_and_event_id() {
        assert_eq!(event_ts(1700000000, 0), "1700000000.000000");
        assert_eq!(event_ts(1700000000, 42), "1700000000.000042");
        assert_eq!(event_ts(1700000000, 1_000_001), "1700000001.000001");
        let parse = |i| serde_json::from_slice::<serde_json::Value>(&slack_message(7, 1700000000, i, "load")).unwrap();
        let (a, b) = (parse(1), parse(2));
        assert_eq!(a["type"], "event_callback");
        assert_eq!(a["event"]["type"], "message");
        assert_eq!(a["event"]["text"], "load 1");
        assert_ne!(a["event_id"], b["event_id"]);
        assert_ne!(a["event"]["ts"], b["event"]["ts"]);
        assert_eq!(a["event"]["ts"], a["event"]["event_ts"]);
    }

    #[test]
    fn ratios_need_a_denominator() {
        assert_eq!(ratio(3.0, 2.0), Some(1.5));
        assert_eq!(ratio(3.0, 0.0), None);
        assert_eq!(ratio(f64::NAN, 2.0), None);
    }
}
