//! CPU time of the server side (server processes and the Redis backplane) over a phase's
//! send window, read from `/proc/PID/stat` (the process, all threads) and
//! `/proc/PID/task/TID/stat` (each thread), and turned into µs of CPU per delivery.
//!
//! Only `utime + stime` of each process counts (not `cutime`/`cstime`: children are named by
//! their own pid). A pid that cannot be read at either end of the window, or that was
//! restarted in between (another `starttime`), makes the totals unknown rather than wrong.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// What a sampled process is to the run: a server (`--server-pid`) or its Redis backplane
/// (`--redis-pid`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Server,
    Redis,
}

/// The fields of one `/proc/.../stat` line that matter here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    /// The command name (at most 15 bytes; may hold spaces and parentheses).
    pub comm: String,
    /// utime + stime, in clock ticks.
    pub ticks: u64,
    /// Start time after boot, in clock ticks: tells a restarted pid apart.
    pub starttime: u64,
}

/// Parses a `/proc/PID/stat` (or `/proc/PID/task/TID/stat`) line. `comm` is the text between
/// the first `(` and the *last* `)`, since it may contain both; the numbered fields follow the
/// last `)`: state (3), ..., utime (14), stime (15), ..., starttime (22).
pub fn parse_stat(line: &str) -> Option<Stat> {
    let open = line.find('(')?;
    let close = line.rfind(')')?;
    if close < open {
        return None;
    }
    let comm = line[open + 1..close].to_owned();
    // Fields from 3 (state) on; field n is at index n - 3.
    let rest: Vec<&str> = line[close + 1..].split_whitespace().collect();
    let field = |n: usize| rest.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        comm,
        ticks: field(14)?.checked_add(field(15)?)?,
        starttime: field(22)?,
    })
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`; 100 if that fails, the Linux norm).
pub fn clock_ticks_per_s() -> u64 {
    static TCK: OnceLock<u64> = OnceLock::new();
    *TCK.get_or_init(
        || match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
            Ok(Some(t)) if t > 0 => t as u64,
            _ => 100,
        },
    )
}

/// One process at one instant: its own stat and those of its threads (by tid).
#[derive(Debug, Clone, Default)]
pub struct ProcSample {
    pub stat: Option<Stat>,
    pub threads: BTreeMap<u32, Stat>,
}

pub fn sample_pid(pid: u32) -> ProcSample {
    let read = |p: String| std::fs::read_to_string(p).ok().and_then(|s| parse_stat(&s));
    let stat = read(format!("/proc/{pid}/stat"));
    let mut threads = BTreeMap::new();
    if stat.is_some() {
        if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for e in dir.flatten() {
                let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                if let Some(s) = read(format!("/proc/{pid}/task/{tid}/stat")) {
                    threads.insert(tid, s);
                }
            }
        }
    }
    ProcSample { stat, threads }
}

/// Every named pid at one instant.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub at: Instant,
    pub procs: Vec<ProcSample>,
}

pub fn snapshot(pids: &[(u32, Role)]) -> Snapshot {
    let procs = pids.iter().map(|&(p, _)| sample_pid(p)).collect();
    Snapshot {
        at: Instant::now(),
        procs,
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ThreadCpu {
    pub tid: u32,
    pub comm: String,
    pub cpu_s: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProcCpu {
    pub pid: u32,
    pub role: Role,
    pub comm: Option<String>,
    /// CPU seconds (user + sys, all threads) over the send window; None if the process
    /// could not be read at both ends or was restarted in between.
    pub cpu_s: Option<f64>,
    /// Threads that used CPU in the window, busiest first (a thread that exited during the
    /// window is missing here but counted in `cpu_s`).
    pub threads: Vec<ThreadCpu>,
    /// CPU seconds up to the end of the drain (send window + drain).
    pub cpu_with_drain_s: Option<f64>,
}

/// Server-side CPU of one phase, as measured; deliveries come from the phase itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServerCpu {
    /// Seconds between the samples at the start and the end of the send window.
    pub window_s: f64,
    /// Seconds between the start of the send window and the end of the drain.
    pub window_with_drain_s: f64,
    pub clock_ticks_per_s: u64,
    pub processes: Vec<ProcCpu>,
}

fn cpu_between(a: &ProcSample, b: &ProcSample, tck: f64) -> Option<f64> {
    let (a, b) = (a.stat.as_ref()?, b.stat.as_ref()?);
    if a.starttime != b.starttime || b.ticks < a.ticks {
        return None;
    }
    Some((b.ticks - a.ticks) as f64 / tck)
}

/// CPU per process between `start` and `end` (and `drain_end`), with the per-thread split of
/// the send window.
pub fn between(
    pids: &[(u32, Role)],
    start: &Snapshot,
    end: &Snapshot,
    drain_end: &Snapshot,
    tck: u64,
) -> ServerCpu {
    let t = tck.max(1) as f64;
    let processes = pids
        .iter()
        .enumerate()
        .map(|(i, &(pid, role))| {
            let (a, b, c) = (&start.procs[i], &end.procs[i], &drain_end.procs[i]);
            let mut threads: Vec<ThreadCpu> = b
                .threads
                .iter()
                .filter_map(|(&tid, s)| {
                    // A thread born during the window started from zero.
                    let before = match a.threads.get(&tid) {
                        Some(o) if o.starttime == s.starttime => o.ticks,
                        _ => 0,
                    };
                    let d = s.ticks.checked_sub(before)?;
                    (d > 0).then(|| ThreadCpu {
                        tid,
                        comm: s.comm.clone(),
                        cpu_s: d as f64 / t,
                    })
                })
                .collect();
            threads.sort_by(|x, y| y.cpu_s.total_cmp(&x.cpu_s).then(x.tid.cmp(&y.tid)));
            ProcCpu {
                pid,
                role,
                comm: b.stat.as_ref().or(a.stat.as_ref()).map(|s| s.comm.clone()),
                cpu_s: cpu_between(a, b, t),
                threads,
                cpu_with_drain_s: cpu_between(a, c, t),
            }
        })
        .collect();
    ServerCpu {
        window_s: end.at.saturating_duration_since(start.at).as_secs_f64(),
        window_with_drain_s: drain_end
            .at
            .saturating_duration_since(start.at)
            .as_secs_f64(),
        clock_ticks_per_s: tck,
        processes,
    }
}

impl ServerCpu {
    /// Summed CPU seconds of the processes with `role` (all roles if None) over the send
    /// window; None if any of them is unknown or there are none.
    pub fn sum(&self, role: Option<Role>) -> Option<f64> {
        self.sum_by(role, |p| p.cpu_s)
    }

    /// Like `sum`, up to the end of the drain.
    pub fn sum_with_drain(&self, role: Option<Role>) -> Option<f64> {
        self.sum_by(role, |p| p.cpu_with_drain_s)
    }

    fn sum_by(&self, role: Option<Role>, f: impl Fn(&ProcCpu) -> Option<f64>) -> Option<f64> {
        let mut any = false;
        let mut total = 0.0;
        for p in self
            .processes
            .iter()
            .filter(|p| role.is_none_or(|r| p.role == r))
        {
            total += f(p)?;
            any = true;
        }
        any.then_some(total)
    }
}

/// µs of CPU per delivery.
pub fn us_per_delivery(cpu_s: Option<f64>, deliveries: u64) -> Option<f64> {
    let c = cpu_s?;
    (deliveries > 0).then(|| c * 1e6 / deliveries as f64)
}

/// CPU seconds over a window as a percentage of one core.
pub fn pct_of_core(cpu_s: Option<f64>, window_s: f64) -> Option<f64> {
    let c = cpu_s?;
    (window_s > 0.0).then(|| 100.0 * c / window_s)
}

/// Samples `pids` at `start`, `end` and `drain_end` (all relative to now on the caller's
/// clock) on a thread of its own, so the samples land on the window's edges whatever the
/// caller is doing. Join the handle after `drain_end`.
pub fn sample_window(
    pids: Vec<(u32, Role)>,
    start: Instant,
    end: Instant,
    drain_end: Instant,
) -> Option<std::thread::JoinHandle<ServerCpu>> {
    if pids.is_empty() {
        return None;
    }
    let sleep_until = |t: Instant| {
        let d = t.saturating_duration_since(Instant::now());
        if d > Duration::ZERO {
            std::thread::sleep(d);
        }
    };
    std::thread::Builder::new()
        .name("lt-cpu-sampler".into())
        .spawn(move || {
            let tck = clock_ticks_per_s();
            sleep_until(start);
            let a = snapshot(&pids);
            sleep_until(end);
            let b = snapshot(&pids);
            sleep_until(drain_end);
            let c = snapshot(&pids);
            between(&pids, &a, &b, &c, tck)
        })
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(comm: &str, utime: u64, stime: u64, start: u64) -> String {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
        // utime stime cutime cstime priority nice num_threads itrealvalue starttime vsize ...
        format!(
            "4242 ({comm}) S 1 4242 4242 0 -1 4194560 100 0 0 0 {utime} {stime} 77 88 20 0 3 0 {start} 123456 789 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0"
        )
    }

    #[test]
    fn parses_plain_and_hostile_comm() {
        let s = parse_stat(&line("redis-server", 150, 50, 9000)).unwrap();
        assert_eq!(
            s,
            Stat {
                comm: "redis-server".into(),
                ticks: 200,
                starttime: 9000
            }
        );
        // Spaces and parentheses in comm: fields are counted after the last ')'.
        let s = parse_stat(&line("a) S 1 (b c", 7, 3, 5)).unwrap();
        assert_eq!(
            (s.comm.as_str(), s.ticks, s.starttime),
            ("a) S 1 (b c", 10, 5)
        );
        let s = parse_stat(&line(")", 1, 2, 3)).unwrap();
        assert_eq!((s.comm.as_str(), s.ticks), (")", 3));
        // cutime/cstime (77, 88) are not counted.
        assert_eq!(parse_stat(&line("x", 0, 0, 1)).unwrap().ticks, 0);
    }

    #[test]
    fn rejects_truncated_or_garbled_lines() {
        assert_eq!(parse_stat(""), None);
        assert_eq!(parse_stat("12 (x S 1 2"), None);
        assert_eq!(parse_stat("12 (x) S 1 2 3"), None);
        let l = line("x", 1, 2, 3).replace(" 1 2 77", " one 2 77");
        assert_eq!(parse_stat(&l), None);
    }

    #[test]
    fn reads_this_process() {
        assert!(clock_ticks_per_s() > 0);
        let p = sample_pid(std::process::id());
        let s = p.stat.expect("own /proc/self/stat");
        assert!(!s.comm.is_empty());
        assert!(!p.threads.is_empty());
        assert!(sample_pid(u32::MAX - 1).stat.is_none());
    }

    fn proc(ticks: u64, start: u64, threads: &[(u32, &str, u64)]) -> ProcSample {
        let st = |comm: &str, ticks| Stat {
            comm: comm.into(),
            ticks,
            starttime: start,
        };
        ProcSample {
            stat: Some(st("p", ticks)),
            threads: threads.iter().map(|&(t, c, k)| (t, st(c, k))).collect(),
        }
    }

    #[test]
    fn per_delivery_arithmetic() {
        let t0 = Instant::now();
        let pids = [(10, Role::Server), (11, Role::Server), (20, Role::Redis)];
        let snap = |at: Duration, procs| Snapshot { at: t0 + at, procs };
        let a = snap(
            Duration::ZERO,
            vec![
                proc(1000, 5, &[(10, "core-0", 600), (12, "core-1", 400)]),
                proc(500, 6, &[]),
                proc(50, 7, &[]),
            ],
        );
        let b = snap(
            Duration::from_secs(10),
            vec![
                // 300 ticks = 3 s on 100 Hz; a thread born mid-window counts from zero.
                proc(
                    1300,
                    5,
                    &[(10, "core-0", 700), (12, "core-1", 550), (13, "new", 50)],
                ),
                proc(700, 6, &[]),
                proc(150, 7, &[]),
            ],
        );
        let c = snap(
            Duration::from_secs(12),
            vec![proc(1310, 5, &[]), proc(700, 6, &[]), proc(160, 7, &[])],
        );
        let cpu = between(&pids, &a, &b, &c, 100);
        assert_eq!(cpu.window_s, 10.0);
        assert_eq!(cpu.window_with_drain_s, 12.0);
        assert_eq!(cpu.processes[0].cpu_s, Some(3.0));
        let th: Vec<_> = cpu.processes[0]
            .threads
            .iter()
            .map(|t| (t.tid, t.cpu_s))
            .collect();
        assert_eq!(th, vec![(12, 1.5), (10, 1.0), (13, 0.5)]);
        assert_eq!(cpu.sum(Some(Role::Server)), Some(5.0));
        assert_eq!(cpu.sum(Some(Role::Redis)), Some(1.0));
        assert_eq!(cpu.sum(None), Some(6.0));
        assert!((cpu.sum_with_drain(None).unwrap() - 6.2).abs() < 1e-9);
        // 6 s of CPU for 20,000 deliveries = 300 µs each; 6 s in 10 s = 60% of a core.
        assert_eq!(us_per_delivery(cpu.sum(None), 20_000), Some(300.0));
        assert_eq!(us_per_delivery(cpu.sum(None), 0), None);
        assert_eq!(us_per_delivery(None, 10), None);
        assert_eq!(pct_of_core(cpu.sum(None), cpu.window_s), Some(60.0));
        assert_eq!(pct_of_core(Some(1.0), 0.0), None);

        // A restarted pid (other starttime) or an unreadable one makes totals unknown.
        let mut b2 = b.clone();
        b2.procs[1] = proc(900, 99, &[]);
        let cpu = between(&pids, &a, &b2, &c, 100);
        assert_eq!(cpu.processes[1].cpu_s, None);
        assert_eq!(cpu.sum(Some(Role::Server)), None);
        assert_eq!(cpu.sum(Some(Role::Redis)), Some(1.0));
        let mut b3 = b.clone();
        b3.procs[2] = ProcSample::default();
        assert_eq!(between(&pids, &a, &b3, &c, 100).sum(None), None);
        assert_eq!(
            between(&pids[..2], &a, &b, &c, 100).sum(Some(Role::Redis)),
            None
        );
    }

    #[test]
    fn samples_a_window_of_this_process() {
        let now = Instant::now();
        let ms = Duration::from_millis;
        let h = sample_window(
            vec![(std::process::id(), Role::Server)],
            now,
            now + ms(200),
            now + ms(250),
        )
        .unwrap();
        let deadline = Instant::now() + ms(200);
        let mut x = 0u64;
        while Instant::now() < deadline {
            x = x.wrapping_add(1);
        }
        assert!(x > 0);
        let cpu = h.join().unwrap();
        assert!(cpu.window_s >= 0.19, "{}", cpu.window_s);
        // The busy loop above ran during the window (at least a tick, even on a busy box).
        assert!(cpu.sum(None).unwrap() > 0.0, "{cpu:?}");
        assert!(sample_window(Vec::new(), now, now, now).is_none());
    }
}
