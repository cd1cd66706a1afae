//! Relays on loopback between a client and the broker that fail the way a
//! broker can: one that can be frozen (a broker that stops answering) and
//! one that swallows its confirms (a node that took a publish and never
//! answered for it).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;

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
