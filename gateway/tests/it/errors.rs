//! Every error code the API can answer, each provoked the way a client would meet it,
//! against a real gateway with real session processes. Three cannot be provoked from outside
//! with the sandbox engine, and are checked in `inprocess.rs` against a fake pod instead:
//! INTERNAL (a bug; the panic handler), SEND_FAILED (the sandbox never refuses a send that
//! way) and SEND_OUTCOME_UNKNOWN (a pod that died between starting and finishing a send).
//! OVERLOADED has its own scenario (`overload.rs`).

use std::collections::BTreeSet;
use std::time::Duration;

use base64::Engine as _;
use reqwest::Method;
use serde_json::{Value, json};
use wa_api::ErrorCode;

use crate::both;
use crate::common::*;

struct Seen {
    gw_url: String,
    http: reqwest::Client,
    codes: BTreeSet<String>,
}

impl Seen {
    /// Sends a request and checks the answer is `code`, in the error shape, with the
    /// code's status (and `Retry-After` on 429/503).
    async fn expect(&mut self, code: ErrorCode, req: reqwest::RequestBuilder) {
        let resp = req.send().await.unwrap_or_else(|e| panic!("{code}: {e}"));
        let status = resp.status().as_u16();
        let retry_after = resp.headers().contains_key("retry-after");
        let text = resp.text().await.unwrap();
        let body: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{code}: not JSON: {text}"));
        assert_eq!(body["error"]["code"].as_str(), Some(code.as_str()), "{text}");
        assert_eq!(status, code.status(), "{code}: {text}");
        assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{text}");
        if matches!(status, 429 | 503) {
            assert!(retry_after, "{code} without Retry-After");
        }
        self.codes.insert(code.as_str().to_owned());
    }

    fn r(&self, method: Method, path: &str, key: Option<&str>) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.gw_url));
        match key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    fn admin(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.r(method, path, Some(ADMIN))
    }
}

fn text(to: &str, t: &str) -> Value {
    json!({"to": to, "type": "text", "text": t})
}

both!(every_error_code, every_code);
async fn every_code(kind: DbKind) {
    let (_dir, db, gw) = setup(kind, &Options::default());
    gw.connected_session("e", json!({"rateLimit": {"messagesPerMinute": 6000, "burst": 100}})).await;
    gw.sandbox_session("unpaired", json!({})).await;
    gw.connected_session("slow", json!({"rateLimit": {"messagesPerMinute": 1, "burst": 1}})).await;
    let mut s = Seen { gw_url: gw.url.clone(), http: gw.http.clone(), codes: BTreeSet::new() };
    let send = |session: &str| format!("/v1/sessions/{session}/messages");

    s.expect(ErrorCode::InvalidJson, s.admin(Method::POST, "/v1/sessions").header("content-type", "application/json").body("{")).await;
    s.expect(ErrorCode::InvalidRequest, s.admin(Method::GET, "/v1/sessions/e/messages?limit=abc")).await;
    s.expect(ErrorCode::Unauthorized, s.r(Method::GET, "/v1/sessions", None)).await;
    let (_, scoped) = gw.call(Method::POST, "/v1/keys", Some(json!({"name": "s", "permissions": ["read"], "sessions": ["e"]}))).await;
    s.expect(ErrorCode::Forbidden, s.r(Method::GET, "/v1/sessions/unpaired", scoped["key"].as_str())).await;
    s.expect(ErrorCode::NotFound, s.admin(Method::GET, "/v2/nothing")).await;
    s.expect(ErrorCode::SessionNotFound, s.admin(Method::GET, "/v1/sessions/ghost")).await;
    s.expect(ErrorCode::MessageNotFound, s.admin(Method::GET, "/v1/messages/ghost")).await;
    s.expect(ErrorCode::KeyNotFound, s.admin(Method::DELETE, "/v1/keys/ghost")).await;
    s.expect(ErrorCode::WebhookNotFound, s.admin(Method::GET, "/v1/sessions/e/webhooks/ghost")).await;
    s.expect(ErrorCode::MethodNotAllowed, s.admin(Method::PUT, "/v1/sessions")).await;
    s.expect(ErrorCode::SessionExists, s.admin(Method::POST, "/v1/sessions").json(&json!({"name": "e", "engine": "sandbox"}))).await;
    s.expect(ErrorCode::SessionNotConnected, s.admin(Method::POST, &send("unpaired")).json(&text("+15551234567", "x"))).await;
    s.expect(ErrorCode::AlreadyPaired, s.admin(Method::GET, "/v1/sessions/e/qr")).await;
    let first = s.admin(Method::POST, &send("e")).header("idempotency-key", "k1").json(&text("+15551234567", "a")).send().await.unwrap();
    assert_eq!(first.status(), 201);
    s.expect(ErrorCode::IdempotencyConflict, s.admin(Method::POST, &send("e")).header("idempotency-key", "k1").json(&text("+15551234567", "b"))).await;
    let huge = json!({"to": "+15551234567", "type": "document", "media": {"data": "A".repeat(300_000)}});
    s.expect(ErrorCode::PayloadTooLarge, s.admin(Method::POST, &send("e")).json(&huge)).await;
    let big = base64::engine::general_purpose::STANDARD.encode(vec![0u8; 120_000]);
    s.expect(ErrorCode::MediaTooLarge, s.admin(Method::POST, &send("e")).json(&json!({"to": "+15551234567", "type": "document", "media": {"data": big}}))).await;
    s.expect(ErrorCode::UnsupportedMediaType, s.admin(Method::POST, &send("e")).header("content-type", "text/plain").body("hi")).await;
    s.expect(ErrorCode::InvalidRecipient, s.admin(Method::POST, &send("e")).json(&text("555", "x"))).await;
    s.expect(ErrorCode::InvalidPhoneNumber, s.admin(Method::POST, "/v1/sessions").json(&json!({"name": "p", "phoneNumber": "12"}))).await;
    s.expect(ErrorCode::InvalidSessionName, s.admin(Method::GET, "/v1/sessions/Not_A_Name")).await;
    s.expect(ErrorCode::EmptyText, s.admin(Method::POST, &send("e")).json(&text("+15551234567", "  "))).await;
    s.expect(ErrorCode::ValidationFailed, s.admin(Method::POST, &send("e")).json(&json!({"to": "+15551234567", "type": "sticker", "text": "x"}))).await;
    let ok = s.admin(Method::POST, &send("slow")).json(&text("+15551234567", "1")).send().await.unwrap();
    assert_eq!(ok.status(), 201);
    s.expect(ErrorCode::RateLimited, s.admin(Method::POST, &send("slow")).json(&text("+15551234567", "2"))).await;
    s.expect(ErrorCode::RecipientNotOnWhatsapp, s.admin(Method::POST, &send("e")).json(&text("+9995550000", "x"))).await;

    // QR_NOT_AVAILABLE: logged out, no QR until restarted.
    gw.connected_session("out", json!({})).await;
    let (status, _) = gw.call(Method::POST, "/v1/sessions/out/logout", None).await;
    assert_eq!(status, 200);
    gw.wait_phase("out", "LoggedOut").await;
    s.expect(ErrorCode::QrNotAvailable, s.admin(Method::GET, "/v1/sessions/out/qr")).await;

    // SESSION_NOT_READY: a session whose process cannot start.
    std::fs::write(gw.data_dir.join("sessions").join("broken"), b"x").unwrap();
    let (status, _) = gw.call(Method::POST, "/v1/sessions", Some(json!({"name": "broken", "engine": "sandbox"}))).await;
    assert_eq!(status, 201);
    s.expect(ErrorCode::SessionNotReady, s.admin(Method::POST, &send("broken")).json(&text("+15551234567", "x"))).await;

    // TIMEOUT: the pod stops answering.
    let pid = gw.session_pid("e").unwrap();
    signal(pid, libc::SIGSTOP);
    s.expect(ErrorCode::Timeout, s.admin(Method::POST, &send("e")).json(&text("+15551234567", "x"))).await;
    signal(pid, libc::SIGCONT);

    // UNAVAILABLE: the database is gone (PostgreSQL) or held by another writer past the
    // busy timeout (SQLite).
    match kind {
        DbKind::Postgres => {
            db.drop_now();
            s.expect(ErrorCode::Unavailable, s.admin(Method::GET, "/v1/sessions/e/messages")).await;
            let ready = s.r(Method::GET, "/readyz", None).send().await.unwrap();
            assert_eq!(ready.status(), 503);
        }
        DbKind::Sqlite => {
            use sqlx::Connection as _;
            let mut conn = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
            sqlx::query("BEGIN EXCLUSIVE").execute(&mut conn).await.unwrap();
            let started = std::time::Instant::now();
            s.expect(ErrorCode::Unavailable, s.admin(Method::POST, "/v1/keys").json(&json!({"name": "x", "admin": true}))).await;
            assert!(started.elapsed() < Duration::from_secs(20));
            sqlx::query("ROLLBACK").execute(&mut conn).await.unwrap();
        }
    }

    // OVERLOADED needs a gateway started with a small in-flight limit: `overload.rs`.
    let elsewhere = [ErrorCode::Internal, ErrorCode::SendFailed, ErrorCode::SendOutcomeUnknown, ErrorCode::Overloaded];
    let all: BTreeSet<String> = ErrorCode::ALL.iter().filter(|c| !elsewhere.contains(c)).map(|c| c.as_str().to_owned()).collect();
    let missing: Vec<_> = all.difference(&s.codes).collect();
    assert!(missing.is_empty(), "error codes not covered: {missing:?}");
}
