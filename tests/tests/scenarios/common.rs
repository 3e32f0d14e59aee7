//! What the scenarios share: session manifests, waits on session phases (from a watch, so
//! no phase is missed), the gateway calls a user makes, and a webhook receiver that checks
//! signatures the way an integrator's server would.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use futures::StreamExt as _;
use hmac::{Hmac, Mac};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::Api;
use kube::runtime::{WatchStreamExt as _, watcher};
use reqwest::Method;
use serde_json::{Value, json};
use sha2::Sha256;
use wa_api::WhatsAppSession;
use wa_tests::Stack;
use wa_tests::process::wait_until;

/// A step a user would wait for: pods start, sessions connect.
pub const STEP: Duration = Duration::from_secs(60);

/// Runs a scenario's body with a time limit, so a hang fails with diagnostics instead of
/// being killed by the test runner without them.
pub async fn within(limit: Duration, body: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::time::timeout(limit, body).await.unwrap_or_else(|_| Err(anyhow::anyhow!("the scenario did not finish within {limit:?}")))
}

/// Logs a scenario's progress (shown with the test's output when it fails).
pub fn step(what: &str) {
    eprintln!("{} {what}", chrono::Utc::now().format("%H:%M:%S%.3f"));
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// A file of `examples/`.
pub fn example_path(name: &str) -> String {
    repo_root().join("examples").join(name).display().to_string()
}

/// A sandbox session manifest (YAML), one document.
pub fn sandbox_manifest(name: &str) -> String {
    format!("apiVersion: wa-operator.dev/v1alpha1\nkind: WhatsAppSession\nmetadata:\n  name: {name}\nspec:\n  engine: sandbox\n")
}

pub fn sessions(stack: &Stack) -> Api<WhatsAppSession> {
    Api::namespaced(stack.client(), stack.namespace())
}

pub fn pods(stack: &Stack) -> Api<Pod> {
    Api::namespaced(stack.client(), stack.namespace())
}

pub fn pvcs(stack: &Stack) -> Api<PersistentVolumeClaim> {
    Api::namespaced(stack.client(), stack.namespace())
}

pub fn uid<K: kube::Resource>(obj: &K) -> String {
    obj.meta().uid.clone().unwrap_or_default()
}

/// Every phase each session object went through, in resourceVersion order, from a watch.
/// Waiting on it cannot mistake an old `Connected` for a new one, and it shows whether a
/// session passed through `AwaitingScan` (a new scan) on its way.
pub struct PhaseLog {
    seen: Arc<Mutex<Vec<(String, String, String)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl PhaseLog {
    pub async fn start(stack: &Stack) -> Self {
        let seen: Arc<Mutex<Vec<(String, String, String)>>> = Arc::default();
        let api = sessions(stack);
        let task = {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut last: BTreeMap<String, String> = BTreeMap::new();
                // Backoff: see wa_tests::census (a watcher must not spin once the API is gone).
                let mut stream = std::pin::pin!(watcher(api, watcher::Config::default()).default_backoff());
                while let Some(event) = stream.next().await {
                    let (Ok(watcher::Event::Apply(s)) | Ok(watcher::Event::InitApply(s))) = event else { continue };
                    let name = s.metadata.name.clone().unwrap_or_default();
                    let uid = uid(&s);
                    let phase = s.status.as_ref().and_then(|st| st.phase).map(|p| p.to_string()).unwrap_or_default();
                    let key = format!("{name}/{uid}");
                    if last.get(&key) != Some(&phase) {
                        last.insert(key, phase.clone());
                        seen.lock().unwrap().push((name, uid, phase));
                    }
                }
            })
        };
        Self { seen, task }
    }

    /// A mark: phases recorded after it are "new".
    pub fn mark(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// Phases of `name` recorded after `mark`, in order.
    pub fn since(&self, mark: usize, name: &str) -> Vec<String> {
        self.seen.lock().unwrap()[mark..].iter().filter(|(n, _, _)| n == name).map(|(_, _, p)| p.clone()).collect()
    }

    /// Waits until `name` reaches `phase` after `mark`; returns the phases it went through.
    pub async fn wait(&self, mark: usize, name: &str, phase: &str, timeout: Duration) -> anyhow::Result<Vec<String>> {
        wait_until(timeout, &format!("wa/{name} to reach {phase}"), || {
            let phases = self.since(mark, name);
            async move { phases.iter().any(|p| p == phase).then_some(phases) }
        })
        .await
        .with_context(|| format!("phases of {name} so far: {:?}", self.since(mark, name)))
    }
}

impl Drop for PhaseLog {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The session's pod once it exists and is Ready; with `not_uid`, a pod other than that one.
pub async fn ready_pod(stack: &Stack, session: &str, not_uid: Option<&str>) -> anyhow::Result<Pod> {
    let api = pods(stack);
    let name = format!("wa-{session}");
    wait_until(STEP, &format!("a ready pod {name}"), || {
        let api = api.clone();
        let name = name.clone();
        async move {
            let pod = api.get_opt(&name).await.ok()??;
            if not_uid.is_some_and(|u| u == uid(&pod)) || pod.metadata.deletion_timestamp.is_some() {
                return None;
            }
            let ready = pod.status.as_ref()?.conditions.as_ref()?.iter().any(|c| c.type_ == "Ready" && c.status == "True");
            ready.then_some(pod)
        }
    })
    .await
}

/// `kubectl delete pod <name> --wait=false`. Without `--wait=false`, kubectl can wait until
/// its timeout: it waits for the deletion of the pod's uid by listing and then watching the
/// name, and when the operator's replacement (same name) already exists at that list, the
/// deletion is never seen. The pod runner stops a session pod in milliseconds, which makes
/// that window likely here; callers wait for the replacement themselves.
pub async fn delete_pod(stack: &Stack, name: &str) -> anyhow::Result<()> {
    let out = stack.kubectl().ok(&["delete", "pod", name, "--wait=false"]).await?;
    ensure!(out.contains("deleted"), "kubectl delete pod {name}: {out}");
    Ok(())
}

/// Waits until the session's pod is gone.
pub async fn pod_gone(stack: &Stack, session: &str) -> anyhow::Result<()> {
    let api = pods(stack);
    let name = format!("wa-{session}");
    wait_until(STEP, &format!("pod {name} to be gone"), || {
        let api = api.clone();
        let name = name.clone();
        async move { matches!(api.get_opt(&name).await, Ok(None)).then_some(()) }
    })
    .await
}

/// The gateway's view of a session once it is `phase` and routable (`ready`).
pub async fn gateway_session(stack: &Stack, session: &str, phase: &str) -> anyhow::Result<Value> {
    wait_until(STEP, &format!("the gateway to show {session} {phase} and ready"), || async {
        let (code, body) = stack.gateway.get(&format!("/v1/sessions/{session}")).await.ok()?;
        (code == StatusCode::OK && body["phase"] == phase && body["ready"] == true).then_some(body)
    })
    .await
}

/// The QR code a session shows, through the gateway (`Accept: application/json`).
pub async fn qr_code(stack: &Stack, session: &str) -> anyhow::Result<String> {
    gateway_session(stack, session, "AwaitingScan").await?;
    let request = stack.gateway.request(Method::GET, &format!("/v1/sessions/{session}/qr")).header("accept", "application/json");
    let (code, body) = stack.gateway.call(request).await?;
    ensure!(code == StatusCode::OK, "GET /v1/sessions/{session}/qr: {code} {body}");
    body["code"].as_str().map(str::to_owned).context(format!("no code in the QR answer {body}"))
}

/// Scans a sandbox session's QR code through the gateway's admin sandbox route. QR codes
/// rotate; like a person with a phone, it scans the new code when the one it read expired.
pub async fn sandbox_scan(stack: &Stack, session: &str) -> anyhow::Result<()> {
    let mut last = String::new();
    for _ in 0..3 {
        let code = qr_code(stack, session).await?;
        let (status, body) = stack
            .gateway
            .post(&format!("/v1/sessions/{session}/sandbox/scan"), &json!({"code": code, "pushName": "Scenario"}))
            .await?;
        if status == StatusCode::OK {
            return Ok(());
        }
        last = format!("{status} {body}");
    }
    bail!("sandbox scan of {session} failed three times; last answer: {last}")
}

/// `kubectl wait --for=condition=Connected wa/<session>`.
pub async fn kubectl_wait_connected(stack: &Stack, session: &str) -> anyhow::Result<()> {
    stack
        .kubectl()
        .ok(&["wait", "--for=condition=Connected", &format!("wa/{session}"), "--timeout=60s"])
        .await
        .map(drop)
}

/// A text send through the gateway: 201 with the message's id.
pub async fn send_text(stack: &Stack, session: &str, to: &str, text: &str) -> anyhow::Result<String> {
    let (status, body) = stack
        .gateway
        .post(&format!("/v1/sessions/{session}/messages"), &json!({"to": to, "type": "text", "text": text}))
        .await?;
    ensure!(status == StatusCode::CREATED, "send through the gateway from {session}: {status} {body}");
    body["id"].as_str().filter(|id| !id.is_empty()).map(str::to_owned).context(format!("no id in {body}"))
}

/// Waits until the gateway shows message `id` as delivered (or read, which comes after).
pub async fn wait_delivered(stack: &Stack, id: &str) -> anyhow::Result<Value> {
    wait_until(STEP, &format!("message {id} to be delivered"), || async {
        let (code, body) = stack.gateway.get(&format!("/v1/messages/{id}")).await.ok()?;
        (code == StatusCode::OK && matches!(body["status"].as_str(), Some("delivered" | "read"))).then_some(body)
    })
    .await
}

/// Applies the sandbox example, scans it, and waits for Connected: the start of most
/// scenarios. Returns the account's JID.
pub async fn connect_sandbox_example(stack: &Stack, phases: &PhaseLog) -> anyhow::Result<String> {
    let mark = phases.mark();
    let out = stack.kubectl().ok(&["apply", "-f", &example_path("session-sandbox.yaml")]).await?;
    ensure!(out.contains("whatsappsession.wa-operator.dev/sandbox created"), "kubectl apply printed {out:?}");
    phases.wait(mark, "sandbox", "AwaitingScan", STEP).await?;
    sandbox_scan(stack, "sandbox").await?;
    kubectl_wait_connected(stack, "sandbox").await?;
    let session = sessions(stack).get("sandbox").await?;
    session
        .status
        .and_then(|s| s.account)
        .map(|a| a.jid)
        .context("a Connected session shows its account")
}

// ---- webhooks ------------------------------------------------------------------------------

/// One POST the receiver got.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Delivery {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// An integrator's webhook endpoint: a local HTTP server that records every POST and
/// answers 204.
pub struct WebhookReceiver {
    pub url: String,
    got: Arc<Mutex<Vec<Delivery>>>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl WebhookReceiver {
    pub async fn start() -> Self {
        let got: Arc<Mutex<Vec<Delivery>>> = Arc::default();
        let app = {
            let got = got.clone();
            axum::Router::new().route(
                "/hook",
                axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                    let got = got.clone();
                    async move {
                        got.lock().unwrap().push(Delivery { headers, body });
                        StatusCode::NO_CONTENT
                    }
                }),
            )
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).with_graceful_shutdown(async { let _ = stopped.await; }).await;
        });
        Self { url, got, _stop: stop }
    }

    pub fn deliveries(&self) -> Vec<Delivery> {
        self.got.lock().unwrap().clone()
    }

    /// Waits for a delivery `matches` accepts.
    pub async fn wait_for(&self, what: &str, matches: impl Fn(&Delivery) -> bool) -> anyhow::Result<Delivery> {
        wait_until(STEP, what, || {
            let found = self.deliveries().into_iter().find(|d| matches(d));
            async move { found }
        })
        .await
        .with_context(|| {
            let seen: Vec<String> = self.deliveries().iter().map(|d| String::from_utf8_lossy(&d.body).into_owned()).collect();
            format!("webhook deliveries so far: {seen:#?}")
        })
    }
}

/// Checks `X-Wa-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>` as
/// the gateway documents it, with a five-minute tolerance on `t`.
pub fn signature_is_valid(secret: &str, header: Option<&str>, body: &[u8]) -> bool {
    let Some(header) = header else { return false };
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", t)) => timestamp = t.parse::<i64>().ok(),
            Some(("v1", v)) => signatures.extend(hex::decode(v).ok()),
            _ => {}
        }
    }
    let Some(t) = timestamp else { return false };
    let now = chrono::Utc::now().timestamp();
    if (now - t).abs() > 300 {
        return false;
    }
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else { return false };
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    let expected = mac.finalize().into_bytes();
    signatures.iter().any(|s| s.as_slice() == expected.as_slice())
}

/// A signed delivery checks out, and the same check refuses a changed body or another key
/// (so a pass means something).
pub fn assert_signed(secret: &str, delivery: &Delivery) -> anyhow::Result<()> {
    let header = delivery.header("x-wa-signature");
    ensure!(signature_is_valid(secret, header, &delivery.body), "bad signature {header:?} on {:?}", delivery.body);
    let mut tampered = delivery.body.to_vec();
    tampered.push(b' ');
    if signature_is_valid(secret, header, &tampered) || signature_is_valid("another-secret-entirely", header, &delivery.body) {
        bail!("the signature check accepts what it must refuse");
    }
    Ok(())
}
