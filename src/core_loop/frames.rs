//! An open WebSocket's input: reading frames, the rate limit, envelopes into handlers, and the
//! acks and answers that go back.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use tungstenite::Utf8Bytes;

use super::{sender_budget, sio, CoreLoop, CLOSE_GRACE, READ_BUDGET};
use crate::bus::AckWaiter;
use crate::connection::ReadOutcome;
use crate::handlers::{Args, ConnectionId, Context, HandlerError, HandlerResult};
use crate::metrics::add;
use crate::protocol::{self, CloseReason, ErrorCode};
use crate::socketio;

impl CoreLoop {
    pub(super) fn read_frames(&mut self, key: usize) {
        for _ in 0..READ_BUDGET {
            let Some(open) = self.conns.get_open_mut(key) else {
                return;
            };
            match open.read_frame(CLOSE_GRACE) {
                ReadOutcome::Text(text) => {
                    add(&self.metrics().frames_in, 1);
                    self.handled_at.push(Instant::now());
                    if self.within_rate_limit(key) {
                        self.on_text(key, text);
                    } else {
                        self.refuse_over_rate(key, &text);
                    }
                }
                ReadOutcome::Binary => {
                    if !self.sio_skip_binary(key) {
                        self.close(key, CloseReason::BinaryFrame);
                    }
                }
                ReadOutcome::Pong => self.mark_dirty(key),
                ReadOutcome::PeerClosing => {
                    self.unindex(key);
                    self.mark_dirty(key);
                }
                ReadOutcome::Continue => {}
                ReadOutcome::WouldBlock => return,
                ReadOutcome::Close(reason) => return self.close(key, reason),
                ReadOutcome::Remove(why) => return self.remove(key, why),
            }
        }
        // Budget spent with input possibly left: continue next turn (edge-triggered: no new
        // event would come for bytes already buffered).
        self.carry.push(key);
    }

    /// Takes a token from the connection's bucket.
    pub(super) fn within_rate_limit(&mut self, key: usize) -> bool {
        let (rate, burst) = (
            self.shared.config.rate_limit_per_sec,
            self.shared.config.rate_limit_burst,
        );
        self.conns
            .get_open_mut(key)
            .is_none_or(|open| open.bucket.take(rate, burst, Instant::now()))
    }

    /// Answers a frame over the rate limit with a `rate_limited` error (the frame is dropped);
    /// a client that goes on flooding for a whole burst's worth of frames is closed with 1008.
    pub(super) fn refuse_over_rate(&mut self, key: usize, text: &Utf8Bytes) {
        add(&self.metrics().client_errors, 1);
        let burst = self.shared.config.rate_limit_burst;
        let Some(refused) = self.conns.get_open(key).map(|open| open.bucket.refused) else {
            return;
        };
        if refused > burst {
            self.close(key, CloseReason::RateLimited);
            return;
        }
        // The first refusal of a run is answered, and every refused frame that asked for an
        // ack (its sender waits for one); the rest are dropped quietly, so a flood does not buy
        // a flood of errors.
        let ack = match self.conns.get_open(key) {
            Some(open) if open.sio.is_some() => sio::request_ack(text.as_str()),
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

    pub(super) fn on_text(&mut self, key: usize, text: Utf8Bytes) {
        let Some(open) = self.conns.get_open(key) else {
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
    pub(super) fn on_envelope(
        &mut self,
        key: usize,
        event: &str,
        args: Args<'_>,
        ack: Option<u64>,
    ) {
        if event == "refresh" {
            return self.on_refresh(key, ack, args);
        }
        let Some(open) = self.conns.get_open(key) else {
            return;
        };
        let user = open.user.clone();
        if self.authorize(key, &user, event, args, ack) {
            self.run_request(key, &user, event, args, ack);
        }
    }

    /// Runs an authorized request of `user` (the connection's): the built-in history and room
    /// events, else its handler.
    pub(super) fn run_request(
        &mut self,
        key: usize,
        user: &crate::UserId,
        event: &str,
        args: Args<'_>,
        ack: Option<u64>,
    ) {
        let shared = Arc::clone(&self.shared);
        if shared.config.history_active() {
            match event {
                "resume" => return self.on_resume(key, ack, args),
                "history" => return self.on_history(key, user, ack, args),
                _ => {}
            }
        }
        if shared.config.rooms_active() && crate::rooms::is_room_event(event) {
            // `None`: the request went to Redis; its answer arrives through the inbox.
            if let Some(result) = self.on_room_event(key, user, event, ack, args) {
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
        let mut ctx = Context::new(user, connection, &mut self.outbox, &mut self.ids);
        // A panicking handler must not take the core (and every connection on it) down.
        let result = catch_unwind(AssertUnwindSafe(|| handler.handle(&mut ctx, args)))
            .unwrap_or_else(|_| {
                log::error!("handler for {:?} panicked", truncate(event, 64));
                Err(crate::handlers::HandlerError::internal("handler failed"))
            });
        self.finish_request(key, ack, result);
    }

    /// Sends what a request dispatched, then its ack or error.
    pub(super) fn finish_request(&mut self, key: usize, ack: Option<u64>, result: HandlerResult) {
        let shared = Arc::clone(&self.shared);
        // The connection is still there (handlers run synchronously); 0 only keeps the types.
        let serial = self.conns.get_open(key).map_or(0, |open| open.serial);
        let result = result.and_then(|value| self.within_sender_budget(key).map(|()| value));
        if result.is_err() {
            // Nothing a failed (or over-budget) request dispatched goes out.
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

    /// With history on, what the request dispatched for other users fits its sender's budget
    /// (`sender_budget.rs`), which pays for it; else the `quota_exceeded` error to answer with.
    fn within_sender_budget(&mut self, key: usize) -> Result<(), HandlerError> {
        let budgets = &self.shared.sender_budgets;
        if self.outbox.is_empty() || budgets.is_unlimited() || !self.shared.config.history_active()
        {
            return Ok(());
        }
        let Some(open) = self.conns.get_open(key) else {
            return Ok(());
        };
        let cost = sender_budget::cost_for_others(&open.user, &self.outbox);
        if budgets.take(&open.user, cost, Instant::now()) {
            return Ok(());
        }
        add(&self.metrics().sends_over_budget, 1);
        Err(HandlerError::new(
            ErrorCode::QuotaExceeded.as_str(),
            format!(
                "this send would store {cost} bytes for other users, more than is left of \
                 {} per minute: nothing was sent",
                budgets.burst()
            ),
        ))
    }

    /// Redis took (or dropped) what a request dispatched: its held ack goes out now.
    pub(super) fn on_acked(&mut self, waiter: &AckWaiter) {
        if self
            .conns
            .get_open_serial(waiter.key, waiter.serial)
            .is_none()
        {
            return;
        }
        self.shared.metrics[self.id]
            .ack_wait
            .observe_duration(waiter.created.elapsed());
        if waiter.taken() {
            self.answer(waiter.key, Some(waiter.ack), |a| {
                protocol::encode_ack(a, &waiter.result)
            });
        } else {
            self.answer(waiter.key, Some(waiter.ack), |a| {
                protocol::encode_error(
                    a,
                    ErrorCode::Unavailable.as_str(),
                    "not confirmed stored (Redis unreachable with the publication queue full, or \
                     not copied to --redis-wait-replicas replicas in time); send again",
                )
            });
        }
    }

    /// Sends the answer to a client request. `native(ack)` builds the native answer frame; a
    /// Socket.IO connection gets it without `ack`, in an ACK packet for its ack id, or (no ack
    /// id) as a `message` event on the namespace the request came from.
    pub(super) fn answer(
        &mut self,
        key: usize,
        ack: Option<u64>,
        native: impl FnOnce(Option<u64>) -> Utf8Bytes,
    ) {
        let Some(open) = self.conns.get_open(key) else {
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
}

pub(super) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
