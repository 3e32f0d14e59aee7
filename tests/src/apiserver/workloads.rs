//! The workload controllers of the kube-controller-manager, for `apps/v1`: a Deployment owns
//! one ReplicaSet per pod template (named `<deployment>-<pod-template-hash>`), a ReplicaSet
//! owns its pods (`<replicaset>-<random>`), and both report status from the pods' readiness
//! — enough for `kubectl apply` of a Helm chart's Deployments, `kubectl rollout status`,
//! `kubectl wait --for=condition=Available`, `kubectl scale` and `kubectl rollout restart`.
//!
//! Differences from Kubernetes, on purpose: every rollout is carried out as `Recreate` (the
//! old ReplicaSets go to zero and their pods are gone before the new one scales up),
//! whatever `spec.strategy` says; pods are not adopted or released by label (only the
//! pods a ReplicaSet created are its own); `paused` stops rollouts but not scaling of the
//! current ReplicaSet; no `ProgressDeadlineExceeded`. `tests/README.md` lists them.
//!
//! Like the other controllers, these run under the server's lock, follow the change
//! history, and write through the registry, so everything they do is an ordinary change
//! that watches see. They write only what differs, so their own writes settle.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

use super::admission::selector_matches;
use super::apply::Scope;
use super::catalog::StorageKey;
use super::registry::{self, DeleteOptions, Ownership, Propagation, State, WriteOptions};

pub const DEPLOYMENTS: &str = "apps/deployments";
pub const REPLICASETS: &str = "apps/replicasets";
const PODS: &str = "/pods";
/// Label (and ReplicaSet name suffix) that tells a template's pods apart.
pub const POD_TEMPLATE_HASH: &str = "pod-template-hash";
/// Rollout number, on the Deployment and on each of its ReplicaSets.
pub const REVISION: &str = "deployment.kubernetes.io/revision";
const MANAGER: &str = "kube-controller-manager";

/// What a change to `obj` (in `storage`) asks of the workload controllers.
pub fn on_change(state: &mut State, storage: &str, obj: &Value, deleted: bool) {
    let ns = meta(obj, "namespace").to_owned();
    match storage {
        DEPLOYMENTS if !deleted => sync_deployment(state, &ns, meta(obj, "name")),
        REPLICASETS => {
            if !deleted {
                sync_replicaset(state, &ns, meta(obj, "name"));
            }
            if let Some(owner) = controller_name(obj, "Deployment") {
                sync_deployment(state, &ns, &owner);
            }
        }
        PODS => {
            if let Some(owner) = controller_name(obj, "ReplicaSet") {
                sync_replicaset(state, &ns, &owner);
                if let Some(rs) = state.store.get(REPLICASETS, &ns, &owner).cloned()
                    && let Some(deployment) = controller_name(&rs, "Deployment")
                {
                    sync_deployment(state, &ns, &deployment);
                }
            }
        }
        _ => {}
    }
}

fn meta<'v>(obj: &'v Value, field: &str) -> &'v str {
    obj["metadata"][field].as_str().unwrap_or("")
}

fn is_deleting(obj: &Value) -> bool {
    !obj["metadata"]["deletionTimestamp"].is_null()
}

/// The name of the object's controller, when it is of `kind`.
fn controller_name(obj: &Value, kind: &str) -> Option<String> {
    obj["metadata"]["ownerReferences"]
        .as_array()?
        .iter()
        .find(|r| r["controller"] == Value::Bool(true) && r["kind"] == kind)
        .and_then(|r| r["name"].as_str())
        .map(str::to_owned)
}

/// Objects in `storage` of namespace `ns` whose controller has this uid.
fn controlled_by(state: &State, storage: &str, ns: &str, uid: &str) -> Vec<Arc<Value>> {
    state
        .store
        .list(storage, Some(ns))
        .filter(|o| {
            o["metadata"]["ownerReferences"]
                .as_array()
                .is_some_and(|refs| refs.iter().any(|r| r["controller"] == Value::Bool(true) && r["uid"] == uid))
        })
        .cloned()
        .collect()
}

fn controller_ref(owner: &Value, kind: &str) -> Value {
    json!({"apiVersion": "apps/v1", "kind": kind, "name": meta(owner, "name"), "uid": meta(owner, "uid"),
        "controller": true, "blockOwnerDeletion": true})
}

fn opts() -> WriteOptions {
    WriteOptions {
        field_manager: MANAGER.to_owned(),
        ..Default::default()
    }
}

/// Changes an object through the registry (an update by the controller manager).
fn modify(state: &mut State, storage: &str, obj: &Value, scope: Scope, change: impl FnOnce(&mut Value)) -> Result<(), String> {
    let Some(rt) = registry::type_for_storage(&state.catalog, &StorageKey::from(storage)) else {
        return Err(format!("{storage} is not served"));
    };
    let (ns, name) = (meta(obj, "namespace").to_owned(), meta(obj, "name").to_owned());
    let current = registry::get(state, &rt, &ns, &name).map_err(|e| e.to_string())?;
    let mut new = registry::to_output(&rt, &current);
    change(&mut new);
    registry::commit_update(state, &rt, &ns, &name, &current, new, scope, &opts(), Ownership::Update)
        .map(drop)
        .map_err(|e| e.to_string())
}

fn create(state: &mut State, storage: &str, ns: &str, obj: Value) -> Result<(), String> {
    let Some(rt) = registry::type_for_storage(&state.catalog, &StorageKey::from(storage)) else {
        return Err(format!("{storage} is not served"));
    };
    registry::create(state, &rt, ns, obj, &opts(), None).map(drop).map_err(|e| e.to_string())
}

fn delete(state: &mut State, storage: &str, obj: &Value) {
    let Some(rt) = registry::type_for_storage(&state.catalog, &StorageKey::from(storage)) else { return };
    let del = DeleteOptions {
        propagation: Some(Propagation::Background),
        precondition_uid: Some(meta(obj, "uid").to_owned()),
        ..Default::default()
    };
    let name = meta(obj, "name").to_owned();
    if let Err(e) = registry::delete(state, &rt, meta(obj, "namespace"), &name, &del)
        && e.code != 404
        && e.code != 409
    {
        tracing::warn!(%name, error = %e, "workload controller: delete failed");
    }
}

/// A stable hash of a pod template, spelled like Kubernetes' (consonants and digits, so it
/// never forms words): FNV-1a over the template's canonical JSON.
pub fn template_hash(template: &Value) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    // serde_json's maps are sorted by key, so equal templates print the same.
    for b in template.to_string().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (0..10)
        .map(|_| {
            let c = ALPHABET[(h % ALPHABET.len() as u64) as usize] as char;
            h /= ALPHABET.len() as u64;
            c
        })
        .collect()
}

fn revision(obj: &Value) -> i64 {
    obj["metadata"]["annotations"][REVISION].as_str().and_then(|r| r.parse().ok()).unwrap_or(0)
}

fn replicas(obj: &Value) -> i64 {
    obj["spec"]["replicas"].as_i64().unwrap_or(1).max(0)
}

fn is_active(pod: &Value) -> bool {
    !is_deleting(pod) && !matches!(pod["status"]["phase"].as_str(), Some("Succeeded" | "Failed"))
}

/// When the pod became Ready, if it is.
fn ready_since(pod: &Value) -> Option<DateTime<Utc>> {
    let ready = pod["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == "Ready" && c["status"] == "True")?;
    Some(
        ready["lastTransitionTime"]
            .as_str()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_else(Utc::now),
    )
}

/// Ready for at least `min_ready_seconds`.
fn is_available(pod: &Value, min_ready_seconds: i64, now: DateTime<Utc>) -> bool {
    ready_since(pod).is_some_and(|since| min_ready_seconds <= 0 || (now - since).num_seconds() >= min_ready_seconds)
}

/// Sets `conditions[type]` keeping its transition time when its status did not change, and
/// its update time when nothing changed, so an unchanged status writes nothing.
fn set_condition(conditions: &mut Vec<Value>, old: &[Value], type_: &str, status: bool, reason: &str, message: &str, with_update_time: bool) {
    let now = registry::now();
    let status = if status { "True" } else { "False" };
    let previous = old.iter().find(|c| c["type"] == type_);
    let transition = previous
        .filter(|c| c["status"] == status)
        .and_then(|c| c["lastTransitionTime"].as_str())
        .unwrap_or(&now)
        .to_owned();
    let mut condition = json!({"type": type_, "status": status, "reason": reason, "message": message, "lastTransitionTime": transition});
    if with_update_time {
        let unchanged = previous.is_some_and(|c| c["status"] == status && c["reason"] == reason && c["message"] == message);
        let update = previous
            .filter(|_| unchanged)
            .and_then(|c| c["lastUpdateTime"].as_str())
            .unwrap_or(&now)
            .to_owned();
        condition["lastUpdateTime"] = json!(update);
    }
    conditions.push(condition);
}

/// Counts set only when non-zero, as Kubernetes' `omitempty` fields print.
fn put_count(status: &mut Map<String, Value>, field: &str, n: i64) {
    if n != 0 {
        status.insert(field.to_owned(), json!(n));
    }
}

// ---- ReplicaSets ---------------------------------------------------------------------------

/// Creates or deletes pods until the ReplicaSet has `spec.replicas` active ones; reports
/// status from them.
fn sync_replicaset(state: &mut State, ns: &str, name: &str) {
    let Some(rs) = state.store.get(REPLICASETS, ns, name).cloned() else { return };
    if is_deleting(&rs) {
        return;
    }
    let uid = meta(&rs, "uid").to_owned();
    let want = replicas(&rs);
    let active: Vec<Arc<Value>> = controlled_by(state, PODS, ns, &uid).into_iter().filter(|p| is_active(p)).collect();
    let mut failure = None;
    let have = active.len() as i64;
    if have < want {
        let template = &rs["spec"]["template"];
        for _ in have..want {
            let mut metadata = template["metadata"].as_object().cloned().unwrap_or_default();
            metadata.remove("name");
            metadata.insert("generateName".into(), json!(format!("{name}-")));
            metadata.insert("namespace".into(), json!(ns));
            metadata.insert("ownerReferences".into(), json!([controller_ref(&rs, "ReplicaSet")]));
            let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]});
            if let Err(e) = create(state, PODS, ns, pod) {
                tracing::warn!(replicaset = %name, error = %e, "replicaset controller: creating a pod failed");
                failure = Some(e);
                break;
            }
        }
    } else if have > want {
        // Fewest losses first: pods not ready, then the youngest.
        let mut surplus = active.clone();
        surplus.sort_by_key(|p| (ready_since(p).is_some(), std::cmp::Reverse(meta(p, "creationTimestamp").to_owned())));
        for pod in surplus.iter().take((have - want) as usize) {
            delete(state, PODS, pod);
        }
    }

    let now = Utc::now();
    let min_ready = rs["spec"]["minReadySeconds"].as_i64().unwrap_or(0);
    let pods: Vec<Arc<Value>> = controlled_by(state, PODS, ns, &uid).into_iter().filter(|p| is_active(p)).collect();
    let labels = &rs["spec"]["template"]["metadata"]["labels"];
    let mut status = Map::new();
    status.insert("replicas".into(), json!(pods.len()));
    let fully_labeled = pods.iter().filter(|p| selector_matches(&json!({"matchLabels": labels}), &p["metadata"]["labels"]) == Some(true)).count();
    put_count(&mut status, "fullyLabeledReplicas", fully_labeled as i64);
    put_count(&mut status, "readyReplicas", pods.iter().filter(|p| ready_since(p).is_some()).count() as i64);
    put_count(&mut status, "availableReplicas", pods.iter().filter(|p| is_available(p, min_ready, now)).count() as i64);
    status.insert("observedGeneration".into(), rs["metadata"]["generation"].clone());
    let old_conditions = rs["status"]["conditions"].as_array().cloned().unwrap_or_default();
    if let Some(message) = failure {
        let mut conditions = Vec::new();
        set_condition(&mut conditions, &old_conditions, "ReplicaFailure", true, "FailedCreate", &message, false);
        status.insert("conditions".into(), json!(conditions));
    }
    let status = Value::Object(status);
    if rs["status"] != status {
        let _ = modify(state, REPLICASETS, &rs, Scope::Status, |o| o["status"] = status);
    }
}

// ---- Deployments ---------------------------------------------------------------------------

/// Makes the ReplicaSet of the current template the one with pods (after the others have
/// none left), keeps the revision history, and reports status.
fn sync_deployment(state: &mut State, ns: &str, name: &str) {
    let Some(d) = state.store.get(DEPLOYMENTS, ns, name).cloned() else { return };
    if is_deleting(&d) {
        return;
    }
    let uid = meta(&d, "uid").to_owned();
    let template = d["spec"]["template"].clone();
    let hash = template_hash(&template);
    let want = replicas(&d);
    let sets = controlled_by(state, REPLICASETS, ns, &uid);
    let max_revision = sets.iter().map(|rs| revision(rs)).max().unwrap_or(0);
    let current = sets.iter().find(|rs| same_template(rs, &template)).cloned();
    let old: Vec<Arc<Value>> = sets.iter().filter(|rs| !same_template(rs, &template)).cloned().collect();
    let paused = d["spec"]["paused"] == Value::Bool(true);

    if !paused {
        for rs in old.iter().filter(|rs| replicas(rs) != 0) {
            let _ = modify(state, REPLICASETS, rs, Scope::Main, |o| o["spec"]["replicas"] = json!(0));
        }
        // Recreate: the new template's pods start once every old pod is gone.
        let old_pods: usize = old.iter().map(|rs| controlled_by(state, PODS, ns, meta(rs, "uid")).len()).sum();
        let scale_to = if old_pods == 0 { want } else { 0 };
        match &current {
            None => {
                let rs_name = format!("{name}-{hash}");
                let mut template = template.clone();
                template["metadata"]["labels"][POD_TEMPLATE_HASH] = json!(hash);
                let mut selector = d["spec"]["selector"].clone();
                selector["matchLabels"][POD_TEMPLATE_HASH] = json!(hash);
                let mut labels = template["metadata"]["labels"].clone();
                labels[POD_TEMPLATE_HASH] = json!(hash);
                let rs = json!({
                    "apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "metadata": {"name": rs_name, "namespace": ns, "labels": labels,
                        "annotations": {REVISION: (max_revision + 1).to_string(),
                            "deployment.kubernetes.io/desired-replicas": want.to_string(),
                            "deployment.kubernetes.io/max-replicas": want.to_string()},
                        "ownerReferences": [controller_ref(&d, "Deployment")]},
                    "spec": {"replicas": scale_to, "selector": selector, "template": template,
                        "minReadySeconds": d["spec"]["minReadySeconds"].as_i64().unwrap_or(0)},
                });
                if let Err(e) = create(state, REPLICASETS, ns, rs) {
                    tracing::warn!(deployment = %name, error = %e, "deployment controller: creating a ReplicaSet failed");
                }
            }
            Some(rs) => {
                // Back to an older template (a rollback): it becomes the newest revision.
                let bump = revision(rs) < max_revision;
                if replicas(rs) != scale_to || bump {
                    let _ = modify(state, REPLICASETS, rs, Scope::Main, |o| {
                        o["spec"]["replicas"] = json!(scale_to);
                        if bump {
                            o["metadata"]["annotations"][REVISION] = json!((max_revision + 1).to_string());
                        }
                    });
                }
            }
        }
        prune_history(state, ns, &d);
    }

    // The revision and status follow the ReplicaSets as they are now.
    let sets = controlled_by(state, REPLICASETS, ns, &uid);
    let current = sets.iter().find(|rs| same_template(rs, &template)).cloned();
    if let Some(rs) = &current {
        let rev = rs["metadata"]["annotations"][REVISION].clone();
        if !rev.is_null() && d["metadata"]["annotations"][REVISION] != rev {
            let _ = modify(state, DEPLOYMENTS, &d, Scope::Main, |o| o["metadata"]["annotations"][REVISION] = rev);
        }
    }
    let Some(d) = state.store.get(DEPLOYMENTS, ns, name).cloned() else { return };
    let status = deployment_status(&d, &sets, current.as_deref());
    if d["status"] != status {
        let _ = modify(state, DEPLOYMENTS, &d, Scope::Status, |o| o["status"] = status);
    }
}

/// Whether the ReplicaSet runs this pod template (its own copy differs by the hash label
/// only), as the deployment controller compares them.
fn same_template(rs: &Value, template: &Value) -> bool {
    let mut theirs = rs["spec"]["template"].clone();
    if let Some(labels) = theirs["metadata"]["labels"].as_object_mut() {
        labels.remove(POD_TEMPLATE_HASH);
        if labels.is_empty() {
            theirs["metadata"].as_object_mut().map(|m| m.remove("labels"));
        }
    }
    theirs == *template
}

/// Old ReplicaSets with nothing left beyond `revisionHistoryLimit` go, oldest first.
fn prune_history(state: &mut State, ns: &str, d: &Value) {
    let limit = d["spec"]["revisionHistoryLimit"].as_i64().unwrap_or(10).max(0) as usize;
    let template = &d["spec"]["template"];
    let mut idle: Vec<Arc<Value>> = controlled_by(state, REPLICASETS, ns, meta(d, "uid"))
        .into_iter()
        .filter(|rs| !same_template(rs, template) && replicas(rs) == 0 && !is_deleting(rs))
        .filter(|rs| rs["status"]["replicas"].as_i64().unwrap_or(0) == 0)
        .collect();
    if idle.len() <= limit {
        return;
    }
    idle.sort_by_key(|rs| revision(rs));
    let excess = idle.len() - limit;
    for rs in idle.iter().take(excess) {
        delete(state, REPLICASETS, rs);
    }
}

/// Unavailable pods a rollout tolerates: `maxUnavailable` of a RollingUpdate (a number or a
/// percentage, rounded down), none for Recreate.
fn max_unavailable(d: &Value, want: i64) -> i64 {
    let value = &d["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"];
    let n = match value {
        Value::Number(n) => n.as_i64().unwrap_or(0),
        Value::String(s) => s
            .strip_suffix('%')
            .and_then(|p| p.parse::<i64>().ok())
            .map(|p| want * p / 100)
            .unwrap_or(0),
        _ => 0,
    };
    if d["spec"]["strategy"]["type"] == "Recreate" { 0 } else { n.clamp(0, want) }
}

fn deployment_status(d: &Value, sets: &[Arc<Value>], current: Option<&Value>) -> Value {
    let count = |rs: &Value, field: &str| rs["status"][field].as_i64().unwrap_or(0);
    let want = replicas(d);
    let total: i64 = sets.iter().map(|rs| count(rs, "replicas")).sum();
    let updated = current.map(|rs| count(rs, "replicas")).unwrap_or(0);
    let ready: i64 = sets.iter().map(|rs| count(rs, "readyReplicas")).sum();
    let available: i64 = sets.iter().map(|rs| count(rs, "availableReplicas")).sum();
    let mut status = Map::new();
    status.insert("observedGeneration".into(), d["metadata"]["generation"].clone());
    put_count(&mut status, "replicas", total);
    put_count(&mut status, "updatedReplicas", updated);
    put_count(&mut status, "readyReplicas", ready);
    put_count(&mut status, "availableReplicas", available);
    put_count(&mut status, "unavailableReplicas", (want - available).max(0));

    let old_conditions = d["status"]["conditions"].as_array().cloned().unwrap_or_default();
    let mut conditions = Vec::new();
    let minimum = available >= want - max_unavailable(d, want);
    let (reason, message) = if minimum {
        ("MinimumReplicasAvailable", "Deployment has minimum availability.")
    } else {
        ("MinimumReplicasUnavailable", "Deployment does not have minimum availability.")
    };
    set_condition(&mut conditions, &old_conditions, "Available", minimum, reason, message, true);
    let rs_name = current.map(|rs| meta(rs, "name")).unwrap_or("");
    let complete = current.is_some() && updated == want && total == want && available >= want;
    let (reason, message) = if complete {
        ("NewReplicaSetAvailable", format!("ReplicaSet \"{rs_name}\" has successfully progressed."))
    } else if current.is_none() {
        ("NewReplicaSetCreated", "the new ReplicaSet is being created".to_owned())
    } else {
        ("ReplicaSetUpdated", format!("ReplicaSet \"{rs_name}\" is progressing."))
    };
    set_condition(&mut conditions, &old_conditions, "Progressing", true, reason, &message, true);
    status.insert("conditions".into(), json!(conditions));
    Value::Object(status)
}

// ---- the scale subresource -----------------------------------------------------------------

/// `autoscaling/v1` Scale of a Deployment or ReplicaSet.
pub fn scale_of(obj: &Value) -> Value {
    let selector = {
        let mut parts: Vec<String> = obj["spec"]["selector"]["matchLabels"]
            .as_object()
            .map(|m| m.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or(""))).collect())
            .unwrap_or_default();
        for e in obj["spec"]["selector"]["matchExpressions"].as_array().map(Vec::as_slice).unwrap_or_default() {
            let key = e["key"].as_str().unwrap_or("");
            let values: Vec<&str> = e["values"].as_array().map(|v| v.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
            parts.push(match e["operator"].as_str().unwrap_or("") {
                "In" => format!("{key} in ({})", values.join(",")),
                "NotIn" => format!("{key} notin ({})", values.join(",")),
                "DoesNotExist" => format!("!{key}"),
                _ => key.to_owned(),
            });
        }
        parts.join(",")
    };
    let m = &obj["metadata"];
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {"name": m["name"], "namespace": m["namespace"], "uid": m["uid"],
            "resourceVersion": m["resourceVersion"], "creationTimestamp": m["creationTimestamp"]},
        "spec": {"replicas": replicas(obj)},
        "status": {"replicas": obj["status"]["replicas"].as_i64().unwrap_or(0), "selector": selector},
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::catalog::Catalog;
    use crate::apiserver::store::{EventType, Store};

    fn state() -> State {
        let mut state = State {
            catalog: Catalog::new(),
            store: Store::new(100_000),
        };
        let ns = state.catalog.find("", "v1", "namespaces").cloned().unwrap();
        registry::create(&mut state, &ns, "", json!({"metadata": {"name": "default"}}), &opts(), None).unwrap();
        state
    }

    /// Runs the workload controllers over every change until nothing changes.
    fn settle(state: &mut State) {
        let mut cursor = 0;
        for _ in 0..200 {
            let events = state.store.events_after(cursor).unwrap();
            if events.is_empty() {
                return;
            }
            for event in &events {
                cursor = event.rv;
                on_change(state, &event.storage, &event.object, event.kind == EventType::Deleted);
            }
        }
        panic!("the workload controllers did not settle");
    }

    fn deployment(replicas: i64, image: &str) -> Value {
        json!({"metadata": {"name": "web"}, "spec": {"replicas": replicas, "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": image}]}}}})
    }

    fn apply(state: &mut State, resource: &str, obj: Value) {
        let rt = state.catalog.find("apps", "v1", resource).cloned().unwrap();
        let name = obj["metadata"]["name"].as_str().unwrap().to_owned();
        let body = {
            let mut b = obj;
            b["apiVersion"] = json!("apps/v1");
            b["kind"] = json!(rt.kind);
            b
        };
        let opts = WriteOptions { field_manager: "test".into(), force: true, ..Default::default() };
        registry::patch(state, &rt, "default", &name, super::super::patch::PatchKind::Apply, &body, Scope::Main, &opts).unwrap();
    }

    fn pods(state: &State) -> Vec<Arc<Value>> {
        state.store.list(PODS, Some("default")).cloned().collect()
    }

    /// What the pod runner does: a pod becomes Ready; deleting pods are removed.
    fn kubelet(state: &mut State) {
        let pods_rt = state.catalog.find("", "v1", "pods").cloned().unwrap();
        for pod in pods(state) {
            if is_deleting(&pod) {
                registry::remove_object(state, &pods_rt, "default", meta(&pod, "name"));
            } else if ready_since(&pod).is_none() {
                let _ = modify(state, PODS, &pod, Scope::Status, |o| {
                    o["status"]["phase"] = json!("Running");
                    o["status"]["conditions"] = json!([{"type": "Ready", "status": "True", "lastTransitionTime": registry::now()}]);
                });
            }
        }
    }

    /// Replays every pod change: pods of two templates never existed at once (Recreate).
    fn assert_never_mixed(state: &State) {
        let mut live: std::collections::BTreeMap<String, String> = Default::default();
        for event in state.store.events_after(0).unwrap().iter().filter(|e| &*e.storage == PODS) {
            let uid = meta(&event.object, "uid").to_owned();
            if event.kind == EventType::Deleted {
                live.remove(&uid);
            } else {
                live.insert(uid, event.object["metadata"]["labels"][POD_TEMPLATE_HASH].as_str().unwrap_or("").to_owned());
            }
            let templates: std::collections::BTreeSet<&String> = live.values().collect();
            assert!(templates.len() <= 1, "pods of two templates at rv {}: {live:?}", event.rv);
        }
    }

    fn get(state: &State, storage: &str, name: &str) -> Arc<Value> {
        state.store.get(storage, "default", name).cloned().unwrap()
    }

    #[test]
    fn a_deployment_runs_its_replicas_and_reports_them_available() {
        let mut state = state();
        apply(&mut state, "deployments", deployment(2, "img:1"));
        settle(&mut state);
        let d = get(&state, DEPLOYMENTS, "web");
        let hash = template_hash(&d["spec"]["template"]);
        let rs = get(&state, REPLICASETS, &format!("web-{hash}"));
        assert_eq!(rs["spec"]["replicas"], 2);
        assert_eq!(rs["metadata"]["annotations"][REVISION], "1");
        assert_eq!(rs["spec"]["selector"]["matchLabels"], json!({"app": "web", POD_TEMPLATE_HASH: hash}));
        let created = pods(&state);
        assert_eq!(created.len(), 2);
        for pod in &created {
            assert!(meta(pod, "name").starts_with(&format!("web-{hash}-")));
            assert_eq!(pod["metadata"]["labels"], json!({"app": "web", POD_TEMPLATE_HASH: hash}));
            assert_eq!(controller_name(pod, "ReplicaSet").as_deref(), Some(meta(&rs, "name")));
            assert_eq!(pod["spec"]["containers"][0]["image"], "img:1");
        }
        let status = &get(&state, DEPLOYMENTS, "web")["status"];
        assert_eq!(status["replicas"], 2);
        assert!(status["availableReplicas"].is_null(), "not ready yet: {status}");
        assert_eq!(status["conditions"][0]["status"], "False");

        kubelet(&mut state);
        settle(&mut state);
        let d = get(&state, DEPLOYMENTS, "web");
        let status = &d["status"];
        assert_eq!((status["readyReplicas"].as_i64(), status["availableReplicas"].as_i64(), status["updatedReplicas"].as_i64()), (Some(2), Some(2), Some(2)));
        assert_eq!(status["observedGeneration"], d["metadata"]["generation"]);
        assert_eq!(status["conditions"][0], json!({"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable",
            "message": "Deployment has minimum availability.", "lastTransitionTime": status["conditions"][0]["lastTransitionTime"],
            "lastUpdateTime": status["conditions"][0]["lastUpdateTime"]}));
        assert_eq!(status["conditions"][1]["reason"], "NewReplicaSetAvailable");
        assert_eq!(d["metadata"]["annotations"][REVISION], "1");

        // Settled means settled: another pass writes nothing.
        let rv = state.store.current_rv();
        on_change(&mut state, DEPLOYMENTS, &d, false);
        assert_eq!(state.store.current_rv(), rv);
    }

    #[test]
    fn a_lost_pod_is_replaced_and_scaling_follows_replicas() {
        let mut state = state();
        apply(&mut state, "deployments", deployment(2, "img:1"));
        settle(&mut state);
        kubelet(&mut state);
        settle(&mut state);
        let pods_rt = state.catalog.find("", "v1", "pods").cloned().unwrap();
        let lost = pods(&state)[0].clone();
        registry::remove_object(&mut state, &pods_rt, "default", meta(&lost, "name"));
        settle(&mut state);
        let now = pods(&state);
        assert_eq!(now.len(), 2);
        assert!(now.iter().all(|p| meta(p, "uid") != meta(&lost, "uid")));

        apply(&mut state, "deployments", deployment(3, "img:1"));
        settle(&mut state);
        assert_eq!(pods(&state).len(), 3);
        kubelet(&mut state);
        apply(&mut state, "deployments", deployment(1, "img:1"));
        settle(&mut state);
        kubelet(&mut state);
        settle(&mut state);
        assert_eq!(pods(&state).len(), 1);
        assert_eq!(get(&state, DEPLOYMENTS, "web")["status"]["availableReplicas"], 1);
    }

    #[test]
    fn a_new_template_rolls_by_delete_then_create_and_keeps_history() {
        let mut state = state();
        apply(&mut state, "deployments", deployment(2, "img:1"));
        settle(&mut state);
        kubelet(&mut state);
        settle(&mut state);
        let first: Vec<String> = pods(&state).iter().map(|p| meta(p, "uid").to_owned()).collect();

        apply(&mut state, "deployments", deployment(2, "img:2"));
        settle(&mut state);
        kubelet(&mut state);
        settle(&mut state);
        let now = pods(&state);
        assert_eq!(now.len(), 2);
        assert!(now.iter().all(|p| p["spec"]["containers"][0]["image"] == "img:2" && !first.contains(&meta(p, "uid").to_owned())));
        assert_never_mixed(&state);
        kubelet(&mut state);
        settle(&mut state);
        let d = get(&state, DEPLOYMENTS, "web");
        assert_eq!(d["metadata"]["annotations"][REVISION], "2");
        assert_eq!(d["status"]["conditions"][1]["reason"], "NewReplicaSetAvailable");
        let sets: Vec<Arc<Value>> = state.store.list(REPLICASETS, Some("default")).cloned().collect();
        assert_eq!(sets.len(), 2, "the old ReplicaSet is kept as history");
        let old = sets.iter().find(|rs| revision(rs) == 1).unwrap();
        assert_eq!(old["spec"]["replicas"], 0);

        // Back to the first template: its ReplicaSet comes back as revision 3.
        apply(&mut state, "deployments", deployment(2, "img:1"));
        settle(&mut state);
        kubelet(&mut state);
        settle(&mut state);
        kubelet(&mut state);
        settle(&mut state);
        let rs = get(&state, REPLICASETS, meta(old, "name"));
        assert_eq!((rs["spec"]["replicas"].as_i64(), revision(&rs)), (Some(2), 3));
        assert!(pods(&state).iter().all(|p| p["spec"]["containers"][0]["image"] == "img:1"));
        assert_never_mixed(&state);
    }

    #[test]
    fn history_is_pruned_to_the_limit() {
        let mut state = state();
        for i in 0..4 {
            let mut d = deployment(1, &format!("img:{i}"));
            d["spec"]["revisionHistoryLimit"] = json!(1);
            apply(&mut state, "deployments", d);
            settle(&mut state);
            kubelet(&mut state);
            settle(&mut state);
            kubelet(&mut state);
            settle(&mut state);
        }
        let revisions: Vec<i64> = state.store.list(REPLICASETS, Some("default")).map(|rs| revision(rs)).collect();
        let mut sorted = revisions.clone();
        sorted.sort();
        assert_eq!(sorted, [3, 4]);
    }

    #[test]
    fn a_pod_that_cannot_be_created_is_reported_on_the_replicaset() {
        let mut state = state();
        let ns_rt = state.catalog.find("", "v1", "namespaces").cloned().unwrap();
        registry::create(&mut state, &ns_rt, "", json!({"metadata": {"name": "team"}}), &opts(), None).unwrap();
        let rt = state.catalog.find("apps", "v1", "replicasets").cloned().unwrap();
        let rs = json!({"metadata": {"name": "r"}, "spec": {"replicas": 0, "selector": {"matchLabels": {"a": "b"}},
            "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}}});
        registry::create(&mut state, &rt, "team", rs, &opts(), None).unwrap();
        // The namespace is terminating (its controller does not run here): no new pods in it.
        registry::delete(&mut state, &ns_rt, "", "team", &DeleteOptions::default()).unwrap();
        let rs = state.store.get(REPLICASETS, "team", "r").cloned().unwrap();
        modify(&mut state, REPLICASETS, &rs, Scope::Main, |o| o["spec"]["replicas"] = json!(1)).unwrap();
        sync_replicaset(&mut state, "team", "r");
        let rs = state.store.get(REPLICASETS, "team", "r").cloned().unwrap();
        let condition = &rs["status"]["conditions"][0];
        assert_eq!((condition["type"].as_str(), condition["reason"].as_str()), (Some("ReplicaFailure"), Some("FailedCreate")));
        assert!(condition["message"].as_str().unwrap().contains("being terminated"), "{condition}");
        assert_eq!(state.store.list(PODS, Some("team")).count(), 0);
    }

    #[test]
    fn template_hashes_are_stable_and_differ_by_template() {
        let a = json!({"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": "i:1"}]}});
        let b = json!({"spec": {"containers": [{"image": "i:1", "name": "c"}]}, "metadata": {"labels": {"app": "web"}}});
        let c = json!({"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": "i:2"}]}});
        assert_eq!(template_hash(&a), template_hash(&b));
        assert_ne!(template_hash(&a), template_hash(&c));
        assert_eq!(template_hash(&a).len(), 10);
        assert!(template_hash(&a).bytes().all(|b| b"bcdfghjklmnpqrstvwxz2456789".contains(&b)));
    }

    #[test]
    fn scale_shows_replicas_and_the_selector() {
        let d = json!({"metadata": {"name": "web", "namespace": "default", "uid": "u", "resourceVersion": "7"},
            "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}, "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}]}},
            "status": {"replicas": 2}});
        let scale = scale_of(&d);
        assert_eq!(scale["spec"]["replicas"], 3);
        assert_eq!(scale["status"], json!({"replicas": 2, "selector": "app=web,tier in (a,b)"}));
        assert_eq!(scale["metadata"]["resourceVersion"], "7");
    }
}
