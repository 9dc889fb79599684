//! Runs one process's shard: starts the event-loop threads, waits for the connect phase,
//! then runs phases as a `Control` dictates and turns ledgers into phase results.
//!
//! The same code runs in a single process (the control decides locally) and in a worker
//! (the control relays to the parent over stdin/stdout); only the `Control` differs.

use crate::orchestration::engine::{self, Command, Engine, PhaseRun, Shared, ThreadReport};
use crate::orchestration::ledger::{self, Ledger};
use crate::reporting::servercpu::{self, ServerCpu};
use crate::reporting::stats::{self, Counters, Tick};
use crate::reporting::sysinfo;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What to run next, for the whole process.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct PhaseSpec {
    pub rate: f64,
    pub duration_s: f64,
    pub drain_s: f64,
}

impl PhaseSpec {
    pub fn planned(&self) -> u64 {
        (self.rate * self.duration_s).floor() as u64
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConnectSummary {
    pub attempted: u64,
    pub established: u64,
    pub failed: u64,
    pub failures: BTreeMap<String, u64>,
    pub elapsed_s: f64,
    /// Connect + handshake time per connection (µs), serialized HDR histogram.
    pub connect_us_b64: String,
    /// TCP connect alone (µs), serialized HDR histogram.
    pub tcp_us_b64: String,
}

impl ConnectSummary {
    pub fn merge(&mut self, o: &ConnectSummary) {
        self.attempted += o.attempted;
        self.established += o.established;
        self.failed += o.failed;
        stats::merge_codes(&mut self.failures, &o.failures);
        // Workers connect in parallel: the slowest one bounds the connect phase.
        self.elapsed_s = self.elapsed_s.max(o.elapsed_s);
        self.connect_us_b64 = merge_b64(&self.connect_us_b64, &o.connect_us_b64);
        self.tcp_us_b64 = merge_b64(&self.tcp_us_b64, &o.tcp_us_b64);
    }
}

pub fn merge_b64(a: &str, b: &str) -> String {
    let mut h = stats::hist_from_b64(a).unwrap_or_else(|_| stats::new_hist());
    if let Ok(o) = stats::hist_from_b64(b) {
        stats::merge_hist(&mut h, &o);
    }
    stats::hist_to_b64(&h)
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PhaseResult {
    pub index: u32,
    pub rate: f64,
    pub duration_s: f64,
    pub drain_s: f64,
    pub planned: u64,
    pub expected: u64,
    pub missing: u64,
    pub messages_incomplete: u64,
    pub counters: Counters,
    pub error_codes: BTreeMap<String, u64>,
    pub disconnect_reasons: BTreeMap<String, u64>,
    pub latency_us_b64: String,
    /// Generator-side lateness of each send versus its intended time (µs).
    pub send_lag_us_b64: String,
    /// CPU seconds (user + sys) this process spent during the phase.
    pub cpu_s: f64,
    /// CPU of the server side (`--server-pid`, `--redis-pid`) over the send window; sampled
    /// by one process only (worker 0), so merging keeps the one there is.
    #[serde(default)]
    pub server_cpu: Option<ServerCpu>,
}

impl PhaseResult {
    /// Adds another worker's result for the same phase.
    pub fn merge(&mut self, o: &PhaseResult) {
        self.rate += o.rate;
        self.planned += o.planned;
        self.expected += o.expected;
        self.missing += o.missing;
        self.messages_incomplete += o.messages_incomplete;
        self.counters.add(&o.counters);
        stats::merge_codes(&mut self.error_codes, &o.error_codes);
        stats::merge_codes(&mut self.disconnect_reasons, &o.disconnect_reasons);
        self.latency_us_b64 = merge_b64(&self.latency_us_b64, &o.latency_us_b64);
        self.send_lag_us_b64 = merge_b64(&self.send_lag_us_b64, &o.send_lag_us_b64);
        self.cpu_s += o.cpu_s;
        if self.server_cpu.is_none() {
            self.server_cpu = o.server_cpu.clone();
        }
    }

    pub fn latency(&self) -> Histogram<u64> {
        stats::hist_from_b64(&self.latency_us_b64).unwrap_or_else(|_| stats::new_hist())
    }

    pub fn send_lag(&self) -> Histogram<u64> {
        stats::hist_from_b64(&self.send_lag_us_b64).unwrap_or_else(|_| stats::new_hist())
    }
}

/// Decides what happens between phases; see module docs.
pub trait Control {
    /// Called about once a second while connections are still being opened.
    fn connecting(&mut self, _open: u64, _total: u64) {}
    /// All connections resolved; return false to stop without running anything.
    fn connected(&mut self, summary: &ConnectSummary) -> bool;
    fn tick(&mut self, tick: Tick);
    /// `last` is None before the first phase.
    fn next_phase(&mut self, last: Option<&PhaseResult>) -> Option<PhaseSpec>;
}

pub struct ShardOutcome {
    pub connect: ConnectSummary,
    pub phases: Vec<PhaseResult>,
    pub cpu_total_s: f64,
}

/// Runs the shard to completion. Errors only for local failures (threads, polls).
pub fn run(shared: Shared, control: &mut dyn Control) -> Result<ShardOutcome, String> {
    let shared = Arc::new(shared);
    let threads = shared.threads;
    let (report_tx, report_rx) = mpsc::channel::<ThreadReport>();
    let mut cmd_txs = Vec::new();
    let mut wakers = Vec::new();
    let mut handles = Vec::new();
    let connect_started = Instant::now();
    for t in 0..threads {
        let (poll, waker) = engine::new_poll().map_err(|e| format!("poll: {e}"))?;
        let (cmd_tx, cmd_rx) = mpsc::channel();
        let engine = Engine::new(Arc::clone(&shared), t, poll, cmd_rx, report_tx.clone())
            .map_err(|e| format!("timerfd: {e}"))?;
        let h = std::thread::Builder::new()
            .name(format!("lt-loop-{t}"))
            .spawn(move || engine.run())
            .map_err(|e| format!("spawn: {e}"))?;
        cmd_txs.push(cmd_tx);
        wakers.push(waker);
        handles.push(h);
    }
    drop(report_tx);

    let send_all = |cmd: &dyn Fn() -> Command| {
        for (tx, w) in cmd_txs.iter().zip(&wakers) {
            let _ = tx.send(cmd());
            let _ = w.wake();
        }
    };

    // Connect phase.
    let mut connect = ConnectSummary {
        attempted: shared.pop.conns.len() as u64,
        ..Default::default()
    };
    let mut connect_hist = stats::new_hist();
    let mut tcp_hist = stats::new_hist();
    let mut pending = threads;
    let mut ticks = TickMerger::new(threads);
    // Watchdog: every connection resolves within its timeout, in waves of the concurrency.
    let waves = shared.pop.conns.len() / shared.connect_concurrency.max(1) + 1;
    let connect_deadline =
        connect_started + shared.connect_timeout * waves as u32 + Duration::from_secs(30);
    while pending > 0 {
        if Instant::now() > connect_deadline {
            send_all(&|| Command::Shutdown);
            return Err("event loops did not finish connecting in time".into());
        }
        match report_rx.recv_timeout(Duration::from_secs(1)) {
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let open = shared
                    .open
                    .iter()
                    .filter(|o| o.load(Ordering::Relaxed))
                    .count();
                control.connecting(open as u64, connect.attempted);
            }
            Ok(ThreadReport::Connected {
                ok,
                failures,
                connect_us,
                tcp_us,
            }) => {
                stats::merge_hist(&mut tcp_hist, &tcp_us);
                pending -= 1;
                connect.established += ok;
                stats::merge_codes(&mut connect.failures, &failures);
                stats::merge_hist(&mut connect_hist, &connect_us);
            }
            Ok(_) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err("event-loop thread exited during connect".into())
            }
        }
    }
    connect.failed = connect.attempted - connect.established;
    connect.elapsed_s = connect_started.elapsed().as_secs_f64();
    connect.connect_us_b64 = stats::hist_to_b64(&connect_hist);
    connect.tcp_us_b64 = stats::hist_to_b64(&tcp_hist);

    let mut phases = Vec::new();
    let cpu_start = sysinfo::cpu_self_s();
    if control.connected(&connect) {
        let mut seq_base = 0u64;
        let mut run_start_ns = None;
        let mut last: Option<PhaseResult> = None;
        while let Some(spec) = control.next_phase(last.as_ref()) {
            let planned = spec.planned();
            if Ledger::bits_needed(planned, shared.pop.slots_per_msg) > ledger::MAX_BITS {
                send_all(&|| Command::Shutdown);
                return Err(format!(
                    "{planned} messages x {} deliveries each is too much to account for; \
                     lower --rate or --duration",
                    shared.pop.slots_per_msg
                ));
            }
            let ledger = Arc::new(Ledger::new(seq_base, planned, shared.pop.slots_per_msg));
            seq_base += planned;
            // Owed deliveries are judged against connections open when sending starts.
            let live: Vec<bool> = shared
                .open
                .iter()
                .map(|o| o.load(Ordering::Relaxed))
                .collect();
            // A short lead so every thread has the command before the first message is due.
            let start_ns = shared.now_ns() + 20_000_000;
            let run_start = *run_start_ns.get_or_insert(start_ns);
            let drain_end_ns = start_ns + secs_ns(spec.duration_s) + secs_ns(spec.drain_s);
            let cpu0 = sysinfo::cpu_self_s();
            let at = |ns: u64| shared.origin + Duration::from_nanos(ns);
            let sampler = servercpu::sample_window(
                shared.cpu_pids.clone(),
                at(start_ns),
                at(start_ns + secs_ns(spec.duration_s)),
                at(drain_end_ns),
            );
            send_all(&|| {
                Command::StartPhase(PhaseRun {
                    ledger: Arc::clone(&ledger),
                    start_ns,
                    rate: spec.rate,
                    drain_end_ns,
                    run_start_ns: run_start,
                })
            });
            let mut result = PhaseResult {
                index: phases.len() as u32,
                rate: spec.rate,
                duration_s: spec.duration_s,
                drain_s: spec.drain_s,
                planned,
                ..Default::default()
            };
            let mut hist = stats::new_hist();
            let mut lag = stats::new_hist();
            let mut waiting = threads;
            // Watchdog: threads report at drain end; a missing report means one is wedged.
            let deadline =
                shared.origin + Duration::from_nanos(drain_end_ns) + Duration::from_secs(30);
            while waiting > 0 {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    send_all(&|| Command::Shutdown);
                    return Err("an event loop did not finish its phase in time".into());
                }
                match report_rx.recv_timeout(left) {
                    Ok(ThreadReport::PhaseDone {
                        counters,
                        hist: h,
                        send_lag,
                        error_codes,
                        disconnect_reasons,
                    }) => {
                        stats::merge_codes(&mut result.disconnect_reasons, &disconnect_reasons);
                        waiting -= 1;
                        stats::merge_hist(&mut lag, &send_lag);
                        result.counters.add(&counters);
                        stats::merge_hist(&mut hist, &h);
                        stats::merge_codes(&mut result.error_codes, &error_codes);
                    }
                    Ok(ThreadReport::Tick {
                        sec,
                        counters,
                        hist,
                    }) => {
                        if let Some(t) = ticks.add(sec, &counters, &hist) {
                            control.tick(t);
                        }
                    }
                    Ok(ThreadReport::Connected { .. }) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        return Err("event-loop thread exited during a phase".into())
                    }
                }
            }
            let tally = ledger.tally(&shared.pop, &live);
            result.expected = tally.expected;
            result.missing = tally.missing;
            result.messages_incomplete = tally.messages_incomplete;
            result.latency_us_b64 = stats::hist_to_b64(&hist);
            result.send_lag_us_b64 = stats::hist_to_b64(&lag);
            result.cpu_s = sysinfo::cpu_self_s() - cpu0;
            result.server_cpu = sampler.and_then(|h| h.join().ok());
            phases.push(result.clone());
            last = Some(result);
        }
    }
    send_all(&|| Command::Shutdown);
    for h in handles {
        let _ = h.join();
    }
    Ok(ShardOutcome {
        connect,
        phases,
        cpu_total_s: sysinfo::cpu_self_s() - cpu_start,
    })
}

fn secs_ns(s: f64) -> u64 {
    Duration::from_secs_f64(s.max(0.0)).as_nanos() as u64
}

/// Joins per-second ticks from N sources (threads or workers) into one per second.
pub struct TickMerger {
    sources: u32,
    open: BTreeMap<u64, (u32, Counters, Histogram<u64>)>,
}

impl TickMerger {
    pub fn new(sources: u32) -> Self {
        Self {
            sources,
            open: BTreeMap::new(),
        }
    }

    /// Returns the merged tick once every source has reported second `sec`.
    pub fn add(&mut self, sec: u64, c: &Counters, h: &Histogram<u64>) -> Option<Tick> {
        let e = self
            .open
            .entry(sec)
            .or_insert_with(|| (0, Counters::default(), stats::new_hist()));
        e.0 += 1;
        e.1.add(c);
        stats::merge_hist(&mut e.2, h);
        if e.0 < self.sources {
            return None;
        }
        let (_, counters, hist) = self.open.remove(&sec)?;
        Some(Tick {
            sec,
            counters,
            hist_b64: stats::hist_to_b64(&hist),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Args;
    use crate::scenarios::population::Shard;
    use crate::testserver::{self, Faults};
    use clap::Parser;

    /// Runs the given phases in order, then stops.
    struct Scripted {
        phases: Vec<PhaseSpec>,
        connected: Option<ConnectSummary>,
        ticks: u32,
    }

    impl Control for Scripted {
        fn connected(&mut self, s: &ConnectSummary) -> bool {
            self.connected = Some(s.clone());
            true
        }
        fn tick(&mut self, _t: Tick) {
            self.ticks += 1;
        }
        fn next_phase(&mut self, _last: Option<&PhaseResult>) -> Option<PhaseSpec> {
            (!self.phases.is_empty()).then(|| self.phases.remove(0))
        }
    }

    fn run_against(faults: Faults, users: u64, threads: u32) -> (ShardOutcome, Scripted) {
        let devices = 2;
        let addr = testserver::start((users * devices) as usize, faults);
        let protocol = if faults.socketio {
            "socketio"
        } else {
            "native"
        };
        let args = Args::try_parse_from([
            "loadtest".to_owned(),
            format!("--protocol={protocol}"),
            "direct".to_owned(),
            format!("--addr={addr}"),
            format!("--users={users}"),
            format!("--devices={devices}"),
            format!("--threads={threads}"),
            "--seed=42".to_owned(),
        ])
        .unwrap();
        let shared = crate::build_shared(&args, Shard { index: 0, count: 1 }, "t3st", 42).unwrap();
        let spec = PhaseSpec {
            rate: 300.0,
            duration_s: 1.0,
            drain_s: 0.7,
        };
        let mut ctl = Scripted {
            phases: vec![spec, spec],
            connected: None,
            ticks: 0,
        };
        let out = run(shared, &mut ctl).unwrap();
        (out, ctl)
    }

    #[test]
    fn end_to_end_against_a_correct_server() {
        let (out, ctl) = run_against(Faults::default(), 6, 2);
        let c = ctl.connected.unwrap();
        assert_eq!((c.attempted, c.established, c.failed), (12, 12, 0));
        assert_eq!(out.phases.len(), 2);
        for p in &out.phases {
            assert_eq!(p.planned, 300);
            assert_eq!(p.counters.sent, 300);
            assert!(p.expected >= 600 && p.expected <= 1200, "{}", p.expected);
            assert_eq!(p.missing, 0);
            assert_eq!(p.counters.delivered, p.expected);
            assert_eq!(p.counters.duplicates + p.counters.misrouted, 0);
            assert_eq!(p.counters.protocol_errors + p.counters.disconnects, 0);
            assert_eq!(p.latency().len(), p.expected);
        }
        // The server's greeting ping arrives before the first phase and is counted there.
        assert_eq!(out.phases[0].counters.pings, 12);
        assert!(ctl.ticks >= 2);
    }

    #[test]
    fn end_to_end_socketio() {
        let faults = Faults {
            socketio: true,
            ..Default::default()
        };
        let (out, ctl) = run_against(faults, 6, 2);
        let c = ctl.connected.unwrap();
        assert_eq!((c.attempted, c.established, c.failed), (12, 12, 0));
        for p in &out.phases {
            assert_eq!(p.counters.sent, 300);
            assert!(p.expected >= 600, "{}", p.expected);
            assert_eq!(p.missing, 0);
            assert_eq!(p.counters.delivered, p.expected);
            assert_eq!(p.counters.duplicates + p.counters.misrouted, 0);
            assert_eq!(p.counters.protocol_errors + p.counters.disconnects, 0);
        }
        // The Engine.IO heartbeat ("2") sent right after the CONNECT ack, answered with "3".
        assert_eq!(out.phases[0].counters.pings, 12);
    }

    #[test]
    fn socketio_connect_error_is_a_connect_failure() {
        let faults = Faults {
            socketio: true,
            reject_user: Some("u0"),
            ..Default::default()
        };
        let (out, ctl) = run_against(faults, 4, 1);
        let c = ctl.connected.unwrap();
        assert_eq!((c.attempted, c.established, c.failed), (8, 6, 2));
        assert_eq!(
            c.failures.get("socket.io connect_error: unauthorized"),
            Some(&2),
            "{:?}",
            c.failures
        );
        // Messages from u0 count as skipped (sender down); everything else is delivered.
        let p = &out.phases[0];
        assert_eq!(p.counters.duplicates + p.counters.misrouted, 0);
    }

    #[test]
    fn end_to_end_counts_duplicates_and_losses() {
        let (out, _) = run_against(
            Faults {
                duplicate_every: 10,
                drop_every: 7,
                ..Default::default()
            },
            5,
            1,
        );
        let p = &out.phases[0];
        assert!(p.missing > 0);
        assert!(p.counters.duplicates > 0);
        assert_eq!(p.counters.delivered + p.missing, p.expected);
    }

    #[test]
    fn tick_merger_waits_for_all_sources() {
        let mut m = TickMerger::new(2);
        let mut h = stats::new_hist();
        h.record(100).unwrap();
        let c = Counters {
            delivered: 3,
            ..Default::default()
        };
        assert!(m.add(0, &c, &h).is_none());
        assert!(m.add(1, &c, &h).is_none());
        let t = m.add(0, &c, &h).unwrap();
        assert_eq!((t.sec, t.counters.delivered), (0, 6));
        assert_eq!(stats::hist_from_b64(&t.hist_b64).unwrap().len(), 2);
    }

    #[test]
    fn phase_results_merge() {
        let mut h = stats::new_hist();
        h.record(10).unwrap();
        let mut a = PhaseResult {
            rate: 10.0,
            planned: 100,
            missing: 1,
            latency_us_b64: stats::hist_to_b64(&h),
            ..Default::default()
        };
        let b = a.clone();
        a.merge(&b);
        assert_eq!((a.rate, a.planned, a.missing), (20.0, 200, 2));
        assert_eq!(a.latency().len(), 2);
        assert_eq!(
            PhaseSpec {
                rate: 2.5,
                duration_s: 3.0,
                drain_s: 0.0
            }
            .planned(),
            7
        );
    }
}
