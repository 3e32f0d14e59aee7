//! A WhatsApp Web multi-device protocol emulator for tests, with simulated phones.
//!
//! Real clients (wa-rs, and so the session pod's `whatsapp` engine) connect to it over a plain
//! `ws://` WebSocket and do what they would do against WhatsApp: the Noise handshake, QR or
//! pair-code linking, login, prekey upload, usync, Signal-encrypted messages, media upload and
//! download, receipts, logout. The other side of every conversation is a simulated phone
//! whose Signal crypto is real, so a test can read exactly what arrived.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let emu = wa_emulator::Emulator::start(Default::default()).await?;
//! // Point a client at emu.ws_url() and emu.media_url(), wait for its QR code, then:
//! // emu.scan(&qr, "+15550000001", Some("Alice")).await?;
//! # Ok(()) }
//! ```
//!
//! See EMULATOR.md at the repository root for what is emulated and what is not.

pub mod adv;
mod conn;
pub mod content;
pub mod iq;
pub mod media;
pub mod noise;
mod phone;
pub mod server;
pub mod signal;
pub mod stanza;
pub mod world;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

pub use phone::{AccountInfo, DeviceInfo, LinkedDevice, MediaOut, Outgoing, PendingPairing, PhoneError, ReceiptKind};
pub use server::{EmulatorConfig, Shared};
pub use world::{DeviceReceipt, ReceivedMessage};

/// Starts emulators.
pub struct Emulator;

impl Emulator {
    /// Binds, then serves in the background until the handle is shut down or dropped.
    pub async fn start(config: EmulatorConfig) -> anyhow::Result<EmulatorHandle> {
        let listener = tokio::net::TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(config));
        let app = server::router(shared.clone());
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stop_rx.await;
                })
                .await;
        });
        Ok(EmulatorHandle {
            shared,
            addr,
            _stop: Arc::new(stop_tx),
        })
    }
}

/// A running emulator: its addresses and the phone-side controls.
#[derive(Clone)]
pub struct EmulatorHandle {
    shared: Arc<Shared>,
    addr: SocketAddr,
    // Dropping the last handle drops the sender, which stops the server.
    _stop: Arc<oneshot::Sender<()>>,
}

impl EmulatorHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The chat WebSocket (what `wss://web.whatsapp.com/ws/chat` is in production).
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws/chat", self.addr)
    }

    /// The base URL standing in for every HTTPS host clients talk to (media hosts and the
    /// web client's version file).
    pub fn media_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The base URL of the HTTP control API (`/control/...`).
    pub fn control_url(&self) -> String {
        format!("http://{}/control", self.addr)
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Creates the account of `phone` (a simulated phone) if needed.
    pub async fn register(&self, phone: &str, push_name: Option<&str>) -> Result<AccountInfo, PhoneError> {
        self.shared.register(phone, push_name).await
    }

    pub async fn account(&self, phone: &str) -> Result<AccountInfo, PhoneError> {
        self.shared.account(phone).await
    }

    /// Every account (simulated phone) with its linked devices.
    pub async fn accounts(&self) -> Vec<AccountInfo> {
        self.shared.accounts().await
    }

    /// The phone of `phone` scans `qr` (the text of a QR code a device shows) and links it.
    pub async fn scan(&self, qr: &str, phone: &str, push_name: Option<&str>) -> Result<LinkedDevice, PhoneError> {
        self.shared.scan(qr, phone, push_name).await
    }

    /// The phone of `phone` types the pair code a device shows.
    pub async fn enter_pair_code(&self, phone: &str, code: &str, push_name: Option<&str>) -> Result<LinkedDevice, PhoneError> {
        self.shared.enter_pair_code(phone, code, push_name).await
    }

    /// Devices waiting to be linked (QR refs shown, pair codes requested).
    pub async fn pending_pairings(&self) -> Vec<PendingPairing> {
        self.shared.pending_pairings().await
    }

    /// Messages the phone of `phone` received from others, decrypted.
    pub async fn received_messages(&self, phone: &str) -> Result<Vec<ReceivedMessage>, PhoneError> {
        self.shared.received(phone).await
    }

    /// Waits until the phone of `phone` has received a message `matches` accepts.
    pub async fn wait_for_message(
        &self,
        phone: &str,
        timeout: Duration,
        matches: impl Fn(&ReceivedMessage) -> bool,
    ) -> Result<ReceivedMessage, PhoneError> {
        let digits = phone::digits(phone)?;
        self.shared
            .wait_for(timeout, |w| {
                w.received
                    .iter()
                    .find(|m| m.to == digits && m.from != digits && matches(m))
                    .cloned()
            })
            .await
            .ok_or_else(|| PhoneError::Timeout(format!("no matching message reached {digits}")))
    }

    /// The contact `from` sends a message to the linked devices of `to`; returns its id.
    pub async fn send_inbound(&self, from: &str, to: &str, what: &Outgoing) -> Result<String, PhoneError> {
        self.shared.send(from, to, what).await
    }

    /// Shorthand for a text from `from` to `to`.
    pub async fn send_text(&self, from: &str, to: &str, text: &str) -> Result<String, PhoneError> {
        self.send_inbound(
            from,
            to,
            &Outgoing::Text {
                text: text.into(),
                reply_to: None,
            },
        )
        .await
    }

    /// The phone of `from` reports message `id` (sent by `to`'s device) as delivered or read.
    pub async fn send_receipt(&self, from: &str, to: &str, id: &str, kind: ReceiptKind) -> Result<(), PhoneError> {
        self.shared.receipt(from, to, id, kind).await
    }

    /// Receipts linked devices sent for message `id`.
    pub async fn device_receipts(&self, id: &str) -> Vec<DeviceReceipt> {
        self.shared.device_receipts(id).await
    }

    /// Waits for a linked device's receipt of `kind` (`delivery`, `read`) for message `id`.
    pub async fn wait_for_device_receipt(&self, id: &str, kind: &str, timeout: Duration) -> Result<DeviceReceipt, PhoneError> {
        self.shared
            .wait_for(timeout, |w| {
                w.device_receipts.iter().find(|r| r.id == id && r.kind == kind).cloned()
            })
            .await
            .ok_or_else(|| PhoneError::Timeout(format!("no {kind} receipt for {id}")))
    }

    /// The phone unlinks one device (or all): server-side logout.
    pub async fn logout_device(&self, phone: &str, device: Option<u16>) -> Result<usize, PhoneError> {
        self.shared.unlink(phone, device).await
    }

    /// Ends the streams of the account's connected devices with `<stream:error code>`.
    pub async fn force_stream_error(&self, phone: &str, code: &str) -> Result<usize, PhoneError> {
        self.shared.stream_error(phone, code).await
    }

    /// Waits until a device of `phone` is connected and active (logged in, out of passive mode).
    pub async fn wait_for_active_device(&self, phone: &str, timeout: Duration) -> Result<DeviceInfo, PhoneError> {
        let digits = phone::digits(phone)?;
        let id = self
            .shared
            .wait_for(timeout, |w| {
                w.accounts.get(&digits).and_then(|a| {
                    a.companions
                        .values()
                        .find(|c| c.link.as_ref().is_some_and(|l| l.active))
                        .map(|c| c.id)
                })
            })
            .await
            .ok_or_else(|| PhoneError::Timeout(format!("no active device of {digits}")))?;
        let info = self.shared.account(&digits).await?;
        info.devices
            .into_iter()
            .find(|d| d.id == id)
            .ok_or_else(|| PhoneError::Timeout(format!("device {id} of {digits} went away")))
    }
}
