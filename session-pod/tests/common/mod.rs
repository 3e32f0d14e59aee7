//! Helpers for tests that run the real `wa-session` binary: start it on a free port with a
//! temporary data directory, wait until it is ready, talk to it over HTTP, stop it with
//! SIGTERM; and an event sink (a small axum server) standing in for the gateway.
//!
//! Shared by every integration test file of this package (`mod common;`), the whatsapp-engine
//! tests included. Every wait is bounded and fails with the pod's log attached.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde_json::Value;
use tokio::sync::Notify;
use wa_api::crd::Phase;
use wa_api::pod::{EventBatch, PodEvent, PodStatus};

pub const BIN: &str = env!("CARGO_BIN_EXE_wa-session");
pub const TOKEN: &str = "test-token-0123456789";

/// A port nobody listens on right now (bind to 0, read, release).
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// How to start a pod.
#[derive(Debug, Clone)]
pub struct PodOptions {
    pub engine: &'static str,
    /// Reused across restarts; a fresh temporary directory when `None`.
    pub data_dir: Option<PathBuf>,
    pub events_url: Option<String>,
    pub token: String,
    /// Extra flags, e.g. `["--rate-per-minute", "600"]`.
    pub args: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
}

impl PodOptions {
    /// A sandbox pod with fast receipts and a generous rate limit.
    pub fn sandbox() -> Self {
        Self {
            engine: "sandbox",
            data_dir: None,
            events_url: None,
            token: TOKEN.into(),
            args: vec![
                "--sandbox-delivered-ms".into(),
                "150".into(),
                "--sandbox-read-ms".into(),
                "300".into(),
                "--rate-per-minute".into(),
                "6000".into(),
                "--rate-burst".into(),
                "100".into(),
                "--events-retry-max-ms".into(),
                "300".into(),
            ],
            env: Vec::new(),
        }
    }

    pub fn engine(mut self, engine: &'static str) -> Self {
        self.engine = engine;
        self
    }

    pub fn data_dir(mut self, dir: &Path) -> Self {
        self.data_dir = Some(dir.to_owned());
        self
    }

    pub fn events_url(mut self, url: impl Into<String>) -> Self {
        self.events_url = Some(url.into());
        self
    }

    /// Adds flags; a later flag of the same name wins (clap takes the last occurrence).
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }
}

/// A running `wa-session` process; killed on drop.
pub struct Pod {
    pub opts: PodOptions,
    pub addr: SocketAddr,
    pub base: String,
    pub client: reqwest::Client,
    pub data_dir: PathBuf,
    _tmp: Option<Arc<tempfile::TempDir>>,
    child: Option<Child>,
    log_path: PathBuf,
    /// Holds the log file; removed with the `Pod`.
    _log_dir: tempfile::TempDir,
}

impl Pod {
    /// Starts the binary and waits until `/readyz` answers 200.
    pub async fn start(opts: PodOptions) -> Pod {
        let (tmp, data_dir) = match &opts.data_dir {
            Some(d) => (None, d.clone()),
            None => {
                let t = tempfile::tempdir().expect("temp dir");
                let d = t.path().join("data");
                (Some(Arc::new(t)), d)
            }
        };
        Self::start_in(opts, tmp, data_dir).await
    }

    async fn start_in(
        opts: PodOptions,
        tmp: Option<Arc<tempfile::TempDir>>,
        data_dir: PathBuf,
    ) -> Pod {
        // A port taken between `free_port` and the bind makes the process exit; try again.
        for attempt in 0..3 {
            let port = free_port();
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let log_dir = tempfile::tempdir().expect("temp dir for the log");
            let log_path = log_dir.path().join("wa-session.log");
            let log = std::fs::File::create(&log_path).expect("log file");
            let mut cmd = Command::new(BIN);
            cmd.arg("--engine")
                .arg(opts.engine)
                .arg("--data-dir")
                .arg(&data_dir)
                .arg("--listen")
                .arg(addr.to_string())
                .arg("--session")
                .arg("test")
                .arg("--log")
                .arg("info,wa_session=debug")
                .args(&opts.args)
                .env("WA_TOKEN", &opts.token)
                .env_remove("WA_EVENTS_URL")
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log);
            if let Some(url) = &opts.events_url {
                cmd.arg("--events-url").arg(url);
            }
            for (k, v) in &opts.env {
                cmd.env(k, v);
            }
            let child = cmd.spawn().expect("spawn wa-session");
            let mut pod = Pod {
                opts: opts.clone(),
                addr,
                base: format!("http://{addr}"),
                client: reqwest::Client::builder()
                    .timeout(Duration::from_secs(70))
                    .build()
                    .unwrap(),
                data_dir: data_dir.clone(),
                _tmp: tmp.clone(),
                child: Some(child),
                log_path,
                _log_dir: log_dir,
            };
            match pod.wait_ready(Duration::from_secs(15)).await {
                Ok(()) => return pod,
                Err(e) if attempt < 2 && pod.log().contains("cannot listen") => {
                    eprintln!("retrying start: {e}");
                    continue;
                }
                Err(e) => panic!("{e}\n--- pod log ---\n{}", pod.log()),
            }
        }
        unreachable!()
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(format!("wa-session exited before ready: {status}"));
            }
            if let Ok(r) = self.client.get(self.url("/readyz")).send().await
                && r.status() == StatusCode::OK
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("wa-session not ready within {timeout:?}"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The process's output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client
            .get(self.url(path))
            .bearer_auth(&self.opts.token)
    }

    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.client
            .post(self.url(path))
            .bearer_auth(&self.opts.token)
    }

    /// POSTs JSON and returns status and body (JSON, or a string value when not JSON).
    pub async fn post_json(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let r = self.post(path).json(body).send().await.expect("request");
        split(r).await
    }

    pub async fn get_json(&self, path: &str) -> (StatusCode, Value) {
        let r = self.get(path).send().await.expect("request");
        split(r).await
    }

    pub async fn status(&self) -> PodStatus {
        let (code, body) = self.get_json("/v1/status").await;
        assert_eq!(code, StatusCode::OK, "{body}");
        serde_json::from_value(body).expect("PodStatus")
    }

    /// Long-polls `/v1/status` until the phase is `phase`.
    pub async fn wait_phase(&self, phase: Phase, timeout: Duration) -> PodStatus {
        let deadline = Instant::now() + timeout;
        let mut s = self.status().await;
        while s.phase != phase {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!(
                    "phase {phase} not reached in {timeout:?}; status {s:?}\n--- pod log ---\n{}",
                    self.log()
                );
            }
            let wait = left.as_secs().clamp(1, 10);
            let (_, body) = self
                .get_json(&format!(
                    "/v1/status?after={}&waitSeconds={wait}",
                    s.version
                ))
                .await;
            s = serde_json::from_value(body).expect("PodStatus");
        }
        s
    }

    /// Pairs a fresh sandbox session by scanning its current QR code.
    pub async fn pair(&self) -> PodStatus {
        self.wait_phase(Phase::AwaitingScan, Duration::from_secs(5))
            .await;
        let (code, body) = self
            .post_json("/v1/sandbox/scan", &serde_json::json!({}))
            .await;
        assert_eq!(code, StatusCode::OK, "{body}");
        let s: PodStatus = serde_json::from_value(body).unwrap();
        assert_eq!(s.phase, Phase::Connected);
        s
    }

    /// Sends a text message and returns the answer.
    pub async fn send_text(&self, to: &str, text: &str) -> (StatusCode, Value) {
        self.post_json(
            "/v1/messages",
            &serde_json::json!({"to": to, "type": "text", "text": text}),
        )
        .await
    }

    /// SIGTERM, then waits for the exit (killing after `timeout`). Returns the exit status and
    /// how long the stop took.
    pub fn terminate(&mut self, timeout: Duration) -> (Option<ExitStatus>, Duration) {
        let Some(mut child) = self.child.take() else {
            return (None, Duration::ZERO);
        };
        let started = Instant::now();
        // SAFETY-free: `kill` is the portable way to send a signal without extra crates.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = started + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return (Some(status), started.elapsed());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return (None, started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops with SIGTERM (asserting a clean exit within 5 s) and starts again on the same data
    /// directory, with the same options.
    pub async fn restart(mut self) -> Pod {
        let (status, took) = self.terminate(Duration::from_secs(5));
        assert!(
            status.is_some_and(|s| s.success()),
            "pod did not stop cleanly within 5 s ({status:?} after {took:?})\n--- pod log ---\n{}",
            self.log()
        );
        let opts = self.opts.clone();
        let tmp = self._tmp.clone();
        let dir = self.data_dir.clone();
        drop(self);
        Self::start_in(opts, tmp, dir).await
    }

    /// Kills the process without a chance to clean up (a crash).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Status and body of a response; a body that is not JSON comes back as a JSON string.
pub async fn split(r: reqwest::Response) -> (StatusCode, Value) {
    let status = StatusCode::from_u16(r.status().as_u16()).unwrap();
    let text = r.text().await.unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, body)
}

/// The error code of an error answer (`{"error":{"code"}}`), or "" when the shape is wrong.
pub fn error_code(body: &Value) -> &str {
    body.pointer("/error/code")
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// Stands in for the gateway's `/internal/v1/events`: records every batch it acknowledges.
/// Can refuse deliveries (500) on demand, and checks the bearer token.
pub struct EventSink {
    pub addr: SocketAddr,
    pub url: String,
    state: Arc<SinkState>,
    server: Option<tokio::task::JoinHandle<()>>,
}

#[derive(Default)]
struct SinkState {
    events: Mutex<Vec<PodEvent>>,
    /// Deliveries answered with 500 while set.
    failing: Mutex<bool>,
    /// Requests with a wrong or missing token.
    unauthorized: Mutex<u32>,
    changed: Notify,
    token: String,
}

impl EventSink {
    /// A sink on a free port.
    pub async fn start() -> EventSink {
        Self::start_on(free_port()).await
    }

    /// A sink on `port` (e.g. one that pods were pointed at while nothing listened there).
    pub async fn start_on(port: u16) -> EventSink {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind event sink");
        let state = Arc::new(SinkState {
            token: TOKEN.into(),
            ..SinkState::default()
        });
        let app = axum::Router::new()
            .route("/internal/v1/events", post(receive))
            .with_state(state.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        EventSink {
            addr,
            url: format!("http://{addr}/internal/v1/events"),
            state,
            server: Some(server),
        }
    }

    /// The URL a sink on `port` will have.
    pub fn url_for(port: u16) -> String {
        format!("http://127.0.0.1:{port}/internal/v1/events")
    }

    pub fn set_failing(&self, failing: bool) {
        *self.state.failing.lock().unwrap() = failing;
    }

    pub fn events(&self) -> Vec<PodEvent> {
        self.state.events.lock().unwrap().clone()
    }

    pub fn unauthorized(&self) -> u32 {
        *self.state.unauthorized.lock().unwrap()
    }

    /// Waits until `pred` holds for the events received so far; returns them.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&[PodEvent]) -> bool,
    ) -> Vec<PodEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.state.changed.notified();
            let events = self.events();
            if pred(&events) {
                return events;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!(
                    "event sink: {what} did not happen within {timeout:?}; got {} events: {:#?}",
                    events.len(),
                    events
                );
            }
            let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), notified).await;
        }
    }

    /// Stops listening (the port is free again; pods see refused connections).
    pub async fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.abort();
            let _ = s.await;
        }
    }
}

impl Drop for EventSink {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.abort();
        }
    }
}

async fn receive(
    State(state): State<Arc<SinkState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> (StatusCode, String) {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if auth != format!("Bearer {}", state.token) {
        *state.unauthorized.lock().unwrap() += 1;
        return (StatusCode::UNAUTHORIZED, "bad token".into());
    }
    if *state.failing.lock().unwrap() {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "failing on purpose".into(),
        );
    }
    let batch: EventBatch = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("not an EventBatch: {e}")),
    };
    let n = batch.events.len();
    state.events.lock().unwrap().extend(batch.events);
    state.changed.notify_waiters();
    (
        StatusCode::OK,
        format!("{{\"accepted\":{n},\"duplicates\":0}}"),
    )
}

/// Event ids appearing more than once.
pub fn duplicate_ids(events: &[PodEvent]) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    events
        .iter()
        .filter(|e| !seen.insert(e.id.clone()))
        .map(|e| e.id.clone())
        .collect()
}
