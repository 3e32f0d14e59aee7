//! The compatible routes answer in the older gateways' shapes.

use std::collections::HashSet;

use base64::Engine as _;
use reqwest::Method;
use serde_json::{Value, json};

use crate::both;
use crate::common::*;
use crate::messages::PNG;

async fn key_for(gw: &Gateway, sessions: &[&str], permissions: &[&str]) -> String {
    let (status, k) = gw.call(Method::POST, "/v1/keys", Some(json!({"name": "old-client", "permissions": permissions, "sessions": sessions}))).await;
    assert_eq!(status, 201, "{k}");
    k["key"].as_str().unwrap().to_owned()
}

async fn post_apikey(gw: &Gateway, key: &str, path: &str, body: Value) -> (u16, Value) {
    let resp = gw
        .http
        .post(format!("{}{path}", gw.url))
        .header("authorization", format!("ApiKey {key}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap_or(Value::Null))
}

both!(compat_routes_answer_old_shapes, compat);
async fn compat(kind: DbKind) {
    let (_dir, _db, gw) = setup(kind, &Options::default());
    gw.connected_session("c1", json!({})).await;
    let key = key_for(&gw, &["c1"], &["send", "read", "manage"]).await;

    // send-text with `Authorization: ApiKey`.
    let (status, body) = post_apikey(&gw, &key, "/api/v1/messages/send-text/", json!({"recipient": "+15551234567", "message": "hi"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!((body["success"].as_bool(), body["message"].as_str()), (Some(true), Some("Message sent successfully")));
    assert!(body["data"]["messageId"].as_str().unwrap().starts_with("3EB0"));
    assert!(body["data"]["timestamp"].is_string() && body["data"]["dbId"].is_string(), "{body}");

    // send-media, multipart.
    let form = reqwest::multipart::Form::new()
        .text("recipient", "+15551234567")
        .text("media_type", "image")
        .text("caption", "look")
        .part("file", reqwest::multipart::Part::bytes(PNG.to_vec()).file_name("a.png").mime_str("image/png").unwrap());
    let resp = gw.http.post(format!("{}/api/v1/messages/send-media/", gw.url)).header("authorization", format!("ApiKey {key}")).multipart(form).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!((body["success"].as_bool(), body["message"].as_str()), (Some(true), Some("Media sent successfully")));
    assert_eq!(body["data"]["filePath"], "a.png");
    assert!(body["data"]["messageId"].is_string() && body["data"]["dbId"].is_string());

    // /api/sessions/{id}/send with a Bearer key: text and a data-URL image.
    let (status, body) = gw
        .call_as(&key, Method::POST, "/api/sessions/c1/send", Some(json!({"to": "6281234567890@s.whatsapp.net", "type": "text", "message": "halo"})))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!((body["success"].as_bool(), body["data"]["status"].as_str(), body["data"]["sessionId"].as_str()), (Some(true), Some("sent"), Some("c1")));
    assert!(body["data"]["messageId"].is_string() && body["data"]["timestamp"].is_string());
    let data_url = format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(PNG));
    let (status, body) = gw
        .call_as(&key, Method::POST, "/api/sessions/c1/send", Some(json!({"to": "6281234567890", "type": "image", "media": data_url, "caption": "c", "filename": "x.png"})))
        .await;
    assert_eq!(status, 200, "{body}");

    // Failures in their shape.
    let (status, body) = post_apikey(&gw, "wak_wrong", "/api/v1/messages/send-text/", json!({"recipient": "+15551234567", "message": "x"})).await;
    assert_eq!((status, body), (401, json!({"success": false, "error": "Invalid API key"})));
    let (status, body) = gw.call_as(&key, Method::POST, "/api/sessions/other/send", Some(json!({"to": "+15551234567", "message": "x"}))).await;
    assert_eq!(status, 403);
    assert_eq!((body["success"].as_bool(), body["error_code"].as_str()), (Some(false), Some("FORBIDDEN")));
    assert!(body["message"].is_string());
    let (status, body) = post_apikey(&gw, &key, "/api/v1/messages/send-text/", json!({"recipient": "123", "message": "x"})).await;
    assert_eq!((status, body["error_code"].as_str(), body["success"].as_bool()), (422, Some("INVALID_RECIPIENT"), Some(false)));

    // Session status and history.
    let resp = gw.http.get(format!("{}/api/v1/sessions/status/", gw.url)).header("authorization", format!("ApiKey {key}")).send().await.unwrap();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body,
        json!({"success": true, "data": {"sessionId": "c1", "status": "connected", "phoneNumber": "+15550000001", "isReady": true}})
    );
    let resp = gw.http.get(format!("{}/api/v1/messages/list/", gw.url)).header("authorization", format!("ApiKey {key}")).send().await.unwrap();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["success"], true);
    assert_eq!(body["data"]["messages"].as_array().unwrap().len(), 4, "{body}");

    // Not connected: the old error shape with the stable code.
    gw.sandbox_session("c2", json!({})).await;
    let key2 = key_for(&gw, &["c2"], &["send"]).await;
    let (status, body) = post_apikey(&gw, &key2, "/api/v1/messages/send-text/", json!({"recipient": "+15551234567", "message": "x"})).await;
    assert_eq!((status, body["success"].as_bool(), body["error_code"].as_str()), (409, Some(false), Some("SESSION_NOT_CONNECTED")));

    // init creates the key's session and returns its QR code.
    let key3 = key_for(&gw, &["c3"], &["manage", "read"]).await;
    let (status, body) = post_apikey(&gw, &key3, "/api/v1/sessions/init/", json!({"engine": "sandbox"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!((body["data"]["sessionId"].as_str(), body["data"]["status"].as_str()), (Some("c3"), Some("qr_pending")));
    assert!(body["data"]["qrCode"].as_str().unwrap().starts_with("data:image/png;base64,"));

    // disconnect logs out.
    let (status, body) = post_apikey(&gw, &key, "/api/v1/sessions/disconnect/", json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!((body["success"].as_bool(), body["message"].as_str()), (Some(true), Some("Session disconnected")));
    gw.wait_phase("c1", "LoggedOut").await;

    // send-text spreads load over the connected sessions a key may use.
    gw.connected_session("c4", json!({})).await;
    gw.connected_session("c5", json!({})).await;
    let key45 = key_for(&gw, &["c4", "c5"], &["send"]).await;
    let mut used = HashSet::new();
    for i in 0..4 {
        let (status, body) = post_apikey(&gw, &key45, "/api/v1/messages/send-text/", json!({"recipient": "+15551234567", "message": format!("n{i}")})).await;
        assert_eq!(status, 200, "{body}");
        let (_, m) = gw.call(Method::GET, &format!("/v1/messages/{}", body["data"]["dbId"].as_str().unwrap()), None).await;
        used.insert(m["session"].as_str().unwrap().to_owned());
    }
    assert_eq!(used.len(), 2, "both sessions were used: {used:?}");
}
