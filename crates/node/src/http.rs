//! The HTTP port: the status page at `/` and its data at `/status.json`, `/metrics`
//! (OpenMetrics text) and `/health`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse};
use axum::routing::get;

/// The status page: static HTML and script that draw `/status.json` and refresh themselves.
const STATUS_PAGE: &str = include_str!("status_page.html");

/// What the HTTP handlers read.
pub(crate) trait HttpState: Send + Sync + 'static {
    /// The `/metrics` body.
    fn metrics_text(&self) -> impl Future<Output = String> + Send;
    /// The `/status.json` body, or why it cannot be given.
    fn status_json(&self) -> impl Future<Output = Result<String, String>> + Send;
    /// `Ok(detail)` when the node serves, `Err(reason)` otherwise.
    fn health(&self) -> Result<String, String>;
}

/// Serves the HTTP port on `listener` (plain TCP, or TLS streams) until `shutdown` resolves.
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
        .route("/", get(status_page))
        .route("/status.json", get(status_json::<S>))
        .route("/metrics", get(metrics::<S>))
        .route("/health", get(health::<S>))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn status_page() -> Html<&'static str> {
    Html(STATUS_PAGE)
}

async fn status_json<S: HttpState>(State(state): State<Arc<S>>) -> impl IntoResponse {
    match state.status_json().await {
        Ok(json) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            json,
        ),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("status unavailable: {reason}\n"),
        ),
    }
}

async fn metrics<S: HttpState>(State(state): State<Arc<S>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        state.metrics_text().await,
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
