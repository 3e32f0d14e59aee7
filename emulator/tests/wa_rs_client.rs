//! The emulator against the real wa-rs client (the library the `whatsapp` engine is built
//! on), without the session pod in between: linking by QR code and by pair code, login with
//! stored auth, messages both ways, receipts, media, logout.

mod common;

use common::{STEP, client, next};
use wa_emulator::{Emulator, EmulatorConfig, EmulatorHandle, MediaOut, Outgoing, ReceiptKind};
use wa_rs::types::events::Event;
use wa_rs::types::presence::ReceiptType;
use wa_rs::wa_rs_proto::whatsapp as wa;

const OWN: &str = "15550000001";
const CONTACT: &str = "15557654321";

async fn link_by_qr(emu: &EmulatorHandle, c: &mut common::Client) {
    let qr = next(&mut c.events, "a QR code", |e| match e {
        Event::PairingQrCode { code, .. } => Some(code.clone()),
        _ => None,
    })
    .await;
    let linked = emu.scan(&qr, OWN, Some("Alice")).await.unwrap();
    assert_eq!(linked.phone, OWN);
    next(&mut c.events, "Connected", |e| matches!(e, Event::Connected(_)).then_some(())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qr_link_login_and_messages_both_ways() {
    let emu = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("wa.db");
    let mut c = client(&emu.ws_url(), &emu.media_url(), &db).await;
    link_by_qr(&emu, &mut c).await;
    let device = emu.wait_for_active_device(OWN, STEP).await.unwrap();
    assert!(device.prekeys > 0, "the client uploaded prekeys");
    assert_eq!(c.client.get_pn().await.unwrap().user, OWN);

    // Out: the contact's phone decrypts exactly what was sent, then confirms delivery.
    let to: wa_rs::Jid = format!("{CONTACT}@s.whatsapp.net").parse().unwrap();
    let id = c
        .client
        .send_message(to.clone(), wa::Message { conversation: Some("hello from wa-rs".into()), ..Default::default() })
        .await
        .unwrap();
    let got = emu.wait_for_message(CONTACT, STEP, |m| m.id == id).await.unwrap();
    assert_eq!(got.text.as_deref(), Some("hello from wa-rs"));
    assert_eq!(got.from, OWN);
    assert_eq!(got.enc_type, "pkmsg");
    next(&mut c.events, "delivery receipt", |e| match e {
        // wa-rs 0.2 reports a receipt without a type (a delivery) as Other("delivery").
        Event::Receipt(r)
            if r.message_ids.contains(&id)
                && (r.r#type == ReceiptType::Delivered || r.r#type == ReceiptType::Other("delivery".into())) =>
        {
            Some(())
        }
        _ => None,
    })
    .await;
    emu.send_receipt(CONTACT, OWN, &id, ReceiptKind::Read).await.unwrap();
    next(&mut c.events, "read receipt", |e| match e {
        Event::Receipt(r) if r.message_ids.contains(&id) && r.r#type == ReceiptType::Read => Some(()),
        _ => None,
    })
    .await;

    // In: the client decrypts the contact's message and confirms delivery.
    let in_id = emu.send_text(CONTACT, OWN, "hi from a phone").await.unwrap();
    let (text, from) = next(&mut c.events, "an inbound message", |e| match e {
        Event::Message(m, info) if info.id == in_id => Some((m.conversation.clone(), info.source.sender.user.clone())),
        _ => None,
    })
    .await;
    assert_eq!(text.as_deref(), Some("hi from a phone"));
    assert_eq!(from, CONTACT);
    emu.wait_for_device_receipt(&in_id, "delivery", STEP).await.unwrap();

    // The contact answered on the session the client started, so the client's next message
    // no longer needs to carry the prekey exchange.
    let id2 = c
        .client
        .send_message(to.clone(), wa::Message { conversation: Some("second".into()), ..Default::default() })
        .await
        .unwrap();
    let got = emu.wait_for_message(CONTACT, STEP, |m| m.id == id2).await.unwrap();
    assert_eq!((got.text.as_deref(), got.enc_type.as_str()), (Some("second"), "msg"));

    // Media out: upload, then the phone fetches and opens it.
    let png = b"\x89PNG\r\n\x1a\n0000 fake image body".to_vec();
    let up = c.client.upload(png.clone(), wa_rs::download::MediaType::Image).await.unwrap();
    let msg = wa::Message {
        image_message: Some(Box::new(wa::message::ImageMessage {
            url: Some(up.url),
            direct_path: Some(up.direct_path),
            media_key: Some(up.media_key),
            file_enc_sha256: Some(up.file_enc_sha256),
            file_sha256: Some(up.file_sha256),
            file_length: Some(up.file_length),
            mimetype: Some("image/png".into()),
            caption: Some("a picture".into()),
            ..Default::default()
        })),
        ..Default::default()
    };
    let img_id = c.client.send_message(to.clone(), msg).await.unwrap();
    let got = emu.wait_for_message(CONTACT, STEP, |m| m.id == img_id).await.unwrap();
    assert_eq!(got.kind, "image");
    assert_eq!(got.media_error, None);
    assert_eq!(got.media.as_deref(), Some(&png[..]));
    assert_eq!(got.caption.as_deref(), Some("a picture"));

    // Media in: the client downloads and decrypts it.
    let doc = b"%PDF-1.4 a document".to_vec();
    let doc_id = emu
        .send_inbound(
            CONTACT,
            OWN,
            &Outgoing::Document(MediaOut {
                data: doc.clone(),
                mimetype: "application/pdf".into(),
                filename: Some("a.pdf".into()),
                caption: None,
            }),
        )
        .await
        .unwrap();
    let dm = next(&mut c.events, "an inbound document", |e| match e {
        Event::Message(m, info) if info.id == doc_id => m.document_message.clone(),
        _ => None,
    })
    .await;
    let bytes = c.client.download(&*dm).await.unwrap();
    assert_eq!(bytes, doc);

    // Restart: the stored identity logs in again, no scan.
    drop(c);
    let mut c = client(&emu.ws_url(), &emu.media_url(), &db).await;
    next(&mut c.events, "Connected after restart", |e| matches!(e, Event::Connected(_)).then_some(())).await;

    // The phone unlinks the device: the client hears it at once.
    assert_eq!(emu.logout_device(OWN, None).await.unwrap(), 1);
    next(&mut c.events, "LoggedOut", |e| matches!(e, Event::LoggedOut(_)).then_some(())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pair_code_link_and_a_wrong_code() {
    let emu = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut c = client(&emu.ws_url(), &emu.media_url(), &dir.path().join("wa.db")).await;
    c.client.wait_for_socket(STEP).await.unwrap();
    let code = c
        .client
        .pair_with_code(wa_rs::pair_code::PairCodeOptions { phone_number: OWN.into(), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(code.len(), 8);
    // Same code with the first character changed.
    let first = if code.starts_with('A') { 'B' } else { 'A' };
    let wrong: String = std::iter::once(first).chain(code.chars().skip(1)).collect();
    let err = emu.enter_pair_code(OWN, &wrong, None).await.unwrap_err();
    assert_eq!(err.code(), "WRONG_PAIR_CODE", "{err}");
    // The device asks again (a new code), and the right one links it.
    let code = c
        .client
        .pair_with_code(wa_rs::pair_code::PairCodeOptions { phone_number: OWN.into(), ..Default::default() })
        .await
        .unwrap();
    emu.enter_pair_code(OWN, &code, Some("Alice")).await.unwrap();
    next(&mut c.events, "Connected", |e| matches!(e, Event::Connected(_)).then_some(())).await;
}

