//! A fake Kubernetes API for unit tests: kube's `Client::new` over a `tower-test` mock
//! service, answered by a small in-memory object store with the semantics the reconciler
//! relies on (get/create/replace/delete with 404/409, UID preconditions, finalizers and
//! `deletionTimestamp`, server-side apply for a single field manager, merge and JSON
//! patches, the status subresource, lists, watches that stay quiet). Every request is
//! recorded so tests assert what was written, and that it is allowed by `rbac::RULES`.
//!
//! The end-to-end proof against a real API server semantics is the test control plane in
//! `tests/` (wa-tests); this is for fast, exact reconcile tests.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};

/// (API group, resource, namespace, name)
type Key = (String, String, String, String);

#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    /// RBAC verb: get, list, watch, create, update, patch, delete.
    pub verb: &'static str,
    pub group: String,
    /// Resource, with `/status` for the subresource.
    pub resource: String,
    pub name: Option<String>,
    pub content_type: Option<String>,
    pub query: String,
    pub body: Option<Value>,
}

impl Call {
    /// `"patch pods/wa-s"`: compact form for asserting sequences.
    pub fn short(&self) -> String {
        format!(
            "{} {}/{}",
            self.verb,
            self.resource,
            self.name.as_deref().unwrap_or("")
        )
    }
}

#[derive(Debug, Clone)]
struct Failure {
    verb: &'static str,
    resource: String,
    code: u16,
    reason: String,
    times: usize,
}

#[derive(Default)]
struct State {
    objects: BTreeMap<Key, Value>,
    calls: Vec<Call>,
    rv: u64,
    uid: u64,
    /// Pods get a deletionTimestamp on delete (the kubelet stops them later) instead of
    /// vanishing at once.
    graceful_pods: bool,
    failures: Vec<Failure>,
    /// Watch requests are held open and never answered (a quiet watch).
    held: Vec<tower_test::mock::SendResponse<Response<Body>>>,
}

#[derive(Clone)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

fn resource_of(kind: &str) -> (&'static str, &'static str) {
    match kind {
        "Pod" => ("", "pods"),
        "PersistentVolumeClaim" => ("", "persistentvolumeclaims"),
        "Secret" => ("", "secrets"),
        "WhatsAppSession" => ("wa-operator.dev", "whatsappsessions"),
        "Lease" => ("coordination.k8s.io", "leases"),
        "Event" => ("events.k8s.io", "events"),
        other => panic!("fake API does not know kind {other}"),
    }
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn respond(code: u16, body: &Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap())
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap()
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// Server-side apply for one field manager: the applied configuration replaces what that
/// manager set before (top-level fields, labels/annotations merged, ownerReferences as given).
fn apply(existing: &mut Value, applied: &Value) {
    for (k, v) in applied.as_object().unwrap() {
        if k == "metadata" {
            let meta = existing["metadata"].as_object_mut().unwrap();
            for field in ["labels", "annotations"] {
                if let Some(m) = v.get(field).and_then(Value::as_object) {
                    let target = meta.entry(field).or_insert(json!({}));
                    for (lk, lv) in m {
                        target[lk] = lv.clone();
                    }
                }
            }
            match v.get("ownerReferences") {
                Some(o) => {
                    meta.insert("ownerReferences".into(), o.clone());
                }
                None => {
                    meta.remove("ownerReferences");
                }
            }
        } else if k != "apiVersion" && k != "kind" {
            existing[k] = v.clone();
        }
    }
}

fn json_patch(target: &mut Value, ops: &Value) -> Result<(), String> {
    for op in ops.as_array().ok_or("not a JSON patch")? {
        let path = op["path"].as_str().ok_or("no path")?;
        let (parent_path, last) = path.rsplit_once('/').ok_or("bad path")?;
        let parent = target
            .pointer_mut(parent_path)
            .ok_or_else(|| format!("no {parent_path}"))?;
        match op["op"].as_str() {
            Some("test") => {
                let got = parent
                    .get(last)
                    .or_else(|| last.parse::<usize>().ok().and_then(|i| parent.get(i)));
                if got.unwrap_or(&Value::Null) != &op["value"] {
                    return Err(format!("test {path} failed"));
                }
            }
            Some("add") => match parent {
                Value::Array(a) if last == "-" => a.push(op["value"].clone()),
                Value::Array(a) => {
                    a.insert(last.parse().map_err(|_| "bad index")?, op["value"].clone())
                }
                Value::Object(o) => {
                    o.insert(last.to_owned(), op["value"].clone());
                }
                _ => return Err("add into a scalar".into()),
            },
            Some("remove") => match parent {
                Value::Array(a) => {
                    a.remove(last.parse().map_err(|_| "bad index")?);
                }
                Value::Object(o) => {
                    o.remove(last);
                }
                _ => return Err("remove from a scalar".into()),
            },
            other => return Err(format!("op {other:?} not supported")),
        }
    }
    Ok(())
}

impl FakeApi {
    /// A client talking to a new, empty fake API. Needs a tokio runtime.
    pub fn start() -> (Client, FakeApi) {
        let fake = FakeApi {
            state: Arc::new(Mutex::new(State::default())),
        };
        (fake.client(), fake)
    }

    /// Another client of this fake (same objects, same call log).
    pub fn client(&self) -> Client {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server = self.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let is_watch = req
                    .uri()
                    .query()
                    .is_some_and(|q| q.split('&').any(|p| p == "watch=true"));
                let resp = server.handle(req).await;
                match resp {
                    Some(resp) => send.send_response(resp),
                    None if is_watch => server.lock().held.push(send),
                    None => {
                        send.send_response(respond(500, &status_body(500, "InternalError", "fake")))
                    }
                }
            }
        });
        Client::new(svc, "default")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Pods are marked terminating on delete instead of removed (see [`Self::finish_pod_deletion`]).
    pub fn graceful_pod_deletion(&self, on: bool) {
        self.lock().graceful_pods = on;
    }

    /// The next `times` calls of `verb` on `resource` fail with `code`/`reason`.
    pub fn fail(&self, verb: &'static str, resource: &str, code: u16, reason: &str, times: usize) {
        self.lock().failures.push(Failure {
            verb,
            resource: resource.into(),
            code,
            reason: reason.into(),
            times,
        });
    }

    /// Stores an object as given (uid, resourceVersion filled in when missing).
    pub fn put(&self, mut obj: Value) {
        let mut st = self.lock();
        let (group, resource) = resource_of(obj["kind"].as_str().unwrap());
        st.rv += 1;
        st.uid += 1;
        let meta = obj["metadata"].as_object_mut().unwrap();
        meta.entry("uid")
            .or_insert(json!(format!("uid-{}", st.uid)));
        meta.insert("resourceVersion".into(), json!(st.rv.to_string()));
        let ns = meta
            .get("namespace")
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_owned();
        let name = meta["name"].as_str().unwrap().to_owned();
        st.objects
            .insert((group.into(), resource.into(), ns, name), obj);
    }

    pub fn get(&self, resource: &str, ns: &str, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .iter()
            .find(|((_, r, n, m), _)| r == resource && n == ns && m == name)
            .map(|(_, v)| v.clone())
    }

    pub fn get_as<T: serde::de::DeserializeOwned>(
        &self,
        resource: &str,
        ns: &str,
        name: &str,
    ) -> Option<T> {
        self.get(resource, ns, name)
            .map(|v| serde_json::from_value(v).unwrap())
    }

    /// Changes a stored object in place (like another client would); bumps its resourceVersion.
    pub fn edit(&self, resource: &str, ns: &str, name: &str, f: impl FnOnce(&mut Value)) {
        let mut st = self.lock();
        st.rv += 1;
        let rv = st.rv;
        let obj = st
            .objects
            .iter_mut()
            .find(|((_, r, n, m), _)| r == resource && n == ns && m == name)
            .map(|(_, v)| v)
            .unwrap_or_else(|| panic!("no {resource} {ns}/{name}"));
        f(obj);
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
    }

    /// Removes an object outright (someone deleted it, or the kubelet finished deleting a pod).
    pub fn remove(&self, resource: &str, ns: &str, name: &str) -> Option<Value> {
        let mut st = self.lock();
        let key = st
            .objects
            .keys()
            .find(|(_, r, n, m)| r == resource && n == ns && m == name)
            .cloned()?;
        st.objects.remove(&key)
    }

    pub fn finish_pod_deletion(&self, ns: &str, name: &str) {
        self.remove("pods", ns, name).expect("no such pod");
    }

    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// Calls that change something, in order (reads excluded), compact.
    pub fn writes(&self) -> Vec<String> {
        self.calls()
            .iter()
            .filter(|c| !matches!(c.verb, "get" | "list" | "watch"))
            // An apply that creates is recorded as patch and create; keep the patch.
            .filter(|c| {
                !(c.verb == "create"
                    && c.content_type
                        .as_deref()
                        .is_some_and(|t| t.contains("apply-patch")))
            })
            .map(Call::short)
            .collect()
    }

    pub fn clear_calls(&self) {
        self.lock().calls.clear();
    }

    /// `reason` of every Event published, in order: created, or a repeat folded into an
    /// earlier event's series (a patch, which carries the whole event).
    pub fn event_reasons(&self) -> Vec<String> {
        self.calls()
            .iter()
            .filter(|c| c.resource == "events" && matches!(c.verb, "create" | "patch"))
            .map(|c| {
                c.body.as_ref().unwrap()["reason"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    }

    pub fn event_notes(&self, reason: &str) -> Vec<String> {
        self.calls()
            .iter()
            .filter(|c| c.resource == "events" && c.verb == "create")
            .filter_map(|c| {
                let b = c.body.as_ref()?;
                (b["reason"] == reason).then(|| b["note"].as_str().unwrap_or("").to_owned())
            })
            .collect()
    }

    /// Panics unless every recorded call is allowed by `rbac::RULES`.
    pub fn assert_rbac(&self) {
        for c in self.calls() {
            assert!(
                crate::rbac::allows(&c.group, &c.resource, c.verb),
                "{} {}/{} is not in rbac::RULES",
                c.verb,
                if c.group.is_empty() { "core" } else { &c.group },
                c.resource
            );
        }
    }

    async fn handle(&self, req: Request<Body>) -> Option<Response<Body>> {
        let (parts, body) = req.into_parts();
        let bytes = body.collect_bytes().await.unwrap_or_default();
        let body: Option<Value> = if bytes.is_empty() {
            None
        } else {
            serde_json::from_slice(&bytes).ok()
        };
        let path = parts.uri.path().to_owned();
        let query = parts.uri.query().unwrap_or("").to_owned();
        let content_type = parts
            .headers
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned());
        let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        // /api/v1/namespaces/ns/res[/name[/sub]] or /apis/g/v/namespaces/ns/res[/name[/sub]]
        let (group, rest) = match segs.as_slice() {
            ["api", "v1", rest @ ..] => (String::new(), rest),
            ["apis", g, _v, rest @ ..] => (g.to_string(), rest),
            _ => panic!("fake API: unexpected path {path}"),
        };
        let (ns, resource, name, sub) = match rest {
            ["namespaces", ns, res] => (ns.to_string(), res.to_string(), None, None),
            ["namespaces", ns, res, name] => (
                ns.to_string(),
                res.to_string(),
                Some(name.to_string()),
                None,
            ),
            ["namespaces", ns, res, name, sub] => (
                ns.to_string(),
                res.to_string(),
                Some(name.to_string()),
                Some(sub.to_string()),
            ),
            _ => panic!("fake API: unexpected path {path}"),
        };
        let watch = query.split('&').any(|p| p == "watch=true");
        let verb: &'static str = match (parts.method.as_str(), name.is_some()) {
            ("GET", true) => "get",
            ("GET", false) if watch => "watch",
            ("GET", false) => "list",
            ("POST", _) => "create",
            ("PUT", _) => "update",
            ("PATCH", _) => "patch",
            ("DELETE", _) => "delete",
            (m, _) => panic!("fake API: method {m}"),
        };
        let full_resource = match &sub {
            Some(s) => format!("{resource}/{s}"),
            None => resource.clone(),
        };
        let mut st = self.lock();
        st.calls.push(Call {
            verb,
            group: group.clone(),
            resource: full_resource.clone(),
            name: name.clone(),
            content_type: content_type.clone(),
            query: query.clone(),
            body: body.clone(),
        });
        if let Some(f) = st
            .failures
            .iter_mut()
            .find(|f| f.verb == verb && f.resource == full_resource && f.times > 0)
        {
            f.times -= 1;
            let (code, reason) = (f.code, f.reason.clone());
            return Some(respond(
                code,
                &status_body(code, &reason, "injected failure"),
            ));
        }
        if verb == "watch" {
            return None;
        }
        let name_for_create = body
            .as_ref()
            .and_then(|b| b["metadata"]["name"].as_str())
            .map(str::to_owned);
        let key = (
            group.clone(),
            resource.clone(),
            ns.clone(),
            name.clone().or(name_for_create).unwrap_or_default(),
        );
        let not_found = || {
            respond(
                404,
                &status_body(
                    404,
                    "NotFound",
                    &format!("{resource} {:?} not found", key.3),
                ),
            )
        };
        st.rv += 1;
        let rv = st.rv.to_string();
        match verb {
            "get" => Some(
                st.objects
                    .get(&key)
                    .map(|o| respond(200, o))
                    .unwrap_or_else(not_found),
            ),
            "list" => {
                // Field selector: `metadata.name=<name>` only (what the operator uses).
                let by_name: Option<String> = query
                    .split('&')
                    .find_map(|p| p.strip_prefix("fieldSelector="))
                    .map(|v| v.replace("%3D", "=").replace("%3d", "="))
                    .map(|v| {
                        v.strip_prefix("metadata.name=")
                            .expect("only metadata.name field selectors")
                            .to_owned()
                    });
                let items: Vec<Value> = st
                    .objects
                    .iter()
                    .filter(|((g, r, n, m), _)| {
                        *g == group
                            && *r == resource
                            && *n == ns
                            && by_name.as_ref().is_none_or(|b| b == m)
                    })
                    .map(|(_, v)| v.clone())
                    .collect();
                Some(respond(
                    200,
                    &json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": rv}, "items": items}),
                ))
            }
            "create" => {
                if st.objects.contains_key(&key) {
                    return Some(respond(
                        409,
                        &status_body(409, "AlreadyExists", &format!("{} already exists", key.3)),
                    ));
                }
                let mut obj = body.unwrap();
                st.uid += 1;
                let uid = format!("uid-{}", st.uid);
                let meta = obj["metadata"].as_object_mut().unwrap();
                if meta.get("name").is_none() {
                    meta.insert("name".into(), json!(key.3.clone()));
                }
                meta.insert("uid".into(), json!(uid));
                meta.insert("resourceVersion".into(), json!(rv));
                meta.insert("namespace".into(), json!(ns));
                st.objects.insert(key, obj.clone());
                Some(respond(201, &obj))
            }
            "update" => {
                let Some(current) = st.objects.get(&key) else {
                    return Some(not_found());
                };
                let mut obj = body.unwrap();
                if obj["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
                    return Some(respond(
                        409,
                        &status_body(409, "Conflict", "the object has been modified"),
                    ));
                }
                obj["metadata"]["uid"] = current["metadata"]["uid"].clone();
                obj["metadata"]["resourceVersion"] = json!(rv);
                st.objects.insert(key, obj.clone());
                Some(respond(200, &obj))
            }
            "patch" => {
                let body = body.unwrap();
                let ct = content_type.unwrap_or_default();
                let is_apply = ct.contains("apply-patch");
                let exists = st.objects.contains_key(&key);
                if !(exists || is_apply && sub.is_none()) {
                    return Some(not_found());
                }
                if !exists {
                    // Server-side apply creating an object: the API server authorizes `create` too.
                    let mut c = st.calls.last().unwrap().clone();
                    c.verb = "create";
                    st.calls.push(c);
                    let mut obj = body.clone();
                    st.uid += 1;
                    let uid = format!("uid-{}", st.uid);
                    let meta = obj["metadata"].as_object_mut().unwrap();
                    meta.insert("uid".into(), json!(uid));
                    meta.insert("resourceVersion".into(), json!(rv));
                    st.objects.insert(key, obj.clone());
                    return Some(respond(201, &obj));
                }
                let current = st.objects.get(&key).unwrap().clone();
                let mut obj = current.clone();
                if sub.as_deref() == Some("status") {
                    if is_apply {
                        obj["status"] = body["status"].clone();
                    } else {
                        merge_patch(&mut obj["status"], &body["status"]);
                    }
                } else if is_apply {
                    apply(&mut obj, &body);
                } else if ct.contains("json-patch") {
                    if let Err(e) = json_patch(&mut obj, &body) {
                        return Some(respond(422, &status_body(422, "Invalid", &e)));
                    }
                } else {
                    if let Some(want) = body["metadata"].get("resourceVersion")
                        && *want != current["metadata"]["resourceVersion"]
                    {
                        return Some(respond(
                            409,
                            &status_body(409, "Conflict", "the object has been modified"),
                        ));
                    }
                    merge_patch(&mut obj, &body);
                }
                obj["metadata"]["resourceVersion"] = json!(rv);
                // A deleting object whose last finalizer went away is gone.
                let finalizers_left = obj["metadata"]["finalizers"]
                    .as_array()
                    .is_some_and(|a| !a.is_empty());
                if obj["metadata"].get("deletionTimestamp").is_some() && !finalizers_left {
                    st.objects.remove(&key);
                } else {
                    st.objects.insert(key, obj.clone());
                }
                Some(respond(200, &obj))
            }
            "delete" => {
                let Some(current) = st.objects.get(&key).cloned() else {
                    return Some(not_found());
                };
                if let Some(uid) = body
                    .as_ref()
                    .and_then(|b| b["preconditions"]["uid"].as_str())
                    && current["metadata"]["uid"] != uid
                {
                    return Some(respond(
                        409,
                        &status_body(409, "Conflict", "Precondition failed: UID in precondition"),
                    ));
                }
                let has_finalizers = current["metadata"]["finalizers"]
                    .as_array()
                    .is_some_and(|a| !a.is_empty());
                let graceful = resource == "pods" && st.graceful_pods;
                if has_finalizers || graceful {
                    let mut obj = current;
                    if obj["metadata"].get("deletionTimestamp").is_none() {
                        obj["metadata"]["deletionTimestamp"] = json!("2025-01-01T00:00:00Z");
                    }
                    obj["metadata"]["resourceVersion"] = json!(rv);
                    st.objects.insert(key, obj.clone());
                    Some(respond(200, &obj))
                } else {
                    st.objects.remove(&key);
                    Some(respond(200, &current))
                }
            }
            _ => unreachable!(),
        }
    }
}
