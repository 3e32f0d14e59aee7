//! `/v1/sessions/{name}/webhooks…`: register, list, get, delete webhooks, read their
//! delivery log and redeliver. Needs the `manage` permission on the session.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use wa_api::crd::WebhookEvent;
use wa_api::{ErrorCode, SessionName};

use super::extract::{JsonBody, PathParams, QueryParams};
use crate::auth::Principal;
use crate::delivery::SPEC_PREFIX;
use crate::error::{ApiError, ApiResult};
use crate::model::{CreateWebhook, CreatedWebhook, Delivery, DeliveryPage, Permission, Webhook, WebhookList, WebhookSource};
use crate::state::AppState;
use crate::store::WebhookRow;
use crate::util::{new_id, now_ms, random_secret};

/// An http(s) URL: lowercase scheme, a host name or IPv4 address, an optional port, then
/// an optional path, query or fragment without spaces or control characters; at most 2048
/// characters; no credentials. Exactly what `openapi::WEBHOOK_URL_PATTERN` describes.
pub fn validate_url(url: &str) -> ApiResult<()> {
    let bad = |why: &str| ApiError::new(ErrorCode::ValidationFailed, format!("url {why}"));
    if url.chars().count() > 2048 {
        return Err(bad("must be at most 2048 characters"));
    }
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| bad("must start with http:// or https://"))?;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (host, port) = match authority.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (authority, None),
    };
    if host.is_empty() || !host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-') {
        return Err(bad("needs a host name (letters, digits, '.', '-'), without credentials"));
    }
    if let Some(p) = port {
        let ok = !p.is_empty()
            && p.len() <= 5
            && p.bytes().all(|b| b.is_ascii_digit())
            && (p == "0" || !p.starts_with('0'))
            && p.parse::<u32>().is_ok_and(|n| n <= 65535);
        if !ok {
            return Err(bad("has an invalid port"));
        }
    }
    if tail.chars().any(|c| c <= ' ' || c == '\u{7f}') {
        return Err(bad("must not contain spaces or control characters"));
    }
    reqwest::Url::parse(url).map_err(|_| bad("is not a valid URL"))?;
    Ok(())
}

fn session_of(gw: &AppState, who: &Principal, path: &PathParams) -> ApiResult<SessionName> {
    let name = path.session()?;
    who.require(Permission::Manage, &name)?;
    if gw.directory.get(&name).is_none() {
        return Err(ApiError::session_not_found(name.as_str()));
    }
    Ok(name)
}

fn not_found() -> ApiError {
    ApiError::new(ErrorCode::WebhookNotFound, "no such webhook")
}

/// All webhooks of a session: registered ones, then the spec's.
fn all_webhooks(gw: &AppState, name: &SessionName, rows: &[WebhookRow]) -> Vec<Webhook> {
    let mut items: Vec<Webhook> = rows.iter().map(Webhook::from).collect();
    for (i, spec) in gw.directory.spec_webhooks(name).into_iter().enumerate() {
        items.push(Webhook {
            id: format!("{SPEC_PREFIX}{name}-{i}"),
            session: name.to_string(),
            url: spec.url,
            events: spec.events,
            source: WebhookSource::Spec,
            created_at: None,
        });
    }
    items
}

async fn find(gw: &AppState, name: &SessionName, id: &str) -> ApiResult<Webhook> {
    let rows = gw.store.webhooks_of(name.as_str()).await?;
    all_webhooks(gw, name, &rows).into_iter().find(|w| w.id == id).ok_or_else(not_found)
}

pub async fn list(State(gw): State<AppState>, who: Principal, path: PathParams) -> ApiResult<Json<WebhookList>> {
    let name = session_of(&gw, &who, &path)?;
    let rows = gw.store.webhooks_of(name.as_str()).await?;
    Ok(Json(WebhookList { items: all_webhooks(&gw, &name, &rows) }))
}

pub async fn create(
    State(gw): State<AppState>,
    who: Principal,
    path: PathParams,
    JsonBody(req): JsonBody<CreateWebhook>,
) -> ApiResult<Response> {
    let name = session_of(&gw, &who, &path)?;
    validate_url(&req.url)?;
    let secret = match req.secret {
        Some(s) => {
            let n = s.chars().count();
            if !(16..=256).contains(&n) {
                return Err(ApiError::new(ErrorCode::ValidationFailed, "secret must be 16-256 characters"));
            }
            s
        }
        None => format!("whsec_{}", random_secret(24)),
    };
    let mut events: Vec<WebhookEvent> = Vec::new();
    for e in req.events {
        if !events.contains(&e) {
            events.push(e);
        }
    }
    let row = WebhookRow {
        id: new_id(),
        session: name.to_string(),
        url: req.url,
        events: serde_json::to_string(&events).unwrap_or_else(|_| "[]".into()),
        secret: secret.clone(),
        created_at: now_ms(),
    };
    gw.store.insert_webhook(&row).await?;
    tracing::info!(session = %name, webhook = %row.id, "webhook registered");
    let location = format!("/v1/sessions/{name}/webhooks/{}", row.id);
    let body = CreatedWebhook { secret, webhook: Webhook::from(&row) };
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], Json(body)).into_response())
}

pub async fn get(State(gw): State<AppState>, who: Principal, path: PathParams) -> ApiResult<Json<Webhook>> {
    let name = session_of(&gw, &who, &path)?;
    let id = path.id("id", ErrorCode::WebhookNotFound)?;
    Ok(Json(find(&gw, &name, &id).await?))
}

pub async fn delete(State(gw): State<AppState>, who: Principal, path: PathParams) -> ApiResult<StatusCode> {
    let name = session_of(&gw, &who, &path)?;
    let id = path.id("id", ErrorCode::WebhookNotFound)?;
    let hook = find(&gw, &name, &id).await?;
    if hook.source == WebhookSource::Spec {
        return Err(ApiError::new(
            ErrorCode::ValidationFailed,
            "this webhook is declared in the WhatsAppSession's spec; change the object to remove it",
        ));
    }
    if !gw.store.delete_webhook(name.as_str(), &id).await? {
        return Err(not_found());
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    pub cursor: Option<String>,
    pub limit: Option<u32>,
}

pub async fn deliveries(
    State(gw): State<AppState>,
    who: Principal,
    path: PathParams,
    QueryParams(q): QueryParams<PageQuery>,
) -> ApiResult<Json<DeliveryPage>> {
    let name = session_of(&gw, &who, &path)?;
    let id = path.id("id", ErrorCode::WebhookNotFound)?;
    find(&gw, &name, &id).await?;
    let limit = q.limit.unwrap_or(50);
    if !(1..=200).contains(&limit) {
        return Err(ApiError::new(ErrorCode::InvalidRequest, "limit must be 1-200"));
    }
    if let Some(c) = &q.cursor {
        if c.is_empty() || c.len() > 64 || !c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(ApiError::new(ErrorCode::InvalidRequest, "cursor is not one this API gave out"));
        }
    }
    let mut rows = gw.store.deliveries(&id, q.cursor.as_deref(), i64::from(limit) + 1).await?;
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    let next_cursor = if more { rows.last().map(|r| r.id.clone()) } else { None };
    Ok(Json(DeliveryPage { items: rows.into_iter().map(Delivery::from).collect(), next_cursor }))
}

pub async fn redeliver(State(gw): State<AppState>, who: Principal, path: PathParams) -> ApiResult<Json<Delivery>> {
    let name = session_of(&gw, &who, &path)?;
    let id = path.id("id", ErrorCode::WebhookNotFound)?;
    let delivery_id = path.id("deliveryId", ErrorCode::WebhookNotFound)?;
    find(&gw, &name, &id).await?;
    let existing = gw.store.delivery(&delivery_id).await?.filter(|d| d.webhook_id == id);
    if existing.is_none() {
        return Err(ApiError::new(ErrorCode::WebhookNotFound, "no such delivery"));
    }
    let d = gw.store.redeliver(&delivery_id, now_ms()).await?.ok_or_else(not_found)?;
    gw.webhook_wake.notify_one();
    Ok(Json(Delivery::from(d)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_urls() {
        for ok in ["https://example.com/hook", "http://127.0.0.1:8080/x?y=1", "http://h", "https://a.b:65535#f"] {
            assert!(validate_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "ftp://x/y", "not a url", "https://", "http://user:pw@host/", "javascript:alert(1)", "HTTP://x",
            "http://x:65536/", "http://x:/", "http://x/a b", "https://[::1]/h", &format!("https://x/{}", "a".repeat(2048)),
        ] {
            assert_eq!(validate_url(bad).unwrap_err().code, ErrorCode::ValidationFailed, "{bad}");
        }
    }
}
