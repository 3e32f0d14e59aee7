//! Every refusal the issue names, from the real binary: status, stable code, JSON shape.
//! Plus start-up refusals, rate limiting, idempotency, and garbage that must not crash it.

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::*;
use reqwest::StatusCode;
use serde_json::{Value, json};
use wa_api::crd::Phase;

/// Asserts an error answer: status, code, and the `{"error":{"code","message"}}` shape.
fn check(what: &str, got: (StatusCode, Value), status: u16, code: &str) {
    let (s, body) = got;
    assert_eq!(
        (s.as_u16(), error_code(&body)),
        (status, code),
        "{what}: {body}"
    );
    let msg = body
        .pointer("/error/message")
        .and_then(Value::as_str)
        .unwrap_or("");
    assert!(!msg.is_empty(), "{what}: error without message: {body}");
    assert_eq!(
        body.as_object().map(|o| o.len()),
        Some(1),
        "{what}: extra top-level fields: {body}"
    );
}

async fn raw(
    pod: &Pod,
    method: reqwest::Method,
    path: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> (StatusCode, Value) {
    let mut req = pod
        .client
        .request(method, pod.url(path))
        .bearer_auth(TOKEN)
        .body(body);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    split(req.send().await.unwrap()).await
}

#[tokio::test]
async fn every_refusal_has_its_status_and_code() {
    let pod = Pod::start(PodOptions::sandbox().args(["--media-max-bytes", "1000"])).await;
    pod.wait_phase(Phase::AwaitingScan, Duration::from_secs(5))
        .await;
    use reqwest::Method;

    // 401: no token, wrong token, wrong scheme; the health checks stay open.
    for (path, auth) in [
        ("/v1/status", None),
        ("/v1/status", Some("Bearer nope")),
        ("/metrics", Some(format!("Basic {TOKEN}").as_str())),
        ("/v1/qr", Some("Bearer")),
    ] {
        let mut req = pod.client.get(pod.url(path));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let r = req.send().await.unwrap();
        assert_eq!(
            r.headers()
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap()),
            Some("Bearer")
        );
        check(
            &format!("{path} with {auth:?}"),
            split(r).await,
            401,
            "UNAUTHORIZED",
        );
    }
    let r = pod
        .client
        .post(pod.url("/v1/messages"))
        .json(&json!({"to": "+15551234567", "type": "text", "text": "x"}))
        .send()
        .await
        .unwrap();
    check("send without token", split(r).await, 401, "UNAUTHORIZED");

    // 409: not connected yet; QR while paired comes later.
    check(
        "send before pairing",
        pod.send_text("+15551234567", "hi").await,
        409,
        "SESSION_NOT_CONNECTED",
    );
    check(
        "inbound before pairing",
        pod.post_json(
            "/v1/sandbox/inbound",
            &json!({"from": "+15551234567", "text": "x"}),
        )
        .await,
        409,
        "SESSION_NOT_CONNECTED",
    );
    check(
        "disconnect before pairing",
        pod.post_json("/v1/sandbox/disconnect", &json!({})).await,
        409,
        "SESSION_NOT_CONNECTED",
    );
    pod.pair().await;

    // 400: malformed JSON and the wrong shape.
    let ct = Some("application/json");
    check(
        "truncated JSON",
        raw(&pod, Method::POST, "/v1/messages", ct, b"{\"to\":".to_vec()).await,
        400,
        "INVALID_JSON",
    );
    check(
        "not JSON",
        raw(&pod, Method::POST, "/v1/messages", ct, b"hello".to_vec()).await,
        400,
        "INVALID_JSON",
    );
    check(
        "wrong shape",
        raw(
            &pod,
            Method::POST,
            "/v1/messages",
            ct,
            br#"{"to": 5, "type": "text"}"#.to_vec(),
        )
        .await,
        400,
        "INVALID_JSON",
    );
    check(
        "array",
        raw(&pod, Method::POST, "/v1/messages", ct, b"[]".to_vec()).await,
        400,
        "INVALID_JSON",
    );
    check(
        "empty body",
        raw(&pod, Method::POST, "/v1/messages", ct, Vec::new()).await,
        400,
        "INVALID_JSON",
    );
    check(
        "pair-code truncated",
        raw(&pod, Method::POST, "/v1/pair-code", ct, b"{".to_vec()).await,
        400,
        "INVALID_JSON",
    );
    check(
        "bad long-poll query",
        pod.get_json("/v1/status?after=abc").await,
        400,
        "INVALID_REQUEST",
    );
    check(
        "negative wait",
        pod.get_json("/v1/status?after=1&waitSeconds=-1").await,
        400,
        "INVALID_REQUEST",
    );
    let r = pod
        .post("/v1/messages")
        .header("idempotency-key", "has space")
        .json(&json!({"to": "+15551234567", "type": "text", "text": "x"}))
        .send()
        .await
        .unwrap();
    check(
        "bad idempotency key",
        split(r).await,
        400,
        "INVALID_REQUEST",
    );
    let form = reqwest::multipart::Form::new()
        .text("to", "+15551234567")
        .text("colour", "red");
    check(
        "unknown multipart field",
        split(
            pod.post("/v1/messages")
                .multipart(form)
                .send()
                .await
                .unwrap(),
        )
        .await,
        400,
        "INVALID_REQUEST",
    );
    check(
        "multipart without boundary",
        raw(
            &pod,
            Method::POST,
            "/v1/messages",
            Some("multipart/form-data"),
            b"x".to_vec(),
        )
        .await,
        400,
        "INVALID_REQUEST",
    );

    // 415: wrong content type.
    let text_body = br#"{"to": "+15551234567", "type": "text", "text": "x"}"#.to_vec();
    check(
        "text/plain send",
        raw(
            &pod,
            Method::POST,
            "/v1/messages",
            Some("text/plain"),
            text_body.clone(),
        )
        .await,
        415,
        "UNSUPPORTED_MEDIA_TYPE",
    );
    check(
        "no content type",
        raw(&pod, Method::POST, "/v1/messages", None, text_body.clone()).await,
        415,
        "UNSUPPORTED_MEDIA_TYPE",
    );
    check(
        "form-urlencoded pair code",
        raw(
            &pod,
            Method::POST,
            "/v1/pair-code",
            Some("application/x-www-form-urlencoded"),
            b"phoneNumber=%2B1".to_vec(),
        )
        .await,
        415,
        "UNSUPPORTED_MEDIA_TYPE",
    );
    let not_an_image =
        base64::engine::general_purpose::STANDARD.encode(b"plain text, not an image");
    check(
        "image that is not one",
        pod.post_json(
            "/v1/messages",
            &json!({"to": "+15551234567", "type": "image", "media": {"data": not_an_image}}),
        )
        .await,
        415,
        "UNSUPPORTED_MEDIA_TYPE",
    );

    // 422: bad recipients and phone numbers, empty text, semantic problems.
    for to in [
        "555",
        "+1",
        "15551234567",
        "abc@s.whatsapp.net",
        "1@example.com",
        "",
    ] {
        check(
            &format!("recipient {to:?}"),
            pod.send_text(to, "hi").await,
            422,
            "INVALID_RECIPIENT",
        );
    }
    for phone in ["12345", "+0123456789", "+1 555 123 4567", ""] {
        check(
            &format!("pair code for {phone:?}"),
            pod.post_json("/v1/pair-code", &json!({"phoneNumber": phone}))
                .await,
            422,
            "INVALID_PHONE_NUMBER",
        );
    }
    check(
        "scan with bad phone",
        pod.post_json("/v1/sandbox/scan", &json!({"phoneNumber": "555"}))
            .await,
        422,
        "INVALID_PHONE_NUMBER",
    );
    check(
        "empty text",
        pod.send_text("+15551234567", "").await,
        422,
        "EMPTY_TEXT",
    );
    check(
        "blank text",
        pod.send_text("+15551234567", " \n\t ").await,
        422,
        "EMPTY_TEXT",
    );
    check(
        "missing text",
        pod.post_json(
            "/v1/messages",
            &json!({"to": "+15551234567", "type": "text"}),
        )
        .await,
        422,
        "EMPTY_TEXT",
    );
    check(
        "unknown type",
        pod.post_json(
            "/v1/messages",
            &json!({"to": "+15551234567", "type": "sticker", "text": "x"}),
        )
        .await,
        422,
        "VALIDATION_FAILED",
    );
    check(
        "bad base64",
        pod.post_json(
            "/v1/messages",
            &json!({"to": "+15551234567", "type": "image", "media": {"data": "!!!"}}),
        )
        .await,
        422,
        "VALIDATION_FAILED",
    );
    check(
        "disconnect too long",
        pod.post_json("/v1/sandbox/disconnect", &json!({"seconds": 1_000_000}))
            .await,
        422,
        "VALIDATION_FAILED",
    );

    // 413: media over the cap (1000 bytes here), and a body over the request limit.
    let big = base64::engine::general_purpose::STANDARD.encode(vec![7u8; 1500]);
    check(
        "JSON media over the cap",
        pod.post_json(
            "/v1/messages",
            &json!({"to": "+15551234567", "type": "document", "media": {"data": big}}),
        )
        .await,
        413,
        "MEDIA_TOO_LARGE",
    );
    let form = reqwest::multipart::Form::new()
        .text("to", "+15551234567")
        .text("type", "document")
        .part(
            "file",
            reqwest::multipart::Part::bytes(vec![7u8; 1500]).file_name("big.bin"),
        );
    check(
        "multipart media over the cap",
        split(
            pod.post("/v1/messages")
                .multipart(form)
                .send()
                .await
                .unwrap(),
        )
        .await,
        413,
        "MEDIA_TOO_LARGE",
    );
    let huge = vec![b' '; 2 * 1024 * 1024 + 10];
    check(
        "body over the limit",
        raw(&pod, Method::POST, "/v1/messages", ct, huge.clone()).await,
        413,
        "PAYLOAD_TOO_LARGE",
    );
    let form = reqwest::multipart::Form::new()
        .text("to", "+15551234567")
        .part(
            "file",
            reqwest::multipart::Part::bytes(huge).file_name("huge.bin"),
        );
    check(
        "multipart over the limit",
        split(
            pod.post("/v1/messages")
                .multipart(form)
                .send()
                .await
                .unwrap(),
        )
        .await,
        413,
        "PAYLOAD_TOO_LARGE",
    );

    // 409 once paired: no QR, no pair code, no second scan.
    check(
        "QR when paired",
        pod.get_json("/v1/qr").await,
        409,
        "ALREADY_PAIRED",
    );
    check(
        "scan when paired",
        pod.post_json("/v1/sandbox/scan", &json!({})).await,
        409,
        "ALREADY_PAIRED",
    );

    // 404 and 405.
    check(
        "unknown route",
        pod.get_json("/v1/nothing").await,
        404,
        "NOT_FOUND",
    );
    check(
        "unknown route without token",
        split(pod.client.get(pod.url("/nope")).send().await.unwrap()).await,
        404,
        "NOT_FOUND",
    );
    check(
        "unknown message",
        pod.get_json("/v1/messages/3EB0000000000000000000").await,
        404,
        "MESSAGE_NOT_FOUND",
    );
    check(
        "GET on a POST route",
        pod.get_json("/v1/messages").await,
        405,
        "METHOD_NOT_ALLOWED",
    );
    check(
        "DELETE status",
        raw(&pod, Method::DELETE, "/v1/status", None, Vec::new()).await,
        405,
        "METHOD_NOT_ALLOWED",
    );

    // 422: the recipient has no WhatsApp account (the sandbox's `999…` numbers); its own
    // code, so clients do not retry it like a failed send.
    check(
        "number not on WhatsApp",
        pod.send_text("+9995551234", "hi").await,
        422,
        "RECIPIENT_NOT_ON_WHATSAPP",
    );

    // Still alive and well after all that.
    let (code, body) = pod.send_text("+15551234567", "still fine").await;
    assert_eq!(code, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn rate_limit_answers_429_with_retry_after_at_accept_time() {
    let pod =
        Pod::start(PodOptions::sandbox().args(["--rate-per-minute", "2", "--rate-burst", "2"]))
            .await;
    pod.pair().await;
    for i in 0..2 {
        let (code, body) = pod.send_text("+15551234567", &format!("ok {i}")).await;
        assert_eq!(code, StatusCode::OK, "{body}");
    }
    let r = pod
        .post("/v1/messages")
        .json(&json!({"to": "+15551234567", "type": "text", "text": "too many"}))
        .send()
        .await
        .unwrap();
    let retry_after: u64 = r
        .headers()
        .get("retry-after")
        .expect("Retry-After")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1..=30).contains(&retry_after),
        "2/min refills one every 30 s: {retry_after}"
    );
    check("third send", split(r).await, 429, "RATE_LIMITED");
    // Invalid requests are refused before the limit and do not make it worse.
    check(
        "invalid while limited",
        pod.send_text("555", "x").await,
        422,
        "INVALID_RECIPIENT",
    );
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
            .any(|l| l == "wa_session_rate_limited_total 1"),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l == "wa_session_messages_sent_total 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn idempotency_key_replays_the_first_answer_and_never_sends_twice() {
    let sink = EventSink::start().await;
    let pod = Pod::start(PodOptions::sandbox().events_url(&sink.url).args([
        "--rate-per-minute",
        "60",
        "--rate-burst",
        "3",
    ]))
    .await;
    pod.pair().await;
    let send = |key: &str, text: &str| {
        pod.post("/v1/messages")
            .header("idempotency-key", key)
            .json(&json!({"to": "+15551234567", "type": "text", "text": text}))
    };
    let first = send("gw-msg-1", "hello").send().await.unwrap();
    assert!(first.headers().get("idempotent-replayed").is_none());
    let (code, first) = split(first).await;
    assert_eq!(code, StatusCode::OK, "{first}");
    // Retries get the same answer, marked as a replay, and use no rate-limit tokens.
    for _ in 0..5 {
        let r = send("gw-msg-1", "hello").send().await.unwrap();
        assert_eq!(
            r.headers()
                .get("idempotent-replayed")
                .map(|v| v.to_str().unwrap()),
            Some("true")
        );
        let (code, again) = split(r).await;
        assert_eq!(code, StatusCode::OK);
        assert_eq!(again, first);
    }
    // The same key for another message is a conflict.
    check(
        "key reuse",
        split(send("gw-msg-1", "different").send().await.unwrap()).await,
        409,
        "IDEMPOTENCY_CONFLICT",
    );
    // The same content as multipart is the same request.
    let form = reqwest::multipart::Form::new()
        .text("to", "15551234567@s.whatsapp.net")
        .text("type", "text")
        .text("text", "hello");
    let r = pod
        .post("/v1/messages")
        .header("idempotency-key", "gw-msg-1")
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(split(r).await.1, first);

    // Concurrent first attempts with one key: one send, the same id for all.
    let mut handles = Vec::new();
    for _ in 0..5 {
        let req = send("gw-msg-2", "concurrent");
        handles.push(tokio::spawn(async move {
            split(req.send().await.unwrap()).await
        }));
    }
    let mut ids = std::collections::HashSet::new();
    for h in handles {
        let (code, body) = h.await.unwrap();
        assert_eq!(code, StatusCode::OK, "{body}");
        ids.insert(body["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), 1, "one message for one key: {ids:?}");

    // The key survives a restart of the pod.
    let pod = pod.restart().await;
    pod.wait_phase(Phase::Connected, Duration::from_secs(5))
        .await;
    let r = pod
        .post("/v1/messages")
        .header("idempotency-key", "gw-msg-1")
        .json(&json!({"to": "+15551234567", "type": "text", "text": "hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(split(r).await.1, first);

    // Exactly two messages left the pod.
    let events = sink
        .wait_for("sent receipts", Duration::from_secs(5), |ev| {
            ev.iter().filter(|e| matches!(&e.body, wa_api::pod::EventBody::Receipt(r) if r.status == wa_api::pod::MessageStatus::Sent)).count() >= 2
        })
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = sink
        .events()
        .iter()
        .filter(|e| matches!(&e.body, wa_api::pod::EventBody::Receipt(r) if r.status == wa_api::pod::MessageStatus::Sent))
        .count();
    assert_eq!(sent, 2, "{events:#?}");
}

#[tokio::test]
async fn a_send_cut_off_by_a_crash_answers_outcome_unknown_and_is_not_sent_again() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let request = json!({"to": "+15551234567", "type": "text", "text": "hello"});
    // What a pod killed mid-send leaves behind: the key's `pending` record (synced before the
    // engine is called) and nothing after it. Written by the pod's own store code.
    {
        use wa_session::idempotency::{Claim, IdempotencyStore, fingerprint};
        let msg = serde_json::from_value::<wa_api::pod::SendRequest>(request.clone())
            .unwrap()
            .validate(wa_api::pod::DEFAULT_MEDIA_MAX_BYTES)
            .unwrap();
        let store = IdempotencyStore::open(&data.join("idempotency"), 100).unwrap();
        let Claim::New(mut guard) = store.claim("gw-cut-1", &fingerprint(&msg)).unwrap() else {
            panic!("a fresh key")
        };
        guard.handed_to_engine();
        std::mem::forget(guard); // the process dies here: nothing else reaches the disk
    }
    let pod = Pod::start(PodOptions::sandbox().data_dir(&data)).await;
    pod.pair().await;
    let send = |key: &str| {
        pod.post("/v1/messages")
            .header("idempotency-key", key)
            .json(&request)
    };
    for attempt in 0..2 {
        check(
            &format!("retry {attempt} of the cut-off send"),
            split(send("gw-cut-1").send().await.unwrap()).await,
            502,
            "SEND_OUTCOME_UNKNOWN",
        );
    }
    let metrics = pod.get("/metrics").send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.lines().any(|l| l == "wa_session_messages_sent_total 0"),
        "{metrics}"
    );
    // The same message under a new key is a new send.
    let (code, body) = split(send("gw-cut-2").send().await.unwrap()).await;
    assert_eq!(code, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn sandbox_routes_do_not_exist_on_the_whatsapp_engine() {
    // Pointed at a closed local port: the engine cannot reach anything.
    let closed = free_port();
    let pod = Pod::start(PodOptions::sandbox().engine("whatsapp").args([
        "--wa-server-url",
        &format!("ws://127.0.0.1:{closed}/ws/chat"),
        "--wa-media-url",
        &format!("http://127.0.0.1:{closed}"),
    ]))
    .await;
    let s = pod.status().await;
    assert_eq!(s.engine, wa_api::Engine::Whatsapp, "never substituted");
    for path in [
        "/v1/sandbox/scan",
        "/v1/sandbox/inbound",
        "/v1/sandbox/disconnect",
    ] {
        check(
            path,
            pod.post_json(path, &json!({})).await,
            404,
            "NOT_FOUND",
        );
    }
}

#[tokio::test]
async fn refuses_to_start_without_a_token_or_on_a_busy_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str], token: Option<&str>| {
        let mut cmd = std::process::Command::new(BIN);
        cmd.args([
            "--engine",
            "sandbox",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.path())
        .args(args);
        cmd.env_remove("WA_TOKEN");
        if let Some(t) = token {
            cmd.env("WA_TOKEN", t);
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = run(&[], None);
    assert!(!ok && err.contains("--token"), "{err}");
    let (ok, err) = run(&[], Some(""));
    assert!(!ok && err.contains("token is required"), "{err}");
    let (ok, err) = run(&["--phone-number", "12"], Some("t"));
    assert!(!ok && err.contains("E.164"), "{err}");

    let pod = Pod::start(PodOptions::sandbox().data_dir(dir.path())).await;
    let (ok, err) = run(&[], Some("t"));
    assert!(!ok && err.contains("in use by another wa-session"), "{err}");
    drop(pod);
}

#[tokio::test]
async fn garbage_never_crashes_it() {
    let pod = Pod::start(PodOptions::sandbox()).await;
    pod.pair().await;
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let routes = [
        "/v1/messages",
        "/v1/pair-code",
        "/v1/sandbox/scan",
        "/v1/sandbox/inbound",
        "/v1/sandbox/disconnect",
        "/v1/logout",
    ];
    let types = [
        "application/json",
        "multipart/form-data; boundary=x",
        "text/plain",
        "application/octet-stream",
    ];
    let skeletons = [
        r#"{"to": "+15551234567", "type": "TYPE", "text": "T", "media": {"data": "D", "mimetype": "M", "filename": "F"}}"#,
        r#"{"from": "T", "type": "TYPE", "media": {"data": "D"}}"#,
        r#"{"phoneNumber": "T", "code": "D", "seconds": 99999999999}"#,
    ];
    for i in 0..300 {
        let route = routes[(rand() % (routes.len() as u64 - 1)) as usize]; // never logout by chance
        let ct = types[(rand() % types.len() as u64) as usize];
        let body: Vec<u8> = match i % 3 {
            0 => (0..(rand() % 300)).map(|_| rand() as u8).collect(),
            1 => {
                let pick =
                    |opts: &[&str], r: u64| opts[(r % opts.len() as u64) as usize].to_owned();
                skeletons[(rand() % 3) as usize]
                    .replace(
                        "TYPE",
                        &pick(
                            &["text", "image", "video", "audio", "document", "", "x\u{0}"],
                            rand(),
                        ),
                    )
                    .replace(
                        "\"T\"",
                        &pick(
                            &[
                                "\"\"",
                                "null",
                                "1e309",
                                "\"\\ud800\"",
                                "[]",
                                "\"+1555\"",
                                "{}",
                            ],
                            rand(),
                        ),
                    )
                    .replace(
                        "\"D\"",
                        &pick(
                            &["\"AAAA\"", "\"====\"", "\"iVBORw0KGgo=\"", "7", "\"\""],
                            rand(),
                        ),
                    )
                    .replace(
                        "\"M\"",
                        &pick(&["\"image/png\"", "\"/\"", "\"a/b;c\"", "\"\""], rand()),
                    )
                    .replace(
                        "\"F\"",
                        &pick(&["\"../../etc/passwd\"", "\"\"", "\"ok.pdf\""], rand()),
                    )
                    .into_bytes()
            }
            _ => {
                let mut b = br#"{"to": "+15551234567", "type": "text", "text": "hi"}"#.to_vec();
                let at = (rand() as usize) % b.len();
                b[at] = rand() as u8;
                b
            }
        };
        let (code, resp) = raw(&pod, reqwest::Method::POST, route, Some(ct), body.clone()).await;
        assert!(
            code.is_success()
                || (code.is_client_error() || code == StatusCode::BAD_GATEWAY)
                    && !error_code(&resp).is_empty(),
            "{route} {ct} {:?} -> {code} {resp}",
            String::from_utf8_lossy(&body)
        );
    }
    assert_eq!(
        pod.client
            .get(pod.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    assert!(!pod.log().contains("panicked"), "{}", pod.log());
}
