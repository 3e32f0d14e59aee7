//! The three update-style patch formats: JSON merge patch (RFC 7386), JSON patch (RFC 6902)
//! and strategic merge patch, the one kubectl sends for built-in kinds.
//!
//! Server-side apply lives in [`super::apply`].

use serde_json::{Map, Value};

use super::fieldpath::{ListType, Semantics};

/// Which patch a `PATCH` carries, from its Content-Type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    Merge,
    Json,
    Strategic,
    Apply,
}

impl PatchKind {
    pub const ACCEPTED: &'static [&'static str] = &[
        "application/json-patch+json",
        "application/merge-patch+json",
        "application/strategic-merge-patch+json",
        "application/apply-patch+yaml",
    ];

    pub fn from_content_type(content_type: &str) -> Option<Self> {
        let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        match essence.as_str() {
            "application/merge-patch+json" => Some(Self::Merge),
            "application/json-patch+json" => Some(Self::Json),
            "application/strategic-merge-patch+json" => Some(Self::Strategic),
            "application/apply-patch+yaml" => Some(Self::Apply),
            _ => None,
        }
    }
}

/// A patch that could not be applied: malformed (400) or not applicable to this object (422).
#[derive(Debug, Clone, PartialEq)]
pub enum PatchError {
    Malformed(String),
    NotApplicable(String),
}

pub fn merge_patch(target: &mut Value, patch: &Value) -> Result<(), PatchError> {
    if !patch.is_object() {
        return Err(PatchError::Malformed("a merge patch must be a JSON object".into()));
    }
    json_patch::merge(target, patch);
    Ok(())
}

/// RFC 6902, with the one deviation the API server has (evanphx/json-patch): `test` of a
/// missing path against `null` passes. kube-rs's finalizer helper relies on it
/// (`test /metadata/finalizers == null`, then `add`).
pub fn json_patch(target: &mut Value, patch: &Value) -> Result<(), PatchError> {
    let ops: json_patch::Patch = serde_json::from_value(patch.clone())
        .map_err(|e| PatchError::Malformed(format!("invalid JSON patch: {e}")))?;
    for op in &ops.0 {
        if let json_patch::PatchOperation::Test(test) = op
            && test.value.is_null() && target.pointer(test.path.as_str()).is_none_or(Value::is_null) {
                continue;
            }
        json_patch::patch(target, std::slice::from_ref(op))
            .map_err(|e| PatchError::NotApplicable(format!("the JSON patch does not apply: {e}")))?;
    }
    Ok(())
}

/// Applies a strategic merge patch: objects merge, lists merge by their patch merge key where
/// the kind's Go type declares one (see [`super::fieldpath`]), and the directives `$patch`,
/// `$retainKeys`, `$setElementOrder/…` and `$deleteFromPrimitiveList/…` are honoured.
pub fn strategic_merge(target: &mut Value, patch: &Value, sem: &Semantics<'_>) -> Result<(), PatchError> {
    let Value::Object(patch) = patch else {
        return Err(PatchError::Malformed("a strategic merge patch must be a JSON object".into()));
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(target) = target else {
        unreachable!("target was made an object above")
    };
    merge_map(target, patch, sem)
}

fn directive(map: &Map<String, Value>) -> Option<&str> {
    map.get("$patch").and_then(Value::as_str)
}

fn merge_map(target: &mut Map<String, Value>, patch: &Map<String, Value>, sem: &Semantics<'_>) -> Result<(), PatchError> {
    match directive(patch) {
        None | Some("merge") => {}
        Some("replace") => {
            *target = strip_directives_map(patch);
            return Ok(());
        }
        Some("delete") => {
            target.clear();
            return Ok(());
        }
        Some(other) => return Err(PatchError::Malformed(format!("unknown patch type: {other:?}"))),
    }
    if let Some(retain) = patch.get("$retainKeys") {
        let keep: Vec<&str> = retain
            .as_array()
            .ok_or_else(|| PatchError::Malformed("$retainKeys must be a list of strings".into()))?
            .iter()
            .filter_map(Value::as_str)
            .collect();
        target.retain(|k, _| keep.contains(&k.as_str()));
    }
    let mut orders = Vec::new();
    for (key, value) in patch {
        if key == "$patch" || key == "$retainKeys" {
            continue;
        }
        if let Some(field) = key.strip_prefix("$setElementOrder/") {
            orders.push((field, value));
            continue;
        }
        if let Some(field) = key.strip_prefix("$deleteFromPrimitiveList/") {
            let remove = value
                .as_array()
                .ok_or_else(|| PatchError::Malformed(format!("{key} must be a list")))?;
            if let Some(Value::Array(items)) = target.get_mut(field) {
                items.retain(|item| !remove.contains(item));
            }
            continue;
        }
        if key.starts_with('$') {
            return Err(PatchError::Malformed(format!("unknown patch directive {key:?}")));
        }
        let child = sem.field(key);
        match value {
            Value::Null => {
                target.remove(key);
            }
            Value::Object(child_patch) => {
                if directive(child_patch) == Some("delete") {
                    target.remove(key);
                    continue;
                }
                match target.get_mut(key) {
                    Some(Value::Object(existing)) if !child.is_atomic_map() => merge_map(existing, child_patch, &child)?,
                    _ => {
                        let mut fresh = Map::new();
                        merge_map(&mut fresh, child_patch, &child)?;
                        target.insert(key.clone(), Value::Object(fresh));
                    }
                }
            }
            Value::Array(child_patch) => match target.get_mut(key) {
                Some(Value::Array(existing)) => merge_list(existing, child_patch, &child)?,
                _ => {
                    let mut fresh = Vec::new();
                    merge_list(&mut fresh, child_patch, &child)?;
                    target.insert(key.clone(), Value::Array(fresh));
                }
            },
            scalar => {
                target.insert(key.clone(), scalar.clone());
            }
        }
    }
    for (field, order) in orders {
        let order = order
            .as_array()
            .ok_or_else(|| PatchError::Malformed(format!("$setElementOrder/{field} must be a list")))?;
        let list_type = sem.field(field).list_type();
        if let Some(Value::Array(items)) = target.get_mut(field) {
            set_element_order(items, order, &list_type);
        }
    }
    Ok(())
}

fn merge_list(target: &mut Vec<Value>, patch: &[Value], sem: &Semantics<'_>) -> Result<(), PatchError> {
    let replace = patch
        .iter()
        .any(|item| item.as_object().is_some_and(|m| directive(m) == Some("replace") && m.len() == 1));
    if replace {
        *target = patch
            .iter()
            .filter(|item| !item.as_object().is_some_and(|m| directive(m) == Some("replace") && m.len() == 1))
            .map(strip_directives)
            .collect();
        return Ok(());
    }
    match sem.list_type() {
        ListType::Atomic => *target = patch.iter().map(strip_directives).collect(),
        ListType::Set => {
            for item in patch {
                if !target.contains(item) {
                    target.push(item.clone());
                }
            }
        }
        ListType::Map(keys) => {
            // Strategic merge patch merges by one key (the Go type's patchMergeKey).
            let Some(merge_key) = keys.first() else {
                *target = patch.iter().map(strip_directives).collect();
                return Ok(());
            };
            let item_sem = sem.items();
            for item in patch {
                let Value::Object(item_patch) = item else {
                    return Err(PatchError::Malformed(format!(
                        "items of a list merged by {merge_key:?} must be objects"
                    )));
                };
                let key = item_patch.get(merge_key).filter(|v| !v.is_null());
                let Some(key) = key else {
                    return Err(PatchError::Malformed(format!("list item has no merge key {merge_key:?}")));
                };
                if directive(item_patch) == Some("delete") {
                    target.retain(|existing| existing.get(merge_key) != Some(key));
                    continue;
                }
                match target.iter_mut().find(|existing| existing.get(merge_key) == Some(key)) {
                    Some(Value::Object(existing)) => merge_map(existing, item_patch, &item_sem)?,
                    _ => {
                        let mut fresh = Map::new();
                        merge_map(&mut fresh, item_patch, &item_sem)?;
                        target.push(Value::Object(fresh));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Orders a merged list as `$setElementOrder` says; items the order does not name keep their
/// relative order after the named ones.
fn set_element_order(items: &mut Vec<Value>, order: &[Value], list_type: &ListType) {
    let position = |item: &Value| -> Option<usize> {
        match list_type {
            ListType::Map(keys) => {
                let key = keys.first()?;
                order.iter().position(|o| o.get(key).is_some() && o.get(key) == item.get(key))
            }
            _ => order.iter().position(|o| o == item),
        }
    };
    let mut indexed: Vec<(usize, usize, Value)> = items
        .drain(..)
        .enumerate()
        .map(|(i, item)| (position(&item).unwrap_or(usize::MAX), i, item))
        .collect();
    indexed.sort_by_key(|(pos, i, _)| (*pos, *i));
    items.extend(indexed.into_iter().map(|(_, _, item)| item));
}

fn strip_directives(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(strip_directives_map(map)),
        Value::Array(items) => Value::Array(items.iter().map(strip_directives).collect()),
        other => other.clone(),
    }
}

fn strip_directives_map(map: &Map<String, Value>) -> Map<String, Value> {
    map.iter()
        .filter(|(k, _)| !k.starts_with('$'))
        .map(|(k, v)| (k.clone(), strip_directives(v)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::catalog::BuiltinKind;
    use serde_json::json;

    fn smp(kind: BuiltinKind, target: Value, patch: Value) -> Value {
        let mut target = target;
        strategic_merge(&mut target, &patch, &Semantics::builtin_root(kind)).unwrap();
        target
    }

    #[test]
    fn strategic_merge_cases() {
        let pod = json!({"metadata": {"finalizers": ["a"], "labels": {"x": "1"}},
            "spec": {"containers": [
                {"name": "main", "image": "i:1", "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}], "args": ["--x"]},
                {"name": "side", "image": "s:1"}]}});
        let cases = [
            // containers merge by name, env by name, args are atomic
            (json!({"spec": {"containers": [{"name": "main", "image": "i:2", "env": [{"name": "C", "value": "3"}], "args": ["--y"]}]}}),
             json!({"metadata": {"finalizers": ["a"], "labels": {"x": "1"}}, "spec": {"containers": [
                {"name": "main", "image": "i:2", "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}, {"name": "C", "value": "3"}], "args": ["--y"]},
                {"name": "side", "image": "s:1"}]}})),
            // $patch: delete removes one keyed item; null removes a field
            (json!({"metadata": {"labels": {"x": null}}, "spec": {"containers": [{"name": "side", "$patch": "delete"}]}}),
             json!({"metadata": {"finalizers": ["a"], "labels": {}}, "spec": {"containers": [
                {"name": "main", "image": "i:1", "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}], "args": ["--x"]}]}})),
            // finalizers merge as a set and lose items through $deleteFromPrimitiveList
            (json!({"metadata": {"finalizers": ["b"], "$deleteFromPrimitiveList/finalizers": ["a"]}}),
             json!({"metadata": {"finalizers": ["b"], "labels": {"x": "1"}}, "spec": pod["spec"].clone()})),
            // $setElementOrder reorders a merged list
            (json!({"spec": {"$setElementOrder/containers": [{"name": "side"}, {"name": "main"}]}}),
             json!({"metadata": pod["metadata"].clone(), "spec": {"containers": [pod["spec"]["containers"][1].clone(), pod["spec"]["containers"][0].clone()]}})),
            // $retainKeys keeps only the listed fields of a map before merging
            (json!({"metadata": {"labels": {"$retainKeys": ["y"], "y": "2"}}}),
             json!({"metadata": {"finalizers": ["a"], "labels": {"y": "2"}}, "spec": pod["spec"].clone()})),
            // $patch: replace on a map replaces it whole
            (json!({"metadata": {"labels": {"$patch": "replace", "y": "2"}}}),
             json!({"metadata": {"finalizers": ["a"], "labels": {"y": "2"}}, "spec": pod["spec"].clone()})),
        ];
        for (i, (patch, expected)) in cases.into_iter().enumerate() {
            assert_eq!(smp(BuiltinKind::Pod, pod.clone(), patch), expected, "case {i}");
        }
    }

    #[test]
    fn strategic_merge_refuses_bad_directives() {
        let mut target = json!({});
        let sem = Semantics::builtin_root(BuiltinKind::Pod);
        for patch in [
            json!({"$patch": "explode"}),
            json!({"$bogus": 1}),
            json!({"spec": {"containers": [{"image": "no-name"}]}}),
            json!([1]),
        ] {
            assert!(matches!(strategic_merge(&mut target, &patch, &sem), Err(PatchError::Malformed(_))), "{patch}");
        }
    }

    #[test]
    fn merge_and_json_patches() {
        let mut obj = json!({"spec": {"a": 1, "b": [1, 2]}});
        merge_patch(&mut obj, &json!({"spec": {"a": null, "b": [3], "c": true}})).unwrap();
        assert_eq!(obj, json!({"spec": {"b": [3], "c": true}}));
        json_patch(&mut obj, &json!([{"op": "add", "path": "/spec/b/-", "value": 4}, {"op": "test", "path": "/spec/c", "value": true}])).unwrap();
        assert_eq!(obj["spec"]["b"], json!([3, 4]));
        assert!(matches!(
            json_patch(&mut obj, &json!([{"op": "test", "path": "/spec/c", "value": false}])),
            Err(PatchError::NotApplicable(_))
        ));
        assert!(matches!(json_patch(&mut obj, &json!({"op": "add"})), Err(PatchError::Malformed(_))));
        // What kube-rs's finalizer helper sends to an object without finalizers.
        let mut session = json!({"metadata": {"name": "a"}});
        let add_finalizer = json!([{"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": ["wa-operator.dev/cleanup"]}]);
        json_patch(&mut session, &add_finalizer).unwrap();
        assert_eq!(session["metadata"]["finalizers"], json!(["wa-operator.dev/cleanup"]));
        // Now the test fails (the list exists), and nothing of the patch is applied.
        let mut copy = session.clone();
        assert!(matches!(json_patch(&mut copy, &add_finalizer), Err(PatchError::NotApplicable(_))));
        assert!(matches!(merge_patch(&mut obj, &json!([1])), Err(PatchError::Malformed(_))));
    }

    #[test]
    fn content_types() {
        assert_eq!(PatchKind::from_content_type("application/apply-patch+yaml; charset=utf-8"), Some(PatchKind::Apply));
        assert_eq!(PatchKind::from_content_type("application/strategic-merge-patch+json"), Some(PatchKind::Strategic));
        assert_eq!(PatchKind::from_content_type("application/json"), None);
    }
}
