//! Per-session pacing of sends: a token bucket checked when a send is accepted.
//!
//! WhatsApp flags accounts that send too fast, so the limit is enforced where the session
//! lives (one pod per session makes it exact). A refused send is answered at once with 429 and
//! `Retry-After`, never queued behind the limit: the caller decides whether to wait.

use std::time::{Duration, Instant};

/// A token bucket: `burst` tokens at most, refilled at `per_minute / 60` tokens a second.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: f64,
    per_second: f64,
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    /// A full bucket. Zero values are raised to one: a session that can never send is a
    /// configuration mistake, refused earlier by the config check.
    pub fn new(per_minute: u32, burst: u32, now: Instant) -> Self {
        let capacity = f64::from(burst.max(1));
        Self {
            capacity,
            per_second: f64::from(per_minute.max(1)) / 60.0,
            tokens: capacity,
            updated: now,
        }
    }

    /// Takes one token, or says how long until one is available.
    pub fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let missing = 1.0 - self.tokens;
            Err(Duration::from_secs_f64(missing / self.per_second))
        }
    }

    /// Gives a token back (the send was refused after the token was taken, so it was never
    /// sent and must not count against the limit).
    pub fn give_back(&mut self) {
        self.tokens = (self.tokens + 1.0).min(self.capacity);
    }

    fn refill(&mut self, now: Instant) {
        // `saturating_duration_since`: a clock read before `updated` must not panic or add tokens.
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.capacity);
        self.updated = self.updated.max(now);
    }
}

/// `Retry-After` in whole seconds, rounded up and at least 1 (HTTP allows only integers).
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `steps` of (milliseconds since start, expected result of a take) against a bucket.
    fn check(per_minute: u32, burst: u32, steps: &[(u64, Result<(), u64>)]) {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(per_minute, burst, t0);
        for (i, (at_ms, expected)) in steps.iter().enumerate() {
            let got = bucket
                .try_take(t0 + Duration::from_millis(*at_ms))
                .map_err(retry_after_secs);
            assert_eq!(
                &got, expected,
                "step {i} at {at_ms} ms ({per_minute}/min, burst {burst})"
            );
        }
    }

    #[test]
    fn burst_then_refill() {
        // 60/min = 1 token per second, burst 2.
        check(
            60,
            2,
            &[
                (0, Ok(())),
                (0, Ok(())),
                (0, Err(1)),
                (999, Err(1)),
                (1000, Ok(())),
                (1000, Err(1)),
            ],
        );
        // 30/min = one token per 2 s; the wait is rounded up.
        check(
            30,
            1,
            &[
                (0, Ok(())),
                (0, Err(2)),
                (500, Err(2)),
                (1500, Err(1)),
                (2000, Ok(())),
            ],
        );
        // Tokens never exceed the burst, however long the bucket stays idle.
        check(
            600,
            3,
            &[
                (0, Ok(())),
                (3_600_000, Ok(())),
                (3_600_000, Ok(())),
                (3_600_000, Ok(())),
                (3_600_000, Err(1)),
            ],
        );
        // Fast rates: sub-second waits still say 1 second.
        check(6000, 1, &[(0, Ok(())), (0, Err(1)), (10, Ok(()))]);
    }

    #[test]
    fn zero_config_is_raised_to_one() {
        check(0, 0, &[(0, Ok(())), (0, Err(60)), (60_000, Ok(()))]);
    }

    #[test]
    fn give_back_restores_a_token_up_to_capacity() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(60, 1, t0);
        assert!(b.try_take(t0).is_ok());
        b.give_back();
        assert!(b.try_take(t0).is_ok());
        b.give_back();
        b.give_back();
        assert!(b.try_take(t0).is_ok());
        assert!(
            b.try_take(t0).is_err(),
            "give_back must not exceed the burst"
        );
    }

    #[test]
    fn clock_going_backwards_is_harmless() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut b = TokenBucket::new(60, 1, t0);
        assert!(b.try_take(t0).is_ok());
        assert!(b.try_take(t0 - Duration::from_secs(5)).is_err());
        assert!(b.try_take(t0 + Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn retry_after_rounding() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_secs(Duration::from_millis(2001)), 3);
    }
}
