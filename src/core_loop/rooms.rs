//! The core loop's side of rooms and presence: the room events, and counting each connection
//! towards its user's presence and device limit.
//!
//! Embedded, the registry answers at once and a room message is stored once, in the room's
//! history (`Shared::room_history`), and handed to every core as one
//! [`crate::bus::RoomDelivery`]. With Redis, each request goes to the rooms worker and its
//! answer comes back through the inbox; room deliveries arrive the same way, one per core
//! (see `deliver_room`). `joinRoom` with `since` resumes the room's history once joined.

use std::sync::Arc;

use serde_json::json;

use super::CoreLoop;
use crate::backplane::{RoomJob, RoomTarget};
use crate::bus::{Admission, CoreMsg, Dispatch, RoomAnswer, RoomDelivery};
use crate::connection::Counted;
use crate::handlers::{idempotency_key, Args, HandlerError, HandlerResult};
use crate::metrics::add;
use crate::protocol::{self, CloseReason, ErrorCode};
use crate::rooms::{
    bad_room_message, encode_presence_changed, presence_page, valid_room, PresenceNotice, RoomArgs,
    RoomError, RoomId, RoomMessage, RoomMessageArgs,
};
use crate::types::{now_ms, Offset};
use crate::UserId;

/// `presence` requests with an `after` waiting for the rooms worker on one core, at most. Each
/// waits for one answer (the worker answers every request it takes), so this bounds only
/// clients asking faster than Redis answers.
const MAX_PRESENCE_CURSORS: usize = 1024;

impl CoreLoop {
    /// `joinRoom`, `leaveRoom`, `sendRoomMessage`, `presence`. Returns the result to answer
    /// with now, or `None` when the rooms worker answers later.
    pub(super) fn on_room_event(
        &mut self,
        key: usize,
        user: &UserId,
        event: &str,
        ack: Option<u64>,
        args: Args<'_>,
    ) -> Option<HandlerResult> {
        let shared = Arc::clone(&self.shared);
        let config = &shared.config.rooms;
        let parsed = if event == "sendRoomMessage" {
            args.parse::<RoomMessageArgs<'_>>().and_then(|a| {
                let key = idempotency_key(user, a.client_id.as_deref())?;
                Ok((a.room, Some(a.text), key, None, None))
            })
        } else {
            args.parse::<RoomArgs<'_>>().map(|a| {
                // `since` resumes only with `joinRoom` and history on.
                let resume = a.since.filter(|_| event == "joinRoom");
                let resume = resume.filter(|_| shared.config.history_active());
                let resume = resume.map(|s| s.parse::<Offset>().ok());
                (a.room, None, None, a.after, resume)
            })
        };
        let (room, text, dedupe, after, resume) = match parsed {
            Ok(parsed) => parsed,
            Err(e) => return Some(Err(e)),
        };
        if !valid_room(&room, config.max_room_name_bytes) {
            let message = bad_room_message(config.max_room_name_bytes);
            return Some(Err(HandlerError::new(ErrorCode::BadRoom.as_str(), message)));
        }
        if event == "presence" && ack.is_none() {
            return Some(Err(HandlerError::bad_args(
                "presence answers through an ack: send one",
            )));
        }
        let refused = |e: RoomError| HandlerError::new(e.code().as_str(), e.message(&room, config));
        if let Some(rooms) = &shared.rooms {
            return Some(match event {
                "joinRoom" => match (rooms.join(user, &room, config), resume) {
                    (Ok(()), Some(since)) => {
                        // The ack first, then the replay and `recovered`.
                        self.finish_request(key, ack, Ok(json!({ "room": &*room })));
                        self.begin_room_recovery(key, RoomId::from(&*room), since);
                        return None;
                    }
                    (joined, _) => joined.map(|()| json!({ "room": &*room })).map_err(refused),
                },
                "leaveRoom" => rooms
                    .leave(user, &room)
                    .map(|()| json!({ "room": &*room }))
                    .map_err(refused),
                "presence" => rooms
                    .online(user, &room)
                    .map(|online| {
                        let online = online.iter().map(|u| &**u);
                        presence_page(&room, online, after.as_deref(), self.answer_budget())
                    })
                    .map_err(refused),
                _ => match rooms.members_for(user, &room) {
                    Err(e) => Err(refused(e)),
                    Ok(members) => {
                        let id = self.ids.next_id();
                        let ts = now_ms();
                        let msg = RoomMessage {
                            id: &id,
                            from: user,
                            room: &room,
                            text: text.as_deref().unwrap_or_default(),
                            ts,
                        };
                        let sent = match &shared.room_history {
                            Some(store) => {
                                protocol::encode_event("newMessage", &msg).map(|frame| {
                                    let room = RoomId::from(&*room);
                                    self.append_room(store, room, members, &frame, dedupe, ts)
                                })
                            }
                            // No history: a dispatch, one inbox message per core already.
                            None => crate::bus::encode_dispatch(members, "newMessage", &msg)
                                .map(|dispatch| self.outbox.push(Arc::new(dispatch))),
                        };
                        sent.map(|()| json!({ "id": id, "ts": ts }))
                            .map_err(|e| HandlerError::internal(e.to_string()))
                    }
                },
            });
        }
        let bp = shared.backplane.as_ref()?;
        let serial = self.conns.get_open(key)?.serial;
        let target = RoomTarget {
            core: self.id,
            key,
            serial,
            ack,
            resume,
        };
        let user = user.clone();
        let job = match event {
            "joinRoom" => RoomJob::Join {
                user,
                room: RoomId::from(&*room),
                target,
            },
            "leaveRoom" => RoomJob::Leave {
                user,
                room: RoomId::from(&*room),
                target,
            },
            "presence" => {
                if !self.remember_presence_cursor(key, serial, ack, after.as_deref()) {
                    let busy = "too many presence pages in flight on this core: retry";
                    return Some(Err(HandlerError::internal(busy)));
                }
                RoomJob::Presence {
                    user,
                    room: RoomId::from(&*room),
                    target,
                }
            }
            _ => {
                let id = self.ids.next_id();
                let ts = now_ms();
                let msg = RoomMessage {
                    id: &id,
                    from: &user,
                    room: &room,
                    text: text.as_deref().unwrap_or_default(),
                    ts,
                };
                let frame = match protocol::encode_event("newMessage", &msg) {
                    Ok(frame) => frame,
                    Err(e) => return Some(Err(HandlerError::internal(e.to_string()))),
                };
                RoomJob::Send {
                    user,
                    room: RoomId::from(&*room),
                    frame,
                    id,
                    ts,
                    dedupe,
                    target,
                }
            }
        };
        if bp.room_request(job) {
            None
        } else {
            self.presence_after.remove(&(key, serial, ack));
            Some(Err(HandlerError::internal(
                "rooms busy or unavailable: retry later",
            )))
        }
    }

    /// Embedded history: the message stored once, in the room's ring, under the room's next
    /// offset; one framed copy, one inbox message per core (this one included, drained before
    /// the sender's ack) instead of one per member. `dedupe` is the sender's idempotency key:
    /// a resend within the window is neither stored nor delivered again.
    fn append_room(
        &mut self,
        store: &crate::history::MemoryHistory,
        room: RoomId,
        members: Vec<UserId>,
        frame: &str,
        dedupe: Option<String>,
        now: u64,
    ) {
        let members: Arc<[UserId]> = members.into();
        let bus = Arc::clone(&self.shared.bus);
        let mut drops = 0;
        store.append(&room, frame, dedupe.as_deref(), now, |stored| {
            let delivery = Arc::new(RoomDelivery {
                room: room.clone(),
                members: Arc::clone(&members),
                offset: Some(stored.offset),
                frame: stored.frame,
                sio: Default::default(),
            });
            for core in 0..bus.cores() {
                if !bus.push(core, CoreMsg::Room(Arc::clone(&delivery))) {
                    drops += 1;
                }
            }
        });
        add(&self.metrics().inbox_drops, drops);
        add(&self.metrics().dispatches, 1);
        for (core, wake) in self.wake_cores.iter_mut().enumerate() {
            *wake |= core != self.id;
        }
        self.drain_self = true;
    }

    /// Keeps the `after` of a `presence` request sent to the rooms worker until its answer is
    /// paged (`false`: too many are waiting on this core already).
    fn remember_presence_cursor(
        &mut self,
        key: usize,
        serial: u64,
        ack: Option<u64>,
        after: Option<&str>,
    ) -> bool {
        let Some(after) = after else {
            return true;
        };
        if self.presence_after.len() >= MAX_PRESENCE_CURSORS {
            return false;
        }
        self.presence_after
            .insert((key, serial, ack), Box::from(after));
        true
    }

    /// The rooms worker's answer to a room request.
    pub(super) fn on_room_answer(&mut self, answer: RoomAnswer) {
        if self
            .conns
            .get_open_serial(answer.key, answer.serial)
            .is_none()
        {
            self.presence_after
                .remove(&(answer.key, answer.serial, answer.ack));
            return;
        }
        let after = self
            .presence_after
            .remove(&(answer.key, answer.serial, answer.ack));
        match answer.result {
            Ok(mut value) => {
                // A `presence` answer carries every online member: this core pages it.
                if let (Some(room), Some(online)) = (
                    value.get("room").and_then(|r| r.as_str()),
                    value.get("online").and_then(|o| o.as_array()),
                ) {
                    let online = online.iter().filter_map(|u| u.as_str());
                    value = presence_page(room, online, after.as_deref(), self.answer_budget());
                }
                if answer.ack.is_some() {
                    self.answer(answer.key, answer.ack, |a| protocol::encode_ack(a, &value));
                }
                let room = value["room"].as_str().map(RoomId::from);
                if let (Some(since), Some(room)) = (answer.resume, room) {
                    self.begin_room_recovery(answer.key, room, since);
                }
            }
            Err((code, message)) => {
                add(&self.metrics().client_errors, 1);
                self.answer(answer.key, answer.ack, |a| {
                    protocol::encode_error(a, code, &message)
                });
            }
        }
    }

    /// Counts a new connection towards its user's presence and device limit. Returns `false`
    /// when it was over the limit and is being closed (embedded; with Redis the verdict comes
    /// later, see [`CoreLoop::on_admission`]).
    pub(super) fn count_device(&mut self, key: usize, user: &UserId) -> bool {
        let shared = Arc::clone(&self.shared);
        if !shared.config.rooms_active() {
            return true;
        }
        if let Some(rooms) = &shared.rooms {
            return match rooms.connect(user, shared.config.rooms.max_devices) {
                Ok(notices) => {
                    if let Some(open) = self.conns.get_open_mut(key) {
                        open.counted = Counted::Yes;
                    }
                    self.notify_presence(notices, user, true);
                    true
                }
                Err(_over_limit) => {
                    self.close(key, CloseReason::DeviceLimit);
                    false
                }
            };
        }
        if let Some(bp) = &shared.backplane {
            let Some(open) = self.conns.get_open_mut(key) else {
                return false;
            };
            open.counted = Counted::Pending;
            let job = RoomJob::Connected {
                user: user.clone(),
                core: self.id,
                key,
                serial: open.serial,
            };
            if !bp.room_request(job) {
                open.counted = Counted::No;
            }
        }
        true
    }

    /// A counted connection of `user` (slab `key`, `serial`) ended.
    pub(super) fn uncount_device(&mut self, user: &UserId, key: usize, serial: u64) {
        let shared = Arc::clone(&self.shared);
        if let Some(rooms) = &shared.rooms {
            let notices = rooms.disconnect(user);
            self.notify_presence(notices, user, false);
        } else if let Some(bp) = &shared.backplane {
            bp.room_request(RoomJob::Disconnected {
                user: user.clone(),
                core: self.id,
                key,
                serial,
            });
        }
    }

    /// Redis counted (or refused) a connection. One that ended meanwhile is uncounted again.
    pub(super) fn on_admission(&mut self, verdict: Admission) {
        let waiting = match self.conns.get_open_mut(verdict.key) {
            Some(open)
                if open.serial == verdict.serial
                    && open.indexed
                    && open.counted == Counted::Pending =>
            {
                open.counted = if verdict.counted {
                    Counted::Yes
                } else {
                    Counted::No
                };
                true
            }
            _ => false,
        };
        if !waiting {
            if verdict.counted {
                self.uncount_device(&verdict.user, verdict.key, verdict.serial);
            }
            return;
        }
        if !verdict.admitted {
            log::debug!(
                "core={} conn={} user={} over the device limit",
                self.id,
                verdict.key,
                verdict.user
            );
            self.close(verdict.key, CloseReason::DeviceLimit);
        }
    }

    /// With Redis and `--max-devices`: a newer device of this connection's user took its place
    /// (newest wins), so it closes with 4009, unless the key was reused since.
    pub(super) fn displace(&mut self, key: usize, serial: u64) {
        let current = self.conns.get_open_mut(key).map(|open| open.serial);
        if current == Some(serial) {
            log::debug!("core={} conn={key} displaced by a newer device", self.id);
            self.close(key, CloseReason::DeviceLimit);
        }
    }

    /// Embedded: tells the members of each room that `user` came online or went offline, or
    /// holds the change for later when the user changed within `--presence-interval`
    /// (`presence.rs`).
    fn notify_presence(&mut self, notices: Vec<PresenceNotice>, user: &UserId, online: bool) {
        if notices.is_empty() {
            return;
        }
        let verdict = self
            .shared
            .presence
            .changed(user, online, std::time::Instant::now());
        if verdict == super::presence::Verdict::Announce {
            self.announce_presence(notices, user, online);
        }
    }

    /// Sends `presenceChanged` to the members of each room. The event is kept in no history:
    /// it goes out like a dispatch without offsets.
    pub(super) fn announce_presence(
        &mut self,
        notices: Vec<PresenceNotice>,
        user: &UserId,
        online: bool,
    ) {
        for (room, members) in notices {
            let dispatch = Arc::new(Dispatch {
                users: members.into_boxed_slice(),
                frame: encode_presence_changed(&room, user, online),
                args_at: 0,
                sio: Default::default(),
                dedupe: None,
            });
            self.fan_out(&dispatch);
        }
    }
}
