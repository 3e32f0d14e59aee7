//! The HTTP API: one endpoint table builds both the router ([`app`]) and the OpenAPI
//! document ([`openapi_text`]), so they cannot drift apart.

pub mod admission;
pub mod compat;
pub mod drain;
pub mod extract;
pub mod internal;
pub mod keys;
pub mod messages;
pub mod sessions;
pub mod system;
pub mod webhooks;

use std::sync::OnceLock;
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderValue, Method};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter, on};
use serde_json::{Value, json};
use tracing::Instrument;
use wa_api::ErrorCode;
use wa_api::pod::{DisconnectRequest, EventAck, InboundRequest, InboundResponse, PairCodeRequest, PairCodeResponse, ScanRequest, SendRequest};

use crate::error::ApiError;
use crate::model::*;
use crate::openapi::{Auth, Content, Doc, Operation, schema};
use crate::state::AppState;

/// Body limit of routes that take small JSON documents.
pub const SMALL_BODY: usize = 64 * 1024;
/// Body limit of the events route (inbound media arrives base64 in events).
pub const EVENTS_BODY: usize = 96 * 1024 * 1024;

pub struct Endpoint {
    pub method: Method,
    pub path: &'static str,
    pub route: MethodRouter<AppState>,
    pub doc: Doc,
}

fn ep(method: Method, path: &'static str, route: MethodRouter<AppState>, limit: usize, doc: Doc) -> Endpoint {
    Endpoint { method, path, route: route.layer(DefaultBodyLimit::max(limit)), doc }
}

fn filter(m: &Method) -> MethodFilter {
    match *m {
        Method::POST => MethodFilter::POST,
        Method::DELETE => MethodFilter::DELETE,
        Method::PUT => MethodFilter::PUT,
        Method::PATCH => MethodFilter::PATCH,
        _ => MethodFilter::GET,
    }
}

macro_rules! route {
    ($method:expr, $handler:expr) => {
        on(filter(&$method), $handler)
    };
}

/// Errors of routes that call the session's pod; the pod's own codes pass through.
fn pod_errors(doc: Doc) -> Doc {
    doc.errors(&[
        ErrorCode::SessionNotReady,
        ErrorCode::Timeout,
        ErrorCode::SessionNotConnected,
        ErrorCode::AlreadyPaired,
        ErrorCode::QrNotAvailable,
        ErrorCode::RateLimited,
        ErrorCode::SendFailed,
        ErrorCode::SendOutcomeUnknown,
        ErrorCode::RecipientNotOnWhatsapp,
        ErrorCode::ValidationFailed,
        ErrorCode::InvalidRequest,
        ErrorCode::NotFound,
    ])
}

fn limit_schema() -> Value {
    json!({"type": "integer", "minimum": 1, "maximum": 200, "default": 50})
}
fn string_schema() -> Value {
    json!({"type": "string"})
}
fn idempotency_key_schema() -> Value {
    json!({"type": "string", "pattern": "^[!-~]{1,255}$"})
}
fn chat_schema() -> Value {
    json!({"type": "string", "pattern": crate::openapi::RECIPIENT_PATTERN})
}
fn cursor_schema() -> Value {
    json!({"type": "string", "pattern": crate::openapi::CURSOR_PATTERN})
}
fn session_id_schema() -> Value {
    json!({"type": "string", "pattern": crate::openapi::SESSION_NAME_PATTERN})
}
fn time_schema() -> Value {
    json!({"type": "string", "format": "date-time"})
}
fn direction_schema() -> Value {
    json!({"type": "string", "enum": ["outbound", "inbound"]})
}
fn png_schema() -> Value {
    json!({"type": "string", "contentMediaType": "image/png"})
}
fn metrics_schema() -> Value {
    json!({"type": "string", "description": "Prometheus text exposition format 0.0.4."})
}
fn openapi_schema() -> Value {
    json!({"type": "object", "description": "This document."})
}
fn events_schema() -> Value {
    json!({
        "type": "object",
        "required": ["events"],
        "properties": {"events": {"type": "array", "items": {"type": "object", "description": "A wa_api::pod::PodEvent."}}}
    })
}
fn send_multipart_schema() -> Value {
    json!({
        "type": "object",
        "required": ["to"],
        "properties": {
            "to": {"type": "string", "description": "+15551234567 or a JID.", "pattern": crate::openapi::RECIPIENT_PATTERN},
            "type": {"type": "string", "description": "text, image, document, audio or video (document when a file is given, text otherwise)."},
            "text": {"type": "string"},
            "caption": {"type": "string"},
            "replyTo": {"type": "string"},
            "file": {"type": "string", "contentMediaType": "application/octet-stream", "description": "The media; its part's Content-Type is the media type."}
        }
    })
}
fn compat_media_schema() -> Value {
    json!({
        "type": "object",
        "required": ["recipient", "file"],
        "properties": {
            "recipient": {"type": "string", "pattern": crate::openapi::COMPAT_RECIPIENT_PATTERN},
            "media_type": {"type": "string", "enum": ["image", "video", "document", "audio"]},
            "caption": {"type": "string", "maxLength": wa_api::pod::MAX_CAPTION_CHARS},
            "sessionId": {"type": "string", "pattern": crate::openapi::SESSION_NAME_PATTERN},
            "file": {"type": "string", "contentMediaType": "application/octet-stream"}
        }
    })
}

fn compat_fail(doc: Doc, statuses: &[u16]) -> Doc {
    statuses.iter().fold(doc, |d, s| {
        d.response(
            *s,
            "Failure in the older gateways' shape ({success: false, message, error_code}; 401: {success: false, error}).",
            vec![("application/json", Content::Typed(schema::<CompatFailure>))],
            if matches!(s, 429 | 503) { vec![("Retry-After", "Seconds to wait before trying again.")] } else { vec![] },
        )
    })
}

const COMPAT_STATUSES: &[u16] = &[400, 401, 403, 404, 409, 413, 415, 422, 429, 500, 502, 503, 504];

/// Every endpoint of the gateway.
pub fn endpoints(settings: &crate::state::Settings) -> Vec<Endpoint> {
    use Method as M;
    let send_limit = settings.send_body_limit();
    let key = Auth::Key;
    vec![
        // ---- system ----
        ep(M::GET, "/healthz", route!(M::GET, system::healthz), SMALL_BODY,
            Doc::new("health", "System", "Liveness: the process answers.").ok::<Health>(200, "Alive.")),
        ep(M::GET, "/readyz", route!(M::GET, system::readyz), SMALL_BODY,
            Doc::new("ready", "System", "Readiness: the database answers and the session directory is synced.")
                .ok::<Health>(200, "Ready.")
                .response(503, "Not ready.", vec![("application/json", Content::Typed(schema::<Health>))], vec![("Retry-After", "Seconds.")])),
        ep(M::GET, "/metrics", route!(M::GET, system::metrics), SMALL_BODY,
            Doc::new("metrics", "System", "Prometheus metrics: the gateway's own and the fleet's (per session).")
                .response(200, "Prometheus text.", vec![("text/plain", Content::Raw(metrics_schema))], vec![])),
        ep(M::GET, "/openapi.json", route!(M::GET, system::openapi), SMALL_BODY,
            Doc::new("openapi", "System", "This OpenAPI 3.1 document.")
                .response(200, "The document.", vec![("application/json", Content::Raw(openapi_schema))], vec![])),
        ep(M::GET, "/", route!(M::GET, system::index), SMALL_BODY, Doc::hidden()),
        ep(M::GET, "/assets/app.js", route!(M::GET, system::app_js), SMALL_BODY, Doc::hidden()),
        ep(M::GET, "/assets/style.css", route!(M::GET, system::style_css), SMALL_BODY, Doc::hidden()),

        // ---- sessions ----
        ep(M::GET, "/v1/sessions", route!(M::GET, sessions::list), SMALL_BODY,
            Doc::new("listSessions", "Sessions", "List the sessions this key may use.")
                .describe("Needs the read permission.").auth(key).ok::<SessionList>(200, "The sessions.")),
        ep(M::POST, "/v1/sessions", route!(M::POST, sessions::create), SMALL_BODY,
            Doc::new("createSession", "Sessions", "Create a session.")
                .describe("Admin keys only. In local mode the gateway starts a session process; in Kubernetes mode it creates a WhatsAppSession object.")
                .auth(Auth::Admin).json_body::<CreateSession>()
                .errors(&[ErrorCode::SessionExists, ErrorCode::InvalidSessionName, ErrorCode::InvalidPhoneNumber, ErrorCode::ValidationFailed])
                .ok::<Session>(201, "Created.")),
        ep(M::GET, "/v1/sessions/{name}", route!(M::GET, sessions::get), SMALL_BODY,
            Doc::new("getSession", "Sessions", "Get a session.").describe("Needs the read permission.")
                .auth(key).session_path().ok::<Session>(200, "The session.")),
        ep(M::DELETE, "/v1/sessions/{name}", route!(M::DELETE, sessions::delete), SMALL_BODY,
            Doc::new("deleteSession", "Sessions", "Delete a session.")
                .describe("Admin keys only. Stops the session's pod; its auth state is kept, so re-creating the session reconnects without a scan. Sends still queued for it fail.")
                .auth(Auth::Admin).session_path().response(204, "Deleted.", vec![], vec![])),
        ep(M::POST, "/v1/sessions/{name}/restart", route!(M::POST, sessions::restart), SMALL_BODY,
            pod_errors(Doc::new("restartSession", "Sessions", "Reconnect the session to WhatsApp.")
                .describe("Needs the manage permission.").auth(key).session_path()).ok::<Session>(200, "The session.")),
        ep(M::POST, "/v1/sessions/{name}/logout", route!(M::POST, sessions::logout), SMALL_BODY,
            pod_errors(Doc::new("logoutSession", "Sessions", "Unlink the session from its WhatsApp account.")
                .describe("Needs the manage permission. The device disappears from the phone's linked devices; a new scan is needed.")
                .auth(key).session_path()).ok::<Session>(200, "The session.")),
        ep(M::GET, "/v1/sessions/{name}/qr", route!(M::GET, sessions::qr), SMALL_BODY,
            pod_errors(Doc::new("getQr", "Sessions", "The QR code to scan with the phone.")
                .describe("Needs the manage permission. PNG by default; `Accept: application/json` for the code and its expiry; `Accept: text/plain` for a terminal rendering. 409 QR_NOT_AVAILABLE between codes or when not pairing, ALREADY_PAIRED once linked.")
                .auth(key).session_path())
                .response(200, "The current QR code.", vec![
                    ("image/png", Content::Raw(png_schema)),
                    ("application/json", Content::Typed(schema::<Qr>)),
                    ("text/plain", Content::Raw(string_schema)),
                ], vec![])),
        ep(M::POST, "/v1/sessions/{name}/pair-code", route!(M::POST, sessions::pair_code), SMALL_BODY,
            pod_errors(Doc::new("pairCode", "Sessions", "Pair by phone number: get the code to enter on the phone.")
                .describe("Needs the manage permission. On the phone: Linked devices → Link with phone number.")
                .auth(key).session_path().json_body::<PairCodeRequest>().errors(&[ErrorCode::InvalidPhoneNumber]))
                .ok::<PairCodeResponse>(200, "The pair code.")),
        ep(M::POST, "/v1/sessions/{name}/sandbox/scan", route!(M::POST, sessions::sandbox_scan), SMALL_BODY,
            pod_errors(Doc::new("sandboxScan", "Sandbox", "Sandbox: a simulated phone scans the QR code (or enters the pair code).")
                .describe("Admin keys only; sandbox sessions only (404 NOT_FOUND on whatsapp sessions).")
                .auth(Auth::Admin).session_path().optional_json_body::<ScanRequest>().errors(&[ErrorCode::InvalidPhoneNumber]))
                .ok::<Session>(200, "The session.")),
        ep(M::POST, "/v1/sessions/{name}/sandbox/inbound", route!(M::POST, sessions::sandbox_inbound), send_limit,
            pod_errors(Doc::new("sandboxInbound", "Sandbox", "Sandbox: a simulated contact sends the session a message.")
                .describe("Admin keys only; sandbox sessions only.")
                .auth(Auth::Admin).session_path().json_body::<InboundRequest>().errors(&[ErrorCode::InvalidRecipient, ErrorCode::EmptyText, ErrorCode::MediaTooLarge, ErrorCode::UnsupportedMediaType]))
                .ok::<InboundResponse>(200, "The message's WhatsApp id.")),
        ep(M::POST, "/v1/sessions/{name}/sandbox/disconnect", route!(M::POST, sessions::sandbox_disconnect), SMALL_BODY,
            pod_errors(Doc::new("sandboxDisconnect", "Sandbox", "Sandbox: the network drops for a while, then the session reconnects.")
                .describe("Admin keys only; sandbox sessions only.")
                .auth(Auth::Admin).session_path().optional_json_body::<DisconnectRequest>())
                .ok::<Session>(200, "The session.")),

        // ---- messages ----
        ep(M::POST, "/v1/sessions/{name}/messages", route!(M::POST, messages::send), send_limit,
            pod_errors(Doc::new("sendMessage", "Messages", "Send a message.")
                .describe("Needs the send permission. The message is recorded before it is forwarded. Synchronous by default: 201 once WhatsApp accepted it. With `Prefer: respond-async`: 202 and the gateway's outbox delivers it (it survives restarts). With `Idempotency-Key`, a retry answers the first result (200, `Idempotent-Replayed: true`) and never sends twice; the same key with a different body is 409 IDEMPOTENCY_CONFLICT. A failed send answers the error with `X-Message-Id` and `Location` of the recorded message.")
                .auth(key).session_path()
                .header_with("Idempotency-Key", "Makes retries safe: 1-255 visible ASCII characters.", idempotency_key_schema)
                .header("Prefer", "`respond-async` queues the send and answers 202.")
                .body(true, vec![
                    ("application/json", Content::Typed(schema::<SendRequest>)),
                    ("multipart/form-data", Content::Raw(send_multipart_schema)),
                ])
                .errors(&[ErrorCode::IdempotencyConflict, ErrorCode::InvalidRecipient, ErrorCode::EmptyText, ErrorCode::MediaTooLarge, ErrorCode::UnsupportedMediaType]))
                .response(200, "A retry with the same Idempotency-Key: the first send, as it is now.",
                    vec![("application/json", Content::Typed(schema::<Message>))], vec![("Idempotent-Replayed", "true"), ("Location", "The message.")])
                .response(201, "Sent.", vec![("application/json", Content::Typed(schema::<Message>))], vec![("Location", "The message.")])
                .response(202, "Queued (Prefer: respond-async).", vec![("application/json", Content::Typed(schema::<Message>))],
                    vec![("Preference-Applied", "respond-async"), ("Location", "The message.")])),
        ep(M::GET, "/v1/sessions/{name}/messages", route!(M::GET, messages::history), SMALL_BODY,
            Doc::new("listMessages", "Messages", "A session's messages, both directions, newest first.")
                .describe("Needs the read permission. Page with `cursor` (the previous page's `nextCursor`).")
                .auth(key).session_path()
                .query("direction", "outbound or inbound.", direction_schema)
                .query("chat", "A chat JID or phone number.", chat_schema)
                .query("since", "Created at or after (RFC 3339).", time_schema)
                .query("until", "Created before (RFC 3339).", time_schema)
                .query("cursor", "From the previous page's nextCursor.", cursor_schema)
                .query("limit", "Page size, 1-200.", limit_schema)
                .errors(&[ErrorCode::InvalidRecipient])
                .ok::<MessagePage>(200, "A page of messages.")),
        ep(M::GET, "/v1/messages/{id}", route!(M::GET, messages::get), SMALL_BODY,
            Doc::new("getMessage", "Messages", "A message: its status (queued, sent, delivered, read, failed with a reason) and content.")
                .describe("Needs the read permission on the message's session.")
                .auth(key).path("id", "The gateway's message id.").errors(&[ErrorCode::MessageNotFound])
                .ok::<Message>(200, "The message.")),

        // ---- keys ----
        ep(M::POST, "/v1/keys", route!(M::POST, keys::create), SMALL_BODY,
            Doc::new("createKey", "Keys", "Create an API key; the raw key is in this answer only.")
                .describe("Admin keys only. Non-admin keys carry permissions (send, read, manage) on named sessions.")
                .auth(Auth::Admin).json_body::<CreateKey>().errors(&[ErrorCode::ValidationFailed, ErrorCode::InvalidSessionName])
                .ok::<CreatedKey>(201, "Created; store the key now.")),
        ep(M::GET, "/v1/keys", route!(M::GET, keys::list), SMALL_BODY,
            Doc::new("listKeys", "Keys", "List API keys (never their secrets).").auth(Auth::Admin).ok::<KeyList>(200, "The keys.")),
        ep(M::GET, "/v1/keys/{id}", route!(M::GET, keys::get), SMALL_BODY,
            Doc::new("getKey", "Keys", "Get an API key (not its secret).").auth(Auth::Admin)
                .path("id", "The key's id.").errors(&[ErrorCode::KeyNotFound]).ok::<ApiKey>(200, "The key.")),
        ep(M::DELETE, "/v1/keys/{id}", route!(M::DELETE, keys::revoke), SMALL_BODY,
            Doc::new("revokeKey", "Keys", "Revoke an API key; it answers 401 from now on.").auth(Auth::Admin)
                .path("id", "The key's id.").errors(&[ErrorCode::KeyNotFound]).response(204, "Revoked.", vec![], vec![])),

        // ---- webhooks ----
        ep(M::GET, "/v1/sessions/{name}/webhooks", route!(M::GET, webhooks::list), SMALL_BODY,
            Doc::new("listWebhooks", "Webhooks", "A session's webhooks (registered here, and declared in its spec).")
                .describe("Needs the manage permission.").auth(key).session_path().ok::<WebhookList>(200, "The webhooks.")),
        ep(M::POST, "/v1/sessions/{name}/webhooks", route!(M::POST, webhooks::create), SMALL_BODY,
            Doc::new("createWebhook", "Webhooks", "Register a webhook; the signing secret is in this answer only.")
                .describe("Needs the manage permission. Deliveries are signed (X-Wa-Signature), retried with exponential backoff and jitter, and dead-lettered after the last attempt.")
                .auth(key).session_path().json_body::<CreateWebhook>().errors(&[ErrorCode::ValidationFailed])
                .ok::<CreatedWebhook>(201, "Registered.")),
        ep(M::GET, "/v1/sessions/{name}/webhooks/{id}", route!(M::GET, webhooks::get), SMALL_BODY,
            Doc::new("getWebhook", "Webhooks", "Get a webhook.").auth(key).session_path()
                .path("id", "The webhook's id.").errors(&[ErrorCode::WebhookNotFound]).ok::<Webhook>(200, "The webhook.")),
        ep(M::DELETE, "/v1/sessions/{name}/webhooks/{id}", route!(M::DELETE, webhooks::delete), SMALL_BODY,
            Doc::new("deleteWebhook", "Webhooks", "Delete a webhook registered through the API.")
                .describe("Spec webhooks are changed through the WhatsAppSession object (422).")
                .auth(key).session_path().path("id", "The webhook's id.")
                .errors(&[ErrorCode::WebhookNotFound, ErrorCode::ValidationFailed]).response(204, "Deleted.", vec![], vec![])),
        ep(M::GET, "/v1/sessions/{name}/webhooks/{id}/deliveries", route!(M::GET, webhooks::deliveries), SMALL_BODY,
            Doc::new("listDeliveries", "Webhooks", "A webhook's delivery log, newest first (pending, delivered, dead).")
                .auth(key).session_path().path("id", "The webhook's id.")
                .query("cursor", "From the previous page's nextCursor.", cursor_schema)
                .query("limit", "Page size, 1-200.", limit_schema)
                .errors(&[ErrorCode::WebhookNotFound]).ok::<DeliveryPage>(200, "A page of deliveries.")),
        ep(M::POST, "/v1/sessions/{name}/webhooks/{id}/deliveries/{deliveryId}/redeliver", route!(M::POST, webhooks::redeliver), SMALL_BODY,
            Doc::new("redeliver", "Webhooks", "Queue a delivery again (e.g. a dead-lettered one), with a fresh set of attempts.")
                .auth(key).session_path().path("id", "The webhook's id.").path("deliveryId", "The delivery's id.")
                .errors(&[ErrorCode::WebhookNotFound]).ok::<Delivery>(200, "The delivery, pending again.")),

        // ---- compat ----
        ep(M::POST, "/api/sessions/{sessionId}/send", route!(M::POST, compat::session_send), send_limit,
            compat_fail(Doc::new("compatSessionSend", "Compatible", "Older gateways: send from a session (Bearer key).")
                .auth(Auth::Compat)
                .param_session_id()
                .body(true, vec![("application/json", Content::Typed(schema::<CompatSend>))]), COMPAT_STATUSES)
                .compat_ok::<CompatOk<CompatSessionSent>>("Sent.")),
        ep(M::POST, "/api/v1/messages/send-text/", route!(M::POST, compat::send_text), send_limit,
            compat_fail(Doc::new("compatSendText", "Compatible", "Older gateways: send a text (Authorization: ApiKey <key>) from a connected session the key may use.")
                .auth(Auth::Compat)
                .body(true, vec![("application/json", Content::Typed(schema::<CompatSendText>))]), COMPAT_STATUSES)
                .compat_ok::<CompatOk<CompatSent>>("Sent.")),
        ep(M::POST, "/api/v1/messages/send-media/", route!(M::POST, compat::send_media), send_limit,
            compat_fail(Doc::new("compatSendMedia", "Compatible", "Older gateways: send media (multipart: recipient, media_type, file, caption).")
                .auth(Auth::Compat)
                .body(true, vec![("multipart/form-data", Content::Raw(compat_media_schema))]), COMPAT_STATUSES)
                .compat_ok::<CompatOk<CompatSent>>("Sent.")),
        ep(M::GET, "/api/v1/messages/list/", route!(M::GET, compat::list_messages), SMALL_BODY,
            compat_fail(Doc::new("compatListMessages", "Compatible", "Older gateways: message history of the key's session.")
                .auth(Auth::Compat)
                .compat_query("sessionId").compat_query("cursor").compat_query("limit"), COMPAT_STATUSES)
                .compat_ok::<CompatOk<compat::CompatHistory>>("History.")),
        ep(M::POST, "/api/v1/sessions/init/", route!(M::POST, compat::init_session), SMALL_BODY,
            compat_fail(Doc::new("compatInitSession", "Compatible", "Older gateways: the key's session (created when missing) and its QR code.")
                .auth(Auth::Compat)
                .body(false, vec![("application/json", Content::Typed(schema::<CompatSessionRequest>))]), COMPAT_STATUSES)
                .compat_ok::<CompatOk<CompatSessionInfo>>("The session.")),
        ep(M::GET, "/api/v1/sessions/status/", route!(M::GET, compat::session_status), SMALL_BODY,
            compat_fail(Doc::new("compatSessionStatus", "Compatible", "Older gateways: the key's session's status.")
                .auth(Auth::Compat)
                .compat_query("sessionId"), COMPAT_STATUSES)
                .compat_ok::<CompatOk<CompatSessionInfo>>("The session.")),
        ep(M::POST, "/api/v1/sessions/disconnect/", route!(M::POST, compat::disconnect_session), SMALL_BODY,
            compat_fail(Doc::new("compatDisconnectSession", "Compatible", "Older gateways: log the key's session out.")
                .auth(Auth::Compat)
                .body(false, vec![("application/json", Content::Typed(schema::<CompatSessionRequest>))]), COMPAT_STATUSES)
                .compat_ok::<CompatOk<CompatSessionInfo>>("Logged out.")),

        // ---- internal ----
        ep(M::POST, "/internal/v1/events", route!(M::POST, internal::events), EVENTS_BODY,
            Doc::new("podEvents", "Internal", "Session pods deliver their events here (pod token).")
                .describe("Events are applied once by id; the answer counts new and already-seen events.")
                .auth(Auth::PodToken)
                .body(true, vec![("application/json", Content::Raw(events_schema))])
                .errors(&[ErrorCode::InvalidSessionName, ErrorCode::ValidationFailed])
                .ok::<EventAck>(200, "Applied.")),
    ]
}

impl Doc {
    fn param_session_id(mut self) -> Self {
        self.params.push(crate::openapi::Param {
            name: "sessionId",
            location: crate::openapi::In::Path,
            required: true,
            description: "The session's name.",
            schema: session_id_schema,
        });
        self
    }

    fn compat_query(mut self, name: &'static str) -> Self {
        let schema: fn() -> Value = match name {
            "limit" => limit_schema,
            "cursor" => cursor_schema,
            _ => session_id_schema,
        };
        self.params.push(crate::openapi::Param { name, location: crate::openapi::In::Query, required: false, description: "", schema });
        self
    }

    fn compat_ok<T: schemars::JsonSchema>(self, description: &'static str) -> Self {
        self.response(200, description, vec![("application/json", Content::Typed(schema::<T>))], vec![])
    }
}

/// The OpenAPI document, as served and as committed.
pub fn openapi_text() -> &'static str {
    static TEXT: OnceLock<String> = OnceLock::new();
    TEXT.get_or_init(|| {
        let eps = endpoints(&crate::state::Settings::default());
        let ops: Vec<Operation<'_>> = eps.iter().map(|e| Operation { method: e.method.as_str(), path: e.path, doc: &e.doc }).collect();
        crate::openapi::to_text(&crate::openapi::document(&ops))
    })
}

/// The router.
pub fn app(state: AppState) -> Router {
    let mut router: Router<AppState> = Router::new();
    for e in endpoints(&state.settings) {
        router = router.route(e.path, e.route);
    }
    let admission = admission::Admission::new(state.settings.max_in_flight, state.metrics.clone());
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Inside `observe`, so refused requests show in the HTTP metrics and the log too.
        .layer(middleware::from_fn_with_state(admission, admission::limit))
        .layer(middleware::from_fn(drain::drain_refused_bodies))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panicked))
        .with_state(state)
}

async fn not_found() -> Response {
    ApiError::new(ErrorCode::NotFound, "no such route").into_response()
}

async fn method_not_allowed() -> Response {
    ApiError::new(ErrorCode::MethodNotAllowed, "this route does not take this method").into_response()
}

fn panicked(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("a request handler panicked");
    ApiError::new(ErrorCode::Internal, "internal error; see the gateway log").into_response()
}

/// Request id, tracing span, and the HTTP metrics.
async fn observe(State(gw): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned());
    let method = req.method().clone();
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(crate::util::new_id);
    let route_label = route.as_deref().unwrap_or("unmatched");
    let span = tracing::info_span!("request", method = %method, route = route_label, request_id = %request_id);
    let mut resp = next.run(req).instrument(span.clone()).await;
    let status = resp.status().as_u16();
    let elapsed = started.elapsed();
    // Known methods only: a client inventing methods must not invent metric series.
    let method_label = match method.as_str() {
        m @ ("GET" | "POST" | "PUT" | "DELETE" | "PATCH" | "HEAD" | "OPTIONS") => m,
        _ => "OTHER",
    };
    gw.metrics.observe_http(route_label, method_label, status, elapsed);
    span.in_scope(|| tracing::debug!(status, elapsed_ms = elapsed.as_secs_f64() * 1000.0, "answered"));
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}
