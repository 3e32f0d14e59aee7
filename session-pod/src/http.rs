//! The session pod's internal HTTP API (routes documented in `wa_api::pod`).
//!
//! Every answer that is not a success is an [`ApiError`]: our handlers' refusals, and also
//! axum's own (unknown route, wrong method, body too large, bad JSON, wrong content type), so a
//! client only ever has to parse one error shape.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tracing::Instrument;
use wa_api::pod::{
    self, Content, DisconnectRequest, IDEMPOTENCY_KEY_HEADER, IDEMPOTENCY_KEY_MAX_LEN,
    InboundMedia, InboundMessage, InboundRequest, InboundResponse, MessageKind, OutgoingMessage,
    PairCodeRequest, PairCodeResponse, ScanRequest, SendRequest,
};
use wa_api::{ErrorCode, PhoneNumber, Recipient};

use crate::engine::{EngineError, EngineEvent};
use crate::error::ApiError;
use crate::qr::{PNG_SCALE, QrMatrix};
use crate::session::Session;
use crate::session::core::QrView;

/// A body is read (and thrown away) up to this multiple of the limit before answering 413,
/// so the client gets to read the answer instead of a reset connection.
const DRAIN_FACTOR: usize = 2;

/// Longest long poll on `GET /v1/status`.
pub const MAX_WAIT_SECONDS: u64 = 60;
/// Long poll length when `after` is given without `waitSeconds`.
const DEFAULT_WAIT_SECONDS: u64 = 30;
/// Longest simulated network drop.
const MAX_DISCONNECT_SECONDS: u32 = 3600;

pub struct AppState {
    pub session: Arc<Session>,
    pub token: String,
    /// Parent of every request's span, so request logs carry the session name.
    pub span: tracing::Span,
    pub body_limit: usize,
}

/// Who may call a route of the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Health checks: the kubelet calls them without a token.
    Public,
    /// Everything else: `Authorization: Bearer <pod token>`.
    Token,
}

/// One route of the pod's API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodRoute {
    pub method: &'static str,
    /// As the router writes it (`{id}` for a path parameter).
    pub path: &'static str,
    pub access: Access,
    /// Mounted only when the engine offers sandbox controls.
    pub sandbox_only: bool,
}

const fn r(method: &'static str, path: &'static str, access: Access, sandbox_only: bool) -> PodRoute {
    PodRoute { method, path, access, sandbox_only }
}

/// Every route of the pod. [`app`] refuses (in debug builds) to mount a route that is not
/// listed here, and a test calls each listed route, so the list and the router cannot drift;
/// security tests take it to check the token on every route.
pub const ROUTES: &[PodRoute] = &[
    r("GET", "/healthz", Access::Public, false),
    r("GET", "/readyz", Access::Public, false),
    r("GET", "/v1/status", Access::Token, false),
    r("GET", "/v1/qr", Access::Token, false),
    r("POST", "/v1/pair-code", Access::Token, false),
    r("POST", "/v1/messages", Access::Token, false),
    r("GET", "/v1/messages/{id}", Access::Token, false),
    r("POST", "/v1/logout", Access::Token, false),
    r("POST", "/v1/restart", Access::Token, false),
    r("GET", "/metrics", Access::Token, false),
    r("POST", "/v1/sandbox/scan", Access::Token, true),
    r("POST", "/v1/sandbox/inbound", Access::Token, true),
    r("POST", "/v1/sandbox/disconnect", Access::Token, true),
];

/// `router.route(path, …)` for a route of [`ROUTES`] with this access.
fn listed<S: Clone + Send + Sync + 'static>(
    router: Router<S>,
    path: &'static str,
    access: Access,
    handler: axum::routing::MethodRouter<S>,
) -> Router<S> {
    debug_assert!(
        ROUTES.iter().any(|r| r.path == path && r.access == access),
        "{path} is not in http::ROUTES with {access:?}"
    );
    router.route(path, handler)
}

/// The router. Sandbox routes exist only when the engine offers sandbox controls.
pub fn app(state: Arc<AppState>) -> Router {
    use Access::{Public, Token};
    let mut protected = Router::new();
    for (path, handler) in [
        ("/v1/status", get(status)),
        ("/v1/qr", get(qr)),
        ("/v1/pair-code", post(pair_code)),
        ("/v1/messages", post(send)),
        ("/v1/messages/{id}", get(message)),
        ("/v1/logout", post(logout)),
        ("/v1/restart", post(restart)),
        ("/metrics", get(metrics)),
    ] {
        protected = listed(protected, path, Token, handler);
    }
    if state.session.engine().sandbox().is_some() {
        for (path, handler) in [
            ("/v1/sandbox/scan", post(sandbox_scan)),
            ("/v1/sandbox/inbound", post(sandbox_inbound)),
            ("/v1/sandbox/disconnect", post(sandbox_disconnect)),
        ] {
            protected = listed(protected, path, Token, handler);
        }
    }
    let protected =
        protected.route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    let public = listed(Router::new(), "/healthz", Public, get(healthz));
    listed(public, "/readyz", Public, get(readyz))
        .merge(protected)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.body_limit))
        .layer(middleware::from_fn_with_state(state.clone(), trace_request))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            panic_response,
        ))
        .with_state(state)
}

/// The request body, at most `body_limit` bytes. Over the limit it answers 413
/// PAYLOAD_TOO_LARGE after draining a reasonable excess: a server that stops reading and
/// closes makes the client's kernel drop the answer with a connection reset.
pub struct LimitedBody(pub Bytes);

impl FromRequest<Arc<AppState>> for LimitedBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, ApiError> {
        read_limited(req.into_body(), state.body_limit)
            .await
            .map(LimitedBody)
    }
}

async fn read_limited(mut body: axum::body::Body, limit: usize) -> Result<Bytes, ApiError> {
    use http_body_util::BodyExt;
    let too_large = || {
        ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("the request body is larger than {limit} bytes"),
        )
    };
    let hint = axum::body::HttpBody::size_hint(&body);
    if hint.lower() > (limit.saturating_mul(DRAIN_FACTOR)) as u64 {
        return Err(too_large());
    }
    let mut buf =
        bytes::BytesMut::with_capacity(hint.exact().map_or(8 * 1024, |n| n as usize).min(limit));
    let mut seen: usize = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            ApiError::new(
                ErrorCode::InvalidRequest,
                format!("cannot read the request body: {e}"),
            )
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen = seen.saturating_add(data.len());
        if seen <= limit {
            buf.extend_from_slice(&data);
        } else {
            buf = bytes::BytesMut::new();
            if seen > limit.saturating_mul(DRAIN_FACTOR) {
                break;
            }
        }
    }
    if seen > limit {
        return Err(too_large());
    }
    Ok(buf.freeze())
}

async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        "method not allowed on this route",
    )
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("a request handler panicked");
    ApiError::new(
        ErrorCode::Internal,
        "internal error; see the session pod's log",
    )
    .into_response()
}

static REQUEST_IDS: AtomicU64 = AtomicU64::new(1);

async fn trace_request(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 64)
        .map(str::to_owned)
        .unwrap_or_else(|| REQUEST_IDS.fetch_add(1, Ordering::Relaxed).to_string());
    let span = tracing::info_span!(parent: &state.span, "request", id = %id, method = %req.method(), path = %req.uri().path());
    let resp = next.run(req).instrument(span.clone()).await;
    let status = resp.status();
    if status.is_server_error() {
        tracing::warn!(parent: &span, status = status.as_u16(), "answered");
    } else {
        tracing::debug!(parent: &span, status = status.as_u16(), "answered");
    }
    resp
}

async fn require_token(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    match presented {
        Some(t) if bool::from(t.as_bytes().ct_eq(state.token.as_bytes())) => {
            Ok(next.run(req).await)
        }
        Some(_) => Err(ApiError::new(ErrorCode::Unauthorized, "wrong bearer token")),
        None => Err(ApiError::new(
            ErrorCode::Unauthorized,
            "missing bearer token (Authorization: Bearer <pod token>)",
        )),
    }
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.session.is_ready() {
        "ok".into_response()
    } else {
        ApiError::new(
            ErrorCode::SessionNotReady,
            "the session pod is starting or stopping",
        )
        .retry_after(1)
        .into_response()
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StatusQuery {
    after: Option<u64>,
    wait_seconds: Option<u64>,
}

async fn status(
    State(state): State<Arc<AppState>>,
    query: Result<Query<StatusQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<pod::PodStatus>, ApiError> {
    let Query(q) = query.map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidRequest,
            format!(
                "after and waitSeconds must be non-negative integers: {}",
                e.body_text()
            ),
        )
    })?;
    let Some(after) = q.after else {
        return Ok(Json(state.session.status()));
    };
    let wait = q
        .wait_seconds
        .unwrap_or(DEFAULT_WAIT_SECONDS)
        .min(MAX_WAIT_SECONDS);
    Ok(Json(
        state
            .session
            .wait_status(after, Duration::from_secs(wait))
            .await,
    ))
}

/// The representations of a QR code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QrFormat {
    Png,
    Json,
    Text,
}

/// Picks the QR representation from an `Accept` header: the highest `q` wins, the earlier
/// range on a tie; PNG when nothing we offer is named (browsers' `*/*`, no header).
pub fn negotiate_qr(accept: Option<&str>) -> QrFormat {
    let mut best: Option<(f32, QrFormat)> = None;
    for range in accept.unwrap_or("").split(',') {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.trim().strip_prefix("q="))
            .find_map(|v| v.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        let format = match media.as_str() {
            "image/png" | "image/*" | "*/*" => QrFormat::Png,
            "application/json" | "application/*" => QrFormat::Json,
            "text/plain" | "text/*" => QrFormat::Text,
            _ => continue,
        };
        if q > 0.0 && best.is_none_or(|(bq, _)| q > bq) {
            best = Some((q, format));
        }
    }
    best.map_or(QrFormat::Png, |(_, f)| f)
}

async fn qr(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    let code = match state.session.qr() {
        QrView::Available(code) => code,
        QrView::AlreadyPaired => {
            return Err(ApiError::new(
                ErrorCode::AlreadyPaired,
                "the session is already paired; no QR code to scan",
            ));
        }
        QrView::NotAvailable(why) => {
            return Err(ApiError::new(ErrorCode::QrNotAvailable, why).retry_after(1));
        }
    };
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let no_store = (header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    match negotiate_qr(accept) {
        QrFormat::Json => Ok(([no_store], Json(code)).into_response()),
        QrFormat::Png => {
            let png = QrMatrix::encode(&code.code)
                .and_then(|m| m.to_png(PNG_SCALE))
                .map_err(|e| ApiError::internal("rendering the QR code", e))?;
            Ok((
                [
                    (header::CONTENT_TYPE, HeaderValue::from_static("image/png")),
                    no_store,
                ],
                png,
            )
                .into_response())
        }
        QrFormat::Text => {
            let text = QrMatrix::encode(&code.code)
                .map(|m| m.to_text())
                .map_err(|e| ApiError::internal("rendering the QR code", e))?;
            Ok((
                [
                    (
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("text/plain; charset=utf-8"),
                    ),
                    no_store,
                ],
                text,
            )
                .into_response())
        }
    }
}

async fn pair_code(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    LimitedBody(body): LimitedBody,
) -> Result<Json<PairCodeResponse>, ApiError> {
    let req: PairCodeRequest = parse_json(&headers, &body)?;
    let phone: PhoneNumber = req
        .phone_number
        .parse()
        .map_err(|e: wa_api::ids::IdError| {
            ApiError::new(ErrorCode::InvalidPhoneNumber, e.to_string())
        })?;
    if state.session.status().phase.is_paired() {
        return Err(EngineError::AlreadyPaired.into());
    }
    let code = state.session.engine().pair_code(&phone).await?;
    // Shown in status even if the engine reports it later (or not at all).
    state.session.inject(EngineEvent::PairCode(code.clone()));
    state.session.sync().await;
    Ok(Json(PairCodeResponse { code }))
}

async fn send(State(state): State<Arc<AppState>>, req: Request) -> Result<Response, ApiError> {
    let key = idempotency_key(req.headers())?;
    let media_max = state.session.settings.media_max_bytes;
    let msg = match body_kind(req.headers()) {
        BodyKind::Json => {
            let headers = req.headers().clone();
            let bytes = read_limited(req.into_body(), state.body_limit).await?;
            let send: SendRequest = parse_json(&headers, &bytes)?;
            send.validate(media_max)?
        }
        BodyKind::Multipart => {
            // Read within the limit first (see `LimitedBody`), then parse the parts.
            let (parts, body) = req.into_parts();
            let bytes = read_limited(body, state.body_limit).await?;
            let req = Request::from_parts(parts, axum::body::Body::from(bytes));
            let multipart = Multipart::from_request(req, &()).await.map_err(|e| {
                ApiError::new(
                    ErrorCode::InvalidRequest,
                    format!("bad multipart body: {}", e.body_text()),
                )
            })?;
            multipart_send(multipart, media_max, state.body_limit).await?
        }
        BodyKind::Other => {
            return Err(ApiError::new(
                ErrorCode::UnsupportedMediaType,
                "send the message as application/json or multipart/form-data",
            ));
        }
    };
    let answer = state.session.send(msg, key.as_deref()).await?;
    let mut resp = Json(answer.response).into_response();
    if answer.replayed {
        resp.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(resp)
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get(IDEMPOTENCY_KEY_HEADER) else {
        return Ok(None);
    };
    let bad = || {
        ApiError::new(
            ErrorCode::InvalidRequest,
            format!("Idempotency-Key must be 1-{IDEMPOTENCY_KEY_MAX_LEN} visible ASCII characters"),
        )
    };
    let key = v.to_str().map_err(|_| bad())?;
    if key.is_empty()
        || key.len() > IDEMPOTENCY_KEY_MAX_LEN
        || !key.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(bad());
    }
    Ok(Some(key.to_owned()))
}

enum BodyKind {
    Json,
    Multipart,
    Other,
}

fn body_kind(headers: &HeaderMap) -> BodyKind {
    let essence = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    match essence.as_deref() {
        Some("application/json") => BodyKind::Json,
        Some(m) if m.starts_with("application/") && m.ends_with("+json") => BodyKind::Json,
        Some("multipart/form-data") => BodyKind::Multipart,
        _ => BodyKind::Other,
    }
}

/// Parses a JSON body whose fields are all optional: an empty body (with or without a
/// content type) is the default value.
fn optional_json<T: DeserializeOwned + Default>(
    headers: &HeaderMap,
    body: &[u8],
) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    parse_json(headers, body)
}

fn parse_json<T: DeserializeOwned>(headers: &HeaderMap, bytes: &[u8]) -> Result<T, ApiError> {
    if !matches!(body_kind(headers), BodyKind::Json) {
        return Err(ApiError::new(
            ErrorCode::UnsupportedMediaType,
            "the body must be application/json",
        ));
    }
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::new(ErrorCode::InvalidJson, format!("invalid JSON body: {e}")))
}

fn body_error(status: StatusCode, text: &str, limit: usize) -> ApiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("the request body is larger than {limit} bytes"),
        )
    } else {
        ApiError::new(
            ErrorCode::InvalidRequest,
            format!("cannot read the request body: {text}"),
        )
    }
}

/// A send as multipart form fields: `to`, `type`, `text`, `caption`, `replyTo`, `mimetype`,
/// `filename`, and the media as a file part named `file` (or `media`).
pub(crate) async fn multipart_send(
    mut form: Multipart,
    media_max: usize,
    limit: usize,
) -> Result<OutgoingMessage, ApiError> {
    #[derive(Default)]
    struct Fields {
        to: Option<String>,
        kind: Option<String>,
        text: Option<String>,
        caption: Option<String>,
        reply_to: Option<String>,
        mimetype: Option<String>,
        filename: Option<String>,
        file: Option<(Vec<u8>, Option<String>, Option<String>)>,
    }
    let mut f = Fields::default();
    let field_error =
        |e: axum::extract::multipart::MultipartError| body_error(e.status(), &e.body_text(), limit);
    while let Some(field) = form.next_field().await.map_err(field_error)? {
        let name = field.name().unwrap_or("").to_owned();
        let slot = match name.as_str() {
            "file" | "media" => {
                let part_type = field.content_type().map(str::to_owned);
                let part_name = field.file_name().map(str::to_owned);
                let data = field.bytes().await.map_err(field_error)?;
                if f.file
                    .replace((data.to_vec(), part_type, part_name))
                    .is_some()
                {
                    return Err(ApiError::new(
                        ErrorCode::InvalidRequest,
                        "more than one file part",
                    ));
                }
                continue;
            }
            "to" => &mut f.to,
            "type" => &mut f.kind,
            "text" => &mut f.text,
            "caption" => &mut f.caption,
            "replyTo" | "reply_to" => &mut f.reply_to,
            "mimetype" => &mut f.mimetype,
            "filename" => &mut f.filename,
            other => {
                return Err(ApiError::new(
                    ErrorCode::InvalidRequest,
                    format!(
                        "unknown multipart field {:?}; expected to, type, text, caption, replyTo, mimetype, filename, file",
                        other.chars().take(40).collect::<String>()
                    ),
                ));
            }
        };
        let value = field.text().await.map_err(field_error)?;
        if slot.replace(value).is_some() {
            return Err(ApiError::new(
                ErrorCode::InvalidRequest,
                format!("field {name} given twice"),
            ));
        }
    }
    let to =
        f.to.ok_or_else(|| ApiError::new(ErrorCode::ValidationFailed, "the to field is required"))?;
    let kind = f.kind.unwrap_or_else(|| {
        if f.file.is_some() {
            "document".into()
        } else {
            "text".into()
        }
    });
    let Some((data, part_type, part_name)) = f.file else {
        // No file: the same rules as a JSON send.
        let req = SendRequest {
            to,
            kind,
            text: f.text,
            media: None,
            caption: f.caption,
            reply_to: f.reply_to,
        };
        return Ok(req.validate(media_max)?);
    };
    let kind: MessageKind = kind.parse().map_err(|()| {
        ApiError::new(
            ErrorCode::ValidationFailed,
            "type must be one of text, image, document, audio, video",
        )
    })?;
    if !kind.is_media() {
        return Err(ApiError::new(
            ErrorCode::ValidationFailed,
            "a text message has no file",
        ));
    }
    let to: Recipient = to.parse().map_err(|e: wa_api::ids::IdError| {
        ApiError::new(ErrorCode::InvalidRecipient, e.to_string())
    })?;
    if let Some(r) = &f.reply_to
        && (r.is_empty() || r.len() > 128)
    {
        return Err(ApiError::new(
            ErrorCode::ValidationFailed,
            "replyTo must be 1-128 characters",
        ));
    }
    // A generic part type says nothing; let the bytes or the mimetype field tell.
    let part_type = part_type.filter(|t| !t.eq_ignore_ascii_case("application/octet-stream"));
    let mimetype = f.mimetype.or(part_type);
    let filename = f.filename.or(part_name);
    let media = pod::build_media(
        kind,
        data,
        mimetype.as_deref(),
        filename.as_deref(),
        f.caption.or(f.text),
        media_max,
    )?;
    Ok(OutgoingMessage {
        to,
        content: Content::Media(media),
        reply_to: f.reply_to,
    })
}

async fn message(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<pod::MessageInfo>, ApiError> {
    state.session.message(&id).map(Json).ok_or_else(|| {
        ApiError::new(
            ErrorCode::MessageNotFound,
            "no such message among the ones this pod sent recently (the gateway keeps the full history)",
        )
    })
}

async fn logout(State(state): State<Arc<AppState>>) -> Result<Json<pod::PodStatus>, ApiError> {
    state.session.engine().logout().await?;
    state.session.sync().await;
    Ok(Json(state.session.status()))
}

async fn restart(State(state): State<Arc<AppState>>) -> Result<Json<pod::PodStatus>, ApiError> {
    state.session.restart().await?;
    state.session.sync().await;
    Ok(Json(state.session.status()))
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let text = state.session.metrics.render(&state.session.gauges());
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        text,
    )
        .into_response()
}

fn sandbox(state: &AppState) -> Result<&dyn crate::engine::SandboxControl, ApiError> {
    // The routes are only mounted for the sandbox; this is the belt to those braces.
    state
        .session
        .engine()
        .sandbox()
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, "no such route"))
}

async fn sandbox_scan(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    LimitedBody(body): LimitedBody,
) -> Result<Json<pod::PodStatus>, ApiError> {
    let req: ScanRequest = optional_json(&headers, &body)?;
    if let Some(p) = &req.phone_number {
        p.parse::<PhoneNumber>()
            .map_err(|e| ApiError::new(ErrorCode::InvalidPhoneNumber, e.to_string()))?;
    }
    if req
        .push_name
        .as_ref()
        .is_some_and(|n| n.trim().is_empty() || n.chars().count() > 100)
    {
        return Err(ApiError::new(
            ErrorCode::ValidationFailed,
            "pushName must be 1-100 characters",
        ));
    }
    sandbox(&state)?.scan(&req).await?;
    state.session.sync().await;
    Ok(Json(state.session.status()))
}

async fn sandbox_inbound(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    LimitedBody(body): LimitedBody,
) -> Result<Json<InboundResponse>, ApiError> {
    let req: InboundRequest = parse_json(&headers, &body)?;
    let msg = inbound_message(req, state.session.settings.media_max_bytes)?;
    let id = sandbox(&state)?.inbound(msg).await?;
    state.session.sync().await;
    Ok(Json(InboundResponse { id }))
}

/// Checks an injected inbound message with the same rules as a send, then shapes it as the
/// event the gateway receives.
fn inbound_message(req: InboundRequest, media_max: usize) -> Result<InboundMessage, ApiError> {
    if req
        .push_name
        .as_ref()
        .is_some_and(|n| n.chars().count() > 100)
    {
        return Err(ApiError::new(
            ErrorCode::ValidationFailed,
            "pushName must be at most 100 characters",
        ));
    }
    let as_send = SendRequest {
        to: req.from,
        kind: req.kind.unwrap_or_else(|| "text".into()),
        text: req.text,
        media: req.media,
        caption: req.caption,
        reply_to: None,
    };
    let msg = as_send.validate(media_max).map_err(|mut i| {
        if i.code == ErrorCode::InvalidRecipient {
            i.message = i.message.replace("recipient", "sender");
        }
        ApiError::from(i)
    })?;
    let from = msg.to.to_jid().to_string();
    let kind = msg.kind();
    let (text, caption, media) = match msg.content {
        Content::Text(t) => (Some(t), None, None),
        Content::Media(m) => (
            None,
            m.caption,
            Some(InboundMedia {
                mimetype: m.mimetype,
                filename: m.filename,
                size: m.data.len() as u64,
                sha256: hex::encode(Sha256::digest(&m.data)),
                data: Some(base64::engine::general_purpose::STANDARD.encode(&m.data)),
            }),
        ),
    };
    Ok(InboundMessage {
        message_id: String::new(),
        from: from.clone(),
        chat: from,
        push_name: req.push_name,
        message_type: kind,
        text,
        caption,
        media,
        timestamp: chrono::Utc::now(),
    })
}

async fn sandbox_disconnect(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    LimitedBody(body): LimitedBody,
) -> Result<Json<pod::PodStatus>, ApiError> {
    let req: DisconnectRequest = optional_json(&headers, &body)?;
    let seconds = req.seconds.unwrap_or(1);
    if seconds > MAX_DISCONNECT_SECONDS {
        return Err(ApiError::new(
            ErrorCode::ValidationFailed,
            format!("seconds must be at most {MAX_DISCONNECT_SECONDS}"),
        ));
    }
    sandbox(&state)?.disconnect(seconds).await?;
    state.session.sync().await;
    Ok(Json(state.session.status()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qr_negotiation() {
        let check = |accept: Option<&str>, expected| {
            assert_eq!(negotiate_qr(accept), expected, "{accept:?}")
        };
        check(None, QrFormat::Png);
        check(Some(""), QrFormat::Png);
        check(Some("*/*"), QrFormat::Png);
        check(Some("image/png"), QrFormat::Png);
        check(Some("application/json"), QrFormat::Json);
        check(Some("text/plain"), QrFormat::Text);
        check(Some("text/plain; charset=utf-8"), QrFormat::Text);
        check(Some("application/json, text/plain;q=0.5"), QrFormat::Json);
        check(Some("text/plain;q=0.5, application/json"), QrFormat::Json);
        check(Some("application/json;q=0, image/png"), QrFormat::Png);
        check(
            Some("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
            QrFormat::Png,
        );
        check(
            Some("image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8"),
            QrFormat::Png,
        );
        check(Some("application/xml"), QrFormat::Png);
        check(Some("APPLICATION/JSON"), QrFormat::Json);
        check(Some("application/json;q=abc"), QrFormat::Json);
    }

    #[test]
    fn inbound_validation() {
        let req = |json: serde_json::Value| serde_json::from_value::<InboundRequest>(json).unwrap();
        let m = inbound_message(
            req(serde_json::json!({"from": "+15551234567", "text": "hello"})),
            1024,
        )
        .unwrap();
        assert_eq!(
            (m.from.as_str(), m.message_type, m.text.as_deref()),
            (
                "15551234567@s.whatsapp.net",
                MessageKind::Text,
                Some("hello")
            )
        );
        let m = inbound_message(
            req(serde_json::json!({"from": "+15551234567", "type": "document", "media": {"data": "aGk=", "mimetype": "text/plain"}})),
            1024,
        )
        .unwrap();
        let media = m.media.unwrap();
        assert_eq!((media.size, media.data.as_deref()), (2, Some("aGk=")));
        assert_eq!(media.sha256, hex::encode(Sha256::digest(b"hi")));
        let code = |json| inbound_message(req(json), 1024).unwrap_err().code;
        assert_eq!(
            code(serde_json::json!({"from": "555", "text": "x"})),
            ErrorCode::InvalidRecipient
        );
        assert_eq!(
            code(serde_json::json!({"from": "+15551234567", "text": " "})),
            ErrorCode::EmptyText
        );
        assert_eq!(
            code(serde_json::json!({"from": "+15551234567", "type": "gif", "text": "x"})),
            ErrorCode::ValidationFailed
        );
    }

    #[test]
    fn idempotency_key_rules() {
        let check = |v: &str, ok: bool| {
            let mut h = HeaderMap::new();
            h.insert(IDEMPOTENCY_KEY_HEADER, HeaderValue::from_str(v).unwrap());
            assert_eq!(idempotency_key(&h).is_ok(), ok, "{v:?}");
        };
        check("abc-123", true);
        check(&"k".repeat(IDEMPOTENCY_KEY_MAX_LEN), true);
        check(&"k".repeat(IDEMPOTENCY_KEY_MAX_LEN + 1), false);
        check("", false);
        check("a b", false);
        assert_eq!(idempotency_key(&HeaderMap::new()).unwrap(), None);
    }
}
