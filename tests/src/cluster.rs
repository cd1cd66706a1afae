//! Support for the cluster tests (`tests/tests/cluster.rs`): private
//! RabbitMQ nodes with a configuration of the test's choosing (a TLS
//! listener, a cluster of three), stages whose log the test reads, a relay
//! that stops passing the broker's answers on the connections open at the
//! time, and the faults a node can suffer (SIGKILL, SIGSTOP).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use lapin::{Connection, ConnectionProperties};

use crate::{bin_path, free_addr, tempdir, wait_ready};

/// A stage binary run as a child process with its log (`RUST_LOG=info`)
/// written to a file the test reads; killed when dropped.
pub struct LoggedStage {
    pub child: tokio::process::Child,
    pub ops_addr: SocketAddr,
    pub log: PathBuf,
    pub name: String,
}

impl LoggedStage {
    /// Spawns `bin` with `--config config`, its log in `dir`.
    pub fn spawn(bin: &str, config: &Path, dir: &Path) -> anyhow::Result<LoggedStage> {
        let ops_addr = free_addr();
        let log = dir.join(format!("{bin}-{}.log", ops_addr.port()));
        let file = std::fs::File::create(&log)?;
        let child = tokio::process::Command::new(bin_path(bin))
            .arg("--config")
            .arg(config)
            .env("SWALLOW_HTTP_ADDR", ops_addr.to_string())
            .env_remove("AMQP_URL")
            .env_remove("SWALLOW_PREFIX")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {bin}"))?;
        Ok(LoggedStage {
            child,
            ops_addr,
            log,
            name: bin.to_owned(),
        })
    }

    /// Waits until `/readyz` answers 200; fails the test after `timeout`
    /// with the stage's log.
    pub async fn ready(&self, timeout: Duration) {
        if !wait_ready(&format!("http://{}/readyz", self.ops_addr), timeout).await {
            panic!(
                "{} not ready within {timeout:?}; its log:\n{}",
                self.name,
                self.log_text()
            );
        }
    }

    pub async fn is_ready(&self) -> bool {
        reqwest::get(format!("http://{}/readyz", self.ops_addr))
            .await
            .is_ok_and(|r| r.status().is_success())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// How long a `rabbitmqctl` query may take: one against a frozen node
/// would never return.
const CTL_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a node may take to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// A private RabbitMQ node on free ports, with extra `rabbitmq.conf` lines.
/// Stopped (and its directory deleted) on drop.
pub struct Node {
    pub name: String,
    pub port: u16,
    dist_port: u16,
    pub dir: PathBuf,
}

impl Node {
    /// Prepares a node named `<stem><n>@localhost` (not started).
    pub fn new(stem: &str, n: usize, extra_conf: &str) -> anyhow::Result<Node> {
        Self::with_plugins(stem, n, &[], extra_conf)
    }

    /// As [`Node::new`], with `plugins` enabled.
    pub fn with_plugins(stem: &str, n: usize, plugins: &[&str], extra_conf: &str) -> anyhow::Result<Node> {
        let port = free_addr().port();
        let dist_port = free_addr().port();
        let name = format!("{stem}{n}@localhost");
        let dir = tempdir(&format!("{stem}{n}"));
        std::fs::write(dir.join("plugins"), format!("[{}].\n", plugins.join(",")))?;
        // The machine's rabbitmq.conf pins the shared broker's listener.
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.local = 127.0.0.1:{port}\n{extra_conf}"),
        )?;
        chown_to_rabbitmq(&dir)?;
        Ok(Node {
            name,
            port,
            dist_port,
            dir,
        })
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Starts the Erlang VM (detached) and waits until the node accepts
    /// AMQP connections.
    pub async fn start(&self) -> anyhow::Result<()> {
        let in_dir = |file: &str| self.dir.join(file).into_os_string();
        let settings = [
            ("NODENAME", self.name.clone().into()),
            ("NODE_PORT", self.port.to_string().into()),
            ("DIST_PORT", self.dist_port.to_string().into()),
            ("MNESIA_BASE", in_dir("mnesia")),
            ("LOG_BASE", in_dir("log")),
            ("PID_FILE", in_dir("pid")),
            ("ENABLED_PLUGINS_FILE", in_dir("plugins")),
            ("CONFIG_FILE", in_dir("rabbitmq.conf")),
        ];
        let status = tokio::process::Command::new("rabbitmq-server")
            .arg("-detached")
            .envs(settings.map(|(name, value)| (format!("RABBITMQ_{name}"), value)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .status();
        let status = tokio::time::timeout(CTL_TIMEOUT, status)
            .await
            .with_context(|| format!("rabbitmq-server -detached for {} did not return", self.name))?
            .context("running rabbitmq-server (these tests need a local RabbitMQ installation)")?;
        anyhow::ensure!(status.success(), "rabbitmq-server -detached failed for {}", self.name);
        self.until_accepting(Duration::from_secs(90)).await
    }

    /// Waits until the node accepts AMQP connections.
    pub async fn until_accepting(&self, timeout: Duration) -> anyhow::Result<()> {
        let url = self.url();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let attempt = tokio::time::timeout(
                Duration::from_secs(5),
                Connection::connect(&url, ConnectionProperties::default()),
            );
            if let Ok(Ok(c)) = attempt.await {
                let _ = c.close(200, "".into()).await;
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("node {} did not accept connections within {timeout:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Runs `rabbitmqctl -n <node> args…`; fails with its output, or when
    /// it has not answered within 30 s (one against a frozen node never
    /// would).
    pub async fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        self.ctl_within(CTL_TIMEOUT, args).await
    }

    /// As [`Node::ctl`], bounded by `timeout`.
    pub async fn ctl_within(&self, timeout: Duration, args: &[&str]) -> anyhow::Result<String> {
        let out = tokio::process::Command::new("rabbitmqctl")
            .args(["-q", "-n", &self.name])
            .args(args)
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(timeout, out)
            .await
            .with_context(|| {
                format!(
                    "rabbitmqctl -n {} {} did not answer within {timeout:?}",
                    self.name,
                    args.join(" ")
                )
            })?
            .context("running rabbitmqctl")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        anyhow::ensure!(
            out.status.success(),
            "rabbitmqctl -n {} {}: {}{}",
            self.name,
            args.join(" "),
            text,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(text)
    }

    /// The OS process id of the node's Erlang VM.
    pub fn pid(&self) -> anyhow::Result<u32> {
        let text = std::fs::read_to_string(self.dir.join("pid")).context("reading the node's pid file")?;
        text.trim().parse().context("the node's pid file holds a number")
    }

    /// Sends `signal` (`KILL`, `STOP`, `CONT`) to the node's Erlang VM.
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self.pid()?;
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()?;
        anyhow::ensure!(status.success(), "kill -{signal} {pid} ({}) failed", self.name);
        Ok(())
    }

    /// SIGKILL, then wait until the VM is gone.
    pub async fn kill(&self) -> anyhow::Result<()> {
        let pid = self.pid()?;
        self.signal("KILL")?;
        let proc = PathBuf::from(format!("/proc/{pid}"));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while proc.exists() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// A graceful stop of the whole node, bounded.
    pub async fn stop(&self) -> anyhow::Result<()> {
        self.ctl_within(STOP_TIMEOUT, &["stop"]).await.map(|_| ())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // A frozen node cannot stop: wake it first, kill it if stop fails.
        let _ = self.signal("CONT");
        let stopped = std::process::Command::new("timeout")
            .arg(STOP_TIMEOUT.as_secs().to_string())
            .args(["rabbitmqctl", "-q", "-n", &self.name, "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !stopped {
            let _ = self.signal("KILL");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Gives `dir` to the `rabbitmq` user: the server drops to it.
pub fn chown_to_rabbitmq(dir: &Path) -> anyhow::Result<()> {
    let status = std::process::Command::new("chown")
        .args(["-R", "rabbitmq:rabbitmq"])
        .arg(dir)
        .status()?;
    anyhow::ensure!(status.success(), "chown of {} to rabbitmq failed", dir.display());
    Ok(())
}

/// A name stem unique to this test run, for node names (`swc<random>`).
pub fn node_stem() -> String {
    format!("swc{}n", &uuid::Uuid::new_v4().simple().to_string()[..6])
}

/// A TCP relay on loopback to a broker whose broker-to-client direction can
/// be made to pass heartbeats only, on the connections open at the time:
/// the client's publishes still reach the broker, and the connection looks
/// alive both ways, but confirms (and everything else) never come back, as
/// from a node that took a publish and never answered for it. Connections
/// made later pass freely.
pub struct ConfirmSwallowingRelay {
    /// The broker URL to give a stage so that it connects through the relay.
    pub url: String,
    connections: Arc<std::sync::Mutex<Vec<Arc<AtomicBool>>>>,
    task: tokio::task::JoinHandle<()>,
}

/// AMQP 0-9-1 frame layout: type (1), channel (2), payload size (4),
/// payload, frame end (1). Type 8 is a heartbeat.
const FRAME_HEADER: usize = 7;
const FRAME_HEARTBEAT: u8 = 8;

/// Copies the broker's frames to the client; once `heartbeats_only`, only
/// heartbeat frames.
async fn pass_frames(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    heartbeats_only: Arc<AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        let mut out = Vec::new();
        while pending.len() >= FRAME_HEADER {
            let size = u32::from_be_bytes(pending[3..7].try_into().unwrap()) as usize;
            let whole = FRAME_HEADER + size + 1;
            if pending.len() < whole {
                break;
            }
            let frame: Vec<u8> = pending.drain(..whole).collect();
            if !heartbeats_only.load(Ordering::SeqCst) || frame[0] == FRAME_HEARTBEAT {
                out.extend_from_slice(&frame);
            }
        }
        if !out.is_empty() && to.write_all(&out).await.is_err() {
            return;
        }
    }
}

impl ConfirmSwallowingRelay {
    pub async fn start(broker_url: &str) -> anyhow::Result<ConfirmSwallowingRelay> {
        let mut url = reqwest::Url::parse(broker_url)?;
        let upstream: SocketAddr = format!("127.0.0.1:{}", url.port().unwrap_or(5672)).parse()?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        url.set_port(Some(listener.local_addr()?.port()))
            .map_err(|()| anyhow::anyhow!("setting the relay's port"))?;
        let connections: Arc<std::sync::Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
        let list = connections.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(broker) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                let frozen = Arc::new(AtomicBool::new(false));
                list.lock().unwrap().push(frozen.clone());
                let (mut client_in, client_out) = client.into_split();
                let (broker_in, mut broker_out) = broker.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_in, &mut broker_out).await;
                });
                tokio::spawn(pass_frames(broker_in, client_out, frozen));
            }
        });
        Ok(ConfirmSwallowingRelay {
            url: url.to_string(),
            connections,
            task,
        })
    }

    /// From now on, nothing but heartbeats from the broker reaches the
    /// clients of the connections open now.
    pub fn swallow_answers(&self) {
        for c in self.connections.lock().unwrap().iter() {
            c.store(true, Ordering::SeqCst);
        }
    }
}

impl Drop for ConfirmSwallowingRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Three private nodes joined into one RabbitMQ cluster (`join_cluster`).
/// Every node is stopped and its directory deleted on drop, also when the
/// test fails.
pub struct Cluster {
    pub nodes: Vec<Node>,
}

impl Cluster {
    /// Starts three nodes, joins the second and third to the first, and
    /// waits until the cluster runs all three.
    pub async fn start() -> anyhow::Result<Cluster> {
        let stem = node_stem();
        let nodes = (1..=3)
            .map(|n| Node::new(&stem, n, ""))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let cluster = Cluster { nodes };
        futures_util::future::try_join_all(cluster.nodes.iter().map(Node::start)).await?;
        let first = cluster.nodes[0].name.clone();
        for node in &cluster.nodes[1..] {
            node.ctl(&["stop_app"]).await?;
            node.ctl(&["join_cluster", &first]).await?;
            node.ctl(&["start_app"]).await?;
        }
        for node in &cluster.nodes {
            node.until_accepting(Duration::from_secs(60)).await?;
        }
        let running = cluster.running_nodes(0).await?;
        anyhow::ensure!(running == 3, "the cluster runs {running} nodes, not 3");
        Ok(cluster)
    }

    /// Every node's URL, comma-separated, for `[broker] url`.
    pub fn urls(&self) -> String {
        let urls: Vec<String> = self.nodes.iter().map(Node::url).collect();
        urls.join(",")
    }

    /// How many nodes the cluster runs, as node `via` sees it.
    pub async fn running_nodes(&self, via: usize) -> anyhow::Result<usize> {
        let json = self.ctl(via, &["cluster_status", "--formatter", "json"]).await?;
        let status: serde_json::Value = serde_json::from_str(&json).context("cluster_status is JSON")?;
        Ok(status["running_nodes"].as_array().map_or(0, Vec::len))
    }

    /// `rabbitmqctl` on node `via`, bounded ([`Node::ctl`]).
    pub async fn ctl(&self, via: usize, args: &[&str]) -> anyhow::Result<String> {
        self.nodes[via].ctl(args).await
    }

    /// Which node (index) an Erlang pid such as `<swc1a2b3c1@localhost.1.2.3>` lives on.
    fn node_of(&self, pid: &str) -> Option<usize> {
        self.nodes
            .iter()
            .position(|n| pid.trim().starts_with(&format!("<{}.", n.name)))
    }

    /// Per node, the connections whose client properties contain `pattern`.
    pub async fn connections_per_node(&self, via: usize, pattern: &str) -> anyhow::Result<Vec<usize>> {
        let text = self.ctl(via, &["list_connections", "pid", "client_properties"]).await?;
        let mut counts = vec![0; self.nodes.len()];
        for line in text.lines().filter(|l| l.contains(pattern)) {
            if let Some(i) = line.split_whitespace().next().and_then(|pid| self.node_of(pid)) {
                counts[i] += 1;
            }
        }
        Ok(counts)
    }

    /// Per node, the quorum queues it leads among those `which` picks.
    pub async fn leaders_per_node(&self, via: usize, which: impl Fn(&str) -> bool) -> anyhow::Result<Vec<usize>> {
        let text = self.ctl(via, &["list_queues", "name", "leader"]).await?;
        let mut counts = vec![0; self.nodes.len()];
        for line in text.lines() {
            let mut cols = line.split_whitespace();
            let (Some(queue), Some(leader)) = (cols.next(), cols.next()) else {
                continue;
            };
            if let Some(i) = self.nodes.iter().position(|n| n.name == leader)
                && which(queue)
            {
                counts[i] += 1;
            }
        }
        Ok(counts)
    }

    /// SIGKILL of node `i`, `down` without it, then it starts again (and
    /// rejoins); returns when it was killed.
    pub async fn kill_for(&self, i: usize, down: Duration) -> anyhow::Result<std::time::Instant> {
        self.nodes[i].kill().await?;
        let at = std::time::Instant::now();
        tokio::time::sleep(down).await;
        self.nodes[i].start().await.context("the killed node starts again")?;
        Ok(at)
    }

    /// Waits until stopping node `i` would leave every quorum queue a
    /// majority (`rabbitmq-queues check_if_node_is_quorum_critical`): the
    /// step a rolling restart takes before each node.
    pub async fn until_not_quorum_critical(&self, i: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let status = tokio::process::Command::new("rabbitmq-queues")
                .args(["-q", "-n", &self.nodes[i].name, "check_if_node_is_quorum_critical"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .await?;
            if status.success() {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{} still quorum critical after {timeout:?}", self.nodes[i].name);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// The index of the largest count (the first of equals).
pub fn busiest(counts: &[usize]) -> usize {
    counts
        .iter()
        .enumerate()
        .max_by_key(|(i, c)| (**c, std::cmp::Reverse(*i)))
        .map_or(0, |(i, _)| i)
}

/// The chat platform's side of a test on the cluster: publishes chat events
/// and takes the replies, each on a connection of its own that moves to the
/// next node when its node fails, so the test's own traffic survives the
/// faults it makes. What it publishes is confirmed (an event whose confirm
/// is lost is published again: at least once, like any publisher).
pub struct ChatSide {
    urls: Vec<String>,
    topology: swallow_shared::Topology,
    /// Events published and confirmed so far (event `i` has ts `i.000001`).
    pub published: Arc<std::sync::atomic::AtomicUsize>,
    /// The `delivery_id` of every reply taken, in arrival order.
    pub replies: Arc<std::sync::Mutex<Vec<String>>>,
    listener: tokio::task::JoinHandle<()>,
}

/// How long the chat side waits for a node's answer before moving on.
const CHAT_SIDE_BOUND: Duration = Duration::from_secs(5);

impl ChatSide {
    /// Declares the topology, binds a durable quorum queue of the test's own
    /// to `<prefix>.chat.outbound` and starts taking replies from it.
    pub async fn start(node_urls: &[String], prefix: &str) -> anyhow::Result<ChatSide> {
        // Heartbeats, so that a frozen node is left within seconds.
        let urls: Vec<String> = node_urls.iter().map(|u| format!("{u}?heartbeat=2")).collect();
        let topology = swallow_shared::Topology::new(prefix);
        let queue = format!("{prefix}.test-outbound");
        let (connection, channel) = connect_any(&urls, 0).await?;
        topology.declare(&channel).await?;
        swallow_shared::topology::declare_quorum_queue(&channel, &queue).await?;
        channel
            .queue_bind(
                queue.as_str().into(),
                topology.chat_outbound_exchange().as_str().into(),
                "#".into(),
                Default::default(),
                Default::default(),
            )
            .await?;
        let _ = connection.close(200, "".into()).await;
        let replies: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
        let listener = tokio::spawn(take_replies(urls.clone(), queue, replies.clone()));
        Ok(ChatSide {
            urls,
            topology,
            published: Arc::default(),
            replies,
            listener,
        })
    }

    /// Publishes events one after another, `per_second`, until `stop`.
    pub async fn publish_until(&self, per_second: u32, stop: tokio_util::sync::CancellationToken) {
        let mut at = 1;
        let mut link: Option<(Connection, lapin::Channel)> = None;
        let mut tick = tokio::time::interval(Duration::from_secs(1) / per_second);
        while !stop.is_cancelled() {
            tick.tick().await;
            let i = self.published.load(Ordering::SeqCst);
            let event = crate::chat_event(&format!("message {i}"), &format!("{i}.000001"));
            let body = serde_json::to_vec(&event).expect("an event serializes");
            loop {
                if link.is_none() {
                    match connect_any(&self.urls, at).await {
                        Ok(l) => link = Some(l),
                        Err(_) => {
                            at += 1;
                            continue;
                        }
                    }
                }
                let (_, channel) = link.as_ref().expect("connected above");
                let exchange = self.topology.events_exchange();
                let sent = tokio::time::timeout(CHAT_SIDE_BOUND, async {
                    let confirm = channel
                        .basic_publish(
                            exchange.as_str().into(),
                            "chat.message".into(),
                            Default::default(),
                            &body,
                            lapin::BasicProperties::default().with_delivery_mode(2),
                        )
                        .await?
                        .await?;
                    Ok::<bool, lapin::Error>(confirm.is_ack())
                })
                .await;
                if let Ok(Ok(true)) = sent {
                    break;
                }
                // This node failed us: the same event again, on the next.
                link = None;
                at += 1;
            }
            self.published.fetch_add(1, Ordering::SeqCst);
        }
    }

    pub fn replies(&self) -> Vec<String> {
        self.replies.lock().unwrap().clone()
    }
}

impl Drop for ChatSide {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

/// Connects to the first node that answers, from `urls[at % len]` on, and
/// opens a channel in confirm mode.
async fn connect_any(urls: &[String], at: usize) -> anyhow::Result<(Connection, lapin::Channel)> {
    let mut last = None;
    for k in 0..urls.len() {
        let url = &urls[(at + k) % urls.len()];
        let attempt = async {
            let connection = Connection::connect(url, ConnectionProperties::default()).await?;
            let channel = connection.create_channel().await?;
            channel.confirm_select(Default::default()).await?;
            Ok::<_, lapin::Error>((connection, channel))
        };
        match tokio::time::timeout(CHAT_SIDE_BOUND, attempt).await {
            Ok(Ok(link)) => return Ok(link),
            Ok(Err(e)) => last = Some(anyhow::Error::from(e)),
            Err(_) => last = Some(anyhow::anyhow!("{url}: no answer")),
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no node")))
}

/// Takes replies from `queue`, acknowledging each once recorded; on any
/// failure moves to the next node.
async fn take_replies(urls: Vec<String>, queue: String, replies: Arc<std::sync::Mutex<Vec<String>>>) {
    use futures_util::StreamExt;
    let mut at = 0;
    loop {
        at += 1;
        let Ok((_connection, channel)) = connect_any(&urls, at).await else {
            continue;
        };
        let consumer = channel
            .basic_consume(queue.as_str().into(), "".into(), Default::default(), Default::default())
            .await;
        let Ok(mut consumer) = consumer else { continue };
        while let Some(Ok(delivery)) = consumer.next().await {
            let reply: serde_json::Value = serde_json::from_slice(&delivery.data).unwrap_or_default();
            let id = reply["delivery_id"].as_str().unwrap_or_default().to_owned();
            replies.lock().unwrap().push(id);
            let acked = tokio::time::timeout(CHAT_SIDE_BOUND, delivery.ack(Default::default())).await;
            if !matches!(acked, Ok(Ok(_))) {
                break;
            }
        }
    }
}
