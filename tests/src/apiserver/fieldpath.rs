//! What the server knows about the shape of objects, for merging: which lists merge by key
//! (`containers` by `name`, `conditions` by `type`), which are sets (`finalizers`) and which
//! are replaced whole. Strategic merge patch and server-side apply both read it.
//!
//! Also the field sets of server-side apply (`metadata.managedFields[].fieldsV1`): a set of
//! paths to leaves, encoded as the nested `f:`/`k:`/`v:` maps Kubernetes uses.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

use super::catalog::BuiltinKind;

/// How a list merges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListType {
    /// Replaced as a whole.
    Atomic,
    /// A set of scalars: merged by value.
    Set,
    /// A list of objects merged by these key fields.
    Map(Vec<String>),
}

/// A position in an object's schema.
#[derive(Debug, Clone)]
pub enum Semantics<'a> {
    /// A node of a CRD's structural schema.
    Schema(&'a Value),
    /// A built-in kind (or `metadata` of any object): the path from the root, with `[]` for
    /// list items, e.g. `spec.containers[].env`.
    Builtin { kind: Option<BuiltinKind>, path: String },
    /// Nothing known: objects merge, lists are atomic.
    Unknown,
}

impl<'a> Semantics<'a> {
    pub fn builtin_root(kind: BuiltinKind) -> Self {
        Semantics::Builtin {
            kind: Some(kind),
            path: String::new(),
        }
    }

    pub fn schema_root(schema: Option<&'a Value>) -> Self {
        match schema {
            Some(s) => Semantics::Schema(s),
            None => Semantics::Builtin {
                kind: None,
                path: String::new(),
            },
        }
    }

    fn is_root(&self) -> bool {
        match self {
            Semantics::Builtin { path, .. } => path.is_empty(),
            _ => false,
        }
    }

    pub fn field(&self, name: &str) -> Semantics<'a> {
        match self {
            Semantics::Schema(node) => {
                if name == "metadata" && node.get("properties").and_then(|p| p.get("apiVersion")).is_some() {
                    return Semantics::Builtin {
                        kind: None,
                        path: "metadata".into(),
                    };
                }
                if let Some(child) = node.get("properties").and_then(|p| p.get(name)) {
                    Semantics::Schema(child)
                } else if let Some(child) = node.get("additionalProperties").filter(|a| a.is_object()) {
                    Semantics::Schema(child)
                } else {
                    Semantics::Unknown
                }
            }
            Semantics::Builtin { kind, path } => Semantics::Builtin {
                kind: *kind,
                path: if self.is_root() {
                    name.to_owned()
                } else {
                    format!("{path}.{name}")
                },
            },
            Semantics::Unknown => Semantics::Unknown,
        }
    }

    /// The schema of a CRD's root, where `metadata` follows the built-in rules.
    pub fn items(&self) -> Semantics<'a> {
        match self {
            Semantics::Schema(node) => node.get("items").map(Semantics::Schema).unwrap_or(Semantics::Unknown),
            Semantics::Builtin { kind, path } => Semantics::Builtin {
                kind: *kind,
                path: format!("{path}[]"),
            },
            Semantics::Unknown => Semantics::Unknown,
        }
    }

    pub fn list_type(&self) -> ListType {
        match self {
            Semantics::Schema(node) => match node.get("x-kubernetes-list-type").and_then(Value::as_str) {
                Some("map") => ListType::Map(
                    node.get("x-kubernetes-list-map-keys")
                        .and_then(Value::as_array)
                        .map(|keys| keys.iter().filter_map(|k| k.as_str().map(str::to_owned)).collect())
                        .unwrap_or_default(),
                ),
                Some("set") => ListType::Set,
                _ => ListType::Atomic,
            },
            Semantics::Builtin { kind, path } => builtin_list_type(*kind, path),
            Semantics::Unknown => ListType::Atomic,
        }
    }

    /// Maps marked `x-kubernetes-map-type: atomic` are replaced whole.
    pub fn is_atomic_map(&self) -> bool {
        match self {
            Semantics::Schema(node) => node.get("x-kubernetes-map-type").and_then(Value::as_str) == Some("atomic"),
            _ => false,
        }
    }
}

fn map(keys: &[&str]) -> ListType {
    ListType::Map(keys.iter().map(|k| k.to_string()).collect())
}

/// List semantics of the built-in kinds, from their Go types' `patchMergeKey` and
/// `listType` markers. Lists not named here are atomic.
fn builtin_list_type(kind: Option<BuiltinKind>, path: &str) -> ListType {
    match path {
        "metadata.finalizers" => return ListType::Set,
        "metadata.ownerReferences" => return map(&["uid"]),
        _ => {}
    }
    let Some(kind) = kind else {
        return ListType::Atomic;
    };
    if path == "status.conditions" {
        return map(&["type"]);
    }
    match kind {
        BuiltinKind::Pod => pod_list_type(path),
        // A pod template's `spec` follows the Pod's rules.
        BuiltinKind::Deployment | BuiltinKind::ReplicaSet => match path.strip_prefix("spec.template.") {
            Some(rel) if rel.starts_with("spec.") => pod_list_type(rel),
            _ => ListType::Atomic,
        },
        BuiltinKind::Node => match path {
            "status.addresses" => map(&["type"]),
            _ => ListType::Atomic,
        },
        BuiltinKind::Service => match path {
            "spec.ports" => map(&["port", "protocol"]),
            _ => ListType::Atomic,
        },
        BuiltinKind::ServiceAccount => match path {
            "secrets" => map(&["name"]),
            _ => ListType::Atomic,
        },
        _ => ListType::Atomic,
    }
}

/// Lists of a Pod (or, with the path relative to the template, of a pod template).
fn pod_list_type(path: &str) -> ListType {
    let container = ["spec.containers[].", "spec.initContainers[].", "spec.ephemeralContainers[]."]
        .iter()
        .find_map(|p| path.strip_prefix(p));
    if let Some(rel) = container {
        return match rel {
            "ports" => map(&["containerPort", "protocol"]),
            "env" => map(&["name"]),
            "volumeMounts" => map(&["mountPath"]),
            "volumeDevices" => map(&["devicePath"]),
            _ => ListType::Atomic,
        };
    }
    match path {
        "spec.containers" | "spec.initContainers" | "spec.ephemeralContainers" | "spec.volumes"
        | "spec.imagePullSecrets" | "spec.resourceClaims" | "spec.schedulingGates" => map(&["name"]),
        "spec.hostAliases" | "status.podIPs" | "status.hostIPs" => map(&["ip"]),
        "spec.topologySpreadConstraints" => map(&["topologyKey", "whenUnsatisfiable"]),
        _ => ListType::Atomic,
    }
}

/// One step of a field path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PathElement {
    /// A field of an object.
    Field(String),
    /// An item of a map-list, by its key fields (compact JSON object, sorted keys).
    Key(String),
    /// An item of a set, by value (compact JSON).
    Value(String),
    /// An item of an atomic list by position (only seen in fieldsV1 written by others).
    Index(usize),
}

pub type FieldPath = Vec<PathElement>;
pub type FieldSet = BTreeSet<FieldPath>;

/// `.spec.containers[name="main"].image`, as the API server writes paths in conflicts.
pub fn display(path: &FieldPath) -> String {
    let mut out = String::new();
    for element in path {
        match element {
            PathElement::Field(name) => {
                out.push('.');
                out.push_str(name);
            }
            PathElement::Key(key) => {
                let parsed: Map<String, Value> = serde_json::from_str(key).unwrap_or_default();
                let parts: Vec<String> = parsed.iter().map(|(k, v)| format!("{k}={v}")).collect();
                out.push_str(&format!("[{}]", parts.join(",")));
            }
            PathElement::Value(v) => out.push_str(&format!("[={v}]")),
            PathElement::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// The key of a map-list item: its key fields as a compact JSON object.
pub fn item_key(item: &Value, keys: &[String]) -> Option<String> {
    let obj = item.as_object()?;
    let mut key = Map::new();
    for k in keys {
        if let Some(v) = obj.get(k) {
            key.insert(k.clone(), v.clone());
        }
    }
    if key.is_empty() {
        return None;
    }
    Some(Value::Object(key).to_string())
}

/// The paths of every leaf of `value`: scalars, atomic lists and maps, empty objects, set
/// members and map-list items (an item is itself a member, and its fields are leaves below it).
pub fn leaves(value: &Value, sem: &Semantics<'_>) -> FieldSet {
    let mut out = FieldSet::new();
    collect(value, sem, &mut Vec::new(), &mut out);
    out
}

fn collect(value: &Value, sem: &Semantics<'_>, prefix: &mut FieldPath, out: &mut FieldSet) {
    match value {
        Value::Object(map) if !sem.is_atomic_map() => {
            if map.is_empty() {
                if !prefix.is_empty() {
                    out.insert(prefix.clone());
                }
                return;
            }
            for (k, v) in map {
                prefix.push(PathElement::Field(k.clone()));
                collect(v, &sem.field(k), prefix, out);
                prefix.pop();
            }
        }
        Value::Array(items) => match sem.list_type() {
            ListType::Atomic => {
                out.insert(prefix.clone());
            }
            ListType::Set => {
                if items.is_empty() {
                    out.insert(prefix.clone());
                }
                for item in items {
                    let mut p = prefix.clone();
                    p.push(PathElement::Value(item.to_string()));
                    out.insert(p);
                }
            }
            ListType::Map(keys) => {
                if items.is_empty() {
                    out.insert(prefix.clone());
                }
                let item_sem = sem.items();
                for item in items {
                    let Some(key) = item_key(item, &keys) else {
                        // An item without its key cannot be addressed; own the list whole.
                        out.insert(prefix.clone());
                        continue;
                    };
                    prefix.push(PathElement::Key(key));
                    out.insert(prefix.clone());
                    if let Value::Object(fields) = item {
                        for (k, v) in fields {
                            prefix.push(PathElement::Field(k.clone()));
                            collect(v, &item_sem.field(k), prefix, out);
                            prefix.pop();
                        }
                    }
                    prefix.pop();
                }
            }
        },
        _ => {
            if !prefix.is_empty() {
                out.insert(prefix.clone());
            }
        }
    }
}

/// The value at a path, if present.
pub fn value_at<'v>(root: &'v Value, path: &[PathElement]) -> Option<&'v Value> {
    let mut cur = root;
    for element in path {
        cur = match element {
            PathElement::Field(name) => cur.as_object()?.get(name)?,
            PathElement::Key(key) => {
                let key: Map<String, Value> = serde_json::from_str(key).ok()?;
                cur.as_array()?
                    .iter()
                    .find(|item| key.iter().all(|(k, v)| item.get(k) == Some(v)))?
            }
            PathElement::Value(v) => {
                let v: Value = serde_json::from_str(v).ok()?;
                cur.as_array()?.iter().find(|item| **item == v)?
            }
            PathElement::Index(i) => cur.as_array()?.get(*i)?,
        };
    }
    Some(cur)
}

/// Removes the value at a path; removing the last field of an object leaves the object.
pub fn remove_at(root: &mut Value, path: &[PathElement]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let Some(parent) = value_at_mut(root, parents) else {
        return;
    };
    match last {
        PathElement::Field(name) => {
            if let Some(map) = parent.as_object_mut() {
                map.remove(name);
            }
        }
        PathElement::Key(key) => {
            let Ok(key) = serde_json::from_str::<Map<String, Value>>(key) else {
                return;
            };
            if let Some(items) = parent.as_array_mut() {
                items.retain(|item| !key.iter().all(|(k, v)| item.get(k) == Some(v)));
            }
        }
        PathElement::Value(v) => {
            let Ok(v) = serde_json::from_str::<Value>(v) else {
                return;
            };
            if let Some(items) = parent.as_array_mut() {
                items.retain(|item| *item != v);
            }
        }
        PathElement::Index(i) => {
            if let Some(items) = parent.as_array_mut()
                && *i < items.len() {
                    items.remove(*i);
                }
        }
    }
}

fn value_at_mut<'v>(root: &'v mut Value, path: &[PathElement]) -> Option<&'v mut Value> {
    let mut cur = root;
    for element in path {
        cur = match element {
            PathElement::Field(name) => cur.as_object_mut()?.get_mut(name)?,
            PathElement::Key(key) => {
                let key: Map<String, Value> = serde_json::from_str(key).ok()?;
                cur.as_array_mut()?
                    .iter_mut()
                    .find(|item| key.iter().all(|(k, v)| item.get(k) == Some(v)))?
            }
            PathElement::Value(v) => {
                let v: Value = serde_json::from_str(v).ok()?;
                cur.as_array_mut()?.iter_mut().find(|item| **item == v)?
            }
            PathElement::Index(i) => cur.as_array_mut()?.get_mut(*i)?,
        };
    }
    Some(cur)
}

/// Encodes a field set as `fieldsV1`.
pub fn to_fields_v1(set: &FieldSet) -> Value {
    let mut root = Map::new();
    for path in set {
        let mut node = &mut root;
        for element in path {
            let key = match element {
                PathElement::Field(name) => format!("f:{name}"),
                PathElement::Key(k) => format!("k:{k}"),
                PathElement::Value(v) => format!("v:{v}"),
                PathElement::Index(i) => format!("i:{i}"),
            };
            let child = node.entry(key).or_insert_with(|| Value::Object(Map::new()));
            let Value::Object(child) = child else {
                unreachable!("fieldsV1 nodes are objects")
            };
            node = child;
        }
    }
    // A member that also has fields below it is marked with ".".
    mark_members(&mut root, set, &mut Vec::new());
    Value::Object(root)
}

fn mark_members(node: &mut Map<String, Value>, set: &FieldSet, prefix: &mut FieldPath) {
    let keys: Vec<String> = node.keys().cloned().collect();
    for key in keys {
        if key == "." {
            continue;
        }
        let Some(element) = parse_element(&key) else {
            continue;
        };
        prefix.push(element);
        if let Some(Value::Object(child)) = node.get_mut(&key) {
            if !child.is_empty() && set.contains(prefix) {
                child.insert(".".into(), Value::Object(Map::new()));
            }
            mark_members(child, set, prefix);
        }
        prefix.pop();
    }
}

fn parse_element(key: &str) -> Option<PathElement> {
    let (tag, rest) = key.split_at_checked(2)?;
    Some(match tag {
        "f:" => PathElement::Field(rest.to_owned()),
        "k:" => PathElement::Key(canonical_json(rest)?),
        "v:" => PathElement::Value(canonical_json(rest)?),
        "i:" => PathElement::Index(rest.parse().ok()?),
        _ => return None,
    })
}

fn canonical_json(text: &str) -> Option<String> {
    serde_json::from_str::<Value>(text).ok().map(|v| v.to_string())
}

/// Decodes `fieldsV1`; unknown markers are ignored.
pub fn from_fields_v1(fields: &Value) -> FieldSet {
    let mut set = FieldSet::new();
    if let Value::Object(map) = fields {
        decode(map, &mut Vec::new(), &mut set);
    }
    set
}

fn decode(node: &Map<String, Value>, prefix: &mut FieldPath, out: &mut FieldSet) {
    for (key, child) in node {
        if key == "." {
            out.insert(prefix.clone());
            continue;
        }
        let Some(element) = parse_element(key) else {
            continue;
        };
        prefix.push(element);
        match child {
            Value::Object(grandchildren) if !grandchildren.is_empty() => decode(grandchildren, prefix, out),
            _ => {
                out.insert(prefix.clone());
            }
        }
        prefix.pop();
    }
}

/// Whether the path ends at a list member rather than a field.
pub fn is_member(path: &FieldPath) -> bool {
    matches!(path.last(), Some(PathElement::Key(_) | PathElement::Value(_)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod_sem() -> Semantics<'static> {
        Semantics::builtin_root(BuiltinKind::Pod)
    }

    #[test]
    fn builtin_list_types() {
        let cases = [
            ("metadata.finalizers", ListType::Set),
            ("metadata.ownerReferences", map(&["uid"])),
            ("spec.containers", map(&["name"])),
            ("spec.initContainers[].env", map(&["name"])),
            ("spec.containers[].ports", map(&["containerPort", "protocol"])),
            ("spec.containers[].args", ListType::Atomic),
            ("spec.tolerations", ListType::Atomic),
            ("status.conditions", map(&["type"])),
        ];
        for (path, expected) in cases {
            assert_eq!(builtin_list_type(Some(BuiltinKind::Pod), path), expected, "{path}");
        }
        assert_eq!(builtin_list_type(Some(BuiltinKind::Secret), "spec.containers"), ListType::Atomic);
    }

    #[test]
    fn leaves_of_a_pod() {
        let pod = json!({
            "metadata": {"labels": {"a": "1"}, "finalizers": ["x"]},
            "spec": {"containers": [{"name": "main", "image": "i", "args": ["a", "b"]}]}
        });
        let set = leaves(&pod, &pod_sem());
        let shown: Vec<String> = set.iter().map(display).collect();
        assert_eq!(
            shown,
            [
                ".metadata.finalizers[=\"x\"]",
                ".metadata.labels.a",
                ".spec.containers[name=\"main\"]",
                ".spec.containers[name=\"main\"].args",
                ".spec.containers[name=\"main\"].image",
                ".spec.containers[name=\"main\"].name",
            ]
        );
    }

    #[test]
    fn fields_v1_round_trips_with_member_markers() {
        let pod = json!({"spec": {"containers": [{"name": "main", "image": "i"}], "restartPolicy": "Always"}});
        let set = leaves(&pod, &pod_sem());
        let encoded = to_fields_v1(&set);
        assert_eq!(
            encoded,
            json!({"f:spec": {"f:containers": {"k:{\"name\":\"main\"}": {".": {}, "f:image": {}, "f:name": {}}}, "f:restartPolicy": {}}})
        );
        assert_eq!(from_fields_v1(&encoded), set);
    }

    #[test]
    fn value_at_and_remove_at_follow_keys() {
        let mut pod = json!({"spec": {"containers": [{"name": "a", "image": "1"}, {"name": "b", "image": "2"}]}});
        let set = leaves(&pod, &pod_sem());
        let path = set.iter().find(|p| display(p) == ".spec.containers[name=\"b\"].image").unwrap().clone();
        assert_eq!(value_at(&pod, &path), Some(&json!("2")));
        remove_at(&mut pod, &path[..path.len() - 1]);
        assert_eq!(pod, json!({"spec": {"containers": [{"name": "a", "image": "1"}]}}));
    }

    #[test]
    fn schema_semantics_read_list_markers() {
        let schema = json!({"type": "object", "properties": {
            "apiVersion": {"type": "string"},
            "status": {"type": "object", "properties": {"conditions": {"type": "array",
                "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"], "items": {"type": "object"}}}}}});
        let root = Semantics::schema_root(Some(&schema));
        assert_eq!(root.field("status").field("conditions").list_type(), map(&["type"]));
        assert_eq!(root.field("metadata").field("finalizers").list_type(), ListType::Set);
        assert_eq!(root.field("spec").field("x").list_type(), ListType::Atomic);
    }
}
