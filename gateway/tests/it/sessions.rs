//! Sessions through the gateway: create, pair (QR in three formats, pair code, sandbox
//! scan), restart, disconnect, logout, delete; the local supervisor restarting a crashed
//! session process and restoring sessions after a gateway restart; the first admin key.

use std::time::Duration;

use reqwest::Method;
use serde_json::json;

use crate::both;
use crate::common::*;

both!(session_life_cycle, life_cycle);
async fn life_cycle(kind: DbKind) {
    let (_dir, _db, gw) = setup(kind, &Options::default());
    let s = gw.sandbox_session("alpha", json!({})).await;
    assert_eq!((s["engine"].as_str(), s["ready"].as_bool()), (Some("sandbox"), Some(true)));

    let (status, body) = gw.call(Method::GET, "/v1/sessions", None).await;
    assert_eq!(status, 200);
    assert!(body["items"].as_array().unwrap().iter().any(|s| s["name"] == "alpha"), "{body}");

    // The QR code in its three formats.
    let png = gw.req(Method::GET, "/v1/sessions/alpha/qr", Some(ADMIN)).send().await.unwrap();
    assert_eq!(png.status(), 200);
    assert_eq!(png.headers()["content-type"], "image/png");
    assert!(png.bytes().await.unwrap().starts_with(b"\x89PNG\r\n\x1a\n"));
    let j = gw.req(Method::GET, "/v1/sessions/alpha/qr", Some(ADMIN)).header("accept", "application/json").send().await.unwrap();
    assert_eq!(j.status(), 200);
    let qr: serde_json::Value = j.json().await.unwrap();
    assert!(qr["code"].as_str().unwrap().split(',').count() >= 4, "{qr}");
    assert!(qr["expiresAt"].is_string());
    let t = gw.req(Method::GET, "/v1/sessions/alpha/qr", Some(ADMIN)).header("accept", "text/plain").send().await.unwrap();
    assert_eq!(t.status(), 200);
    assert!(t.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    assert!(t.text().await.unwrap().contains('█'));

    // Scan: connected, and pairing calls make no sense any more.
    let (status, body) = gw.call(Method::POST, "/v1/sessions/alpha/sandbox/scan", Some(json!({"pushName": "Ops"}))).await;
    assert_eq!(status, 200, "{body}");
    let s = gw.wait_phase("alpha", "Connected").await;
    assert_eq!(s["account"]["jid"], "15550000001@s.whatsapp.net");
    let (status, body) = gw.call(Method::GET, "/v1/sessions/alpha/qr", None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (409, Some("ALREADY_PAIRED")));

    // Restart reconnects without a scan; a network drop goes through Reconnecting.
    let (status, _) = gw.call(Method::POST, "/v1/sessions/alpha/restart", None).await;
    assert_eq!(status, 200);
    gw.wait_phase("alpha", "Connected").await;
    let (status, body) = gw.call(Method::POST, "/v1/sessions/alpha/sandbox/disconnect", Some(json!({"seconds": 1}))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["phase"], "Reconnecting");
    gw.wait_phase("alpha", "Connected").await;

    // Logout: a new scan is needed; no QR until the session is restarted.
    let (status, body) = gw.call(Method::POST, "/v1/sessions/alpha/logout", None).await;
    assert_eq!(status, 200, "{body}");
    gw.wait_phase("alpha", "LoggedOut").await;
    let (status, body) = gw.call(Method::GET, "/v1/sessions/alpha/qr", None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (409, Some("QR_NOT_AVAILABLE")));

    // Pair by phone number.
    let (status, _) = gw.call(Method::POST, "/v1/sessions/alpha/restart", None).await;
    assert_eq!(status, 200);
    gw.wait_phase("alpha", "AwaitingScan").await;
    let (status, body) = gw.call(Method::POST, "/v1/sessions/alpha/pair-code", Some(json!({"phoneNumber": "+15557654321"}))).await;
    assert_eq!(status, 200, "{body}");
    let code = body["code"].as_str().unwrap().to_owned();
    assert_eq!(code.len(), 8, "{code}");
    let (status, _) = gw.call(Method::POST, "/v1/sessions/alpha/sandbox/scan", Some(json!({"code": code}))).await;
    assert_eq!(status, 200);
    let s = gw.wait_phase("alpha", "Connected").await;
    assert_eq!(s["account"]["jid"], "15557654321@s.whatsapp.net");

    // Delete: gone, and deleting again is 404.
    let (status, _) = gw.call(Method::DELETE, "/v1/sessions/alpha", None).await;
    assert_eq!(status, 204);
    let (status, body) = gw.call(Method::GET, "/v1/sessions/alpha", None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("SESSION_NOT_FOUND")));
    let (status, _) = gw.call(Method::DELETE, "/v1/sessions/alpha", None).await;
    assert_eq!(status, 404);
}

both!(supervisor_restarts_and_restores, supervisor);
async fn supervisor(kind: DbKind) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new(kind, dir.path());
    let data = dir.path().join("data");
    let mut gw = Gateway::start(&data, &db, &Options::default());
    gw.connected_session("beta", json!({})).await;

    // A crashed session process is started again, and comes back paired.
    let pid = gw.session_pid("beta").expect("pid file");
    signal(pid, libc::SIGKILL);
    let mut restarted = false;
    for _ in 0..200 {
        if gw.session_pid("beta").is_some_and(|p| p != pid) {
            restarted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(restarted, "the session process was not restarted\n{}", gw.log());
    gw.wait_phase("beta", "Connected").await;

    // A stopped gateway stops its sessions; a new one restores them, still paired.
    let pid = gw.session_pid("beta").unwrap();
    gw.stop();
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid), "session process outlived the gateway");
    let gw = Gateway::start(&data, &db, &Options::default());
    gw.wait_phase("beta", "Connected").await;
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| s.contains(") Z")).unwrap_or(true)
}

both!(first_admin_key_is_printed_once, first_key);
async fn first_key(kind: DbKind) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new(kind, dir.path());
    let data = dir.path().join("data");
    let opts = Options { admin_env: false, ..Options::default() };
    let mut gw = Gateway::start(&data, &db, &opts);
    let key = gw.first_key.clone().expect("the first start prints an admin key");
    assert!(key.starts_with("wak_"));
    let (status, body) = gw.call_as(&key, Method::GET, "/v1/keys", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["items"][0]["admin"], true);
    gw.stop();
    let gw = Gateway::start(&data, &db, &opts);
    assert_eq!(gw.first_key, None, "the key is printed once per database");
    let (status, _) = gw.call_as(&key, Method::GET, "/v1/sessions", None).await;
    assert_eq!(status, 200);
}

both!(session_that_cannot_start_is_not_ready, not_ready);
async fn not_ready(kind: DbKind) {
    let (_dir, _db, gw) = setup(kind, &Options::default());
    // A file where the session's data directory should be: its process can never start.
    std::fs::write(gw.data_dir.join("sessions").join("broken"), b"in the way").unwrap();
    let (status, _) = gw.call(Method::POST, "/v1/sessions", Some(json!({"name": "broken", "engine": "sandbox"}))).await;
    assert_eq!(status, 201);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = gw.call(Method::GET, "/v1/sessions/broken", None).await;
    assert_eq!(status, 200);
    assert_eq!((body["ready"].as_bool(), body["phase"].as_str()), (Some(false), Some("Starting")), "{body}");
    assert!(body["lastError"].as_str().unwrap_or("").contains("could not start"), "{body}");
    let resp = gw
        .req(Method::POST, "/v1/sessions/broken/messages", Some(ADMIN))
        .json(&json!({"to": "+15551234567", "type": "text", "text": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "SESSION_NOT_READY");
    // Nothing was recorded for a send refused up front.
    let (_, history) = gw.call(Method::GET, "/v1/sessions/broken/messages", None).await;
    assert_eq!(history["items"].as_array().unwrap().len(), 0);
    let (status, body) = gw.call(Method::POST, "/v1/sessions/broken/restart", None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (503, Some("SESSION_NOT_READY")));
}
