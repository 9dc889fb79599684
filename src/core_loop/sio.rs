//! The Socket.IO side of a core loop: the `/socket.io/` upgrade, Engine.IO packets, CONNECT
//! (authentication, then the user index), events into the handlers the native endpoint uses,
//! DISCONNECT. The wire format itself is `crate::socketio`.
//!
//! A Socket.IO connection is an `Open` connection with a `Session`: everything behind the
//! handlers (dispatch, backplane, history, heartbeat deadlines, slow-consumer bound) is shared.

use std::time::Instant;

use tungstenite::Utf8Bytes;

use super::CoreLoop;
use crate::access::Access;
use crate::auth::Identity;
use crate::handlers::Args;
use crate::http::{self, Request};
use crate::metrics::add;
use crate::protocol::{self, CloseReason, ErrorCode};
use crate::socketio::{self, ConnectRooms, EnginePacket, Namespace, PacketType, Session};

impl CoreLoop {
    /// `/socket.io/`: only `EIO=4&transport=websocket` is served; anything else (the polling
    /// transport first of all) gets a 400 with a JSON body saying so.
    pub(super) fn sio_route(&mut self, key: usize, req: Request, rest: Vec<u8>) {
        let checked = socketio::check_query(
            req.query_param("EIO").as_deref(),
            req.query_param("transport").as_deref(),
            req.query_param("sid").as_deref(),
        );
        if let Err(body) = checked {
            add(&self.metrics().handshake_failures, 1);
            let response = http::response(400, "application/json", "", &body);
            return self.reply(key, response, &rest);
        }
        if req.method != "GET" {
            return self.reply(key, http::error_response(405, "method not allowed"), &rest);
        }
        self.upgrade(key, req, rest, true);
    }

    /// Right after the 101: the Engine.IO open packet, with the heartbeat the sweep keeps.
    pub(super) fn sio_open(&mut self, key: usize) {
        let Some(open) = self.conns.get_open(key) else {
            return;
        };
        let config = &self.shared.config;
        let sid = socketio::engine_sid(self.shared.node_id, self.id, open.serial);
        let packet = socketio::open_packet(
            &sid,
            config.ping_interval.as_millis(),
            config.ping_timeout.as_millis(),
            config.max_message_bytes,
        );
        self.write_text(key, Utf8Bytes::from(packet));
    }

    fn session(&mut self, key: usize) -> Option<&mut Session> {
        self.conns.get_open_mut(key)?.sio.as_deref_mut()
    }

    /// A binary frame on a Socket.IO connection is dropped while it is an attachment of a
    /// refused binary packet; `false` otherwise (the caller closes with 1003).
    pub(super) fn sio_skip_binary(&mut self, key: usize) -> bool {
        match self.session(key) {
            Some(s) if s.skip_binary > 0 => {
                s.skip_binary -= 1;
                true
            }
            _ => false,
        }
    }

    /// One Engine.IO packet from the client.
    pub(super) fn sio_text(&mut self, key: usize, text: Utf8Bytes) {
        match socketio::parse_engine(text.as_str()) {
            // Any frame already counted as a sign of life.
            Ok(EnginePacket::Pong | EnginePacket::Noop) => {}
            Ok(EnginePacket::Ping(data)) => {
                self.write_text(key, Utf8Bytes::from(socketio::pong(data)));
            }
            Ok(EnginePacket::Close) => self.close(key, CloseReason::ClientEnded),
            Ok(EnginePacket::Message(packet)) => self.sio_packet(key, packet),
            Err(e) => self.sio_refuse(key, &e),
        }
    }

    /// The client broke the framing: there is no answering it in the same framing.
    fn sio_refuse(&mut self, key: usize, why: &dyn std::fmt::Display) {
        log::debug!("core={} conn={key} socket.io: {why}", self.id);
        self.close(key, CloseReason::BadPacket);
    }

    fn sio_packet(&mut self, key: usize, text: &str) {
        let packet = match socketio::parse_packet(text) {
            Ok(p) => p,
            Err(e) => return self.sio_refuse(key, &e),
        };
        let ns = Namespace::from_name(packet.nsp);
        // A second CONNECT while one waits for the connect hook breaks the protocol like a
        // CONNECT for a namespace already joined.
        let (joined, connecting) = match (ns, self.session(key)) {
            (Some(ns), Some(s)) => (s.namespaces.contains(ns), s.connecting.contains(ns)),
            _ => (false, false),
        };
        match (packet.kind, ns) {
            (PacketType::Connect, _) if !joined && !connecting => {
                self.sio_connect(key, packet.nsp, packet.data)
            }
            (PacketType::Event, Some(ns)) if joined => {
                self.sio_event(key, ns, packet.id, packet.data)
            }
            (PacketType::Disconnect, Some(ns)) if joined => self.sio_leave(key, ns),
            // A DISCONNECT crossing the server's CONNECT_ERROR: nothing to leave. (It must not
            // restart the connect deadline, or an idle unauthenticated client could keep it.)
            (PacketType::Disconnect, _) => {}
            (PacketType::BinaryEvent | PacketType::BinaryAck, Some(ns)) if joined => {
                // Refused as a CONNECT_ERROR, which socket.io-client reports as `connect_error`
                // with this message and does not retry; its attachments are skipped.
                if let Some(s) = self.session(key) {
                    s.skip_binary = packet.attachments;
                }
                self.sio_leave(key, ns);
                let refusal = socketio::connect_error(
                    packet.nsp,
                    "binary packets are not supported: send JSON",
                );
                self.write_text(key, Utf8Bytes::from(refusal));
            }
            // The server never asks for an ack, so a client ACK answers nothing.
            (PacketType::Ack, _) if joined => {}
            (kind, _) => {
                let why = format!("{kind:?} for namespace {:?} in this state", packet.nsp);
                self.sio_refuse(key, &why);
            }
        }
    }

    /// CONNECT: the payload's token (else the upgrade request's) is checked like the native
    /// endpoint's, then the connect hook asked when there is one; the first namespace joined
    /// puts the connection in the user index.
    fn sio_connect(&mut self, key: usize, nsp: &str, data: Option<&serde_json::value::RawValue>) {
        if Namespace::from_name(nsp).is_none() {
            return self.sio_refuse_connect(key, nsp, "Invalid namespace");
        }
        let auth = match socketio::connect_auth(data) {
            Ok(auth) => auth,
            Err(message) => return self.sio_refuse_connect(key, nsp, message),
        };
        let Some(open) = self.conns.get_open(key) else {
            return;
        };
        let Some(session) = &open.sio else {
            return;
        };
        let token = auth
            .token
            .or_else(|| session.request_token.as_deref().map(str::to_string));
        let identity = match self.shared.auth.identify(token.as_deref()) {
            Ok(identity) => identity,
            Err(e) => {
                add(&self.metrics().auth_failures, 1);
                return self.sio_refuse_connect(key, nsp, &e.to_string());
            }
        };
        if open.indexed && open.user != identity.user {
            let message = "this connection is already connected as another user";
            return self.sio_refuse_connect(key, nsp, message);
        }
        let first = !open.indexed;
        if first && !self.connect_rate_user_allows(&identity.user) {
            let message = "too many connections for this user: retry later";
            return self.sio_refuse_connect(key, nsp, message);
        }
        let resume = (auth.since, auth.rooms);
        if let Err(unasked) = self.ask_sio_connect_hook(key, nsp, resume, identity) {
            let ((since, rooms), identity) = *unasked;
            self.sio_connected(key, nsp, since, rooms, identity);
        }
    }

    /// A CONNECT refused with CONNECT_ERROR and `message`.
    pub(super) fn sio_refuse_connect(&mut self, key: usize, nsp: &str, message: &str) {
        let refusal = socketio::connect_error(nsp, message);
        self.write_text(key, Utf8Bytes::from(refusal));
    }

    /// A CONNECT accepted: the namespace is joined; the first one indexes the user, takes the
    /// session's expiry and rooms, and starts the resume from `since`.
    pub(super) fn sio_connected(
        &mut self,
        key: usize,
        nsp: &str,
        since: Option<String>,
        rooms: Option<ConnectRooms>,
        identity: Identity,
    ) {
        let Some(ns) = Namespace::from_name(nsp) else {
            return;
        };
        let leeway = self.shared.auth.leeway_secs();
        let Some(open) = self.conns.get_open_mut(key) else {
            return;
        };
        if open.indexed && open.user != identity.user {
            let message = "this connection is already connected as another user";
            return self.sio_refuse_connect(key, nsp, message);
        }
        let first = !open.indexed;
        let sid = socketio::engine_sid(self.shared.node_id, self.id, open.serial);
        let needs_slot = open.sio.as_ref().is_some_and(|session| !session.holds_slot);
        let user = identity.user;
        if needs_slot {
            if !self.take_connection_slot() {
                return self.sio_refuse_connect(key, nsp, "server at max_connections");
            }
            if let Some(session) = self.session(key) {
                session.holds_slot = true;
            }
            self.end_handshake(key);
        }
        if first {
            if let Some(open) = self.conns.get_open_mut(key) {
                open.user = user.clone();
                open.indexed = true;
                open.access = Access::new(identity.exp, leeway, identity.grant);
            }
            self.index(key, &user);
        }
        // Counted for presence and the device limit like a native connection (once, at its
        // first namespace; leaving the last one unindexes and uncounts it).
        if first && !self.count_device(key, &user) {
            return;
        }
        let Some(session) = self.session(key) else {
            return;
        };
        session.namespaces.insert(ns);
        session.connect_by = None;
        let (since, rooms_query) = if first {
            let since = since.or_else(|| session.since.take().map(String::from));
            (since, session.rooms.take())
        } else {
            (None, None)
        };
        self.write_text(key, Utf8Bytes::from(socketio::connect_ok(ns, &sid)));
        log::debug!("core={} conn={key} user={user} joined {nsp}", self.id);
        if let Some(since) = since {
            self.begin_recovery(key, since.parse().ok());
        }
        let c = &self.shared.config.rooms;
        let (max_name, max_rooms) = (c.max_room_name_bytes, c.max_rooms_per_user);
        let rooms = match (rooms.filter(|_| first), rooms_query) {
            (Some(map), _) => {
                let pairs = map.iter().map(|(r, o)| (r.as_str(), o.as_str()));
                crate::rooms::rooms_from_map(pairs, max_name, max_rooms)
            }
            (None, Some(query)) => crate::rooms::parse_rooms_query(&query, max_name, max_rooms),
            (None, None) => Vec::new(),
        };
        self.resume_rooms(key, rooms);
    }

    /// Leaves `ns`; with no namespace left the connection leaves the user index and must
    /// CONNECT again within the handshake timeout.
    fn sio_leave(&mut self, key: usize, ns: Namespace) {
        let timeout = self.shared.config.handshake_timeout;
        let Some(session) = self.session(key) else {
            return;
        };
        session.namespaces.remove(ns);
        if session.namespaces.is_empty() {
            session.connect_by = Some(Instant::now() + timeout);
            self.unindex(key);
        }
    }

    /// EVENT `["message", {"event": ..., "args": ...}]`: the native handler path, with the
    /// Socket.IO ack id (tagged with its namespace) as the ack.
    fn sio_event(
        &mut self,
        key: usize,
        ns: Namespace,
        id: Option<u64>,
        data: Option<&serde_json::value::RawValue>,
    ) {
        if let Some(s) = self.session(key) {
            s.reply_to = ns;
        }
        let ack = id.map(|id| socketio::tag_ack(ns, id));
        let parsed = socketio::event_message(data)
            .map_err(|reason| (ErrorCode::BadEnvelope, reason.to_string()))
            .and_then(|message| {
                protocol::parse_envelope(message.get()).map_err(|e| (e.code, e.message))
            });
        match parsed {
            Ok(env) => self.on_envelope(key, &env.event, Args::new(env.args), ack),
            Err((code, message)) => {
                add(&self.metrics().client_errors, 1);
                self.answer(key, ack, |a| {
                    protocol::encode_error(a, code.as_str(), &message)
                });
            }
        }
    }
}

/// The ack a rate-limited Socket.IO frame asked for, if any (tagged like `sio_event`'s).
pub(super) fn request_ack(text: &str) -> Option<u64> {
    let EnginePacket::Message(m) = socketio::parse_engine(text).ok()? else {
        return None;
    };
    let p = socketio::parse_packet(m).ok()?;
    let ns = Namespace::from_name(p.nsp)?;
    (p.kind == PacketType::Event).then_some(())?;
    p.id.map(|id| socketio::tag_ack(ns, id))
}
