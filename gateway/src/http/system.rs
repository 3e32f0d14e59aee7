//! Health, readiness, metrics, the OpenAPI document and the web page's assets.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::model::Health;
use crate::state::AppState;

pub async fn healthz() -> Json<Health> {
    Json(Health { status: "ok".into() })
}

/// Ready when the database answers and the directory has its initial view.
pub async fn readyz(State(gw): State<AppState>) -> Response {
    if !gw.directory.is_ready() {
        return (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "1")], Json(Health { status: "session directory is syncing".into() }))
            .into_response();
    }
    match tokio::time::timeout(std::time::Duration::from_secs(2), gw.store.ping()).await {
        Ok(Ok(())) => Json(Health { status: "ok".into() }).into_response(),
        _ => (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "1")], Json(Health { status: "database unavailable".into() }))
            .into_response(),
    }
}

pub async fn metrics(State(gw): State<AppState>) -> Response {
    let sessions: Vec<_> = gw.directory.list().into_iter().map(|s| (s.name, s.phase)).collect();
    let text = gw.metrics.render(gw.directory.namespace(), &sessions, gw.store.group_commit_stats());
    ([(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"))], text).into_response()
}

pub async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        crate::http::openapi_text(),
    )
        .into_response()
}

pub async fn index() -> Response {
    asset("text/html; charset=utf-8", crate::web::INDEX_HTML)
}

pub async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", crate::web::APP_JS)
}

pub async fn style_css() -> Response {
    asset("text/css; charset=utf-8", crate::web::STYLE_CSS)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'"),
            ),
        ],
        body,
    )
        .into_response()
}
