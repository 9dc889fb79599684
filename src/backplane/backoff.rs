//! Reconnect delays: exponential backoff with jitter, shared by every Redis connection.

use std::time::Duration;

/// Exponential backoff with jitter.
#[derive(Debug)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
    seed: u64,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration, seed: u64) -> Self {
        Backoff {
            min,
            max,
            current: min,
            seed: seed | 1,
        }
    }

    /// The next delay: the current step, jittered to 50–100 %, then the step doubles.
    pub(crate) fn next_delay(&mut self) -> Duration {
        // xorshift: enough randomness to spread a fleet's reconnects apart.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let frac = 0.5 + (self.seed % 1000) as f64 / 2000.0;
        let delay = self.current.mul_f64(frac);
        self.current = (self.current * 2).min(self.max);
        delay
    }

    pub(crate) fn reset(&mut self) {
        self.current = self.min;
    }
}
