//! Security, each with the real `wa-gateway local` and real session processes:
//! keys stored only as hashes (every table and column read back), scoped keys 403 / revoked
//! keys 401 / no key 401 on every route of the OpenAPI document, the pods' internal API
//! refusing requests without their token on every route of `wa_session::http::ROUTES`, body
//! limits (413, nothing recorded), session names validated as DNS labels on every way in
//! (no file touched outside the data directory), nothing secret in the logs at info level,
//! and webhook signatures that stop verifying after 5 minutes.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use sha2::Digest;
use sqlx::Row;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::both;
use crate::common::*;

// ---- helpers ----------------------------------------------------------------------------

/// One `table: row` line per row.
fn push_rows(out: &mut String, table: &str, rows: Vec<String>) {
    for r in rows {
        out.push_str(&format!("{table}: {r}\n"));
    }
}

/// Every table and column of the gateway's database, one line per row.
async fn dump_database(db: &TestDb) -> String {
    let mut out = String::new();
    match db.kind {
        DbKind::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&db.url).await.unwrap();
            let tables: Vec<String> = sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table'")
                .fetch_all(&pool)
                .await
                .unwrap();
            for t in tables {
                let cols: Vec<String> = sqlx::query(sqlx::AssertSqlSafe(format!("PRAGMA table_info(\"{t}\")")))
                    .fetch_all(&pool)
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| r.get::<String, _>("name"))
                    .collect();
                if cols.is_empty() {
                    continue;
                }
                // quote() renders every type as text (blobs as X'…' hex).
                let expr = cols.iter().map(|c| format!("quote(\"{c}\")")).collect::<Vec<_>>().join(" || '|' || ");
                let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT {expr} FROM \"{t}\"")))
                    .fetch_all(&pool)
                    .await
                    .unwrap();
                push_rows(&mut out, &t, rows);
            }
            pool.close().await;
        }
        DbKind::Postgres => {
            let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
            let tables: Vec<String> = sqlx::query_scalar(
                "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public' AND table_type = 'BASE TABLE'",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            for t in tables {
                let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT row_to_json(t)::text FROM \"{t}\" t")))
                    .fetch_all(&pool)
                    .await
                    .unwrap();
                push_rows(&mut out, &t, rows);
            }
            pool.close().await;
        }
    }
    out
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The files under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &str) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|p| std::fs::read(p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle.as_bytes())))
        .collect()
}

/// A session process's listen address and token, as its supervisor gave them (its environment).
fn pod_env(gw: &Gateway, session: &str) -> (String, String) {
    let pid = gw.session_pid(session).expect("session pid file");
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let var = |name: &str| {
        environ
            .split(|b| *b == 0)
            .filter_map(|kv| std::str::from_utf8(kv).ok())
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")).map(str::to_owned))
            .unwrap_or_else(|| panic!("{name} not in the session's environment"))
    };
    (var("WA_LISTEN"), var("WA_TOKEN"))
}

/// An HTTP/1.1 request written byte for byte (reqwest would normalize `..` and `%2e%2e` away).
async fn raw_request(base: &str, method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, Value) {
    let addr = base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut resp = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut resp)).await.expect("answer within 20 s").unwrap();
    let text = String::from_utf8_lossy(&resp).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_owned() };
    (status, serde_json::from_str(&body).unwrap_or(Value::String(body)))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The stable code of an error answer in either shape (ours, or the older gateways').
fn code_of(body: &Value) -> String {
    body.pointer("/error/code")
        .or_else(|| body.get("error_code"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned()
}

/// One operation of the served OpenAPI document.
#[derive(Debug, Clone)]
struct Op {
    id: String,
    method: Method,
    path: String,
    security: Vec<String>,
    path_params: Vec<String>,
    query_params: Vec<String>,
    body_types: Vec<String>,
}

async fn operations(gw: &Gateway) -> Vec<Op> {
    let doc: Value = gw.http.get(format!("{}/openapi.json", gw.url)).send().await.unwrap().json().await.unwrap();
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let params = op["parameters"].as_array().cloned().unwrap_or_default();
            let names = |loc: &str| {
                params.iter().filter(|p| p["in"] == loc).map(|p| p["name"].as_str().unwrap().to_owned()).collect::<Vec<_>>()
            };
            ops.push(Op {
                id: op["operationId"].as_str().unwrap().to_owned(),
                method: Method::from_bytes(method.to_ascii_uppercase().as_bytes()).unwrap(),
                path: path.clone(),
                security: op["security"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .flat_map(|s| s.as_object().unwrap().keys().cloned())
                    .collect(),
                path_params: names("path"),
                query_params: names("query"),
                body_types: op["requestBody"]["content"].as_object().map(|c| c.keys().cloned().collect()).unwrap_or_default(),
            });
        }
    }
    assert!(ops.len() >= 30, "the document lists {} operations", ops.len());
    ops
}

/// Ids of things that belong to the target session, so every route reaches its check.
struct Target {
    session: String,
    message: String,
    webhook: String,
    delivery: String,
    key: String,
}

/// A request for `op` aimed at `t.session` (path, query and body name it).
fn request_for(gw: &Gateway, op: &Op, t: &Target, key: Option<&str>) -> reqwest::RequestBuilder {
    let mut path = op.path.clone();
    for p in &op.path_params {
        let v = match (p.as_str(), op.id.as_str()) {
            ("name" | "sessionId", _) => t.session.clone(),
            ("id", "getMessage") => t.message.clone(),
            ("id", id) if id.contains("Key") => t.key.clone(),
            ("id", _) => t.webhook.clone(),
            ("deliveryId", _) => t.delivery.clone(),
            (other, _) => panic!("{}: a path parameter {other} this test does not know; teach it", op.id),
        };
        path = path.replace(&format!("{{{p}}}"), &v);
    }
    let query: Vec<(String, String)> = op
        .query_params
        .iter()
        .filter(|q| q.as_str() == "sessionId")
        .map(|q| (q.clone(), t.session.clone()))
        .collect();
    let mut r = gw.http.request(op.method.clone(), format!("{}{path}", gw.url)).query(&query);
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    let to = "+15551234567";
    if op.body_types.iter().any(|c| c == "application/json") {
        let body = match op.id.as_str() {
            "createSession" => json!({"name": "zz-new", "engine": "sandbox"}),
            "createKey" => json!({"name": "x", "admin": true}),
            "createWebhook" => json!({"url": "http://127.0.0.1:9/x"}),
            "pairCode" => json!({"phoneNumber": to}),
            "sandboxInbound" => json!({"from": to, "text": "x"}),
            "sendMessage" => json!({"to": to, "type": "text", "text": "x"}),
            "compatSessionSend" => json!({"to": to, "message": "x"}),
            "compatSendText" => json!({"recipient": to, "message": "x", "sessionId": t.session}),
            "compatInitSession" | "compatDisconnectSession" => json!({"sessionId": t.session}),
            "podEvents" => json!({"events": []}),
            _ => json!({}),
        };
        r = r.json(&body);
    } else if op.body_types.iter().any(|c| c == "multipart/form-data") {
        let form = reqwest::multipart::Form::new()
            .text("recipient", to)
            .text("sessionId", t.session.clone())
            .part("file", reqwest::multipart::Part::bytes(b"%PDF-1.4 x".to_vec()).file_name("a.pdf"));
        r = r.multipart(form);
    }
    r
}

async fn answer(r: reqwest::RequestBuilder) -> (u16, Value) {
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

// ---- keys stored only as hashes ---------------------------------------------------------

both!(keys_are_stored_only_as_hashes, keys_hashed);
async fn keys_hashed(kind: DbKind) {
    let (dir, db, gw) = setup(kind, &Options::default());
    gw.connected_session("alpha", json!({})).await;
    let mut keys = vec![ADMIN.to_owned()];
    for body in [
        json!({"name": "scoped-key-name", "permissions": ["send", "read", "manage"], "sessions": ["alpha"]}),
        json!({"name": "admin-key-name", "admin": true}),
    ] {
        let (status, created) = gw.call(Method::POST, "/v1/keys", Some(body)).await;
        assert_eq!(status, 201, "{created}");
        let key = created["key"].as_str().unwrap().to_owned();
        // Used once, so every path that touches a key (lookup, cache, last use) has run.
        let (status, _) = gw.call_as(&key, Method::POST, "/v1/sessions/alpha/messages", Some(json!({"to": "+15551234567", "type": "text", "text": "hi"}))).await;
        assert_eq!(status, 201);
        keys.push(key);
    }
    let dump = dump_database(&db).await;
    // The dump sees the data: names and hashes are there.
    assert!(dump.contains("scoped-key-name") && dump.contains("admin-key-name"), "the dump misses the keys table:\n{dump}");
    for key in &keys[1..] {
        let hash = hex::encode(sha2::Sha256::digest(key.as_bytes()));
        assert!(dump.contains(&hash), "hash of a key not found: the dump is incomplete");
    }
    for key in &keys {
        let secret = key.trim_start_matches("wak_");
        assert!(!dump.contains(secret), "a raw key is stored in the database:\n{}", dump.lines().filter(|l| l.contains(secret)).collect::<Vec<_>>().join("\n"));
        // Nor anywhere on disk: the SQLite file and its WAL, the session data, the logs.
        let found = files_containing(dir.path(), secret);
        assert!(found.is_empty(), "a raw key is in {found:?}");
    }
}

// ---- scoped, revoked and missing keys on every route -------------------------------------

both!(keys_are_refused_on_every_route_they_may_not_use, every_route_refuses);
async fn every_route_refuses(kind: DbKind) {
    let (_dir, _db, gw) = setup(kind, &Options::default());
    gw.connected_session("alpha", json!({})).await;
    gw.connected_session("beta", json!({})).await;
    let sink = Sink::start(200).await;
    let (_, hook) = gw.call(Method::POST, "/v1/sessions/beta/webhooks", Some(json!({"url": sink.url}))).await;
    let (status, msg) = gw.call(Method::POST, "/v1/sessions/beta/messages", Some(json!({"to": "+15551234567", "type": "text", "text": "b"}))).await;
    assert_eq!(status, 201, "{msg}");
    sink.wait_for(1).await;
    let hook_id = hook["id"].as_str().unwrap().to_owned();
    let (_, deliveries) = gw.call(Method::GET, &format!("/v1/sessions/beta/webhooks/{hook_id}/deliveries"), None).await;
    let (_, created) = gw
        .call(Method::POST, "/v1/keys", Some(json!({"name": "alpha-only", "permissions": ["send", "read", "manage"], "sessions": ["alpha"]})))
        .await;
    let key = created["key"].as_str().unwrap().to_owned();
    let beta = Target {
        session: "beta".into(),
        message: msg["id"].as_str().unwrap().into(),
        webhook: hook_id,
        delivery: deliveries["items"][0]["id"].as_str().unwrap().into(),
        key: created["id"].as_str().unwrap().into(),
    };
    let ops = operations(&gw).await;

    // A key of alpha, with every permission, on beta: 403 on every route but the listing.
    let mut checked = BTreeSet::new();
    for op in &ops {
        let (status, body) = answer(request_for(&gw, op, &beta, Some(&key))).await;
        let what = format!("{} {} {}", op.id, op.method, op.path);
        match () {
            _ if op.security.is_empty() => assert!(status < 400, "{what} is public but answered {status}: {body}"),
            _ if op.security == ["podToken"] => assert_eq!(status, 401, "{what}: {body}"),
            _ if op.id == "listSessions" => {
                assert_eq!(status, 200, "{what}: {body}");
                let names: Vec<_> = body["items"].as_array().unwrap().iter().map(|s| s["name"].clone()).collect();
                assert_eq!(names, [json!("alpha")], "{what} lists another session");
            }
            _ => {
                assert_eq!((status, code_of(&body).as_str()), (403, "FORBIDDEN"), "{what}: {body}");
                checked.insert(op.id.clone());
            }
        }
    }
    // Every session route is among them (a new route is covered by being in the document).
    for must in ["sendMessage", "getMessage", "getSession", "deleteSession", "listWebhooks", "redeliver", "compatSessionSend", "compatSendText", "compatSendMedia"] {
        assert!(checked.contains(must), "{must} was not checked: {checked:?}");
    }
    // Nothing was sent from beta by alpha's key: beta has its one message.
    let (_, page) = gw.call(Method::GET, "/v1/sessions/beta/messages?direction=outbound", None).await;
    assert_eq!(page["items"].as_array().unwrap().len(), 1, "{page}");

    // Revoked: 401 on every route that takes a key, its own session's included.
    let (status, _) = gw.call(Method::DELETE, &format!("/v1/keys/{}", beta.key), None).await;
    assert_eq!(status, 204);
    let alpha = Target { session: "alpha".into(), ..beta };
    for (label, k) in [("revoked", Some(key.as_str())), ("no key", None), ("unknown key", Some("wak_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"))] {
        let mut n = 0;
        for op in ops.iter().filter(|o| !o.security.is_empty()) {
            let (status, body) = answer(request_for(&gw, op, &alpha, k)).await;
            assert_eq!(status, 401, "{label}: {} {} {}: {body}", op.id, op.method, op.path);
            n += 1;
        }
        assert!(n >= 30, "{label}: only {n} routes");
    }
}

// ---- the pods' internal API needs the pod's token ------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_api_refuses_requests_without_its_token() {
    use wa_session::http::{Access, ROUTES};
    let (_dir, _db, gw) = setup(DbKind::Sqlite, &Options::default());
    gw.connected_session("alpha", json!({})).await;
    let (listen, token) = pod_env(&gw, "alpha");
    let base = format!("http://{listen}");
    let http = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(10)).build().unwrap();
    let (mut refused, mut open) = (0, 0);
    for route in ROUTES {
        let method = Method::from_bytes(route.method.as_bytes()).unwrap();
        let url = format!("{base}{}", route.path.replace("{id}", "3EB0AAAAAAAAAAAAAAAAAA"));
        let what = format!("{} {}", route.method, route.path);
        for auth in [None, Some("Bearer not-the-token".to_owned()), Some(format!("Bearer {ADMIN}")), Some(format!("Basic {token}"))] {
            let mut r = http.request(method.clone(), &url);
            if let Some(a) = &auth {
                r = r.header("authorization", a);
            }
            let (status, body) = answer(r).await;
            match route.access {
                Access::Token => {
                    assert_eq!((status, code_of(&body).as_str()), (401, "UNAUTHORIZED"), "{what} with {auth:?}: {body}");
                    refused += 1;
                }
                Access::Public => {
                    assert_eq!(status, 200, "{what}: {body}");
                    open += 1;
                }
            }
        }
        // The token itself is accepted (so the refusals above are about the token).
        if route.access == Access::Token && !route.path.contains("logout") {
            let (status, body) = answer(http.request(method.clone(), &url).bearer_auth(&token)).await;
            assert_ne!(status, 401, "{what} refuses its own token: {body}");
        }
    }
    assert!(refused >= 11 * 4 && open == 2 * 4, "{refused} refusals, {open} open");
}

// ---- request body limits -----------------------------------------------------------------

both!(request_bodies_over_the_limit_get_413_and_record_nothing, body_limits);
async fn body_limits(kind: DbKind) {
    let mut opts = Options::default();
    opts.args.extend(["--session-env".into(), "WA_MEDIA_MAX_BYTES=100000".into()]);
    let (_dir, _db, gw) = setup(kind, &opts);
    gw.connected_session("alpha", json!({})).await;
    let big_text = "x".repeat(300_000);

    // Gateway: small JSON routes (64 KiB) and the send routes (media limit · 4/3 + 64 KiB).
    let cases = [
        ("/v1/sessions", json!({"name": "big", "engine": "sandbox", "pad": "y".repeat(70_000)})),
        ("/v1/keys", json!({"name": "y".repeat(70_000), "admin": true})),
        ("/v1/sessions/alpha/messages", json!({"to": "+15551234567", "type": "text", "text": big_text})),
        ("/v1/sessions/alpha/sandbox/inbound", json!({"from": "+15551234567", "text": big_text})),
        ("/api/sessions/alpha/send", json!({"to": "+15551234567", "message": big_text})),
        ("/api/v1/messages/send-text/", json!({"recipient": "+15551234567", "message": big_text})),
    ];
    for (path, body) in cases {
        let (status, resp) = gw.call(Method::POST, path, Some(body)).await;
        assert_eq!((status, code_of(&resp).as_str()), (413, "PAYLOAD_TOO_LARGE"), "{path}: {resp}");
    }
    let form = reqwest::multipart::Form::new()
        .text("to", "+15551234567")
        .part("file", reqwest::multipart::Part::bytes(vec![7u8; 300_000]).file_name("a.bin"));
    let (status, resp) = answer(gw.req(Method::POST, "/v1/sessions/alpha/messages", Some(ADMIN)).multipart(form)).await;
    assert_eq!((status, code_of(&resp).as_str()), (413, "PAYLOAD_TOO_LARGE"), "multipart: {resp}");
    // Nothing recorded: no session, no key, no message, no inbound.
    let (_, sessions) = gw.call(Method::GET, "/v1/sessions", None).await;
    assert_eq!(sessions["items"].as_array().unwrap().len(), 1, "{sessions}");
    let (_, keys) = gw.call(Method::GET, "/v1/keys", None).await;
    assert_eq!(keys["items"].as_array().unwrap().len(), 0, "{keys}");
    let (_, page) = gw.call(Method::GET, "/v1/sessions/alpha/messages", None).await;
    assert_eq!(page["items"].as_array().unwrap().len(), 0, "{page}");

    // The pod: its limit is the media limit · 4/3 + 1 MiB.
    let (listen, token) = pod_env(&gw, "alpha");
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let pod = |path: &str| format!("http://{listen}{path}");
    let huge = "z".repeat(1_400_000);
    for (path, body) in [
        ("/v1/messages", json!({"to": "+15551234567", "type": "text", "text": huge})),
        ("/v1/sandbox/inbound", json!({"from": "+15551234567", "text": huge})),
    ] {
        let (status, resp) = answer(http.post(pod(path)).bearer_auth(&token).json(&body)).await;
        assert_eq!((status, code_of(&resp).as_str()), (413, "PAYLOAD_TOO_LARGE"), "pod {path}: {resp}");
    }
    let (status, metrics) = answer(http.get(pod("/metrics")).bearer_auth(&token)).await;
    assert_eq!(status, 200);
    let sent: f64 = metrics
        .as_str()
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("wa_session_messages_sent_total") || l.starts_with("wa_session_messages_received_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    // Nothing received means no inbound event was ever queued for the gateway either.
    assert_eq!(sent, 0.0, "the pod counted messages:\n{metrics}");
}

/// A body over the limit is answered 413 on a connection that stays usable: the gateway reads
/// the rest of the body first. Stopping to read and closing would make the client's kernel
/// drop the answer with a reset, and the connection could not carry the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_body_gets_its_answer_and_the_connection_stays_open() {
    let (_dir, _db, gw) = setup(DbKind::Sqlite, &Options::default());
    let addr = gw.url.trim_start_matches("http://").to_owned();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    // 2 MB: far more than the socket buffers hold, so most of it is still on its way when the
    // handler refuses it.
    let body = format!(r#"{{"name":"big","engine":"sandbox","pad":"{}"}}"#, "y".repeat(2_000_000));
    let head = format!(
        "POST /v1/sessions HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {ADMIN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body.as_bytes()).await.expect("the gateway reads the whole body");
    let first = read_response(&mut s).await;
    assert!(first.starts_with("HTTP/1.1 413"), "{first}");
    assert!(first.contains("PAYLOAD_TOO_LARGE"), "{first}");
    s.write_all(format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes()).await.expect("connection still open");
    let second = read_response(&mut s).await;
    assert!(second.starts_with("HTTP/1.1 200"), "the same connection answers the next request: {second:?}");
}

/// One HTTP/1.1 answer with a Content-Length or chunked body, read off a keep-alive connection.
async fn read_response(s: &mut tokio::net::TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut chunk)).await.expect("answer within 20 s").unwrap_or(0);
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some((head, rest)) = text.split_once("\r\n\r\n") {
            let lower = head.to_ascii_lowercase();
            let length = lower.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse::<usize>().ok());
            if length.is_some_and(|n| rest.len() >= n) || (lower.contains("chunked") && rest.ends_with("0\r\n\r\n")) {
                break;
            }
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

// ---- session names are DNS labels on every way in ----------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_names_are_validated_everywhere() {
    let (dir, _db, gw) = setup(DbKind::Sqlite, &Options::default());
    gw.connected_session("alpha", json!({})).await;
    let before: BTreeSet<PathBuf> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.path()).collect();
    let marker = "zq7evil";
    let tricks = [
        "..".to_owned(), "%2e%2e".to_owned(), "%2E%2E".to_owned(), ".".to_owned(),
        format!("..%2f..%2f..%2f{marker}"), format!("%2e%2e%2f%2e%2e%2f{marker}"), format!("..%5c..%5c{marker}"),
        format!("a%2f..%2f..%2f{marker}"), "a%00b".to_owned(), "a%20b".to_owned(), "%c3%a4".to_owned(),
        "Alpha".to_owned(), "ALPHA".to_owned(), "1alpha".to_owned(), "-alpha".to_owned(), "alpha-".to_owned(),
        "a_b".to_owned(), "a.b".to_owned(), "a".repeat(54), "%61lpha%2f".to_owned(),
    ];
    let auth = format!("Bearer {ADMIN}");
    let headers = [("authorization", auth.as_str()), ("content-type", "application/json")];
    let send = br#"{"to":"+15551234567","type":"text","text":"x"}"#;
    let mut n = 0;
    for t in &tricks {
        for (method, target, body) in [
            ("GET", format!("/v1/sessions/{t}"), &b""[..]),
            ("DELETE", format!("/v1/sessions/{t}"), b""),
            ("POST", format!("/v1/sessions/{t}/restart"), b""),
            ("POST", format!("/v1/sessions/{t}/logout"), b""),
            ("GET", format!("/v1/sessions/{t}/qr"), b""),
            ("POST", format!("/v1/sessions/{t}/sandbox/scan"), b""),
            ("POST", format!("/v1/sessions/{t}/messages"), send),
            ("GET", format!("/v1/sessions/{t}/messages"), b""),
            ("GET", format!("/v1/sessions/{t}/webhooks"), b""),
            ("POST", format!("/api/sessions/{t}/send"), br#"{"to":"+15551234567","message":"x"}"#),
            ("GET", format!("/api/v1/sessions/status/?sessionId={t}"), b""),
            ("GET", format!("/api/v1/messages/list/?sessionId={t}"), b""),
        ] {
            let (status, resp) = raw_request(&gw.url, method, &target, &headers, body).await;
            let code = code_of(&resp);
            assert!(
                matches!((status, code.as_str()), (422, "INVALID_SESSION_NAME") | (404, "NOT_FOUND") | (400, "INVALID_REQUEST")),
                "{method} {target}: {status} {resp}"
            );
            n += 1;
        }
        // The same names in bodies.
        let decoded = t.replace("%2f", "/").replace("%2e", ".").replace("%2E", ".").replace("%5c", "\\").replace("%00", "\0").replace("%20", " ");
        for (path, body) in [
            ("/v1/sessions", json!({"name": decoded, "engine": "sandbox"})),
            ("/v1/keys", json!({"name": "k", "permissions": ["send"], "sessions": [decoded]})),
            ("/api/v1/sessions/init/", json!({"sessionId": decoded, "engine": "sandbox"})),
            ("/api/v1/sessions/disconnect/", json!({"sessionId": decoded})),
            ("/api/v1/messages/send-text/", json!({"recipient": "+15551234567", "message": "x", "sessionId": decoded})),
        ] {
            let (status, resp) = gw.call(Method::POST, path, Some(body.clone())).await;
            assert_eq!((status, code_of(&resp).as_str()), (422, "INVALID_SESSION_NAME"), "{path} {body}: {resp}");
            n += 1;
        }
    }
    assert!(n >= tricks.len() * 17);
    // Nothing was created: no session, no key, no file outside the data directory, no directory
    // under sessions/ but alpha's.
    let (_, sessions) = gw.call(Method::GET, "/v1/sessions", None).await;
    assert_eq!(sessions["items"].as_array().unwrap().len(), 1, "{sessions}");
    let (_, keys) = gw.call(Method::GET, "/v1/keys", None).await;
    assert_eq!(keys["items"].as_array().unwrap().len(), 0, "{keys}");
    let after: BTreeSet<PathBuf> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.path()).collect();
    let new: Vec<_> = after.difference(&before).filter(|p| !p.to_string_lossy().contains("gateway.db")).collect();
    assert!(new.is_empty(), "new files next to the data directory: {new:?}");
    let sessions_dir: Vec<_> = std::fs::read_dir(gw.data_dir.join("sessions")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(sessions_dir, ["alpha"], "session directories");
    for root in [dir.path().parent().unwrap(), dir.path()] {
        let hits: Vec<_> = std::fs::read_dir(root).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().contains(marker)).collect();
        assert!(hits.is_empty(), "a path trick reached {root:?}: {hits:?}");
    }
    assert!(files_under(dir.path()).iter().all(|p| !p.to_string_lossy().contains(marker)));
}

// ---- nothing secret in the logs ----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_secret_in_the_logs_at_info_level() {
    let mut opts = Options::default();
    // The default level, as shipped (the other tests turn debug on for the gateway).
    opts.env.push(("WA_GATEWAY_LOG".into(), "info".into()));
    let (dir, db, mut gw) = setup(DbKind::Sqlite, &opts);
    let (status, created) = gw.call(Method::POST, "/v1/keys", Some(json!({"name": "crm", "permissions": ["send", "read", "manage"], "sessions": ["alpha"]}))).await;
    assert_eq!(status, 201);
    let key = created["key"].as_str().unwrap().to_owned();
    gw.connected_session("alpha", json!({})).await;
    let sink = Sink::start(200).await;
    let webhook_secret = "whsec-Q9c8TZ1vLr0mKp2X";
    let (status, hook) = gw.call_as(&key, Method::POST, "/v1/sessions/alpha/webhooks", Some(json!({"url": sink.url, "secret": webhook_secret}))).await;
    assert_eq!(status, 201, "{hook}");
    let outbound = "outbound-text-7f3a9c-ZEBRA";
    let inbound = "inbound-text-2b8e1d-OKAPI";
    let (status, m) = gw.call_as(&key, Method::POST, "/v1/sessions/alpha/messages", Some(json!({"to": "+15551234567", "type": "text", "text": outbound}))).await;
    assert_eq!(status, 201, "{m}");
    let (status, r) = gw.call(Method::POST, "/v1/sessions/alpha/sandbox/inbound", Some(json!({"from": "+15557654321", "text": inbound}))).await;
    assert_eq!(status, 200, "{r}");
    // A refused key and a bad body are logged too, if anything is.
    let (status, _) = gw.call_as(&format!("{key}x"), Method::GET, "/v1/sessions", None).await;
    assert_eq!(status, 401);
    // The webhook got the inbound message, signed (the flow ran end to end).
    let mut delivered = false;
    for _ in 0..300 {
        if sink.all().iter().any(|r| String::from_utf8_lossy(&r.body).contains(inbound)) {
            delivered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(delivered, "the inbound message never reached the webhook");
    let pod_token = {
        let store = db.store().await;
        let rows = store.list_local_sessions().await.unwrap();
        store.close().await;
        rows[0].pod_token.clone()
    };
    gw.stop();
    let mut logs = vec![("gateway".to_owned(), gw.log())];
    for f in files_under(&gw.data_dir.join("logs")) {
        logs.push((f.display().to_string(), std::fs::read_to_string(&f).unwrap()));
    }
    // The logs are there and say something (so an empty capture cannot pass).
    assert!(logs[0].1.contains("alpha"), "gateway log:\n{}", logs[0].1);
    assert!(logs.iter().any(|(n, l)| n.ends_with("alpha.log") && l.contains("session pod ready")), "{logs:?}");
    for (what, secret) in [
        ("admin key", ADMIN),
        ("created key", key.as_str()),
        ("created key's secret part", key.trim_start_matches("wak_")),
        ("pod token", pod_token.as_str()),
        ("webhook secret", webhook_secret),
        ("outbound message text", outbound),
        ("inbound message text", inbound),
    ] {
        for (name, log) in &logs {
            assert!(!log.contains(secret), "the {what} is in the {name} log:\n{}", log.lines().filter(|l| l.contains(secret)).collect::<Vec<_>>().join("\n"));
        }
    }
    drop(dir);
}

// ---- webhook signatures -----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_signatures_verify_and_expire_after_five_minutes() {
    let (_dir, _db, gw) = setup(DbKind::Sqlite, &Options::default());
    gw.connected_session("alpha", json!({})).await;
    let sink = Sink::start(200).await;
    let secret = "a-webhook-secret-of-some-length";
    let (status, hook) = gw.call(Method::POST, "/v1/sessions/alpha/webhooks", Some(json!({"url": sink.url, "secret": secret}))).await;
    assert_eq!(status, 201, "{hook}");
    let (status, _) = gw.call(Method::POST, "/v1/sessions/alpha/sandbox/inbound", Some(json!({"from": "+15557654321", "text": "sign me"}))).await;
    assert_eq!(status, 200);
    let got = sink.wait_for(1).await;
    let d = &got[0];
    let header = d.headers[wa_gateway::delivery::SIGNATURE_HEADER].to_str().unwrap();
    let ts: i64 = header.split(',').find_map(|p| p.strip_prefix("t=")).unwrap().parse().unwrap();
    let now = chrono::Utc::now().timestamp();
    assert!((now - ts).abs() <= 30, "signed at {ts}, now {now}");
    use wa_gateway::delivery::verify;
    assert!(verify(secret, header, &d.body, now, 300), "a real delivery does not verify");
    assert!(verify(secret, header, &d.body, ts + 300, 300), "valid for 5 minutes");
    assert!(!verify(secret, header, &d.body, ts + 301, 300), "replayed after 5 minutes and accepted");
    assert!(!verify(secret, header, &d.body, ts - 301, 300), "a timestamp from the future is accepted");
    let mut tampered = d.body.to_vec();
    tampered.push(b' ');
    assert!(!verify(secret, header, &tampered, now, 300), "a changed body verifies");
    assert!(!verify("another-secret-of-some-length", header, &d.body, now, 300), "another secret verifies");
    // Re-signing the captured body with a fresh timestamp needs the secret: swapping t= breaks it.
    let forged = header.replacen(&format!("t={ts}"), &format!("t={}", ts + 400), 1);
    assert!(!verify(secret, &forged, &d.body, ts + 400, 300), "a replay with a new timestamp verifies");
}
