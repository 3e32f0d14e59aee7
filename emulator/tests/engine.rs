//! The session pod's `whatsapp` engine, as a library, against the emulator: the events it
//! reports for every stage (pairing, login, sends, receipts, inbound, media, logout by
//! either side, stream errors, restarts), checked one by one.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use tokio::sync::mpsc;
use wa_api::crd::Phase;
use wa_api::pod::{Content, Media, MessageKind, MessageStatus, OutgoingMessage};
use wa_emulator::{Emulator, EmulatorConfig, EmulatorHandle, MediaOut, Outgoing, ReceiptKind};
use wa_session::engine::whatsapp::{WhatsAppEngine, WhatsAppOptions};
use wa_session::engine::{Engine, EngineContext, EngineError, EngineEvent};

const OWN: &str = "+15550000001";
const CONTACT: &str = "+15557654321";
const STEP: Duration = Duration::from_secs(20);
const MEDIA_MAX: usize = 1024 * 1024;

struct Harness {
    engine: Arc<WhatsAppEngine>,
    events: mpsc::UnboundedReceiver<EngineEvent>,
}

fn engine(emu: &EmulatorHandle, dir: &std::path::Path) -> Harness {
    let (tx, events) = mpsc::unbounded_channel();
    let ctx = EngineContext {
        data_dir: dir.to_path_buf(),
        events: tx,
        media_max_bytes: MEDIA_MAX,
    };
    let opts = WhatsAppOptions {
        server_url: Some(emu.ws_url()),
        media_url: Some(emu.media_url()),
        ..Default::default()
    };
    Harness {
        engine: WhatsAppEngine::new(ctx, opts),
        events,
    }
}

impl Harness {
    async fn next<T>(&mut self, what: &str, f: impl Fn(&EngineEvent) -> Option<T>) -> T {
        let wait = async {
            while let Some(e) = self.events.recv().await {
                if let Some(v) = f(&e) {
                    return v;
                }
            }
            panic!("engine events ended while waiting for {what}");
        };
        tokio::time::timeout(STEP, wait)
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
    }

    async fn phase(&mut self, phase: Phase) -> Option<String> {
        self.next(&format!("phase {phase:?}"), |e| match e {
            EngineEvent::State { phase: p, reason, .. } if *p == phase => Some(reason.clone()),
            _ => None,
        })
        .await
    }

    async fn qr(&mut self) -> String {
        self.next("a QR code", |e| match e {
            EngineEvent::Qr(q) => Some(q.code.clone()),
            _ => None,
        })
        .await
    }

    async fn receipt(&mut self, id: &str, status: MessageStatus) {
        self.next(&format!("{status:?} receipt for {id}"), |e| match e {
            EngineEvent::Receipt(r) if r.message_id == id && r.status == status => Some(()),
            _ => None,
        })
        .await
    }
}

fn text_to(to: &str, text: &str) -> OutgoingMessage {
    OutgoingMessage {
        to: to.parse().unwrap(),
        content: Content::Text(text.into()),
        reply_to: None,
    }
}

async fn paired(emu: &EmulatorHandle, dir: &std::path::Path) -> Harness {
    let mut h = engine(emu, dir);
    h.engine.start(None).await.unwrap();
    let qr = h.qr().await;
    emu.scan(&qr, OWN, Some("Alice")).await.unwrap();
    h.phase(Phase::Connected).await;
    emu.wait_for_active_device(OWN, STEP).await.unwrap();
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairs_sends_receives_and_logs_out() {
    let emu = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut h = engine(&emu, dir.path());
    // Not connected yet: sends are refused with a clear error.
    assert!(matches!(h.engine.send(&text_to(CONTACT, "early")).await, Err(EngineError::NotConnected(_))));
    h.engine.start(None).await.unwrap();
    h.phase(Phase::AwaitingScan).await;
    let qr = h.qr().await;
    assert_eq!(qr.split(',').count(), 4, "{qr}");
    emu.scan(&qr, OWN, Some("Alice")).await.unwrap();
    let account = h
        .next("Connected with the account", |e| match e {
            EngineEvent::State { phase: Phase::Connected, account, .. } => Some(account.clone()),
            _ => None,
        })
        .await
        .unwrap();
    assert_eq!(account.jid, "15550000001@s.whatsapp.net");
    assert!(matches!(h.engine.pair_code(&OWN.parse().unwrap()).await, Err(EngineError::AlreadyPaired)));

    // A text arrives decrypted; the contact's phone confirms delivery, then reads it.
    let sent = h.engine.send(&text_to(CONTACT, "hello 👋")).await.unwrap();
    assert_eq!(sent.chat.to_string(), "15557654321@s.whatsapp.net");
    let got = emu.wait_for_message(CONTACT, STEP, |m| m.id == sent.id).await.unwrap();
    assert_eq!(got.text.as_deref(), Some("hello 👋"));
    h.receipt(&sent.id, MessageStatus::Delivered).await;
    emu.send_receipt(CONTACT, OWN, &sent.id, ReceiptKind::Read).await.unwrap();
    h.receipt(&sent.id, MessageStatus::Read).await;

    // A reply quotes the message it answers.
    let reply = h
        .engine
        .send(&OutgoingMessage {
            reply_to: Some(sent.id.clone()),
            ..text_to(CONTACT, "and a reply")
        })
        .await
        .unwrap();
    let got = emu.wait_for_message(CONTACT, STEP, |m| m.id == reply.id).await.unwrap();
    assert_eq!(got.reply_to.as_deref(), Some(sent.id.as_str()));

    // An image: uploaded encrypted, the phone downloads and opens the same bytes.
    let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR some image".to_vec();
    let img = h
        .engine
        .send(&OutgoingMessage {
            to: CONTACT.parse().unwrap(),
            content: Content::Media(Media {
                kind: MessageKind::Image,
                data: png.clone(),
                mimetype: "image/png".into(),
                filename: None,
                caption: Some("a picture".into()),
            }),
            reply_to: None,
        })
        .await
        .unwrap();
    let got = emu.wait_for_message(CONTACT, STEP, |m| m.id == img.id).await.unwrap();
    assert_eq!((got.kind.as_str(), got.media_error.as_deref()), ("image", None));
    assert_eq!(got.media.as_deref(), Some(&png[..]));
    assert_eq!(got.caption.as_deref(), Some("a picture"));

    // Inbound text and media reach the session as events, media downloaded and decrypted.
    let in_id = emu.send_text(CONTACT, OWN, "hi there").await.unwrap();
    let m = h
        .next("inbound text", |e| match e {
            EngineEvent::Inbound(m) if m.message_id == in_id => Some(m.clone()),
            _ => None,
        })
        .await;
    assert_eq!((m.message_type, m.text.as_deref()), (MessageKind::Text, Some("hi there")));
    assert_eq!(m.from, "15557654321@s.whatsapp.net");
    emu.wait_for_device_receipt(&in_id, "delivery", STEP).await.unwrap();
    let doc = b"%PDF-1.4\nsome document".to_vec();
    let doc_id = emu
        .send_inbound(
            CONTACT,
            OWN,
            &Outgoing::Document(MediaOut {
                data: doc.clone(),
                mimetype: "application/pdf".into(),
                filename: Some("report.pdf".into()),
                caption: Some("the report".into()),
            }),
        )
        .await
        .unwrap();
    let m = h
        .next("inbound document", |e| match e {
            EngineEvent::Inbound(m) if m.message_id == doc_id => Some(m.clone()),
            _ => None,
        })
        .await;
    let media = m.media.unwrap();
    assert_eq!(m.caption.as_deref(), Some("the report"));
    assert_eq!(media.filename.as_deref(), Some("report.pdf"));
    assert_eq!(media.size, doc.len() as u64);
    assert_eq!(base64::engine::general_purpose::STANDARD.decode(media.data.unwrap()).unwrap(), doc);

    // Media over the cap is described but not downloaded.
    let big = vec![7u8; MEDIA_MAX + 1];
    let big_id = emu
        .send_inbound(
            CONTACT,
            OWN,
            &Outgoing::Document(MediaOut { data: big, mimetype: "application/octet-stream".into(), filename: None, caption: None }),
        )
        .await
        .unwrap();
    let m = h
        .next("inbound oversized document", |e| match e {
            EngineEvent::Inbound(m) if m.message_id == big_id => Some(m.clone()),
            _ => None,
        })
        .await;
    let media = m.media.unwrap();
    assert_eq!((media.size, media.data), ((MEDIA_MAX + 1) as u64, None));
    assert_eq!(media.sha256.len(), 64);

    // Logout: the device is unlinked on the server and the store is gone.
    h.engine.logout().await.unwrap();
    h.phase(Phase::LoggedOut).await;
    assert!(wa_session::engine::whatsapp::store::is_empty(dir.path()), "auth store left behind");
    assert!(emu.account(OWN).await.unwrap().devices.is_empty(), "device still linked on the server");
    assert!(matches!(h.engine.send(&text_to(CONTACT, "late")).await, Err(EngineError::NotConnected(_))));

    // Restart after a logout pairs again from scratch.
    h.engine.restart().await.unwrap();
    let qr = h.qr().await;
    emu.scan(&qr, OWN, None).await.unwrap();
    h.phase(Phase::Connected).await;
    h.engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_reconnects_and_server_side_logout() {
    let emu = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut h = paired(&emu, dir.path()).await;

    // A stream error: the engine reports the reconnect and comes back.
    assert_eq!(emu.force_stream_error(OWN, "503").await.unwrap(), 1);
    h.phase(Phase::Reconnecting).await;
    h.phase(Phase::Connected).await;

    // A restart requested through the API reconnects without a scan.
    h.engine.restart().await.unwrap();
    h.phase(Phase::Reconnecting).await;
    h.phase(Phase::Connected).await;

    // A new process on the same data dir logs in with the stored identity, and gets what
    // arrived while it was down.
    h.engine.shutdown().await;
    drop(h);
    let away_id = emu.send_text(CONTACT, OWN, "while you were away").await.unwrap();
    let mut h = engine(&emu, dir.path());
    h.engine.start(None).await.unwrap();
    let reason = h.phase(Phase::Starting).await;
    assert_eq!(reason.as_deref(), Some("connecting with the stored identity"));
    // Queued messages come right after login, before or after Connected is reported.
    let (mut connected, mut text) = (false, None);
    while !connected || text.is_none() {
        match h.next("Connected and the message sent while offline", |e| Some(e.clone())).await {
            EngineEvent::State { phase: Phase::Connected, .. } => connected = true,
            EngineEvent::Inbound(m) if m.message_id == away_id => text = m.text,
            _ => {}
        }
    }
    assert_eq!(text.as_deref(), Some("while you were away"));
    let sent = h.engine.send(&text_to(CONTACT, "after restart")).await.unwrap();
    emu.wait_for_message(CONTACT, STEP, |m| m.id == sent.id).await.unwrap();

    // The phone unlinks the device: LoggedOut, store wiped, no reconnect loop.
    assert_eq!(emu.logout_device(OWN, None).await.unwrap(), 1);
    h.phase(Phase::LoggedOut).await;
    assert!(wa_session::engine::whatsapp::store::is_empty(dir.path()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(emu.pending_pairings().await.is_empty(), "a logged-out engine must not reconnect by itself");
    h.engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pair_code_login_and_unregistered_recipients() {
    let emu = Emulator::start(EmulatorConfig {
        auto_register_contacts: false,
        ..Default::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut h = engine(&emu, dir.path());
    h.engine.start(Some(OWN.parse().unwrap())).await.unwrap();
    let code = h
        .next("a pair code", |e| match e {
            EngineEvent::PairCode(c) => Some(c.clone()),
            _ => None,
        })
        .await;
    assert_eq!(code.len(), 8);
    emu.enter_pair_code(OWN, &code, Some("Alice")).await.unwrap();
    h.phase(Phase::Connected).await;

    // A number that is not on WhatsApp is refused with a clear error, before sending.
    for to in ["+15559990000", "15559990000@s.whatsapp.net"] {
        match h.engine.send(&text_to(to, "anyone?")).await {
            Err(EngineError::NotOnWhatsapp(who)) => assert_eq!(who, "+15559990000"),
            other => panic!("{to}: {other:?}"),
        }
    }
    assert!(emu.received_messages("+15559990000").await.unwrap_or_default().is_empty());
    emu.register(CONTACT, Some("Bob")).await.unwrap();
    let sent = h.engine.send(&text_to(CONTACT, "hi Bob")).await.unwrap();
    emu.wait_for_message(CONTACT, STEP, |m| m.id == sent.id).await.unwrap();
    h.engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_network_says_so_and_offline_unlink_is_seen_at_login() {
    // Nothing listens on the server port: Starting, then a reason that says why it lingers.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (tx, events) = mpsc::unbounded_channel();
    let e = WhatsAppEngine::new(
        EngineContext { data_dir: dir.path().to_path_buf(), events: tx, media_max_bytes: MEDIA_MAX },
        WhatsAppOptions {
            server_url: Some(format!("ws://{closed}/ws/chat")),
            media_url: Some(format!("http://{closed}")),
            client_version: Some((2, 3000, 1_031_424_117)),
            slow_connect: Duration::from_millis(500),
            ..Default::default()
        },
    );
    e.start(None).await.unwrap();
    let mut h = Harness { engine: e, events };
    let reason = h
        .next("a slow-connect reason", |ev| match ev {
            EngineEvent::State { phase: Phase::Starting, reason: Some(r), .. } if r.starts_with("no connection") => Some(r.clone()),
            _ => None,
        })
        .await;
    assert!(reason.contains("still retrying"), "{reason}");
    h.engine.shutdown().await;

    // The phone unlinks the device while the engine is stopped: the next login is refused,
    // the engine reports LoggedOut and wipes its store.
    let emu = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let h = paired(&emu, dir.path()).await;
    h.engine.shutdown().await;
    drop(h);
    assert_eq!(emu.logout_device(OWN, None).await.unwrap(), 1);
    let mut h = engine(&emu, dir.path());
    h.engine.start(None).await.unwrap();
    let reason = h.phase(Phase::LoggedOut).await.unwrap_or_default();
    assert!(reason.contains("refused at login"), "{reason}");
    assert!(wa_session::engine::whatsapp::store::is_empty(dir.path()));
    h.engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_client_with_the_same_identity_takes_over() {
    let emu = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let paired_once = paired(&emu, dir.path()).await;
    paired_once.engine.shutdown().await;
    drop(paired_once);
    // Copy the auth state: two clients, one identity.
    let copy = tempfile::tempdir().unwrap();
    copy_dir(&dir.path().join("whatsapp"), &copy.path().join("whatsapp"));
    let mut first = engine(&emu, dir.path());
    first.engine.start(None).await.unwrap();
    first.phase(Phase::Connected).await;
    let mut second = engine(&emu, copy.path());
    second.engine.start(None).await.unwrap();
    second.phase(Phase::Connected).await;
    let reason = first.phase(Phase::Failed).await.unwrap_or_default();
    assert!(reason.contains("another client"), "{reason}");
    // The session starts a failed engine again: it takes the identity back.
    first.engine.start(None).await.unwrap();
    first.phase(Phase::Connected).await;
    second.phase(Phase::Failed).await;
    second.engine.shutdown().await;
    first.engine.shutdown().await;
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}
