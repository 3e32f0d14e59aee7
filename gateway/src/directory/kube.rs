//! Kubernetes mode: sessions are `WhatsAppSession` objects in one namespace. Three
//! reflectors keep the route table in memory: the session objects, their Pods (label
//! `wa-operator.dev/session`) and the pod token Secrets (`wa-<name>-token`, key `token`).
//! A request reads the pod's IP and token from memory and calls `http://<podIP>:8080`.
//!
//! The gateway never writes session status (the operator is its only writer); it creates
//! and deletes session objects for `POST`/`DELETE /v1/sessions`, and reads the Secrets that
//! spec webhooks name for their signing keys.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{DeleteParams, ObjectMeta, PostParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tracing::{info, warn};
use wa_api::crd::{SecretKeyRef, WebhookSpec};
use wa_api::names::{LABEL_SESSION, POD_PORT, SECRET_TOKEN_KEY, pod_name, secret_name};
use wa_api::{ErrorCode, Phase, SessionName, WhatsAppSession, WhatsAppSessionSpec};

use super::{Mode, NewSession, Observed, Route, SessionDirectory, SessionInfo, StatusBoard};
use crate::error::{ApiError, ApiResult};

pub struct KubeDirectory {
    client: Client,
    namespace: String,
    sessions: Store<WhatsAppSession>,
    pods: Store<Pod>,
    secrets: Store<Secret>,
    board: Arc<StatusBoard>,
    synced: Arc<AtomicBool>,
    /// Signing secrets of spec webhooks, read on demand, kept briefly.
    secret_cache: RwLock<HashMap<(String, String), (Instant, Option<String>)>>,
}

/// Why a session's pod cannot take requests (for the 503 message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotReady {
    NoPod,
    PodTerminating,
    PodNotReady,
    NoPodIp,
    NoToken,
}

impl NotReady {
    fn describe(self) -> &'static str {
        match self {
            NotReady::NoPod => "it has no pod yet",
            NotReady::PodTerminating => "its pod is terminating",
            NotReady::PodNotReady => "its pod is not ready",
            NotReady::NoPodIp => "its pod has no IP yet",
            NotReady::NoToken => "its token Secret is not available yet",
        }
    }
}

/// The route to a session's pod from the objects that describe it. Pure, so the rules are
/// tested with plain data.
pub fn route_for(name: &SessionName, pod: Option<&Pod>, secret: Option<&Secret>) -> Result<Route, NotReady> {
    let pod = pod.ok_or(NotReady::NoPod)?;
    if pod.metadata.deletion_timestamp.is_some() {
        return Err(NotReady::PodTerminating);
    }
    let status = pod.status.as_ref().ok_or(NotReady::PodNotReady)?;
    let ready = status
        .conditions
        .as_ref()
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    if !ready {
        return Err(NotReady::PodNotReady);
    }
    let ip = status.pod_ip.as_deref().filter(|ip| !ip.is_empty()).ok_or(NotReady::NoPodIp)?;
    let token = secret.and_then(token_of).ok_or(NotReady::NoToken)?;
    let host = if ip.contains(':') { format!("[{ip}]") } else { ip.to_owned() };
    Ok(Route { session: name.clone(), base_url: format!("http://{host}:{POD_PORT}"), token })
}

fn token_of(secret: &Secret) -> Option<String> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(SECRET_TOKEN_KEY))
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
        .or_else(|| secret.string_data.as_ref().and_then(|d| d.get(SECRET_TOKEN_KEY).cloned()))
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
}

/// Whether a Secret is a session's pod token Secret (`wa-<name>-token`).
fn is_token_secret(name: &str) -> bool {
    name.strip_prefix("wa-")
        .and_then(|rest| rest.strip_suffix("-token"))
        .is_some_and(|session| session.parse::<SessionName>().is_ok())
}

/// The object `POST /v1/sessions` creates.
pub fn session_object(new: &NewSession, namespace: &str) -> WhatsAppSession {
    let spec = WhatsAppSessionSpec {
        engine: new.engine,
        phone_number: new.phone_number.as_ref().map(|p| p.to_string()),
        suspend: false,
        logout_on_delete: false,
        storage: Default::default(),
        resources: None,
        image: None,
        rate_limit: new.rate_limit.clone(),
        webhooks: Vec::new(),
    };
    let mut obj = WhatsAppSession::new(new.name.as_str(), spec);
    obj.metadata = ObjectMeta {
        name: Some(new.name.to_string()),
        namespace: Some(namespace.to_owned()),
        labels: Some([("app.kubernetes.io/created-by".to_owned(), "wa-gateway".to_owned())].into()),
        ..Default::default()
    };
    obj
}

/// The directory's view of a session object, given its route and what its pod last said.
pub fn info_for(obj: &WhatsAppSession, route: &Result<Route, NotReady>, board: Option<super::BoardEntry>) -> Option<SessionInfo> {
    let name: SessionName = obj.name_any().parse().ok()?;
    let status = obj.status.clone().unwrap_or_default();
    let ready = route.is_ok();
    let board = board.filter(|b| ready && b.phase.is_some());
    let phase = match (&board, status.phase) {
        (Some(b), _) => b.phase.unwrap_or(Phase::Pending),
        (None, Some(p)) => p,
        (None, None) => Phase::Pending,
    };
    let account = board.as_ref().and_then(|b| b.account.clone()).or(status.account.clone());
    Some(SessionInfo {
        name,
        namespace: obj.namespace(),
        engine: obj.spec.engine,
        phase,
        ready,
        account,
        phone_number: obj.spec.phone_number.clone(),
        pair_code: board.as_ref().and_then(|b| b.pair_code.clone()),
        last_error: board.and_then(|b| b.last_error).or(status.message),
        created_at: obj.metadata.creation_timestamp.as_ref().map(|t| crate::util::to_time(t.0.as_millisecond())),
    })
}

impl KubeDirectory {
    /// Starts the reflectors; [`SessionDirectory::is_ready`] turns true once all three have
    /// listed their objects.
    pub fn start(client: Client, namespace: String, board: Arc<StatusBoard>) -> Arc<Self> {
        let sessions_api: Api<WhatsAppSession> = Api::namespaced(client.clone(), &namespace);
        let pods_api: Api<Pod> = Api::namespaced(client.clone(), &namespace);
        let secrets_api: Api<Secret> = Api::namespaced(client.clone(), &namespace);

        let (sessions, sessions_writer) = reflector::store();
        let (pods, pods_writer) = reflector::store();
        let (secrets, secrets_writer) = reflector::store();

        let sessions_stream = watcher(sessions_api, watcher::Config::default())
            .default_backoff()
            .modify(|s: &mut WhatsAppSession| s.managed_fields_mut().clear())
            .reflect(sessions_writer);
        let pods_stream = watcher(pods_api, watcher::Config::default().labels(LABEL_SESSION))
            .default_backoff()
            .modify(|p: &mut Pod| {
                // Keep what routing needs; a pod spec is large and never read here.
                p.managed_fields_mut().clear();
                p.spec = None;
            })
            .reflect(pods_writer);
        // Only the operator's Secrets (labelled with their session, like the pods): the
        // other Secrets of the namespace never reach this process. Of those, only token
        // Secrets are kept, and only their token key.
        let secrets_stream = watcher(secrets_api, watcher::Config::default().labels(LABEL_SESSION))
            .default_backoff()
            .try_filter(|e| {
                let keep = match e {
                    watcher::Event::Apply(s) | watcher::Event::InitApply(s) | watcher::Event::Delete(s) => {
                        is_token_secret(&s.name_any())
                    }
                    watcher::Event::Init | watcher::Event::InitDone => true,
                };
                futures::future::ready(keep)
            })
            .modify(|s: &mut Secret| {
                s.managed_fields_mut().clear();
                if let Some(data) = s.data.as_mut() {
                    data.retain(|k, _| k == SECRET_TOKEN_KEY);
                }
                s.metadata.annotations = None;
            })
            .reflect(secrets_writer);

        tokio::spawn(drive("whatsappsessions", sessions_stream));
        tokio::spawn(drive("pods", pods_stream));
        tokio::spawn(drive("secrets", secrets_stream));

        let synced = Arc::new(AtomicBool::new(false));
        {
            let (s, p, t, synced) = (sessions.clone(), pods.clone(), secrets.clone(), synced.clone());
            tokio::spawn(async move {
                let _ = futures::future::join3(s.wait_until_ready(), p.wait_until_ready(), t.wait_until_ready()).await;
                synced.store(true, Ordering::SeqCst);
                info!("session, pod and secret caches are synced");
            });
        }
        Arc::new(KubeDirectory {
            client,
            namespace,
            sessions,
            pods,
            secrets,
            board,
            synced,
            secret_cache: RwLock::new(HashMap::new()),
        })
    }

    fn object(&self, name: &SessionName) -> Option<Arc<WhatsAppSession>> {
        self.sessions
            .get(&ObjectRef::new(name.as_str()).within(&self.namespace))
            .filter(|s| s.metadata.deletion_timestamp.is_none())
    }

    fn route_of(&self, name: &SessionName) -> Result<Route, NotReady> {
        let pod = self.pods.get(&ObjectRef::new(&pod_name(name.as_str())).within(&self.namespace));
        let secret = self.secrets.get(&ObjectRef::new(&secret_name(name.as_str())).within(&self.namespace));
        route_for(name, pod.as_deref(), secret.as_deref())
    }

    fn info(&self, obj: &WhatsAppSession) -> Option<SessionInfo> {
        let name: SessionName = obj.name_any().parse().ok()?;
        info_for(obj, &self.route_of(&name), self.board.get(&name))
    }

    async fn read_secret_key(&self, secret: &str, key: &str) -> Option<String> {
        let cache_key = (secret.to_owned(), key.to_owned());
        if let Ok(cache) = self.secret_cache.read() {
            if let Some((at, value)) = cache.get(&cache_key) {
                if at.elapsed() < Duration::from_secs(30) {
                    return value.clone();
                }
            }
        }
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let value = match api.get_opt(secret).await {
            Ok(s) => s.and_then(|s| {
                s.data
                    .and_then(|d| d.get(key).and_then(|b| String::from_utf8(b.0.clone()).ok()))
                    .or_else(|| s.string_data.and_then(|d| d.get(key).cloned()))
            }),
            Err(e) => {
                warn!(error = %e, secret, "reading a Secret failed");
                return None;
            }
        };
        if let Ok(mut cache) = self.secret_cache.write() {
            cache.insert(cache_key, (Instant::now(), value.clone()));
        }
        value
    }
}

async fn drive<S, T>(what: &'static str, stream: S)
where
    S: futures::Stream<Item = Result<T, watcher::Error>>,
{
    futures::pin_mut!(stream);
    while let Some(item) = stream.next().await {
        if let Err(e) = item {
            warn!(error = %e, resource = what, "watch failed; retrying with backoff");
        }
    }
}

fn kube_error(e: kube::Error, name: &str) -> ApiError {
    match &e {
        kube::Error::Api(s) if s.code == 409 => {
            ApiError::new(ErrorCode::SessionExists, format!("session {name:?} already exists"))
        }
        kube::Error::Api(s) if s.code == 404 => ApiError::session_not_found(name),
        kube::Error::Api(s) if s.code == 422 || s.code == 400 => {
            ApiError::new(ErrorCode::ValidationFailed, format!("the Kubernetes API refused the session: {}", s.message))
        }
        _ => {
            warn!(error = %e, "Kubernetes API call failed");
            ApiError::unavailable("the Kubernetes API is unavailable; try again shortly")
        }
    }
}

#[async_trait]
impl SessionDirectory for KubeDirectory {
    fn mode(&self) -> Mode {
        Mode::Kubernetes
    }

    fn namespace(&self) -> &str {
        &self.namespace
    }

    fn list(&self) -> Vec<SessionInfo> {
        let mut all: Vec<_> = self
            .sessions
            .state()
            .iter()
            .filter(|s| s.metadata.deletion_timestamp.is_none())
            .filter_map(|s| self.info(s))
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    fn get(&self, name: &SessionName) -> Option<SessionInfo> {
        self.object(name).and_then(|o| self.info(&o))
    }

    fn route(&self, name: &SessionName) -> ApiResult<Route> {
        if self.object(name).is_none() {
            return Err(ApiError::session_not_found(name.as_str()));
        }
        self.route_of(name).map_err(|why| ApiError::not_ready(name.as_str(), why.describe()))
    }

    fn routes(&self) -> Vec<Route> {
        self.sessions
            .state()
            .iter()
            .filter_map(|s| s.name_any().parse::<SessionName>().ok())
            .filter_map(|n| self.route_of(&n).ok())
            .collect()
    }

    async fn create(&self, new: NewSession) -> ApiResult<SessionInfo> {
        let api: Api<WhatsAppSession> = Api::namespaced(self.client.clone(), &self.namespace);
        let created = api
            .create(&PostParams::default(), &session_object(&new, &self.namespace))
            .await
            .map_err(|e| kube_error(e, new.name.as_str()))?;
        // The reflector sees the object a moment later; wait briefly so that a GET right
        // after the create finds it.
        for _ in 0..100 {
            if self.object(&new.name).is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        info_for(&created, &Err(NotReady::NoPod), None)
            .ok_or_else(|| ApiError::internal("creating a session", "the API server returned an unnamed object"))
    }

    async fn delete(&self, name: &SessionName) -> ApiResult<()> {
        let api: Api<WhatsAppSession> = Api::namespaced(self.client.clone(), &self.namespace);
        api.delete(name.as_str(), &DeleteParams::default())
            .await
            .map_err(|e| kube_error(e, name.as_str()))?;
        self.board.remove(name);
        Ok(())
    }

    fn session_for_token(&self, token: &str) -> Option<SessionName> {
        use subtle::ConstantTimeEq;
        let mut found = None;
        for secret in self.secrets.state() {
            let Some(expected) = token_of(&secret) else { continue };
            if bool::from(expected.as_bytes().ct_eq(token.as_bytes())) {
                let name = secret.name_any();
                found = name.strip_prefix("wa-").and_then(|n| n.strip_suffix("-token")).and_then(|n| n.parse().ok());
            }
        }
        found
    }

    async fn authenticate_pod(&self, claimed: &SessionName, token: &str) -> bool {
        use subtle::ConstantTimeEq;
        let secret = secret_name(claimed.as_str());
        let expected = match self.secrets.get(&ObjectRef::new(&secret).within(&self.namespace)) {
            Some(s) => token_of(&s),
            // Not in the cache yet (a pod that started before the watch caught up).
            None => self.read_secret_key(&secret, SECRET_TOKEN_KEY).await,
        };
        expected.is_some_and(|e| bool::from(e.as_bytes().ct_eq(token.as_bytes())))
    }

    fn spec_webhooks(&self, name: &SessionName) -> Vec<WebhookSpec> {
        self.object(name).map(|o| o.spec.webhooks.clone()).unwrap_or_default()
    }

    async fn webhook_secret(&self, _name: &SessionName, secret: &SecretKeyRef) -> Option<String> {
        self.read_secret_key(&secret.name, &secret.key).await
    }

    fn is_ready(&self) -> bool {
        self.synced.load(Ordering::SeqCst)
    }

    fn observe(&self, name: &SessionName, observed: Observed) {
        self.board.apply(name, observed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::{PodCondition, PodStatus};

    fn pod(ready: bool, ip: Option<&str>) -> Pod {
        Pod {
            status: Some(PodStatus {
                pod_ip: ip.map(str::to_owned),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn secret(token: &str) -> Secret {
        Secret {
            data: Some([(SECRET_TOKEN_KEY.to_owned(), ByteString(token.as_bytes().to_vec()))].into()),
            ..Default::default()
        }
    }

    fn check(pod: Option<Pod>, secret: Option<Secret>, expected: Result<&str, NotReady>) {
        let name: SessionName = "a".parse().unwrap();
        let got = route_for(&name, pod.as_ref(), secret.as_ref()).map(|r| r.base_url);
        assert_eq!(got.as_deref().map_err(|e| *e), expected);
    }

    #[test]
    fn route_table() {
        check(Some(pod(true, Some("10.0.0.7"))), Some(secret("t")), Ok("http://10.0.0.7:8080"));
        check(Some(pod(true, Some("fd00::7"))), Some(secret("t")), Ok("http://[fd00::7]:8080"));
        check(None, Some(secret("t")), Err(NotReady::NoPod));
        check(Some(pod(false, Some("10.0.0.7"))), Some(secret("t")), Err(NotReady::PodNotReady));
        check(Some(pod(true, None)), Some(secret("t")), Err(NotReady::NoPodIp));
        check(Some(pod(true, Some("10.0.0.7"))), None, Err(NotReady::NoToken));
        check(Some(pod(true, Some("10.0.0.7"))), Some(secret("  ")), Err(NotReady::NoToken));
        let mut terminating = pod(true, Some("10.0.0.7"));
        terminating.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()));
        check(Some(terminating), Some(secret("t")), Err(NotReady::PodTerminating));
        let route = route_for(&"a".parse().unwrap(), Some(&pod(true, Some("10.0.0.7"))), Some(&secret("tok\n"))).unwrap();
        assert_eq!(route.token, "tok");
    }

    #[test]
    fn token_secret_names() {
        assert!(is_token_secret("wa-support-token"));
        assert!(is_token_secret("wa-a-token"));
        assert!(!is_token_secret("wa-support-auth"));
        assert!(!is_token_secret("webhook-secret"));
        assert!(!is_token_secret("wa--token"));
    }

    #[test]
    fn created_object_carries_the_request() {
        let new = NewSession {
            name: "support".parse().unwrap(),
            engine: wa_api::Engine::Sandbox,
            phone_number: Some("+15551234567".parse().unwrap()),
            rate_limit: wa_api::crd::RateLimitSpec { messages_per_minute: 60, burst: 10 },
        };
        let obj = session_object(&new, "whatsapp");
        assert_eq!(obj.metadata.name.as_deref(), Some("support"));
        assert_eq!(obj.metadata.namespace.as_deref(), Some("whatsapp"));
        assert_eq!(obj.spec.engine, wa_api::Engine::Sandbox);
        assert_eq!(obj.spec.phone_number.as_deref(), Some("+15551234567"));
        assert_eq!(obj.spec.rate_limit.messages_per_minute, 60);
        assert!(obj.spec.storage.retain_on_delete);
    }

    #[test]
    fn info_prefers_the_pods_own_word_when_reachable() {
        let mut obj = WhatsAppSession::new("a", serde_json::from_str("{}").unwrap());
        obj.status = Some(wa_api::WhatsAppSessionStatus { phase: Some(Phase::AwaitingScan), ..Default::default() });
        let board = super::super::BoardEntry { phase: Some(Phase::Connected), reachable: true, ..Default::default() };
        let ok_route = Ok(Route { session: "a".parse().unwrap(), base_url: "http://x".into(), token: "t".into() });
        assert_eq!(info_for(&obj, &ok_route, Some(board.clone())).unwrap().phase, Phase::Connected);
        // Without a ready pod, the operator's status is the truth.
        let info = info_for(&obj, &Err(NotReady::NoPod), Some(board)).unwrap();
        assert_eq!((info.phase, info.ready), (Phase::AwaitingScan, false));
        obj.status = None;
        assert_eq!(info_for(&obj, &Err(NotReady::NoPod), None).unwrap().phase, Phase::Pending);
    }
}
