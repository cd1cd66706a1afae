//! Opening a connection: to one address with the configured heartbeat,
//! frame size and TLS, or to the first of a cluster's addresses that answers.

use std::path::{Path, PathBuf};
use std::time::Duration;

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::types::LongString;
use lapin::uri::AMQPScheme;
use lapin::{Connection, ConnectionProperties};
use tracing::warn;

use crate::config::{BrokerConfig, BrokerUrls, amqp_uri};

/// A connection that could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connecting to {url}: {source}")]
    Broker { url: String, source: lapin::Error },
    #[error("connecting to {url}: no answer within {after:?}")]
    Timeout { url: String, after: Duration },
    #[error("connecting to {url}: {message}")]
    Url { url: String, message: String },
    #[error("connecting to {url}: reading {what} {path}: {source}")]
    TlsFile {
        url: String,
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How long the broker may stay silent where an answer is due before it
/// counts as failed: a connect (a frozen node accepts TCP and never
/// answers), a publish's confirm (a node that died after taking it). The
/// same as a missed heartbeat: two heartbeats, at least 5 s; 30 s without.
pub fn silence_bound(heartbeat_s: u16) -> Duration {
    match heartbeat_s {
        0 => Duration::from_secs(30),
        h => Duration::from_secs(2 * u64::from(h)).max(Duration::from_secs(5)),
    }
}

/// The largest frame a stage asks the broker for, unless the URL sets its
/// own `?frame_max=`. lapin keeps room for 32 frames to read and 32 to
/// write on every connection: 4 MiB each way at RabbitMQ's default of
/// 128 KiB, touched as the messages stream through, where swallow's
/// messages are a few KiB; a larger one (a reply of up to 1 MiB) goes in
/// several frames. At 16 KiB the room is 512 KiB each way (BENCHMARKS.md,
/// "Smaller AMQP frames").
pub const FRAME_MAX: u32 = 16 * 1024;

/// Opens a connection to one address, with the configured heartbeat (unless
/// the URL sets its own `?heartbeat=`), frames of at most [`FRAME_MAX`]
/// (unless it sets `?frame_max=`) and, for `amqps://`, the configured
/// CA and client certificate. Its `connection_name` (shown by `rabbitmqctl
/// list_connections name client_properties`) identifies the stage.
pub(crate) async fn connect_to(
    url: &str,
    broker: &BrokerConfig,
    connection_name: &str,
) -> Result<Connection, ConnectError> {
    let shown = crate::redact::url(url);
    let mut uri = amqp_uri(url).map_err(|message| ConnectError::Url {
        url: shown.clone(),
        message,
    })?;
    uri.query.heartbeat.get_or_insert(broker.heartbeat_s);
    uri.query.frame_max.get_or_insert(FRAME_MAX);
    let tls = match uri.scheme {
        AMQPScheme::AMQPS => tls_config(broker).map_err(|(what, path, source)| ConnectError::TlsFile {
            url: shown.clone(),
            what,
            path,
            source,
        })?,
        AMQPScheme::AMQP => OwnedTLSConfig::default(),
    };
    let props = ConnectionProperties::default().with_connection_name(LongString::from(connection_name));
    let after = silence_bound(broker.heartbeat_s);
    let runtime = lapin::runtime::default_runtime().map_err(|source| ConnectError::Broker {
        url: shown.clone(),
        source,
    })?;
    match tokio::time::timeout(after, Connection::connect_uri_with_config(uri, props, tls, runtime)).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(source)) => Err(ConnectError::Broker { url: shown, source }),
        Err(_) => Err(ConnectError::Timeout { url: shown, after }),
    }
}

/// The TLS settings for `amqps://`: the CA that signed the broker's
/// certificate (else the system's roots) and, for mutual TLS, the client's
/// certificate and key (PEM). Read at every connect, so renewed files apply.
fn tls_config(broker: &BrokerConfig) -> Result<OwnedTLSConfig, (&'static str, PathBuf, std::io::Error)> {
    let read = |what: &'static str, path: &Path| std::fs::read(path).map_err(|e| (what, path.to_owned(), e));
    let cert_chain = match &broker.ca_file {
        Some(path) => Some(String::from_utf8_lossy(&read("the CA file", path)?).into_owned()),
        None => None,
    };
    let identity = match (&broker.client_cert_file, &broker.client_key_file) {
        (Some(cert), Some(key)) => Some(OwnedIdentity::PKCS8 {
            pem: read("the client certificate", cert)?,
            key: read("the client key", key)?,
        }),
        _ => None,
    };
    Ok(OwnedTLSConfig { identity, cert_chain })
}

/// Connects to the first address that answers, trying each once, starting
/// at a random one; for tools that connect once (replay, the chat tool).
pub async fn connect(broker: &BrokerConfig, connection_name: &str) -> Result<Connection, ConnectError> {
    let mut addresses = Addresses::new(&broker.urls);
    let mut last = None;
    for _ in 0..broker.urls.list().len() {
        match connect_to(addresses.next_url(), broker, connection_name).await {
            Ok(connection) => return Ok(connection),
            Err(error) => {
                warn!(%error, "cannot connect to the broker");
                last = Some(error);
            }
        }
    }
    Err(last.expect("BrokerUrls holds at least one URL"))
}

/// Takes a broker's addresses in turn, from a random one.
pub(super) struct Addresses<'a> {
    urls: &'a [String],
    next: usize,
}

impl<'a> Addresses<'a> {
    pub(super) fn new(urls: &'a BrokerUrls) -> Self {
        let urls = urls.list();
        Addresses {
            urls,
            next: rand::random_range(0..urls.len()),
        }
    }

    pub(super) fn next_url(&mut self) -> &'a str {
        let url = &self.urls[self.next % self.urls.len()];
        self.next = (self.next + 1) % self.urls.len();
        url
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BrokerUrls;

    #[test]
    fn addresses_are_taken_in_turn_from_a_random_one() {
        let urls = BrokerUrls::parse("amqp://h1,amqp://h2,amqp://h3").unwrap();
        let mut starts = std::collections::BTreeSet::new();
        for _ in 0..100 {
            let mut a = Addresses::new(&urls);
            let round: Vec<&str> = (0..4).map(|_| a.next_url()).collect();
            assert_eq!(round[0], round[3], "after all three, the first again");
            let distinct: std::collections::BTreeSet<_> = round[..3].iter().collect();
            assert_eq!(distinct.len(), 3, "each once per round: {round:?}");
            starts.insert(round[0]);
        }
        assert_eq!(starts.len(), 3, "every address is sometimes first");
    }

    #[test]
    fn silence_is_bounded_by_two_heartbeats() {
        assert_eq!(silence_bound(10), Duration::from_secs(20));
        assert_eq!(silence_bound(1), Duration::from_secs(5));
        assert_eq!(silence_bound(0), Duration::from_secs(30));
    }
}
