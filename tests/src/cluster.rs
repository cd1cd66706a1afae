//! Three private nodes joined into one RabbitMQ cluster, for the tests of
//! what the stages do when a node fails (`tests/tests/broker_cluster.rs`).

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::{Node, node_stem};

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
        let mut cluster = Cluster { nodes };
        futures_util::future::try_join_all(cluster.nodes.iter_mut().map(Node::boot)).await?;
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
