//! A relay to the broker that can be frozen: a broker that stops answering.

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
