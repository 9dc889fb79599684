//! HTTP before the upgrade: reading the request head, routing it, the WebSocket upgrade, and
//! writing a plain HTTP reply.

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::{CoreLoop, REPLY_GRACE};
use crate::connection::{Connection, HeadOutcome, Open, ReplyOutcome};
use crate::http::{self, Request};
use crate::metrics::{add, Closed};
use crate::socketio;

impl CoreLoop {
    /// Reads the request head, then routes it (or refuses it).
    pub(super) fn read_request(&mut self, key: usize) {
        let max = self.shared.config.max_request_header_bytes;
        let Some(Connection::Request(pending)) = self.conns.get_mut(key) else {
            return;
        };
        match pending.read_head(max) {
            HeadOutcome::Incomplete => {}
            HeadOutcome::Complete(request, rest) => self.route(key, request, rest),
            HeadOutcome::TooLarge => {
                add(&self.metrics().handshake_failures, 1);
                self.log_refusal(key, 431, "request header fields too large");
                let response = http::error_response(431, "request header fields too large");
                self.reply(key, response, &[]);
            }
            HeadOutcome::Invalid(e) => {
                add(&self.metrics().handshake_failures, 1);
                let status = HeadOutcome::status(&e);
                self.log_refusal(key, status, &e.to_string());
                self.reply(key, http::error_response(status, &e.to_string()), &[]);
            }
            HeadOutcome::Closed | HeadOutcome::Error(_) => self.remove(key, Closed::Reset),
        }
    }

    pub(super) fn route(&mut self, key: usize, req: Request, rest: Vec<u8>) {
        add(&self.metrics().http_requests, 1);
        if matches!(req.path.as_str(), "/socket.io/" | "/socket.io") {
            return self.sio_route(key, req, rest);
        }
        if req.path.starts_with("/api/") {
            return self.api_route(key, req, rest);
        }
        let page = self.shared.config.chat_page && matches!(req.path.as_str(), "/" | "/index.html");
        let known = page
            || matches!(
                req.path.as_str(),
                "/ws" | "/healthz" | "/readyz" | "/metrics"
            );
        if known && req.method != "GET" {
            let response = http::error_response(405, "method not allowed");
            self.reply(key, response, &rest);
            return;
        }
        match req.path.as_str() {
            "/ws" => self.upgrade(key, req, rest, false),
            "/healthz" => {
                let body = self.shared.render_health();
                self.reply(
                    key,
                    http::response(200, "application/json", "", &body),
                    &rest,
                );
            }
            "/readyz" => {
                let response = self.shared.readyz_response();
                self.reply(key, response, &rest);
            }
            "/" | "/index.html" if page => {
                self.reply(key, crate::web::index_response().to_vec(), &rest);
            }
            // With --metrics-listen, /metrics is served there only.
            "/metrics" if self.shared.config.metrics_listen.is_none() => {
                let response = self.shared.metrics_response();
                self.reply(key, response, &rest);
            }
            _ => self.reply(key, http::error_response(404, "not found"), &rest),
        }
    }

    /// Checks and performs a WebSocket upgrade; `socketio` for `/socket.io/`, whose connections
    /// authenticate later, with each Socket.IO CONNECT (`core_loop/sio.rs`).
    pub(super) fn upgrade(&mut self, key: usize, req: Request, rest: Vec<u8>, socketio: bool) {
        let refuse = |this: &mut Self, status: u16, headers: &str, reason: &str| {
            add(&this.metrics().handshake_failures, 1);
            this.log_refusal(key, status, reason);
            let body = format!("{reason}\n");
            this.reply(
                key,
                http::response(status, "text/plain; charset=utf-8", headers, &body),
                &rest,
            );
        };
        if self.is_draining() {
            return refuse(self, 503, "Retry-After: 1\r\n", "server is draining");
        }
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
        if !req.ws_key.as_deref().is_some_and(http::valid_ws_key) {
            return refuse(self, 400, "", "missing or invalid Sec-WebSocket-Key");
        }
        if !http::origin_allowed(
            &self.shared.config.allowed_origins,
            self.shared.auth.is_dev(),
            &req,
        ) {
            return refuse(self, 403, "", "origin not allowed (--allowed-origins)");
        }
        if !self.connect_rate_ip_allows(key) {
            let body = "too many connections from this address: retry later";
            return refuse(self, 429, "Retry-After: 1\r\n", body);
        }
        let identity = if socketio {
            None
        } else {
            match self.shared.auth.identify(req.token().as_deref()) {
                Ok(identity) => Some(identity),
                Err(e) => {
                    add(&self.metrics().auth_failures, 1);
                    self.log_refusal(key, 401, &e.to_string());
                    self.reply(key, http::error_response(401, &e.to_string()), &rest);
                    return;
                }
            }
        };
        if let Some(identity) = identity {
            if !self.connect_rate_user_allows(&identity.user) {
                let body = "too many connections for this user: retry later";
                return refuse(self, 429, "Retry-After: 1\r\n", body);
            }
            if self.shared.hooks.is_some() {
                // Answered later, in `on_hook`: with 403, or by going on below.
                return self.ask_connect_hook(key, req, rest, identity);
            }
            return self.admit_upgrade(key, req, rest, Some(identity));
        }
        self.admit_upgrade(key, req, rest, None);
    }

    /// The upgrade of a checked, authenticated request (a Socket.IO one authenticates later,
    /// `identity` `None`): the connection slot, the 101, the open connection.
    pub(super) fn admit_upgrade(
        &mut self,
        key: usize,
        req: Request,
        rest: Vec<u8>,
        identity: Option<crate::auth::Identity>,
    ) {
        let socketio = identity.is_none();
        let Some(ws_key) = req.ws_key.as_deref() else {
            return;
        };
        // A Socket.IO connection takes its slot once its CONNECT is authenticated (`sio.rs`):
        // until then it counts only as a handshake in progress (`gate.rs`).
        if !socketio && !self.take_connection_slot() {
            self.log_refusal(key, 503, "server at max_connections");
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
        if !pending.write_upgrade(ws_key) {
            if !socketio {
                self.shared.open_connections.fetch_sub(1, Ordering::SeqCst);
            }
            add(&self.metrics().handshake_failures, 1);
            self.remove(key, Closed::Reset);
            return;
        }
        let now = Instant::now();
        let config = &self.shared.config;
        let session = socketio.then(|| {
            Box::new(socketio::Session::new(
                req.token(),
                req.query_param("since"),
                req.query_param("rooms"),
                now + config.handshake_timeout,
            ))
        });
        let serial = self.next_serial;
        let ws_config = self.shared.ws_config;
        let (ping_interval, burst) = (config.ping_interval, config.rate_limit_burst);
        let user = identity.as_ref().map(|i| i.user.clone());
        let leeway = self.shared.auth.leeway_secs();
        let access = identity.and_then(|i| crate::access::Access::new(i.exp, leeway, i.grant));
        let upgraded = self.conns.replace(key, |conn| {
            let Connection::Request(pending) = conn else {
                return conn;
            };
            let ws = pending.into_websocket(rest, ws_config);
            let mut open = Open::new(ws, user.clone(), now, ping_interval, serial, burst, session);
            open.access = access;
            Connection::Open(open)
        });
        if !upgraded {
            return;
        }
        self.next_serial += 1;
        if !socketio {
            self.end_handshake(key);
        }
        let since = req.query_param("since");
        let rooms = req.query_param("rooms").map(|q| {
            let c = &self.shared.config.rooms;
            crate::rooms::parse_rooms_query(&q, c.max_room_name_bytes, c.max_rooms_per_user)
        });
        if let Some(user) = &user {
            self.index(key, user);
        }
        self.open += 1;
        add(&self.metrics().connections_accepted, 1);
        log::debug!("core={} conn={key} user={user:?} open", self.id);
        if let Some(user) = &user {
            if !self.count_device(key, user) {
                return;
            }
        }
        if socketio {
            self.sio_open(key);
        } else {
            if let Some(since) = since {
                self.begin_recovery(key, since.parse().ok());
            }
            self.resume_rooms(key, rooms.unwrap_or_default());
        }
        // Frames may have arrived with (or right after) the request.
        self.carry.push(key);
    }

    /// Takes one of the process's `--max-connections` slots; `false` (counted) when all are
    /// taken.
    pub(super) fn take_connection_slot(&mut self) -> bool {
        let max = self.shared.config.max_connections;
        if self.shared.open_connections.fetch_add(1, Ordering::SeqCst) >= max {
            self.shared.open_connections.fetch_sub(1, Ordering::SeqCst);
            add(&self.metrics().rejected_over_capacity, 1);
            return false;
        }
        true
    }

    /// Switches the connection to writing `response`, then closing. An `/api` answer to an
    /// allowed origin gets its CORS headers here.
    pub(super) fn reply(&mut self, key: usize, response: Vec<u8>, _rest: &[u8]) {
        // Answered: no longer a handshake in progress (the reply has its own short deadline).
        self.end_handshake(key);
        let response = match self.cors.remove(&key) {
            Some(headers) => http::with_headers(response, &headers),
            None => response,
        };
        let deadline = Instant::now() + REPLY_GRACE;
        let replaced = self
            .conns
            .replace(key, |conn| conn.into_reply(response, deadline));
        if replaced {
            self.progress_reply(key);
        }
    }

    /// Writes the reply on; drops the connection once the client hung up after it.
    pub(super) fn progress_reply(&mut self, key: usize) {
        let Some(Connection::Reply(reply)) = self.conns.get_mut(key) else {
            return;
        };
        match reply.progress() {
            ReplyOutcome::Pending => {}
            ReplyOutcome::Done => self.remove(key, Closed::Reset),
        }
    }
}
