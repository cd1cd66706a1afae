//! The HTTP client for handlers: hyper-util's pooled client, and beside it
//! one HTTP/2 connection of our own to each TLS handler that chooses
//! HTTP/2.
//!
//! hyper-util's client boxes every request's future, and that future is
//! large (3,448 bytes): it holds a clone of the client and the request
//! beside the pool's checkout and the means to connect. A request to an
//! HTTP/2 handler needs none of it once the connection is up, only hyper's
//! `SendRequest`, whose future waits on a channel. So a handler reached
//! over TLS is asked, on its first request, what it speaks (ALPN): if
//! HTTP/2, that connection is kept here and every later request goes over
//! it; if HTTP/1.1, the origin is remembered as such and its requests go to
//! the pooled client (which keeps idle connections and reuses them). Plain
//! `http` handlers always go to the pooled client: HTTP/2 without TLS
//! needs prior knowledge, which a handler speaking only HTTP/1.1 refuses.
//! BENCHMARKS.md, "Requests to an HTTP/2 handler without hyper-util's
//! request future", gives what it saves.
//!
//! The connection is made by the same connector as the pooled client's,
//! so the SSRF guard checks the address connected to either way.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::TryFutureExt as _;
use futures_util::future::Either;
use http::uri::{Authority, Scheme};
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection as _, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tower_service::Service as _;

use crate::connection::Boxed;
use crate::destination::GuardedResolver;

/// The connector both ways of sending share: TCP through the SSRF guard's
/// resolver, TLS where the URL says `https`, each stream behind a pointer.
pub type Connector = Boxed<HttpsConnector<HttpConnector<GuardedResolver>>>;

type Pooled = hyper_util::client::legacy::Client<Connector, Full<Bytes>>;

/// Why an exchange failed.
pub type ExchangeError = Box<dyn std::error::Error + Send + Sync>;

/// An origin's HTTP/2 connection, or an HTTP/1.1 origin, is forgotten once
/// unused this long (checked every half of it): the connection closes (as
/// the pooled client closes an idle one), and an origin that now offers
/// HTTP/2 is asked again.
const IDLE: Duration = Duration::from_secs(60);

/// Connecting to the handler failed (refused, unreachable, the TLS
/// handshake, or the guard refused its address): the `connect` class.
#[derive(Debug, thiserror::Error)]
#[error("client error (Connect)")]
pub struct ConnectError(#[source] ExchangeError);

/// The handlers' client. Cloning it is cheap and shares its connections.
#[derive(Clone)]
pub struct HttpClient(Arc<Inner>);

struct Inner {
    pooled: Pooled,
    connector: Connector,
    origins: Origins,
    sweeping: std::sync::Once,
}

/// Each TLS origin's slot, and when a request last used it.
#[derive(Default)]
struct Origins {
    slots: Mutex<HashMap<Authority, (Arc<Slot>, Instant)>>,
}

/// What is known of one TLS origin. The lock is held while its connection
/// is made, so that requests arriving meanwhile wait for it rather than
/// each opening one.
type Slot = tokio::sync::Mutex<Known>;

#[derive(Default)]
enum Known {
    #[default]
    Unasked,
    Http2(http2::SendRequest<Full<Bytes>>),
    Http1,
}

enum Way {
    Pooled,
    Http2(http2::SendRequest<Full<Bytes>>),
}

impl HttpClient {
    pub(crate) fn new(pooled: Pooled, connector: Connector) -> HttpClient {
        HttpClient(Arc::new(Inner {
            pooled,
            connector,
            origins: Origins::default(),
            sweeping: std::sync::Once::new(),
        }))
    }

    /// How many handlers' origins have an open HTTP/2 connection of this
    /// client's own (not the pooled client's).
    pub fn http2_connections(&self) -> usize {
        let slots = self.0.origins.slots.lock().expect("never poisoned");
        slots
            .values()
            .filter(|(slot, _)| {
                slot.try_lock()
                    .is_ok_and(|known| matches!(&*known, Known::Http2(sender) if !sender.is_closed()))
            })
            .count()
    }

    /// Sends `request` (an absolute URI) and waits for the answer's head.
    ///
    /// Finding the way (and connecting, if need be) happens in a box of its
    /// own, freed once the request is handed over: what the future keeps
    /// while the answer is awaited is the sending alone (hyper-util's boxed
    /// future for the pooled client; hyper's, which waits on a channel, for
    /// an HTTP/2 connection of ours).
    pub fn request(
        &self,
        request: Request<Full<Bytes>>,
    ) -> impl Future<Output = Result<Response<Incoming>, ExchangeError>> + Send + use<> {
        let tls = request.uri().scheme() == Some(&Scheme::HTTPS);
        let slot = match request.uri().authority() {
            Some(authority) if tls => {
                sweep_while_alive(&self.0);
                self.0.origins.slot(authority)
            }
            _ => {
                let sent = self.0.pooled.request(request);
                return Either::Left(async move { Ok(sent.await?) });
            }
        };
        // Combinators rather than an `async` block: each step's future
        // takes the place of the one before, where an `async` block would
        // keep room for the sending and for what it gave, side by side.
        let inner = self.0.clone();
        let sending = Box::pin(inner.clone().sending(slot, request));
        Either::Right(
            sending
                .map_err(Failed::Error)
                .try_flatten()
                .or_else(move |failed| match failed {
                    Failed::Error(e) => Either::Left(std::future::ready(Err(e))),
                    Failed::Unsent(unsent) => Either::Right(Box::pin(inner.unsent(*unsent))),
                }),
        )
    }
}

type Unsent = hyper::client::conn::TrySendError<Request<Full<Bytes>>>;

enum Failed {
    Error(ExchangeError),
    /// Our HTTP/2 connection did not take the request (boxed: it is rare,
    /// and it holds the request).
    Unsent(Box<Unsent>),
}

impl Inner {
    /// Finds the way to the request's origin (connecting if need be) and
    /// hands the request over.
    async fn sending(
        self: Arc<Self>,
        slot: Arc<Slot>,
        request: Request<Full<Bytes>>,
    ) -> Result<impl Future<Output = Result<Response<Incoming>, Failed>> + Send + use<>, ExchangeError> {
        Ok(match self.way(&slot, request.uri()).await? {
            Way::Pooled => Either::Left(self.pooled.request(request).map_err(|e| Failed::Error(e.into()))),
            Way::Http2(mut sender) => Either::Right(
                sender
                    .try_send_request(request)
                    .map_err(|unsent| Failed::Unsent(Box::new(unsent))),
            ),
        })
    }

    /// A request our HTTP/2 connection did not take. If the connection
    /// closed before the request left, it goes through the pooled client,
    /// which connects afresh; the origin's next request finds the
    /// connection closed and asks the origin again ([`Inner::way`]).
    /// (hyper-util's client, too, sends a request again when its pooled
    /// connection closed before it left.)
    async fn unsent(self: Arc<Self>, mut unsent: Unsent) -> Result<Response<Incoming>, ExchangeError> {
        match unsent.take_message() {
            Some(request) => Ok(self.pooled.request(request).await?),
            None => Err(unsent.into_error().into()),
        }
    }

    /// How to send to `slot`'s origin: over its HTTP/2 connection (made now
    /// if it has none yet, or its last one closed) or through the pooled
    /// client.
    async fn way(&self, slot: &Slot, uri: &http::Uri) -> Result<Way, ExchangeError> {
        let mut known = slot.lock().await;
        match &*known {
            Known::Http1 => return Ok(Way::Pooled),
            Known::Http2(sender) if !sender.is_closed() => return Ok(Way::Http2(sender.clone())),
            _ => {}
        }
        let mut connector = self.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(ConnectError)?;
        let stream = connector.call(uri.clone()).await.map_err(ConnectError)?;
        if !stream.connected().is_negotiated_h2() {
            // HTTP/1.1: this connection is dropped and the pooled client,
            // which keeps HTTP/1.1 connections for reuse, takes the origin.
            *known = Known::Http1;
            return Ok(Way::Pooled);
        }
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(stream)
            .await
            .map_err(|e| ConnectError(e.into()))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "an HTTP/2 connection to a handler ended");
            }
        });
        *known = Known::Http2(sender.clone());
        Ok(Way::Http2(sender))
    }
}

impl Origins {
    fn slot(&self, authority: &Authority) -> Arc<Slot> {
        let now = Instant::now();
        let mut slots = self.slots.lock().expect("never poisoned");
        let (slot, used) = slots.entry(authority.clone()).or_insert_with(|| (Arc::default(), now));
        *used = now;
        slot.clone()
    }

    /// Forgets the origins unused for [`IDLE`] at `now`: their HTTP/2
    /// connection closes once its last requests are answered.
    fn sweep(&self, now: Instant) {
        self.slots.lock().expect("never poisoned").retain(|_, (slot, used)| {
            // A slot a request holds stays.
            Arc::strong_count(slot) > 1 || now.duration_since(*used) < IDLE
        });
    }
}

/// Sweeps the client's origins every half [`IDLE`] for as long as the
/// client lives; started with the first TLS request (it needs the
/// runtime, which making a client does not).
fn sweep_while_alive(inner: &Arc<Inner>) {
    inner.sweeping.call_once(|| {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak = Arc::downgrade(inner);
        runtime.spawn(async move {
            let mut every = tokio::time::interval(IDLE / 2);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                inner.origins.sweep(Instant::now());
            }
        });
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn future_size<F: FnOnce(A, B) -> R, A, B, R>(_: &F) -> usize {
        size_of::<R>()
    }

    /// An origin unused for [`IDLE`] is forgotten, one used since or held
    /// by a request under way is kept.
    #[test]
    fn idle_origins_are_forgotten_and_busy_ones_kept() {
        let origins = Origins::default();
        let (idle, recent, held) = (
            Authority::from_static("idle.example"),
            Authority::from_static("recent.example"),
            Authority::from_static("held.example"),
        );
        let start = Instant::now();
        drop(origins.slot(&idle));
        drop(origins.slot(&recent));
        let _under_way = origins.slot(&held);
        let later = start + IDLE + Duration::from_secs(1);
        origins.slots.lock().unwrap().get_mut(&recent).unwrap().1 = later - Duration::from_secs(5);
        origins.sweep(later);
        let mut left: Vec<String> = origins.slots.lock().unwrap().keys().map(|a| a.to_string()).collect();
        left.sort();
        assert_eq!(left, ["held.example", "recent.example"]);
        origins.sweep(start);
        assert_eq!(
            origins.slots.lock().unwrap().len(),
            2,
            "nothing is idle yet at the start"
        );
    }

    /// What a request under way keeps is hyper's sending (272 bytes, room
    /// for the request should the connection refuse it) beside the step
    /// after it, not hyper-util's boxed future (3,448 bytes) nor a second
    /// copy of anything.
    #[test]
    fn a_request_keeps_its_sending_once() {
        let request = |client: HttpClient, request: Request<Full<Bytes>>| client.request(request);
        let bytes = future_size(&request);
        assert!(bytes <= 400, "a request's future is {bytes} bytes");
    }
}
