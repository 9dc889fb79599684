//! The two in-process `Control`s: `Local` decides phases itself (single-process runs);
//! `Worker` relays to the parent process over a line protocol on stdin/stdout.
//!
//! Worker protocol (one JSON document per line, child → parent on stdout):
//!   `READY <ConnectSummary>`, `TICK <Tick>`, `PHASE <PhaseResult>`, `DONE <WorkerDone>`;
//! parent → child on stdin: `GO` or `STOP` after READY, then `RUN <PhaseSpec>` or `STOP`
//! before each phase. Everything human-readable a worker prints goes to stderr.

use crate::orchestration::director::Director;
use crate::orchestration::shard::{ConnectSummary, Control, PhaseResult, PhaseSpec};
use crate::reporting::report::Progress;
use crate::reporting::stats::Tick;
use crate::reporting::sysinfo;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, Write};

pub struct Local {
    pub director: Director,
    pub progress: Progress,
    pub server_pids: Vec<u32>,
    pub rss_connected_kib: Option<u64>,
    pub rss_end_kib: Option<u64>,
    pub addrs: Vec<std::net::SocketAddr>,
    pub healthz_connected: Vec<serde_json::Value>,
}

impl Control for Local {
    fn connecting(&mut self, open: u64, total: u64) {
        if !self.progress.quiet {
            eprintln!("connecting: {open}/{total} open");
        }
    }

    fn connected(&mut self, s: &ConnectSummary) -> bool {
        self.rss_connected_kib = sysinfo::rss_total_kib(&self.server_pids);
        self.healthz_connected = self.addrs.iter().map(|a| sysinfo::healthz(*a)).collect();
        log_connected(s);
        s.established > 0
    }

    fn tick(&mut self, tick: Tick) {
        self.progress.tick(&tick);
    }

    fn next_phase(&mut self, last: Option<&PhaseResult>) -> Option<PhaseSpec> {
        if last.is_some() {
            self.rss_end_kib = sysinfo::rss_total_kib(&self.server_pids);
        }
        let next = self.director.next(last);
        if let Some(p) = &next {
            log_phase(p);
        }
        next
    }
}

pub fn log_connected(s: &ConnectSummary) {
    eprintln!(
        "connected {}/{} in {:.2} s{}",
        s.established,
        s.attempted,
        s.elapsed_s,
        if s.failures.is_empty() {
            String::new()
        } else {
            format!("; failures: {:?}", s.failures)
        }
    );
}

pub fn log_phase(p: &PhaseSpec) {
    eprintln!(
        "phase: {} msg/s for {} s, then {} s drain",
        p.rate, p.duration_s, p.drain_s
    );
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerDone {
    pub cpu_total_s: f64,
}

/// A parsed line of the worker protocol.
#[derive(Debug)]
pub enum Line {
    Ready(ConnectSummary),
    Tick(Tick),
    Phase(Box<PhaseResult>),
    Done(WorkerDone),
}

pub fn parse_line(line: &str) -> Result<Line, String> {
    let (tag, body) = line.split_once(' ').unwrap_or((line, ""));
    let bad = |e: serde_json::Error| format!("bad {tag} line from worker: {e}");
    Ok(match tag {
        "READY" => Line::Ready(serde_json::from_str(body).map_err(bad)?),
        "TICK" => Line::Tick(serde_json::from_str(body).map_err(bad)?),
        "PHASE" => Line::Phase(Box::new(serde_json::from_str(body).map_err(bad)?)),
        "DONE" => Line::Done(serde_json::from_str(body).map_err(bad)?),
        _ => return Err(format!("unexpected worker line: {line:.80}")),
    })
}

pub struct Worker {
    stdin: std::io::StdinLock<'static>,
    index: u32,
    quiet: bool,
}

impl Worker {
    pub fn new(index: u32, quiet: bool) -> Self {
        Self {
            stdin: std::io::stdin().lock(),
            index,
            quiet,
        }
    }

    fn send<T: Serialize>(&self, tag: &str, v: &T) {
        let body = serde_json::to_string(v).unwrap_or_else(|_| "{}".into());
        let mut out = std::io::stdout().lock();
        // If the parent is gone there is nobody to tell; the next read sees EOF and stops.
        let _ = writeln!(out, "{tag} {body}");
        let _ = out.flush();
    }

    fn read(&mut self) -> String {
        let mut line = String::new();
        match self.stdin.read_line(&mut line) {
            Ok(_) => line.trim().to_owned(),
            Err(_) => String::new(),
        }
    }

    pub fn done(&self, d: &WorkerDone) {
        self.send("DONE", d);
    }
}

impl Control for Worker {
    fn connecting(&mut self, open: u64, total: u64) {
        if !self.quiet {
            eprintln!("worker {}: connecting: {open}/{total} open", self.index);
        }
    }

    fn connected(&mut self, s: &ConnectSummary) -> bool {
        self.send("READY", s);
        self.read() == "GO"
    }

    fn tick(&mut self, tick: Tick) {
        self.send("TICK", &tick);
    }

    fn next_phase(&mut self, last: Option<&PhaseResult>) -> Option<PhaseSpec> {
        if let Some(r) = last {
            self.send("PHASE", r);
        }
        let line = self.read();
        let body = line.strip_prefix("RUN ")?;
        serde_json::from_str(body).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_lines_round_trip() {
        let r = PhaseResult {
            planned: 5,
            ..Default::default()
        };
        let line = format!("PHASE {}", serde_json::to_string(&r).unwrap());
        match parse_line(&line).unwrap() {
            Line::Phase(p) => assert_eq!(p.planned, 5),
            other => panic!("{other:?}"),
        }
        let done = parse_line("DONE {\"cpu_total_s\":1.5}").unwrap();
        assert!(matches!(done, Line::Done(WorkerDone { cpu_total_s }) if cpu_total_s == 1.5));
        assert!(parse_line("READY {not json").is_err());
        assert!(parse_line("HELLO").is_err());
        assert!(parse_line("").is_err());
    }
}
