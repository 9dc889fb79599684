//! One event-loop thread: a mio poll over this thread's share of the client connections.
//! It connects them (bounded concurrency), answers pings, sends its share of the open-loop
//! schedule, and records every delivery in the shared ledger and its own histograms.
//!
//! Connection `g` belongs to thread `g % threads`; the thread that owns a message's sender
//! connection sends it, whichever thread owns the receiving connections records it.
//!
//! This file owns the loop, its timers and the send schedule; `conn` the connections'
//! lifecycle and I/O; `messages` what received frames mean.

mod conn;
mod messages;

use crate::orchestration::ledger::Ledger;
use crate::reporting::servercpu::Role;
use crate::reporting::stats::{self, Counters};
use crate::scenarios::delivery;
use crate::scenarios::marker::Classifier;
use crate::scenarios::population::Population;
use crate::transport::nonblocking::WsStream;
use hdrhistogram::Histogram;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

const WAKER: Token = Token(usize::MAX);
const TIMER: Token = Token(usize::MAX - 1);
/// Sends are batched at least this far apart: epoll's own timeout has 1 ms granularity,
/// which would add up to 1 ms of generator-made latency, so a timerfd wakes the loop, but
/// not for every single message at high rates.
const MIN_SEND_GAP_NS: u64 = 100_000;
const READ_CHUNK: usize = 64 * 1024;
/// Largest server frame accepted; a delivery is a few hundred bytes.
const MAX_FRAME: usize = 16 << 20;
/// Messages sent per loop turn at most, so a backlog cannot starve the read side.
const SEND_BATCH: usize = 4096;
const NS: u64 = 1_000_000_000;

/// Read-only state shared by every thread of a process.
pub struct Shared {
    pub pop: Population,
    /// Request path (with token) per user.
    pub paths: Vec<String>,
    /// Socket.IO CONNECT packet (with auth token) per user; empty for the native protocol.
    pub sio_connect: Vec<Vec<u8>>,
    /// User id per user, as addressed in `to`.
    pub user_ids: Vec<String>,
    pub addrs: Vec<SocketAddr>,
    pub run_id: String,
    pub origin: Instant,
    /// Whether each connection is open, for the coordinator's liveness snapshot.
    pub open: Vec<AtomicBool>,
    pub threads: u32,
    pub pad_to: usize,
    pub connect_timeout: Duration,
    /// Concurrent connects/handshakes per thread.
    pub connect_concurrency: usize,
    /// Local addresses to bind, round-robin by connection (empty: let the kernel choose).
    pub source_ips: Vec<IpAddr>,
    /// Per-connection cap of unsent bytes before sends are dropped (and counted).
    pub wbuf_cap: usize,
    /// Server-side processes whose CPU is sampled over each send window (empty: none, and
    /// always empty in workers other than worker 0, so the servers are counted once).
    pub cpu_pids: Vec<(u32, Role)>,
}

impl Shared {
    pub fn now_ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }
}

/// One phase of the open-loop schedule, as one thread sees it.
pub struct PhaseRun {
    pub ledger: Arc<Ledger>,
    /// Intended time of message i is `start_ns + i * 1e9 / rate`.
    pub start_ns: u64,
    pub rate: f64,
    pub drain_end_ns: u64,
    /// Start of the run's first phase: second 0 of the progress ticks.
    pub run_start_ns: u64,
}

pub enum Command {
    StartPhase(PhaseRun),
    Shutdown,
}

/// What an event-loop thread tells its shard: the connect outcome, a progress tick, the end
/// of a phase.
pub enum ThreadReport {
    Connected {
        ok: u64,
        failures: BTreeMap<String, u64>,
        connect_us: Histogram<u64>,
        /// Time to TCP established only (µs): tells a slow accept from a slow upgrade.
        tcp_us: Histogram<u64>,
    },
    Tick {
        sec: u64,
        counters: Counters,
        hist: Histogram<u64>,
    },
    PhaseDone {
        counters: Counters,
        hist: Histogram<u64>,
        /// How late (µs) each send was written compared with its intended time.
        send_lag: Histogram<u64>,
        error_codes: BTreeMap<String, u64>,
        /// Why open connections went away (eof, reset, server close code, ...).
        disconnect_reasons: BTreeMap<String, u64>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Pending,
    Connecting,
    Handshaking,
    /// Socket.IO only: WebSocket upgraded, waiting for the Engine.IO open packet and the
    /// CONNECT ack; not yet counted as established.
    Upgraded,
    Open,
    Closed,
}

impl State {
    /// The WebSocket is up and frames are being parsed.
    fn framed(self) -> bool {
        matches!(self, State::Upgraded | State::Open)
    }
}

struct Conn {
    state: State,
    ws: WsStream,
    /// Payload of a fragmented message being reassembled.
    frag: Option<Vec<u8>>,
    started_ns: u64,
    dirty: bool,
}

impl Conn {
    fn new() -> Self {
        Self {
            state: State::Pending,
            ws: WsStream::default(),
            frag: None,
            started_ns: 0,
            dirty: false,
        }
    }
}

struct Active {
    run: PhaseRun,
    next_i: u64,
}

pub struct Engine {
    shared: Arc<Shared>,
    thread: u32,
    poll: Poll,
    timer: TimerFd,
    /// Absolute (origin-relative) ns the timer is armed for; 0 = not armed.
    timer_at: u64,
    conns: Vec<Conn>,
    cmds: Receiver<Command>,
    reports: Sender<ThreadReport>,
    classifier: Classifier,
    /// Masking keys and upgrade keys.
    rng: u64,
    // Connect phase.
    next_pending: usize,
    inflight: usize,
    resolved: usize,
    connect_ok: u64,
    connect_failures: BTreeMap<String, u64>,
    connect_us: Histogram<u64>,
    tcp_us: Histogram<u64>,
    connect_reported: bool,
    // Measurement.
    phase: Option<Active>,
    phase_counters: Counters,
    phase_hist: Histogram<u64>,
    send_lag: Histogram<u64>,
    error_codes: BTreeMap<String, u64>,
    disconnect_reasons: BTreeMap<String, u64>,
    run_start_ns: Option<u64>,
    next_tick_ns: u64,
    tick_counters: Counters,
    tick_hist: Histogram<u64>,
    dirty: Vec<usize>,
    scratch: Vec<u8>,
    payload: Vec<u8>,
}

/// Creates the poll and its waker; the waker lets the coordinator interrupt a sleeping loop.
pub fn new_poll() -> io::Result<(Poll, Arc<Waker>)> {
    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    Ok((poll, waker))
}

impl Engine {
    pub fn new(
        shared: Arc<Shared>,
        thread: u32,
        poll: Poll,
        cmds: Receiver<Command>,
        reports: Sender<ThreadReport>,
    ) -> io::Result<Self> {
        let total = shared.pop.conns.len();
        let t = shared.threads as usize;
        let mine = (total + t - 1 - thread as usize) / t;
        let classifier = Classifier::new(&shared.run_id);
        let seed = shared.pop.seed ^ (u64::from(thread) + 1).wrapping_mul(0xA076_1D64_78BD_642F);
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )?;
        poll.registry().register(
            &mut SourceFd(&timer.as_fd().as_raw_fd()),
            TIMER,
            Interest::READABLE,
        )?;
        Ok(Self {
            thread,
            poll,
            timer,
            timer_at: 0,
            conns: (0..mine).map(|_| Conn::new()).collect(),
            cmds,
            reports,
            classifier,
            rng: seed,
            next_pending: 0,
            inflight: 0,
            resolved: 0,
            connect_ok: 0,
            connect_failures: BTreeMap::new(),
            connect_us: stats::new_hist(),
            tcp_us: stats::new_hist(),
            connect_reported: false,
            phase: None,
            phase_counters: Counters::default(),
            phase_hist: stats::new_hist(),
            send_lag: stats::new_hist(),
            error_codes: BTreeMap::new(),
            disconnect_reasons: BTreeMap::new(),
            run_start_ns: None,
            next_tick_ns: 0,
            tick_counters: Counters::default(),
            tick_hist: stats::new_hist(),
            dirty: Vec::new(),
            scratch: vec![0; READ_CHUNK],
            payload: Vec::with_capacity(512),
            shared,
        })
    }

    fn global(&self, local: usize) -> usize {
        local * self.shared.threads as usize + self.thread as usize
    }

    pub fn run(mut self) {
        let mut events = Events::with_capacity(4096);
        let mut last_timeout_scan = 0u64;
        self.start_connects(self.shared.now_ns());
        loop {
            let now = self.shared.now_ns();
            self.arm_timer(now);
            let timeout = self.poll_timeout(now);
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    eprintln!("loadtest: thread {}: poll failed: {e}", self.thread);
                    return;
                }
            }
            for ev in events.iter() {
                if ev.token() == WAKER || ev.token() == TIMER {
                    continue;
                }
                let local = ev.token().0;
                if local >= self.conns.len() {
                    continue;
                }
                self.on_event(
                    local,
                    ev.is_readable() || ev.is_read_closed(),
                    ev.is_writable() || ev.is_error(),
                );
            }
            let now = self.shared.now_ns();
            if !self.connect_reported {
                if now.saturating_sub(last_timeout_scan) > 100_000_000 {
                    last_timeout_scan = now;
                    self.expire_connects(now);
                }
                self.start_connects(now);
                if self.resolved == self.conns.len() {
                    self.connect_reported = true;
                    let _ = self.reports.send(ThreadReport::Connected {
                        ok: self.connect_ok,
                        failures: std::mem::take(&mut self.connect_failures),
                        connect_us: std::mem::replace(&mut self.connect_us, stats::new_hist()),
                        tcp_us: std::mem::replace(&mut self.tcp_us, stats::new_hist()),
                    });
                }
            }
            self.send_due(now);
            self.flush_dirty();
            self.tick(now);
            self.finish_phase(now);
            match self.cmds.try_recv() {
                Ok(Command::StartPhase(run)) => {
                    if self.run_start_ns.is_none() {
                        self.run_start_ns = Some(run.run_start_ns);
                        self.next_tick_ns = run.run_start_ns + NS;
                    }
                    self.phase = Some(Active { run, next_i: 0 });
                }
                Ok(Command::Shutdown) | Err(TryRecvError::Disconnected) => {
                    self.shutdown();
                    return;
                }
                Err(TryRecvError::Empty) => {}
            }
        }
    }

    /// Arms the timerfd for the next due send (the poll timeout covers everything else).
    fn arm_timer(&mut self, now: u64) {
        let Some(a) = &self.phase else {
            return;
        };
        if a.next_i >= a.run.ledger.count {
            return;
        }
        let due = self.due_ns(a, a.next_i).max(now + MIN_SEND_GAP_NS);
        if self.timer_at > now && self.timer_at <= due {
            return; // Already armed for no later than needed.
        }
        let rel = TimeSpec::from_duration(Duration::from_nanos(due - now));
        if self
            .timer
            .set(Expiration::OneShot(rel), TimerSetTimeFlags::empty())
            .is_ok()
        {
            self.timer_at = due;
        }
    }

    fn poll_timeout(&self, now: u64) -> Duration {
        let mut until = now + 100_000_000;
        if let Some(a) = &self.phase {
            if a.next_i < a.run.ledger.count && self.timer_at <= now {
                // The timer could not be armed: fall back to the coarse poll timeout.
                until = until.min(self.due_ns(a, a.next_i));
            }
            until = until.min(a.run.drain_end_ns);
        }
        if self.run_start_ns.is_some() {
            until = until.min(self.next_tick_ns);
        }
        Duration::from_nanos(until.saturating_sub(now))
    }

    fn due_ns(&self, a: &Active, i: u64) -> u64 {
        a.run.start_ns + (i as f64 * 1e9 / a.run.rate) as u64
    }

    // ---- the open-loop schedule ---------------------------------------------------------

    fn send_due(&mut self, now: u64) {
        let Some(mut active) = self.phase.take() else {
            return;
        };
        let mut batch = 0;
        while active.next_i < active.run.ledger.count && batch < SEND_BATCH {
            let due = self.due_ns(&active, active.next_i);
            if due > now {
                break;
            }
            let seq = active.run.ledger.seq_base + active.next_i;
            active.next_i += 1;
            if self.send_one(&active.run.ledger, seq, due) {
                batch += 1;
            }
        }
        self.phase = Some(active);
    }

    /// Sends message `seq` if this thread owns its sender; returns whether it did anything.
    fn send_one(&mut self, ledger: &Ledger, seq: u64, due: u64) -> bool {
        let pop = &self.shared.pop;
        let route = pop.route(seq);
        let g = pop.conn_of(route.sender, route.sender_dev) as usize;
        let t = self.shared.threads as usize;
        if g % t != self.thread as usize {
            return false;
        }
        let local = g / t;
        if self.conns[local].state != State::Open {
            self.phase_counters.skipped_dead_sender += 1;
            return true;
        }
        if self.conns[local].ws.out.pending() > self.shared.wbuf_cap {
            self.phase_counters.skipped_backpressure += 1;
            return true;
        }
        let to = &self.shared.user_ids[route.recipient as usize];
        let sio = !self.shared.sio_connect.is_empty();
        self.payload.clear();
        delivery::write_message(
            &mut self.payload,
            sio,
            to,
            &self.shared.run_id,
            seq,
            due,
            self.shared.pad_to,
        );
        self.conns[local]
            .ws
            .queue_text(&self.payload, &mut self.rng);
        let lag_us = self.shared.now_ns().saturating_sub(due) / 1000;
        self.send_lag.saturating_record(lag_us.max(1));
        ledger.mark_sent(seq);
        self.phase_counters.sent += 1;
        self.tick_counters.sent += 1;
        self.mark_dirty(local);
        true
    }

    fn tick(&mut self, now: u64) {
        let Some(start) = self.run_start_ns else {
            return;
        };
        while now >= self.next_tick_ns {
            let sec = (self.next_tick_ns - start) / NS - 1;
            let _ = self.reports.send(ThreadReport::Tick {
                sec,
                counters: std::mem::take(&mut self.tick_counters),
                hist: std::mem::replace(&mut self.tick_hist, stats::new_hist()),
            });
            self.next_tick_ns += NS;
        }
    }

    fn finish_phase(&mut self, now: u64) {
        let done = matches!(&self.phase, Some(a) if now >= a.run.drain_end_ns);
        if done {
            self.phase = None;
            let _ = self.reports.send(ThreadReport::PhaseDone {
                counters: std::mem::take(&mut self.phase_counters),
                hist: std::mem::replace(&mut self.phase_hist, stats::new_hist()),
                send_lag: std::mem::replace(&mut self.send_lag, stats::new_hist()),
                error_codes: std::mem::take(&mut self.error_codes),
                disconnect_reasons: std::mem::take(&mut self.disconnect_reasons),
            });
        }
    }

    fn shutdown(&mut self) {
        for local in 0..self.conns.len() {
            if self.conns[local].state == State::Open {
                self.conns[local].ws.queue_close_normal(&mut self.rng);
                self.flush(local);
            }
            self.drop_stream(local);
        }
    }
}
