//! What every service shares: JSON errors, request extractors that answer bad input with those
//! errors, the forwarded identity, Prometheus metrics, structured logs and graceful serving.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use serde::de::DeserializeOwned;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

/// An error answered as `{"error": "...", "status": N}` with that status.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status sent.
    pub status: StatusCode,
    /// A short, client-safe message.
    pub message: String,
}

impl ApiError {
    /// An error with `status` and `message`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    /// 400 with `message`.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    /// 404 with `message`.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.message, "status": self.status.as_u16() });
        (self.status, Json(body)).into_response()
    }
}

/// Database and other internal failures: logged in full, answered as a bare 500.
impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> ApiError {
        tracing::error!(error = %e, "database error");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> ApiError {
        tracing::error!(error = %e, "internal error");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
    }
}

/// Handler result.
pub type ApiResult<T> = Result<T, ApiError>;

/// A JSON body whose rejections (bad JSON, wrong content type, too large) are JSON errors.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    ApiError::new(rejection.status(), rejection.body_text())
}

/// Query parameters whose rejections are JSON errors.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(q) => Ok(ApiQuery(q.0)),
            Err(rejection) => Err(query_rejection(rejection)),
        }
    }
}

fn query_rejection(rejection: QueryRejection) -> ApiError {
    ApiError::new(rejection.status(), rejection.body_text())
}

/// The caller's identity, as the gateway forwards it after checking the token
/// (`X-User-Id`, `X-User-Role`). Requests without it are answered 401.
pub struct Identity {
    /// The user id (the token's `sub`).
    pub user_id: String,
    /// The role (the token's `role`), `user` when absent.
    pub role: String,
}

impl Identity {
    /// Whether the caller may act on `user_id`'s resources.
    pub fn may_access(&self, user_id: &str) -> bool {
        self.user_id == user_id || self.role == "admin"
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Identity {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let header = |name: &str| {
            parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty() && v.len() <= 128)
        };
        let Some(user_id) = header("x-user-id") else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "authentication required",
            ));
        };
        Ok(Identity {
            user_id: user_id.to_string(),
            role: header("x-user-role").unwrap_or("user").to_string(),
        })
    }
}

/// Request counters and latency histograms, served on `/metrics`.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
}

impl Metrics {
    /// Metrics labelled with `service`.
    pub fn new(service: &str) -> anyhow::Result<Metrics> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("http_requests_total", "HTTP requests served")
                .const_label("service", service),
            &["method", "route", "status"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new("http_request_duration_seconds", "Time to answer a request")
                .const_label("service", service),
            &["method", "route"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        Ok(Metrics {
            registry,
            requests,
            duration,
        })
    }

    fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Records one request; logs it at debug level.
async fn track(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let response = next.run(req).await;
    let status = response.status().as_u16();
    let elapsed = start.elapsed();
    metrics
        .requests
        .with_label_values(&[method.as_str(), &route, &status.to_string()])
        .inc();
    metrics
        .duration
        .with_label_values(&[method.as_str(), &route])
        .observe(elapsed.as_secs_f64());
    tracing::debug!(%method, route, status, micros = elapsed.as_micros() as u64, "request");
    response
}

/// What `X-Replica` says: the listening address, or the host name (the container's, in Docker)
/// when the address is a wildcard that every replica shares.
fn replica_name(listen: SocketAddr) -> String {
    let host = listen
        .ip()
        .is_unspecified()
        .then(|| std::fs::read_to_string("/etc/hostname").ok())
        .flatten()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty());
    match host {
        Some(host) => format!("{host}:{}", listen.port()),
        None => listen.to_string(),
    }
}

/// Adds `/health`, `/metrics`, a JSON 404 fallback, request metrics and the `X-Replica` header
/// (which replica answered) to `app`, then serves it on `listen` until SIGINT or SIGTERM, letting
/// requests in flight finish.
pub async fn serve(service: &'static str, listen: SocketAddr, app: Router) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new(service)?);
    let replica = HeaderValue::from_str(&replica_name(listen))?;
    let m = metrics.clone();
    let app =
        app.route_layer(axum::middleware::from_fn_with_state(metrics.clone(), track))
            .route(
                "/health",
                get(move || async move {
                    Json(serde_json::json!({"status": "ok", "service": service}))
                }),
            )
            .route("/metrics", get(move || async move { m.render() }))
            .fallback(|| async { ApiError::not_found("not found") })
            .layer(axum::middleware::from_fn(
                move |req: Request, next: Next| {
                    let replica = replica.clone();
                    async move {
                        let mut response = ends_with_newline(next.run(req).await).await;
                        response.headers_mut().insert("x-replica", replica);
                        response
                    }
                },
            ));
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(service, %listen, "listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    tracing::info!(service, "stopped");
    Ok(())
}

/// A JSON answer with a newline after it, as a terminal (and `curl`) shows best. The services'
/// answers are a few KiB at most; one that could not be read (over 1 MiB) would go out empty.
async fn ends_with_newline(response: axum::response::Response) -> axum::response::Response {
    let json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    match axum::body::to_bytes(body, 1 << 20).await {
        Ok(bytes) => {
            let mut with_newline = bytes.to_vec();
            if with_newline.last() != Some(&b'\n') {
                with_newline.push(b'\n');
            }
            parts.headers.remove(axum::http::header::CONTENT_LENGTH);
            axum::response::Response::from_parts(parts, axum::body::Body::from(with_newline))
        }
        Err(_) => axum::response::Response::from_parts(parts, axum::body::Body::empty()),
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Structured (JSON) logs on stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Now, as RFC 3339 UTC.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// A new random id.
pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}
