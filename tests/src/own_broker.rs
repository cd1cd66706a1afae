//! A private RabbitMQ node for a test that must stop its broker.

use crate::{Node, node_stem};

/// A RabbitMQ node of a test's own, on free ports, that the test may stop
/// and start again without disturbing the shared broker. Every step is
/// bounded (a node that does not answer fails the test, never hangs it);
/// stopped, or killed, on drop.
pub struct OwnBroker {
    node: Node,
}

impl OwnBroker {
    /// Starts a node and waits until it accepts connections.
    pub async fn start() -> anyhow::Result<OwnBroker> {
        Self::start_with(&[], "").await
    }

    /// Starts a node with `plugins` enabled and `extra_conf` appended to its
    /// rabbitmq.conf; waits until it accepts connections.
    pub async fn start_with(plugins: &[&str], extra_conf: &str) -> anyhow::Result<OwnBroker> {
        let mut node = Node::with_plugins(&node_stem(), 1, plugins, extra_conf)?;
        node.boot().await?;
        Ok(OwnBroker { node })
    }

    pub fn url(&self) -> String {
        self.node.url()
    }

    /// Starts the node again with its data directory; waits until it
    /// accepts connections.
    pub async fn boot(&self) -> anyhow::Result<()> {
        self.node.start().await
    }

    /// Stops the node (the whole Erlang VM): gracefully, or, when that has
    /// not ended it within a minute, by SIGKILL (said on stderr). Either way
    /// the broker is gone, which is what the tests that call this need.
    pub async fn stop(&self) -> anyhow::Result<()> {
        let Err(error) = self.node.stop().await else {
            return Ok(());
        };
        eprintln!(
            "own broker: a graceful stop failed ({error:#}); killing {}",
            self.node.name
        );
        self.node.kill().await
    }
}
