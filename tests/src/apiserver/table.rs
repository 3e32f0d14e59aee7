//! Server-side printing: the `meta.k8s.io/v1` Table kubectl asks for with
//! `Accept: application/json;as=Table;v=v1;g=meta.k8s.io`. Custom resources get their CRD's
//! `additionalPrinterColumns`; built-ins get the columns `kubectl get` shows for them.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::catalog::{BuiltinKind, PrinterColumn, ResourceType};

/// What each row carries besides its cells (`includeObject`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncludeObject {
    None,
    Metadata,
    Object,
}

impl IncludeObject {
    pub fn parse(value: Option<&str>) -> Self {
        match value {
            Some("None") => Self::None,
            Some("Object") => Self::Object,
            _ => Self::Metadata,
        }
    }
}

fn column(name: &str, type_: &str, format: &str, description: &str, priority: i64) -> Value {
    json!({"name": name, "type": type_, "format": format, "description": description, "priority": priority})
}

fn name_column() -> Value {
    column("Name", "string", "name", "Name must be unique within a namespace.", 0)
}

fn age_column() -> Value {
    column("Age", "string", "", "CreationTimestamp is a timestamp representing the server time when this object was created.", 0)
}

/// Column definitions of a resource type.
pub fn columns(rt: &ResourceType) -> Vec<Value> {
    if let Some(custom) = rt.custom() {
        let mut cols = vec![name_column()];
        if custom.columns.is_empty() {
            cols.push(column("Age", "date", "", "", 0));
        }
        cols.extend(custom.columns.iter().map(|c| column(&c.name, &c.type_, &c.format, &c.description, c.priority)));
        return cols;
    }
    let named = |rest: &[(&str, &str, i64)]| -> Vec<Value> {
        let mut cols = vec![name_column()];
        cols.extend(rest.iter().map(|(n, t, p)| column(n, t, "", "", *p)));
        cols
    };
    match rt.builtin() {
        Some(BuiltinKind::Pod) => named(&[
            ("Ready", "string", 0),
            ("Status", "string", 0),
            ("Restarts", "string", 0),
            ("Age", "string", 0),
            ("IP", "string", 1),
            ("Node", "string", 1),
            ("Nominated Node", "string", 1),
            ("Readiness Gates", "string", 1),
        ]),
        Some(BuiltinKind::Namespace) => named(&[("Status", "string", 0), ("Age", "string", 0)]),
        Some(BuiltinKind::Node) => named(&[
            ("Status", "string", 0),
            ("Roles", "string", 0),
            ("Age", "string", 0),
            ("Version", "string", 0),
            ("Internal-IP", "string", 1),
        ]),
        Some(BuiltinKind::Secret) => named(&[("Type", "string", 0), ("Data", "string", 0), ("Age", "string", 0)]),
        Some(BuiltinKind::ConfigMap) => named(&[("Data", "string", 0), ("Age", "string", 0)]),
        Some(BuiltinKind::PersistentVolumeClaim) => named(&[
            ("Status", "string", 0),
            ("Volume", "string", 0),
            ("Capacity", "string", 0),
            ("Access Modes", "string", 0),
            ("StorageClass", "string", 0),
            ("VolumeAttributesClass", "string", 0),
            ("Age", "string", 0),
            ("VolumeMode", "string", 1),
        ]),
        Some(BuiltinKind::Lease) => named(&[("Holder", "string", 0), ("Age", "string", 0)]),
        Some(BuiltinKind::Deployment) => named(&[
            ("Ready", "string", 0),
            ("Up-to-date", "string", 0),
            ("Available", "string", 0),
            ("Age", "string", 0),
            ("Containers", "string", 1),
            ("Images", "string", 1),
            ("Selector", "string", 1),
        ]),
        Some(BuiltinKind::ReplicaSet) => named(&[
            ("Desired", "string", 0),
            ("Current", "string", 0),
            ("Ready", "string", 0),
            ("Age", "string", 0),
            ("Containers", "string", 1),
            ("Images", "string", 1),
            ("Selector", "string", 1),
        ]),
        Some(BuiltinKind::Event | BuiltinKind::EventV1) => vec![
            column("Last Seen", "string", "", "", 0),
            column("Type", "string", "", "", 0),
            column("Reason", "string", "", "", 0),
            column("Object", "string", "", "", 0),
            column("Message", "string", "", "", 0),
            name_column(),
        ],
        Some(BuiltinKind::CustomResourceDefinition) => vec![name_column(), column("Created At", "date", "", "", 0)],
        _ => {
            let mut cols = vec![name_column()];
            cols.push(age_column());
            cols
        }
    }
}

/// One row of cells for an object.
pub fn cells(rt: &ResourceType, obj: &Value, now: DateTime<Utc>) -> Vec<Value> {
    let name = obj["metadata"]["name"].clone();
    let created = || Value::String(age(&obj["metadata"]["creationTimestamp"], now));
    let text = |v: &Value| match v {
        Value::String(s) => Value::String(s.clone()),
        Value::Null => Value::String("<none>".into()),
        other => Value::String(other.to_string()),
    };
    if let Some(custom) = rt.custom() {
        let mut row = vec![name];
        if custom.columns.is_empty() {
            row.push(created());
        }
        row.extend(custom.columns.iter().map(|c| custom_cell(c, obj, now)));
        return row;
    }
    match rt.builtin() {
        Some(BuiltinKind::Pod) => pod_cells(obj, now),
        Some(BuiltinKind::Namespace) => vec![name, text(&obj["status"]["phase"]), created()],
        Some(BuiltinKind::Node) => {
            let ready = obj["status"]["conditions"]
                .as_array()
                .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
                .map(|c| if c["status"] == "True" { "Ready" } else { "NotReady" })
                .unwrap_or("Unknown");
            let ip = obj["status"]["addresses"]
                .as_array()
                .and_then(|a| a.iter().find(|x| x["type"] == "InternalIP"))
                .map(|x| text(&x["address"]))
                .unwrap_or(Value::String("<none>".into()));
            vec![name, json!(ready), json!("<none>"), created(), text(&obj["status"]["nodeInfo"]["kubeletVersion"]), ip]
        }
        Some(BuiltinKind::Secret) => {
            let data = obj["data"].as_object().map(|d| d.len()).unwrap_or(0);
            vec![name, text(&obj["type"]), json!(data.to_string()), created()]
        }
        Some(BuiltinKind::ConfigMap) => {
            let data = obj["data"].as_object().map(|d| d.len()).unwrap_or(0)
                + obj["binaryData"].as_object().map(|d| d.len()).unwrap_or(0);
            vec![name, json!(data.to_string()), created()]
        }
        Some(BuiltinKind::PersistentVolumeClaim) => {
            let bound = obj["status"]["phase"] == "Bound";
            let modes: Vec<String> = obj["status"]["accessModes"]
                .as_array()
                .map(|m| m.iter().filter_map(Value::as_str).map(short_access_mode).collect())
                .unwrap_or_default();
            vec![
                name,
                text(&obj["status"]["phase"]),
                if bound { text(&obj["spec"]["volumeName"]) } else { json!("") },
                if bound { text(&obj["status"]["capacity"]["storage"]) } else { json!("") },
                json!(modes.join(",")),
                obj["spec"]["storageClassName"].as_str().map(|s| json!(s)).unwrap_or(json!("<unset>")),
                json!("<unset>"),
                created(),
                text(&obj["spec"]["volumeMode"]),
            ]
        }
        Some(BuiltinKind::Lease) => vec![name, text(&obj["spec"]["holderIdentity"]), created()],
        Some(BuiltinKind::Deployment) => {
            let count = |field: &str| obj["status"][field].as_i64().unwrap_or(0);
            let desired = obj["spec"]["replicas"].as_i64().unwrap_or(1);
            let mut row = vec![
                name,
                json!(format!("{}/{desired}", count("readyReplicas"))),
                json!(count("updatedReplicas").to_string()),
                json!(count("availableReplicas").to_string()),
                created(),
            ];
            row.extend(template_cells(obj));
            row
        }
        Some(BuiltinKind::ReplicaSet) => {
            let count = |field: &str| obj["status"][field].as_i64().unwrap_or(0);
            let mut row = vec![
                name,
                json!(obj["spec"]["replicas"].as_i64().unwrap_or(1).to_string()),
                json!(count("replicas").to_string()),
                json!(count("readyReplicas").to_string()),
                created(),
            ];
            row.extend(template_cells(obj));
            row
        }
        Some(BuiltinKind::Event | BuiltinKind::EventV1) => {
            let involved = if obj["involvedObject"].is_object() { &obj["involvedObject"] } else { &obj["regarding"] };
            let last = [&obj["lastTimestamp"], &obj["eventTime"], &obj["deprecatedLastTimestamp"]]
                .into_iter()
                .find(|v| v.is_string())
                .unwrap_or(&Value::Null);
            let message = if obj["message"].is_string() { &obj["message"] } else { &obj["note"] };
            vec![
                json!(age(last, now)),
                text(&obj["type"]),
                text(&obj["reason"]),
                json!(format!(
                    "{}/{}",
                    involved["kind"].as_str().unwrap_or("").to_ascii_lowercase(),
                    involved["name"].as_str().unwrap_or("")
                )),
                text(message),
                name,
            ]
        }
        Some(BuiltinKind::CustomResourceDefinition) => {
            vec![name, obj["metadata"]["creationTimestamp"].clone()]
        }
        _ => vec![name, created()],
    }
}

/// The wide columns of workloads: container names, images, the selector as text.
fn template_cells(obj: &Value) -> [Value; 3] {
    let containers = obj["spec"]["template"]["spec"]["containers"].as_array().cloned().unwrap_or_default();
    let field = |f: &str| containers.iter().filter_map(|c| c[f].as_str()).collect::<Vec<_>>().join(",");
    let mut selector: Vec<String> = obj["spec"]["selector"]["matchLabels"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or(""))).collect())
        .unwrap_or_default();
    for e in obj["spec"]["selector"]["matchExpressions"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let values: Vec<&str> = e["values"].as_array().map(|v| v.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
        let key = e["key"].as_str().unwrap_or("");
        selector.push(match e["operator"].as_str().unwrap_or("") {
            "In" => format!("{key} in ({})", values.join(",")),
            "NotIn" => format!("{key} notin ({})", values.join(",")),
            "Exists" => key.to_owned(),
            "DoesNotExist" => format!("!{key}"),
            other => format!("{key} {other}"),
        });
    }
    [json!(field("name")), json!(field("image")), json!(selector.join(","))]
}

fn short_access_mode(mode: &str) -> String {
    match mode {
        "ReadWriteOnce" => "RWO",
        "ReadOnlyMany" => "ROX",
        "ReadWriteMany" => "RWX",
        "ReadWriteOncePod" => "RWOP",
        other => other,
    }
    .to_owned()
}

fn pod_cells(pod: &Value, now: DateTime<Utc>) -> Vec<Value> {
    let statuses = pod["status"]["containerStatuses"].as_array().cloned().unwrap_or_default();
    let total = pod["spec"]["containers"].as_array().map(Vec::len).unwrap_or(0);
    let ready = statuses.iter().filter(|s| s["ready"] == Value::Bool(true)).count();
    let restarts: i64 = statuses.iter().filter_map(|s| s["restartCount"].as_i64()).sum();
    let mut reason = pod["status"]["reason"]
        .as_str()
        .or_else(|| pod["status"]["phase"].as_str())
        .unwrap_or("Pending")
        .to_owned();
    for s in &statuses {
        if let Some(r) = s["state"]["waiting"]["reason"].as_str() {
            reason = r.to_owned();
        } else if let Some(r) = s["state"]["terminated"]["reason"].as_str() {
            reason = r.to_owned();
        }
    }
    if !pod["metadata"]["deletionTimestamp"].is_null() {
        reason = "Terminating".into();
    }
    let last_restart = statuses
        .iter()
        .filter_map(|s| s["lastState"]["terminated"]["finishedAt"].as_str())
        .max()
        .map(|t| format!(" ({} ago)", age(&json!(t), now)))
        .unwrap_or_default();
    let restarts = if restarts > 0 { format!("{restarts}{last_restart}") } else { "0".into() };
    let or_none = |v: &Value| v.as_str().map(|s| json!(s)).unwrap_or(json!("<none>"));
    vec![
        pod["metadata"]["name"].clone(),
        json!(format!("{ready}/{total}")),
        json!(reason),
        json!(restarts),
        json!(age(&pod["metadata"]["creationTimestamp"], now)),
        or_none(&pod["status"]["podIP"]),
        or_none(&pod["spec"]["nodeName"]),
        json!("<none>"),
        json!("<none>"),
    ]
}

fn custom_cell(col: &PrinterColumn, obj: &Value, now: DateTime<Utc>) -> Value {
    let Some(found) = jsonpath(obj, &col.json_path).into_iter().next() else {
        return Value::Null;
    };
    match col.type_.as_str() {
        "date" => match found {
            Value::String(_) => json!(age(found, now)),
            other => other.clone(),
        },
        "integer" => found.as_f64().map(|f| json!(f as i64)).unwrap_or_else(|| found.clone()),
        "number" => found.as_f64().map(|f| json!(f)).unwrap_or_else(|| found.clone()),
        "boolean" => found.clone(),
        _ => match found {
            Value::String(_) => found.clone(),
            other => json!(other.to_string()),
        },
    }
}

/// The values a printer column's JSONPath selects. Supports `.a.b`, `['a.b']`, `[n]`, `[*]`
/// and `[?(@.field=="value")]`; that covers what CRDs put in printer columns.
pub fn jsonpath<'v>(obj: &'v Value, path: &str) -> Vec<&'v Value> {
    let path = path.trim().trim_start_matches('{').trim_end_matches('}');
    let path = path.strip_prefix('$').unwrap_or(path);
    let mut current = vec![obj];
    let mut rest = path;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            let field = &r[..end];
            rest = &r[end..];
            if field.is_empty() {
                continue;
            }
            current = current.into_iter().filter_map(|v| v.get(field)).collect();
        } else if let Some(r) = rest.strip_prefix('[') {
            let Some(end) = r.find(']') else { return Vec::new() };
            let inner = &r[..end];
            rest = &r[end + 1..];
            current = select_bracket(current, inner);
        } else {
            return Vec::new();
        }
    }
    current
}

fn select_bracket<'v>(current: Vec<&'v Value>, inner: &str) -> Vec<&'v Value> {
    let inner = inner.trim();
    if inner == "*" {
        return current
            .into_iter()
            .flat_map(|v| match v {
                Value::Array(items) => items.iter().collect::<Vec<_>>(),
                Value::Object(map) => map.values().collect(),
                _ => Vec::new(),
            })
            .collect();
    }
    if let Some(filter) = inner.strip_prefix("?(").and_then(|f| f.strip_suffix(')')) {
        let Some((lhs, rhs)) = filter.split_once("==") else { return Vec::new() };
        let field = lhs.trim().trim_start_matches('@').trim_start_matches('.');
        let want = rhs.trim().trim_matches(|c| c == '"' || c == '\'');
        return current
            .into_iter()
            .filter_map(Value::as_array)
            .flatten()
            .filter(|item| {
                let got = field.split('.').try_fold(*item, |v, f| v.get(f));
                match got {
                    Some(Value::String(s)) => s == want,
                    Some(other) => *other == want,
                    None => false,
                }
            })
            .collect();
    }
    if let Ok(index) = inner.parse::<i64>() {
        return current
            .into_iter()
            .filter_map(|v| {
                let items = v.as_array()?;
                let i = if index < 0 { items.len() as i64 + index } else { index };
                items.get(usize::try_from(i).ok()?)
            })
            .collect();
    }
    let key = inner.trim_matches(|c| c == '"' || c == '\'');
    current.into_iter().filter_map(|v| v.get(key)).collect()
}

/// `5m`, `2d3h`: how long ago a timestamp was, as kubectl prints ages.
pub fn age(timestamp: &Value, now: DateTime<Utc>) -> String {
    let Some(ts) = timestamp.as_str().and_then(|s| DateTime::parse_from_rfc3339(s).ok()) else {
        return "<unknown>".into();
    };
    human_duration((now - ts.with_timezone(&Utc)).num_seconds())
}

/// The API machinery's `HumanDuration`: precise when young, coarse when old.
pub fn human_duration(seconds: i64) -> String {
    if seconds < -1 {
        return "<invalid>".into();
    }
    if seconds < 0 {
        return "0s".into();
    }
    if seconds < 120 {
        return format!("{seconds}s");
    }
    let minutes = seconds / 60;
    if minutes < 10 {
        let s = seconds % 60;
        return if s == 0 { format!("{minutes}m") } else { format!("{minutes}m{s}s") };
    }
    if minutes < 180 {
        return format!("{minutes}m");
    }
    let hours = minutes / 60;
    if hours < 8 {
        let m = minutes % 60;
        return if m == 0 { format!("{hours}h") } else { format!("{hours}h{m}m") };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    if hours < 24 * 8 {
        let h = hours % 24;
        return if h == 0 { format!("{}d", hours / 24) } else { format!("{}d{h}h", hours / 24) };
    }
    if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    }
    if hours < 24 * 365 * 8 {
        let days = (hours / 24) % 365;
        return if days == 0 {
            format!("{}y", hours / 24 / 365)
        } else {
            format!("{}y{days}d", hours / 24 / 365)
        };
    }
    format!("{}y", hours / 24 / 365)
}

/// The `PartialObjectMetadata` a row (or a metadata-only list) carries.
pub fn partial_metadata(obj: &Value) -> Value {
    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj["metadata"].clone()})
}

/// A `Table` of objects.
pub fn table(rt: &ResourceType, objects: &[&Value], include: IncludeObject, list_meta: Value, now: DateTime<Utc>) -> Value {
    let rows: Vec<Value> = objects
        .iter()
        .map(|obj| {
            let mut row = json!({"cells": cells(rt, obj, now)});
            match include {
                IncludeObject::None => {}
                IncludeObject::Metadata => row["object"] = partial_metadata(obj),
                IncludeObject::Object => row["object"] = (*obj).clone(),
            }
            row
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_meta,
        "columnDefinitions": columns(rt),
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::catalog::Catalog;

    #[test]
    fn human_durations() {
        let cases = [
            (-5, "<invalid>"),
            (-1, "0s"),
            (0, "0s"),
            (119, "119s"),
            (120, "2m"),
            (150, "2m30s"),
            (600, "10m"),
            (179 * 60, "179m"),
            (3 * 3600, "3h"),
            (3 * 3600 + 60, "3h1m"),
            (47 * 3600, "47h"),
            (50 * 3600, "2d2h"),
            (10 * 86400, "10d"),
            (3 * 365 * 86400, "3y"),
            (3 * 365 * 86400 + 5 * 86400, "3y5d"),
            (9 * 365 * 86400, "9y"),
        ];
        for (secs, expected) in cases {
            assert_eq!(human_duration(secs), expected, "{secs}s");
        }
    }

    #[test]
    fn jsonpath_cases() {
        let obj = json!({"status": {"phase": "Connected", "account": {"jid": "1@s.whatsapp.net"},
            "conditions": [{"type": "Ready", "status": "True"}, {"type": "Connected", "status": "False"}]},
            "metadata": {"labels": {"a.b/c": "x"}}});
        let cases = [
            (".status.phase", vec![json!("Connected")]),
            (".status.account.jid", vec![json!("1@s.whatsapp.net")]),
            (".status.missing", vec![]),
            (".status.conditions[?(@.type==\"Connected\")].status", vec![json!("False")]),
            (".status.conditions[0].type", vec![json!("Ready")]),
            (".status.conditions[-1].type", vec![json!("Connected")]),
            (".status.conditions[*].type", vec![json!("Ready"), json!("Connected")]),
            (".metadata.labels['a.b/c']", vec![json!("x")]),
            ("{.status.phase}", vec![json!("Connected")]),
        ];
        for (path, expected) in cases {
            let got: Vec<Value> = jsonpath(&obj, path).into_iter().cloned().collect();
            assert_eq!(got, expected, "{path}");
        }
    }

    #[test]
    fn session_rows_use_printer_columns() {
        let crd: Value = serde_yaml::from_str(&wa_api::crd::crd_yaml()).unwrap();
        let mut catalog = Catalog::new();
        catalog.register_crd(&crd).unwrap();
        let rt = catalog.find("wa-operator.dev", "v1alpha1", "whatsappsessions").unwrap();
        let now = Utc::now();
        let created = (now - chrono::Duration::seconds(90)).to_rfc3339();
        let obj = json!({"metadata": {"name": "support", "creationTimestamp": created},
            "spec": {"engine": "sandbox"}, "status": {"phase": "AwaitingScan"}});
        let names: Vec<Value> = columns(rt).iter().map(|c| c["name"].clone()).collect();
        assert_eq!(names, [json!("Name"), json!("Phase"), json!("Account"), json!("Engine"), json!("Age")]);
        assert_eq!(cells(rt, &obj, now), [json!("support"), json!("AwaitingScan"), Value::Null, json!("sandbox"), json!("90s")]);
    }

    #[test]
    fn pod_rows() {
        let catalog = Catalog::new();
        let rt = catalog.find("", "v1", "pods").unwrap();
        let now = Utc::now();
        let pod = json!({"metadata": {"name": "wa-a", "creationTimestamp": now.to_rfc3339()},
            "spec": {"containers": [{"name": "session"}], "nodeName": "n"},
            "status": {"phase": "Running", "podIP": "127.0.0.2",
                "containerStatuses": [{"name": "session", "ready": true, "restartCount": 0, "state": {"running": {}}}]}});
        let row = cells(rt, &pod, now);
        assert_eq!(&row[..6], [json!("wa-a"), json!("1/1"), json!("Running"), json!("0"), json!("0s"), json!("127.0.0.2")]);
        assert_eq!(row.len(), columns(rt).len());
    }
}
