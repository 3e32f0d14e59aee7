//! The operator's Prometheus metrics, rendered in the text exposition format (0.0.4).
//!
//! Hand-written rather than a metrics crate: nine series, and the exact output (HELP,
//! TYPE, base units, `_total`) is what `promtool check metrics` and the dashboards check.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use wa_api::Phase;

/// Upper bounds of the reconcile duration histogram, in seconds. A reconcile is a handful
/// of API calls; the top buckets catch a bounded log-out during deletion.
const DURATION_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Name and namespace of a session, the key of the per-session phase.
pub type SessionKey = (String, String);

#[derive(Debug, Default)]
pub struct Metrics {
    reconcile_success: AtomicU64,
    reconcile_error: AtomicU64,
    duration: Mutex<Histogram>,
    pods_created: AtomicU64,
    pods_recreated: AtomicU64,
    pods_rolled: AtomicU64,
    leader: AtomicBool,
    status_watches: AtomicU64,
    phases: Mutex<HashMap<SessionKey, Phase>>,
}

#[derive(Debug, Default)]
struct Histogram {
    counts: [u64; DURATION_BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// Lock a mutex even if a panicking thread poisoned it: metrics stay readable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Metrics {
    pub fn reconciled(&self, ok: bool, took: Duration) {
        let counter = if ok {
            &self.reconcile_success
        } else {
            &self.reconcile_error
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let secs = took.as_secs_f64();
        let mut h = lock(&self.duration);
        for (i, le) in DURATION_BUCKETS.iter().enumerate() {
            if secs <= *le {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += secs;
    }

    pub fn pod_created(&self) {
        self.pods_created.fetch_add(1, Ordering::Relaxed);
    }

    pub fn pod_recreated(&self) {
        self.pods_recreated.fetch_add(1, Ordering::Relaxed);
    }

    pub fn pod_rolled(&self) {
        self.pods_rolled.fetch_add(1, Ordering::Relaxed);
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.store(leader, Ordering::Relaxed);
    }

    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Relaxed)
    }

    pub fn set_status_watches(&self, n: usize) {
        self.status_watches.store(n as u64, Ordering::Relaxed);
    }

    pub fn set_phase(&self, session: SessionKey, phase: Phase) {
        lock(&self.phases).insert(session, phase);
    }

    pub fn forget_session(&self, session: &SessionKey) {
        lock(&self.phases).remove(session);
    }

    /// A follower reports no sessions: only the leader knows them.
    pub fn forget_all_sessions(&self) {
        lock(&self.phases).clear();
    }

    pub fn pods_recreated(&self) -> u64 {
        self.pods_recreated.load(Ordering::Relaxed)
    }

    pub fn pods_rolled(&self) -> u64 {
        self.pods_rolled.load(Ordering::Relaxed)
    }

    pub fn pods_created(&self) -> u64 {
        self.pods_created.load(Ordering::Relaxed)
    }

    pub fn reconciles(&self) -> (u64, u64) {
        (
            self.reconcile_success.load(Ordering::Relaxed),
            self.reconcile_error.load(Ordering::Relaxed),
        )
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let w = &mut out;
        header(
            w,
            "wa_operator_build_info",
            "gauge",
            "Version of the running operator; always 1.",
        );
        line(
            w,
            &format!(
                "wa_operator_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            ),
            1.0,
        );

        header(
            w,
            "wa_operator_reconciles_total",
            "counter",
            "Reconciles of WhatsAppSession objects, by result.",
        );
        line(
            w,
            "wa_operator_reconciles_total{result=\"success\"}",
            self.reconcile_success.load(Ordering::Relaxed) as f64,
        );
        line(
            w,
            "wa_operator_reconciles_total{result=\"error\"}",
            self.reconcile_error.load(Ordering::Relaxed) as f64,
        );

        header(
            w,
            "wa_operator_reconcile_duration_seconds",
            "histogram",
            "Time one reconcile of a session took.",
        );
        {
            let h = lock(&self.duration);
            for (le, n) in DURATION_BUCKETS.iter().zip(h.counts) {
                line(
                    w,
                    &format!("wa_operator_reconcile_duration_seconds_bucket{{le=\"{le}\"}}"),
                    n as f64,
                );
            }
            line(
                w,
                "wa_operator_reconcile_duration_seconds_bucket{le=\"+Inf\"}",
                h.count as f64,
            );
            line(w, "wa_operator_reconcile_duration_seconds_sum", h.sum);
            line(
                w,
                "wa_operator_reconcile_duration_seconds_count",
                h.count as f64,
            );
        }

        header(
            w,
            "wa_operator_sessions",
            "gauge",
            "WhatsAppSession objects by the phase the operator last wrote (leader only).",
        );
        {
            let phases = lock(&self.phases);
            for phase in Phase::ALL {
                let n = phases.values().filter(|p| **p == phase).count();
                line(
                    w,
                    &format!("wa_operator_sessions{{phase=\"{phase}\"}}"),
                    n as f64,
                );
            }
        }

        header(
            w,
            "wa_operator_pods_created_total",
            "counter",
            "Session pods created for a new or resumed session, or after a roll.",
        );
        line(
            w,
            "wa_operator_pods_created_total",
            self.pods_created.load(Ordering::Relaxed) as f64,
        );
        header(
            w,
            "wa_operator_pods_recreated_total",
            "counter",
            "Session pods recreated after they disappeared or failed.",
        );
        line(
            w,
            "wa_operator_pods_recreated_total",
            self.pods_recreated.load(Ordering::Relaxed) as f64,
        );
        header(
            w,
            "wa_operator_pods_rolled_total",
            "counter",
            "Session pods deleted to be replaced because their spec changed.",
        );
        line(
            w,
            "wa_operator_pods_rolled_total",
            self.pods_rolled.load(Ordering::Relaxed) as f64,
        );
        header(
            w,
            "wa_operator_status_watches",
            "gauge",
            "Open status long polls to ready session pods.",
        );
        line(
            w,
            "wa_operator_status_watches",
            self.status_watches.load(Ordering::Relaxed) as f64,
        );
        header(
            w,
            "wa_operator_leader",
            "gauge",
            "1 when this replica holds the leader Lease and reconciles, else 0.",
        );
        line(
            w,
            "wa_operator_leader",
            if self.is_leader() { 1.0 } else { 0.0 },
        );
        out
    }
}

fn header(w: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(w, "# HELP {name} {help}");
    let _ = writeln!(w, "# TYPE {name} {kind}");
}

fn line(w: &mut String, series: &str, value: f64) {
    let _ = writeln!(w, "{series} {value}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .unwrap_or_else(|| panic!("{series} missing in\n{text}"))
            .parse()
            .unwrap()
    }

    #[test]
    fn counts_reconciles_and_buckets_durations() {
        let m = Metrics::default();
        m.reconciled(true, Duration::from_millis(3));
        m.reconciled(true, Duration::from_millis(200));
        m.reconciled(false, Duration::from_secs(60));
        let t = m.render();
        assert_eq!(
            value(&t, "wa_operator_reconciles_total{result=\"success\"}"),
            2.0
        );
        assert_eq!(
            value(&t, "wa_operator_reconciles_total{result=\"error\"}"),
            1.0
        );
        assert_eq!(
            value(
                &t,
                "wa_operator_reconcile_duration_seconds_bucket{le=\"0.005\"}"
            ),
            1.0
        );
        assert_eq!(
            value(
                &t,
                "wa_operator_reconcile_duration_seconds_bucket{le=\"0.25\"}"
            ),
            2.0
        );
        assert_eq!(
            value(
                &t,
                "wa_operator_reconcile_duration_seconds_bucket{le=\"30\"}"
            ),
            2.0
        );
        assert_eq!(
            value(
                &t,
                "wa_operator_reconcile_duration_seconds_bucket{le=\"+Inf\"}"
            ),
            3.0
        );
        assert_eq!(
            value(&t, "wa_operator_reconcile_duration_seconds_count"),
            3.0
        );
        assert!((value(&t, "wa_operator_reconcile_duration_seconds_sum") - 60.203).abs() < 1e-9);
    }

    #[test]
    fn sessions_by_phase_include_zeros_and_forget_deleted_sessions() {
        let m = Metrics::default();
        m.set_phase(("a".into(), "x".into()), Phase::Connected);
        m.set_phase(("a".into(), "y".into()), Phase::Connected);
        m.set_phase(("b".into(), "x".into()), Phase::AwaitingScan);
        m.set_phase(("a".into(), "y".into()), Phase::Suspended);
        let t = m.render();
        assert_eq!(value(&t, "wa_operator_sessions{phase=\"Connected\"}"), 1.0);
        assert_eq!(value(&t, "wa_operator_sessions{phase=\"Suspended\"}"), 1.0);
        assert_eq!(
            value(&t, "wa_operator_sessions{phase=\"AwaitingScan\"}"),
            1.0
        );
        assert_eq!(value(&t, "wa_operator_sessions{phase=\"Failed\"}"), 0.0);
        m.forget_session(&("a".into(), "x".into()));
        assert_eq!(
            value(&m.render(), "wa_operator_sessions{phase=\"Connected\"}"),
            0.0
        );
    }

    #[test]
    fn pod_counters_and_leader() {
        let m = Metrics::default();
        m.pod_created();
        m.pod_recreated();
        m.pod_recreated();
        m.pod_rolled();
        m.set_leader(true);
        m.set_status_watches(7);
        let t = m.render();
        assert_eq!(value(&t, "wa_operator_pods_created_total"), 1.0);
        assert_eq!(value(&t, "wa_operator_pods_recreated_total"), 2.0);
        assert_eq!(value(&t, "wa_operator_pods_rolled_total"), 1.0);
        assert_eq!(value(&t, "wa_operator_leader"), 1.0);
        assert_eq!(value(&t, "wa_operator_status_watches"), 7.0);
    }

    /// The exposition passes Prometheus's own linter. promtool is installed by scripts/test
    /// (Debian package `prometheus`); without it this test fails rather than pretending.
    #[test]
    fn promtool_check_metrics_passes() {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let m = Metrics::default();
        m.reconciled(true, Duration::from_millis(12));
        m.set_phase(("a".into(), "x".into()), Phase::Connected);
        let mut child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect(
                "promtool not found: install Debian's `prometheus` package (scripts/test does)",
            );
        child
            .stdin
            .take()
            .unwrap()
            .write_all(m.render().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // promtool also prints lint warnings with exit 0 on some versions; there must be none.
        assert!(
            out.stdout.is_empty() && out.stderr.is_empty(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
