//! Discovery (`/api`, `/apis`, resource lists), `/version`, and the small OpenAPI v3 documents
//! kubectl reads to learn that the server validates fields itself (`fieldValidation`).
//!
//! The OpenAPI documents carry the PATCH operations with their group-version-kind and
//! parameters, and the CRD schemas; built-in kinds have no schemas here, so kubectl falls back
//! to its compiled-in types for strategic merge patches, as it does against any server that
//! does not publish strategic-merge metadata.

use std::hash::{Hash, Hasher};

use serde_json::{Value, json};

use super::catalog::{BuiltinKind, Catalog, ResourceType};

pub const KUBERNETES_MINOR: &str = "33";

pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": KUBERNETES_MINOR,
        "gitVersion": format!("v1.{KUBERNETES_MINOR}.0-wa-test-control-plane"),
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.24.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

pub fn api_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    })
}

fn group_doc(catalog: &Catalog, group: &str) -> Value {
    let versions: Vec<Value> = catalog
        .group_versions(group)
        .iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    let preferred = versions.first().cloned().unwrap_or(Value::Null);
    json!({"name": group, "versions": versions, "preferredVersion": preferred})
}

pub fn api_group_list(catalog: &Catalog) -> Value {
    let groups: Vec<Value> = catalog.groups().iter().map(|g| group_doc(catalog, g)).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

pub fn api_group(catalog: &Catalog, group: &str) -> Option<Value> {
    if !catalog.groups().iter().any(|g| g == group) {
        return None;
    }
    let mut doc = group_doc(catalog, group);
    doc["kind"] = json!("APIGroup");
    doc["apiVersion"] = json!("v1");
    Some(doc)
}

const VERBS: &[&str] = &["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"];

fn storage_version_hash(rt: &ResourceType) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (&rt.group, &rt.version, &rt.kind).hash(&mut h);
    let bytes = h.finish().to_be_bytes();
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn api_resource_list(catalog: &Catalog, group: &str, version: &str) -> Option<Value> {
    let mut resources = Vec::new();
    for rt in catalog.in_group_version(group, version) {
        let mut entry = json!({
            "name": rt.resource,
            "singularName": rt.singular,
            "namespaced": rt.namespaced,
            "kind": rt.kind,
            "verbs": VERBS,
            "storageVersionHash": storage_version_hash(rt),
        });
        if !rt.short_names.is_empty() {
            entry["shortNames"] = json!(rt.short_names);
        }
        if !rt.categories.is_empty() {
            entry["categories"] = json!(rt.categories);
        }
        resources.push(entry);
        for (sub, verbs) in rt.subresources() {
            let kind = match sub {
                "binding" => "Binding",
                "scale" => "Scale",
                _ => rt.kind.as_str(),
            };
            let mut entry = json!({
                "name": format!("{}/{sub}", rt.resource),
                "singularName": "",
                "namespaced": rt.namespaced,
                "kind": kind,
                "verbs": verbs,
            });
            // kubectl scale finds the Scale type's group version here.
            if sub == "scale" {
                entry["group"] = json!("autoscaling");
                entry["version"] = json!("v1");
            }
            resources.push(entry);
        }
    }
    if resources.is_empty() {
        return None;
    }
    let group_version = if group.is_empty() { version.to_owned() } else { format!("{group}/{version}") };
    Some(json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources}))
}

/// `/openapi/v3`: where each group version's document is.
pub fn openapi_index(catalog: &Catalog) -> Value {
    let mut paths = serde_json::Map::new();
    let mut gvs: Vec<(String, String)> = Vec::new();
    for rt in catalog.all() {
        let gv = (rt.group.clone(), rt.version.clone());
        if !gvs.contains(&gv) {
            gvs.push(gv);
        }
    }
    for (group, version) in gvs {
        let path = openapi_path(&group, &version);
        let hash = openapi_hash(&openapi_document(catalog, &group, &version));
        paths.insert(path.clone(), json!({"serverRelativeURL": format!("/openapi/v3/{path}?hash={hash}")}));
    }
    json!({"paths": paths})
}

fn openapi_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

fn openapi_hash(doc: &Value) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    doc.to_string().hash(&mut h);
    format!("{:016X}", h.finish())
}

/// The schema name Kubernetes gives a kind: the group reversed, then version and kind.
fn schema_name(rt: &ResourceType) -> String {
    let group: Vec<&str> = if rt.group.is_empty() { vec!["io", "k8s", "api", "core"] } else { rt.group.split('.').rev().collect() };
    format!("{}.{}.{}", group.join("."), rt.version, rt.kind)
}

/// The OpenAPI v3 document of one group version.
pub fn openapi_document(catalog: &Catalog, group: &str, version: &str) -> Value {
    let mut paths = serde_json::Map::new();
    let mut schemas = serde_json::Map::new();
    for rt in catalog.in_group_version(group, version) {
        let prefix = if group.is_empty() { format!("/api/{version}") } else { format!("/apis/{group}/{version}") };
        let item = if rt.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}/{{name}}", rt.resource)
        } else {
            format!("{prefix}/{}/{{name}}", rt.resource)
        };
        let gvk = json!({"group": rt.group, "version": rt.version, "kind": rt.kind});
        let query = |name: &str| json!({"name": name, "in": "query", "schema": {"type": "string", "uniqueItems": true}});
        let body = json!({"schema": {"type": "object"}});
        let patch = json!({
            "operationId": format!("patch{}", rt.kind),
            "x-kubernetes-action": "patch",
            "x-kubernetes-group-version-kind": gvk,
            "parameters": [query("dryRun"), query("fieldManager"), query("fieldValidation"), query("force")],
            "requestBody": {"content": {
                "application/json-patch+json": body,
                "application/merge-patch+json": body,
                "application/apply-patch+yaml": body,
            }},
            "responses": {"200": {"description": "OK"}},
        });
        let mut ops = json!({"patch": patch});
        if rt.builtin() == Some(BuiltinKind::EventV1) || rt.custom().is_none() {
            ops["get"] = json!({"x-kubernetes-action": "get", "x-kubernetes-group-version-kind": gvk, "responses": {"200": {"description": "OK"}}});
        }
        paths.insert(item, ops);
        if let Some(custom) = rt.custom() {
            let mut schema = custom.schema.clone().unwrap_or_else(|| json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}));
            schema["x-kubernetes-group-version-kind"] = json!([gvk]);
            if let Some(props) = schema.get_mut("properties").and_then(Value::as_object_mut) {
                props.entry("apiVersion").or_insert(json!({"type": "string", "description": "APIVersion defines the versioned schema of this representation of an object."}));
                props.entry("kind").or_insert(json!({"type": "string", "description": "Kind is a string value representing the REST resource this object represents."}));
                props.entry("metadata").or_insert(json!({"type": "object", "description": "Standard object's metadata."}));
            }
            schemas.insert(schema_name(rt), schema);
        }
    }
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": format!("v1.{KUBERNETES_MINOR}.0")},
        "paths": paths,
        "components": {"schemas": schemas},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_resources_list_subresources() {
        let catalog = Catalog::new();
        let list = api_resource_list(&catalog, "", "v1").unwrap();
        let names: Vec<&str> = list["resources"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
        for expected in ["pods", "pods/status", "pods/binding", "pods/log", "secrets", "persistentvolumeclaims/status", "namespaces/finalize", "events"] {
            assert!(names.contains(&expected), "{expected} missing from {names:?}");
        }
        assert!(api_resource_list(&catalog, "nope", "v1").is_none());
    }

    #[test]
    fn groups_and_preferred_versions() {
        let catalog = Catalog::new();
        let groups = api_group_list(&catalog);
        let names: Vec<&str> = groups["groups"].as_array().unwrap().iter().map(|g| g["name"].as_str().unwrap()).collect();
        assert!(names.contains(&"coordination.k8s.io") && names.contains(&"events.k8s.io"));
        assert_eq!(api_group(&catalog, "coordination.k8s.io").unwrap()["preferredVersion"]["version"], "v1");
    }

    #[test]
    fn openapi_advertises_field_validation_and_crd_schemas() {
        let mut catalog = Catalog::new();
        let crd: Value = serde_yaml::from_str(&wa_api::crd::crd_yaml()).unwrap();
        catalog.register_crd(&crd).unwrap();
        let index = openapi_index(&catalog);
        let url = index["paths"]["apis/wa-operator.dev/v1alpha1"]["serverRelativeURL"].as_str().unwrap();
        assert!(url.starts_with("/openapi/v3/apis/wa-operator.dev/v1alpha1?hash="));
        let doc = openapi_document(&catalog, "wa-operator.dev", "v1alpha1");
        let patch = &doc["paths"]["/apis/wa-operator.dev/v1alpha1/namespaces/{namespace}/whatsappsessions/{name}"]["patch"];
        assert_eq!(patch["x-kubernetes-group-version-kind"]["kind"], "WhatsAppSession");
        assert!(patch["parameters"].as_array().unwrap().iter().any(|p| p["name"] == "fieldValidation"));
        assert!(doc["components"]["schemas"]["dev.wa-operator.v1alpha1.WhatsAppSession"].is_object());
    }
}
