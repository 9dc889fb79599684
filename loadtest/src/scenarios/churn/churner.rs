//! The churn event loop: one mio poll over every slot. It opens the population, then every
//! second closes `--churn-per-sec` random open connections (clean, FIN, reset in turn) and
//! reopens them, sends the optional `--rate` of messages, and counts everything in a [`Tally`].

use super::{Live, Tally};
use crate::cli::Args;
use crate::rng::splitmix64;
use crate::scenarios::marker::{self, Classifier, Frame};
use crate::transport::codec::{self, Handshake, Parse};
use crate::transport::nonblocking::{connect_done, connect_socket, reason, ReadResult, WsStream};
use crate::transport::token;
use mio::{Events, Poll, Token};
use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(super) const WAKER: Token = Token(usize::MAX);
const NS: u64 = 1_000_000_000;
/// How long a clean close waits for the server's close frame or EOF before dropping the socket.
const CLOSE_TIMEOUT_NS: u64 = 5 * NS;
/// A connection that failed to open, or that the server dropped, is retried after this.
const RETRY_DELAY_NS: u64 = NS;
/// Largest server frame accepted.
const MAX_FRAME: usize = 1 << 20;
const READ_CHUNK: usize = 64 * 1024;

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
    ws: WsStream,
    /// When the current connect or clean close started.
    since_ns: u64,
    /// Position in `Churner::open` while Open.
    open_at: usize,
}

pub(super) struct Churner {
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
    pub(super) fn new(
        args: &Args,
        poll: Poll,
        live: Arc<Live>,
        seed: u64,
        run_id: &str,
        source_ips: Vec<IpAddr>,
    ) -> Self {
        let total = (args.users * u64::from(args.devices)) as usize;
        let devices = u64::from(args.devices);
        Self {
            poll,
            origin: Instant::now(),
            live,
            slots: (0..total)
                .map(|i| Slot {
                    user: i as u64 / devices,
                    state: State::Idle,
                    ws: WsStream::default(),
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
            classifier: Classifier::new(run_id),
            run_id: run_id.to_owned(),
            churned: 0,
            sent: 0,
            tally: Tally::default(),
            scratch: vec![0; READ_CHUNK],
            payload: Vec::with_capacity(256),
        }
    }

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

    pub(super) fn run(mut self) -> Tally {
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
                    s.ws.stream = Some(stream);
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
        let Some(stream) = self.slots[i].ws.stream.as_ref() else {
            return;
        };
        match connect_done(stream) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => return self.fail(i, reason(&e), self.now_ns()),
        }
        let id = format!("{}{}", self.prefix, self.slots[i].user);
        let path = match self.minter.native_path(&self.ws_path, &id) {
            Ok(p) => p,
            Err(e) => return self.fail(i, e, self.now_ns()),
        };
        let host = self.addrs[i % self.addrs.len()].to_string();
        let s = &mut self.slots[i];
        s.ws.start_upgrade(&host, &path, &mut self.rng);
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
        s.ws.close(self.poll.registry());
        s.state = State::Idle;
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
                let s = &mut self.slots[i];
                s.ws.queue_close_normal(&mut self.rng);
                s.state = State::Closing;
                s.since_ns = now;
                self.flush(i);
            }
            CloseKind::Fin => self.closed(i),
            CloseKind::Reset => {
                if let Some(stream) = &self.slots[i].ws.stream {
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
            self.slots[from].ws.queue_text(&self.payload, &mut self.rng);
            self.tally.messages_sent += 1;
            self.flush(from);
        }
    }

    // ---- I/O --------------------------------------------------------------------------

    fn on_readable(&mut self, i: usize) {
        let mut buf = std::mem::take(&mut self.scratch);
        loop {
            let now = self.now_ns();
            match self.slots[i].ws.read(&mut buf) {
                ReadResult::Data(n) => {
                    self.slots[i].ws.rbuf.extend_from_slice(&buf[..n]);
                    self.parse(i, now);
                    if n < buf.len() {
                        break;
                    }
                }
                ReadResult::Drained => break,
                ReadResult::Gone(why) => {
                    self.dropped(i, why, now);
                    break;
                }
            }
        }
        self.scratch = buf;
    }

    fn parse(&mut self, i: usize, now: u64) {
        if self.slots[i].state == State::Handshaking {
            match self.slots[i].ws.upgrade_response() {
                Handshake::Incomplete => return,
                Handshake::Rejected(why) => return self.fail(i, why, now),
                Handshake::Accepted { .. } => self.established(i),
            }
        }
        let rbuf = std::mem::take(&mut self.slots[i].ws.rbuf);
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
        if self.slots[i].ws.stream.is_some() {
            self.slots[i].ws.rbuf = rbuf;
            self.slots[i].ws.rbuf.drain(..pos);
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
                self.slots[i].ws.queue_pong(payload, &mut self.rng);
                self.flush(i);
            }
            codec::OP_CLOSE => {
                if self.slots[i].state == State::Closing {
                    return self.closed(i);
                }
                self.slots[i].ws.queue_close_reply(payload, &mut self.rng);
                self.flush(i);
                self.dropped(i, codec::server_close_reason(payload), now);
            }
            _ => {}
        }
    }

    fn flush(&mut self, i: usize) {
        if let (_, Some(why)) = self.slots[i].ws.flush() {
            let now = self.now_ns();
            self.dropped(i, why, now);
        }
    }

    /// End of run: a close frame on every open connection, then every socket closed.
    fn shutdown(&mut self) {
        for i in 0..self.slots.len() {
            if self.slots[i].state == State::Open {
                self.slots[i].ws.queue_close_normal(&mut self.rng);
                self.flush(i);
            }
            self.drop_stream(i);
        }
        self.open.clear();
        self.live.open.store(0, Ordering::Relaxed);
    }
}
