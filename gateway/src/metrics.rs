//! `/metrics` in the Prometheus text format: the gateway's own series and the fleet view
//! (per-session memory, health, state and the pods' own `wa_session_*` series, labelled
//! `namespace` and `session`).
//!
//! Pod series are collected in the background by [`run_collector`] on an interval and
//! rendered from that snapshot; a scrape of `/metrics` never calls a pod.
//!
//! [`EXPORTED`] is the one list of the metric families the gateway itself exports (the
//! dashboards are checked against it); pods' own `wa_session_*` families pass through in
//! addition, as the session pod documents them.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use wa_api::{Phase, SessionName};

use crate::directory::{Observed, SessionDirectory};
use crate::pod_client::PodClient;
use crate::store::GroupCommitStats;

/// Metric families the gateway exports: name, type, help. Per-session families carry the
/// labels `namespace` and `session`.
pub const EXPORTED: &[(&str, &str, &str)] = &[
    ("wa_gateway_http_requests_total", "counter", "HTTP requests answered, by route template, method and status."),
    ("wa_gateway_http_request_duration_seconds", "histogram", "Time to answer HTTP requests, by route template and method."),
    ("wa_gateway_requests_in_flight", "gauge", "API requests being answered now (the ones the in-flight limit counts)."),
    ("wa_gateway_requests_shed_total", "counter", "API requests refused 503 OVERLOADED because the in-flight limit was reached."),
    ("wa_gateway_memory_trims_total", "counter", "Times free heap memory was handed back to the system after a backlog of requests drained."),
    ("wa_gateway_store_write_groups_total", "counter", "SQLite: transactions the writes on the send path were grouped into (none on PostgreSQL)."),
    ("wa_gateway_store_writes_total", "counter", "SQLite: writes on the send path (recording a send, its outcome, an event batch); divided by the groups, the average group size."),
    ("wa_gateway_outbox_depth", "gauge", "Sends recorded but not yet handed to a session pod."),
    ("wa_gateway_webhook_queue_depth", "gauge", "Webhook deliveries waiting for their next attempt."),
    ("wa_gateway_webhook_deliveries_total", "counter", "Webhook delivery attempts by result (delivered, retried, dead)."),
    ("wa_gateway_events_total", "counter", "Events received from session pods, by type and result (accepted, duplicate)."),
    ("wa_gateway_messages_accepted_total", "counter", "Sends accepted by the gateway, by session and mode (sync, async)."),
    ("wa_gateway_sessions", "gauge", "Sessions by state (phase)."),
    ("wa_gateway_resident_memory_bytes", "gauge", "Resident memory of the gateway process."),
    ("wa_gateway_build_info", "gauge", "Always 1; the version label tells the build."),
    ("wa_session_up", "gauge", "1 when the gateway's last collection from the session's pod succeeded."),
    ("wa_session_state", "gauge", "1 for the session's current state (phase), 0 for the others."),
    ("wa_session_resident_memory_bytes", "gauge", "Resident memory of the session's pod process."),
];

const BUCKETS: [f64; 15] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

#[derive(Default)]
struct Histogram {
    buckets: [AtomicU64; 15],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

type HttpKey = (String, String, u16);

#[derive(Default)]
pub struct Metrics {
    http_requests: RwLock<HashMap<HttpKey, Arc<AtomicU64>>>,
    http_durations: RwLock<HashMap<(String, String), Arc<Histogram>>>,
    /// API requests admitted and not answered yet (see `http::admission`).
    pub requests_in_flight: AtomicI64,
    /// API requests refused by the in-flight limit.
    pub requests_shed: AtomicU64,
    /// The most requests in flight since `memory::trim_after_backlog` last looked.
    pub requests_in_flight_peak: AtomicI64,
    /// Free memory handed back after a backlog (`memory`).
    pub memory_trims: AtomicU64,
    pub outbox_depth: AtomicI64,
    pub webhook_queue_depth: AtomicI64,
    webhook_results: [AtomicU64; 3],
    events: RwLock<BTreeMap<(&'static str, &'static str), u64>>,
    accepted: RwLock<BTreeMap<(String, &'static str), u64>>,
    fleet: RwLock<BTreeMap<SessionName, PodSnapshot>>,
}

/// Results of a webhook delivery attempt, for `wa_gateway_webhook_deliveries_total`.
#[derive(Debug, Clone, Copy)]
pub enum WebhookResult {
    Delivered = 0,
    Retried = 1,
    Dead = 2,
}

/// What the collector last read from one pod.
#[derive(Debug, Clone, Default)]
pub struct PodSnapshot {
    pub up: bool,
    pub phase: Option<Phase>,
    pub resident_memory_bytes: Option<f64>,
    /// The pod's own `wa_session_*` families.
    pub families: Vec<Family>,
}

/// One metric family parsed from a pod's exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    pub name: String,
    pub kind: String,
    pub help: String,
    pub samples: Vec<Sample>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: String,
}

impl Metrics {
    pub fn observe_http(&self, route: &str, method: &str, status: u16, elapsed: Duration) {
        let key = (route.to_owned(), method.to_owned(), status);
        let counter = self.http_requests.read().ok().and_then(|m| m.get(&key).cloned());
        let counter = match counter {
            Some(c) => c,
            None => match self.http_requests.write() {
                Ok(mut m) => m.entry(key).or_default().clone(),
                Err(_) => return,
            },
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let hkey = (route.to_owned(), method.to_owned());
        let hist = self.http_durations.read().ok().and_then(|m| m.get(&hkey).cloned());
        let hist = match hist {
            Some(h) => h,
            None => match self.http_durations.write() {
                Ok(mut m) => m.entry(hkey).or_default().clone(),
                Err(_) => return,
            },
        };
        hist.observe(elapsed);
    }

    pub fn webhook_result(&self, r: WebhookResult) {
        self.webhook_results[r as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn event(&self, kind: &'static str, result: &'static str, n: u64) {
        if n == 0 {
            return;
        }
        if let Ok(mut m) = self.events.write() {
            *m.entry((kind, result)).or_default() += n;
        }
    }

    pub fn accepted(&self, session: &str, mode: &'static str) {
        if let Ok(mut m) = self.accepted.write() {
            *m.entry((session.to_owned(), mode)).or_default() += 1;
        }
    }

    pub fn set_snapshot(&self, name: SessionName, snap: PodSnapshot) {
        if let Ok(mut f) = self.fleet.write() {
            f.insert(name, snap);
        }
    }

    /// Drops snapshots of sessions that no longer exist.
    pub fn retain_sessions(&self, keep: &[SessionName]) {
        if let Ok(mut f) = self.fleet.write() {
            f.retain(|k, _| keep.contains(k));
        }
    }

    /// The full exposition. `sessions` is the directory's view (name, namespace, phase).
    /// `store`: the SQLite store's group-commit counts (none on PostgreSQL).
    pub fn render(&self, namespace: &str, sessions: &[(SessionName, Phase)], store: Option<&GroupCommitStats>) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let help = |out: &mut String, name: &str| {
            if let Some((n, kind, text)) = EXPORTED.iter().find(|(n, _, _)| *n == name) {
                let _ = writeln!(out, "# HELP {n} {text}\n# TYPE {n} {kind}");
            }
        };

        help(&mut out, "wa_gateway_http_requests_total");
        if let Ok(m) = self.http_requests.read() {
            let mut rows: Vec<_> = m.iter().map(|(k, v)| (k.clone(), v.load(Ordering::Relaxed))).collect();
            rows.sort();
            for ((route, method, status), v) in rows {
                let _ = writeln!(
                    out,
                    "wa_gateway_http_requests_total{{route=\"{}\",method=\"{}\",status=\"{status}\"}} {v}",
                    escape(&route),
                    escape(&method)
                );
            }
        }
        help(&mut out, "wa_gateway_http_request_duration_seconds");
        if let Ok(m) = self.http_durations.read() {
            let mut rows: Vec<_> = m.iter().collect();
            rows.sort_by(|a, b| a.0.cmp(b.0));
            for ((route, method), h) in rows {
                let labels = format!("route=\"{}\",method=\"{}\"", escape(route), escape(method));
                for (i, b) in BUCKETS.iter().enumerate() {
                    let _ = writeln!(
                        out,
                        "wa_gateway_http_request_duration_seconds_bucket{{{labels},le=\"{b}\"}} {}",
                        h.buckets[i].load(Ordering::Relaxed)
                    );
                }
                let count = h.count.load(Ordering::Relaxed);
                let _ = writeln!(out, "wa_gateway_http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {count}");
                let sum = h.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
                let _ = writeln!(out, "wa_gateway_http_request_duration_seconds_sum{{{labels}}} {sum}");
                let _ = writeln!(out, "wa_gateway_http_request_duration_seconds_count{{{labels}}} {count}");
            }
        }
        help(&mut out, "wa_gateway_requests_in_flight");
        let _ = writeln!(out, "wa_gateway_requests_in_flight {}", self.requests_in_flight.load(Ordering::Relaxed));
        help(&mut out, "wa_gateway_requests_shed_total");
        let _ = writeln!(out, "wa_gateway_requests_shed_total {}", self.requests_shed.load(Ordering::Relaxed));
        help(&mut out, "wa_gateway_memory_trims_total");
        let _ = writeln!(out, "wa_gateway_memory_trims_total {}", self.memory_trims.load(Ordering::Relaxed));
        help(&mut out, "wa_gateway_store_write_groups_total");
        if let Some(store) = store {
            let _ = writeln!(out, "wa_gateway_store_write_groups_total {}", store.groups.load(Ordering::Relaxed));
        }
        help(&mut out, "wa_gateway_store_writes_total");
        if let Some(store) = store {
            let _ = writeln!(out, "wa_gateway_store_writes_total {}", store.writes.load(Ordering::Relaxed));
        }
        help(&mut out, "wa_gateway_outbox_depth");
        let _ = writeln!(out, "wa_gateway_outbox_depth {}", self.outbox_depth.load(Ordering::Relaxed));
        help(&mut out, "wa_gateway_webhook_queue_depth");
        let _ = writeln!(out, "wa_gateway_webhook_queue_depth {}", self.webhook_queue_depth.load(Ordering::Relaxed));
        help(&mut out, "wa_gateway_webhook_deliveries_total");
        for (i, result) in ["delivered", "retried", "dead"].iter().enumerate() {
            let _ = writeln!(
                out,
                "wa_gateway_webhook_deliveries_total{{result=\"{result}\"}} {}",
                self.webhook_results[i].load(Ordering::Relaxed)
            );
        }
        help(&mut out, "wa_gateway_events_total");
        if let Ok(m) = self.events.read() {
            for kind in ["message", "receipt", "state"] {
                for result in ["accepted", "duplicate"] {
                    let v = m.get(&(kind, result)).copied().unwrap_or(0);
                    let _ = writeln!(out, "wa_gateway_events_total{{type=\"{kind}\",result=\"{result}\"}} {v}");
                }
            }
        }
        help(&mut out, "wa_gateway_messages_accepted_total");
        if let Ok(m) = self.accepted.read() {
            for ((session, mode), v) in m.iter() {
                let _ = writeln!(
                    out,
                    "wa_gateway_messages_accepted_total{{namespace=\"{}\",session=\"{}\",mode=\"{mode}\"}} {v}",
                    escape(namespace),
                    escape(session)
                );
            }
        }
        help(&mut out, "wa_gateway_sessions");
        for phase in Phase::ALL {
            let n = sessions.iter().filter(|(_, p)| *p == phase).count();
            let _ = writeln!(out, "wa_gateway_sessions{{state=\"{phase}\"}} {n}");
        }
        help(&mut out, "wa_gateway_resident_memory_bytes");
        let _ = writeln!(out, "wa_gateway_resident_memory_bytes {}", resident_memory_bytes().unwrap_or(0));
        help(&mut out, "wa_gateway_build_info");
        let _ = writeln!(out, "wa_gateway_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));

        // ---- the fleet ----
        let fleet = self.fleet.read().map(|f| f.clone()).unwrap_or_default();
        let ns = escape(namespace);
        help(&mut out, "wa_session_up");
        for (name, _) in sessions {
            let up = fleet.get(name).is_some_and(|s| s.up);
            let _ = writeln!(out, "wa_session_up{{namespace=\"{ns}\",session=\"{name}\"}} {}", u8::from(up));
        }
        help(&mut out, "wa_session_state");
        for (name, phase) in sessions {
            for p in Phase::ALL {
                let _ = writeln!(
                    out,
                    "wa_session_state{{namespace=\"{ns}\",session=\"{name}\",state=\"{p}\"}} {}",
                    u8::from(*phase == p)
                );
            }
        }
        help(&mut out, "wa_session_resident_memory_bytes");
        for (name, _) in sessions {
            if let Some(rss) = fleet.get(name).and_then(|s| s.resident_memory_bytes) {
                let _ = writeln!(out, "wa_session_resident_memory_bytes{{namespace=\"{ns}\",session=\"{name}\"}} {rss}");
            }
        }
        // Pods' own families, merged across sessions (one HELP/TYPE per family).
        let mut merged: BTreeMap<String, (String, String, Vec<String>)> = BTreeMap::new();
        for (name, _) in sessions {
            let Some(snap) = fleet.get(name) else { continue };
            for fam in &snap.families {
                if EXPORTED.iter().any(|(n, _, _)| *n == fam.name) {
                    continue;
                }
                let entry = merged.entry(fam.name.clone()).or_insert_with(|| (fam.kind.clone(), fam.help.clone(), Vec::new()));
                if entry.0 != fam.kind {
                    continue; // pods of different versions disagree; keep the first type
                }
                for s in &fam.samples {
                    let mut labels = vec![("namespace".to_owned(), namespace.to_owned()), ("session".to_owned(), name.to_string())];
                    labels.extend(s.labels.iter().filter(|(k, _)| k != "namespace" && k != "session").cloned());
                    let rendered: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
                    entry.2.push(format!("{}{{{}}} {}", s.name, rendered.join(","), s.value));
                }
            }
        }
        for (name, (kind, help_text, lines)) in merged {
            let help_text = if help_text.is_empty() { "Reported by the session pod.".to_owned() } else { help_text };
            let _ = writeln!(out, "# HELP {name} {help_text}\n# TYPE {name} {kind}");
            for l in lines {
                out.push_str(&l);
                out.push('\n');
            }
        }
        out
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Resident memory of this process, from `/proc/self/status`.
pub fn resident_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Parses the Prometheus text format (what pods export). Lenient: malformed lines are
/// skipped, never fatal.
pub fn parse_exposition(text: &str) -> Vec<Family> {
    let mut families: Vec<Family> = Vec::new();
    let mut helps: HashMap<String, String> = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            if let Some((name, help)) = rest.split_once(' ') {
                helps.insert(name.to_owned(), help.to_owned());
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (it.next(), it.next()) {
                families.push(Family {
                    name: name.to_owned(),
                    kind: kind.to_owned(),
                    help: helps.get(name).cloned().unwrap_or_default(),
                    samples: Vec::new(),
                });
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let Some(sample) = parse_sample(line) else { continue };
        match families.last_mut() {
            Some(f) if sample.name.starts_with(&f.name) => f.samples.push(sample),
            _ => families.push(Family {
                name: sample.name.clone(),
                kind: "untyped".into(),
                help: helps.get(&sample.name).cloned().unwrap_or_default(),
                samples: vec![sample],
            }),
        }
    }
    for f in &mut families {
        if f.help.is_empty() {
            if let Some(h) = helps.get(&f.name) {
                f.help = h.clone();
            }
        }
    }
    families
}

fn parse_sample(line: &str) -> Option<Sample> {
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = &line[..name_end];
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        let mut key = String::new();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '}' => {
                    end = Some(i);
                    break;
                }
                ',' | ' ' => {}
                '=' => {
                    // a quoted value follows
                    if chars.next().map(|(_, c)| c) != Some('"') {
                        return None;
                    }
                    let mut value = String::new();
                    loop {
                        let (_, c) = chars.next()?;
                        match c {
                            '\\' => match chars.next()?.1 {
                                'n' => value.push('\n'),
                                other => value.push(other),
                            },
                            '"' => break,
                            other => value.push(other),
                        }
                    }
                    labels.push((std::mem::take(&mut key), value));
                }
                other => key.push(other),
            }
        }
        rest = &after[end? + 1..];
    }
    let value = rest.split_whitespace().next()?;
    value.parse::<f64>().ok().or_else(|| matches!(value, "+Inf" | "-Inf" | "NaN").then_some(0.0))?;
    Some(Sample { name: name.to_owned(), labels, value: value.to_owned() })
}

/// What the collector reads from one pod's exposition.
pub fn snapshot_from(text: &str, phase: Option<Phase>) -> PodSnapshot {
    let families = parse_exposition(text);
    let rss = ["wa_session_resident_memory_bytes", "process_resident_memory_bytes"].iter().find_map(|n| {
        families
            .iter()
            .find(|f| f.name == *n)
            .and_then(|f| f.samples.first())
            .and_then(|s| s.value.parse::<f64>().ok())
    });
    PodSnapshot {
        up: true,
        phase,
        resident_memory_bytes: rss,
        families: families.into_iter().filter(|f| f.name.starts_with("wa_session_")).collect(),
    }
}

/// Collects every reachable pod's metrics and status every `interval`, at most
/// `concurrency` pods at a time; also refreshes the outbox and webhook queue gauges.
pub async fn run_collector(
    metrics: Arc<Metrics>,
    directory: Arc<dyn SessionDirectory>,
    pods: PodClient,
    store: crate::store::Store,
    interval: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use futures::StreamExt;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let timeout = interval.min(Duration::from_secs(5));
        let routes = directory.routes();
        let results: Vec<_> = futures::stream::iter(routes)
            .map(|route| {
                let pods = pods.clone();
                async move {
                    let status = pods.status(&route, None, None).await;
                    let text = pods.metrics(&route, timeout).await;
                    (route, status, text)
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        for (route, status, text) in results {
            let phase = status.as_ref().ok().map(|s| s.phase);
            match status {
                Ok(s) => directory.observe(&route.session, Observed::Status(s)),
                Err(_) => directory.observe(&route.session, Observed::Unreachable),
            }
            let snap = match text {
                Ok(text) => snapshot_from(&text, phase),
                Err(_) => PodSnapshot { up: false, phase, ..Default::default() },
            };
            metrics.set_snapshot(route.session.clone(), snap);
        }
        let names: Vec<SessionName> = directory.list().into_iter().map(|s| s.name).collect();
        metrics.retain_sessions(&names);
        if let Ok(n) = store.outbox_depth().await {
            metrics.outbox_depth.store(n, Ordering::Relaxed);
        }
        if let Ok(n) = store.pending_deliveries().await {
            metrics.webhook_queue_depth.store(n, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD: &str = r#"# HELP wa_session_messages_sent_total Messages sent.
# TYPE wa_session_messages_sent_total counter
wa_session_messages_sent_total{kind="text"} 3
wa_session_messages_sent_total{kind="image",session="x"} 1
# HELP process_resident_memory_bytes RSS.
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 7340032
# HELP wa_session_send_duration_seconds Send latency.
# TYPE wa_session_send_duration_seconds histogram
wa_session_send_duration_seconds_bucket{le="0.1"} 2
wa_session_send_duration_seconds_bucket{le="+Inf"} 4
wa_session_send_duration_seconds_sum 0.5
wa_session_send_duration_seconds_count 4
garbage line {{{
"#;

    #[test]
    fn parses_pod_exposition() {
        let fams = parse_exposition(POD);
        let names: Vec<_> = fams.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["wa_session_messages_sent_total", "process_resident_memory_bytes", "wa_session_send_duration_seconds"]);
        assert_eq!(fams[0].samples[1].labels, [("kind".to_owned(), "image".to_owned()), ("session".to_owned(), "x".to_owned())]);
        assert_eq!(fams[2].samples.len(), 4);
        let snap = snapshot_from(POD, Some(Phase::Connected));
        assert_eq!(snap.resident_memory_bytes, Some(7340032.0));
        assert_eq!(snap.families.len(), 2, "only wa_session_ families pass through");
    }

    #[test]
    fn label_values_with_escapes() {
        let s = parse_sample(r#"m{a="x\"y",b="1\\2",c="l\nm"} 5"#).unwrap();
        assert_eq!(s.labels, [("a".into(), "x\"y".into()), ("b".into(), "1\\2".into()), ("c".into(), "l\nm".into())]);
        assert!(parse_sample("m{a=1} 5").is_none());
        assert!(parse_sample("m 5 1700000000").is_some());
        assert!(parse_sample("m x").is_none());
    }

    #[test]
    fn render_lists_every_exported_family_once_and_labels_sessions() {
        let m = Metrics::default();
        m.observe_http("/v1/sessions", "GET", 200, Duration::from_millis(3));
        m.accepted("a", "sync");
        m.event("state", "accepted", 1);
        let a: SessionName = "a".parse().unwrap();
        let b: SessionName = "b".parse().unwrap();
        m.set_snapshot(a.clone(), snapshot_from(POD, Some(Phase::Connected)));
        m.set_snapshot(b.clone(), snapshot_from(POD, Some(Phase::AwaitingScan)));
        let store = GroupCommitStats::default();
        store.writes.store(12, Ordering::Relaxed);
        store.groups.store(5, Ordering::Relaxed);
        let text = m.render("local", &[(a, Phase::Connected), (b, Phase::AwaitingScan)], Some(&store));
        for (name, kind, _) in EXPORTED {
            assert_eq!(text.matches(&format!("# TYPE {name} {kind}\n")).count(), 1, "{name}");
        }
        assert_eq!(text.matches("# TYPE wa_session_messages_sent_total counter").count(), 1, "merged across sessions");
        assert!(text.contains(r#"wa_session_messages_sent_total{namespace="local",session="b",kind="image"} 1"#), "{text}");
        assert!(text.contains(r#"wa_session_state{namespace="local",session="a",state="Connected"} 1"#));
        assert!(text.contains(r#"wa_session_state{namespace="local",session="a",state="AwaitingScan"} 0"#));
        assert!(text.contains(r#"wa_session_resident_memory_bytes{namespace="local",session="a"} 7340032"#));
        assert!(text.contains(r#"wa_gateway_sessions{state="Connected"} 1"#));
        assert!(text.contains(r#"wa_gateway_http_request_duration_seconds_bucket{route="/v1/sessions",method="GET",le="0.005"} 1"#));
        assert!(!text.contains("process_resident_memory_bytes"));
        assert!(text.contains("\nwa_gateway_store_write_groups_total 5\n"), "{text}");
        assert!(text.contains("\nwa_gateway_store_writes_total 12\n"), "{text}");
    }
}
