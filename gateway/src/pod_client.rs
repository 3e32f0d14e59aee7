//! Calls to a session pod's internal API (`wa_api::pod`), with its bearer token.
//!
//! Errors the pod answers in the shared error shape keep their code (the pod and the gateway
//! speak the same codes); a pod that cannot be reached is `SESSION_NOT_READY` with
//! `Retry-After`, one that does not answer in time is `TIMEOUT`.

use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use serde::Serialize;
use serde::de::DeserializeOwned;
use wa_api::pod::{IDEMPOTENCY_KEY_HEADER, PodStatus, SendResponse};
use wa_api::{ErrorBody, ErrorCode};

use crate::directory::Route;
use crate::error::ApiError;

/// Why a call to a pod failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodError {
    /// The pod answered with an error in the shared shape (or a status we map to one).
    Refused(ApiError),
    /// No connection (pod gone, restarting, wrong address).
    Unreachable(String),
    /// Connected, but no answer in time; the pod may have acted.
    Timeout,
}

impl PodError {
    pub fn into_api(self, session: &str) -> ApiError {
        match self {
            PodError::Refused(e) => e,
            PodError::Unreachable(why) => ApiError::not_ready(session, &format!("its pod cannot be reached ({why})")),
            PodError::Timeout => ApiError::new(ErrorCode::Timeout, format!("session {session:?} did not answer in time")),
        }
    }

    pub fn reason(&self) -> String {
        match self {
            PodError::Refused(e) => e.message.clone(),
            PodError::Unreachable(why) => format!("session pod unreachable: {why}"),
            PodError::Timeout => "session pod did not answer in time".into(),
        }
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            PodError::Refused(e) => e.code,
            PodError::Unreachable(_) => ErrorCode::SessionNotReady,
            PodError::Timeout => ErrorCode::Timeout,
        }
    }
}

/// Pod calls other than sends (status, QR, pairing, restart, sandbox) answer at once; a pod
/// that takes longer than this is treated as not answering.
const MANAGE_TIMEOUT: Duration = Duration::from_secs(8);

#[derive(Clone, Debug)]
pub struct PodClient {
    http: reqwest::Client,
    send_timeout: Duration,
}

/// What `GET /v1/qr` answered.
#[derive(Debug, Clone)]
pub struct PodBytes {
    pub content_type: String,
    pub body: Bytes,
}

impl PodClient {
    pub fn new(send_timeout: Duration) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            .tcp_nodelay(true)
            .no_proxy()
            .build()?;
        Ok(PodClient { http, send_timeout })
    }

    /// `POST /v1/messages` with the gateway's message id as the `Idempotency-Key`, so a
    /// repeated forward of the same message is answered from the pod's record, not sent again.
    pub async fn send(&self, route: &Route, payload: &str, message_id: &str) -> Result<SendResponse, PodError> {
        let req = self
            .http
            .post(format!("{}/v1/messages", route.base_url))
            .header(AUTHORIZATION, format!("Bearer {}", route.token))
            .header(CONTENT_TYPE, "application/json")
            .header(IDEMPOTENCY_KEY_HEADER, message_id)
            .timeout(self.send_timeout)
            .body(payload.to_owned());
        json_answer(req).await
    }

    /// `GET /v1/status`, optionally as a long poll.
    pub async fn status(&self, route: &Route, after: Option<u64>, wait_seconds: Option<u32>) -> Result<PodStatus, PodError> {
        let mut url = format!("{}/v1/status", route.base_url);
        let wait = wait_seconds.unwrap_or(0);
        if let Some(v) = after {
            url.push_str(&format!("?after={v}&waitSeconds={wait}"));
        }
        let req = self
            .http
            .get(url)
            .header(AUTHORIZATION, format!("Bearer {}", route.token))
            .timeout(Duration::from_secs(u64::from(wait) + 5));
        json_answer(req).await
    }

    /// `GET /v1/qr` in the format `accept` names.
    pub async fn qr(&self, route: &Route, accept: &str) -> Result<PodBytes, PodError> {
        let req = self
            .http
            .get(format!("{}/v1/qr", route.base_url))
            .header(AUTHORIZATION, format!("Bearer {}", route.token))
            .header(ACCEPT, accept)
            .timeout(MANAGE_TIMEOUT);
        let resp = req.send().await.map_err(transport)?;
        if !resp.status().is_success() {
            return Err(refused(resp).await);
        }
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/octet-stream")
            .to_owned();
        let body = resp.bytes().await.map_err(transport)?;
        Ok(PodBytes { content_type, body })
    }

    /// A POST with a JSON body (or none) and a JSON answer.
    pub async fn post<B: Serialize + ?Sized, T: DeserializeOwned>(&self, route: &Route, path: &str, body: Option<&B>) -> Result<T, PodError> {
        let mut req = self
            .http
            .post(format!("{}{path}", route.base_url))
            .header(AUTHORIZATION, format!("Bearer {}", route.token))
            .timeout(MANAGE_TIMEOUT);
        req = match body {
            Some(b) => req.json(b),
            None => req.header(CONTENT_TYPE, "application/json").body("{}"),
        };
        json_answer(req).await
    }

    /// `GET /metrics` (Prometheus text).
    pub async fn metrics(&self, route: &Route, timeout: Duration) -> Result<String, PodError> {
        let resp = self
            .http
            .get(format!("{}/metrics", route.base_url))
            .header(AUTHORIZATION, format!("Bearer {}", route.token))
            .timeout(timeout)
            .send()
            .await
            .map_err(transport)?;
        if !resp.status().is_success() {
            return Err(refused(resp).await);
        }
        resp.text().await.map_err(transport)
    }

    /// Whether `GET /readyz` answers 200.
    pub async fn ready(&self, base_url: &str) -> bool {
        matches!(
            self.http.get(format!("{base_url}/readyz")).timeout(Duration::from_secs(2)).send().await,
            Ok(r) if r.status().is_success()
        )
    }
}

async fn json_answer<T: DeserializeOwned>(req: reqwest::RequestBuilder) -> Result<T, PodError> {
    let resp = req.send().await.map_err(transport)?;
    if !resp.status().is_success() {
        return Err(refused(resp).await);
    }
    let body = resp.bytes().await.map_err(transport)?;
    serde_json::from_slice(&body).map_err(|e| {
        tracing::error!(error = %e, "session pod answered with an unexpected body");
        PodError::Refused(ApiError::new(ErrorCode::Unavailable, "the session pod answered with an unexpected body").with_retry_after(2))
    })
}

fn transport(e: reqwest::Error) -> PodError {
    if e.is_timeout() {
        PodError::Timeout
    } else if e.is_connect() {
        PodError::Unreachable("connection refused".into())
    } else if e.is_body() || e.is_decode() || e.is_request() {
        PodError::Unreachable("connection lost".into())
    } else {
        PodError::Unreachable(e.to_string())
    }
}

/// Maps a pod's error answer: its code and message pass through (same codes); an auth
/// failure is our misconfiguration, not the client's, so it becomes UNAVAILABLE.
async fn refused(resp: reqwest::Response) -> PodError {
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u32>().ok());
    let body = resp.bytes().await.unwrap_or_default();
    if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
        tracing::error!(%status, "the session pod refused the gateway's token");
        return PodError::Refused(ApiError::unavailable("the gateway could not authenticate to the session's pod"));
    }
    let mut err = match serde_json::from_slice::<ErrorBody>(&body) {
        Ok(b) => ApiError::new(b.error.code, b.error.message),
        Err(_) => {
            let code = match status.as_u16() {
                404 => ErrorCode::NotFound,
                413 => ErrorCode::PayloadTooLarge,
                429 => ErrorCode::RateLimited,
                503 => ErrorCode::SessionNotReady,
                504 => ErrorCode::Timeout,
                400..=499 => ErrorCode::ValidationFailed,
                _ => ErrorCode::SendFailed,
            };
            ApiError::new(code, format!("the session pod answered HTTP {status}"))
        }
    };
    if err.code == ErrorCode::Internal {
        // The pod's own bug: the client gets a retryable 503, not a 500 blamed on the gateway.
        err = ApiError::unavailable(format!("the session pod failed: {}", err.message));
    }
    err.retry_after = retry_after.or(err.retry_after);
    if matches!(err.code, ErrorCode::RateLimited | ErrorCode::SessionNotReady | ErrorCode::Unavailable) && err.retry_after.is_none() {
        err.retry_after = Some(1);
    }
    PodError::Refused(err)
}
