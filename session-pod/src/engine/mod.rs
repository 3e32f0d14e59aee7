//! The seam between the session (HTTP API, pacing, outbox, metrics) and the WhatsApp side.
//!
//! Two implementations: `sandbox` simulates WhatsApp for development and tests; `whatsapp`
//! speaks the real WhatsApp Web multi-device protocol through the `wa-rs` crate. The session
//! never knows which one it drives, except that only the sandbox offers [`SandboxControl`].
//!
//! Engines report everything that happens on their side as [`EngineEvent`]s on the channel in
//! their [`EngineContext`]; the session turns those into status, metrics and outbox events.
//! Engines never write the outbox or metrics themselves.

use std::path::PathBuf;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use wa_api::crd::{Account, Phase};
use wa_api::pod::{InboundMessage, OutgoingMessage, QrCode, Receipt, ScanRequest};
use wa_api::{Jid, PhoneNumber};

pub mod sandbox;
pub mod whatsapp;

/// Everything an engine reports to the session.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    /// A QR code to show; replaces the previous one. Only while pairing.
    Qr(QrCode),
    /// A pair code was issued for login by phone number; shown until pairing completes.
    PairCode(String),
    /// The connection moved to another phase. `account` is set once paired.
    State {
        phase: Phase,
        account: Option<Account>,
        reason: Option<String>,
    },
    /// A message arrived from a contact.
    Inbound(InboundMessage),
    /// A message this session sent moved on (delivered, read, failed).
    Receipt(Receipt),
}

/// What an engine is given when it is built.
#[derive(Debug, Clone)]
pub struct EngineContext {
    /// The session's persistent directory (the auth volume). Engines keep their own state in
    /// a subdirectory or file of it and nothing outside it.
    pub data_dir: PathBuf,
    /// Where the engine reports. Unbounded so the engine's protocol loop never waits on the
    /// session; the session drains it continuously.
    pub events: mpsc::UnboundedSender<EngineEvent>,
    /// Largest media (decoded bytes) the engine accepts or downloads.
    pub media_max_bytes: usize,
}

/// A message the WhatsApp side accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentMessage {
    /// The WhatsApp message id.
    pub id: String,
    /// The chat it went to.
    pub chat: Jid,
    pub timestamp: DateTime<Utc>,
}

/// Why an engine call failed; each maps to one stable API error code.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Not connected (awaiting scan, reconnecting, logged out). → 409 SESSION_NOT_CONNECTED
    #[error("session is not connected: {0}")]
    NotConnected(String),
    /// Already linked to an account; pairing calls make no sense. → 409 ALREADY_PAIRED
    #[error("session is already paired")]
    AlreadyPaired,
    /// The request cannot be carried out by this engine or in this state. → 409 / 422
    #[error("{0}")]
    Refused(String),
    /// The recipient has no WhatsApp account; nothing was sent.
    /// → 422 RECIPIENT_NOT_ON_WHATSAPP
    #[error("{0} is not on WhatsApp")]
    NotOnWhatsapp(String),
    /// WhatsApp refused or failed the operation. → 502 SEND_FAILED
    #[error("whatsapp refused: {0}")]
    Rejected(String),
    /// No answer in time. → 504 TIMEOUT
    #[error("timed out: {0}")]
    Timeout(String),
    /// Anything else; the message goes to the log, the client sees INTERNAL.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// One WhatsApp session's protocol side.
#[async_trait]
pub trait Engine: Send + Sync + 'static {
    /// Which engine this is (shown in status, never substituted).
    fn kind(&self) -> wa_api::Engine;

    /// Starts connecting in the background: resumes with stored auth, or begins pairing (QR
    /// codes, or a pair code when `phone` is given and there is no stored auth). Returns once
    /// the background work is running; progress arrives as events.
    async fn start(&self, phone: Option<PhoneNumber>) -> Result<(), EngineError>;

    /// Asks for a pair code for `phone` (login by phone number instead of QR).
    async fn pair_code(&self, phone: &PhoneNumber) -> Result<String, EngineError>;

    /// Sends one message and returns when WhatsApp's server accepted it. The session calls
    /// this one message at a time, in the order it accepted them.
    async fn send(&self, msg: &OutgoingMessage) -> Result<SentMessage, EngineError>;

    /// Unlinks this device from the account and wipes the stored auth. Ends in `LoggedOut`.
    async fn logout(&self) -> Result<(), EngineError>;

    /// Drops the connection and connects again with the stored auth.
    async fn restart(&self) -> Result<(), EngineError>;

    /// Disconnects cleanly; called once before the process exits.
    async fn shutdown(&self);

    /// The simulation controls; `None` for every engine but the sandbox, so the sandbox
    /// routes do not exist on a real session.
    fn sandbox(&self) -> Option<&dyn SandboxControl> {
        None
    }
}

/// Controls that only the sandbox engine has: what a phone and contacts would do.
#[async_trait]
pub trait SandboxControl: Send + Sync {
    /// The simulated phone scans the QR code (or enters the pair code) and links.
    async fn scan(&self, req: &ScanRequest) -> Result<(), EngineError>;

    /// A simulated contact sends the session a message; returns its message id.
    async fn inbound(&self, msg: InboundMessage) -> Result<String, EngineError>;

    /// The network drops for `seconds`, then the engine reconnects.
    async fn disconnect(&self, seconds: u32) -> Result<(), EngineError>;
}
