//! The stage's operations listener: `/metrics`, `/healthz`, `/readyz`.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::broker::Health;

#[derive(Clone)]
struct Ops {
    registry: Registry,
    health: Health,
}

/// Binds `addr` (so a taken port fails the start, not later) and serves until
/// `shutdown`. Returns the bound address, which matters when the port was 0.
pub async fn serve(
    addr: SocketAddr,
    registry: Registry,
    health: Health,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(Ops { registry, health });
    let handle = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    });
    Ok((bound, handle))
}

async fn metrics(State(ops): State<Ops>) -> impl IntoResponse {
    let mut body = Vec::new();
    let encoder = TextEncoder::new();
    match encoder.encode(&ops.registry.gather(), &mut body) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, encoder.format_type().to_owned())],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain".to_owned())],
            e.to_string().into_bytes(),
        ),
    }
}

async fn readyz(State(ops): State<Ops>) -> impl IntoResponse {
    if ops.health.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no broker connection or not consuming\n",
        )
    }
}
