//! What one event-loop thread's received frames mean: fragments reassembled, pings and closes
//! answered, the Socket.IO handshake and heartbeats, and deliveries marked in the ledger.

use super::{Engine, State, MAX_FRAME};
use crate::orchestration::ledger::Mark;
use crate::scenarios::marker::{self, Frame};
use crate::transport::codec;
use crate::transport::sio;
use std::sync::Arc;

impl Engine {
    pub(super) fn on_frame(
        &mut self,
        local: usize,
        fin: bool,
        opcode: u8,
        payload: &[u8],
        now: u64,
    ) {
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
                self.conns[local].ws.queue_pong(payload, &mut self.rng);
                self.mark_dirty(local);
            }
            codec::OP_CLOSE => {
                self.phase_counters.closes_by_server += 1;
                self.tick_counters.closes_by_server += 1;
                // Echo the status code, then drop the connection.
                self.conns[local]
                    .ws
                    .queue_close_reply(payload, &mut self.rng);
                self.flush(local);
                self.close(local, &codec::server_close_reason(payload));
            }
            _ => {} // Pong: nothing to do.
        }
    }

    pub(super) fn protocol_error(&mut self, local: usize) {
        self.phase_counters.protocol_errors += 1;
        self.tick_counters.protocol_errors += 1;
        self.close(local, "protocol error");
    }

    pub(super) fn on_message(&mut self, local: usize, payload: &[u8], now: u64) {
        if !self.shared.sio_connect.is_empty() {
            return self.on_sio_packet(local, payload, now);
        }
        self.on_app_message(local, payload, now);
    }

    /// One Engine.IO packet (Socket.IO protocol): handshake steps, heartbeats, events.
    pub(super) fn on_sio_packet(&mut self, local: usize, payload: &[u8], now: u64) {
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

    pub(super) fn send_text(&mut self, local: usize, payload: &[u8]) {
        self.conns[local].ws.queue_text(payload, &mut self.rng);
        self.mark_dirty(local);
    }

    pub(super) fn on_app_message(&mut self, local: usize, payload: &[u8], now: u64) {
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

    pub(super) fn on_delivery(&mut self, local: usize, seq: u64, intended_ns: u64, now: u64) {
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
}
