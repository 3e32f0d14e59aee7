//! Where sessions live and how to reach their pods: the [`SessionDirectory`].
//!
//! Two implementations: [`local::LocalDirectory`] supervises session processes on this
//! machine, [`kube::KubeDirectory`] follows `WhatsAppSession` objects, their Pods and token
//! Secrets through reflectors. Both keep the route table in memory, so a request costs no
//! lookup beyond a map read.

pub mod kube;
pub mod local;

use std::collections::HashMap;
use std::sync::RwLock;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use wa_api::crd::{Account, RateLimitSpec, SecretKeyRef, WebhookSpec};
use wa_api::pod::PodStatus;
use wa_api::{Engine, Phase, PhoneNumber, SessionName};

use crate::error::{ApiError, ApiResult};
use crate::model::{CreateSession, Session};

/// How to call one session's pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub session: SessionName,
    /// `http://<ip>:<port>`, no trailing slash.
    pub base_url: String,
    pub token: String,
}

/// A validated `POST /v1/sessions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSession {
    pub name: SessionName,
    pub engine: Engine,
    pub phone_number: Option<PhoneNumber>,
    pub rate_limit: RateLimitSpec,
}

impl NewSession {
    /// Checks a create request; each bad field gets its own stable code.
    pub fn validate(req: CreateSession) -> ApiResult<NewSession> {
        use wa_api::ErrorCode;
        let name: SessionName = req
            .name
            .parse()
            .map_err(|e: wa_api::ids::IdError| ApiError::new(ErrorCode::InvalidSessionName, e.to_string()))?;
        let phone_number = req
            .phone_number
            .as_deref()
            .map(str::parse::<PhoneNumber>)
            .transpose()
            .map_err(|e| ApiError::new(ErrorCode::InvalidPhoneNumber, e.to_string()))?;
        let rate_limit = match req.rate_limit {
            Some(r) => {
                if !(1..=6000).contains(&r.messages_per_minute) || !(1..=1000).contains(&r.burst) {
                    return Err(ApiError::new(
                        ErrorCode::ValidationFailed,
                        "rateLimit.messagesPerMinute must be 1-6000 and rateLimit.burst 1-1000",
                    ));
                }
                RateLimitSpec { messages_per_minute: r.messages_per_minute, burst: r.burst }
            }
            None => RateLimitSpec::default(),
        };
        Ok(NewSession { name, engine: req.engine.unwrap_or_default(), phone_number, rate_limit })
    }
}

/// What the directory knows about a session (the public [`Session`] is built from it).
#[derive(Debug, Clone, PartialEq)]
pub struct SessionInfo {
    pub name: SessionName,
    pub namespace: Option<String>,
    pub engine: Engine,
    pub phase: Phase,
    pub ready: bool,
    pub account: Option<Account>,
    pub phone_number: Option<String>,
    pub pair_code: Option<String>,
    pub last_error: Option<String>,
    pub created_at: Option<DateTime<Utc>>,
}

impl SessionInfo {
    pub fn view(&self) -> Session {
        Session {
            name: self.name.to_string(),
            namespace: self.namespace.clone(),
            engine: self.engine,
            phase: self.phase,
            ready: self.ready,
            account: self.account.clone(),
            phone_number: self.phone_number.clone(),
            pair_code: self.pair_code.clone(),
            last_error: self.last_error.clone(),
            created_at: self.created_at,
        }
    }
}

/// The mode the gateway runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Local,
    Kubernetes,
}

#[async_trait]
pub trait SessionDirectory: Send + Sync + 'static {
    fn mode(&self) -> Mode;

    /// The namespace label of per-session metrics and events (`local` in local mode).
    fn namespace(&self) -> &str;

    /// Every session, by name.
    fn list(&self) -> Vec<SessionInfo>;

    fn get(&self, name: &SessionName) -> Option<SessionInfo>;

    /// How to reach the session's pod now: 404 SESSION_NOT_FOUND when there is no such
    /// session, 503 SESSION_NOT_READY (with `Retry-After`) when its pod cannot take requests.
    fn route(&self, name: &SessionName) -> ApiResult<Route>;

    /// Routes of every session whose pod is up (for the metrics collector).
    fn routes(&self) -> Vec<Route>;

    async fn create(&self, new: NewSession) -> ApiResult<SessionInfo>;

    /// Removes the session and stops its pod. The auth state is kept (as with
    /// `retainOnDelete: true`), so re-creating the session reconnects without a scan.
    async fn delete(&self, name: &SessionName) -> ApiResult<()>;

    /// The session whose pod holds this token, from memory.
    fn session_for_token(&self, token: &str) -> Option<SessionName>;

    /// Whether `token` is the pod token of `claimed` (may ask the backend when the token is
    /// not in memory yet, e.g. a Secret the watch has not delivered).
    async fn authenticate_pod(&self, claimed: &SessionName, token: &str) -> bool;

    /// Webhooks declared on the session object (`spec.webhooks`; Kubernetes mode).
    fn spec_webhooks(&self, _name: &SessionName) -> Vec<WebhookSpec> {
        Vec::new()
    }

    /// The signing secret a spec webhook refers to.
    async fn webhook_secret(&self, _name: &SessionName, _secret: &SecretKeyRef) -> Option<String> {
        None
    }

    /// Whether the directory has its initial view (reflectors synced, sessions restored).
    fn is_ready(&self) -> bool {
        true
    }

    /// The latest status reported by or read from a session's pod.
    fn observe(&self, name: &SessionName, observed: Observed);

    /// Stops supervised processes (local mode) before the gateway exits.
    async fn shutdown(&self) {}
}

/// A fresh fact about a session's pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Observed {
    /// The pod's full status (collector, long poll, sandbox answers).
    Status(PodStatus),
    /// A state event, and when it happened.
    Phase { phase: Phase, account: Option<Account>, at: DateTime<Utc> },
    /// The pod did not answer.
    Unreachable,
}

/// The last status seen from each pod: what the directories add to their own view.
#[derive(Debug, Default)]
pub struct StatusBoard {
    inner: RwLock<HashMap<SessionName, BoardEntry>>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct BoardEntry {
    pub phase: Option<Phase>,
    pub account: Option<Account>,
    pub pair_code: Option<String>,
    pub last_error: Option<String>,
    pub version: u64,
    /// When the pod's current phase began (from its status or the latest state event).
    pub since: Option<DateTime<Utc>>,
    pub reachable: bool,
}

impl StatusBoard {
    /// Records what was observed, unless it is older than what is known: answers of
    /// concurrent calls (a long poll, the collector, a sandbox call) and events can arrive
    /// out of order, and a stale one must not move the phase back.
    pub fn apply(&self, name: &SessionName, observed: Observed) {
        let Ok(mut map) = self.inner.write() else { return };
        let entry = map.entry(name.clone()).or_default();
        match observed {
            Observed::Status(s) => {
                let newer = !entry.reachable
                    || s.version >= entry.version
                    || entry.since.is_none_or(|known| s.since > known);
                if !newer {
                    return;
                }
                entry.phase = Some(s.phase);
                entry.account = s.account;
                entry.pair_code = s.pair_code;
                entry.last_error = s.last_error;
                entry.version = s.version;
                entry.since = Some(s.since);
                entry.reachable = true;
            }
            Observed::Phase { phase, account, at } => {
                if entry.since.is_some_and(|known| at < known) {
                    return;
                }
                entry.phase = Some(phase);
                entry.since = Some(at);
                if account.is_some() || !phase.is_paired() {
                    entry.account = account;
                }
                if phase != Phase::AwaitingScan {
                    entry.pair_code = None;
                }
            }
            // A restarted pod counts its versions from the start again.
            Observed::Unreachable => entry.reachable = false,
        }
    }

    pub fn get(&self, name: &SessionName) -> Option<BoardEntry> {
        self.inner.read().ok().and_then(|m| m.get(name).cloned())
    }

    pub fn remove(&self, name: &SessionName) {
        if let Ok(mut map) = self.inner.write() {
            map.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::RateLimit;
    use wa_api::ErrorCode;

    fn check(req: serde_json::Value, expected: Result<(), ErrorCode>) {
        let req: CreateSession = serde_json::from_value(req.clone()).unwrap();
        let got = NewSession::validate(req.clone()).map(|_| ()).map_err(|e| e.code);
        assert_eq!(got, expected, "{req:?}");
    }

    #[test]
    fn create_validation_table() {
        use serde_json::json;
        check(json!({"name": "support"}), Ok(()));
        check(json!({"name": "support", "engine": "sandbox", "phoneNumber": "+15551234567"}), Ok(()));
        check(json!({"name": "Support"}), Err(ErrorCode::InvalidSessionName));
        check(json!({"name": "../etc"}), Err(ErrorCode::InvalidSessionName));
        check(json!({"name": ""}), Err(ErrorCode::InvalidSessionName));
        check(json!({"name": "a", "phoneNumber": "555"}), Err(ErrorCode::InvalidPhoneNumber));
        check(json!({"name": "a", "rateLimit": {"messagesPerMinute": 0, "burst": 1}}), Err(ErrorCode::ValidationFailed));
        check(json!({"name": "a", "rateLimit": {"messagesPerMinute": 60, "burst": 1001}}), Err(ErrorCode::ValidationFailed));
        let ok = NewSession::validate(CreateSession {
            name: "a".into(),
            engine: None,
            phone_number: None,
            rate_limit: Some(RateLimit { messages_per_minute: 600, burst: 50 }),
        })
        .unwrap();
        assert_eq!(ok.engine, Engine::Whatsapp, "whatsapp is the default engine");
        assert_eq!(ok.rate_limit.messages_per_minute, 600);
    }

    #[test]
    fn board_keeps_latest_and_clears_pair_code_when_paired() {
        let board = StatusBoard::default();
        let n: SessionName = "a".parse().unwrap();
        board.apply(&n, Observed::Status(PodStatus {
            session: "a".into(),
            engine: Engine::Sandbox,
            phase: Phase::AwaitingScan,
            account: None,
            since: Utc::now(),
            last_error: None,
            pair_code: Some("ABCD1234".into()),
            version: 3,
        }));
        assert_eq!(board.get(&n).unwrap().pair_code.as_deref(), Some("ABCD1234"));
        let account = Account { jid: "1@s.whatsapp.net".into(), push_name: None };
        board.apply(&n, Observed::Phase { phase: Phase::Connected, account: Some(account.clone()), at: Utc::now() });
        let e = board.get(&n).unwrap();
        assert_eq!((e.phase, e.pair_code, e.account), (Some(Phase::Connected), None, Some(account)));
        // A stale answer (lower version, older phase) does not move the phase back.
        let stale = PodStatus {
            session: "a".into(),
            engine: Engine::Sandbox,
            phase: Phase::AwaitingScan,
            account: None,
            since: Utc::now() - chrono::Duration::seconds(60),
            last_error: None,
            pair_code: None,
            version: 2,
        };
        board.apply(&n, Observed::Status(PodStatus { version: 4, since: Utc::now(), phase: Phase::Connected, ..stale.clone() }));
        board.apply(&n, Observed::Status(stale.clone()));
        assert_eq!(board.get(&n).unwrap().phase, Some(Phase::Connected));
        board.apply(&n, Observed::Phase { phase: Phase::AwaitingScan, account: None, at: Utc::now() - chrono::Duration::seconds(30) });
        assert_eq!(board.get(&n).unwrap().phase, Some(Phase::Connected), "an old event is stale too");
        board.apply(&n, Observed::Unreachable);
        assert!(!board.get(&n).unwrap().reachable);
        // After the pod was unreachable (restarted), its fresh, lower version counts.
        board.apply(&n, Observed::Status(PodStatus { version: 1, since: Utc::now(), ..stale.clone() }));
        assert_eq!(board.get(&n).unwrap().phase, Some(Phase::AwaitingScan));
        board.remove(&n);
        assert!(board.get(&n).is_none());
    }
}
