//! What a churn run reports: the loop's [`Tally`], the server samples, the memory summary
//! (steady-state start, end, max, least-squares slope), and the human summary.

use super::AFTER_CLOSE;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::{self, Write};

/// What the loop counted, by kind and reason.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Tally {
    /// Upgrades completed, the initial ones included.
    pub opened: u64,
    /// Of those, the initial population.
    pub opened_initial: u64,
    /// Churn closes by kind (`clean`, `fin`, `reset`).
    pub closed: BTreeMap<String, u64>,
    /// Clean closes the server answered neither with a close frame nor EOF in time.
    pub close_timeouts: u64,
    /// Churn closes due that found no open connection to close.
    pub churn_skipped: u64,
    /// Failed connects and upgrades, by reason (each retried after 1 s).
    pub connect_failures: BTreeMap<String, u64>,
    /// Open connections that went away without being asked to, by reason (retried after 1 s).
    pub dropped: BTreeMap<String, u64>,
    pub messages_sent: u64,
    pub deliveries: u64,
    /// `error` events by code (e.g. a rate limit).
    pub error_codes: BTreeMap<String, u64>,
    pub protocol_errors: u64,
}

impl Tally {
    /// Everything that went wrong on the generator's side of the sockets.
    pub fn errors(&self) -> u64 {
        let sum = |m: &BTreeMap<String, u64>| m.values().sum::<u64>();
        sum(&self.connect_failures) + sum(&self.dropped) + self.protocol_errors
    }

    pub fn closed_total(&self) -> u64 {
        self.closed.values().sum()
    }
}

/// One sample of the server, `t_s` seconds after churn started.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Sample {
    pub t_s: f64,
    pub rss_kib: Option<u64>,
    pub fds: Option<u64>,
    /// `/healthz` `connections`, summed over the addresses.
    pub server_connections: Option<u64>,
    /// `/healthz` per-core `users`, summed.
    pub server_users: Option<u64>,
    /// The generator's open connections, and its running totals.
    pub open: u64,
    pub opened: u64,
    pub closed: u64,
}

/// The memory figures of a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct MemorySummary {
    pub steady_after_s: f64,
    /// Samples at or after `steady_after_s` (those the start RSS and slope come from).
    pub steady_samples: usize,
    /// RSS of the first steady sample.
    pub rss_start_kib: Option<u64>,
    /// RSS of the last sample.
    pub rss_end_kib: Option<u64>,
    /// Largest RSS of any sample.
    pub rss_max_kib: Option<u64>,
    /// Least-squares slope of RSS over the steady samples, KiB per minute.
    pub slope_kib_per_min: Option<f64>,
    pub fds_start: Option<u64>,
    pub fds_end: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct ChurnReport {
    pub run_id: String,
    pub addrs: Vec<String>,
    pub server_pids: Vec<u32>,
    pub connections: u64,
    pub churn_per_sec: f64,
    pub fresh_users: f64,
    pub rate: f64,
    pub duration_s: f64,
    pub sample_every_s: f64,
    /// Server RSS before the first connection.
    pub rss_before_kib: Option<u64>,
    /// Seconds to open the initial population.
    pub connect_s: f64,
    pub samples: Vec<Sample>,
    pub memory: MemorySummary,
    /// Five seconds after every connection was closed at the end.
    pub after_close: Sample,
    pub tally: Tally,
    pub errors: u64,
}

/// Least-squares slope of `y` over `x` (x in seconds), per minute; None with fewer than two
/// distinct x.
pub fn slope_per_min(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx * 60.0)
}

/// The memory figures of `samples` (in time order), the steady state starting at
/// `steady_after_s`.
pub fn summarize(samples: &[Sample], steady_after_s: f64) -> MemorySummary {
    let steady: Vec<&Sample> = samples.iter().filter(|s| s.t_s >= steady_after_s).collect();
    let rss: Vec<(f64, f64)> = steady
        .iter()
        .filter_map(|s| s.rss_kib.map(|r| (s.t_s, r as f64)))
        .collect();
    MemorySummary {
        steady_after_s,
        steady_samples: steady.len(),
        rss_start_kib: steady.iter().find_map(|s| s.rss_kib),
        rss_end_kib: samples.last().and_then(|s| s.rss_kib),
        rss_max_kib: samples.iter().filter_map(|s| s.rss_kib).max(),
        slope_kib_per_min: slope_per_min(&rss),
        fds_start: steady.iter().find_map(|s| s.fds),
        fds_end: samples.last().and_then(|s| s.fds),
    }
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

const HEADER: &str =
    "     t_s    rss_kib   Δ_kib    fds  srv_conns  srv_users    open    opened    closed";

/// One table row; Δ is against `first` (the sample at t = 0).
pub(super) fn row(s: &Sample, first: Option<&Sample>) -> String {
    let delta = match (s.rss_kib, first.and_then(|f| f.rss_kib)) {
        (Some(a), Some(b)) => format!("{:+}", a as i64 - b as i64),
        _ => "-".to_owned(),
    };
    format!(
        "{:>8.1} {:>10} {:>7} {:>6} {:>10} {:>10} {:>7} {:>9} {:>9}",
        s.t_s,
        opt(s.rss_kib),
        delta,
        opt(s.fds),
        opt(s.server_connections),
        opt(s.server_users),
        s.open,
        s.opened,
        s.closed
    )
}

/// The human summary: the samples table, then the memory figures and the counts.
pub fn print(r: &ChurnReport, out: &mut dyn Write) -> io::Result<()> {
    writeln!(
        out,
        "churn run {}: {} connections, {}/s closed and reopened (fresh users {}), {} \
         messages/s, {} s; initial connect {:.2} s",
        r.run_id, r.connections, r.churn_per_sec, r.fresh_users, r.rate, r.duration_s, r.connect_s
    )?;
    writeln!(out, "{HEADER}")?;
    for s in &r.samples {
        writeln!(out, "{}", row(s, r.samples.first()))?;
    }
    let m = &r.memory;
    writeln!(
        out,
        "server RSS (KiB): before connecting {}, steady start (t >= {} s) {}, end {}, max {}; \
         slope {} KiB/min over {} samples; fds {} -> {}",
        opt(r.rss_before_kib),
        m.steady_after_s,
        opt(m.rss_start_kib),
        opt(m.rss_end_kib),
        opt(m.rss_max_kib),
        m.slope_kib_per_min
            .map_or_else(|| "-".to_owned(), |s| format!("{s:+.1}")),
        m.steady_samples,
        opt(m.fds_start),
        opt(m.fds_end)
    )?;
    writeln!(
        out,
        "after closing everything (+{} s): RSS {} KiB, fds {}, server connections {}, users {}",
        AFTER_CLOSE.as_secs(),
        opt(r.after_close.rss_kib),
        opt(r.after_close.fds),
        opt(r.after_close.server_connections),
        opt(r.after_close.server_users)
    )?;
    let t = &r.tally;
    writeln!(
        out,
        "opened {} ({} initial), closed by churn {} {:?} (clean-close timeouts {}, skipped {}); \
         messages sent {}, deliveries {}",
        t.opened,
        t.opened_initial,
        t.closed_total(),
        t.closed,
        t.close_timeouts,
        t.churn_skipped,
        t.messages_sent,
        t.deliveries
    )?;
    writeln!(
        out,
        "errors {}: connect failures {:?}, dropped {:?}, protocol errors {}; error events {:?}",
        r.errors, t.connect_failures, t.dropped, t.protocol_errors, t.error_codes
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t_s: f64, rss: u64) -> Sample {
        Sample {
            t_s,
            rss_kib: Some(rss),
            fds: Some(rss / 10),
            ..Sample::default()
        }
    }

    #[test]
    fn slope_is_least_squares_per_minute() {
        // 2 KiB per 10 s = 12 KiB/min, whatever the offset.
        let line: Vec<(f64, f64)> = (0..7)
            .map(|i| (i as f64 * 10.0, 500.0 + 2.0 * i as f64))
            .collect();
        assert!((slope_per_min(&line).unwrap() - 12.0).abs() < 1e-9);
        // Noise around a flat line: the fit, not the end points (which differ by 4).
        let flat = [(0.0, 100.0), (10.0, 104.0), (20.0, 96.0), (30.0, 104.0)];
        let s = slope_per_min(&flat).unwrap();
        assert!((s - 2.4).abs() < 1e-9, "{s}");
        assert_eq!(slope_per_min(&[(5.0, 1.0)]), None);
        assert_eq!(slope_per_min(&[(5.0, 1.0), (5.0, 9.0)]), None);
    }

    #[test]
    fn summary_starts_at_the_steady_state() {
        // Warm-up growth to 900, then flat; the max is during warm-up.
        let samples = [
            at(0.0, 500),
            at(30.0, 950),
            at(60.0, 900),
            at(90.0, 900),
            at(120.0, 900),
        ];
        let m = summarize(&samples, 60.0);
        assert_eq!(m.steady_samples, 3);
        assert_eq!(m.rss_start_kib, Some(900));
        assert_eq!(m.rss_end_kib, Some(900));
        assert_eq!(m.rss_max_kib, Some(950));
        assert_eq!(m.slope_kib_per_min, Some(0.0));
        assert_eq!((m.fds_start, m.fds_end), (Some(90), Some(90)));
        // Nothing steady yet: no start and no slope, the rest still reported.
        let m = summarize(&samples[..2], 60.0);
        assert_eq!((m.rss_start_kib, m.slope_kib_per_min), (None, None));
        assert_eq!(m.rss_end_kib, Some(950));
        // A sample without RSS is skipped, not read as zero.
        let mut gap = samples.to_vec();
        gap[3].rss_kib = None;
        assert_eq!(summarize(&gap, 60.0).slope_kib_per_min, Some(0.0));
        assert_eq!(
            summarize(&[], 60.0),
            MemorySummary {
                steady_after_s: 60.0,
                ..MemorySummary::default()
            }
        );
    }
}
