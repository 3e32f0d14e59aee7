//! Load and soak: `wa-gateway local` with N sandbox sessions (one `wa-session` process each),
//! sends at a fixed rate through the gateway's public API for a while, then an accounting of
//! every message and of the memory of every process.
//!
//! One code path for the documented 10-minute run (`bench/soak/run.sh`, release builds) and
//! the short CI run (`scripts/ci.d/60-load.sh`, debug builds): only the figures in
//! [`SoakConfig`] differ, the checks are the same ([`SoakReport::checks`]).
//!
//! What is checked, after the load:
//! - the rate was held: accepted sends per second of the schedule >= `min_rate_fraction` of
//!   the target, and no answer other than 201 beyond `max_error_rate`;
//! - every accepted message (201) ended `sent` or later in the gateway's store, read back
//!   through `GET /v1/sessions/{name}/messages` (with receipts on: ended `read`, so every
//!   receipt event also arrived); no outbound message is left `queued`; a message the client
//!   got an error for is `failed` with a reason; no WhatsApp id appears twice;
//! - the counters agree: the gateway's `wa_gateway_messages_accepted_total` equals the
//!   store's outbound rows, and the pods' `wa_session_messages_sent_total` (collected by the
//!   gateway) equals the number of messages the store has as sent: nothing doubled, nothing
//!   dropped between the gateway and the pods;
//! - memory: VmRSS of the gateway and of every session process at the end of the load is at
//!   most `gateway_growth_mib` / `pod_growth_mib` above its value after the warm-up;
//! - no session process restarted and the gateway is still running.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use serde_json::{Value, json};

use crate::load::{self, LoadResult, Outcome, Schedule, percentile};
use crate::process::{ChildProcess, wait_for_http, wait_until};

/// What to run and the bounds the checks use.
#[derive(Debug, Clone)]
pub struct SoakConfig {
    /// `wa-gateway`; its `session` subcommand runs the sessions unless `session_bin` is set.
    pub gateway_bin: PathBuf,
    /// `wa-session`, what a pod runs (given to the gateway as `WA_SESSION_BIN`).
    pub session_bin: Option<PathBuf>,
    pub sessions: usize,
    /// Sends per second through the gateway, spread round-robin over the sessions.
    pub rate: f64,
    pub duration: Duration,
    /// Memory after this much of the load is the reference the growth is measured from.
    pub warmup: Duration,
    /// Requests open at once before due ones are skipped (and counted as errors).
    pub max_in_flight: usize,
    /// `postgres://…` server URL (a database is created and dropped) or `None` for SQLite.
    pub postgres_admin_url: Option<String>,
    /// Sandbox receipts (delivered, read) after these delays; `None`: no receipts beyond `sent`.
    pub receipts_ms: Option<(u64, u64)>,
    /// Keep the gateway's data directory and logs here (otherwise a temporary directory).
    pub work_dir: Option<PathBuf>,
    /// Time allowed after the load for events and receipts to settle.
    pub drain_timeout: Duration,
    pub bounds: Bounds,
}

#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub min_rate_fraction: f64,
    pub max_error_rate: f64,
    /// VmRSS growth of the gateway from after the warm-up to the end of the load.
    pub gateway_growth_mib: f64,
    /// VmRSS growth of each session process over the same interval.
    pub pod_growth_mib: f64,
    /// p99 latency of accepted sends (from the time each was due).
    pub max_p99_ms: f64,
}

impl SoakConfig {
    /// Per-session rate limit (the spec's `rateLimit`): twice the share of the load, within
    /// the API's limits (6000/min, burst 1000), so pacing never refuses a send of the run.
    pub fn rate_limit(&self) -> (u32, u32) {
        let per_session = self.rate / self.sessions.max(1) as f64;
        let per_minute = ((per_session * 60.0 * 2.0).ceil() as u32).clamp(60, 6000);
        let burst = ((per_session * 2.0).ceil() as u32).clamp(20, 1000);
        (per_minute, burst)
    }
}

/// Growth of a session process allowed beyond what its bounded tables take.
pub const POD_SLACK_MIB: f64 = 2.0;

/// The VmRSS growth a session process may show from the end of the warm-up to the end of the
/// load: the share of its full tables ([`wa_api::pod::FULL_TABLES_MIB`], the message log and
/// the idempotency keys) that the sends of that interval fill, plus [`POD_SLACK_MIB`]. A pod
/// that keeps anything per message beyond those bounded tables crosses it once its tables are
/// full; before that, the tables grow by design.
pub fn pod_growth_bound(per_session_rate: f64, warmup: Duration, duration: Duration) -> f64 {
    let capacity = wa_api::pod::MESSAGE_LOG_ENTRIES.max(wa_api::pod::IDEMPOTENCY_KEYS) as f64;
    let held = |d: Duration| (per_session_rate * d.as_secs_f64()).min(capacity);
    let filled = (held(duration) - held(warmup)) / capacity;
    wa_api::pod::FULL_TABLES_MIB * filled + POD_SLACK_MIB
}

/// Memory of one process, KiB of VmRSS.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rss {
    pub before_load: u64,
    pub after_warmup: u64,
    pub end_of_load: u64,
    pub peak: u64,
    pub settled: u64,
}

impl Rss {
    pub fn growth_mib(&self) -> f64 {
        (self.end_of_load as f64 - self.after_warmup as f64) / 1024.0
    }
}

/// CPU seconds used during the load.
#[derive(Debug, Clone, Default)]
pub struct CpuUse {
    /// The gateway's threads by name (tokio workers, SQLite workers, …).
    pub gateway_threads: BTreeMap<String, f64>,
    pub gateway: f64,
    pub pods: f64,
    pub generator: f64,
    pub postgres: Option<f64>,
    pub wall: f64,
}

#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

#[derive(Debug, Clone)]
pub struct SoakReport {
    pub config: SoakConfig,
    pub load: LoadResult,
    pub gateway_rss: Rss,
    pub pod_rss: Vec<(String, Rss)>,
    pub cpu: CpuUse,
    /// Outbound messages in the store by status.
    pub store_status: BTreeMap<String, u64>,
    /// The gateway's own latency histogram of the send route: (upper bound s, count).
    pub server_buckets: Vec<(f64, u64)>,
    pub server_count: u64,
    pub server_sum_seconds: f64,
    pub drain_seconds: f64,
    pub checks: Vec<Check>,
    pub loadavg: String,
}

impl SoakReport {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.passed)
    }

    /// Markdown: the figures, then the checks.
    pub fn render(&self) -> String {
        let c = &self.config;
        let l = &self.load;
        let ms = |us: u32| us as f64 / 1000.0;
        let mut o = String::new();
        let db = if c.postgres_admin_url.is_some() { "PostgreSQL" } else { "SQLite" };
        let _ = writeln!(
            o,
            "{} sandbox sessions, {} sends/s for {} s (open loop, {} in flight at most), gateway on {db}, receipts {}; rate limit per session {}/min, burst {}",
            c.sessions,
            c.rate,
            c.duration.as_secs(),
            c.max_in_flight,
            match c.receipts_ms {
                Some((d, r)) => format!("delivered after {d} ms, read after {r} ms"),
                None => "off".into(),
            },
            c.rate_limit().0,
            c.rate_limit().1,
        );
        let _ = writeln!(o);
        let _ = writeln!(o, "| measurement | value |");
        let _ = writeln!(o, "|---|---|");
        let _ = writeln!(o, "| sends planned / sent / accepted (201) | {} / {} / {} |", l.planned, l.issued, l.accepted());
        let _ = writeln!(o, "| achieved rate (accepted per second of the schedule) | {:.1}/s ({:.1}% of the target) |", l.achieved_rate(), 100.0 * l.achieved_rate() / c.rate);
        let min_sec = l.accepted_per_second.iter().min().copied().unwrap_or(0);
        let _ = writeln!(o, "| slowest second (accepted sends due in it) | {min_sec} |");
        let errors = if l.errors.is_empty() {
            "none".to_owned()
        } else {
            l.errors.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", ")
        };
        let _ = writeln!(o, "| errors (rate) | {:.4}% — {errors} |", 100.0 * l.error_rate());
        let _ = writeln!(
            o,
            "| latency of accepted sends, from when each was due: p50 / p90 / p99 / p99.9 / max | {:.2} / {:.2} / {:.2} / {:.2} / {:.2} ms |",
            ms(percentile(&l.latencies_us, 50.0)),
            ms(percentile(&l.latencies_us, 90.0)),
            ms(percentile(&l.latencies_us, 99.0)),
            ms(percentile(&l.latencies_us, 99.9)),
            ms(l.latencies_us.last().copied().unwrap_or(0)),
        );
        let _ = writeln!(
            o,
            "| p99 latency by minute of the run | {} ms |",
            l.p99_per_minute_us.iter().map(|v| format!("{:.1}", ms(*v))).collect::<Vec<_>>().join(", ")
        );
        let _ = writeln!(
            o,
            "| generator lateness (sent minus due): p99 / max | {:.2} / {:.2} ms |",
            ms(percentile(&l.lateness_us, 99.0)),
            ms(l.lateness_us.last().copied().unwrap_or(0)),
        );
        if self.server_count > 0 {
            let mean = self.server_sum_seconds / self.server_count as f64 * 1000.0;
            let p = |q: f64| bucket_quantile(&self.server_buckets, self.server_count, q).map_or("> 30 s".into(), |b| format!("≤ {} ms", b * 1000.0));
            let _ = writeln!(o, "| gateway's own histogram of the send route: mean / p50 / p99 | {mean:.2} ms / {} / {} |", p(0.5), p(0.99));
        }
        let mib = |kib: u64| kib as f64 / 1024.0;
        let g = &self.gateway_rss;
        let _ = writeln!(
            o,
            "| gateway VmRSS: before load / after warm-up / end of load / peak / settled | {:.1} / {:.1} / {:.1} / {:.1} / {:.1} MiB (growth after warm-up {:+.1} MiB, bound {} MiB) |",
            mib(g.before_load), mib(g.after_warmup), mib(g.end_of_load), mib(g.peak), mib(g.settled), g.growth_mib(), c.bounds.gateway_growth_mib
        );
        if !self.pod_rss.is_empty() {
            let n = self.pod_rss.len() as f64;
            let avg = |f: fn(&Rss) -> u64| self.pod_rss.iter().map(|(_, r)| f(r)).sum::<u64>() as f64 / n / 1024.0;
            let max_growth = self.pod_rss.iter().map(|(_, r)| r.growth_mib()).fold(f64::MIN, f64::max);
            let max_end = self.pod_rss.iter().map(|(_, r)| r.end_of_load).max().unwrap_or(0);
            let _ = writeln!(
                o,
                "| session pods VmRSS, mean: before load / after warm-up / end of load / settled | {:.1} / {:.1} / {:.1} / {:.1} MiB (largest at end {:.1} MiB; largest growth after warm-up {:+.1} MiB, bound {} MiB) |",
                avg(|r| r.before_load), avg(|r| r.after_warmup), avg(|r| r.end_of_load), avg(|r| r.settled), mib(max_end), max_growth, c.bounds.pod_growth_mib
            );
        }
        let cpu = &self.cpu;
        let wall = cpu.wall.max(1e-9);
        let threads = cpu
            .gateway_threads
            .iter()
            .filter(|(_, s)| **s >= 0.005 * wall)
            .map(|(n, s)| format!("{n} {:.2}", s / wall))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            o,
            "| CPU during the load, in cores: gateway / all pods / load generator{} | {:.2} / {:.2} / {:.2}{} (gateway threads: {threads}) |",
            if cpu.postgres.is_some() { " / PostgreSQL" } else { "" },
            cpu.gateway / wall,
            cpu.pods / wall,
            cpu.generator / wall,
            cpu.postgres.map(|p| format!(" / {:.2}", p / wall)).unwrap_or_default(),
        );
        let status = self.store_status.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ");
        let _ = writeln!(o, "| outbound messages in the store by status, after {:.1} s of drain | {status} |", self.drain_seconds);
        let _ = writeln!(o, "| load average at the end | {} |", self.loadavg);
        let _ = writeln!(o);
        for ch in &self.checks {
            let _ = writeln!(o, "- [{}] {}: {}", if ch.passed { "x" } else { " " }, ch.name, ch.detail);
        }
        o
    }
}

/// The smallest bucket bound holding the `q` quantile, from cumulative bucket counts.
fn bucket_quantile(buckets: &[(f64, u64)], count: u64, q: f64) -> Option<f64> {
    let want = (q * count as f64).ceil() as u64;
    buckets.iter().find(|(_, c)| *c >= want).map(|(b, _)| *b)
}

// ---- /proc ----------------------------------------------------------------------------------

/// VmRSS of a process in KiB.
pub fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// utime + stime of a `/proc/.../stat` file, seconds.
fn stat_cpu_seconds(path: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks_per_second())
}

fn process_cpu(pid: u32) -> f64 {
    stat_cpu_seconds(&format!("/proc/{pid}/stat")).unwrap_or(0.0)
}

/// CPU seconds of each thread of a process, summed by thread name (digits dropped, so
/// `sqlx-sqlite-worker-3` and `-4` count together).
fn thread_cpu(pid: u32) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return out };
    for t in tasks.flatten() {
        let dir = t.path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let name: String = name.trim().trim_end_matches(|c: char| c.is_ascii_digit() || c == '-').to_owned();
        let secs = stat_cpu_seconds(&dir.join("stat").to_string_lossy()).unwrap_or(0.0);
        *out.entry(name).or_insert(0.0) += secs;
    }
    out
}

/// Processes whose command line starts with `postgres` (the server and its backends).
fn postgres_cpu() -> f64 {
    let Ok(procs) = std::fs::read_dir("/proc") else { return 0.0 };
    procs
        .flatten()
        .filter_map(|p| p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.starts_with("postgres")))
        .map(process_cpu)
        .sum()
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")).unwrap_or_default()
}

// ---- the gateway's /metrics -------------------------------------------------------------------

/// Samples of one metric name: labels and value.
pub fn samples(text: &str, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let (head, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let (metric, labels) = match head.split_once('{') {
            Some((m, l)) => (m, l.trim_end_matches('}')),
            None => (head, ""),
        };
        if metric != name {
            continue;
        }
        let mut map = BTreeMap::new();
        for pair in labels.split("\",").filter(|p| !p.is_empty()) {
            if let Some((k, v)) = pair.split_once("=\"") {
                map.insert(k.to_owned(), v.trim_end_matches('"').to_owned());
            }
        }
        if let Ok(v) = value.parse::<f64>() {
            out.push((map, v));
        }
    }
    out
}

fn sum(text: &str, name: &str, filter: &[(&str, &str)]) -> f64 {
    samples(text, name)
        .into_iter()
        .filter(|(l, _)| filter.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
        .map(|(_, v)| v)
        .sum()
}

// ---- the run --------------------------------------------------------------------------------

struct Api {
    http: reqwest::Client,
    base: String,
    admin: String,
}

impl Api {
    async fn call(&self, method: reqwest::Method, path: &str, key: &str, body: Option<Value>) -> anyhow::Result<(u16, Value)> {
        let mut req = self.http.request(method, format!("{}{path}", self.base)).bearer_auth(key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.with_context(|| format!("calling {path}"))?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
    }

    async fn metrics(&self) -> anyhow::Result<String> {
        Ok(self.http.get(format!("{}/metrics", self.base)).send().await?.error_for_status()?.text().await?)
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn psql(url: &str, sql: &str) -> anyhow::Result<()> {
    let out = std::process::Command::new("psql").args(["-q", "-v", "ON_ERROR_STOP=1", url, "-c", sql]).output().context("running psql")?;
    if !out.status.success() {
        bail!("psql {sql:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// A PostgreSQL database for one run, dropped when this goes away.
struct Database {
    admin_url: String,
    name: String,
}

impl Drop for Database {
    fn drop(&mut self) {
        let _ = psql(&self.admin_url, &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
    }
}

fn session_name(i: usize) -> String {
    format!("soak-{i:03}")
}

/// Runs the whole thing. Errors are failures to run (a process did not start); failed
/// checks are in the report.
pub async fn run(config: SoakConfig) -> anyhow::Result<SoakReport> {
    let temp = tempfile::Builder::new().prefix("wa-soak-").tempdir()?;
    let work = config.work_dir.clone().unwrap_or_else(|| temp.path().to_owned());
    std::fs::create_dir_all(&work)?;
    // The database and the sessions' data stay in the temporary directory (a full run
    // stores millions of rows); only the logs are copied to the work directory.
    let data = temp.path().join("data");
    let port = free_port()?;
    let admin = format!("soak-admin-{}", uuid::Uuid::new_v4().simple());

    let mut env = vec![
        ("WA_ADMIN_KEY".to_owned(), admin.clone()),
        ("WA_GATEWAY_LOG".to_owned(), "warn".to_owned()),
    ];
    let database = match &config.postgres_admin_url {
        Some(url) => {
            let name = format!("wa_soak_{}", std::process::id());
            psql(url, &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))?;
            psql(url, &format!("CREATE DATABASE {name}"))?;
            let base = url.rsplit_once('/').map_or(url.as_str(), |(b, _)| b);
            env.push(("DATABASE_URL".to_owned(), format!("{base}/{name}")));
            Some(Database { admin_url: url.clone(), name })
        }
        None => None,
    };
    if let Some(bin) = &config.session_bin {
        env.push(("WA_SESSION_BIN".to_owned(), bin.display().to_string()));
    }
    let mut args: Vec<String> = [
        "local",
        "--data-dir",
        &data.display().to_string(),
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--scrape-interval-seconds",
        "2",
        "--session-env",
        "WA_LOG=warn",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (delivered, read) = config.receipts_ms.unwrap_or((86_400_000, 86_400_000));
    args.extend(["--session-env".into(), format!("WA_SANDBOX_DELIVERED_MS={delivered}")]);
    args.extend(["--session-env".into(), format!("WA_SANDBOX_READ_MS={read}")]);
    let mut gateway = ChildProcess::spawn("gateway", &config.gateway_bin, &args, &env, &work)?;
    let base = format!("http://127.0.0.1:{port}");
    wait_for_http(&format!("{base}/healthz"), Duration::from_secs(30)).await?;

    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(35))
        .pool_max_idle_per_host(config.max_in_flight)
        .build()?;
    let api = Arc::new(Api { http, base: base.clone(), admin: admin.clone() });

    // Sessions: create, wait until each awaits its scan, scan, wait until connected.
    let names: Vec<String> = (0..config.sessions).map(session_name).collect();
    let (per_minute, burst) = config.rate_limit();
    let results = futures::stream::iter(names.clone())
        .map(|name| {
            let api = api.clone();
            async move { connect_session(&api, &name, per_minute, burst).await }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    for r in results {
        r.with_context(|| format!("preparing the sessions; gateway log:\n{}", gateway.log_tail(30)))?;
    }
    let (status, key) = api
        .call(
            reqwest::Method::POST,
            "/v1/keys",
            &admin,
            Some(json!({"name": "soak", "permissions": ["send", "read"], "sessions": names})),
        )
        .await?;
    if status != 201 {
        bail!("creating the API key: {status} {key}");
    }
    let key = key["key"].as_str().context("the key's raw value")?.to_owned();

    // The processes whose memory is watched.
    let gw_pid = gateway.pid();
    let mut pod_pids = Vec::new();
    for name in &names {
        let pid: u32 = std::fs::read_to_string(data.join("run").join(format!("{name}.pid")))
            .with_context(|| format!("the pid file of {name}"))?
            .trim()
            .parse()?;
        pod_pids.push((name.clone(), pid));
    }
    // Idle readings a moment after the sessions connected.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut gateway_rss = Rss { before_load: vm_rss_kib(gw_pid).unwrap_or(0), ..Default::default() };
    let mut pod_rss: Vec<Rss> = pod_pids.iter().map(|(_, p)| Rss { before_load: vm_rss_kib(*p).unwrap_or(0), ..Default::default() }).collect();

    // Sampler: peak memory every 500 ms, and the readings after the warm-up.
    let peak = Arc::new(Mutex::new((0u64, vec![0u64; pod_pids.len()])));
    let warm = Arc::new(Mutex::new(None::<(u64, Vec<u64>)>));
    let sampler = {
        let (peak, warm, pids) = (peak.clone(), warm.clone(), pod_pids.clone());
        let warmup = config.warmup;
        tokio::spawn(async move {
            let started = Instant::now();
            loop {
                let gw = vm_rss_kib(gw_pid).unwrap_or(0);
                let pods: Vec<u64> = pids.iter().map(|(_, p)| vm_rss_kib(*p).unwrap_or(0)).collect();
                if let Ok(mut p) = peak.lock() {
                    p.0 = p.0.max(gw);
                    for (m, v) in p.1.iter_mut().zip(&pods) {
                        *m = (*m).max(*v);
                    }
                }
                if started.elapsed() >= warmup
                    && let Ok(mut w) = warm.lock()
                    && w.is_none()
                {
                    *w = Some((gw, pods));
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };

    let cpu0 = (thread_cpu(gw_pid), process_cpu(gw_pid), pod_pids.iter().map(|(_, p)| process_cpu(*p)).sum::<f64>(), process_cpu(std::process::id()), database.as_ref().map(|_| postgres_cpu()));
    let wall0 = Instant::now();

    // The load.
    let schedule = Schedule { rate: config.rate, duration: config.duration, max_in_flight: config.max_in_flight };
    let paths: Arc<Vec<String>> = Arc::new(names.iter().map(|n| format!("{base}/v1/sessions/{n}/messages")).collect());
    let auth = format!("Bearer {key}");
    let result = load::run(schedule, |seq| {
        let http = api.http.clone();
        let url = paths[(seq % paths.len() as u64) as usize].clone();
        let auth = auth.clone();
        let body = format!(r#"{{"to":"+1555{:07}","type":"text","text":"soak message {seq}"}}"#, seq % 10_000);
        async move { send_one(&http, &url, &auth, body).await }
    })
    .await;

    let wall = wall0.elapsed().as_secs_f64();
    let cpu = CpuUse {
        gateway_threads: {
            let mut t = thread_cpu(gw_pid);
            for (k, v) in t.iter_mut() {
                *v -= cpu0.0.get(k).copied().unwrap_or(0.0);
            }
            t
        },
        gateway: process_cpu(gw_pid) - cpu0.1,
        pods: pod_pids.iter().map(|(_, p)| process_cpu(*p)).sum::<f64>() - cpu0.2,
        generator: process_cpu(std::process::id()) - cpu0.3,
        postgres: cpu0.4.map(|c| postgres_cpu() - c),
        wall,
    };
    gateway_rss.end_of_load = vm_rss_kib(gw_pid).unwrap_or(0);
    for (r, (_, pid)) in pod_rss.iter_mut().zip(&pod_pids) {
        r.end_of_load = vm_rss_kib(*pid).unwrap_or(0);
    }
    sampler.abort();
    let warm_readings = warm.lock().ok().and_then(|w| w.clone());
    match warm_readings {
        Some((gw, pods)) => {
            gateway_rss.after_warmup = gw;
            for (r, v) in pod_rss.iter_mut().zip(pods) {
                r.after_warmup = v;
            }
        }
        None => bail!("the load ended before the warm-up did ({:?})", config.warmup),
    }
    if let Ok(p) = peak.lock() {
        gateway_rss.peak = p.0.max(gateway_rss.end_of_load);
        for (r, v) in pod_rss.iter_mut().zip(&p.1) {
            r.peak = (*v).max(r.end_of_load);
        }
    }
    let metrics_at_end = api.metrics().await.unwrap_or_default();

    // Drain: every pod's outbox empty and every receipt applied, as the gateway's
    // collected metrics show.
    let drain_started = Instant::now();
    let expected_receipts_per_send = if config.receipts_ms.is_some() { 3.0 } else { 1.0 };
    let accepted = result.accepted() as f64;
    let sessions = config.sessions as f64;
    let drained = wait_until(config.drain_timeout, "the pods' outboxes to empty and every receipt to arrive", || {
        let api = api.clone();
        async move {
            let m = api.metrics().await.ok()?;
            let outbox = sum(&m, "wa_session_outbox_events", &[]);
            let up = sum(&m, "wa_session_up", &[]);
            let sent = sum(&m, "wa_session_messages_sent_total", &[]);
            let receipts = sum(&m, "wa_gateway_events_total", &[("type", "receipt"), ("result", "accepted")]);
            let gw_outbox = sum(&m, "wa_gateway_outbox_depth", &[]);
            (outbox == 0.0 && gw_outbox == 0.0 && up == sessions && sent >= accepted && receipts >= sent * expected_receipts_per_send)
                .then_some(())
        }
    })
    .await;
    let drain_seconds = drain_started.elapsed().as_secs_f64();
    // One more collection so the counters read below are from after the drain.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let metrics = api.metrics().await?;
    gateway_rss.settled = vm_rss_kib(gw_pid).unwrap_or(0);
    for (r, (_, pid)) in pod_rss.iter_mut().zip(&pod_pids) {
        r.settled = vm_rss_kib(*pid).unwrap_or(0);
    }

    // The store, read back through the API.
    let mut rows: HashMap<u128, StoredMessage> = HashMap::with_capacity(result.accepted() as usize + 1024);
    for name in &names {
        read_history(&api, &key, name, &mut rows).await?;
    }

    let mut checks = Vec::new();
    let b = config.bounds;
    let l = &result;
    checks.push(Check {
        name: "rate held".into(),
        passed: l.achieved_rate() >= b.min_rate_fraction * config.rate,
        detail: format!("{:.1} accepted/s of {} planned (at least {:.0}% required)", l.achieved_rate(), config.rate, b.min_rate_fraction * 100.0),
    });
    checks.push(Check {
        name: "errors".into(),
        passed: l.error_rate() <= b.max_error_rate,
        detail: format!("{} of {} sends got no 201 ({:.4}%; at most {:.4}% allowed)", l.failed(), l.planned, 100.0 * l.error_rate(), 100.0 * b.max_error_rate),
    });
    let p99 = percentile(&l.latencies_us, 99.0) as f64 / 1000.0;
    checks.push(Check { name: "p99 latency".into(), passed: p99 <= b.max_p99_ms, detail: format!("{p99:.2} ms (at most {} ms)", b.max_p99_ms) });

    // Accounting.
    let final_status = if config.receipts_ms.is_some() { &["read"][..] } else { &["sent", "delivered", "read"][..] };
    let mut missing = 0u64;
    let mut not_final: BTreeMap<String, u64> = BTreeMap::new();
    let mut accepted_set = HashSet::with_capacity(l.accepted_ids.len());
    for id in &l.accepted_ids {
        let Ok(u) = uuid::Uuid::parse_str(id) else {
            missing += 1;
            continue;
        };
        accepted_set.insert(u.as_u128());
        match rows.get(&u.as_u128()) {
            None => missing += 1,
            Some(m) if !final_status.contains(&m.status.as_str()) => *not_final.entry(m.status.clone()).or_insert(0) += 1,
            Some(_) => {}
        }
    }
    let mut store_status: BTreeMap<String, u64> = BTreeMap::new();
    let mut failed_without_reason = 0u64;
    let mut unaccounted = 0u64;
    let mut wa_ids = HashSet::with_capacity(rows.len());
    let mut doubled = 0u64;
    for (id, m) in &rows {
        *store_status.entry(m.status.clone()).or_insert(0) += 1;
        if !accepted_set.contains(id) {
            if m.status == "failed" {
                if !m.has_error {
                    failed_without_reason += 1;
                }
            } else {
                unaccounted += 1;
            }
        }
        if let Some(w) = &m.wa_id
            && !wa_ids.insert(w.clone())
        {
            doubled += 1;
        }
    }
    checks.push(Check {
        name: "every accepted message ended sent".into(),
        passed: missing == 0 && not_final.is_empty(),
        detail: format!(
            "{} accepted; {} missing from the store; not {}: {:?}",
            l.accepted(),
            missing,
            final_status.join("/"),
            not_final
        ),
    });
    checks.push(Check {
        name: "refused sends are failed with a reason".into(),
        passed: failed_without_reason == 0 && unaccounted == 0 && store_status.get("queued").copied().unwrap_or(0) == 0,
        detail: format!(
            "{} stored sends the client got no 201 for: failed without a reason {failed_without_reason}, not failed {unaccounted}; queued in the store: {}",
            rows.len() - accepted_set.len().min(rows.len()),
            store_status.get("queued").copied().unwrap_or(0)
        ),
    });
    checks.push(Check { name: "no WhatsApp id twice".into(), passed: doubled == 0, detail: format!("{} WhatsApp ids, {doubled} repeated", wa_ids.len()) });
    let gw_accepted = sum(&metrics, "wa_gateway_messages_accepted_total", &[]);
    let pods_sent = sum(&metrics, "wa_session_messages_sent_total", &[]);
    let stored_sent = rows.values().filter(|m| m.wa_id.is_some()).count() as f64;
    checks.push(Check {
        name: "counters agree".into(),
        passed: gw_accepted == rows.len() as f64 && pods_sent == stored_sent && drained.is_ok(),
        detail: format!(
            "wa_gateway_messages_accepted_total {gw_accepted}, outbound rows {}; pods' wa_session_messages_sent_total {pods_sent}, rows with a WhatsApp id {stored_sent}; drained: {}",
            rows.len(),
            match &drained {
                Ok(()) => format!("yes, in {drain_seconds:.1} s"),
                Err(e) => e.to_string(),
            }
        ),
    });

    // Memory.
    checks.push(Check {
        name: "gateway memory bounded".into(),
        passed: gateway_rss.growth_mib() <= b.gateway_growth_mib,
        detail: format!("VmRSS {:+.1} MiB from after the warm-up to the end (at most {} MiB)", gateway_rss.growth_mib(), b.gateway_growth_mib),
    });
    let worst = pod_rss.iter().zip(&pod_pids).max_by(|a, b| a.0.growth_mib().total_cmp(&b.0.growth_mib()));
    if let Some((r, (name, _))) = worst {
        checks.push(Check {
            name: "pod memory bounded".into(),
            passed: r.growth_mib() <= b.pod_growth_mib,
            detail: format!("largest VmRSS growth from after the warm-up to the end: {name} {:+.1} MiB (at most {} MiB)", r.growth_mib(), b.pod_growth_mib),
        });
    }
    let mut restarted = Vec::new();
    for (name, pid) in &pod_pids {
        let now: Option<u32> = std::fs::read_to_string(data.join("run").join(format!("{name}.pid"))).ok().and_then(|s| s.trim().parse().ok());
        if now != Some(*pid) {
            restarted.push(name.clone());
        }
    }
    let gateway_alive = gateway.try_exited().is_none();
    checks.push(Check {
        name: "no process restarted".into(),
        passed: restarted.is_empty() && gateway_alive,
        detail: format!("gateway running: {gateway_alive}; sessions restarted: {restarted:?}"),
    });

    let (server_buckets, server_count, server_sum_seconds) = send_route_histogram(&metrics_at_end);
    let report = SoakReport {
        config: config.clone(),
        load: result,
        gateway_rss,
        pod_rss: pod_pids.iter().map(|(n, _)| n.clone()).zip(pod_rss).collect(),
        cpu,
        store_status,
        server_buckets,
        server_count,
        server_sum_seconds,
        drain_seconds,
        checks,
        loadavg: loadavg(),
    };
    gateway.stop(Duration::from_secs(15)).await;
    drop(database);
    if config.work_dir.is_some() {
        let logs = work.join("logs");
        std::fs::create_dir_all(&logs)?;
        for f in std::fs::read_dir(data.join("logs"))?.flatten() {
            std::fs::copy(f.path(), logs.join(f.file_name()))?;
        }
    }
    Ok(report)
}

fn send_route_histogram(metrics: &str) -> (Vec<(f64, u64)>, u64, f64) {
    let route = [("route", "/v1/sessions/{name}/messages"), ("method", "POST")];
    let mut buckets: Vec<(f64, u64)> = samples(metrics, "wa_gateway_http_request_duration_seconds_bucket")
        .into_iter()
        .filter(|(l, _)| route.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
        .filter_map(|(l, v)| l.get("le").and_then(|b| b.parse::<f64>().ok()).map(|b| (b, v as u64)))
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let count = sum(metrics, "wa_gateway_http_request_duration_seconds_count", &route) as u64;
    let secs = sum(metrics, "wa_gateway_http_request_duration_seconds_sum", &route);
    (buckets, count, secs)
}

async fn send_one(http: &reqwest::Client, url: &str, auth: &str, body: String) -> Outcome {
    let resp = http
        .post(url)
        .header(reqwest::header::AUTHORIZATION, auth)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await;
    let resp = match resp {
        Ok(r) => r,
        Err(e) => return Outcome::Transport(if e.is_timeout() { "timeout".into() } else if e.is_connect() { "connect".into() } else { "other".into() }),
    };
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    if status == 201 {
        Outcome::Accepted(body["id"].as_str().unwrap_or_default().to_owned())
    } else {
        Outcome::Refused { status, code: body["error"]["code"].as_str().unwrap_or("-").to_owned() }
    }
}

async fn connect_session(api: &Api, name: &str, per_minute: u32, burst: u32) -> anyhow::Result<()> {
    let (status, body) = api
        .call(
            reqwest::Method::POST,
            "/v1/sessions",
            &api.admin,
            Some(json!({"name": name, "engine": "sandbox", "rateLimit": {"messagesPerMinute": per_minute, "burst": burst}})),
        )
        .await?;
    if status != 201 {
        bail!("creating session {name}: {status} {body}");
    }
    let path = format!("/v1/sessions/{name}");
    wait_until(Duration::from_secs(60), &format!("{name} to await its scan"), || async {
        let (_, s) = api.call(reqwest::Method::GET, &path, &api.admin, None).await.ok()?;
        (s["phase"] == "AwaitingScan" && s["ready"] == true).then_some(())
    })
    .await?;
    let (status, body) = api.call(reqwest::Method::POST, &format!("{path}/sandbox/scan"), &api.admin, None).await?;
    if !(200..300).contains(&status) {
        bail!("scanning {name}: {status} {body}");
    }
    wait_until(Duration::from_secs(60), &format!("{name} to connect"), || async {
        let (_, s) = api.call(reqwest::Method::GET, &path, &api.admin, None).await.ok()?;
        (s["phase"] == "Connected" && s["ready"] == true).then_some(())
    })
    .await
}

#[derive(Debug)]
struct StoredMessage {
    status: String,
    wa_id: Option<String>,
    has_error: bool,
}

/// Every outbound message of a session, through the history API (newest first, 200 a page).
async fn read_history(api: &Api, key: &str, session: &str, into: &mut HashMap<u128, StoredMessage>) -> anyhow::Result<()> {
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/v1/sessions/{session}/messages?direction=outbound&limit=200");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let (status, page) = api.call(reqwest::Method::GET, &path, key, None).await?;
        if status != 200 {
            bail!("reading {session}'s history: {status} {page}");
        }
        for m in page["items"].as_array().map(Vec::as_slice).unwrap_or_default() {
            let id = m["id"].as_str().and_then(|s| uuid::Uuid::parse_str(s).ok()).context("a message id")?;
            into.insert(
                id.as_u128(),
                StoredMessage {
                    status: m["status"].as_str().unwrap_or_default().to_owned(),
                    wa_id: m["waMessageId"].as_str().map(str::to_owned),
                    has_error: m.get("error").is_some_and(|e| !e.is_null()),
                },
            );
        }
        match page["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return Ok(()),
        }
    }
}

/// Where `wa-gateway` and `wa-session` are, next to this program (same target profile).
pub fn binaries_next_to_me() -> anyhow::Result<(PathBuf, Option<PathBuf>)> {
    let gateway = crate::process::workspace_binary("wa-gateway")?;
    let session = gateway.parent().map(|d| d.join("wa-session")).filter(|p: &PathBuf| p.is_file());
    Ok((gateway, session))
}

/// Writes the report next to the logs.
pub fn save(report: &SoakReport, path: &Path) -> anyhow::Result<()> {
    std::fs::write(path, report.render())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_read_labels_and_values() {
        let text = "# HELP x y\n# TYPE x counter\nwa_a{session=\"s1\",mode=\"sync\"} 3\nwa_a{session=\"s2\",mode=\"async\"} 4\nwa_b 7\nwa_ab 1\n";
        assert_eq!(sum(text, "wa_a", &[]), 7.0);
        assert_eq!(sum(text, "wa_a", &[("mode", "sync")]), 3.0);
        assert_eq!(sum(text, "wa_b", &[]), 7.0);
        assert_eq!(samples(text, "wa_a")[1].0.get("session").map(String::as_str), Some("s2"));
    }

    #[test]
    fn bucket_quantiles_take_the_first_bucket_that_holds_them() {
        let b = [(0.001, 10), (0.005, 98), (0.01, 100), (f64::INFINITY, 100)];
        assert_eq!(bucket_quantile(&b, 100, 0.5), Some(0.005));
        assert_eq!(bucket_quantile(&b, 100, 0.99), Some(0.01));
        assert_eq!(bucket_quantile(&b, 100, 0.1), Some(0.001));
    }

    #[test]
    fn rate_limits_leave_room_within_the_api_limits() {
        let cfg = |rate: f64, sessions| SoakConfig {
            gateway_bin: PathBuf::new(),
            session_bin: None,
            sessions,
            rate,
            duration: Duration::from_secs(1),
            warmup: Duration::ZERO,
            max_in_flight: 1,
            postgres_admin_url: None,
            receipts_ms: None,
            work_dir: None,
            drain_timeout: Duration::ZERO,
            bounds: Bounds { min_rate_fraction: 0.0, max_error_rate: 0.0, gateway_growth_mib: 0.0, pod_growth_mib: 0.0, max_p99_ms: 0.0 },
        };
        assert_eq!(cfg(1000.0, 50).rate_limit(), (2400, 40));
        assert_eq!(cfg(100_000.0, 10).rate_limit(), (6000, 1000));
        assert_eq!(cfg(1.0, 50).rate_limit(), (60, 20));
    }

    #[test]
    fn own_cpu_and_memory_are_readable() {
        let me = std::process::id();
        assert!(vm_rss_kib(me).unwrap() > 0);
        assert!(process_cpu(me) >= 0.0);
        assert!(!thread_cpu(me).is_empty());
    }

    #[test]
    fn a_pods_bound_follows_how_much_of_its_tables_the_run_fills() {
        let full = wa_api::pod::FULL_TABLES_MIB;
        let s = Duration::from_secs;
        // CI: 10 sends/s per session for 40 s after 15 s of warm-up fill 250 of 10,000 entries.
        let ci = pod_growth_bound(10.0, s(15), s(40));
        assert!((ci - (POD_SLACK_MIB + full * 0.025)).abs() < 1e-9, "{ci}");
        // The documented run: 20/s for 600 s after 60 s; the tables are full after 500 s.
        let soak = pod_growth_bound(20.0, s(60), s(600));
        assert!((soak - (POD_SLACK_MIB + full * 0.88)).abs() < 1e-9, "{soak}");
        // Full before the warm-up ends: only the slack.
        assert_eq!(pod_growth_bound(1000.0, s(60), s(600)), POD_SLACK_MIB);
    }
}
