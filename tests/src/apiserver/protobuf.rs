//! Decoding of `application/vnd.kubernetes.protobuf` request bodies for the kinds kubectl's
//! generators send that way (`kubectl create namespace|secret|configmap|serviceaccount|role|
//! rolebinding|clusterrole|clusterrolebinding`). kubectl's typed clients write protobuf and
//! do not fall back to JSON, so without this those commands fail.
//!
//! Field numbers are those of Kubernetes' `generated.proto` files. Responses are always JSON
//! (clients accept it); other kinds in protobuf are refused with 415.

use base64::Engine as _;
use serde_json::{Map, Value, json};

/// The type of a field.
#[derive(Clone, Copy)]
enum Ty {
    Str,
    /// `bytes`, shown as base64 in JSON.
    Bytes,
    Bool,
    Int,
    Msg(&'static [Field]),
    /// `map<string, string>`
    MapStr,
    /// `map<string, bytes>`, values base64 in JSON.
    MapBytes,
    /// `meta.v1.Time`, an RFC 3339 string in JSON.
    Time,
    /// `meta.v1.FieldsV1`: raw JSON.
    FieldsV1,
}

#[derive(Clone, Copy)]
struct Field {
    num: u64,
    name: &'static str,
    ty: Ty,
    repeated: bool,
}

const fn f(num: u64, name: &'static str, ty: Ty) -> Field {
    Field { num, name, ty, repeated: false }
}

const fn rep(num: u64, name: &'static str, ty: Ty) -> Field {
    Field { num, name, ty, repeated: true }
}

const OWNER_REFERENCE: &[Field] = &[
    f(5, "apiVersion", Ty::Str),
    f(1, "kind", Ty::Str),
    f(3, "name", Ty::Str),
    f(4, "uid", Ty::Str),
    f(6, "controller", Ty::Bool),
    f(7, "blockOwnerDeletion", Ty::Bool),
];

const MANAGED_FIELDS_ENTRY: &[Field] = &[
    f(1, "manager", Ty::Str),
    f(2, "operation", Ty::Str),
    f(3, "apiVersion", Ty::Str),
    f(4, "time", Ty::Time),
    f(6, "fieldsType", Ty::Str),
    f(7, "fieldsV1", Ty::FieldsV1),
    f(8, "subresource", Ty::Str),
];

const OBJECT_META: &[Field] = &[
    f(1, "name", Ty::Str),
    f(2, "generateName", Ty::Str),
    f(3, "namespace", Ty::Str),
    f(4, "selfLink", Ty::Str),
    f(5, "uid", Ty::Str),
    f(6, "resourceVersion", Ty::Str),
    f(7, "generation", Ty::Int),
    f(8, "creationTimestamp", Ty::Time),
    f(9, "deletionTimestamp", Ty::Time),
    f(10, "deletionGracePeriodSeconds", Ty::Int),
    f(11, "labels", Ty::MapStr),
    f(12, "annotations", Ty::MapStr),
    rep(13, "ownerReferences", Ty::Msg(OWNER_REFERENCE)),
    rep(14, "finalizers", Ty::Str),
    rep(17, "managedFields", Ty::Msg(MANAGED_FIELDS_ENTRY)),
];

const NAMESPACE: &[Field] = &[
    f(1, "metadata", Ty::Msg(OBJECT_META)),
    f(2, "spec", Ty::Msg(&[rep(1, "finalizers", Ty::Str)])),
];

const SECRET: &[Field] = &[
    f(1, "metadata", Ty::Msg(OBJECT_META)),
    f(2, "data", Ty::MapBytes),
    f(3, "type", Ty::Str),
    f(4, "stringData", Ty::MapStr),
    f(5, "immutable", Ty::Bool),
];

const CONFIG_MAP: &[Field] = &[
    f(1, "metadata", Ty::Msg(OBJECT_META)),
    f(2, "data", Ty::MapStr),
    f(3, "binaryData", Ty::MapBytes),
    f(4, "immutable", Ty::Bool),
];

const OBJECT_REFERENCE: &[Field] = &[
    f(1, "kind", Ty::Str),
    f(2, "namespace", Ty::Str),
    f(3, "name", Ty::Str),
    f(4, "uid", Ty::Str),
    f(5, "apiVersion", Ty::Str),
    f(6, "resourceVersion", Ty::Str),
    f(7, "fieldPath", Ty::Str),
];

const SERVICE_ACCOUNT: &[Field] = &[
    f(1, "metadata", Ty::Msg(OBJECT_META)),
    rep(2, "secrets", Ty::Msg(OBJECT_REFERENCE)),
    rep(3, "imagePullSecrets", Ty::Msg(&[f(1, "name", Ty::Str)])),
    f(4, "automountServiceAccountToken", Ty::Bool),
];

const POLICY_RULE: &[Field] = &[
    rep(1, "verbs", Ty::Str),
    rep(2, "apiGroups", Ty::Str),
    rep(3, "resources", Ty::Str),
    rep(4, "resourceNames", Ty::Str),
    rep(5, "nonResourceURLs", Ty::Str),
];

const LABEL_SELECTOR: &[Field] = &[
    f(1, "matchLabels", Ty::MapStr),
    rep(2, "matchExpressions", Ty::Msg(&[f(1, "key", Ty::Str), f(2, "operator", Ty::Str), rep(3, "values", Ty::Str)])),
];

const ROLE: &[Field] = &[
    f(1, "metadata", Ty::Msg(OBJECT_META)),
    rep(2, "rules", Ty::Msg(POLICY_RULE)),
    f(3, "aggregationRule", Ty::Msg(&[rep(1, "clusterRoleSelectors", Ty::Msg(LABEL_SELECTOR))])),
];

const BINDING: &[Field] = &[
    f(1, "metadata", Ty::Msg(OBJECT_META)),
    rep(2, "subjects", Ty::Msg(&[f(1, "kind", Ty::Str), f(2, "apiGroup", Ty::Str), f(3, "name", Ty::Str), f(4, "namespace", Ty::Str)])),
    f(3, "roleRef", Ty::Msg(&[f(1, "apiGroup", Ty::Str), f(2, "kind", Ty::Str), f(3, "name", Ty::Str)])),
];

const TYPE_META: &[Field] = &[f(1, "apiVersion", Ty::Str), f(2, "kind", Ty::Str)];
const UNKNOWN: &[Field] = &[
    f(1, "typeMeta", Ty::Msg(TYPE_META)),
    f(2, "raw", Ty::Bytes),
    f(3, "contentEncoding", Ty::Str),
    f(4, "contentType", Ty::Str),
];

fn schema_of(api_version: &str, kind: &str) -> Option<&'static [Field]> {
    Some(match (api_version, kind) {
        ("v1", "Namespace") => NAMESPACE,
        ("v1", "Secret") => SECRET,
        ("v1", "ConfigMap") => CONFIG_MAP,
        ("v1", "ServiceAccount") => SERVICE_ACCOUNT,
        ("rbac.authorization.k8s.io/v1", "Role" | "ClusterRole") => ROLE,
        ("rbac.authorization.k8s.io/v1", "RoleBinding" | "ClusterRoleBinding") => BINDING,
        _ => return None,
    })
}

/// Magic prefix of Kubernetes' protobuf envelope.
const MAGIC: &[u8] = b"k8s\0";

/// A protobuf body as the JSON object it encodes.
pub fn decode(body: &[u8]) -> Result<Value, String> {
    let envelope = body.strip_prefix(MAGIC).ok_or("the body does not start with the Kubernetes protobuf prefix")?;
    let unknown = message(envelope, UNKNOWN)?;
    let api_version = unknown["typeMeta"]["apiVersion"].as_str().unwrap_or("").to_owned();
    let kind = unknown["typeMeta"]["kind"].as_str().unwrap_or("").to_owned();
    if unknown["contentEncoding"].as_str().is_some_and(|e| !e.is_empty()) {
        return Err("compressed protobuf bodies are not supported".into());
    }
    let schema = schema_of(&api_version, &kind).ok_or_else(|| {
        format!("protobuf bodies are supported for Namespace, Secret, ConfigMap, ServiceAccount and RBAC kinds only, not {api_version} {kind}; send JSON")
    })?;
    let raw = unknown["raw"].as_str().unwrap_or("");
    let raw = base64::engine::general_purpose::STANDARD.decode(raw).map_err(|e| e.to_string())?;
    let mut obj = message(&raw, schema)?;
    obj["apiVersion"] = json!(api_version);
    obj["kind"] = json!(kind);
    Ok(obj)
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.buf.get(self.pos).ok_or("truncated varint")?;
            self.pos += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("varint too long".into())
    }

    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let len = usize::try_from(self.varint()?).map_err(|_| "length too large")?;
        let end = self.pos.checked_add(len).filter(|e| *e <= self.buf.len()).ok_or("truncated field")?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn skip(&mut self, wire: u64) -> Result<(), String> {
        match wire {
            0 => self.varint().map(|_| ()),
            1 => self.advance(8),
            2 => self.bytes().map(|_| ()),
            5 => self.advance(4),
            other => Err(format!("unsupported wire type {other}")),
        }
    }

    fn advance(&mut self, n: usize) -> Result<(), String> {
        if self.pos + n > self.buf.len() {
            return Err("truncated field".into());
        }
        self.pos += n;
        Ok(())
    }
}

fn utf8(bytes: &[u8]) -> Result<String, String> {
    String::from_utf8(bytes.to_vec()).map_err(|_| "a string field is not UTF-8".to_owned())
}

fn map_entry(bytes: &[u8], bytes_values: bool) -> Result<(String, Value), String> {
    let mut r = Reader { buf: bytes, pos: 0 };
    let (mut key, mut value) = (String::new(), Value::String(String::new()));
    while r.pos < r.buf.len() {
        let tag = r.varint()?;
        match (tag >> 3, tag & 7) {
            (1, 2) => key = utf8(r.bytes()?)?,
            (2, 2) => {
                let v = r.bytes()?;
                value = if bytes_values {
                    json!(base64::engine::general_purpose::STANDARD.encode(v))
                } else {
                    json!(utf8(v)?)
                };
            }
            (_, wire) => r.skip(wire)?,
        }
    }
    Ok((key, value))
}

fn time(bytes: &[u8]) -> Result<Value, String> {
    // Go writes the zero time as an empty message.
    if bytes.is_empty() {
        return Ok(Value::Null);
    }
    let t = message(bytes, &[f(1, "seconds", Ty::Int), f(2, "nanos", Ty::Int)])?;
    let seconds = t["seconds"].as_i64().unwrap_or(0);
    let stamp = chrono::DateTime::from_timestamp(seconds, 0).ok_or("time out of range")?;
    Ok(json!(stamp.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)))
}

fn message(bytes: &[u8], schema: &[Field]) -> Result<Value, String> {
    let mut r = Reader { buf: bytes, pos: 0 };
    let mut out = Map::new();
    while r.pos < r.buf.len() {
        let tag = r.varint()?;
        let (num, wire) = (tag >> 3, tag & 7);
        let Some(field) = schema.iter().find(|f| f.num == num) else {
            r.skip(wire)?;
            continue;
        };
        let value = match (field.ty, wire) {
            (Ty::Bool, 0) => json!(r.varint()? != 0),
            (Ty::Int, 0) => json!(r.varint()? as i64),
            (Ty::Str, 2) => json!(utf8(r.bytes()?)?),
            (Ty::Bytes, 2) => json!(base64::engine::general_purpose::STANDARD.encode(r.bytes()?)),
            (Ty::Msg(inner), 2) => message(r.bytes()?, inner)?,
            (Ty::Time, 2) => time(r.bytes()?)?,
            (Ty::FieldsV1, 2) => {
                let raw = message(r.bytes()?, &[f(1, "raw", Ty::Bytes)])?;
                let raw = base64::engine::general_purpose::STANDARD.decode(raw["raw"].as_str().unwrap_or("")).map_err(|e| e.to_string())?;
                serde_json::from_slice(&raw).map_err(|e| format!("fieldsV1 is not JSON: {e}"))?
            }
            (Ty::MapStr | Ty::MapBytes, 2) => {
                let (k, v) = map_entry(r.bytes()?, matches!(field.ty, Ty::MapBytes))?;
                let map = out.entry(field.name).or_insert_with(|| json!({}));
                if let Some(map) = map.as_object_mut() {
                    map.insert(k, v);
                }
                continue;
            }
            (_, wire) => return Err(format!("field {} has wire type {wire}, which does not fit its type", field.name)),
        };
        if field.repeated {
            let list = out.entry(field.name).or_insert_with(|| json!([]));
            if let Some(list) = list.as_array_mut() {
                list.push(value);
            }
        } else {
            out.insert(field.name.to_owned(), value);
        }
    }
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal protobuf writer, to build what kubectl sends.
    #[derive(Default)]
    struct W(Vec<u8>);

    impl W {
        fn varint(&mut self, mut v: u64) {
            loop {
                let byte = (v & 0x7f) as u8;
                v >>= 7;
                if v == 0 {
                    self.0.push(byte);
                    return;
                }
                self.0.push(byte | 0x80);
            }
        }
        fn bytes(mut self, num: u64, b: &[u8]) -> Self {
            self.varint(num << 3 | 2);
            self.varint(b.len() as u64);
            self.0.extend_from_slice(b);
            self
        }
        fn str(self, num: u64, s: &str) -> Self {
            self.bytes(num, s.as_bytes())
        }
        fn msg(self, num: u64, m: W) -> Self {
            self.bytes(num, &m.0)
        }
        fn bool(mut self, num: u64, b: bool) -> Self {
            self.varint(num << 3);
            self.varint(u64::from(b));
            self
        }
        fn entry(self, num: u64, k: &str, v: &[u8]) -> Self {
            self.msg(num, W::default().str(1, k).bytes(2, v))
        }
    }

    fn envelope(api_version: &str, kind: &str, raw: W) -> Vec<u8> {
        let unknown = W::default().msg(1, W::default().str(1, api_version).str(2, kind)).bytes(2, &raw.0);
        [MAGIC, &unknown.0].concat()
    }

    #[test]
    fn decodes_what_kubectl_create_secret_sends() {
        let meta = W::default()
            .str(1, "hook")
            .str(3, "default")
            .entry(11, "app", b"wa")
            .msg(8, W::default())
            .msg(13, W::default().str(5, "v1").str(1, "ConfigMap").str(3, "owner").str(4, "u-1").bool(6, true));
        let secret = W::default().msg(1, meta).entry(2, "key", b"s3cret").str(3, "Opaque").bool(5, true);
        let obj = decode(&envelope("v1", "Secret", secret)).unwrap();
        assert_eq!(
            obj,
            json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "immutable": true,
                "data": {"key": "czNjcmV0"},
                "metadata": {"name": "hook", "namespace": "default", "labels": {"app": "wa"},
                    "creationTimestamp": null,
                    "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": "u-1", "controller": true}]}})
        );
    }

    #[test]
    fn decodes_namespaces_and_role_bindings() {
        let ns = W::default().msg(1, W::default().str(1, "team")).msg(2, W::default().str(1, "kubernetes"));
        let obj = decode(&envelope("v1", "Namespace", ns)).unwrap();
        assert_eq!(obj["metadata"]["name"], "team");
        assert_eq!(obj["spec"]["finalizers"], json!(["kubernetes"]));
        let binding = W::default()
            .msg(1, W::default().str(1, "rb"))
            .msg(2, W::default().str(1, "ServiceAccount").str(3, "op").str(4, "wa"))
            .msg(3, W::default().str(1, "rbac.authorization.k8s.io").str(2, "Role").str(3, "r"));
        let obj = decode(&envelope("rbac.authorization.k8s.io/v1", "RoleBinding", binding)).unwrap();
        assert_eq!(obj["subjects"], json!([{"kind": "ServiceAccount", "name": "op", "namespace": "wa"}]));
        assert_eq!(obj["roleRef"]["name"], "r");
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        assert!(decode(b"{}").is_err());
        let err = decode(&envelope("apps/v1", "Deployment", W::default())).unwrap_err();
        assert!(err.contains("not apps/v1 Deployment"), "{err}");
        let mut truncated = envelope("v1", "Secret", W::default().str(3, "Opaque"));
        truncated.pop();
        assert!(decode(&truncated).is_err());
    }
}
