//! In-process tests of the router (`app(state)` driven with `oneshot`): the served OpenAPI
//! document is the committed one and names only routes that exist; unknown routes and
//! methods answer in the error shape; a panic is a JSON 500; a misbehaving pod never
//! becomes a 500. The session directory here is a stand-in pointing at a fake pod.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tokio::sync::Notify;
use tower::ServiceExt;
use wa_api::{Engine, Phase, SessionName};
use wa_gateway::auth::KeyVerifier;
use wa_gateway::directory::{Mode, NewSession, Observed, Route, SessionDirectory, SessionInfo};
use wa_gateway::error::{ApiError, ApiResult};
use wa_gateway::metrics::Metrics;
use wa_gateway::pod_client::PodClient;
use wa_gateway::store::Store;
use wa_gateway::{Gateway, Settings};

const KEY: &str = "inprocess-admin-key";

/// One session, "fake", whose pod is at `pod_url`; `panic_on_list` makes listing panic.
struct FakeDirectory {
    pod_url: String,
    panic_on_list: bool,
}

impl FakeDirectory {
    fn info(&self) -> SessionInfo {
        SessionInfo {
            name: "fake".parse().unwrap(),
            namespace: None,
            engine: Engine::Sandbox,
            phase: Phase::Connected,
            ready: true,
            account: None,
            phone_number: None,
            pair_code: None,
            last_error: None,
            created_at: None,
        }
    }
}

#[async_trait]
impl SessionDirectory for FakeDirectory {
    fn mode(&self) -> Mode {
        Mode::Local
    }
    fn namespace(&self) -> &str {
        "test"
    }
    fn list(&self) -> Vec<SessionInfo> {
        if self.panic_on_list {
            panic!("a bug in the directory");
        }
        vec![self.info()]
    }
    fn get(&self, name: &SessionName) -> Option<SessionInfo> {
        (name.as_str() == "fake").then(|| self.info())
    }
    fn route(&self, name: &SessionName) -> ApiResult<Route> {
        if name.as_str() != "fake" {
            return Err(ApiError::session_not_found(name.as_str()));
        }
        Ok(Route { session: name.clone(), base_url: self.pod_url.clone(), token: "pod-token".into() })
    }
    fn routes(&self) -> Vec<Route> {
        vec![]
    }
    async fn create(&self, _new: NewSession) -> ApiResult<SessionInfo> {
        Err(ApiError::unavailable("not in this test"))
    }
    async fn delete(&self, _name: &SessionName) -> ApiResult<()> {
        Err(ApiError::unavailable("not in this test"))
    }
    fn session_for_token(&self, token: &str) -> Option<SessionName> {
        (token == "pod-token").then(|| "fake".parse().unwrap())
    }
    async fn authenticate_pod(&self, _claimed: &SessionName, token: &str) -> bool {
        token == "pod-token"
    }
    fn observe(&self, _name: &SessionName, _observed: Observed) {}
}

/// A fake pod whose `POST /v1/messages` answers `(status, body)` for the `to` it is given.
async fn fake_pod() -> String {
    use axum::routing::post;
    let app = axum::Router::new().route(
        "/v1/messages",
        post(|body: axum::body::Bytes| async move {
            let v: Value = serde_json::from_slice(&body).unwrap_or_default();
            match v["to"].as_str().unwrap_or("") {
                "+15550000500" => (StatusCode::INTERNAL_SERVER_ERROR, r#"{"error":{"code":"INTERNAL","message":"pod bug"}}"#.to_owned()),
                "+15550000401" => (StatusCode::UNAUTHORIZED, r#"{"error":{"code":"UNAUTHORIZED","message":"bad token"}}"#.to_owned()),
                "+15550000200" => (StatusCode::OK, "this is not JSON".to_owned()),
                "+15550000418" => (StatusCode::IM_A_TEAPOT, "teapot".to_owned()),
                "+15550000502" => (StatusCode::BAD_GATEWAY, "<html>bad gateway</html>".to_owned()),
                "+15550000555" => (
                    StatusCode::BAD_GATEWAY,
                    r#"{"error":{"code":"SEND_OUTCOME_UNKNOWN","message":"cut off mid-send"}}"#.to_owned(),
                ),
                _ => (
                    StatusCode::OK,
                    r#"{"id":"3EB0AAAAAAAAAAAAAAAAAA","to":"15551234567@s.whatsapp.net","status":"sent","timestamp":"2026-01-01T00:00:00Z"}"#.to_owned(),
                ),
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    url
}

async fn state(dir: &tempfile::TempDir, panic_on_list: bool) -> wa_gateway::AppState {
    let store = Store::connect(&format!("sqlite://{}", dir.path().join("g.db").display())).await.unwrap();
    let directory: Arc<dyn SessionDirectory> = Arc::new(FakeDirectory { pod_url: fake_pod().await, panic_on_list });
    Arc::new(Gateway {
        store: store.clone(),
        directory,
        keys: KeyVerifier::new(store, Some(KEY), Duration::from_secs(1)),
        pods: PodClient::new(Duration::from_secs(5)).unwrap(),
        metrics: Arc::new(Metrics::default()),
        outbox_wake: Notify::new(),
        webhook_wake: Notify::new(),
        settings: Settings::default(),
    })
}

async fn call(app: &axum::Router, req: Request<Body>) -> (StatusCode, Vec<u8>) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes().to_vec();
    (status, body)
}

#[tokio::test]
async fn openapi_served_is_the_committed_file() {
    let dir = tempfile::tempdir().unwrap();
    let app = wa_gateway::app(state(&dir, false).await);
    let (status, served) = call(&app, Request::get("/openapi.json").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    let committed = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json")).unwrap();
    assert!(
        served == committed,
        "gateway/openapi.json is stale: regenerate with `cargo run -p wa-gateway -- openapi > gateway/openapi.json`"
    );
    let doc: Value = serde_json::from_slice(&served).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
}

#[tokio::test]
async fn documented_routes_exist_and_others_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let app = wa_gateway::app(state(&dir, false).await);
    let doc: Value = serde_json::from_str(wa_gateway::http::openapi_text()).unwrap();
    let mut checked = 0;
    for (path, ops) in doc["paths"].as_object().unwrap() {
        let concrete = path
            .replace("{name}", "fake")
            .replace("{sessionId}", "fake")
            .replace("{id}", "some-id")
            .replace("{deliveryId}", "some-delivery");
        for method in ops.as_object().unwrap().keys() {
            let req = Request::builder().method(method.to_uppercase().as_str()).uri(&concrete).body(Body::empty()).unwrap();
            let (status, body) = call(&app, req).await;
            let text = String::from_utf8_lossy(&body);
            assert!(
                status != StatusCode::METHOD_NOT_ALLOWED && !(status == StatusCode::NOT_FOUND && text.contains("\"NOT_FOUND\"")),
                "{method} {path} is documented but not routed: {status} {text}"
            );
            // Every documented operation documents the status it answered.
            let documented = ops[method]["responses"].as_object().unwrap();
            assert!(documented.contains_key(status.as_str()), "{method} {path} answered {status}, which it does not document");
            checked += 1;
        }
    }
    assert!(checked >= 35, "only {checked} operations");

    let (status, body) = call(&app, Request::get("/v1/nothing").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], "NOT_FOUND");
    let (status, body) = call(&app, Request::patch("/v1/keys").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], "METHOD_NOT_ALLOWED");
}

#[tokio::test]
async fn a_panic_is_a_json_500() {
    let dir = tempfile::tempdir().unwrap();
    let app = wa_gateway::app(state(&dir, true).await);
    let req = Request::get("/v1/sessions").header("authorization", format!("Bearer {KEY}")).body(Body::empty()).unwrap();
    let (status, body) = call(&app, req).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], "INTERNAL");
    assert!(!String::from_utf8_lossy(&body).contains("a bug in the directory"), "internals leak to the client");
}

#[tokio::test]
async fn a_misbehaving_pod_is_never_a_500() {
    let dir = tempfile::tempdir().unwrap();
    let app = wa_gateway::app(state(&dir, false).await);
    for (to, status, code) in [
        ("+15551234567", 201, None),
        ("+15550000500", 503, Some("UNAVAILABLE")),
        ("+15550000401", 503, Some("UNAVAILABLE")),
        ("+15550000200", 503, Some("UNAVAILABLE")),
        ("+15550000418", 422, Some("VALIDATION_FAILED")),
        ("+15550000502", 502, Some("SEND_FAILED")),
        ("+15550000555", 502, Some("SEND_OUTCOME_UNKNOWN")),
    ] {
        let req = Request::post("/v1/sessions/fake/messages")
            .header("authorization", format!("Bearer {KEY}"))
            .header("content-type", "application/json")
            .body(Body::from(format!(r#"{{"to":"{to}","type":"text","text":"x"}}"#)))
            .unwrap();
        let (got, body) = call(&app, req).await;
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(got.as_u16(), status, "{to}: {v}");
        assert_eq!(v["error"]["code"].as_str(), code, "{to}: {v}");
    }
}

#[tokio::test]
async fn an_unknown_outcome_is_recorded_and_never_retried() {
    let dir = tempfile::tempdir().unwrap();
    let app = wa_gateway::app(state(&dir, false).await);
    let send = || {
        Request::post("/v1/sessions/fake/messages")
            .header("authorization", format!("Bearer {KEY}"))
            .header("content-type", "application/json")
            .header("idempotency-key", "cut-off")
            .body(Body::from(r#"{"to":"+15550000555","type":"text","text":"x"}"#))
            .unwrap()
    };
    let first = app.clone().oneshot(send()).await.unwrap();
    assert_eq!(first.status(), StatusCode::BAD_GATEWAY);
    let id = first.headers()["x-message-id"].to_str().unwrap().to_owned();
    // The same key answers the same outcome: the message is not forwarded again.
    let (status, body) = call(&app, send()).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((status, v["error"]["code"].as_str()), (StatusCode::BAD_GATEWAY, Some("SEND_OUTCOME_UNKNOWN")));
    let get = Request::get(format!("/v1/messages/{id}")).header("authorization", format!("Bearer {KEY}")).body(Body::empty()).unwrap();
    let (_, body) = call(&app, get).await;
    let m: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((m["status"].as_str(), m["error"]["code"].as_str(), m["attempts"].as_u64()), (Some("failed"), Some("SEND_OUTCOME_UNKNOWN"), Some(1)));
}

#[tokio::test]
async fn events_need_the_pods_token() {
    let dir = tempfile::tempdir().unwrap();
    let app = wa_gateway::app(state(&dir, false).await);
    let batch = r#"{"events":[{"id":"e1","session":"fake","occurredAt":"2026-01-01T00:00:00Z","type":"state","phase":"Connected"}]}"#;
    let post = |token: Option<&str>| {
        let mut b = Request::post("/internal/v1/events").header("content-type", "application/json");
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        b.body(Body::from(batch)).unwrap()
    };
    let (status, _) = call(&app, post(None)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = call(&app, post(Some("wrong"))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body) = call(&app, post(Some("pod-token"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap(), serde_json::json!({"accepted": 1, "duplicates": 0}));
    let (_, body) = call(&app, post(Some("pod-token"))).await;
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap(), serde_json::json!({"accepted": 0, "duplicates": 1}));
    // A token answers for its own session only; an empty batch needs a token too.
    let other = batch.replace("\"session\":\"fake\"", "\"session\":\"other\"");
    let req = Request::post("/internal/v1/events")
        .header("content-type", "application/json")
        .header("authorization", "Bearer pod-token")
        .body(Body::from(other))
        .unwrap();
    let (status, _) = call(&app, req).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let empty = |token: &str| {
        Request::post("/internal/v1/events")
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {token}"))
            .body(Body::from(r#"{"events":[]}"#))
            .unwrap()
    };
    assert_eq!(call(&app, empty("wrong")).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(call(&app, empty("pod-token")).await.0, StatusCode::OK);

    // Whoever has no known token gets little of the gateway's memory: a body over the
    // unknown-token limit is refused (413, which makes a pod send smaller batches) before
    // it is read whole; the pod's own token may send it.
    let big = format!("{}{}", batch.replace("\"e1\"", "\"e2\""), " ".repeat(wa_gateway::http::internal::UNKNOWN_TOKEN_BODY_LIMIT));
    let padded = |token: &str| {
        Request::post("/internal/v1/events")
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {token}"))
            .body(Body::from(big.clone()))
            .unwrap()
    };
    let (status, body) = call(&app, padded("not-known-yet")).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap()["error"]["code"], "PAYLOAD_TOO_LARGE");
    let (status, body) = call(&app, padded("pod-token")).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
}
