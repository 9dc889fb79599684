//! The process-wide outbound budget: every core publishes the bytes it holds for its
//! connections; past `--max-outbound-total-bytes` in total, each core closes its biggest slow
//! consumers until its share of the excess is freed.
//!
//! The per-connection bound (`--max-outbound-bytes`) alone lets N stalled readers hold N times
//! it; this bounds their sum. A core frees its share (excess × its bytes / total), so the cores
//! together free the excess without talking to each other, each biggest first.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use super::CoreLoop;
use crate::connection::Connection;
use crate::metrics::Closed;
use crate::protocol::CloseReason;

impl CoreLoop {
    /// Publishes this core's buffered bytes; when the process is over its budget, closes this
    /// core's biggest consumers (4008) until its share of the excess is freed.
    pub(super) fn enforce_outbound_budget(&mut self) {
        let shared = Arc::clone(&self.shared);
        let metrics = &shared.metrics;
        metrics[self.id]
            .outbound_buffered
            .store(self.outbound as u64, Relaxed);
        let total: u64 = metrics
            .iter()
            .map(|m| m.outbound_buffered.load(Relaxed))
            .sum();
        let budget = self.shared.config.max_outbound_total_bytes as u64;
        if total <= budget || self.outbound == 0 {
            return;
        }
        let share = share_to_free(total - budget, self.outbound as u64, total);
        let mut biggest: Vec<(usize, usize)> = self
            .conns
            .iter_mut()
            .filter_map(|(key, conn)| match conn {
                Connection::Open(open) if open.outbound > 0 => Some((open.outbound, key)),
                _ => None,
            })
            .collect();
        biggest.sort_unstable_by(|a, b| b.cmp(a));
        let mut freed = 0u64;
        for (bytes, key) in biggest {
            if freed >= share {
                break;
            }
            log::warn!(
                "core={} conn={key} closed: {bytes} outbound bytes while the process holds \
                 {total} (budget {budget})",
                self.id
            );
            // Its buffer is what must go: the close frame goes out if the socket takes it, and
            // the connection is dropped now rather than after the close grace.
            self.close(key, CloseReason::SlowConsumer);
            if let Some(open) = self.conns.get_open_mut(key) {
                let _ = open.flush();
            }
            self.remove(key, Closed::Server(CloseReason::SlowConsumer));
            freed += bytes as u64;
        }
        metrics[self.id]
            .outbound_buffered
            .store(self.outbound as u64, Relaxed);
    }
}

/// This core's part of `excess`: in proportion to what it holds of `total` (rounded up, so the
/// parts add up to at least the excess).
fn share_to_free(excess: u64, mine: u64, total: u64) -> u64 {
    (excess as u128 * mine as u128).div_ceil(total.max(1) as u128) as u64
}

#[cfg(test)]
mod tests {
    use super::share_to_free;

    #[test]
    fn shares_cover_the_excess() {
        assert_eq!(share_to_free(100, 50, 200), 25);
        assert_eq!(share_to_free(100, 200, 200), 100);
        let (a, b) = (share_to_free(7, 1, 3), share_to_free(7, 2, 3));
        assert!(a + b >= 7);
        assert_eq!(share_to_free(1, 0, 0), 0);
    }
}
