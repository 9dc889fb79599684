//! Ending connections and time: the server-initiated close, removal, the periodic sweep of
//! deadlines (handshake, ping, silence, session expiry, close, waits, replays) and shutdown.

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::{CoreLoop, CLOSE_GRACE};
use crate::api;
use crate::bus::ReplayResult;
use crate::connection::{Connection, TickOutcome};
use crate::history;
use crate::metrics::{add, Closed};
use crate::protocol::CloseReason;

impl CoreLoop {
    /// Starts a server-initiated close: the close frame is queued, the user unindexed, and the
    /// connection dropped when the client answers or the grace period ends.
    pub(super) fn close(&mut self, key: usize, reason: CloseReason) {
        self.unindex(key);
        let grace = self
            .shutdown_deadline
            .unwrap_or_else(|| Instant::now() + CLOSE_GRACE);
        let Some(open) = self.conns.get_open_mut(key) else {
            return;
        };
        if !open.begin_close(reason, grace) {
            return;
        }
        log::debug!("core={} conn={key} closing: {}", self.id, reason.text());
        self.mark_dirty(key);
    }

    /// Takes the connection out of the user index (and its user's presence count).
    pub(super) fn unindex(&mut self, key: usize) {
        let Some(ended) = self.conns.unindex(key) else {
            return;
        };
        if ended.last {
            if let Some(bp) = &self.shared.backplane {
                bp.user_left(&ended.user, self.id);
            }
        }
        if ended.counted {
            self.uncount_device(&ended.user, key, ended.serial);
        }
    }

    /// Drops a connection now, whatever its state.
    pub(super) fn remove(&mut self, key: usize, why: Closed) {
        self.unindex(key);
        if !self.cors.is_empty() {
            self.cors.remove(&key);
        }
        self.end_handshake(key);
        let Some(mut conn) = self.conns.remove(key) else {
            return;
        };
        let _ = self.poll.registry().deregister(conn.tcp());
        if let Connection::Open(open) = &mut conn {
            let why = open.ended.unwrap_or(why);
            self.metrics().closed(why);
            self.open -= 1;
            self.outbound = self.outbound.saturating_sub(open.outbound);
            // A Socket.IO connection takes its slot at its first CONNECT (`sio.rs`).
            if open.sio.as_ref().is_none_or(|s| s.holds_slot) {
                self.shared.open_connections.fetch_sub(1, Ordering::SeqCst);
            }
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
        let mut sessions_over = Vec::new();
        let now_ms = crate::types::now_ms();
        for (key, conn) in self.conns.iter_mut() {
            if let Connection::Open(o) = conn {
                let over = o.access.as_ref().is_some_and(|a| a.expired(now_ms));
                if over && o.closing.is_none() {
                    sessions_over.push(key);
                }
                if let Some(serial) = o.replay_overdue(now) {
                    stalled.push((key, serial, None));
                }
                for room in o.room_replays_overdue(now) {
                    stalled.push((key, o.serial, Some(room)));
                }
                if o.connect_overdue(now) {
                    unconnected.push(key);
                }
            }
            match conn.tick(now, idle_timeout, ping_interval) {
                TickOutcome::Idle => {}
                TickOutcome::Expired => expired.push((key, Closed::Reset)),
                TickOutcome::Silent => silent.push(key),
                TickOutcome::PingDue => pings.push(key),
                TickOutcome::WaitedOut => waited_out.push(key),
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
        for key in sessions_over {
            self.close(key, CloseReason::SessionExpired);
        }
        for key in waited_out {
            self.reply(
                key,
                api::json_error(503, "no answer in time (redis, or the connect hook)"),
                &[],
            );
        }
        for (key, serial, room) in stalled {
            // No answer (Redis down?): the client refetches; what was buffered still goes out.
            log::warn!("core={} conn={key} replay timed out", self.id);
            self.on_replay(ReplayResult {
                key,
                serial,
                room,
                replay: history::Replay::default(),
            });
        }
        for key in pings {
            if let Some(open) = self.conns.get_open_mut(key) {
                if open.ping() {
                    add(&self.metrics().frames_out, 1);
                }
                self.mark_dirty(key);
            }
        }
    }

    pub(super) fn begin_shutdown(&mut self) {
        self.shutdown_deadline = Some(Instant::now() + self.shared.config.shutdown_timeout);
        self.link_stop = Some(Instant::now() + crate::backplane::core_link::STOP_FLUSH);
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        let keys = self.conns.keys();
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
