//! A stand-in for Slack's Web API on loopback: it records
//! `chat.postMessage`, answers `team.info`, `conversations.info` and
//! `users.info` from fixed names, and can be told to answer lookups slowly,
//! with `ok: false`, or with `429` and `Retry-After`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use tokio::sync::Notify;

/// How the stand-in answers name lookups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookups {
    /// The names at once.
    Answer,
    /// `ok: false` (`channel_not_found`, `user_not_found`, …).
    Fail,
    /// `429` with `Retry-After: 60`.
    RateLimited,
}

/// A `chat.postMessage` the stand-in received.
#[derive(Debug, Clone)]
pub struct Posted {
    pub authorization: Option<String>,
    pub body: serde_json::Value,
}

#[derive(Clone, Default)]
struct Shared {
    posted: Arc<Mutex<Vec<Posted>>>,
    notify: Arc<Notify>,
    lookups: Arc<Mutex<Option<Lookups>>>,
    delay_ms: Arc<AtomicU64>,
    lookup_calls: Arc<AtomicUsize>,
}

/// The stand-in, serving until dropped.
pub struct SlackApi {
    pub addr: SocketAddr,
    shared: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl SlackApi {
    pub async fn start() -> SlackApi {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().unwrap();
        let shared = Shared::default();
        *shared.lookups.lock().unwrap() = Some(Lookups::Answer);
        let app = Router::new()
            .route("/api/{method}", any(method))
            .with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        SlackApi { addr, shared, task }
    }

    /// `api_base` for `[ingress.slack]`.
    pub fn api_base(&self) -> String {
        format!("http://{}/api", self.addr)
    }

    pub fn set_lookups(&self, lookups: Lookups) {
        *self.shared.lookups.lock().unwrap() = Some(lookups);
    }

    /// Lookups answer after `delay`.
    pub fn set_delay(&self, delay: Duration) {
        self.shared.delay_ms.store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Calls to the lookup methods so far.
    pub fn lookup_calls(&self) -> usize {
        self.shared.lookup_calls.load(Ordering::SeqCst)
    }

    pub fn posted(&self) -> Vec<Posted> {
        self.shared.posted.lock().unwrap().clone()
    }

    /// Waits until at least `n` messages were posted; fails the test after `timeout`.
    pub async fn until_posted(&self, n: usize, timeout: Duration, what: &str) -> Vec<Posted> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.notify.notified();
            let got = self.posted();
            if got.len() >= n {
                return got;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!("timed out after {timeout:?}: {} of {n} {what}", got.len());
            }
        }
    }
}

impl Drop for SlackApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn method(
    State(shared): State<Shared>,
    Path(method): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if method == "chat.postMessage" {
        let body = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
        shared.posted.lock().unwrap().push(Posted { authorization, body });
        shared.notify.notify_waiters();
        return json(
            StatusCode::OK,
            serde_json::json!({"ok": true, "ts": "1355517599.000001"}),
        );
    }
    shared.lookup_calls.fetch_add(1, Ordering::SeqCst);
    let delay = shared.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let mode = shared.lookups.lock().unwrap().unwrap_or(Lookups::Answer);
    let query: Vec<(String, String)> = serde_urlencoded::from_str(uri.query().unwrap_or_default()).unwrap_or_default();
    let id = query.first().map(|(_, v)| v.clone()).unwrap_or_default();
    let answer = match (mode, method.as_str()) {
        (Lookups::RateLimited, _) => {
            let mut r = json(
                StatusCode::TOO_MANY_REQUESTS,
                serde_json::json!({"ok": false, "error": "ratelimited"}),
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("60"));
            return r;
        }
        (Lookups::Fail, _) => serde_json::json!({"ok": false, "error": "not_found"}),
        (_, "team.info") => serde_json::json!({"ok": true, "team": {"id": id, "domain": "example", "name": "Example"}}),
        (_, "conversations.info") => {
            serde_json::json!({"ok": true, "channel": {"id": id, "name": "test", "is_channel": true}})
        }
        (_, "users.info") => serde_json::json!({"ok": true, "user": {"id": id, "name": "steve",
            "real_name": "Steve Roberts", "profile": {"display_name": "Steve", "real_name": "Steve Roberts"}}}),
        _ => serde_json::json!({"ok": false, "error": "unknown_method"}),
    };
    json(StatusCode::OK, answer)
}

fn json(status: StatusCode, value: serde_json::Value) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], value.to_string()).into_response()
}
