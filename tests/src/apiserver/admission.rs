//! What the API server does to an object before storing it, for the built-in kinds:
//! decoding into the real Go-shaped type (here: k8s-openapi's), defaulting, and validation.
//!
//! Decoding through k8s-openapi's types gives us the kinds' real schemas for free: a field
//! that does not round-trip is unknown (refused with `fieldValidation=Strict`, warned about
//! otherwise), a wrong type is a 400, and the stored object is the normalized one.

use base64::Engine as _;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

use super::catalog::BuiltinKind;
use super::selector::{valid_label_name, valid_label_value};
use super::status::Cause;

/// The object as the typed decoder sees it, and the fields it did not know.
pub struct Decoded {
    pub object: Value,
    pub unknown_fields: Vec<String>,
}

fn roundtrip<T: DeserializeOwned + Serialize>(obj: &Value) -> Result<Value, String> {
    let typed: T = serde_json::from_value(obj.clone()).map_err(|e| e.to_string())?;
    serde_json::to_value(&typed).map_err(|e| e.to_string())
}

/// Decodes a built-in object through its typed struct.
pub fn decode(kind: BuiltinKind, obj: &Value) -> Result<Decoded, String> {
    use k8s_openapi::api::{apps, coordination, core, events, networking, policy, rbac};
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let out = match kind {
        BuiltinKind::Namespace => roundtrip::<core::v1::Namespace>(obj),
        BuiltinKind::Node => roundtrip::<core::v1::Node>(obj),
        BuiltinKind::Pod => roundtrip::<core::v1::Pod>(obj),
        BuiltinKind::Secret => roundtrip::<core::v1::Secret>(obj),
        BuiltinKind::ConfigMap => roundtrip::<core::v1::ConfigMap>(obj),
        BuiltinKind::PersistentVolumeClaim => roundtrip::<core::v1::PersistentVolumeClaim>(obj),
        BuiltinKind::Service => roundtrip::<core::v1::Service>(obj),
        BuiltinKind::ServiceAccount => roundtrip::<core::v1::ServiceAccount>(obj),
        BuiltinKind::Event => roundtrip::<core::v1::Event>(obj),
        BuiltinKind::EventV1 => roundtrip::<events::v1::Event>(obj),
        BuiltinKind::Lease => roundtrip::<coordination::v1::Lease>(obj),
        BuiltinKind::CustomResourceDefinition => roundtrip::<CustomResourceDefinition>(obj),
        BuiltinKind::Role => roundtrip::<rbac::v1::Role>(obj),
        BuiltinKind::RoleBinding => roundtrip::<rbac::v1::RoleBinding>(obj),
        BuiltinKind::ClusterRole => roundtrip::<rbac::v1::ClusterRole>(obj),
        BuiltinKind::ClusterRoleBinding => roundtrip::<rbac::v1::ClusterRoleBinding>(obj),
        BuiltinKind::Deployment => roundtrip::<apps::v1::Deployment>(obj),
        BuiltinKind::ReplicaSet => roundtrip::<apps::v1::ReplicaSet>(obj),
        BuiltinKind::NetworkPolicy => roundtrip::<networking::v1::NetworkPolicy>(obj),
        BuiltinKind::PodDisruptionBudget => roundtrip::<policy::v1::PodDisruptionBudget>(obj),
    }?;
    let mut unknown_fields = Vec::new();
    unknown(obj, &out, "", &mut unknown_fields);
    Ok(Decoded {
        object: out,
        unknown_fields,
    })
}

fn unknown(input: &Value, output: &Value, path: &str, found: &mut Vec<String>) {
    match (input, output) {
        (Value::Object(i), Value::Object(o)) => {
            for (k, iv) in i {
                if iv.is_null() {
                    continue;
                }
                let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                match o.get(k) {
                    None => found.push(p),
                    Some(ov) => unknown(iv, ov, &p, found),
                }
            }
        }
        (Value::Array(i), Value::Array(o)) if i.len() == o.len() => {
            for (n, (iv, ov)) in i.iter().zip(o).enumerate() {
                unknown(iv, ov, &format!("{path}[{n}]"), found);
            }
        }
        _ => {}
    }
}

fn set_default(map: &mut Map<String, Value>, key: &str, value: Value) {
    if map.get(key).is_none_or(Value::is_null) {
        map.insert(key.to_owned(), value);
    }
}

fn obj_mut<'a>(v: &'a mut Value, key: &str) -> Option<&'a mut Map<String, Value>> {
    v.get_mut(key).and_then(Value::as_object_mut)
}

/// Defaults the API server fills in on create (and keeps on update).
pub fn apply_defaults(kind: BuiltinKind, obj: &mut Value) {
    match kind {
        BuiltinKind::Pod => default_pod(obj),
        BuiltinKind::PersistentVolumeClaim => {
            if let Some(spec) = obj_mut(obj, "spec") {
                set_default(spec, "volumeMode", json!("Filesystem"));
            }
        }
        BuiltinKind::Secret => {
            if let Some(map) = obj.as_object_mut() {
                set_default(map, "type", json!("Opaque"));
            }
        }
        BuiltinKind::Service => {
            if let Some(spec) = obj_mut(obj, "spec") {
                set_default(spec, "type", json!("ClusterIP"));
                set_default(spec, "sessionAffinity", json!("None"));
                if let Some(Value::Array(ports)) = spec.get_mut("ports") {
                    for port in ports.iter_mut().filter_map(Value::as_object_mut) {
                        set_default(port, "protocol", json!("TCP"));
                        if let Some(p) = port.get("port").cloned() {
                            set_default(port, "targetPort", p);
                        }
                    }
                }
            }
        }
        BuiltinKind::CustomResourceDefinition => {
            if let Some(spec) = obj_mut(obj, "spec") {
                set_default(spec, "conversion", json!({"strategy": "None"}));
            }
        }
        BuiltinKind::Deployment => {
            if let Some(spec) = obj_mut(obj, "spec") {
                set_default(spec, "replicas", json!(1));
                set_default(spec, "revisionHistoryLimit", json!(10));
                set_default(spec, "progressDeadlineSeconds", json!(600));
                set_default(spec, "strategy", json!({}));
                if let Some(strategy) = spec.get_mut("strategy").and_then(Value::as_object_mut) {
                    set_default(strategy, "type", json!("RollingUpdate"));
                    if strategy.get("type").and_then(Value::as_str) == Some("RollingUpdate") {
                        set_default(strategy, "rollingUpdate", json!({}));
                        if let Some(rolling) = strategy.get_mut("rollingUpdate").and_then(Value::as_object_mut) {
                            set_default(rolling, "maxUnavailable", json!("25%"));
                            set_default(rolling, "maxSurge", json!("25%"));
                        }
                    }
                }
                if let Some(template) = spec.get_mut("template") {
                    default_pod(template);
                }
            }
        }
        BuiltinKind::ReplicaSet => {
            if let Some(spec) = obj_mut(obj, "spec") {
                set_default(spec, "replicas", json!(1));
                if let Some(template) = spec.get_mut("template") {
                    default_pod(template);
                }
            }
        }
        BuiltinKind::NetworkPolicy => {
            if let Some(spec) = obj_mut(obj, "spec") {
                let egress = spec.get("egress").is_some_and(|e| !e.is_null());
                let types = if egress { json!(["Ingress", "Egress"]) } else { json!(["Ingress"]) };
                set_default(spec, "policyTypes", types);
            }
        }
        _ => {}
    }
}

fn default_probe(probe: &mut Map<String, Value>) {
    set_default(probe, "timeoutSeconds", json!(1));
    set_default(probe, "periodSeconds", json!(10));
    set_default(probe, "successThreshold", json!(1));
    set_default(probe, "failureThreshold", json!(3));
    if let Some(http) = probe.get_mut("httpGet").and_then(Value::as_object_mut) {
        set_default(http, "scheme", json!("HTTP"));
        set_default(http, "path", json!("/"));
    }
}

fn default_container(c: &mut Map<String, Value>) {
    // A struct, not a pointer, in the Go types: the API server always shows it.
    set_default(c, "resources", json!({}));
    set_default(c, "terminationMessagePath", json!("/dev/termination-log"));
    set_default(c, "terminationMessagePolicy", json!("File"));
    let image = c.get("image").and_then(Value::as_str).unwrap_or("");
    let tag = image.rsplit('/').next().and_then(|last| last.split_once(':')).map(|(_, t)| t);
    let pull = if image.contains('@') || !matches!(tag, None | Some("latest")) { "IfNotPresent" } else { "Always" };
    set_default(c, "imagePullPolicy", json!(pull));
    if let Some(Value::Array(ports)) = c.get_mut("ports") {
        for port in ports.iter_mut().filter_map(Value::as_object_mut) {
            set_default(port, "protocol", json!("TCP"));
        }
    }
    for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
        if let Some(p) = c.get_mut(probe).and_then(Value::as_object_mut) {
            default_probe(p);
        }
    }
    if let Some(Value::Array(env)) = c.get_mut("env") {
        for var in env.iter_mut() {
            if let Some(field_ref) = var
                .get_mut("valueFrom")
                .and_then(|v| v.get_mut("fieldRef"))
                .and_then(Value::as_object_mut)
            {
                set_default(field_ref, "apiVersion", json!("v1"));
            }
        }
    }
    // Requests default to limits when only limits are given.
    if let Some(resources) = c.get_mut("resources").and_then(Value::as_object_mut)
        && let Some(Value::Object(limits)) = resources.get("limits").cloned() {
            let requests = resources.entry("requests").or_insert_with(|| json!({}));
            if let Some(requests) = requests.as_object_mut() {
                for (k, v) in limits {
                    requests.entry(k).or_insert(v);
                }
            }
        }
}

fn qos_class(spec: &Value) -> &'static str {
    let containers = spec["containers"].as_array().map(Vec::as_slice).unwrap_or_default();
    let mut any = false;
    let mut guaranteed = !containers.is_empty();
    for c in containers {
        let requests = c["resources"]["requests"].as_object();
        let limits = c["resources"]["limits"].as_object();
        if requests.is_some_and(|r| !r.is_empty()) || limits.is_some_and(|l| !l.is_empty()) {
            any = true;
        }
        let full = ["cpu", "memory"]
            .iter()
            .all(|r| limits.and_then(|l| l.get(*r)).is_some() && limits.and_then(|l| l.get(*r)) == requests.and_then(|q| q.get(*r)));
        guaranteed &= full;
    }
    if !any {
        "BestEffort"
    } else if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

fn default_pod(pod: &mut Value) {
    let Some(spec) = obj_mut(pod, "spec") else { return };
    set_default(spec, "restartPolicy", json!("Always"));
    set_default(spec, "terminationGracePeriodSeconds", json!(30));
    set_default(spec, "dnsPolicy", json!("ClusterFirst"));
    set_default(spec, "schedulerName", json!("default-scheduler"));
    set_default(spec, "securityContext", json!({}));
    set_default(spec, "serviceAccountName", json!("default"));
    let sa = spec.get("serviceAccountName").cloned().unwrap_or(json!("default"));
    set_default(spec, "serviceAccount", sa);
    set_default(spec, "enableServiceLinks", json!(true));
    set_default(spec, "priority", json!(0));
    set_default(spec, "preemptionPolicy", json!("PreemptLowerPriority"));
    for list in ["containers", "initContainers"] {
        if let Some(Value::Array(cs)) = spec.get_mut(list) {
            for c in cs.iter_mut().filter_map(Value::as_object_mut) {
                default_container(c);
            }
        }
    }
    if let Some(Value::Array(volumes)) = spec.get_mut("volumes") {
        for v in volumes.iter_mut().filter_map(Value::as_object_mut) {
            for source in ["secret", "configMap"] {
                if let Some(s) = v.get_mut(source).and_then(Value::as_object_mut) {
                    set_default(s, "defaultMode", json!(420));
                }
            }
        }
    }
}

/// Status a new object starts with (the status subresource ignores what the creator sent).
pub fn initial_status(kind: BuiltinKind, obj: &Value) -> Option<Value> {
    match kind {
        BuiltinKind::Pod => Some(json!({"phase": "Pending", "qosClass": qos_class(&obj["spec"])})),
        BuiltinKind::PersistentVolumeClaim => Some(json!({"phase": "Pending"})),
        BuiltinKind::Namespace => Some(json!({"phase": "Active"})),
        _ => None,
    }
}

/// Moves a Secret's `stringData` into `data`, base64-encoded, as the API server does on write.
pub fn fold_string_data(secret: &mut Value) {
    let Some(map) = secret.as_object_mut() else { return };
    let Some(Value::Object(string_data)) = map.remove("stringData") else {
        return;
    };
    let data = map.entry("data").or_insert_with(|| json!({}));
    if !data.is_object() {
        *data = json!({});
    }
    if let Some(data) = data.as_object_mut() {
        for (k, v) in string_data {
            if let Value::String(s) = v {
                data.insert(k, Value::String(base64::engine::general_purpose::STANDARD.encode(s.as_bytes())));
            }
        }
    }
}

/// RFC 1123 subdomain: what most object names must be.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// RFC 1123 label: namespace and container names.
pub fn is_dns_label(s: &str) -> bool {
    is_dns_subdomain(s) && s.len() <= 63 && !s.contains('.')
}

const SUBDOMAIN_HELP: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const LABEL_HELP: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";

/// Object metadata rules every kind shares.
pub fn validate_metadata(kind: Option<BuiltinKind>, obj: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    let meta = &obj["metadata"];
    let name = meta["name"].as_str().unwrap_or("");
    let label_name = matches!(kind, Some(BuiltinKind::Namespace));
    if label_name && !is_dns_label(name) {
        causes.push(Cause::new("FieldValueInvalid", "metadata.name", format!("Invalid value: {name:?}: {LABEL_HELP}")));
    } else if !label_name && !is_dns_subdomain(name) {
        causes.push(Cause::new("FieldValueInvalid", "metadata.name", format!("Invalid value: {name:?}: {SUBDOMAIN_HELP}")));
    }
    if let Some(labels) = meta["labels"].as_object() {
        for (k, v) in labels {
            if !valid_label_name(k) {
                causes.push(Cause::new("FieldValueInvalid", "metadata.labels", format!("Invalid value: {k:?}: name part must consist of alphanumeric characters, '-', '_' or '.'")));
            }
            match v.as_str() {
                Some(v) if valid_label_value(v) => {}
                _ => causes.push(Cause::new(
                    "FieldValueInvalid",
                    "metadata.labels",
                    format!("Invalid value: {v}: a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"),
                )),
            }
        }
    }
    if let Some(annotations) = meta["annotations"].as_object() {
        let size: usize = annotations.iter().map(|(k, v)| k.len() + v.as_str().map_or(0, str::len)).sum();
        if size > 256 * 1024 {
            causes.push(Cause::new("FieldValueTooLong", "metadata.annotations", "Too long: must have at most 262144 bytes"));
        }
        for (k, v) in annotations {
            if !valid_label_name(k) {
                causes.push(Cause::new("FieldValueInvalid", "metadata.annotations", format!("Invalid value: {k:?}: name part must consist of alphanumeric characters, '-', '_' or '.'")));
            }
            if !v.is_string() {
                causes.push(Cause::new("FieldValueTypeInvalid", format!("metadata.annotations.{k}"), "Invalid value: annotations must be strings"));
            }
        }
    }
    if let Some(refs) = meta["ownerReferences"].as_array() {
        let mut controllers = 0;
        for (i, r) in refs.iter().enumerate() {
            for field in ["apiVersion", "kind", "name", "uid"] {
                if r[field].as_str().unwrap_or("").is_empty() {
                    causes.push(Cause::new("FieldValueRequired", format!("metadata.ownerReferences[{i}].{field}"), "Required value"));
                }
            }
            if r["controller"] == Value::Bool(true) {
                controllers += 1;
            }
        }
        if controllers > 1 {
            causes.push(Cause::new("FieldValueInvalid", "metadata.ownerReferences", "Invalid value: only one reference can have Controller set to true"));
        }
    }
    if let Some(finalizers) = meta["finalizers"].as_array() {
        for (i, f) in finalizers.iter().enumerate() {
            let ok = f.as_str().is_some_and(|f| {
                let name = f.rsplit('/').next().unwrap_or("");
                !name.is_empty() && name.len() <= 63 && (f.split('/').count() <= 2)
            });
            if !ok {
                causes.push(Cause::new("FieldValueInvalid", format!("metadata.finalizers[{i}]"), format!("Invalid value: {f}: name part must be non-empty")));
            }
        }
    }
    causes
}

/// Rules of the built-in kinds that matter here. `old` is the stored object on update.
pub fn validate_builtin(kind: BuiltinKind, obj: &Value, old: Option<&Value>) -> Vec<Cause> {
    let mut causes = Vec::new();
    match kind {
        BuiltinKind::Pod => validate_pod(obj, old, &mut causes),
        BuiltinKind::PersistentVolumeClaim => {
            if let Some(old) = old {
                let strip = |v: &Value| {
                    let mut spec = v["spec"].clone();
                    if let Some(s) = spec.as_object_mut() {
                        s.remove("resources");
                        s.remove("volumeAttributesClassName");
                        if old["spec"]["volumeName"].as_str().unwrap_or("").is_empty() {
                            s.remove("volumeName");
                        }
                    }
                    spec
                };
                if strip(obj) != strip(old) {
                    causes.push(Cause::new(
                        "FieldValueForbidden",
                        "spec",
                        "Forbidden: spec is immutable after creation except resources.requests and volumeAttributesClassName for bound claims",
                    ));
                }
            } else if obj["spec"]["resources"]["requests"]["storage"].is_null() {
                causes.push(Cause::new("FieldValueRequired", "spec.resources[storage]", "Required value"));
            }
        }
        BuiltinKind::Secret => {
            if let Some(data) = obj["data"].as_object() {
                for k in data.keys() {
                    if k.is_empty() || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)) {
                        causes.push(Cause::new("FieldValueInvalid", format!("data[{k}]"), format!("Invalid value: {k:?}: a valid config key must consist of alphanumeric characters, '-', '_' or '.'")));
                    }
                }
            }
            if let Some(old) = old
                && old["immutable"] == Value::Bool(true) && (obj["data"] != old["data"] || obj["immutable"] != old["immutable"]) {
                    causes.push(Cause::new("FieldValueForbidden", "data", "Forbidden: field is immutable when `immutable` is set"));
                }
        }
        BuiltinKind::Lease => {
            if let Some(d) = obj["spec"]["leaseDurationSeconds"].as_i64()
                && d <= 0 {
                    causes.push(Cause::new("FieldValueInvalid", "spec.leaseDurationSeconds", format!("Invalid value: {d}: must be greater than 0")));
                }
        }
        BuiltinKind::EventV1 => {
            if old.is_none() {
                for field in ["eventTime", "reportingController", "reportingInstance", "action", "reason"] {
                    if obj[field].as_str().unwrap_or("").is_empty() {
                        causes.push(Cause::new("FieldValueRequired", field, "Required value"));
                    }
                }
            }
            if let Some(t) = obj["type"].as_str()
                && t != "Normal" && t != "Warning" {
                    causes.push(Cause::new("FieldValueNotSupported", "type", format!("Unsupported value: {t:?}: supported values: \"Normal\", \"Warning\"")));
                }
        }
        BuiltinKind::Deployment | BuiltinKind::ReplicaSet => validate_workload(kind, obj, old, &mut causes),
        BuiltinKind::CustomResourceDefinition => {
            for (field, message) in super::catalog::validate_crd(obj) {
                causes.push(Cause::new("FieldValueInvalid", field, message));
            }
            if let Some(old) = old {
                for field in ["group", "scope"] {
                    if obj["spec"][field] != old["spec"][field] {
                        causes.push(Cause::new("FieldValueInvalid", format!("spec.{field}"), "Invalid value: field is immutable"));
                    }
                }
            }
        }
        _ => {}
    }
    causes
}

/// Whether a `metav1.LabelSelector` (matchLabels, matchExpressions) selects `labels`.
/// `None` when the selector itself is malformed.
pub fn selector_matches(selector: &Value, labels: &Value) -> Option<bool> {
    let label = |k: &str| labels.get(k).and_then(Value::as_str);
    if let Some(match_labels) = selector["matchLabels"].as_object() {
        for (k, v) in match_labels {
            if label(k) != Some(v.as_str()?) {
                return Some(false);
            }
        }
    }
    for expr in selector["matchExpressions"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let key = expr["key"].as_str()?;
        let values: Vec<&str> = expr["values"].as_array().map(|v| v.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
        let ok = match expr["operator"].as_str()? {
            "In" => label(key).is_some_and(|v| values.contains(&v)),
            "NotIn" => !label(key).is_some_and(|v| values.contains(&v)),
            "Exists" => label(key).is_some(),
            "DoesNotExist" => label(key).is_none(),
            _ => return None,
        };
        if !ok {
            return Some(false);
        }
    }
    Some(true)
}

fn selector_is_empty(selector: &Value) -> bool {
    selector["matchLabels"].as_object().is_none_or(Map::is_empty) && selector["matchExpressions"].as_array().is_none_or(Vec::is_empty)
}

/// Deployments and ReplicaSets: a selector that selects the template's labels (and never
/// changes), replicas ≥ 0, a valid pod template that restarts always, a known strategy.
fn validate_workload(kind: BuiltinKind, obj: &Value, old: Option<&Value>, causes: &mut Vec<Cause>) {
    let spec = &obj["spec"];
    let what = if kind == BuiltinKind::Deployment { "deployment" } else { "replicaset" };
    let selector = &spec["selector"];
    let labels = &spec["template"]["metadata"]["labels"];
    if selector.is_null() {
        causes.push(Cause::new("FieldValueRequired", "spec.selector", "Required value"));
    } else if selector_is_empty(selector) {
        causes.push(Cause::new("FieldValueInvalid", "spec.selector", format!("Invalid value: {selector}: empty selector is invalid for {what}")));
    } else {
        match selector_matches(selector, labels) {
            Some(true) => {}
            Some(false) => causes.push(Cause::new(
                "FieldValueInvalid",
                "spec.template.metadata.labels",
                format!("Invalid value: {labels}: `selector` does not match template `labels`"),
            )),
            None => causes.push(Cause::new("FieldValueInvalid", "spec.selector", format!("Invalid value: {selector}: not a valid label selector"))),
        }
    }
    if let Some(old) = old
        && old["spec"]["selector"] != *selector {
            causes.push(Cause::new("FieldValueInvalid", "spec.selector", format!("Invalid value: {selector}: field is immutable")));
        }
    if let Some(n) = spec["replicas"].as_i64()
        && n < 0 {
            causes.push(Cause::new("FieldValueInvalid", "spec.replicas", format!("Invalid value: {n}: must be greater than or equal to 0")));
        }
    if spec["template"].is_null() {
        causes.push(Cause::new("FieldValueRequired", "spec.template", "Required value"));
        return;
    }
    let mut template_causes = Vec::new();
    let template_meta = json!({"metadata": {"name": "template", "labels": labels, "annotations": spec["template"]["metadata"]["annotations"]}});
    for mut cause in validate_metadata(None, &template_meta) {
        cause.field = format!("spec.template.{}", cause.field);
        causes.push(cause);
    }
    validate_pod(&spec["template"], None, &mut template_causes);
    for mut cause in template_causes {
        cause.field = cause.field.replacen("spec", "spec.template.spec", 1);
        causes.push(cause);
    }
    if let Some(policy) = spec["template"]["spec"]["restartPolicy"].as_str()
        && policy != "Always" {
            causes.push(Cause::new(
                "FieldValueNotSupported",
                "spec.template.spec.restartPolicy",
                format!("Unsupported value: {policy:?}: supported values: \"Always\""),
            ));
        }
    if kind == BuiltinKind::Deployment {
        match spec["strategy"]["type"].as_str() {
            Some("RollingUpdate") | None => {}
            Some("Recreate") if spec["strategy"]["rollingUpdate"].is_null() => {}
            Some("Recreate") => causes.push(Cause::new(
                "FieldValueForbidden",
                "spec.strategy.rollingUpdate",
                "Forbidden: may not be specified when strategy `type` is 'Recreate'",
            )),
            Some(other) => causes.push(Cause::new(
                "FieldValueNotSupported",
                "spec.strategy.type",
                format!("Unsupported value: {other:?}: supported values: \"Recreate\", \"RollingUpdate\""),
            )),
        }
    }
}

fn validate_pod(pod: &Value, old: Option<&Value>, causes: &mut Vec<Cause>) {
    let spec = &pod["spec"];
    let containers = spec["containers"].as_array().map(Vec::as_slice).unwrap_or_default();
    if containers.is_empty() {
        causes.push(Cause::new("FieldValueRequired", "spec.containers", "Required value"));
    }
    let mut names = Vec::new();
    for (list, items) in [("containers", containers), ("initContainers", spec["initContainers"].as_array().map(Vec::as_slice).unwrap_or_default())] {
        for (i, c) in items.iter().enumerate() {
            let name = c["name"].as_str().unwrap_or("");
            if name.is_empty() {
                causes.push(Cause::new("FieldValueRequired", format!("spec.{list}[{i}].name"), "Required value"));
            } else if !is_dns_label(name) {
                causes.push(Cause::new("FieldValueInvalid", format!("spec.{list}[{i}].name"), format!("Invalid value: {name:?}: {LABEL_HELP}")));
            } else if names.contains(&name) {
                causes.push(Cause::new("FieldValueDuplicate", format!("spec.{list}[{i}].name"), format!("Duplicate value: {name:?}")));
            }
            names.push(name);
            if c["image"].as_str().unwrap_or("").is_empty() {
                causes.push(Cause::new("FieldValueRequired", format!("spec.{list}[{i}].image"), "Required value"));
            }
            if let Some(ports) = c["ports"].as_array() {
                for (j, p) in ports.iter().enumerate() {
                    let port = p["containerPort"].as_i64().unwrap_or(0);
                    if !(1..=65535).contains(&port) {
                        causes.push(Cause::new("FieldValueInvalid", format!("spec.{list}[{i}].ports[{j}].containerPort"), format!("Invalid value: {port}: must be between 1 and 65535, inclusive")));
                    }
                }
            }
        }
    }
    if let Some(policy) = spec["restartPolicy"].as_str()
        && !matches!(policy, "Always" | "OnFailure" | "Never") {
            causes.push(Cause::new("FieldValueNotSupported", "spec.restartPolicy", format!("Unsupported value: {policy:?}: supported values: \"Always\", \"OnFailure\", \"Never\"")));
        }
    if let Some(old) = old {
        // Pods are immutable but for a few fields; everything else needs a new pod.
        let strip = |v: &Value| {
            let mut spec = v["spec"].clone();
            if let Some(s) = spec.as_object_mut() {
                for field in ["activeDeadlineSeconds", "tolerations", "terminationGracePeriodSeconds"] {
                    s.remove(field);
                }
                for list in ["containers", "initContainers"] {
                    if let Some(Value::Array(cs)) = s.get_mut(list) {
                        for c in cs.iter_mut().filter_map(Value::as_object_mut) {
                            c.remove("image");
                        }
                    }
                }
            }
            spec
        };
        if strip(pod) != strip(old) {
            causes.push(Cause::new(
                "FieldValueForbidden",
                "spec",
                "Forbidden: pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)",
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding_finds_unknown_fields_and_type_errors() {
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "c", "image": "i", "imagePolicy": "x"}], "bogus": 1, "nodeName": null}});
        let decoded = decode(BuiltinKind::Pod, &pod).unwrap();
        assert_eq!(decoded.unknown_fields, ["spec.bogus", "spec.containers[0].imagePolicy"]);
        assert!(decoded.object["spec"].get("bogus").is_none());
        let bad = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "ports": [{"containerPort": "http"}]}]}});
        assert!(decode(BuiltinKind::Pod, &bad).is_err());
    }

    #[test]
    fn pod_defaults() {
        let mut pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [
            {"name": "c", "image": "wa-session:0.1.0", "ports": [{"containerPort": 8080}],
             "readinessProbe": {"httpGet": {"path": "/readyz", "port": 8080}},
             "resources": {"limits": {"memory": "256Mi"}},
             "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]}]}});
        apply_defaults(BuiltinKind::Pod, &mut pod);
        let c = &pod["spec"]["containers"][0];
        assert_eq!(pod["spec"]["restartPolicy"], "Always");
        assert_eq!(pod["spec"]["terminationGracePeriodSeconds"], 30);
        assert_eq!(c["imagePullPolicy"], "IfNotPresent");
        assert_eq!(c["ports"][0]["protocol"], "TCP");
        assert_eq!(c["readinessProbe"]["periodSeconds"], 10);
        assert_eq!(c["readinessProbe"]["httpGet"]["scheme"], "HTTP");
        assert_eq!(c["resources"]["requests"]["memory"], "256Mi");
        assert_eq!(c["env"][0]["valueFrom"]["fieldRef"]["apiVersion"], "v1");
        assert_eq!(initial_status(BuiltinKind::Pod, &pod).unwrap()["qosClass"], "Burstable");
    }

    #[test]
    fn secrets_fold_string_data() {
        let mut secret = json!({"stringData": {"key": "hello"}, "data": {"other": "eA=="}});
        fold_string_data(&mut secret);
        assert_eq!(secret, json!({"data": {"key": "aGVsbG8=", "other": "eA=="}}));
    }

    #[test]
    fn pod_validation() {
        let pod = |spec: Value| json!({"metadata": {"name": "p"}, "spec": spec});
        let fields = |p: &Value, old: Option<&Value>| -> Vec<String> {
            validate_builtin(BuiltinKind::Pod, p, old).into_iter().map(|c| c.field).collect()
        };
        assert_eq!(fields(&pod(json!({})), None), ["spec.containers"]);
        assert_eq!(fields(&pod(json!({"containers": [{"name": "c"}]})), None), ["spec.containers[0].image"]);
        assert_eq!(fields(&pod(json!({"containers": [{"name": "c", "image": "i"}, {"name": "c", "image": "i"}]})), None), ["spec.containers[1].name"]);
        let old = pod(json!({"containers": [{"name": "c", "image": "i", "args": ["a"]}]}));
        let new_image = pod(json!({"containers": [{"name": "c", "image": "j", "args": ["a"]}]}));
        let new_args = pod(json!({"containers": [{"name": "c", "image": "i", "args": ["b"]}]}));
        assert!(fields(&new_image, Some(&old)).is_empty());
        assert_eq!(fields(&new_args, Some(&old)), ["spec"]);
    }

    fn deployment(selector: Value, labels: Value) -> Value {
        json!({"metadata": {"name": "web"}, "spec": {"selector": selector, "template": {"metadata": {"labels": labels},
            "spec": {"containers": [{"name": "c", "image": "i"}]}}}})
    }

    #[test]
    fn deployment_defaults() {
        let mut d = deployment(json!({"matchLabels": {"app": "web"}}), json!({"app": "web"}));
        apply_defaults(BuiltinKind::Deployment, &mut d);
        let spec = &d["spec"];
        assert_eq!(spec["replicas"], 1);
        assert_eq!(spec["revisionHistoryLimit"], 10);
        assert_eq!(spec["progressDeadlineSeconds"], 600);
        assert_eq!(spec["strategy"], json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"}}));
        assert_eq!(spec["template"]["spec"]["restartPolicy"], "Always");
        assert_eq!(spec["template"]["spec"]["containers"][0]["imagePullPolicy"], "Always");
        let mut recreate = deployment(json!({"matchLabels": {"app": "web"}}), json!({"app": "web"}));
        recreate["spec"]["strategy"] = json!({"type": "Recreate"});
        apply_defaults(BuiltinKind::Deployment, &mut recreate);
        assert_eq!(recreate["spec"]["strategy"], json!({"type": "Recreate"}));
    }

    #[test]
    fn workload_validation() {
        let check = |kind: BuiltinKind, obj: Value, old: Option<&Value>, expected: &[&str]| {
            let mut obj = obj;
            apply_defaults(kind, &mut obj);
            let fields: Vec<String> = validate_builtin(kind, &obj, old).into_iter().map(|c| c.field).collect();
            assert_eq!(fields, expected, "{obj}");
        };
        let ok = deployment(json!({"matchLabels": {"app": "web"}}), json!({"app": "web", "tier": "x"}));
        check(BuiltinKind::Deployment, ok.clone(), None, &[]);
        check(BuiltinKind::ReplicaSet, ok.clone(), None, &[]);
        let exprs = json!({"matchExpressions": [{"key": "app", "operator": "In", "values": ["web", "api"]}, {"key": "canary", "operator": "DoesNotExist"}]});
        check(BuiltinKind::Deployment, deployment(exprs, json!({"app": "api"})), None, &[]);
        check(BuiltinKind::Deployment, deployment(Value::Null, json!({"app": "web"})), None, &["spec.selector"]);
        check(BuiltinKind::Deployment, deployment(json!({}), json!({"app": "web"})), None, &["spec.selector"]);
        check(BuiltinKind::Deployment, deployment(json!({"matchLabels": {"app": "web"}}), json!({"app": "api"})), None, &["spec.template.metadata.labels"]);
        check(BuiltinKind::Deployment, deployment(json!({"matchLabels": {"app": "a b"}}), json!({"app": "a b"})), None, &["spec.template.metadata.labels"]);
        let mut bad = ok.clone();
        bad["spec"]["replicas"] = json!(-1);
        bad["spec"]["template"]["spec"]["restartPolicy"] = json!("Never");
        bad["spec"]["template"]["spec"]["containers"][0]["image"] = json!("");
        check(BuiltinKind::Deployment, bad, None, &["spec.replicas", "spec.template.spec.containers[0].image", "spec.template.spec.restartPolicy"]);
        let mut strategy = ok.clone();
        strategy["spec"]["strategy"] = json!({"type": "Recreate", "rollingUpdate": {"maxSurge": 1}});
        check(BuiltinKind::Deployment, strategy, None, &["spec.strategy.rollingUpdate"]);
        let mut moved = ok.clone();
        moved["spec"]["selector"] = json!({"matchLabels": {"tier": "x"}});
        let mut old = ok.clone();
        apply_defaults(BuiltinKind::Deployment, &mut old);
        check(BuiltinKind::Deployment, moved, Some(&old), &["spec.selector"]);
    }

    #[test]
    fn metadata_validation() {
        let cases = [
            (json!({"metadata": {"name": "ok-name.x"}}), Vec::<&str>::new()),
            (json!({"metadata": {"name": "Bad_Name"}}), vec!["metadata.name"]),
            (json!({"metadata": {"name": "a", "labels": {"k": "bad value"}}}), vec!["metadata.labels"]),
            (json!({"metadata": {"name": "a", "ownerReferences": [{"apiVersion": "v1", "kind": "X", "name": "x"}]}}), vec!["metadata.ownerReferences[0].uid"]),
        ];
        for (obj, expected) in cases {
            let fields: Vec<String> = validate_metadata(None, &obj).into_iter().map(|c| c.field).collect();
            assert_eq!(fields, expected, "{obj}");
        }
        let ns = json!({"metadata": {"name": "has.dot"}});
        assert_eq!(validate_metadata(Some(BuiltinKind::Namespace), &ns).len(), 1);
    }
}
