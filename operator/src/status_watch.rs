//! Brings each session pod's phase to its object: one long-poll task per ready pod.
//!
//! The reconciler calls [`PodStatusWatch::ensure`] when it sees a ready pod and
//! [`PodStatusWatch::forget`] when the pod is gone, not ready, or replaced. The task asks
//! the pod `GET /v1/status?after=<version>&waitSeconds=<n>`; the pod answers as soon as its
//! status version differs from ours, the task keeps the answer here and sends the session's
//! `ObjectRef` to the controller (`Controller::reconcile_on`), whose reconcile reads
//! [`PodStatusWatch::report`] and writes `status`. A phase change in the pod thus reaches the
//! object after one HTTP answer and one reconcile.
//!
//! Failure behaviour: a failing poll retries with capped exponential backoff (1 s … 30 s)
//! for as long as the reconciler keeps the watch; the error reaches `status.message` from
//! the second consecutive failure on (a 401 at once), and clears with the next answer.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures::channel::mpsc;
use kube::runtime::reflector::ObjectRef;
use tokio::task::AbortHandle;
use tracing::{Instrument, debug, info_span};
use wa_api::WhatsAppSession;

use crate::metrics::Metrics;
use crate::pod_api::{PodApi, PodApiError};
use crate::status::PodReport;

/// Which pod a watch polls, and with what token. A different target restarts the watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PollTarget {
    pub pod_uid: String,
    pub ip: IpAddr,
    pub token: String,
}

/// Sessions whose pod reported a change; the controller reconciles them.
pub type Trigger = mpsc::UnboundedReceiver<ObjectRef<WhatsAppSession>>;

#[derive(Clone)]
pub struct PodStatusWatch {
    inner: Arc<Inner>,
}

struct Inner {
    api: PodApi,
    /// How long the pod may hold a long poll (`waitSeconds`).
    wait: Duration,
    entries: Mutex<HashMap<ObjectRef<WhatsAppSession>, Entry>>,
    trigger: mpsc::UnboundedSender<ObjectRef<WhatsAppSession>>,
    metrics: Arc<Metrics>,
}

struct Entry {
    target: PollTarget,
    report: PodReport,
    task: AbortHandle,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for e in lock(&self.entries).values() {
            e.task.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl PodStatusWatch {
    /// A watch and the stream of sessions to reconcile when their pod reports a change.
    pub fn new(api: PodApi, wait: Duration, metrics: Arc<Metrics>) -> (Self, Trigger) {
        let (tx, rx) = mpsc::unbounded();
        let inner = Arc::new(Inner {
            api,
            wait,
            entries: Mutex::new(HashMap::new()),
            trigger: tx,
            metrics,
        });
        (Self { inner }, rx)
    }

    /// Polls `target` for `session` unless that exact poll already runs; replaces a poll
    /// of an earlier pod (or an earlier token).
    pub fn ensure(&self, session: &ObjectRef<WhatsAppSession>, target: PollTarget) {
        let mut entries = lock(&self.inner.entries);
        if let Some(e) = entries.get(session) {
            if e.target == target {
                return;
            }
            e.task.abort();
        }
        let span = info_span!("status_watch", session = %session.name, namespace = session.namespace.as_deref().unwrap_or(""), pod_ip = %target.ip);
        let task = tokio::spawn(
            poll_pod(Arc::downgrade(&self.inner), session.clone(), target.clone()).instrument(span),
        );
        entries.insert(
            session.clone(),
            Entry {
                target,
                report: PodReport::default(),
                task: task.abort_handle(),
            },
        );
        self.inner.metrics.set_status_watches(entries.len());
    }

    /// The last report about the pod with this uid; `None` when not watching that pod.
    pub fn report(&self, session: &ObjectRef<WhatsAppSession>, pod_uid: &str) -> Option<PodReport> {
        lock(&self.inner.entries)
            .get(session)
            .filter(|e| e.target.pod_uid == pod_uid)
            .map(|e| e.report.clone())
    }

    /// Stops polling for `session`.
    pub fn forget(&self, session: &ObjectRef<WhatsAppSession>) {
        let mut entries = lock(&self.inner.entries);
        if let Some(e) = entries.remove(session) {
            e.task.abort();
        }
        self.inner.metrics.set_status_watches(entries.len());
    }

    /// Stops every poll (leadership lost, shutdown).
    pub fn clear(&self) {
        let mut entries = lock(&self.inner.entries);
        for e in entries.values() {
            e.task.abort();
        }
        entries.clear();
        self.inner.metrics.set_status_watches(0);
    }

    pub fn len(&self) -> usize {
        lock(&self.inner.entries).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inner {
    /// Keeps a poll's outcome; true when the session should be reconciled.
    fn record(
        &self,
        session: &ObjectRef<WhatsAppSession>,
        pod_uid: &str,
        outcome: Outcome<'_>,
    ) -> bool {
        let mut entries = lock(&self.entries);
        let Some(e) = entries
            .get_mut(session)
            .filter(|e| e.target.pod_uid == pod_uid)
        else {
            return false;
        };
        let before = e.report.clone();
        match outcome {
            Outcome::Status(s) => {
                e.report.status = Some(s.clone());
                e.report.error = None;
            }
            Outcome::Failing(err) => e.report.error = Some(err.to_string()),
        }
        e.report != before
    }
}

enum Outcome<'a> {
    Status(&'a wa_api::pod::PodStatus),
    Failing(&'a PodApiError),
}

/// Delay before retry `n` (1-based) of a failing poll.
fn retry_delay(n: u32) -> Duration {
    Duration::from_secs(1u64 << n.saturating_sub(1).min(5)).min(Duration::from_secs(30))
}

async fn poll_pod(inner: Weak<Inner>, session: ObjectRef<WhatsAppSession>, target: PollTarget) {
    let mut after: Option<u64> = None;
    let mut failures = 0u32;
    loop {
        let Some((api, wait)) = inner.upgrade().map(|i| (i.api.clone(), i.wait)) else {
            return;
        };
        let asked = Instant::now();
        let result = api.status(target.ip, &target.token, after, wait).await;
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let outcome = match &result {
            Ok(s) => Some(Outcome::Status(s)),
            // One failed poll is often a blip (a connection reset); the second is news.
            Err(e @ PodApiError::Unauthorized) => Some(Outcome::Failing(e)),
            Err(e) if failures >= 1 => Some(Outcome::Failing(e)),
            Err(_) => None,
        };
        if let Some(outcome) = outcome
            && strong.record(&session, &target.pod_uid, outcome)
        {
            let _ = strong.trigger.unbounded_send(session.clone());
        }
        drop(strong);
        match result {
            Ok(status) => {
                failures = 0;
                let unchanged = after == Some(status.version);
                after = Some(status.version);
                // A pod that answers at once without a change does not hold long polls;
                // do not spin on it.
                if unchanged && asked.elapsed() < Duration::from_secs(1) {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            Err(e) => {
                failures += 1;
                let delay = retry_delay(failures);
                debug!(error = %e, ?delay, "status poll failed");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::{Query, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::{IntoResponse, Response};
    use axum::routing::get;
    use axum::{Json, Router};
    use futures::StreamExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::watch;
    use wa_api::pod::PodStatus;
    use wa_api::{Engine, ErrorBody, ErrorCode, Phase};

    /// A stand-in for the session pod's status route, following `wa_api::pod`'s contract:
    /// with `after`, hold until the version differs or `waitSeconds` pass.
    #[derive(Clone)]
    struct FakePod {
        status: watch::Sender<PodStatus>,
        token: String,
        requests: Arc<AtomicUsize>,
        long_polls: Arc<AtomicUsize>,
    }

    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Q {
        after: Option<u64>,
        wait_seconds: Option<u64>,
    }

    async fn status_route(
        State(pod): State<FakePod>,
        headers: HeaderMap,
        Query(q): Query<Q>,
    ) -> Response {
        pod.requests.fetch_add(1, Ordering::SeqCst);
        let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
        if auth != Some(&format!("Bearer {}", pod.token)) {
            let body = ErrorBody::new(ErrorCode::Unauthorized, "bad token");
            return (StatusCode::UNAUTHORIZED, Json(body)).into_response();
        }
        let mut rx = pod.status.subscribe();
        if let Some(after) = q.after {
            pod.long_polls.fetch_add(1, Ordering::SeqCst);
            let wait = Duration::from_secs(q.wait_seconds.unwrap_or(0));
            let _ = tokio::time::timeout(wait, rx.wait_for(|s| s.version != after)).await;
        }
        let current = rx.borrow().clone();
        Json(current).into_response()
    }

    fn pod_status(phase: Phase, version: u64) -> PodStatus {
        PodStatus {
            session: "s".into(),
            engine: Engine::Sandbox,
            phase,
            account: None,
            since: chrono::Utc::now(),
            last_error: None,
            pair_code: None,
            version,
        }
    }

    async fn start_fake_pod(token: &str) -> (FakePod, std::net::SocketAddr) {
        let (tx, _) = watch::channel(pod_status(Phase::AwaitingScan, 1));
        let pod = FakePod {
            status: tx,
            token: token.into(),
            requests: Arc::default(),
            long_polls: Arc::default(),
        };
        let app = Router::new()
            .route("/v1/status", get(status_route))
            .with_state(pod.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (pod, addr)
    }

    fn session() -> ObjectRef<WhatsAppSession> {
        ObjectRef::new("s").within("ns")
    }

    fn target(addr: std::net::SocketAddr, token: &str) -> PollTarget {
        PollTarget {
            pod_uid: "pod-1".into(),
            ip: addr.ip(),
            token: token.into(),
        }
    }

    async fn next_trigger(rx: &mut Trigger) -> ObjectRef<WhatsAppSession> {
        tokio::time::timeout(Duration::from_secs(10), rx.next())
            .await
            .expect("no reconcile trigger within 10 s")
            .expect("trigger stream ended")
    }

    #[tokio::test]
    async fn a_phase_change_in_the_pod_triggers_a_reconcile_through_the_long_poll() {
        let (pod, addr) = start_fake_pod("tok").await;
        let metrics = Arc::new(Metrics::default());
        let (watch, mut rx) = PodStatusWatch::new(
            PodApi::new(addr.port()),
            Duration::from_secs(30),
            metrics.clone(),
        );
        watch.ensure(&session(), target(addr, "tok"));
        assert_eq!(next_trigger(&mut rx).await, session());
        let report = watch.report(&session(), "pod-1").unwrap();
        assert_eq!(report.status.unwrap().phase, Phase::AwaitingScan);
        assert_eq!(
            watch.report(&session(), "another-pod"),
            None,
            "a report is only about its own pod"
        );

        // The pod is now holding our long poll (after=1, 30 s); a change answers it at once.
        let deadline = Instant::now() + Duration::from_secs(10);
        while pod.long_polls.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "the watch never long-polled");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        pod.status.send_replace(pod_status(Phase::Connected, 2));
        assert_eq!(next_trigger(&mut rx).await, session());
        assert_eq!(
            watch
                .report(&session(), "pod-1")
                .unwrap()
                .status
                .unwrap()
                .phase,
            Phase::Connected
        );
        assert_eq!(
            metrics
                .render()
                .lines()
                .find(|l| l.starts_with("wa_operator_status_watches ")),
            Some("wa_operator_status_watches 1")
        );

        // A restarted pod starts its versions again; a lower version is a change too.
        pod.status.send_replace(pod_status(Phase::Starting, 1));
        assert_eq!(next_trigger(&mut rx).await, session());
        assert_eq!(
            watch
                .report(&session(), "pod-1")
                .unwrap()
                .status
                .unwrap()
                .phase,
            Phase::Starting
        );
    }

    #[tokio::test]
    async fn a_wrong_token_is_reported_at_once() {
        let (_pod, addr) = start_fake_pod("right").await;
        let (watch, mut rx) = PodStatusWatch::new(
            PodApi::new(addr.port()),
            Duration::from_secs(30),
            Arc::default(),
        );
        watch.ensure(&session(), target(addr, "wrong"));
        next_trigger(&mut rx).await;
        let report = watch.report(&session(), "pod-1").unwrap();
        assert_eq!(report.status, None);
        assert_eq!(
            report.error.as_deref(),
            Some("the session pod rejected the operator's token (401)")
        );
    }

    #[tokio::test]
    async fn an_unreachable_pod_is_reported_and_forget_stops_the_poll() {
        // A port nobody listens on: bind, note it, close.
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let (watch, mut rx) = PodStatusWatch::new(
            PodApi::new(addr.port()),
            Duration::from_secs(30),
            Arc::default(),
        );
        watch.ensure(&session(), target(addr, "tok"));
        next_trigger(&mut rx).await;
        let err = watch.report(&session(), "pod-1").unwrap().error.unwrap();
        assert!(err.starts_with("cannot reach the session pod"), "{err}");
        watch.forget(&session());
        assert!(watch.is_empty());
        assert_eq!(watch.report(&session(), "pod-1"), None);
    }

    #[tokio::test]
    async fn ensure_is_idempotent_and_a_new_pod_replaces_the_poll() {
        let (pod, addr) = start_fake_pod("tok").await;
        let (watch, mut rx) = PodStatusWatch::new(
            PodApi::new(addr.port()),
            Duration::from_secs(30),
            Arc::default(),
        );
        watch.ensure(&session(), target(addr, "tok"));
        next_trigger(&mut rx).await;
        for _ in 0..5 {
            watch.ensure(&session(), target(addr, "tok"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        // One plain GET and one held long poll: repeated ensures did not start more polls.
        assert_eq!(pod.requests.load(Ordering::SeqCst), 2);
        let new_pod = PollTarget {
            pod_uid: "pod-2".into(),
            ..target(addr, "tok")
        };
        watch.ensure(&session(), new_pod);
        assert_eq!(watch.report(&session(), "pod-1"), None);
        next_trigger(&mut rx).await;
        assert!(watch.report(&session(), "pod-2").unwrap().status.is_some());
        assert_eq!(watch.len(), 1);
    }

    #[test]
    fn retry_delays_are_capped() {
        let d: Vec<u64> = (1..=8).map(|n| retry_delay(n).as_secs()).collect();
        assert_eq!(d, [1, 2, 4, 8, 16, 30, 30, 30]);
    }
}
