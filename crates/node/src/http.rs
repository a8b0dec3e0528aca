//! The HTTP port: the status page at `/` and its data at `/status.json`, `/metrics`
//! (OpenMetrics text) and `/health`. With `[tls]`, each request is checked against the
//! certificate its connection presented ([`crate::auth::required_http`]).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::serve::{IncomingStream, Listener};

use crate::auth::{decide_for, required_http};
use crate::metrics::AuthRefusals;
use crate::tls::TlsListener;

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

/// Who may read what on the HTTP port with `[tls]`: the member ids, and where refusals are
/// counted (with the gRPC port's).
#[derive(Debug)]
pub(crate) struct HttpAuth {
    /// The configured member ids: a certificate naming one may read everything.
    pub(crate) members: HashSet<String>,
    /// `propd_auth_refusals_total`.
    pub(crate) refusals: AuthRefusals,
}

/// The certificate a connection of the HTTP port presented, if any.
#[derive(Debug, Clone, Default)]
pub(crate) struct Caller {
    leaf: Option<Arc<[u8]>>,
}

impl Connected<IncomingStream<'_, TlsListener>> for Caller {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        let certs = stream.io().get_ref().1.peer_certificates();
        Caller {
            leaf: certs
                .and_then(|certs| certs.first())
                .map(|cert| Arc::from(cert.as_ref())),
        }
    }
}

/// Serves the HTTP port on plain TCP `listener` until `shutdown` resolves.
pub(crate) async fn serve<S: HttpState, L>(
    listener: L,
    state: Arc<S>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    L: Listener,
    L::Addr: std::fmt::Debug,
{
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Serves the HTTP port on TLS `listener` until `shutdown` resolves, checking every request
/// against its connection's certificate.
pub(crate) async fn serve_tls<S: HttpState>(
    listener: TlsListener,
    state: Arc<S>,
    auth: Arc<HttpAuth>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(state).layer(axum::middleware::from_fn_with_state(auth, check));
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<Caller>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

fn router<S: HttpState>(state: Arc<S>) -> Router {
    Router::new()
        .route("/", get(status_page))
        .route("/status.json", get(status_json::<S>))
        .route("/metrics", get(metrics::<S>))
        .route("/health", get(health::<S>))
        .with_state(state)
}

/// Lets a request through when its connection's certificate may read the path; otherwise
/// answers 401 (no certificate) or 403 (not a member, too small a role), naming what is
/// missing, and counts the refusal.
async fn check(
    State(auth): State<Arc<HttpAuth>>,
    ConnectInfo(caller): ConnectInfo<Caller>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path().to_owned();
    let Some(needed) = required_http(&path) else {
        return next.run(request).await;
    };
    let what = format!("GET {path}");
    match decide_for(&what, needed, &auth.members, caller.leaf.as_deref()) {
        Ok(()) => next.run(request).await,
        Err(status) => {
            auth.refusals.inc(status.code());
            tracing::info!(path, code = ?status.code(), message = status.message(), "HTTP request refused");
            let code = match status.code() {
                tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
                _ => StatusCode::FORBIDDEN,
            };
            (code, format!("{}\n", status.message())).into_response()
        }
    }
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
