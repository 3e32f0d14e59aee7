//! Giving memory back after a backlog.
//!
//! A stall (a slow disk, a busy machine) piles requests up in the gateway, each with its
//! buffers and task, up to the in-flight limit, while the pods' event deliveries wait too.
//! glibc's allocator keeps what such a burst allocated inside its heaps (one arena per worker
//! thread) for reuse, so the process stays that much larger after the backlog is gone: +32 MiB
//! after a one-second stall in the 10-minute soak at 1,000 sends/s (RELIABILITY.md). Once a
//! backlog of at least half the limit has drained to half of that, the free pages are handed
//! back (`malloc_trim`, the same call the session pod makes when it goes idle).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// How often the in-flight peak is looked at.
const WINDOW: Duration = Duration::from_secs(2);

/// One look at the last window's peak of requests in flight. Returns whether to trim now and
/// whether a backlog is still waiting for its trim.
pub fn after_window(backlog: bool, peak: i64, max_in_flight: usize) -> (bool, bool) {
    let high = (max_in_flight / 2).max(1) as i64;
    if peak >= high {
        (false, true)
    } else if backlog && peak <= high / 2 {
        (true, false)
    } else {
        (false, backlog)
    }
}

pub async fn trim_after_backlog(
    metrics: Arc<Metrics>,
    max_in_flight: usize,
    stop: CancellationToken,
) {
    let mut backlog = false;
    loop {
        tokio::select! {
            () = tokio::time::sleep(WINDOW) => {}
            () = stop.cancelled() => return,
        }
        // The next window's peak starts from what is in flight now.
        let now = metrics.requests_in_flight.load(Ordering::Relaxed);
        let peak = metrics.requests_in_flight_peak.swap(now, Ordering::Relaxed);
        let trim;
        (trim, backlog) = after_window(backlog, peak, max_in_flight);
        if trim {
            metrics.memory_trims.fetch_add(1, Ordering::Relaxed);
            let _ = tokio::task::spawn_blocking(wa_session::memory::release_free_memory).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_once_a_backlog_of_half_the_limit_has_drained() {
        // Steady load well below the limit: never.
        assert_eq!(after_window(false, 100, 512), (false, false));
        // A backlog: wait while it lasts and while it is still above a quarter of the limit.
        assert_eq!(after_window(false, 256, 512), (false, true));
        assert_eq!(after_window(true, 512, 512), (false, true));
        assert_eq!(after_window(true, 200, 512), (false, true));
        // Drained: trim once.
        assert_eq!(after_window(true, 128, 512), (true, false));
        assert_eq!(after_window(false, 40, 512), (false, false));
        // A tiny limit still works.
        assert_eq!(after_window(false, 1, 1), (false, true));
        assert_eq!(after_window(true, 0, 1), (true, false));
    }
}
