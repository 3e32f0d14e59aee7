//! Helpers for tests that run the real `wa-gateway` binary in local mode (it starts real
//! sandbox session processes, `wa-gateway session`), on SQLite or on PostgreSQL.
//!
//! Every wait is bounded and fails with the gateway's log attached. Processes are killed on
//! drop; each PostgreSQL test database is dropped when its guard goes.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde_json::{Value, json};

pub const BIN: &str = env!("CARGO_BIN_EXE_wa-gateway");
pub const ADMIN: &str = "test-admin-key-0123456789";

/// Which database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbKind {
    Sqlite,
    Postgres,
}

/// A database for one test; PostgreSQL databases are created here and dropped on drop.
pub struct TestDb {
    pub kind: DbKind,
    pub url: String,
    pg: Option<(String, String)>,
}

impl TestDb {
    pub fn new(kind: DbKind, dir: &Path) -> TestDb {
        match kind {
            DbKind::Sqlite => TestDb { kind, url: format!("sqlite://{}", dir.join("gateway.db").display()), pg: None },
            DbKind::Postgres => {
                let admin = std::env::var("WA_TEST_POSTGRES_URL")
                    .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
                let name = format!("wa_gw_it_{}", uuid::Uuid::new_v4().simple());
                let (a, n) = (admin.clone(), name.clone());
                block_on(async move {
                    let (admin, name) = (a, n);
                    let pool = sqlx::PgPool::connect(&admin)
                        .await
                        .unwrap_or_else(|e| panic!("PostgreSQL at WA_TEST_POSTGRES_URL ({admin}) is needed: {e}"));
                    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&pool).await.unwrap();
                    pool.close().await;
                });
                let (base, _) = admin.rsplit_once('/').unwrap();
                TestDb { kind, url: format!("{base}/{name}"), pg: Some((admin, name)) }
            }
        }
    }

    /// A database the test owns elsewhere (a private PostgreSQL cluster): not dropped here.
    pub fn at(kind: DbKind, url: String) -> TestDb {
        TestDb { kind, url, pg: None }
    }

    /// Opens the store (for tests that read the database directly).
    pub async fn store(&self) -> wa_gateway::store::Store {
        wa_gateway::store::Store::connect(&self.url).await.unwrap()
    }

    /// Makes the PostgreSQL database go away under a running gateway (an outage).
    pub fn drop_now(&self) {
        if let Some((admin, name)) = &self.pg {
            drop_pg(admin, name);
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some((admin, name)) = self.pg.take() {
            drop_pg(&admin, &name);
        }
    }
}

fn drop_pg(admin: &str, name: &str) {
    let (admin, name) = (admin.to_owned(), name.to_owned());
    block_on(async move {
        if let Ok(pool) = sqlx::PgPool::connect(&admin).await {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
                .execute(&pool)
                .await;
            pool.close().await;
        }
    });
}

/// Runs a future to completion on a fresh runtime in another thread (usable from Drop and
/// from inside a test's runtime).
pub fn block_on<F: std::future::Future + Send + 'static>(f: F) -> F::Output
where
    F::Output: Send + 'static,
{
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
    })
    .join()
    .unwrap()
}

/// How to start a gateway.
#[derive(Debug, Clone)]
pub struct Options {
    /// Extra flags after `local`.
    pub args: Vec<String>,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// Set `WA_ADMIN_KEY` (off: the gateway prints a first admin key).
    pub admin_env: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            args: vec![
                "--scrape-interval-seconds".into(),
                "0.3".into(),
                "--send-lease-seconds".into(),
                "3".into(),
                "--send-timeout-seconds".into(),
                "3".into(),
                "--webhook-backoff-ms".into(),
                "100".into(),
                "--webhook-max-attempts".into(),
                "3".into(),
                "--webhook-timeout-seconds".into(),
                "2".into(),
                "--media-max-bytes".into(),
                "100000".into(),
                "--stop-grace-seconds".into(),
                "5".into(),
                "--key-cache-seconds".into(),
                "0".into(),
                "--session-env".into(),
                "WA_SANDBOX_DELIVERED_MS=50".into(),
                "--session-env".into(),
                "WA_SANDBOX_READ_MS=120".into(),
                "--session-env".into(),
                "WA_EVENTS_RETRY_MAX_MS=300".into(),
            ],
            env: vec![],
            admin_env: true,
        }
    }
}

/// A running `wa-gateway local`.
pub struct Gateway {
    pub url: String,
    pub data_dir: PathBuf,
    pub db_url: String,
    pub first_key: Option<String>,
    child: Option<Child>,
    log: Arc<Mutex<String>>,
    pub http: reqwest::Client,
}

impl Gateway {
    /// Starts a gateway on a free port and waits until it is ready.
    pub fn start(data_dir: &Path, db: &TestDb, opts: &Options) -> Gateway {
        let mut cmd = Command::new(BIN);
        cmd.arg("local").arg("--data-dir").arg(data_dir);
        // A free port unless the test names one (to restart a gateway where clients and pods
        // expect it).
        if !opts.args.iter().any(|a| a == "--listen") {
            cmd.arg("--listen").arg("127.0.0.1:0");
        }
        cmd.args(&opts.args)
            .env("DATABASE_URL", &db.url)
            .env("WA_GATEWAY_LOG", "info,wa_gateway=debug")
            .env_remove("WA_SESSION_BIN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if opts.admin_env {
            cmd.env("WA_ADMIN_KEY", ADMIN);
        } else {
            cmd.env_remove("WA_ADMIN_KEY");
        }
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("starting wa-gateway");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let mut l = log.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut url: Option<String> = None;
        let mut first_key = None;
        let deadline = Instant::now() + Duration::from_secs(30);
        // The URL line comes first; the key line (only on a database's first start) right after.
        let mut key_deadline: Option<Instant> = None;
        loop {
            if url.is_some() && (opts.admin_env || first_key.is_some() || key_deadline.is_some_and(|d| Instant::now() > d)) {
                break;
            }
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix("wa-operator gateway listening on ") {
                        url = Some(rest.trim_end_matches('/').to_owned());
                        key_deadline = Some(Instant::now() + Duration::from_secs(1));
                    }
                    if let Some(rest) = line.strip_prefix("first admin API key (shown once, store it now): ") {
                        first_key = Some(rest.trim().to_owned());
                    }
                }
                Err(_) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        panic!("wa-gateway exited ({status}); log:\n{}", log.lock().unwrap());
                    }
                    if Instant::now() >= deadline {
                        let _ = child.kill();
                        panic!("wa-gateway did not start within 30 s; log:\n{}", log.lock().unwrap());
                    }
                }
            }
        }
        let gw = Gateway {
            url: url.unwrap(),
            data_dir: data_dir.to_owned(),
            db_url: db.url.clone(),
            first_key,
            child: Some(child),
            log,
            http: reqwest::Client::builder().timeout(Duration::from_secs(30)).no_proxy().build().unwrap(),
        };
        gw
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (bounded).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
            panic!("wa-gateway did not stop within 15 s of SIGTERM; log:\n{}", self.log());
        }
    }

    pub fn req(&self, method: reqwest::Method, path: &str, key: Option<&str>) -> reqwest::RequestBuilder {
        let mut r = self.http.request(method, format!("{}{path}", self.url));
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        r
    }

    /// A JSON call with the admin key; returns (status, body as JSON or Null).
    pub async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call_as(ADMIN, method, path, body).await
    }

    pub async fn call_as(&self, key: &str, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut r = self.req(method, path, Some(key));
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.unwrap_or_else(|e| panic!("{path}: {e}\nlog:\n{}", self.log()));
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Creates a sandbox session and waits until it awaits a scan.
    pub async fn sandbox_session(&self, name: &str, extra: Value) -> Value {
        let mut body = json!({"name": name, "engine": "sandbox"});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        let (status, created) = self.call(reqwest::Method::POST, "/v1/sessions", Some(body)).await;
        assert_eq!(status, 201, "{created}\n{}", self.log());
        self.wait_phase(name, "AwaitingScan").await
    }

    /// Creates a sandbox session, scans it, and waits until it is connected.
    pub async fn connected_session(&self, name: &str, extra: Value) -> Value {
        self.sandbox_session(name, extra).await;
        let (status, body) = self.call(reqwest::Method::POST, &format!("/v1/sessions/{name}/sandbox/scan"), None).await;
        assert_eq!(status, 200, "{body}");
        self.wait_phase(name, "Connected").await
    }

    pub async fn wait_phase(&self, name: &str, phase: &str) -> Value {
        let path = format!("/v1/sessions/{name}");
        let mut last = Value::Null;
        for _ in 0..300 {
            let (status, body) = self.call(reqwest::Method::GET, &path, None).await;
            if status == 200 && body["phase"] == phase && body["ready"] == true {
                return body;
            }
            last = body;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("session {name} did not reach {phase} in 15 s (last: {last})\nlog:\n{}", self.log());
    }

    /// Polls `GET /v1/messages/{id}` until `pred` holds (15 s).
    pub async fn wait_message(&self, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let mut last = Value::Null;
        for _ in 0..300 {
            let (status, body) = self.call(reqwest::Method::GET, &format!("/v1/messages/{id}"), None).await;
            if status == 200 && pred(&body) {
                return body;
            }
            last = body;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("message {id} never {what} (last: {last})\nlog:\n{}", self.log());
    }

    /// The pid of a session's process (from the gateway's pid file).
    pub fn session_pid(&self, name: &str) -> Option<u32> {
        std::fs::read_to_string(self.data_dir.join("run").join(format!("{name}.pid")))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// The value of one sample in `/metrics` (`name{labels}` as printed).
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let text = self.http.get(format!("{}/metrics", self.url)).send().await.ok()?.text().await.ok()?;
        text.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- wa-gateway log ----\n{}", self.log());
        }
        self.kill();
    }
}

pub fn signal(pid: u32, sig: i32) {
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// One request a [`Sink`] received.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A webhook receiver: records every POST; answers `status` (changeable at runtime).
#[derive(Clone)]
pub struct Sink {
    pub url: String,
    pub received: Arc<Mutex<Vec<Received>>>,
    pub status: Arc<Mutex<u16>>,
}

impl Sink {
    pub async fn start(status: u16) -> Sink {
        Sink::start_on("127.0.0.1:0", status).await
    }

    /// A sink on a given address (a receiver that comes back where its webhook points).
    pub async fn start_on(addr: &str, status: u16) -> Sink {
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let status = Arc::new(Mutex::new(status));
        let state = (received.clone(), status.clone());
        let app = axum::Router::new()
            .route(
                "/{*path}",
                post(|State((rec, st)): State<(Arc<Mutex<Vec<Received>>>, Arc<Mutex<u16>>)>, headers: HeaderMap, body: Bytes| async move {
                    rec.lock().unwrap().push(Received { headers, body });
                    StatusCode::from_u16(*st.lock().unwrap()).unwrap()
                }),
            )
            .with_state(state);
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Sink { url, received, status }
    }

    pub fn set_status(&self, s: u16) {
        *self.status.lock().unwrap() = s;
    }

    pub fn all(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Waits until `n` requests arrived (15 s).
    pub async fn wait_for(&self, n: usize) -> Vec<Received> {
        for _ in 0..300 {
            let all = self.all();
            if all.len() >= n {
                return all;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("webhook sink got {} requests, expected {n}", self.all().len());
    }
}

/// Runs the same scenario against SQLite and PostgreSQL: `both!(name, |db| async { … })`
/// makes tests `name::sqlite` and `name::postgres`.
#[macro_export]
macro_rules! both {
    ($name:ident, $scenario:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$scenario($crate::common::DbKind::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$scenario($crate::common::DbKind::Postgres).await
            }
        }
    };
}

/// A temp dir and a database of `kind`, and a gateway on them.
pub fn setup(kind: DbKind, opts: &Options) -> (tempfile::TempDir, TestDb, Gateway) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new(kind, dir.path());
    let gw = Gateway::start(&dir.path().join("data"), &db, opts);
    (dir, db, gw)
}
