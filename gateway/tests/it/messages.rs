//! Sends through the gateway to real sandbox sessions: sync and async, media as JSON and
//! multipart, status progress from receipts, history with filters and pages, inbound
//! messages; idempotent retries that send once; the outbox surviving a killed gateway; a
//! pod that stops answering mid-send.

use std::collections::HashSet;
use std::time::Duration;

use base64::Engine as _;
use reqwest::Method;
use serde_json::{Value, json};

use crate::both;
use crate::common::*;

/// A 1×1 PNG.
pub const PNG: &[u8] = &[
    0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A, 0x00, 0x00, 0x00, 0x0D, 0x49, 0x48, 0x44, 0x52, 0x00, 0x00, 0x00, 0x01,
    0x00, 0x00, 0x00, 0x01, 0x08, 0x06, 0x00, 0x00, 0x00, 0x1F, 0x15, 0xC4, 0x89, 0x00, 0x00, 0x00, 0x0D, 0x49, 0x44, 0x41,
    0x54, 0x78, 0x9C, 0x63, 0xF8, 0xCF, 0xC0, 0x00, 0x00, 0x03, 0x01, 0x01, 0x00, 0xC9, 0xFE, 0x92, 0xEF, 0x00, 0x00, 0x00,
    0x00, 0x49, 0x45, 0x4E, 0x44, 0xAE, 0x42, 0x60, 0x82,
];

pub fn text(to: &str, body: &str) -> Value {
    json!({"to": to, "type": "text", "text": body})
}

async fn send(gw: &Gateway, session: &str, body: Value, key: Option<&str>, prefer_async: bool) -> reqwest::Response {
    let mut r = gw.req(Method::POST, &format!("/v1/sessions/{session}/messages"), Some(ADMIN)).json(&body);
    if let Some(k) = key {
        r = r.header("idempotency-key", k);
    }
    if prefer_async {
        r = r.header("prefer", "respond-async");
    }
    r.send().await.unwrap()
}

async fn sent_total(gw: &Gateway, session: &str) -> f64 {
    gw.metric(&format!("wa_session_messages_sent_total{{namespace=\"local\",session=\"{session}\"}}")).await.unwrap_or(-1.0)
}

/// Waits until the pod's own count of sent messages (collected by the gateway) is `n`, and
/// checks it stays there.
async fn expect_sent_total(gw: &Gateway, session: &str, n: f64) {
    for _ in 0..100 {
        if sent_total(gw, session).await == n {
            tokio::time::sleep(Duration::from_millis(700)).await;
            assert_eq!(sent_total(gw, session).await, n, "the pod sent more than expected");
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the pod reports {} sends, expected {n}", sent_total(gw, session).await);
}

both!(sends_statuses_and_history, sends_and_history);
async fn sends_and_history(kind: DbKind) {
    let (_dir, _db, gw) = setup(kind, &Options::default());
    gw.connected_session("m1", json!({"rateLimit": {"messagesPerMinute": 6000, "burst": 100}})).await;

    // Sync text: 201 with the WhatsApp id; receipts take it to read.
    let resp = send(&gw, "m1", text("+15551234567", "hello"), None, false).await;
    assert_eq!(resp.status(), 201);
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    let m: Value = resp.json().await.unwrap();
    assert_eq!(location, format!("/v1/messages/{}", m["id"].as_str().unwrap()));
    assert_eq!((m["status"].as_str(), m["direction"].as_str()), (Some("sent"), Some("outbound")));
    assert!(m["waMessageId"].as_str().unwrap().starts_with("3EB0"), "{m}");
    let text_id = m["id"].as_str().unwrap().to_owned();
    gw.wait_message(&text_id, "read", |m| m["status"] == "read").await;

    // Media as base64 JSON and as multipart.
    let b64 = base64::engine::general_purpose::STANDARD.encode(PNG);
    let resp = send(&gw, "m1", json!({"to": "+15559876543", "type": "image", "media": {"data": b64}, "caption": "pic"}), None, false).await;
    assert_eq!(resp.status(), 201);
    let m: Value = resp.json().await.unwrap();
    assert_eq!((m["type"].as_str(), m["media"]["mimetype"].as_str(), m["text"].as_str()), (Some("image"), Some("image/png"), Some("pic")));
    let form = reqwest::multipart::Form::new()
        .text("to", "+15559876543")
        .text("type", "document")
        .text("caption", "the report")
        .part("file", reqwest::multipart::Part::bytes(b"%PDF-1.4 report".to_vec()).file_name("report.pdf").mime_str("application/pdf").unwrap());
    let resp = gw.req(Method::POST, "/v1/sessions/m1/messages", Some(ADMIN)).multipart(form).send().await.unwrap();
    assert_eq!(resp.status(), 201);
    let m: Value = resp.json().await.unwrap();
    assert_eq!((m["media"]["filename"].as_str(), m["media"]["mimetype"].as_str()), (Some("report.pdf"), Some("application/pdf")));

    // An inbound message arrives through the pod's events.
    let (status, body) = gw
        .call(Method::POST, "/v1/sessions/m1/sandbox/inbound", Some(json!({"from": "+15550002222", "text": "hi there", "pushName": "Ann"})))
        .await;
    assert_eq!(status, 200, "{body}");
    let mut inbound = Value::Null;
    for _ in 0..200 {
        let (_, page) = gw.call(Method::GET, "/v1/sessions/m1/messages?direction=inbound", None).await;
        if let Some(first) = page["items"].as_array().and_then(|a| a.first()) {
            inbound = first.clone();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!((inbound["text"].as_str(), inbound["status"].as_str()), (Some("hi there"), Some("received")), "{inbound}");
    assert_eq!((inbound["from"].as_str(), inbound["pushName"].as_str()), (Some("15550002222@s.whatsapp.net"), Some("Ann")));
    assert_eq!(inbound["waMessageId"], body["id"]);

    // History: newest first, filters, pages.
    let (_, all) = gw.call(Method::GET, "/v1/sessions/m1/messages", None).await;
    let items = all["items"].as_array().unwrap();
    assert_eq!(items.len(), 4);
    assert_eq!(items[0]["direction"], "inbound");
    assert_eq!(items[3]["id"].as_str(), Some(text_id.as_str()));
    let (_, chat) = gw.call(Method::GET, "/v1/sessions/m1/messages?chat=%2B15559876543", None).await;
    assert_eq!(chat["items"].as_array().unwrap().len(), 2);
    let (_, page1) = gw.call(Method::GET, "/v1/sessions/m1/messages?limit=3", None).await;
    assert_eq!(page1["items"].as_array().unwrap().len(), 3);
    let cursor = page1["nextCursor"].as_str().unwrap();
    let (_, page2) = gw.call(Method::GET, &format!("/v1/sessions/m1/messages?limit=3&cursor={cursor}"), None).await;
    assert_eq!(page2["items"].as_array().unwrap().len(), 1);
    assert!(page2.get("nextCursor").is_none());
    let future = "2099-01-01T00:00:00Z";
    let (_, none) = gw.call(Method::GET, &format!("/v1/sessions/m1/messages?since={future}"), None).await;
    assert_eq!(none["items"].as_array().unwrap().len(), 0);
    let (_, before) = gw.call(Method::GET, &format!("/v1/sessions/m1/messages?until={future}&direction=outbound"), None).await;
    assert_eq!(before["items"].as_array().unwrap().len(), 3);

    // WhatsApp refuses: the message is recorded as failed with the reason.
    let resp = send(&gw, "m1", text("+9995551234", "to nobody"), None, false).await;
    assert_eq!(resp.status(), 422);
    let id = resp.headers()["x-message-id"].to_str().unwrap().to_owned();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "RECIPIENT_NOT_ON_WHATSAPP");
    let (_, m) = gw.call(Method::GET, &format!("/v1/messages/{id}"), None).await;
    assert_eq!((m["status"].as_str(), m["error"]["code"].as_str()), (Some("failed"), Some("RECIPIENT_NOT_ON_WHATSAPP")), "{m}");
    assert!(m["error"]["message"].as_str().unwrap().contains("not on WhatsApp"));
}

both!(idempotent_retry_sends_once, idempotency);
async fn idempotency(kind: DbKind) {
    let (_dir, _db, gw) = setup(kind, &Options::default());
    gw.connected_session("idem", json!({"rateLimit": {"messagesPerMinute": 6000, "burst": 100}})).await;

    let first = send(&gw, "idem", text("+15551234567", "once"), Some("order-1"), false).await;
    let status = first.status();
    let first: Value = first.json().await.unwrap();
    assert_eq!(status, 201, "{first}");
    let again = send(&gw, "idem", text("+15551234567", "once"), Some("order-1"), false).await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: Value = again.json().await.unwrap();
    assert_eq!((&again["id"], &again["waMessageId"]), (&first["id"], &first["waMessageId"]));

    let other = send(&gw, "idem", text("+15551234567", "different"), Some("order-1"), false).await;
    assert_eq!(other.status(), 409);
    let other: Value = other.json().await.unwrap();
    assert_eq!(other["error"]["code"], "IDEMPOTENCY_CONFLICT");

    // Eight clients retry at once with one key: one send, one message.
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let gw_url = gw.url.clone();
            tokio::spawn(async move {
                let r = reqwest::Client::new()
                    .post(format!("{gw_url}/v1/sessions/idem/messages"))
                    .bearer_auth(ADMIN)
                    .header("idempotency-key", "order-2")
                    .json(&text("+15551234567", "together"))
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let body: Value = r.json().await.unwrap();
                (status, body["id"].as_str().unwrap_or_default().to_owned())
            })
        })
        .collect();
    let mut ids = HashSet::new();
    let mut created = 0;
    for t in tasks {
        let (status, id) = t.await.unwrap();
        assert!(status == 201 || status == 200, "{status}");
        created += usize::from(status == 201);
        ids.insert(id);
    }
    assert_eq!((ids.len(), created), (1, 1), "one message, created once");

    // Async with a key: queued once, replayed after.
    let q = send(&gw, "idem", text("+15551234567", "later"), Some("order-3"), true).await;
    assert_eq!(q.status(), 202);
    assert_eq!(q.headers()["preference-applied"], "respond-async");
    let q: Value = q.json().await.unwrap();
    gw.wait_message(q["id"].as_str().unwrap(), "sent", |m| m["waMessageId"].is_string()).await;
    let q2 = send(&gw, "idem", text("+15551234567", "later"), Some("order-3"), true).await;
    assert_eq!(q2.status(), 200);

    // The pod itself counted exactly three sends.
    expect_sent_total(&gw, "idem", 3.0).await;

    // The metrics these numbers came from pass promtool and carry every exported family.
    let text = gw.http.get(format!("{}/metrics", gw.url)).send().await.unwrap().text().await.unwrap();
    for (name, kind, _) in wa_gateway::metrics::EXPORTED {
        assert!(text.contains(&format!("# TYPE {name} {kind}\n")), "{name} missing from /metrics");
    }
    assert!(text.contains("wa_session_resident_memory_bytes{namespace=\"local\",session=\"idem\"}"), "{text}");
    promtool_check(&text);
}

/// `promtool check metrics` must accept the exposition (promtool is installed by the test command).
pub fn promtool_check(text: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is needed (Debian package prometheus; scripts/test installs it)");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

both!(async_queue_survives_gateway_kill, survives_kill);
async fn survives_kill(kind: DbKind) {
    const N: usize = 30;
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new(kind, dir.path());
    let data = dir.path().join("data");
    // The session pods log each message their engine sends (with its WhatsApp id) to
    // data/logs/<session>.log, appended across restarts: the count of what WhatsApp got.
    let mut opts = Options::default();
    opts.args.extend(["--session-env".into(), "WA_LOG=info,wa_session::session=debug".into()]);
    let mut gw = Gateway::start(&data, &db, &opts);
    gw.connected_session("q", json!({"rateLimit": {"messagesPerMinute": 6000, "burst": 1000}})).await;

    let mut ids = Vec::new();
    for i in 0..N {
        let resp = send(&gw, "q", text("+15551234567", &format!("queued {i}")), Some(&format!("k-{i}")), true).await;
        assert_eq!(resp.status(), 202);
        let m: Value = resp.json().await.unwrap();
        ids.push(m["id"].as_str().unwrap().to_owned());
    }
    // Crash with sends queued and in flight.
    gw.kill();

    let gw = Gateway::start(&data, &db, &opts);
    // Each accepted message ends sent, or failed SEND_OUTCOME_UNKNOWN when the session
    // process was stopped (with the gateway) between starting and finishing its send: the pod
    // then refuses to guess, and so does the gateway. None stays queued.
    let mut wa_ids = HashSet::new();
    let mut unknown = 0;
    for id in &ids {
        let m = gw
            .wait_message(id, "settled", |m| m["waMessageId"].is_string() || m["status"] == "failed")
            .await;
        match m["waMessageId"].as_str() {
            Some(wa) => assert!(wa_ids.insert(wa.to_owned()), "two messages share a WhatsApp id: {m}"),
            None => {
                assert_eq!(m["error"]["code"], "SEND_OUTCOME_UNKNOWN", "{m}");
                unknown += 1;
            }
        }
    }
    assert!(unknown <= 2, "{unknown} sends were cut off; only those in flight at the kill can be");
    let store = db.store().await;
    assert_eq!(store.outbox_depth().await.unwrap(), 0, "nothing is stuck in the outbox");
    store.close().await;

    // What the engine sent, across both lives of the session process: each message at most
    // once, and every recorded one exactly once.
    let log = std::fs::read_to_string(data.join("logs").join("q.log")).unwrap();
    let sent: Vec<&str> = log.lines().filter_map(sent_id).collect();
    let distinct: HashSet<String> = sent.iter().map(|s| s.to_string()).collect();
    assert_eq!(sent.len(), distinct.len(), "the engine sent a message twice");
    assert!(wa_ids.is_subset(&distinct), "a recorded WhatsApp id the engine never sent");
    assert!(sent.len() <= N && sent.len() - wa_ids.len() <= unknown, "the engine sent {} messages for {N} accepted ones", sent.len());
}

/// The WhatsApp id from a session pod's "sent" debug line.
fn sent_id(line: &str) -> Option<&str> {
    if !line.contains("wa_session::session") || !line.contains(" sent") {
        return None;
    }
    let start = line.find("id=")? + 3;
    let rest = &line[start..];
    let end = rest.find(|c: char| !c.is_ascii_alphanumeric()).unwrap_or(rest.len());
    Some(&rest[..end]).filter(|id| id.starts_with("3EB0"))
}

both!(pod_stops_answering_mid_send, pod_timeout);
async fn pod_timeout(kind: DbKind) {
    let (_dir, db, gw) = setup(kind, &Options::default());
    gw.connected_session("t", json!({"rateLimit": {"messagesPerMinute": 6000, "burst": 100}})).await;
    let pid = gw.session_pid("t").unwrap();

    // The pod hangs: the sync send times out and is recorded as failed with the reason.
    signal(pid, libc::SIGSTOP);
    let resp = send(&gw, "t", text("+15551234567", "stuck"), Some("retry-me"), false).await;
    assert_eq!(resp.status(), 504);
    let id = resp.headers()["x-message-id"].to_str().unwrap().to_owned();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "TIMEOUT");
    let (_, m) = gw.call(Method::GET, &format!("/v1/messages/{id}"), None).await;
    assert_eq!((m["status"].as_str(), m["error"]["code"].as_str()), (Some("failed"), Some("TIMEOUT")), "{m}");
    // An async send meanwhile waits in the outbox.
    let q = send(&gw, "t", text("+15551234567", "queued while hung"), None, true).await;
    assert_eq!(q.status(), 202);
    let qid = q.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();

    signal(pid, libc::SIGCONT);
    // The retry with the same key is answered from the pod's record of the first forward
    // (which it did receive): sent once.
    let retry = send(&gw, "t", text("+15551234567", "stuck"), Some("retry-me"), false).await;
    assert_eq!(retry.status(), 201, "{}", retry.text().await.unwrap());
    gw.wait_message(&id, "read", |m| m["status"] == "read").await;
    gw.wait_message(&qid, "read", |m| m["status"] == "read").await;
    expect_sent_total(&gw, "t", 2.0).await;
    let store = db.store().await;
    for _ in 0..50 {
        if store.early_receipt_count().await.unwrap() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(store.early_receipt_count().await.unwrap(), 0);
    store.close().await;
}
