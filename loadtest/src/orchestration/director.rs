//! The phase plan of the delivery scenarios: which phases to run and, for ramp, when to stop.
//! It sees only merged, whole-run results, so it behaves the same with one process or many
//! workers.

use crate::cli::{Args, Scenario};
use crate::orchestration::shard::{PhaseResult, PhaseSpec};
use crate::reporting::stats::Percentiles;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RampOutcome {
    /// Highest total rate whose step had no loss and p99 within bound.
    pub highest_held_rate: Option<f64>,
    pub stopped_because: String,
}

pub struct Director {
    scenario: Scenario,
    rate: f64,
    duration: f64,
    drain: f64,
    start_rate: f64,
    step: f64,
    step_duration: f64,
    p99_bound_ms: f64,
    max_steps: u32,
    issued: u32,
    pub ramp: RampOutcome,
}

impl Director {
    pub fn new(a: &Args) -> Self {
        Self {
            scenario: a.scenario,
            rate: a.rate,
            duration: a.duration,
            drain: a.drain,
            start_rate: a.start_rate,
            step: a.step,
            step_duration: a.step_duration,
            p99_bound_ms: a.p99_bound_ms,
            max_steps: a.max_steps,
            issued: 0,
            ramp: RampOutcome::default(),
        }
    }

    /// Next phase at the whole-run rate, given the merged result of the previous one.
    pub fn next(&mut self, last: Option<&PhaseResult>) -> Option<PhaseSpec> {
        let spec = match self.scenario {
            Scenario::Direct | Scenario::Fanout => (self.issued == 0).then_some(PhaseSpec {
                rate: self.rate,
                duration_s: self.duration,
                drain_s: self.drain,
            }),
            // Idle sends nothing; there is nothing to drain.
            Scenario::Idle => (self.issued == 0).then_some(PhaseSpec {
                rate: 0.0,
                duration_s: self.duration,
                drain_s: 0.0,
            }),
            Scenario::Ramp => self.next_ramp(last),
            // Soak, churn and room run their own loops (soak.rs, churn.rs, room.rs), never the
            // director.
            Scenario::Soak | Scenario::Churn | Scenario::Room => None,
        };
        if spec.is_some() {
            self.issued += 1;
        }
        spec
    }

    fn next_ramp(&mut self, last: Option<&PhaseResult>) -> Option<PhaseSpec> {
        if let Some(r) = last {
            if let Err(why) = self.judge(r) {
                self.ramp.stopped_because = why;
                return None;
            }
            self.ramp.highest_held_rate = Some(r.rate);
            if self.issued >= self.max_steps {
                self.ramp.stopped_because = format!("all {} steps held", self.max_steps);
                return None;
            }
        }
        Some(PhaseSpec {
            rate: self.start_rate + self.step * f64::from(self.issued),
            duration_s: self.step_duration,
            drain_s: self.drain,
        })
    }

    /// A step holds if every owed delivery arrived, nothing was skipped, and p99 is in bound.
    fn judge(&self, r: &PhaseResult) -> Result<(), String> {
        let c = &r.counters;
        if r.missing > 0 {
            return Err(format!("{} deliveries lost at {} msg/s", r.missing, r.rate));
        }
        let skipped = c.skipped_backpressure + c.skipped_dead_sender;
        if skipped > 0 {
            return Err(format!(
                "{skipped} messages could not be sent at {} msg/s",
                r.rate
            ));
        }
        if c.sent == 0 {
            return Err(format!("nothing was sent at {} msg/s", r.rate));
        }
        let p = Percentiles::of(&r.latency());
        if p.p99_ms > self.p99_bound_ms {
            return Err(format!(
                "p99 {:.2} ms > {} ms at {} msg/s",
                p.p99_ms, self.p99_bound_ms, r.rate
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reporting::stats;
    use clap::Parser;

    fn args(v: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("loadtest").chain(v.iter().copied())).unwrap()
    }

    fn result(rate: f64, missing: u64, latency_ms: u64) -> PhaseResult {
        let mut h = stats::new_hist();
        h.record(latency_ms * 1000).unwrap();
        let mut r = PhaseResult {
            rate,
            missing,
            latency_us_b64: stats::hist_to_b64(&h),
            ..Default::default()
        };
        r.counters.sent = 10;
        r
    }

    #[test]
    fn direct_runs_one_phase() {
        let mut d = Director::new(&args(&["direct", "--rate", "500", "--duration", "2"]));
        let s = d.next(None).unwrap();
        assert_eq!((s.rate, s.duration_s), (500.0, 2.0));
        assert!(d.next(Some(&result(500.0, 0, 1))).is_none());
        let mut i = Director::new(&args(&["idle"]));
        assert_eq!(i.next(None).unwrap().rate, 0.0);
        assert!(i.next(None).is_none());
    }

    #[test]
    fn ramp_stops_on_latency_or_loss() {
        let a = args(&[
            "ramp",
            "--start-rate",
            "100",
            "--step",
            "50",
            "--p99-bound-ms",
            "10",
        ]);
        let mut d = Director::new(&a);
        assert_eq!(d.next(None).unwrap().rate, 100.0);
        assert_eq!(d.next(Some(&result(100.0, 0, 2))).unwrap().rate, 150.0);
        assert_eq!(d.next(Some(&result(150.0, 0, 5))).unwrap().rate, 200.0);
        assert!(d.next(Some(&result(200.0, 0, 20))).is_none());
        assert_eq!(d.ramp.highest_held_rate, Some(150.0));
        assert!(d.ramp.stopped_because.contains("p99"));

        let mut d = Director::new(&a);
        d.next(None);
        assert!(d.next(Some(&result(100.0, 1, 1))).is_none());
        assert_eq!(d.ramp.highest_held_rate, None);
        assert!(d.ramp.stopped_because.contains("lost"));
    }

    #[test]
    fn ramp_is_bounded_by_max_steps() {
        let mut d = Director::new(&args(&["ramp", "--max-steps", "2"]));
        assert!(d.next(None).is_some());
        assert!(d.next(Some(&result(1000.0, 0, 1))).is_some());
        assert!(d.next(Some(&result(2000.0, 0, 1))).is_none());
        assert_eq!(d.ramp.highest_held_rate, Some(2000.0));
    }
}
