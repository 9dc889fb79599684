//! HTTP before the upgrade: reading the request head, routing it, the WebSocket upgrade, and
//! writing a plain HTTP reply.

use std::io::{self, Read};
use std::sync::atomic::Ordering;
use std::time::Instant;

use mio::{Interest, Token};
use tungstenite::protocol::Role;
use tungstenite::WebSocket;

use super::{CoreLoop, REPLY_GRACE};
use crate::api;
use crate::connection::{Connection, Counted, Open, Reply, Stream};
use crate::http::{self, Parse, Request, RequestError};
use crate::metrics::{add, Closed};
use crate::socketio;

impl CoreLoop {
    pub(super) fn read_request(&mut self, key: usize) {
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

    pub(super) fn route(&mut self, key: usize, req: Request, rest: Vec<u8>) {
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
            "/api/publish" => self.api_publish_head(key, req, rest),
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
    pub(super) fn upgrade(&mut self, key: usize, req: Request, rest: Vec<u8>, socketio: bool) {
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

    /// Switches the connection to writing `response`, then closing.
    pub(super) fn reply(&mut self, key: usize, response: Vec<u8>, _rest: &[u8]) {
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

    pub(super) fn progress_reply(&mut self, key: usize) {
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
}
