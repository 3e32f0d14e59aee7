//! Giving memory back after a burst.
//!
//! glibc's allocator keeps freed memory inside the heap (and in per-thread arenas) for reuse,
//! so a burst of 10,000 sends would leave the process several megabytes larger for good. The
//! session is idle most of its life, so once activity stops we ask the allocator to return
//! free pages (`malloc_trim`), which measurably brings the resident size back down (see
//! BENCHMARKS.md).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// How often activity is checked; memory is trimmed after one quiet interval that followed
/// activity.
const CHECK_EVERY: Duration = Duration::from_secs(2);

/// A number that moves whenever the session does something that allocates.
fn activity(m: &Metrics) -> u64 {
    m.messages_sent.load(Ordering::Relaxed)
        + m.messages_received.load(Ordering::Relaxed)
        + m.events_delivered.load(Ordering::Relaxed)
        + m.receipts_read.load(Ordering::Relaxed)
        + m.rate_limited.load(Ordering::Relaxed)
}

/// Whether to trim now: something happened before the last check, nothing since.
pub fn should_trim(before_last: u64, last: u64, now: u64) -> bool {
    before_last != last && last == now
}

pub async fn trim_when_idle(metrics: Arc<Metrics>, stop: CancellationToken) {
    let (mut before_last, mut last) = (0, 0);
    loop {
        tokio::select! {
            () = tokio::time::sleep(CHECK_EVERY) => {}
            () = stop.cancelled() => return,
        }
        let now = activity(&metrics);
        if should_trim(before_last, last, now) {
            let _ = tokio::task::spawn_blocking(release_free_memory).await;
        }
        before_last = last;
        last = now;
    }
}

/// Returns free heap pages to the operating system.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: glibc's malloc_trim takes a byte count, touches only allocator state and is
        // thread-safe.
        unsafe {
            malloc_trim(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_once_after_a_burst() {
        // Activity readings at successive checks, and whether each check trims.
        let readings = [0, 0, 5, 9, 9, 9, 12, 12];
        let expected = [false, false, false, false, true, false, false, true];
        let (mut a, mut b) = (0, 0);
        for (i, (&now, &want)) in readings.iter().zip(&expected).enumerate() {
            assert_eq!(should_trim(a, b, now), want, "check {i}");
            a = b;
            b = now;
        }
    }

    #[test]
    fn release_is_safe_to_call() {
        let v = vec![0u8; 1 << 20];
        drop(v);
        release_free_memory();
    }
}
