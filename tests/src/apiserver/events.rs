//! `events.k8s.io/v1` Events are the same objects as `v1` Events in another shape: kube-rs's
//! `Recorder` writes the new API, `kubectl describe` reads the old one. Stored as `v1`.

use serde_json::{Map, Value};

/// (core field, events.k8s.io/v1 field)
const FIELDS: &[(&str, &str)] = &[
    ("metadata", "metadata"),
    ("eventTime", "eventTime"),
    ("series", "series"),
    ("reportingComponent", "reportingController"),
    ("reportingInstance", "reportingInstance"),
    ("action", "action"),
    ("reason", "reason"),
    ("involvedObject", "regarding"),
    ("related", "related"),
    ("message", "note"),
    ("type", "type"),
    ("source", "deprecatedSource"),
    ("firstTimestamp", "deprecatedFirstTimestamp"),
    ("lastTimestamp", "deprecatedLastTimestamp"),
    ("count", "deprecatedCount"),
];

fn convert(obj: &Value, api_version: &str, to_v1: bool) -> Value {
    let mut out = Map::new();
    out.insert("apiVersion".into(), Value::String(api_version.into()));
    out.insert("kind".into(), Value::String("Event".into()));
    for (core, v1) in FIELDS {
        let (from, to) = if to_v1 { (core, v1) } else { (v1, core) };
        if let Some(value) = obj.get(*from).filter(|v| !v.is_null()) {
            out.insert((*to).to_owned(), value.clone());
        }
    }
    Value::Object(out)
}

pub fn core_to_v1(obj: &Value) -> Value {
    convert(obj, "events.k8s.io/v1", true)
}

pub fn v1_to_core(obj: &Value) -> Value {
    convert(obj, "v1", false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trip() {
        let v1 = json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e"},
            "eventTime": "2025-01-01T00:00:00.000000Z", "reportingController": "wa-operator", "reportingInstance": "op-1",
            "action": "Reconcile", "reason": "Created", "regarding": {"kind": "WhatsAppSession", "name": "a"},
            "note": "created pod", "type": "Normal", "series": {"count": 2, "lastObservedTime": "2025-01-01T00:00:01.000000Z"}});
        let core = v1_to_core(&v1);
        assert_eq!(core["involvedObject"]["name"], "a");
        assert_eq!(core["message"], "created pod");
        assert_eq!(core["reportingComponent"], "wa-operator");
        assert_eq!(core["apiVersion"], "v1");
        assert_eq!(core_to_v1(&core), v1);
    }
}
