//! One event-loop thread: a mio poll over this thread's share of the client connections.
//! It connects them (bounded concurrency), answers pings, sends its share of the open-loop
//! schedule, and records every delivery in the shared ledger and its own histograms.
//!
//! Connection `g` belongs to thread `g % threads`; the thread that owns a message's sender
//! connection sends it, whichever thread owns the receiving connections records it.

use crate::orchestration::ledger::{Ledger, Mark};
use crate::reporting::stats::{self, Counters};
use crate::scenarios::marker::{self, Classifier, Frame};
use crate::scenarios::population::Population;
use crate::transport::codec::{self, Handshake, Parse};
use crate::transport::sio;
use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use nix::sys::socket::{setsockopt, sockopt};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
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

pub enum Report {
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
    stream: Option<TcpStream>,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    /// Bytes of wbuf already written.
    wpos: usize,
    /// Payload of a fragmented message being reassembled.
    frag: Option<Vec<u8>>,
    accept: String,
    started_ns: u64,
    dirty: bool,
}

impl Conn {
    fn new() -> Self {
        Self {
            state: State::Pending,
            stream: None,
            rbuf: Vec::new(),
            wbuf: Vec::new(),
            wpos: 0,
            frag: None,
            accept: String::new(),
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
    reports: Sender<Report>,
    classifier: Classifier,
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
        reports: Sender<Report>,
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
            rng: seed | 1,
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

    fn rand(&mut self) -> u64 {
        // xorshift64*: plenty for masking keys, which only need to be unpredictable-ish.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn mask(&mut self) -> [u8; 4] {
        (self.rand() as u32).to_ne_bytes()
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
                    let _ = self.reports.send(Report::Connected {
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

    // ---- connecting -------------------------------------------------------------------

    fn start_connects(&mut self, now: u64) {
        while self.inflight < self.shared.connect_concurrency
            && self.next_pending < self.conns.len()
        {
            let local = self.next_pending;
            self.next_pending += 1;
            self.conns[local].started_ns = now;
            match self.open_socket(local) {
                Ok(stream) => {
                    self.conns[local].stream = Some(stream);
                    self.conns[local].state = State::Connecting;
                    self.inflight += 1;
                }
                Err(e) => {
                    self.conns[local].state = State::Closed;
                    self.resolved += 1;
                    *self.connect_failures.entry(reason(&e)).or_default() += 1;
                }
            }
        }
    }

    fn open_socket(&self, local: usize) -> io::Result<TcpStream> {
        let g = self.global(local);
        let spec = self.shared.pop.conns[g];
        let addr = self.shared.addrs[spec.addr as usize];
        let ips = &self.shared.source_ips;
        let source = (!ips.is_empty()).then(|| ips[g % ips.len()]);
        connect_socket(self.poll.registry(), Token(local), addr, source)
    }

    fn expire_connects(&mut self, now: u64) {
        let limit = self.shared.connect_timeout.as_nanos() as u64;
        for local in 0..self.next_pending {
            let c = &self.conns[local];
            if matches!(
                c.state,
                State::Connecting | State::Handshaking | State::Upgraded
            ) && now.saturating_sub(c.started_ns) > limit
            {
                self.fail_connect(local, "timeout".into());
            }
        }
    }

    fn fail_connect(&mut self, local: usize, why: String) {
        self.drop_stream(local);
        self.inflight -= 1;
        self.resolved += 1;
        *self.connect_failures.entry(why).or_default() += 1;
    }

    fn drop_stream(&mut self, local: usize) {
        let c = &mut self.conns[local];
        if let Some(mut s) = c.stream.take() {
            let _ = self.poll.registry().deregister(&mut s);
        }
        c.state = State::Closed;
        c.rbuf = Vec::new();
        c.wbuf = Vec::new();
        c.wpos = 0;
        c.frag = None;
        let g = self.global(local);
        self.shared.open[g].store(false, Ordering::Relaxed);
    }

    fn on_event(&mut self, local: usize, readable: bool, writable: bool) {
        match self.conns[local].state {
            State::Connecting => {
                if writable || readable {
                    self.on_connected(local);
                }
            }
            State::Handshaking | State::Upgraded | State::Open => {
                if writable {
                    self.flush(local);
                }
                if readable {
                    self.on_readable(local);
                }
            }
            State::Pending | State::Closed => {}
        }
    }

    fn on_connected(&mut self, local: usize) {
        let Some(stream) = self.conns[local].stream.as_ref() else {
            return;
        };
        match connect_done(stream) {
            Ok(true) => {
                let took = self
                    .shared
                    .now_ns()
                    .saturating_sub(self.conns[local].started_ns);
                self.tcp_us.saturating_record((took / 1000).max(1));
            }
            Ok(false) => return,
            Err(e) => return self.fail_connect(local, reason(&e)),
        }
        let g = self.global(local);
        let spec = self.shared.pop.conns[g];
        let addr = self.shared.addrs[spec.addr as usize];
        let mut key = [0u8; 16];
        key[..8].copy_from_slice(&self.rand().to_ne_bytes());
        key[8..].copy_from_slice(&self.rand().to_ne_bytes());
        let (req, accept) = codec::upgrade(
            &addr.to_string(),
            &self.shared.paths[spec.user as usize],
            key,
        );
        let c = &mut self.conns[local];
        c.accept = accept;
        c.wbuf.extend_from_slice(&req);
        c.state = State::Handshaking;
        self.flush(local);
        // The response may already be waiting; edge-triggered readiness won't repeat it.
        self.on_readable(local);
    }

    // ---- reading ----------------------------------------------------------------------

    fn on_readable(&mut self, local: usize) {
        let mut buf = std::mem::take(&mut self.scratch);
        loop {
            let state = self.conns[local].state;
            if !matches!(state, State::Handshaking | State::Upgraded | State::Open) {
                break;
            }
            let Some(stream) = self.conns[local].stream.as_mut() else {
                break;
            };
            match stream.read(&mut buf) {
                Ok(0) => {
                    self.close(local, "eof");
                    break;
                }
                Ok(n) => {
                    self.phase_counters.bytes_read += n as u64;
                    let now = self.shared.now_ns();
                    if state == State::Handshaking {
                        self.conns[local].rbuf.extend_from_slice(&buf[..n]);
                        self.on_handshake_bytes(local, now);
                    } else {
                        self.on_frame_bytes(local, &buf[..n], now);
                    }
                    if n < buf.len() {
                        // A short read means the socket is drained; skip the WouldBlock syscall.
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let why = reason(&e);
                    self.close(local, &why);
                    break;
                }
            }
        }
        self.scratch = buf;
    }

    fn on_handshake_bytes(&mut self, local: usize, now: u64) {
        let c = &mut self.conns[local];
        match codec::parse_handshake(&c.rbuf, &c.accept) {
            Handshake::Incomplete => {}
            Handshake::Rejected(why) => self.fail_connect(local, why),
            Handshake::Accepted { header_len } => {
                c.rbuf.drain(..header_len);
                c.accept = String::new();
                if self.shared.sio_connect.is_empty() {
                    self.established(local, now);
                } else {
                    // Counted once the Socket.IO CONNECT is acknowledged.
                    self.conns[local].state = State::Upgraded;
                }
                if !self.conns[local].rbuf.is_empty() {
                    let rest = std::mem::take(&mut self.conns[local].rbuf);
                    self.on_frame_bytes(local, &rest, now);
                }
            }
        }
    }

    /// The connection is ready for traffic: count it as connected.
    fn established(&mut self, local: usize, now: u64) {
        let c = &mut self.conns[local];
        c.state = State::Open;
        let took = now.saturating_sub(c.started_ns) / 1000;
        self.connect_us.saturating_record(took.max(1));
        self.inflight -= 1;
        self.resolved += 1;
        self.connect_ok += 1;
        let g = self.global(local);
        self.shared.open[g].store(true, Ordering::Relaxed);
    }

    /// Parses frames straight out of `data` when nothing is buffered (the common case),
    /// keeping only an incomplete tail; otherwise appends and parses the connection buffer.
    fn on_frame_bytes(&mut self, local: usize, data: &[u8], now: u64) {
        if self.conns[local].rbuf.is_empty() {
            let used = self.parse_frames(local, data, now);
            if self.conns[local].state.framed() && used < data.len() {
                self.conns[local].rbuf.extend_from_slice(&data[used..]);
            }
        } else {
            let mut rbuf = std::mem::take(&mut self.conns[local].rbuf);
            rbuf.extend_from_slice(data);
            let used = self.parse_frames(local, &rbuf, now);
            if self.conns[local].state.framed() {
                rbuf.drain(..used);
                self.conns[local].rbuf = rbuf;
            }
        }
    }

    fn parse_frames(&mut self, local: usize, data: &[u8], now: u64) -> usize {
        let mut pos = 0;
        while self.conns[local].state.framed() {
            match codec::parse_frame(&data[pos..], MAX_FRAME) {
                Parse::Incomplete => break,
                Parse::Error(_) => {
                    self.phase_counters.protocol_errors += 1;
                    self.tick_counters.protocol_errors += 1;
                    self.close(local, "protocol error");
                    break;
                }
                Parse::Frame(h) => {
                    let payload = &data[pos + h.header_len..pos + h.total_len()];
                    pos += h.total_len();
                    self.on_frame(local, h.fin, h.opcode, payload, now);
                }
            }
        }
        pos
    }

    fn on_frame(&mut self, local: usize, fin: bool, opcode: u8, payload: &[u8], now: u64) {
        match opcode {
            codec::OP_TEXT | codec::OP_BINARY => {
                if self.conns[local].frag.is_some() {
                    self.protocol_error(local);
                } else if fin {
                    self.on_message(local, payload, now);
                } else {
                    self.conns[local].frag = Some(payload.to_vec());
                }
            }
            codec::OP_CONTINUATION => {
                let Some(mut frag) = self.conns[local].frag.take() else {
                    return self.protocol_error(local);
                };
                if frag.len() + payload.len() > MAX_FRAME {
                    return self.protocol_error(local);
                }
                frag.extend_from_slice(payload);
                if fin {
                    self.on_message(local, &frag, now);
                } else {
                    self.conns[local].frag = Some(frag);
                }
            }
            codec::OP_PING => {
                self.phase_counters.pings += 1;
                let mask = self.mask();
                let c = &mut self.conns[local];
                codec::encode_frame(&mut c.wbuf, codec::OP_PONG, payload, mask);
                self.mark_dirty(local);
            }
            codec::OP_CLOSE => {
                self.phase_counters.closes_by_server += 1;
                self.tick_counters.closes_by_server += 1;
                // Echo the status code (RFC 6455 5.5.1), then drop the connection.
                let code = payload.get(..2).unwrap_or(&[]).to_vec();
                let mask = self.mask();
                codec::encode_frame(&mut self.conns[local].wbuf, codec::OP_CLOSE, &code, mask);
                self.flush(local);
                self.close(local, &server_close_reason(payload));
            }
            _ => {} // Pong: nothing to do.
        }
    }

    fn protocol_error(&mut self, local: usize) {
        self.phase_counters.protocol_errors += 1;
        self.tick_counters.protocol_errors += 1;
        self.close(local, "protocol error");
    }

    fn on_message(&mut self, local: usize, payload: &[u8], now: u64) {
        if !self.shared.sio_connect.is_empty() {
            return self.on_sio_packet(local, payload, now);
        }
        self.on_app_message(local, payload, now);
    }

    /// One Engine.IO packet (Socket.IO protocol): handshake steps, heartbeats, events.
    fn on_sio_packet(&mut self, local: usize, payload: &[u8], now: u64) {
        let state = self.conns[local].state;
        match sio::classify(payload) {
            sio::Packet::Event if state == State::Open => self.on_app_message(local, payload, now),
            sio::Packet::Ping(data) => {
                self.phase_counters.pings += 1;
                let mut pong = Vec::with_capacity(1 + data.len());
                sio::pong(&mut pong, data);
                self.send_text(local, &pong);
            }
            sio::Packet::Open if state == State::Upgraded => {
                let g = self.global(local);
                let user = self.shared.pop.conns[g].user as usize;
                let shared = Arc::clone(&self.shared);
                self.send_text(local, &shared.sio_connect[user]);
            }
            sio::Packet::ConnectAck if state == State::Upgraded => self.established(local, now),
            sio::Packet::ConnectError(data) if state == State::Upgraded => {
                self.fail_connect(local, sio::connect_error_reason(data))
            }
            sio::Packet::Close => {
                self.phase_counters.closes_by_server += 1;
                self.tick_counters.closes_by_server += 1;
                self.close(local, "engine.io close");
            }
            sio::Packet::Disconnect => {
                self.phase_counters.closes_by_server += 1;
                self.tick_counters.closes_by_server += 1;
                self.close(local, "socket.io disconnect");
            }
            _ => self.phase_counters.other_frames += 1,
        }
    }

    fn send_text(&mut self, local: usize, payload: &[u8]) {
        let mask = self.mask();
        codec::encode_frame(&mut self.conns[local].wbuf, codec::OP_TEXT, payload, mask);
        self.mark_dirty(local);
    }

    fn on_app_message(&mut self, local: usize, payload: &[u8], now: u64) {
        match self.classifier.classify(payload) {
            Frame::Delivery { seq, intended_ns } => self.on_delivery(local, seq, intended_ns, now),
            Frame::Foreign => self.phase_counters.foreign += 1,
            Frame::Error => {
                self.phase_counters.error_frames += 1;
                self.tick_counters.error_frames += 1;
                *self
                    .error_codes
                    .entry(marker::error_code(payload))
                    .or_default() += 1;
            }
            Frame::Other => self.phase_counters.other_frames += 1,
        }
    }

    fn on_delivery(&mut self, local: usize, seq: u64, intended_ns: u64, now: u64) {
        let Some(active) = &self.phase else {
            self.phase_counters.late += 1;
            return;
        };
        let ledger = &active.run.ledger;
        let pop = &self.shared.pop;
        let spec = pop.conns[self.global(local)];
        let route = pop.route(seq);
        let Some(slot) = pop.slot(&route, spec.user, spec.dev) else {
            // Could also be a stale seq from an earlier phase; route() is still meaningful.
            self.phase_counters.misrouted += 1;
            return;
        };
        match ledger.mark_delivered(seq, slot) {
            Mark::First => {
                let us = (now.saturating_sub(intended_ns) / 1000).max(1);
                self.phase_hist.saturating_record(us);
                self.tick_hist.saturating_record(us);
                self.phase_counters.delivered += 1;
                self.tick_counters.delivered += 1;
            }
            Mark::Duplicate => {
                self.phase_counters.duplicates += 1;
                self.tick_counters.duplicates += 1;
            }
            Mark::OutOfPhase => self.phase_counters.late += 1,
        }
    }

    fn close(&mut self, local: usize, why: &str) {
        if matches!(
            self.conns[local].state,
            State::Handshaking | State::Upgraded
        ) {
            return self.fail_connect(local, format!("{why} during handshake"));
        }
        if self.conns[local].state == State::Open {
            self.phase_counters.disconnects += 1;
            self.tick_counters.disconnects += 1;
            *self.disconnect_reasons.entry(why.to_owned()).or_default() += 1;
        }
        self.drop_stream(local);
    }

    // ---- writing ----------------------------------------------------------------------

    fn mark_dirty(&mut self, local: usize) {
        if !self.conns[local].dirty {
            self.conns[local].dirty = true;
            self.dirty.push(local);
        }
    }

    fn flush_dirty(&mut self) {
        let dirty = std::mem::take(&mut self.dirty);
        for &local in &dirty {
            self.conns[local].dirty = false;
            self.flush(local);
        }
        let mut dirty = dirty;
        dirty.clear();
        if self.dirty.is_empty() {
            self.dirty = dirty;
        }
    }

    fn flush(&mut self, local: usize) {
        let c = &mut self.conns[local];
        let Some(stream) = c.stream.as_mut() else {
            return;
        };
        let (n, failed) = write_some(stream, &c.wbuf[c.wpos..]);
        c.wpos += n;
        self.phase_counters.bytes_written += n as u64;
        if c.wpos == c.wbuf.len() {
            c.wbuf.clear();
            c.wpos = 0;
        } else if c.wpos > 1 << 20 {
            c.wbuf.drain(..c.wpos);
            c.wpos = 0;
        }
        if let Some(why) = failed {
            self.close(local, &why);
        }
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
        if self.conns[local].wbuf.len() - self.conns[local].wpos > self.shared.wbuf_cap {
            self.phase_counters.skipped_backpressure += 1;
            return true;
        }
        let mask = self.mask();
        let to = &self.shared.user_ids[route.recipient as usize];
        self.payload.clear();
        let sio = !self.shared.sio_connect.is_empty();
        let mut pad_to = self.shared.pad_to;
        if sio {
            self.payload.extend_from_slice(sio::EVENT_PREFIX);
            pad_to = pad_to.saturating_sub(sio::EVENT_PREFIX.len() + sio::EVENT_SUFFIX.len());
        }
        marker::write_send_message(&mut self.payload, to, &self.shared.run_id, seq, due, pad_to);
        if sio {
            self.payload.extend_from_slice(sio::EVENT_SUFFIX);
        }
        codec::encode_frame(
            &mut self.conns[local].wbuf,
            codec::OP_TEXT,
            &self.payload,
            mask,
        );
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
            let _ = self.reports.send(Report::Tick {
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
            let _ = self.reports.send(Report::PhaseDone {
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
                let mask = self.mask();
                // 1000 = normal closure.
                codec::encode_frame(
                    &mut self.conns[local].wbuf,
                    codec::OP_CLOSE,
                    &1000u16.to_be_bytes(),
                    mask,
                );
                self.flush(local);
            }
            self.drop_stream(local);
        }
    }
}

/// Starts a non-blocking TCP connect to `addr`, from `source` if given (its port chosen at
/// connect time, per 4-tuple), registered for reads and writes under `token`.
pub fn connect_socket(
    registry: &Registry,
    token: Token,
    addr: SocketAddr,
    source: Option<IpAddr>,
) -> io::Result<TcpStream> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    sock.set_nonblocking(true)?;
    sock.set_tcp_nodelay(true)?;
    if let Some(ip) = source {
        setsockopt(&sock, sockopt::IpBindAddressNoPort, &true)?;
        sock.bind(&SocketAddr::new(ip, 0).into())?;
    }
    match sock.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EINPROGRESS as i32) => {}
        Err(e) => return Err(e),
    }
    let mut stream = TcpStream::from_std(std::net::TcpStream::from(sock));
    registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)?;
    Ok(stream)
}

/// After a readiness event on a connecting socket: `Ok(true)` once connected, `Ok(false)` on
/// a spurious wake-up (still in progress), `Err` when the connect failed.
pub fn connect_done(stream: &TcpStream) -> io::Result<bool> {
    if let Some(e) = stream.take_error()? {
        return Err(e);
    }
    match stream.peer_addr() {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
        Err(e) => Err(e),
    }
}

/// Writes as much of `buf` as the socket takes; returns the bytes written and, if the socket
/// failed, why (WouldBlock is not a failure).
pub fn write_some(stream: &mut TcpStream, buf: &[u8]) -> (usize, Option<String>) {
    let mut done = 0;
    while done < buf.len() {
        match stream.write(&buf[done..]) {
            Ok(0) => return (done, Some("write returned 0".to_owned())),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (done, Some(reason(&e))),
        }
    }
    (done, None)
}

/// The disconnect reason for a server close frame with this payload.
pub fn server_close_reason(payload: &[u8]) -> String {
    match payload {
        [a, b, ..] => format!("server close {}", u16::from_be_bytes([*a, *b])),
        _ => "server close".to_owned(),
    }
}

/// A short name for an I/O error, used as a failure or disconnect reason.
pub fn reason(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => nix::errno::Errno::from_raw(code).desc().to_owned(),
        None => format!("{:?}", e.kind()),
    }
}
