//! The reconciler: one `WhatsAppSession` → its token Secret, auth PVC, Pod and status.
//!
//! Order of work in `apply`: validate → Secret → PVC → Pod (create, roll, recreate, or
//! suspend) → status. Deletion (`cleanup`, behind the finalizer): log out when asked →
//! delete the Pod → delete the PVC unless retained → delete the Secret → drop the finalizer.
//!
//! At most one pod per session: the pod's name is fixed (`wa-<name>`), so the API server
//! refuses a second; a roll deletes the old pod and creates the new one only once the old
//! one is gone (`PodState::Terminating` waits); deletions carry a UID precondition so a
//! stale view never deletes a replacement.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::{Client, Resource, ResourceExt};
use tracing::{Instrument, debug, info, info_span, warn};
use wa_api::names;
use wa_api::{Phase, WhatsAppSession, WhatsAppSessionStatus};

use crate::desired::{
    PodSettings, SessionRef, SpecProblem, auth_pvc, auth_pvc_update, new_token, pod_spec_hash,
    session_pod, token_fingerprint, token_of, token_secret, validate,
};
use crate::error::{Error, KubeContext, is_not_found};
use crate::metrics::{Metrics, SessionKey};
use crate::pod_api::PodApi;
use crate::status::{Observation, PodState, session_status};
use crate::status_watch::{PodStatusWatch, PollTarget};

/// Exponential backoff: `base`, 2×, 4×, … capped at `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The delay after the `attempt`-th consecutive failure (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(20);
        self.base.saturating_mul(factor).min(self.max)
    }
}

/// How long the reconciler waits for things; tests shorten these.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Re-check every session this often even without a change (missed watch events).
    pub resync: Duration,
    /// Re-check this soon while a pod is stopping.
    pub pod_wait: Duration,
    /// Longest wait for the pod's log-out during deletion.
    pub logout_timeout: Duration,
    /// Requeue after failed reconciles.
    pub error_backoff: Backoff,
    /// Between recreations of a pod that keeps disappearing or failing.
    pub recreate_backoff: Backoff,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            resync: Duration::from_secs(300),
            pod_wait: Duration::from_secs(2),
            logout_timeout: Duration::from_secs(10),
            error_backoff: Backoff {
                base: Duration::from_secs(2),
                max: Duration::from_secs(300),
            },
            recreate_backoff: Backoff {
                base: Duration::from_secs(2),
                max: Duration::from_secs(120),
            },
        }
    }
}

/// What the reconciler remembers between reconciles of one session. Only in memory: after
/// an operator restart it is rebuilt from `status` (see [`Context::creation_gate`]).
#[derive(Debug, Default)]
struct SessionMemory {
    /// Consecutive failed reconciles.
    errors: u32,
    /// Consecutive pod recreations without the pod becoming ready in between.
    recreations: u32,
    /// No recreation before this instant.
    not_before: Option<Instant>,
    /// We deleted the pod to roll it; its absence is expected.
    rolling: bool,
    /// We deleted a failed pod; its absence is a loss.
    lost: bool,
    /// A pod of this session existed since the operator started (so an absence is a loss).
    pod_seen: bool,
    /// The status this operator last wrote. The session object a reconcile gets comes from
    /// the watch cache and may not show that write yet; comparing with it alone could skip
    /// a write that is needed (a phase that changed back while the cache lagged).
    written: Option<WhatsAppSessionStatus>,
}

/// Why a pod is about to be created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Creation {
    New,
    Resumed,
    Rolled,
    Recreated { attempt: u32 },
}

enum Gate {
    Create(Creation),
    Wait { remaining: Duration, attempt: u32 },
}

/// Everything a reconcile needs.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub settings: PodSettings,
    pub pod_api: PodApi,
    pub status_watch: PodStatusWatch,
    pub timing: Timing,
    memory: Mutex<HashMap<ObjectRef<WhatsAppSession>, SessionMemory>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn apply_params() -> PatchParams {
    PatchParams::apply(names::FIELD_MANAGER).force()
}

fn session_key(session: &WhatsAppSession) -> SessionKey {
    (session.namespace().unwrap_or_default(), session.name_any())
}

impl Context {
    pub fn new(
        client: Client,
        recorder: Recorder,
        metrics: Arc<Metrics>,
        settings: PodSettings,
        pod_api: PodApi,
        status_watch: PodStatusWatch,
        timing: Timing,
    ) -> Self {
        Self {
            client,
            recorder,
            metrics,
            settings,
            pod_api,
            status_watch,
            timing,
            memory: Mutex::new(HashMap::new()),
        }
    }

    fn remember<T>(
        &self,
        key: &ObjectRef<WhatsAppSession>,
        f: impl FnOnce(&mut SessionMemory) -> T,
    ) -> T {
        f(lock(&self.memory).entry(key.clone()).or_default())
    }

    fn forget(&self, key: &ObjectRef<WhatsAppSession>) {
        lock(&self.memory).remove(key);
    }

    /// Publishes a Kubernetes Event on the session. Failing to publish is logged, never
    /// fails the reconcile: events are for people, the status is the record.
    async fn event(
        &self,
        session: &WhatsAppSession,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let mut note = note;
        if note.len() > 1000 {
            let mut end = 1000;
            while !note.is_char_boundary(end) {
                end -= 1;
            }
            note.truncate(end);
        }
        let ev = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(note),
            action: action.to_owned(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &session.object_ref(&())).await {
            warn!(error = %e, reason, "could not publish event");
        }
    }

    /// Whether a missing pod may be created now, and as what. Without memory (after an
    /// operator restart) a pod is taken as lost when the status names one and the session
    /// was past `Pending`.
    fn creation_gate(
        &self,
        key: &ObjectRef<WhatsAppSession>,
        previous: Option<&WhatsAppSessionStatus>,
    ) -> Gate {
        let prev_phase = previous.and_then(|s| s.phase);
        let had_pod = previous.and_then(|s| s.pod_name.as_ref()).is_some();
        self.remember(key, |m| {
            let creation = if m.rolling {
                Creation::Rolled
            } else if prev_phase == Some(Phase::Suspended) {
                Creation::Resumed
            } else if m.lost
                || m.pod_seen
                || (had_pod && !matches!(prev_phase, None | Some(Phase::Pending)))
            {
                Creation::Recreated {
                    attempt: m.recreations + 1,
                }
            } else {
                Creation::New
            };
            if let Creation::Recreated { attempt } = creation
                && let Some(t) = m.not_before
            {
                let now = Instant::now();
                if t > now {
                    return Gate::Wait {
                        remaining: t - now,
                        attempt,
                    };
                }
            }
            Gate::Create(creation)
        })
    }

    fn created(&self, key: &ObjectRef<WhatsAppSession>, creation: Creation) {
        let backoff = self.timing.recreate_backoff;
        self.remember(key, |m| {
            m.rolling = false;
            m.lost = false;
            m.pod_seen = true;
            if let Creation::Recreated { attempt } = creation {
                m.recreations = attempt;
                m.not_before = Some(Instant::now() + backoff.delay(attempt));
            }
        });
    }
}

/// Reconciles one session; the controller calls this for every change and on resync.
pub async fn reconcile(session: Arc<WhatsAppSession>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let ns = session.namespace().ok_or(Error::NoNamespace)?;
    let key = ObjectRef::from_obj(&*session);
    let span = info_span!("reconcile", namespace = %ns, session = %session.name_any());
    let api: Api<WhatsAppSession> = Api::namespaced(ctx.client.clone(), &ns);
    let result = async {
        let Some(session) = current_if_deleting(&api, session).await? else {
            debug!("already deleted");
            return Ok(Action::await_change());
        };
        finalizer(&api, names::FINALIZER, session, |event| async {
            match event {
                FinalizerEvent::Apply(s) => apply(&s, &ctx).await,
                FinalizerEvent::Cleanup(s) => cleanup(&s, &ctx).await,
            }
        })
        .await
        .map_err(|e| Error::Finalizer(Box::new(e)))
    }
    .instrument(span)
    .await;
    ctx.metrics.reconciled(result.is_ok(), started.elapsed());
    if result.is_ok() {
        ctx.remember(&key, |m| m.errors = 0);
    }
    result
}

/// A session being deleted is read again before clean-up: the controller's cache can still
/// show a deletion that an earlier reconcile finished (finalizer removed, object gone), and
/// cleaning up twice would try to log out a pod that is gone and publish Events about an
/// object that no longer exists. `None` when the object (with this UID) is gone.
async fn current_if_deleting(
    api: &Api<WhatsAppSession>,
    session: Arc<WhatsAppSession>,
) -> Result<Option<Arc<WhatsAppSession>>, Error> {
    if session.metadata.deletion_timestamp.is_none() {
        return Ok(Some(session));
    }
    let name = session.name_any();
    // A list by name rather than a get: the same consistent read, within the verbs the
    // controller needs anyway (rbac.rs).
    let lp = ListParams::default().fields(&format!("metadata.name={name}"));
    let list = api
        .list(&lp)
        .await
        .doing(|| format!("read session {name}"))?;
    Ok(list
        .items
        .into_iter()
        .find(|s| s.metadata.uid == session.metadata.uid)
        .map(Arc::new))
}

/// Requeues a failed reconcile with exponential backoff per session (2 s, 4 s, … 5 min),
/// reset by the next success, and records a Warning Event.
pub fn error_policy(session: Arc<WhatsAppSession>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = ObjectRef::from_obj(&*session);
    let attempt = ctx.remember(&key, |m| {
        m.errors += 1;
        m.errors
    });
    let delay = ctx.timing.error_backoff.delay(attempt);
    warn!(namespace = ?session.namespace(), session = %session.name_any(), error = %error, attempt, ?delay, "reconcile failed");
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        let note = format!(
            "{error} (attempt {attempt}; retrying in {}s)",
            delay.as_secs()
        );
        rt.spawn(async move {
            ctx.event(
                &session,
                EventType::Warning,
                "ReconcileFailed",
                "Reconcile",
                note,
            )
            .await;
        });
    }
    Action::requeue(delay)
}

async fn apply(session: &WhatsAppSession, ctx: &Context) -> Result<Action, Error> {
    let key = ObjectRef::from_obj(session);
    let sref = match SessionRef::of(session) {
        Ok(r) => r,
        Err(problem) => return refuse(session, ctx, None, &problem).await,
    };
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &sref.namespace);
    let pod_name = names::pod_name(sref.name.as_str());
    if let Err(problem) = validate(&session.spec) {
        let pod = pods
            .get_opt(&pod_name)
            .await
            .doing(|| format!("get pod {pod_name}"))?;
        return refuse(session, ctx, pod.as_ref(), &problem).await;
    }

    let token = ensure_token(session, &sref, ctx).await?;
    let mut notes: Vec<String> = ensure_auth_pvc(session, &sref, ctx)
        .await?
        .into_iter()
        .collect();
    let pod = pods
        .get_opt(&pod_name)
        .await
        .doing(|| format!("get pod {pod_name}"))?;
    let mut state = PodState::of(pod.as_ref());
    let mut pod_uid = pod.as_ref().and_then(|p| p.metadata.uid.clone());
    let mut requeue = ctx.timing.resync;
    let previous_phase = session.status.as_ref().and_then(|s| s.phase);

    if !matches!(state, PodState::Absent) && !session.spec.suspend {
        ctx.remember(&key, |m| m.pod_seen = true);
    }

    if session.spec.suspend {
        ctx.status_watch.forget(&key);
        ctx.remember(&key, |m| m.pod_seen = false);
        match state {
            PodState::Absent => {
                if previous_phase != Some(Phase::Suspended) {
                    ctx.event(
                        session,
                        EventType::Normal,
                        "Suspended",
                        "Suspend",
                        "suspended; no pod runs, the auth volume is kept".into(),
                    )
                    .await;
                }
            }
            PodState::Terminating => requeue = ctx.timing.pod_wait,
            PodState::Starting { .. } | PodState::Ready { .. } | PodState::Failed { .. } => {
                delete_pod(&pods, &pod_name, pod_uid.as_deref()).await?;
                info!(pod = %pod_name, "suspended: pod deleted");
                ctx.event(
                    session,
                    EventType::Normal,
                    "Suspended",
                    "Suspend",
                    format!("deleted pod {pod_name}; the auth volume is kept"),
                )
                .await;
                state = PodState::Terminating;
                requeue = ctx.timing.pod_wait;
            }
        }
    } else {
        let desired = session_pod(
            &sref,
            &session.spec,
            &ctx.settings,
            &token_fingerprint(&token),
        );
        match state.clone() {
            PodState::Absent => match ctx.creation_gate(&key, session.status.as_ref()) {
                Gate::Wait { remaining, attempt } => {
                    notes.push(format!(
                        "the pod was lost {} time(s) in a row; recreating in {}s",
                        attempt - 1,
                        remaining.as_secs().max(1)
                    ));
                    requeue = remaining;
                }
                Gate::Create(creation) => {
                    let created = pods
                        .patch(&pod_name, &apply_params(), &Patch::Apply(&desired))
                        .await
                        .doing(|| format!("apply pod {pod_name}"))?;
                    ctx.created(&key, creation);
                    let (type_, reason, note) = match creation {
                        Creation::New => (
                            EventType::Normal,
                            "Created",
                            format!("created pod {pod_name}"),
                        ),
                        Creation::Resumed => (
                            EventType::Normal,
                            "Resumed",
                            format!("resumed: created pod {pod_name}"),
                        ),
                        Creation::Rolled => (
                            EventType::Normal,
                            "Created",
                            format!("created pod {pod_name} with the new spec"),
                        ),
                        Creation::Recreated { attempt } => (
                            EventType::Warning,
                            "Recreated",
                            format!(
                                "pod {pod_name} was gone or failed; recreated it (attempt {attempt})"
                            ),
                        ),
                    };
                    if matches!(creation, Creation::Recreated { .. }) {
                        ctx.metrics.pod_recreated();
                    } else {
                        ctx.metrics.pod_created();
                    }
                    info!(pod = %pod_name, ?creation, "pod created");
                    ctx.event(session, type_, reason, "CreatePod", note).await;
                    state = PodState::of(Some(&created));
                    pod_uid = created.metadata.uid.clone();
                }
            },
            PodState::Terminating => requeue = ctx.timing.pod_wait,
            PodState::Failed { reason } => {
                ctx.status_watch.forget(&key);
                delete_pod(&pods, &pod_name, pod_uid.as_deref()).await?;
                ctx.remember(&key, |m| m.lost = true);
                info!(pod = %pod_name, %reason, "failed pod deleted");
                requeue = ctx.timing.pod_wait;
            }
            PodState::Starting { .. } | PodState::Ready { .. } => {
                let current = pod.as_ref();
                let ours = current.is_some_and(|p| {
                    p.owner_references()
                        .iter()
                        .any(|o| o.uid == sref.uid() && o.controller == Some(true))
                });
                let same_spec = current.and_then(pod_spec_hash) == pod_spec_hash(&desired);
                if !ours || !same_spec {
                    ctx.status_watch.forget(&key);
                    delete_pod(&pods, &pod_name, pod_uid.as_deref()).await?;
                    ctx.remember(&key, |m| m.rolling = true);
                    ctx.metrics.pod_rolled();
                    let why = if ours {
                        "the spec changed"
                    } else {
                        "it belongs to an earlier object of the same name"
                    };
                    info!(pod = %pod_name, why, "rolling pod");
                    ctx.event(
                        session,
                        EventType::Normal,
                        "Rolled",
                        "RollPod",
                        format!("deleted pod {pod_name} to replace it: {why}"),
                    )
                    .await;
                    state = PodState::Terminating;
                    requeue = ctx.timing.pod_wait;
                } else if let (PodState::Ready { ip }, Some(uid)) = (&state, &pod_uid) {
                    ctx.status_watch.ensure(
                        &key,
                        PollTarget {
                            pod_uid: uid.clone(),
                            ip: *ip,
                            token: token.clone(),
                        },
                    );
                    // Ready once: it was not crash-looping; a later loss is recreated at once.
                    ctx.remember(&key, |m| {
                        m.recreations = 0;
                        m.not_before = None;
                    });
                } else {
                    ctx.status_watch.forget(&key);
                }
            }
        }
    }

    let report = match (&state, &pod_uid) {
        (PodState::Ready { .. }, Some(uid)) => ctx.status_watch.report(&key, uid),
        _ => None,
    };
    // A ready pod the status watch has not heard from yet (the watch just started: an
    // operator restart, a new pod of the same name): its first answer comes within moments
    // and reconciles the session again. Writing now would show a Connected session as
    // Starting for that moment, after every operator restart.
    let unheard = matches!(state, PodState::Ready { .. })
        && report
            .as_ref()
            .is_none_or(|r| r.status.is_none() && r.error.is_none());
    if unheard
        && notes.is_empty()
        && session.status.as_ref().is_some_and(|s| {
            s.pod_name.as_deref() == Some(pod_name.as_str())
                && s.observed_generation == session.metadata.generation
        })
    {
        debug!(pod = %pod_name, "waiting for the pod's first status report");
        return Ok(Action::requeue(requeue));
    }
    let note = (!notes.is_empty()).then(|| notes.join("; "));
    let status = session_status(
        session.status.as_ref(),
        &Observation {
            generation: session.metadata.generation,
            problem: None,
            suspended: session.spec.suspend,
            pod: &state,
            pod_name: &pod_name,
            report: report.as_ref(),
            note: note.as_deref(),
        },
        Timestamp::now(),
    );
    write_status(session, ctx, status).await?;
    Ok(Action::requeue(requeue))
}

/// A spec that cannot run: status Failed with the reason; children are left as they are
/// (a running pod keeps its last good configuration).
async fn refuse(
    session: &WhatsAppSession,
    ctx: &Context,
    pod: Option<&Pod>,
    problem: &SpecProblem,
) -> Result<Action, Error> {
    ctx.status_watch.forget(&ObjectRef::from_obj(session));
    let state = PodState::of(pod);
    let problem = problem.to_string();
    let pod_name = names::pod_name(&session.name_any());
    let status = session_status(
        session.status.as_ref(),
        &Observation {
            generation: session.metadata.generation,
            problem: Some(&problem),
            suspended: session.spec.suspend,
            pod: &state,
            pod_name: &pod_name,
            report: None,
            note: None,
        },
        Timestamp::now(),
    );
    write_status(session, ctx, status).await?;
    Ok(Action::requeue(ctx.timing.resync))
}

/// Writes `status` when it differs from what the object has, and records the phase
/// transitions people want in `kubectl describe`.
async fn write_status(
    session: &WhatsAppSession,
    ctx: &Context,
    status: WhatsAppSessionStatus,
) -> Result<(), Error> {
    let previous = session.status.as_ref();
    let before = previous.and_then(|s| s.phase);
    if let Some(phase) = status.phase {
        ctx.metrics.set_phase(session_key(session), phase);
    }
    let key = ObjectRef::from_obj(session);
    if previous == Some(&status)
        && ctx.remember(&key, |m| m.written.as_ref().is_none_or(|w| w == &status))
    {
        return Ok(());
    }
    let message = status.message.clone().unwrap_or_default();
    match status.phase {
        Some(Phase::Connected) if before != Some(Phase::Connected) => {
            let jid = status
                .account
                .as_ref()
                .map(|a| a.jid.as_str())
                .unwrap_or("the account");
            ctx.event(
                session,
                EventType::Normal,
                "Connected",
                "Connect",
                format!("connected to WhatsApp as {jid}"),
            )
            .await;
        }
        Some(Phase::LoggedOut) if before != Some(Phase::LoggedOut) => {
            ctx.event(
                session,
                EventType::Warning,
                "LoggedOut",
                "Logout",
                format!("the device is logged out of the account: {message}"),
            )
            .await;
        }
        Some(Phase::Failed)
            if before != Some(Phase::Failed)
                || previous.and_then(|p| p.message.as_ref()) != status.message.as_ref() =>
        {
            // One reason per cause: the event recorder folds repeats of a reason into the
            // first event (keeping its note), so causes must not share one.
            let cause = status
                .conditions
                .iter()
                .find(|c| c.type_ == wa_api::crd::condition::READY);
            let reason = match cause.map(|c| c.reason.as_str()) {
                Some("InvalidSpec") => "InvalidSpec",
                Some("PodFailed") => "PodFailed",
                _ => "SessionFailed",
            };
            ctx.event(session, EventType::Warning, reason, "Reconcile", message)
                .await;
        }
        _ => {}
    }
    let name = session.name_any();
    let api: Api<WhatsAppSession> =
        Api::namespaced(ctx.client.clone(), &session.namespace().unwrap_or_default());
    let patch = serde_json::json!({
        "apiVersion": WhatsAppSession::api_version(&()),
        "kind": WhatsAppSession::kind(&()),
        "status": status,
    });
    api.patch_status(&name, &apply_params(), &Patch::Apply(&patch))
        .await
        .doing(|| format!("patch status of {name}"))?;
    debug!(phase = ?status.phase, "status written");
    // As the API server keeps it (times to the second), so it compares with later reads.
    let kept = serde_json::to_value(&status)
        .ok()
        .and_then(|v| serde_json::from_value(v).ok());
    ctx.remember(&key, |m| m.written = kept);
    Ok(())
}

/// The pod token: read from the Secret, or created once. Never replaced while usable.
async fn ensure_token(
    session: &WhatsAppSession,
    sref: &SessionRef,
    ctx: &Context,
) -> Result<String, Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &sref.namespace);
    let name = names::secret_name(sref.name.as_str());
    let existing = api
        .get_opt(&name)
        .await
        .doing(|| format!("get Secret {name}"))?;
    match existing {
        Some(secret) => match token_of(&secret) {
            Some(token) => {
                if !secret
                    .owner_references()
                    .iter()
                    .any(|o| o.uid == sref.uid())
                {
                    // Left by an earlier object of the same name: adopt it, or the garbage
                    // collector deletes it from under this session.
                    api.patch(
                        &name,
                        &apply_params(),
                        &Patch::Apply(&token_secret(sref, &token)),
                    )
                    .await
                    .doing(|| format!("adopt Secret {name}"))?;
                }
                Ok(token)
            }
            None => {
                let token = new_token();
                api.patch(
                    &name,
                    &apply_params(),
                    &Patch::Apply(&token_secret(sref, &token)),
                )
                .await
                .doing(|| format!("repair Secret {name}"))?;
                ctx.event(
                    session,
                    EventType::Warning,
                    "TokenReplaced",
                    "RepairToken",
                    format!("Secret {name} held no usable token under key {:?}; wrote a new one (the pod is rolled to pick it up)", names::SECRET_TOKEN_KEY),
                )
                .await;
                Ok(token)
            }
        },
        None => {
            let token = new_token();
            // Create, not apply: creation is atomic, so two writers can never each think
            // their own token is the one in the Secret.
            let pp = PostParams {
                field_manager: Some(names::FIELD_MANAGER.to_owned()),
                ..PostParams::default()
            };
            match api.create(&pp, &token_secret(sref, &token)).await {
                Ok(_) => Ok(token),
                Err(kube::Error::Api(s)) if s.is_already_exists() => {
                    let secret = api
                        .get(&name)
                        .await
                        .doing(|| format!("get Secret {name}"))?;
                    token_of(&secret).ok_or(Error::TokenUnreadable(name))
                }
                Err(e) => Err(e).doing(|| format!("create Secret {name}")),
            }
        }
    }
}

/// Whether applying `desired` would change nothing on `existing`.
fn pvc_is_current(desired: &PersistentVolumeClaim, existing: &PersistentVolumeClaim) -> bool {
    let labels_ok = desired
        .labels()
        .iter()
        .all(|(k, v)| existing.labels().get(k) == Some(v));
    let owners = |p: &PersistentVolumeClaim| -> Vec<String> {
        p.owner_references().iter().map(|o| o.uid.clone()).collect()
    };
    let size = |p: &PersistentVolumeClaim| {
        p.spec
            .as_ref()
            .and_then(|s| s.resources.as_ref())
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get("storage"))
            .cloned()
    };
    labels_ok && owners(desired) == owners(existing) && size(desired) == size(existing)
}

/// Applies the auth PVC; returns a note for `status.message` when the spec asks for a
/// change the claim cannot make.
async fn ensure_auth_pvc(
    session: &WhatsAppSession,
    sref: &SessionRef,
    ctx: &Context,
) -> Result<Option<String>, Error> {
    let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &sref.namespace);
    let name = names::pvc_name(sref.name.as_str());
    let desired = auth_pvc(sref, &session.spec.storage);
    let Some(existing) = api
        .get_opt(&name)
        .await
        .doing(|| format!("get PVC {name}"))?
    else {
        api.patch(&name, &apply_params(), &Patch::Apply(&desired))
            .await
            .doing(|| format!("apply PVC {name}"))?;
        return Ok(None);
    };
    let (pvc, note) = auth_pvc_update(desired, &existing);
    if pvc_is_current(&pvc, &existing) {
        return Ok(note);
    }
    match api.patch(&name, &apply_params(), &Patch::Apply(&pvc)).await {
        Ok(_) => Ok(note),
        Err(kube::Error::Api(s)) if s.is_invalid() || s.is_forbidden() => {
            // Typically growing a claim whose class does not allow expansion: keep its size,
            // still apply labels and ownership.
            let mut kept = pvc;
            if let (Some(spec), Some(current)) = (kept.spec.as_mut(), existing.spec.as_ref()) {
                spec.resources = current.resources.clone();
            }
            api.patch(&name, &apply_params(), &Patch::Apply(&kept))
                .await
                .doing(|| format!("apply PVC {name}"))?;
            let msg = format!("the auth volume was not resized: {}", s.message);
            ctx.event(
                session,
                EventType::Warning,
                "StorageNotChanged",
                "ResizeVolume",
                msg.clone(),
            )
            .await;
            Ok(Some(match note {
                Some(n) => format!("{n}; {msg}"),
                None => msg,
            }))
        }
        Err(e) => Err(e).doing(|| format!("apply PVC {name}")),
    }
}

/// Deletes a pod; gone already, or replaced meanwhile (UID precondition failed), is fine.
async fn delete_pod(pods: &Api<Pod>, name: &str, uid: Option<&str>) -> Result<(), Error> {
    let dp = DeleteParams {
        preconditions: uid.map(|u| Preconditions {
            uid: Some(u.to_owned()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match pods.delete(name, &dp).await {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(kube::Error::Api(s)) if s.is_conflict() => Ok(()),
        Err(e) => Err(e).doing(|| format!("delete pod {name}")),
    }
}

/// Deletion: log out when asked, then remove what the session owns.
async fn cleanup(session: &WhatsAppSession, ctx: &Context) -> Result<Action, Error> {
    let key = ObjectRef::from_obj(session);
    ctx.status_watch.forget(&key);
    let done = || {
        ctx.metrics.forget_session(&session_key(session));
        ctx.forget(&key);
        Ok(Action::await_change())
    };
    // A name that never validated never got children.
    let Ok(sref) = SessionRef::of(session) else {
        return done();
    };
    let ns = &sref.namespace;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let pod_name = names::pod_name(sref.name.as_str());
    let pod = pods
        .get_opt(&pod_name)
        .await
        .doing(|| format!("get pod {pod_name}"))?;

    if session.spec.logout_on_delete {
        log_out(session, &sref, pod.as_ref(), ctx).await?;
    }
    if let Some(p) = &pod
        && p.metadata.deletion_timestamp.is_none()
    {
        delete_pod(&pods, &pod_name, p.metadata.uid.as_deref()).await?;
    }

    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
    let pvc_name = names::pvc_name(sref.name.as_str());
    if session.spec.storage.retain_on_delete {
        // Retention may have been switched on after the claim got our owner reference; the
        // garbage collector would delete the claim with this object unless we drop it.
        if let Some(pvc) = pvcs
            .get_opt(&pvc_name)
            .await
            .doing(|| format!("get PVC {pvc_name}"))?
            && pvc.owner_references().iter().any(|o| o.uid == sref.uid())
        {
            let others: Vec<_> = pvc
                .owner_references()
                .iter()
                .filter(|o| o.uid != sref.uid())
                .cloned()
                .collect();
            let patch = serde_json::json!({"metadata": {
                "ownerReferences": others,
                "resourceVersion": pvc.resource_version(),
            }});
            pvcs.patch(&pvc_name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .doing(|| format!("release PVC {pvc_name}"))?;
        }
        info!(pvc = %pvc_name, "session deleted; auth volume retained");
    } else {
        match pvcs.delete(&pvc_name, &DeleteParams::default()).await {
            Ok(_) => info!(pvc = %pvc_name, "auth volume deleted"),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e).doing(|| format!("delete PVC {pvc_name}")),
        }
    }

    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let secret_name = names::secret_name(sref.name.as_str());
    match secrets.delete(&secret_name, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(e) if is_not_found(&e) => {}
        Err(e) => return Err(e).doing(|| format!("delete Secret {secret_name}")),
    }
    done()
}

/// `POST /v1/logout` on the pod before deletion, bounded in time. When it cannot be done,
/// an Event says why and deletion proceeds: a stuck pod must not block deleting a session.
async fn log_out(
    session: &WhatsAppSession,
    sref: &SessionRef,
    pod: Option<&Pod>,
    ctx: &Context,
) -> Result<(), Error> {
    let why_not = match PodState::of(pod) {
        PodState::Ready { ip } => {
            let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &sref.namespace);
            let name = names::secret_name(sref.name.as_str());
            let token = secrets
                .get_opt(&name)
                .await
                .doing(|| format!("get Secret {name}"))?
                .as_ref()
                .and_then(token_of);
            match token {
                None => Some(format!("the token Secret {name} is missing")),
                Some(token) => match ctx
                    .pod_api
                    .logout(ip, &token, ctx.timing.logout_timeout)
                    .await
                {
                    Ok(_) => {
                        info!("logged out before deletion");
                        ctx.event(
                            session,
                            EventType::Normal,
                            "LoggedOut",
                            "Logout",
                            "logged the device out of the WhatsApp account before deletion".into(),
                        )
                        .await;
                        None
                    }
                    Err(e) => Some(e.to_string()),
                },
            }
        }
        PodState::Absent => Some("no session pod is running (suspended or gone)".to_owned()),
        PodState::Starting { .. } => Some("the session pod is not ready".to_owned()),
        PodState::Terminating => Some("the session pod is already stopping".to_owned()),
        PodState::Failed { reason } => Some(format!("the session pod failed ({reason})")),
    };
    if let Some(why) = why_not {
        warn!(%why, "log-out before deletion skipped");
        ctx.event(
            session,
            EventType::Warning,
            "LogoutSkipped",
            "Logout",
            format!("could not log out before deletion: {why}; the device stays linked until it is removed on the phone (Linked devices)"),
        )
        .await;
    }
    Ok(())
}

#[cfg(test)]
#[path = "reconcile_tests.rs"]
mod tests;
