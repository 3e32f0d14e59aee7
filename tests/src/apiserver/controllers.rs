//! The controller-manager parts a cluster runs for every user: the garbage collector
//! (ownerReferences, background / foreground / orphan), the namespace controller, CRD
//! clean-up, the PersistentVolume binder (every claim binds to a dynamically provisioned
//! volume at once), PVC protection (a claim in use by a pod is kept until the pod goes), and
//! the Deployment and ReplicaSet controllers (`workloads.rs`).
//!
//! They follow the store's history like a watch does and write through the same registry
//! functions as clients, so their changes are ordinary versions and events.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::apply::Scope;
use super::catalog::StorageKey;
use super::registry::{
    self, CRD_CLEANUP_FINALIZER, DeleteOptions, FOREGROUND_FINALIZER, ORPHAN_FINALIZER, Ownership, PVC_PROTECTION_FINALIZER,
    Propagation, State, WriteOptions,
};
use super::store::{EventType, StoredEvent};
use super::workloads;

const PODS: &str = "/pods";
const PVCS: &str = "/persistentvolumeclaims";
const NAMESPACES: &str = "/namespaces";
const CRDS: &str = "apiextensions.k8s.io/customresourcedefinitions";

/// Runs the controllers until `shutdown`; a full pass every `resync` catches anything missed.
pub async fn run(state: Arc<Mutex<State>>, mut changes: watch::Receiver<u64>, resync: Duration, shutdown: CancellationToken) {
    let mut cursor = lock(&state).store.current_rv();
    resync_all(&mut lock(&state));
    let mut tick = tokio::time::interval(resync);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        {
            let mut guard = lock(&state);
            match guard.store.events_after(cursor) {
                Ok(events) => {
                    for event in &events {
                        cursor = event.rv;
                        handle(&mut guard, event);
                    }
                }
                Err(_) => {
                    cursor = guard.store.current_rv();
                    resync_all(&mut guard);
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = changes.changed() => if changed.is_err() { return },
            _ = tick.tick() => {
                resync_all(&mut lock(&state));
            }
        }
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn meta<'v>(obj: &'v Value, field: &str) -> &'v str {
    obj["metadata"][field].as_str().unwrap_or("")
}

fn is_deleting(obj: &Value) -> bool {
    !obj["metadata"]["deletionTimestamp"].is_null()
}

fn has_finalizer(obj: &Value, finalizer: &str) -> bool {
    obj["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|f| f.iter().any(|x| x == finalizer))
}

fn owner_uids(obj: &Value) -> Vec<String> {
    obj["metadata"]["ownerReferences"]
        .as_array()
        .map(|refs| refs.iter().filter_map(|r| r["uid"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

fn handle(state: &mut State, event: &StoredEvent) {
    let obj = &event.object;
    match event.kind {
        EventType::Deleted => {
            let uid = meta(obj, "uid").to_owned();
            for (storage, dep) in dependents(state, &uid) {
                collect_garbage(state, &storage, &dep);
            }
            for owner_uid in owner_uids(obj) {
                if let Some((storage, ns, name)) = state.store.find_uid(&owner_uid).cloned()
                    && let Some(owner) = state.store.get(&storage, &ns, &name).cloned()
                        && is_deleting(&owner) && has_finalizer(&owner, FOREGROUND_FINALIZER) {
                            delete_foreground(state, &storage, &owner);
                        }
            }
            if !event.namespace.is_empty()
                && let Some(namespace) = state.store.get(NAMESPACES, "", &event.namespace).cloned()
                    && is_deleting(&namespace) {
                        empty_namespace(state, &namespace);
                    }
            if &*event.storage == PODS {
                for claim in claims_of(obj) {
                    protect_pvc(state, &event.namespace, &claim);
                }
            }
            if let Some(crd) = crd_of_storage(state, &event.storage)
                && is_deleting(&crd) {
                    clean_up_crd(state, &crd);
                }
            workloads::on_change(state, &event.storage, obj, true);
        }
        EventType::Added | EventType::Modified => observe(state, &event.storage, obj),
    }
}

/// What any object's current state asks of the controllers.
fn observe(state: &mut State, storage: &StorageKey, seen: &Arc<Value>) {
    // Events may be old: always act on the object as it is now.
    let current = |state: &State| state.store.get(storage, meta(seen, "namespace"), meta(seen, "name")).cloned();
    let Some(obj) = current(state) else { return };
    if !owner_uids(&obj).is_empty() {
        collect_garbage(state, storage, &obj);
    }
    let Some(obj) = current(state) else { return };
    if is_deleting(&obj) {
        if has_finalizer(&obj, FOREGROUND_FINALIZER) {
            delete_foreground(state, storage, &obj);
        }
        if has_finalizer(&obj, ORPHAN_FINALIZER) {
            orphan_dependents(state, storage, &obj);
        }
        match &**storage {
            NAMESPACES => empty_namespace(state, &obj),
            CRDS => clean_up_crd(state, &obj),
            PVCS => protect_pvc(state, meta(&obj, "namespace"), meta(&obj, "name")),
            _ => {}
        }
    } else if &**storage == PVCS && obj["status"]["phase"] != "Bound" {
        bind_claim(state, &obj);
    }
    if &**storage == PODS && matches!(obj["status"]["phase"].as_str(), Some("Succeeded" | "Failed")) {
        for claim in claims_of(&obj) {
            protect_pvc(state, meta(&obj, "namespace"), &claim);
        }
    }
    workloads::on_change(state, storage, &obj, false);
}

fn resync_all(state: &mut State) {
    let storages: Vec<StorageKey> = state.store.storages().cloned().collect();
    for storage in storages {
        let objects: Vec<Arc<Value>> = state.store.list(&storage, None).cloned().collect();
        for obj in objects {
            observe(state, &storage, &obj);
        }
    }
}

fn opts(manager: &str) -> WriteOptions {
    WriteOptions {
        field_manager: manager.to_owned(),
        ..Default::default()
    }
}

/// Changes an object in place through the registry.
fn modify(state: &mut State, storage: &StorageKey, obj: &Value, scope: Scope, manager: &str, change: impl FnOnce(&mut Value)) {
    let Some(rt) = registry::type_for_storage(&state.catalog, storage) else { return };
    let (ns, name) = (meta(obj, "namespace").to_owned(), meta(obj, "name").to_owned());
    let Ok(current) = registry::get(state, &rt, &ns, &name) else { return };
    let mut new = registry::to_output(&rt, &current);
    change(&mut new);
    if let Err(e) = registry::commit_update(state, &rt, &ns, &name, &current, new, scope, &opts(manager), Ownership::Update) {
        tracing::warn!(%name, error = %e, manager, "controller update failed");
    }
}

fn delete(state: &mut State, storage: &StorageKey, obj: &Value, propagation: Propagation) {
    if is_deleting(obj) {
        return;
    }
    let Some(rt) = registry::type_for_storage(&state.catalog, storage) else { return };
    let del = DeleteOptions {
        propagation: Some(propagation),
        precondition_uid: Some(meta(obj, "uid").to_owned()),
        ..Default::default()
    };
    let name = meta(obj, "name").to_owned();
    if let Err(e) = registry::delete(state, &rt, meta(obj, "namespace"), &name, &del)
        && e.code != 404 && e.code != 409 {
            tracing::warn!(%name, error = %e, "controller delete failed");
        }
}

fn remove_finalizer(state: &mut State, storage: &StorageKey, obj: &Value, finalizer: &str, manager: &str) {
    modify(state, storage, obj, Scope::Whole, manager, |o| {
        if let Some(list) = o["metadata"]["finalizers"].as_array_mut() {
            list.retain(|f| f != finalizer);
        }
    });
}

fn dependents(state: &State, owner_uid: &str) -> Vec<(StorageKey, Arc<Value>)> {
    let mut found = Vec::new();
    for storage in state.store.storages() {
        for obj in state.store.list(storage, None) {
            if owner_uids(obj).iter().any(|u| u == owner_uid) {
                found.push((storage.clone(), obj.clone()));
            }
        }
    }
    found
}

/// A dependent whose owners are all gone is deleted; dangling references to some of its
/// owners are dropped.
fn collect_garbage(state: &mut State, storage: &StorageKey, dep: &Value) {
    let owners = owner_uids(dep);
    if owners.is_empty() {
        return;
    }
    let dead: HashSet<String> = owners.iter().filter(|u| state.store.find_uid(u).is_none()).cloned().collect();
    if dead.is_empty() {
        return;
    }
    if dead.len() == owners.len() {
        delete(state, storage, dep, Propagation::Background);
    } else {
        modify(state, storage, dep, Scope::Whole, "garbage-collector", |o| {
            if let Some(refs) = o["metadata"]["ownerReferences"].as_array_mut() {
                refs.retain(|r| !r["uid"].as_str().is_some_and(|u| dead.contains(u)));
            }
        });
    }
}

fn delete_foreground(state: &mut State, storage: &StorageKey, owner: &Value) {
    let deps = dependents(state, meta(owner, "uid"));
    if deps.is_empty() {
        remove_finalizer(state, storage, owner, FOREGROUND_FINALIZER, "garbage-collector");
        return;
    }
    for (dep_storage, dep) in deps {
        delete(state, &dep_storage, &dep, Propagation::Foreground);
    }
}

fn orphan_dependents(state: &mut State, storage: &StorageKey, owner: &Value) {
    let uid = meta(owner, "uid").to_owned();
    for (dep_storage, dep) in dependents(state, &uid) {
        modify(state, &dep_storage, &dep, Scope::Whole, "garbage-collector", |o| {
            if let Some(refs) = o["metadata"]["ownerReferences"].as_array_mut() {
                refs.retain(|r| r["uid"] != uid.as_str());
            }
        });
    }
    remove_finalizer(state, storage, owner, ORPHAN_FINALIZER, "garbage-collector");
}

/// Deletes everything in a terminating namespace; removes the namespace once it is empty.
fn empty_namespace(state: &mut State, namespace: &Value) {
    let ns = meta(namespace, "name").to_owned();
    let mut remaining = 0;
    let storages: Vec<StorageKey> = state.store.storages().cloned().collect();
    for storage in storages {
        let objects: Vec<Arc<Value>> = state.store.list(&storage, Some(&ns)).cloned().collect();
        for obj in objects {
            remaining += 1;
            delete(state, &storage, &obj, Propagation::Background);
        }
    }
    if remaining == 0
        && let Some(rt) = registry::type_for_storage(&state.catalog, &StorageKey::from(NAMESPACES)) {
            registry::remove_object(state, &rt, "", &ns);
        }
}

fn crd_of_storage(state: &State, storage: &StorageKey) -> Option<Arc<Value>> {
    let rt = state.catalog.all().iter().find(|t| t.storage == *storage)?;
    let crd_name = &rt.custom()?.crd_name;
    state.store.get(CRDS, "", crd_name).cloned()
}

fn clean_up_crd(state: &mut State, crd: &Value) {
    if !has_finalizer(crd, CRD_CLEANUP_FINALIZER) {
        return;
    }
    let group = crd["spec"]["group"].as_str().unwrap_or("");
    let plural = crd["spec"]["names"]["plural"].as_str().unwrap_or("");
    let storage = super::catalog::Catalog::crd_storage(group, plural);
    let objects: Vec<Arc<Value>> = state.store.list(&storage, None).cloned().collect();
    if objects.is_empty() {
        remove_finalizer(state, &StorageKey::from(CRDS), crd, CRD_CLEANUP_FINALIZER, "apiextensions-controller");
        return;
    }
    for obj in objects {
        delete(state, &storage, &obj, Propagation::Background);
    }
}

/// Every claim binds at once to a dynamically provisioned volume named after its uid.
fn bind_claim(state: &mut State, pvc: &Value) {
    let storage = StorageKey::from(PVCS);
    let volume = format!("pvc-{}", meta(pvc, "uid"));
    if pvc["spec"]["volumeName"].as_str().unwrap_or("").is_empty() {
        modify(state, &storage, pvc, Scope::Main, "persistentvolume-binder-controller", |o| {
            o["spec"]["volumeName"] = json!(volume);
        });
    }
    let Some(pvc) = state.store.get(&storage, meta(pvc, "namespace"), meta(pvc, "name")).cloned() else {
        return;
    };
    let modes = pvc["spec"]["accessModes"].clone();
    let size = pvc["spec"]["resources"]["requests"]["storage"].clone();
    modify(state, &storage, &pvc, Scope::Status, "persistentvolume-binder-controller", |o| {
        o["status"] = json!({"phase": "Bound", "accessModes": modes, "capacity": {"storage": size}});
    });
}

fn claims_of(pod: &Value) -> Vec<String> {
    pod["spec"]["volumes"]
        .as_array()
        .map(|vs| {
            vs.iter()
                .filter_map(|v| v["persistentVolumeClaim"]["claimName"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// A deleted claim stays while a pod that is not finished uses it.
fn protect_pvc(state: &mut State, ns: &str, claim: &str) {
    let Some(pvc) = state.store.get(PVCS, ns, claim).cloned() else { return };
    if !is_deleting(&pvc) || !has_finalizer(&pvc, PVC_PROTECTION_FINALIZER) {
        return;
    }
    let in_use = state.store.list(PODS, Some(ns)).any(|pod| {
        !matches!(pod["status"]["phase"].as_str(), Some("Succeeded" | "Failed")) && claims_of(pod).iter().any(|c| c == claim)
    });
    if !in_use {
        remove_finalizer(state, &StorageKey::from(PVCS), &pvc, PVC_PROTECTION_FINALIZER, "pvc-protection-controller");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::catalog::Catalog;
    use crate::apiserver::store::Store;

    fn state() -> State {
        let mut state = State {
            catalog: Catalog::new(),
            store: Store::new(10_000),
        };
        let ns = state.catalog.find("", "v1", "namespaces").cloned().unwrap();
        registry::create(&mut state, &ns, "", json!({"metadata": {"name": "default"}}), &opts("t"), None).unwrap();
        state
    }

    /// Runs the controllers until nothing changes any more.
    fn settle(state: &mut State) {
        let mut cursor = 0;
        for _ in 0..50 {
            let events = state.store.events_after(cursor).unwrap();
            if events.is_empty() {
                return;
            }
            for event in &events {
                cursor = event.rv;
                handle(state, event);
            }
        }
        panic!("controllers did not settle");
    }

    fn create(state: &mut State, resource: &str, obj: Value) -> Arc<Value> {
        let (group, version) = if resource == "configmaps" || resource == "pods" || resource == "persistentvolumeclaims" || resource == "secrets" {
            ("", "v1")
        } else {
            ("coordination.k8s.io", "v1")
        };
        let rt = state.catalog.find(group, version, resource).cloned().unwrap();
        registry::create(state, &rt, "default", obj, &opts("t"), None).unwrap().object
    }

    fn exists(state: &State, storage: &str, name: &str) -> bool {
        state.store.get(storage, "default", name).is_some()
    }

    fn owned_by(owner: &Value, name: &str) -> Value {
        json!({"metadata": {"name": name, "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap",
            "name": owner["metadata"]["name"], "uid": owner["metadata"]["uid"], "blockOwnerDeletion": true}]}})
    }

    #[test]
    fn background_cascade() {
        let mut state = state();
        let owner = create(&mut state, "configmaps", json!({"metadata": {"name": "owner"}}));
        let child = create(&mut state, "configmaps", owned_by(&owner, "child"));
        create(&mut state, "configmaps", owned_by(&child, "grandchild"));
        settle(&mut state);
        assert!(exists(&state, "/configmaps", "grandchild"));
        let rt = state.catalog.find("", "v1", "configmaps").cloned().unwrap();
        registry::delete(&mut state, &rt, "default", "owner", &DeleteOptions::default()).unwrap();
        settle(&mut state);
        assert!(!exists(&state, "/configmaps", "child") && !exists(&state, "/configmaps", "grandchild"));
    }

    #[test]
    fn orphan_and_foreground() {
        let mut state = state();
        let rt = state.catalog.find("", "v1", "configmaps").cloned().unwrap();
        let owner = create(&mut state, "configmaps", json!({"metadata": {"name": "owner"}}));
        create(&mut state, "configmaps", owned_by(&owner, "kept"));
        let orphan = DeleteOptions { propagation: Some(Propagation::Orphan), ..Default::default() };
        registry::delete(&mut state, &rt, "default", "owner", &orphan).unwrap();
        settle(&mut state);
        assert!(!exists(&state, "/configmaps", "owner"));
        let kept = state.store.get("/configmaps", "default", "kept").unwrap();
        assert!(kept["metadata"]["ownerReferences"].as_array().is_none_or(Vec::is_empty));

        let owner = create(&mut state, "configmaps", json!({"metadata": {"name": "fg"}}));
        let mut blocked = owned_by(&owner, "blocked");
        blocked["metadata"]["finalizers"] = json!(["example.com/hold"]);
        create(&mut state, "configmaps", blocked);
        let fg = DeleteOptions { propagation: Some(Propagation::Foreground), ..Default::default() };
        registry::delete(&mut state, &rt, "default", "fg", &fg).unwrap();
        settle(&mut state);
        assert!(exists(&state, "/configmaps", "fg"), "the owner waits for its dependents");
        let blocked = state.store.get("/configmaps", "default", "blocked").unwrap().clone();
        assert!(is_deleting(&blocked));
        remove_finalizer(&mut state, &StorageKey::from("/configmaps"), &blocked, "example.com/hold", "t");
        settle(&mut state);
        assert!(!exists(&state, "/configmaps", "blocked") && !exists(&state, "/configmaps", "fg"));
    }

    #[test]
    fn claims_bind_and_are_protected_while_used() {
        let mut state = state();
        create(&mut state, "persistentvolumeclaims", json!({"metadata": {"name": "data"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Mi"}}}}));
        settle(&mut state);
        let pvc = state.store.get(PVCS, "default", "data").unwrap().clone();
        assert_eq!(pvc["status"]["phase"], "Bound");
        assert_eq!(pvc["status"]["capacity"]["storage"], "1Mi");
        assert!(pvc["spec"]["volumeName"].as_str().unwrap().starts_with("pvc-"));
        create(&mut state, "pods", json!({"metadata": {"name": "user"}, "spec": {"containers": [{"name": "c", "image": "i"}],
            "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "data"}}]}}));
        let pvcs = state.catalog.find("", "v1", "persistentvolumeclaims").cloned().unwrap();
        registry::delete(&mut state, &pvcs, "default", "data", &DeleteOptions::default()).unwrap();
        settle(&mut state);
        assert!(exists(&state, PVCS, "data"), "in use by a pod");
        let pods = state.catalog.find("", "v1", "pods").cloned().unwrap();
        registry::delete(&mut state, &pods, "default", "user", &DeleteOptions::default()).unwrap();
        settle(&mut state);
        assert!(!exists(&state, PVCS, "data"));
    }

    #[test]
    fn namespaces_are_emptied_then_removed() {
        let mut state = state();
        let ns = state.catalog.find("", "v1", "namespaces").cloned().unwrap();
        registry::create(&mut state, &ns, "", json!({"metadata": {"name": "team"}}), &opts("t"), None).unwrap();
        let cms = state.catalog.find("", "v1", "configmaps").cloned().unwrap();
        registry::create(&mut state, &cms, "team", json!({"metadata": {"name": "a"}}), &opts("t"), None).unwrap();
        registry::delete(&mut state, &ns, "", "team", &DeleteOptions::default()).unwrap();
        let err = registry::create(&mut state, &cms, "team", json!({"metadata": {"name": "b"}}), &opts("t"), None).unwrap_err();
        assert_eq!(err.code, 403);
        settle(&mut state);
        assert!(state.store.get("/configmaps", "team", "a").is_none());
        assert!(state.store.get(NAMESPACES, "", "team").is_none());
    }

    #[test]
    fn deleting_a_crd_deletes_its_objects_and_stops_serving_it() {
        let mut state = state();
        let crds = state.catalog.find("apiextensions.k8s.io", "v1", "customresourcedefinitions").cloned().unwrap();
        let crd: Value = serde_yaml::from_str(&wa_api::crd::crd_yaml()).unwrap();
        registry::create(&mut state, &crds, "", crd, &opts("t"), None).unwrap();
        let rt = state.catalog.find("wa-operator.dev", "v1alpha1", "whatsappsessions").cloned().unwrap();
        registry::create(&mut state, &rt, "default", json!({"metadata": {"name": "a"}, "spec": {}}), &opts("t"), None).unwrap();
        registry::delete(&mut state, &crds, "", "whatsappsessions.wa-operator.dev", &DeleteOptions::default()).unwrap();
        settle(&mut state);
        assert!(state.catalog.find("wa-operator.dev", "v1alpha1", "whatsappsessions").is_none());
        assert_eq!(state.store.count("wa-operator.dev/whatsappsessions"), 0);
    }
}
