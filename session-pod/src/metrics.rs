//! The session's Prometheus metrics (`GET /metrics`, text format 0.0.4).
//!
//! Counters are atomics bumped where things happen; gauges are read when scraped. The names
//! the issue fixes come first; the rest share the `wa_session_` prefix and base units.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use wa_api::crd::Phase;

use crate::engine::EngineError;

/// Why a send failed, as the `reason` label of `wa_session_send_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendFailure {
    NotConnected,
    Refused,
    NotOnWhatsapp,
    Rejected,
    Timeout,
    Internal,
}

impl SendFailure {
    pub const ALL: [SendFailure; 6] = [
        Self::NotConnected,
        Self::Refused,
        Self::NotOnWhatsapp,
        Self::Rejected,
        Self::Timeout,
        Self::Internal,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::NotConnected => "not_connected",
            Self::Refused => "refused",
            Self::NotOnWhatsapp => "not_on_whatsapp",
            Self::Rejected => "rejected",
            Self::Timeout => "timeout",
            Self::Internal => "internal",
        }
    }

    pub fn of(e: &EngineError) -> Self {
        match e {
            EngineError::NotConnected(_) | EngineError::AlreadyPaired => Self::NotConnected,
            EngineError::Refused(_) => Self::Refused,
            EngineError::NotOnWhatsapp(_) => Self::NotOnWhatsapp,
            EngineError::Rejected(_) => Self::Rejected,
            EngineError::Timeout(_) => Self::Timeout,
            EngineError::Internal(_) => Self::Internal,
        }
    }
}

/// Counters of one session, since the process started.
#[derive(Debug, Default)]
pub struct Metrics {
    pub messages_sent: AtomicU64,
    pub messages_received: AtomicU64,
    send_failures: [AtomicU64; SendFailure::ALL.len()],
    pub reconnects: AtomicU64,
    pub rate_limited: AtomicU64,
    pub receipts_delivered: AtomicU64,
    pub receipts_read: AtomicU64,
    pub receipts_failed: AtomicU64,
    pub events_delivered: AtomicU64,
    pub event_delivery_failures: AtomicU64,
}

/// Values read at scrape time.
#[derive(Debug, Clone, PartialEq)]
pub struct Gauges {
    pub phase: Phase,
    pub engine: wa_api::Engine,
    pub resident_memory_bytes: Option<u64>,
    pub outbox_events: usize,
    pub outbox_dropped: u64,
    pub outbox_syncs: u64,
    pub send_queue: usize,
    pub start_time_seconds: f64,
}

impl Metrics {
    pub fn send_failed(&self, why: SendFailure) {
        let i = SendFailure::ALL.iter().position(|f| *f == why).unwrap_or(0);
        self.send_failures[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of these counters and `gauges`.
    pub fn render(&self, g: &Gauges) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut out = String::with_capacity(4096);
        let mut emit = |(name, kind, help): (&str, &str, &str), samples: Vec<String>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for s in samples {
                out.push_str(&s);
                out.push('\n');
            }
        };
        let header = |name, kind, help| (name, kind, help);

        if let Some(rss) = g.resident_memory_bytes {
            emit(
                header(
                    "wa_session_resident_memory_bytes",
                    "gauge",
                    "Resident memory of this session process, from /proc/self/status VmRSS.",
                ),
                vec![format!("wa_session_resident_memory_bytes {rss}")],
            );
        }
        emit(
            header(
                "wa_session_state",
                "gauge",
                "1 for the phase the session is in, 0 for the others.",
            ),
            Phase::ALL
                .iter()
                .map(|p| {
                    format!(
                        "wa_session_state{{state=\"{}\"}} {}",
                        p.as_str(),
                        u8::from(*p == g.phase)
                    )
                })
                .collect(),
        );
        emit(
            header(
                "wa_session_messages_sent_total",
                "counter",
                "Messages WhatsApp accepted from this session.",
            ),
            vec![format!(
                "wa_session_messages_sent_total {}",
                get(&self.messages_sent)
            )],
        );
        emit(
            header(
                "wa_session_messages_received_total",
                "counter",
                "Messages that arrived for this session.",
            ),
            vec![format!(
                "wa_session_messages_received_total {}",
                get(&self.messages_received)
            )],
        );
        emit(
            header(
                "wa_session_send_failures_total",
                "counter",
                "Sends that failed, by reason; not_connected also counts sends refused because the session was not Connected.",
            ),
            SendFailure::ALL
                .iter()
                .zip(&self.send_failures)
                .map(|(f, c)| {
                    format!(
                        "wa_session_send_failures_total{{reason=\"{}\"}} {}",
                        f.label(),
                        get(c)
                    )
                })
                .collect(),
        );
        emit(
            header(
                "wa_session_reconnects_total",
                "counter",
                "Times the connection was lost and the session started reconnecting.",
            ),
            vec![format!(
                "wa_session_reconnects_total {}",
                get(&self.reconnects)
            )],
        );
        emit(
            header(
                "wa_session_outbox_events",
                "gauge",
                "Events waiting in the on-disk outbox for the gateway to acknowledge.",
            ),
            vec![format!("wa_session_outbox_events {}", g.outbox_events)],
        );
        emit(
            header(
                "wa_session_outbox_dropped_events_total",
                "counter",
                "Events dropped because the outbox reached its bound while the gateway was unreachable.",
            ),
            vec![format!(
                "wa_session_outbox_dropped_events_total {}",
                g.outbox_dropped
            )],
        );
        emit(
            header(
                "wa_session_outbox_syncs_total",
                "counter",
                "fsyncs of the event outbox's files (undelivered events, the acknowledged offset).",
            ),
            vec![format!("wa_session_outbox_syncs_total {}", g.outbox_syncs)],
        );
        emit(
            header(
                "wa_session_events_delivered_total",
                "counter",
                "Events the gateway acknowledged.",
            ),
            vec![format!(
                "wa_session_events_delivered_total {}",
                get(&self.events_delivered)
            )],
        );
        emit(
            header(
                "wa_session_event_delivery_failures_total",
                "counter",
                "Event deliveries that failed and will be retried.",
            ),
            vec![format!(
                "wa_session_event_delivery_failures_total {}",
                get(&self.event_delivery_failures)
            )],
        );
        emit(
            header(
                "wa_session_rate_limited_total",
                "counter",
                "Sends refused with 429 by the session's rate limit.",
            ),
            vec![format!(
                "wa_session_rate_limited_total {}",
                get(&self.rate_limited)
            )],
        );
        emit(
            header(
                "wa_session_receipts_total",
                "counter",
                "Receipts for sent messages, by status.",
            ),
            vec![
                format!(
                    "wa_session_receipts_total{{status=\"delivered\"}} {}",
                    get(&self.receipts_delivered)
                ),
                format!(
                    "wa_session_receipts_total{{status=\"read\"}} {}",
                    get(&self.receipts_read)
                ),
                format!(
                    "wa_session_receipts_total{{status=\"failed\"}} {}",
                    get(&self.receipts_failed)
                ),
            ],
        );
        emit(
            header(
                "wa_session_send_queue_messages",
                "gauge",
                "Accepted sends waiting for the sender.",
            ),
            vec![format!("wa_session_send_queue_messages {}", g.send_queue)],
        );
        emit(
            header(
                "wa_session_info",
                "gauge",
                "Always 1; the engine and version of this session pod.",
            ),
            vec![format!(
                "wa_session_info{{engine=\"{}\",version=\"{}\"}} 1",
                g.engine.as_str(),
                env!("CARGO_PKG_VERSION")
            )],
        );
        emit(
            header(
                "wa_session_start_time_seconds",
                "gauge",
                "When this process started, in seconds since the Unix epoch.",
            ),
            vec![format!(
                "wa_session_start_time_seconds {:.3}",
                g.start_time_seconds
            )],
        );
        out
    }
}

/// This process's resident memory, from `/proc/self/status` (`VmRSS`); `None` off Linux.
pub fn resident_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_rss(&status)
}

/// `VmRSS:   1234 kB` → bytes.
pub fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut parts = line["VmRSS:".len()..].split_whitespace();
    let value: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") => Some(value * 1024),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauges() -> Gauges {
        Gauges {
            phase: Phase::Connected,
            engine: wa_api::Engine::Sandbox,
            resident_memory_bytes: Some(4096),
            outbox_events: 3,
            outbox_dropped: 0,
            outbox_syncs: 0,
            send_queue: 0,
            start_time_seconds: 1.5,
        }
    }

    #[test]
    fn names_from_the_issue_are_exported() {
        let m = Metrics::default();
        Metrics::inc(&m.messages_sent);
        m.send_failed(SendFailure::Rejected);
        let text = m.render(&gauges());
        for line in [
            "wa_session_resident_memory_bytes 4096",
            "wa_session_state{state=\"Connected\"} 1",
            "wa_session_state{state=\"AwaitingScan\"} 0",
            "wa_session_messages_sent_total 1",
            "wa_session_messages_received_total 0",
            "wa_session_send_failures_total{reason=\"rejected\"} 1",
            "wa_session_send_failures_total{reason=\"timeout\"} 0",
            "wa_session_reconnects_total 0",
            "wa_session_outbox_events 3",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn one_hot_state_and_every_family_typed() {
        let text = Metrics::default().render(&gauges());
        let ones = text
            .lines()
            .filter(|l| l.starts_with("wa_session_state{") && l.ends_with(" 1"))
            .count();
        assert_eq!(ones, 1);
        // Every sample's family has HELP and TYPE lines before it.
        let mut typed = std::collections::HashSet::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                typed.insert(rest.split(' ').next().unwrap().to_owned());
            } else if !l.starts_with('#') {
                let name = l.split(['{', ' ']).next().unwrap();
                assert!(typed.contains(name), "{name} has no TYPE line");
            }
        }
    }

    #[test]
    fn vm_rss_parsing() {
        assert_eq!(
            parse_vm_rss("Name:\tx\nVmRSS:\t    5120 kB\n"),
            Some(5120 * 1024)
        );
        assert_eq!(parse_vm_rss("VmRSS: x kB"), None);
        assert_eq!(parse_vm_rss("nothing"), None);
        assert!(resident_memory_bytes().is_some_and(|b| b > 0));
    }
}
