//! HTTP before the upgrade: reading the request head, routing it, the WebSocket upgrade, and
//! writing a plain HTTP reply.

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::{CoreLoop, REPLY_GRACE};
use crate::api;
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
                let response = http::error_response(431, "request header fields too large");
                self.reply(key, response, &[]);
            }
            HeadOutcome::Invalid(e) => {
                add(&self.metrics().handshake_failures, 1);
                let status = HeadOutcome::status(&e);
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
        if !pending.write_upgrade(ws_key) {
            self.shared.open_connections.fetch_sub(1, Ordering::SeqCst);
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
        let upgraded = self.conns.replace(key, |conn| {
            let Connection::Request(pending) = conn else {
                return conn;
            };
            let ws = pending.into_websocket(rest, ws_config);
            let open = Open::new(ws, user.clone(), now, ping_interval, serial, burst, session);
            Connection::Open(open)
        });
        if !upgraded {
            return;
        }
        self.next_serial += 1;
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

    /// Switches the connection to writing `response`, then closing.
    pub(super) fn reply(&mut self, key: usize, response: Vec<u8>, _rest: &[u8]) {
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
