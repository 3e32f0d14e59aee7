//! The one error type of the HTTP API: a stable [`ErrorCode`], a message for the client, and
//! `Retry-After` where waiting helps. Internals go to the log, never to the client.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use wa_api::pod::Invalid;
use wa_api::{ErrorBody, ErrorCode};

use crate::engine::EngineError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    pub fn internal(context: &str, e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "{context}");
        Self::new(
            ErrorCode::Internal,
            "internal error; see the session pod's log",
        )
    }
}

impl From<Invalid> for ApiError {
    fn from(i: Invalid) -> Self {
        Self::new(i.code, i.message)
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::NotConnected(m) => Self::new(
                ErrorCode::SessionNotConnected,
                format!("session is not connected: {m}"),
            ),
            EngineError::AlreadyPaired => {
                Self::new(ErrorCode::AlreadyPaired, "the session is already paired")
            }
            // The engine cannot do this in its current state or with this input.
            EngineError::Refused(m) => Self::new(ErrorCode::ValidationFailed, m),
            // A fact about the recipient, not a failure of WhatsApp: retrying does not help.
            EngineError::NotOnWhatsapp(who) => Self::new(
                ErrorCode::RecipientNotOnWhatsapp,
                format!("{who} is not on WhatsApp; nothing was sent"),
            ),
            EngineError::Rejected(m) => {
                Self::new(ErrorCode::SendFailed, format!("whatsapp refused: {m}"))
            }
            EngineError::Timeout(m) => Self::new(ErrorCode::Timeout, format!("timed out: {m}")),
            EngineError::Internal(e) => Self::internal("engine error", format!("{e:#}")),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = ErrorBody::new(self.code, self.message);
        let mut resp = (status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body(resp: Response) -> serde_json::Value {
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn shape_status_and_headers() {
        let resp = ApiError::new(ErrorCode::RateLimited, "slow down")
            .retry_after(3)
            .into_response();
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "3");
        assert_eq!(
            body(resp).await,
            serde_json::json!({"error": {"code": "RATE_LIMITED", "message": "slow down"}})
        );
        let resp = ApiError::new(ErrorCode::Unauthorized, "no").into_response();
        assert_eq!(resp.headers()[header::WWW_AUTHENTICATE], "Bearer");
    }

    #[tokio::test]
    async fn engine_errors_map_to_stable_codes_without_leaking_internals() {
        let check = |e: EngineError, code: ErrorCode| assert_eq!(ApiError::from(e).code, code);
        check(
            EngineError::NotConnected("x".into()),
            ErrorCode::SessionNotConnected,
        );
        check(EngineError::AlreadyPaired, ErrorCode::AlreadyPaired);
        check(
            EngineError::Refused("x".into()),
            ErrorCode::ValidationFailed,
        );
        check(
            EngineError::NotOnWhatsapp("+15551234567".into()),
            ErrorCode::RecipientNotOnWhatsapp,
        );
        check(EngineError::Rejected("x".into()), ErrorCode::SendFailed);
        check(EngineError::Timeout("x".into()), ErrorCode::Timeout);
        let internal = ApiError::from(EngineError::Internal(anyhow::anyhow!(
            "secret path /data/keys"
        )));
        assert_eq!(internal.code, ErrorCode::Internal);
        assert!(!internal.message.contains("secret"));
    }
}
