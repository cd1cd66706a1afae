//! `[broker]`: where the broker is (one address or a cluster's several),
//! TLS, the name prefix, prefetch and the number of delivery shards.

use std::fmt;
use std::path::PathBuf;

use lapin::uri::AMQPUri;
use serde::Deserialize;

use super::errors::{FieldError, at};
use super::units::positive;
use super::{DEFAULT_AMQP_URL, DEFAULT_PREFIX, check_prefix};
use crate::redact;
use crate::topology::{DEFAULT_DELIVERY_LIMIT, DEFAULT_SHARDS, Topology};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBroker {
    url: Option<String>,
    prefix: Option<String>,
    prefetch: Option<u16>,
    shards: Option<u32>,
    delivery_limit: Option<u32>,
    heartbeat_s: Option<u16>,
    ca_file: Option<PathBuf>,
    client_cert_file: Option<PathBuf>,
    client_key_file: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// One address, or a cluster's several: tried in turn from a random one.
    pub urls: BrokerUrls,
    /// AMQP heartbeat: a node silent for two of them is given up (0: the broker's).
    pub heartbeat_s: u16,
    /// For `amqps://`: the CA of the broker's certificate (else the system's roots).
    pub ca_file: Option<PathBuf>,
    /// For mutual TLS: the client's certificate and key (PEM), both or neither.
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    pub prefix: String,
    /// Unacknowledged deliveries a consumer may hold (basic.qos).
    pub prefetch: u16,
    /// Delivery shards: the unit of work one deliverer replica owns at a time.
    pub shards: u32,
    /// Deliveries of one message from a work queue before the broker sets
    /// it aside in the stage's dead (or invalid) queue (`x-delivery-limit`).
    pub delivery_limit: u32,
}

impl BrokerConfig {
    /// The exchanges and queues this configuration describes.
    pub fn topology(&self) -> Topology {
        Topology::with_shards(&self.prefix, self.shards).with_delivery_limit(self.delivery_limit)
    }
}

impl RawBroker {
    pub(super) fn validate(self) -> Result<BrokerConfig, FieldError> {
        let prefix = self.prefix.unwrap_or_else(|| DEFAULT_PREFIX.into());
        check_prefix(&prefix).map_err(at("broker.prefix"))?;
        let url = self.url.unwrap_or_else(|| DEFAULT_AMQP_URL.into());
        let urls = BrokerUrls::parse(&url).map_err(at("broker.url"))?;
        let tls_files = [
            ("broker.ca_file", &self.ca_file),
            ("broker.client_cert_file", &self.client_cert_file),
            ("broker.client_key_file", &self.client_key_file),
        ];
        for (field, file) in tls_files {
            if let Some(path) = file {
                std::fs::metadata(path).map_err(|e| (field.to_owned(), format!("{}: {e}", path.display())))?;
            }
        }
        if self.client_cert_file.is_some() != self.client_key_file.is_some() {
            return Err(at("broker.client_key_file")(
                "client_cert_file and client_key_file go together".into(),
            ));
        }
        let shards = self.shards.unwrap_or(DEFAULT_SHARDS);
        if !(1..=1024).contains(&shards) {
            return Err(at("broker.shards")(format!("{shards} is not between 1 and 1024")));
        }
        Ok(BrokerConfig {
            urls,
            heartbeat_s: self.heartbeat_s.unwrap_or(10),
            ca_file: self.ca_file,
            client_cert_file: self.client_cert_file,
            client_key_file: self.client_key_file,
            prefix,
            prefetch: positive(self.prefetch, 256).map_err(at("broker.prefetch"))?,
            shards,
            delivery_limit: positive(self.delivery_limit, DEFAULT_DELIVERY_LIMIT)
                .map_err(at("broker.delivery_limit"))?,
        })
    }
}

/// The broker's addresses, in the order configured: one or more `amqp://`
/// or `amqps://` URLs. Shown (`Display`, `Debug`) without their passwords.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerUrls(Vec<String>);

impl BrokerUrls {
    /// Parses `url[,url...]` (a comma inside a password is written `%2C`).
    pub fn parse(text: &str) -> Result<BrokerUrls, String> {
        let urls: Vec<String> = text
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect();
        if urls.is_empty() {
            return Err("no broker URL".into());
        }
        for (i, url) in urls.iter().enumerate() {
            amqp_uri(url).map_err(|e| format!("URL {} ({}): {e}", i + 1, redact::url(url)))?;
        }
        Ok(BrokerUrls(urls))
    }

    pub fn list(&self) -> &[String] {
        &self.0
    }
}

impl fmt::Display for BrokerUrls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: Vec<String> = self.0.iter().map(|u| redact::url(u)).collect();
        f.write_str(&shown.join(","))
    }
}

impl fmt::Debug for BrokerUrls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BrokerUrls({self})")
    }
}

/// Parses one URL. The host is taken as written: `AMQPUri` alone turns an
/// IP address into `localhost`, which a TLS certificate for the IP fails.
pub(crate) fn amqp_uri(url: &str) -> Result<AMQPUri, String> {
    let mut uri: AMQPUri = url.parse()?;
    if let Some(host) = url::Url::parse(url).ok().as_ref().and_then(url::Url::host_str) {
        uri.authority.host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
    }
    Ok(uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_password_of_a_list_is_hidden() {
        let urls = BrokerUrls::parse("amqp://a:secret1@h1/%2f, amqp://b:secret2@h2/%2f").unwrap();
        for text in [urls.to_string(), format!("{urls:?}")] {
            assert!(!text.contains("secret"), "{text}");
            assert!(text.contains("h1") && text.contains("h2"), "{text}");
        }
    }

    #[test]
    fn a_list_is_parsed_in_order_and_checked() {
        let urls = BrokerUrls::parse("amqp://u:p@127.0.0.1:5673/%2f,amqps://u:p@node2:5671/%2f,").unwrap();
        assert_eq!(urls.list().len(), 2);
        assert!(urls.list()[1].starts_with("amqps://"));
        let error = BrokerUrls::parse("amqp://u:p@h1/%2f,http://u:secret@h2/").unwrap_err();
        assert!(error.contains("URL 2") && !error.contains("secret"), "{error}");
        assert!(BrokerUrls::parse(" , ").is_err());
    }

    #[test]
    fn an_ip_address_stays_the_host() {
        assert_eq!(
            amqp_uri("amqps://u:p@127.0.0.1:5671/%2f").unwrap().authority.host,
            "127.0.0.1"
        );
        assert_eq!(amqp_uri("amqp://u:p@[::1]:5672/%2f").unwrap().authority.host, "::1");
        assert_eq!(amqp_uri("amqp://u:p@node1:5672/%2f").unwrap().authority.host, "node1");
    }
}
