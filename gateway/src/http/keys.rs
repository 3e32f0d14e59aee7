//! `/v1/keys`: create (the raw key is shown once), list, get, revoke. Admin keys only.

use std::collections::BTreeSet;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use wa_api::{ErrorCode, SessionName};

use super::extract::{JsonBody, PathParams};
use crate::auth::{Principal, generate_key};
use crate::error::{ApiError, ApiResult};
use crate::model::{ApiKey, CreateKey, CreatedKey, KeyList, Permission};
use crate::state::AppState;
use crate::util::now_ms;

/// Checks a key request: admin keys carry no scope; other keys need at least one
/// permission and 1-100 sessions.
pub fn validate(req: &CreateKey) -> ApiResult<(Vec<Permission>, Vec<String>)> {
    let name_len = req.name.chars().count();
    if name_len == 0 || name_len > 100 || req.name.chars().any(char::is_control) {
        return Err(ApiError::new(ErrorCode::ValidationFailed, "name must be 1-100 printable characters"));
    }
    if req.admin {
        if !req.permissions.is_empty() || !req.sessions.is_empty() {
            return Err(ApiError::new(
                ErrorCode::ValidationFailed,
                "an admin key may do everything; leave permissions and sessions empty",
            ));
        }
        return Ok((vec![], vec![]));
    }
    if req.permissions.is_empty() {
        return Err(ApiError::new(ErrorCode::ValidationFailed, "a non-admin key needs permissions (send, read, manage)"));
    }
    if req.sessions.is_empty() || req.sessions.len() > 100 {
        return Err(ApiError::new(ErrorCode::ValidationFailed, "a non-admin key names 1-100 sessions"));
    }
    let mut sessions = BTreeSet::new();
    for s in &req.sessions {
        let name: SessionName = s
            .parse()
            .map_err(|e: wa_api::ids::IdError| ApiError::new(ErrorCode::InvalidSessionName, e.to_string()))?;
        sessions.insert(name.to_string());
    }
    let mut permissions = req.permissions.clone();
    permissions.sort_by_key(|p| *p as u8);
    permissions.dedup();
    Ok((permissions, sessions.into_iter().collect()))
}

pub async fn create(State(gw): State<AppState>, who: Principal, JsonBody(req): JsonBody<CreateKey>) -> ApiResult<Response> {
    who.require_admin()?;
    let (permissions, sessions) = validate(&req)?;
    let (raw, record) = generate_key(req.name.trim(), req.admin, &permissions, &sessions);
    gw.store.insert_key(&record).await?;
    gw.keys.forget_all();
    tracing::info!(key = %record.id, admin = record.admin, "API key created");
    let body = CreatedKey { key: raw, info: ApiKey::from(&record) };
    Ok((StatusCode::CREATED, [(header::LOCATION, format!("/v1/keys/{}", record.id))], Json(body)).into_response())
}

pub async fn list(State(gw): State<AppState>, who: Principal) -> ApiResult<Json<KeyList>> {
    who.require_admin()?;
    let items = gw.store.list_keys().await?.iter().map(ApiKey::from).collect();
    Ok(Json(KeyList { items }))
}

pub async fn get(State(gw): State<AppState>, who: Principal, path: PathParams) -> ApiResult<Json<ApiKey>> {
    who.require_admin()?;
    let id = path.id("id", ErrorCode::KeyNotFound)?;
    let key = gw.store.key_by_id(&id).await?.ok_or_else(|| ApiError::new(ErrorCode::KeyNotFound, "no such API key"))?;
    Ok(Json(ApiKey::from(&key)))
}

pub async fn revoke(State(gw): State<AppState>, who: Principal, path: PathParams) -> ApiResult<StatusCode> {
    who.require_admin()?;
    let id = path.id("id", ErrorCode::KeyNotFound)?;
    let key = gw
        .store
        .revoke_key(&id, now_ms())
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::KeyNotFound, "no such API key"))?;
    gw.keys.forget(&key.key_hash);
    tracing::info!(key = %key.id, "API key revoked");
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(json: serde_json::Value, expected: Result<(), ErrorCode>) {
        let req: CreateKey = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(validate(&req).map(|_| ()).map_err(|e| e.code), expected, "{json}");
    }

    #[test]
    fn key_request_table() {
        use serde_json::json;
        check(json!({"name": "ops", "admin": true}), Ok(()));
        check(json!({"name": "crm", "permissions": ["send"], "sessions": ["support"]}), Ok(()));
        check(json!({"name": "", "admin": true}), Err(ErrorCode::ValidationFailed));
        check(json!({"name": "x".repeat(101), "admin": true}), Err(ErrorCode::ValidationFailed));
        check(json!({"name": "a", "admin": true, "sessions": ["s"]}), Err(ErrorCode::ValidationFailed));
        check(json!({"name": "a", "sessions": ["s"]}), Err(ErrorCode::ValidationFailed));
        check(json!({"name": "a", "permissions": ["read"]}), Err(ErrorCode::ValidationFailed));
        check(json!({"name": "a", "permissions": ["read"], "sessions": ["Bad"]}), Err(ErrorCode::InvalidSessionName));
        let (perms, sessions) = validate(
            &serde_json::from_value(json!({"name": "a", "permissions": ["read", "send", "read"], "sessions": ["b", "a", "b"]}))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(perms, [Permission::Send, Permission::Read]);
        assert_eq!(sessions, ["a", "b"]);
    }
}
