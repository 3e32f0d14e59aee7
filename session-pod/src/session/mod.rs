//! The running session: drives one [`Engine`], turns its [`EngineEvent`]s into status,
//! metrics and outbox events, and accepts sends (idempotency, pacing, ordering).
//!
//! Three tasks, each with one job:
//! - the **event loop** applies engine events to [`SessionCore`] in order and appends the
//!   resulting events to the outbox (a burst of events costs one `fsync`);
//! - the **sender** hands accepted sends to the engine one at a time, in the order they were
//!   accepted (WhatsApp shows messages in the order they arrive);
//! - the **delivery** task (see [`crate::delivery`]) empties the outbox towards the gateway.

pub mod core;
pub mod message_log;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use wa_api::crd::Phase;
use wa_api::pod::{
    EventBody, MessageInfo, MessageStatus, OutgoingMessage, PodEvent, PodStatus, SendResponse,
};
use wa_api::{ErrorCode, PhoneNumber};

use self::core::{QrView, SessionCore};
use crate::engine::{Engine, EngineError, EngineEvent};
use crate::error::ApiError;
use crate::idempotency::{Claim, IdempotencyStore, Outcome, fingerprint};
use crate::metrics::{Gauges, Metrics, SendFailure};
use crate::outbox::EventOutbox;
use crate::pacing::{TokenBucket, retry_after_secs};

/// Engine events applied per outbox append at most.
const EVENT_BATCH: usize = 256;
/// How long a start of the engine may take before the session reports `Failed`.
const ENGINE_START_TIMEOUT: Duration = Duration::from_secs(15);

/// What the session is, fixed for the process's life.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    pub name: String,
    pub namespace: Option<String>,
    pub phone: Option<PhoneNumber>,
    pub media_max_bytes: usize,
    pub rate_per_minute: u32,
    pub rate_burst: u32,
    /// Sent messages remembered for `GET /v1/messages/{id}`.
    pub message_log: usize,
    /// Accepted sends that may wait for the sender.
    pub send_queue: usize,
}

/// A send the sender task carries out.
struct SendJob {
    msg: OutgoingMessage,
    guard: Option<crate::idempotency::ClaimGuard>,
    reply: oneshot::Sender<Result<SendResponse, ApiError>>,
}

/// The answer to an accepted send.
#[derive(Debug)]
pub struct SendAnswer {
    pub response: SendResponse,
    /// The answer comes from an earlier request with the same `Idempotency-Key`.
    pub replayed: bool,
}

pub struct Session {
    pub settings: SessionSettings,
    engine: Arc<dyn Engine>,
    core: Mutex<SessionCore>,
    status_tx: watch::Sender<PodStatus>,
    /// The engine's own channel; the session injects events (boot, start failure) through it
    /// so they are ordered with the engine's.
    events_tx: mpsc::UnboundedSender<EngineEvent>,
    outbox: Option<Arc<EventOutbox>>,
    outbox_wake: Arc<Notify>,
    pub metrics: Arc<Metrics>,
    pacing: Mutex<TokenBucket>,
    idempotency: IdempotencyStore,
    send_tx: mpsc::Sender<SendJob>,
    barrier_tx: mpsc::UnboundedSender<oneshot::Sender<()>>,
    /// Cancelled when the process starts shutting down: no new work is accepted.
    pub shutdown: CancellationToken,
    ready: AtomicBool,
    started_at: f64,
}

/// The receivers the session's tasks consume; handed to [`Session::spawn`].
pub struct SessionTasks {
    events_rx: mpsc::UnboundedReceiver<EngineEvent>,
    send_rx: mpsc::Receiver<SendJob>,
    barrier_rx: mpsc::UnboundedReceiver<oneshot::Sender<()>>,
}

/// Handles of the running tasks, for an orderly stop.
pub struct Running {
    pub event_loop: JoinHandle<()>,
    pub sender: JoinHandle<()>,
    /// Stops the event loop after the engine has shut down (so its last events are applied).
    pub events_stop: CancellationToken,
}

impl Session {
    /// Builds the session around an engine that reports on `events_tx`/`events_rx`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: SessionSettings,
        engine: Arc<dyn Engine>,
        events_tx: mpsc::UnboundedSender<EngineEvent>,
        events_rx: mpsc::UnboundedReceiver<EngineEvent>,
        outbox: Option<Arc<EventOutbox>>,
        outbox_wake: Arc<Notify>,
        idempotency: IdempotencyStore,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> (Arc<Self>, SessionTasks) {
        let core = SessionCore::new(
            &settings.name,
            engine.kind(),
            settings.message_log,
            Utc::now(),
        );
        let (status_tx, _) = watch::channel(core.status().clone());
        let (send_tx, send_rx) = mpsc::channel(settings.send_queue.max(1));
        let (barrier_tx, barrier_rx) = mpsc::unbounded_channel();
        let pacing = TokenBucket::new(
            settings.rate_per_minute,
            settings.rate_burst,
            Instant::now(),
        );
        let started_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let session = Arc::new(Self {
            settings,
            engine,
            core: Mutex::new(core),
            status_tx,
            events_tx,
            outbox,
            outbox_wake,
            metrics,
            pacing: Mutex::new(pacing),
            idempotency,
            send_tx,
            barrier_tx,
            shutdown,
            ready: AtomicBool::new(false),
            started_at,
        });
        (
            session,
            SessionTasks {
                events_rx,
                send_rx,
                barrier_rx,
            },
        )
    }

    /// Starts the event loop and the sender.
    pub fn spawn(self: &Arc<Self>, tasks: SessionTasks) -> Running {
        let events_stop = CancellationToken::new();
        let span = tracing::Span::current();
        let event_loop = tokio::spawn(
            self.clone()
                .event_loop(tasks.events_rx, tasks.barrier_rx, events_stop.clone())
                .instrument(span.clone()),
        );
        let sender = tokio::spawn(self.clone().sender(tasks.send_rx).instrument(span));
        Running {
            event_loop,
            sender,
            events_stop,
        }
    }

    /// Records the boot and starts the engine; the session is ready afterwards, also when the
    /// engine failed to start (its status then says `Failed` and why).
    pub async fn start_engine(&self) {
        let boot = lock(&self.core).boot_event();
        self.append_events(vec![boot]).await;
        self.run_engine_start().await;
        self.ready.store(true, Ordering::Release);
    }

    async fn run_engine_start(&self) {
        let result = tokio::time::timeout(
            ENGINE_START_TIMEOUT,
            self.engine.start(self.settings.phone.clone()),
        )
        .await;
        let reason = match result {
            Ok(Ok(())) => return,
            Ok(Err(e)) => format!("engine did not start: {e}"),
            Err(_) => format!(
                "engine did not start within {} s",
                ENGINE_START_TIMEOUT.as_secs()
            ),
        };
        tracing::error!(%reason, "engine start failed");
        self.inject(EngineEvent::State {
            phase: Phase::Failed,
            account: None,
            reason: Some(reason),
        });
        self.sync().await;
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.shutdown.is_cancelled()
    }

    pub fn engine(&self) -> &dyn Engine {
        self.engine.as_ref()
    }

    pub fn status(&self) -> PodStatus {
        self.status_tx.borrow().clone()
    }

    /// The status as soon as its version differs from `after`, or the current one after
    /// `wait`. "Differs", not "is greater": a restarted pod counts from 1 again, and a client
    /// holding a version of the previous process must hear about the new one at once.
    pub async fn wait_status(&self, after: u64, wait: Duration) -> PodStatus {
        let mut rx = self.status_tx.subscribe();
        let changed = async {
            let _ = rx.wait_for(|s| s.version != after).await;
        };
        tokio::select! {
            _ = tokio::time::timeout(wait, changed) => {}
            () = self.shutdown.cancelled() => {}
        }
        self.status()
    }

    /// Waits until every event the engine reported so far is applied (so an answer right after
    /// an engine call shows its effect).
    pub async fn sync(&self) {
        let (tx, rx) = oneshot::channel();
        if self.barrier_tx.send(tx).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(2), rx).await;
        }
    }

    /// Injects an event as if the engine reported it.
    pub fn inject(&self, e: EngineEvent) {
        let _ = self.events_tx.send(e);
    }

    pub fn qr(&self) -> QrView {
        lock(&self.core).qr(Utc::now())
    }

    pub fn message(&self, id: &str) -> Option<MessageInfo> {
        lock(&self.core).message(id)
    }

    /// Restarts the engine; after a failed start, starts it again.
    pub async fn restart(&self) -> Result<(), EngineError> {
        if self.status().phase == Phase::Failed {
            self.inject(EngineEvent::State {
                phase: Phase::Starting,
                account: None,
                reason: Some("restart requested".into()),
            });
            self.run_engine_start().await;
            return Ok(());
        }
        self.engine.restart().await
    }

    /// Accepts a send: idempotency, connection check, rate limit, then the sender queue.
    pub async fn send(
        &self,
        msg: OutgoingMessage,
        key: Option<&str>,
    ) -> Result<SendAnswer, ApiError> {
        let mut guard = None;
        if let Some(key) = key {
            let fp = fingerprint(&msg);
            loop {
                // The claim syncs a record to disk; keep that off the runtime thread.
                let (store, k) = (self.idempotency.clone(), key.to_owned());
                let claim = tokio::task::spawn_blocking(move || store.claim(&k, &fp))
                    .await
                    .map_err(|e| ApiError::internal("idempotency task", e))?
                    .map_err(|e| ApiError::internal("idempotency store", e))?;
                match claim {
                    Claim::New(g) => {
                        guard = Some(g);
                        break;
                    }
                    Claim::Replay(Outcome::Sent(response)) => {
                        return Ok(SendAnswer {
                            response,
                            replayed: true,
                        });
                    }
                    Claim::Replay(Outcome::Unknown) => {
                        return Err(ApiError::new(
                            ErrorCode::SendOutcomeUnknown,
                            "a send with this Idempotency-Key was in flight when the session stopped or timed out; \
                             it may have reached WhatsApp, so it is not sent again",
                        ));
                    }
                    Claim::Conflict => {
                        return Err(ApiError::new(
                            ErrorCode::IdempotencyConflict,
                            "this Idempotency-Key was already used for a different message",
                        ));
                    }
                    Claim::Wait(mut rx) => {
                        // The first request with this key is being sent: wait for its outcome
                        // (or its release, after which this one may send).
                        tokio::select! {
                            _ = rx.wait_for(Option::is_some) => {}
                            () = self.shutdown.cancelled() => return Err(shutting_down()),
                        }
                    }
                }
            }
        }
        let phase = self.status().phase;
        if phase != Phase::Connected {
            self.metrics.send_failed(SendFailure::NotConnected);
            return Err(ApiError::new(
                ErrorCode::SessionNotConnected,
                format!("the session is {phase}; messages can be sent once it is Connected"),
            ));
        }
        if let Err(wait) = lock(&self.pacing).try_take(Instant::now()) {
            Metrics::inc(&self.metrics.rate_limited);
            let secs = retry_after_secs(wait);
            return Err(ApiError::new(
                ErrorCode::RateLimited,
                format!(
                    "rate limit of {} messages per minute (burst {}) reached; retry in {secs} s",
                    self.settings.rate_per_minute, self.settings.rate_burst
                ),
            )
            .retry_after(secs));
        }
        let (reply, answer) = oneshot::channel();
        if let Err(e) = self.send_tx.try_send(SendJob { msg, guard, reply }) {
            lock(&self.pacing).give_back();
            return Err(match e {
                mpsc::error::TrySendError::Full(_) => ApiError::new(
                    ErrorCode::Unavailable,
                    "too many sends waiting; retry shortly",
                )
                .retry_after(1),
                mpsc::error::TrySendError::Closed(_) => shutting_down(),
            });
        }
        match answer.await {
            Ok(Ok(response)) => Ok(SendAnswer {
                response,
                replayed: false,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(shutting_down()),
        }
    }

    /// Values for `/metrics` read now.
    pub fn gauges(&self) -> Gauges {
        Gauges {
            phase: self.status().phase,
            engine: self.engine.kind(),
            resident_memory_bytes: crate::metrics::resident_memory_bytes(),
            outbox_events: self.outbox.as_ref().map_or(0, |o| o.pending()),
            outbox_dropped: self.outbox.as_ref().map_or(0, |o| o.dropped()),
            outbox_syncs: self.outbox.as_ref().map_or(0, |o| o.syncs()),
            send_queue: self.send_tx.max_capacity() - self.send_tx.capacity(),
            start_time_seconds: self.started_at,
        }
    }

    pub fn outbox_pending(&self) -> usize {
        self.outbox.as_ref().map_or(0, |o| o.pending())
    }

    async fn event_loop(
        self: Arc<Self>,
        mut events: mpsc::UnboundedReceiver<EngineEvent>,
        mut barrier: mpsc::UnboundedReceiver<oneshot::Sender<()>>,
        stop: CancellationToken,
    ) {
        loop {
            tokio::select! {
                biased;
                ev = events.recv() => {
                    let Some(ev) = ev else { return };
                    let mut batch = vec![ev];
                    while batch.len() < EVENT_BATCH {
                        match events.try_recv() {
                            Ok(e) => batch.push(e),
                            Err(_) => break,
                        }
                    }
                    self.apply(batch).await;
                }
                waiter = barrier.recv() => {
                    let Some(waiter) = waiter else { return };
                    self.drain(&mut events).await;
                    let _ = waiter.send(());
                }
                () = stop.cancelled() => {
                    self.drain(&mut events).await;
                    return;
                }
            }
        }
    }

    async fn drain(&self, events: &mut mpsc::UnboundedReceiver<EngineEvent>) {
        let mut batch = Vec::new();
        while let Ok(e) = events.try_recv() {
            batch.push(e);
            if batch.len() == EVENT_BATCH {
                self.apply(std::mem::take(&mut batch)).await;
            }
        }
        if !batch.is_empty() {
            self.apply(batch).await;
        }
    }

    async fn apply(&self, batch: Vec<EngineEvent>) {
        let now = Utc::now();
        let mut bodies = Vec::new();
        let new_status = {
            let mut core = lock(&self.core);
            let mut changed = false;
            for ev in batch {
                if let EngineEvent::State { phase, reason, .. } = &ev {
                    tracing::info!(%phase, reason = reason.as_deref().unwrap_or(""), "engine state");
                }
                let a = core.apply(ev, now);
                if a.reconnect {
                    Metrics::inc(&self.metrics.reconnects);
                }
                if a.inbound {
                    Metrics::inc(&self.metrics.messages_received);
                }
                match a.receipt {
                    Some(MessageStatus::Delivered) => {
                        Metrics::inc(&self.metrics.receipts_delivered)
                    }
                    Some(MessageStatus::Read) => Metrics::inc(&self.metrics.receipts_read),
                    Some(MessageStatus::Failed) => Metrics::inc(&self.metrics.receipts_failed),
                    _ => {}
                }
                changed |= a.status_changed;
                bodies.extend(a.event);
            }
            changed.then(|| core.status().clone())
        };
        // Written first, then visible: a status the operator saw has its event in the outbox.
        self.append_events(bodies).await;
        if let Some(s) = new_status {
            self.status_tx.send_replace(s);
        }
    }

    async fn append_events(&self, bodies: Vec<EventBody>) {
        let Some(outbox) = &self.outbox else { return };
        if bodies.is_empty() {
            return;
        }
        let now = Utc::now();
        let events: Vec<PodEvent> = bodies
            .into_iter()
            .map(|body| PodEvent {
                id: uuid::Uuid::now_v7().to_string(),
                session: self.settings.name.clone(),
                namespace: self.settings.namespace.clone(),
                occurred_at: now,
                body,
            })
            .collect();
        // A write to the page cache (the sync comes later, if at all: `outbox` module): on this
        // thread, not worth a hand-off to the blocking pool per batch.
        match outbox.append(&events) {
            Ok(()) => self.outbox_wake.notify_one(),
            Err(e) => {
                tracing::error!(error = %e, lost = events.len(), "outbox: cannot append events; they are lost")
            }
        }
    }

    async fn sender(self: Arc<Self>, mut jobs: mpsc::Receiver<SendJob>) {
        loop {
            let job = tokio::select! {
                biased;
                () = self.shutdown.cancelled() => break,
                job = jobs.recv() => match job {
                    Some(j) => j,
                    None => break,
                },
            };
            let kind = job.msg.kind();
            let span = tracing::info_span!("send", to = %job.msg.to, kind = kind.as_str());
            let mut guard = job.guard;
            if let Some(g) = &mut guard {
                // Cut off from here on (shutdown drops this task), the outcome is unknown.
                g.handed_to_engine();
            }
            let result = self.engine.send(&job.msg).instrument(span.clone()).await;
            match result {
                Ok(sent) => {
                    // The record of what the engine sent, written before anything else can
                    // be cut off (no await until here): fault tests count sends from it.
                    let key = guard.as_ref().map_or("", |g| g.key());
                    tracing::debug!(parent: &span, id = %sent.id, key = %key, "sent");
                    Metrics::inc(&self.metrics.messages_sent);
                    let receipt = lock(&self.core).record_sent(kind, &sent, Utc::now());
                    let response = SendResponse {
                        id: sent.id.clone(),
                        to: sent.chat.to_string(),
                        status: MessageStatus::Sent,
                        timestamp: sent.timestamp,
                    };
                    if let Some(g) = guard {
                        let outcome = Outcome::Sent(response.clone());
                        // A `sent` record is a write to the page cache, not synced on its own
                        // (`idempotency`): on this thread, not worth a hand-off to the blocking
                        // pool. Once per segment (10,000 records) it also closes a file.
                        g.finish(outcome);
                    }
                    let _ = job.reply.send(Ok(response));
                    // Through the event loop, so a burst of sends shares one outbox sync.
                    self.inject(EngineEvent::Receipt(receipt));
                }
                Err(e) => {
                    self.metrics.send_failed(SendFailure::of(&e));
                    tracing::warn!(parent: &span, error = %e, "send failed");
                    match (guard, &e) {
                        // It may have left: never send it again under this key.
                        (Some(g), EngineError::Timeout(_)) => g.finish(Outcome::Unknown),
                        // Refused before anything left: a retry may send it.
                        (Some(g), _) => g.release(),
                        (None, _) => {}
                    }
                    let _ = job.reply.send(Err(ApiError::from(e)));
                }
            }
        }
        // Sends still queued were never handed to the engine: their callers get 503 and
        // their idempotency keys are released, so a retry sends them.
        jobs.close();
        while let Ok(job) = jobs.try_recv() {
            let _ = job.reply.send(Err(shutting_down()));
        }
    }
}

fn shutting_down() -> ApiError {
    ApiError::new(
        ErrorCode::SessionNotReady,
        "the session pod is shutting down; the message was not sent",
    )
    .retry_after(1)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Session state stays consistent across a panic in a holder (each update is one step).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use wa_api::crd::Account;
    use wa_api::pod::SendRequest;

    use crate::engine::SentMessage;

    /// An engine whose sends all time out, counting how often it was asked.
    struct TimingOut {
        sends: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl Engine for TimingOut {
        fn kind(&self) -> wa_api::Engine {
            wa_api::Engine::Sandbox
        }
        async fn start(&self, _: Option<PhoneNumber>) -> Result<(), EngineError> {
            Ok(())
        }
        async fn pair_code(&self, _: &PhoneNumber) -> Result<String, EngineError> {
            Err(EngineError::AlreadyPaired)
        }
        async fn send(&self, _: &OutgoingMessage) -> Result<SentMessage, EngineError> {
            self.sends.fetch_add(1, Ordering::SeqCst);
            Err(EngineError::Timeout("no server ack".into()))
        }
        async fn logout(&self) -> Result<(), EngineError> {
            Ok(())
        }
        async fn restart(&self) -> Result<(), EngineError> {
            Ok(())
        }
        async fn shutdown(&self) {}
    }

    fn settings() -> SessionSettings {
        SessionSettings {
            name: "s".into(),
            namespace: None,
            phone: None,
            media_max_bytes: 1024,
            rate_per_minute: 600,
            rate_burst: 10,
            message_log: 10,
            send_queue: 4,
        }
    }

    #[tokio::test]
    async fn a_retry_after_a_timed_out_send_is_outcome_unknown_and_not_sent_again() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Arc::new(TimingOut {
            sends: AtomicUsize::new(0),
        });
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (session, tasks) = Session::new(
            settings(),
            engine.clone(),
            events_tx,
            events_rx,
            None,
            Arc::new(Notify::new()),
            IdempotencyStore::open(dir.path(), 10).unwrap(),
            Arc::new(Metrics::default()),
            CancellationToken::new(),
        );
        let _running = session.spawn(tasks);
        session.inject(EngineEvent::State {
            phase: Phase::Connected,
            account: Some(Account {
                jid: "15550000001@s.whatsapp.net".into(),
                push_name: None,
            }),
            reason: None,
        });
        session.sync().await;
        let msg = || {
            serde_json::from_value::<SendRequest>(
                serde_json::json!({"to": "+15551234567", "type": "text", "text": "hi"}),
            )
            .unwrap()
            .validate(1024)
            .unwrap()
        };
        let code = |r: Result<SendAnswer, ApiError>| r.map(|_| ()).map_err(|e| e.code);

        assert_eq!(
            code(session.send(msg(), Some("k")).await),
            Err(ErrorCode::Timeout)
        );
        for _ in 0..2 {
            assert_eq!(
                code(session.send(msg(), Some("k")).await),
                Err(ErrorCode::SendOutcomeUnknown)
            );
        }
        assert_eq!(engine.sends.load(Ordering::SeqCst), 1, "sent again");
        // Without a key nothing is remembered: each attempt is a new send.
        assert_eq!(code(session.send(msg(), None).await), Err(ErrorCode::Timeout));
        assert_eq!(engine.sends.load(Ordering::SeqCst), 2);
    }
}
