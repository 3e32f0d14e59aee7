//! The `wa-emulator` binary and its HTTP control API, as tests in other processes (the
//! gateway's, the end-to-end suite) use it: start it, read its URLs, link a real wa-rs client
//! through `/control/scan`, exchange messages and receipts, unlink; and the error answers.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{STEP, client, next};
use serde_json::{Value, json};
use wa_rs::types::events::Event;
use wa_rs::wa_rs_proto::whatsapp as wa;

struct Process {
    child: Child,
    ws_url: String,
    media_url: String,
    control: String,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start() -> Process {
    let mut child = Command::new(env!("CARGO_BIN_EXE_wa-emulator"))
        .args(["--log", "warn"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn wa-emulator");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(10)).expect("wa-emulator printed no URLs");
    let urls: Value = serde_json::from_str(&line).expect("a JSON line");
    Process {
        child,
        ws_url: urls["wsUrl"].as_str().unwrap().to_owned(),
        media_url: urls["mediaUrl"].as_str().unwrap().to_owned(),
        control: urls["controlUrl"].as_str().unwrap().to_owned(),
    }
}

async fn call(http: &reqwest::Client, method: reqwest::Method, url: String, body: Option<Value>) -> (u16, Value) {
    let mut r = http.request(method, url);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await.expect("request");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_api_drives_a_real_client() {
    use reqwest::Method;
    let emu = start();
    let http = reqwest::Client::new();
    let c = |p: &str| format!("{}{p}", emu.control);

    let (code, body) = call(&http, Method::GET, c("/health"), None).await;
    assert_eq!((code, body), (200, Value::String("ok".into())));
    let (code, body) = call(&http, Method::POST, c("/accounts"), Some(json!({"phone": "+15557654321", "pushName": "Bob"}))).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["jid"], "15557654321@s.whatsapp.net");

    let dir = tempfile::tempdir().unwrap();
    let mut wa = client(&emu.ws_url, &emu.media_url, &dir.path().join("wa.db")).await;
    let qr = next(&mut wa.events, "a QR code", |e| match e {
        Event::PairingQrCode { code, .. } => Some(code.clone()),
        _ => None,
    })
    .await;
    let (code, pending) = call(&http, Method::GET, c("/pairing?waitSeconds=10"), None).await;
    assert_eq!(code, 200);
    assert_eq!(pending[0]["refs"].as_array().unwrap().len(), 6, "{pending}");
    assert!(qr.starts_with(pending[0]["refs"][0].as_str().unwrap()), "the first QR code carries the first ref");

    // Errors come in one shape with stable codes.
    let (code, body) = call(&http, Method::POST, c("/scan"), Some(json!({"qr": "not a qr", "phone": "+15550000001"}))).await;
    assert_eq!((code, body["error"]["code"].as_str()), (422, Some("BAD_LINK_DATA")), "{body}");
    let (code, body) = call(&http, Method::POST, c("/scan"), Some(json!({"qr": qr, "phone": "12"}))).await;
    assert_eq!((code, body["error"]["code"].as_str()), (422, Some("BAD_PHONE")), "{body}");
    let (code, body) = call(&http, Method::GET, c("/accounts/15559999999"), None).await;
    assert_eq!((code, body["error"]["code"].as_str()), (404, Some("UNKNOWN_ACCOUNT")), "{body}");

    let (code, body) = call(&http, Method::POST, c("/scan"), Some(json!({"qr": qr, "phone": "+15550000001", "pushName": "Alice"}))).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["phone"], "15550000001");
    next(&mut wa.events, "Connected", |e| matches!(e, Event::Connected(_)).then_some(())).await;
    // Scanning a used QR code again finds nobody waiting.
    let (code, body) = call(&http, Method::POST, c("/scan"), Some(json!({"qr": qr, "phone": "+15550000001"}))).await;
    assert_eq!((code, body["error"]["code"].as_str()), (404, Some("UNKNOWN_QR")), "{body}");

    // The client writes; the control API shows the decrypted message (waiting for it).
    let to: wa_rs::Jid = "15557654321@s.whatsapp.net".parse().unwrap();
    let id = wa
        .client
        .send_message(to, wa::Message { conversation: Some("over the control API".into()), ..Default::default() })
        .await
        .unwrap();
    let (code, msgs) = call(&http, Method::GET, c("/accounts/15557654321/messages?count=1&waitSeconds=20"), None).await;
    assert_eq!(code, 200);
    assert_eq!(msgs[0]["id"], json!(id), "{msgs}");
    assert_eq!(msgs[0]["text"], "over the control API");

    // A contact writes back, then reads the client's message.
    let (code, body) = call(
        &http,
        Method::POST,
        c("/accounts/15557654321/send"),
        Some(json!({"to": "+15550000001", "type": "text", "text": "answer"})),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let in_id = body["id"].as_str().unwrap().to_owned();
    next(&mut wa.events, "the answer", |e| match e {
        Event::Message(m, info) if info.id == in_id => m.conversation.clone(),
        _ => None,
    })
    .await;
    let (code, body) = call(
        &http,
        Method::POST,
        c("/accounts/15557654321/receipts"),
        Some(json!({"to": "+15550000001", "messageId": id, "type": "read"})),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    next(&mut wa.events, "the read receipt", |e| match e {
        Event::Receipt(r) if r.message_ids.contains(&id) && r.r#type == wa_rs::types::presence::ReceiptType::Read => Some(()),
        _ => None,
    })
    .await;
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let (_, receipts) = call(&http, Method::GET, c(&format!("/device-receipts/{in_id}")), None).await;
        if receipts.as_array().is_some_and(|r| r.iter().any(|x| x["kind"] == "delivery")) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no delivery receipt from the client: {receipts}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Media from a contact, given as base64 over the control API.
    let jpeg = b"\xff\xd8\xff\xe0 a tiny jpeg".to_vec();
    let (code, body) = call(
        &http,
        Method::POST,
        c("/accounts/15557654321/send"),
        Some(json!({
            "to": "15550000001",
            "type": "image",
            "data": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &jpeg),
            "mimetype": "image/jpeg",
            "caption": "look",
        })),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let img_id = body["id"].as_str().unwrap().to_owned();
    let img = next(&mut wa.events, "the image", |e| match e {
        Event::Message(m, info) if info.id == img_id => m.image_message.clone(),
        _ => None,
    })
    .await;
    assert_eq!(img.caption.as_deref(), Some("look"));
    assert_eq!(wa.client.download(&*img).await.unwrap(), jpeg);

    // The account shows the linked device; unlinking it logs the client out.
    let (_, account) = call(&http, Method::GET, c("/accounts/15550000001"), None).await;
    assert_eq!(account["devices"][0]["online"], true, "{account}");
    let (code, body) = call(&http, Method::POST, c("/accounts/15550000001/unlink"), Some(json!({}))).await;
    assert_eq!((code, body["unlinked"].as_u64()), (200, Some(1)), "{body}");
    next(&mut wa.events, "LoggedOut", |e| matches!(e, Event::LoggedOut(_)).then_some(())).await;
}
