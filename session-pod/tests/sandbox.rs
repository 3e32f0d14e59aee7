//! The real `wa-session` binary in sandbox mode, driven over HTTP: pairing, QR formats,
//! sends (JSON and multipart), receipts as events, restarts, logout, reconnects, pair codes,
//! the status long poll and the metrics.

mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use reqwest::StatusCode;
use serde_json::{Value, json};
use wa_api::crd::Phase;
use wa_api::pod::{EventBody, MessageStatus, PodEvent, QrCode};

const PNG_1X1: &[u8] = &[
    0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A, 0x00, 0x00, 0x00, 0x0D, 0x49, 0x48, 0x44, 0x52,
    0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x06, 0x00, 0x00, 0x00, 0x1F, 0x15, 0xC4,
    0x89, 0x00, 0x00, 0x00, 0x0D, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9C, 0x63, 0x00, 0x01, 0x00, 0x00,
    0x05, 0x00, 0x01, 0x0D, 0x0A, 0x2D, 0xB4, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4E, 0x44, 0xAE,
    0x42, 0x60, 0x82,
];

fn receipts_of<'a>(
    events: &'a [PodEvent],
    id: &'a str,
) -> impl Iterator<Item = MessageStatus> + 'a {
    events.iter().filter_map(move |e| match &e.body {
        EventBody::Receipt(r) if r.message_id == id => Some(r.status),
        _ => None,
    })
}

fn phases(events: &[PodEvent]) -> Vec<Phase> {
    events
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::State { phase, .. } => Some(*phase),
            _ => None,
        })
        .collect()
}

/// Decodes a QR code from a 1-bit or 8-bit grayscale PNG, as a phone's camera would.
fn scan_png(png_bytes: &[u8]) -> String {
    let decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    let mut reader = decoder.read_info().expect("PNG header");
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).expect("PNG data");
    assert_eq!(info.color_type, png::ColorType::Grayscale);
    let (w, h) = (info.width as usize, info.height as usize);
    let row = info.line_size;
    let bit = info.bit_depth as usize;
    let mut img = rqrr::PreparedImage::prepare_from_greyscale(w, h, |x, y| {
        let light = match bit {
            1 => buf[y * row + x / 8] & (0x80 >> (x % 8)) != 0,
            _ => buf[y * row + x] > 127,
        };
        if light { 255 } else { 0 }
    });
    let grids = img.detect_grids();
    assert_eq!(grids.len(), 1, "one QR code in the PNG");
    grids[0].decode().expect("QR decodes").1
}

#[tokio::test]
async fn pair_by_scan_send_and_receive_events_then_restart_stays_paired() {
    let sink = EventSink::start().await;
    let pod = Pod::start(
        PodOptions::sandbox()
            .events_url(&sink.url)
            .args(["--sandbox-qr-seconds", "0.4"]),
    )
    .await;
    let s = pod
        .wait_phase(Phase::AwaitingScan, Duration::from_secs(5))
        .await;
    assert_eq!(s.engine, wa_api::Engine::Sandbox);
    assert_eq!(s.session, "test");

    // The QR code in all three forms: JSON, a PNG that scans to the same text, terminal text.
    let qr: QrCode = pod
        .get("/v1/qr")
        .header("accept", "application/json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let parts: Vec<&str> = qr.code.split(',').collect();
    assert_eq!(parts.len(), 4, "ref,noise,identity,adv: {}", qr.code);
    assert!(parts[0].starts_with("2@"));
    assert!(qr.expires_at > chrono::Utc::now() - chrono::Duration::seconds(1));
    let png = pod.get("/v1/qr").send().await.unwrap();
    assert_eq!(png.headers()["content-type"], "image/png");
    let scanned = scan_png(&png.bytes().await.unwrap());
    assert_eq!(
        scanned.split(',').skip(1).collect::<Vec<_>>(),
        parts[1..],
        "PNG carries this pairing's keys"
    );
    let text = pod
        .get("/v1/qr")
        .header("accept", "text/plain")
        .send()
        .await
        .unwrap();
    assert!(
        text.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = text.text().await.unwrap();
    assert!(text.contains('▀') || text.contains('▄'), "half blocks");

    // Codes rotate.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let answer = pod
            .get("/v1/qr")
            .header("accept", "application/json")
            .send()
            .await
            .unwrap();
        if answer.status() == 409 {
            // Between an expired code and its successor (a busy machine widens the gap) the
            // route answers 409 QR_NOT_AVAILABLE with Retry-After, as documented.
            let body: wa_api::ErrorBody = answer.json().await.unwrap();
            assert_eq!(body.error.code, wa_api::ErrorCode::QrNotAvailable, "{body:?}");
            assert!(Instant::now() < deadline, "QR code did not rotate");
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let next: QrCode = answer.json().await.unwrap();
        if next.code != qr.code {
            assert_eq!(
                next.code.split(',').skip(1).collect::<Vec<_>>(),
                parts[1..],
                "only the ref rotates"
            );
            break;
        }
        assert!(Instant::now() < deadline, "QR code did not rotate");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Scanning the current code (as the phone would) pairs.
    let current: QrCode = pod
        .get("/v1/qr")
        .header("accept", "application/json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (code, body) = pod
        .post_json(
            "/v1/sandbox/scan",
            &json!({"code": current.code, "phoneNumber": "+15557770001", "pushName": "Desk"}),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["phase"], "Connected");
    assert_eq!(
        body["account"],
        json!({"jid": "15557770001@s.whatsapp.net", "pushName": "Desk"})
    );
    assert!(pod.data_dir.join("sandbox/identity.json").exists());

    // A text message: WhatsApp-like id, then sent → delivered → read as events and in the log.
    let (code, body) = pod
        .send_text("+15551234567", "hello from the sandbox")
        .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();
    assert!(
        id.starts_with("3EB0")
            && id.len() == 22
            && id[4..]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_lowercase()),
        "{id}"
    );
    assert_eq!(body["to"], "15551234567@s.whatsapp.net");
    assert_eq!(body["status"], "sent");
    let events = sink
        .wait_for("read receipt", Duration::from_secs(5), |ev| {
            receipts_of(ev, &id).any(|s| s == MessageStatus::Read)
        })
        .await;
    let statuses: Vec<_> = receipts_of(&events, &id).collect();
    assert_eq!(
        statuses,
        [
            MessageStatus::Sent,
            MessageStatus::Delivered,
            MessageStatus::Read
        ]
    );
    let (code, info) = pod.get_json(&format!("/v1/messages/{id}")).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(
        (info["status"].as_str(), info["type"].as_str()),
        (Some("read"), Some("text"))
    );

    // Media as JSON base64 and as multipart.
    let b64 = base64::engine::general_purpose::STANDARD.encode(PNG_1X1);
    let (code, body) = pod
        .post_json(
            "/v1/messages",
            &json!({"to": "+15551234567", "type": "image", "media": {"data": b64}, "caption": "a pixel"}),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let form = reqwest::multipart::Form::new()
        .text("to", "15551234567@s.whatsapp.net")
        .text("type", "document")
        .text("caption", "the report")
        .part(
            "file",
            reqwest::multipart::Part::bytes(b"%PDF-1.4 minimal".to_vec()).file_name("report.pdf"),
        );
    let r = pod
        .post("/v1/messages")
        .multipart(form)
        .send()
        .await
        .unwrap();
    let (code, body) = split(r).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let doc_id = body["id"].as_str().unwrap().to_owned();
    let (_, info) = pod.get_json(&format!("/v1/messages/{doc_id}")).await;
    assert_eq!(info["type"], "document");

    // An inbound message arrives as an event.
    let (code, body) = pod
        .post_json(
            "/v1/sandbox/inbound",
            &json!({"from": "+15559990000", "text": "hi there", "pushName": "Ana"}),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let inbound_id = body["id"].as_str().unwrap().to_owned();
    let events = sink
        .wait_for("inbound message", Duration::from_secs(5), |ev| {
            ev.iter()
                .any(|e| matches!(&e.body, EventBody::Message(m) if m.message_id == inbound_id))
        })
        .await;
    let m = events
        .iter()
        .find_map(|e| match &e.body {
            EventBody::Message(m) if m.message_id == inbound_id => Some(m.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        (m.from.as_str(), m.text.as_deref(), m.push_name.as_deref()),
        ("15559990000@s.whatsapp.net", Some("hi there"), Some("Ana"))
    );
    assert!(events.iter().all(|e| e.session == "test"));
    assert!(phases(&events).contains(&Phase::Connected));

    // Restart: the stored identity connects without a scan; the sink sees the new start.
    let before = sink.events().len();
    let pod = pod.restart().await;
    let s = pod
        .wait_phase(Phase::Connected, Duration::from_secs(5))
        .await;
    assert_eq!(s.account.unwrap().jid, "15557770001@s.whatsapp.net");
    let events = sink
        .wait_for("Connected after restart", Duration::from_secs(5), |ev| {
            phases(&ev[before..]).contains(&Phase::Connected)
        })
        .await;
    assert!(
        duplicate_ids(&events).is_empty(),
        "duplicates: {:?}",
        duplicate_ids(&events)
    );
    let (code, body) = pod.send_text("+15551234567", "still here").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(sink.unauthorized(), 0);
}

#[tokio::test]
async fn disconnect_reconnects_and_logout_wipes_the_identity() {
    let sink = EventSink::start().await;
    let pod = Pod::start(PodOptions::sandbox().events_url(&sink.url)).await;
    pod.pair().await;
    let (code, body) = pod
        .post_json("/v1/sandbox/disconnect", &json!({"seconds": 1}))
        .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["phase"], "Reconnecting");
    assert!(body["lastError"].as_str().unwrap().contains("network"));
    let (code, body) = pod.send_text("+15551234567", "while down").await;
    assert_eq!(
        (code, error_code(&body)),
        (StatusCode::CONFLICT, "SESSION_NOT_CONNECTED")
    );
    pod.wait_phase(Phase::Connected, Duration::from_secs(5))
        .await;
    sink.wait_for(
        "Reconnecting then Connected",
        Duration::from_secs(5),
        |ev| phases(ev).ends_with(&[Phase::Reconnecting, Phase::Connected]),
    )
    .await;
    let metrics = pod
        .get("/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == "wa_session_reconnects_total 1"),
        "{metrics}"
    );

    let (code, body) = pod.post_json("/v1/logout", &json!({})).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["phase"], "LoggedOut");
    assert!(body.get("account").is_none());
    assert!(
        !pod.data_dir.join("sandbox/identity.json").exists(),
        "identity wiped"
    );
    let (code, body) = pod.get_json("/v1/qr").await;
    assert_eq!(
        (code, error_code(&body)),
        (StatusCode::CONFLICT, "QR_NOT_AVAILABLE")
    );

    // After a restart of the process it pairs again (no identity), and restart pairs anew.
    let pod = pod.restart().await;
    pod.wait_phase(Phase::AwaitingScan, Duration::from_secs(5))
        .await;
    pod.pair().await;
    let (code, body) = pod.post_json("/v1/restart", &json!({})).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    pod.wait_phase(Phase::Connected, Duration::from_secs(5))
        .await;
}

#[tokio::test]
async fn pair_code_flow_from_config_and_from_the_api() {
    // --phone-number: the session pairs by code, shown in status.
    let pod = Pod::start(PodOptions::sandbox().args(["--phone-number", "+15550001111"])).await;
    let s = pod
        .wait_phase(Phase::AwaitingScan, Duration::from_secs(5))
        .await;
    let code = s.pair_code.expect("pair code in status");
    assert_eq!(code.len(), 8);
    assert!(
        code.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit()),
        "{code}"
    );
    let (status, body) = pod.get_json("/v1/qr").await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::CONFLICT, "QR_NOT_AVAILABLE")
    );
    // A wrong code is refused; the right one (as people type it, with a dash) pairs.
    let (status, body) = pod
        .post_json("/v1/sandbox/scan", &json!({"code": "WRONGCOD"}))
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::UNPROCESSABLE_ENTITY, "VALIDATION_FAILED")
    );
    let dashed = format!("{}-{}", &code[..4], &code[4..]);
    let (status, body) = pod
        .post_json("/v1/sandbox/scan", &json!({"code": dashed}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["account"]["jid"], "15550001111@s.whatsapp.net");
    assert!(
        body.get("pairCode").is_none(),
        "pair code cleared once paired"
    );
    let (status, body) = pod
        .post_json("/v1/pair-code", &json!({"phoneNumber": "+15550001111"}))
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::CONFLICT, "ALREADY_PAIRED")
    );

    // POST /v1/pair-code on a QR-pairing session.
    let pod = Pod::start(PodOptions::sandbox()).await;
    pod.wait_phase(Phase::AwaitingScan, Duration::from_secs(5))
        .await;
    let (status, body) = pod
        .post_json("/v1/pair-code", &json!({"phoneNumber": "+15552223333"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let code = body["code"].as_str().unwrap().to_owned();
    assert_eq!(code.len(), 8);
    assert_eq!(pod.status().await.pair_code.as_deref(), Some(code.as_str()));
    let (status, body) = pod
        .post_json("/v1/sandbox/scan", &json!({"code": code}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["account"]["jid"], "15552223333@s.whatsapp.net");
}

#[tokio::test]
async fn status_long_poll_answers_on_change_and_times_out_otherwise() {
    let pod = Pod::start(PodOptions::sandbox()).await;
    let s = pod
        .wait_phase(Phase::AwaitingScan, Duration::from_secs(5))
        .await;
    // Nothing changes: held for waitSeconds, then the same version.
    let started = Instant::now();
    let (code, body) = pod
        .get_json(&format!("/v1/status?after={}&waitSeconds=1", s.version))
        .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(body["version"].as_u64(), Some(s.version));
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "answered early: {:?}",
        started.elapsed()
    );
    // A change answers at once: start a poll, then pair.
    let poll = {
        let req = pod.get(&format!("/v1/status?after={}&waitSeconds=30", s.version));
        tokio::spawn(async move { (Instant::now(), split(req.send().await.unwrap()).await) })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let paired_at = Instant::now();
    pod.pair().await;
    let (_, (code, body)) = poll.await.unwrap();
    assert_eq!(code, StatusCode::OK);
    assert_eq!(body["phase"], "Connected");
    assert!(body["version"].as_u64().unwrap() > s.version);
    assert!(
        paired_at.elapsed() < Duration::from_secs(5),
        "long poll did not answer on change"
    );
    // An old version answers immediately.
    let started = Instant::now();
    let (_, body) = pod.get_json("/v1/status?after=0&waitSeconds=30").await;
    assert_eq!(body["phase"], "Connected");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn status_long_poll_answers_at_once_for_a_version_of_an_earlier_process() {
    let pod = Pod::start(PodOptions::sandbox()).await;
    let s = pod.pair().await;
    // The client kept a version from before the pod restarted (versions start low again).
    // It must not be held: that version will never come back.
    let (code, body) = tokio::time::timeout(
        Duration::from_secs(10),
        pod.get_json(&format!(
            "/v1/status?after={}&waitSeconds=30",
            s.version + 1000
        )),
    )
    .await
    .expect("held a poll for a version the pod will never reach");
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["version"].as_u64(), Some(s.version), "{body}");
    assert_eq!(body["phase"], "Connected");
}

#[tokio::test]
async fn sends_leave_in_the_order_accepted() {
    let sink = EventSink::start().await;
    let pod = Pod::start(PodOptions::sandbox().events_url(&sink.url)).await;
    pod.pair().await;
    // One after the other: the "sent" events reach the gateway in the same order.
    let mut ids = Vec::new();
    for i in 0..30 {
        let (code, body) = pod.send_text("+15551234567", &format!("n{i}")).await;
        assert_eq!(code, StatusCode::OK, "{body}");
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    let events = sink
        .wait_for("30 sent receipts", Duration::from_secs(5), |ev| {
            ev.iter()
                .filter(
                    |e| matches!(&e.body, EventBody::Receipt(r) if r.status == MessageStatus::Sent),
                )
                .count()
                >= 30
        })
        .await;
    let sent_order: Vec<String> = events
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::Receipt(r) if r.status == MessageStatus::Sent => Some(r.message_id.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        sent_order, ids,
        "sent receipts in the order the sends were accepted"
    );
}

#[tokio::test]
async fn concurrent_sends_all_get_answers_with_unique_ids() {
    let pod = Pod::start(PodOptions::sandbox()).await;
    pod.pair().await;
    // Many concurrent requests: every one gets an answer, and ids are unique.
    let mut handles = Vec::new();
    for i in 0..40 {
        let req = pod
            .post("/v1/messages")
            .json(&json!({"to": "+15551234567", "type": "text", "text": format!("c{i}")}));
        handles.push(tokio::spawn(async move {
            split(req.send().await.unwrap()).await
        }));
    }
    let mut ids = std::collections::HashSet::new();
    for h in handles {
        let (code, body) = h.await.unwrap();
        assert_eq!(code, StatusCode::OK, "{body}");
        assert!(ids.insert(body["id"].as_str().unwrap().to_owned()));
    }
    let metrics = pod
        .get("/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == "wa_session_messages_sent_total 40"),
        "{metrics}"
    );
}

#[tokio::test]
async fn metrics_pass_promtool_and_count_what_happened() {
    let pod = Pod::start(PodOptions::sandbox()).await;
    pod.pair().await;
    let (code, _) = pod.send_text("+15551234567", "one").await;
    assert_eq!(code, StatusCode::OK);
    let (code, body) = pod.send_text("+9995550000", "not on whatsapp").await;
    assert_eq!(
        (code, error_code(&body)),
        (StatusCode::UNPROCESSABLE_ENTITY, "RECIPIENT_NOT_ON_WHATSAPP")
    );
    let (code, _) = pod
        .post_json(
            "/v1/sandbox/inbound",
            &json!({"from": "+15559990000", "text": "hey"}),
        )
        .await;
    assert_eq!(code, StatusCode::OK);
    let r = pod.get("/metrics").send().await.unwrap();
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = r.text().await.unwrap();
    for line in [
        "wa_session_state{state=\"Connected\"} 1",
        "wa_session_state{state=\"AwaitingScan\"} 0",
        "wa_session_messages_sent_total 1",
        "wa_session_messages_received_total 1",
        "wa_session_send_failures_total{reason=\"not_on_whatsapp\"} 1",
        "wa_session_outbox_events 0",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?}\n{text}");
    }
    let rss: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("wa_session_resident_memory_bytes "))
        .and_then(|v| v.parse().ok())
        .expect("resident memory");
    assert!(rss > 1024 * 1024, "{rss}");

    // promtool is installed by scripts/test (Debian package prometheus).
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool must be installed (apt-get install prometheus; scripts/test does it)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- metrics ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn json_logs_are_one_object_per_line_with_the_session() {
    let pod = Pod::start(PodOptions::sandbox().args(["--log-format", "json"])).await;
    pod.pair().await;
    let log = pod.log();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 2, "{log}");
    for line in &lines {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v.get("level").is_some() && v.get("timestamp").is_some(),
            "{line}"
        );
    }
    let ready = lines
        .iter()
        .find(|l| l.contains("session pod ready"))
        .expect("ready line");
    let v: Value = serde_json::from_str(ready).unwrap();
    assert_eq!(
        v.pointer("/span/session").and_then(Value::as_str),
        Some("test"),
        "{ready}"
    );
}

#[tokio::test]
async fn health_checks_need_no_token() {
    let pod = Pod::start(PodOptions::sandbox()).await;
    for path in ["/healthz", "/readyz"] {
        let r = pod.client.get(pod.url(path)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
    }
    let r = pod.client.get(pod.url("/v1/status")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let _: Value = r.json().await.unwrap();
}
