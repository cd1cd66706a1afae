//! Test support shared by swallow's integration, end-to-end and fault tests:
//! finding a real broker, an isolated prefix per test (deleted afterwards),
//! publishing chat events, draining queues, spawning the real binaries and
//! bounded waits with clear failure messages.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ExchangeDeleteOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::OnceCell;

pub mod chat;
pub mod cluster;
pub mod googlebot;
pub mod handler;

pub use swallow_shared::Topology;

static BROKER: OnceCell<String> = OnceCell::const_new();

/// The broker tests use: `AMQP_URL`, else `127.0.0.1:5672` when it answers,
/// else a RabbitMQ container started with testcontainers (needs Docker).
pub async fn broker_url() -> String {
    BROKER
        .get_or_init(|| async {
            if let Ok(url) = std::env::var("AMQP_URL")
                && !url.is_empty()
            {
                return url;
            }
            let local = "127.0.0.1:5672";
            if tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(local))
                .await
                .is_ok_and(|c| c.is_ok())
            {
                return format!("amqp://guest:guest@{local}/%2f");
            }
            start_container().await
        })
        .await
        .clone()
}

async fn start_container() -> String {
    use testcontainers::core::{IntoContainerPort, WaitFor};
    use testcontainers::runners::AsyncRunner;
    let container = testcontainers::GenericImage::new("rabbitmq", "3.13")
        .with_exposed_port(5672.tcp())
        .with_wait_for(WaitFor::message_on_stdout("Server startup complete"))
        .start()
        .await
        .expect("no broker at AMQP_URL or 127.0.0.1:5672, and starting one with Docker failed");
    let port = container.get_host_port_ipv4(5672).await.expect("container port");
    // Keep the container for the life of the test process.
    Box::leak(Box::new(container));
    format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
}

/// Polls a `/readyz` URL until it answers 200; false after `timeout`.
pub async fn wait_ready(url: &str, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if reqwest::get(url).await.is_ok_and(|r| r.status().is_success()) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Polls `check` until it returns `Some`, or fails the test after `timeout`
/// saying what was awaited.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How late the broker may hand back a message parked on the delay ladder
/// in these tests. Usually it is a few milliseconds; on a loaded CI machine
/// a stall of 1.6 s was seen.
pub const LADDER_LATENESS: Duration = Duration::from_secs(3);

/// Fails unless the times `at` (in order) keep a token bucket of
/// `per_second` and `burst`: in every stretch from one request to a later
/// one, at most `burst + per_second × its length + slack` requests. `slack`
/// is the limit's allowance for messages using their slots a little late
/// (`pacing::slot_grace`, one token at rates up to 4/s).
pub fn assert_within_limit(at: &[Instant], per_second: f64, burst: u32, slack: f64, what: &str) {
    let offsets: Vec<f64> = at.iter().map(|t| (*t - at[0]).as_secs_f64()).collect();
    for (j, from) in offsets.iter().enumerate() {
        for (i, to) in offsets.iter().enumerate().skip(j) {
            let count = (i - j + 1) as f64;
            let allowed = f64::from(burst) + per_second * (to - from) + slack + 0.05;
            assert!(
                count <= allowed,
                "{what}: {count} requests from {from:.2} s to {to:.2} s, more than the limit allows ({allowed:.2}): {offsets:.2?}"
            );
        }
    }
}

/// Fails unless the times `at` of a backlog sent from the start keep the
/// limit (`assert_within_limit`, one token of slack) and span about what the
/// limit makes them: the burst at once, then one per interval. Never less;
/// more only by the slots the broker's lateness made messages miss.
pub fn assert_paced(at: &[Instant], per_second: f64, burst: u32, what: &str) {
    assert_within_limit(at, per_second, burst, 1.0, what);
    let span = (at[at.len() - 1] - at[0]).as_secs_f64();
    let want = at.len().saturating_sub(burst as usize) as f64 / per_second;
    let most = want + LADDER_LATENESS.as_secs_f64();
    assert!(
        (want - 0.2..=most).contains(&span),
        "{what}: the last came {span:.2} s after the first, expected {want} s (at most {most} s)"
    );
}

/// One test's own corner of the broker: a unique prefix whose exchanges and
/// queues are deleted when the stack is dropped.
pub struct TestStack {
    pub url: String,
    pub prefix: String,
    pub topology: Topology,
    pub connection: Connection,
    pub channel: Channel,
}

impl TestStack {
    pub async fn new(name: &str) -> anyhow::Result<TestStack> {
        Self::on(name, broker_url().await).await
    }

    /// A stack on the broker at `url`.
    pub async fn on(name: &str, url: String) -> anyhow::Result<TestStack> {
        let prefix = format!("t-{name}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        Self::with_prefix(url, prefix).await
    }

    /// A stack with a given prefix (e.g. to reconnect after a broker restart).
    pub async fn with_prefix(url: String, prefix: String) -> anyhow::Result<TestStack> {
        let topology = Topology::new(&prefix);
        let connection = Connection::connect(
            &url,
            ConnectionProperties::default().with_connection_name(format!("swallow-test {prefix}").into()),
        )
        .await
        .with_context(|| format!("connecting to {url}"))?;
        let channel = connection.create_channel().await?;
        channel.confirm_select(Default::default()).await?;
        topology.declare(&channel).await.context("declaring the topology")?;
        Ok(TestStack {
            url,
            prefix,
            topology,
            connection,
            channel,
        })
    }

    /// A configuration file's `[broker]` table for this stack.
    pub fn broker_toml(&self) -> String {
        format!("[broker]\nurl = \"{}\"\nprefix = \"{}\"\n", self.url, self.prefix)
    }

    /// Publishes raw bytes to `<prefix>.events`, persistent, confirmed.
    pub async fn publish_event_bytes(&self, body: &[u8]) -> anyhow::Result<()> {
        let confirm = self
            .channel
            .basic_publish(
                self.topology.events_exchange().as_str().into(),
                "chat.message".into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?
            .await?;
        anyhow::ensure!(confirm.is_ack(), "event publish not confirmed");
        Ok(())
    }

    pub async fn publish_event(&self, event: &serde_json::Value) -> anyhow::Result<()> {
        self.publish_event_bytes(&serde_json::to_vec(event)?).await
    }

    /// Publishes many raw events, then waits for all confirms.
    pub async fn publish_events_bytes(&self, bodies: &[Vec<u8>]) -> anyhow::Result<()> {
        let mut confirms = Vec::with_capacity(bodies.len());
        for body in bodies {
            confirms.push(
                self.channel
                    .basic_publish(
                        self.topology.events_exchange().as_str().into(),
                        "chat.message".into(),
                        BasicPublishOptions::default(),
                        body,
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await?,
            );
        }
        for c in confirms {
            anyhow::ensure!(c.await?.is_ack(), "event publish not confirmed");
        }
        Ok(())
    }

    /// Starts draining `queue` into a collector (acking what it takes).
    pub async fn drain(&self, queue: &str) -> anyhow::Result<Collector> {
        self.drain_many(&[queue.to_owned()]).await
    }

    /// Drains every delivery shard's queue into one collector.
    pub async fn drain_jobs(&self) -> anyhow::Result<Collector> {
        self.drain_many(&self.topology.delivery_queues()).await
    }

    /// Starts draining several queues into one collector.
    pub async fn drain_many(&self, queues: &[String]) -> anyhow::Result<Collector> {
        let channel = self.connection.create_channel().await?;
        channel.basic_qos(1000, BasicQosOptions::default()).await?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        for queue in queues {
            let mut consumer = channel
                .basic_consume(
                    queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            let tx = tx.clone();
            let keep = channel.clone();
            tokio::spawn(async move {
                let _keep = keep;
                while let Some(Ok(delivery)) = consumer.next().await {
                    let _ = delivery.ack(BasicAckOptions::default()).await;
                    if tx.send(delivery).is_err() {
                        return;
                    }
                }
            });
        }
        Ok(Collector { rx, got: Vec::new() })
    }

    /// Messages ready in `queue` now.
    pub async fn queue_len(&self, queue: &str) -> anyhow::Result<u32> {
        Ok(swallow_shared::broker::ready_count(&self.connection, queue).await?)
    }
}

impl Drop for TestStack {
    fn drop(&mut self) {
        let url = self.url.clone();
        let topology = self.topology.clone();
        // Delete on a thread of its own: Drop cannot await.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async move {
                let conn = Connection::connect(&url, ConnectionProperties::default()).await.ok()?;
                let ch = conn.create_channel().await.ok()?;
                let own = format!("{}.test-outbound", topology.prefix());
                for q in topology.queues().into_iter().chain([own]) {
                    let _ = ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await;
                }
                for e in topology.exchanges() {
                    let _ = ch
                        .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
                        .await;
                }
                let _ = conn.close(200, "".into()).await;
                Some(())
            })
        })
        .join();
    }
}

/// Messages taken from a queue, in arrival order.
pub struct Collector {
    rx: tokio::sync::mpsc::UnboundedReceiver<Delivery>,
    pub got: Vec<Delivery>,
}

impl Collector {
    /// Waits until at least `n` messages have arrived in all; fails the test
    /// after `timeout`, saying how many did.
    pub async fn until(&mut self, n: usize, timeout: Duration, what: &str) -> &[Delivery] {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.got.len() < n {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(d)) => self.got.push(d),
                Ok(None) => panic!("the consumer of {what} ended after {} of {n}", self.got.len()),
                Err(_) => panic!("timed out after {timeout:?}: {} of {n} {what}", self.got.len()),
            }
        }
        &self.got
    }

    /// Takes messages until `done` holds; fails the test after `timeout`,
    /// saying what was awaited and how many messages had arrived.
    pub async fn until_with(&mut self, timeout: Duration, what: &str, done: impl Fn(&Collector) -> bool) {
        let deadline = tokio::time::Instant::now() + timeout;
        while !done(self) {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(d)) => self.got.push(d),
                Ok(None) => panic!("the consumer ended while waiting for {what}"),
                Err(_) => panic!(
                    "timed out after {timeout:?} waiting for {what} ({} messages)",
                    self.got.len()
                ),
            }
            // Take what else has arrived before checking again (checks may be costly).
            while let Ok(d) = self.rx.try_recv() {
                self.got.push(d);
            }
        }
    }

    /// Takes whatever arrives within `quiet` of the last message.
    pub async fn settle(&mut self, quiet: Duration) -> &[Delivery] {
        while let Ok(Some(d)) = tokio::time::timeout(quiet, self.rx.recv()).await {
            self.got.push(d);
        }
        &self.got
    }

    /// Parses every message taken as JSON.
    pub fn json(&self) -> Vec<serde_json::Value> {
        self.got
            .iter()
            .map(|d| serde_json::from_slice(&d.data).expect("message is JSON"))
            .collect()
    }
}

/// A header of a delivery as text.
pub fn header(delivery: &Delivery, name: &str) -> Option<String> {
    swallow_shared::broker::header_str(&delivery.properties, name)
}

/// A chat event like the seed's, with the given text and ts.
pub fn chat_event(text: &str, ts: &str) -> serde_json::Value {
    serde_json::json!({
        "team_id": "T0001", "team_domain": "example", "channel_id": "C2147483705",
        "channel_name": "test", "channel_type": "public", "user_id": "U2147483697",
        "user_name": "Steve", "ts": ts, "thread_ts": null, "text": text,
        "bot_id": null, "subtype": null
    })
}

/// Writes a configuration file into `dir` and returns its path.
pub fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("swallow.toml");
    std::fs::write(&path, text).expect("writing the test configuration");
    path
}

/// A free loopback port (bound, then released).
pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    l.local_addr().unwrap()
}

/// The path of a workspace binary built next to the test executable.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace` (cargo test --workspace builds it)",
        path.display()
    );
    path
}

/// A stage binary run as a child process; killed when dropped.
pub struct StageProcess {
    pub child: tokio::process::Child,
    pub ops_addr: SocketAddr,
    name: String,
}

impl StageProcess {
    /// Spawns `bin` with `--config config` and its listener on a free port.
    pub fn spawn(bin: &str, config: &Path, env: &HashMap<String, String>) -> anyhow::Result<StageProcess> {
        let ops_addr = free_addr();
        let mut cmd = tokio::process::Command::new(bin_path(bin));
        cmd.arg("--config")
            .arg(config)
            .env("SWALLOW_HTTP_ADDR", ops_addr.to_string())
            .env_remove("AMQP_URL")
            .env_remove("SWALLOW_PREFIX")
            .env(
                "RUST_LOG",
                std::env::var("SWALLOW_TEST_LOG").unwrap_or_else(|_| "error".into()),
            )
            .envs(env)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let child = cmd.spawn().with_context(|| format!("spawning {bin}"))?;
        Ok(StageProcess {
            child,
            ops_addr,
            name: bin.to_owned(),
        })
    }

    /// Waits until `/readyz` answers 200.
    pub async fn ready(&self, timeout: Duration) {
        let url = format!("http://{}/readyz", self.ops_addr);
        let what = format!("{} to be ready", self.name);
        wait_for(timeout, &what, || async {
            let r = reqwest::get(&url).await.ok()?;
            r.status().is_success().then_some(())
        })
        .await
    }

    /// SIGKILL, and wait for the process to be gone.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Sends a signal (e.g. `TERM`) with `kill(1)`.
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self.child.id().context("process already gone")?;
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()?;
        anyhow::ensure!(status.success(), "kill -{signal} {pid} failed");
        Ok(())
    }
}

/// Reads a metric (summing over its label sets that contain `labels`) from a
/// `/metrics` endpoint.
pub async fn metric(ops_addr: SocketAddr, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
    let text = reqwest::get(format!("http://{ops_addr}/metrics")).await?.text().await?;
    Ok(metric_in(&text, name, labels))
}

/// Sums the samples of `name` in Prometheus text whose labels include `labels`.
pub fn metric_in(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = match series.split_once('{') {
                Some((m, r)) => (m, r),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let all = labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            all.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// Forces closed the broker connection whose `connection_name` is `name`
/// (and only that one), as an operator would with `rabbitmqctl`.
pub async fn close_connection_named(name: &str) -> anyhow::Result<()> {
    let closed = close_connections_matching(&format!("\"{name}\"")).await?;
    anyhow::ensure!(closed == 1, "expected one connection named {name:?}, closed {closed}");
    Ok(())
}

/// Forces closed every connection whose client properties contain `pattern`
/// (e.g. a test's prefix); returns how many.
pub async fn close_connections_matching(pattern: &str) -> anyhow::Result<usize> {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "pid", "client_properties"])
        .output()
        .await
        .context("running rabbitmqctl (this test needs a local RabbitMQ)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let pids: Vec<String> = text
        .lines()
        .filter(|l| l.contains(pattern))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    for pid in &pids {
        let status = tokio::process::Command::new("rabbitmqctl")
            .args(["-q", "close_connection", pid, "closed by a swallow test"])
            .status()
            .await?;
        if !status.success() {
            bail!("rabbitmqctl close_connection {pid} failed");
        }
    }
    Ok(pids.len())
}

/// The three real binaries, started on one configuration file.
pub struct Pipeline {
    pub matcher: StageProcess,
    pub deliverer: StageProcess,
    pub responder: StageProcess,
}

impl Pipeline {
    /// Spawns the three stages and waits until each is ready.
    pub async fn spawn(config: &Path) -> anyhow::Result<Pipeline> {
        let env = HashMap::new();
        let p = Pipeline {
            matcher: StageProcess::spawn("swallow-matcher", config, &env)?,
            deliverer: StageProcess::spawn("swallow-deliverer", config, &env)?,
            responder: StageProcess::spawn("swallow-responder", config, &env)?,
        };
        for stage in [&p.matcher, &p.deliverer, &p.responder] {
            stage.ready(Duration::from_secs(30)).await;
        }
        Ok(p)
    }
}

/// A fresh temporary directory for a test's files.
pub fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("swallow-{name}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("creating a temporary directory");
    dir
}

/// Binds a queue of the test's own to `<prefix>.chat.outbound` (as a chat
/// platform would) and drains it.
pub async fn listen_outbound(stack: &TestStack) -> anyhow::Result<Collector> {
    let name = format!(
        "{}.test-outbound-{}",
        stack.prefix,
        &uuid::Uuid::new_v4().simple().to_string()[..6]
    );
    let options = lapin::options::QueueDeclareOptions {
        auto_delete: true,
        ..Default::default()
    };
    stack
        .channel
        .queue_declare(name.as_str().into(), options, FieldTable::default())
        .await?;
    bind_outbound(stack, &name).await?;
    stack.drain(&name).await
}

/// Like [`listen_outbound`], with a durable quorum queue named
/// `<prefix>.test-outbound` that outlives a broker restart; drain it again
/// with [`TestStack::drain`] after one. Deleted when the stack is dropped.
pub async fn listen_outbound_durable(stack: &TestStack) -> anyhow::Result<(String, Collector)> {
    let name = format!("{}.test-outbound", stack.prefix);
    swallow_shared::topology::declare_quorum_queue(&stack.channel, &name).await?;
    bind_outbound(stack, &name).await?;
    Ok((name.clone(), stack.drain(&name).await?))
}

/// Binds `name` to `<prefix>.chat.outbound`, for every routing key.
async fn bind_outbound(stack: &TestStack, name: &str) -> anyhow::Result<()> {
    stack
        .channel
        .queue_bind(
            name.into(),
            stack.topology.chat_outbound_exchange().as_str().into(),
            "#".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// A RabbitMQ node of a test's own, on free ports, that the test may stop
/// and start again without disturbing the shared broker. Stopped on drop.
pub struct OwnBroker {
    pub node: String,
    pub port: u16,
    dir: PathBuf,
}

impl OwnBroker {
    /// Starts a node and waits until it accepts connections.
    pub async fn start() -> anyhow::Result<OwnBroker> {
        let port = free_addr().port();
        let dist = free_addr().port();
        let node = format!("swallow-t{port}@localhost");
        let dir = tempdir("rabbit");
        std::fs::write(dir.join("plugins"), "[].\n")?;
        // The machine's rabbitmq.conf pins the shared broker's listener: the
        // node gets a configuration file of its own.
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.local = 127.0.0.1:{port}\n"),
        )?;
        let status = std::process::Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(&dir)
            .status()?;
        anyhow::ensure!(status.success(), "chown of {} to rabbitmq failed", dir.display());
        let broker = OwnBroker { node, port, dir };
        std::fs::write(broker.dir.join("dist_port"), dist.to_string())?;
        broker.boot().await?;
        Ok(broker)
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Starts the node (again) with its data directory; waits until it answers.
    pub async fn boot(&self) -> anyhow::Result<()> {
        let dist = std::fs::read_to_string(self.dir.join("dist_port"))?;
        let d = &self.dir;
        let status = tokio::process::Command::new("rabbitmq-server")
            .arg("-detached")
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", dist.trim())
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_PID_FILE", d.join("pid"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("plugins"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .context("running rabbitmq-server (fault tests need a local RabbitMQ installation)")?;
        anyhow::ensure!(status.success(), "rabbitmq-server -detached failed");
        let url = self.url();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(c) = Connection::connect(&url, ConnectionProperties::default()).await {
                let _ = c.close(200, "".into()).await;
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("node {} did not accept connections within 60 s", self.node);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Stops the node (the whole Erlang VM).
    pub async fn stop(&self) -> anyhow::Result<()> {
        let status = tokio::process::Command::new("rabbitmqctl")
            .args(["-q", "-n", &self.node, "stop"])
            .stdout(Stdio::null())
            .status()
            .await?;
        anyhow::ensure!(status.success(), "rabbitmqctl -n {} stop failed", self.node);
        Ok(())
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["-q", "-n", &self.node, "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP relay on loopback to the broker that can be frozen: from then on it
/// passes nothing more either way and leaves the connections open, as a
/// broker that stops reading from a connection (RabbitMQ's flow control can).
pub struct FreezableRelay {
    /// The broker URL to give a stage so that it connects through the relay.
    pub url: String,
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl FreezableRelay {
    pub async fn start(broker_url: &str) -> anyhow::Result<FreezableRelay> {
        let mut url = reqwest::Url::parse(broker_url)?;
        let host = url.host_str().context("a broker URL has a host")?.to_owned();
        let upstream = tokio::net::lookup_host((host, url.port().unwrap_or(5672)))
            .await?
            .next()
            .context("the broker's host resolves")?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        url.set_host(Some("127.0.0.1"))?;
        url.set_port(Some(listener.local_addr()?.port()))
            .map_err(|()| anyhow::anyhow!("setting the relay's port"))?;
        let frozen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = frozen.clone();
        let task = tokio::spawn(async move {
            let mut pumps = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let Ok(broker) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                let ((client_in, client_out), (broker_in, broker_out)) = (client.into_split(), broker.into_split());
                pumps.spawn(pump(client_in, broker_out, flag.clone()));
                pumps.spawn(pump(broker_in, client_out, flag.clone()));
            }
        });
        Ok(FreezableRelay {
            url: url.to_string(),
            frozen,
            task,
        })
    }

    /// Stops passing bytes, both ways, on every connection.
    pub fn freeze(&self) {
        self.frozen.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for FreezableRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if frozen.load(std::sync::atomic::Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
