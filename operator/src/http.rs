//! The operator's own HTTP port (`--metrics-addr`): `/metrics`, `/healthz`, `/readyz`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use wa_api::{ErrorBody, ErrorCode};

use crate::metrics::Metrics;

/// What `/readyz` answers from.
#[derive(Debug, Default)]
pub struct Health {
    /// The last call to the Kubernetes API (a lease round, or start-up) got an answer.
    api_reachable: AtomicBool,
}

impl Health {
    pub fn set_api_reachable(&self, ok: bool) {
        self.api_reachable.store(ok, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.api_reachable.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// The router; tests drive it with `oneshot`, `run` serves it.
pub fn app(metrics: Arc<Metrics>, health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_route))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                Json(ErrorBody::new(ErrorCode::NotFound, "no such route")),
            )
                .into_response()
        })
        .with_state(AppState { metrics, health })
}

async fn metrics_route(State(s): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

/// Ready means "can talk to the API server". A standby replica is ready too: it is healthy
/// and waiting for the lease, and a rolling update must not stall on it.
async fn readyz(State(s): State<AppState>) -> Response {
    if s.health.is_ready() {
        let role = if s.metrics.is_leader() {
            "leader"
        } else {
            "standby"
        };
        (StatusCode::OK, format!("ok ({role})")).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(ErrorBody::new(
                ErrorCode::Unavailable,
                "the Kubernetes API server has not answered yet",
            )),
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    async fn get(app: &Router, path: &str) -> (StatusCode, String, Option<String>) {
        let resp = app
            .clone()
            .oneshot(axum::http::Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let ct = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned());
        let body = String::from_utf8(
            resp.into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .to_vec(),
        )
        .unwrap();
        (status, body, ct)
    }

    #[tokio::test]
    async fn routes() {
        let metrics = Arc::new(Metrics::default());
        let health = Arc::new(Health::default());
        let app = app(metrics.clone(), health.clone());
        assert_eq!(get(&app, "/healthz").await.0, StatusCode::OK);
        let (status, body, _) = get(&app, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("\"UNAVAILABLE\""), "{body}");
        health.set_api_reachable(true);
        assert_eq!(get(&app, "/readyz").await.1, "ok (standby)");
        metrics.set_leader(true);
        assert_eq!(get(&app, "/readyz").await.1, "ok (leader)");
        let (status, body, ct) = get(&app, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            ct.as_deref(),
            Some("text/plain; version=0.0.4; charset=utf-8")
        );
        assert!(body.contains("wa_operator_leader 1"), "{body}");
        let (status, body, _) = get(&app, "/nope").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(body.contains("\"NOT_FOUND\""), "{body}");
    }
}
