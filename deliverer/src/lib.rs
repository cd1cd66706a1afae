//! `swallow-deliverer`: turns delivery jobs into the HTTP POSTs of Slack's legacy outgoing webhooks and
//! handler answers into replies for the responder.
//!
//! Every job ends each visit to the deliverer in exactly one durable place
//! before it is acknowledged: delivered (and its reply, if any, confirmed on
//! `<prefix>.replies`), parked on the delay ladder for a retry or a
//! rate-limit slot (confirmed), dead-lettered (confirmed), or dropped by an
//! `on_limit = "drop"` integration. Nothing waits in memory holding a broker
//! delivery except the HTTP attempt itself and a job's turn for an attempt
//! permit (within its shard's prefetch); a failing handler's circuit opens
//! (`circuit`), and the permits are handed out by fair queueing
//! (`permits`), so slow handlers never delay anyone else's jobs.
//!
//! `membership` serves the shards this replica holds; `jobs` handles each
//! job on them.

mod attempt;
pub mod circuit;
pub mod client;
pub mod connection;
pub mod destination;
mod guard;
mod jobs;
pub mod log_command;
mod membership;
mod metrics;
mod notice;
pub mod permits;
pub mod request;
pub mod shards;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use swallow_shared::broker::Health;
use swallow_shared::delivery_log::DeliveryLog;
use swallow_shared::job::pacing::RateLimiter;
use swallow_shared::job::retry::RetrySchedule;
use swallow_shared::stage::{Running, StageParts, StartError};
use swallow_shared::{Config, Integrations, Stage, Topology};

pub use attempt::{MAX_ANSWER_BYTES, Outcome, parse_answer};
use circuit::Circuits;
use connection::Boxed;
use destination::{AddressPolicy, GuardedResolver};
use metrics::DelivererMetrics;
use permits::AttemptPermits;

/// How long shutdown waits for HTTP attempts under way before handing them
/// back to the broker (they are redelivered).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// The deliverer could not start.
pub type DelivererError = StartError;

/// A started deliverer.
pub type Deliverer = Running;

/// Runs the deliverer until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), DelivererError> {
    start(config, shutdown).await?.join().await;
    Ok(())
}

pub use client::HttpClient;

/// The HTTP client for handlers: HTTP/1.1, or HTTP/2 where a TLS handler
/// offers it; a keep-alive pool, no redirects, no proxy, the SSRF guard in
/// its resolver, the platform's trusted roots for TLS. An HTTP/2 handler's
/// requests go over a connection of the client's own (`client`).
///
/// The pool keeps up to `max_idle_per_host` idle connections to a host:
/// the deliverer passes its `concurrency`, as many as can be busy at once,
/// so that a burst's connections are there for the next burst instead of
/// being closed and opened again (BENCHMARKS.md, "Connections kept for the
/// next burst").
///
/// hyper-util's client rather than reqwest (built on it): less CPU and
/// memory per attempt (BENCHMARKS.md, "The HTTP client").
pub fn http_client(policy: &AddressPolicy, max_idle_per_host: usize) -> Result<HttpClient, rustls::Error> {
    use rustls_platform_verifier::BuilderVerifierExt as _;
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_platform_verifier()?
        .with_no_client_auth();
    Ok(http_client_with(policy, max_idle_per_host, tls))
}

/// [`http_client`] with the TLS configuration given (its roots, say) in
/// place of the platform's; it offers HTTP/2 and HTTP/1.1 by ALPN whatever
/// `tls` says.
pub fn http_client_with(policy: &AddressPolicy, max_idle_per_host: usize, tls: rustls::ClientConfig) -> HttpClient {
    let mut http = HttpConnector::new_with_resolver(GuardedResolver::new(policy.clone()));
    http.enforce_http(false);
    http.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    let connector = Boxed(https);
    let pooled = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(max_idle_per_host)
        .build(connector.clone());
    HttpClient::new(pooled, connector)
}

/// Starts the deliverer and returns once its listener is bound.
pub async fn start(config: Config, shutdown: CancellationToken) -> Result<Deliverer, DelivererError> {
    let policy = AddressPolicy::new(config.deliverer.allow_networks.clone());
    let client = http_client(&policy, config.deliverer.concurrency).map_err(StartError::client)?;
    let parts = StageParts::new(Stage::Deliverer, &config, &shutdown).await?;
    let metrics = DelivererMetrics::new(&parts.registry);
    let topology = config.broker.topology();
    let ctx = Arc::new(Context {
        replica_id: uuid::Uuid::new_v4().simple().to_string(),
        replies_queue: topology.replies_queue(),
        topology,
        prefetch: shard_prefetch(config.deliverer.concurrency),
        integrations: parts.integrations.clone(),
        client,
        policy,
        limiter: RateLimiter::new(),
        permits: AttemptPermits::new(
            config.deliverer.concurrency,
            config.deliverer.per_integration_concurrency,
            shard_prefetch(config.deliverer.concurrency).into(),
        ),
        circuits: Circuits::new(),
        notices: Mutex::new(HashMap::new()),
        schedule: RetrySchedule::default(),
        metrics,
        log: parts.log.clone(),
        health: parts.health.clone(),
        shutdown: shutdown.clone(),
    });
    Ok(parts.run(&config, shutdown, move |connection| {
        membership::session(connection, ctx.clone())
    }))
}

/// Each shard's prefetch: room for `concurrency` attempts under way and as
/// many jobs waiting for their turn (`permits` keeps the waiting ones to
/// half of it), so that a shard whose jobs hold every permit still brings
/// new jobs in, and a quick integration's among them get their turns.
fn shard_prefetch(concurrency: usize) -> u16 {
    concurrency.saturating_mul(2).min(u16::MAX as usize) as u16
}

struct Context {
    topology: Topology,
    /// This replica's id in the deliverers' membership.
    replica_id: String,
    replies_queue: String,
    prefetch: u16,
    integrations: watch::Receiver<Arc<Integrations>>,
    client: HttpClient,
    policy: AddressPolicy,
    limiter: RateLimiter<String>,
    /// `[deliverer] concurrency` HTTP attempts under way at once, fairly shared.
    permits: Arc<AttemptPermits>,
    /// Circuit breakers per (integration, URL) of the shards held.
    circuits: Circuits,
    /// When each (integration, channel) last got a failure notice (ms).
    notices: Mutex<HashMap<(String, String), u64>>,
    schedule: RetrySchedule,
    metrics: DelivererMetrics,
    /// The delivery log: one record per attempt and per drop, park or dead letter.
    log: DeliveryLog,
    health: Health,
    shutdown: CancellationToken,
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::Full;
    use tokio::io::AsyncReadExt as _;

    /// An `https` handler gets a TLS handshake that offers HTTP/2 and
    /// HTTP/1.1 (ALPN), read off the client's first bytes by a plain TCP
    /// listener; with no TLS server behind it, the request fails.
    #[tokio::test]
    async fn https_handlers_get_tls_offering_h2_and_http1() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let allow_loopback = AddressPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]);
        let client = http_client(&allow_loopback, 4).unwrap();
        let request = http::Request::post(format!("https://127.0.0.1:{port}/"))
            .body(Full::new(Bytes::from_static(b"x")))
            .unwrap();
        let sent = tokio::spawn(async move { client.request(request).await });
        let (mut stream, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .expect("the client connects within 10 s")
            .unwrap();
        let mut hello = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut hello))
            .await
            .expect("the client speaks within 10 s")
            .unwrap();
        let hello = &hello[..n];
        assert_eq!(
            hello.first(),
            Some(&0x16),
            "a TLS handshake record, not plain HTTP: {hello:?}"
        );
        let offers = |proto: &[u8]| hello.windows(proto.len()).any(|w| w == proto);
        assert!(offers(b"\x02h2"), "ALPN offers h2");
        assert!(offers(b"\x08http/1.1"), "ALPN offers http/1.1");
        drop(stream);
        let failed = tokio::time::timeout(Duration::from_secs(10), sent)
            .await
            .unwrap()
            .unwrap();
        assert!(failed.is_err(), "no TLS server answered, so the request fails");
    }

    /// A burst of requests to one host, held by the handler until all have
    /// arrived (so each needs a connection of its own), then a second burst:
    /// with room for them all, the second goes over the first's connections.
    #[tokio::test]
    async fn the_pool_keeps_a_bursts_connections_for_the_next() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::AsyncWriteExt as _;
        const BURST: usize = 40;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let all_arrived = Arc::new(tokio::sync::Barrier::new(BURST));
        let counted = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                counted.fetch_add(1, Ordering::SeqCst);
                let all_arrived = all_arrived.clone();
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    loop {
                        let n = stream.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        request.extend_from_slice(&buf[..n]);
                        // Bodies are empty: a request ends with its headers.
                        if request.ends_with(b"\r\n\r\n") {
                            request.clear();
                            all_arrived.wait().await;
                            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                            if stream.write_all(ok).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        let allow_loopback = AddressPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]);
        let client = http_client(&allow_loopback, BURST).unwrap();
        let burst = || {
            futures_util::future::join_all((0..BURST).map(|_| {
                let request = http::Request::post(format!("http://127.0.0.1:{port}/"))
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                client.request(request)
            }))
        };
        let first = tokio::time::timeout(Duration::from_secs(20), burst())
            .await
            .expect("the first burst is answered within 20 s");
        assert!(first.iter().all(|r| r.as_ref().is_ok_and(|r| r.status() == 200)));
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            BURST,
            "one connection per request held"
        );
        // The connections go back to the pool from tasks of their own.
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        let second = tokio::time::timeout(Duration::from_secs(20), burst())
            .await
            .expect("the second burst is answered within 20 s");
        assert!(second.iter().all(|r| r.as_ref().is_ok_and(|r| r.status() == 200)));
        let opened = accepted.load(Ordering::SeqCst) - BURST;
        assert!(
            opened < BURST / 4,
            "the second burst opened {opened} connections of {BURST}, where the first burst's were idle in the pool"
        );
    }
}
