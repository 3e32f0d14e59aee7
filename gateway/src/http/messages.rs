//! `POST /v1/sessions/{name}/messages`, `GET /v1/sessions/{name}/messages`,
//! `GET /v1/messages/{id}`.

use axum::Json;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use wa_api::pod::{IDEMPOTENCY_KEY_HEADER, IDEMPOTENCY_KEY_MAX_LEN, MediaPayload, SendRequest};
use wa_api::{ErrorCode, Recipient, SessionName};

use super::extract::{PathParams, QueryParams, body_bytes, content_type, is_json, parse_json};
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult};
use crate::model::{Direction, Message, MessagePage, Permission};
use crate::send::{Mode, SendFailure, SendInput, Sent};
use crate::state::AppState;
use crate::store::HistoryFilter;

/// The `Idempotency-Key` header: 1-255 visible ASCII characters.
pub fn idempotency_key(headers: &HeaderMap) -> ApiResult<Option<String>> {
    let Some(v) = headers.get(IDEMPOTENCY_KEY_HEADER) else { return Ok(None) };
    let ok = v.to_str().ok().filter(|k| {
        !k.is_empty() && k.len() <= IDEMPOTENCY_KEY_MAX_LEN && k.bytes().all(|b| b.is_ascii_graphic())
    });
    match ok {
        Some(k) => Ok(Some(k.to_owned())),
        None => Err(ApiError::new(
            ErrorCode::InvalidRequest,
            format!("Idempotency-Key must be 1-{IDEMPOTENCY_KEY_MAX_LEN} visible ASCII characters"),
        )),
    }
}

/// `Prefer: respond-async` (RFC 7240) asks for 202 and the outbox.
pub fn wants_async(headers: &HeaderMap) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case("respond-async"))
}

/// Reads a send from JSON or multipart/form-data.
pub async fn read_send_request(req: Request, state: &AppState) -> ApiResult<SendRequest> {
    let ct = content_type(req.headers()).map(str::to_ascii_lowercase);
    match ct.as_deref() {
        Some(ct) if is_json(Some(ct)) => parse_json(&body_bytes(req, state).await?),
        Some(ct) if ct.starts_with("multipart/form-data") => {
            let multipart = Multipart::from_request(req, state)
                .await
                .map_err(|e| ApiError::new(ErrorCode::InvalidRequest, format!("bad multipart body: {}", e.body_text())))?;
            read_multipart(multipart).await
        }
        _ => Err(ApiError::new(
            ErrorCode::UnsupportedMediaType,
            "send the message as application/json or multipart/form-data",
        )),
    }
}

fn multipart_error(e: axum::extract::multipart::MultipartError) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(ErrorCode::PayloadTooLarge, "the request body is larger than this route accepts")
    } else {
        ApiError::new(ErrorCode::InvalidRequest, format!("bad multipart body: {}", e.body_text()))
    }
}

/// Fields: `to`, `type`, `text`, `caption`, `replyTo`, and the media as `file`.
pub(crate) async fn read_multipart(mut mp: Multipart) -> ApiResult<SendRequest> {
    let mut req = SendRequest::default();
    let mut media: Option<MediaPayload> = None;
    while let Some(field) = mp.next_field().await.map_err(multipart_error)? {
        let name = field.name().unwrap_or("").to_owned();
        match name.as_str() {
            "file" | "media" => {
                let filename = field.file_name().map(str::to_owned);
                let mimetype = field
                    .content_type()
                    .map(str::to_owned)
                    .filter(|m| m != "application/octet-stream" || filename.is_some());
                let bytes = field.bytes().await.map_err(multipart_error)?;
                media = Some(MediaPayload {
                    data: base64::engine::general_purpose::STANDARD.encode(&bytes),
                    mimetype,
                    filename,
                });
            }
            "to" | "type" | "text" | "caption" | "replyTo" => {
                let value = field.text().await.map_err(multipart_error)?;
                match name.as_str() {
                    "to" => req.to = value,
                    "type" => req.kind = value,
                    "text" => req.text = Some(value),
                    "caption" => req.caption = Some(value),
                    _ => req.reply_to = Some(value),
                }
            }
            other => {
                return Err(ApiError::new(
                    ErrorCode::InvalidRequest,
                    format!("unknown multipart field {:?}", other.chars().take(40).collect::<String>()),
                ));
            }
        }
    }
    if req.kind.is_empty() {
        req.kind = if media.is_some() { "document".into() } else { "text".into() };
    }
    req.media = media;
    Ok(req)
}

pub async fn send(State(gw): State<AppState>, who: Principal, path: PathParams, req: Request) -> Response {
    match send_inner(&gw, who, path, req).await {
        Ok(r) => r,
        Err(f) => failure_response(f),
    }
}

async fn send_inner(gw: &AppState, who: Principal, path: PathParams, req: Request) -> Result<Response, SendFailure> {
    let session = path.session()?;
    who.require(Permission::Send, &session)?;
    let headers = req.headers().clone();
    let idempotency_key = idempotency_key(&headers)?;
    let mode = if wants_async(&headers) { Mode::Async } else { Mode::Sync };
    let request = read_send_request(req, gw).await?;
    let message = request.validate(gw.settings.media_max_bytes).map_err(ApiError::from)?;
    let input = SendInput { session, request, message, idempotency_key, mode, api_key_id: who.key_id.clone() };
    let sent = crate::send::send(gw, input).await?;
    Ok(sent_response(sent))
}

pub fn sent_response(sent: Sent) -> Response {
    let (status, row, extra): (StatusCode, _, Option<(&str, &str)>) = match sent {
        Sent::Done { row, queued: false } => (StatusCode::CREATED, row, None),
        Sent::Done { row, queued: true } => (StatusCode::ACCEPTED, row, Some(("preference-applied", "respond-async"))),
        Sent::Replayed { row } => (StatusCode::OK, row, Some(("idempotent-replayed", "true"))),
    };
    let location = format!("/v1/messages/{}", row.id);
    let mut resp = (status, [(header::LOCATION, location)], Json(Message::from(row))).into_response();
    if let Some((k, v)) = extra {
        resp.headers_mut().insert(k, HeaderValue::from_static(v));
    }
    resp
}

pub fn failure_response(f: SendFailure) -> Response {
    let mut resp = f.error.into_response();
    if let Some(id) = f.message_id {
        if let Ok(v) = HeaderValue::from_str(&format!("/v1/messages/{id}")) {
            resp.headers_mut().insert(header::LOCATION, v);
        }
        if let Ok(v) = HeaderValue::from_str(&id) {
            resp.headers_mut().insert("x-message-id", v);
        }
    }
    resp
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HistoryQuery {
    pub direction: Option<Direction>,
    /// A chat JID or phone number.
    pub chat: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub cursor: Option<String>,
    pub limit: Option<u32>,
}

pub fn history_filter(q: &HistoryQuery) -> ApiResult<HistoryFilter> {
    let limit = q.limit.unwrap_or(50);
    if !(1..=200).contains(&limit) {
        return Err(ApiError::new(ErrorCode::InvalidRequest, "limit must be 1-200"));
    }
    let chat = match &q.chat {
        Some(c) => Some(
            c.parse::<Recipient>()
                .map_err(|e| ApiError::new(ErrorCode::InvalidRecipient, e.to_string()))?
                .to_jid()
                .to_string(),
        ),
        None => None,
    };
    if let Some(c) = &q.cursor {
        if c.is_empty() || c.len() > 64 || !c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(ApiError::new(ErrorCode::InvalidRequest, "cursor is not one this API gave out"));
        }
    }
    Ok(HistoryFilter {
        direction: q.direction.map(|d| match d {
            Direction::Inbound => "inbound".to_owned(),
            Direction::Outbound => "outbound".to_owned(),
        }),
        chat,
        since: q.since.map(|t| t.timestamp_millis()),
        until: q.until.map(|t| t.timestamp_millis()),
        before_id: q.cursor.clone(),
        limit: i64::from(limit) + 1,
    })
}

/// One page of `session`'s history (newest first) and the cursor of the next.
pub async fn history_page(gw: &AppState, session: &SessionName, q: &HistoryQuery) -> ApiResult<MessagePage> {
    let filter = history_filter(q)?;
    let mut rows = gw.store.history(session.as_str(), &filter).await?;
    let more = rows.len() as i64 == filter.limit;
    if more {
        rows.pop();
    }
    let next_cursor = if more { rows.last().map(|r| r.id.clone()) } else { None };
    Ok(MessagePage { items: rows.into_iter().map(Message::from).collect(), next_cursor })
}

pub async fn history(
    State(gw): State<AppState>,
    who: Principal,
    path: PathParams,
    QueryParams(q): QueryParams<HistoryQuery>,
) -> ApiResult<Json<MessagePage>> {
    let session = path.session()?;
    who.require(Permission::Read, &session)?;
    if gw.directory.get(&session).is_none() {
        return Err(ApiError::session_not_found(session.as_str()));
    }
    Ok(Json(history_page(&gw, &session, &q).await?))
}

pub async fn get(State(gw): State<AppState>, who: Principal, path: PathParams) -> ApiResult<Json<Message>> {
    let id = path.id("id", ErrorCode::MessageNotFound)?;
    let row = gw
        .store
        .message(&id)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::MessageNotFound, "no such message"))?;
    let session: SessionName = row
        .session
        .parse()
        .map_err(|_| ApiError::new(ErrorCode::MessageNotFound, "no such message"))?;
    who.require(Permission::Read, &session)?;
    Ok(Json(Message::from(row)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn prefer_header() {
        assert!(wants_async(&headers(&[("prefer", "respond-async")])));
        assert!(wants_async(&headers(&[("prefer", "return=minimal, respond-async")])));
        assert!(wants_async(&headers(&[("prefer", "wait=10"), ("prefer", "Respond-Async")])));
        assert!(!wants_async(&headers(&[("prefer", "return=minimal")])));
        assert!(!wants_async(&HeaderMap::new()));
    }

    #[test]
    fn idempotency_keys() {
        assert_eq!(idempotency_key(&headers(&[("idempotency-key", "abc-1")])).unwrap().as_deref(), Some("abc-1"));
        assert_eq!(idempotency_key(&HeaderMap::new()).unwrap(), None);
        assert!(idempotency_key(&headers(&[("idempotency-key", "")])).is_err());
        assert!(idempotency_key(&headers(&[("idempotency-key", "a b")])).is_err());
        assert!(idempotency_key(&headers(&[("idempotency-key", &"x".repeat(256))])).is_err());
    }

    #[test]
    fn history_query_checks() {
        let q = |json: serde_json::Value| history_filter(&serde_json::from_value(json).unwrap()).map_err(|e| e.code);
        use serde_json::json;
        assert_eq!(q(json!({})).unwrap().limit, 51);
        assert_eq!(q(json!({"limit": 0})).unwrap_err(), ErrorCode::InvalidRequest);
        assert_eq!(q(json!({"limit": 201})).unwrap_err(), ErrorCode::InvalidRequest);
        assert_eq!(q(json!({"chat": "+15551234567"})).unwrap().chat.as_deref(), Some("15551234567@s.whatsapp.net"));
        assert_eq!(q(json!({"chat": "nope"})).unwrap_err(), ErrorCode::InvalidRecipient);
        assert_eq!(q(json!({"cursor": "../x"})).unwrap_err(), ErrorCode::InvalidRequest);
    }
}
