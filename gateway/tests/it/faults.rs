//! Faults under load, each with an accounting of every message (issue 7, item 2): the gateway
//! SIGKILLed while clients are sending, PostgreSQL restarted under a running gateway, a session
//! process SIGKILLed mid-send, and the gateway down while its pods receive messages.
//! (Webhook receivers that go away are in `webhooks.rs`.)
//!
//! The accounting ([`account`]) holds every test to the same bar: every message a client
//! asked for ends in exactly one row, which ends `sent` (the engine sent it exactly once, with
//! that WhatsApp id) or `failed` with a code and a reason (the engine never sent it, or — only
//! for SEND_OUTCOME_UNKNOWN — at most once); nothing stays queued; the engine sent nothing no
//! row accounts for. What the engine sent is read from the session processes' own logs (one
//! `sent id=<WhatsApp id> key=<gateway message id>` line per send, written the moment the
//! engine returns), not from the gateway.
//!
//! Clients behave as the API asks them to: every send carries an `Idempotency-Key`, and an
//! answer that may be temporary (no connection, 429, 503, 504) is retried with the same key
//! until the answer is definite. Figures of each run are printed (`--no-capture`) and copied
//! into RELIABILITY.md.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};
use wa_gateway::store::{MessageRow, Store};

use crate::both;
use crate::common::*;

const FAST: &str = r#"{"rateLimit": {"messagesPerMinute": 6000, "burst": 1000}}"#;

fn fast() -> Value {
    serde_json::from_str(FAST).unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Gateway options for fault tests: the session processes log each send (debug), and the
/// gateway listens on `port` when given (so it comes back where clients and pods expect it).
fn fault_options(port: Option<u16>) -> Options {
    let mut opts = Options::default();
    opts.args.extend(["--session-env".into(), "WA_LOG=info,wa_session::session=debug".into()]);
    if let Some(p) = port {
        opts.args.extend(["--listen".into(), format!("127.0.0.1:{p}")]);
    }
    opts
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Sync,
    Async,
}

/// One message a client wants sent.
#[derive(Debug, Clone)]
struct Intent {
    session: String,
    key: String,
    mode: Mode,
}

/// The definite answer a client got for an intent (after retrying temporary ones).
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    code: Option<String>,
    id: Option<String>,
}

/// Every HTTP answer (or connection failure) the clients saw, for the figures.
#[derive(Debug, Default)]
struct Seen {
    /// (status or 0 for no connection, error code) → count.
    by_status: BTreeMap<(u16, String), usize>,
    /// Longest time one request took.
    slowest: Duration,
    /// Answers in a window of interest (see [`Load::window`]): (status, code, took).
    in_window: Vec<(u16, String, Duration)>,
}

/// Clients sending concurrently: each takes the next intent and sends it until definite.
struct Load {
    url: String,
    http: reqwest::Client,
    intents: Mutex<Vec<Intent>>,
    answers: Mutex<HashMap<String, Answer>>,
    accepted: AtomicUsize,
    seen: Mutex<Seen>,
    /// While set, answers are also kept in `seen.in_window`.
    window: AtomicBool,
}

impl Load {
    fn new(url: &str) -> Arc<Load> {
        Arc::new(Load {
            url: url.to_owned(),
            http: reqwest::Client::builder().no_proxy().pool_max_idle_per_host(0).build().unwrap(),
            intents: Mutex::default(),
            answers: Mutex::default(),
            accepted: AtomicUsize::new(0),
            seen: Mutex::default(),
            window: AtomicBool::new(false),
        })
    }

    fn note(&self, status: u16, code: &str, took: Duration) {
        let mut s = self.seen.lock().unwrap();
        *s.by_status.entry((status, code.to_owned())).or_default() += 1;
        s.slowest = s.slowest.max(took);
        if self.window.load(Ordering::SeqCst) {
            s.in_window.push((status, code.to_owned(), took));
        }
    }

    /// Sends one intent until the answer is definite (bounded: 90 s).
    async fn send(&self, intent: &Intent) -> Answer {
        let deadline = Instant::now() + Duration::from_secs(90);
        let body = json!({"to": "+15551234567", "type": "text", "text": format!("fault test {}", intent.key)});
        loop {
            assert!(Instant::now() < deadline, "{} got no definite answer in 90 s", intent.key);
            let mut req = self
                .http
                .post(format!("{}/v1/sessions/{}/messages", self.url, intent.session))
                .bearer_auth(ADMIN)
                .header("idempotency-key", &intent.key)
                .timeout(Duration::from_secs(20))
                .json(&body);
            if intent.mode == Mode::Async {
                req = req.header("prefer", "respond-async");
            }
            let started = Instant::now();
            let resp = match req.send().await {
                Ok(r) => r,
                Err(_) => {
                    self.note(0, "no connection", started.elapsed());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let status = resp.status().as_u16();
            let header_id = resp.headers().get("x-message-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
            let body: Value = match resp.text().await {
                Ok(t) => serde_json::from_str(&t).unwrap_or(Value::Null),
                Err(_) => {
                    self.note(0, "answer cut off", started.elapsed());
                    continue;
                }
            };
            let code = body["error"]["code"].as_str().map(str::to_owned);
            self.note(status, code.as_deref().unwrap_or(""), started.elapsed());
            match status {
                200..=202 => {
                    self.accepted.fetch_add(1, Ordering::SeqCst);
                    return Answer { status, code, id: body["id"].as_str().map(str::to_owned) };
                }
                // Temporary: rate limited, not ready or unavailable, timed out, or the session
                // is reconnecting (its process restarted).
                429 | 503 | 504 => tokio::time::sleep(Duration::from_millis(150)).await,
                409 if code.as_deref() == Some("SESSION_NOT_CONNECTED") => tokio::time::sleep(Duration::from_millis(150)).await,
                _ => return Answer { status, code, id: header_id },
            }
        }
    }

    /// Starts `clients` senders that make and send intents (`make(n)` for the n-th) until
    /// `stop` is set or `make` says there are no more.
    fn run(
        self: &Arc<Self>,
        clients: usize,
        make: impl Fn(usize) -> Option<Intent> + Send + Sync + 'static,
        stop: Arc<AtomicBool>,
        pause: Duration,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let next = Arc::new(AtomicUsize::new(0));
        let make = Arc::new(make);
        (0..clients)
            .map(|_| {
                let (load, next, make, stop) = (self.clone(), next.clone(), make.clone(), stop.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::SeqCst) {
                        let Some(intent) = make(next.fetch_add(1, Ordering::SeqCst)) else { break };
                        load.intents.lock().unwrap().push(intent.clone());
                        let answer = load.send(&intent).await;
                        load.answers.lock().unwrap().insert(intent.key.clone(), answer);
                        tokio::time::sleep(pause).await;
                    }
                })
            })
            .collect()
    }

    async fn wait_accepted(&self, n: usize, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.accepted.load(Ordering::SeqCst) < n {
            assert!(Instant::now() < deadline, "only {} sends accepted before {what}", self.accepted.load(Ordering::SeqCst));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn intents(&self) -> Vec<Intent> {
        self.intents.lock().unwrap().clone()
    }

    fn answers(&self) -> HashMap<String, Answer> {
        self.answers.lock().unwrap().clone()
    }

    fn figures(&self) -> String {
        let s = self.seen.lock().unwrap();
        let answers: Vec<String> = s
            .by_status
            .iter()
            .map(|((st, code), n)| if code.is_empty() { format!("{st}: {n}") } else { format!("{st} {code}: {n}") })
            .collect();
        format!("answers seen by clients {{{}}}, slowest request {:?}", answers.join(", "), s.slowest)
    }
}

/// Sends the engine made, read from a session process's log: (gateway message id, WhatsApp id).
fn engine_sends(log: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains("wa_session::session") && l.contains(" sent id="))
        .map(|l| {
            let field = |name: &str| {
                let start = l.find(name).map(|i| i + name.len()).unwrap_or(l.len());
                l[start..].split_whitespace().next().unwrap_or("").to_owned()
            };
            (field(" key="), field(" sent id="))
        })
        .collect()
}

/// What the accounting found.
#[derive(Debug, Default)]
struct Tally {
    messages: usize,
    sent: usize,
    failed: BTreeMap<String, usize>,
    engine_sends: usize,
    /// Failed SEND_OUTCOME_UNKNOWN although the engine did send it (allowed, counted).
    unknown_but_sent: usize,
    settle: Duration,
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} messages: {} sent exactly once, failed {:?} ({} of them reached WhatsApp), {} engine sends; settled {:?} after the fault",
            self.messages, self.sent, self.failed, self.unknown_but_sent, self.engine_sends, self.settle
        )
    }
}

/// Waits until nothing is queued any more, then checks every intent against its row and the
/// engines' logs (see the module comment). `logs` are the session processes' log files.
async fn account(store: &Store, intents: &[Intent], answers: &HashMap<String, Answer>, logs: &[PathBuf], since: Instant) -> Tally {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let depth = store.outbox_depth().await.unwrap();
        if depth == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{depth} messages still queued 60 s on");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let settle = since.elapsed();

    let mut by_key: HashMap<String, Vec<String>> = HashMap::new();
    let mut engine_total = 0;
    for log in logs {
        for (key, wa) in engine_sends(log) {
            engine_total += 1;
            by_key.entry(key).or_default().push(wa);
        }
    }
    let mut tally = Tally { messages: intents.len(), engine_sends: engine_total, settle, ..Tally::default() };
    let mut rows: HashMap<String, MessageRow> = HashMap::new();
    let mut wa_ids: HashMap<String, String> = HashMap::new();
    for intent in intents {
        let answer = answers.get(&intent.key).unwrap_or_else(|| panic!("{} has no answer", intent.key));
        assert!(answer.status != 500, "{}: {answer:?}", intent.key);
        let row = store
            .message_by_idempotency_key(&intent.session, &intent.key)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{} was answered {answer:?} but has no row", intent.key));
        if let Some(id) = &answer.id {
            assert_eq!(&row.id, id, "{}: the client was told another message id", intent.key);
        }
        if !(200..=202).contains(&answer.status) {
            assert_eq!(row.error_code, answer.code, "{}: the row's error is not what the client was told", intent.key);
        }
        let sends = by_key.get(&row.id).cloned().unwrap_or_default();
        match row.status.as_str() {
            "sent" | "delivered" | "read" => {
                let wa = row.wa_id.clone().unwrap_or_else(|| panic!("{} is {} without a WhatsApp id", intent.key, row.status));
                assert_eq!(sends, vec![wa.clone()], "{}: the engine's sends of this message differ from its row", intent.key);
                if let Some(other) = wa_ids.insert(wa.clone(), row.id.clone()) {
                    panic!("{} and {other} share the WhatsApp id {wa}", row.id);
                }
                tally.sent += 1;
            }
            "failed" => {
                let code = row.error_code.clone().unwrap_or_default();
                assert!(!code.is_empty() && row.error.as_deref().is_some_and(|e| !e.is_empty()), "{}: failed without a reason: {row:?}", intent.key);
                if code == "SEND_OUTCOME_UNKNOWN" {
                    assert!(sends.len() <= 1, "{}: sent {} times", intent.key, sends.len());
                    tally.unknown_but_sent += sends.len();
                } else {
                    assert!(sends.is_empty(), "{}: failed {code} but the engine sent it {sends:?}", intent.key);
                }
                *tally.failed.entry(code).or_default() += 1;
            }
            other => panic!("{} ended {other}: {row:?}", intent.key),
        }
        rows.insert(row.id.clone(), row);
    }
    for (key, was) in &by_key {
        assert!(rows.contains_key(key), "the engine sent {was:?} for {key:?}, which no client asked for");
    }
    tally
}

fn session_logs(data: &Path, sessions: &[&str]) -> Vec<PathBuf> {
    sessions.iter().map(|s| data.join("logs").join(format!("{s}.log"))).collect()
}

// ---------------------------------------------------------------------------------------------
// 1. The gateway SIGKILLed while clients are still sending.

both!(gateway_killed_under_async_load, gateway_killed);
async fn gateway_killed(kind: DbKind) {
    const SESSIONS: [&str; 4] = ["k0", "k1", "k2", "k3"];
    const MESSAGES: usize = 240;
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new(kind, dir.path());
    let data = dir.path().join("data");
    let opts = fault_options(Some(free_port()));
    let mut gw = Gateway::start(&data, &db, &opts);
    for s in SESSIONS {
        gw.connected_session(s, fast()).await;
    }

    let load = Load::new(&gw.url);
    let stop = Arc::new(AtomicBool::new(false));
    let clients = load.run(
        8,
        |n| {
            (n < MESSAGES).then(|| Intent { session: SESSIONS[n % SESSIONS.len()].to_owned(), key: format!("gk-{n}"), mode: Mode::Async })
        },
        stop.clone(),
        Duration::ZERO,
    );
    // Crash with a third accepted, sends queued in the outbox and in flight to the pods, and
    // eight clients mid-request.
    load.wait_accepted(MESSAGES / 3, "the kill").await;
    gw.kill();
    let killed = Instant::now();
    let accepted_at_kill = load.accepted.load(Ordering::SeqCst);
    let gw = Gateway::start(&data, &db, &opts);
    let down = killed.elapsed();
    for s in SESSIONS {
        gw.wait_phase(s, "Connected").await;
    }
    for c in clients {
        c.await.unwrap();
    }
    let store = db.store().await;
    let tally = account(&store, &load.intents(), &load.answers(), &session_logs(&data, &SESSIONS), killed).await;
    store.close().await;
    // Only a send in flight to a pod when it stopped (one per session) can be unknown.
    let unknown = tally.failed.get("SEND_OUTCOME_UNKNOWN").copied().unwrap_or(0);
    assert!(unknown <= SESSIONS.len(), "{tally}");
    assert_eq!(tally.failed.values().sum::<usize>(), unknown, "only SEND_OUTCOME_UNKNOWN may fail: {tally}");
    println!(
        "FIGURES gateway_killed_under_async_load/{kind:?}: {MESSAGES} async sends by 8 clients to {} sessions, SIGKILL after {accepted_at_kill} accepted, gateway back in {down:?}; {tally}; {}",
        SESSIONS.len(),
        load.figures()
    );
}

// ---------------------------------------------------------------------------------------------
// 3. A session process SIGKILLed while sync and async sends are in flight.

both!(pod_killed_mid_send, pod_killed);
async fn pod_killed(kind: DbKind) {
    const SESSIONS: [&str; 2] = ["p0", "p1"];
    const MESSAGES: usize = 160;
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new(kind, dir.path());
    let data = dir.path().join("data");
    let gw = Gateway::start(&data, &db, &fault_options(None));
    for s in SESSIONS {
        gw.connected_session(s, fast()).await;
    }
    let load = Load::new(&gw.url);
    let stop = Arc::new(AtomicBool::new(false));
    // Clients alternate sync and async sends; both sessions get both.
    let clients = load.run(
        6,
        |n| {
            (n < MESSAGES).then(|| Intent {
                session: SESSIONS[(n / 2) % SESSIONS.len()].to_owned(),
                key: format!("pk-{n}"),
                mode: if n % 2 == 0 { Mode::Sync } else { Mode::Async },
            })
        },
        stop.clone(),
        Duration::ZERO,
    );
    // Kill p0 twice and p1 once while sends flow.
    let mut first_kill = None;
    for (at, session) in [(MESSAGES / 5, "p0"), (MESSAGES * 2 / 5, "p1"), (MESSAGES * 3 / 5, "p0")] {
        load.wait_accepted(at, "a kill").await;
        let pid = gw.session_pid(session).unwrap_or_else(|| panic!("{session} has no process"));
        signal(pid, libc::SIGKILL);
        first_kill.get_or_insert_with(Instant::now);
        // Wait for the supervisor to bring it back before the next kill.
        let deadline = Instant::now() + Duration::from_secs(20);
        while gw.session_pid(session).is_none_or(|p| p == pid) {
            assert!(Instant::now() < deadline, "{session} was not restarted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for c in clients {
        c.await.unwrap();
    }
    for s in SESSIONS {
        gw.wait_phase(s, "Connected").await;
    }
    let store = db.store().await;
    let tally = account(&store, &load.intents(), &load.answers(), &session_logs(&data, &SESSIONS), first_kill.unwrap()).await;
    store.close().await;
    let unknown = tally.failed.get("SEND_OUTCOME_UNKNOWN").copied().unwrap_or(0);
    assert!(unknown <= 3, "only a send in the engine at one of the three kills can be unknown: {tally}");
    assert_eq!(tally.failed.values().sum::<usize>(), unknown, "{tally}");
    println!(
        "FIGURES pod_killed_mid_send/{kind:?}: {MESSAGES} sends (half sync, half async) by 6 clients to {} sessions, 3 SIGKILLs of session processes; {tally}; {}",
        SESSIONS.len(),
        load.figures()
    );
}

// ---------------------------------------------------------------------------------------------
// 2. PostgreSQL restarted under a running gateway.

/// A private PostgreSQL cluster for one test (initdb + pg_ctl into a temp dir, its own port),
/// so it can be stopped without touching the shared server at WA_TEST_POSTGRES_URL. PostgreSQL
/// refuses to run as root: as root, the cluster runs as the `postgres` system user (or
/// `nobody`), which owns the temp dir.
struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    user: Option<(u32, u32)>,
    port: u16,
    url: String,
}

impl PgCluster {
    fn start() -> PgCluster {
        let mut bins: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL's server binaries are needed in /usr/lib/postgresql/<version>/bin (Debian package postgresql)")
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|b| b.join("pg_ctl").exists())
            .collect();
        bins.sort_by_key(|b| b.parent().and_then(|v| v.file_name()).and_then(|v| v.to_str()).and_then(|v| v.parse::<u32>().ok()));
        let bin = bins.pop().expect("no /usr/lib/postgresql/<version>/bin/pg_ctl");
        let dir = tempfile::tempdir().unwrap();
        // SAFETY: getuid and getpwnam only read process and passwd data.
        let user = (unsafe { libc::getuid() } == 0).then(|| {
            ["postgres", "nobody"]
                .iter()
                .find_map(|name| {
                    let c = std::ffi::CString::new(*name).unwrap();
                    let pw = unsafe { libc::getpwnam(c.as_ptr()) };
                    (!pw.is_null()).then(|| unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
                })
                .expect("running as root needs a postgres or nobody user for PostgreSQL")
        });
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let port = free_port();
        let pg = PgCluster { url: format!("postgres://postgres@127.0.0.1:{port}/postgres"), dir, bin, user, port };
        pg.run("initdb", &["-D", "data", "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions"]);
        pg.start_server();
        pg
    }

    fn run(&self, program: &str, args: &[&str]) {
        use std::os::unix::process::CommandExt as _;
        let mut cmd = Command::new(self.bin.join(program));
        cmd.args(args).current_dir(self.dir.path()).env_remove("PGDATA").stdin(Stdio::null()).stdout(Stdio::null());
        if let Some((uid, gid)) = self.user {
            cmd.uid(uid).gid(gid);
        }
        let out = cmd.output().unwrap_or_else(|e| panic!("{program}: {e}"));
        assert!(out.status.success(), "{program} {args:?}: {}\n{}", String::from_utf8_lossy(&out.stderr), self.server_log());
    }

    fn start_server(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=60",
            self.port,
            self.dir.path().display()
        );
        self.run("pg_ctl", &["-D", "data", "-l", "server.log", "-w", "-t", "30", "-o", &options, "start"]);
    }

    /// A fast shutdown: sessions are ended (57P01), the server is gone until started again.
    fn stop_server(&self) {
        self.run("pg_ctl", &["-D", "data", "-m", "fast", "-w", "-t", "30", "stop"]);
    }

    fn server_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        use std::os::unix::process::CommandExt as _;
        let mut cmd = Command::new(self.bin.join("pg_ctl"));
        cmd.args(["-D", "data", "-m", "immediate", "-w", "stop"]).current_dir(self.dir.path()).stdout(Stdio::null()).stderr(Stdio::null());
        if let Some((uid, gid)) = self.user {
            cmd.uid(uid).gid(gid);
        }
        let _ = cmd.status();
    }
}

/// One request during the outage, timed: (status, error code, time taken).
async fn timed(r: reqwest::RequestBuilder) -> (u16, String, Duration) {
    let started = Instant::now();
    let resp = r.timeout(Duration::from_secs(30)).send().await.expect("the gateway must answer during an outage");
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    (status, body["error"]["code"].as_str().unwrap_or("").to_owned(), started.elapsed())
}

/// Longest a request may take while the database is down: the pool's acquire timeout (5 s)
/// plus scheduling on a loaded 2-core machine.
const OUTAGE_ANSWER_BOUND: Duration = Duration::from_secs(8);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_under_load() {
    const SESSIONS: [&str; 3] = ["r0", "r1", "r2"];
    // Longer than the pool's acquire timeout (5 s), so the background workers meet errors,
    // not only waits.
    const OUTAGE: Duration = Duration::from_secs(8);
    let pg = PgCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::at(DbKind::Postgres, pg.url.clone());
    let data = dir.path().join("data");
    let gw = Gateway::start(&data, &db, &fault_options(None));
    for s in SESSIONS {
        gw.connected_session(s, fast()).await;
    }
    let pid = gw.pid();

    // Clients send without pause (sync and async, all sessions) before, during and after.
    let load = Load::new(&gw.url);
    let stop = Arc::new(AtomicBool::new(false));
    let clients = load.run(
        6,
        |n| {
            Some(Intent {
                session: SESSIONS[(n / 2) % SESSIONS.len()].to_owned(),
                key: format!("pg-{n}"),
                mode: if n % 2 == 0 { Mode::Sync } else { Mode::Async },
            })
        },
        stop.clone(),
        Duration::from_millis(20),
    );
    load.wait_accepted(60, "the outage").await;

    pg.stop_server();
    let outage = Instant::now();
    load.window.store(true, Ordering::SeqCst);
    // Readiness goes false, and requests are refused with 503 UNAVAILABLE within the bound
    // (all probes at once, as clients would come).
    let probe_keys: Vec<Intent> = SESSIONS
        .iter()
        .enumerate()
        .map(|(i, s)| Intent { session: (*s).to_owned(), key: format!("probe-{i}"), mode: if i % 2 == 0 { Mode::Sync } else { Mode::Async } })
        .collect();
    let mut requests = vec![("readyz", gw.req(Method::GET, "/readyz", None))];
    for intent in &probe_keys {
        let mut r = gw
            .req(Method::POST, &format!("/v1/sessions/{}/messages", intent.session), Some(ADMIN))
            .header("idempotency-key", &intent.key)
            .json(&json!({"to": "+15551234567", "type": "text", "text": "during the outage"}));
        if intent.mode == Mode::Async {
            r = r.header("prefer", "respond-async");
        }
        requests.push(("send", r));
    }
    requests.push(("history", gw.req(Method::GET, "/v1/sessions/r0/messages", Some(ADMIN))));
    requests.push(("keys", gw.req(Method::GET, "/v1/keys", Some(ADMIN))));
    let probes: Vec<(&str, u16, String, Duration)> =
        futures::future::join_all(requests.into_iter().map(|(what, r)| async move {
            let (status, code, took) = timed(r).await;
            (what, status, code, took)
        }))
        .await;
    for (what, status, code, _) in &probes {
        match *what {
            "readyz" => assert_eq!(*status, 503, "readiness during the outage"),
            _ => assert_eq!((*status, code.as_str()), (503, "UNAVAILABLE"), "{what} during the outage"),
        }
    }
    for (what, _, _, took) in &probes {
        assert!(*took < OUTAGE_ANSWER_BOUND, "{what} took {took:?} during the outage");
    }
    if let Some(rest) = OUTAGE.checked_sub(outage.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    pg.start_server();
    let outage_took = outage.elapsed();
    load.window.store(false, Ordering::SeqCst);

    // The same gateway process recovers by itself: ready again, and sends go through.
    let back = Instant::now();
    let deadline = back + Duration::from_secs(30);
    loop {
        let (status, _, _) = timed(gw.req(Method::GET, "/readyz", None)).await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the gateway did not become ready within 30 s of PostgreSQL's return");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ready_after = back.elapsed();
    let before = load.accepted.load(Ordering::SeqCst);
    load.wait_accepted(before + 30, "the end").await;
    let thirty_after = back.elapsed();
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.unwrap();
    }
    // The probes were refused: a client sends them again with their keys.
    let mut intents = load.intents();
    let mut answers = load.answers();
    for intent in probe_keys {
        answers.insert(intent.key.clone(), load.send(&intent).await);
        intents.push(intent);
    }
    assert_eq!(gw.pid(), pid);
    assert!(unsafe { libc::kill(pid as i32, 0) } == 0, "the gateway process is gone:\n{}", gw.log());

    let store = db.store().await;
    let tally = account(&store, &intents, &answers, &session_logs(&data, &SESSIONS), outage).await;
    // Every sent message also got its receipts through (events retried across the outage).
    let deadline = Instant::now() + Duration::from_secs(30);
    for intent in &intents {
        let row = store.message_by_idempotency_key(&intent.session, &intent.key).await.unwrap().unwrap();
        if row.wa_id.is_none() {
            continue;
        }
        let mut row = row;
        while row.status != "read" {
            assert!(Instant::now() < deadline, "{} never read: {row:?}", intent.key);
            tokio::time::sleep(Duration::from_millis(100)).await;
            row = store.message(&row.id).await.unwrap().unwrap();
        }
    }
    store.close().await;
    assert!(tally.failed.is_empty(), "nothing may fail: the pods never stopped ({tally})");
    let window = load.seen.lock().unwrap().in_window.clone();
    for (status, code, took) in &window {
        assert!(*took < OUTAGE_ANSWER_BOUND + OUTAGE, "a client request took {took:?} during the outage ({status} {code})");
        assert!(*status != 500, "{status} {code} during the outage");
    }
    let worst_probe = probes.iter().map(|p| p.3).max().unwrap();
    println!(
        "FIGURES postgres_restarted_under_load: PostgreSQL down {outage_took:?}; probes during the outage {:?}, slowest {worst_probe:?}; \
         gateway (same pid) ready {ready_after:?} after PostgreSQL's return, 30 more sends accepted {thirty_after:?} after; \
         {} client requests in the outage window; {tally}; {}",
        probes.iter().map(|(w, s, c, t)| format!("{w} {s} {c} {t:?}")).collect::<Vec<_>>(),
        window.len(),
        load.figures()
    );
    drop(gw);
    drop(pg);
}

// ---------------------------------------------------------------------------------------------
// 4. The gateway down while the session pods receive messages.

/// A session process started by the test, not by the gateway: in local mode the gateway's own
/// children die with it (`PR_SET_PDEATHSIG`, so a restarted gateway never finds a second client
/// of one account), so to keep pods alive while the gateway is down the test runs them itself,
/// as the operator's pods would run in Kubernetes: same binary, same environment, the session's
/// data directory and token, pointed at the gateway's events URL.
struct OwnPod {
    child: std::process::Child,
    url: String,
    token: String,
}

impl OwnPod {
    fn start(data: &Path, session: &str, token: &str, events_url: &str) -> OwnPod {
        let port = free_port();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(data.join("logs").join(format!("{session}.own.log"))).unwrap();
        let child = Command::new(BIN)
            .arg("session")
            .env("WA_ENGINE", "sandbox")
            .env("WA_DATA_DIR", data.join("sessions").join(session))
            .env("WA_LISTEN", format!("127.0.0.1:{port}"))
            .env("WA_TOKEN", token)
            .env("WA_EVENTS_URL", events_url)
            .env("WA_SESSION", session)
            .env("WA_NAMESPACE", "local")
            .env("WA_EVENTS_RETRY_MAX_MS", "300")
            .env("WA_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        OwnPod { child, url: format!("http://127.0.0.1:{port}"), token: token.to_owned() }
    }

    fn req(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        reqwest::Client::new().request(method, format!("{}{path}", self.url)).bearer_auth(&self.token).timeout(Duration::from_secs(10))
    }

    async fn wait_connected(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = self.req(Method::GET, "/v1/status").send().await
                && let Ok(s) = r.json::<Value>().await
                && s["phase"] == "Connected"
            {
                return;
            }
            assert!(Instant::now() < deadline, "own session process at {} did not connect", self.url);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn outbox_events(&self) -> f64 {
        let text = self.req(Method::GET, "/metrics").send().await.unwrap().text().await.unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("wa_session_outbox_events "))
            .and_then(|v| v.trim().parse().ok())
            .expect("wa_session_outbox_events")
    }
}

impl Drop for OwnPod {
    fn drop(&mut self) {
        signal(self.child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn alive(pid: u32) -> bool {
    // A zombie counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')))
}

both!(gateway_down_while_pods_receive, gateway_down_inbound);
async fn gateway_down_inbound(kind: DbKind) {
    const SESSIONS: [&str; 2] = ["i0", "i1"];
    const PER_SESSION: usize = 30;
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new(kind, dir.path());
    let data = dir.path().join("data");
    let port = free_port();
    let opts = fault_options(Some(port));
    let mut gw = Gateway::start(&data, &db, &opts);
    for s in SESSIONS {
        gw.connected_session(s, json!({})).await;
    }
    let pids: Vec<u32> = SESSIONS.iter().map(|s| gw.session_pid(s).unwrap()).collect();
    gw.kill();
    let down = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(15);
    while pids.iter().any(|p| alive(*p)) {
        assert!(Instant::now() < deadline, "the gateway's session processes did not stop with it");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The pods run on without the gateway and receive messages.
    let store = db.store().await;
    let tokens: HashMap<String, String> = store.list_local_sessions().await.unwrap().into_iter().map(|r| (r.name, r.pod_token)).collect();
    store.close().await;
    let events_url = format!("http://127.0.0.1:{port}/internal/v1/events");
    let pods: Vec<OwnPod> = SESSIONS.iter().map(|s| OwnPod::start(&data, s, &tokens[*s], &events_url)).collect();
    let mut expected: HashMap<String, (String, String)> = HashMap::new();
    for (s, pod) in SESSIONS.iter().zip(&pods) {
        pod.wait_connected().await;
        for i in 0..PER_SESSION {
            let text = format!("{s} while the gateway is down #{i}");
            let resp = pod.req(Method::POST, "/v1/sandbox/inbound").json(&json!({"from": "+15550001111", "text": text})).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            let id = resp.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
            expected.insert(id, ((*s).to_owned(), text));
        }
    }
    // They wait in the pods' outboxes (plus the pods' own state events).
    for pod in &pods {
        let waiting = pod.outbox_events().await;
        assert!(waiting >= PER_SESSION as f64, "only {waiting} events wait in the outbox");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let down_for = down.elapsed();

    // The gateway comes back where the pods deliver; each message arrives exactly once.
    let back = Instant::now();
    let gw = Gateway::start(&data, &db, &opts);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut arrived: HashMap<String, usize> = HashMap::new();
    loop {
        arrived.clear();
        for s in SESSIONS {
            let (status, page) = gw.call(Method::GET, &format!("/v1/sessions/{s}/messages?direction=inbound&limit=200"), None).await;
            assert_eq!(status, 200, "{page}");
            for m in page["items"].as_array().unwrap() {
                let wa = m["waMessageId"].as_str().unwrap().to_owned();
                let (session, text) = expected.get(&wa).unwrap_or_else(|| panic!("an inbound message nobody sent: {m}"));
                assert_eq!((m["session"].as_str(), m["text"].as_str()), (Some(session.as_str()), Some(text.as_str())), "{m}");
                *arrived.entry(wa).or_default() += 1;
            }
        }
        if arrived.len() == expected.len() {
            break;
        }
        assert!(Instant::now() < deadline, "{} of {} inbound messages arrived\n{}", arrived.len(), expected.len(), gw.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all_in = back.elapsed();
    // The outboxes empty, and nothing arrives twice (a redelivered batch is de-duplicated).
    let deadline = Instant::now() + Duration::from_secs(15);
    for pod in &pods {
        while pod.outbox_events().await > 0.0 {
            assert!(Instant::now() < deadline, "an outbox did not empty");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut total = 0;
    for s in SESSIONS {
        let (_, page) = gw.call(Method::GET, &format!("/v1/sessions/{s}/messages?direction=inbound&limit=200"), None).await;
        total += page["items"].as_array().unwrap().len();
    }
    assert_eq!(total, expected.len(), "inbound messages were doubled");
    assert!(arrived.values().all(|n| *n == 1));
    let duplicates = gw.metric("wa_gateway_events_total{type=\"message\",result=\"duplicate\"}").await.unwrap_or(0.0);
    println!(
        "FIGURES gateway_down_while_pods_receive/{kind:?}: {} inbound messages injected at {} pods while the gateway was down ({down_for:?}); \
         all in history exactly once {all_in:?} after the gateway started again; duplicate deliveries de-duplicated: {duplicates}",
        expected.len(),
        SESSIONS.len()
    );
    drop(pods);
}
