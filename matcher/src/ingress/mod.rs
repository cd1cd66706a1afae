//! The ingress (docs/contract.md §9): chat platforms POST their messages
//! here, on a listener of its own, and each becomes a chat event published
//! to `<prefix>.events`. A request is answered 2xx only once every event in
//! it is confirmed by the broker; a broker that is away, blocked (a
//! resource alarm) or slower than [`CONFIRM_BOUND`] makes it a 503, so the
//! platform retries and nothing it was told is safe can be lost.
//!
//! The publisher is a channel of the matcher's own broker connection,
//! opened by each session ([`Link`]); between sessions there is none.

mod cache;
pub mod lookup;
pub mod matrix;
pub mod slack;

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper_util::rt::{TokioIo, TokioTimer};
use lapin::Connection;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Registry};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tower_service::Service as _;
use tracing::{debug, info, warn};

use swallow_shared::ChatEvent;
use swallow_shared::broker::{self, ConfirmedPublisher, Health};
use swallow_shared::config::{IngressConfig, MatrixSecrets, SlackSecrets};
use swallow_shared::metrics::{counter_vec, register};
use swallow_shared::wire::messages::channel_key;

use lookup::Names;

/// Bodies larger than this are refused (413) without reading the rest.
pub const MAX_BODY: usize = 1 << 20;
/// A request's headers must arrive within this...
const HEADER_DEADLINE: Duration = Duration::from_secs(10);
/// ...and its body within this, or the connection is cut.
const BODY_DEADLINE: Duration = Duration::from_secs(10);
/// A publish not confirmed within this is a 503.
pub const CONFIRM_BOUND: Duration = Duration::from_secs(2);
/// How long a request waits for names (Slack wants an answer within 3 s).
pub const LOOKUP_BUDGET: Duration = Duration::from_millis(800);
/// Event ids remembered, to answer retries (Slack's events, Matrix's
/// transactions) without publishing again.
const RECENT_EVENTS: usize = 10_000;
/// How long connections under way may finish after shutdown.
const DRAIN: Duration = Duration::from_secs(5);

/// The matcher session's publisher, for the ingress.
#[derive(Clone)]
pub struct Link {
    pub publisher: ConfirmedPublisher,
    pub connection: Arc<Connection>,
}

/// Where the current session puts its [`Link`].
pub type LinkSlot = Arc<watch::Sender<Option<Link>>>;

/// A started ingress.
pub struct Ingress {
    pub addr: SocketAddr,
    pub link: LinkSlot,
    /// Ready while a session's publisher is there and the broker is not
    /// blocking publishes.
    pub health: Health,
}

/// The `result` labels of `swallow_ingress_requests_total`.
const REQUEST_RESULTS: &[&str] = &[
    "ok",
    "challenge",
    "ignored",
    "duplicate",
    "unauthorized",
    "too_large",
    "timeout",
    "bad_request",
    "unavailable",
];
/// The `result` labels of `swallow_ingress_events_total`.
const EVENT_RESULTS: &[&str] = &["published", "duplicate", "ignored", "unavailable"];
/// The platforms there are ingresses for.
const PLATFORMS: &[&str] = &[slack::PLATFORM, matrix::PLATFORM];

/// The ingress's metrics. Every matcher exports them (at zero without an
/// ingress), each label set from the start, so that a rate over them
/// sees the first request and dashboards and alerts have series.
#[derive(Clone)]
pub struct Metrics {
    requests: IntCounterVec,
    events: IntCounterVec,
    latency: HistogramVec,
    lookups: IntCounterVec,
}

impl Metrics {
    pub fn new(registry: &Registry) -> Self {
        let m = Metrics {
            requests: counter_vec(
                registry,
                "swallow_ingress_requests_total",
                "Requests to the ingress, by platform and result.",
                &["platform", "result"],
            ),
            events: counter_vec(
                registry,
                "swallow_ingress_events_total",
                "Platform events received, by platform and result (published, duplicate, ignored, unavailable).",
                &["platform", "result"],
            ),
            latency: register(
                registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "swallow_ingress_request_duration_seconds",
                        "From a request's arrival to its events confirmed by the broker.",
                    )
                    .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0]),
                    &["platform"],
                )
                .expect("valid histogram"),
            ),
            lookups: counter_vec(
                registry,
                "swallow_ingress_lookups_total",
                "Name lookups for ingress events, by result (cached, fetched, failed, timeout, rate_limited).",
                &["result"],
            ),
        };
        for platform in PLATFORMS {
            for result in REQUEST_RESULTS {
                m.requests.with_label_values(&[platform, result]);
            }
            for result in EVENT_RESULTS {
                m.events.with_label_values(&[platform, result]);
            }
            m.latency.with_label_values(&[platform]);
        }
        for result in lookup::RESULTS {
            m.lookups.with_label_values(&[result]);
        }
        m
    }
}

struct Ctx {
    exchange: String,
    link: LinkSlot,
    /// Slack's secrets and names, with `[ingress.slack]`.
    slack: Option<(watch::Receiver<Arc<SlackSecrets>>, Names)>,
    /// The homeserver, with `[ingress.matrix]`.
    matrix: Option<matrix::Matrix>,
    recent: Mutex<RecentIds>,
    metrics: Metrics,
}

/// The ingress could not start.
#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    #[error("binding the ingress listener on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("building the ingress's HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// Binds the listener and serves until `shutdown` (which stops accepting
/// first, then lets requests under way finish).
pub async fn start(
    config: &IngressConfig,
    exchange: String,
    metrics: Metrics,
    secrets: watch::Receiver<Arc<SlackSecrets>>,
    matrix_secrets: watch::Receiver<Arc<MatrixSecrets>>,
    shutdown: CancellationToken,
) -> Result<Ingress, IngressError> {
    let client = reqwest::Client::builder()
        .user_agent(swallow_shared::USER_AGENT)
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(2))
        .build()?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| IngressError::Listen {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| IngressError::Listen {
        addr: config.listen,
        source,
    })?;
    let lookups = metrics.lookups.clone();
    let slack = config.slack.as_ref().map(|s| {
        let names = Names::new(s.api_base.clone(), secrets.clone(), client.clone(), lookups.clone());
        (secrets, names)
    });
    let matrix = config
        .matrix
        .as_ref()
        .map(|m| matrix::Matrix::new(m.clone(), matrix_secrets, client, lookups));
    let link: LinkSlot = Arc::new(watch::channel(None).0);
    let mut router = Router::new();
    let mut paths = Vec::new();
    if slack.is_some() {
        router = router.route("/slack/events", post(slack_events));
        paths.push("POST /slack/events");
    }
    if matrix.is_some() {
        router = router
            .route("/_matrix/app/v1/transactions/{txn_id}", put(matrix_transaction))
            .route("/_matrix/app/v1/ping", post(matrix_ping))
            .route("/_matrix/app/v1/users/{user_id}", get(matrix_not_found))
            .route("/_matrix/app/v1/rooms/{alias}", get(matrix_not_found));
        paths.push("PUT /_matrix/app/v1/transactions/{txnId}");
    }
    let ctx = Arc::new(Ctx {
        exchange,
        link: link.clone(),
        slack,
        matrix,
        recent: Mutex::new(RecentIds::new(RECENT_EVENTS)),
        metrics,
    });
    let router = router.with_state(ctx);
    info!(%addr, paths = %paths.join(", "), "ingress listening");
    tokio::spawn(serve(listener, router, shutdown.clone()));
    let health = Health::default();
    tokio::spawn(watch_readiness(link.clone(), health.clone(), shutdown));
    Ok(Ingress { addr, link, health })
}

/// Keeps the ingress's readiness: a publisher, and a broker not blocking.
async fn watch_readiness(link: LinkSlot, health: Health, shutdown: CancellationToken) {
    let mut was = None;
    loop {
        let ready = link.borrow().as_ref().is_some_and(|l| !l.connection.status().blocked());
        health.set_ready(ready);
        if was != Some(ready) {
            if was.is_some() {
                info!(ready, "ingress readiness changed");
            }
            was = Some(ready);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

/// HTTP/1.1 with deadlines on headers and body; on shutdown, no new
/// connection is accepted and those open finish what they are doing.
async fn serve(listener: TcpListener, router: Router, shutdown: CancellationToken) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    warn!(%error, "ingress: accepting a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let router = router.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                router.clone().call(request.map(Body::new))
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_DEADLINE)
                .serve_connection(TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => return,
                _ = shutdown.cancelled() => {}
            }
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(DRAIN, connection).await;
        });
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// What became of a request: its `result` label and its answer.
struct Answer {
    result: &'static str,
    response: Response,
}

impl Answer {
    fn new(result: &'static str, status: StatusCode, body: impl IntoResponse) -> Self {
        Answer {
            result,
            response: (status, body).into_response(),
        }
    }
}

async fn slack_events(State(ctx): State<Arc<Ctx>>, request: Request) -> Response {
    let started = Instant::now();
    let answer = slack_request(&ctx, request, started).await;
    ctx.metrics
        .requests
        .with_label_values(&[slack::PLATFORM, answer.result])
        .inc();
    answer.response
}

async fn slack_request(ctx: &Ctx, request: Request, started: Instant) -> Answer {
    let (parts, body) = request.into_parts();
    let body = match read_body(&parts.headers, body).await {
        Ok(body) => body,
        Err(refused) => return refused,
    };
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
    let Some((secrets, names)) = &ctx.slack else {
        return Answer::new("bad_request", StatusCode::NOT_FOUND, "no Slack ingress\n");
    };
    let secrets = secrets.borrow().clone();
    if let Err(bad) = slack::verify(
        &secrets.signing_secrets,
        header("x-slack-request-timestamp"),
        header("x-slack-signature"),
        &body,
        now_s(),
    ) {
        debug!(reason = bad.as_str(), "ingress: Slack request refused");
        return Answer::new("unauthorized", StatusCode::UNAUTHORIZED, "invalid signature\n");
    }
    let envelope: slack::Envelope = match serde_json::from_slice(&body) {
        Ok(e) => e,
        Err(error) => {
            return Answer::new(
                "bad_request",
                StatusCode::BAD_REQUEST,
                format!("not an Events API payload: {error}\n"),
            );
        }
    };
    match envelope.kind.as_str() {
        "url_verification" => {
            let challenge = envelope.challenge.unwrap_or_default();
            let body = serde_json::json!({ "challenge": challenge }).to_string();
            Answer::new(
                "challenge",
                StatusCode::OK,
                ([(header::CONTENT_TYPE, "application/json")], body),
            )
        }
        "event_callback" => event_callback(ctx, names, envelope, header("x-slack-retry-num"), started).await,
        _ => {
            ctx.count_event(slack::PLATFORM, "ignored");
            Answer::new("ignored", StatusCode::OK, "")
        }
    }
}

/// Reads the body: at most [`MAX_BODY`] (413 beyond, without reading the
/// rest), within [`BODY_DEADLINE`] (408, and the connection is closed).
async fn read_body(headers: &HeaderMap, body: Body) -> Result<bytes::Bytes, Answer> {
    let too_large = || {
        let mut a = Answer::new("too_large", StatusCode::PAYLOAD_TOO_LARGE, "body over 1 MiB\n");
        a.response
            .headers_mut()
            .insert(header::CONNECTION, header::HeaderValue::from_static("close"));
        a
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large());
    }
    match tokio::time::timeout(BODY_DEADLINE, Limited::new(body, MAX_BODY).collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(error)) if error.is::<LengthLimitError>() => Err(too_large()),
        Ok(Err(_)) => Err(Answer::new("bad_request", StatusCode::BAD_REQUEST, "body not read\n")),
        Err(_) => {
            let mut a = Answer::new("timeout", StatusCode::REQUEST_TIMEOUT, "body too slow\n");
            a.response
                .headers_mut()
                .insert(header::CONNECTION, header::HeaderValue::from_static("close"));
            Err(a)
        }
    }
}

async fn event_callback(
    ctx: &Ctx,
    names: &Names,
    envelope: slack::Envelope,
    retry_num: Option<&str>,
    started: Instant,
) -> Answer {
    let (Some(team_id), Some(inner)) = (envelope.team_id.as_deref(), envelope.event.as_ref()) else {
        return Answer::new(
            "bad_request",
            StatusCode::BAD_REQUEST,
            "event_callback without team_id or event\n",
        );
    };
    let Some(mut event) = slack::to_chat_event(team_id, inner) else {
        ctx.count_event(slack::PLATFORM, "ignored");
        return Answer::new("ignored", StatusCode::OK, "");
    };
    // Slack's event id, else the message's own identity.
    let key = envelope
        .event_id
        .clone()
        .unwrap_or_else(|| [team_id, "/", &event.channel_id, "/", &event.ts].concat());
    if ctx.recent.lock().unwrap_or_else(|e| e.into_inner()).contains(&key) {
        debug!(event_id = %key, retry = retry_num.unwrap_or("0"), "ingress: a retry of an event already published");
        ctx.count_event(slack::PLATFORM, "duplicate");
        return Answer::new("duplicate", StatusCode::OK, "");
    }
    if ctx.link.borrow().is_none() {
        // Not worth a lookup: nothing can be published.
        ctx.count_event(slack::PLATFORM, "unavailable");
        return Answer::new("unavailable", StatusCode::SERVICE_UNAVAILABLE, "no broker connection\n");
    }
    names.fill(&mut event, LOOKUP_BUDGET).await;
    match ctx.publish(&event).await {
        Ok(()) => {
            ctx.recent.lock().unwrap_or_else(|e| e.into_inner()).insert(key);
            ctx.count_event(slack::PLATFORM, "published");
            ctx.metrics
                .latency
                .with_label_values(&[slack::PLATFORM])
                .observe(started.elapsed().as_secs_f64());
            Answer::new("ok", StatusCode::OK, "")
        }
        Err(error) => {
            warn!(%error, "ingress: event not published; answered 503 for the platform to retry");
            ctx.count_event(slack::PLATFORM, "unavailable");
            Answer::new("unavailable", StatusCode::SERVICE_UNAVAILABLE, format!("{error}\n"))
        }
    }
}

/// A Matrix error answer: `{"errcode": …, "error": …}`.
fn matrix_error(result: &'static str, status: StatusCode, errcode: &str, error: &str) -> Answer {
    let body = serde_json::json!({ "errcode": errcode, "error": error }).to_string();
    Answer::new(result, status, ([(header::CONTENT_TYPE, "application/json")], body))
}

fn matrix_ok(result: &'static str) -> Answer {
    Answer::new(
        result,
        StatusCode::OK,
        ([(header::CONTENT_TYPE, "application/json")], "{}"),
    )
}

/// Checks the homeserver's token; `Some(refusal)` when it is missing or wrong.
fn matrix_auth(matrix: &matrix::Matrix, parts: &axum::http::request::Parts) -> Option<Answer> {
    let header = parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match matrix::check_token(&matrix.hs_token(), header, parts.uri.query()) {
        matrix::Auth::Ok => None,
        matrix::Auth::Missing => Some(matrix_error(
            "unauthorized",
            StatusCode::UNAUTHORIZED,
            "M_MISSING_TOKEN",
            "no access token",
        )),
        matrix::Auth::Wrong => Some(matrix_error(
            "unauthorized",
            StatusCode::FORBIDDEN,
            "M_FORBIDDEN",
            "the token is not the hs_token",
        )),
    }
}

async fn matrix_ping(State(ctx): State<Arc<Ctx>>, request: Request) -> Response {
    let (parts, _) = request.into_parts();
    let answer = match ctx.matrix.as_ref().and_then(|m| matrix_auth(m, &parts)) {
        Some(refused) => refused,
        None => matrix_ok("ok"),
    };
    ctx.count_request(matrix::PLATFORM, answer.result);
    answer.response
}

/// Users and rooms queries: swallow makes none on demand.
async fn matrix_not_found(State(ctx): State<Arc<Ctx>>, request: Request) -> Response {
    let (parts, _) = request.into_parts();
    let answer = match ctx.matrix.as_ref().and_then(|m| matrix_auth(m, &parts)) {
        Some(refused) => refused,
        None => matrix_error("ignored", StatusCode::NOT_FOUND, "M_NOT_FOUND", "swallow creates none"),
    };
    ctx.count_request(matrix::PLATFORM, answer.result);
    answer.response
}

async fn matrix_transaction(State(ctx): State<Arc<Ctx>>, Path(txn_id): Path<String>, request: Request) -> Response {
    let started = Instant::now();
    let answer = match &ctx.matrix {
        Some(m) => transaction(&ctx, m, &txn_id, request, started).await,
        None => Answer::new("bad_request", StatusCode::NOT_FOUND, ""),
    };
    ctx.count_request(matrix::PLATFORM, answer.result);
    answer.response
}

/// One transaction: answered `{}` once every message in it is confirmed by
/// the broker (or was already); a transaction seen before, at once.
async fn transaction(ctx: &Ctx, m: &matrix::Matrix, txn_id: &str, request: Request, started: Instant) -> Answer {
    let (parts, body) = request.into_parts();
    if let Some(refused) = matrix_auth(m, &parts) {
        debug!("ingress: Matrix transaction refused (token)");
        return refused;
    }
    let body = match read_body(&parts.headers, body).await {
        Ok(body) => body,
        Err(refused) => return refused,
    };
    let txn_key = ["matrix-txn/", txn_id].concat();
    if ctx.recent.lock().unwrap_or_else(|e| e.into_inner()).contains(&txn_key) {
        debug!(txn_id, "ingress: a Matrix transaction already answered");
        return matrix_ok("duplicate");
    }
    let txn: matrix::Transaction = match serde_json::from_slice(&body) {
        Ok(t) => t,
        Err(error) => {
            return matrix_error(
                "bad_request",
                StatusCode::BAD_REQUEST,
                "M_NOT_JSON",
                &format!("not a transaction: {error}"),
            );
        }
    };
    let mut failed = None;
    for raw in txn.events {
        let Ok(event) = serde_json::from_value::<matrix::RoomEvent>(raw) else {
            ctx.count_event(matrix::PLATFORM, "ignored");
            continue;
        };
        m.observe_state(&event);
        let Some(mut chat) = matrix::to_chat_event(&m.config().server_name, &event) else {
            ctx.count_event(matrix::PLATFORM, "ignored");
            continue;
        };
        if m.is_own(&event.sender) {
            ctx.count_event(matrix::PLATFORM, "ignored");
            continue;
        }
        let key = ["matrix/", &event.event_id].concat();
        if ctx.recent.lock().unwrap_or_else(|e| e.into_inner()).contains(&key) {
            ctx.count_event(matrix::PLATFORM, "duplicate");
            continue;
        }
        if failed.is_some() || ctx.link.borrow().is_none() {
            ctx.count_event(matrix::PLATFORM, "unavailable");
            failed.get_or_insert_with(|| "no broker connection".to_owned());
            continue;
        }
        m.fill(&mut chat, LOOKUP_BUDGET).await;
        match ctx.publish(&chat).await {
            Ok(()) => {
                ctx.recent.lock().unwrap_or_else(|e| e.into_inner()).insert(key);
                ctx.count_event(matrix::PLATFORM, "published");
            }
            Err(error) => {
                ctx.count_event(matrix::PLATFORM, "unavailable");
                failed = Some(error);
            }
        }
    }
    if let Some(error) = failed {
        warn!(txn_id, %error, "ingress: Matrix transaction not all published; answered 503 for the homeserver to retry");
        return matrix_error("unavailable", StatusCode::SERVICE_UNAVAILABLE, "M_UNKNOWN", &error);
    }
    ctx.recent.lock().unwrap_or_else(|e| e.into_inner()).insert(txn_key);
    ctx.metrics
        .latency
        .with_label_values(&[matrix::PLATFORM])
        .observe(started.elapsed().as_secs_f64());
    matrix_ok("ok")
}

impl Ctx {
    fn count_event(&self, platform: &str, result: &str) {
        self.metrics.events.with_label_values(&[platform, result]).inc();
    }

    fn count_request(&self, platform: &str, result: &str) {
        self.metrics.requests.with_label_values(&[platform, result]).inc();
    }

    /// Publishes one event and waits, at most [`CONFIRM_BOUND`], for its confirm.
    async fn publish(&self, event: &ChatEvent) -> Result<(), String> {
        let link = self.link.borrow().clone().ok_or("no broker connection")?;
        if link.connection.status().blocked() {
            return Err("the broker is blocking publishes (a resource alarm)".into());
        }
        let body = serde_json::to_vec(event).map_err(|e| e.to_string())?;
        let key = channel_key(&event.team_id, &event.channel_id);
        let publish = link
            .publisher
            .publish(&self.exchange, &key, &body, broker::persistent_json());
        match tokio::time::timeout(CONFIRM_BOUND, publish).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err(format!("no confirm from the broker within {CONFIRM_BOUND:?}")),
        }
    }
}

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The ids of the events published lately, oldest forgotten first.
struct RecentIds {
    ids: HashSet<String>,
    order: VecDeque<String>,
    capacity: usize,
}

impl RecentIds {
    fn new(capacity: usize) -> Self {
        RecentIds {
            ids: HashSet::new(),
            order: VecDeque::new(),
            capacity,
        }
    }

    fn contains(&self, id: &str) -> bool {
        self.ids.contains(id)
    }

    fn insert(&mut self, id: String) {
        if !self.ids.insert(id.clone()) {
            return;
        }
        self.order.push_back(id);
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_ids_are_bounded() {
        let mut r = RecentIds::new(2);
        for id in ["a", "b", "c"] {
            r.insert(id.into());
        }
        assert!(!r.contains("a") && r.contains("b") && r.contains("c"));
        r.insert("c".into());
        assert_eq!(r.order.len(), 2);
    }
}
