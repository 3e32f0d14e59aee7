//! What every handler shares: the store, the session directory, key verification, the pod
//! client, metrics, and the wake-up signals of the background workers.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::auth::KeyVerifier;
use crate::directory::SessionDirectory;
use crate::metrics::Metrics;
use crate::pod_client::PodClient;
use crate::store::Store;

pub type AppState = Arc<Gateway>;

pub struct Gateway {
    pub store: Store,
    pub directory: Arc<dyn SessionDirectory>,
    pub keys: KeyVerifier,
    pub pods: PodClient,
    pub metrics: Arc<Metrics>,
    /// Wakes the send outbox (a send was queued).
    pub outbox_wake: Notify,
    /// Wakes the webhook deliverer (deliveries were queued).
    pub webhook_wake: Notify,
    pub settings: Settings,
}

/// Tunables; the defaults suit production, tests shorten the timings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Largest decoded media a send may carry (the pod's cap too).
    pub media_max_bytes: usize,
    /// How long a forward may hold a message before another worker may retry it.
    pub send_lease: Duration,
    /// An async send that cannot be handed over within this time fails.
    pub outbox_max_age: Duration,
    /// Webhook attempts before a delivery is dead-lettered.
    pub webhook_max_attempts: u32,
    /// First retry delay of a webhook delivery; doubles per attempt, with jitter.
    pub webhook_backoff_base: Duration,
    /// Longest retry delay of a webhook delivery.
    pub webhook_backoff_max: Duration,
    /// Time a webhook receiver has to answer.
    pub webhook_timeout: Duration,
    /// API requests answered at once; more are refused 503 OVERLOADED (`http::admission`).
    pub max_in_flight: usize,
}

/// Enough for 1,000 sends/s answered within half a second each (Little's law), small
/// enough that a backlog cannot hold more than a few MiB of request buffers and tasks.
pub const DEFAULT_MAX_IN_FLIGHT: u32 = 512;

impl Default for Settings {
    fn default() -> Self {
        Settings {
            media_max_bytes: wa_api::pod::DEFAULT_MEDIA_MAX_BYTES,
            send_lease: Duration::from_secs(60),
            outbox_max_age: Duration::from_secs(24 * 3600),
            webhook_max_attempts: 10,
            webhook_backoff_base: Duration::from_secs(2),
            webhook_backoff_max: Duration::from_secs(600),
            webhook_timeout: Duration::from_secs(10),
            max_in_flight: DEFAULT_MAX_IN_FLIGHT as usize,
        }
    }
}

impl Settings {
    /// Largest request body of a send: base64 media plus the JSON around it.
    pub fn send_body_limit(&self) -> usize {
        self.media_max_bytes / 3 * 4 + 64 * 1024
    }
}
