//! Sending: record, then forward. Shared by `POST /v1/sessions/{name}/messages` and the
//! compatible routes.
//!
//! A send is validated at the edge, recorded (status `queued`), then forwarded to the pod
//! with the message id as `Idempotency-Key`. A synchronous send holds a lease on its row
//! while it forwards; if this gateway dies mid-forward, the outbox forwards the row again
//! when the lease runs out and the pod answers from its idempotency record. An
//! asynchronous send (`Prefer: respond-async`) is answered 202 and handed to the outbox.

use std::time::Duration;

use wa_api::pod::{Content, OutgoingMessage, SendRequest};
use wa_api::{ErrorCode, Phase, SessionName};

use crate::error::ApiError;
use crate::pod_client::PodError;
use crate::state::Gateway;
use crate::store::{InsertOutcome, MessageRow, NewOutbound, SendOutcome};
use crate::util::{new_id, now_ms, sha256_hex};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Sync,
    Async,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Sync => "sync",
            Mode::Async => "async",
        }
    }
}

/// A validated send.
#[derive(Debug, Clone)]
pub struct SendInput {
    pub session: SessionName,
    /// What is forwarded to the pod (media already base64 in JSON).
    pub request: SendRequest,
    pub message: OutgoingMessage,
    pub idempotency_key: Option<String>,
    pub mode: Mode,
    pub api_key_id: Option<String>,
}

/// How a send ended, for the handler to answer.
#[derive(Debug, Clone)]
pub enum Sent {
    /// Forwarded and accepted by WhatsApp (201), or queued for the outbox (202).
    Done { row: MessageRow, queued: bool },
    /// The same `Idempotency-Key` was used before: the first send's current state.
    Replayed { row: MessageRow },
}

/// A refused send; `message_id` is set when the message was recorded (and is now failed).
#[derive(Debug, Clone)]
pub struct SendFailure {
    pub error: ApiError,
    pub message_id: Option<String>,
}

impl From<crate::store::StoreError> for SendFailure {
    fn from(e: crate::store::StoreError) -> Self {
        SendFailure { error: e.into(), message_id: None }
    }
}

impl From<ApiError> for SendFailure {
    fn from(error: ApiError) -> Self {
        SendFailure { error, message_id: None }
    }
}

/// What a recorded send does next.
enum Next {
    /// Sync: forward it to the pod now.
    Forward(crate::directory::Route),
    /// Async: the outbox forwards it.
    Queue(MessageRow),
}

/// Phases in which a send cannot go out now; a sync send is refused before it is recorded.
fn cannot_send(phase: Phase) -> bool {
    matches!(phase, Phase::AwaitingScan | Phase::LoggedOut | Phase::Suspended | Phase::Failed)
}

pub async fn send(gw: &Gateway, input: SendInput) -> Result<Sent, SendFailure> {
    let info = gw
        .directory
        .get(&input.session)
        .ok_or_else(|| ApiError::session_not_found(input.session.as_str()))?;
    let payload = serde_json::to_string(&input.request).map_err(|e| ApiError::internal("encoding a send", e))?;
    let request_hash = sha256_hex(format!("{}\n{payload}", input.session).as_bytes());
    let now = now_ms();
    let lease = gw.settings.send_lease.as_millis() as i64;

    // An earlier send with this key answers for this one.
    if let Some(key) = &input.idempotency_key {
        if let Some(row) = gw.store.message_by_idempotency_key(input.session.as_str(), key).await? {
            return replay(gw, &input, row, &payload, &request_hash).await;
        }
    }

    let route = match input.mode {
        Mode::Sync => {
            if cannot_send(info.phase) && info.ready {
                return Err(ApiError::new(
                    ErrorCode::SessionNotConnected,
                    format!("session {:?} is {}, not connected", input.session.as_str(), info.phase),
                )
                .into());
            }
            Some(gw.directory.route(&input.session)?)
        }
        Mode::Async => None,
    };

    let (body_text, mimetype, filename, size) = match &input.message.content {
        Content::Text(t) => (Some(t.clone()), None, None, None),
        Content::Media(m) => (m.caption.clone(), Some(m.mimetype.clone()), m.filename.clone(), Some(m.data.len() as i64)),
    };
    let id = new_id();
    let new = NewOutbound {
        id: id.clone(),
        session: input.session.to_string(),
        chat: input.message.to.to_jid().to_string(),
        kind: input.message.kind().as_str().to_owned(),
        body_text,
        media_mimetype: mimetype,
        media_filename: filename,
        media_size: size,
        idempotency_key: input.idempotency_key.clone(),
        request_hash: request_hash.clone(),
        api_key_id: input.api_key_id.clone(),
        mode: input.mode.as_str(),
        payload: payload.clone(),
        next_attempt_at: match input.mode {
            Mode::Sync => now + lease,
            Mode::Async => now,
        },
        lease_until: (input.mode == Mode::Sync).then_some(now + lease),
        now,
    };
    // What follows the record; an async send is answered with the row as recorded.
    let next = match route {
        Some(route) => Next::Forward(route),
        None => Next::Queue(new.row()),
    };
    match gw.store.insert_outbound(new).await? {
        InsertOutcome::Inserted => {}
        // Two requests with one key raced; the other one recorded first.
        InsertOutcome::Existing(row) => return replay(gw, &input, row, &payload, &request_hash).await,
    }
    gw.metrics.accepted(input.session.as_str(), input.mode.as_str());
    match next {
        Next::Forward(route) => forward_now(gw, &route, &id, &payload).await,
        Next::Queue(row) => {
            gw.outbox_wake.notify_one();
            Ok(Sent::Done { row, queued: true })
        }
    }
}

/// Forwards a recorded sync send and records the outcome.
async fn forward_now(gw: &Gateway, route: &crate::directory::Route, id: &str, payload: &str) -> Result<Sent, SendFailure> {
    let session = route.session.as_str();
    match gw.pods.send(route, payload, id).await {
        Ok(resp) => {
            let outcome = SendOutcome::Sent {
                wa_id: resp.id,
                chat: resp.to,
                status: resp.status,
                sent_at: resp.timestamp.timestamp_millis(),
            };
            let row = match gw.store.finish_send(id, &outcome, now_ms()).await? {
                Some(row) => row,
                None => fetch(gw, id).await?,
            };
            Ok(Sent::Done { row, queued: false })
        }
        Err(e) => {
            let code = e.code();
            let reason = e.reason();
            if matches!(e, PodError::Unreachable(_)) {
                gw.directory.observe(&route.session, crate::directory::Observed::Unreachable);
            }
            gw.store
                .finish_send(id, &SendOutcome::Failed { code: code.as_str().to_owned(), reason }, now_ms())
                .await?;
            Err(SendFailure { error: e.into_api(session), message_id: Some(id.to_owned()) })
        }
    }
}

/// Answers a send whose `Idempotency-Key` was used before.
async fn replay(gw: &Gateway, input: &SendInput, row: MessageRow, payload: &str, request_hash: &str) -> Result<Sent, SendFailure> {
    if row.request_hash.as_deref() != Some(request_hash) {
        return Err(ApiError::new(
            ErrorCode::IdempotencyConflict,
            "this Idempotency-Key was used with a different request",
        )
        .into());
    }
    let row = wait_while_in_flight(gw, row).await?;
    if row.status == "failed" && row.wa_id.is_none() && retriable(row.error_code.as_deref()) {
        // The first try did not go through for a reason that may have passed: try again,
        // with the same message id (the pod deduplicates if it did get it).
        let now = now_ms();
        let lease = gw.settings.send_lease.as_millis() as i64;
        match input.mode {
            Mode::Sync => {
                let route = gw.directory.route(&input.session)?;
                if gw.store.retry_failed_send(&row.id, payload, now + lease, now).await? {
                    return forward_now(gw, &route, &row.id, payload).await;
                }
            }
            Mode::Async => {
                if gw.store.retry_failed_send(&row.id, payload, now, now).await? {
                    gw.outbox_wake.notify_one();
                    return Ok(Sent::Done { row: fetch(gw, &row.id).await?, queued: true });
                }
            }
        }
        let row = wait_while_in_flight(gw, fetch(gw, &row.id).await?).await?;
        return replay_answer(row);
    }
    replay_answer(row)
}

fn replay_answer(row: MessageRow) -> Result<Sent, SendFailure> {
    if row.status == "failed" {
        let code = row
            .error_code
            .as_deref()
            .and_then(|c| serde_json::from_value::<ErrorCode>(serde_json::Value::String(c.to_owned())).ok())
            .unwrap_or(ErrorCode::SendFailed);
        let mut error = ApiError::new(code, row.error.clone().unwrap_or_else(|| "the send failed".into()));
        if matches!(code, ErrorCode::RateLimited | ErrorCode::SessionNotReady | ErrorCode::Unavailable) {
            error = error.with_retry_after(1);
        }
        return Err(SendFailure { error, message_id: Some(row.id) });
    }
    Ok(Sent::Replayed { row })
}

fn retriable(code: Option<&str>) -> bool {
    code.and_then(|c| serde_json::from_value::<ErrorCode>(serde_json::Value::String(c.to_owned())).ok())
        .is_some_and(|c| ApiError::new(c, "").is_retriable())
}

/// A sync send with this key is being forwarded by another request right now: wait for
/// its outcome (bounded), so the retry answers what the first request answers.
async fn wait_while_in_flight(gw: &Gateway, mut row: MessageRow) -> Result<MessageRow, SendFailure> {
    let deadline = tokio::time::Instant::now() + gw.settings.send_lease.min(Duration::from_secs(35));
    while row.status == "queued" && row.lease_until.is_some_and(|l| l > now_ms()) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(25)).await;
        row = fetch(gw, &row.id).await?;
    }
    Ok(row)
}

async fn fetch(gw: &Gateway, id: &str) -> Result<MessageRow, SendFailure> {
    gw.store
        .message(id)
        .await?
        .ok_or_else(|| ApiError::internal("reading a recorded message", "it is gone").into())
}
