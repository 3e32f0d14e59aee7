//! The one JSON error shape every wa-operator HTTP API answers with, and its stable codes.
//!
//! `{"error": {"code": "SESSION_NOT_READY", "message": "…"}}`. Codes are part of the API:
//! clients branch on them, so a code is never renamed or reused for another meaning.

use serde::{Deserialize, Serialize};

/// A stable, machine-readable error code and the HTTP status it is answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    /// The body is not valid JSON or does not have the expected shape. 400
    InvalidJson,
    /// A query parameter, header or multipart field is malformed. 400
    InvalidRequest,
    /// Missing, malformed, unknown or revoked credentials. 401
    Unauthorized,
    /// The credentials are valid but do not allow this. 403
    Forbidden,
    /// No such route. 404
    NotFound,
    /// No such session. 404
    SessionNotFound,
    /// No such message. 404
    MessageNotFound,
    /// No such API key or webhook. 404
    KeyNotFound,
    WebhookNotFound,
    /// Wrong method on an existing route. 405
    MethodNotAllowed,
    /// The session already exists. 409
    SessionExists,
    /// The session is up but not connected to WhatsApp (awaiting scan, logged out, …). 409
    SessionNotConnected,
    /// The session is already paired; a QR or pair code makes no sense now. 409
    AlreadyPaired,
    /// An `Idempotency-Key` was reused with a different request. 409
    IdempotencyConflict,
    /// The request body is larger than allowed, or media is over the cap. 413
    PayloadTooLarge,
    MediaTooLarge,
    /// Content type not accepted for this route, or media type not supported. 415
    UnsupportedMediaType,
    /// The recipient is not a valid phone number or JID. 422
    InvalidRecipient,
    /// The phone number is not valid E.164. 422
    InvalidPhoneNumber,
    /// The session name is not a valid DNS label. 422
    InvalidSessionName,
    /// The text of a text message is empty. 422
    EmptyText,
    /// The request is well-formed JSON but semantically invalid. 422
    ValidationFailed,
    /// The recipient is a valid number, but it has no WhatsApp account; nothing was sent.
    /// Retrying does not help. 422
    RecipientNotOnWhatsapp,
    /// Too many requests; see `Retry-After`. 429
    RateLimited,
    /// No QR code is available right now (not pairing, or between codes). 409
    QrNotAvailable,
    /// The session's pod is not ready to take requests; see `Retry-After`. 503
    SessionNotReady,
    /// A dependency (database, pod) is unavailable; see `Retry-After`. 503
    Unavailable,
    /// The gateway is answering as many requests as it is configured to; this one was refused
    /// before anything was done or recorded. Retry after `Retry-After`. 503
    Overloaded,
    /// WhatsApp (or the engine) refused or failed the send. 502
    SendFailed,
    /// A retry (same `Idempotency-Key`) of a send whose first attempt was cut off by a crash
    /// or a timeout: the message may or may not have reached WhatsApp. It is not sent again,
    /// because sending twice is worse than asking; check with the recipient or send it
    /// anew under a new key. 502
    SendOutcomeUnknown,
    /// The upstream did not answer in time. 504
    Timeout,
    /// A bug or an unexpected failure; details are in the server log only. 500
    Internal,
}

impl ErrorCode {
    /// The HTTP status this code is answered with.
    pub fn status(self) -> u16 {
        use ErrorCode::*;
        match self {
            InvalidJson | InvalidRequest => 400,
            Unauthorized => 401,
            Forbidden => 403,
            NotFound | SessionNotFound | MessageNotFound | KeyNotFound | WebhookNotFound => 404,
            MethodNotAllowed => 405,
            SessionExists | SessionNotConnected | AlreadyPaired | IdempotencyConflict
            | QrNotAvailable => 409,
            PayloadTooLarge | MediaTooLarge => 413,
            UnsupportedMediaType => 415,
            InvalidRecipient | InvalidPhoneNumber | InvalidSessionName | EmptyText
            | ValidationFailed | RecipientNotOnWhatsapp => 422,
            RateLimited => 429,
            Internal => 500,
            SendFailed | SendOutcomeUnknown => 502,
            SessionNotReady | Unavailable | Overloaded => 503,
            Timeout => 504,
        }
    }

    /// The code as it appears on the wire, e.g. `SESSION_NOT_READY`.
    pub fn as_str(self) -> &'static str {
        use ErrorCode::*;
        match self {
            InvalidJson => "INVALID_JSON",
            InvalidRequest => "INVALID_REQUEST",
            Unauthorized => "UNAUTHORIZED",
            Forbidden => "FORBIDDEN",
            NotFound => "NOT_FOUND",
            SessionNotFound => "SESSION_NOT_FOUND",
            MessageNotFound => "MESSAGE_NOT_FOUND",
            KeyNotFound => "KEY_NOT_FOUND",
            WebhookNotFound => "WEBHOOK_NOT_FOUND",
            MethodNotAllowed => "METHOD_NOT_ALLOWED",
            SessionExists => "SESSION_EXISTS",
            SessionNotConnected => "SESSION_NOT_CONNECTED",
            AlreadyPaired => "ALREADY_PAIRED",
            IdempotencyConflict => "IDEMPOTENCY_CONFLICT",
            PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            MediaTooLarge => "MEDIA_TOO_LARGE",
            UnsupportedMediaType => "UNSUPPORTED_MEDIA_TYPE",
            InvalidRecipient => "INVALID_RECIPIENT",
            InvalidPhoneNumber => "INVALID_PHONE_NUMBER",
            InvalidSessionName => "INVALID_SESSION_NAME",
            EmptyText => "EMPTY_TEXT",
            ValidationFailed => "VALIDATION_FAILED",
            RecipientNotOnWhatsapp => "RECIPIENT_NOT_ON_WHATSAPP",
            RateLimited => "RATE_LIMITED",
            QrNotAvailable => "QR_NOT_AVAILABLE",
            SessionNotReady => "SESSION_NOT_READY",
            Unavailable => "UNAVAILABLE",
            Overloaded => "OVERLOADED",
            SendFailed => "SEND_FAILED",
            SendOutcomeUnknown => "SEND_OUTCOME_UNKNOWN",
            Timeout => "TIMEOUT",
            Internal => "INTERNAL",
        }
    }

    /// Every code, for documentation and for tests that check the list is complete.
    pub const ALL: &'static [ErrorCode] = {
        use ErrorCode::*;
        &[
            InvalidJson, InvalidRequest, Unauthorized, Forbidden, NotFound, SessionNotFound,
            MessageNotFound, KeyNotFound, WebhookNotFound, MethodNotAllowed, SessionExists,
            SessionNotConnected, AlreadyPaired, IdempotencyConflict, PayloadTooLarge,
            MediaTooLarge, UnsupportedMediaType, InvalidRecipient, InvalidPhoneNumber,
            InvalidSessionName, EmptyText, ValidationFailed, RecipientNotOnWhatsapp, RateLimited,
            QrNotAvailable, SessionNotReady, Unavailable, Overloaded, SendFailed, SendOutcomeUnknown, Timeout,
            Internal,
        ]
    };
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            error: ErrorDetail {
                code,
                message: message.into(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_match_serde() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_string(code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            let back: ErrorCode = serde_json::from_str(&json).unwrap();
            assert_eq!(back, *code);
        }
    }

    /// `ALL` is written by hand; the derived schema lists every variant, so a code added to
    /// the enum but not to `ALL` (and so missing from docs and coverage checks) fails here.
    #[test]
    fn all_lists_every_code_once() {
        // schemars writes the values as `enum` lists and `const`s inside `oneOf` (variants with
        // docs get their own entry); collect every one of them.
        fn values(v: &serde_json::Value, out: &mut Vec<String>) {
            if let Some(c) = v["const"].as_str() {
                out.push(c.to_owned());
            }
            for e in v["enum"].as_array().into_iter().flatten() {
                out.extend(e.as_str().map(str::to_owned));
            }
            for sub in v["oneOf"].as_array().into_iter().flatten() {
                values(sub, out);
            }
        }
        let schema = serde_json::to_value(schemars::schema_for!(ErrorCode)).unwrap();
        let mut from_schema = Vec::new();
        values(&schema, &mut from_schema);
        let mut listed: Vec<String> = ErrorCode::ALL.iter().map(|c| c.as_str().to_owned()).collect();
        from_schema.sort();
        listed.sort();
        assert_eq!(listed, from_schema);
    }

    #[test]
    fn statuses_are_client_or_server_errors() {
        for code in ErrorCode::ALL {
            assert!((400..600).contains(&code.status()), "{code}");
        }
    }

    #[test]
    fn body_shape() {
        let body = ErrorBody::new(ErrorCode::SessionNotReady, "pod starting");
        assert_eq!(
            serde_json::to_value(&body).unwrap(),
            serde_json::json!({"error": {"code": "SESSION_NOT_READY", "message": "pod starting"}})
        );
    }
}
