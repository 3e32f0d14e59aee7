//! Custom resources against their CRD's structural schema, in the API server's order:
//! prune unknown fields (reporting them for `fieldValidation`), apply `default`s, validate.
//!
//! Validation covers `type`, `nullable`, `enum`, `pattern`, `required`, `minimum`/`maximum`
//! (and exclusive), `minLength`/`maxLength`, `minItems`/`maxItems`, `minProperties`/
//! `maxProperties`, `allOf`/`anyOf`/`oneOf`/`not`, `x-kubernetes-int-or-string`, and key
//! uniqueness of `x-kubernetes-list-type: map`/`set` lists. CEL rules
//! (`x-kubernetes-validations`) and `format` are not checked; see tests/README.md.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

use regex::Regex;
use serde_json::{Map, Value};

use super::status::Cause;

/// Removes fields the schema does not declare; returns their paths (`spec.foo`).
/// `null` in a field that is not `nullable` is dropped too (and then defaulted), as Kubernetes
/// does.
pub fn prune(obj: &mut Value, schema: &Value) -> Vec<String> {
    let mut unknown = Vec::new();
    prune_node(obj, schema, "", true, &mut unknown);
    unknown
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn preserves_unknown(schema: &Value) -> bool {
    schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true))
}

fn prune_node(value: &mut Value, schema: &Value, path: &str, root: bool, unknown: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            let embedded = root || schema.get("x-kubernetes-embedded-resource") == Some(&Value::Bool(true));
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties");
            let keys: Vec<String> = map.keys().cloned().collect();
            for key in keys {
                if embedded && matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                let child_path = join(path, &key);
                let child_schema = props.and_then(|p| p.get(&key)).or(additional.filter(|a| a.is_object()));
                match child_schema {
                    Some(child_schema) => {
                        let drop_null = map.get(&key).is_some_and(Value::is_null)
                            && child_schema.get("nullable") != Some(&Value::Bool(true));
                        if drop_null {
                            map.remove(&key);
                        } else if let Some(child) = map.get_mut(&key) {
                            prune_node(child, child_schema, &child_path, false, unknown);
                        }
                    }
                    None if additional == Some(&Value::Bool(true)) || preserves_unknown(schema) => {}
                    None => {
                        map.remove(&key);
                        unknown.push(child_path);
                    }
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter_mut().enumerate() {
                    prune_node(item, item_schema, &format!("{path}[{i}]"), false, unknown);
                }
            }
        }
        _ => {}
    }
}

/// Fills in `default`s of absent fields, top-down, so defaults inside defaults apply too.
pub fn apply_defaults(value: &mut Value, schema: &Value) {
    match value {
        Value::Object(map) => {
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (key, prop) in props {
                    if !map.contains_key(key)
                        && let Some(default) = prop.get("default") {
                            map.insert(key.clone(), default.clone());
                        }
                }
                for (key, child) in map.iter_mut() {
                    if let Some(prop) = props.get(key) {
                        apply_defaults(child, prop);
                    }
                }
            } else if let Some(additional) = schema.get("additionalProperties").filter(|a| a.is_object()) {
                for child in map.values_mut() {
                    apply_defaults(child, additional);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for item in items {
                    apply_defaults(item, item_schema);
                }
            }
        }
        _ => {}
    }
}

/// Every violation, with the field path and the API server's wording.
pub fn validate(value: &Value, schema: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    validate_node(value, schema, "", true, &mut causes);
    causes
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn type_matches(value: &Value, schema: &Value) -> Result<(), String> {
    if value.is_null() {
        return if schema.get("nullable") == Some(&Value::Bool(true)) {
            Ok(())
        } else {
            Err(schema.get("type").and_then(Value::as_str).unwrap_or("object").to_owned())
        };
    }
    if schema.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
        return match value {
            Value::String(_) => Ok(()),
            Value::Number(n) if n.is_i64() || n.is_u64() => Ok(()),
            _ => Err("integer-or-string".into()),
        };
    }
    let Some(expected) = schema.get("type").and_then(Value::as_str) else {
        return Ok(());
    };
    let ok = match expected {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "boolean" => value.is_boolean(),
        "integer" => value.as_f64().is_some_and(|f| f.fract() == 0.0),
        "number" => value.is_number(),
        _ => true,
    };
    if ok { Ok(()) } else { Err(expected.to_owned()) }
}

fn shown(value: &Value) -> String {
    value.to_string()
}

fn regex(pattern: &str) -> Option<Regex> {
    static CACHE: LazyLock<Mutex<HashMap<String, Option<Regex>>>> = LazyLock::new(Default::default);
    let mut cache = CACHE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    cache
        .entry(pattern.to_owned())
        .or_insert_with(|| Regex::new(pattern).ok())
        .clone()
}

fn validate_node(value: &Value, schema: &Value, path: &str, root: bool, causes: &mut Vec<Cause>) {
    let at = if path.is_empty() { "<root>" } else { path };
    if let Err(expected) = type_matches(value, schema) {
        causes.push(Cause::new(
            "FieldValueTypeInvalid",
            at,
            format!(
                "Invalid value: \"{}\": {at} in body must be of type {expected}: \"{}\"",
                type_name(value),
                type_name(value)
            ),
        ));
        return;
    }
    if value.is_null() {
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value) {
            let list: Vec<String> = allowed.iter().map(shown).collect();
            causes.push(Cause::new(
                "FieldValueNotSupported",
                at,
                format!("Unsupported value: {}: supported values: {}", shown(value), list.join(", ")),
            ));
        }
    let number = |key: &str| schema.get(key).and_then(Value::as_f64);
    let flag = |key: &str| schema.get(key) == Some(&Value::Bool(true));
    match value {
        Value::String(s) => {
            if let Some(pattern) = schema.get("pattern").and_then(Value::as_str)
                && let Some(re) = regex(pattern)
                    && !re.is_match(s) {
                        causes.push(Cause::new(
                            "FieldValueInvalid",
                            at,
                            format!("Invalid value: {}: {at} in body should match '{pattern}'", shown(value)),
                        ));
                    }
            let len = s.chars().count() as f64;
            if let Some(max) = number("maxLength")
                && len > max {
                    causes.push(Cause::new("FieldValueTooLong", at, format!("Too long: may not be more than {max} bytes")));
                }
            if let Some(min) = number("minLength")
                && len < min {
                    causes.push(Cause::new(
                        "FieldValueInvalid",
                        at,
                        format!("Invalid value: {}: {at} in body should be at least {min} chars long", shown(value)),
                    ));
                }
        }
        Value::Number(n) => {
            let Some(v) = n.as_f64() else { return };
            if let Some(min) = number("minimum") {
                let exclusive = flag("exclusiveMinimum");
                if v < min || (exclusive && v == min) {
                    let rel = if exclusive { "greater than" } else { "greater than or equal to" };
                    causes.push(Cause::new(
                        "FieldValueInvalid",
                        at,
                        format!("Invalid value: {n}: {at} in body should be {rel} {min}"),
                    ));
                }
            }
            if let Some(max) = number("maximum") {
                let exclusive = flag("exclusiveMaximum");
                if v > max || (exclusive && v == max) {
                    let rel = if exclusive { "less than" } else { "less than or equal to" };
                    causes.push(Cause::new(
                        "FieldValueInvalid",
                        at,
                        format!("Invalid value: {n}: {at} in body should be {rel} {max}"),
                    ));
                }
            }
        }
        Value::Object(map) => validate_object(map, schema, path, root, causes),
        Value::Array(items) => validate_array(items, schema, path, causes),
        Value::Bool(_) | Value::Null => {}
    }
    validate_combinators(value, schema, path, causes);
}

fn validate_object(map: &Map<String, Value>, schema: &Value, path: &str, root: bool, causes: &mut Vec<Cause>) {
    let at = if path.is_empty() { "<root>" } else { path };
    if let Some(required) = schema.get("required").and_then(Value::as_array) {
        for name in required.iter().filter_map(Value::as_str) {
            if !map.contains_key(name) {
                causes.push(Cause::new("FieldValueRequired", join(path, name), "Required value"));
            }
        }
    }
    let count = map.len() as f64;
    if let Some(max) = schema.get("maxProperties").and_then(Value::as_f64)
        && count > max {
            causes.push(Cause::new("FieldValueTooMany", at, format!("Too many: {count}: must have at most {max} items")));
        }
    if let Some(min) = schema.get("minProperties").and_then(Value::as_f64)
        && count < min {
            causes.push(Cause::new(
                "FieldValueInvalid",
                at,
                format!("Invalid value: {count}: {at} in body should have at least {min} properties"),
            ));
        }
    let props = schema.get("properties").and_then(Value::as_object);
    let additional = schema.get("additionalProperties").filter(|a| a.is_object());
    for (key, child) in map {
        if root && matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
            continue;
        }
        if let Some(child_schema) = props.and_then(|p| p.get(key)).or(additional) {
            validate_node(child, child_schema, &join(path, key), false, causes);
        }
    }
}

fn validate_array(items: &[Value], schema: &Value, path: &str, causes: &mut Vec<Cause>) {
    let count = items.len() as f64;
    if let Some(max) = schema.get("maxItems").and_then(Value::as_f64)
        && count > max {
            causes.push(Cause::new("FieldValueTooMany", path, format!("Too many: {count}: must have at most {max} items")));
        }
    if let Some(min) = schema.get("minItems").and_then(Value::as_f64)
        && count < min {
            causes.push(Cause::new(
                "FieldValueInvalid",
                path,
                format!("Invalid value: {count}: {path} in body should have at least {min} items"),
            ));
        }
    match schema.get("x-kubernetes-list-type").and_then(Value::as_str) {
        Some("map") => {
            let keys: Vec<String> = schema
                .get("x-kubernetes-list-map-keys")
                .and_then(Value::as_array)
                .map(|k| k.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect())
                .unwrap_or_default();
            let mut seen = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let key: Vec<Option<&Value>> = keys.iter().map(|k| item.get(k)).collect();
                if seen.contains(&key) {
                    let shown_key: Map<String, Value> = keys
                        .iter()
                        .zip(&key)
                        .filter_map(|(k, v)| v.map(|v| (k.clone(), v.clone())))
                        .collect();
                    causes.push(Cause::new(
                        "FieldValueDuplicate",
                        format!("{path}[{i}]"),
                        format!("Duplicate value: {}", Value::Object(shown_key)),
                    ));
                } else {
                    seen.push(key);
                }
            }
        }
        Some("set") => {
            for (i, item) in items.iter().enumerate() {
                if items[..i].contains(item) {
                    causes.push(Cause::new("FieldValueDuplicate", format!("{path}[{i}]"), format!("Duplicate value: {item}")));
                }
            }
        }
        _ => {}
    }
    if let Some(item_schema) = schema.get("items") {
        for (i, item) in items.iter().enumerate() {
            validate_node(item, item_schema, &format!("{path}[{i}]"), false, causes);
        }
    }
}

fn validate_combinators(value: &Value, schema: &Value, path: &str, causes: &mut Vec<Cause>) {
    let at = if path.is_empty() { "<root>" } else { path };
    let passes = |sub: &Value| {
        let mut c = Vec::new();
        validate_node(value, sub, path, false, &mut c);
        c
    };
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        for sub in all {
            causes.extend(passes(sub));
        }
    }
    if let Some(any) = schema.get("anyOf").and_then(Value::as_array)
        && !any.is_empty() && any.iter().all(|sub| !passes(sub).is_empty()) {
            causes.push(Cause::new(
                "FieldValueInvalid",
                at,
                format!("Invalid value: {}: {at} in body must match at least one schema in anyOf", shown(value)),
            ));
        }
    if let Some(one) = schema.get("oneOf").and_then(Value::as_array) {
        let matching = one.iter().filter(|sub| passes(sub).is_empty()).count();
        if matching != 1 {
            causes.push(Cause::new(
                "FieldValueInvalid",
                at,
                format!("Invalid value: {}: {at} in body must match exactly one schema in oneOf", shown(value)),
            ));
        }
    }
    if let Some(not) = schema.get("not")
        && passes(not).is_empty() {
            causes.push(Cause::new(
                "FieldValueInvalid",
                at,
                format!("Invalid value: {}: {at} in body must not match the schema in not", shown(value)),
            ));
        }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn session_schema() -> Value {
        let crd: Value = serde_yaml::from_str(&wa_api::crd::crd_yaml()).unwrap();
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
    }

    fn admit(obj: Value) -> (Value, Vec<String>, Vec<(String, String)>) {
        let schema = session_schema();
        let mut obj = obj;
        let unknown = prune(&mut obj, &schema);
        apply_defaults(&mut obj, &schema);
        let causes = validate(&obj, &schema).into_iter().map(|c| (c.field, c.message)).collect();
        (obj, unknown, causes)
    }

    #[test]
    fn defaults_fill_the_session_spec() {
        let (obj, unknown, causes) = admit(json!({"apiVersion": "wa-operator.dev/v1alpha1", "kind": "WhatsAppSession",
            "metadata": {"name": "a"}, "spec": {"engine": "sandbox"}}));
        assert!(unknown.is_empty() && causes.is_empty(), "{unknown:?} {causes:?}");
        assert_eq!(obj["spec"]["rateLimit"], json!({"burst": 5, "messagesPerMinute": 30}));
        assert_eq!(obj["spec"]["storage"], json!({"retainOnDelete": true, "size": "256Mi"}));
        assert_eq!(obj["spec"]["suspend"], json!(false));
        assert_eq!(obj["metadata"], json!({"name": "a"}));
    }

    #[test]
    fn validation_cases() {
        let cases: Vec<(Value, &str, &str)> = vec![
            (json!({"phoneNumber": "555"}), "spec.phoneNumber", "Invalid value: \"555\": spec.phoneNumber in body should match '^\\+[1-9][0-9]{6,14}$'"),
            (json!({"engine": "telegram"}), "spec.engine", "Unsupported value: \"telegram\": supported values: \"whatsapp\", \"sandbox\""),
            (json!({"rateLimit": {"burst": 0}}), "spec.rateLimit.burst", "Invalid value: 0: spec.rateLimit.burst in body should be greater than or equal to 1"),
            (json!({"rateLimit": {"messagesPerMinute": 6001}}), "spec.rateLimit.messagesPerMinute", "Invalid value: 6001: spec.rateLimit.messagesPerMinute in body should be less than or equal to 6000"),
            (json!({"suspend": "yes"}), "spec.suspend", "Invalid value: \"string\": spec.suspend in body must be of type boolean: \"string\""),
            (json!({"webhooks": [{"events": ["message"]}]}), "spec.webhooks[0].url", "Required value"),
            (json!({"webhooks": [{"url": "ftp://x"}]}), "spec.webhooks[0].url", "Invalid value: \"ftp://x\": spec.webhooks[0].url in body should match '^https?://[^\\s/$.?#][^\\s]*$'"),
        ];
        for (spec, field, message) in cases {
            let (_, _, causes) = admit(json!({"metadata": {"name": "a"}, "spec": spec}));
            assert_eq!(causes, vec![(field.to_owned(), message.to_owned())], "{spec}");
        }
    }

    #[test]
    fn unknown_fields_are_pruned_and_reported() {
        let (obj, unknown, causes) = admit(json!({"metadata": {"name": "a"}, "spec": {"engin": "sandbox", "storage": {"sise": "1Gi"}}, "extra": 1}));
        assert_eq!(unknown, ["extra", "spec.engin", "spec.storage.sise"]);
        assert!(causes.is_empty());
        assert_eq!(obj["spec"]["engine"], "whatsapp");
        assert!(obj.get("extra").is_none());
    }

    #[test]
    fn null_is_dropped_then_defaulted_unless_nullable() {
        let (obj, _, causes) = admit(json!({"metadata": {"name": "a"}, "spec": {"engine": null, "phoneNumber": null}}));
        assert!(causes.is_empty(), "{causes:?}");
        assert_eq!(obj["spec"]["engine"], "whatsapp");
        assert_eq!(obj["spec"]["phoneNumber"], Value::Null, "phoneNumber is nullable and stays null");
    }

    #[test]
    fn list_map_keys_must_be_unique() {
        let (_, _, causes) = admit(json!({"metadata": {"name": "a"}, "spec": {},
            "status": {"conditions": [
                {"type": "Ready", "status": "True", "reason": "R", "message": "", "lastTransitionTime": "2025-01-01T00:00:00Z"},
                {"type": "Ready", "status": "False", "reason": "R", "message": "", "lastTransitionTime": "2025-01-01T00:00:00Z"}]}}));
        assert_eq!(causes, vec![("status.conditions[1]".to_owned(), "Duplicate value: {\"type\":\"Ready\"}".to_owned())]);
    }

    #[test]
    fn combinators() {
        let schema = json!({"type": "object", "properties": {"x": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
            "y": {"oneOf": [{"minimum": 0}, {"maximum": 10}]}, "z": {"not": {"enum": ["bad"]}}}});
        assert!(validate(&json!({"x": 1, "y": -5, "z": "ok"}), &schema).is_empty());
        let fields: Vec<String> = validate(&json!({"x": true, "y": 5, "z": "bad"}), &schema).into_iter().map(|c| c.field).collect();
        assert_eq!(fields, ["x", "y", "z"]);
    }
}
