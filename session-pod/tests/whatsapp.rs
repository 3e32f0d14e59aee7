//! The real `wa-session --engine whatsapp` binary against the WhatsApp protocol emulator:
//! pairing by QR, text and image through the pod's HTTP API arriving decrypted at the
//! simulated recipient, receipts, an inbound message as an event, a restart that stays paired,
//! logout that leaves an empty store; and pairing by phone number, server-side logout.

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::{EventSink, Pod, PodOptions, error_code};
use reqwest::StatusCode;
use serde_json::{Value, json};
use wa_api::crd::Phase;
use wa_api::pod::{EventBody, MessageStatus, PodEvent};
use wa_emulator::{Emulator, EmulatorConfig, EmulatorHandle, ReceiptKind};

const OWN: &str = "+15550000001";
const CONTACT: &str = "+15557654321";
const STEP: Duration = Duration::from_secs(30);

fn whatsapp_pod(emu: &EmulatorHandle) -> PodOptions {
    PodOptions::sandbox().engine("whatsapp").args([
        "--wa-server-url".to_owned(),
        emu.ws_url(),
        "--wa-media-url".to_owned(),
        emu.media_url(),
        "--log".to_owned(),
        "info,wa_session=debug".to_owned(),
    ])
}

async fn qr_code(pod: &Pod) -> String {
    pod.wait_phase(Phase::AwaitingScan, STEP).await;
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let r = pod.get("/v1/qr").header("accept", "application/json").send().await.unwrap();
        if r.status() == StatusCode::OK {
            let body: Value = r.json().await.unwrap();
            return body["code"].as_str().unwrap().to_owned();
        }
        assert!(tokio::time::Instant::now() < deadline, "no QR code\n{}", pod.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn message_status(pod: &Pod, id: &str, want: MessageStatus) {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let (code, body) = pod.get_json(&format!("/v1/messages/{id}")).await;
        assert_eq!(code, StatusCode::OK, "{body}");
        if body["status"] == json!(want.as_str()) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "message {id} never became {want:?}: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn receipt_of(events: &[PodEvent], id: &str, status: MessageStatus) -> bool {
    events
        .iter()
        .any(|e| matches!(&e.body, EventBody::Receipt(r) if r.message_id == id && r.status == status))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whatsapp_engine_end_to_end_against_the_emulator() {
    let emu = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let sink = EventSink::start().await;
    let pod = Pod::start(whatsapp_pod(&emu).events_url(&sink.url)).await;

    // A fresh pod shows a QR code; the simulated phone scans it; the pod is Connected.
    let qr = qr_code(&pod).await;
    let linked = emu.scan(&qr, OWN, Some("Alice")).await.unwrap();
    assert_eq!(linked.phone, "15550000001");
    let status = pod.wait_phase(Phase::Connected, STEP).await;
    assert_eq!(status.account.as_ref().unwrap().jid, "15550000001@s.whatsapp.net");
    assert_eq!(status.engine, wa_api::Engine::Whatsapp);
    // Sandbox routes do not exist on a real session.
    let (code, body) = pod.post_json("/v1/sandbox/scan", &json!({})).await;
    assert_eq!(code, StatusCode::NOT_FOUND, "{body}");

    // A text through the pod's API arrives decrypted at the recipient's phone.
    let (code, body) = pod.send_text(CONTACT, "Hello from wa-operator ✓").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let text_id = body["id"].as_str().unwrap().to_owned();
    assert_eq!(body["to"], "15557654321@s.whatsapp.net");
    let got = emu.wait_for_message(CONTACT, STEP, |m| m.id == text_id).await.unwrap();
    assert_eq!(got.text.as_deref(), Some("Hello from wa-operator ✓"));
    assert_eq!(got.from, "15550000001");

    // An image through the pod's API: the phone downloads and decrypts the same bytes.
    let png = {
        let mut p = b"\x89PNG\r\n\x1a\n".to_vec();
        p.extend((0..3000u32).map(|i| (i * 7 % 251) as u8));
        p
    };
    let (code, body) = pod
        .post_json(
            "/v1/messages",
            &json!({
                "to": CONTACT,
                "type": "image",
                "media": {"data": base64::engine::general_purpose::STANDARD.encode(&png), "mimetype": "image/png"},
                "caption": "the chart",
            }),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let image_id = body["id"].as_str().unwrap().to_owned();
    let got = emu.wait_for_message(CONTACT, STEP, |m| m.id == image_id).await.unwrap();
    assert_eq!((got.kind.as_str(), got.media_error.as_deref()), ("image", None));
    assert_eq!(got.media.as_deref(), Some(&png[..]), "image bytes differ");
    assert_eq!(got.caption.as_deref(), Some("the chart"));
    assert_eq!(got.mimetype.as_deref(), Some("image/png"));

    // Receipts move the text to delivered (the phone confirms by itself) and then read.
    message_status(&pod, &text_id, MessageStatus::Delivered).await;
    emu.send_receipt(CONTACT, OWN, &text_id, ReceiptKind::Read).await.unwrap();
    message_status(&pod, &text_id, MessageStatus::Read).await;
    sink.wait_for("delivered and read receipts", STEP, |ev| {
        receipt_of(ev, &text_id, MessageStatus::Delivered) && receipt_of(ev, &text_id, MessageStatus::Read)
    })
    .await;

    // An inbound message arrives as an event.
    let in_id = emu.send_text(CONTACT, OWN, "Hi, is this support?").await.unwrap();
    let events = sink
        .wait_for("the inbound message", STEP, |ev| {
            ev.iter().any(|e| matches!(&e.body, EventBody::Message(m) if m.message_id == in_id))
        })
        .await;
    let m = events
        .iter()
        .find_map(|e| match &e.body {
            EventBody::Message(m) if m.message_id == in_id => Some(m.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(m.text.as_deref(), Some("Hi, is this support?"));
    assert_eq!(m.from, "15557654321@s.whatsapp.net");
    emu.wait_for_device_receipt(&in_id, "delivery", STEP).await.unwrap();

    // A restart of the process reconnects with the stored identity: no new QR, no scan.
    let pod = pod.restart().await;
    let status = pod.wait_phase(Phase::Connected, STEP).await;
    assert_eq!(status.account.as_ref().unwrap().jid, "15550000001@s.whatsapp.net");
    assert!(emu.pending_pairings().await.is_empty(), "the restarted pod asked to pair again");
    let (code, body) = pod.send_text(CONTACT, "still here").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let again = body["id"].as_str().unwrap().to_owned();
    emu.wait_for_message(CONTACT, STEP, |m| m.id == again).await.unwrap();

    // Logout: LoggedOut, the device is unlinked on the server, and the auth store is empty.
    let (code, body) = pod.post_json("/v1/logout", &json!({})).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let status = pod.wait_phase(Phase::LoggedOut, STEP).await;
    assert_eq!(status.account, None);
    let store = pod.data_dir.join("whatsapp");
    assert!(
        !store.exists() || std::fs::read_dir(&store).unwrap().next().is_none(),
        "auth store left behind: {:?}",
        std::fs::read_dir(&store).map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
    );
    assert!(emu.account(OWN).await.unwrap().devices.is_empty(), "device still linked on the server");
    let (code, body) = pod.send_text(CONTACT, "after logout").await;
    assert_eq!(code, StatusCode::CONFLICT, "{body}");
    assert_eq!(error_code(&body), "SESSION_NOT_CONNECTED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whatsapp_engine_pairs_by_phone_number_and_hears_a_server_side_logout() {
    // Unknown numbers stay unknown, so one of them is "not on WhatsApp".
    let emu = Emulator::start(EmulatorConfig {
        auto_register_contacts: false,
        ..EmulatorConfig::default()
    })
    .await
    .unwrap();
    let pod = Pod::start(whatsapp_pod(&emu)).await;
    pod.wait_phase(Phase::AwaitingScan, STEP).await;
    let (code, body) = pod.post_json("/v1/pair-code", &json!({"phoneNumber": OWN})).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let pair_code = body["code"].as_str().unwrap().to_owned();
    assert_eq!(pair_code.len(), 8, "{body}");
    emu.enter_pair_code(OWN, &pair_code, Some("Alice")).await.unwrap();
    pod.wait_phase(Phase::Connected, STEP).await;
    let (code, body) = pod.post_json("/v1/pair-code", &json!({"phoneNumber": OWN})).await;
    assert_eq!((code, error_code(&body)), (StatusCode::CONFLICT, "ALREADY_PAIRED"), "{body}");

    // A number WhatsApp does not know: 422 with its own code, and nothing reaches anyone.
    let (code, body) = pod.send_text("+15559990000", "anyone?").await;
    assert_eq!(
        (code, error_code(&body)),
        (StatusCode::UNPROCESSABLE_ENTITY, "RECIPIENT_NOT_ON_WHATSAPP"),
        "{body}"
    );
    let metrics = pod.get("/metrics").send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.lines().any(|l| l == "wa_session_send_failures_total{reason=\"not_on_whatsapp\"} 1"),
        "{metrics}"
    );

    // The phone removes the device: the pod is LoggedOut and its store is gone.
    assert_eq!(emu.logout_device(OWN, None).await.unwrap(), 1);
    pod.wait_phase(Phase::LoggedOut, STEP).await;
    let store = pod.data_dir.join("whatsapp");
    assert!(!store.exists(), "auth store left behind after a server-side logout");

    // POST /v1/restart pairs again from scratch.
    let (code, body) = pod.post_json("/v1/restart", &json!({})).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let qr = qr_code(&pod).await;
    emu.scan(&qr, OWN, None).await.unwrap();
    pod.wait_phase(Phase::Connected, STEP).await;
}
