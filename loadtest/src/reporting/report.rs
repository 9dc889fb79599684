//! The run's summary: per-second progress lines, the final JSON document, and its
//! human-readable rendering.

use crate::orchestration::director::RampOutcome;
use crate::orchestration::shard::{ConnectSummary, PhaseResult};
use crate::reporting::servercpu::{self, ProcCpu, Role, ServerCpu};
use crate::reporting::stats::{self, Percentiles, Tick};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;

#[derive(Debug, Clone, Serialize)]
pub struct TimelinePoint {
    pub sec: u64,
    pub sent: u64,
    pub delivered: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Prints one line per second (to stderr) and keeps the timeline for the report and plot.
pub struct Progress {
    pub quiet: bool,
    pub timeline: Vec<TimelinePoint>,
}

impl Progress {
    pub fn new(quiet: bool) -> Self {
        Self {
            quiet,
            timeline: Vec::new(),
        }
    }

    pub fn tick(&mut self, t: &Tick) {
        let h = stats::hist_from_b64(&t.hist_b64).unwrap_or_else(|_| stats::new_hist());
        let p = Percentiles::of(&h);
        let c = &t.counters;
        if !self.quiet {
            eprintln!(
                "[{:>4}s] sent {:>7}/s  delivered {:>8}/s  p50 {:>7.2} ms  p99 {:>8.2} ms  max {:>8.2} ms  dup {} err {} disc {}",
                t.sec + 1,
                c.sent,
                c.delivered,
                p.p50_ms,
                p.p99_ms,
                p.max_ms,
                c.duplicates,
                c.error_frames + c.protocol_errors,
                c.disconnects
            );
        }
        self.timeline.push(TimelinePoint {
            sec: t.sec,
            sent: c.sent,
            delivered: c.delivered,
            p50_ms: p.p50_ms,
            p99_ms: p.p99_ms,
            max_ms: p.max_ms,
        });
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ConnectReport {
    pub attempted: u64,
    pub established: u64,
    pub failed: u64,
    pub failures: BTreeMap<String, u64>,
    pub elapsed_s: f64,
    pub per_second: f64,
    /// TCP connect + HTTP upgrade, per established connection.
    pub handshake_latency: Percentiles,
    /// TCP connect alone.
    pub tcp_connect_latency: Percentiles,
}

impl ConnectReport {
    pub fn of(c: &ConnectSummary) -> Self {
        let h = stats::hist_from_b64(&c.connect_us_b64).unwrap_or_else(|_| stats::new_hist());
        Self {
            attempted: c.attempted,
            established: c.established,
            failed: c.failed,
            failures: c.failures.clone(),
            elapsed_s: c.elapsed_s,
            per_second: rate(c.established as f64, c.elapsed_s),
            handshake_latency: Percentiles::of(&h),
            tcp_connect_latency: Percentiles::of(
                &stats::hist_from_b64(&c.tcp_us_b64).unwrap_or_else(|_| stats::new_hist()),
            ),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PhaseReport {
    pub index: u32,
    pub rate: f64,
    pub duration_s: f64,
    pub drain_s: f64,
    pub planned: u64,
    pub sent: u64,
    pub skipped_dead_sender: u64,
    pub skipped_backpressure: u64,
    pub expected: u64,
    pub delivered: u64,
    pub missing: u64,
    pub messages_incomplete: u64,
    pub duplicated: u64,
    pub misrouted: u64,
    pub late: u64,
    pub foreign: u64,
    pub error_frames: u64,
    pub error_codes: BTreeMap<String, u64>,
    pub disconnect_reasons: BTreeMap<String, u64>,
    pub other_frames: u64,
    pub pings: u64,
    pub closes_by_server: u64,
    pub disconnects: u64,
    pub protocol_errors: u64,
    pub deliveries_per_s: f64,
    /// From each message's intended send time to each delivery's arrival.
    pub latency: Percentiles,
    /// How late the generator itself wrote each message (part of `latency`); if this is
    /// large, the generator, not the server, is the bottleneck.
    pub send_lag: Percentiles,
    pub generator_cpu_s: f64,
    pub generator_cpu_us_per_delivery: Option<f64>,
    /// With `--server-pid` / `--redis-pid`: the server side's CPU over the send window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cpu: Option<ServerCpuReport>,
}

/// The server side's CPU over one phase's send window, next to its deliveries. Percentages
/// are of one core; "per delivery" divides by every delivery of the phase (drain included).
/// A field is null when a pid of its kind could not be read at both ends of the window.
#[derive(Debug, Clone, Serialize)]
pub struct ServerCpuReport {
    /// Measured seconds between the samples at the start and the end of sending.
    pub window_s: f64,
    pub deliveries: u64,
    /// Every `--server-pid` and `--redis-pid` together.
    pub total_cpu_s: Option<f64>,
    pub total_cpu_pct: Option<f64>,
    pub cpu_us_per_delivery: Option<f64>,
    pub server_cpu_s: Option<f64>,
    pub server_cpu_pct: Option<f64>,
    pub server_cpu_us_per_delivery: Option<f64>,
    /// Null without `--redis-pid`.
    pub redis_cpu_s: Option<f64>,
    pub redis_cpu_pct: Option<f64>,
    pub redis_cpu_us_per_delivery: Option<f64>,
    /// From the start of sending to the end of the drain: catches work left over when sending
    /// stops (a backlog), at the price of idle time.
    pub window_with_drain_s: f64,
    pub cpu_us_per_delivery_with_drain: Option<f64>,
    pub clock_ticks_per_s: u64,
    pub processes: Vec<ProcCpuReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProcCpuReport {
    #[serde(flatten)]
    pub proc: ProcCpu,
    pub cpu_pct: Option<f64>,
}

impl ServerCpuReport {
    pub fn of(c: &ServerCpu, deliveries: u64) -> Self {
        let w = c.window_s;
        let (total, server, redis) = (
            c.sum(None),
            c.sum(Some(Role::Server)),
            c.sum(Some(Role::Redis)),
        );
        let per = |v| servercpu::us_per_delivery(v, deliveries);
        let pct = |v| servercpu::pct_of_core(v, w);
        Self {
            window_s: w,
            deliveries,
            total_cpu_s: total,
            total_cpu_pct: pct(total),
            cpu_us_per_delivery: per(total),
            server_cpu_s: server,
            server_cpu_pct: pct(server),
            server_cpu_us_per_delivery: per(server),
            redis_cpu_s: redis,
            redis_cpu_pct: pct(redis),
            redis_cpu_us_per_delivery: per(redis),
            window_with_drain_s: c.window_with_drain_s,
            cpu_us_per_delivery_with_drain: per(c.sum_with_drain(None)),
            clock_ticks_per_s: c.clock_ticks_per_s,
            processes: c
                .processes
                .iter()
                .map(|p| ProcCpuReport {
                    cpu_pct: pct(p.cpu_s),
                    proc: p.clone(),
                })
                .collect(),
        }
    }

    fn human(&self, s: &mut String) {
        let f = |v: Option<f64>, unit: &str| v.map_or("?".to_owned(), |x| format!("{x:.1}{unit}"));
        let redis = if self.processes.iter().any(|p| p.proc.role == Role::Redis) {
            format!(
                " (servers {}, Redis {})",
                f(self.server_cpu_us_per_delivery, ""),
                f(self.redis_cpu_us_per_delivery, "")
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            "  server CPU over the {:.2} s send window: {} of one core = {} µs per delivery{redis}; {} µs incl. the drain",
            self.window_s,
            f(self.total_cpu_pct, "%"),
            f(self.cpu_us_per_delivery, ""),
            f(self.cpu_us_per_delivery_with_drain, ""),
        );
        for p in &self.processes {
            let threads: Vec<String> = p
                .proc
                .threads
                .iter()
                .take(8)
                .map(|t| {
                    let pct = servercpu::pct_of_core(Some(t.cpu_s), self.window_s).unwrap_or(0.0);
                    format!("{} {}: {pct:.1}%", t.tid, t.comm)
                })
                .collect();
            let more = p.proc.threads.len().saturating_sub(8);
            let _ = writeln!(
                s,
                "    pid {} {} ({}): {}{}{}",
                p.proc.pid,
                p.proc.comm.as_deref().unwrap_or("?"),
                match p.proc.role {
                    Role::Server => "server",
                    Role::Redis => "redis",
                },
                f(p.cpu_pct, "%"),
                if threads.is_empty() {
                    String::new()
                } else {
                    format!("; threads {}", threads.join(", "))
                },
                if more > 0 {
                    format!(" (+{more} more)")
                } else {
                    String::new()
                }
            );
        }
    }
}

impl PhaseReport {
    pub fn of(r: &PhaseResult) -> Self {
        let c = &r.counters;
        Self {
            index: r.index,
            rate: r.rate,
            duration_s: r.duration_s,
            drain_s: r.drain_s,
            planned: r.planned,
            sent: c.sent,
            skipped_dead_sender: c.skipped_dead_sender,
            skipped_backpressure: c.skipped_backpressure,
            expected: r.expected,
            delivered: c.delivered,
            missing: r.missing,
            messages_incomplete: r.messages_incomplete,
            duplicated: c.duplicates,
            misrouted: c.misrouted,
            late: c.late,
            foreign: c.foreign,
            error_frames: c.error_frames,
            error_codes: r.error_codes.clone(),
            disconnect_reasons: r.disconnect_reasons.clone(),
            other_frames: c.other_frames,
            pings: c.pings,
            closes_by_server: c.closes_by_server,
            disconnects: c.disconnects,
            protocol_errors: c.protocol_errors,
            deliveries_per_s: rate(c.delivered as f64, r.duration_s),
            latency: Percentiles::of(&r.latency()),
            send_lag: Percentiles::of(&r.send_lag()),
            generator_cpu_s: r.cpu_s,
            generator_cpu_us_per_delivery: (c.delivered > 0)
                .then(|| r.cpu_s * 1e6 / c.delivered as f64),
            server_cpu: r
                .server_cpu
                .as_ref()
                .map(|sc| ServerCpuReport::of(sc, c.delivered)),
        }
    }

    fn clean(&self) -> bool {
        self.missing == 0
            && self.duplicated == 0
            && self.misrouted == 0
            && self.skipped_dead_sender + self.skipped_backpressure == 0
            && self.protocol_errors == 0
            && self.disconnects == 0
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct IdleReport {
    pub server_pids: Vec<u32>,
    pub rss_before_kib: Option<u64>,
    pub rss_connected_kib: Option<u64>,
    pub rss_end_kib: Option<u64>,
    pub rss_per_connection_bytes: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    pub run_id: String,
    pub addrs: Vec<String>,
    pub users: u64,
    pub devices: u32,
    pub connections: u64,
    pub threads: u32,
    pub workers: u32,
    pub connect: ConnectReport,
    pub phases: Vec<PhaseReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ramp: Option<RampOutcome>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle: Option<IdleReport>,
    /// Whole-run CPU (user + sys) of the generator, all processes.
    pub generator_cpu_s: f64,
    pub generator_cpu_us_per_delivery: Option<f64>,
    pub healthz_before: Vec<serde_json::Value>,
    /// Taken right after every connection was established.
    pub healthz_connected: Vec<serde_json::Value>,
    pub healthz_after: Vec<serde_json::Value>,
    pub timeline: Vec<TimelinePoint>,
    /// Every connection up, no loss, duplicates, misroutes, skips or disconnects.
    pub clean: bool,
}

impl Report {
    pub fn finish(&mut self) {
        let delivered: u64 = self.phases.iter().map(|p| p.delivered).sum();
        self.generator_cpu_us_per_delivery =
            (delivered > 0).then(|| self.generator_cpu_s * 1e6 / delivered as f64);
        self.clean = self.connect.failed == 0 && self.phases.iter().all(PhaseReport::clean);
    }

    pub fn human(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "loadtest {} (run {}): {} connections ({} users x {} devices) to {}; {} thread(s) x {} process(es)",
            self.scenario,
            self.run_id,
            self.connections,
            self.users,
            self.devices,
            self.addrs.join(", "),
            self.threads,
            self.workers
        );
        let c = &self.connect;
        let _ = writeln!(
            s,
            "connect: {}/{} established in {:.2} s ({:.0}/s); failures: {}; connect+upgrade p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (TCP alone: p50 {:.2}, p99 {:.2}, max {:.2})",
            c.established,
            c.attempted,
            c.elapsed_s,
            c.per_second,
            codes(&c.failures),
            c.handshake_latency.p50_ms,
            c.handshake_latency.p99_ms,
            c.handshake_latency.max_ms,
            c.tcp_connect_latency.p50_ms,
            c.tcp_connect_latency.p99_ms,
            c.tcp_connect_latency.max_ms
        );
        for p in &self.phases {
            if p.planned == 0 {
                // Idle: only the connection health during the hold matters.
                let _ = writeln!(
                    s,
                    "held {} s: server pings {}, closes {}, disconnects {} ({}), protocol errors {}, other frames {}",
                    p.duration_s,
                    p.pings,
                    p.closes_by_server,
                    p.disconnects,
                    codes(&p.disconnect_reasons),
                    p.protocol_errors,
                    p.other_frames
                );
                continue;
            }
            let _ = writeln!(
                s,
                "phase {}: {} msg/s for {} s (+{} s drain)",
                p.index, p.rate, p.duration_s, p.drain_s
            );
            let _ = writeln!(
                s,
                "  messages:   planned {}, sent {}, skipped {} (sender down {}, write backlog {})",
                p.planned,
                p.sent,
                p.skipped_dead_sender + p.skipped_backpressure,
                p.skipped_dead_sender,
                p.skipped_backpressure
            );
            let _ = writeln!(
                s,
                "  deliveries: expected {}, delivered {}, missing {} (in {} messages), duplicated {}, misrouted {}, late {}, foreign {}",
                p.expected,
                p.delivered,
                p.missing,
                p.messages_incomplete,
                p.duplicated,
                p.misrouted,
                p.late,
                p.foreign
            );
            let l = &p.latency;
            let _ = writeln!(
                s,
                "  latency from intended send: p50 {:.2} ms, p90 {:.2}, p99 {:.2}, p99.9 {:.2}, max {:.2} ms (mean {:.2}); {:.0} deliveries/s",
                l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms, l.mean_ms, p.deliveries_per_s
            );
            let _ = writeln!(
                s,
                "  server frames: errors {} ({}), other {}, pings {}, closes {}; disconnects {} ({}), protocol errors {}",
                p.error_frames,
                codes(&p.error_codes),
                p.other_frames,
                p.pings,
                p.closes_by_server,
                p.disconnects,
                codes(&p.disconnect_reasons),
                p.protocol_errors
            );
            if let Some(us) = p.generator_cpu_us_per_delivery {
                let _ = writeln!(
                    s,
                    "  generator: CPU {:.2} s = {:.2} µs per delivery; own send lag p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
                    p.generator_cpu_s, us, p.send_lag.p50_ms, p.send_lag.p99_ms, p.send_lag.max_ms
                );
            }
            if let Some(sc) = &p.server_cpu {
                sc.human(&mut s);
            }
        }
        if let Some(r) = &self.ramp {
            let held = r
                .highest_held_rate
                .map_or("none".to_owned(), |v| format!("{v} msg/s"));
            let _ = writeln!(
                s,
                "ramp: highest rate that held: {held}; stopped: {}",
                r.stopped_because
            );
        }
        if let Some(i) = &self.idle {
            let kib = |v: Option<u64>| v.map_or("?".to_owned(), |k| format!("{k} KiB"));
            let _ = writeln!(
                s,
                "server RSS (pids {:?}): before {}, connected {}, end {}; per connection {}",
                i.server_pids,
                kib(i.rss_before_kib),
                kib(i.rss_connected_kib),
                kib(i.rss_end_kib),
                i.rss_per_connection_bytes
                    .map_or("?".to_owned(), |b| format!("{b:.0} bytes"))
            );
        }
        let _ = writeln!(
            s,
            "generator: {:.2} s CPU in total{}",
            self.generator_cpu_s,
            self.generator_cpu_us_per_delivery
                .map_or(String::new(), |us| format!(", {us:.2} µs per delivery"))
        );
        for (i, h) in self.healthz_connected.iter().enumerate() {
            let _ = writeln!(s, "healthz when connected [{}]: {h}", self.addrs[i]);
        }
        for (i, h) in self.healthz_after.iter().enumerate() {
            let _ = writeln!(
                s,
                "healthz 1 s after disconnecting [{}]: {h}",
                self.addrs[i]
            );
        }
        let _ = writeln!(
            s,
            "verdict: {}",
            if self.clean {
                "CLEAN"
            } else {
                "PROBLEMS (see above)"
            }
        );
        s
    }
}

fn codes(m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "none".into();
    }
    m.iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn rate(n: f64, secs: f64) -> f64 {
    if secs > 0.0 {
        n / secs
    } else {
        0.0
    }
}

/// RSS growth per connection, in bytes.
pub fn rss_per_conn(before_kib: Option<u64>, after_kib: Option<u64>, conns: u64) -> Option<f64> {
    let (b, a) = (before_kib?, after_kib?);
    (conns > 0).then(|| (a as f64 - b as f64) * 1024.0 / conns as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reporting::stats::Counters;

    #[test]
    fn phase_report_counts_and_verdict() {
        let mut h = stats::new_hist();
        h.record(2000).unwrap();
        let r = PhaseResult {
            rate: 100.0,
            duration_s: 2.0,
            planned: 200,
            expected: 800,
            missing: 0,
            counters: Counters {
                sent: 200,
                delivered: 800,
                ..Default::default()
            },
            latency_us_b64: stats::hist_to_b64(&h),
            cpu_s: 0.008,
            ..Default::default()
        };
        let p = PhaseReport::of(&r);
        assert_eq!(p.deliveries_per_s, 400.0);
        assert!((p.generator_cpu_us_per_delivery.unwrap() - 10.0).abs() < 1e-9);
        assert!((p.latency.p50_ms - 2.0).abs() < 0.01);
        assert!(p.clean());
        let mut lossy = r.clone();
        lossy.missing = 1;
        assert!(!PhaseReport::of(&lossy).clean());
    }

    #[test]
    fn server_cpu_per_delivery() {
        use crate::reporting::servercpu::ThreadCpu;
        let proc = |pid, role, cpu_s| ProcCpu {
            pid,
            role,
            comm: Some("x y)".into()),
            cpu_s,
            threads: vec![ThreadCpu {
                tid: pid,
                comm: "core-0".into(),
                cpu_s: 1.0,
            }],
            cpu_with_drain_s: cpu_s.map(|c| c + 0.5),
        };
        let sc = ServerCpu {
            window_s: 10.0,
            window_with_drain_s: 12.0,
            clock_ticks_per_s: 100,
            processes: vec![
                proc(1, Role::Server, Some(4.0)),
                proc(2, Role::Server, Some(3.0)),
                proc(3, Role::Redis, Some(1.0)),
            ],
        };
        let r = PhaseResult {
            rate: 5000.0,
            duration_s: 10.0,
            planned: 50_000,
            counters: Counters {
                sent: 50_000,
                delivered: 200_000,
                ..Default::default()
            },
            server_cpu: Some(sc.clone()),
            ..Default::default()
        };
        let p = PhaseReport::of(&r);
        let c = p.server_cpu.as_ref().unwrap();
        // 8 s of CPU in 10 s for 200,000 deliveries: 80% of a core, 40 µs each.
        assert_eq!(c.deliveries, 200_000);
        assert_eq!(c.total_cpu_s, Some(8.0));
        assert_eq!(c.total_cpu_pct, Some(80.0));
        assert_eq!(c.cpu_us_per_delivery, Some(40.0));
        assert_eq!(c.server_cpu_us_per_delivery, Some(35.0));
        assert_eq!(c.redis_cpu_us_per_delivery, Some(5.0));
        assert_eq!(c.redis_cpu_pct, Some(10.0));
        assert_eq!(c.cpu_us_per_delivery_with_drain, Some(47.5));
        assert_eq!(c.processes[0].cpu_pct, Some(40.0));
        let j = serde_json::to_value(&p).unwrap();
        assert_eq!(j["server_cpu"]["cpu_us_per_delivery"], 40.0);
        assert_eq!(j["server_cpu"]["processes"][2]["role"], "redis");
        assert_eq!(j["server_cpu"]["processes"][0]["pid"], 1);
        assert_eq!(
            j["server_cpu"]["processes"][0]["threads"][0]["comm"],
            "core-0"
        );
        let mut h = String::new();
        c.human(&mut h);
        assert!(
            h.contains("80.0% of one core = 40.0 µs per delivery (servers 35.0, Redis 5.0)"),
            "{h}"
        );
        assert!(h.contains("pid 3 x y) (redis): 10.0%"), "{h}");

        // An unreadable pid: its kind and the total are unknown, never a partial figure.
        let mut lost = sc;
        lost.processes[1].cpu_s = None;
        let c = ServerCpuReport::of(&lost, 200_000);
        assert_eq!((c.total_cpu_s, c.server_cpu_s), (None, None));
        assert_eq!(c.redis_cpu_us_per_delivery, Some(5.0));
        // No deliveries: no per-delivery figure; no --server-pid: no section at all.
        assert_eq!(
            ServerCpuReport::of(&lost, 0).redis_cpu_us_per_delivery,
            None
        );
        let none = PhaseReport::of(&PhaseResult::default());
        assert!(none.server_cpu.is_none());
        assert!(serde_json::to_value(&none)
            .unwrap()
            .get("server_cpu")
            .is_none());
    }

    #[test]
    fn rss_math() {
        assert_eq!(rss_per_conn(Some(1000), Some(2000), 1024), Some(1000.0));
        assert_eq!(rss_per_conn(None, Some(2000), 10), None);
        assert_eq!(rss_per_conn(Some(1), Some(2), 0), None);
    }
}
