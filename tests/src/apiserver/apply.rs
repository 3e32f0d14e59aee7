//! Server-side apply and field ownership (`metadata.managedFields`).
//!
//! Ownership is tracked per leaf field (see [`super::fieldpath`]): an apply conflicts with
//! another manager only on fields that manager owns *and* that the apply would change, exactly
//! the rule kube-lease-manager and controllers rely on; `force` takes those fields over. Fields
//! a manager applied before and leaves out now are removed unless another manager owns them.
//! Updates (PUT and the other patch kinds) move ownership of the fields they change to their
//! manager, like the real server does.

use serde_json::{Map, Value};

use super::fieldpath::{self, FieldPath, FieldSet, ListType, Semantics, from_fields_v1, is_member, leaves, to_fields_v1, value_at};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Apply,
    Update,
}

impl Operation {
    fn as_str(self) -> &'static str {
        match self {
            Operation::Apply => "Apply",
            Operation::Update => "Update",
        }
    }
}

/// One `managedFields` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct ManagedEntry {
    pub manager: String,
    pub operation: Operation,
    pub api_version: String,
    pub time: String,
    /// `""` for the main resource, `"status"` for the status subresource.
    pub subresource: String,
    pub fields: FieldSet,
}

/// Which part of an object a write may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Everything but system metadata (resources without a status subresource).
    Whole,
    /// Everything but system metadata and `status`.
    Main,
    /// Only `status`.
    Status,
}

impl Scope {
    pub fn subresource(self) -> &'static str {
        match self {
            Scope::Status => "status",
            _ => "",
        }
    }
}

/// Metadata the server owns; never part of a field set.
const SYSTEM_METADATA: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
];

/// The part of an object a write in `scope` is about, without system fields.
pub fn tracked_view(obj: &Value, scope: Scope) -> Value {
    let Value::Object(map) = obj else {
        return Value::Object(Map::new());
    };
    let mut view = Map::new();
    for (k, v) in map {
        match k.as_str() {
            "apiVersion" | "kind" => {}
            "status" if scope == Scope::Main => {}
            "metadata" if scope != Scope::Status => {
                if let Value::Object(meta) = v {
                    let kept: Map<String, Value> = meta
                        .iter()
                        .filter(|(mk, _)| !SYSTEM_METADATA.contains(&mk.as_str()))
                        .map(|(mk, mv)| (mk.clone(), mv.clone()))
                        .collect();
                    if !kept.is_empty() {
                        view.insert(k.clone(), Value::Object(kept));
                    }
                }
            }
            "status" => {
                view.insert(k.clone(), v.clone());
            }
            _ if scope == Scope::Status => {}
            _ => {
                view.insert(k.clone(), v.clone());
            }
        }
    }
    Value::Object(view)
}

pub fn parse_managed(obj: &Value) -> Vec<ManagedEntry> {
    obj["metadata"]["managedFields"]
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .filter_map(|e| {
                    Some(ManagedEntry {
                        manager: e["manager"].as_str()?.to_owned(),
                        operation: match e["operation"].as_str()? {
                            "Apply" => Operation::Apply,
                            _ => Operation::Update,
                        },
                        api_version: e["apiVersion"].as_str().unwrap_or_default().to_owned(),
                        time: e["time"].as_str().unwrap_or_default().to_owned(),
                        subresource: e["subresource"].as_str().unwrap_or_default().to_owned(),
                        fields: from_fields_v1(&e["fieldsV1"]),
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

pub fn write_managed(obj: &mut Value, entries: &[ManagedEntry]) {
    let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    let list: Vec<Value> = entries
        .iter()
        .filter(|e| !e.fields.is_empty())
        .map(|e| {
            let mut entry = serde_json::json!({
                "manager": e.manager,
                "operation": e.operation.as_str(),
                "apiVersion": e.api_version,
                "time": e.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": to_fields_v1(&e.fields),
            });
            if !e.subresource.is_empty() {
                entry["subresource"] = Value::String(e.subresource.clone());
            }
            entry
        })
        .collect();
    if list.is_empty() {
        meta.remove("managedFields");
    } else {
        meta.insert("managedFields".into(), Value::Array(list));
    }
}

/// Who is writing, and how (`force` only matters to apply).
pub struct ApplyRequest<'a> {
    pub manager: &'a str,
    pub force: bool,
    pub scope: Scope,
    pub api_version: &'a str,
    pub now: &'a str,
}

/// `(manager, field)` pairs that stop an apply without `force`.
pub type Conflicts = Vec<(String, String)>;

/// Applies `applied` (a partial object from one manager) to `live` (the current object, or a
/// skeleton when creating). Returns the new object and its ownership.
pub fn apply(
    live: &Value,
    applied: &Value,
    mut entries: Vec<ManagedEntry>,
    sem: &Semantics<'_>,
    req: &ApplyRequest<'_>,
) -> Result<(Value, Vec<ManagedEntry>), Conflicts> {
    let applied_view = tracked_view(applied, req.scope);
    let live_view = tracked_view(live, req.scope);
    let applied_fields = leaves(&applied_view, sem);
    let subresource = req.scope.subresource();

    // Conflicts: another manager owns a field this apply sets to a different value.
    let mut conflicts: Vec<(String, FieldPath)> = Vec::new();
    for entry in entries.iter().filter(|e| e.manager != req.manager) {
        for path in entry.fields.intersection(&applied_fields) {
            if is_member(path) {
                continue;
            }
            if value_at(&live_view, path) != value_at(&applied_view, path) {
                conflicts.push((entry.manager.clone(), path.clone()));
            }
        }
    }
    if !conflicts.is_empty() {
        if !req.force {
            let mut shown: Conflicts = conflicts
                .iter()
                .map(|(m, p)| (m.clone(), fieldpath::display(p)))
                .collect();
            shown.sort();
            shown.dedup();
            return Err(shown);
        }
        for (manager, path) in &conflicts {
            for entry in entries.iter_mut().filter(|e| &e.manager == manager) {
                entry.fields.remove(path);
            }
        }
    }

    let previous: FieldSet = entries
        .iter()
        .find(|e| e.manager == req.manager && e.operation == Operation::Apply && e.subresource == subresource)
        .map(|e| e.fields.clone())
        .unwrap_or_default();

    let mut result = live.clone();
    merge_applied(&mut result, &applied_view, sem);

    // Fields this manager applied before and dropped now go, unless someone else owns them.
    for path in previous.difference(&applied_fields) {
        let owned_elsewhere = entries.iter().any(|e| {
            !(e.manager == req.manager && e.operation == Operation::Apply && e.subresource == subresource)
                && e.fields.iter().any(|f| f.starts_with(path) || path.starts_with(f))
        });
        if !owned_elsewhere {
            fieldpath::remove_at(&mut result, path);
        }
    }

    let changed = tracked_view(&result, req.scope) != live_view;
    let new_entry_fields = applied_fields;
    match entries
        .iter_mut()
        .find(|e| e.manager == req.manager && e.operation == Operation::Apply && e.subresource == subresource)
    {
        Some(entry) => {
            if changed || entry.fields != new_entry_fields {
                entry.time = req.now.to_owned();
                entry.api_version = req.api_version.to_owned();
            }
            entry.fields = new_entry_fields;
        }
        None => entries.push(ManagedEntry {
            manager: req.manager.to_owned(),
            operation: Operation::Apply,
            api_version: req.api_version.to_owned(),
            time: req.now.to_owned(),
            subresource: subresource.to_owned(),
            fields: new_entry_fields,
        }),
    }
    entries.retain(|e| !e.fields.is_empty());
    Ok((result, entries))
}

/// Merges an apply configuration into an object: objects by field, map-lists by key, sets by
/// value; atomic lists and scalars are replaced. `null` removes.
fn merge_applied(target: &mut Value, applied: &Value, sem: &Semantics<'_>) {
    match (target, applied) {
        (Value::Object(t), Value::Object(a)) if !sem.is_atomic_map() => {
            for (k, av) in a {
                if av.is_null() {
                    t.remove(k);
                    continue;
                }
                match t.get_mut(k) {
                    Some(tv) => merge_applied(tv, av, &sem.field(k)),
                    None => {
                        t.insert(k.clone(), av.clone());
                    }
                }
            }
        }
        (Value::Array(t), Value::Array(a)) => match sem.list_type() {
            ListType::Atomic => *t = a.clone(),
            ListType::Set => {
                for item in a {
                    if !t.contains(item) {
                        t.push(item.clone());
                    }
                }
            }
            ListType::Map(keys) => {
                let item_sem = sem.items();
                for item in a {
                    let key = fieldpath::item_key(item, &keys);
                    let existing = key
                        .as_ref()
                        .and_then(|key| t.iter_mut().find(|e| fieldpath::item_key(e, &keys).as_ref() == Some(key)));
                    match existing {
                        Some(e) => merge_applied(e, item, &item_sem),
                        None => t.push(item.clone()),
                    }
                }
            }
        },
        (t, a) => *t = a.clone(),
    }
}

/// Ownership after an update-style write (create, PUT, merge/JSON/strategic patch): the
/// manager takes the fields it changed; fields that disappeared are owned by nobody.
pub fn track_update(
    old: Option<&Value>,
    new: &Value,
    mut entries: Vec<ManagedEntry>,
    sem: &Semantics<'_>,
    req: &ApplyRequest<'_>,
) -> Vec<ManagedEntry> {
    let (manager, scope, api_version, now) = (req.manager, req.scope, req.api_version, req.now);
    let new_view = tracked_view(new, scope);
    let new_fields = leaves(&new_view, sem);
    let (old_view, old_fields) = match old {
        Some(old) => {
            let view = tracked_view(old, scope);
            let fields = leaves(&view, sem);
            (view, fields)
        }
        None => (Value::Object(Map::new()), FieldSet::new()),
    };
    let changed: FieldSet = new_fields
        .iter()
        .filter(|p| !old_fields.contains(*p) || (!is_member(p) && value_at(&old_view, p) != value_at(&new_view, p)))
        .cloned()
        .collect();
    let removed: FieldSet = old_fields.difference(&new_fields).cloned().collect();
    if changed.is_empty() && removed.is_empty() {
        return entries;
    }
    let subresource = scope.subresource();
    for entry in entries.iter_mut() {
        let mine = entry.manager == manager && entry.operation == Operation::Update && entry.subresource == subresource;
        entry.fields.retain(|p| !removed.contains(p) && (mine || !changed.contains(p)));
    }
    if !changed.is_empty() {
        match entries
            .iter_mut()
            .find(|e| e.manager == manager && e.operation == Operation::Update && e.subresource == subresource)
        {
            Some(entry) => {
                entry.fields.extend(changed);
                entry.time = now.to_owned();
                entry.api_version = api_version.to_owned();
            }
            None => entries.push(ManagedEntry {
                manager: manager.to_owned(),
                operation: Operation::Update,
                api_version: api_version.to_owned(),
                time: now.to_owned(),
                subresource: subresource.to_owned(),
                fields: changed,
            }),
        }
    }
    entries.retain(|e| !e.fields.is_empty());
    entries
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::catalog::BuiltinKind;
    use serde_json::json;

    const NOW: &str = "2025-01-01T00:00:00Z";

    fn req(manager: &str, force: bool) -> ApplyRequest<'_> {
        ApplyRequest {
            manager,
            force,
            scope: Scope::Whole,
            api_version: "coordination.k8s.io/v1",
            now: NOW,
        }
    }

    fn lease(holder: &str) -> Value {
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "l"},
               "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15}})
    }

    #[test]
    fn conflicts_only_on_different_values_and_force_takes_over() {
        let sem = Semantics::builtin_root(BuiltinKind::Lease);
        let skeleton = json!({"metadata": {"name": "l"}});
        let (obj, entries) = apply(&skeleton, &lease("a"), Vec::new(), &sem, &req("a", false)).unwrap();
        // Same values from another manager: shared ownership, no conflict.
        let (obj, entries) = apply(&obj, &lease("a"), entries, &sem, &req("b", false)).unwrap();
        assert_eq!(entries.len(), 2);
        // A different holder conflicts with both owners.
        let err = apply(&obj, &lease("c"), entries.clone(), &sem, &req("c", false)).unwrap_err();
        assert_eq!(err, vec![("a".into(), ".spec.holderIdentity".into()), ("b".into(), ".spec.holderIdentity".into())]);
        let (obj, entries) = apply(&obj, &lease("c"), entries, &sem, &req("c", true)).unwrap();
        assert_eq!(obj["spec"]["holderIdentity"], "c");
        let c = entries.iter().find(|e| e.manager == "c").unwrap();
        assert!(c.fields.iter().any(|p| fieldpath::display(p) == ".spec.holderIdentity"));
        for other in entries.iter().filter(|e| e.manager != "c") {
            assert!(!other.fields.iter().any(|p| fieldpath::display(p) == ".spec.holderIdentity"));
        }
    }

    #[test]
    fn dropped_fields_are_removed_unless_shared() {
        let sem = Semantics::builtin_root(BuiltinKind::ConfigMap);
        let skeleton = json!({"metadata": {"name": "c"}});
        let first = json!({"metadata": {"name": "c", "labels": {"a": "1", "b": "2"}}, "data": {"x": "1", "y": "2"}});
        let (obj, entries) = apply(&skeleton, &first, Vec::new(), &sem, &req("m", false)).unwrap();
        // Another manager also sets y.
        let (obj, entries) = apply(&obj, &json!({"data": {"y": "2"}}), entries, &sem, &req("n", false)).unwrap();
        let second = json!({"metadata": {"name": "c", "labels": {"a": "1"}}, "data": {"x": "1"}});
        let (obj, _) = apply(&obj, &second, entries, &sem, &req("m", false)).unwrap();
        assert_eq!(obj["metadata"]["labels"], json!({"a": "1"}));
        assert_eq!(obj["data"], json!({"x": "1", "y": "2"}), "y is still owned by n");
    }

    #[test]
    fn map_lists_merge_by_key() {
        let sem = Semantics::builtin_root(BuiltinKind::Pod);
        let live = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a", "image": "1"}]}});
        let applied = json!({"spec": {"containers": [{"name": "b", "image": "2"}]}});
        let (obj, _) = apply(&live, &applied, Vec::new(), &sem, &req("m", false)).unwrap();
        assert_eq!(obj["spec"]["containers"], json!([{"name": "a", "image": "1"}, {"name": "b", "image": "2"}]));
    }

    #[test]
    fn updates_move_ownership() {
        let sem = Semantics::builtin_root(BuiltinKind::Lease);
        let skeleton = json!({"metadata": {"name": "l"}});
        let (obj, entries) = apply(&skeleton, &lease("a"), Vec::new(), &sem, &req("a", false)).unwrap();
        let mut updated = obj.clone();
        updated["spec"]["holderIdentity"] = json!("b");
        let entries = track_update(Some(&obj), &updated, entries, &sem, &ApplyRequest { api_version: "v1", ..req("b", false) });
        let b = entries.iter().find(|e| e.manager == "b").unwrap();
        assert_eq!(b.operation, Operation::Update);
        assert_eq!(b.fields.iter().map(fieldpath::display).collect::<Vec<_>>(), [".spec.holderIdentity"]);
        let a = entries.iter().find(|e| e.manager == "a").unwrap();
        assert!(!a.fields.iter().any(|p| fieldpath::display(p) == ".spec.holderIdentity"));
        // Now "b" owns the holder: an apply by "a" that changes it conflicts with "b".
        let err = apply(&updated, &lease("a"), entries, &sem, &req("a", false)).unwrap_err();
        assert_eq!(err, vec![("b".into(), ".spec.holderIdentity".into())]);
    }

    #[test]
    fn managed_fields_round_trip() {
        let sem = Semantics::builtin_root(BuiltinKind::Lease);
        let (mut obj, entries) = apply(&json!({"metadata": {"name": "l"}}), &lease("a"), Vec::new(), &sem, &req("a", false)).unwrap();
        write_managed(&mut obj, &entries);
        assert_eq!(obj["metadata"]["managedFields"][0]["fieldsV1"], json!({"f:spec": {"f:holderIdentity": {}, "f:leaseDurationSeconds": {}}}));
        assert_eq!(parse_managed(&obj), entries);
    }

    #[test]
    fn status_scope_ignores_spec() {
        let view = tracked_view(&json!({"metadata": {"name": "x", "labels": {"a": "b"}}, "spec": {"a": 1}, "status": {"b": 2}}), Scope::Status);
        assert_eq!(view, json!({"status": {"b": 2}}));
        let view = tracked_view(&json!({"apiVersion": "v1", "metadata": {"name": "x", "labels": {"a": "b"}}, "spec": {"a": 1}, "status": {"b": 2}}), Scope::Main);
        assert_eq!(view, json!({"metadata": {"labels": {"a": "b"}}, "spec": {"a": 1}}));
    }
}
