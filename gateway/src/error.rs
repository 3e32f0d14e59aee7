//! The one error type of the public API: `{"error":{"code","message"}}` with a stable code
//! from [`wa_api::ErrorCode`]. Internals go to the log, never to the client.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use wa_api::{ErrorBody, ErrorCode};

/// A refused or failed request, as the client will see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// Seconds for `Retry-After` (429 and 503 answers).
    pub retry_after: Option<u32>,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn with_retry_after(mut self, seconds: u32) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// An unexpected failure: the detail is logged here, the client sees only `INTERNAL`.
    pub fn internal(context: &str, err: impl std::fmt::Display) -> Self {
        tracing::error!(error = %err, "{context}");
        Self::new(ErrorCode::Internal, "internal error; see the gateway log")
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unauthorized, message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, message)
    }

    pub fn session_not_found(name: &str) -> Self {
        Self::new(ErrorCode::SessionNotFound, format!("no session named {name:?}"))
    }

    pub fn not_ready(name: &str, why: &str) -> Self {
        Self::new(
            ErrorCode::SessionNotReady,
            format!("session {name:?} is not ready: {why}"),
        )
        .with_retry_after(2)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unavailable, message).with_retry_after(2)
    }

    /// Whether a send refused with this error may be tried again with the same message:
    /// the pod did not take it (or may have, and deduplicates by the idempotency key).
    pub fn is_retriable(&self) -> bool {
        matches!(
            self.code,
            ErrorCode::RateLimited
                | ErrorCode::SessionNotConnected
                | ErrorCode::SessionNotReady
                | ErrorCode::SessionNotFound
                | ErrorCode::Unavailable
                | ErrorCode::Timeout
                | ErrorCode::Internal
        )
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut response = (status, axum::Json(ErrorBody::new(self.code, self.message))).into_response();
        let headers = response.headers_mut();
        if let Some(seconds) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.code == ErrorCode::Unauthorized {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        if e.is_unavailable() {
            tracing::warn!(error = %e, "database unavailable");
            Self::unavailable("the database is unavailable; try again shortly")
        } else {
            Self::internal("database error", e)
        }
    }
}

impl From<wa_api::pod::Invalid> for ApiError {
    fn from(e: wa_api::pod::Invalid) -> Self {
        Self::new(e.code, e.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn shape_status_and_headers() {
        let r = ApiError::not_ready("a", "pod starting").into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
        let body = r.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "SESSION_NOT_READY");

        let r = ApiError::unauthorized("no key").into_response();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(r.headers()[header::WWW_AUTHENTICATE], "Bearer");
    }

    #[test]
    fn every_code_has_a_status() {
        for code in ErrorCode::ALL {
            let e = ApiError::new(*code, "x");
            assert_eq!(e.status().as_u16(), code.status());
        }
    }
}
