//! Calls to a session pod's internal API (`wa_api::pod`), with its bearer token.
//!
//! Errors the pod answers in the shared error shape keep their code (the pod and the gateway
//! speak the same codes); a pod that cannot be reached is `SESSION_NOT_READY` with
//! `Retry-After`, one that does not answer in time is `TIMEOUT`.
//!
//! Plain HTTP/1.1 over hyper's pooled client: pods are reached by address inside the
//! cluster (or on loopback in local mode), so there is no TLS, proxy or redirect to handle,
//! and a send pays only for the request it makes.

use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
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

const JSON: HeaderValue = HeaderValue::from_static("application/json");

#[derive(Clone, Debug)]
pub struct PodClient {
    http: Client<HttpConnector, Full<Bytes>>,
    send_timeout: Duration,
}

/// What `GET /v1/qr` answered.
#[derive(Debug, Clone)]
pub struct PodBytes {
    pub content_type: String,
    pub body: Bytes,
}

/// A pod's answer, read to its end.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl PodClient {
    pub fn new(send_timeout: Duration) -> anyhow::Result<Self> {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        connector.set_nodelay(true);
        let http = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            .build(connector);
        Ok(PodClient { http, send_timeout })
    }

    /// `POST /v1/messages` with the gateway's message id as the `Idempotency-Key`, so a
    /// repeated forward of the same message is answered from the pod's record, not sent again.
    pub async fn send(&self, route: &Route, payload: &str, message_id: &str) -> Result<SendResponse, PodError> {
        let req = request(Method::POST, route, "/v1/messages")
            .header(CONTENT_TYPE, JSON)
            .header(IDEMPOTENCY_KEY_HEADER, message_id)
            .body(Full::new(Bytes::copy_from_slice(payload.as_bytes())));
        json_answer(self.call(req, self.send_timeout).await?)
    }

    /// `GET /v1/status`, optionally as a long poll.
    pub async fn status(&self, route: &Route, after: Option<u64>, wait_seconds: Option<u32>) -> Result<PodStatus, PodError> {
        let wait = wait_seconds.unwrap_or(0);
        let path = match after {
            Some(v) => format!("/v1/status?after={v}&waitSeconds={wait}"),
            None => "/v1/status".to_owned(),
        };
        let req = request(Method::GET, route, &path).body(Full::default());
        json_answer(self.call(req, Duration::from_secs(u64::from(wait) + 5)).await?)
    }

    /// `GET /v1/qr` in the format `accept` names.
    pub async fn qr(&self, route: &Route, accept: &str) -> Result<PodBytes, PodError> {
        let req = request(Method::GET, route, "/v1/qr").header(ACCEPT, accept).body(Full::default());
        let answer = self.call(req, MANAGE_TIMEOUT).await?;
        if !answer.status.is_success() {
            return Err(refused(answer));
        }
        let content_type = answer
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/octet-stream")
            .to_owned();
        Ok(PodBytes { content_type, body: answer.body })
    }

    /// A POST with a JSON body (or none) and a JSON answer.
    pub async fn post<B: Serialize + ?Sized, T: DeserializeOwned>(&self, route: &Route, path: &str, body: Option<&B>) -> Result<T, PodError> {
        let body = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| PodError::Unreachable(format!("encoding the request: {e}")))?,
            None => b"{}".to_vec(),
        };
        let req = request(Method::POST, route, path).header(CONTENT_TYPE, JSON).body(Full::new(Bytes::from(body)));
        json_answer(self.call(req, MANAGE_TIMEOUT).await?)
    }

    /// `GET /metrics` (Prometheus text).
    pub async fn metrics(&self, route: &Route, timeout: Duration) -> Result<String, PodError> {
        let req = request(Method::GET, route, "/metrics").body(Full::default());
        let answer = self.call(req, timeout).await?;
        if !answer.status.is_success() {
            return Err(refused(answer));
        }
        Ok(String::from_utf8_lossy(&answer.body).into_owned())
    }

    /// Whether `GET /readyz` answers 200.
    pub async fn ready(&self, base_url: &str) -> bool {
        let req = Request::get(format!("{base_url}/readyz")).body(Full::default());
        matches!(self.call(req, Duration::from_secs(2)).await, Ok(a) if a.status.is_success())
    }

    /// Makes the request and reads the answer to its end, all within `timeout`. An error
    /// answer whose body cannot be read is still an answer (its status tells what happened).
    async fn call(&self, req: http::Result<Request<Full<Bytes>>>, timeout: Duration) -> Result<Answer, PodError> {
        let req = req.map_err(|e| PodError::Unreachable(e.to_string()))?;
        let deadline = tokio::time::Instant::now() + timeout;
        let resp = tokio::time::timeout_at(deadline, self.http.request(req))
            .await
            .map_err(|_| PodError::Timeout)?
            .map_err(|e| transport(&e))?;
        let (parts, body) = resp.into_parts();
        let body = match tokio::time::timeout_at(deadline, body.collect()).await {
            Ok(Ok(b)) => b.to_bytes(),
            _ if !parts.status.is_success() => Bytes::new(),
            Ok(Err(e)) => return Err(transport(&e)),
            Err(_) => return Err(PodError::Timeout),
        };
        Ok(Answer { status: parts.status, headers: parts.headers, body })
    }
}

/// A request to `path` on the route's pod, with its bearer token.
fn request(method: Method, route: &Route, path: &str) -> http::request::Builder {
    let mut url = String::with_capacity(route.base_url.len() + path.len());
    url.push_str(&route.base_url);
    url.push_str(path);
    let mut token = String::with_capacity(route.token.len() + 7);
    token.push_str("Bearer ");
    token.push_str(&route.token);
    Request::builder().method(method).uri(url).header(AUTHORIZATION, token)
}

fn json_answer<T: DeserializeOwned>(answer: Answer) -> Result<T, PodError> {
    if !answer.status.is_success() {
        return Err(refused(answer));
    }
    serde_json::from_slice(&answer.body).map_err(|e| {
        tracing::error!(error = %e, "session pod answered with an unexpected body");
        PodError::Refused(ApiError::new(ErrorCode::Unavailable, "the session pod answered with an unexpected body").with_retry_after(2))
    })
}

/// A request that got no (complete) answer: a timeout anywhere in the error's chain (the
/// connect timeout included) is `Timeout`; a connection that could not be made, refused; any
/// other failure happened on a connection that then broke.
fn transport(e: &(dyn std::error::Error + 'static)) -> PodError {
    let mut connect = false;
    let mut source = Some(e);
    while let Some(err) = source {
        let timed_out = err.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_timeout)
            || err.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut);
        if timed_out {
            return PodError::Timeout;
        }
        connect |= err.downcast_ref::<hyper_util::client::legacy::Error>().is_some_and(hyper_util::client::legacy::Error::is_connect);
        source = err.source();
    }
    PodError::Unreachable(if connect { "connection refused" } else { "connection lost" }.into())
}

/// Maps a pod's error answer: its code and message pass through (same codes); an auth
/// failure is our misconfiguration, not the client's, so it becomes UNAVAILABLE.
fn refused(answer: Answer) -> PodError {
    let status = answer.status;
    let retry_after = answer
        .headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u32>().ok());
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        tracing::error!(%status, "the session pod refused the gateway's token");
        return PodError::Refused(ApiError::unavailable("the gateway could not authenticate to the session's pod"));
    }
    let mut err = match serde_json::from_slice::<ErrorBody>(&answer.body) {
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
