//! `--workers K`: the parent re-executes this binary K times, one per shard of users, drives
//! them in lockstep through the worker line protocol (see `control`), and merges their
//! results into one report. Needed because one process may hold at most ~19,000 sockets.

use crate::cli::Args;
use crate::orchestration::control::{self, Line};
use crate::orchestration::director::{Director, RampOutcome};
use crate::orchestration::shard::{ConnectSummary, PhaseResult, PhaseSpec, TickMerger};
use crate::reporting::report::Progress;
use crate::reporting::stats;
use crate::reporting::sysinfo;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;

pub struct FleetOutcome {
    pub connect: ConnectSummary,
    pub phases: Vec<PhaseResult>,
    pub cpu_total_s: f64,
    pub rss_connected_kib: Option<u64>,
    pub rss_end_kib: Option<u64>,
    pub ramp: RampOutcome,
    pub healthz_connected: Vec<serde_json::Value>,
}

struct Fleet {
    children: Vec<Child>,
    stdins: Vec<ChildStdin>,
    lines: mpsc::Receiver<(usize, Option<String>)>,
    /// Workers that sent DONE: their stdout closing is expected, not an error.
    finished: Vec<bool>,
}

impl Fleet {
    fn broadcast(&mut self, line: &str) -> Result<(), String> {
        for (w, s) in self.stdins.iter_mut().enumerate() {
            writeln!(s, "{line}")
                .and_then(|()| s.flush())
                .map_err(|e| format!("worker {w}: {e}"))?;
        }
        Ok(())
    }

    /// Next protocol line from any worker; a closed stdout before DONE is an error.
    fn recv(&mut self) -> Result<(usize, Line), String> {
        loop {
            match self.lines.recv() {
                Ok((w, Some(l))) => {
                    let line = control::parse_line(&l)?;
                    if matches!(line, Line::Done(_)) {
                        self.finished[w] = true;
                    }
                    return Ok((w, line));
                }
                Ok((w, None)) if self.finished[w] => {}
                Ok((w, None)) => {
                    return Err(format!("worker {w} exited early (see its stderr above)"))
                }
                Err(_) => return Err("all workers are gone".into()),
            }
        }
    }

    fn kill_all(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn run(
    args: &Args,
    run_id: &str,
    seed: u64,
    progress: &mut Progress,
) -> Result<FleetOutcome, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let k = args.workers;
    let (tx, rx) = mpsc::channel();
    let mut fleet = Fleet {
        children: Vec::new(),
        stdins: Vec::new(),
        lines: rx,
        finished: vec![false; k as usize],
    };
    for w in 0..k {
        let mut cmd = Command::new(&exe);
        cmd.args(std::env::args_os().skip(1))
            .args(["--worker-index", &w.to_string(), "--run-id", run_id])
            // The user's own --seed is already among the forwarded arguments.
            .args(if args.seed.is_none() {
                vec!["--seed".to_owned(), seed.to_string()]
            } else {
                Vec::new()
            })
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                fleet.kill_all();
                return Err(format!("cannot start worker {w}: {e}"));
            }
        };
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            fleet.children.push(child);
            fleet.kill_all();
            return Err("worker pipes missing".into());
        };
        let tx = tx.clone();
        let idx = w as usize;
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(l) => {
                        if tx.send((idx, Some(l))).is_err() {
                            return;
                        }
                    }
                    Err(_) => break,
                }
            }
            let _ = tx.send((idx, None));
        });
        fleet.children.push(child);
        fleet.stdins.push(stdin);
    }
    drop(tx);
    let out = drive(&mut fleet, args, progress);
    if out.is_err() {
        fleet.kill_all();
    } else {
        for c in &mut fleet.children {
            let _ = c.wait();
        }
    }
    out
}

fn drive(fleet: &mut Fleet, args: &Args, progress: &mut Progress) -> Result<FleetOutcome, String> {
    let k = args.workers as usize;
    let mut connect = ConnectSummary::default();
    let mut first = true;
    let mut ready = 0;
    while ready < k {
        match fleet.recv()? {
            (_, Line::Ready(s)) => {
                ready += 1;
                if first {
                    connect = s;
                    first = false;
                } else {
                    connect.merge(&s);
                }
            }
            (w, other) => return Err(format!("worker {w}: expected READY, got {other:?}")),
        }
    }
    control::log_connected(&connect);
    let rss_connected_kib = sysinfo::rss_total_kib(&args.server_pid);
    let healthz_connected = args.addrs.iter().map(|a| sysinfo::healthz(*a)).collect();
    let mut rss_end_kib = None;
    let mut phases = Vec::new();
    let go = connect.established > 0;
    fleet.broadcast(if go { "GO" } else { "STOP" })?;
    let mut director = Director::new(args);
    let mut last: Option<PhaseResult> = None;
    let mut ticks = TickMerger::new(args.workers);
    if go {
        loop {
            if last.is_some() {
                rss_end_kib = sysinfo::rss_total_kib(&args.server_pid);
            }
            let Some(spec) = director.next(last.as_ref()) else {
                break;
            };
            control::log_phase(&spec);
            let share = PhaseSpec {
                rate: spec.rate / k as f64,
                ..spec
            };
            let body = serde_json::to_string(&share).map_err(|e| e.to_string())?;
            fleet.broadcast(&format!("RUN {body}"))?;
            let mut merged: Option<PhaseResult> = None;
            let mut got = 0;
            while got < k {
                match fleet.recv()? {
                    (_, Line::Tick(t)) => {
                        let h = stats::hist_from_b64(&t.hist_b64)?;
                        if let Some(m) = ticks.add(t.sec, &t.counters, &h) {
                            progress.tick(&m);
                        }
                    }
                    (_, Line::Phase(r)) => {
                        got += 1;
                        match &mut merged {
                            None => merged = Some(*r),
                            Some(m) => m.merge(&r),
                        }
                    }
                    (w, other) => return Err(format!("worker {w}: unexpected {other:?}")),
                }
            }
            if let Some(m) = &mut merged {
                m.rate = spec.rate;
                phases.push(m.clone());
            }
            last = merged;
        }
    }
    if go {
        fleet.broadcast("STOP")?;
    }
    let ramp = director.ramp.clone();
    let mut cpu_total_s = 0.0;
    let mut done = 0;
    while done < k {
        match fleet.recv()? {
            (_, Line::Done(d)) => {
                done += 1;
                cpu_total_s += d.cpu_total_s;
            }
            (_, Line::Tick(_)) => {}
            (w, other) => return Err(format!("worker {w}: expected DONE, got {other:?}")),
        }
    }
    Ok(FleetOutcome {
        connect,
        phases,
        cpu_total_s,
        rss_connected_kib,
        rss_end_kib,
        ramp,
        healthz_connected,
    })
}
