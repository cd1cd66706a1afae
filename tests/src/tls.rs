//! A certificate authority for tests: a CA, and certificates it signs, as
//! PEM files, for TLS listeners (a broker node's, a handler's) and for the
//! clients that must trust them.

use std::path::{Path, PathBuf};

/// A CA; [`TestCa::sign`] signs certificates with it.
pub struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().unwrap();
        TestCa {
            issuer: rcgen::CertifiedIssuer::self_signed(params, key).unwrap(),
        }
    }

    /// Writes the CA's certificate to `<dir>/<stem>.pem`.
    pub fn write(&self, dir: &Path, stem: &str) -> PathBuf {
        let path = dir.join(format!("{stem}.pem"));
        std::fs::write(&path, self.issuer.pem()).unwrap();
        path
    }

    /// Signs a certificate for `names` (host names or IP addresses); writes
    /// `<dir>/<stem>.pem` and `<dir>/<stem>.key` and returns their paths.
    pub fn sign(&self, dir: &Path, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, stem);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (pem, key_path) = (dir.join(format!("{stem}.pem")), dir.join(format!("{stem}.key")));
        std::fs::write(&pem, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (pem, key_path)
    }
}

/// A server speaking HTTP/2 only (or HTTP/1.1 only) over TLS, on
/// 127.0.0.1: see [`serve_tls`].
pub struct TlsServer {
    pub addr: std::net::SocketAddr,
    /// The PEM file of the CA that signed the server's certificate.
    pub ca_file: PathBuf,
    /// How many TCP connections it has accepted.
    pub connections: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    close: tokio::sync::watch::Sender<u64>,
}

impl TlsServer {
    /// Drops every connection open now, as a restarted handler would; new
    /// ones are accepted as before.
    pub fn close_connections(&self) {
        self.close.send_modify(|generation| *generation += 1);
    }
}

/// Serves `service` over TLS speaking `version` only: HTTP/2 (ALPN `h2`,
/// up to 20,000 streams at once on a connection) or HTTP/1.1 (ALPN
/// `http/1.1`), with a certificate for 127.0.0.1 signed by a CA of its
/// own, whose certificate it writes to `dir` for the clients that must
/// trust it (`SSL_CERT_FILE`, or a root store).
pub async fn serve_tls<S, B>(service: S, dir: &Path, version: hyper::Version) -> anyhow::Result<TlsServer>
where
    S: hyper::service::Service<hyper::Request<hyper::body::Incoming>, Response = hyper::Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use std::sync::atomic::Ordering;
    let http2 = match version {
        hyper::Version::HTTP_2 => true,
        hyper::Version::HTTP_11 => false,
        other => anyhow::bail!("serve_tls speaks HTTP/2 or HTTP/1.1, not {other:?}"),
    };
    let ca = TestCa::new("swallow test TLS CA");
    let ca_file = ca.write(dir, "tls-ca");
    let (cert, key) = ca.sign(dir, "tls-server", &["127.0.0.1"]);
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from_pem_file(&cert)?],
            PrivateKeyDer::from_pem_file(&key)?,
        )?;
    tls.alpn_protocols = vec![if http2 { b"h2".to_vec() } else { b"http/1.1".to_vec() }];
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let accepted = connections.clone();
    let (close, closing) = tokio::sync::watch::channel(0u64);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            accepted.fetch_add(1, Ordering::SeqCst);
            let (acceptor, service, mut closing) = (acceptor.clone(), service.clone(), closing.clone());
            closing.mark_unchanged();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let io = TokioIo::new(tls);
                // Dropping the connection's future closes it. A server
                // whose `TlsServer` was dropped keeps its connections.
                let closed = async {
                    if closing.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                };
                tokio::select! {
                    _ = closed => {}
                    _ = async {
                        if http2 {
                            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                                .max_concurrent_streams(20_000)
                                .serve_connection(io, service)
                                .await;
                        } else {
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(io, service)
                                .await;
                        }
                    } => {}
                }
            });
        }
    });
    Ok(TlsServer {
        addr,
        ca_file,
        connections,
        close,
    })
}
