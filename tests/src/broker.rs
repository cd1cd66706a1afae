//! Finding the broker tests use, and forcing its connections closed as an
//! operator would.

use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::sync::OnceCell;

static BROKER: OnceCell<String> = OnceCell::const_new();

/// Deletes these queues and exchanges (each one that exists) on a
/// connection of its own, for a `Drop` (which cannot await): on a thread
/// with a runtime of its own (one runtime cannot be blocked on from inside
/// another), waited for.
pub fn delete_declared_blocking(url: &str, queues: Vec<String>, exchanges: Vec<String>) {
    use lapin::{Connection, ConnectionProperties};
    let url = url.to_owned();
    let _ = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        // Bounded: a drop must not hang the test on a broker that is gone.
        let delete = async move {
            let conn = Connection::connect(&url, ConnectionProperties::default()).await.ok()?;
            let ch = conn.create_channel().await.ok()?;
            for q in queues {
                let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
            }
            for e in exchanges {
                let _ = ch.exchange_delete(e.as_str().into(), Default::default()).await;
            }
            let _ = conn.close(200, "".into()).await;
            Some(())
        };
        // The timer is made inside the runtime: it needs its time driver.
        runtime
            .block_on(async { tokio::time::timeout(Duration::from_secs(30), delete).await })
            .ok()?
    })
    .join();
}

/// The broker tests use: `AMQP_URL`, else `127.0.0.1:5672` when it answers,
/// else a RabbitMQ container started with testcontainers (needs Docker;
/// the tests turn on the feature `docker` this takes).
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

#[cfg(not(feature = "docker"))]
async fn start_container() -> String {
    panic!("no broker at AMQP_URL or 127.0.0.1:5672 (this build has no Docker fallback: feature `docker`)")
}

#[cfg(feature = "docker")]
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
