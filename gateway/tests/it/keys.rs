//! API keys: the raw key shown once and stored only as a hash; a key scoped to one session
//! gets 403 on every route of another; a revoked key gets 401.

use reqwest::Method;
use serde_json::{Value, json};
use sha2::Digest;

use crate::both;
use crate::common::*;

/// Every session route, for a session named `s` (method, path, body).
pub fn session_routes(s: &str) -> Vec<(Method, String, Option<Value>)> {
    let p = |suffix: &str| format!("/v1/sessions/{s}{suffix}");
    vec![
        (Method::GET, p(""), None),
        (Method::DELETE, p(""), None),
        (Method::POST, p("/restart"), None),
        (Method::POST, p("/logout"), None),
        (Method::GET, p("/qr"), None),
        (Method::POST, p("/pair-code"), Some(json!({"phoneNumber": "+15551234567"}))),
        (Method::POST, p("/sandbox/scan"), Some(json!({}))),
        (Method::POST, p("/sandbox/inbound"), Some(json!({"from": "+15551234567", "text": "x"}))),
        (Method::POST, p("/sandbox/disconnect"), Some(json!({}))),
        (Method::POST, p("/messages"), Some(json!({"to": "+15551234567", "type": "text", "text": "x"}))),
        (Method::GET, p("/messages"), None),
        (Method::GET, p("/webhooks"), None),
        (Method::POST, p("/webhooks"), Some(json!({"url": "http://127.0.0.1:9/x"}))),
        (Method::GET, p("/webhooks/some-id"), None),
        (Method::DELETE, p("/webhooks/some-id"), None),
        (Method::GET, p("/webhooks/some-id/deliveries"), None),
        (Method::POST, p("/webhooks/some-id/deliveries/d/redeliver"), None),
    ]
}

both!(scoped_and_revoked_keys, scoped_keys);
async fn scoped_keys(kind: DbKind) {
    let (_dir, db, gw) = setup(kind, &Options::default());
    gw.connected_session("a", json!({})).await;
    gw.connected_session("b", json!({})).await;
    let (status, b_msg) = gw.call(Method::POST, "/v1/sessions/b/messages", Some(json!({"to": "+15551234567", "type": "text", "text": "b"}))).await;
    assert_eq!(status, 201);

    let (status, created) = gw
        .call(Method::POST, "/v1/keys", Some(json!({"name": "crm", "permissions": ["send", "read"], "sessions": ["a"]})))
        .await;
    assert_eq!(status, 201, "{created}");
    let key = created["key"].as_str().unwrap().to_owned();
    assert!(key.starts_with("wak_"));
    let key_id = created["id"].as_str().unwrap().to_owned();

    // Never shown again; the database holds only its SHA-256.
    let (_, list) = gw.call(Method::GET, "/v1/keys", None).await;
    let listed = list.to_string();
    assert!(!listed.contains(&key) && !listed.contains(&key[4..]), "the raw key appears in GET /v1/keys");
    let store = db.store().await;
    let rows = store.list_keys().await.unwrap();
    let row = rows.iter().find(|r| r.id == key_id).unwrap();
    assert_eq!(row.key_hash, hex::encode(sha2::Sha256::digest(key.as_bytes())));
    let dump = format!("{rows:?}");
    assert!(!dump.contains(&key[4..]), "the raw key is stored");
    store.close().await;

    // Its own session: send and read.
    let (status, _) = gw.call_as(&key, Method::GET, "/v1/sessions/a", None).await;
    assert_eq!(status, 200);
    let (status, m) = gw.call_as(&key, Method::POST, "/v1/sessions/a/messages", Some(json!({"to": "+15551234567", "type": "text", "text": "a"}))).await;
    assert_eq!(status, 201, "{m}");
    let (status, list) = gw.call_as(&key, Method::GET, "/v1/sessions", None).await;
    assert_eq!(status, 200);
    let names: Vec<_> = list["items"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap().to_owned()).collect();
    assert_eq!(names, ["a"], "only the key's sessions are listed");
    // …but not manage it, nor do admin things.
    for (method, path, body) in [
        (Method::GET, "/v1/sessions/a/qr", None),
        (Method::POST, "/v1/sessions/a/restart", None),
        (Method::GET, "/v1/sessions/a/webhooks", None),
        (Method::POST, "/v1/sessions", Some(json!({"name": "zz", "engine": "sandbox"}))),
        (Method::GET, "/v1/keys", None),
        (Method::POST, "/v1/keys", Some(json!({"name": "x", "admin": true}))),
    ] {
        let (status, body) = gw.call_as(&key, method.clone(), path, body).await;
        assert_eq!((status, body["error"]["code"].as_str()), (403, Some("FORBIDDEN")), "{method} {path}");
    }

    // 403 on every route of another session, and on its messages.
    for (method, path, body) in session_routes("b") {
        let (status, resp) = gw.call_as(&key, method.clone(), &path, body).await;
        assert_eq!((status, resp["error"]["code"].as_str()), (403, Some("FORBIDDEN")), "{method} {path}: {resp}");
    }
    let (status, _) = gw.call_as(&key, Method::GET, &format!("/v1/messages/{}", b_msg["id"].as_str().unwrap()), None).await;
    assert_eq!(status, 403);

    // Revoked: 401 from now on, with a message that says so.
    let (status, _) = gw.call(Method::DELETE, &format!("/v1/keys/{key_id}"), None).await;
    assert_eq!(status, 204);
    let resp = gw.req(Method::GET, "/v1/sessions/a", Some(&key)).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    let body: Value = resp.json().await.unwrap();
    assert_eq!((body["error"]["code"].as_str(), body["error"]["message"].as_str()), (Some("UNAUTHORIZED"), Some("this API key was revoked")));
    let (_, k) = gw.call(Method::GET, &format!("/v1/keys/{key_id}"), None).await;
    assert!(k["revokedAt"].is_string(), "{k}");

    // Unknown and missing keys.
    let (status, _) = gw.call_as("wak_not-a-key", Method::GET, "/v1/sessions", None).await;
    assert_eq!(status, 401);
    let resp = gw.req(Method::GET, "/v1/sessions", None).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let (status, body) = gw.call(Method::GET, "/v1/keys/nope", None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("KEY_NOT_FOUND")));
    let (status, _) = gw.call(Method::DELETE, "/v1/keys/nope", None).await;
    assert_eq!(status, 404);

    // An admin key made through the API can do admin things.
    let (_, admin) = gw.call(Method::POST, "/v1/keys", Some(json!({"name": "ops", "admin": true}))).await;
    let (status, _) = gw.call_as(admin["key"].as_str().unwrap(), Method::GET, "/v1/keys", None).await;
    assert_eq!(status, 200);
}
