//! Refused requests in the log: one info line per refusal, with the peer, the status and the
//! reason, at most [`REFUSALS_LOGGED_PER_SECOND`] a second per core; past that they are counted
//! and the count is logged once the second is over, so a flood cannot flood the log.

use std::time::{Duration, Instant};

use super::CoreLoop;

/// Refusal lines one core writes per second before it only counts them.
pub(super) const REFUSALS_LOGGED_PER_SECOND: u32 = 20;
const WINDOW: Duration = Duration::from_secs(1);

/// The rate limit of refusal lines.
#[derive(Debug)]
pub(super) struct RefusalLog {
    window_start: Instant,
    logged: u32,
    suppressed: u64,
}

impl RefusalLog {
    pub(super) fn new(now: Instant) -> Self {
        RefusalLog {
            window_start: now,
            logged: 0,
            suppressed: 0,
        }
    }

    /// Whether this refusal gets a line; and, when a new second began, how many the last one
    /// left out.
    fn admit(&mut self, now: Instant) -> (bool, u64) {
        let mut left_out = 0;
        if now.saturating_duration_since(self.window_start) >= WINDOW {
            left_out = std::mem::take(&mut self.suppressed);
            self.window_start = now;
            self.logged = 0;
        }
        if self.logged < REFUSALS_LOGGED_PER_SECOND {
            self.logged += 1;
            (true, left_out)
        } else {
            self.suppressed += 1;
            (false, left_out)
        }
    }
}

impl CoreLoop {
    /// Logs that connection `key` was refused with `status` for `reason` (rate limited).
    pub(super) fn log_refusal(&mut self, key: usize, status: u16, reason: &str) {
        let (log, left_out) = self.refusals.admit(Instant::now());
        if left_out > 0 {
            log::info!(
                "core={} {left_out} more refusals in the last second were not logged",
                self.id
            );
        }
        if !log {
            return;
        }
        let peer = self
            .conns
            .get_mut(key)
            .and_then(|conn| conn.tcp().peer_addr().ok())
            .map_or_else(|| "?".to_string(), |a| a.to_string());
        log::info!(
            "core={} refused {peer}: {status} {}",
            self.id,
            reason.trim_end()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_past_the_limit_are_counted_and_reported_once() {
        let start = Instant::now();
        let mut log = RefusalLog::new(start);
        for _ in 0..REFUSALS_LOGGED_PER_SECOND {
            assert_eq!(log.admit(start), (true, 0));
        }
        assert_eq!(log.admit(start), (false, 0));
        assert_eq!(log.admit(start + Duration::from_millis(500)), (false, 0));
        assert_eq!(log.admit(start + WINDOW), (true, 2));
        assert_eq!(log.admit(start + WINDOW), (true, 0));
    }
}
