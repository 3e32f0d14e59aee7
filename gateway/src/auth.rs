//! API keys: `wak_` + 32 random bytes. The store keeps the SHA-256 of a key, never the key:
//! a key is looked up by its hash and the hashes are compared in constant time. Lookups are
//! cached for a few seconds so a send costs no extra database round trip; revoking through
//! this gateway drops the cache entry at once, other replicas see it within the cache TTL.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::header;
use subtle::ConstantTimeEq;
use wa_api::{ErrorCode, SessionName};

use crate::error::{ApiError, ApiResult};
use crate::model::Permission;
use crate::state::AppState;
use crate::store::{KeyRecord, Store};
use crate::util::{now_ms, random_secret, sha256_hex};

pub const KEY_PREFIX: &str = "wak_";

/// A new raw key and the record to store for it.
pub fn generate_key(name: &str, admin: bool, permissions: &[Permission], sessions: &[String]) -> (String, KeyRecord) {
    let raw = format!("{KEY_PREFIX}{}", random_secret(32));
    let record = KeyRecord {
        id: crate::util::new_id(),
        name: name.to_owned(),
        prefix: raw.chars().take(KEY_PREFIX.len() + 6).collect(),
        key_hash: hash_key(&raw),
        admin,
        permissions: serde_json::to_string(permissions).unwrap_or_else(|_| "[]".into()),
        sessions: serde_json::to_string(sessions).unwrap_or_else(|_| "[]".into()),
        created_at: now_ms(),
        revoked_at: None,
    };
    (raw, record)
}

pub fn hash_key(raw: &str) -> String {
    sha256_hex(raw.as_bytes())
}

/// Who is calling, and what they may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The key's id; `None` for the `WA_ADMIN_KEY` from the environment.
    pub key_id: Option<String>,
    pub admin: bool,
    pub permissions: Vec<Permission>,
    pub sessions: Vec<String>,
}

impl Principal {
    pub fn env_admin() -> Self {
        Principal { key_id: None, admin: true, permissions: vec![], sessions: vec![] }
    }

    fn from_record(k: &KeyRecord) -> Self {
        Principal {
            key_id: Some(k.id.clone()),
            admin: k.admin,
            permissions: serde_json::from_str(&k.permissions).unwrap_or_default(),
            sessions: serde_json::from_str(&k.sessions).unwrap_or_default(),
        }
    }

    pub fn require_admin(&self) -> ApiResult<()> {
        if self.admin {
            Ok(())
        } else {
            Err(ApiError::forbidden("this needs an admin key"))
        }
    }

    /// Whether the key names this session (admin keys name every session).
    pub fn may_use(&self, session: &str) -> bool {
        self.admin || self.sessions.iter().any(|s| s == session)
    }

    /// Checks `permission` on `session`: 403 FORBIDDEN otherwise.
    pub fn require(&self, permission: Permission, session: &SessionName) -> ApiResult<()> {
        if self.admin {
            return Ok(());
        }
        if !self.may_use(session.as_str()) {
            return Err(ApiError::forbidden(format!("this key may not use session {:?}", session.as_str())));
        }
        if !self.permissions.contains(&permission) {
            return Err(ApiError::forbidden(format!(
                "this key lacks the {} permission",
                serde_json::to_value(permission).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
            )));
        }
        Ok(())
    }

    pub fn has(&self, permission: Permission) -> bool {
        self.admin || self.permissions.contains(&permission)
    }
}

/// Verifies keys against the store, with a short cache.
pub struct KeyVerifier {
    store: Store,
    /// Hash of `WA_ADMIN_KEY`, when set.
    env_admin_hash: Option<[u8; 32]>,
    cache: RwLock<HashMap<String, (Instant, Option<Arc<KeyRecord>>)>>,
    ttl: Duration,
}

impl KeyVerifier {
    pub fn new(store: Store, env_admin_key: Option<&str>, ttl: Duration) -> Self {
        let env_admin_hash = env_admin_key.filter(|k| !k.is_empty()).map(|k| {
            use sha2::Digest;
            sha2::Sha256::digest(k.as_bytes()).into()
        });
        KeyVerifier { store, env_admin_hash, cache: RwLock::new(HashMap::new()), ttl }
    }

    /// The principal for a raw key; 401 for unknown or revoked keys.
    pub async fn verify(&self, raw: &str) -> ApiResult<Principal> {
        use sha2::Digest;
        let digest: [u8; 32] = sha2::Sha256::digest(raw.as_bytes()).into();
        if let Some(admin) = &self.env_admin_hash {
            if bool::from(admin.ct_eq(&digest)) {
                return Ok(Principal::env_admin());
            }
        }
        if !raw.starts_with(KEY_PREFIX) {
            return Err(ApiError::unauthorized("invalid API key"));
        }
        let hash = hex::encode(digest);
        let record = self.lookup(&hash).await?;
        match record {
            // The lookup was by hash; compare again in constant time so no code path
            // depends on how much of a guessed hash matched.
            Some(k) if bool::from(k.key_hash.as_bytes().ct_eq(hash.as_bytes())) => {
                if k.revoked_at.is_some() {
                    Err(ApiError::unauthorized("this API key was revoked"))
                } else {
                    Ok(Principal::from_record(&k))
                }
            }
            _ => Err(ApiError::unauthorized("invalid API key")),
        }
    }

    async fn lookup(&self, hash: &str) -> ApiResult<Option<Arc<KeyRecord>>> {
        if let Ok(cache) = self.cache.read() {
            if let Some((at, record)) = cache.get(hash) {
                if at.elapsed() < self.ttl {
                    return Ok(record.clone());
                }
            }
        }
        let record = self.store.key_by_hash(hash).await?.map(Arc::new);
        if let Ok(mut cache) = self.cache.write() {
            // Unknown keys are cached too (a flood of bad keys costs no queries), bounded.
            if cache.len() > 10_000 {
                cache.clear();
            }
            cache.insert(hash.to_owned(), (Instant::now(), record.clone()));
        }
        Ok(record)
    }

    /// Forgets a key at once (after a revocation).
    pub fn forget(&self, key_hash: &str) {
        if let Ok(mut cache) = self.cache.write() {
            cache.remove(key_hash);
        }
    }

    /// Forgets every cached lookup (after a new key was created, so a cached "unknown" does not linger).
    pub fn forget_all(&self) {
        if let Ok(mut cache) = self.cache.write() {
            cache.clear();
        }
    }
}

/// The raw key from `Authorization: Bearer <key>` or `Authorization: ApiKey <key>` (the
/// older gateways' scheme), or `X-Api-Key`.
pub fn raw_key(headers: &axum::http::HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        for scheme in ["Bearer ", "bearer ", "ApiKey ", "apikey ", "Api-Key "] {
            if let Some(rest) = v.strip_prefix(scheme) {
                return Some(rest.trim()).filter(|k| !k.is_empty());
            }
        }
        return None;
    }
    headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::trim).filter(|k| !k.is_empty())
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        if let Some(p) = parts.extensions.get::<Principal>() {
            return Ok(p.clone());
        }
        let raw = raw_key(&parts.headers).ok_or_else(|| {
            ApiError::new(ErrorCode::Unauthorized, "an API key is needed: Authorization: Bearer <key>")
        })?;
        let principal = state.keys.verify(raw).await?;
        parts.extensions.insert(principal.clone());
        Ok(principal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::both;

    fn p(admin: bool, perms: &[Permission], sessions: &[&str]) -> Principal {
        Principal {
            key_id: Some("k".into()),
            admin,
            permissions: perms.to_vec(),
            sessions: sessions.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn check(principal: &Principal, perm: Permission, session: &str, allowed: bool) {
        let s: SessionName = session.parse().unwrap();
        let got = principal.require(perm, &s);
        assert_eq!(got.is_ok(), allowed, "{principal:?} {perm:?} {session}");
        if let Err(e) = got {
            assert_eq!(e.code, ErrorCode::Forbidden);
        }
    }

    #[test]
    fn permission_table() {
        use Permission::*;
        let admin = p(true, &[], &[]);
        let sender = p(false, &[Send], &["a"]);
        let reader = p(false, &[Read], &["a", "b"]);
        check(&admin, Manage, "zzz", true);
        check(&sender, Send, "a", true);
        check(&sender, Send, "b", false);
        check(&sender, Read, "a", false);
        check(&reader, Read, "b", true);
        check(&reader, Send, "b", false);
        check(&reader, Manage, "a", false);
        assert!(sender.require_admin().is_err());
        assert!(admin.require_admin().is_ok());
    }

    #[test]
    fn keys_look_right_and_store_only_a_hash() {
        let (raw, rec) = generate_key("ci", false, &[Permission::Send], &["a".into()]);
        assert!(raw.starts_with("wak_") && raw.len() == 4 + 43, "{raw}");
        assert_eq!(rec.key_hash, hash_key(&raw));
        assert!(!rec.key_hash.contains(&raw[4..]));
        assert!(raw.starts_with(&rec.prefix) && rec.prefix.len() == 10);
    }

    #[test]
    fn authorization_header_schemes() {
        let parts = |name: &str, value: &str| {
            let mut h = axum::http::HeaderMap::new();
            h.insert(axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(), value.parse().unwrap());
            h
        };
        assert_eq!(raw_key(&parts("authorization", "Bearer wak_1")), Some("wak_1"));
        assert_eq!(raw_key(&parts("authorization", "ApiKey wak_2")), Some("wak_2"));
        assert_eq!(raw_key(&parts("x-api-key", "wak_3")), Some("wak_3"));
        assert_eq!(raw_key(&parts("authorization", "Basic abc")), None);
        assert_eq!(raw_key(&parts("authorization", "Bearer ")), None);
    }

    both!(verifier_accepts_live_keys_only, |store| {
        let verifier = KeyVerifier::new(store.clone(), Some("env-admin-secret"), Duration::from_secs(60));
        assert!(verifier.verify("env-admin-secret").await.unwrap().admin);
        assert_eq!(verifier.verify("wak_unknown").await.unwrap_err().code, ErrorCode::Unauthorized);
        assert_eq!(verifier.verify("no-prefix").await.unwrap_err().code, ErrorCode::Unauthorized);

        let (raw, rec) = generate_key("ci", false, &[Permission::Send], &["a".into()]);
        store.insert_key(&rec).await.unwrap();
        verifier.forget_all();
        let who = verifier.verify(&raw).await.unwrap();
        assert_eq!(who.sessions, ["a"]);
        store.revoke_key(&rec.id, 1).await.unwrap();
        // Cached until forgotten: the revoking gateway forgets at once.
        assert!(verifier.verify(&raw).await.is_ok());
        verifier.forget(&rec.key_hash);
        let e = verifier.verify(&raw).await.unwrap_err();
        assert_eq!((e.code, e.message.as_str()), (ErrorCode::Unauthorized, "this API key was revoked"));
    });
}
