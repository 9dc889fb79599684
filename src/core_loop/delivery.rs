//! Output: dispatching a handler's events (locally, to the other cores, to Redis, with history),
//! delivering them to this core's connections, and the write-many-flush-once path.

use std::sync::Arc;

use tungstenite::Utf8Bytes;

use super::mode::Mode;
use super::CoreLoop;
use crate::bus::AckWaiter;
use crate::bus::{CoreMsg, Dispatch, RoomDelivery};
use crate::connection::{FlushOutcome, Open, WriteOutcome};
use crate::history::{self, Delivery, Offset};
use crate::metrics::add;
use crate::socketio::{self, FrameCache};

impl CoreLoop {
    /// Delivers the handler's dispatches here and hands them to every other core (and to
    /// Redis, where `waiter` waits for them).
    pub(super) fn flush_outbox(&mut self, waiter: Option<&Arc<AckWaiter>>) {
        let outbox = std::mem::take(&mut self.outbox);
        for dispatch in &outbox {
            add(&self.metrics().dispatches, 1);
            let shared = Arc::clone(&self.shared);
            match shared.mode() {
                // History on: every device, local ones included, gets the event with its
                // offset, after the offset is assigned (by the embedded store, or by Redis).
                Mode::Embedded {
                    history: Some(store),
                } => {
                    self.append_embedded(store, dispatch);
                }
                Mode::Backplane { bp, history: true } => self.publish(bp, dispatch, waiter),
                Mode::Embedded { history: None } => self.fan_out(dispatch),
                Mode::Backplane { bp, history: false } => {
                    self.fan_out(dispatch);
                    // Other instances last: local delivery never waits for Redis.
                    self.publish(bp, dispatch, waiter);
                }
            }
        }
        self.outbox = outbox;
        self.outbox.clear();
    }

    /// Delivers a dispatch without offsets to this core's connections, and hands it to every
    /// other core (woken at the end of the turn).
    pub(super) fn fan_out(&mut self, dispatch: &Arc<Dispatch>) {
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
    }

    /// Embedded history: appends `dispatch` for each of its users and hands each delivery to
    /// every core, this one included (so this core, too, sees a user's frames in offset order).
    pub(super) fn append_embedded(
        &mut self,
        store: &history::MemoryHistory,
        dispatch: &Dispatch,
    ) -> Vec<(crate::UserId, Offset)> {
        let now = crate::types::now_ms();
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

    /// Queues a frame with an offset on every local connection of its user, skipping those that
    /// already have it; recovering connections hold it until their replay is in.
    pub(super) fn deliver_offset(&mut self, d: &Delivery) {
        let keys = self.conns.user_keys(&d.user);
        for key in keys {
            self.offer(key, d.offset, &d.frame, &d.sio);
        }
    }

    /// Queues a frame with an offset on one connection unless it already has it; a recovering
    /// connection holds it until its replay is in.
    pub(super) fn offer(
        &mut self,
        key: usize,
        offset: Offset,
        frame: &Utf8Bytes,
        cache: &FrameCache,
    ) {
        let Some(open) = self.conns.get_open_mut(key) else {
            return;
        };
        if let Some(rec) = open.recovering.as_mut() {
            return rec.hold(offset, frame);
        }
        if open.last_offset.is_some_and(|last| offset <= last) {
            return;
        }
        open.last_offset = Some(offset);
        self.send_shared(key, frame, Some(cache));
    }

    /// A room event: every local connection of the listed members gets the one shared frame.
    pub(super) fn deliver_room(&mut self, d: &RoomDelivery) {
        for member in d.members.iter() {
            let keys = self.conns.user_keys(member);
            for key in keys {
                match d.offset {
                    Some(offset) => self.offer_room(key, &d.room, offset, &d.frame, &d.sio),
                    None => self.send_shared(key, &d.frame, Some(&d.sio)),
                }
            }
        }
    }

    /// [`Self::offer`] for a frame of a room's history: the connection's cursor in that room
    /// decides whether it is new, and a recovery of that room holds it.
    pub(super) fn offer_room(
        &mut self,
        key: usize,
        room: &crate::rooms::RoomId,
        offset: Offset,
        frame: &Utf8Bytes,
        cache: &FrameCache,
    ) {
        let Some(open) = self.conns.get_open_mut(key) else {
            return;
        };
        // Created on the connection's first room frame: most connections are in no room.
        let cursors = open.rooms.get_or_insert_with(Default::default);
        if let Some(rec) = cursors.recovering(room) {
            return rec.hold(offset, frame);
        }
        if cursors.last(room).is_some_and(|last| offset <= last) {
            return;
        }
        cursors.set_last(room, Some(offset));
        self.send_shared(key, frame, Some(cache));
    }

    /// Queues the dispatch's frame on every local connection of its users.
    pub(super) fn deliver_local(&mut self, dispatch: &Dispatch) {
        for user in dispatch.users.iter() {
            let keys = self.conns.user_keys(user);
            for key in keys {
                self.send_shared(key, &dispatch.frame, Some(&dispatch.sio));
            }
        }
    }

    /// Queues an event (a native frame) for one connection: as it is, or wrapped for each
    /// namespace a Socket.IO connection joined.
    pub(super) fn send(&mut self, key: usize, frame: Utf8Bytes) {
        self.send_shared(key, &frame, None);
    }

    /// Like [`Self::send`] for a frame many connections get: the Socket.IO wrapping comes from
    /// `cache`, so it is built once per dispatch and namespace, not per connection.
    pub(super) fn send_shared(
        &mut self,
        key: usize,
        frame: &Utf8Bytes,
        cache: Option<&FrameCache>,
    ) {
        let Some(open) = self.conns.get_open(key) else {
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

    /// Queues a text frame for the end-of-turn flush. A connection over its outbound bound is
    /// closed as a slow consumer.
    pub(super) fn write_text(&mut self, key: usize, frame: Utf8Bytes) {
        let Some(open) = self.conns.get_open_mut(key) else {
            return;
        };
        // The payload and the frame header tungstenite puts before it.
        let bytes = frame.len() + if frame.len() < 126 { 2 } else { 10 };
        match open.queue_text(frame) {
            WriteOutcome::Queued => {
                open.outbound += bytes;
                self.outbound += bytes;
                add(&self.metrics().frames_out, 1);
                self.mark_dirty(key);
            }
            WriteOutcome::Closing => {}
            WriteOutcome::Close(reason) => self.close(key, reason),
            WriteOutcome::Remove(why) => self.remove(key, why),
        }
    }

    /// Lists the connection for the end-of-turn flush (once per turn).
    pub(super) fn mark_dirty(&mut self, key: usize) {
        if self.conns.get_open_mut(key).is_some_and(Open::mark_dirty) {
            self.dirty.push(key);
        }
    }

    /// Flushes every connection that got output this turn: one write burst per connection.
    pub(super) fn flush_dirty(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        let mut bytes = 0;
        for &key in &dirty {
            let Some(open) = self.conns.get_open_mut(key) else {
                continue;
            };
            let outcome = open.flush();
            let stream = open.ws.get_mut();
            let written = stream.take_written();
            bytes += written;
            let backlog = if outcome == FlushOutcome::Done {
                0
            } else {
                stream.backlog()
            };
            self.shared.metrics[self.id]
                .outbound_backlog
                .observe(backlog as u64);
            let before = open.outbound;
            open.outbound = match outcome {
                FlushOutcome::Done => 0,
                _ => before.saturating_sub(written as usize),
            };
            self.outbound = self.outbound.saturating_sub(before) + open.outbound;
            match outcome {
                FlushOutcome::Done | FlushOutcome::Pending => {}
                FlushOutcome::Remove(why) => self.remove(key, why),
            }
        }
        add(&self.metrics().bytes_out, bytes);
        if !self.handled_at.is_empty() {
            let now = std::time::Instant::now();
            for read_at in self.handled_at.drain(..) {
                self.shared.metrics[self.id]
                    .message_latency
                    .observe_duration(now.saturating_duration_since(read_at));
            }
        }
        dirty.clear();
        // Keep the allocation; anything added while flushing (none today) would be kept too.
        dirty.append(&mut self.dirty);
        self.dirty = dirty;
    }
}
