//! The session pod's internal HTTP API and the events it delivers to the gateway.
//!
//! Routes (all but the health checks need `Authorization: Bearer <pod token>`):
//!
//! | route | body | answer |
//! |---|---|---|
//! | `GET /healthz`, `GET /readyz` | | `200 ok` / `503` |
//! | `GET /v1/status[?after=V&waitSeconds=N]` | | [`PodStatus`]; with `after`, held until `version != V` or N seconds pass (long poll; "differs", because a restarted pod counts from 1 again) |
//! | `GET /v1/qr` | | PNG; [`QrCode`] with `Accept: application/json`; text with `Accept: text/plain` |
//! | `POST /v1/pair-code` | [`PairCodeRequest`] | [`PairCodeResponse`] |
//! | `POST /v1/messages` | [`SendRequest`] JSON or multipart; optional `Idempotency-Key` | [`SendResponse`] |
//! | `GET /v1/messages/{id}` | | [`MessageInfo`] |
//! | `POST /v1/logout`, `POST /v1/restart` | | [`PodStatus`] |
//! | `GET /metrics` | | Prometheus text |
//! | `POST /v1/sandbox/scan` (sandbox only) | [`ScanRequest`] | [`PodStatus`] |
//! | `POST /v1/sandbox/inbound` (sandbox only) | [`InboundRequest`] | [`InboundResponse`] |
//! | `POST /v1/sandbox/disconnect` (sandbox only) | [`DisconnectRequest`] | [`PodStatus`] |
//!
//! Errors are [`crate::ErrorBody`] with a stable [`ErrorCode`]. What `POST /v1/messages` can
//! answer besides the request checks of [`SendRequest::validate`] (400/413/415/422):
//!
//! | status | code | meaning |
//! |---|---|---|
//! | 409 | `SESSION_NOT_CONNECTED` | not Connected (awaiting scan, reconnecting, logged out) |
//! | 409 | `IDEMPOTENCY_CONFLICT` | the `Idempotency-Key` was used for a different message |
//! | 422 | `RECIPIENT_NOT_ON_WHATSAPP` | the recipient has no WhatsApp account; nothing was sent |
//! | 429 | `RATE_LIMITED` | the session's pacing; see `Retry-After` |
//! | 502 | `SEND_FAILED` | WhatsApp (or the engine) refused or failed the send |
//! | 502 | `SEND_OUTCOME_UNKNOWN` | a retry of a send that was cut off (crash, timeout); it may have reached WhatsApp and is not sent again |
//! | 503 | `SESSION_NOT_READY`, `UNAVAILABLE` | shutting down, or too many sends queued; see `Retry-After` |
//! | 504 | `TIMEOUT` | the engine did not answer in time; retries with the same key answer `SEND_OUTCOME_UNKNOWN` |
//!
//! The pod delivers [`EventBatch`]es to `POST <events-url>` (the gateway's
//! `/internal/v1/events`) with the same bearer token, at least once; receivers de-duplicate
//! by [`PodEvent::id`].

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::crd::{Account, Engine, Phase};
use crate::error::ErrorCode;
use crate::ids::Recipient;

/// Header that makes a send safe to retry: the same key answers the first result again.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
/// Longest accepted `Idempotency-Key`.
pub const IDEMPOTENCY_KEY_MAX_LEN: usize = 255;
/// Longest text message WhatsApp accepts (characters).
pub const MAX_TEXT_CHARS: usize = 65_536;
/// Longest caption (characters).
pub const MAX_CAPTION_CHARS: usize = 4_096;
/// Default cap on decoded media size (bytes).
pub const DEFAULT_MEDIA_MAX_BYTES: usize = 16 * 1024 * 1024;

/// Environment variables of `wa-session`; the operator and the gateway's local supervisor
/// set these, so they are named once here.
pub mod env {
    pub const ENGINE: &str = "WA_ENGINE";
    pub const DATA_DIR: &str = "WA_DATA_DIR";
    pub const LISTEN: &str = "WA_LISTEN";
    pub const TOKEN: &str = "WA_TOKEN";
    pub const EVENTS_URL: &str = "WA_EVENTS_URL";
    pub const SESSION: &str = "WA_SESSION";
    pub const NAMESPACE: &str = "WA_NAMESPACE";
    pub const PHONE_NUMBER: &str = "WA_PHONE_NUMBER";
    pub const RATE_PER_MINUTE: &str = "WA_RATE_PER_MINUTE";
    pub const RATE_BURST: &str = "WA_RATE_BURST";
    pub const MEDIA_MAX_BYTES: &str = "WA_MEDIA_MAX_BYTES";
    pub const SERVER_URL: &str = "WA_SERVER_URL";
    pub const MEDIA_URL: &str = "WA_MEDIA_URL";
    pub const LOG: &str = "WA_LOG";
}

/// Parses `wa-session`'s listen address (`--listen` / `WA_LISTEN`): `IP:port`, `[IPv6]:port`,
/// or a bare IP (`10.1.2.3`, `fd00::7`, `[fd00::7]`) meaning port
/// [`POD_PORT`](crate::names::POD_PORT). The operator sets the bare pod IP, because
/// `$(POD_IP):8080` is not an address when the pod IP is IPv6.
pub fn parse_listen(s: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::{IpAddr, SocketAddr};
    let s = s.trim();
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let bare = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')).unwrap_or(s);
    bare.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, crate::names::POD_PORT))
        .map_err(|_| format!("{s:?} is not an address: expected IP, IP:port or [IPv6]:port"))
}

/// `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    /// The session this pod runs.
    pub session: String,
    pub engine: Engine,
    pub phase: Phase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<Account>,
    /// When the current phase began.
    pub since: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The pair code to enter on the phone, while pairing by phone number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pair_code: Option<String>,
    /// Increases on every change of this status, starting at 1 in every process; the long
    /// poll answers as soon as it differs from the client's (also when it is lower: the pod
    /// restarted).
    pub version: u64,
}

/// `GET /v1/qr` with `Accept: application/json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QrCode {
    /// The text encoded in the QR code (what the phone's camera reads).
    pub code: String,
    /// When WhatsApp stops accepting this code; a new one replaces it.
    pub expires_at: DateTime<Utc>,
}

/// `POST /v1/pair-code`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PairCodeRequest {
    pub phone_number: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PairCodeResponse {
    /// Eight characters to type on the phone (Linked devices → Link with phone number).
    pub code: String,
}

/// Kinds of message content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum MessageKind {
    Text,
    Image,
    Document,
    Audio,
    Video,
}

impl MessageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Image => "image",
            Self::Document => "document",
            Self::Audio => "audio",
            Self::Video => "video",
        }
    }

    pub fn is_media(self) -> bool {
        self != Self::Text
    }
}

impl std::str::FromStr for MessageKind {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "text" => Ok(Self::Text),
            "image" => Ok(Self::Image),
            "document" => Ok(Self::Document),
            "audio" => Ok(Self::Audio),
            "video" => Ok(Self::Video),
            _ => Err(()),
        }
    }
}

/// `POST /v1/messages` as JSON. Loose on the wire (strings) so that a bad recipient or type
/// is a 422 with a precise code, not a generic deserialization error; [`SendRequest::validate`]
/// turns it into an [`OutgoingMessage`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SendRequest {
    /// `+15551234567` or a JID.
    pub to: String,
    /// `text`, `image`, `document`, `audio` or `video`.
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media: Option<MediaPayload>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption: Option<String>,
    /// Id of a message to quote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
}

/// Media in a JSON send: base64 data plus what the receiver shows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MediaPayload {
    /// Standard base64 (padding optional).
    pub data: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mimetype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
}

/// A validated send: what the engines take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingMessage {
    pub to: Recipient,
    pub content: Content,
    pub reply_to: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    Text(String),
    Media(Media),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Media {
    pub kind: MessageKind,
    pub data: Vec<u8>,
    pub mimetype: String,
    pub filename: Option<String>,
    pub caption: Option<String>,
}

impl OutgoingMessage {
    pub fn kind(&self) -> MessageKind {
        match &self.content {
            Content::Text(_) => MessageKind::Text,
            Content::Media(m) => m.kind,
        }
    }
}

/// A refused request: the code and a message for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub code: ErrorCode,
    pub message: String,
}

impl Invalid {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl SendRequest {
    /// Checks the request and decodes its media. `media_max_bytes` caps the decoded size.
    pub fn validate(&self, media_max_bytes: usize) -> Result<OutgoingMessage, Invalid> {
        let to: Recipient = self
            .to
            .parse()
            .map_err(|e: crate::ids::IdError| Invalid::new(ErrorCode::InvalidRecipient, e.to_string()))?;
        let kind: MessageKind = self.kind.parse().map_err(|()| {
            Invalid::new(
                ErrorCode::ValidationFailed,
                format!(
                    "type must be one of text, image, document, audio, video (got {:?})",
                    truncated(&self.kind)
                ),
            )
        })?;
        if let Some(r) = &self.reply_to {
            if r.is_empty() || r.len() > 128 {
                return Err(Invalid::new(ErrorCode::ValidationFailed, "replyTo must be 1-128 characters"));
            }
        }
        // Checked for every type, as the schema says: a text message does not use its caption,
        // but an oversized one is still a bad request, not something to drop silently.
        if self.caption.as_ref().is_some_and(|c| c.chars().count() > MAX_CAPTION_CHARS) {
            return Err(Invalid::new(
                ErrorCode::ValidationFailed,
                format!("caption is longer than {MAX_CAPTION_CHARS} characters"),
            ));
        }
        let content = match kind {
            MessageKind::Text => {
                if self.media.is_some() {
                    return Err(Invalid::new(ErrorCode::ValidationFailed, "a text message has no media"));
                }
                let text = self.text.as_deref().unwrap_or("");
                if text.trim().is_empty() {
                    return Err(Invalid::new(ErrorCode::EmptyText, "text must not be empty"));
                }
                if text.chars().count() > MAX_TEXT_CHARS {
                    return Err(Invalid::new(
                        ErrorCode::ValidationFailed,
                        format!("text is longer than {MAX_TEXT_CHARS} characters"),
                    ));
                }
                Content::Text(text.to_owned())
            }
            _ => {
                let media = self.media.as_ref().ok_or_else(|| {
                    Invalid::new(ErrorCode::ValidationFailed, format!("a {} message needs media", kind.as_str()))
                })?;
                // Refuse before decoding: base64 is 4/3 of the bytes it carries.
                if media.data.len() / 4 * 3 > media_max_bytes + 3 {
                    return Err(too_large(media_max_bytes));
                }
                let data = decode_base64(&media.data).map_err(|()| {
                    Invalid::new(ErrorCode::ValidationFailed, "media.data is not valid base64")
                })?;
                let caption = self.caption.clone().or_else(|| self.text.clone());
                Content::Media(build_media(
                    kind,
                    data,
                    media.mimetype.as_deref(),
                    media.filename.as_deref(),
                    caption,
                    media_max_bytes,
                )?)
            }
        };
        Ok(OutgoingMessage {
            to,
            content,
            reply_to: self.reply_to.clone(),
        })
    }
}

/// Builds validated media from raw bytes (multipart uploads come here directly).
pub fn build_media(
    kind: MessageKind,
    data: Vec<u8>,
    mimetype: Option<&str>,
    filename: Option<&str>,
    caption: Option<String>,
    media_max_bytes: usize,
) -> Result<Media, Invalid> {
    if data.is_empty() {
        return Err(Invalid::new(ErrorCode::ValidationFailed, "media is empty"));
    }
    if data.len() > media_max_bytes {
        return Err(too_large(media_max_bytes));
    }
    if let Some(c) = &caption {
        if c.chars().count() > MAX_CAPTION_CHARS {
            return Err(Invalid::new(
                ErrorCode::ValidationFailed,
                format!("caption is longer than {MAX_CAPTION_CHARS} characters"),
            ));
        }
    }
    if let Some(f) = filename {
        if f.is_empty() || f.len() > 255 || f.contains(['/', '\\', '\0']) {
            return Err(Invalid::new(
                ErrorCode::ValidationFailed,
                "filename must be 1-255 characters without path separators",
            ));
        }
    }
    let mimetype = match mimetype.map(str::trim).filter(|m| !m.is_empty()) {
        Some(m) => {
            let m = m.to_ascii_lowercase();
            if !is_mime_type(&m) {
                return Err(Invalid::new(
                    ErrorCode::UnsupportedMediaType,
                    format!("{:?} is not a MIME type", truncated(&m)),
                ));
            }
            m
        }
        None => sniff_mimetype(&data)
            .map(str::to_owned)
            .or_else(|| (kind == MessageKind::Document).then(|| "application/octet-stream".to_owned()))
            .ok_or_else(|| {
                Invalid::new(
                    ErrorCode::UnsupportedMediaType,
                    format!("cannot tell the type of this {}; give media.mimetype", kind.as_str()),
                )
            })?,
    };
    let family_ok = match kind {
        MessageKind::Image => mimetype.starts_with("image/"),
        MessageKind::Audio => mimetype.starts_with("audio/"),
        MessageKind::Video => mimetype.starts_with("video/"),
        MessageKind::Document => true,
        MessageKind::Text => false,
    };
    if !family_ok {
        return Err(Invalid::new(
            ErrorCode::UnsupportedMediaType,
            format!("{mimetype} cannot be sent as {}", kind.as_str()),
        ));
    }
    Ok(Media {
        kind,
        data,
        mimetype,
        filename: filename.map(str::to_owned),
        caption,
    })
}

fn too_large(max: usize) -> Invalid {
    Invalid::new(ErrorCode::MediaTooLarge, format!("media is larger than {max} bytes"))
}

fn is_mime_type(m: &str) -> bool {
    let essence = m.split(';').next().unwrap_or("");
    match essence.split_once('/') {
        Some((t, s)) => {
            let tok = |x: &str| {
                !x.is_empty()
                    && x.len() <= 127
                    && x.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$&^_.+-".contains(&b))
            };
            tok(t) && tok(s)
        }
        None => false,
    }
}

/// The MIME type of common media formats from their first bytes.
pub fn sniff_mimetype(data: &[u8]) -> Option<&'static str> {
    let starts = |sig: &[u8]| data.starts_with(sig);
    if starts(b"\x89PNG\r\n\x1a\n") {
        Some("image/png")
    } else if starts(&[0xFF, 0xD8, 0xFF]) {
        Some("image/jpeg")
    } else if starts(b"GIF87a") || starts(b"GIF89a") {
        Some("image/gif")
    } else if data.len() >= 12 && &data[0..4] == b"RIFF" && &data[8..12] == b"WEBP" {
        Some("image/webp")
    } else if starts(b"%PDF-") {
        Some("application/pdf")
    } else if starts(b"OggS") {
        Some("audio/ogg")
    } else if starts(b"ID3") || (data.len() >= 2 && data[0] == 0xFF && data[1] & 0xE0 == 0xE0) {
        Some("audio/mpeg")
    } else if data.len() >= 12 && &data[4..8] == b"ftyp" {
        Some("video/mp4")
    } else {
        None
    }
}

/// Standard or URL-safe base64, padding optional, whitespace ignored.
pub fn decode_base64(s: &str) -> Result<Vec<u8>, ()> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3 + 3);
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    let mut seen_pad = false;
    for b in s.bytes() {
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            b'=' => {
                seen_pad = true;
                continue;
            }
            b' ' | b'\n' | b'\r' | b'\t' => continue,
            _ => return Err(()),
        };
        if seen_pad {
            return Err(());
        }
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    // A single leftover sextet cannot encode a byte.
    if bits >= 6 {
        return Err(());
    }
    Ok(out)
}

/// Status of a sent message; only ever moves forward (see [`MessageStatus::rank`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum MessageStatus {
    /// Accepted by the gateway, not yet handed to WhatsApp.
    Queued,
    /// Acknowledged by WhatsApp's server.
    Sent,
    /// Delivered to the recipient's phone.
    Delivered,
    /// Read (or played) by the recipient.
    Read,
    /// Will not be sent; see the reason.
    Failed,
}

impl MessageStatus {
    /// Order of progress; an update to a lower rank is stale and ignored. `Failed` ranks
    /// above `Queued` and `Sent` only: a delivered message cannot fail afterwards.
    pub fn rank(self) -> u8 {
        match self {
            Self::Queued => 0,
            Self::Sent => 1,
            Self::Failed => 2,
            Self::Delivered => 3,
            Self::Read => 4,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Sent => "sent",
            Self::Delivered => "delivered",
            Self::Read => "read",
            Self::Failed => "failed",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, Self::Read | Self::Failed)
    }
}

/// Sent messages a session pod remembers for `GET /v1/messages/{id}`, oldest forgotten first
/// (the gateway keeps the full history).
pub const MESSAGE_LOG_ENTRIES: usize = 10_000;
/// `Idempotency-Key`s a session pod remembers, oldest forgotten first (the gateway retries
/// within minutes, not days).
pub const IDEMPOTENCY_KEYS: usize = 10_000;
/// What those two tables hold in memory when full, at most, MiB: the budget the session pod's
/// test `table_memory` holds them to (measured 5.96 MiB: 2.43 for the log, 3.53 for the keys).
/// A pod that has sent more messages than the tables hold stops growing; the soak (`wa-soak`)
/// derives the memory growth it allows a pod from this.
pub const FULL_TABLES_MIB: f64 = 6.5;

/// `POST /v1/messages` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SendResponse {
    /// The WhatsApp message id.
    pub id: String,
    /// The chat JID it went to.
    pub to: String,
    pub status: MessageStatus,
    pub timestamp: DateTime<Utc>,
}

/// `GET /v1/messages/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageInfo {
    pub id: String,
    pub to: String,
    #[serde(rename = "type")]
    pub kind: MessageKind,
    pub status: MessageStatus,
    pub timestamp: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `POST /v1/sandbox/scan`: the simulated phone scans the current QR code (or, with a
/// pair code pending, enters it) and links as this account.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScanRequest {
    /// When given, must equal the QR code or pair code currently shown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// The account's number; `+15550000001` by default (or the pair-code number).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone_number: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_name: Option<String>,
}

/// `POST /v1/sandbox/inbound`: a simulated contact sends the session a message.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InboundRequest {
    /// Sender: `+15551234567` or a JID.
    pub from: String,
    /// `text` (default) or a media type.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media: Option<MediaPayload>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InboundResponse {
    pub id: String,
}

/// `POST /v1/sandbox/disconnect`: a simulated network drop.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DisconnectRequest {
    /// How long the network stays down before reconnecting succeeds (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<u32>,
}

/// What the pod POSTs to its events URL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventBatch {
    pub events: Vec<PodEvent>,
}

/// One event, delivered at least once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodEvent {
    /// Unique per event (UUIDv7); the de-duplication key.
    pub id: String,
    pub session: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub occurred_at: DateTime<Utc>,
    #[serde(flatten)]
    pub body: EventBody,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum EventBody {
    /// The session's phase changed.
    State {
        phase: Phase,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        account: Option<Account>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// A message arrived.
    Message(InboundMessage),
    /// A sent message moved on (sent, delivered, read, failed).
    Receipt(Receipt),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Receipt {
    pub message_id: String,
    /// The chat JID.
    pub chat: String,
    pub status: MessageStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InboundMessage {
    /// The WhatsApp message id.
    pub message_id: String,
    /// Sender JID.
    pub from: String,
    /// Chat JID (the sender for direct chats, the group otherwise).
    pub chat: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_name: Option<String>,
    pub message_type: MessageKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media: Option<InboundMedia>,
    pub timestamp: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InboundMedia {
    pub mimetype: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
    pub size: u64,
    /// Hex SHA-256 of the plaintext.
    pub sha256: String,
    /// Base64 of the plaintext, when it was downloaded and is under the media cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
}

/// The gateway's answer to an [`EventBatch`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventAck {
    /// Events newly stored.
    pub accepted: u32,
    /// Events already seen (delivered before).
    pub duplicates: u32,
}

fn truncated(s: &str) -> &str {
    let mut end = s.len().min(40);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1024;

    fn req(json: serde_json::Value) -> SendRequest {
        serde_json::from_value(json).unwrap()
    }

    fn check(json: serde_json::Value, expected: Result<MessageKind, ErrorCode>) {
        let got = req(json.clone()).validate(MAX).map(|m| m.kind()).map_err(|e| e.code);
        assert_eq!(got, expected, "{json}");
    }

    #[test]
    fn validation_table() {
        use serde_json::json;
        use ErrorCode::*;
        let png = "iVBORw0KGgoAAAANSUhEUg=="; // PNG signature + start of IHDR
        check(json!({"to": "+15551234567", "type": "text", "text": "hi"}), Ok(MessageKind::Text));
        check(json!({"to": "1555@s.whatsapp.net", "type": "text", "text": "hi"}), Ok(MessageKind::Text));
        check(json!({"to": "555", "type": "text", "text": "hi"}), Err(InvalidRecipient));
        check(json!({"to": "+1", "type": "text", "text": "hi"}), Err(InvalidRecipient));
        check(json!({"to": "+15551234567", "type": "text", "text": "  "}), Err(EmptyText));
        check(json!({"to": "+15551234567", "type": "text"}), Err(EmptyText));
        check(json!({"to": "+15551234567", "type": "sticker", "text": "x"}), Err(ValidationFailed));
        // The caption's limit holds on text messages too (found by the API fuzzer).
        check(
            json!({"to": "+15551234567", "type": "text", "text": "x", "caption": "c".repeat(MAX_CAPTION_CHARS + 1)}),
            Err(ValidationFailed),
        );
        check(json!({"to": "+15551234567", "type": "image", "media": {"data": png}}), Ok(MessageKind::Image));
        check(json!({"to": "+15551234567", "type": "image"}), Err(ValidationFailed));
        check(json!({"to": "+15551234567", "type": "image", "media": {"data": "!!"}}), Err(ValidationFailed));
        check(json!({"to": "+15551234567", "type": "image", "media": {"data": "AAAA"}}), Err(UnsupportedMediaType));
        check(
            json!({"to": "+15551234567", "type": "image", "media": {"data": png, "mimetype": "application/pdf"}}),
            Err(UnsupportedMediaType),
        );
        check(
            json!({"to": "+15551234567", "type": "document", "media": {"data": "AAAA", "filename": "a.bin"}}),
            Ok(MessageKind::Document),
        );
        check(
            json!({"to": "+15551234567", "type": "document", "media": {"data": "AAAA", "filename": "../x"}}),
            Err(ValidationFailed),
        );
        let big = "A".repeat(MAX / 3 * 4 + 8);
        check(json!({"to": "+15551234567", "type": "document", "media": {"data": big}}), Err(MediaTooLarge));
        check(
            json!({"to": "+15551234567", "type": "text", "text": "x".repeat(MAX_TEXT_CHARS + 1)}),
            Err(ValidationFailed),
        );
    }

    #[test]
    fn caption_falls_back_to_text() {
        let m = req(serde_json::json!({"to": "+15551234567", "type": "document",
            "media": {"data": "AAAA", "mimetype": "text/plain"}, "text": "see"}))
        .validate(MAX)
        .unwrap();
        match m.content {
            Content::Media(m) => {
                assert_eq!(m.caption.as_deref(), Some("see"));
                assert_eq!(m.data, vec![0, 0, 0]);
            }
            Content::Text(_) => panic!("expected media"),
        }
    }

    #[test]
    fn listen_addresses() {
        let check = |input: &str, expected: Option<&str>| {
            let got = parse_listen(input).ok();
            assert_eq!(got, expected.map(|e| e.parse().unwrap()), "{input}");
        };
        check("0.0.0.0:8080", Some("0.0.0.0:8080"));
        check("127.0.0.7:9000", Some("127.0.0.7:9000"));
        check("10.244.1.7", Some("10.244.1.7:8080"));
        check("[fd00:10:244::7]:9000", Some("[fd00:10:244::7]:9000"));
        check("fd00:10:244::7", Some("[fd00:10:244::7]:8080"));
        check("[fd00:10:244::7]", Some("[fd00:10:244::7]:8080"));
        check("::", Some("[::]:8080"));
        check(" 10.0.0.1 ", Some("10.0.0.1:8080"));
        // What `$(POD_IP):8080` becomes for an IPv6 pod is another IPv6 address (8080 as its
        // last group), one the pod does not have: why the operator sets the bare pod IP.
        check("fd00:10:244::7:8080", Some("[fd00:10:244::7:8080]:8080"));
        check("nowhere", None);
        check("10.0.0.1:", None);
        check("10.0.0.1:99999", None);
        check("[fd00::7", None);
        check("", None);
    }

    #[test]
    fn base64_decoding() {
        assert_eq!(decode_base64("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(decode_base64("aGVsbG8").unwrap(), b"hello");
        assert_eq!(decode_base64("aGVs\nbG8=").unwrap(), b"hello");
        assert_eq!(decode_base64("-_-_").unwrap(), decode_base64("+/+/").unwrap());
        assert!(decode_base64("a").is_err());
        assert!(decode_base64("aGVsbG8=x").is_err());
        assert!(decode_base64("a*").is_err());
    }

    #[test]
    fn status_only_moves_forward() {
        use MessageStatus::*;
        assert!(Sent.rank() < Delivered.rank() && Delivered.rank() < Read.rank());
        assert!(Sent.rank() < Failed.rank() && Failed.rank() < Delivered.rank());
    }

    #[test]
    fn event_wire_shape() {
        let e = PodEvent {
            id: "e1".into(),
            session: "s".into(),
            namespace: None,
            occurred_at: "2026-01-01T00:00:00Z".parse().unwrap(),
            body: EventBody::Receipt(Receipt {
                message_id: "m1".into(),
                chat: "1@s.whatsapp.net".into(),
                status: MessageStatus::Delivered,
                reason: None,
            }),
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id": "e1", "session": "s", "occurredAt": "2026-01-01T00:00:00Z",
                "type": "receipt", "messageId": "m1", "chat": "1@s.whatsapp.net", "status": "delivered"})
        );
        let back: PodEvent = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
    }
}
