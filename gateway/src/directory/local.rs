//! Local mode: the gateway supervises one session process per session on this machine.
//!
//! Each session gets a loopback port, a data directory `<data-dir>/sessions/<name>`, and a
//! random pod token (kept in the store). The process is `wa-gateway session` (this binary)
//! or `WA_SESSION_BIN`, configured through the `wa_api::pod::env` variables, exactly as the
//! operator configures a pod. It is restarted with backoff when it exits, stopped with
//! SIGTERM (then SIGKILL after a grace period) when the session is deleted or the gateway
//! stops, and asked to die with the gateway (`PR_SET_PDEATHSIG`) so a killed gateway never
//! leaves a second client of the same account running when it comes back.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};
use wa_api::crd::RateLimitSpec;
use wa_api::pod::env;
use wa_api::{Engine, ErrorCode, Phase, SessionName};

use super::{Mode, NewSession, Observed, Route, SessionDirectory, SessionInfo, StatusBoard};
use crate::error::{ApiError, ApiResult};
use crate::pod_client::PodClient;
use crate::store::{LocalSessionRow, Store};
use crate::util::{now_ms, random_secret, to_time};

/// How local sessions are run.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// Holds `sessions/<name>` (each session's data) and `run/` (pid files) and `logs/`.
    pub data_dir: PathBuf,
    /// The session program and its leading arguments: `[<this binary>, "session"]` or
    /// `[$WA_SESSION_BIN]`.
    pub session_command: Vec<OsString>,
    /// Where the pods deliver events (this gateway's `/internal/v1/events`).
    pub events_url: String,
    /// Time between SIGTERM and SIGKILL.
    pub stop_grace: Duration,
    /// Longest wait between restarts of a crashing session.
    pub max_backoff: Duration,
    /// Extra environment for every session process (e.g. `WA_LOG`).
    pub extra_env: Vec<(String, String)>,
}

pub struct LocalDirectory {
    /// This directory, for the supervisor tasks it spawns.
    me: std::sync::Weak<LocalDirectory>,
    store: Store,
    config: LocalConfig,
    client: PodClient,
    board: Arc<StatusBoard>,
    sessions: RwLock<BTreeMap<SessionName, Arc<Supervised>>>,
}

/// One supervised session.
struct Supervised {
    row: LocalSessionRow,
    name: SessionName,
    engine: Engine,
    proc: Mutex<ProcState>,
    cancel: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Debug, Default, Clone)]
struct ProcState {
    port: Option<u16>,
    pid: Option<u32>,
    ready: bool,
    restarts: u32,
    last_exit: Option<String>,
}

impl LocalDirectory {
    /// Restores every stored session and starts supervising it.
    pub async fn start(store: Store, config: LocalConfig, client: PodClient, board: Arc<StatusBoard>) -> anyhow::Result<Arc<Self>> {
        for sub in ["sessions", "run", "logs"] {
            std::fs::create_dir_all(config.data_dir.join(sub))?;
        }
        let dir = Arc::new_cyclic(|me| LocalDirectory {
            me: me.clone(),
            store,
            config,
            client,
            board,
            sessions: RwLock::new(BTreeMap::new()),
        });
        let rows = dir.store.list_local_sessions().await?;
        info!(sessions = rows.len(), "restoring local sessions");
        for row in rows {
            match row.name.parse::<SessionName>() {
                Ok(name) => dir.supervise(name, row),
                Err(e) => warn!(error = %e, "skipping a stored session with an invalid name"),
            }
        }
        Ok(dir)
    }

    fn supervise(&self, name: SessionName, row: LocalSessionRow) {
        let Some(me) = self.me.upgrade() else { return };
        let engine = row.engine.parse().unwrap_or(Engine::Sandbox);
        let sup = Arc::new(Supervised {
            row,
            name: name.clone(),
            engine,
            proc: Mutex::new(ProcState::default()),
            cancel: CancellationToken::new(),
            task: Mutex::new(None),
        });
        let span = info_span!("session", session = %name);
        let handle = tokio::spawn(run_supervisor(me, sup.clone()).instrument(span));
        if let Ok(mut t) = sup.task.lock() {
            *t = Some(handle);
        }
        if let Ok(mut map) = self.sessions.write() {
            map.insert(name, sup);
        }
    }

    fn session_dir(&self, name: &SessionName) -> PathBuf {
        self.config.data_dir.join("sessions").join(name.as_str())
    }

    fn pid_file(&self, name: &SessionName) -> PathBuf {
        self.config.data_dir.join("run").join(format!("{name}.pid"))
    }

    fn info(&self, sup: &Supervised) -> SessionInfo {
        let proc = sup.proc.lock().map(|p| p.clone()).unwrap_or_default();
        let board = self.board.get(&sup.name).unwrap_or_default();
        let phase = match (proc.ready, board.phase) {
            (true, Some(p)) => p,
            (true, None) => Phase::Starting,
            // The process is down: whatever it last said, it is (re)starting now.
            (false, _) => Phase::Starting,
        };
        SessionInfo {
            name: sup.name.clone(),
            namespace: None,
            engine: sup.engine,
            phase,
            ready: proc.ready,
            account: board.account,
            phone_number: sup.row.phone_number.clone(),
            pair_code: board.pair_code,
            last_error: board.last_error.or(if proc.ready { None } else { proc.last_exit }),
            created_at: Some(to_time(sup.row.created_at)),
        }
    }

    fn get_sup(&self, name: &SessionName) -> Option<Arc<Supervised>> {
        self.sessions.read().ok().and_then(|m| m.get(name).cloned())
    }

    fn route_of(sup: &Supervised) -> Option<Route> {
        let proc = sup.proc.lock().ok()?;
        match (proc.ready, proc.port) {
            (true, Some(port)) => Some(Route {
                session: sup.name.clone(),
                base_url: format!("http://127.0.0.1:{port}"),
                token: sup.row.pod_token.clone(),
            }),
            _ => None,
        }
    }
}

#[async_trait]
impl SessionDirectory for LocalDirectory {
    fn mode(&self) -> Mode {
        Mode::Local
    }

    fn namespace(&self) -> &str {
        "local"
    }

    fn list(&self) -> Vec<SessionInfo> {
        let sups: Vec<_> = self.sessions.read().map(|m| m.values().cloned().collect()).unwrap_or_default();
        sups.iter().map(|s| self.info(s)).collect()
    }

    fn get(&self, name: &SessionName) -> Option<SessionInfo> {
        self.get_sup(name).map(|s| self.info(&s))
    }

    fn route(&self, name: &SessionName) -> ApiResult<Route> {
        let sup = self.get_sup(name).ok_or_else(|| ApiError::session_not_found(name.as_str()))?;
        Self::route_of(&sup).ok_or_else(|| ApiError::not_ready(name.as_str(), "its process is starting"))
    }

    fn routes(&self) -> Vec<Route> {
        let sups: Vec<_> = self.sessions.read().map(|m| m.values().cloned().collect()).unwrap_or_default();
        sups.iter().filter_map(|s| Self::route_of(s)).collect()
    }

    async fn create(&self, new: NewSession) -> ApiResult<SessionInfo> {
        let row = LocalSessionRow {
            name: new.name.to_string(),
            engine: new.engine.as_str().to_owned(),
            phone_number: new.phone_number.as_ref().map(|p| p.to_string()),
            rate_per_minute: i64::from(new.rate_limit.messages_per_minute),
            rate_burst: i64::from(new.rate_limit.burst),
            pod_token: random_secret(32),
            created_at: now_ms(),
        };
        if !self.store.insert_local_session(&row).await? {
            return Err(ApiError::new(ErrorCode::SessionExists, format!("session {:?} already exists", new.name.as_str())));
        }
        self.supervise(new.name.clone(), row);
        self.get(&new.name).ok_or_else(|| ApiError::internal("creating a session", "it vanished"))
    }

    async fn delete(&self, name: &SessionName) -> ApiResult<()> {
        let sup = self
            .sessions
            .write()
            .ok()
            .and_then(|mut m| m.remove(name))
            .ok_or_else(|| ApiError::session_not_found(name.as_str()))?;
        stop_supervisor(&sup).await;
        self.store.delete_local_session(name.as_str()).await?;
        self.board.remove(name);
        Ok(())
    }

    fn session_for_token(&self, token: &str) -> Option<SessionName> {
        use subtle::ConstantTimeEq;
        let sups: Vec<_> = self.sessions.read().map(|m| m.values().cloned().collect()).unwrap_or_default();
        // Compare with every session, so the time taken does not tell which one matched.
        let mut found = None;
        for sup in sups {
            if bool::from(sup.row.pod_token.as_bytes().ct_eq(token.as_bytes())) {
                found = Some(sup.name.clone());
            }
        }
        found
    }

    async fn authenticate_pod(&self, claimed: &SessionName, token: &str) -> bool {
        use subtle::ConstantTimeEq;
        match self.get_sup(claimed) {
            Some(sup) => bool::from(sup.row.pod_token.as_bytes().ct_eq(token.as_bytes())),
            None => false,
        }
    }

    fn observe(&self, name: &SessionName, observed: Observed) {
        self.board.apply(name, observed);
    }

    async fn shutdown(&self) {
        let sups: Vec<_> = self.sessions.read().map(|m| m.values().cloned().collect()).unwrap_or_default();
        futures::future::join_all(sups.iter().map(|s| stop_supervisor(s))).await;
    }
}

async fn stop_supervisor(sup: &Supervised) {
    sup.cancel.cancel();
    let handle = sup.task.lock().ok().and_then(|mut t| t.take());
    if let Some(h) = handle {
        let _ = h.await;
    }
}

/// Supervises one session until cancelled: start, watch, restart with backoff.
async fn run_supervisor(dir: Arc<LocalDirectory>, sup: Arc<Supervised>) {
    let mut backoff = Duration::from_millis(500);
    loop {
        if sup.cancel.is_cancelled() {
            break;
        }
        kill_stale_process(&dir, &sup.name).await;
        let started = Instant::now();
        match spawn_session(&dir, &sup) {
            Ok((mut child, port)) => {
                let pid = child.id();
                if let Some(pid) = pid {
                    let _ = std::fs::write(dir.pid_file(&sup.name), pid.to_string());
                }
                if let Ok(mut p) = sup.proc.lock() {
                    p.port = Some(port);
                    p.pid = pid;
                    p.ready = false;
                }
                info!(port, pid, "session process started");
                let route = Route {
                    session: sup.name.clone(),
                    base_url: format!("http://127.0.0.1:{port}"),
                    token: sup.row.pod_token.clone(),
                };
                let exit = tokio::select! {
                    _ = sup.cancel.cancelled() => {
                        stop_child(&mut child, dir.config.stop_grace).await;
                        None
                    }
                    status = child.wait() => Some(match status {
                        Ok(s) => format!("session process exited ({s})"),
                        Err(e) => format!("waiting for the session process failed: {e}"),
                    }),
                    () = watch_pod(&dir, &sup, route) => None,
                };
                if let Ok(mut p) = sup.proc.lock() {
                    p.ready = false;
                    p.pid = None;
                    if let Some(why) = &exit {
                        p.last_exit = Some(why.clone());
                        p.restarts += 1;
                    }
                }
                let _ = std::fs::remove_file(dir.pid_file(&sup.name));
                dir.board.apply(&sup.name, Observed::Unreachable);
                match exit {
                    None => break,
                    Some(why) => warn!(reason = %why, backoff_ms = backoff.as_millis() as u64, "session process ended; restarting"),
                }
            }
            Err(e) => {
                warn!(error = %e, "could not start the session process");
                if let Ok(mut p) = sup.proc.lock() {
                    p.last_exit = Some(format!("could not start: {e}"));
                }
            }
        }
        // A process that ran for a while earns a fresh backoff.
        if started.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_millis(500);
        }
        tokio::select! {
            _ = sup.cancel.cancelled() => break,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(dir.config.max_backoff);
    }
}

/// Waits until the pod answers, then follows its status with the long poll, forever (the
/// caller's `select!` ends it when the process exits or the session is stopped).
async fn watch_pod(dir: &LocalDirectory, sup: &Supervised, route: Route) {
    let mut version: Option<u64> = None;
    loop {
        match dir.client.status(&route, version, version.map(|_| 20)).await {
            Ok(status) => {
                version = Some(status.version);
                let first = sup.proc.lock().map(|mut p| !std::mem::replace(&mut p.ready, true)).unwrap_or(false);
                if first {
                    info!(phase = %status.phase, "session process ready");
                }
                dir.board.apply(&sup.name, Observed::Status(status));
            }
            Err(_) => {
                if let Ok(mut p) = sup.proc.lock() {
                    p.ready = false;
                }
                version = None;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

fn free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn spawn_session(dir: &LocalDirectory, sup: &Supervised) -> anyhow::Result<(Child, u16)> {
    let (program, args) = dir
        .config
        .session_command
        .split_first()
        .ok_or_else(|| anyhow::anyhow!("no session command configured"))?;
    let port = free_port()?;
    let data = dir.session_dir(&sup.name);
    std::fs::create_dir_all(&data)?;
    let log_path = dir.config.data_dir.join("logs").join(format!("{}.log", sup.name));
    let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
    let rate = RateLimitSpec {
        messages_per_minute: u32::try_from(sup.row.rate_per_minute).unwrap_or(30),
        burst: u32::try_from(sup.row.rate_burst).unwrap_or(5),
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env(env::ENGINE, sup.engine.as_str())
        .env(env::DATA_DIR, &data)
        .env(env::LISTEN, format!("127.0.0.1:{port}"))
        .env(env::TOKEN, &sup.row.pod_token)
        .env(env::EVENTS_URL, &dir.config.events_url)
        .env(env::SESSION, sup.name.as_str())
        .env(env::NAMESPACE, "local")
        .env(env::RATE_PER_MINUTE, rate.messages_per_minute.to_string())
        .env(env::RATE_BURST, rate.burst.to_string())
        .env_remove(env::PHONE_NUMBER)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true);
    if let Some(phone) = &sup.row.phone_number {
        cmd.env(env::PHONE_NUMBER, phone);
    }
    for (k, v) in &dir.config.extra_env {
        cmd.env(k, v);
    }
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    Ok((cmd.spawn()?, port))
}

/// SIGTERM, then SIGKILL after `grace`.
async fn stop_child(child: &mut Child, grace: Duration) {
    if let Some(pid) = child.id() {
        signal(pid, libc::SIGTERM);
        if tokio::time::timeout(grace, child.wait()).await.is_ok() {
            info!(pid, "session process stopped");
            return;
        }
        warn!(pid, "session process ignored SIGTERM; killing it");
    }
    let _ = child.kill().await;
}

fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) with a pid we started; no memory is touched.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// A session process left over from a gateway that was killed (its pid file survived) must
/// not run next to the new one: two clients of one account get it logged out.
async fn kill_stale_process(dir: &LocalDirectory, name: &SessionName) {
    let pid_file = dir.pid_file(name);
    let Ok(text) = std::fs::read_to_string(&pid_file) else { return };
    let Ok(pid) = text.trim().parse::<u32>() else { return };
    let data = dir.session_dir(name);
    if !process_uses(pid, &data) {
        let _ = std::fs::remove_file(&pid_file);
        return;
    }
    warn!(pid, "stopping a session process left over from an earlier gateway");
    signal(pid, libc::SIGTERM);
    let deadline = Instant::now() + dir.config.stop_grace;
    while Instant::now() < deadline && process_uses(pid, &data) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if process_uses(pid, &data) {
        signal(pid, libc::SIGKILL);
    }
    let _ = std::fs::remove_file(&pid_file);
}

/// Whether `pid` is alive and is the session process for `data` (its environment names the
/// data directory), so a recycled pid is never signalled.
fn process_uses(pid: u32, data: &Path) -> bool {
    let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else { return false };
    if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // A zombie is already gone.
        if stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')) {
            return false;
        }
    }
    let needle = format!("{}={}", env::DATA_DIR, data.display());
    environ.split(|b| *b == 0).any(|kv| kv == needle.as_bytes())
}
