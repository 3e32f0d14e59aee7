//! `/v1/sessions…`: list, create, get, delete, restart, logout, QR, pair code, and the
//! sandbox controls (admin keys, sandbox sessions only).

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use wa_api::pod::{DisconnectRequest, InboundRequest, InboundResponse, PairCodeRequest, PairCodeResponse, PodStatus, ScanRequest};
use wa_api::{Engine, ErrorCode, PhoneNumber, SessionName};

use super::extract::{JsonBody, OptionalJsonBody, PathParams};
use crate::auth::Principal;
use crate::directory::{NewSession, Observed, SessionInfo};
use crate::error::{ApiError, ApiResult};
use crate::model::{CreateSession, Permission, Qr, Session, SessionList};
use crate::state::AppState;
use crate::util::now_ms;

pub async fn list(State(gw): State<AppState>, who: Principal) -> ApiResult<Json<SessionList>> {
    if !who.has(Permission::Read) {
        return Err(ApiError::forbidden("this key lacks the read permission"));
    }
    let items = gw
        .directory
        .list()
        .into_iter()
        .filter(|s| who.may_use(s.name.as_str()))
        .map(|s| s.view())
        .collect();
    Ok(Json(SessionList { items }))
}

pub async fn create(State(gw): State<AppState>, who: Principal, JsonBody(req): JsonBody<CreateSession>) -> ApiResult<Response> {
    who.require_admin()?;
    let new = NewSession::validate(req)?;
    let info = gw.directory.create(new).await?;
    tracing::info!(session = %info.name, engine = %info.engine, "session created");
    let location = format!("/v1/sessions/{}", info.name);
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], Json(info.view())).into_response())
}

pub async fn get(State(gw): State<AppState>, who: Principal, path: PathParams) -> ApiResult<Json<Session>> {
    let name = path.session()?;
    who.require(Permission::Read, &name)?;
    let info = gw.directory.get(&name).ok_or_else(|| ApiError::session_not_found(name.as_str()))?;
    Ok(Json(info.view()))
}

pub async fn delete(State(gw): State<AppState>, who: Principal, path: PathParams) -> ApiResult<StatusCode> {
    let name = path.session()?;
    who.require_admin()?;
    gw.directory.delete(&name).await?;
    // Sends still queued for it will never go out; say so rather than keep them forever.
    let failed = gw.store.fail_queued_sends_of(name.as_str(), "the session was deleted", now_ms()).await?;
    gw.store.delete_webhooks_of(name.as_str()).await?;
    gw.store.delete_session_state(name.as_str()).await?;
    tracing::info!(session = %name, failed_queued = failed, "session deleted");
    Ok(StatusCode::NO_CONTENT)
}

fn existing(gw: &AppState, name: &SessionName) -> ApiResult<SessionInfo> {
    gw.directory.get(name).ok_or_else(|| ApiError::session_not_found(name.as_str()))
}

/// Calls a pod route that answers the pod's status, records it, and answers the session.
async fn status_call<B: serde::Serialize>(gw: &AppState, name: &SessionName, path: &str, body: Option<&B>) -> ApiResult<Json<Session>> {
    let route = gw.directory.route(name)?;
    let status: PodStatus = gw.pods.post(&route, path, body).await.map_err(|e| e.into_api(name.as_str()))?;
    gw.directory.observe(name, Observed::Status(status));
    Ok(Json(existing(gw, name)?.view()))
}

pub async fn restart(State(gw): State<AppState>, who: Principal, path: PathParams) -> ApiResult<Json<Session>> {
    let name = path.session()?;
    who.require(Permission::Manage, &name)?;
    existing(&gw, &name)?;
    status_call::<()>(&gw, &name, "/v1/restart", None).await
}

pub async fn logout(State(gw): State<AppState>, who: Principal, path: PathParams) -> ApiResult<Json<Session>> {
    let name = path.session()?;
    who.require(Permission::Manage, &name)?;
    existing(&gw, &name)?;
    status_call::<()>(&gw, &name, "/v1/logout", None).await
}

/// Which QR format the client asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QrFormat {
    Png,
    Json,
    Text,
}

pub fn qr_format(headers: &HeaderMap) -> QrFormat {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
    if accept.contains("application/json") {
        QrFormat::Json
    } else if accept.contains("text/plain") {
        QrFormat::Text
    } else {
        QrFormat::Png
    }
}

pub async fn qr(State(gw): State<AppState>, who: Principal, path: PathParams, headers: HeaderMap) -> ApiResult<Response> {
    let name = path.session()?;
    who.require(Permission::Manage, &name)?;
    existing(&gw, &name)?;
    let route = gw.directory.route(&name)?;
    let format = qr_format(&headers);
    let accept = match format {
        QrFormat::Png => "image/png",
        QrFormat::Json => "application/json",
        QrFormat::Text => "text/plain",
    };
    let got = gw.pods.qr(&route, accept).await.map_err(|e| e.into_api(name.as_str()))?;
    let no_store = (header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(match format {
        QrFormat::Json => {
            let qr: Qr = serde_json::from_slice(&got.body)
                .map_err(|_| ApiError::unavailable("the session pod answered with an unexpected QR body"))?;
            ([no_store], Json(qr)).into_response()
        }
        QrFormat::Text => (
            [no_store, (header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"))],
            got.body,
        )
            .into_response(),
        QrFormat::Png => ([no_store, (header::CONTENT_TYPE, HeaderValue::from_static("image/png"))], got.body).into_response(),
    })
}

pub async fn pair_code(
    State(gw): State<AppState>,
    who: Principal,
    path: PathParams,
    JsonBody(req): JsonBody<PairCodeRequest>,
) -> ApiResult<Json<PairCodeResponse>> {
    let name = path.session()?;
    who.require(Permission::Manage, &name)?;
    existing(&gw, &name)?;
    req.phone_number
        .parse::<PhoneNumber>()
        .map_err(|e| ApiError::new(ErrorCode::InvalidPhoneNumber, e.to_string()))?;
    let route = gw.directory.route(&name)?;
    let code: PairCodeResponse = gw.pods.post(&route, "/v1/pair-code", Some(&req)).await.map_err(|e| e.into_api(name.as_str()))?;
    Ok(Json(code))
}

/// The sandbox controls exist on sandbox sessions only (the engine is never substituted).
fn sandbox_session(gw: &AppState, who: &Principal, path: &PathParams) -> ApiResult<SessionName> {
    let name = path.session()?;
    who.require_admin()?;
    let info = existing(gw, &name)?;
    if info.engine != Engine::Sandbox {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            format!("session {:?} runs the whatsapp engine; sandbox routes exist only on sandbox sessions", name.as_str()),
        ));
    }
    Ok(name)
}

async fn sandbox_call<B: serde::Serialize, T: DeserializeOwned>(gw: &AppState, name: &SessionName, path: &str, body: &B) -> ApiResult<T> {
    let route = gw.directory.route(name)?;
    gw.pods.post(&route, path, Some(body)).await.map_err(|e| e.into_api(name.as_str()))
}

pub async fn sandbox_scan(
    State(gw): State<AppState>,
    who: Principal,
    path: PathParams,
    OptionalJsonBody(req): OptionalJsonBody<ScanRequest>,
) -> ApiResult<Json<Session>> {
    let name = sandbox_session(&gw, &who, &path)?;
    if let Some(p) = &req.phone_number {
        p.parse::<PhoneNumber>().map_err(|e| ApiError::new(ErrorCode::InvalidPhoneNumber, e.to_string()))?;
    }
    let status: PodStatus = sandbox_call(&gw, &name, "/v1/sandbox/scan", &req).await?;
    gw.directory.observe(&name, Observed::Status(status));
    Ok(Json(existing(&gw, &name)?.view()))
}

pub async fn sandbox_inbound(
    State(gw): State<AppState>,
    who: Principal,
    path: PathParams,
    JsonBody(req): JsonBody<InboundRequest>,
) -> ApiResult<Json<InboundResponse>> {
    let name = sandbox_session(&gw, &who, &path)?;
    req.from
        .parse::<wa_api::Recipient>()
        .map_err(|e| ApiError::new(ErrorCode::InvalidRecipient, e.to_string()))?;
    Ok(Json(sandbox_call(&gw, &name, "/v1/sandbox/inbound", &req).await?))
}

pub async fn sandbox_disconnect(
    State(gw): State<AppState>,
    who: Principal,
    path: PathParams,
    OptionalJsonBody(req): OptionalJsonBody<DisconnectRequest>,
) -> ApiResult<Json<Session>> {
    let name = sandbox_session(&gw, &who, &path)?;
    if req.seconds.is_some_and(|s| s > 300) {
        return Err(ApiError::new(ErrorCode::ValidationFailed, "seconds must be at most 300"));
    }
    let status: PodStatus = sandbox_call(&gw, &name, "/v1/sandbox/disconnect", &req).await?;
    gw.directory.observe(&name, Observed::Status(status));
    Ok(Json(existing(&gw, &name)?.view()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qr_negotiation() {
        let h = |accept: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::ACCEPT, HeaderValue::from_str(accept).unwrap());
            qr_format(&m)
        };
        assert_eq!(h("application/json"), QrFormat::Json);
        assert_eq!(h("text/plain"), QrFormat::Text);
        assert_eq!(h("image/png"), QrFormat::Png);
        assert_eq!(h("*/*"), QrFormat::Png);
        assert_eq!(qr_format(&HeaderMap::new()), QrFormat::Png);
    }
}
