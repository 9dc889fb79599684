//! One core's event loop: its `mio::Poll`, listener, slab of connections, user index and inbox.
//!
//! A turn of the loop: poll; accept until WouldBlock; read every readable connection (up to a
//! budget, the rest carried to the next turn); run handlers and deliver their dispatches; drain
//! the inbox; then flush every connection that got output during the turn, once. Nothing here
//! takes a lock: everything a turn touches belongs to this core, except the inboxes (lock-free)
//! and the metrics (relaxed atomics on this core's own cache line).

use std::io::{self, Read};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use smallvec::SmallVec;
use tungstenite::protocol::Role;
use tungstenite::{Message, Utf8Bytes, WebSocket};

use crate::api::{self, ApiError};
use crate::backplane::AckWaiter;
use crate::bus::{CoreMsg, Dispatch, PageResult, PublishResult, ReplayResult, RoomDelivery};
use crate::connection::{
    Connection, Counted, Open, PendingBody, PendingRequest, Reply, Stream, Waiting,
};
use crate::handlers::{Args, ConnectionId, Context, HandlerResult, MessageIds};
use crate::history::{self, Delivery, Offset, Recovering};
use crate::http::{self, Parse, Request, RequestError};
use crate::metrics::{add, Closed, CoreMetrics};
use crate::protocol::{self, CloseReason, ErrorCode};
use crate::runtime::Shared;
use crate::socketio::{self, FrameCache};
use crate::user_index::UserIndex;

mod rooms;
mod sio;

/// Reserved tokens sit above any slab key.
const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);

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
/// Accepting stops this long after the process ran out of file descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A core loop and everything it owns.
pub struct CoreLoop {
    id: usize,
    poll: Poll,
    listener: Option<TcpListener>,
    conns: Slab<Connection>,
    users: UserIndex,
    shared: Arc<Shared>,
    /// Open WebSocket connections on this core.
    open: usize,
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
        Ok(CoreLoop {
            id,
            poll,
            listener: Some(listener),
            conns: Slab::with_capacity(1024),
            users: UserIndex::default(),
            ids: MessageIds::new(shared.node_id, id),
            shared,
            next_serial: 0,
            drain_self: false,
            open: 0,
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
                self.next_sweep.saturating_duration_since(Instant::now())
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
                    Token(key) => {
                        if event.is_writable() {
                            self.on_writable(key);
                        }
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            if let Some(Connection::Open(open)) = self.conns.get_mut(key) {
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
            // One wake per sibling core per turn, however many dispatches went its way.
            for core in 0..self.wake_cores.len() {
                if std::mem::take(&mut self.wake_cores[core]) {
                    self.shared.bus.wake(core);
                }
            }
            self.flush_dirty();
            let now = Instant::now();
            if now >= self.next_sweep {
                self.sweep(now);
                self.next_sweep = now + SWEEP_INTERVAL;
                if self.id == 0 && now >= self.next_purge {
                    if let Some(store) = &self.shared.history {
                        store.purge(crate::handlers::now_ms());
                    }
                    self.next_purge = now + PURGE_INTERVAL;
                }
                self.flush_dirty();
            }
            if self.shared.shutdown.load(Ordering::SeqCst) && self.shutdown_deadline.is_none() {
                self.begin_shutdown();
                self.flush_dirty();
            }
            self.publish_gauges();
            if let Some(deadline) = self.shutdown_deadline {
                if self.conns.is_empty() || Instant::now() >= deadline {
                    break;
                }
                self.next_sweep = self
                    .next_sweep
                    .min(Instant::now() + Duration::from_millis(20));
            }
        }
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.remove(key, Closed::Server(CloseReason::Shutdown));
        }
        self.publish_gauges();
        Ok(())
    }

    fn publish_gauges(&self) {
        let m = self.metrics();
        m.connections_open
            .store(self.open as u64, Ordering::Relaxed);
        m.sockets.store(self.conns.len() as u64, Ordering::Relaxed);
        m.users.store(self.users.len() as u64, Ordering::Relaxed);
    }

    // ---- accepting ------------------------------------------------------------------------

    fn accept(&mut self) {
        if self.accept_paused_until.is_some() || self.shutdown_deadline.is_some() {
            return;
        }
        loop {
            let Some(listener) = self.listener.as_ref() else {
                return;
            };
            match listener.accept() {
                Ok((stream, _peer)) => self.admit(stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_fd_exhaustion(&e) => {
                    log::warn!("core={} accept paused: {e}", self.id);
                    self.accept_paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                    return;
                }
                // ECONNABORTED and friends concern one peer only.
                Err(e) => log::debug!("core={} accept error: {e}", self.id),
            }
        }
    }

    fn admit(&mut self, mut stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            Token(key),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            log::warn!("core={} register failed: {e}", self.id);
            return;
        }
        entry.insert(Connection::Request(PendingRequest {
            stream,
            buf: Vec::new(),
            deadline: Instant::now() + self.shared.config.handshake_timeout,
        }));
        // The request may already be waiting; its readable edge may have passed.
        self.carry.push(key);
    }

    // ---- readiness ------------------------------------------------------------------------

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
            Some(Connection::Body(_)) => self.read_body(key),
            // The answer (or the deadline) decides; a hang-up shows then as a failed write.
            Some(Connection::Waiting(_)) | None => {}
        }
    }

    // ---- HTTP ----------------------------------------------------------------------------

    fn read_request(&mut self, key: usize) {
        let max = self.shared.config.max_request_header_bytes;
        let mut chunk = [0u8; 2048];
        loop {
            let Some(Connection::Request(req)) = self.conns.get_mut(key) else {
                return;
            };
            let room = (max - req.buf.len()).min(chunk.len());
            if room == 0 {
                add(&self.metrics().handshake_failures, 1);
                self.reply(
                    key,
                    http::error_response(431, "request header fields too large"),
                    &[],
                );
                return;
            }
            match req.stream.read(&mut chunk[..room]) {
                Ok(0) => {
                    self.remove(key, Closed::Reset);
                    return;
                }
                Ok(n) => {
                    req.buf.extend_from_slice(&chunk[..n]);
                    match http::parse_request(&req.buf) {
                        Ok(Parse::Partial) => continue,
                        Ok(Parse::Complete(request, head_len)) => {
                            let rest = req.buf.split_off(head_len);
                            self.route(key, request, rest);
                            return;
                        }
                        Err(e) => {
                            add(&self.metrics().handshake_failures, 1);
                            let status = match e {
                                RequestError::Malformed => 400,
                                RequestError::TooLarge => 431,
                            };
                            self.reply(key, http::error_response(status, &e.to_string()), &[]);
                            return;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.remove(key, Closed::Reset);
                    return;
                }
            }
        }
    }

    fn route(&mut self, key: usize, req: Request, rest: Vec<u8>) {
        add(&self.metrics().http_requests, 1);
        if matches!(req.path.as_str(), "/socket.io/" | "/socket.io") {
            return self.sio_route(key, req, rest);
        }
        let page = self.shared.config.chat_page && matches!(req.path.as_str(), "/" | "/index.html");
        let known = page
            || matches!(
                req.path.as_str(),
                "/ws" | "/healthz" | "/metrics" | "/api/history"
            );
        if known && req.method != "GET" || req.path == "/api/publish" && req.method != "POST" {
            let response = if req.path.starts_with("/api/") {
                api::json_error(405, "method not allowed")
            } else {
                http::error_response(405, "method not allowed")
            };
            self.reply(key, response, &rest);
            return;
        }
        match req.path.as_str() {
            "/ws" => self.upgrade(key, req, rest, false),
            "/api/history" => self.api_history(key, req),
            "/api/publish" => self.api_publish(key, req, rest),
            "/healthz" => {
                let history = if self.shared.config.history_active() {
                    "on"
                } else {
                    "off"
                };
                let mut extra = format!(
                    r#","node":"{:016x}","history":"{history}""#,
                    self.shared.node_id
                );
                match &self.shared.backplane {
                    Some(bp) => extra.push_str(&bp.render_health()),
                    None => extra.push_str(r#","backplane":{"kind":"none"}"#),
                }
                let body = crate::metrics::render_health(&self.shared.metrics, &extra);
                self.reply(
                    key,
                    http::response(200, "application/json", "", &body),
                    &rest,
                );
            }
            "/" | "/index.html" if page => {
                self.reply(key, crate::web::index_response().to_vec(), &rest);
            }
            "/metrics" => {
                let mut body = crate::metrics::render_prometheus(&self.shared.metrics);
                if let Some(bp) = &self.shared.backplane {
                    bp.render_prometheus(&mut body);
                }
                let ct = "text/plain; version=0.0.4; charset=utf-8";
                self.reply(key, http::response(200, ct, "", &body), &rest);
            }
            _ => self.reply(key, http::error_response(404, "not found"), &rest),
        }
    }

    /// Checks and performs a WebSocket upgrade; `socketio` for `/socket.io/`, whose connections
    /// authenticate later, with each Socket.IO CONNECT (`core_loop/sio.rs`).
    fn upgrade(&mut self, key: usize, req: Request, rest: Vec<u8>, socketio: bool) {
        let refuse = |this: &mut Self, status: u16, headers: &str, reason: &str| {
            add(&this.metrics().handshake_failures, 1);
            let body = format!("{reason}\n");
            this.reply(
                key,
                http::response(status, "text/plain; charset=utf-8", headers, &body),
                &rest,
            );
        };
        if !req.wants_upgrade {
            return refuse(
                self,
                426,
                "Upgrade: websocket\r\n",
                "websocket upgrade required",
            );
        }
        if req.ws_version.as_deref() != Some("13") {
            return refuse(
                self,
                426,
                "Sec-WebSocket-Version: 13\r\n",
                "unsupported websocket version",
            );
        }
        let Some(ws_key) = req.ws_key.as_deref().filter(|k| http::valid_ws_key(k)) else {
            return refuse(self, 400, "", "missing or invalid Sec-WebSocket-Key");
        };
        let user = if socketio {
            None
        } else {
            match self.shared.auth.authenticate(req.token().as_deref()) {
                Ok(user) => Some(user),
                Err(e) => {
                    add(&self.metrics().auth_failures, 1);
                    self.reply(key, http::error_response(401, &e.to_string()), &rest);
                    return;
                }
            }
        };
        let max = self.shared.config.max_connections;
        if self.shared.open_connections.fetch_add(1, Ordering::SeqCst) >= max {
            self.shared.open_connections.fetch_sub(1, Ordering::SeqCst);
            add(&self.metrics().rejected_over_capacity, 1);
            self.reply(
                key,
                http::error_response(503, "server at max_connections"),
                &rest,
            );
            return;
        }
        let Some(Connection::Request(pending)) = self.conns.get_mut(key) else {
            return;
        };
        // A fresh socket's send buffer is empty, so the 101 (under 200 bytes) is written whole;
        // a short write here means the peer is already gone.
        let response = http::upgrade_response(ws_key);
        let written = std::io::Write::write(&mut pending.stream, &response);
        if !matches!(written, Ok(n) if n == response.len()) {
            self.shared.open_connections.fetch_sub(1, Ordering::SeqCst);
            add(&self.metrics().handshake_failures, 1);
            self.remove(key, Closed::Reset);
            return;
        }
        // Re-inserted below: slab's free list is LIFO, so the connection keeps its key (and the
        // token its socket is registered under).
        let Some(Connection::Request(pending)) = self.conns.try_remove(key) else {
            return;
        };
        let stream = Stream::new(pending.stream);
        let config = Some(self.shared.ws_config);
        let ws = if rest.is_empty() {
            WebSocket::from_raw_socket(stream, Role::Server, config)
        } else {
            WebSocket::from_partially_read(stream, rest, Role::Server, config)
        };
        let now = Instant::now();
        let session = socketio.then(|| {
            Box::new(socketio::Session::new(
                req.token(),
                req.query_param("since"),
                now + self.shared.config.handshake_timeout,
            ))
        });
        let open = Open {
            ws,
            // A Socket.IO connection has no user until its first CONNECT; it is not indexed.
            user: user.clone().unwrap_or_else(|| crate::UserId::from("")),
            last_heard: now,
            next_ping: now + self.shared.config.ping_interval,
            closing: None,
            ended: None,
            dirty: false,
            indexed: user.is_some(),
            serial: self.next_serial,
            bucket: crate::connection::TokenBucket::new(self.shared.config.rate_limit_burst, now),
            last_offset: None,
            recovering: None,
            sio: session,
            counted: Counted::No,
        };
        self.next_serial += 1;
        let since = req.query_param("since");
        let new_key = self.conns.insert(Connection::Open(open));
        debug_assert_eq!(new_key, key, "slab reuses the slot just freed");
        if new_key != key {
            // Cannot happen with slab's LIFO free list, but never leave a socket registered
            // under a token that names another slot.
            if let Some(conn) = self.conns.get_mut(new_key) {
                let _ = self.poll.registry().reregister(
                    conn.tcp(),
                    Token(new_key),
                    Interest::READABLE | Interest::WRITABLE,
                );
            }
        }
        if let Some(user) = &user {
            self.index(new_key, user);
        }
        self.open += 1;
        add(&self.metrics().connections_accepted, 1);
        log::debug!("core={} conn={new_key} user={user:?} open", self.id);
        if let Some(user) = &user {
            if !self.count_device(new_key, user) {
                return;
            }
        }
        if socketio {
            self.sio_open(new_key);
        } else if let Some(since) = since {
            self.begin_recovery(new_key, since.parse().ok());
        }
        // Frames may have arrived with (or right after) the request.
        self.carry.push(new_key);
    }

    // ---- history API -------------------------------------------------------------------------

    /// `GET /api/history?limit=&before=` with the user's token: the user's events, newest first.
    fn api_history(&mut self, key: usize, req: Request) {
        let shared = Arc::clone(&self.shared);
        if !shared.config.history_active() {
            return self.reply(key, api::json_error(404, "history is off"), &[]);
        }
        let user = match shared.auth.authenticate(req.token().as_deref()) {
            Ok(user) => user,
            Err(e) => {
                add(&self.metrics().auth_failures, 1);
                return self.reply(key, api::json_error(401, &e.to_string()), &[]);
            }
        };
        let (limit, before) = match api::page_query(&req, shared.config.history.max_page) {
            Ok(q) => q,
            Err(e) => return self.reply(key, e.response(), &[]),
        };
        if let Some(store) = &shared.history {
            let page = store.page(&user, before, limit, crate::handlers::now_ms());
            let frames: Vec<Utf8Bytes> = page.into_iter().map(|(_, f)| f).collect();
            return self.reply(key, api::json_ok(&history::page_json(&frames)), &[]);
        }
        let Some(bp) = &shared.backplane else {
            return;
        };
        let serial = self.wait(key);
        let asked = bp.request_page(crate::backplane::PageRequest {
            user,
            before,
            limit,
            core: self.id,
            key,
            serial,
            ack: None,
        });
        if !asked {
            self.reply(key, api::json_error(503, "history unavailable"), &[]);
        }
    }

    /// Parks an HTTP connection until another thread answers; returns the serial to answer to.
    fn wait(&mut self, key: usize) -> u64 {
        let serial = self.next_serial;
        self.next_serial += 1;
        let stream = match self.conns.try_remove(key) {
            Some(Connection::Request(r)) => r.stream,
            Some(Connection::Body(b)) => b.stream,
            Some(other) => {
                self.conns.insert(other);
                return serial;
            }
            None => return serial,
        };
        let new_key = self.conns.insert(Connection::Waiting(Waiting {
            stream,
            serial,
            deadline: Instant::now() + API_WAIT,
        }));
        debug_assert_eq!(new_key, key, "slab reuses the slot just freed");
        serial
    }

    /// `POST /api/publish` with the API key: checks the head, then reads the body.
    fn api_publish(&mut self, key: usize, req: Request, rest: Vec<u8>) {
        let config = &self.shared.config;
        let len = api::check_api_key(&req, &config.history)
            .and_then(|()| api::publish_body_len(&req, &config.history));
        let len = match len {
            Ok(len) => len,
            Err(e) => {
                if e.status == 401 {
                    add(&self.metrics().auth_failures, 1);
                }
                return self.reply(key, e.response(), &[]);
            }
        };
        let Some(Connection::Request(mut pending)) = self.conns.try_remove(key) else {
            return;
        };
        if req.expect_continue && rest.len() < len {
            // curl and others wait for this (up to a second) before sending a larger body. A
            // fresh socket's send buffer takes these 25 bytes whole; if not, the client sends
            // its body after its own timeout anyway.
            let _ = std::io::Write::write(&mut pending.stream, b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        let mut body = rest;
        body.truncate(len);
        let new_key = self.conns.insert(Connection::Body(PendingBody {
            stream: pending.stream,
            request: req,
            body,
            len,
            deadline: pending.deadline,
        }));
        debug_assert_eq!(new_key, key, "slab reuses the slot just freed");
        self.read_body(key);
    }

    fn read_body(&mut self, key: usize) {
        let mut chunk = [0u8; 8192];
        loop {
            let Some(Connection::Body(b)) = self.conns.get_mut(key) else {
                return;
            };
            if b.body.len() >= b.len {
                break;
            }
            let room = (b.len - b.body.len()).min(chunk.len());
            match b.stream.read(&mut chunk[..room]) {
                Ok(0) => return self.remove(key, Closed::Reset),
                Ok(n) => b.body.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return self.remove(key, Closed::Reset),
            }
        }
        let Some(Connection::Body(b)) = self.conns.get(key) else {
            return;
        };
        let parsed = api::parse_publish(&b.body, &self.shared.config.history);
        match parsed {
            Ok(dispatch) => self.publish(key, Arc::new(dispatch)),
            Err(e) => self.reply(key, e.response(), &[]),
        }
    }

    /// Dispatches a checked publication like a handler's dispatch and answers with the offsets.
    fn publish(&mut self, key: usize, dispatch: Arc<Dispatch>) {
        let shared = Arc::clone(&self.shared);
        add(&self.metrics().dispatches, 1);
        if !shared.config.history_active() {
            // No offsets without history: the event goes out as a handler's would.
            self.outbox.push(dispatch);
            self.flush_outbox(None);
            return self.reply(key, api::json_ok(r#"{"offsets":{}}"#), &[]);
        }
        if let Some(store) = &shared.history {
            let offsets = self.append_embedded(store, &dispatch);
            return self.reply(key, api::json_ok(&api::offsets_json(&offsets)), &[]);
        }
        let Some(bp) = &shared.backplane else {
            return;
        };
        let serial = self.wait(key);
        let asked = bp.request_publish(crate::backplane::PublishRequest {
            dispatch,
            core: self.id,
            key,
            serial,
        });
        if !asked {
            self.reply(key, api::json_error(503, "publishing unavailable"), &[]);
        }
    }

    fn on_page(&mut self, page: PageResult) {
        match self.conns.get(page.key) {
            Some(Connection::Open(o)) if o.serial == page.serial => {
                let Some(ack) = page.ack else {
                    return;
                };
                match page.result {
                    Ok(frames) => self.answer(page.key, Some(ack), |a| {
                        history::encode_page_ack(a, &frames)
                    }),
                    Err(e) => {
                        let message = format!("history unavailable: {e}");
                        self.answer(page.key, Some(ack), |a| {
                            protocol::encode_error(a, ErrorCode::Internal.as_str(), &message)
                        })
                    }
                }
            }
            Some(Connection::Waiting(w)) if w.serial == page.serial => {
                let response = match page.result {
                    Ok(frames) => api::json_ok(&history::page_json(&frames)),
                    Err(e) => ApiError::new(503, format!("history unavailable: {e}")).response(),
                };
                self.reply(page.key, response, &[]);
            }
            _ => {}
        }
    }

    fn on_published(&mut self, published: PublishResult) {
        let Some(Connection::Waiting(w)) = self.conns.get(published.key) else {
            return;
        };
        if w.serial != published.serial {
            return;
        }
        let response = match published.result {
            Ok(offsets) => api::json_ok(&api::offsets_json(&offsets)),
            Err(e) => ApiError::new(503, format!("not published: {e}")).response(),
        };
        self.reply(published.key, response, &[]);
    }

    /// Redis took (or dropped) what a request dispatched: its held ack goes out now.
    fn on_acked(&mut self, waiter: &AckWaiter) {
        match self.conns.get(waiter.key) {
            Some(Connection::Open(open)) if open.serial == waiter.serial => {}
            _ => return,
        }
        if waiter.taken() {
            self.answer(waiter.key, Some(waiter.ack), |a| {
                protocol::encode_ack(a, &waiter.result)
            });
        } else {
            self.answer(waiter.key, Some(waiter.ack), |a| {
                protocol::encode_error(
                    a,
                    ErrorCode::Unavailable.as_str(),
                    "not stored: Redis is unreachable and the publication queue is full; send again",
                )
            });
        }
    }

    /// Switches the connection to writing `response`, then closing.
    fn reply(&mut self, key: usize, response: Vec<u8>, _rest: &[u8]) {
        let Some(conn) = self.conns.try_remove(key) else {
            return;
        };
        let stream = match conn {
            Connection::Request(r) => r.stream,
            Connection::Reply(r) => r.stream,
            Connection::Body(b) => b.stream,
            Connection::Waiting(w) => w.stream,
            Connection::Open(o) => {
                // Not reachable: replies are only sent before an upgrade.
                self.conns.insert(Connection::Open(o));
                return;
            }
        };
        let reply = Reply {
            stream,
            out: response,
            written: 0,
            lingering: false,
            deadline: Instant::now() + REPLY_GRACE,
        };
        let new_key = self.conns.insert(Connection::Reply(reply));
        debug_assert_eq!(new_key, key);
        self.progress_reply(new_key);
    }

    fn progress_reply(&mut self, key: usize) {
        let Some(Connection::Reply(reply)) = self.conns.get_mut(key) else {
            return;
        };
        if !reply.lingering {
            match reply.write_some() {
                Ok(true) => {
                    let _ = reply.stream.shutdown(std::net::Shutdown::Write);
                    reply.lingering = true;
                }
                Ok(false) => return,
                Err(_) => {
                    self.remove(key, Closed::Reset);
                    return;
                }
            }
        }
        match reply.drain_input() {
            Ok(false) => {}
            Ok(true) | Err(_) => self.remove(key, Closed::Reset),
        }
    }

    // ---- WebSocket -------------------------------------------------------------------------

    fn read_frames(&mut self, key: usize) {
        for _ in 0..READ_BUDGET {
            let Some(Connection::Open(open)) = self.conns.get_mut(key) else {
                return;
            };
            let result = open.ws.read();
            if result.is_ok() {
                open.last_heard = Instant::now();
            }
            let closing = open.closing.is_some();
            match result {
                Ok(Message::Text(text)) => {
                    if !closing {
                        add(&self.metrics().frames_in, 1);
                        if self.within_rate_limit(key) {
                            self.on_text(key, text);
                        } else {
                            self.refuse_over_rate(key, &text);
                        }
                    }
                }
                Ok(Message::Binary(_)) => {
                    if !closing && !self.sio_skip_binary(key) {
                        self.close(key, CloseReason::BinaryFrame);
                    }
                }
                Ok(Message::Ping(_)) => self.mark_dirty(key), // tungstenite queued the pong
                Ok(Message::Pong(_)) | Ok(Message::Frame(_)) => {}
                Ok(Message::Close(_)) => {
                    // tungstenite queued the reply; the next read reports the end.
                    self.unindex(key);
                    if let Some(Connection::Open(open)) = self.conns.get_mut(key) {
                        open.closing.get_or_insert(Instant::now() + CLOSE_GRACE);
                    }
                    self.mark_dirty(key);
                }
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(tungstenite::Error::ConnectionClosed)
                | Err(tungstenite::Error::AlreadyClosed) => {
                    self.remove(key, Closed::ClientClose);
                    return;
                }
                Err(e) if closing => {
                    log::debug!("core={} conn={key} error while closing: {e}", self.id);
                    self.remove(key, Closed::Reset);
                    return;
                }
                // tungstenite's name for a peer that hung up without a close frame.
                Err(tungstenite::Error::Protocol(
                    tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
                )) => {
                    self.remove(key, Closed::Reset);
                    return;
                }
                Err(tungstenite::Error::Protocol(p)) => {
                    log::debug!("core={} conn={key} protocol error: {p}", self.id);
                    self.close(key, CloseReason::ProtocolError);
                    return;
                }
                Err(tungstenite::Error::Utf8(_)) => {
                    self.close(key, CloseReason::InvalidUtf8);
                    return;
                }
                Err(tungstenite::Error::Capacity(_)) => {
                    self.close(key, CloseReason::MessageTooBig);
                    return;
                }
                Err(tungstenite::Error::WriteBufferFull(_)) => {
                    self.close(key, CloseReason::SlowConsumer);
                    return;
                }
                Err(_) => {
                    self.remove(key, Closed::Reset);
                    return;
                }
            }
        }
        // Budget spent with input possibly left: continue next turn (edge-triggered: no new
        // event would come for bytes already buffered).
        self.carry.push(key);
    }

    /// Takes a token from the connection's bucket.
    fn within_rate_limit(&mut self, key: usize) -> bool {
        let (rate, burst) = (
            self.shared.config.rate_limit_per_sec,
            self.shared.config.rate_limit_burst,
        );
        match self.conns.get_mut(key) {
            Some(Connection::Open(open)) => open.bucket.take(rate, burst, Instant::now()),
            _ => true,
        }
    }

    /// Answers a frame over the rate limit with a `rate_limited` error (the frame is dropped);
    /// a client that goes on flooding for a whole burst's worth of frames is closed with 1008.
    fn refuse_over_rate(&mut self, key: usize, text: &Utf8Bytes) {
        add(&self.metrics().client_errors, 1);
        let burst = self.shared.config.rate_limit_burst;
        let refused = match self.conns.get(key) {
            Some(Connection::Open(open)) => open.bucket.refused,
            _ => return,
        };
        if refused > burst {
            self.close(key, CloseReason::RateLimited);
            return;
        }
        // The first refusal of a run is answered, and every refused frame that asked for an
        // ack (its sender waits for one); the rest are dropped quietly, so a flood does not buy
        // a flood of errors.
        let ack = match self.conns.get(key) {
            Some(Connection::Open(o)) if o.sio.is_some() => sio::request_ack(text.as_str()),
            _ => protocol::parse_envelope(text.as_str())
                .ok()
                .and_then(|e| e.ack),
        };
        if refused == 1 || ack.is_some() {
            let message = format!(
                "more than {} messages per second (burst {burst}): message dropped",
                self.shared.config.rate_limit_per_sec
            );
            self.answer(key, ack, |a| {
                protocol::encode_error(a, ErrorCode::RateLimited.as_str(), &message)
            });
        }
    }

    fn on_text(&mut self, key: usize, text: Utf8Bytes) {
        let Some(Connection::Open(open)) = self.conns.get(key) else {
            return;
        };
        if open.sio.is_some() {
            return self.sio_text(key, text);
        }
        match protocol::parse_envelope(text.as_str()) {
            Ok(env) => self.on_envelope(key, &env.event, Args::new(env.args), env.ack),
            Err(e) => {
                add(&self.metrics().client_errors, 1);
                self.answer(key, e.ack, |a| {
                    protocol::encode_error(a, e.code.as_str(), &e.message)
                });
            }
        }
    }

    /// Runs the handler for a client request, whichever protocol it came in. `ack` is the
    /// native ack number, or a Socket.IO ack id packed by `socketio::tag_ack`.
    fn on_envelope(&mut self, key: usize, event: &str, args: Args<'_>, ack: Option<u64>) {
        let Some(Connection::Open(open)) = self.conns.get(key) else {
            return;
        };
        let user = open.user.clone();
        let shared = Arc::clone(&self.shared);
        if shared.config.history_active() {
            match event {
                "resume" => return self.on_resume(key, ack, args),
                "history" => return self.on_history(key, &user, ack, args),
                _ => {}
            }
        }
        if shared.config.rooms_active() && crate::rooms::is_room_event(event) {
            // `None`: the request went to Redis; its answer arrives through the inbox.
            if let Some(result) = self.on_room_event(key, &user, event, ack, args) {
                self.finish_request(key, ack, result);
            }
            return;
        }
        let Some(handler) = shared.handlers.get(event) else {
            add(&self.metrics().client_errors, 1);
            let message = format!("no handler for event {:?}", truncate(event, 64));
            self.answer(key, ack, |a| {
                protocol::encode_error(a, ErrorCode::UnknownEvent.as_str(), &message)
            });
            return;
        };
        let connection = ConnectionId { core: self.id, key };
        let mut ctx = Context::new(&user, connection, &mut self.outbox, &mut self.ids);
        // A panicking handler must not take the core (and every connection on it) down.
        let result = catch_unwind(AssertUnwindSafe(|| handler.handle(&mut ctx, args)))
            .unwrap_or_else(|_| {
                log::error!("handler for {:?} panicked", truncate(event, 64));
                Err(crate::handlers::HandlerError::internal("handler failed"))
            });
        self.finish_request(key, ack, result);
    }

    /// Sends what a request dispatched, then its ack or error.
    fn finish_request(&mut self, key: usize, ack: Option<u64>, result: HandlerResult) {
        let shared = Arc::clone(&self.shared);
        // The connection is still there (handlers run synchronously); 0 only keeps the types.
        let serial = match self.conns.get(key) {
            Some(Connection::Open(open)) => open.serial,
            _ => 0,
        };
        if result.is_err() {
            // Nothing a failed handler dispatched goes out.
            self.outbox.clear();
        }
        // With Redis, the ack waits until Redis has taken every publication (stored them, with
        // history): an acknowledged message survives this instance dying, and a client resends
        // what was not acknowledged.
        let held = match (&result, ack, &shared.backplane) {
            (Ok(value), Some(n), Some(_)) if !self.outbox.is_empty() => {
                let publications = self.outbox.iter().map(|d| d.users.len()).sum();
                Some(Arc::new(AckWaiter::new(
                    self.id,
                    key,
                    serial,
                    n,
                    value.clone(),
                    publications,
                )))
            }
            _ => None,
        };
        self.flush_outbox(held.as_ref());
        if std::mem::take(&mut self.drain_self) {
            // History deliveries travel through the inbox (offset order across cores); taking
            // them now keeps the sender's own copy ahead of its ack, as without history.
            self.drain_inbox();
        }
        match (result, ack) {
            (Ok(_), Some(_)) if held.is_some() => {}
            (Ok(value), Some(n)) => self.answer(key, Some(n), |a| protocol::encode_ack(a, &value)),
            (Ok(_), None) => {}
            (Err(e), ack) => {
                add(&self.metrics().client_errors, 1);
                self.answer(key, ack, |a| protocol::encode_error(a, &e.code, &e.message));
            }
        }
    }

    /// `resume {since}`: what `?since=` does, for clients that cannot change the URL. The replay
    /// starts after `since` whatever this connection already got (the client skips offsets it
    /// has), so a client should send it first.
    fn on_resume(&mut self, key: usize, ack: Option<u64>, args: Args<'_>) {
        #[derive(serde::Deserialize)]
        struct Resume<'a> {
            #[serde(borrow)]
            since: std::borrow::Cow<'a, str>,
        }
        let since = match args.parse::<Resume<'_>>() {
            Ok(r) => r.since.parse::<Offset>().ok(),
            Err(e) => {
                add(&self.metrics().client_errors, 1);
                return self.answer(key, ack, |a| protocol::encode_error(a, &e.code, &e.message));
            }
        };
        let Some(Connection::Open(open)) = self.conns.get_mut(key) else {
            return;
        };
        if open.recovering.is_some() {
            return self.answer(key, ack, |a| {
                protocol::encode_error(
                    a,
                    ErrorCode::BadArgs.as_str(),
                    "a recovery is already in progress",
                )
            });
        }
        open.last_offset = None;
        if let Some(n) = ack {
            self.answer(key, Some(n), |a| {
                protocol::encode_ack(a, &serde_json::Value::Null)
            });
        }
        self.begin_recovery(key, since);
    }

    /// `history {limit, before}` with an ack: the user's events, newest first, in the ack.
    fn on_history(&mut self, key: usize, user: &crate::UserId, ack: Option<u64>, args: Args<'_>) {
        let shared = Arc::clone(&self.shared);
        let error = |this: &mut Self, message: &str| {
            add(&this.metrics().client_errors, 1);
            this.answer(key, ack, |a| {
                protocol::encode_error(a, ErrorCode::BadArgs.as_str(), message)
            });
        };
        let Some(ack) = ack else {
            return error(self, "history answers through an ack: send one");
        };
        let raw = args.raw();
        let parsed = if raw == "null" {
            Ok(api::PageArgs::default())
        } else {
            args.parse::<api::PageArgs<'_>>()
        };
        let page_args = match parsed {
            Ok(a) => a,
            Err(e) => return error(self, &e.message),
        };
        let limit = match page_args.limit {
            Some(0) => return error(self, "limit must be positive"),
            Some(n) => n.min(shared.config.history.max_page),
            None => api::DEFAULT_PAGE.min(shared.config.history.max_page),
        };
        let before = match page_args.before.as_deref().map(str::parse::<Offset>) {
            None => None,
            Some(Ok(b)) => Some(b),
            Some(Err(_)) => return error(self, "before is not an offset"),
        };
        if let Some(store) = &shared.history {
            let page = store.page(user, before, limit, crate::handlers::now_ms());
            let frames: Vec<Utf8Bytes> = page.into_iter().map(|(_, f)| f).collect();
            return self.answer(key, Some(ack), |a| history::encode_page_ack(a, &frames));
        }
        let Some(Connection::Open(open)) = self.conns.get(key) else {
            return;
        };
        let serial = open.serial;
        let asked = shared.backplane.as_ref().is_some_and(|bp| {
            bp.request_page(crate::backplane::PageRequest {
                user: user.clone(),
                before,
                limit,
                core: self.id,
                key,
                serial,
                ack: Some(ack),
            })
        });
        if !asked {
            self.answer(key, Some(ack), |a| {
                protocol::encode_error(a, ErrorCode::Internal.as_str(), "history unavailable")
            });
        }
    }

    /// Delivers the handler's dispatches here and hands them to every other core (and to
    /// Redis, where `waiter` waits for them).
    fn flush_outbox(&mut self, waiter: Option<&Arc<AckWaiter>>) {
        let outbox = std::mem::take(&mut self.outbox);
        for dispatch in &outbox {
            add(&self.metrics().dispatches, 1);
            if self.shared.config.history_active() {
                self.dispatch_with_history(dispatch, waiter);
                continue;
            }
            self.deliver_local(dispatch);
            for core in (0..self.shared.bus.cores()).filter(|&c| c != self.id) {
                if self
                    .shared
                    .bus
                    .push(core, CoreMsg::Dispatch(Arc::clone(dispatch)))
                {
                    self.wake_cores[core] = true;
                } else {
                    add(&self.metrics().inbox_drops, 1);
                }
            }
            // Other instances last: local delivery never waits for Redis.
            if let Some(bp) = &self.shared.backplane {
                bp.publish(dispatch, waiter);
            }
        }
        self.outbox = outbox;
        self.outbox.clear();
    }

    /// History on: every device, local ones included, gets the event with its offset, after
    /// the offset is assigned (by Redis, or by the embedded store).
    fn dispatch_with_history(&mut self, dispatch: &Arc<Dispatch>, waiter: Option<&Arc<AckWaiter>>) {
        let shared = Arc::clone(&self.shared);
        if let Some(bp) = &shared.backplane {
            bp.publish(dispatch, waiter);
            return;
        }
        if let Some(store) = &shared.history {
            self.append_embedded(store, dispatch);
        }
    }

    /// Embedded history: appends `dispatch` for each of its users and hands each delivery to
    /// every core, this one included (so this core, too, sees a user's frames in offset order).
    fn append_embedded(
        &mut self,
        store: &history::MemoryHistory,
        dispatch: &Dispatch,
    ) -> Vec<(crate::UserId, Offset)> {
        let now = crate::handlers::now_ms();
        let mut drops = 0;
        let mut offsets = Vec::with_capacity(dispatch.users.len());
        for user in dispatch.users.iter() {
            let dedupe = dispatch.dedupe.as_deref();
            store.append(user, dispatch.frame.as_str(), dedupe, now, |delivery| {
                offsets.push((user.clone(), delivery.offset));
                let delivery = Arc::new(delivery);
                for core in 0..self.shared.bus.cores() {
                    if !self
                        .shared
                        .bus
                        .push(core, CoreMsg::Delivered(Arc::clone(&delivery)))
                    {
                        drops += 1;
                    }
                }
            });
        }
        add(&self.metrics().inbox_drops, drops);
        for (core, wake) in self.wake_cores.iter_mut().enumerate() {
            *wake |= core != self.id;
        }
        self.drain_self = true;
        offsets
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
            CoreMsg::ResyncUser(user) => self.resync_user(&user),
        });
    }

    /// After a backplane outage, replays to each open connection what its user was sent since
    /// the last offset the connection received (events published while this instance was not
    /// subscribed are in history but reached none of its devices). The seam logic drops what
    /// a connection already has; the connection gets `recovered` at the end, as after a resume.
    fn resync_all(&mut self) {
        let keys: Vec<(usize, Offset)> = self
            .conns
            .iter_mut()
            .filter_map(|(key, conn)| match conn {
                Connection::Open(o) if o.closing.is_none() => match o.recovering.as_mut() {
                    Some(rec) => {
                        rec.again = true;
                        None
                    }
                    None => o.last_offset.map(|offset| (key, offset)),
                },
                _ => None,
            })
            .collect();
        log::debug!("core={} resync: {} connections resume", self.id, keys.len());
        for (key, offset) in keys {
            self.begin_recovery(key, Some(offset));
        }
    }

    /// Queues a frame with an offset on every local connection of its user, skipping those that
    /// already have it; recovering connections hold it until their replay is in.
    fn deliver_offset(&mut self, d: &Delivery) {
        let keys: SmallVec<[usize; 8]> = SmallVec::from_slice(self.users.get(&d.user));
        for key in keys {
            self.offer(key, d.offset, &d.frame, &d.sio);
        }
    }

    /// Queues a frame with an offset on one connection unless it already has it; a recovering
    /// connection holds it until its replay is in.
    fn offer(&mut self, key: usize, offset: Offset, frame: &Utf8Bytes, cache: &FrameCache) {
        let Some(Connection::Open(open)) = self.conns.get_mut(key) else {
            return;
        };
        if let Some(rec) = open.recovering.as_mut() {
            if rec.buffered.len() < history::RECOVERY_BUFFER {
                rec.buffered.push((offset, frame.clone()));
            } else {
                rec.overflow = true;
            }
            return;
        }
        if open.last_offset.is_some_and(|last| offset <= last) {
            return;
        }
        open.last_offset = Some(offset);
        self.send_shared(key, frame, Some(cache));
    }

    /// A room event: every local connection of the listed members gets the one shared frame.
    fn deliver_room(&mut self, d: &RoomDelivery) {
        for member in d.members.iter() {
            let keys: SmallVec<[usize; 8]> = SmallVec::from_slice(self.users.get(member));
            for key in keys {
                match d.offset {
                    Some(offset) => self.offer(key, offset, &d.frame, &d.sio),
                    None => self.send_shared(key, &d.frame, Some(&d.sio)),
                }
            }
        }
    }

    /// This instance began routing a room the user joined only after Redis confirmed its
    /// channel: the user's connections resume from their last offset to catch what came
    /// between (those without an offset yet have nothing to resume from).
    fn resync_user(&mut self, user: &str) {
        let keys: SmallVec<[usize; 8]> = SmallVec::from_slice(self.users.get(user));
        for key in keys {
            let last = match self.conns.get(key) {
                Some(Connection::Open(o)) if o.closing.is_none() && o.recovering.is_none() => {
                    o.last_offset
                }
                _ => None,
            };
            if let Some(offset) = last {
                self.begin_recovery(key, Some(offset));
            }
        }
    }

    /// `?since=` (or a `resume` event): hold live frames and ask for what was missed. `since`
    /// is `None` when the client's offset did not parse: it gets `complete: false`.
    fn begin_recovery(&mut self, key: usize, since: Option<Offset>) {
        let shared = Arc::clone(&self.shared);
        let Some(Connection::Open(open)) = self.conns.get_mut(key) else {
            return;
        };
        if !shared.config.history_active() || open.recovering.is_some() {
            return;
        }
        let serial = open.serial;
        let user = open.user.clone();
        open.recovering = Some(Box::new(Recovering {
            since,
            buffered: Vec::new(),
            overflow: false,
            deadline: Instant::now() + history::RECOVERY_TIMEOUT,
            again: false,
        }));
        if let Some(store) = &shared.history {
            // Embedded: the store answers at once. Deliveries already in this core's inbox are
            // in the replay too; the high-water mark drops them when they are drained.
            let replay = store.replay(&user, since, crate::handlers::now_ms());
            self.on_replay(ReplayResult {
                key,
                serial,
                replay,
            });
        } else if let Some(bp) = &shared.backplane {
            match since {
                Some(since) => bp.request_replay(crate::backplane::ReplayRequest {
                    user,
                    since,
                    core: self.id,
                    key,
                    serial,
                    deadline: Instant::now() + history::RECOVERY_TIMEOUT,
                }),
                None => self.on_replay(ReplayResult {
                    key,
                    serial,
                    replay: history::Replay::default(),
                }),
            }
        }
    }

    /// Sends the replay, then what arrived live meanwhile, then `recovered`.
    fn on_replay(&mut self, result: ReplayResult) {
        let Some(Connection::Open(open)) = self.conns.get_mut(result.key) else {
            return;
        };
        if open.serial != result.serial {
            return;
        }
        let Some(rec) = open.recovering.take() else {
            return;
        };
        let complete = result.replay.complete && !rec.overflow;
        let again = rec.again;
        let (frames, last) = history::finish_recovery(*rec, result.replay, open.last_offset);
        open.last_offset = last;
        let m = &self.shared.metrics[self.id];
        if complete {
            add(&m.recoveries_complete, 1);
        } else {
            add(&m.recoveries_incomplete, 1);
        }
        for frame in frames {
            self.send(result.key, frame);
        }
        if again && last.is_some() {
            self.begin_recovery(result.key, last);
        }
    }

    /// Queues the dispatch's frame on every local connection of its users.
    fn deliver_local(&mut self, dispatch: &Dispatch) {
        for user in dispatch.users.iter() {
            let keys: SmallVec<[usize; 8]> = SmallVec::from_slice(self.users.get(user));
            for key in keys {
                self.send_shared(key, &dispatch.frame, Some(&dispatch.sio));
            }
        }
    }

    /// Queues an event (a native frame) for one connection: as it is, or wrapped for each
    /// namespace a Socket.IO connection joined.
    fn send(&mut self, key: usize, frame: Utf8Bytes) {
        self.send_shared(key, &frame, None);
    }

    /// Like [`Self::send`] for a frame many connections get: the Socket.IO wrapping comes from
    /// `cache`, so it is built once per dispatch and namespace, not per connection.
    fn send_shared(&mut self, key: usize, frame: &Utf8Bytes, cache: Option<&FrameCache>) {
        let Some(Connection::Open(open)) = self.conns.get(key) else {
            return;
        };
        let Some(session) = &open.sio else {
            return self.write_text(key, frame.clone());
        };
        for ns in session.namespaces.iter() {
            let wrapped = match cache {
                Some(cache) => cache.get(ns, frame),
                None => socketio::event(ns, frame.as_str()),
            };
            self.write_text(key, wrapped);
        }
    }

    /// Sends the answer to a client request. `native(ack)` builds the native answer frame; a
    /// Socket.IO connection gets it without `ack`, in an ACK packet for its ack id, or (no ack
    /// id) as a `message` event on the namespace the request came from.
    fn answer(
        &mut self,
        key: usize,
        ack: Option<u64>,
        native: impl FnOnce(Option<u64>) -> Utf8Bytes,
    ) {
        let Some(Connection::Open(open)) = self.conns.get(key) else {
            return;
        };
        let frame = match (&open.sio, ack) {
            (None, ack) => native(ack),
            (Some(_), Some(tag)) => {
                let (ns, id) = socketio::untag_ack(tag);
                socketio::ack(ns, id, native(None).as_str())
            }
            (Some(session), None) => socketio::event(session.reply_to, native(None).as_str()),
        };
        self.write_text(key, frame);
    }

    /// Queues a text frame for the end-of-turn flush. A connection over its outbound bound is
    /// closed as a slow consumer.
    fn write_text(&mut self, key: usize, frame: Utf8Bytes) {
        let Some(Connection::Open(open)) = self.conns.get_mut(key) else {
            return;
        };
        if open.closing.is_some() {
            return;
        }
        match open.ws.write(Message::Text(frame)) {
            Ok(()) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(tungstenite::Error::WriteBufferFull(_)) => {
                self.close(key, CloseReason::SlowConsumer);
                return;
            }
            Err(_) => {
                self.remove(key, Closed::Reset);
                return;
            }
        }
        add(&self.metrics().frames_out, 1);
        self.mark_dirty(key);
    }

    fn mark_dirty(&mut self, key: usize) {
        if let Some(Connection::Open(open)) = self.conns.get_mut(key) {
            if !open.dirty {
                open.dirty = true;
                self.dirty.push(key);
            }
        }
    }

    /// Flushes every connection that got output this turn: one write burst per connection.
    fn flush_dirty(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        let mut bytes = 0;
        for &key in &dirty {
            let Some(Connection::Open(open)) = self.conns.get_mut(key) else {
                continue;
            };
            open.dirty = false;
            let result = open.ws.flush();
            bytes += open.ws.get_mut().take_written();
            match result {
                Ok(()) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(tungstenite::Error::ConnectionClosed) => self.remove(key, Closed::ClientClose),
                Err(_) => self.remove(key, Closed::Reset),
            }
        }
        add(&self.metrics().bytes_out, bytes);
        dirty.clear();
        // Keep the allocation; anything added while flushing (none today) would be kept too.
        dirty.append(&mut self.dirty);
        self.dirty = dirty;
    }

    /// Starts a server-initiated close: the close frame is queued, the user unindexed, and the
    /// connection dropped when the client answers or the grace period ends.
    fn close(&mut self, key: usize, reason: CloseReason) {
        self.unindex(key);
        let grace = self
            .shutdown_deadline
            .unwrap_or_else(|| Instant::now() + CLOSE_GRACE);
        let Some(Connection::Open(open)) = self.conns.get_mut(key) else {
            return;
        };
        if open.closing.is_some() {
            return;
        }
        open.closing = Some(grace);
        open.ended = Some(Closed::Server(reason));
        if reason == CloseReason::SlowConsumer {
            // The buffer is full by definition; make room for the close frame alone.
            open.ws.set_config(|c| c.max_write_buffer_size += 256);
        }
        log::debug!("core={} conn={key} closing: {}", self.id, reason.text());
        match open.ws.close(Some(reason.frame())) {
            Ok(()) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => {}
        }
        self.mark_dirty(key);
    }

    /// Lists the connection under `user` in this core's index (the caller marked it indexed).
    fn index(&mut self, key: usize, user: &crate::UserId) {
        if self.users.insert(user, key) {
            if let Some(bp) = &self.shared.backplane {
                bp.user_joined(user, self.id);
            }
        }
    }

    fn unindex(&mut self, key: usize) {
        let Some(Connection::Open(open)) = self.conns.get_mut(key) else {
            return;
        };
        if open.indexed {
            open.indexed = false;
            if self.users.remove(&open.user, key) {
                if let Some(bp) = &self.shared.backplane {
                    bp.user_left(&open.user, self.id);
                }
            }
            if std::mem::replace(&mut open.counted, Counted::No) == Counted::Yes {
                let user = open.user.clone();
                self.uncount_device(&user);
            }
        }
    }

    /// Drops a connection now, whatever its state.
    fn remove(&mut self, key: usize, why: Closed) {
        self.unindex(key);
        let Some(mut conn) = self.conns.try_remove(key) else {
            return;
        };
        let _ = self.poll.registry().deregister(conn.tcp());
        if let Connection::Open(open) = &mut conn {
            let why = open.ended.unwrap_or(why);
            self.metrics().closed(why);
            self.open -= 1;
            self.shared.open_connections.fetch_sub(1, Ordering::SeqCst);
            add(&self.metrics().bytes_out, open.ws.get_mut().take_written());
            log::debug!(
                "core={} conn={key} user={} removed ({why:?})",
                self.id,
                open.user
            );
        }
    }

    // ---- time ------------------------------------------------------------------------------

    fn sweep(&mut self, now: Instant) {
        if self.accept_paused_until.is_some_and(|t| now >= t) {
            self.accept_paused_until = None;
            self.accept();
        }
        let idle_timeout = self.shared.config.idle_timeout();
        let ping_interval = self.shared.config.ping_interval;
        let mut expired: Vec<(usize, Closed)> = Vec::new();
        let mut silent = Vec::new();
        let mut pings = Vec::new();
        let mut stalled = Vec::new();
        let mut waited_out = Vec::new();
        let mut unconnected = Vec::new();
        for (key, conn) in self.conns.iter_mut() {
            if let Connection::Open(o) = conn {
                if o.recovering.as_ref().is_some_and(|r| now >= r.deadline) {
                    stalled.push((key, o.serial));
                }
                let connect_by = o.sio.as_ref().and_then(|s| s.connect_by);
                if o.closing.is_none() && connect_by.is_some_and(|t| now >= t) {
                    unconnected.push(key);
                }
            }
            match conn {
                Connection::Request(r) if now >= r.deadline => {
                    expired.push((key, Closed::Reset));
                }
                Connection::Reply(r) if now >= r.deadline => expired.push((key, Closed::Reset)),
                Connection::Body(b) if now >= b.deadline => expired.push((key, Closed::Reset)),
                Connection::Waiting(w) if now >= w.deadline => waited_out.push(key),
                Connection::Open(o) => match o.closing {
                    Some(deadline) if now >= deadline => expired.push((key, Closed::Reset)),
                    Some(_) => {}
                    None if now.duration_since(o.last_heard) >= idle_timeout => silent.push(key),
                    None if now >= o.next_ping => {
                        o.next_ping = now + ping_interval;
                        pings.push(key);
                    }
                    None => {}
                },
                _ => {}
            }
        }
        for (key, why) in expired {
            if matches!(self.conns.get(key), Some(Connection::Request(_))) {
                add(&self.metrics().handshake_failures, 1);
            }
            self.remove(key, why);
        }
        for key in silent {
            self.close(key, CloseReason::HeartbeatTimeout);
        }
        for key in unconnected {
            self.close(key, CloseReason::ConnectTimeout);
        }
        for key in waited_out {
            self.reply(
                key,
                api::json_error(503, "redis did not answer in time"),
                &[],
            );
        }
        for (key, serial) in stalled {
            // No answer (Redis down?): the client refetches; what was buffered still goes out.
            log::warn!("core={} conn={key} replay timed out", self.id);
            self.on_replay(ReplayResult {
                key,
                serial,
                replay: history::Replay::default(),
            });
        }
        for key in pings {
            if let Some(Connection::Open(open)) = self.conns.get_mut(key) {
                // Socket.IO clients time out on Engine.IO pings, not WebSocket ones.
                let ping = match open.sio {
                    Some(_) => Message::Text(Utf8Bytes::from_static(socketio::PING)),
                    None => Message::Ping(Default::default()),
                };
                if open.ws.write(ping).is_ok() {
                    add(&self.metrics().frames_out, 1);
                }
                self.mark_dirty(key);
            }
        }
    }

    fn begin_shutdown(&mut self) {
        self.shutdown_deadline = Some(Instant::now() + self.shared.config.shutdown_timeout);
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            match self.conns.get(key) {
                Some(Connection::Open(_)) => self.close(key, CloseReason::Shutdown),
                Some(_) => self.remove(key, Closed::Server(CloseReason::Shutdown)),
                None => {}
            }
        }
        log::info!(
            "core={} shutting down: {} connections closing",
            self.id,
            self.conns.len()
        );
    }
}

fn is_fd_exhaustion(e: &io::Error) -> bool {
    // EMFILE (24) and ENFILE (23): out of file descriptors, per process or system-wide.
    matches!(e.raw_os_error(), Some(23) | Some(24))
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
