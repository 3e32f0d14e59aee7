//! Webhook delivery: one signed POST per (webhook, event), retried with exponential backoff
//! and jitter, dead-lettered after the last attempt. The delivery log is the queue
//! (`webhook_deliveries`), so deliveries survive restarts and replicas share them.
//!
//! Signature: `X-Wa-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
//! Receivers recompute it and refuse timestamps older than a tolerance (replays).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use hmac::{Hmac, Mac};
use rand::Rng;
use sha2::Sha256;
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span, warn};
use wa_api::SessionName;

use crate::metrics::WebhookResult;
use crate::state::Gateway;
use crate::store::{DeliveryResult, DeliveryRow, WebhookTarget};
use crate::util::now_ms;

pub const SIGNATURE_HEADER: &str = "x-wa-signature";

/// Ids of webhooks declared in a session's spec: `spec-<index>`.
pub const SPEC_PREFIX: &str = "spec-";

/// `t=<ts>,v1=<hex>` for `body` signed at `timestamp`.
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    format!("t={timestamp},v1={}", hex::encode(mac(secret, timestamp, body)))
}

fn mac(secret: &str, timestamp: i64, body: &[u8]) -> Vec<u8> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).unwrap_or_else(|_| {
        // HMAC takes keys of any length; this branch cannot be reached.
        <Hmac<Sha256> as Mac>::new_from_slice(b"").unwrap_or_else(|_| unreachable!())
    });
    m.update(timestamp.to_string().as_bytes());
    m.update(b".");
    m.update(body);
    m.finalize().into_bytes().to_vec()
}

/// Checks a signature header as a receiver should: the HMAC matches and the timestamp is
/// within `tolerance_secs` of `now_secs` (so a captured delivery cannot be replayed later).
pub fn verify(secret: &str, header: &str, body: &[u8], now_secs: i64, tolerance_secs: i64) -> bool {
    let mut ts = None;
    let mut sigs = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => ts = v.parse::<i64>().ok(),
            Some(("v1", v)) => sigs.extend(hex::decode(v).ok()),
            _ => {}
        }
    }
    let Some(ts) = ts else { return false };
    // `abs_diff`: a timestamp near i64::MIN or MAX must not overflow the subtraction.
    if now_secs.abs_diff(ts) > u64::try_from(tolerance_secs).unwrap_or(0) {
        return false;
    }
    let expected = mac(secret, ts, body);
    sigs.iter().any(|s| bool::from(s.as_slice().ct_eq(&expected)))
}

/// The webhooks of a session: those registered through the API and those in its spec.
pub async fn targets(gw: &Gateway, session: &SessionName) -> Result<Vec<WebhookTarget>, crate::error::ApiError> {
    let mut all: Vec<WebhookTarget> = gw
        .store
        .webhooks_of(session.as_str())
        .await?
        .into_iter()
        .map(|w| WebhookTarget { id: w.id, url: w.url, events: serde_json::from_str(&w.events).unwrap_or_default() })
        .collect();
    for (i, spec) in gw.directory.spec_webhooks(session).into_iter().enumerate() {
        all.push(WebhookTarget { id: format!("{SPEC_PREFIX}{session}-{i}"), url: spec.url, events: spec.events });
    }
    Ok(all)
}

pub async fn run(gw: Arc<Gateway>, http: reqwest::Client, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = gw.webhook_wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        loop {
            let now = now_ms();
            let lease = (gw.settings.webhook_timeout + Duration::from_secs(10)).as_millis() as i64;
            let due = match gw.store.claim_due_deliveries(now, now + lease, 64).await {
                Ok(d) => d,
                Err(e) => {
                    warn!(error = %e, "webhooks: claiming deliveries failed");
                    break;
                }
            };
            if due.is_empty() {
                break;
            }
            futures::stream::iter(due)
                .for_each_concurrent(16, |d| {
                    let gw = gw.clone();
                    let http = http.clone();
                    let span = info_span!("webhook", session = %d.session, delivery = %d.id, event = %d.event_type);
                    async move { deliver(&gw, &http, d).await }.instrument(span)
                })
                .await;
        }
    }
}

/// The signing secret of a delivery's webhook: `Ok(None)` for an unsigned spec webhook,
/// `Err` when the webhook is gone or its secret cannot be read now.
async fn secret_of(gw: &Gateway, d: &DeliveryRow) -> Result<Option<String>, (bool, String)> {
    if let Some(rest) = d.webhook_id.strip_prefix(SPEC_PREFIX) {
        let index = rest.rsplit('-').next().and_then(|i| i.parse::<usize>().ok());
        let session: Option<SessionName> = d.session.parse().ok();
        let spec = match (session.as_ref(), index) {
            (Some(s), Some(i)) => gw.directory.spec_webhooks(s).into_iter().nth(i),
            _ => None,
        };
        let Some(spec) = spec.filter(|s| s.url == d.url) else {
            return Err((true, "the webhook was removed from the session's spec".into()));
        };
        return match (&spec.secret_ref, session) {
            (None, _) => Ok(None),
            (Some(r), Some(s)) => match gw.directory.webhook_secret(&s, r).await {
                Some(secret) => Ok(Some(secret)),
                None => Err((false, format!("the signing secret {}/{} cannot be read", r.name, r.key))),
            },
            (Some(_), None) => Err((true, "invalid session".into())),
        };
    }
    match gw.store.webhook(&d.webhook_id).await {
        Ok(Some(w)) => Ok(Some(w.secret)),
        Ok(None) => Err((true, "the webhook was deleted".into())),
        Err(e) => Err((false, format!("database: {e}"))),
    }
}

async fn deliver(gw: &Gateway, http: &reqwest::Client, d: DeliveryRow) {
    let attempts = u32::try_from(d.attempts).unwrap_or(u32::MAX);
    let result = match secret_of(gw, &d).await {
        Err((true, why)) => DeliveryResult::Dead { status: None, error: why },
        Err((false, why)) => next_or_dead(gw, attempts, None, why),
        Ok(secret) => {
            let ts = now_ms() / 1000;
            let mut req = http
                .post(&d.url)
                .timeout(gw.settings.webhook_timeout)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header("x-wa-event", &d.event_type)
                .header("x-wa-event-id", &d.event_id)
                .header("x-wa-delivery", &d.id)
                .body(d.payload.clone());
            if let Some(secret) = secret {
                req = req.header(SIGNATURE_HEADER, sign(&secret, ts, d.payload.as_bytes()));
            }
            match req.send().await {
                Ok(resp) if resp.status().is_success() => DeliveryResult::Delivered { status: i32::from(resp.status().as_u16()) },
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    next_or_dead(gw, attempts, Some(i32::from(status)), format!("the receiver answered HTTP {status}"))
                }
                Err(e) => {
                    let why = if e.is_timeout() {
                        format!("no answer within {}s", gw.settings.webhook_timeout.as_secs())
                    } else if e.is_connect() {
                        "connection refused".to_owned()
                    } else {
                        "the request failed".to_owned()
                    };
                    next_or_dead(gw, attempts, None, why)
                }
            }
        }
    };
    let metric = match &result {
        DeliveryResult::Delivered { .. } => WebhookResult::Delivered,
        DeliveryResult::Retry { .. } => WebhookResult::Retried,
        DeliveryResult::Dead { .. } => WebhookResult::Dead,
    };
    gw.metrics.webhook_result(metric);
    match &result {
        DeliveryResult::Delivered { .. } => debug!("webhook delivered"),
        DeliveryResult::Retry { error, .. } => debug!(attempts, error = %error, "webhook delivery failed; will retry"),
        DeliveryResult::Dead { error, .. } => warn!(attempts, error = %error, "webhook delivery dead-lettered"),
    }
    if let Err(e) = gw.store.finish_delivery(&d.id, &result, now_ms()).await {
        warn!(error = %e, "recording a webhook delivery failed; the lease will expire and it is retried");
    }
}

fn next_or_dead(gw: &Gateway, attempts: u32, status: Option<i32>, error: String) -> DeliveryResult {
    if attempts >= gw.settings.webhook_max_attempts {
        return DeliveryResult::Dead { status, error: format!("{error} (after {attempts} attempts)") };
    }
    let delay = retry_delay(gw.settings.webhook_backoff_base, gw.settings.webhook_backoff_max, attempts);
    DeliveryResult::Retry { next_attempt_at: now_ms() + delay.as_millis() as i64, status, error }
}

/// `base · 2^(attempt-1)`, capped at `max`, plus up to 25 % jitter so that receivers coming
/// back are not hit by every retry at once.
pub fn retry_delay(base: Duration, max: Duration, attempt: u32) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.clamp(1, 20).saturating_sub(1)).min(max);
    let jitter_ms = rand::rng().random_range(0..=exp.as_millis() as u64 / 4);
    exp + Duration::from_millis(jitter_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_and_expire() {
        let body = br#"{"id":"e1"}"#;
        let header = sign("s3cret", 1_700_000_000, body);
        assert!(header.starts_with("t=1700000000,v1="));
        assert!(verify("s3cret", &header, body, 1_700_000_010, 300));
        assert!(!verify("other", &header, body, 1_700_000_010, 300), "wrong secret");
        assert!(!verify("s3cret", &header, b"{}", 1_700_000_010, 300), "tampered body");
        assert!(!verify("s3cret", &header, body, 1_700_000_000 + 301, 300), "replayed after 5 minutes");
        assert!(!verify("s3cret", "v1=00", body, 1_700_000_000, 300), "no timestamp");
        assert!(!verify("s3cret", "garbage", body, 1_700_000_000, 300));
    }

    #[test]
    fn known_vector() {
        // HMAC-SHA256("key", "1.body"), computed independently with Python's hmac module.
        let header = sign("key", 1, b"body");
        assert_eq!(header, "t=1,v1=91b5374b153842ad05b2c4eab9349b8321b14703165bd3fb8b034dfb8be98ae5");
    }

    #[test]
    fn retry_delays_grow_to_the_cap() {
        let base = Duration::from_secs(2);
        let max = Duration::from_secs(600);
        let d1 = retry_delay(base, max, 1);
        assert!(d1 >= base && d1 <= base * 5 / 4);
        let d5 = retry_delay(base, max, 5);
        assert!(d5 >= Duration::from_secs(32) && d5 <= Duration::from_secs(40));
        assert!(retry_delay(base, max, 20) <= Duration::from_secs(750));
    }
}
