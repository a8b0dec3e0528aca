//! The HTTP port: `/metrics` (Prometheus text format) and `/health`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

/// What the HTTP handlers read.
pub(crate) trait HttpState: Send + Sync + 'static {
    /// The `/metrics` body.
    fn metrics_text(&self) -> String;
    /// `Ok(detail)` when the node serves, `Err(reason)` otherwise.
    fn health(&self) -> Result<String, String>;
}

/// Serves `/metrics` and `/health` on `listener` (plain TCP, or TLS streams) until `shutdown` resolves.
pub(crate) async fn serve<S: HttpState, L>(
    listener: L,
    state: Arc<S>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let app = Router::new()
        .route("/metrics", get(metrics::<S>))
        .route("/health", get(health::<S>))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics<S: HttpState>(State(state): State<Arc<S>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics_text(),
    )
}

async fn health<S: HttpState>(State(state): State<Arc<S>>) -> impl IntoResponse {
    match state.health() {
        Ok(detail) => (StatusCode::OK, format!("ok {detail}\n")),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy: {reason}\n"),
        ),
    }
}

/// Binds the HTTP address; the error names it.
pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|error| {
        std::io::Error::new(
            error.kind(),
            format!("binding http address {addr}: {error}"),
        )
    })
}
