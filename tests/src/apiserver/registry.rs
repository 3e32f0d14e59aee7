//! The verbs: create, get, update, patch, delete, bind — with the API server's admission
//! (defaults, validation, pruning), optimistic concurrency, field ownership, generation,
//! finalizers and graceful pod deletion. Pure over [`State`]: the HTTP layer parses and
//! encodes, the controllers call the same functions.

use std::sync::Arc;

use chrono::{SecondsFormat, Utc};
use rand::Rng;
use serde_json::{Map, Value, json};

use super::admission;
use super::apply::{self, ApplyRequest, ManagedEntry, Scope};
use super::catalog::{BuiltinKind, Catalog, ResourceType, StorageKey};
use super::events;
use super::fieldpath::Semantics;
use super::patch::{self, PatchError, PatchKind};
use super::schema;
use super::status::{ApiError, ApiResult, Cause};
use super::store::Store;

/// Everything behind the server's lock.
pub struct State {
    pub catalog: Catalog,
    pub store: Store,
}

/// Finalizer the API server puts on CRDs so their objects are deleted first.
pub const CRD_CLEANUP_FINALIZER: &str = "customresourcecleanup.apiextensions.k8s.io";
/// Finalizer that keeps a PVC while a pod uses it.
pub const PVC_PROTECTION_FINALIZER: &str = "kubernetes.io/pvc-protection";
pub const ORPHAN_FINALIZER: &str = "orphan";
pub const FOREGROUND_FINALIZER: &str = "foregroundDeletion";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FieldValidation {
    Ignore,
    #[default]
    Warn,
    Strict,
}

impl FieldValidation {
    pub fn parse(value: Option<&str>) -> Result<Self, ApiError> {
        match value {
            None | Some("") | Some("Warn") => Ok(Self::Warn),
            Some("Ignore") => Ok(Self::Ignore),
            Some("Strict") => Ok(Self::Strict),
            Some(other) => Err(ApiError::bad_request(format!(
                "fieldValidation must be one of Ignore, Warn or Strict, not {other:?}"
            ))),
        }
    }
}

/// Options every write carries.
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    pub dry_run: bool,
    /// The field manager: the `fieldManager` parameter, or derived from the User-Agent.
    pub field_manager: String,
    pub field_validation: FieldValidation,
    pub force: bool,
}

/// A successful write.
#[derive(Debug, Clone)]
pub struct Written {
    /// In storage form; the HTTP layer converts it to the requested version.
    pub object: Arc<Value>,
    pub created: bool,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Propagation {
    Orphan,
    Background,
    Foreground,
}

#[derive(Debug, Clone, Default)]
pub struct DeleteOptions {
    pub grace_period: Option<i64>,
    pub propagation: Option<Propagation>,
    pub precondition_uid: Option<String>,
    pub precondition_rv: Option<String>,
    pub dry_run: bool,
}

#[derive(Debug, Clone)]
pub enum DeleteOutcome {
    /// The object is gone now (its last state).
    Gone(Arc<Value>),
    /// Deletion began: finalizers or a pod's grace period keep it for now.
    Pending(Arc<Value>),
}

pub fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn ns_key(rt: &ResourceType, ns: &str) -> String {
    if rt.namespaced { ns.to_owned() } else { String::new() }
}

/// The object as the requested version shows it.
pub fn to_output(rt: &ResourceType, stored: &Value) -> Value {
    if rt.builtin() == Some(BuiltinKind::EventV1) {
        return events::core_to_v1(stored);
    }
    let api_version = rt.api_version();
    if stored["apiVersion"].as_str() == Some(api_version.as_str()) && stored["kind"].as_str() == Some(rt.kind.as_str()) {
        return stored.clone();
    }
    let mut out = stored.clone();
    if let Some(map) = out.as_object_mut() {
        map.insert("apiVersion".into(), Value::String(api_version));
        map.insert("kind".into(), Value::String(rt.kind.clone()));
    }
    out
}

fn to_storage(rt: &ResourceType, obj: Value) -> Value {
    if rt.builtin() == Some(BuiltinKind::EventV1) {
        events::v1_to_core(&obj)
    } else {
        obj
    }
}

pub fn semantics(rt: &ResourceType) -> Semantics<'_> {
    match rt.custom() {
        Some(custom) => Semantics::schema_root(custom.schema.as_ref()),
        None => Semantics::builtin_root(rt.builtin().unwrap_or(BuiltinKind::ConfigMap)),
    }
}

fn main_scope(rt: &ResourceType) -> Scope {
    if rt.status_subresource { Scope::Main } else { Scope::Whole }
}

fn meta_str<'v>(obj: &'v Value, field: &str) -> &'v str {
    obj["metadata"][field].as_str().unwrap_or("")
}

fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    match obj.get_mut("metadata") {
        Some(Value::Object(meta)) => meta,
        _ => unreachable!("metadata was made an object above"),
    }
}

fn finalizers(obj: &Value) -> Vec<String> {
    obj["metadata"]["finalizers"]
        .as_array()
        .map(|f| f.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

fn is_deleting(obj: &Value) -> bool {
    !obj["metadata"]["deletionTimestamp"].is_null()
}

/// The part of an object whose change bumps `metadata.generation`.
fn generation_view(obj: &Value) -> Value {
    let mut view = obj.clone();
    if let Some(map) = view.as_object_mut() {
        map.remove("metadata");
        map.remove("status");
        map.remove("apiVersion");
        map.remove("kind");
    }
    view
}

fn without_rv(obj: &Value) -> Value {
    let mut copy = obj.clone();
    if let Some(meta) = copy.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
    }
    copy
}

/// Checks that a body is of the kind the URL names, and fills apiVersion and kind in.
fn check_type(rt: &ResourceType, obj: &mut Value) -> ApiResult<()> {
    let Some(map) = obj.as_object_mut() else {
        return Err(ApiError::bad_request("the body must be a JSON or YAML object"));
    };
    let api_version = rt.api_version();
    match map.get("apiVersion").and_then(Value::as_str) {
        Some(v) if !v.is_empty() && v != api_version => {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({v}) does not match the expected API version ({api_version})"
            )));
        }
        _ => {}
    }
    match map.get("kind").and_then(Value::as_str) {
        Some(k) if !k.is_empty() && k != rt.kind => {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({k}) does not match the expected kind ({})",
                rt.kind
            )));
        }
        _ => {}
    }
    map.insert("apiVersion".into(), Value::String(api_version));
    map.insert("kind".into(), Value::String(rt.kind.clone()));
    Ok(())
}

fn check_namespace_field(rt: &ResourceType, ns: &str, obj: &mut Value) -> ApiResult<()> {
    let meta = meta_mut(obj);
    if rt.namespaced {
        match meta.get("namespace").and_then(Value::as_str) {
            Some(n) if !n.is_empty() && n != ns => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            _ => {
                meta.insert("namespace".into(), Value::String(ns.to_owned()));
            }
        }
    } else {
        meta.remove("namespace");
    }
    Ok(())
}

/// Namespaced writes need a namespace that exists and is not being deleted.
fn check_namespace_open(state: &State, rt: &ResourceType, ns: &str, name: &str) -> ApiResult<()> {
    if !rt.namespaced {
        return Ok(());
    }
    let Some(namespace) = state.store.get("/namespaces", "", ns) else {
        return Err(ApiError::namespace_not_found(ns));
    };
    if is_deleting(namespace) {
        return Err(ApiError::forbidden(
            rt.subject(),
            name,
            format!("unable to create new content in namespace {ns} because it is being terminated"),
        ));
    }
    Ok(())
}

fn generated_name(prefix: &str) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    let suffix: String = (0..5)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    let prefix = if prefix.len() > 58 { &prefix[..58] } else { prefix };
    format!("{prefix}{suffix}")
}

/// Decoding, defaults, pruning and validation; returns the object to store and warnings.
fn admit(rt: &ResourceType, old: Option<&Value>, mut obj: Value, opts: &WriteOptions) -> ApiResult<(Value, Vec<String>)> {
    let name = meta_str(&obj, "name").to_owned();
    let mut warnings = Vec::new();
    let mut unknown = Vec::new();
    let mut causes: Vec<Cause> = Vec::new();
    match &rt.behaviour {
        super::catalog::Behaviour::Builtin(kind) => {
            let kind = *kind;
            match admission::decode(kind, &obj) {
                Ok(decoded) => {
                    obj = decoded.object;
                    unknown = decoded.unknown_fields;
                }
                Err(e) => {
                    let causes = admission::validate_builtin(kind, &obj, old);
                    if !causes.is_empty() {
                        return Err(ApiError::invalid(rt.subject(), &name, causes));
                    }
                    return Err(ApiError::bad_request(format!(
                        "{} in version \"{}\" cannot be handled as a {}: {e}",
                        rt.kind, rt.version, rt.kind
                    )));
                }
            }
            if kind == BuiltinKind::Secret {
                admission::fold_string_data(&mut obj);
            }
            admission::apply_defaults(kind, &mut obj);
            causes.extend(admission::validate_builtin(kind, &obj, old));
        }
        super::catalog::Behaviour::Custom(custom) => {
            if let Some(schema) = &custom.schema {
                unknown = schema::prune(&mut obj, schema);
                schema::apply_defaults(&mut obj, schema);
                causes.extend(schema::validate(&obj, schema));
            }
        }
    }
    if !unknown.is_empty() {
        match opts.field_validation {
            FieldValidation::Strict => {
                let list: Vec<String> = unknown.iter().map(|f| format!("unknown field \"{f}\"")).collect();
                return Err(ApiError::bad_request(format!("strict decoding error: {}", list.join(", "))));
            }
            FieldValidation::Warn => warnings.extend(unknown.iter().map(|f| format!("unknown field \"{f}\""))),
            FieldValidation::Ignore => {}
        }
    }
    causes.extend(admission::validate_metadata(rt.builtin(), &obj));
    if !causes.is_empty() {
        return Err(ApiError::invalid(rt.subject(), &name, causes));
    }
    Ok((obj, warnings))
}

pub fn get(state: &State, rt: &ResourceType, ns: &str, name: &str) -> ApiResult<Arc<Value>> {
    state
        .store
        .get(&rt.storage, &ns_key(rt, ns), name)
        .cloned()
        .ok_or_else(|| ApiError::not_found(rt.subject(), name))
}

/// A CRD's custom resources cannot be created while it is being deleted.
fn check_crd_open(state: &State, rt: &ResourceType) -> ApiResult<()> {
    if let Some(custom) = rt.custom()
        && let Some(crd) = state
            .store
            .get("apiextensions.k8s.io/customresourcedefinitions", "", &custom.crd_name)
            && is_deleting(crd) {
                return Err(ApiError::method_not_allowed("create not allowed while custom resource definition is terminating".to_string()));
            }
    Ok(())
}

fn crd_status(crd: &Value) -> Value {
    let now = now();
    let storage: Vec<Value> = crd["spec"]["versions"]
        .as_array()
        .map(|vs| vs.iter().filter(|v| v["storage"] == Value::Bool(true)).map(|v| v["name"].clone()).collect())
        .unwrap_or_default();
    let condition = |type_: &str, reason: &str, message: &str| {
        json!({"type": type_, "status": "True", "reason": reason, "message": message, "lastTransitionTime": now})
    };
    json!({
        "acceptedNames": crd["spec"]["names"].clone(),
        "conditions": [
            condition("NamesAccepted", "NoConflicts", "no conflicts found"),
            condition("Established", "InitialNamesAccepted", "the initial names have been accepted"),
        ],
        "storedVersions": storage,
    })
}

/// Creates an object. `managed`: ownership already computed by server-side apply.
pub fn create(
    state: &mut State,
    rt: &ResourceType,
    ns: &str,
    mut obj: Value,
    opts: &WriteOptions,
    managed: Option<Vec<ManagedEntry>>,
) -> ApiResult<Written> {
    check_type(rt, &mut obj)?;
    check_namespace_field(rt, ns, &mut obj)?;
    let ns = ns_key(rt, ns);
    let meta = meta_mut(&mut obj);
    if meta.get("resourceVersion").and_then(Value::as_str).is_some_and(|rv| !rv.is_empty()) {
        return Err(ApiError::bad_request("resourceVersion should not be set on objects to be created"));
    }
    let mut name = meta.get("name").and_then(Value::as_str).unwrap_or("").to_owned();
    if name.is_empty() {
        let prefix = meta.get("generateName").and_then(Value::as_str).unwrap_or("").to_owned();
        if prefix.is_empty() {
            return Err(ApiError::invalid(
                rt.subject(),
                "",
                vec![Cause::new("FieldValueRequired", "metadata.name", "Required value: name or generateName is required")],
            ));
        }
        // A few tries: a generated name may, rarely, be taken.
        name = (0..8)
            .map(|_| generated_name(&prefix))
            .find(|candidate| state.store.get(&rt.storage, &ns, candidate).is_none())
            .unwrap_or_else(|| generated_name(&prefix));
    }
    meta.insert("name".into(), Value::String(name.clone()));
    meta.insert("uid".into(), Value::String(uuid::Uuid::new_v4().to_string()));
    meta.insert("creationTimestamp".into(), Value::String(now()));
    meta.insert("generation".into(), json!(1));
    for field in ["deletionTimestamp", "deletionGracePeriodSeconds", "managedFields", "selfLink"] {
        meta.remove(field);
    }
    check_namespace_open(state, rt, &ns, &name)?;
    check_crd_open(state, rt)?;

    let kind = rt.builtin();
    if rt.status_subresource {
        let initial = kind.and_then(|k| admission::initial_status(k, &obj));
        if let Some(map) = obj.as_object_mut() {
            match initial {
                Some(status) => {
                    map.insert("status".into(), status);
                }
                None => {
                    map.remove("status");
                }
            }
        }
    }
    match kind {
        Some(BuiltinKind::Namespace) => {
            obj["spec"]["finalizers"] = json!(["kubernetes"]);
            let meta = meta_mut(&mut obj);
            let labels = meta.entry("labels").or_insert_with(|| json!({}));
            if let Some(labels) = labels.as_object_mut() {
                labels.insert("kubernetes.io/metadata.name".into(), Value::String(name.clone()));
            }
        }
        Some(BuiltinKind::PersistentVolumeClaim) => add_finalizer(&mut obj, PVC_PROTECTION_FINALIZER),
        Some(BuiltinKind::CustomResourceDefinition) => {
            add_finalizer(&mut obj, CRD_CLEANUP_FINALIZER);
            let group = obj["spec"]["group"].as_str().unwrap_or("");
            let plural = obj["spec"]["names"]["plural"].as_str().unwrap_or("");
            if state.catalog.is_builtin_resource(group, plural) {
                return Err(ApiError::invalid(
                    rt.subject(),
                    &name,
                    vec![Cause::new("FieldValueInvalid", "spec.names.plural", "Invalid value: a built-in resource has this name")],
                ));
            }
        }
        _ => {}
    }

    let (mut obj, warnings) = admit(rt, None, obj, opts)?;
    if kind == Some(BuiltinKind::CustomResourceDefinition) {
        obj["status"] = crd_status(&obj);
    }
    let scope = main_scope(rt);
    let sem = semantics(rt);
    let entries = match managed {
        Some(entries) => entries,
        None => {
            let (api_version, now) = (rt.api_version(), now());
            let writer = ApplyRequest { manager: &opts.field_manager, force: false, scope, api_version: &api_version, now: &now };
            apply::track_update(None, &obj, Vec::new(), &sem, &writer)
        }
    };
    apply::write_managed(&mut obj, &entries);
    let obj = to_storage(rt, obj);

    if state.store.get(&rt.storage, &ns, &name).is_some() {
        return Err(ApiError::already_exists(rt.subject(), &name));
    }
    if opts.dry_run {
        return Ok(Written {
            object: Arc::new(obj),
            created: true,
            warnings,
        });
    }
    if kind == Some(BuiltinKind::CustomResourceDefinition) {
        state.catalog.register_crd(&obj).map_err(ApiError::bad_request)?;
    }
    let stored = state.store.insert(&rt.storage, &ns, &name, obj);
    Ok(Written {
        object: stored,
        created: true,
        warnings,
    })
}

fn add_finalizer(obj: &mut Value, finalizer: &str) {
    let meta = meta_mut(obj);
    let list = meta.entry("finalizers").or_insert_with(|| json!([]));
    if let Some(list) = list.as_array_mut()
        && !list.iter().any(|f| f == finalizer) {
            list.push(Value::String(finalizer.to_owned()));
        }
}

/// How ownership of an update is computed.
pub enum Ownership {
    /// Update semantics: the manager takes the fields it changed.
    Update,
    /// Already computed by server-side apply.
    Applied(Vec<ManagedEntry>),
}

/// Stores a new version of an existing object: scope rules, immutable metadata, admission,
/// generation, ownership, no-op detection, and completing a deletion once the last
/// finalizer is gone.
#[allow(clippy::too_many_arguments)]
pub fn commit_update(
    state: &mut State,
    rt: &ResourceType,
    ns: &str,
    name: &str,
    old: &Arc<Value>,
    candidate: Value,
    scope: Scope,
    opts: &WriteOptions,
    ownership: Ownership,
) -> ApiResult<Written> {
    let ns = ns_key(rt, ns);
    let old_out = to_output(rt, old);
    let mut new = match scope {
        Scope::Status => {
            let mut merged = old_out.clone();
            match candidate.get("status") {
                Some(status) => merged["status"] = status.clone(),
                None => {
                    if let Some(map) = merged.as_object_mut() {
                        map.remove("status");
                    }
                }
            }
            merged
        }
        Scope::Main => {
            let mut merged = candidate;
            if let Some(map) = merged.as_object_mut() {
                match old_out.get("status") {
                    Some(status) => map.insert("status".into(), status.clone()),
                    None => map.remove("status"),
                };
            }
            merged
        }
        Scope::Whole => candidate,
    };
    check_type(rt, &mut new)?;
    {
        let old_meta = old_out["metadata"].as_object().cloned().unwrap_or_default();
        let meta = meta_mut(&mut new);
        for field in ["uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "generation", "name", "namespace"] {
            match old_meta.get(field) {
                Some(v) => meta.insert(field.into(), v.clone()),
                None => meta.remove(field),
            };
        }
    }
    if is_deleting(&old_out) {
        let before = finalizers(&old_out);
        let added: Vec<String> = finalizers(&new).into_iter().filter(|f| !before.contains(f)).collect();
        if !added.is_empty() {
            return Err(ApiError::invalid(
                rt.subject(),
                name,
                vec![Cause::new(
                    "FieldValueForbidden",
                    "metadata.finalizers",
                    format!("Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers {added:?}"),
                )],
            ));
        }
    }
    let (mut new, warnings) = admit(rt, Some(&old_out), new, opts)?;
    if rt.builtin() == Some(BuiltinKind::CustomResourceDefinition) && scope != Scope::Status {
        new["status"] = old_out["status"].clone();
        if new["spec"] != old_out["spec"] {
            new["status"] = crd_status(&new);
        }
    }
    if generation_view(&new) != generation_view(&old_out) {
        let generation = old_out["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
        meta_mut(&mut new).insert("generation".into(), json!(generation));
    }
    let entries = match ownership {
        Ownership::Applied(entries) => entries,
        Ownership::Update => {
            let (api_version, now) = (rt.api_version(), now());
            let writer = ApplyRequest { manager: &opts.field_manager, force: false, scope, api_version: &api_version, now: &now };
            apply::track_update(Some(&old_out), &new, apply::parse_managed(&old_out), &semantics(rt), &writer)
        }
    };
    apply::write_managed(&mut new, &entries);
    if without_rv(&new) == without_rv(&old_out) {
        return Ok(Written {
            object: old.clone(),
            created: false,
            warnings,
        });
    }
    let new = to_storage(rt, new);
    if opts.dry_run {
        return Ok(Written {
            object: Arc::new(new),
            created: false,
            warnings,
        });
    }
    if is_deleting(&new) && finalizers(&new).is_empty() && rt.builtin() != Some(BuiltinKind::Namespace) {
        let last = state.store.replace(&rt.storage, &ns, name, new);
        let gone = remove_object(state, rt, &ns, name).unwrap_or(last);
        return Ok(Written {
            object: gone,
            created: false,
            warnings,
        });
    }
    if rt.builtin() == Some(BuiltinKind::CustomResourceDefinition) {
        state.catalog.register_crd(&new).map_err(ApiError::bad_request)?;
    }
    let stored = state.store.replace(&rt.storage, &ns, name, new);
    Ok(Written {
        object: stored,
        created: false,
        warnings,
    })
}

/// Removes an object from storage, with the side effects of its going.
pub fn remove_object(state: &mut State, rt: &ResourceType, ns: &str, name: &str) -> Option<Arc<Value>> {
    let gone = state.store.remove(&rt.storage, &ns_key(rt, ns), name)?;
    if rt.builtin() == Some(BuiltinKind::CustomResourceDefinition) {
        state.catalog.unregister_crd(name);
    }
    Some(gone)
}

fn check_rv_precondition(rt: &ResourceType, name: &str, old: &Value, candidate: &Value) -> ApiResult<()> {
    match candidate["metadata"]["resourceVersion"].as_str() {
        Some(rv) if !rv.is_empty() && rv != meta_str(old, "resourceVersion") => Err(ApiError::modified(rt.subject(), name)),
        _ => Ok(()),
    }
}

/// `GET …/scale` of a Deployment or ReplicaSet: an `autoscaling/v1` Scale.
pub fn get_scale(state: &State, rt: &ResourceType, ns: &str, name: &str) -> ApiResult<Value> {
    let obj = get(state, rt, ns, name)?;
    Ok(super::workloads::scale_of(&obj))
}

/// `PUT`/`PATCH …/scale`: the Scale's `spec.replicas` becomes the object's (its
/// `resourceVersion`, when set, must be current). Returns the new Scale.
pub fn set_scale(state: &mut State, rt: &ResourceType, ns: &str, name: &str, scale: &Value, opts: &WriteOptions) -> ApiResult<Value> {
    let old = get(state, rt, ns, name)?;
    check_rv_precondition(rt, name, &old, scale)?;
    let replicas = match &scale["spec"]["replicas"] {
        Value::Number(n) if n.as_i64().is_some_and(|n| n >= 0) => n.clone(),
        other => {
            return Err(ApiError::invalid(
                rt.subject(),
                name,
                vec![Cause::new("FieldValueInvalid", "spec.replicas", format!("Invalid value: {other}: must be greater than or equal to 0"))],
            ));
        }
    };
    let mut new = to_output(rt, &old);
    new["spec"]["replicas"] = Value::Number(replicas);
    let written = commit_update(state, rt, ns, name, &old, new, Scope::Main, opts, Ownership::Update)?;
    Ok(super::workloads::scale_of(&written.object))
}

/// `PUT`: replaces the object (or its status).
pub fn update(state: &mut State, rt: &ResourceType, ns: &str, name: &str, mut body: Value, scope: Scope, opts: &WriteOptions) -> ApiResult<Written> {
    let old = get(state, rt, ns, name)?;
    check_type(rt, &mut body)?;
    let body_name = meta_str(&body, "name");
    if !body_name.is_empty() && body_name != name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({name})"
        )));
    }
    check_namespace_field(rt, ns, &mut body)?;
    let rv = meta_str(&body, "resourceVersion");
    if rv.is_empty() && rt.custom().is_some() {
        return Err(ApiError::invalid(
            rt.subject(),
            name,
            vec![Cause::new("FieldValueInvalid", "metadata.resourceVersion", "Invalid value: 0x0: must be specified for an update")],
        ));
    }
    check_rv_precondition(rt, name, &old, &body)?;
    commit_update(state, rt, ns, name, &old, body, scope, opts, Ownership::Update)
}

/// `PATCH` in any of the four formats; an apply patch creates the object when missing.
#[allow(clippy::too_many_arguments)]
pub fn patch(
    state: &mut State,
    rt: &ResourceType,
    ns: &str,
    name: &str,
    kind: PatchKind,
    body: &Value,
    scope: Scope,
    opts: &WriteOptions,
) -> ApiResult<Written> {
    if opts.force && kind != PatchKind::Apply {
        return Err(ApiError::invalid(
            rt.subject(),
            name,
            vec![Cause::new("FieldValueForbidden", "force", "Forbidden: may not be specified for non-apply patch")],
        ));
    }
    if kind == PatchKind::Strategic && rt.custom().is_some() {
        return Err(ApiError::unsupported_media_type(
            "application/strategic-merge-patch+json",
            &["application/json-patch+json", "application/merge-patch+json", "application/apply-patch+yaml"],
        ));
    }
    if kind == PatchKind::Apply {
        return server_side_apply(state, rt, ns, name, body, scope, opts);
    }
    let old = get(state, rt, ns, name)?;
    let mut working = to_output(rt, &old);
    let sem = semantics(rt);
    let result = match kind {
        PatchKind::Merge => patch::merge_patch(&mut working, body),
        PatchKind::Json => patch::json_patch(&mut working, body),
        PatchKind::Strategic => patch::strategic_merge(&mut working, body, &sem),
        PatchKind::Apply => unreachable!("handled above"),
    };
    match result {
        Ok(()) => {}
        Err(PatchError::Malformed(m)) => return Err(ApiError::bad_request(m)),
        Err(PatchError::NotApplicable(m)) => {
            return Err(ApiError::invalid(rt.subject(), name, vec![Cause::new("FieldValueInvalid", "", m)]));
        }
    }
    if meta_str(&working, "name") != name {
        return Err(ApiError::bad_request("metadata.name cannot be changed by a patch"));
    }
    check_rv_precondition(rt, name, &old, &working)?;
    commit_update(state, rt, ns, name, &old, working, scope, opts, Ownership::Update)
}

fn server_side_apply(state: &mut State, rt: &ResourceType, ns: &str, name: &str, body: &Value, scope: Scope, opts: &WriteOptions) -> ApiResult<Written> {
    if opts.field_manager.is_empty() || opts.field_manager == "unknown" {
        return Err(ApiError::invalid(
            rt.subject(),
            name,
            vec![Cause::new("FieldValueRequired", "fieldManager", "Required value: is required for apply patch")],
        ));
    }
    let mut applied = body.clone();
    let (Some(api_version), Some(kind)) = (applied["apiVersion"].as_str(), applied["kind"].as_str()) else {
        return Err(ApiError::bad_request("apply patches must set apiVersion and kind"));
    };
    if api_version != rt.api_version() || kind != rt.kind {
        return Err(ApiError::bad_request(format!(
            "the apply configuration is a {api_version}, Kind={kind}, but the URL names {}, Kind={}",
            rt.api_version(),
            rt.kind
        )));
    }
    let body_name = meta_str(&applied, "name");
    if !body_name.is_empty() && body_name != name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({name})"
        )));
    }
    check_namespace_field(rt, ns, &mut applied)?;
    let sem = semantics(rt);
    let now = now();
    let api_version = rt.api_version();
    let request = ApplyRequest {
        manager: &opts.field_manager,
        force: opts.force,
        scope: if scope == Scope::Status { Scope::Status } else { main_scope(rt) },
        api_version: &api_version,
        now: &now,
    };
    let existing = state.store.get(&rt.storage, &ns_key(rt, ns), name).cloned();
    match existing {
        Some(old) => {
            let live = to_output(rt, &old);
            if let Some(rv) = applied["metadata"]["resourceVersion"].as_str()
                && !rv.is_empty() && rv != meta_str(&old, "resourceVersion") {
                    return Err(ApiError::modified(rt.subject(), name));
                }
            let (result, entries) = apply::apply(&live, &applied, apply::parse_managed(&live), &sem, &request)
                .map_err(|conflicts| ApiError::apply_conflict(rt.subject(), name, &conflicts))?;
            commit_update(state, rt, ns, name, &old, result, scope, opts, Ownership::Applied(entries))
        }
        None => {
            if scope == Scope::Status {
                return Err(ApiError::not_found(rt.subject(), name));
            }
            let skeleton = json!({"apiVersion": api_version, "kind": rt.kind, "metadata": {"name": name}});
            let (result, entries) = apply::apply(&skeleton, &applied, Vec::new(), &sem, &request)
                .map_err(|conflicts| ApiError::apply_conflict(rt.subject(), name, &conflicts))?;
            let mut obj = result;
            meta_mut(&mut obj).insert("name".into(), Value::String(name.to_owned()));
            create(state, rt, ns, obj, opts, Some(entries))
        }
    }
}

/// `DELETE`: immediate, or the start of a deletion that finalizers or a pod's grace period
/// hold back.
pub fn delete(state: &mut State, rt: &ResourceType, ns: &str, name: &str, del: &DeleteOptions) -> ApiResult<DeleteOutcome> {
    let old = get(state, rt, ns, name)?;
    if let Some(uid) = &del.precondition_uid {
        let actual = meta_str(&old, "uid");
        if uid != actual {
            return Err(ApiError::conflict(
                rt.subject(),
                name,
                &format!("Precondition failed: UID in precondition: {uid}, UID in object meta: {actual}"),
            ));
        }
    }
    if let Some(rv) = &del.precondition_rv {
        let actual = meta_str(&old, "resourceVersion");
        if rv != actual {
            return Err(ApiError::conflict(
                rt.subject(),
                name,
                &format!("Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {actual}"),
            ));
        }
    }
    let mut obj = (*old).clone();
    match del.propagation {
        Some(Propagation::Orphan) => add_finalizer(&mut obj, ORPHAN_FINALIZER),
        Some(Propagation::Foreground) => add_finalizer(&mut obj, FOREGROUND_FINALIZER),
        _ => {}
    }
    let kind = rt.builtin();

    // Namespaces are emptied by the namespace controller before they go.
    if kind == Some(BuiltinKind::Namespace) {
        if !is_deleting(&obj) {
            meta_mut(&mut obj).insert("deletionTimestamp".into(), Value::String(now()));
            meta_mut(&mut obj).insert("deletionGracePeriodSeconds".into(), json!(0));
            obj["status"]["phase"] = json!("Terminating");
        }
        return write_pending(state, rt, ns, name, &old, obj, del.dry_run);
    }

    // A pod on a node is stopped by its kubelet (the pod runner) within the grace period.
    if kind == Some(BuiltinKind::Pod) {
        let on_node = !obj["spec"]["nodeName"].as_str().unwrap_or("").is_empty();
        let finished = matches!(obj["status"]["phase"].as_str(), Some("Succeeded" | "Failed"));
        let grace = del
            .grace_period
            .or_else(|| obj["spec"]["terminationGracePeriodSeconds"].as_i64())
            .unwrap_or(30)
            .max(0);
        if on_node && !finished && grace > 0 {
            let current = obj["metadata"]["deletionGracePeriodSeconds"].as_i64();
            if current.is_none_or(|c| grace < c) {
                let deadline = Utc::now() + chrono::Duration::seconds(grace);
                let meta = meta_mut(&mut obj);
                meta.insert("deletionTimestamp".into(), Value::String(deadline.to_rfc3339_opts(SecondsFormat::Secs, true)));
                meta.insert("deletionGracePeriodSeconds".into(), json!(grace));
                if current.is_none() {
                    bump_generation(&mut obj);
                }
            }
            return write_pending(state, rt, ns, name, &old, obj, del.dry_run);
        }
    }

    if !finalizers(&obj).is_empty() {
        if !is_deleting(&obj) {
            let meta = meta_mut(&mut obj);
            meta.insert("deletionTimestamp".into(), Value::String(now()));
            meta.insert("deletionGracePeriodSeconds".into(), json!(0));
            bump_generation(&mut obj);
        } else if kind == Some(BuiltinKind::Pod) {
            // A forced delete (grace 0) of a terminating pod keeps the pod only for its finalizers.
            meta_mut(&mut obj).insert("deletionGracePeriodSeconds".into(), json!(0));
        }
        return write_pending(state, rt, ns, name, &old, obj, del.dry_run);
    }
    if del.dry_run {
        return Ok(DeleteOutcome::Gone(old));
    }
    let gone = remove_object(state, rt, ns, name).ok_or_else(|| ApiError::not_found(rt.subject(), name))?;
    Ok(DeleteOutcome::Gone(gone))
}

fn bump_generation(obj: &mut Value) {
    let generation = obj["metadata"]["generation"].as_i64().unwrap_or(0);
    if generation > 0 {
        meta_mut(obj).insert("generation".into(), json!(generation + 1));
    }
}

fn write_pending(state: &mut State, rt: &ResourceType, ns: &str, name: &str, old: &Arc<Value>, obj: Value, dry_run: bool) -> ApiResult<DeleteOutcome> {
    if dry_run || obj == **old {
        return Ok(DeleteOutcome::Pending(if dry_run { Arc::new(obj) } else { old.clone() }));
    }
    let stored = state.store.replace(&rt.storage, &ns_key(rt, ns), name, obj);
    Ok(DeleteOutcome::Pending(stored))
}

/// `POST pods/{name}/binding`: the scheduler's way to put a pod on a node.
pub fn bind(state: &mut State, rt: &ResourceType, ns: &str, name: &str, binding: &Value) -> ApiResult<()> {
    let old = get(state, rt, ns, name)?;
    let node = binding["target"]["name"].as_str().unwrap_or("");
    if node.is_empty() {
        return Err(ApiError::invalid(
            rt.subject(),
            name,
            vec![Cause::new("FieldValueRequired", "target.name", "Required value")],
        ));
    }
    let current = old["spec"]["nodeName"].as_str().unwrap_or("");
    if !current.is_empty() {
        return Err(ApiError::conflict(
            rt.subject(),
            name,
            &format!("pod {name} is already assigned to node \"{current}\""),
        ));
    }
    if is_deleting(&old) {
        return Err(ApiError::conflict(rt.subject(), name, "pod is being deleted, cannot be assigned to a host"));
    }
    let mut obj = (*old).clone();
    obj["spec"]["nodeName"] = json!(node);
    let scheduled = json!({"type": "PodScheduled", "status": "True", "lastProbeTime": null, "lastTransitionTime": now()});
    let conditions = obj["status"]["conditions"].as_array().cloned().unwrap_or_default();
    let mut conditions: Vec<Value> = conditions.into_iter().filter(|c| c["type"] != "PodScheduled").collect();
    conditions.insert(0, scheduled);
    obj["status"]["conditions"] = Value::Array(conditions);
    state.store.replace(&rt.storage, &ns_key(rt, ns), name, obj);
    Ok(())
}

/// `PUT namespaces/{name}/finalize`: sets `spec.finalizers`; the namespace goes once they are
/// empty and it is being deleted (the namespace controller removes it).
pub fn finalize_namespace(state: &mut State, rt: &ResourceType, name: &str, body: &Value) -> ApiResult<Written> {
    let old = get(state, rt, "", name)?;
    let mut obj = (*old).clone();
    obj["spec"]["finalizers"] = body["spec"]["finalizers"].clone();
    if obj == *old {
        return Ok(Written {
            object: old,
            created: false,
            warnings: Vec::new(),
        });
    }
    let stored = state.store.replace(&rt.storage, "", name, obj);
    Ok(Written {
        object: stored,
        created: false,
        warnings: Vec::new(),
    })
}

/// The resource type that manages a storage (for controllers, which start from an event).
pub fn type_for_storage(catalog: &Catalog, storage: &StorageKey) -> Option<ResourceType> {
    catalog
        .all()
        .iter()
        .find(|t| t.storage == *storage && t.builtin() != Some(BuiltinKind::EventV1))
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> State {
        let mut state = State {
            catalog: Catalog::new(),
            store: Store::new(1000),
        };
        let ns = state.catalog.find("", "v1", "namespaces").cloned().unwrap();
        create(&mut state, &ns, "", json!({"metadata": {"name": "default"}}), &opts("test"), None).unwrap();
        let crd_rt = state.catalog.find("apiextensions.k8s.io", "v1", "customresourcedefinitions").cloned().unwrap();
        let crd: Value = serde_yaml::from_str(&wa_api::crd::crd_yaml()).unwrap();
        create(&mut state, &crd_rt, "", crd, &opts("test"), None).unwrap();
        state
    }

    fn opts(manager: &str) -> WriteOptions {
        WriteOptions {
            field_manager: manager.into(),
            ..Default::default()
        }
    }

    fn sessions(state: &State) -> ResourceType {
        state.catalog.find("wa-operator.dev", "v1alpha1", "whatsappsessions").cloned().unwrap()
    }

    fn session(name: &str, spec: Value) -> Value {
        json!({"apiVersion": "wa-operator.dev/v1alpha1", "kind": "WhatsAppSession", "metadata": {"name": name}, "spec": spec})
    }

    #[test]
    fn create_fills_metadata_defaults_and_refuses_duplicates() {
        let mut state = state();
        let rt = sessions(&state);
        let w = create(&mut state, &rt, "default", session("a", json!({"engine": "sandbox"})), &opts("kubectl"), None).unwrap();
        let obj = &w.object;
        assert_eq!(obj["metadata"]["generation"], 1);
        assert_eq!(obj["metadata"]["namespace"], "default");
        assert!(obj["metadata"]["uid"].is_string() && obj["metadata"]["creationTimestamp"].is_string());
        assert_eq!(obj["spec"]["rateLimit"]["burst"], 5);
        assert_eq!(obj["metadata"]["managedFields"][0]["manager"], "kubectl");
        let err = create(&mut state, &rt, "default", session("a", json!({})), &opts("kubectl"), None).unwrap_err();
        assert_eq!((err.code, err.reason), (409, "AlreadyExists"));
        let err = create(&mut state, &rt, "nope", session("b", json!({})), &opts("kubectl"), None).unwrap_err();
        assert_eq!((err.code, err.message.as_str()), (404, "namespaces \"nope\" not found"));
        let err = create(&mut state, &rt, "default", session("c", json!({"phoneNumber": "555"})), &opts("k"), None).unwrap_err();
        assert_eq!((err.code, err.reason), (422, "Invalid"));
    }

    #[test]
    fn generation_bumps_on_spec_only_and_status_is_separate() {
        let mut state = state();
        let rt = sessions(&state);
        create(&mut state, &rt, "default", session("a", json!({})), &opts("k"), None).unwrap();
        let status_patch = json!({"status": {"phase": "Connected"}, "spec": {"suspend": true}});
        let w = patch(&mut state, &rt, "default", "a", PatchKind::Merge, &status_patch, Scope::Status, &opts("op")).unwrap();
        assert_eq!(w.object["status"]["phase"], "Connected");
        assert_eq!(w.object["spec"]["suspend"], false, "the status endpoint ignores spec");
        assert_eq!(w.object["metadata"]["generation"], 1);
        let w = patch(&mut state, &rt, "default", "a", PatchKind::Merge, &status_patch, Scope::Main, &opts("k")).unwrap();
        assert_eq!(w.object["spec"]["suspend"], true);
        assert_eq!(w.object["status"]["phase"], "Connected", "the main endpoint ignores status");
        assert_eq!(w.object["metadata"]["generation"], 2);
        let w = patch(&mut state, &rt, "default", "a", PatchKind::Merge, &json!({"metadata": {"labels": {"x": "y"}}}), Scope::Main, &opts("k")).unwrap();
        assert_eq!(w.object["metadata"]["generation"], 2, "metadata changes keep the generation");
        let rv = w.object["metadata"]["resourceVersion"].clone();
        let w = patch(&mut state, &rt, "default", "a", PatchKind::Merge, &json!({"metadata": {"labels": {"x": "y"}}}), Scope::Main, &opts("k")).unwrap();
        assert_eq!(w.object["metadata"]["resourceVersion"], rv, "a no-op write keeps the version");
    }

    #[test]
    fn stale_resource_versions_conflict() {
        let mut state = state();
        let rt = sessions(&state);
        let first = create(&mut state, &rt, "default", session("a", json!({})), &opts("k"), None).unwrap().object;
        let mut stale = (*first).clone();
        patch(&mut state, &rt, "default", "a", PatchKind::Merge, &json!({"spec": {"suspend": true}}), Scope::Main, &opts("k")).unwrap();
        stale["spec"]["suspend"] = json!(false);
        let err = update(&mut state, &rt, "default", "a", stale.clone(), Scope::Main, &opts("k")).unwrap_err();
        assert_eq!((err.code, err.reason), (409, "Conflict"));
        stale["metadata"].as_object_mut().unwrap().remove("resourceVersion");
        let err = update(&mut state, &rt, "default", "a", stale, Scope::Main, &opts("k")).unwrap_err();
        assert_eq!(err.code, 422, "custom resources need a resourceVersion on update");
    }

    #[test]
    fn finalizers_hold_deletion_until_removed() {
        let mut state = state();
        let rt = sessions(&state);
        let mut obj = session("a", json!({}));
        obj["metadata"]["finalizers"] = json!(["wa-operator.dev/cleanup"]);
        create(&mut state, &rt, "default", obj, &opts("k"), None).unwrap();
        let pending = match delete(&mut state, &rt, "default", "a", &DeleteOptions::default()).unwrap() {
            DeleteOutcome::Pending(obj) => obj,
            DeleteOutcome::Gone(_) => panic!("finalizer ignored"),
        };
        assert!(pending["metadata"]["deletionTimestamp"].is_string());
        assert_eq!(pending["metadata"]["generation"], 2);
        let err = patch(&mut state, &rt, "default", "a", PatchKind::Merge, &json!({"metadata": {"finalizers": ["a", "b"]}}), Scope::Main, &opts("k")).unwrap_err();
        assert_eq!(err.code, 422);
        patch(&mut state, &rt, "default", "a", PatchKind::Merge, &json!({"metadata": {"finalizers": null}}), Scope::Main, &opts("k")).unwrap();
        assert!(get(&state, &rt, "default", "a").is_err(), "gone once the last finalizer is removed");
    }

    #[test]
    fn pods_on_a_node_wait_for_their_kubelet() {
        let mut state = state();
        let rt = state.catalog.find("", "v1", "pods").cloned().unwrap();
        let pod = |name: &str| json!({"metadata": {"name": name}, "spec": {"containers": [{"name": "c", "image": "i"}]}});
        create(&mut state, &rt, "default", pod("unscheduled"), &opts("k"), None).unwrap();
        assert!(matches!(delete(&mut state, &rt, "default", "unscheduled", &DeleteOptions::default()).unwrap(), DeleteOutcome::Gone(_)));
        create(&mut state, &rt, "default", pod("p"), &opts("k"), None).unwrap();
        bind(&mut state, &rt, "default", "p", &json!({"target": {"kind": "Node", "name": "n"}})).unwrap();
        assert_eq!(bind(&mut state, &rt, "default", "p", &json!({"target": {"name": "m"}})).unwrap_err().code, 409);
        let DeleteOutcome::Pending(obj) = delete(&mut state, &rt, "default", "p", &DeleteOptions::default()).unwrap() else {
            panic!("a bound pod must wait for its kubelet");
        };
        assert_eq!(obj["metadata"]["deletionGracePeriodSeconds"], 30);
        let force = DeleteOptions {
            grace_period: Some(0),
            ..Default::default()
        };
        assert!(matches!(delete(&mut state, &rt, "default", "p", &force).unwrap(), DeleteOutcome::Gone(_)));
    }

    #[test]
    fn pods_are_immutable_and_unique() {
        let mut state = state();
        let rt = state.catalog.find("", "v1", "pods").cloned().unwrap();
        let pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i", "args": ["a"]}]}});
        create(&mut state, &rt, "default", pod.clone(), &opts("k"), None).unwrap();
        assert_eq!(create(&mut state, &rt, "default", pod, &opts("k"), None).unwrap_err().code, 409);
        let err = patch(&mut state, &rt, "default", "p", PatchKind::Strategic,
            &json!({"spec": {"containers": [{"name": "c", "args": ["b"]}]}}), Scope::Main, &opts("k")).unwrap_err();
        assert_eq!(err.code, 422);
        patch(&mut state, &rt, "default", "p", PatchKind::Strategic,
            &json!({"spec": {"containers": [{"name": "c", "image": "j"}]}}), Scope::Main, &opts("k")).unwrap();
    }

    #[test]
    fn strict_field_validation() {
        let mut state = state();
        let rt = sessions(&state);
        let strict = WriteOptions {
            field_manager: "k".into(),
            field_validation: FieldValidation::Strict,
            ..Default::default()
        };
        let err = create(&mut state, &rt, "default", session("a", json!({"engin": "x"})), &strict, None).unwrap_err();
        assert_eq!((err.code, err.message.as_str()), (400, "strict decoding error: unknown field \"spec.engin\""));
        let w = create(&mut state, &rt, "default", session("a", json!({"engin": "x"})), &opts("k"), None).unwrap();
        assert_eq!(w.warnings, ["unknown field \"spec.engin\""]);
    }

    #[test]
    fn apply_creates_then_conflicts() {
        let mut state = state();
        let rt = sessions(&state);
        let applied = session("a", json!({"engine": "sandbox"}));
        let w = patch(&mut state, &rt, "default", "a", PatchKind::Apply, &applied, Scope::Main, &opts("op")).unwrap();
        assert!(w.created);
        let other = session("a", json!({"engine": "whatsapp"}));
        let err = patch(&mut state, &rt, "default", "a", PatchKind::Apply, &other, Scope::Main, &opts("kubectl")).unwrap_err();
        assert_eq!((err.code, err.reason), (409, "Conflict"));
        assert!(err.message.contains("conflict with \"op\": .spec.engine"), "{}", err.message);
        let forced = WriteOptions {
            force: true,
            ..opts("kubectl")
        };
        let w = patch(&mut state, &rt, "default", "a", PatchKind::Apply, &other, Scope::Main, &forced).unwrap();
        assert_eq!(w.object["spec"]["engine"], "whatsapp");
    }
}
