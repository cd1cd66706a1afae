//! The load generator's stages and floors: the three stages on a prefix of
//! their own (`Stack`), the broker alone on the same two queue hops
//! (`Floor`), the keep-alive handler they post to, and the publishing and
//! percentile helpers these share. Dropped without `stop` (a step that ends
//! early on an error), a stack or a floor still deletes what was declared
//! for it.
//!
//! swallow-tests compiles this file too (`tests/tests/load_generator.rs`,
//! through `#[path]`), so that `cargo test --workspace` checks this cleanup
//! and the HTTP/2 handler without building the load generator and its
//! plotting.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use swallow_shared::Topology;
use swallow_tests::{ConfigToml, Integration, TempDir};

pub(crate) fn event_body(i: u64, text: &str) -> Vec<u8> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros();
    serde_json::to_vec(&serde_json::json!({
        "team_id": "T0001", "team_domain": "example", "channel_id": "C2147483705", "channel_name": "test",
        "channel_type": "public", "user_id": "U2147483697", "user_name": "Steve",
        "ts": format!("{}.{:06}", now / 1_000_000, now % 1_000_000),
        "text": format!("{text} {i}"),
    }))
    .unwrap()
}

pub(crate) fn micros_now() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros()
}

/// Consumes `queue` on a channel of its own: manual acks, at most
/// `prefetch` unacknowledged.
pub(crate) async fn consume(conn: &Connection, queue: &str, prefetch: u16) -> anyhow::Result<lapin::Consumer> {
    let ch = conn.create_channel().await?;
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let options = BasicConsumeOptions::default();
    Ok(ch
        .basic_consume(queue.into(), "".into(), options, FieldTable::default())
        .await?)
}

/// When each POST's text reached the handler (µs since the epoch).
pub(crate) type Seen = Arc<Mutex<HashMap<String, u128>>>;

/// The handler's routes: each POST's text noted in the returned map with
/// when it arrived, answered `{"text":"ok"}` after `delay`.
pub(crate) fn handler_app(delay: Duration) -> (axum::Router, Seen) {
    use axum::Router;
    use axum::body::Bytes;
    use axum::extract::State;
    let seen: Seen = Arc::new(Mutex::new(HashMap::new()));
    async fn handle(State((seen, delay)): State<(Seen, Duration)>, body: Bytes) -> impl axum::response::IntoResponse {
        let at = micros_now();
        let fields: Vec<(String, String)> = serde_urlencoded::from_bytes(&body).unwrap_or_default();
        if let Some((_, text)) = fields.iter().find(|(k, _)| k == "text") {
            seen.lock().unwrap().insert(text.clone(), at);
        }
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        (
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            "{\"text\":\"ok\"}",
        )
    }
    let app = Router::new().fallback(handle).with_state((seen.clone(), delay));
    (app, seen)
}

/// A keep-alive handler on loopback (HTTP/1.1): its address, and when
/// each POST's text arrived.
pub(crate) async fn handler(delay: Duration) -> (std::net::SocketAddr, Seen) {
    let (app, seen) = handler_app(delay);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, seen)
}

/// The same handler over TLS, speaking HTTP/2 only
/// (`swallow_tests::tls::serve_tls`). The CA's certificate is written to a
/// temporary directory of its own and its path returned, for the deliverer
/// to trust (`SSL_CERT_FILE`), with the directory (removed when dropped).
pub(crate) async fn handler_h2(delay: Duration) -> anyhow::Result<(std::net::SocketAddr, Seen, PathBuf, TempDir)> {
    let dir = TempDir::new("load-tls");
    let (app, seen) = handler_app(delay);
    let service = hyper_util::service::TowerToHyperService::new(app);
    let server = swallow_tests::tls::serve_tls(service, &dir, hyper::Version::HTTP_2).await?;
    Ok((server.addr, seen, server.ca_file, dir))
}

/// `--bin-dir`, when given.
pub(crate) static BIN_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

pub(crate) const ALL_STAGES: &[&str] = &["swallow-matcher", "swallow-deliverer", "swallow-responder"];

/// The three stages on a prefix of their own. Dropped (after `stop`, or
/// when a step ends early on an error), it deletes what they declared, so
/// no run leaves queues on the broker.
pub(crate) struct Stack {
    pub(crate) prefix: String,
    pub(crate) children: Vec<(String, tokio::process::Child, u16)>,
    pub(crate) dir: TempDir,
    pub(crate) url: String,
    /// Environment for the stages started from now on.
    pub(crate) env: Vec<(String, String)>,
}

impl Stack {
    pub(crate) async fn start(
        url: &str,
        handler: std::net::SocketAddr,
        name: &str,
        concurrency: Option<usize>,
    ) -> anyhow::Result<Stack> {
        Self::start_stages(url, handler, name, concurrency, ALL_STAGES).await
    }

    /// The three stages with these integrations (and the deliverer's
    /// default limits).
    pub(crate) async fn with_integrations(
        url: &str,
        name: &str,
        integrations: impl IntoIterator<Item = Integration>,
    ) -> anyhow::Result<Stack> {
        let config = |prefix: &str| {
            integrations.into_iter().fold(
                ConfigToml::new().broker(url, prefix).loopback(),
                ConfigToml::integration,
            )
        };
        Self::launch(url, name, config, ALL_STAGES).await
    }

    /// `stages` on the prefix `load-<name>-<pid>`, with the configuration
    /// `config` gives for that prefix (written to the stack's directory).
    pub(crate) async fn launch(
        url: &str,
        name: &str,
        config: impl FnOnce(&str) -> ConfigToml,
        stages: &[&str],
    ) -> anyhow::Result<Stack> {
        let prefix = format!("load-{name}-{}", std::process::id());
        let dir = TempDir::new(&prefix);
        config(&prefix).write(&dir);
        let mut stack = Stack {
            prefix,
            children: Vec::new(),
            dir,
            url: url.to_owned(),
            env: Vec::new(),
        };
        for stage in stages {
            stack.add(stage).await?;
        }
        Ok(stack)
    }

    pub(crate) async fn start_stages(
        url: &str,
        handler: std::net::SocketAddr,
        name: &str,
        concurrency: Option<usize>,
        stages: &[&str],
    ) -> anyhow::Result<Stack> {
        Self::start_configured(url, handler, name, concurrency, stages, true).await
    }

    /// Like `start_stages`, with the delivery log on or off (`[log] enabled`).
    pub(crate) async fn start_configured(
        url: &str,
        handler: std::net::SocketAddr,
        name: &str,
        concurrency: Option<usize>,
        stages: &[&str],
        log: bool,
    ) -> anyhow::Result<Stack> {
        Self::start_at(url, &format!("http://{handler}"), name, concurrency, stages, log).await
    }

    /// Like `start_configured`, with the handler at `handler_url` (a
    /// scheme and an address, no path).
    pub(crate) async fn start_at(
        url: &str,
        handler_url: &str,
        name: &str,
        concurrency: Option<usize>,
        stages: &[&str],
        log: bool,
    ) -> anyhow::Result<Stack> {
        let config = |prefix: &str| {
            let mut config = ConfigToml::new()
                .broker(url, prefix)
                .loopback()
                .responder_rate(1000000.0)
                .set("log", "enabled", log)
                .integration(
                    Integration::new("load")
                        .trigger_words(&["load"])
                        .set("trigger_match", "word")
                        .url(format!("{handler_url}/load"))
                        .rate_limit(1000000.0, 1000000),
                );
            // No `concurrency` keeps the deliverer's defaults.
            if let Some(c) = concurrency {
                config = config
                    .set("deliverer", "concurrency", c)
                    .set("deliverer", "per_integration_concurrency", c);
            }
            config
        };
        Self::launch(url, name, config, stages).await
    }

    /// Starts one stage binary (from next to this one) and waits until it is ready.
    pub(crate) async fn add(&mut self, stage: &str) -> anyhow::Result<()> {
        let bin_dir = match BIN_DIR.get() {
            Some(dir) => dir.clone(),
            None => std::env::current_exe()?
                .parent()
                .map(Path::to_owned)
                .unwrap_or_default(),
        };
        let bin = bin_dir.join(stage);
        anyhow::ensure!(
            bin.exists(),
            "{} is not built: build the stages with the same profile first, e.g. \
             `cargo build --profile dist -p swallow-matcher -p swallow-deliverer -p swallow-responder -p swallow-tools` \
             (or give --bin-dir)",
            bin.display()
        );
        let port = swallow_tests::free_addr().port();
        let child = tokio::process::Command::new(&bin)
            .arg("--config")
            .arg(self.dir.join("swallow.toml"))
            .env("SWALLOW_HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "error")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .kill_on_drop(true)
            .spawn()?;
        anyhow::ensure!(
            swallow_tests::wait_ready(&format!("http://127.0.0.1:{port}/readyz"), Duration::from_secs(30)).await,
            "{stage} not ready"
        );
        self.children.push((stage.to_owned(), child, port));
        Ok(())
    }

    /// Peak RSS (VmHWM) and current RSS of each stage, in MiB.
    pub(crate) fn pids(&self) -> Vec<(String, u32)> {
        self.children
            .iter()
            .filter_map(|(stage, child, _)| Some((stage.clone(), child.id()?)))
            .collect()
    }

    pub(crate) fn rss(&self) -> Vec<(String, f64, f64)> {
        self.children
            .iter()
            .map(|(stage, child, _)| {
                let status =
                    std::fs::read_to_string(format!("/proc/{}/status", child.id().unwrap_or(0))).unwrap_or_default();
                let kb = |key: &str| -> f64 {
                    status
                        .lines()
                        .find(|l| l.starts_with(key))
                        .and_then(|l| l.split_whitespace().nth(1))
                        .and_then(|v| v.parse::<f64>().ok())
                        .unwrap_or(0.0)
                };
                (stage.clone(), kb("VmHWM:") / 1024.0, kb("VmRSS:") / 1024.0)
            })
            .collect()
    }

    pub(crate) async fn metric(&self, stage: &str, name: &str) -> f64 {
        self.metric_with(stage, name, &[]).await
    }

    /// The sum of `name`'s samples whose labels include `labels`.
    pub(crate) async fn metric_with(&self, stage: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
        let port = self
            .children
            .iter()
            .find(|(s, _, _)| s == stage)
            .map(|c| c.2)
            .unwrap_or(0);
        swallow_tests::metric(format!("127.0.0.1:{port}").parse().unwrap(), name, labels)
            .await
            .unwrap_or(0.0)
    }

    /// Kills the stages and waits for them to be gone; dropping `self`
    /// then deletes what they declared.
    pub(crate) async fn stop(mut self) {
        for (_, child, _) in &mut self.children {
            let _ = child.kill().await;
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // Children not yet killed go with `kill_on_drop`.
        let t = Topology::new(&self.prefix);
        swallow_tests::delete_declared_blocking(&self.url, t.queues(), t.exchanges());
    }
}

/// A channel in confirm mode that publishes persistent messages to one
/// `(exchange, routing key)`; `confirmed` awaits the broker's confirms of
/// those published since it was last called.
pub(crate) struct Confirmed {
    ch: lapin::Channel,
    exchange: String,
    routing_key: String,
    unconfirmed: Vec<lapin::PublisherConfirm>,
}

impl Confirmed {
    pub(crate) async fn open(conn: &Connection, (exchange, routing_key): (&str, &str)) -> anyhow::Result<Confirmed> {
        let ch = conn.create_channel().await?;
        ch.confirm_select(Default::default()).await?;
        Ok(Confirmed {
            ch,
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            unconfirmed: Vec::new(),
        })
    }

    /// Publishes `body`, its confirm still to come.
    pub(crate) async fn publish(&mut self, body: &[u8]) -> anyhow::Result<()> {
        let confirm = self
            .ch
            .basic_publish(
                self.exchange.as_str().into(),
                self.routing_key.as_str().into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?;
        self.unconfirmed.push(confirm);
        Ok(())
    }

    /// Awaits the confirms of what was published since the last call, in
    /// publishing order.
    pub(crate) async fn confirmed(&mut self) -> anyhow::Result<()> {
        for c in self.unconfirmed.drain(..) {
            c.await?;
        }
        Ok(())
    }
}

/// Publishes events to `(exchange, routing key)`, keeping at most `window`
/// not yet answered (or paced at `rate` per second), for `seconds`; returns
/// publish times.
pub(crate) async fn drive(
    conn: &Connection,
    (exchange, routing_key): (&str, &str),
    text: &str,
    seconds: u64,
    window: usize,
    rate: Option<f64>,
    done: &Arc<Mutex<u64>>,
) -> anyhow::Result<HashMap<String, u128>> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(Default::default()).await?;
    let mut sent: HashMap<String, u128> = HashMap::new();
    let started = Instant::now();
    let mut i = 0u64;
    let mut confirms = std::collections::VecDeque::new();
    while started.elapsed() < Duration::from_secs(seconds) {
        if let Some(rate) = rate {
            let due = started + Duration::from_secs_f64(i as f64 / rate);
            if due > Instant::now() {
                tokio::time::sleep_until(due.into()).await;
            }
        } else {
            while i.saturating_sub(*done.lock().unwrap()) as usize >= window {
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        }
        let body = event_body(i, text);
        sent.insert(format!("{text} {i}"), micros_now());
        confirms.push_back(
            ch.basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?,
        );
        while confirms.len() > 500 {
            let c: lapin::PublisherConfirm = confirms.pop_front().unwrap();
            c.await?;
        }
        i += 1;
    }
    for c in confirms {
        c.await?;
    }
    Ok(sent)
}

/// The broker's own latency for the two quorum-queue hops an event makes
/// before its POST, with no swallow code in the way: events go into queue
/// `a`; a relay consumes it as the matcher does (one task per message,
/// publish to queue `b` with a confirm, then ack) and a sink consumes `b`,
/// noting when each event arrives.
pub(crate) struct Floor {
    pub(crate) conn: Connection,
    pub(crate) a: String,
    pub(crate) b: String,
    pub(crate) seen: Arc<Mutex<HashMap<String, u128>>>,
    pub(crate) tasks: Vec<tokio::task::JoinHandle<()>>,
    pub(crate) url: String,
}

impl Floor {
    pub(crate) async fn start(url: &str) -> anyhow::Result<Floor> {
        let conn = Connection::connect(url, ConnectionProperties::default()).await?;
        let pid = std::process::id();
        let (a, b) = (
            format!("swallow-load-floor-a-{pid}"),
            format!("swallow-load-floor-b-{pid}"),
        );
        let ch = conn.create_channel().await?;
        for q in [&a, &b] {
            swallow_shared::topology::declare_quorum_queue(&ch, q).await?;
        }
        let mut relay = consume(&conn, &a, 512).await?;
        let publisher = conn.create_channel().await?;
        publisher.confirm_select(Default::default()).await?;
        let to = b.clone();
        let relay = tokio::spawn(async move {
            while let Some(Ok(d)) = relay.next().await {
                let (publisher, to) = (publisher.clone(), to.clone());
                tokio::spawn(async move {
                    let props = BasicProperties::default().with_delivery_mode(2);
                    let published = publisher
                        .basic_publish(
                            "".into(),
                            to.as_str().into(),
                            BasicPublishOptions::default(),
                            &d.data,
                            props,
                        )
                        .await;
                    if let Ok(confirm) = published
                        && confirm.await.is_ok()
                    {
                        let _ = d.ack(BasicAckOptions::default()).await;
                    }
                });
            }
        });
        let mut sink = consume(&conn, &b, 512).await?;
        let seen: Arc<Mutex<HashMap<String, u128>>> = Arc::default();
        let noted = seen.clone();
        let sink = tokio::spawn(async move {
            while let Some(Ok(d)) = sink.next().await {
                let at = micros_now();
                if let Ok(event) = serde_json::from_slice::<serde_json::Value>(&d.data)
                    && let Some(text) = event["text"].as_str()
                {
                    noted.lock().unwrap().insert(text.to_owned(), at);
                }
                let _ = d.ack(BasicAckOptions::default()).await;
            }
        });
        Ok(Floor {
            conn,
            a,
            b,
            seen,
            tasks: vec![relay, sink],
            url: url.to_owned(),
        })
    }

    /// Percentiles of publish → arrival at the sink, for events offered at
    /// `rate` per second for `seconds`.
    pub(crate) async fn measure(&self, text: &str, rate: f64, seconds: u64) -> anyhow::Result<serde_json::Value> {
        let none = Arc::new(Mutex::new(0u64));
        let sent = drive(&self.conn, ("", &self.a), text, seconds, usize::MAX, Some(rate), &none).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let missing = || {
            let seen = self.seen.lock().unwrap();
            sent.keys().any(|t| !seen.contains_key(t))
        };
        while missing() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(percentiles(post_latencies(&sent, &self.seen)))
    }

    /// Closes the floor's connection; dropping `self` then stops its tasks
    /// and deletes its queues.
    pub(crate) async fn stop(self) {
        let _ = self.conn.close(200, "".into()).await;
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        swallow_tests::delete_declared_blocking(&self.url, vec![self.a.clone(), self.b.clone()], Vec::new());
    }
}

/// Milliseconds from each event's publish (`sent`, by text) to its POST
/// reaching the handler (`seen`).
pub(crate) fn post_latencies(sent: &HashMap<String, u128>, seen: &Mutex<HashMap<String, u128>>) -> Vec<f64> {
    let seen = seen.lock().unwrap();
    sent.iter()
        .filter_map(|(text, at)| seen.get(text).map(|p| (*p as f64 - *at as f64) / 1000.0))
        .collect()
}

pub(crate) fn percentiles(mut v: Vec<f64>) -> serde_json::Value {
    if v.is_empty() {
        return serde_json::json!(null);
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let p = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    serde_json::json!({"p50": p(0.5), "p90": p(0.9), "p99": p(0.99), "max": v[v.len() - 1], "n": v.len()})
}
