//! Real HTTP servers on loopback playing webhook handlers: they record every
//! request (arrival time, path, headers, body) and answer as the test says.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use tokio::sync::Notify;

/// One request a handler received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub at: Instant,
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// The form fields of a form-encoded body.
    pub fn form(&self) -> Vec<(String, String)> {
        serde_urlencoded::from_bytes(&self.body).unwrap_or_default()
    }

    /// One field of a form-encoded body (empty when it has none).
    pub fn field(&self, name: &str) -> String {
        self.form()
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
            .unwrap_or_default()
    }
}

/// What a handler answers.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Wait this long before answering.
    pub delay: Duration,
    /// Then, if set, until the test cancels this token.
    pub gate: Option<tokio_util::sync::CancellationToken>,
}

impl Answer {
    pub fn status(status: u16) -> Answer {
        Answer {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            delay: Duration::ZERO,
            gate: None,
        }
    }
    pub fn json(value: serde_json::Value) -> Answer {
        Answer {
            body: serde_json::to_vec(&value).unwrap(),
            headers: vec![("content-type".into(), "application/json".into())],
            ..Answer::status(200)
        }
    }
    pub fn text(text: &str) -> Answer {
        Answer::json(serde_json::json!({ "text": text }))
    }
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Answer {
        self.body = body.into();
        self
    }
    pub fn header(mut self, name: &str, value: &str) -> Answer {
        self.headers.push((name.into(), value.into()));
        self
    }
    pub fn after(mut self, delay: Duration) -> Answer {
        self.delay = delay;
        self
    }
    /// Answers only once `gate` is cancelled (at once if it already is).
    pub fn until(mut self, gate: &tokio_util::sync::CancellationToken) -> Answer {
        self.gate = Some(gate.clone());
        self
    }
}

type Script = dyn Fn(&Recorded, usize) -> Answer + Send + Sync;

#[derive(Clone)]
struct Shared {
    requests: Arc<Mutex<Vec<Recorded>>>,
    notify: Arc<Notify>,
    script: Arc<Script>,
}

/// A handler listening on a loopback port.
pub struct HandlerServer {
    pub addr: SocketAddr,
    shared: Shared,
    task: tokio::task::JoinHandle<()>,
    _running: crate::watchdog::Running,
}

impl HandlerServer {
    /// Starts a handler; `script(request, n)` answers the n-th request (0-based).
    pub async fn start(script: impl Fn(&Recorded, usize) -> Answer + Send + Sync + 'static) -> HandlerServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().unwrap();
        let shared = Shared {
            requests: Arc::new(Mutex::new(Vec::new())),
            notify: Arc::new(Notify::new()),
            script: Arc::new(script),
        };
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        HandlerServer {
            addr,
            shared,
            task,
            _running: crate::watchdog::running(),
        }
    }

    /// `http://127.0.0.1:PORT<path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.requests.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.shared.requests.lock().unwrap().len()
    }

    /// Waits until at least `n` requests arrived; fails the test after `timeout`.
    pub async fn until(&self, n: usize, timeout: Duration, what: &str) -> Vec<Recorded> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.notify.notified();
            let got = self.requests();
            if got.len() >= n {
                return got;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!("timed out after {timeout:?}: {} of {n} {what}", self.count());
            }
        }
    }
}

impl Drop for HandlerServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(State(shared): State<Shared>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let recorded = Recorded {
        at: Instant::now(),
        method: method.to_string(),
        path: uri.path().to_owned(),
        headers,
        body: body.to_vec(),
    };
    let n = {
        let mut requests = shared.requests.lock().unwrap();
        requests.push(recorded.clone());
        requests.len() - 1
    };
    shared.notify.notify_waiters();
    let answer = (shared.script)(&recorded, n);
    if !answer.delay.is_zero() {
        tokio::time::sleep(answer.delay).await;
    }
    if let Some(gate) = &answer.gate {
        gate.cancelled().await;
    }
    let mut response = (StatusCode::from_u16(answer.status).unwrap(), answer.body).into_response();
    for (k, v) in answer.headers {
        response.headers_mut().insert(
            axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    response
}

/// A server that accepts connections and resets them at once (TCP RST).
pub async fn resetting_server() -> (SocketAddr, Arc<Mutex<usize>>, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(Mutex::new(0));
    let seen = count.clone();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            *seen.lock().unwrap() += 1;
            let _ = stream.set_zero_linger();
            drop(stream);
        }
    });
    (addr, count, task)
}

/// A loopback port nobody listens on (connections are refused).
pub fn refused_addr() -> SocketAddr {
    crate::free_addr()
}

/// What a chaos handler does with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chaos {
    Ok,
    Error500,
    Slow(Duration),
    Reset,
}

/// A raw HTTP/1.1 server that, per request, answers 200 `{"text":"ok"}`,
/// 500, answers too late, or resets the connection (TCP RST), as `pick`
/// says for the n-th request. Returns its address and the count of requests.
pub async fn chaos_server(
    pick: impl Fn(usize) -> Chaos + Send + Sync + 'static,
) -> (
    SocketAddr,
    Arc<std::sync::atomic::AtomicUsize>,
    tokio::task::JoinHandle<()>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    let pick = Arc::new(pick);
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let seen = seen.clone();
            let pick = pick.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    // Read one request: headers, then Content-Length bytes.
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let mut chunk = [0u8; 8192];
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while buf.len() < head_end + len {
                        let mut chunk = [0u8; 8192];
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.drain(..head_end + len);
                    let n = seen.fetch_add(1, Ordering::SeqCst);
                    let (status, body) = match pick(n) {
                        Chaos::Ok => ("200 OK", "{\"text\":\"ok\"}"),
                        Chaos::Error500 => ("500 Internal Server Error", "oops"),
                        Chaos::Slow(d) => {
                            tokio::time::sleep(d).await;
                            ("200 OK", "{\"text\":\"too late\"}")
                        }
                        Chaos::Reset => {
                            let _ = stream.set_zero_linger();
                            return;
                        }
                    };
                    let response = format!(
                        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if stream.write_all(response.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, count, task)
}
