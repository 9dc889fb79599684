//! Ending connections and time: the server-initiated close, removal, the periodic sweep of
//! deadlines (handshake, ping, silence, close, waits, replays) and shutdown.

use std::io;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tungstenite::{Message, Utf8Bytes};

use super::{CoreLoop, CLOSE_GRACE};
use crate::api;
use crate::bus::ReplayResult;
use crate::connection::{Connection, Counted};
use crate::history;
use crate::metrics::{add, Closed};
use crate::protocol::CloseReason;
use crate::socketio;

impl CoreLoop {
    /// Starts a server-initiated close: the close frame is queued, the user unindexed, and the
    /// connection dropped when the client answers or the grace period ends.
    pub(super) fn close(&mut self, key: usize, reason: CloseReason) {
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

    pub(super) fn unindex(&mut self, key: usize) {
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
    pub(super) fn remove(&mut self, key: usize, why: Closed) {
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

    pub(super) fn sweep(&mut self, now: Instant) {
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

    pub(super) fn begin_shutdown(&mut self) {
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
