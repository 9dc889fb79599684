//! One core's event loop: its `mio::Poll`, listener, connection table and inbox.
//!
//! A turn of the loop: poll; accept until WouldBlock; read every readable connection (up to a
//! budget, the rest carried to the next turn); run handlers and deliver their dispatches; drain
//! the inbox; then flush every connection that got output during the turn, once. Nothing here
//! takes a lock: everything a turn touches belongs to this core, except the inboxes (lock-free)
//! and the metrics (relaxed atomics on this core's own cache line).
//!
//! This file is the loop itself (poll, accept and admit, readiness, inbox). The rest of
//! [`CoreLoop`]'s `impl` is split by concern; each part calls a connection state's rule
//! (`crate::connection`) and acts on the outcome:
//!
//! - `table.rs`: the connections by key and the user index (the only code that knows keys);
//! - `gate.rs`: handshakes in progress, bounded per process and per address, shed oldest first;
//! - `http.rs`: request head, routing, the upgrade, plain replies;
//! - `api.rs`: `GET /api/history`, `POST /api/publish`, the `history` event, waiting replies;
//! - `frames.rs`: reading frames, the rate limit, envelopes into handlers, acks and answers;
//! - `delivery.rs`: dispatching, delivering to connections, write many and flush once;
//! - `budget.rs`: the process-wide outbound budget, shedding the biggest slow consumers;
//! - `publish.rs`: publishing to Redis on this core's own link, acks it settles answered inline;
//! - `recovery.rs`: `?since=`/`resume`, replays and resyncs;
//! - `sweep.rs`: closing, removing, deadlines and shutdown;
//! - `rooms.rs`, `sio.rs`: rooms and presence, Socket.IO; `presence.rs`: presence changes
//!   coalesced per user;
//! - `hooks.rs`: the application's hooks, room permissions, `refresh`, expiry, disconnect;
//! - `server_api.rs`: the server API (`/api/publish` to rooms and everyone, disconnect,
//!   presence, connections, a user's history) and CORS;
//! - `mode.rs`: embedded or with Redis, history on or off; `shared.rs`: what every core reads.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

use crate::backplane::core_link::CoreLink;
use crate::bus::{CoreMsg, Dispatch};
use crate::connection::{Connection, PendingRequest, Socket};
use crate::handlers::MessageIds;
use crate::metrics::{add, Closed, CoreMetrics};
use crate::protocol::CloseReason;
pub(crate) use gate::{ConnectRates, Gate};
pub(crate) use presence::Coalescer;
pub(crate) use sender_budget::SenderBudgets;
pub(crate) use shared::Shared;
use table::Table;

mod api;
mod budget;
mod delivery;
mod drain;
mod frames;
mod gate;
mod hooks;
mod http;
mod key_budgets;
mod mode;
mod presence;
mod publish;
mod recovery;
mod refusals;
mod rooms;
mod sender_budget;
mod server_api;
mod shared;
mod sio;
mod sweep;
mod table;

/// Reserved tokens sit above any slab key.
const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);
/// This core's publishing connection to Redis (per-user routing on one Redis).
const LINK: Token = Token(usize::MAX - 3);

/// Messages read from one connection per turn before the others get their go.
const READ_BUDGET: usize = 64;
/// How often deadlines (handshake, ping, idle, close) are checked.
const SWEEP_INTERVAL: Duration = Duration::from_millis(250);
/// How long a server-initiated close waits for the client's close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// How long an HTTP reply may take to be written and the client to hang up.
const REPLY_GRACE: Duration = Duration::from_secs(5);
/// How often core 0 drops expired embedded history (users who stopped getting events).
const PURGE_INTERVAL: Duration = Duration::from_secs(60);
/// How long an HTTP request may wait for Redis (history page, publish) before a 503.
const API_WAIT: Duration = Duration::from_secs(5);
/// Unauthenticated sockets dropped, oldest first, each time accept finds the process out of
/// file descriptors.
const SHED_ON_EXHAUSTION: usize = 16;
/// Accepting stops this long after the process ran out of file descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A core loop and everything it owns.
pub struct CoreLoop {
    id: usize,
    poll: Poll,
    listener: Option<TcpListener>,
    /// The connections and their users' index.
    conns: Table,
    shared: Arc<Shared>,
    /// Open WebSocket connections on this core.
    open: usize,
    /// This core's handshakes in progress, by key (`gate.rs`).
    handshakes: std::collections::HashMap<usize, gate::Handshake>,
    /// A file descriptor held back for the moment the process runs out: closed to accept (and
    /// drop) one connection, so the kernel's backlog never stalls.
    reserve_fd: Option<std::fs::File>,
    /// Bytes queued for this core's connections, not yet written (see `budget.rs`).
    outbound: usize,
    /// Connections with output queued this turn, flushed once at the end of it.
    dirty: Vec<usize>,
    /// Connections with input left over (read budget spent, or accepted with data waiting).
    carry: Vec<usize>,
    /// Dispatches made by handlers during the current message.
    outbox: Vec<Arc<Dispatch>>,
    /// Sibling cores given a dispatch this turn, woken once at the end of it.
    wake_cores: Vec<bool>,
    ids: MessageIds,
    /// Numbers the connections this core opens (see `Open::serial`).
    next_serial: u64,
    /// This core's own inbox got a message this turn (history deliveries go through it, so
    /// they keep offset order with the other cores'): drained before the flush.
    drain_self: bool,
    accept_paused_until: Option<Instant>,
    shutdown_deadline: Option<Instant>,
    next_sweep: Instant,
    /// Core 0 purges expired embedded history this often.
    next_purge: Instant,
    /// This core's own publishing connection to Redis, when it has one.
    link: Option<CoreLink>,
    /// Acks made due by the link's replies (kept to reuse the allocation).
    acks_ready: Vec<Arc<crate::bus::AckWaiter>>,
    /// At shutdown, how long the link may keep flushing.
    link_stop: Option<Instant>,
    /// CORS headers for the answer of an `/api` request from an allowed origin, by key.
    cors: std::collections::HashMap<usize, String>,
    /// The `after` of `presence` requests the rooms worker has not answered yet, by (key,
    /// serial, ack): their answers are paged from there (`rooms.rs`).
    presence_after: std::collections::HashMap<(usize, u64, Option<u64>), Box<str>>,
    /// The drain in progress (`drain.rs`).
    drain: Option<drain::Drain>,
    /// The rate limit of refusal lines in the log.
    refusals: refusals::RefusalLog,
    /// When each client frame handled since the last flush was read (for the latency
    /// histogram, observed when that flush ends).
    handled_at: Vec<Instant>,
}

impl CoreLoop {
    /// Builds the loop around a bound listener. Call on the pinned thread that will run it.
    pub fn new(
        id: usize,
        poll: Poll,
        mut listener: TcpListener,
        shared: Arc<Shared>,
    ) -> io::Result<Self> {
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = mio::Waker::new(poll.registry(), WAKER)?;
        shared.bus.set_waker(id, waker);
        let cores = shared.bus.cores();
        let link = shared
            .backplane
            .as_ref()
            .filter(|bp| bp.core_links())
            .map(|bp| CoreLink::new(bp, id, cores, LINK));
        Ok(CoreLoop {
            link,
            acks_ready: Vec::new(),
            link_stop: None,
            cors: std::collections::HashMap::new(),
            presence_after: Default::default(),
            drain: None,
            refusals: refusals::RefusalLog::new(Instant::now()),
            handled_at: Vec::new(),
            id,
            poll,
            listener: Some(listener),
            conns: Table::with_capacity(1024),
            ids: MessageIds::new(shared.node_id, id),
            shared,
            next_serial: 0,
            drain_self: false,
            open: 0,
            handshakes: Default::default(),
            reserve_fd: std::fs::File::open("/dev/null").ok(),
            outbound: 0,
            dirty: Vec::new(),
            carry: Vec::new(),
            outbox: Vec::new(),
            wake_cores: vec![false; cores],
            accept_paused_until: None,
            shutdown_deadline: None,
            next_sweep: Instant::now() + SWEEP_INTERVAL,
            next_purge: Instant::now() + PURGE_INTERVAL,
        })
    }

    fn metrics(&self) -> &CoreMetrics {
        &self.shared.metrics[self.id]
    }

    /// Runs until shutdown completes (every connection closed, or the deadline passed).
    pub fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        self.drain_inbox();
        loop {
            let timeout = if self.carry.is_empty() {
                let now = Instant::now();
                let next = [self.link_deadline(now), self.drain_deadline(now)]
                    .into_iter()
                    .flatten()
                    .fold(self.next_sweep, Instant::min);
                next.saturating_duration_since(now)
            } else {
                Duration::ZERO
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    WAKER => self.drain_inbox(),
                    LINK => self.on_link_event(
                        event.is_readable() || event.is_read_closed() || event.is_error(),
                        event.is_writable(),
                    ),
                    Token(key) => {
                        if event.is_writable() {
                            self.on_writable(key);
                        }
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            if let Some(open) = self.conns.get_open_mut(key) {
                                open.ws.get_mut().readable_edge();
                            }
                            self.on_readable(key);
                        }
                    }
                }
            }
            let carried = std::mem::take(&mut self.carry);
            for &key in &carried {
                self.on_readable(key);
            }
            if std::mem::take(&mut self.drain_self) {
                self.drain_inbox();
            }
            self.wake_siblings();
            // Redis gets this turn's publications in one write; acks its replies made due are
            // queued before the connections are flushed.
            self.link_turn(Instant::now());
            self.flush_dirty();
            self.enforce_outbound_budget();
            let now = Instant::now();
            if now >= self.next_sweep {
                self.sweep(now);
                self.announce_due_presence(now);
                // Held presence changes went to the other cores' inboxes.
                self.wake_siblings();
                self.next_sweep = now + SWEEP_INTERVAL;
                if self.id == 0 && now >= self.next_purge {
                    let stores = [&self.shared.history, &self.shared.room_history];
                    for store in stores.into_iter().flatten() {
                        store.purge(crate::types::now_ms());
                    }
                    self.next_purge = now + PURGE_INTERVAL;
                }
                self.flush_dirty();
            }
            self.drain_turn(Instant::now());
            if self.shared.shutdown.load(Ordering::SeqCst) && self.shutdown_deadline.is_none() {
                self.begin_shutdown();
                self.flush_dirty();
            }
            self.update_gauges();
            if let Some(deadline) = self.shutdown_deadline {
                let now = Instant::now();
                if (self.conns.is_empty() && self.link_drained(now)) || now >= deadline {
                    break;
                }
                self.next_sweep = self
                    .next_sweep
                    .min(Instant::now() + Duration::from_millis(20));
            }
        }
        let keys = self.conns.keys();
        for key in keys {
            self.remove(key, Closed::Server(CloseReason::Shutdown));
        }
        self.update_gauges();
        if let Some(link) = self.link.take() {
            link.close(self.poll.registry());
        }
        Ok(())
    }

    /// One wake per sibling core per turn, however many dispatches went its way.
    fn wake_siblings(&mut self) {
        for core in 0..self.wake_cores.len() {
            if std::mem::take(&mut self.wake_cores[core]) {
                self.shared.bus.wake(core);
            }
        }
    }

    fn update_gauges(&self) {
        let m = self.metrics();
        m.connections_open
            .store(self.open as u64, Ordering::Relaxed);
        m.sockets.store(self.conns.len() as u64, Ordering::Relaxed);
        m.users.store(self.conns.users() as u64, Ordering::Relaxed);
    }

    fn accept(&mut self) {
        if self.accept_paused_until.is_some() || self.shutdown_deadline.is_some() {
            return;
        }
        loop {
            let Some(listener) = self.listener.as_ref() else {
                return;
            };
            match listener.accept() {
                Ok((stream, peer)) => self.admit(stream, peer.ip()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_fd_exhaustion(&e) => {
                    // Make room: drop the oldest unauthenticated sockets, then accept on.
                    if self.shed_oldest_handshakes(SHED_ON_EXHAUSTION) > 0 {
                        continue;
                    }
                    // Nothing to shed: the reserve descriptor takes the next connection off the
                    // backlog and drops it, so the listener does not stall on it.
                    if let Some(reserve) = self.reserve_fd.take() {
                        drop(reserve);
                        let dropped = self.listener.as_ref().map(TcpListener::accept);
                        if let Some(Ok((stream, _))) = dropped {
                            add(&self.metrics().handshakes_refused, 1);
                            drop(stream);
                        }
                        self.reserve_fd = std::fs::File::open("/dev/null").ok();
                    }
                    log::warn!("core={} accept paused: {e}", self.id);
                    self.accept_paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                    return;
                }
                // ECONNABORTED and friends concern one peer only.
                Err(e) => log::debug!("core={} accept error: {e}", self.id),
            }
        }
    }

    fn admit(&mut self, stream: TcpStream, peer: std::net::IpAddr) {
        if !self.begin_handshake(peer) {
            add(&self.metrics().handshakes_refused, 1);
            return;
        }
        let _ = stream.set_nodelay(true);
        let deadline = Instant::now() + self.shared.config.handshake_timeout;
        let registry = self.poll.registry();
        let tls = self.shared.tls.as_deref();
        let admitted = self.conns.insert_with(|key| {
            // With TLS the handshake runs in the request state's reads (`connection::tls`),
            // inside the same handshake deadline as the HTTP request.
            let mut stream = match tls {
                Some(tls) => tls.accept(stream)?,
                None => Socket::Plain(stream),
            };
            let interest = Interest::READABLE | Interest::WRITABLE;
            registry.register(stream.tcp(), Token(key), interest)?;
            Ok(Connection::Request(PendingRequest {
                stream,
                buf: Vec::new(),
                deadline,
            }))
        });
        let key = match admitted {
            Ok(key) => key,
            Err(e) => {
                log::warn!("core={} register failed: {e}", self.id);
                self.shared.gate.end(peer);
                return;
            }
        };
        self.track_handshake(key, peer);
        // The request may already be waiting; its readable edge may have passed.
        self.carry.push(key);
    }

    fn on_writable(&mut self, key: usize) {
        match self.conns.get_mut(key) {
            Some(Connection::Reply(_)) => self.progress_reply(key),
            Some(Connection::Open(_)) => self.mark_dirty(key),
            _ => {}
        }
    }

    fn on_readable(&mut self, key: usize) {
        match self.conns.get(key) {
            Some(Connection::Request(_)) => self.read_request(key),
            Some(Connection::Reply(_)) => self.progress_reply(key),
            Some(Connection::Open(_)) => self.read_frames(key),
            Some(Connection::Body(_)) => self.api_publish_body(key),
            // The answer (or the deadline) decides; a hang-up shows then as a failed write.
            Some(Connection::Waiting(_)) | None => {}
        }
    }

    fn drain_inbox(&mut self) {
        let shared = Arc::clone(&self.shared);
        shared.bus.drain(self.id, |msg| match msg {
            CoreMsg::Dispatch(dispatch) => self.deliver_local(&dispatch),
            CoreMsg::Delivered(delivery) => self.deliver_offset(&delivery),
            CoreMsg::Replayed(result) => self.on_replay(*result),
            CoreMsg::Page(page) => self.on_page(*page),
            CoreMsg::Published(published) => self.on_published(*published),
            CoreMsg::Acked(waiter) => self.on_acked(&waiter),
            CoreMsg::Resync => self.resync_all(),
            CoreMsg::Room(delivery) => self.deliver_room(&delivery),
            CoreMsg::RoomAnswer(answer) => self.on_room_answer(*answer),
            CoreMsg::Admission(verdict) => self.on_admission(*verdict),
            CoreMsg::ResyncRoom(user, room) => self.resync_room(&user, &room),
            CoreMsg::Hook(done) => self.on_hook(*done),
            CoreMsg::Disconnect(user) => self.disconnect_user(&user),
            CoreMsg::Displace { key, serial } => self.displace(key, serial),
            CoreMsg::Api(answer) => self.on_api_answer(*answer),
        });
    }

    /// Lists the connection under `user` in this core's index (the caller marked it indexed).
    fn index(&mut self, key: usize, user: &crate::UserId) {
        if self.conns.index(key, user) {
            if let Some(bp) = &self.shared.backplane {
                bp.user_joined(user, self.id);
            }
        }
    }
}

fn is_fd_exhaustion(e: &io::Error) -> bool {
    // EMFILE (24) and ENFILE (23): out of file descriptors, per process or system-wide.
    matches!(e.raw_os_error(), Some(23) | Some(24))
}
