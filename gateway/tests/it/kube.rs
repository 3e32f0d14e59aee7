//! The Kubernetes `SessionDirectory` against kube-rs's mock service (tower-test): the
//! reflectors list sessions, pods and token Secrets; routes come from memory; create and
//! delete act on `WhatsAppSession` objects; spec webhooks read their signing Secret. The
//! end-to-end proof on the test control plane belongs to the end-to-end suite.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};
use wa_api::crd::SecretKeyRef;
use wa_api::{ErrorCode, Phase, SessionName};
use wa_gateway::directory::kube::KubeDirectory;
use wa_gateway::directory::{NewSession, SessionDirectory, StatusBoard};

const NS: &str = "wa";

fn session(name: &str, phase: Option<&str>) -> Value {
    let mut s = json!({
        "apiVersion": "wa-operator.dev/v1alpha1",
        "kind": "WhatsAppSession",
        "metadata": {"name": name, "namespace": NS, "resourceVersion": "1", "uid": format!("uid-{name}"),
                     "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"engine": "sandbox", "webhooks": [{"url": "http://hooks.example/x", "secretRef": {"name": "hook-secret", "key": "signing"}}]}
    });
    if let Some(p) = phase {
        s["status"] = json!({"phase": p, "account": {"jid": "15550000001@s.whatsapp.net"}});
    }
    s
}

fn pod(name: &str, ip: &str, ready: bool) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("wa-{name}"), "namespace": NS, "resourceVersion": "1", "labels": {"wa-operator.dev/session": name}},
        "spec": {"containers": [{"name": "session", "image": "x"}]},
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
    })
}

fn secret(name: &str, data: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": NS, "resourceVersion": "1"}, "data": data})
}

fn b64(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn list(kind: &str, items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": "1"}, "items": items})
}

fn respond(status: StatusCode, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(&body).unwrap()))
        .unwrap()
}

/// Plays the API server: answers lists, holds watches open (one for sessions can be
/// completed with an event), and answers create, delete and get.
fn api_server(mut handle: tower_test::mock::Handle<Request<Body>, Response<Body>>, seen: Arc<Mutex<Vec<String>>>) {
    tokio::spawn(async move {
        let mut held = Vec::new();
        let mut session_watch: Option<tower_test::mock::SendResponse<Response<Body>>> = None;
        while let Some((req, send)) = handle.next_request().await {
            let method = req.method().clone();
            let uri = req.uri().to_string();
            seen.lock().unwrap().push(format!("{method} {uri}"));
            let path = req.uri().path().to_owned();
            let query = req.uri().query().unwrap_or("").to_owned();
            let watch = query.contains("watch=true");
            let sessions = format!("/apis/wa-operator.dev/v1alpha1/namespaces/{NS}/whatsappsessions");
            match (method.as_str(), path.as_str()) {
                ("GET", p) if p == sessions && watch => session_watch = Some(send),
                ("GET", p) if p == sessions => {
                    send.send_response(respond(StatusCode::OK, list("WhatsAppSessionList", vec![session("s1", Some("Connected")), session("s3", None)])))
                }
                ("GET", "/api/v1/namespaces/wa/pods") if watch => held.push(send),
                ("GET", "/api/v1/namespaces/wa/pods") => {
                    assert!(query.contains("labelSelector=wa-operator.dev%2Fsession"), "{query}");
                    send.send_response(respond(StatusCode::OK, list("PodList", vec![pod("s1", "10.0.0.5", true), pod("s3", "10.0.0.6", false)])))
                }
                ("GET", "/api/v1/namespaces/wa/secrets") if watch => held.push(send),
                ("GET", "/api/v1/namespaces/wa/secrets") => {
                    assert!(query.contains("labelSelector=wa-operator.dev%2Fsession"), "{query}");
                    send.send_response(respond(
                    StatusCode::OK,
                    list(
                        "SecretList",
                        vec![
                            secret("wa-s1-token", json!({"token": b64("pod-token-s1")})),
                            secret("wa-s3-token", json!({"token": b64("pod-token-s3")})),
                            // Labelled like the operator's, but not a token Secret.
                            secret("unrelated", json!({"password": b64("hunter2")})),
                        ],
                    ),
                ))
                }
                ("GET", "/api/v1/namespaces/wa/secrets/hook-secret") => {
                    send.send_response(respond(StatusCode::OK, secret("hook-secret", json!({"signing": b64("sign-me-please")}))))
                }
                ("POST", p) if p == sessions => {
                    let body = http_body_util::BodyExt::collect(req.into_body()).await.unwrap().to_bytes();
                    let mut obj: Value = serde_json::from_slice(&body).unwrap();
                    if obj["metadata"]["name"] == "s1" {
                        send.send_response(respond(StatusCode::CONFLICT, json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists", "message": "exists", "code": 409})));
                        continue;
                    }
                    obj["metadata"]["resourceVersion"] = json!("2");
                    obj["metadata"]["uid"] = json!("uid-new");
                    obj["metadata"]["creationTimestamp"] = json!("2026-01-02T00:00:00Z");
                    send.send_response(respond(StatusCode::CREATED, obj.clone()));
                    // The watch sees it too.
                    if let Some(w) = session_watch.take() {
                        let line = format!("{}\n", json!({"type": "ADDED", "object": obj}));
                        w.send_response(Response::builder().status(200).body(Body::from(line.into_bytes())).unwrap());
                    }
                }
                ("DELETE", p) if p == format!("{sessions}/ghost") => send.send_response(respond(
                    StatusCode::NOT_FOUND,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "message": "not found", "code": 404}),
                )),
                ("DELETE", p) if p.starts_with(&sessions) => send.send_response(respond(StatusCode::OK, session("s2", None))),
                _ => send.send_response(respond(StatusCode::NOT_FOUND, json!({"kind": "Status", "code": 404, "message": uri}))),
            }
        }
        drop(held);
    });
}

#[tokio::test]
async fn kubernetes_directory_routes_creates_and_deletes() {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let seen = Arc::new(Mutex::new(Vec::new()));
    api_server(handle, seen.clone());
    let client = kube::Client::new(service, NS);
    let dir = KubeDirectory::start(client, NS.into(), Arc::new(StatusBoard::default()));
    for _ in 0..200 {
        if dir.is_ready() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(dir.is_ready(), "reflectors did not sync: {:?}", seen.lock().unwrap());

    let s1: SessionName = "s1".parse().unwrap();
    let s3: SessionName = "s3".parse().unwrap();
    let route = dir.route(&s1).unwrap();
    assert_eq!((route.base_url.as_str(), route.token.as_str()), ("http://10.0.0.5:8080", "pod-token-s1"));
    let info = dir.get(&s1).unwrap();
    assert_eq!((info.phase, info.ready, info.namespace.as_deref()), (Phase::Connected, true, Some(NS)));
    // A pod that is not ready: 503 with Retry-After; an unknown session: 404.
    let e = dir.route(&s3).unwrap_err();
    assert_eq!((e.code, e.retry_after.is_some()), (ErrorCode::SessionNotReady, true));
    assert_eq!(dir.get(&s3).unwrap().phase, Phase::Pending);
    assert_eq!(dir.route(&"nope".parse().unwrap()).unwrap_err().code, ErrorCode::SessionNotFound);
    assert_eq!(dir.list().len(), 2);
    assert_eq!(dir.routes().len(), 1);

    // Pod tokens authenticate their own session only.
    assert!(dir.authenticate_pod(&s1, "pod-token-s1").await);
    assert!(!dir.authenticate_pod(&s1, "pod-token-s3").await);
    assert!(!dir.authenticate_pod(&s1, "").await);
    assert_eq!(dir.session_for_token("pod-token-s3"), Some(s3.clone()));
    assert_eq!(dir.session_for_token("hunter2"), None, "only token Secrets are kept");

    // Spec webhooks and their signing secret.
    let hooks = dir.spec_webhooks(&s1);
    assert_eq!(hooks.len(), 1);
    let secret = dir.webhook_secret(&s1, &SecretKeyRef { name: "hook-secret".into(), key: "signing".into() }).await;
    assert_eq!(secret.as_deref(), Some("sign-me-please"));

    // Create: a WhatsAppSession object; a second one of the same name is refused.
    let new = NewSession {
        name: "s2".parse().unwrap(),
        engine: wa_api::Engine::Sandbox,
        phone_number: None,
        rate_limit: Default::default(),
    };
    let created = dir.create(new.clone()).await.unwrap();
    assert_eq!((created.name.as_str(), created.phase), ("s2", Phase::Pending));
    assert!(dir.get(&"s2".parse().unwrap()).is_some(), "the watch delivered the new object");
    let dup = NewSession { name: "s1".parse().unwrap(), ..new };
    assert_eq!(dir.create(dup).await.unwrap_err().code, ErrorCode::SessionExists);
    let posted = seen.lock().unwrap().iter().filter(|r| r.starts_with("POST /apis/wa-operator.dev/v1alpha1/namespaces/wa/whatsappsessions")).count();
    assert_eq!(posted, 2);

    // Delete acts on the object; a missing one is SESSION_NOT_FOUND.
    dir.delete(&"s2".parse().unwrap()).await.unwrap();
    assert_eq!(dir.delete(&"ghost".parse().unwrap()).await.unwrap_err().code, ErrorCode::SessionNotFound);
    assert!(seen.lock().unwrap().iter().any(|r| r.starts_with("DELETE /apis/wa-operator.dev/v1alpha1/namespaces/wa/whatsappsessions/s2")));
}
