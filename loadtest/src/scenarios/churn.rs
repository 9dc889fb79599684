//! `churn`: does the server's memory stay flat while connections come and go?
//!
//! Holds `--users` × `--devices` connections open, and once all are up closes and reopens
//! `--churn-per-sec` of them every second (random open ones), each reopen a fresh TCP connect
//! and upgrade. Closes take turns between three kinds so every server path is taken: a clean
//! WebSocket close (close frame, then wait for the server's close or EOF), a FIN without a
//! close frame, and a reset (`SO_LINGER` 0). With `--fresh-users`, that share of reopens come
//! back as a user the server has never seen, so per-user state must be dropped, not reused.
//! An optional light `--rate` of `sendMessage`s (random open sender to the user of a random
//! open connection) keeps the server's buffers and history in use.
//!
//! One mio thread drives the sockets; the main thread samples the server every
//! `--sample-every` s: VmRSS and open fds from `/proc/PID` (`--server-pid`), and the
//! connections and users in `/healthz`. The report gives the series, the RSS at the start of
//! the steady state (first sample at or after `--steady-after` s), at the end and at most, and
//! the least-squares slope over the steady samples. Memory is measured, never judged: the exit
//! status only says whether connections failed (1) or the run could not start (2).

use crate::cli::Args;
use crate::orchestration::engine::{
    connect_done, connect_socket, reason, server_close_reason, write_some,
};
use crate::reporting::sysinfo;
use crate::scenarios::marker::{self, Classifier, Frame};
use crate::scenarios::population::splitmix64;
use crate::transport::codec::{self, Handshake, Parse};
use crate::transport::token;
use mio::net::TcpStream;
use mio::{Events, Poll, Token, Waker};
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const WAKER: Token = Token(usize::MAX);
const NS: u64 = 1_000_000_000;
/// How long a clean close waits for the server's close frame or EOF before dropping the socket.
const CLOSE_TIMEOUT_NS: u64 = 5 * NS;
/// A connection that failed to open, or that the server dropped, is retried after this.
const RETRY_DELAY_NS: u64 = NS;
/// Largest server frame accepted.
const MAX_FRAME: usize = 1 << 20;
const READ_CHUNK: usize = 64 * 1024;
/// The last sample is taken this long after every connection was closed.
const AFTER_CLOSE: Duration = Duration::from_secs(5);

/// How a churned connection is closed; they take turns in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CloseKind {
    /// Close frame 1000, then wait for the server's close frame or EOF.
    Clean,
    /// The socket is closed without a close frame: the server reads EOF.
    Fin,
    /// `SO_LINGER` 0, then close: the server reads ECONNRESET.
    Reset,
}

const CLOSE_KINDS: [CloseKind; 3] = [CloseKind::Clean, CloseKind::Fin, CloseKind::Reset];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not connected: queued to open, or waiting for a retry.
    Idle,
    Connecting,
    Handshaking,
    Open,
    /// Clean close sent; waiting for the server's answer.
    Closing,
}

struct Slot {
    /// User number; the id is `<prefix><user>`.
    user: u64,
    state: State,
    stream: Option<TcpStream>,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    accept: String,
    /// When the current connect or clean close started.
    since_ns: u64,
    /// Position in `Churner::open` while Open.
    open_at: usize,
}

/// Counters the main thread reads while the loop runs.
#[derive(Default)]
struct Live {
    /// Origin-relative ns at which churn started; 0 until every connection was tried.
    churn_start_ns: AtomicU64,
    open: AtomicU64,
    opened: AtomicU64,
    closed: AtomicU64,
    stop: AtomicBool,
}

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

struct Churner {
    poll: Poll,
    origin: Instant,
    live: Arc<Live>,
    slots: Vec<Slot>,
    /// Open slots, for picking one at random in O(1).
    open: Vec<usize>,
    /// Slots to open now.
    ready: VecDeque<usize>,
    /// Slots to open at a time (FIFO: every entry waits the same delay).
    retry: VecDeque<(u64, usize)>,
    inflight: usize,
    rng: u64,
    minter: token::Minter,
    prefix: String,
    ws_path: String,
    addrs: Vec<SocketAddr>,
    source_ips: Vec<IpAddr>,
    concurrency: usize,
    connect_timeout_ns: u64,
    churn_per_sec: f64,
    fresh_users: f64,
    rate: f64,
    /// Next user number never used.
    next_user: u64,
    run_id: String,
    classifier: Classifier,
    /// Churn closes and messages done since churn started.
    churned: u64,
    sent: u64,
    tally: Tally,
    scratch: Vec<u8>,
    payload: Vec<u8>,
}

impl Churner {
    fn now_ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }

    fn rand(&mut self) -> u64 {
        self.rng = splitmix64(self.rng);
        self.rng
    }

    /// A random open slot (`open` must not be empty).
    fn random_open(&mut self) -> usize {
        let n = self.open.len() as u64;
        let at = ((self.rand() & 0xFFFF_FFFF) * n) >> 32;
        self.open[at as usize]
    }

    /// True with probability `p`.
    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && ((self.rand() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    fn mask(&mut self) -> [u8; 4] {
        (self.rand() as u32).to_ne_bytes()
    }

    fn run(mut self) -> Tally {
        let mut events = Events::with_capacity(1024);
        let mut last_scan = 0u64;
        loop {
            let now = self.now_ns();
            let timeout = self.next_due(now).saturating_sub(now);
            if let Err(e) = self
                .poll
                .poll(&mut events, Some(Duration::from_nanos(timeout)))
            {
                if e.kind() != io::ErrorKind::Interrupted {
                    eprintln!("loadtest churn: poll failed: {e}");
                    break;
                }
            }
            for ev in events.iter() {
                let i = ev.token().0;
                if i < self.slots.len() {
                    self.on_event(i);
                }
            }
            if self.live.stop.load(Ordering::Relaxed) {
                break;
            }
            let now = self.now_ns();
            if now.saturating_sub(last_scan) > NS / 10 {
                last_scan = now;
                self.expire(now);
            }
            while self.retry.front().is_some_and(|&(at, _)| at <= now) {
                if let Some((_, i)) = self.retry.pop_front() {
                    self.ready.push_back(i);
                }
            }
            self.start_connects(now);
            let start = self.live.churn_start_ns.load(Ordering::Relaxed);
            if start == 0 {
                if self.ready.is_empty() && self.inflight == 0 {
                    self.tally.opened_initial = self.tally.opened;
                    self.live
                        .churn_start_ns
                        .store(now.max(1), Ordering::Relaxed);
                }
            } else {
                self.churn_due(now, start);
                self.send_due(now, start);
            }
        }
        self.shutdown();
        self.tally
    }

    /// When the loop must wake next, at most 100 ms from now.
    fn next_due(&self, now: u64) -> u64 {
        let mut due = now + NS / 10;
        let start = self.live.churn_start_ns.load(Ordering::Relaxed);
        if start != 0 {
            let at = |i: u64, per_sec: f64| {
                if per_sec > 0.0 {
                    start + (i as f64 * 1e9 / per_sec) as u64
                } else {
                    u64::MAX
                }
            };
            due = due
                .min(at(self.churned, self.churn_per_sec))
                .min(at(self.sent, self.rate));
        }
        if let Some(&(at, _)) = self.retry.front() {
            due = due.min(at);
        }
        due
    }

    // ---- opening ----------------------------------------------------------------------

    fn start_connects(&mut self, now: u64) {
        while self.inflight < self.concurrency {
            let Some(i) = self.ready.pop_front() else {
                break;
            };
            let addr = self.addrs[i % self.addrs.len()];
            let ips = &self.source_ips;
            let source = (!ips.is_empty()).then(|| ips[i % ips.len()]);
            self.slots[i].since_ns = now;
            match connect_socket(self.poll.registry(), Token(i), addr, source) {
                Ok(stream) => {
                    let s = &mut self.slots[i];
                    s.stream = Some(stream);
                    s.state = State::Connecting;
                    self.inflight += 1;
                }
                Err(e) => self.fail(i, reason(&e), now),
            }
        }
    }

    fn on_event(&mut self, i: usize) {
        match self.slots[i].state {
            State::Connecting => self.on_connected(i),
            State::Handshaking | State::Open | State::Closing => {
                self.flush(i);
                self.on_readable(i);
            }
            State::Idle => {}
        }
    }

    fn on_connected(&mut self, i: usize) {
        let Some(stream) = self.slots[i].stream.as_ref() else {
            return;
        };
        match connect_done(stream) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => return self.fail(i, reason(&e), self.now_ns()),
        }
        let id = format!("{}{}", self.prefix, self.slots[i].user);
        let tok = match self.minter.token(&id, token::unix_now_s()) {
            Ok(t) => t,
            Err(e) => return self.fail(i, e, self.now_ns()),
        };
        let path = format!("{}?token={tok}", self.ws_path);
        let mut key = [0u8; 16];
        key[..8].copy_from_slice(&self.rand().to_ne_bytes());
        key[8..].copy_from_slice(&self.rand().to_ne_bytes());
        let host = self.addrs[i % self.addrs.len()].to_string();
        let (req, accept) = codec::upgrade(&host, &path, key);
        let s = &mut self.slots[i];
        s.accept = accept;
        s.wbuf.extend_from_slice(&req);
        s.state = State::Handshaking;
        self.flush(i);
        // The response may already be waiting; edge-triggered readiness won't repeat it.
        self.on_readable(i);
    }

    /// A connect or upgrade failed: count it, retry later.
    fn fail(&mut self, i: usize, why: String, now: u64) {
        *self.tally.connect_failures.entry(why).or_default() += 1;
        if matches!(self.slots[i].state, State::Connecting | State::Handshaking) {
            self.inflight -= 1;
        }
        self.drop_stream(i);
        self.retry.push_back((now + RETRY_DELAY_NS, i));
    }

    fn established(&mut self, i: usize) {
        self.inflight -= 1;
        let s = &mut self.slots[i];
        s.state = State::Open;
        s.accept = String::new();
        s.open_at = self.open.len();
        self.open.push(i);
        self.tally.opened += 1;
        self.live.opened.fetch_add(1, Ordering::Relaxed);
        self.live.open.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes an Open slot out of the open list.
    fn unlist(&mut self, i: usize) {
        let at = self.slots[i].open_at;
        self.open.swap_remove(at);
        if let Some(&moved) = self.open.get(at) {
            self.slots[moved].open_at = at;
        }
        self.live.open.fetch_sub(1, Ordering::Relaxed);
    }

    /// Closes the socket (if any) and leaves the slot Idle, buffers released.
    fn drop_stream(&mut self, i: usize) {
        let s = &mut self.slots[i];
        if let Some(mut stream) = s.stream.take() {
            let _ = self.poll.registry().deregister(&mut stream);
        }
        s.state = State::Idle;
        s.rbuf = Vec::new();
        s.wbuf = Vec::new();
    }

    /// Connects and upgrades that took too long; clean closes the server never answered.
    fn expire(&mut self, now: u64) {
        for i in 0..self.slots.len() {
            let (state, since) = (self.slots[i].state, self.slots[i].since_ns);
            let age = now.saturating_sub(since);
            match state {
                State::Connecting | State::Handshaking if age > self.connect_timeout_ns => {
                    self.fail(i, "timeout".into(), now);
                }
                State::Closing if age > CLOSE_TIMEOUT_NS => {
                    self.tally.close_timeouts += 1;
                    self.closed(i);
                }
                _ => {}
            }
        }
    }

    // ---- churn ------------------------------------------------------------------------

    fn churn_due(&mut self, now: u64, start: u64) {
        let due = ((now - start) as f64 / 1e9 * self.churn_per_sec) as u64;
        while self.churned < due {
            let kind = CLOSE_KINDS[(self.churned % 3) as usize];
            self.churned += 1;
            if self.open.is_empty() {
                self.tally.churn_skipped += 1;
                continue;
            }
            let i = self.random_open();
            self.churn_close(i, kind, now);
        }
    }

    fn churn_close(&mut self, i: usize, kind: CloseKind, now: u64) {
        self.unlist(i);
        let name = match kind {
            CloseKind::Clean => "clean",
            CloseKind::Fin => "fin",
            CloseKind::Reset => "reset",
        };
        *self.tally.closed.entry(name.to_owned()).or_default() += 1;
        match kind {
            CloseKind::Clean => {
                let mask = self.mask();
                let s = &mut self.slots[i];
                codec::encode_frame(&mut s.wbuf, codec::OP_CLOSE, &1000u16.to_be_bytes(), mask);
                s.state = State::Closing;
                s.since_ns = now;
                self.flush(i);
            }
            CloseKind::Fin => self.closed(i),
            CloseKind::Reset => {
                if let Some(stream) = &self.slots[i].stream {
                    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
                }
                self.closed(i);
            }
        }
    }

    /// A churned connection is gone: reopen it at once, maybe as a new user.
    fn closed(&mut self, i: usize) {
        self.drop_stream(i);
        self.live.closed.fetch_add(1, Ordering::Relaxed);
        if self.chance(self.fresh_users) {
            self.slots[i].user = self.next_user;
            self.next_user += 1;
        }
        self.ready.push_back(i);
    }

    /// An open connection went away by itself (server close, EOF, reset): retry later.
    fn dropped(&mut self, i: usize, why: String, now: u64) {
        match self.slots[i].state {
            State::Handshaking => return self.fail(i, format!("{why} during upgrade"), now),
            State::Closing => return self.closed(i),
            State::Open => self.unlist(i),
            State::Idle | State::Connecting => {}
        }
        *self.tally.dropped.entry(why).or_default() += 1;
        self.drop_stream(i);
        self.retry.push_back((now + RETRY_DELAY_NS, i));
    }

    // ---- messages ---------------------------------------------------------------------

    fn send_due(&mut self, now: u64, start: u64) {
        if self.rate <= 0.0 {
            return;
        }
        let due = ((now - start) as f64 / 1e9 * self.rate) as u64;
        while self.sent < due {
            let seq = self.sent;
            self.sent += 1;
            if self.open.is_empty() {
                continue;
            }
            let from = self.random_open();
            let to = self.random_open();
            let to = format!("{}{}", self.prefix, self.slots[to].user);
            self.payload.clear();
            marker::write_send_message(&mut self.payload, &to, &self.run_id, seq, now, 0);
            let mask = self.mask();
            codec::encode_frame(
                &mut self.slots[from].wbuf,
                codec::OP_TEXT,
                &self.payload,
                mask,
            );
            self.tally.messages_sent += 1;
            self.flush(from);
        }
    }

    // ---- I/O --------------------------------------------------------------------------

    fn on_readable(&mut self, i: usize) {
        let mut buf = std::mem::take(&mut self.scratch);
        loop {
            let now = self.now_ns();
            let Some(stream) = self.slots[i].stream.as_mut() else {
                break;
            };
            match stream.read(&mut buf) {
                Ok(0) => {
                    self.dropped(i, "eof".into(), now);
                    break;
                }
                Ok(n) => {
                    self.slots[i].rbuf.extend_from_slice(&buf[..n]);
                    self.parse(i, now);
                    if n < buf.len() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.dropped(i, reason(&e), now);
                    break;
                }
            }
        }
        self.scratch = buf;
    }

    fn parse(&mut self, i: usize, now: u64) {
        if self.slots[i].state == State::Handshaking {
            let s = &mut self.slots[i];
            match codec::parse_handshake(&s.rbuf, &s.accept) {
                Handshake::Incomplete => return,
                Handshake::Rejected(why) => return self.fail(i, why, now),
                Handshake::Accepted { header_len } => {
                    s.rbuf.drain(..header_len);
                    self.established(i);
                }
            }
        }
        let rbuf = std::mem::take(&mut self.slots[i].rbuf);
        let mut pos = 0;
        while matches!(self.slots[i].state, State::Open | State::Closing) {
            match codec::parse_frame(&rbuf[pos..], MAX_FRAME) {
                Parse::Incomplete => break,
                Parse::Error(_) => {
                    self.tally.protocol_errors += 1;
                    self.dropped(i, "protocol error".into(), now);
                }
                Parse::Frame(h) => {
                    let payload = &rbuf[pos + h.header_len..pos + h.total_len()];
                    pos += h.total_len();
                    self.on_frame(i, h.opcode, payload, now);
                }
            }
        }
        if self.slots[i].stream.is_some() {
            self.slots[i].rbuf = rbuf;
            self.slots[i].rbuf.drain(..pos);
        }
    }

    fn on_frame(&mut self, i: usize, opcode: u8, payload: &[u8], now: u64) {
        match opcode {
            codec::OP_TEXT => match self.classifier.classify(payload) {
                Frame::Delivery { .. } => self.tally.deliveries += 1,
                Frame::Error => {
                    *self
                        .tally
                        .error_codes
                        .entry(marker::error_code(payload))
                        .or_default() += 1;
                }
                Frame::Foreign | Frame::Other => {}
            },
            codec::OP_PING if self.slots[i].state == State::Open => {
                let mask = self.mask();
                codec::encode_frame(&mut self.slots[i].wbuf, codec::OP_PONG, payload, mask);
                self.flush(i);
            }
            codec::OP_CLOSE => {
                if self.slots[i].state == State::Closing {
                    return self.closed(i);
                }
                let code = payload.get(..2).unwrap_or(&[]).to_vec();
                let mask = self.mask();
                codec::encode_frame(&mut self.slots[i].wbuf, codec::OP_CLOSE, &code, mask);
                self.flush(i);
                self.dropped(i, server_close_reason(payload), now);
            }
            _ => {}
        }
    }

    fn flush(&mut self, i: usize) {
        let s = &mut self.slots[i];
        let Some(stream) = s.stream.as_mut() else {
            return;
        };
        let (written, failed) = write_some(stream, &s.wbuf);
        s.wbuf.drain(..written);
        if let Some(why) = failed {
            let now = self.now_ns();
            self.dropped(i, why, now);
        }
    }

    /// End of run: a close frame on every open connection, then every socket closed.
    fn shutdown(&mut self) {
        for i in 0..self.slots.len() {
            if self.slots[i].state == State::Open {
                let mask = self.mask();
                let s = &mut self.slots[i];
                codec::encode_frame(&mut s.wbuf, codec::OP_CLOSE, &1000u16.to_be_bytes(), mask);
                self.flush(i);
            }
            self.drop_stream(i);
        }
        self.open.clear();
        self.live.open.store(0, Ordering::Relaxed);
    }
}

/// Takes one sample of the server and the generator's counters.
fn sample(args: &Args, live: &Live, t_s: f64) -> Sample {
    let mut conns = Some(0u64);
    let mut users = Some(0u64);
    for addr in &args.addrs {
        let h = sysinfo::healthz(*addr);
        let c = h["connections"].as_u64();
        let u = h["per_core"].as_array().map(|cores| {
            cores
                .iter()
                .filter_map(|c| c["users"].as_u64())
                .sum::<u64>()
        });
        conns = conns.zip(c).map(|(a, b)| a + b);
        users = users.zip(u).map(|(a, b)| a + b);
    }
    Sample {
        t_s,
        rss_kib: sysinfo::rss_total_kib(&args.server_pid),
        fds: sysinfo::fd_total(&args.server_pid),
        server_connections: conns,
        server_users: users,
        open: live.open.load(Ordering::Relaxed),
        opened: live.opened.load(Ordering::Relaxed),
        closed: live.closed.load(Ordering::Relaxed),
    }
}

/// Runs the scenario; `source_ips` as for the other scenarios (empty: the kernel chooses).
pub fn run(args: &Args, source_ips: Vec<IpAddr>) -> Result<ChurnReport, String> {
    let seed = args.seed.unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        t ^ u64::from(std::process::id())
    });
    let run_id = format!("{:08x}", splitmix64(seed) as u32);
    let total = (args.users * u64::from(args.devices)) as usize;
    let poll = Poll::new().map_err(|e| format!("poll: {e}"))?;
    let waker = Waker::new(poll.registry(), WAKER).map_err(|e| format!("waker: {e}"))?;
    let live = Arc::new(Live::default());
    let devices = u64::from(args.devices);
    let churner = Churner {
        poll,
        origin: Instant::now(),
        live: Arc::clone(&live),
        slots: (0..total)
            .map(|i| Slot {
                user: i as u64 / devices,
                state: State::Idle,
                stream: None,
                rbuf: Vec::new(),
                wbuf: Vec::new(),
                accept: String::new(),
                since_ns: 0,
                open_at: 0,
            })
            .collect(),
        open: Vec::with_capacity(total),
        ready: (0..total).collect(),
        retry: VecDeque::new(),
        inflight: 0,
        rng: splitmix64(seed ^ 0xC4_0C4),
        minter: token::Minter::new(args.jwt_secret.as_deref(), args.jwt_ttl),
        prefix: args.user_prefix.clone(),
        ws_path: args.ws_path().to_owned(),
        addrs: args.addrs.clone(),
        source_ips,
        concurrency: args.connect_concurrency,
        connect_timeout_ns: (args.connect_timeout * 1e9) as u64,
        churn_per_sec: args.churn_per_sec,
        fresh_users: args.fresh_users,
        rate: args.rate,
        next_user: args.users,
        classifier: Classifier::new(&run_id),
        run_id: run_id.clone(),
        churned: 0,
        sent: 0,
        tally: Tally::default(),
        scratch: vec![0; READ_CHUNK],
        payload: Vec::with_capacity(256),
    };
    let rss_before_kib = sysinfo::rss_total_kib(&args.server_pid);
    if !args.server_pid.is_empty() && rss_before_kib.is_none() {
        eprintln!("loadtest: warning: cannot read VmRSS of the server pid");
    }
    eprintln!(
        "loadtest churn: run {run_id}, {total} connections, {} closed and reopened/s, {} \
         messages/s, {} s",
        args.churn_per_sec, args.rate, args.duration
    );
    let t0 = Instant::now();
    let handle = std::thread::Builder::new()
        .name("lt-churn".into())
        .spawn(move || churner.run())
        .map_err(|e| format!("spawn: {e}"))?;
    let stop = |live: &Live| {
        live.stop.store(true, Ordering::Relaxed);
        let _ = waker.wake();
    };

    // Open the population (every connection tried at least once).
    let waves = total / args.connect_concurrency.max(1) + 1;
    let deadline = t0 + Duration::from_secs_f64(args.connect_timeout * waves as f64 + 30.0);
    while live.churn_start_ns.load(Ordering::Relaxed) == 0 {
        if Instant::now() > deadline || handle.is_finished() {
            stop(&live);
            let _ = handle.join();
            return Err("the initial connections did not resolve in time".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let connect_s = t0.elapsed().as_secs_f64();
    eprintln!(
        "loadtest churn: {} of {total} open after {connect_s:.2} s; churning",
        live.open.load(Ordering::Relaxed)
    );

    // Sample at 0, every --sample-every, and at the end.
    let start = Instant::now();
    let duration = Duration::from_secs_f64(args.duration);
    let every = Duration::from_secs_f64(args.sample_every);
    let mut samples = Vec::new();
    let mut next = Duration::ZERO;
    loop {
        let s = sample(args, &live, start.elapsed().as_secs_f64());
        if !args.quiet {
            eprintln!("{}", row(&s, samples.first()));
        }
        samples.push(s);
        if next >= duration {
            break;
        }
        next = (next + every).min(duration);
        std::thread::sleep(next.saturating_sub(start.elapsed()));
    }
    stop(&live);
    let tally = handle
        .join()
        .map_err(|_| "the churn thread panicked".to_owned())?;
    // Give the server time to reap the final closes (its close grace is 2 s).
    std::thread::sleep(AFTER_CLOSE);
    let after_close = sample(args, &live, start.elapsed().as_secs_f64());
    Ok(ChurnReport {
        run_id,
        addrs: args.addrs.iter().map(ToString::to_string).collect(),
        server_pids: args.server_pid.clone(),
        connections: total as u64,
        churn_per_sec: args.churn_per_sec,
        fresh_users: args.fresh_users,
        rate: args.rate,
        duration_s: args.duration,
        sample_every_s: args.sample_every,
        rss_before_kib,
        connect_s,
        memory: summarize(&samples, args.steady_after),
        samples,
        after_close,
        errors: tally.errors(),
        tally,
    })
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

const HEADER: &str =
    "     t_s    rss_kib   Δ_kib    fds  srv_conns  srv_users    open    opened    closed";

/// One table row; Δ is against `first` (the sample at t = 0).
fn row(s: &Sample, first: Option<&Sample>) -> String {
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
    use crate::testserver;
    use clap::Parser;

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

    #[test]
    fn churns_against_a_stand_in_server() {
        let addr = testserver::start(10_000, testserver::Faults::default());
        let args = Args::try_parse_from([
            "loadtest",
            "churn",
            "--addr",
            &addr.to_string(),
            "--users",
            "10",
            "--devices",
            "2",
            "--churn-per-sec",
            "60",
            "--fresh-users",
            "0.5",
            "--rate",
            "50",
            "--duration",
            "1.5",
            "--sample-every",
            "0.5",
            "--steady-after",
            "0",
            "--server-pid",
            &std::process::id().to_string(),
            "--quiet",
        ])
        .unwrap();
        args.validate().unwrap();
        let r = run(&args, Vec::new()).unwrap();
        let t = &r.tally;
        assert_eq!(t.opened_initial, 20);
        assert!(t.closed_total() >= 80, "{:?}", t.closed);
        for kind in ["clean", "fin", "reset"] {
            assert!(t.closed[kind] >= 25, "{:?}", t.closed);
        }
        // Every close was reopened, bar those still reconnecting at the end.
        assert!(
            t.opened + 20 >= t.opened_initial + t.closed_total(),
            "{t:?}"
        );
        assert!(t.messages_sent >= 60 && t.deliveries > 0, "{t:?}");
        assert_eq!(r.errors, 0, "{t:?}");
        assert_eq!(r.samples.len(), 4);
        assert!(r
            .samples
            .iter()
            .all(|s| s.rss_kib.is_some() && s.fds.is_some()));
        // Read from the stand-in's /healthz (churn may have one or two in flight).
        assert!(r.samples[0].server_connections.is_some_and(|c| c >= 15));
        assert_eq!(r.samples[0].server_users, Some(0));
        assert!(r.memory.slope_kib_per_min.is_some());
    }
}
