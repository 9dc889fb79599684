//! Readiness and the drain: what `/readyz` and `/healthz` answer (and `/metrics`, which the
//! metrics listener serves too), and closing the open connections in batches
//! spread over `drain_period` before the core shuts down.
//!
//! A drain exists so that a rolling restart does not make every client of an instance reconnect
//! in the same second: the load balancer sees `/readyz` fail at once and stops sending new
//! connections, and the open ones are closed with 1001 a batch at a time, so their reconnects
//! reach the other instances spread over the period.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use std::fmt::Write as _;

use super::{CoreLoop, Shared};
use crate::connection::Connection;
use crate::http;
use crate::protocol::CloseReason;

/// Why the instance is not ready (the `reason` of a 503 from `/readyz`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotReady {
    /// The cores or the backplane threads are still starting.
    Starting,
    /// Draining or shutting down.
    Draining,
    /// Some publishing connection to Redis is down: a dispatch for another instance would
    /// wait in the queue (or be dropped past it).
    BackplaneCannotPublish,
    /// The subscriber connection to Redis is down: dispatches from other instances do not
    /// arrive.
    BackplaneNotSubscribed,
    /// Redis answers but refuses writes (out of memory, loading, ...): sends fail with
    /// `unavailable` until it takes one again.
    BackplaneRefusesWrites,
}

impl NotReady {
    /// The words `/readyz` and `/healthz` use.
    pub(crate) fn text(self) -> &'static str {
        match self {
            NotReady::Starting => "starting",
            NotReady::Draining => "draining",
            NotReady::BackplaneCannotPublish => "backplane cannot publish (Redis unreachable)",
            NotReady::BackplaneNotSubscribed => "backplane not subscribed (Redis unreachable)",
            NotReady::BackplaneRefusesWrites => {
                "backplane cannot write (Redis refuses writes: out of memory, loading, ...)"
            }
        }
    }

    /// The one-word state for `/healthz`'s `status`.
    pub(crate) fn status(self) -> &'static str {
        match self {
            NotReady::Starting => "starting",
            NotReady::Draining => "draining",
            NotReady::BackplaneCannotPublish
            | NotReady::BackplaneNotSubscribed
            | NotReady::BackplaneRefusesWrites => "degraded",
        }
    }
}

/// One core's drain in progress.
#[derive(Debug)]
pub(super) struct Drain {
    started: Instant,
    period: Duration,
    /// Open connections when the drain began.
    total: usize,
    /// Closes begun by the drain so far.
    closed: usize,
}

impl Drain {
    /// How many closes should have begun `elapsed` into the drain: a straight line from none to
    /// `total` over the period, rounded up so the first batch goes at the first step.
    fn due(&self, elapsed: Duration) -> usize {
        if elapsed >= self.period || self.period.is_zero() {
            return self.total;
        }
        let fraction = elapsed.as_secs_f64() / self.period.as_secs_f64();
        ((self.total as f64 * fraction).ceil() as usize).min(self.total)
    }
}

/// How often a draining core closes its next batch.
pub(super) const DRAIN_STEP: Duration = Duration::from_millis(100);

impl Shared {
    /// Whether this instance should get new connections, and if not, why.
    pub(crate) fn readiness(&self) -> Result<(), NotReady> {
        if self.draining.load(Ordering::SeqCst) || self.shutdown.load(Ordering::SeqCst) {
            return Err(NotReady::Draining);
        }
        if !self.started.load(Ordering::SeqCst) {
            return Err(NotReady::Starting);
        }
        if let Some(bp) = &self.backplane {
            if !bp.publisher_connected() {
                return Err(NotReady::BackplaneCannotPublish);
            }
            if bp.stats.subscriber_connected.load(Ordering::Relaxed) != 1 {
                return Err(NotReady::BackplaneNotSubscribed);
            }
            if bp.refusing_writes() {
                return Err(NotReady::BackplaneRefusesWrites);
            }
        }
        Ok(())
    }

    /// The `/readyz` answer: 200, or 503 with the reason.
    pub(crate) fn readyz_response(&self) -> Vec<u8> {
        match self.readiness() {
            Ok(()) => http::response(200, "application/json", "", "{\"ready\":true}\n"),
            Err(why) => {
                let body = format!("{{\"ready\":false,\"reason\":\"{}\"}}\n", why.text());
                http::response(503, "application/json", "", &body)
            }
        }
    }

    /// The `/healthz` body: liveness (always 200) with the real state in `status` and `ready`.
    pub(crate) fn render_health(&self) -> String {
        let history = if self.config.history_active() {
            "on"
        } else {
            "off"
        };
        let readiness = self.readiness();
        let mut extra = format!(
            r#","ready":{},"node":"{:016x}","history":"{history}""#,
            readiness.is_ok(),
            self.node_id
        );
        if let Err(why) = readiness {
            let _ = write!(extra, r#","reason":"{}""#, why.text());
        }
        match &self.backplane {
            Some(bp) => extra.push_str(&bp.render_health()),
            None => extra.push_str(r#","backplane":{"kind":"none"}"#),
        }
        let status = readiness.map_or_else(|why| why.status(), |()| "ok");
        crate::metrics::render_health(&self.metrics, status, &extra)
    }

    /// The `/metrics` answer.
    pub(crate) fn metrics_response(&self) -> Vec<u8> {
        let mut body = crate::metrics::render_prometheus(&self.metrics);
        if let Some(bp) = &self.backplane {
            bp.render_prometheus(&mut body);
        }
        if let Some(hooks) = &self.hooks {
            hooks.render_prometheus(&mut body);
        }
        if let Some(history) = &self.history {
            history.render_prometheus(&mut body);
        }
        let ct = "text/plain; version=0.0.4; charset=utf-8";
        http::response(200, ct, "", &body)
    }
}

impl CoreLoop {
    /// Whether a drain (or shutdown) began: new upgrades are refused.
    pub(super) fn is_draining(&self) -> bool {
        self.drain.is_some()
            || self.shutdown_deadline.is_some()
            || self.shared.draining.load(Ordering::SeqCst)
    }

    /// Called every turn: starts the drain when it was asked for, and closes the batch due.
    pub(super) fn drain_turn(&mut self, now: Instant) {
        if self.shutdown_deadline.is_some() {
            return;
        }
        if self.drain.is_none() {
            if !self.shared.draining.load(Ordering::SeqCst) {
                return;
            }
            let period = self.shared.config.drain_period;
            log::info!(
                "core={} draining: {} connections closing over {period:?}",
                self.id,
                self.open
            );
            self.drain = Some(Drain {
                started: now,
                period,
                total: self.open,
                closed: 0,
            });
        }
        let Some(drain) = &self.drain else {
            return;
        };
        let elapsed = now.saturating_duration_since(drain.started);
        if elapsed >= drain.period || self.open == 0 {
            // The rest (and anything still in HTTP) go the way of a shutdown.
            self.begin_shutdown();
            return;
        }
        let batch = drain.due(elapsed).saturating_sub(drain.closed);
        if batch == 0 {
            return;
        }
        let keys: Vec<usize> = self
            .conns
            .iter_mut()
            .filter_map(|(key, conn)| match conn {
                Connection::Open(open) if open.closing.is_none() => Some(key),
                _ => None,
            })
            .take(batch)
            .collect();
        for &key in &keys {
            self.close(key, CloseReason::Shutdown);
        }
        if let Some(drain) = &mut self.drain {
            drain.closed += batch;
        }
        self.flush_dirty();
    }

    /// When the next drain step is due, while draining.
    pub(super) fn drain_deadline(&self, now: Instant) -> Option<Instant> {
        (self.drain.is_some() && self.shutdown_deadline.is_none()).then(|| now + DRAIN_STEP)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closes_are_spread_over_the_period() {
        let drain = Drain {
            started: Instant::now(),
            period: Duration::from_secs(4),
            total: 100,
            closed: 0,
        };
        assert_eq!(drain.due(Duration::ZERO), 0);
        assert_eq!(drain.due(Duration::from_millis(100)), 3);
        assert_eq!(drain.due(Duration::from_secs(1)), 25);
        assert_eq!(drain.due(Duration::from_secs(2)), 50);
        assert_eq!(drain.due(Duration::from_secs(4)), 100);
        assert_eq!(drain.due(Duration::from_secs(9)), 100);
    }

    #[test]
    fn a_zero_period_closes_everything_at_once() {
        let drain = Drain {
            started: Instant::now(),
            period: Duration::ZERO,
            total: 7,
            closed: 0,
        };
        assert_eq!(drain.due(Duration::ZERO), 7);
    }
}
