//! `POST /internal/v1/events`: pods deliver their events here with their token. The
//! session is the one the token belongs to; each event is applied once (by event id),
//! together with the webhook deliveries it causes.

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use tracing::{Instrument, debug, info_span};
use wa_api::pod::{EventAck, EventBatch};
use wa_api::{ErrorCode, SessionName};

use axum::extract::Request;

use super::extract::{body_bytes, content_type, is_json, parse_json};
use crate::directory::Observed;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use crate::store::AppliedEvent;
use crate::util::now_ms;

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// The most of a body read before its token is known to belong to a session.
pub const UNKNOWN_TOKEN_BODY_LIMIT: usize = 256 * 1024;

pub async fn events(State(gw): State<AppState>, req: Request) -> ApiResult<Json<EventAck>> {
    // Authenticate before reading or judging the body.
    let token = bearer(req.headers())
        .map(str::to_owned)
        .ok_or_else(|| ApiError::unauthorized("a pod token is needed: Authorization: Bearer <token>"))?;
    let known = gw.directory.session_for_token(&token);
    if !is_json(content_type(req.headers())) {
        return Err(if known.is_some() {
            ApiError::new(ErrorCode::UnsupportedMediaType, "send the body as application/json")
        } else {
            ApiError::unauthorized("this token belongs to no session")
        });
    }
    let bytes = match known {
        Some(_) => body_bytes(req, &gw).await?,
        // Not known yet (in Kubernetes mode a pod's token Secret may reach this replica after
        // the pod's first events): the body names the session to check the token against,
        // but whoever sends it has proven nothing, so read little of it. A pod that meets
        // this 413 halves its batch and retries; once the token is known it gets the
        // route's full limit again.
        None => axum::body::to_bytes(req.into_body(), UNKNOWN_TOKEN_BODY_LIMIT).await.map_err(|_| {
            ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("a token this gateway does not know yet may send at most {UNKNOWN_TOKEN_BODY_LIMIT} bytes"),
            )
        })?,
    };
    let batch: Result<EventBatch, ApiError> = parse_json(&bytes);
    let claimed = match (&known, batch.as_ref().ok().and_then(|b| b.events.first())) {
        (Some(s), _) => s.clone(),
        // A token not in memory yet: the session the events name, if the token is its own.
        (None, Some(first)) => match first.session.parse::<SessionName>() {
            Ok(name) if gw.directory.authenticate_pod(&name, &token).await => name,
            _ => return Err(ApiError::unauthorized("this token belongs to no session")),
        },
        (None, None) => return Err(ApiError::unauthorized("this token belongs to no session")),
    };
    let batch = batch?;
    if batch.events.iter().any(|e| e.session != claimed.as_str()) {
        return Err(ApiError::new(ErrorCode::ValidationFailed, "a batch carries the events of the token's own session only"));
    }
    if batch.events.len() > 10_000 {
        return Err(ApiError::new(ErrorCode::ValidationFailed, "at most 10000 events per batch"));
    }
    let span = info_span!("events", session = %claimed, count = batch.events.len());
    async move {
        let targets = crate::delivery::targets(&gw, &claimed).await?;
        let namespace = Some(gw.directory.namespace().to_owned()).filter(|n| n != "local");
        let outcome = gw.store.apply_events(claimed.as_str(), namespace.as_deref(), batch.events, targets, now_ms()).await?;
        for a in &outcome.applied {
            if let AppliedEvent::State { phase, account, at } = a {
                gw.directory.observe(&claimed, Observed::Phase { phase: *phase, account: account.clone(), at: *at });
            }
        }
        for (kind, fresh) in &outcome.seen {
            gw.metrics.event(kind, if *fresh { "accepted" } else { "duplicate" }, 1);
        }
        if outcome.deliveries > 0 {
            gw.webhook_wake.notify_one();
        }
        debug!(accepted = outcome.ack.accepted, duplicates = outcome.ack.duplicates, "events applied");
        Ok(Json(outcome.ack))
    }
    .instrument(span)
    .await
}


