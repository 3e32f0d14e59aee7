//! The send outbox: forwards recorded sends that no request is forwarding — async sends,
//! and sync sends whose gateway died mid-forward (their lease ran out). Replicas share it
//! on PostgreSQL: each claim is `FOR UPDATE SKIP LOCKED`, and a claimed row is leased, so
//! two replicas never forward one message at once; a repeated forward after a crash carries
//! the same `Idempotency-Key`, so the pod sends it once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span, warn};
use wa_api::{ErrorCode, SessionName};

use crate::error::ApiError;
use crate::pod_client::PodError;
use crate::state::Gateway;
use crate::store::{Claimed, SendOutcome};
use crate::util::now_ms;

const BATCH: i64 = 64;

pub async fn run(gw: Arc<Gateway>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = gw.outbox_wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        loop {
            let now = now_ms();
            let lease = gw.settings.send_lease.as_millis() as i64;
            let claimed = match gw.store.claim_due_sends(now, now + lease, BATCH).await {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "outbox: claiming sends failed");
                    break;
                }
            };
            if claimed.is_empty() {
                break;
            }
            let n = claimed.len() as i64;
            // One task per session keeps each session's sends in order; sessions go in parallel.
            let mut by_session: BTreeMap<String, Vec<Claimed>> = BTreeMap::new();
            for c in claimed {
                by_session.entry(c.session.clone()).or_default().push(c);
            }
            let tasks = by_session.into_values().map(|batch| {
                let gw = gw.clone();
                async move {
                    let mut blocked = false;
                    for c in batch {
                        if blocked {
                            // An earlier send of this session could not go; keep the order.
                            release(&gw, &c, "waiting for an earlier message of this session").await;
                            continue;
                        }
                        let span = info_span!("outbox", session = %c.session, message = %c.id);
                        blocked = !forward(&gw, &c).instrument(span).await;
                    }
                }
            });
            futures::future::join_all(tasks).await;
            if n < BATCH {
                break;
            }
        }
    }
}

/// Forwards one claimed send; false when it has to wait (it stays queued).
async fn forward(gw: &Gateway, c: &Claimed) -> bool {
    let now = now_ms();
    let expired = now - c.created_at > gw.settings.outbox_max_age.as_millis() as i64;
    let Some(payload) = c.payload.as_deref() else {
        finish(gw, c, ErrorCode::Internal, "the message's content was lost").await;
        return true;
    };
    let Ok(session) = c.session.parse::<SessionName>() else {
        finish(gw, c, ErrorCode::SessionNotFound, "the session name is invalid").await;
        return true;
    };
    if gw.directory.get(&session).is_none() {
        finish(gw, c, ErrorCode::SessionNotFound, "the session was deleted").await;
        return true;
    }
    let route = match gw.directory.route(&session) {
        Ok(r) => r,
        Err(e) => return retry_or_fail(gw, c, &e, expired, None).await,
    };
    match gw.pods.send(&route, payload, &c.id).await {
        Ok(resp) => {
            let outcome = SendOutcome::Sent {
                wa_id: resp.id,
                chat: resp.to,
                status: resp.status,
                sent_at: resp.timestamp.timestamp_millis(),
            };
            if let Err(e) = gw.store.finish_send(&c.id, &outcome, now_ms()).await {
                // The pod has it; the lease runs out and the next forward is answered from
                // the pod's idempotency record.
                warn!(error = %e, "outbox: recording a sent message failed");
            }
            debug!("outbox: sent");
            true
        }
        Err(PodError::Refused(e)) if !e.is_retriable() => {
            finish(gw, c, e.code, &e.message).await;
            true
        }
        Err(e) => {
            let retry_after = match &e {
                PodError::Refused(r) => r.retry_after,
                _ => None,
            };
            let api = e.into_api(session.as_str());
            retry_or_fail(gw, c, &api, expired, retry_after).await
        }
    }
}

async fn retry_or_fail(gw: &Gateway, c: &Claimed, e: &ApiError, expired: bool, retry_after: Option<u32>) -> bool {
    if expired {
        let reason = format!("not sent within {}s: {}", gw.settings.outbox_max_age.as_secs(), e.message);
        finish(gw, c, e.code, &reason).await;
        return true;
    }
    let delay = backoff(c.attempts, retry_after);
    let next = now_ms() + delay.as_millis() as i64;
    if let Err(err) = gw.store.reschedule_send(&c.id, next, e.code.as_str(), &e.message, now_ms()).await {
        warn!(error = %err, "outbox: rescheduling failed; the lease will expire");
    }
    debug!(delay_ms = delay.as_millis() as u64, reason = %e.message, "outbox: will retry");
    false
}

async fn release(gw: &Gateway, c: &Claimed, why: &str) {
    let _ = gw.store.reschedule_send(&c.id, now_ms() + 200, "SESSION_NOT_READY", why, now_ms()).await;
}

async fn finish(gw: &Gateway, c: &Claimed, code: ErrorCode, reason: &str) {
    let outcome = SendOutcome::Failed { code: code.as_str().to_owned(), reason: reason.to_owned() };
    if let Err(e) = gw.store.finish_send(&c.id, &outcome, now_ms()).await {
        warn!(error = %e, "outbox: recording a failed message failed");
    }
}

/// Exponential backoff with jitter: 0.5 s, 1 s, 2 s … capped at 60 s; a pod's
/// `Retry-After` wins when it is longer.
pub fn backoff(attempts: i32, retry_after: Option<u32>) -> Duration {
    let exp = 500u64.saturating_mul(1u64 << attempts.clamp(1, 8).saturating_sub(1) as u32).min(60_000);
    let jitter = rand::rng().random_range(0..=exp / 4);
    let base = Duration::from_millis(exp + jitter);
    match retry_after {
        Some(s) => base.max(Duration::from_secs(u64::from(s))),
        None => base,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let ms = |a| backoff(a, None).as_millis();
        assert!((500..=625).contains(&ms(1)));
        assert!((1000..=1250).contains(&ms(2)));
        assert!(ms(30) <= 75_000);
        assert!(backoff(1, Some(5)) >= Duration::from_secs(5));
    }
}
