//! Delivers the outbox to the gateway: `POST <events-url>` with an `EventBatch` body and the
//! pod token, oldest events first, one batch at a time. A batch leaves the outbox only after a
//! 2xx; anything else (refused connection, timeout, 5xx, 4xx) is retried with capped
//! exponential backoff and jitter, so a gateway that is down or restarting loses nothing.

use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::metrics::Metrics;
use crate::outbox::{ACK_RECORD_INTERVAL, Batch, EventOutbox};

/// Events per POST: enough to catch up quickly after an outage, small enough for one request.
const BATCH_EVENTS: usize = 100;
const BATCH_BYTES: usize = 1024 * 1024;
/// One delivery attempt may not take longer than this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long to wait between failed attempts.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub first: Duration,
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            first: Duration::from_millis(250),
            max: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The wait after the `attempt`-th consecutive failure (1-based): doubles from `first` up
    /// to `max`, then a random point in its upper half ("equal jitter"), so pods that lost the
    /// gateway together do not retry in lockstep, and no wait collapses to zero.
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let exp = self
            .first
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        let ceiling = exp.min(self.max).max(Duration::from_millis(1));
        let half = ceiling / 2;
        half + half.mul_f64(jitter.clamp(0.0, 1.0))
    }
}

/// Everything the delivery task needs.
pub struct Delivery {
    pub outbox: Arc<EventOutbox>,
    pub url: reqwest::Url,
    pub token: String,
    pub retry: RetryPolicy,
    /// Woken when events are appended.
    pub wake: Arc<Notify>,
    pub metrics: Arc<Metrics>,
}

#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error("request failed: {}", chain(.0))]
    Http(#[from] reqwest::Error),
    #[error("gateway answered {status}: {body}")]
    Status {
        status: reqwest::StatusCode,
        body: String,
    },
}

/// Writes the outbox's acknowledged offset to disk if it is behind (off the async threads).
pub async fn record_acks(outbox: Arc<EventOutbox>) {
    match tokio::task::spawn_blocking(move || outbox.record_acks()).await {
        Ok(Ok(())) => {}
        // Still acknowledged in memory; after a crash before the next write those events
        // would be delivered again, and the gateway de-duplicates them by id.
        Ok(Err(e)) => tracing::error!(error = %e, "outbox: cannot record the acknowledgement"),
        Err(e) => tracing::error!(error = %e, "outbox: ack task failed"),
    }
}

/// An error with its causes ("error sending request: connection refused").
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

impl Delivery {
    /// Runs until `shutdown`; whatever is not delivered by then stays on disk for the next start.
    pub async fn run(self, shutdown: CancellationToken) {
        let client = match reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(Duration::from_secs(3))
            .pool_max_idle_per_host(1)
            .build()
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot build the HTTP client for event delivery; events stay in the outbox");
                return;
            }
        };
        let mut failures: u32 = 0;
        let mut batch_limit = BATCH_EVENTS;
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            // A read of what was just written (the page cache): on this thread, not worth a
            // hand-off to the blocking pool per batch.
            let batch = match self.outbox.peek(batch_limit, BATCH_BYTES) {
                Ok(Some(b)) => b,
                Ok(None) => {
                    // Nothing to deliver. An acknowledgement not on disk yet is written once no
                    // new events came for a while, so a quiet pod's record is current.
                    let unrecorded = self.outbox.ack_unrecorded();
                    tokio::select! {
                        () = self.wake.notified() => continue,
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(ACK_RECORD_INTERVAL), if unrecorded => {
                            record_acks(self.outbox.clone()).await;
                            continue;
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "outbox: cannot read pending events");
                    failures += 1;
                    if !self.pause(failures, &shutdown).await {
                        return;
                    }
                    continue;
                }
            };
            let attempt = self
                .post(&client, &batch)
                .instrument(tracing::debug_span!("deliver", events = batch.count));
            let result = tokio::select! {
                r = attempt => r,
                () = shutdown.cancelled() => return,
            };
            match result {
                Ok(()) => {
                    failures = 0;
                    batch_limit = BATCH_EVENTS;
                    self.metrics
                        .events_delivered
                        .fetch_add(batch.count as u64, std::sync::atomic::Ordering::Relaxed);
                    tracing::debug!(events = batch.count, "events delivered");
                    if self.outbox.ack(&batch) {
                        record_acks(self.outbox.clone()).await;
                    }
                }
                Err(e) => {
                    failures += 1;
                    Metrics::inc(&self.metrics.event_delivery_failures);
                    if let AttemptError::Status { status, .. } = &e
                        && *status == reqwest::StatusCode::PAYLOAD_TOO_LARGE
                    {
                        // The gateway refuses batches this big; send fewer at once.
                        batch_limit = (batch_limit / 2).max(1);
                    }
                    let level_warn = failures == 1 || failures.is_power_of_two();
                    if level_warn {
                        tracing::warn!(error = %e, failures, pending = self.outbox.pending(), "event delivery failed; retrying");
                    } else {
                        tracing::debug!(error = %e, failures, "event delivery failed; retrying");
                    }
                    if !self.pause(failures, &shutdown).await {
                        return;
                    }
                }
            }
        }
    }

    /// Waits before the next attempt; false when shutting down.
    async fn pause(&self, failures: u32, shutdown: &CancellationToken) -> bool {
        let delay = self.retry.delay(failures, rand::random::<f64>());
        tokio::select! {
            () = tokio::time::sleep(delay) => true,
            () = shutdown.cancelled() => false,
        }
    }

    async fn post(&self, client: &reqwest::Client, batch: &Batch) -> Result<(), AttemptError> {
        let resp = client
            .post(self.url.clone())
            .header(AUTHORIZATION, format!("Bearer {}", self.token))
            .header(CONTENT_TYPE, "application/json")
            .body(batch.body.clone())
            .send()
            .await?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let body = resp.text().await.unwrap_or_default();
        let mut end = body.len().min(200);
        while !body.is_char_boundary(end) {
            end -= 1;
        }
        Err(AttemptError::Status {
            status,
            body: body[..end].to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter_in_the_upper_half() {
        let p = RetryPolicy {
            first: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        let check = |attempt, jitter, ms| {
            assert_eq!(
                p.delay(attempt, jitter),
                Duration::from_millis(ms),
                "attempt {attempt} jitter {jitter}"
            )
        };
        check(1, 1.0, 100);
        check(1, 0.0, 50);
        check(2, 1.0, 200);
        check(3, 0.5, 300);
        check(5, 1.0, 1600);
        check(6, 1.0, 2000);
        check(6, 0.0, 1000);
        check(40, 1.0, 2000); // no overflow for long outages
        check(u32::MAX, 0.0, 1000);
        check(0, 1.0, 100); // attempt 0 treated like the first
    }
}
