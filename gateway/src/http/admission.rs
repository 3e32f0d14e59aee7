//! The in-flight limit of the API: at most `Settings::max_in_flight` API requests are being
//! answered at once; one more is refused at once with 503 `OVERLOADED` and `Retry-After`,
//! before its body is read, its key checked or anything recorded. Memory under overload is
//! then bounded by the limit, not by how long a stall lasts (without it, a 2,000-request
//! backlog kept the gateway's RSS 48 MiB higher for good: RELIABILITY.md, "Load and soak").
//!
//! Not counted: pod event deliveries (one batch at a time per pod, so bounded by the number
//! of sessions already, and refusing them would only delay status updates), health, metrics
//! and the OpenAPI document (probes and scrapes must keep working under overload).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wa_api::ErrorCode;

use crate::error::ApiError;
use crate::metrics::Metrics;

/// Seconds a refused client is asked to wait: a backlog of `max_in_flight` requests drains
/// in well under a second at the rates the gateway handles.
const RETRY_AFTER_SECONDS: u32 = 1;

/// The limit and what it reports to; one per router.
#[derive(Clone)]
pub struct Admission {
    permits: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

impl Admission {
    pub fn new(max_in_flight: usize, metrics: Arc<Metrics>) -> Self {
        Admission { permits: Arc::new(Semaphore::new(max_in_flight.max(1))), metrics }
    }
}

/// Whether a path is outside the limit (see the module documentation).
fn exempt(path: &str) -> bool {
    path.starts_with("/internal/") || matches!(path, "/healthz" | "/readyz" | "/metrics" | "/openapi.json")
}

/// Routes of the older gateways answer in their own error shape.
fn is_compat(path: &str) -> bool {
    path.starts_with("/api/")
}

pub async fn limit(State(admission): State<Admission>, req: Request, next: Next) -> Response {
    if exempt(req.uri().path()) {
        return next.run(req).await;
    }
    let Ok(permit) = admission.permits.clone().try_acquire_owned() else {
        admission.metrics.requests_shed.fetch_add(1, Ordering::Relaxed);
        let error = ApiError::new(ErrorCode::Overloaded, "the gateway is answering as many requests as it may; try again shortly")
            .with_retry_after(RETRY_AFTER_SECONDS);
        return if is_compat(req.uri().path()) {
            crate::http::compat::CompatError(error).into_response()
        } else {
            error.into_response()
        };
    };
    let in_flight = admission.metrics.requests_in_flight.fetch_add(1, Ordering::Relaxed) + 1;
    admission.metrics.requests_in_flight_peak.fetch_max(in_flight, Ordering::Relaxed);
    let _admitted = Admitted { _permit: permit, metrics: admission.metrics.clone() };
    next.run(req).await
}

/// Holds the permit until the answer is made, or the request is dropped (client gone).
struct Admitted {
    _permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.metrics.requests_in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_limit_counts() {
        for path in ["/v1/sessions/a/messages", "/v1/keys", "/api/v1/messages/send-text/", "/", "/assets/app.js"] {
            assert!(!exempt(path), "{path}");
        }
        for path in ["/internal/v1/events", "/healthz", "/readyz", "/metrics", "/openapi.json"] {
            assert!(exempt(path), "{path}");
        }
    }
}
