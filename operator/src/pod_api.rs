//! The operator's client of the session pod's internal API (`wa_api::pod`): the status
//! long poll and log-out. Nothing else; sends go through the gateway.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use wa_api::ErrorBody;
use wa_api::pod::PodStatus;

/// Why a call to a session pod failed. The text goes into `status.message` and Events.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PodApiError {
    #[error("the session pod rejected the operator's token (401)")]
    Unauthorized,
    #[error("the session pod did not answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot reach the session pod: {0}")]
    Unreachable(String),
    #[error("the session pod answered {status}: {message}")]
    Refused { status: u16, message: String },
    #[error("the session pod answered something that is not a status: {0}")]
    BadAnswer(String),
}

/// HTTP client of session pods, addressed by pod IP.
#[derive(Debug, Clone)]
pub struct PodApi {
    http: reqwest::Client,
    port: u16,
}

impl PodApi {
    /// `port` is the pod's API port: `wa_api::names::POD_PORT` in a cluster.
    pub fn new(port: u16) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            // Pod IPs are cluster-internal: an HTTP(S)_PROXY meant for the outside must not
            // carry the pod token to a proxy.
            .no_proxy()
            // One idle connection per pod is what the long poll needs; do not hoard more.
            .pool_max_idle_per_host(1)
            .build()
            .unwrap_or_default();
        Self { http, port }
    }

    pub fn addr(&self, ip: IpAddr) -> SocketAddr {
        SocketAddr::new(ip, self.port)
    }

    /// `GET /v1/status`; with `after`, held by the pod until its version differs from
    /// `after` or `wait` passes.
    pub async fn status(
        &self,
        ip: IpAddr,
        token: &str,
        after: Option<u64>,
        wait: Duration,
    ) -> Result<PodStatus, PodApiError> {
        let mut url = format!("http://{}/v1/status", self.addr(ip));
        if let Some(v) = after {
            url.push_str(&format!("?after={v}&waitSeconds={}", wait.as_secs()));
        }
        // The pod holds the answer up to `wait`; give the network a margin on top.
        let timeout = wait + Duration::from_secs(10);
        self.call(
            self.http.get(url).bearer_auth(token).timeout(timeout),
            timeout,
        )
        .await
    }

    /// `POST /v1/logout`: unlinks the device from the account and wipes the auth state.
    pub async fn logout(
        &self,
        ip: IpAddr,
        token: &str,
        timeout: Duration,
    ) -> Result<PodStatus, PodApiError> {
        let url = format!("http://{}/v1/logout", self.addr(ip));
        self.call(
            self.http.post(url).bearer_auth(token).timeout(timeout),
            timeout,
        )
        .await
    }

    async fn call(
        &self,
        req: reqwest::RequestBuilder,
        timeout: Duration,
    ) -> Result<PodStatus, PodApiError> {
        let resp = req.send().await.map_err(|e| classify(e, timeout))?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| classify(e, timeout))?;
        if status == reqwest::StatusCode::UNAUTHORIZED {
            return Err(PodApiError::Unauthorized);
        }
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&body)
                .map(|b| format!("{} {}", b.error.code, b.error.message))
                .unwrap_or_else(|_| {
                    String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned()
                });
            return Err(PodApiError::Refused {
                status: status.as_u16(),
                message,
            });
        }
        serde_json::from_slice(&body).map_err(|e| PodApiError::BadAnswer(e.to_string()))
    }
}

fn classify(e: reqwest::Error, timeout: Duration) -> PodApiError {
    if e.is_timeout() {
        PodApiError::Timeout(timeout)
    } else {
        // The source chain says what actually happened (refused, reset, no route).
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg = format!("{msg}: {s}");
            src = s.source();
        }
        PodApiError::Unreachable(msg)
    }
}
