//! An open-loop load generator: request `i` is due at `start + i / rate`, whatever the server
//! does with the requests before it. A closed-loop tool (wrk, a fixed number of connections)
//! slows down with the server and hides queueing; here a slow server shows as latency, and
//! latency is measured from the time a request was *due*, so time a request waited for the
//! generator itself counts too (no "coordinated omission").
//!
//! The generator never waits for a free slot: at most `max_in_flight` requests are open, and a
//! request due while that many are still unanswered is not sent and counted as `skipped` (the
//! server fell that far behind). The schedule, the percentiles and the per-second accounting
//! are pure and tested below; [`run`] is the only part with time and I/O.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;

/// When requests are due.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Requests per second.
    pub rate: f64,
    pub duration: Duration,
    /// Requests open at once before due ones are skipped.
    pub max_in_flight: usize,
}

impl Schedule {
    /// Requests in the whole run.
    pub fn total(&self) -> u64 {
        (self.rate * self.duration.as_secs_f64()).round() as u64
    }

    /// When request `seq` is due, from the start.
    pub fn due_at(&self, seq: u64) -> Duration {
        Duration::from_secs_f64(seq as f64 / self.rate)
    }

    /// How many requests are due `elapsed` after the start (request 0 is due at once).
    pub fn due_by(&self, elapsed: Duration) -> u64 {
        let n = (elapsed.as_secs_f64() * self.rate).floor() as u64 + 1;
        n.min(self.total())
    }
}

/// What one request got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A success; the id the server gave the request (empty when it gave none).
    Accepted(String),
    /// An HTTP error answer: status and the error code from the body (or "-").
    Refused { status: u16, code: String },
    /// No HTTP answer (connect error, reset, client timeout).
    Transport(String),
}

impl Outcome {
    /// The key it is counted under in [`LoadResult::errors`].
    pub fn error_key(&self) -> Option<String> {
        match self {
            Outcome::Accepted(_) => None,
            Outcome::Refused { status, code } => Some(format!("{status} {code}")),
            Outcome::Transport(e) => Some(format!("transport: {e}")),
        }
    }
}

/// One answered request.
#[derive(Debug, Clone)]
struct Answer {
    seq: u64,
    latency: Duration,
    outcome: Outcome,
}

/// Everything the run measured.
#[derive(Debug, Clone, Default)]
pub struct LoadResult {
    pub planned: u64,
    /// Sent (planned minus skipped).
    pub issued: u64,
    /// Due while `max_in_flight` requests were open: not sent.
    pub skipped: u64,
    /// Ids of the accepted requests, in order of their sequence number.
    pub accepted_ids: Vec<String>,
    /// Errors by "status code" (or "transport: …"), skipped ones included as "skipped".
    pub errors: BTreeMap<String, u64>,
    /// Latency of accepted requests, microseconds, sorted.
    pub latencies_us: Vec<u32>,
    /// Latency of every answered request (errors included), microseconds, sorted.
    pub all_latencies_us: Vec<u32>,
    /// Accepted requests by the second they were due in.
    pub accepted_per_second: Vec<u64>,
    /// p99 latency of accepted requests by the minute they were due in (µs).
    pub p99_per_minute_us: Vec<u32>,
    /// How late the generator sent requests (actual minus due), microseconds, sorted.
    pub lateness_us: Vec<u32>,
    /// From the start until the last answer.
    pub elapsed: Duration,
    pub schedule_duration: Duration,
}

impl LoadResult {
    pub fn accepted(&self) -> u64 {
        self.accepted_ids.len() as u64
    }

    pub fn failed(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Accepted requests per second of the schedule.
    pub fn achieved_rate(&self) -> f64 {
        self.accepted() as f64 / self.schedule_duration.as_secs_f64().max(1e-9)
    }

    /// Failed (refused, no answer, skipped) over planned.
    pub fn error_rate(&self) -> f64 {
        self.failed() as f64 / (self.planned.max(1) as f64)
    }
}

/// The `p`-th percentile (0-100) of sorted values, nearest rank; 0 for no values.
pub fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// Folds the answers into a [`LoadResult`] (pure: the run's time is in the answers).
fn summarize(schedule: &Schedule, skipped: u64, mut answers: Vec<Answer>, lateness_us: Vec<u32>, elapsed: Duration) -> LoadResult {
    answers.sort_by_key(|a| a.seq);
    let seconds = schedule.duration.as_secs_f64().ceil() as usize;
    let mut per_second = vec![0u64; seconds.max(1)];
    let mut per_minute: Vec<Vec<u32>> = vec![Vec::new(); seconds.div_ceil(60).max(1)];
    let mut errors = BTreeMap::new();
    let mut ids = Vec::new();
    let mut ok = Vec::new();
    let mut all = Vec::with_capacity(answers.len());
    for a in answers {
        let us = micros(a.latency);
        all.push(us);
        let due = schedule.due_at(a.seq).as_secs_f64();
        match a.outcome.error_key() {
            None => {
                if let Outcome::Accepted(id) = a.outcome {
                    ids.push(id);
                }
                ok.push(us);
                let s = (due as usize).min(per_second.len() - 1);
                per_second[s] += 1;
                let m = ((due / 60.0) as usize).min(per_minute.len() - 1);
                per_minute[m].push(us);
            }
            Some(key) => *errors.entry(key).or_insert(0) += 1,
        }
    }
    if skipped > 0 {
        errors.insert("skipped (max in flight)".into(), skipped);
    }
    ok.sort_unstable();
    all.sort_unstable();
    let mut lateness_us = lateness_us;
    lateness_us.sort_unstable();
    LoadResult {
        planned: schedule.total(),
        issued: schedule.total() - skipped,
        skipped,
        accepted_ids: ids,
        errors,
        latencies_us: ok,
        all_latencies_us: all,
        accepted_per_second: per_second,
        p99_per_minute_us: per_minute
            .into_iter()
            .map(|mut v| {
                v.sort_unstable();
                percentile(&v, 99.0)
            })
            .collect(),
        lateness_us,
        elapsed,
        schedule_duration: schedule.duration,
    }
}

/// Runs the schedule: `send(seq)` for every due request, each in its own task.
pub async fn run<F, Fut>(schedule: Schedule, send: F) -> LoadResult
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let total = schedule.total();
    let slots = Arc::new(Semaphore::new(schedule.max_in_flight.max(1)));
    let (tx, mut rx) = mpsc::unbounded_channel::<Answer>();
    let collector = tokio::spawn(async move {
        let mut answers = Vec::with_capacity(total as usize);
        while let Some(a) = rx.recv().await {
            answers.push(a);
        }
        answers
    });
    let mut lateness = Vec::with_capacity(total as usize);
    let mut skipped = 0u64;
    let start = Instant::now();
    let mut next = 0u64;
    while next < total {
        let now = Instant::now();
        let due = schedule.due_by(now - start);
        while next < due {
            let seq = next;
            next += 1;
            let due_at = start + schedule.due_at(seq);
            lateness.push(micros(now.saturating_duration_since(due_at)));
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                skipped += 1;
                continue;
            };
            let request = send(seq);
            let tx = tx.clone();
            tokio::spawn(async move {
                let outcome = request.await;
                let latency = Instant::now().saturating_duration_since(due_at);
                drop(permit);
                let _ = tx.send(Answer { seq, latency, outcome });
            });
        }
        if next < total {
            tokio::time::sleep_until(start + schedule.due_at(next)).await;
        }
    }
    drop(tx);
    let answers = collector.await.unwrap_or_default();
    summarize(&schedule, skipped, answers, lateness, start.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(rate: f64, secs: u64) -> Schedule {
        Schedule { rate, duration: Duration::from_secs(secs), max_in_flight: 4 }
    }

    #[test]
    fn the_schedule_spaces_requests_evenly() {
        let s = schedule(1000.0, 10);
        assert_eq!(s.total(), 10_000);
        assert_eq!(s.due_at(0), Duration::ZERO);
        assert_eq!(s.due_at(1500), Duration::from_millis(1500));
        assert_eq!(s.due_by(Duration::ZERO), 1);
        assert_eq!(s.due_by(Duration::from_micros(999)), 1);
        assert_eq!(s.due_by(Duration::from_millis(1)), 2);
        assert_eq!(s.due_by(Duration::from_secs(3600)), 10_000);
        assert_eq!(schedule(0.5, 10).total(), 5);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<u32> = (1..=100).collect();
        for (p, want) in [(50.0, 50), (99.0, 99), (100.0, 100), (0.0, 1), (99.9, 100)] {
            assert_eq!(percentile(&v, p), want, "p{p}");
        }
        assert_eq!(percentile(&[], 50.0), 0);
        assert_eq!(percentile(&[7], 99.0), 7);
    }

    #[test]
    fn summary_counts_errors_by_code_and_successes_by_second() {
        let s = schedule(2.0, 2);
        let answer = |seq, ms, outcome| Answer { seq, latency: Duration::from_millis(ms), outcome };
        let answers = vec![
            answer(3, 40, Outcome::Refused { status: 429, code: "RATE_LIMITED".into() }),
            answer(0, 10, Outcome::Accepted("a".into())),
            answer(1, 30, Outcome::Accepted("b".into())),
            answer(2, 20, Outcome::Transport("connection refused".into())),
        ];
        let r = summarize(&s, 0, answers, vec![0; 4], Duration::from_secs(2));
        assert_eq!(r.accepted_ids, ["a", "b"]);
        assert_eq!(r.accepted_per_second, [2, 0]);
        assert_eq!(r.latencies_us, [10_000, 30_000]);
        assert_eq!(r.all_latencies_us.len(), 4);
        assert_eq!(r.errors.get("429 RATE_LIMITED"), Some(&1));
        assert_eq!(r.errors.get("transport: connection refused"), Some(&1));
        assert_eq!(r.failed(), 2);
        assert_eq!(r.error_rate(), 0.5);
        assert_eq!(r.achieved_rate(), 1.0);
    }

    #[tokio::test(start_paused = true)]
    async fn requests_leave_on_schedule_even_when_answers_are_slow() {
        // Every answer takes 1 s; a closed loop of 4 would manage 4/s. Open loop: all 100 leave
        // on time (20/s) as long as the in-flight cap allows, and latency is the 1 s.
        let s = Schedule { rate: 20.0, duration: Duration::from_secs(5), max_in_flight: 100 };
        let r = run(s, |seq| async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Outcome::Accepted(seq.to_string())
        })
        .await;
        assert_eq!((r.planned, r.issued, r.skipped, r.accepted()), (100, 100, 0, 100));
        assert_eq!(percentile(&r.latencies_us, 50.0) / 1000, 1000);
        assert!(r.elapsed >= Duration::from_secs(5), "{:?}", r.elapsed);
        assert_eq!(r.accepted_per_second, [20, 20, 20, 20, 20]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_that_falls_behind_shows_as_skipped_not_as_a_lower_rate() {
        // 20 due per second, answers take 0.99 s, at most 5 open: 15 of every 20 are skipped.
        let s = Schedule { rate: 20.0, duration: Duration::from_secs(2), max_in_flight: 5 };
        let r = run(s, |_| async move {
            tokio::time::sleep(Duration::from_millis(990)).await;
            Outcome::Accepted(String::new())
        })
        .await;
        assert_eq!(r.planned, 40);
        assert_eq!(r.accepted(), 10);
        assert_eq!(r.skipped, 30);
        assert_eq!(r.errors.get("skipped (max in flight)"), Some(&30));
        assert_eq!(r.error_rate(), 0.75);
    }
}
