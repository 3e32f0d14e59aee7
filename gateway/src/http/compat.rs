//! Routes in the shapes of the older gateways wa-operator replaces, so their clients work
//! unchanged: `{"success": true, "data": …}` on success, `{"success": false, "message",
//! "error_code"}` on failure (`{"success": false, "error": "Invalid API key"}` for 401).
//! Sends go through the same path as `/v1` (recorded first, idempotent, metered).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Json;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::Deserialize;
use wa_api::pod::{MediaPayload, SendRequest};
use wa_api::{Engine, ErrorCode, Phase, SessionName};

use super::extract::{PathParams, body_bytes, content_type, is_json, parse_json};
use super::messages::{HistoryQuery, history_page, idempotency_key};
use crate::auth::{Principal, raw_key};
use crate::directory::NewSession;
use crate::error::ApiError;
use crate::model::{
    CompatFailure, CompatHistoryItem, CompatOk, CompatSend, CompatSendText, CompatSent, CompatSessionInfo,
    CompatSessionRequest, CompatSessionSent, CreateSession, Message, Permission,
};
use crate::send::{Mode, SendFailure, SendInput, Sent};
use crate::state::AppState;

/// A failure in the older gateways' shape.
pub struct CompatError(pub ApiError);

impl From<ApiError> for CompatError {
    fn from(e: ApiError) -> Self {
        CompatError(e)
    }
}

impl From<SendFailure> for CompatError {
    fn from(f: SendFailure) -> Self {
        CompatError(f.error)
    }
}

impl IntoResponse for CompatError {
    fn into_response(self) -> Response {
        let e = self.0;
        let body = if e.code == ErrorCode::Unauthorized {
            CompatFailure { success: false, message: None, error_code: None, error: Some("Invalid API key".into()) }
        } else {
            CompatFailure { success: false, message: Some(e.message.clone()), error_code: Some(e.code.as_str().into()), error: None }
        };
        let mut resp = (e.status(), Json(body)).into_response();
        if let Some(s) = e.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

type CompatResult<T> = Result<T, CompatError>;

fn ok<T: serde::Serialize>(message: Option<&str>, data: T) -> Response {
    (StatusCode::OK, Json(CompatOk { success: true, message: message.map(str::to_owned), data })).into_response()
}

async fn principal(gw: &AppState, headers: &HeaderMap) -> CompatResult<Principal> {
    let raw = raw_key(headers).ok_or_else(|| ApiError::unauthorized("missing API key"))?;
    Ok(gw.keys.verify(raw).await?)
}

/// Older clients write numbers with or without `+`, and JIDs in either server form.
pub fn normalize_recipient(to: &str) -> String {
    let t = to.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        format!("+{t}")
    } else {
        t.to_owned()
    }
}

/// `data:<mime>;base64,<data>` or bare base64.
pub fn parse_data_url(media: &str) -> (Option<String>, String) {
    if let Some(rest) = media.strip_prefix("data:") {
        if let Some((meta, data)) = rest.split_once(',') {
            let mime = meta.split(';').next().filter(|m| !m.is_empty()).map(str::to_owned);
            return (mime, data.to_owned());
        }
    }
    (None, media.to_owned())
}

fn compat_status(phase: Phase) -> &'static str {
    match phase {
        Phase::AwaitingScan => "qr_pending",
        Phase::Connected => "connected",
        Phase::Pending | Phase::Starting | Phase::Reconnecting => "connecting",
        Phase::LoggedOut | Phase::Suspended | Phase::Failed => "disconnected",
    }
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A connected session this key may send from, taking turns between them.
fn pick_session(gw: &AppState, who: &Principal) -> CompatResult<SessionName> {
    if !who.has(Permission::Send) {
        return Err(ApiError::forbidden("this key lacks the send permission").into());
    }
    let candidates: Vec<SessionName> = gw
        .directory
        .list()
        .into_iter()
        .filter(|s| who.may_use(s.name.as_str()) && s.ready && s.phase == Phase::Connected)
        .map(|s| s.name)
        .collect();
    if candidates.is_empty() {
        return Err(ApiError::new(ErrorCode::SessionNotConnected, "no connected session this key may use").into());
    }
    Ok(candidates[NEXT.fetch_add(1, Ordering::Relaxed) % candidates.len()].clone())
}

/// The session a management call means: the one named, or the key's only session.
fn named_or_only(gw: &AppState, who: &Principal, named: Option<&str>, permission: Permission) -> CompatResult<SessionName> {
    let name: SessionName = match named {
        Some(n) => n
            .parse()
            .map_err(|e: wa_api::ids::IdError| ApiError::new(ErrorCode::InvalidSessionName, e.to_string()))?,
        None => {
            let mine: Vec<SessionName> = if who.admin {
                gw.directory.list().into_iter().map(|s| s.name).collect()
            } else {
                who.sessions.iter().filter_map(|s| s.parse().ok()).collect()
            };
            match mine.as_slice() {
                [only] => only.clone(),
                _ => return Err(ApiError::new(ErrorCode::ValidationFailed, "give sessionId: this key may use several sessions").into()),
            }
        }
    };
    who.require(permission, &name)?;
    Ok(name)
}

async fn send_sync(gw: &AppState, who: &Principal, session: SessionName, request: SendRequest, headers: &HeaderMap) -> CompatResult<Message> {
    let message = request.validate(gw.settings.media_max_bytes).map_err(ApiError::from)?;
    let input = SendInput {
        session,
        request,
        message,
        idempotency_key: idempotency_key(headers)?,
        mode: Mode::Sync,
        api_key_id: who.key_id.clone(),
    };
    match crate::send::send(gw, input).await? {
        Sent::Done { row, .. } | Sent::Replayed { row } => Ok(Message::from(row)),
    }
}

async fn json_body<T: serde::de::DeserializeOwned>(gw: &AppState, req: Request) -> CompatResult<T> {
    if !is_json(content_type(req.headers())) {
        return Err(ApiError::new(ErrorCode::UnsupportedMediaType, "send the body as application/json").into());
    }
    Ok(parse_json(&body_bytes(req, gw).await?)?)
}

fn sent_data(m: &Message, file_path: Option<String>) -> CompatSent {
    CompatSent {
        message_id: m.wa_message_id.clone().unwrap_or_default(),
        timestamp: m.sent_at.unwrap_or(m.created_at),
        db_id: m.id.clone(),
        file_path,
    }
}

/// `POST /api/v1/messages/send-text/`.
pub async fn send_text(State(gw): State<AppState>, headers: HeaderMap, req: Request) -> Result<Response, CompatError> {
    let who = principal(&gw, &headers).await?;
    let body: CompatSendText = json_body(&gw, req).await?;
    let session = match &body.session_id {
        Some(s) => named_or_only(&gw, &who, Some(s), Permission::Send)?,
        None => pick_session(&gw, &who)?,
    };
    let request = SendRequest {
        to: normalize_recipient(&body.recipient),
        kind: "text".into(),
        text: Some(body.message),
        ..Default::default()
    };
    let m = send_sync(&gw, &who, session, request, &headers).await?;
    Ok(ok(Some("Message sent successfully"), sent_data(&m, None)))
}

/// `POST /api/v1/messages/send-media/` (multipart: recipient, media_type, file, caption).
pub async fn send_media(State(gw): State<AppState>, headers: HeaderMap, req: Request) -> Result<Response, CompatError> {
    let who = principal(&gw, &headers).await?;
    let ct = content_type(req.headers()).unwrap_or("").to_ascii_lowercase();
    if !ct.starts_with("multipart/form-data") {
        return Err(ApiError::new(ErrorCode::UnsupportedMediaType, "send the media as multipart/form-data").into());
    }
    let mut mp = Multipart::from_request(req, &gw)
        .await
        .map_err(|e| ApiError::new(ErrorCode::InvalidRequest, format!("bad multipart body: {}", e.body_text())))?;
    let (mut recipient, mut media_type, mut caption, mut session_id) = (None, None, None, None);
    let mut media: Option<MediaPayload> = None;
    let mp_err = |e: axum::extract::multipart::MultipartError| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(ErrorCode::PayloadTooLarge, "the request body is larger than this route accepts")
        } else {
            ApiError::new(ErrorCode::InvalidRequest, format!("bad multipart body: {}", e.body_text()))
        }
    };
    while let Some(field) = mp.next_field().await.map_err(mp_err)? {
        match field.name().unwrap_or("") {
            "file" => {
                let filename = field.file_name().map(str::to_owned);
                let mimetype = field.content_type().map(str::to_owned).filter(|m| m != "application/octet-stream");
                let bytes = field.bytes().await.map_err(mp_err)?;
                media = Some(MediaPayload { data: base64::engine::general_purpose::STANDARD.encode(&bytes), mimetype, filename });
            }
            "recipient" => recipient = Some(field.text().await.map_err(mp_err)?),
            "media_type" => media_type = Some(field.text().await.map_err(mp_err)?),
            "caption" => caption = Some(field.text().await.map_err(mp_err)?),
            "sessionId" | "session_id" => session_id = Some(field.text().await.map_err(mp_err)?),
            _ => {}
        }
    }
    let recipient = recipient.ok_or_else(|| ApiError::new(ErrorCode::ValidationFailed, "recipient is required"))?;
    let media = media.ok_or_else(|| ApiError::new(ErrorCode::ValidationFailed, "file is required"))?;
    let file_path = media.filename.clone();
    let session = match &session_id {
        Some(s) => named_or_only(&gw, &who, Some(s), Permission::Send)?,
        None => pick_session(&gw, &who)?,
    };
    let request = SendRequest {
        to: normalize_recipient(&recipient),
        kind: media_type.unwrap_or_else(|| "document".into()),
        media: Some(media),
        caption: caption.filter(|c| !c.is_empty()),
        ..Default::default()
    };
    let m = send_sync(&gw, &who, session, request, &headers).await?;
    Ok(ok(Some("Media sent successfully"), sent_data(&m, file_path)))
}

/// `POST /api/sessions/{sessionId}/send` (Bearer key).
pub async fn session_send(State(gw): State<AppState>, path: PathParams, headers: HeaderMap, req: Request) -> Result<Response, CompatError> {
    let who = principal(&gw, &headers).await?;
    let session = path.session_param("sessionId")?;
    who.require(Permission::Send, &session)?;
    let body: CompatSend = json_body(&gw, req).await?;
    let kind = body.kind.clone().unwrap_or_else(|| "text".into());
    let request = if kind == "text" {
        SendRequest { to: normalize_recipient(&body.to), kind, text: body.message, ..Default::default() }
    } else {
        let (mimetype, data) = parse_data_url(body.media.as_deref().unwrap_or(""));
        SendRequest {
            to: normalize_recipient(&body.to),
            kind,
            media: Some(MediaPayload { data, mimetype, filename: body.filename }),
            caption: body.caption.or(body.message),
            ..Default::default()
        }
    };
    let m = send_sync(&gw, &who, session.clone(), request, &headers).await?;
    Ok(ok(
        None,
        CompatSessionSent {
            message_id: m.wa_message_id.clone().unwrap_or_default(),
            status: "sent".into(),
            session_id: session.to_string(),
            timestamp: m.sent_at.unwrap_or(m.created_at),
        },
    ))
}

#[derive(Debug, Deserialize)]
pub struct CompatListQuery {
    #[serde(rename = "sessionId", alias = "session_id")]
    pub session_id: Option<String>,
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CompatHistory {
    pub messages: Vec<CompatHistoryItem>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

fn query<T: serde::de::DeserializeOwned>(req: &Request) -> CompatResult<T> {
    let q = req.uri().query().unwrap_or("");
    serde_urlencoded_from(q)
}

fn serde_urlencoded_from<T: serde::de::DeserializeOwned>(q: &str) -> CompatResult<T> {
    axum::extract::Query::<T>::try_from_uri(&format!("/?{q}").parse().map_err(|_| ApiError::new(ErrorCode::InvalidRequest, "bad query"))?)
        .map(|axum::extract::Query(v)| v)
        .map_err(|e| ApiError::new(ErrorCode::InvalidRequest, format!("bad query parameters: {}", e.body_text())).into())
}

/// `GET /api/v1/messages/list/`.
pub async fn list_messages(State(gw): State<AppState>, headers: HeaderMap, req: Request) -> Result<Response, CompatError> {
    let who = principal(&gw, &headers).await?;
    let q: CompatListQuery = query(&req)?;
    let session = named_or_only(&gw, &who, q.session_id.as_deref(), Permission::Read)?;
    if gw.directory.get(&session).is_none() {
        return Err(ApiError::session_not_found(session.as_str()).into());
    }
    let hq = HistoryQuery { direction: None, chat: None, since: None, until: None, cursor: q.cursor, limit: q.limit };
    let page = history_page(&gw, &session, &hq).await?;
    let messages = page
        .items
        .into_iter()
        .map(|m| CompatHistoryItem {
            recipient: m.chat.clone(),
            sender: m.from.clone(),
            message_id: m.wa_message_id.clone(),
            session_id: m.session.clone(),
            direction: m.direction,
            kind: m.kind,
            message: m.text.clone(),
            status: m.status,
            timestamp: m.sent_at.unwrap_or(m.created_at),
            id: m.id,
        })
        .collect();
    Ok(ok(None, CompatHistory { messages, next_cursor: page.next_cursor }))
}

async fn session_info(gw: &AppState, name: &SessionName, with_qr: bool) -> CompatResult<CompatSessionInfo> {
    let info = gw.directory.get(name).ok_or_else(|| ApiError::session_not_found(name.as_str()))?;
    let mut qr_code = None;
    if with_qr && info.ready && info.phase == Phase::AwaitingScan {
        if let Ok(route) = gw.directory.route(name) {
            if let Ok(png) = gw.pods.qr(&route, "image/png").await {
                qr_code = Some(format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(&png.body)));
            }
        }
    }
    let phone_number = info.account.as_ref().and_then(|a| a.jid.split(['@', ':']).next().map(|d| format!("+{d}")));
    Ok(CompatSessionInfo {
        session_id: name.to_string(),
        status: compat_status(info.phase).into(),
        qr_code,
        phone_number,
        is_ready: info.ready && info.phase == Phase::Connected,
    })
}

/// `POST /api/v1/sessions/init/`: the key's session, created when missing, and its QR code.
pub async fn init_session(State(gw): State<AppState>, headers: HeaderMap, req: Request) -> Result<Response, CompatError> {
    let who = principal(&gw, &headers).await?;
    let bytes = body_bytes(req, &gw).await?;
    let body: CompatSessionRequest = if bytes.iter().all(u8::is_ascii_whitespace) { Default::default() } else { parse_json(&bytes)? };
    let name = named_or_only(&gw, &who, body.session_id.as_deref(), Permission::Manage)?;
    if gw.directory.get(&name).is_none() {
        let new = NewSession::validate(CreateSession {
            name: name.to_string(),
            engine: Some(body.engine.unwrap_or(Engine::Whatsapp)),
            phone_number: None,
            rate_limit: None,
        })?;
        gw.directory.create(new).await?;
    }
    // A new session needs a moment to show its first QR code; wait for it only while the
    // session is on its way there.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let info = session_info(&gw, &name, true).await?;
        let phase = gw.directory.get(&name).map(|s| (s.phase, s.ready));
        let on_the_way = match phase {
            Some((Phase::Pending | Phase::Starting, _)) | Some((_, false)) => true,
            Some((Phase::AwaitingScan, true)) => info.qr_code.is_none(),
            _ => false,
        };
        if !on_the_way || tokio::time::Instant::now() > deadline {
            return Ok(ok(None, info));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `GET /api/v1/sessions/status/`.
pub async fn session_status(State(gw): State<AppState>, headers: HeaderMap, req: Request) -> Result<Response, CompatError> {
    let who = principal(&gw, &headers).await?;
    let q: CompatListQuery = query(&req)?;
    let name = named_or_only(&gw, &who, q.session_id.as_deref(), Permission::Read)?;
    Ok(ok(None, session_info(&gw, &name, false).await?))
}

/// `POST /api/v1/sessions/disconnect/`: logs the session out.
pub async fn disconnect_session(State(gw): State<AppState>, headers: HeaderMap, req: Request) -> Result<Response, CompatError> {
    let who = principal(&gw, &headers).await?;
    let bytes = body_bytes(req, &gw).await?;
    let body: CompatSessionRequest = if bytes.iter().all(u8::is_ascii_whitespace) { Default::default() } else { parse_json(&bytes)? };
    let name = named_or_only(&gw, &who, body.session_id.as_deref(), Permission::Manage)?;
    if gw.directory.get(&name).is_none() {
        return Err(ApiError::session_not_found(name.as_str()).into());
    }
    let route = gw.directory.route(&name)?;
    let status: wa_api::pod::PodStatus = gw.pods.post::<(), _>(&route, "/v1/logout", None).await.map_err(|e| e.into_api(name.as_str()))?;
    gw.directory.observe(&name, crate::directory::Observed::Status(status));
    Ok(ok(Some("Session disconnected"), session_info(&gw, &name, false).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipients_and_data_urls() {
        assert_eq!(normalize_recipient("6281234567890"), "+6281234567890");
        assert_eq!(normalize_recipient(" +6281234567890 "), "+6281234567890");
        assert_eq!(normalize_recipient("6281234567890@s.whatsapp.net"), "6281234567890@s.whatsapp.net");
        assert_eq!(parse_data_url("data:image/png;base64,AAAA"), (Some("image/png".into()), "AAAA".into()));
        assert_eq!(parse_data_url("AAAA"), (None, "AAAA".into()));
        assert_eq!(parse_data_url("data:;base64,AAAA"), (None, "AAAA".into()));
    }

    #[test]
    fn phases_in_old_words() {
        assert_eq!(compat_status(Phase::AwaitingScan), "qr_pending");
        assert_eq!(compat_status(Phase::Connected), "connected");
        assert_eq!(compat_status(Phase::Reconnecting), "connecting");
        assert_eq!(compat_status(Phase::LoggedOut), "disconnected");
    }
}
