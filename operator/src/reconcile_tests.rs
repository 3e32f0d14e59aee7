//! Reconcile tests against the fake API (`crate::testing`): what the reconciler writes, in
//! which order, and what the objects look like afterwards.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::StreamExt;
use kube::runtime::events::Reporter;
use serde_json::{Value, json};
use wa_api::pod::env;

use super::*;
use crate::status_watch::Trigger;
use crate::testing::FakeApi;

const NS: &str = "wa";
const SESSION_UID: &str = "session-uid";

struct Env {
    fake: FakeApi,
    ctx: Arc<Context>,
    trigger: Trigger,
}

fn timing() -> Timing {
    Timing {
        logout_timeout: Duration::from_millis(500),
        recreate_backoff: Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(4),
        },
        ..Timing::default()
    }
}

/// Port 1: nothing listens there, so status polls of "ready" pods fail quietly.
fn env() -> Env {
    env_with_pod_port(1)
}

fn env_with_pod_port(port: u16) -> Env {
    let (client, fake) = FakeApi::start();
    env_from(client, fake, port)
}

fn env_from(client: Client, fake: FakeApi, port: u16) -> Env {
    let metrics = Arc::new(Metrics::default());
    let (watch, trigger) =
        PodStatusWatch::new(PodApi::new(port), Duration::from_secs(5), metrics.clone());
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "wa-operator".into(),
            instance: Some("test".into()),
        },
    );
    let ctx = Arc::new(Context::new(
        client,
        recorder,
        metrics,
        PodSettings::new(
            "ghcr.io/wa-operator/wa-session:test",
            Some("http://gw.wa:8080"),
        ),
        PodApi::new(port),
        watch,
        timing(),
    ));
    Env { fake, ctx, trigger }
}

fn session_json(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "wa-operator.dev/v1alpha1",
        "kind": "WhatsAppSession",
        "metadata": {"name": name, "namespace": NS, "uid": SESSION_UID, "generation": 1,
                     "finalizers": [names::FINALIZER]},
        "spec": spec,
    })
}

impl Env {
    fn put_session(&self, name: &str, spec: Value) {
        self.fake.put(session_json(name, spec));
    }

    fn session(&self, name: &str) -> Option<WhatsAppSession> {
        self.fake.get_as("whatsappsessions", NS, name)
    }

    fn status(&self, name: &str) -> WhatsAppSessionStatus {
        self.session(name).unwrap().status.unwrap_or_default()
    }

    fn pod(&self, name: &str) -> Option<Pod> {
        self.fake.get_as("pods", NS, &names::pod_name(name))
    }

    fn pvc(&self, name: &str) -> Option<PersistentVolumeClaim> {
        self.fake
            .get_as("persistentvolumeclaims", NS, &names::pvc_name(name))
    }

    fn secret(&self, name: &str) -> Option<Secret> {
        self.fake.get_as("secrets", NS, &names::secret_name(name))
    }

    async fn reconcile(&self, name: &str) -> Result<Action, Error> {
        let s = self.session(name).expect("session exists");
        reconcile(Arc::new(s), self.ctx.clone()).await
    }

    /// The kubelet reports the pod running and ready at `ip`.
    fn mark_ready(&self, name: &str, ip: &str) {
        self.fake.edit("pods", NS, &names::pod_name(name), |p| {
            p["status"] = json!({"phase": "Running", "podIP": ip,
                                 "conditions": [{"type": "Ready", "status": "True"}]});
        });
    }

    fn edit_spec(&self, name: &str, f: impl FnOnce(&mut Value)) {
        self.fake.edit("whatsappsessions", NS, name, |s| {
            f(&mut s["spec"]);
            let g = s["metadata"]["generation"].as_i64().unwrap();
            s["metadata"]["generation"] = json!(g + 1);
        });
    }

    fn delete_session(&self, name: &str) {
        self.fake.edit("whatsappsessions", NS, name, |s| {
            s["metadata"]["deletionTimestamp"] = json!("2025-01-01T00:00:00Z");
        });
    }

    fn condition(&self, name: &str, type_: &str) -> (String, String, Option<i64>) {
        let st = self.status(name);
        let c = st
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .unwrap_or_else(|| panic!("no {type_} condition"));
        (c.status.clone(), c.reason.clone(), c.observed_generation)
    }
}

fn env_var(pod: &Pod, name: &str) -> Option<String> {
    pod.spec.as_ref()?.containers[0]
        .env
        .as_ref()?
        .iter()
        .find(|e| e.name == name)?
        .value
        .clone()
}

/// Brings a new session to "pod created" and clears the call log.
async fn created(e: &Env, name: &str, spec: Value) {
    e.put_session(name, spec);
    e.reconcile(name).await.unwrap();
    assert!(e.pod(name).is_some(), "pod was not created");
    e.fake.clear_calls();
}

#[tokio::test]
async fn first_apply_adds_the_finalizer_then_creates_secret_pvc_pod_and_status() {
    let e = env();
    let mut s = session_json("support", json!({"engine": "sandbox"}));
    s["metadata"].as_object_mut().unwrap().remove("finalizers");
    e.fake.put(s);

    // 1st pass: only the finalizer (the finalizer must be in place before anything exists).
    assert_eq!(
        e.reconcile("support").await.unwrap(),
        Action::await_change()
    );
    assert_eq!(e.fake.writes(), ["patch whatsappsessions/support"]);
    assert_eq!(
        e.session("support").unwrap().metadata.finalizers,
        Some(vec![names::FINALIZER.to_owned()])
    );
    e.fake.clear_calls();

    // 2nd pass: the children, then the status.
    assert_eq!(
        e.reconcile("support").await.unwrap(),
        Action::requeue(Duration::from_secs(300))
    );
    assert_eq!(
        e.fake.writes(),
        [
            "create secrets/",
            "patch persistentvolumeclaims/wa-support-auth",
            "patch pods/wa-support",
            "create events/",
            "patch whatsappsessions/status/support",
        ]
    );
    assert_eq!(e.fake.event_reasons(), ["Created"]);
    // Server-side apply under the one field manager, for every apply.
    for c in e.fake.calls().iter().filter(|c| c.verb == "patch") {
        assert_eq!(
            c.content_type.as_deref(),
            Some("application/apply-patch+yaml"),
            "{}",
            c.short()
        );
        assert!(
            c.query.contains("fieldManager=wa-operator") && c.query.contains("force=true"),
            "{}",
            c.query
        );
    }
    let secret_call = e
        .fake
        .calls()
        .into_iter()
        .find(|c| c.resource == "secrets" && c.verb == "create")
        .unwrap();
    assert!(
        secret_call.query.contains("fieldManager=wa-operator"),
        "{}",
        secret_call.query
    );

    let token = token_of(&e.secret("support").unwrap()).unwrap();
    assert_eq!(token.len(), 64);
    let pvc = e.pvc("support").unwrap();
    assert_eq!(
        pvc.metadata.owner_references, None,
        "retained by default: no owner"
    );
    let pod = e.pod("support").unwrap();
    assert_eq!(env_var(&pod, env::ENGINE).as_deref(), Some("sandbox"));
    assert_eq!(pod.owner_references()[0].uid, SESSION_UID);
    assert!(pod_spec_hash(&pod).is_some());

    let st = e.status("support");
    assert_eq!(st.phase, Some(Phase::Starting));
    assert_eq!(st.pod_name.as_deref(), Some("wa-support"));
    assert_eq!(st.observed_generation, Some(1));
    assert_eq!(
        e.condition("support", "Ready"),
        ("False".into(), "PodStarting".into(), Some(1))
    );
    assert_eq!(e.ctx.metrics.pods_created(), 1);
    e.fake.assert_rbac();

    // 3rd pass, nothing changed: nothing is written (1,000 sessions resync quietly).
    e.fake.clear_calls();
    e.reconcile("support").await.unwrap();
    assert_eq!(e.fake.writes(), Vec::<String>::new());
    assert_eq!(
        token_of(&e.secret("support").unwrap()).unwrap(),
        token,
        "the token never rotates"
    );
}

#[tokio::test]
async fn pod_recreated_after_deletion_with_backoff() {
    let e = env();
    created(&e, "s", json!({})).await;
    e.mark_ready("s", "127.0.0.1");
    e.reconcile("s").await.unwrap();

    // Someone deletes the pod.
    e.fake.remove("pods", NS, "wa-s");
    e.fake.clear_calls();
    e.reconcile("s").await.unwrap();
    assert!(e.pod("s").is_some(), "pod recreated");
    assert_eq!(e.fake.event_reasons(), ["Recreated"]);
    assert_eq!(e.ctx.metrics.pods_recreated(), 1);

    // Lost again before it ever became ready: the next recreation waits (backoff).
    e.fake.remove("pods", NS, "wa-s");
    e.fake.clear_calls();
    let action = e.reconcile("s").await.unwrap();
    assert!(e.pod("s").is_none(), "recreated without backoff");
    assert!(!e.fake.writes().iter().any(|w| w.starts_with("patch pods")));
    assert_ne!(
        action,
        Action::requeue(Duration::from_secs(300)),
        "requeues for the end of the backoff"
    );
    let msg = e.status("s").message.unwrap();
    assert!(msg.contains("recreating in"), "{msg}");

    // After the backoff it is recreated (attempt 2).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    e.reconcile("s").await.unwrap();
    assert!(e.pod("s").is_some());
    assert_eq!(e.ctx.metrics.pods_recreated(), 2);
    // The recorder folds the repeat into the first event's series (a patch, not a create).
    assert_eq!(e.fake.event_reasons(), ["Recreated"]);
    assert!(
        e.fake
            .calls()
            .iter()
            .any(|c| c.resource == "events" && c.verb == "patch")
    );

    // Once it has been ready, a loss is recreated at once again.
    e.mark_ready("s", "127.0.0.1");
    e.reconcile("s").await.unwrap();
    e.fake.remove("pods", NS, "wa-s");
    e.reconcile("s").await.unwrap();
    assert!(e.pod("s").is_some());
    assert_eq!(e.ctx.metrics.pods_recreated(), 3);
    e.fake.assert_rbac();
}

#[tokio::test]
async fn a_lost_pod_is_recognised_after_an_operator_restart() {
    // No memory (fresh context), but the status says a pod ran: that is a recreation.
    let e = env();
    let mut s = session_json("s", json!({}));
    s["status"] = json!({"phase": "Connected", "podName": "wa-s"});
    e.fake.put(s);
    e.reconcile("s").await.unwrap();
    assert_eq!(e.fake.event_reasons(), ["Recreated"]);
    assert_eq!(e.ctx.metrics.pods_recreated(), 1);
}

#[tokio::test]
async fn a_failed_pod_is_deleted_reported_and_recreated() {
    let e = env();
    created(&e, "s", json!({})).await;
    e.fake.edit("pods", NS, "wa-s", |p| {
        p["status"] =
            json!({"phase": "Failed", "reason": "Evicted", "message": "node low on memory"});
    });
    e.reconcile("s").await.unwrap();
    assert_eq!(e.fake.writes()[0], "delete pods/wa-s");
    assert_eq!(e.status("s").phase, Some(Phase::Failed));
    assert!(e.status("s").message.unwrap().contains("Evicted"));
    assert!(
        e.fake.event_reasons().contains(&"PodFailed".to_owned()),
        "{:?}",
        e.fake.event_reasons()
    );
    e.reconcile("s").await.unwrap();
    assert!(e.pod("s").is_some());
    assert_eq!(e.ctx.metrics.pods_recreated(), 1);
    assert!(e.fake.event_reasons().contains(&"Recreated".to_owned()));
}

#[tokio::test]
async fn spec_change_rolls_the_pod_delete_then_create_and_keeps_the_pvc() {
    let e = env();
    e.fake.graceful_pod_deletion(true);
    created(&e, "s", json!({"engine": "whatsapp"})).await;
    e.mark_ready("s", "127.0.0.1");
    e.reconcile("s").await.unwrap();
    let old = e.pod("s").unwrap();
    let pvc_uid = e.pvc("s").unwrap().metadata.uid;

    e.edit_spec("s", |spec| spec["engine"] = json!("sandbox"));
    e.fake.clear_calls();
    e.reconcile("s").await.unwrap();
    // Delete only: the new pod waits until the old one is gone (never two).
    let writes = e.fake.writes();
    assert_eq!(writes[0], "delete pods/wa-s");
    assert!(!writes.iter().any(|w| w == "patch pods/wa-s"), "{writes:?}");
    let delete = e
        .fake
        .calls()
        .into_iter()
        .find(|c| c.verb == "delete")
        .unwrap();
    assert_eq!(
        delete.body.unwrap()["preconditions"]["uid"],
        json!(old.metadata.uid),
        "deletes exactly the pod it saw"
    );
    assert_eq!(e.fake.event_reasons(), ["Rolled"]);

    // Still terminating: nothing created.
    e.fake.clear_calls();
    let action = e.reconcile("s").await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(2)));
    assert!(!e.fake.writes().iter().any(|w| w.starts_with("patch pods")));
    assert_eq!(e.status("s").phase, Some(Phase::Starting));

    // The kubelet finished: the new pod comes, with the new spec; the PVC is the same one.
    e.fake.finish_pod_deletion(NS, "wa-s");
    e.fake.clear_calls();
    e.reconcile("s").await.unwrap();
    let new = e.pod("s").unwrap();
    assert_eq!(env_var(&new, env::ENGINE).as_deref(), Some("sandbox"));
    assert_ne!(pod_spec_hash(&new), pod_spec_hash(&old));
    assert_eq!(e.pvc("s").unwrap().metadata.uid, pvc_uid);
    assert_eq!(e.fake.event_reasons(), ["Created"]);
    assert_eq!(
        (e.ctx.metrics.pods_rolled(), e.ctx.metrics.pods_recreated()),
        (1, 0)
    );
    assert_eq!(e.status("s").observed_generation, Some(2));
    e.fake.assert_rbac();
}

#[tokio::test]
async fn a_restarted_operator_waits_for_a_terminating_pod_instead_of_creating_one() {
    // The previous operator process deleted the pod to roll it and died; the pod is still
    // stopping. A fresh operator (no memory) must not create, nor apply over it.
    let first = env();
    first.fake.graceful_pod_deletion(true);
    created(&first, "s", json!({})).await;
    first.edit_spec("s", |spec| spec["engine"] = json!("sandbox"));
    first.reconcile("s").await.unwrap();
    assert!(
        first
            .pod("s")
            .unwrap()
            .metadata
            .deletion_timestamp
            .is_some()
    );

    let restarted = env_from(first.fake.client(), first.fake.clone(), 1);
    restarted.fake.clear_calls();
    for _ in 0..3 {
        assert_eq!(
            restarted.reconcile("s").await.unwrap(),
            Action::requeue(Duration::from_secs(2))
        );
    }
    assert!(
        restarted.fake.writes().iter().all(|w| !w.contains("pods/")),
        "{:?}",
        restarted.fake.writes()
    );
    restarted.fake.finish_pod_deletion(NS, "wa-s");
    restarted.reconcile("s").await.unwrap();
    assert_eq!(
        env_var(&restarted.pod("s").unwrap(), env::ENGINE).as_deref(),
        Some("sandbox")
    );
}

#[tokio::test]
async fn a_pod_of_an_earlier_object_with_the_same_name_is_replaced() {
    let e = env();
    e.put_session("s", json!({}));
    e.fake.put(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "wa-s", "namespace": NS,
                     "ownerReferences": [{"apiVersion": "wa-operator.dev/v1alpha1", "kind": "WhatsAppSession",
                                          "name": "s", "uid": "old-uid", "controller": true}]},
        "spec": {"containers": [{"name": "session", "image": "x"}]}}));
    e.reconcile("s").await.unwrap();
    assert_eq!(e.fake.event_reasons(), ["Rolled"]);
    assert!(e.fake.event_notes("Rolled")[0].contains("earlier object"));
    assert!(e.pod("s").is_none());
}

#[tokio::test]
async fn suspend_removes_the_pod_keeps_the_pvc_and_resume_recreates_it() {
    let e = env();
    created(&e, "s", json!({})).await;
    e.mark_ready("s", "127.0.0.1");
    e.reconcile("s").await.unwrap();

    e.edit_spec("s", |spec| spec["suspend"] = json!(true));
    e.fake.clear_calls();
    e.reconcile("s").await.unwrap();
    assert_eq!(e.fake.writes()[0], "delete pods/wa-s");
    assert_eq!(e.fake.event_reasons(), ["Suspended"]);
    assert!(e.pod("s").is_none());
    assert!(e.pvc("s").is_some(), "the auth volume stays");
    assert_eq!(e.status("s").phase, Some(Phase::Suspended));
    assert_eq!(
        e.condition("s", "Ready"),
        ("False".into(), "Suspended".into(), Some(2))
    );

    // Suspended and settled: nothing to do, no pod created.
    e.fake.clear_calls();
    e.reconcile("s").await.unwrap();
    assert!(e.pod("s").is_none());
    assert_eq!(
        e.status("s").message.as_deref(),
        Some("suspended; the auth volume is kept")
    );

    e.edit_spec("s", |spec| spec["suspend"] = json!(false));
    e.fake.clear_calls();
    e.reconcile("s").await.unwrap();
    assert!(e.pod("s").is_some());
    assert_eq!(e.fake.event_reasons(), ["Resumed"]);
    assert_eq!(
        e.ctx.metrics.pods_recreated(),
        0,
        "resuming is not a recreation"
    );
}

#[tokio::test]
async fn delete_with_retained_pvc_removes_pod_and_secret_but_not_the_claim() {
    let e = env();
    created(&e, "s", json!({"storage": {"retainOnDelete": true}})).await;
    e.delete_session("s");
    e.reconcile("s").await.unwrap();
    assert_eq!(
        e.fake.writes(),
        [
            "delete pods/wa-s",
            "delete secrets/wa-s-token",
            "patch whatsappsessions/s"
        ],
        "pod, secret, then the finalizer"
    );
    assert!(e.session("s").is_none(), "finalizer removed, object gone");
    assert!(e.pod("s").is_none() && e.secret("s").is_none());
    let pvc = e.pvc("s").unwrap();
    assert_eq!(
        pvc.metadata.owner_references, None,
        "nothing will garbage-collect it"
    );
    e.fake.assert_rbac();

    // Re-created with the same name, the session finds its volume again.
    e.put_session("s", json!({}));
    e.reconcile("s").await.unwrap();
    assert_eq!(e.pvc("s").unwrap().metadata.uid, pvc.metadata.uid);
}

#[tokio::test]
async fn a_deletion_already_finished_is_not_cleaned_up_twice() {
    let e = env();
    created(&e, "s", json!({"logoutOnDelete": true})).await;
    e.delete_session("s");
    // The controller's cache still has the deleting object after clean-up removed it.
    let stale = Arc::new(e.session("s").unwrap());
    e.reconcile("s").await.unwrap();
    assert!(e.session("s").is_none());
    e.fake.clear_calls();
    assert_eq!(
        reconcile(stale, e.ctx.clone()).await.unwrap(),
        Action::await_change()
    );
    assert_eq!(
        e.fake.writes(),
        Vec::<String>::new(),
        "no second log-out, no events, no finalizer patch"
    );
    let read = e.fake.calls();
    assert_eq!(read.len(), 1);
    assert_eq!(
        (read[0].verb, read[0].resource.as_str()),
        ("list", "whatsappsessions")
    );
    assert!(
        read[0].query.contains("fieldSelector=metadata.name%3Ds"),
        "{}",
        read[0].query
    );

    // A new object with the same name is not confused with the deleted one.
    e.put_session("s", json!({}));
    e.fake.clear_calls();
    e.fake.edit("whatsappsessions", NS, "s", |s| {
        s["metadata"]["uid"] = json!("another-uid")
    });
    assert_eq!(
        reconcile(
            Arc::new({
                let mut s = e.session("s").unwrap();
                s.metadata.uid = Some(SESSION_UID.into());
                s.metadata.deletion_timestamp = Some(
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now()),
                );
                s
            }),
            e.ctx.clone()
        )
        .await
        .unwrap(),
        Action::await_change()
    );
    assert_eq!(
        e.fake.writes(),
        Vec::<String>::new(),
        "the new object is left alone"
    );
}

#[tokio::test]
async fn delete_with_deleted_pvc() {
    let e = env();
    created(&e, "s", json!({"storage": {"retainOnDelete": false}})).await;
    assert_eq!(
        e.pvc("s").unwrap().owner_references()[0].uid,
        SESSION_UID,
        "owned when not retained"
    );
    e.delete_session("s");
    e.reconcile("s").await.unwrap();
    assert_eq!(
        e.fake.writes(),
        [
            "delete pods/wa-s",
            "delete persistentvolumeclaims/wa-s-auth",
            "delete secrets/wa-s-token",
            "patch whatsappsessions/s"
        ]
    );
    assert!(e.pvc("s").is_none());
    assert!(e.session("s").is_none());
}

#[tokio::test]
async fn retention_switched_on_before_deletion_drops_the_owner_reference() {
    let e = env();
    created(&e, "s", json!({"storage": {"retainOnDelete": false}})).await;
    // The spec changes and the object is deleted before a reconcile saw the change.
    e.fake.edit("whatsappsessions", NS, "s", |s| {
        s["spec"]["storage"]["retainOnDelete"] = json!(true);
        s["metadata"]["deletionTimestamp"] = json!("2025-01-01T00:00:00Z");
    });
    e.reconcile("s").await.unwrap();
    let pvc = e.pvc("s").expect("claim kept");
    assert!(
        pvc.owner_references().is_empty(),
        "{:?}",
        pvc.metadata.owner_references
    );
    let patch = e
        .fake
        .calls()
        .into_iter()
        .find(|c| c.resource == "persistentvolumeclaims" && c.verb == "patch")
        .unwrap();
    assert_eq!(
        patch.content_type.as_deref(),
        Some("application/merge-patch+json")
    );
    assert!(
        patch.body.unwrap()["metadata"]["resourceVersion"].is_string(),
        "optimistic concurrency"
    );
}

#[tokio::test]
async fn flipping_retention_while_running_moves_the_owner_reference() {
    let e = env();
    created(&e, "s", json!({"storage": {"retainOnDelete": true}})).await;
    e.edit_spec("s", |spec| {
        spec["storage"] = json!({"retainOnDelete": false})
    });
    e.reconcile("s").await.unwrap();
    assert_eq!(e.pvc("s").unwrap().owner_references()[0].uid, SESSION_UID);
    e.edit_spec("s", |spec| {
        spec["storage"] = json!({"retainOnDelete": true})
    });
    e.reconcile("s").await.unwrap();
    assert!(e.pvc("s").unwrap().owner_references().is_empty());
    assert!(
        e.fake
            .writes()
            .iter()
            .all(|w| !w.starts_with("delete pods")),
        "storage changes do not roll the pod"
    );
}

/// A stand-in session pod: answers `/v1/status` and `/v1/logout`, checks the bearer token.
struct PodServer {
    addr: SocketAddr,
    logouts: Arc<AtomicUsize>,
    status: Arc<Mutex<Value>>,
}

async fn pod_server(
    token: Arc<Mutex<String>>,
    logout_delay: Duration,
    fake: Option<FakeApi>,
) -> PodServer {
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    use axum::routing::{get, post};
    use axum::{Json, Router};
    type S = (
        Arc<Mutex<String>>,
        Arc<AtomicUsize>,
        Arc<Mutex<Value>>,
        Duration,
        Option<FakeApi>,
    );
    fn authorized(headers: &HeaderMap, token: &Mutex<String>) -> bool {
        headers.get("authorization").and_then(|v| v.to_str().ok())
            == Some(&format!("Bearer {}", lock(token)))
    }
    let logouts = Arc::new(AtomicUsize::new(0));
    let status = Arc::new(Mutex::new(
        json!({"session": "s", "engine": "sandbox", "phase": "AwaitingScan",
        "since": "2025-01-01T00:00:00Z", "version": 1}),
    ));
    let state: S = (token, logouts.clone(), status.clone(), logout_delay, fake);
    let app = Router::new()
        .route(
            "/v1/status",
            get(|State(s): State<S>, h: HeaderMap| async move {
                if !authorized(&h, &s.0) {
                    return StatusCode::UNAUTHORIZED.into_response();
                }
                Json(lock(&s.2).clone()).into_response()
            }),
        )
        .route(
            "/v1/logout",
            post(|State(s): State<S>, h: HeaderMap| async move {
                if !authorized(&h, &s.0) {
                    return StatusCode::UNAUTHORIZED.into_response();
                }
                if let Some(fake) = &s.4 {
                    assert!(
                        fake.get("pods", NS, "wa-s").is_some(),
                        "logout must come before the pod is deleted"
                    );
                }
                tokio::time::sleep(s.3).await;
                s.1.fetch_add(1, Ordering::SeqCst);
                let mut st = lock(&s.2);
                st["phase"] = json!("LoggedOut");
                Json(st.clone()).into_response()
            }),
        )
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    PodServer {
        addr,
        logouts,
        status,
    }
}

/// A session whose ready pod is `server`, with the Secret's token known to it.
async fn with_ready_pod(spec: Value, logout_delay: Duration) -> (Env, PodServer) {
    let token = Arc::new(Mutex::new(String::new()));
    let (client_env, server) = {
        // The pod server must exist before the context (its port goes into PodApi).
        let server = pod_server(token.clone(), logout_delay, None).await;
        (env_with_pod_port(server.addr.port()), server)
    };
    created(&client_env, "s", spec).await;
    *lock(&token) = token_of(&client_env.secret("s").unwrap()).unwrap();
    client_env.mark_ready("s", "127.0.0.1");
    (client_env, server)
}

#[tokio::test]
async fn delete_with_logout_calls_the_pod_first() {
    let token = Arc::new(Mutex::new(String::new()));
    let (client, fake) = FakeApi::start();
    // The pod server looks into the fake API: the pod must still exist when it is asked.
    let server = pod_server(token.clone(), Duration::ZERO, Some(fake.clone())).await;
    let e = env_from(client, fake, server.addr.port());
    created(&e, "s", json!({"logoutOnDelete": true})).await;
    *lock(&token) = token_of(&e.secret("s").unwrap()).unwrap();
    e.mark_ready("s", "127.0.0.1");
    e.delete_session("s");
    e.reconcile("s").await.unwrap();
    assert_eq!(server.logouts.load(Ordering::SeqCst), 1);
    assert_eq!(e.fake.event_reasons(), ["LoggedOut"]);
    assert_eq!(
        e.fake.writes()[1],
        "delete pods/wa-s",
        "{:?}",
        e.fake.writes()
    );
    assert!(e.session("s").is_none());
    assert!(e.pod("s").is_none());
}

#[tokio::test]
async fn delete_with_logout_when_the_pod_is_gone_records_why_and_proceeds() {
    let e = env();
    created(&e, "s", json!({"logoutOnDelete": true})).await;
    e.fake.remove("pods", NS, "wa-s");
    e.delete_session("s");
    e.reconcile("s").await.unwrap();
    assert_eq!(e.fake.event_reasons(), ["LogoutSkipped"]);
    let note = &e.fake.event_notes("LogoutSkipped")[0];
    assert!(note.contains("no session pod is running"), "{note}");
    assert!(e.session("s").is_none(), "deletion proceeded");
}

#[tokio::test]
async fn delete_with_logout_is_bounded_in_time_when_the_pod_hangs() {
    let (e, server) =
        with_ready_pod(json!({"logoutOnDelete": true}), Duration::from_secs(30)).await;
    e.delete_session("s");
    let started = Instant::now();
    e.reconcile("s").await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(server.logouts.load(Ordering::SeqCst), 0);
    let note = &e.fake.event_notes("LogoutSkipped")[0];
    assert!(note.contains("did not answer within"), "{note}");
    assert!(e.session("s").is_none());
}

#[tokio::test]
async fn status_patch_carries_the_pod_report_and_observed_generation() {
    let (mut e, server) = with_ready_pod(json!({"engine": "sandbox"}), Duration::ZERO).await;
    e.edit_spec("s", |spec| spec["rateLimit"] = json!({"burst": 5}));
    e.fake.edit("whatsappsessions", NS, "s", |s| {
        s["metadata"]["generation"] = json!(7)
    });
    // Ready pod: the reconcile starts the status long poll; its first answer triggers a reconcile.
    e.reconcile("s").await.unwrap();
    let triggered = tokio::time::timeout(Duration::from_secs(10), e.trigger.next())
        .await
        .expect("no trigger")
        .unwrap();
    assert_eq!(triggered.name, "s");
    e.fake.clear_calls();
    e.reconcile("s").await.unwrap();
    let st = e.status("s");
    assert_eq!(st.phase, Some(Phase::AwaitingScan));
    assert_eq!(st.observed_generation, Some(7));
    assert_eq!(st.engine, Some(wa_api::Engine::Sandbox));
    assert_eq!(
        e.condition("s", "Ready"),
        ("True".into(), "PodReady".into(), Some(7))
    );
    assert_eq!(
        e.condition("s", "Paired"),
        ("False".into(), "AwaitingScan".into(), Some(7))
    );
    let patch = e
        .fake
        .calls()
        .into_iter()
        .find(|c| c.resource == "whatsappsessions/status")
        .unwrap();
    assert_eq!(
        patch.content_type.as_deref(),
        Some("application/apply-patch+yaml")
    );
    assert_eq!(
        patch.body.as_ref().unwrap()["apiVersion"],
        "wa-operator.dev/v1alpha1"
    );
    assert_eq!(patch.body.as_ref().unwrap()["kind"], "WhatsAppSession");

    // The phone scans: the pod's status moves on, the watch brings it, the status follows.
    {
        let mut s = lock(&server.status);
        s["phase"] = json!("Connected");
        s["account"] = json!({"jid": "15551234567@s.whatsapp.net", "pushName": "Desk"});
        s["version"] = json!(2);
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let _ = tokio::time::timeout(Duration::from_secs(2), e.trigger.next()).await;
        e.reconcile("s").await.unwrap();
        if e.status("s").phase == Some(Phase::Connected) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "status never became Connected: {:?}",
            e.status("s")
        );
    }
    assert_eq!(
        e.status("s").account.unwrap().jid,
        "15551234567@s.whatsapp.net"
    );
    assert_eq!(
        e.condition("s", "Connected"),
        ("True".into(), "Connected".into(), Some(7))
    );
    assert!(e.fake.event_reasons().contains(&"Connected".to_owned()));
}

/// Reconciles `s` (with `snapshot` when given, else the current object) after each trigger
/// until its phase is `want`.
async fn reconcile_until(e: &mut Env, want: Phase, snapshot: Option<&WhatsAppSession>) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let _ = tokio::time::timeout(Duration::from_secs(2), e.trigger.next()).await;
        let obj = snapshot.cloned().unwrap_or_else(|| e.session("s").unwrap());
        reconcile(Arc::new(obj), e.ctx.clone()).await.unwrap();
        if e.status("s").phase == Some(want) {
            return;
        }
        assert!(Instant::now() < deadline, "status never became {want:?}: {:?}", e.status("s"));
    }
}

/// An operator restart finds a Connected session with its ready pod: the new operator's
/// first reconcile has not heard from the pod yet and must not show the session as
/// Starting meanwhile (a flap of every session on every restart), then follows the pod.
#[tokio::test]
async fn a_restarted_operator_keeps_the_phase_until_the_pod_reports() {
    let (mut e, server) = with_ready_pod(json!({"engine": "sandbox"}), Duration::ZERO).await;
    {
        let mut st = lock(&server.status);
        st["phase"] = json!("Connected");
        st["account"] = json!({"jid": "15551234567@s.whatsapp.net"});
    }
    e.reconcile("s").await.unwrap();
    reconcile_until(&mut e, Phase::Connected, None).await;

    // The restart: a new context (no memory, no status watches) on the same objects.
    let restarted = env_from(e.ctx.client.clone(), e.fake.clone(), server.addr.port());
    let mut e = Env { trigger: restarted.trigger, ctx: restarted.ctx, fake: e.fake };
    e.fake.clear_calls();
    e.reconcile("s").await.unwrap();
    assert_eq!(e.status("s").phase, Some(Phase::Connected), "regressed before the pod answered");
    assert!(
        !e.fake.calls().iter().any(|c| c.resource == "whatsappsessions/status"),
        "a status was written without a report from the pod: {:?}",
        e.fake.writes()
    );
    // The pod's first answer reconciles again; the status stays Connected, and moves on
    // when the pod does.
    reconcile_until(&mut e, Phase::Connected, None).await;
    {
        let mut st = lock(&server.status);
        st["phase"] = json!("Reconnecting");
        st["version"] = json!(2);
    }
    reconcile_until(&mut e, Phase::Reconnecting, None).await;
}

/// The session object a reconcile gets comes from the watch cache and can lag the
/// operator's own status write. A phase that goes A → B → A while the cache still shows A
/// must still be written back to A (comparing with the cache alone would skip it).
#[tokio::test]
async fn a_stale_cache_does_not_hide_a_needed_status_write() {
    let (mut e, server) = with_ready_pod(json!({"engine": "sandbox"}), Duration::ZERO).await;
    e.reconcile("s").await.unwrap();
    reconcile_until(&mut e, Phase::AwaitingScan, None).await;
    let stale = e.session("s").unwrap();
    {
        let mut st = lock(&server.status);
        st["phase"] = json!("Reconnecting");
        st["version"] = json!(2);
    }
    reconcile_until(&mut e, Phase::Reconnecting, None).await;
    {
        let mut st = lock(&server.status);
        st["phase"] = json!("AwaitingScan");
        st["version"] = json!(3);
    }
    // Every reconcile from here on sees the stale object (status AwaitingScan).
    reconcile_until(&mut e, Phase::AwaitingScan, Some(&stale)).await;
}

#[tokio::test]
async fn a_token_changed_by_hand_rolls_the_pod() {
    let (e, _server) = with_ready_pod(json!({}), Duration::ZERO).await;
    // The pod knows a different token than the Secret (e.g. the Secret was edited by hand).
    e.fake.edit("secrets", NS, "wa-s-token", |s| {
        s["data"]["token"] = json!("b3RoZXI=")
    });
    let mut e = e;
    e.reconcile("s").await.unwrap();
    // The token changed, so the pod is rolled to pick it up.
    assert!(
        e.fake.event_reasons().contains(&"Rolled".to_owned()),
        "{:?}",
        e.fake.event_reasons()
    );
    let _ = &mut e.trigger;
}

#[tokio::test]
async fn error_policy_backs_off_exponentially_and_resets_on_success() {
    let e = env();
    e.put_session("s", json!({}));
    let s = Arc::new(e.session("s").unwrap());
    let err = Error::TokenUnreadable("x".into());
    let delays: Vec<Action> = (0..5)
        .map(|_| error_policy(s.clone(), &err, e.ctx.clone()))
        .collect();
    let want: Vec<Action> = [2, 4, 8, 16, 32]
        .iter()
        .map(|d| Action::requeue(Duration::from_secs(*d)))
        .collect();
    assert_eq!(delays, want);
    for _ in 0..10 {
        error_policy(s.clone(), &err, e.ctx.clone());
    }
    assert_eq!(
        error_policy(s.clone(), &err, e.ctx.clone()),
        Action::requeue(Duration::from_secs(300)),
        "capped"
    );

    // A failing reconcile counts as an error; a good one resets the backoff.
    e.fake.fail("get", "secrets", 500, "InternalError", 1);
    let result = e.reconcile("s").await;
    assert!(matches!(&result, Err(Error::Finalizer(_))), "{result:?}");
    assert!(
        result
            .unwrap_err()
            .to_string()
            .contains("get Secret wa-s-token")
    );
    assert_eq!(e.ctx.metrics.reconciles(), (0, 1));
    e.reconcile("s").await.unwrap();
    assert_eq!(e.ctx.metrics.reconciles(), (1, 1));
    assert_eq!(
        error_policy(s.clone(), &err, e.ctx.clone()),
        Action::requeue(Duration::from_secs(2))
    );

    // The failure is visible in `kubectl describe`.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !e
        .fake
        .event_reasons()
        .contains(&"ReconcileFailed".to_owned())
    {
        assert!(Instant::now() < deadline, "no ReconcileFailed event");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn invalid_spec_reports_failed_with_a_stable_code_and_creates_nothing() {
    let e = env();
    e.put_session("s", json!({"phoneNumber": "555"}));
    e.reconcile("s").await.unwrap();
    assert_eq!(
        e.fake.writes(),
        ["create events/", "patch whatsappsessions/status/s"]
    );
    let st = e.status("s");
    assert_eq!(st.phase, Some(Phase::Failed));
    assert!(
        st.message.as_deref().unwrap().contains("spec.phoneNumber")
            && st.message.unwrap().contains("INVALID_PHONE_NUMBER")
    );
    assert_eq!(
        e.condition("s", "Ready"),
        ("False".into(), "InvalidSpec".into(), Some(1))
    );
    assert_eq!(e.fake.event_reasons(), ["InvalidSpec"]);
    // Unchanged: no new event, no write.
    e.fake.clear_calls();
    e.reconcile("s").await.unwrap();
    assert_eq!(e.fake.writes(), Vec::<String>::new());

    // Fixed: it runs.
    e.edit_spec("s", |spec| spec["phoneNumber"] = json!("+15551234567"));
    e.reconcile("s").await.unwrap();
    let pod = e.pod("s").unwrap();
    assert_eq!(
        env_var(&pod, env::PHONE_NUMBER).as_deref(),
        Some("+15551234567")
    );
}

#[tokio::test]
async fn a_name_too_long_for_derived_objects_is_refused() {
    let e = env();
    let name = "a".repeat(54);
    e.put_session(&name, json!({}));
    e.reconcile(&name).await.unwrap();
    assert!(
        e.status(&name)
            .message
            .unwrap()
            .contains("INVALID_SESSION_NAME")
    );
    assert!(
        e.fake
            .calls()
            .iter()
            .all(|c| c.resource != "pods" && c.resource != "secrets")
    );
    // Deleting it needs no clean-up.
    e.delete_session(&name);
    e.reconcile(&name).await.unwrap();
    assert!(e.session(&name).is_none());
}

#[tokio::test]
async fn an_unusable_token_secret_is_repaired_and_the_pod_rolled() {
    let e = env();
    created(&e, "s", json!({})).await;
    let hash = pod_spec_hash(&e.pod("s").unwrap()).unwrap().to_owned();
    e.fake
        .edit("secrets", NS, "wa-s-token", |s| s["data"] = json!({}));
    e.reconcile("s").await.unwrap();
    let token = token_of(&e.secret("s").unwrap()).expect("a new token");
    assert_eq!(token.len(), 64);
    let reasons = e.fake.event_reasons();
    assert!(
        reasons.contains(&"TokenReplaced".to_owned()) && reasons.contains(&"Rolled".to_owned()),
        "{reasons:?}"
    );
    e.reconcile("s").await.unwrap();
    assert_ne!(pod_spec_hash(&e.pod("s").unwrap()).unwrap(), hash);
}

#[tokio::test]
async fn a_secret_left_by_an_earlier_object_is_adopted_with_its_token() {
    let e = env();
    e.put_session("s", json!({}));
    e.fake.put(json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "wa-s-token", "namespace": NS,
                     "ownerReferences": [{"apiVersion": "wa-operator.dev/v1alpha1", "kind": "WhatsAppSession",
                                          "name": "s", "uid": "old-uid", "controller": true}]},
        "data": {"token": "b2xkLXRva2Vu"}}));
    e.reconcile("s").await.unwrap();
    let secret = e.secret("s").unwrap();
    assert_eq!(token_of(&secret).as_deref(), Some("old-token"));
    assert_eq!(
        secret
            .owner_references()
            .iter()
            .map(|o| o.uid.as_str())
            .collect::<Vec<_>>(),
        [SESSION_UID]
    );
}

#[tokio::test]
async fn a_secret_created_concurrently_is_used_not_overwritten() {
    let e = env();
    e.put_session("s", json!({}));
    // Our read says "absent", then someone else creates it first.
    e.fake.fail("get", "secrets", 404, "NotFound", 1);
    e.fake.put(json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "wa-s-token", "namespace": NS}, "data": {"token": "b3RoZXItdG9rZW4="}}));
    e.reconcile("s").await.unwrap();
    assert_eq!(
        token_of(&e.secret("s").unwrap()).as_deref(),
        Some("other-token")
    );
}

#[tokio::test]
async fn storage_that_cannot_change_is_reported_not_forced() {
    let e = env();
    e.put_session("s", json!({"storage": {"size": "128Mi"}}));
    e.fake.put(json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": "wa-s-auth", "namespace": NS, "labels": crate::desired::labels(&"s".parse().unwrap(), "auth")},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "standard",
                 "resources": {"requests": {"storage": "1Gi"}}}}));
    e.reconcile("s").await.unwrap();
    assert!(e.status("s").message.unwrap().contains("cannot shrink"));
    assert_eq!(
        e.pvc("s")
            .unwrap()
            .spec
            .unwrap()
            .resources
            .unwrap()
            .requests
            .unwrap()["storage"]
            .0,
        "1Gi"
    );

    // Growing where the class does not allow it: the API server refuses; reported, not retried as an error.
    e.edit_spec("s", |spec| spec["storage"]["size"] = json!("2Gi"));
    e.fake
        .fail("patch", "persistentvolumeclaims", 422, "Invalid", 1);
    e.reconcile("s").await.unwrap();
    assert!(
        e.fake
            .event_reasons()
            .contains(&"StorageNotChanged".to_owned())
    );
    assert!(e.status("s").message.unwrap().contains("not resized"));
}

#[tokio::test]
async fn every_reconcile_verb_in_rbac_is_used() {
    // A tour through every path that writes; then compare with rbac::RULES both ways.
    let e = env();
    e.put_session("a", json!({"storage": {"retainOnDelete": false}}));
    e.reconcile("a").await.unwrap(); // create secret, apply pvc and pod, status
    e.fake
        .edit("secrets", NS, "wa-a-token", |s| s["data"] = json!({}));
    e.reconcile("a").await.unwrap(); // repair secret (patch), roll (delete pod)
    e.reconcile("a").await.unwrap(); // create pod again
    e.fake.remove("pods", NS, "wa-a");
    e.reconcile("a").await.unwrap(); // Recreated
    e.fake.remove("pods", NS, "wa-a");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    e.reconcile("a").await.unwrap(); // Recreated again: the recorder patches the event series
    e.delete_session("a");
    e.reconcile("a").await.unwrap(); // delete pvc, secret, finalizer
    e.fake.assert_rbac();
    let mut used: Vec<(String, String, &str)> = e
        .fake
        .calls()
        .iter()
        .map(|c| (c.group.clone(), c.resource.clone(), c.verb))
        .collect();

    let (lease_client, lease_fake) = FakeApi::start();
    let mut a = crate::leader::LeaderElector::new(
        lease_client,
        crate::leader::LeaseSettings::new("l", NS, "a"),
    );
    a.round().await.unwrap();
    a.round().await.unwrap();
    lease_fake.assert_rbac();
    used.extend(
        lease_fake
            .calls()
            .iter()
            .map(|c| (c.group.clone(), c.resource.clone(), c.verb)),
    );

    for rule in crate::rbac::RULES {
        for verb in rule.verbs {
            if crate::rbac::WATCH_VERBS.contains(verb)
                || crate::rbac::ADMISSION_ONLY.contains(&(rule.api_group, rule.resource, verb))
            {
                continue;
            }
            let hit = used
                .iter()
                .any(|(g, r, v)| g == rule.api_group && r == rule.resource && v == verb);
            assert!(
                hit,
                "{verb} {}/{} is in rbac::RULES but no scenario used it",
                rule.api_group, rule.resource
            );
        }
    }
}
