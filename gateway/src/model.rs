//! The public API's wire types (what clients send and get back), with their JSON schemas
//! for the OpenAPI document. Request types that the session pod already defines
//! (`SendRequest`, `ScanRequest`, …) come from `wa_api::pod` and are not repeated here.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use wa_api::crd::{Account, WebhookEvent};
use wa_api::pod::{InboundMedia, MessageKind, PodEvent};
use wa_api::{Engine, Phase};

use crate::store::{DeliveryRow, KeyRecord, MessageRow, WebhookRow};
use crate::util::to_time;

// ---- sessions ------------------------------------------------------------------------------

/// A WhatsApp session as the gateway sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Session {
    pub name: String,
    /// Kubernetes namespace (Kubernetes mode only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub engine: Engine,
    pub phase: Phase,
    /// Whether the session's pod answers and can take requests.
    pub ready: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<Account>,
    /// Pairing by phone number (pair code) instead of a QR scan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone_number: Option<String>,
    /// The pair code to enter on the phone, while pairing by phone number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pair_code: Option<String>,
    /// What went wrong last, when the session is not healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SessionList {
    pub items: Vec<Session>,
}

/// `POST /v1/sessions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateSession {
    /// A DNS label: lowercase letters, digits and '-', starting with a letter, at most 53 characters.
    pub name: String,
    /// `whatsapp` (default) or `sandbox`.
    #[serde(default)]
    pub engine: Option<Engine>,
    /// E.164 phone number: pair by an 8-character code instead of a QR scan.
    #[serde(default)]
    pub phone_number: Option<String>,
    /// Pacing of outgoing messages, enforced by the session's pod.
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimit {
    /// Sustained sends per minute (1-6000).
    pub messages_per_minute: u32,
    /// Sends allowed at once above the sustained rate (1-1000).
    pub burst: u32,
}

/// `GET /v1/sessions/{name}/qr` with `Accept: application/json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Qr {
    /// The text encoded in the QR code.
    pub code: String,
    /// When WhatsApp stops accepting this code; a new one replaces it.
    pub expires_at: DateTime<Utc>,
}

// ---- messages ------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Outbound,
    Inbound,
}

/// Where a message is. Outbound: queued → sent → delivered → read, or failed (never
/// backwards). Inbound messages are `received`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum MessageState {
    Queued,
    Sent,
    Delivered,
    Read,
    Failed,
    Received,
}

impl MessageState {
    pub fn parse(s: &str) -> MessageState {
        match s {
            "sent" => Self::Sent,
            "delivered" => Self::Delivered,
            "read" => Self::Read,
            "failed" => Self::Failed,
            "received" => Self::Received,
            _ => Self::Queued,
        }
    }
}

/// A message, either direction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Message {
    /// The gateway's id of the message.
    pub id: String,
    pub session: String,
    pub direction: Direction,
    /// The chat JID.
    pub chat: String,
    /// Sender JID (inbound).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_name: Option<String>,
    #[serde(rename = "type")]
    pub kind: MessageKind,
    /// Text, or the caption of media.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media: Option<MediaInfo>,
    pub status: MessageState,
    /// Why the message failed (or, while queued, why the last attempt did not go through).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<MessageError>,
    /// WhatsApp's id of the message, once WhatsApp has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wa_message_id: Option<String>,
    /// Forwarding attempts so far (outbound).
    pub attempts: u32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// When WhatsApp accepted (outbound) or the sender sent (inbound) the message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MediaInfo {
    pub mimetype: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
    /// Size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MessageError {
    /// A stable error code (see the error codes of the API).
    pub code: String,
    pub message: String,
}

impl From<MessageRow> for Message {
    fn from(r: MessageRow) -> Self {
        let direction = if r.direction == "inbound" { Direction::Inbound } else { Direction::Outbound };
        let media = r.media_mimetype.map(|mimetype| MediaInfo {
            mimetype,
            filename: r.media_filename,
            size: r.media_size.and_then(|s| u64::try_from(s).ok()),
        });
        let error = match (r.error_code, r.error) {
            (Some(code), message) => Some(MessageError { code, message: message.unwrap_or_default() }),
            (None, Some(message)) => Some(MessageError { code: "SEND_FAILED".into(), message }),
            (None, None) => None,
        };
        Message {
            id: r.id,
            session: r.session,
            direction,
            chat: r.chat,
            from: r.sender,
            push_name: r.push_name,
            kind: r.kind.parse().unwrap_or(MessageKind::Text),
            text: r.body_text,
            media,
            status: MessageState::parse(&r.status),
            error,
            wa_message_id: r.wa_id,
            attempts: u32::try_from(r.attempts).unwrap_or(0),
            created_at: to_time(r.created_at),
            updated_at: to_time(r.updated_at),
            sent_at: r.sent_at.map(to_time),
        }
    }
}

/// A page of history, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MessagePage {
    pub items: Vec<Message>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

// ---- API keys ------------------------------------------------------------------------------

/// What a non-admin key may do, on the sessions it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    /// Send messages.
    Send,
    /// Read sessions, message status and history.
    Read,
    /// Restart, log out, pair (QR, pair code) and manage webhooks.
    Manage,
}

/// `POST /v1/keys`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateKey {
    /// A label for people (1-100 characters).
    pub name: String,
    /// An admin key may do everything, including managing sessions and keys.
    #[serde(default)]
    pub admin: bool,
    /// For non-admin keys: what the key may do.
    #[serde(default)]
    pub permissions: Vec<Permission>,
    /// For non-admin keys: the sessions it may use (1-100 names).
    #[serde(default)]
    pub sessions: Vec<String>,
}

/// An API key, without its secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiKey {
    pub id: String,
    pub name: String,
    /// The first characters of the key, to tell keys apart.
    pub prefix: String,
    pub admin: bool,
    pub permissions: Vec<Permission>,
    pub sessions: Vec<String>,
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<DateTime<Utc>>,
}

impl From<&KeyRecord> for ApiKey {
    fn from(k: &KeyRecord) -> Self {
        ApiKey {
            id: k.id.clone(),
            name: k.name.clone(),
            prefix: k.prefix.clone(),
            admin: k.admin,
            permissions: serde_json::from_str(&k.permissions).unwrap_or_default(),
            sessions: serde_json::from_str(&k.sessions).unwrap_or_default(),
            created_at: to_time(k.created_at),
            revoked_at: k.revoked_at.map(to_time),
        }
    }
}

/// The answer to `POST /v1/keys`: the only time the raw key is shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreatedKey {
    /// The raw key (`wak_…`). Store it now: the gateway keeps only its hash.
    pub key: String,
    #[serde(flatten)]
    pub info: ApiKey,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct KeyList {
    pub items: Vec<ApiKey>,
}

// ---- webhooks ------------------------------------------------------------------------------

/// `POST /v1/sessions/{name}/webhooks`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateWebhook {
    /// http(s) URL that receives a POST per event.
    pub url: String,
    /// Which events to deliver; all when empty or absent.
    #[serde(default)]
    pub events: Vec<WebhookEvent>,
    /// Signing secret (16-256 characters); generated when absent.
    #[serde(default)]
    pub secret: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum WebhookSource {
    /// Registered through this API.
    Api,
    /// Declared in the `WhatsAppSession`'s `spec.webhooks` (Kubernetes mode; read-only here).
    Spec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Webhook {
    pub id: String,
    pub session: String,
    pub url: String,
    /// Event types delivered; empty means all.
    pub events: Vec<WebhookEvent>,
    pub source: WebhookSource,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<DateTime<Utc>>,
}

impl From<&WebhookRow> for Webhook {
    fn from(w: &WebhookRow) -> Self {
        Webhook {
            id: w.id.clone(),
            session: w.session.clone(),
            url: w.url.clone(),
            events: serde_json::from_str(&w.events).unwrap_or_default(),
            source: WebhookSource::Api,
            created_at: Some(to_time(w.created_at)),
        }
    }
}

/// The answer to creating a webhook: the only time the signing secret is shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreatedWebhook {
    /// The HMAC-SHA256 signing secret.
    pub secret: String,
    #[serde(flatten)]
    pub webhook: Webhook,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WebhookList {
    pub items: Vec<Webhook>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    /// Waiting for its next attempt.
    Pending,
    Delivered,
    /// Every attempt failed; kept here, redeliver by hand.
    Dead,
}

/// One event's delivery to one webhook.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Delivery {
    pub id: String,
    pub webhook_id: String,
    pub event_id: String,
    pub event_type: WebhookEvent,
    pub status: DeliveryStatus,
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// HTTP status of the last attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<DateTime<Utc>>,
    /// The body that is (or was) POSTed.
    pub payload: serde_json::Value,
}

impl From<DeliveryRow> for Delivery {
    fn from(d: DeliveryRow) -> Self {
        let event_type = match d.event_type.as_str() {
            "message" => WebhookEvent::Message,
            "receipt" => WebhookEvent::Receipt,
            _ => WebhookEvent::State,
        };
        let status = match d.status.as_str() {
            "delivered" => DeliveryStatus::Delivered,
            "dead" => DeliveryStatus::Dead,
            _ => DeliveryStatus::Pending,
        };
        Delivery {
            id: d.id,
            webhook_id: d.webhook_id,
            event_id: d.event_id,
            event_type,
            status,
            attempts: u32::try_from(d.attempts).unwrap_or(0),
            next_attempt_at: d.next_attempt_at.map(to_time),
            last_status: d.last_status.and_then(|s| u16::try_from(s).ok()),
            last_error: d.last_error,
            created_at: to_time(d.created_at),
            updated_at: to_time(d.updated_at),
            delivered_at: d.delivered_at.map(to_time),
            payload: serde_json::from_str(&d.payload).unwrap_or(serde_json::Value::Null),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryPage {
    pub items: Vec<Delivery>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// What a webhook receives: one event per POST, signed (see `X-Wa-Signature`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookPayload {
    /// The event id; the same on every retry (use it to de-duplicate).
    pub id: String,
    #[serde(rename = "type")]
    pub kind: WebhookEvent,
    pub session: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub occurred_at: DateTime<Utc>,
    pub data: WebhookData,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum WebhookData {
    Message(InboundEventData),
    Receipt(ReceiptEventData),
    State(StateEventData),
}

/// `type: message`: a message arrived.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InboundEventData {
    /// The gateway's id (`GET /v1/messages/{id}`).
    pub message_id: String,
    pub wa_message_id: String,
    pub from: String,
    pub chat: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_name: Option<String>,
    #[serde(rename = "type")]
    pub kind: MessageKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<InboundMediaSchema>")]
    pub media: Option<InboundMedia>,
    pub timestamp: DateTime<Utc>,
}

/// Media of an inbound message.
#[derive(JsonSchema)]
#[allow(dead_code)]
#[serde(rename_all = "camelCase")]
struct InboundMediaSchema {
    mimetype: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    filename: Option<String>,
    size: u64,
    /// Hex SHA-256 of the content.
    sha256: String,
    /// Base64 of the content, when it was downloaded and is under the media cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    data: Option<String>,
}

/// `type: receipt`: a sent message moved on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReceiptEventData {
    /// The gateway's id of the sent message, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    pub wa_message_id: String,
    pub chat: String,
    pub status: wa_api::pod::MessageStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `type: state`: the session's phase changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StateEventData {
    pub phase: Phase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<Account>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The webhook body for a pod event; `message_id` is the gateway's id of the message
/// concerned (inbound: the stored message; receipt: the sent message, when known).
pub fn webhook_payload(event: &PodEvent, namespace: Option<&str>, message_id: Option<&str>) -> WebhookPayload {
    use wa_api::pod::EventBody;
    let (kind, data) = match &event.body {
        EventBody::State { phase, account, reason } => (
            WebhookEvent::State,
            WebhookData::State(StateEventData { phase: *phase, account: account.clone(), reason: reason.clone() }),
        ),
        EventBody::Message(m) => (
            WebhookEvent::Message,
            WebhookData::Message(InboundEventData {
                message_id: message_id.unwrap_or_default().to_owned(),
                wa_message_id: m.message_id.clone(),
                from: m.from.clone(),
                chat: m.chat.clone(),
                push_name: m.push_name.clone(),
                kind: m.message_type,
                text: m.text.clone(),
                caption: m.caption.clone(),
                media: m.media.clone(),
                timestamp: m.timestamp,
            }),
        ),
        EventBody::Receipt(r) => (
            WebhookEvent::Receipt,
            WebhookData::Receipt(ReceiptEventData {
                message_id: message_id.map(str::to_owned),
                wa_message_id: r.message_id.clone(),
                chat: r.chat.clone(),
                status: r.status,
                reason: r.reason.clone(),
            }),
        ),
    };
    WebhookPayload {
        id: event.id.clone(),
        kind,
        session: event.session.clone(),
        namespace: namespace.map(str::to_owned).or_else(|| event.namespace.clone()),
        occurred_at: event.occurred_at,
        data,
    }
}

// ---- compat --------------------------------------------------------------------------------

/// `POST /api/v1/messages/send-text/` (older gateways' shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct CompatSendText {
    /// `+<country><number>` or a JID.
    pub recipient: String,
    pub message: String,
    /// Optional: the session to send from; otherwise a connected session the key may use.
    #[serde(default, rename = "sessionId", alias = "session_id")]
    pub session_id: Option<String>,
}

/// `POST /api/sessions/{sessionId}/send` (older gateways' shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct CompatSend {
    /// `6281234567890@s.whatsapp.net`, a bare number, or `+<number>`.
    pub to: String,
    /// `text` (default), `image`, `video`, `audio` or `document`.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    /// `data:<mime>;base64,<data>` or bare base64.
    #[serde(default)]
    pub media: Option<String>,
    #[serde(default)]
    pub caption: Option<String>,
    #[serde(default)]
    pub filename: Option<String>,
}

/// `POST /api/v1/sessions/init/` and `POST /api/v1/sessions/disconnect/` (optional body).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct CompatSessionRequest {
    #[serde(default, rename = "sessionId", alias = "session_id")]
    pub session_id: Option<String>,
    /// Engine for a session created by `init` (`whatsapp` by default).
    #[serde(default)]
    pub engine: Option<Engine>,
}

/// The success shape of the older gateways.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(rename = "CompatOk_{T}")]
pub struct CompatOk<T> {
    /// Always true.
    pub success: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    pub data: T,
}

/// The failure shape of the older gateways.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CompatFailure {
    /// Always false.
    pub success: bool,
    /// What went wrong (most failures).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Same stable codes as the v1 API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    /// What went wrong (authentication failures: `Invalid API key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CompatSent {
    /// WhatsApp's message id.
    pub message_id: String,
    pub timestamp: DateTime<Utc>,
    /// The gateway's id of the message.
    pub db_id: String,
    /// Media sends only: the uploaded file's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_path: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CompatSessionSent {
    pub message_id: String,
    pub status: String,
    pub session_id: String,
    pub timestamp: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CompatSessionInfo {
    pub session_id: String,
    /// `qr_pending`, `connected`, `connecting` or `disconnected`.
    pub status: String,
    /// `data:image/png;base64,…` while a QR code is shown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qr_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone_number: Option<String>,
    pub is_ready: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CompatHistoryItem {
    pub id: String,
    pub message_id: Option<String>,
    pub session_id: String,
    pub direction: Direction,
    pub recipient: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender: Option<String>,
    #[serde(rename = "type")]
    pub kind: MessageKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    pub status: MessageState,
    pub timestamp: DateTime<Utc>,
}

// ---- internal ------------------------------------------------------------------------------

/// Health answer of `/healthz` and `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Health {
    /// `ok`, or what is not ready.
    pub status: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_key_is_flat() {
        let k = CreatedKey {
            key: "wak_x".into(),
            info: ApiKey {
                id: "1".into(),
                name: "n".into(),
                prefix: "wak_x".into(),
                admin: true,
                permissions: vec![],
                sessions: vec![],
                created_at: to_time(0),
                revoked_at: None,
            },
        };
        let v = serde_json::to_value(&k).unwrap();
        assert_eq!(v["key"], "wak_x");
        assert_eq!(v["admin"], true);
        assert!(v.get("info").is_none());
    }

    #[test]
    fn message_row_view() {
        let row = MessageRow {
            id: "m".into(),
            session: "s".into(),
            direction: "outbound".into(),
            chat: "1@s.whatsapp.net".into(),
            sender: None,
            push_name: None,
            kind: "image".into(),
            body_text: Some("cap".into()),
            media_mimetype: Some("image/png".into()),
            media_filename: None,
            media_size: Some(10),
            status: "failed".into(),
            status_rank: 2,
            error_code: Some("SEND_FAILED".into()),
            error: Some("nope".into()),
            wa_id: None,
            idempotency_key: None,
            request_hash: None,
            api_key_id: None,
            mode: "sync".into(),
            attempts: 1,
            next_attempt_at: None,
            lease_until: None,
            created_at: 0,
            updated_at: 0,
            sent_at: None,
        };
        let m = Message::from(row);
        assert_eq!(m.kind, MessageKind::Image);
        assert_eq!(m.status, MessageState::Failed);
        assert_eq!(m.error.unwrap().code, "SEND_FAILED");
        assert_eq!(m.media.unwrap().size, Some(10));
    }
}
