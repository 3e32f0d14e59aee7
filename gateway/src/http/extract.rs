//! Extractors whose rejections come out in the API's error shape with stable codes
//! (axum's own rejections would answer in plain text).

use std::collections::HashMap;

use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use wa_api::{ErrorCode, SessionName};

use crate::error::ApiError;

/// A JSON body: 415 without a JSON content type, 413 over the route's body limit, 400
/// INVALID_JSON when it does not parse into `T`.
pub struct JsonBody<T>(pub T);

/// Like [`JsonBody`], but an empty body (no content at all) means `T::default()`.
pub struct OptionalJsonBody<T>(pub T);

pub fn is_json(content_type: Option<&str>) -> bool {
    content_type
        .and_then(|ct| ct.split(';').next())
        .map(|essence| {
            let essence = essence.trim().to_ascii_lowercase();
            essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
        })
        .unwrap_or(false)
}

pub fn content_type(req_headers: &axum::http::HeaderMap) -> Option<&str> {
    req_headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok())
}

/// Reads the body under the route's limit (set with `DefaultBodyLimit`).
pub async fn body_bytes<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    Bytes::from_request(req, state).await.map_err(|e| {
        if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(ErrorCode::PayloadTooLarge, "the request body is larger than this route accepts")
        } else {
            ApiError::new(ErrorCode::InvalidRequest, format!("could not read the request body: {}", e.body_text()))
        }
    })
}

/// Parses a JSON object body. Other JSON values are refused even where serde would read
/// them (it reads arrays into structs), so the API takes exactly what its schema says.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_some_and(|b| *b != b'{') {
        return Err(ApiError::new(ErrorCode::InvalidJson, "the body must be a JSON object"));
    }
    let err = match serde_json::from_slice(bytes) {
        Ok(v) => return Ok(v),
        Err(e) => e,
    };
    // JSON has one number type: `5.0` is the integer 5 to JSON Schema (and to clients written
    // in languages without integers), so integral floats are read as integers.
    if err.classify() == serde_json::error::Category::Data && err.to_string().contains("floating point") {
        if let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(bytes) {
            integral_floats_to_integers(&mut v);
            if let Ok(t) = serde_json::from_value(v) {
                return Ok(t);
            }
        }
    }
    Err(err).map_err(|e: serde_json::Error| {
        let what = match e.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => "the body is not valid JSON",
            _ => "the body does not have the expected shape",
        };
        ApiError::new(ErrorCode::InvalidJson, format!("{what}: {e}"))
    })
}

fn integral_floats_to_integers(v: &mut serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::Number(n) if n.is_f64() => {
            if let Some(f) = n.as_f64() {
                if f.fract() == 0.0 && f.abs() < 9.0e15 {
                    *v = Value::from(f as i64);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(integral_floats_to_integers),
        Value::Object(map) => map.values_mut().for_each(integral_floats_to_integers),
        _ => {}
    }
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json(content_type(req.headers())) {
            return Err(ApiError::new(ErrorCode::UnsupportedMediaType, "send the body as application/json"));
        }
        let bytes = body_bytes(req, state).await?;
        parse_json(&bytes).map(JsonBody)
    }
}

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for OptionalJsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let ct = content_type(req.headers()).map(str::to_owned);
        let bytes = body_bytes(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJsonBody(T::default()));
        }
        if !is_json(ct.as_deref()) {
            return Err(ApiError::new(ErrorCode::UnsupportedMediaType, "send the body as application/json"));
        }
        parse_json(&bytes).map(OptionalJsonBody)
    }
}

/// Query parameters: 400 INVALID_REQUEST when they do not parse.
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(v)| QueryParams(v))
            .map_err(|e| ApiError::new(ErrorCode::InvalidRequest, format!("bad query parameters: {}", e.body_text())))
    }
}

/// The path parameters by name (percent-decoded).
pub struct PathParams(pub HashMap<String, String>);

impl<S: Send + Sync> FromRequestParts<S> for PathParams {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map(|Path(m)| PathParams(m))
            .map_err(|e| ApiError::new(ErrorCode::InvalidRequest, format!("bad path: {}", e.body_text())))
    }
}

impl PathParams {
    /// The `{name}` parameter as a session name: 422 INVALID_SESSION_NAME when it is not one.
    pub fn session(&self) -> Result<SessionName, ApiError> {
        self.session_param("name")
    }

    pub fn session_param(&self, param: &str) -> Result<SessionName, ApiError> {
        let raw = self.0.get(param).map(String::as_str).unwrap_or("");
        raw.parse()
            .map_err(|e: wa_api::ids::IdError| ApiError::new(ErrorCode::InvalidSessionName, e.to_string()))
    }

    /// Another parameter, which must be a sensible id (1-128 visible ASCII characters).
    pub fn id(&self, param: &str, not_found: ErrorCode) -> Result<String, ApiError> {
        let raw = self.0.get(param).map(String::as_str).unwrap_or("");
        if raw.is_empty() || raw.len() > 128 || !raw.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ApiError::new(not_found, format!("no such {param}")));
        }
        Ok(raw.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types() {
        for ok in ["application/json", "application/json; charset=utf-8", "Application/JSON", "application/merge-patch+json"] {
            assert!(is_json(Some(ok)), "{ok}");
        }
        for bad in ["text/plain", "multipart/form-data; boundary=x", "application/jsonx", ""] {
            assert!(!is_json(Some(bad)), "{bad}");
        }
        assert!(!is_json(None));
    }

    #[test]
    fn json_errors_are_400_invalid_json() {
        let e = parse_json::<wa_api::pod::SendRequest>(b"{").unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidJson);
        let e = parse_json::<wa_api::pod::ScanRequest>(b"[null, null]").unwrap_err();
        assert_eq!((e.code, e.message.as_str()), (ErrorCode::InvalidJson, "the body must be a JSON object"));
        let e = parse_json::<wa_api::pod::SendRequest>(br#"{"to": 5}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidJson);
        assert!(e.message.contains("expected shape"), "{}", e.message);
        let d: wa_api::pod::DisconnectRequest = parse_json(br#"{"seconds": 5.0}"#).unwrap();
        assert_eq!(d.seconds, Some(5));
        let e = parse_json::<wa_api::pod::DisconnectRequest>(br#"{"seconds": 5.5}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidJson);
    }
}
