//! Recovery with history on: `?since=` and `resume`, the replay and what arrived meanwhile, and
//! the resyncs after a backplane outage or a late room channel. Each stream recovers on its own:
//! the user's (its `recovered` has no `room`) and each room's (one `recovered` per room).

use std::sync::Arc;
use std::time::Instant;

use super::mode::History;
use super::CoreLoop;
use crate::bus::ReplayResult;
use crate::connection::Connection;
use crate::handlers::Args;
use crate::history::{self, Offset, Recovering};
use crate::metrics::add;
use crate::protocol::{self, ErrorCode};
use crate::rooms::{self, RoomId, RoomResume};
use crate::UserId;

impl CoreLoop {
    /// `resume {since?, rooms?}`: what `?since=` and `?rooms=` do, for clients that cannot
    /// change the URL. Each replay starts after its offset whatever this connection already got
    /// (the client skips offsets it has), so a client should send it first. A room already
    /// recovering is left to finish.
    pub(super) fn on_resume(&mut self, key: usize, ack: Option<u64>, args: Args<'_>) {
        #[derive(serde::Deserialize)]
        struct Resume<'a> {
            #[serde(borrow, default)]
            since: Option<std::borrow::Cow<'a, str>>,
            #[serde(borrow, default)]
            rooms: Option<std::collections::BTreeMap<&'a str, &'a str>>,
        }
        let config = &self.shared.config.rooms;
        let (max_name, max_rooms) = (config.max_room_name_bytes, config.max_rooms_per_user);
        let parsed = args
            .parse::<Resume<'_>>()
            .and_then(|r| match (r.since, r.rooms) {
                (None, None) => Err(crate::handlers::HandlerError::bad_args(
                    "resume needs \"since\" or \"rooms\"",
                )),
                (since, map) => Ok((
                    since.map(|s| s.parse::<Offset>().ok()),
                    map.map(|m| rooms::rooms_from_map(m, max_name, max_rooms))
                        .unwrap_or_default(),
                )),
            });
        let (since, room_resume) = match parsed {
            Ok(parsed) => parsed,
            Err(e) => {
                add(&self.metrics().client_errors, 1);
                return self.answer(key, ack, |a| protocol::encode_error(a, &e.code, &e.message));
            }
        };
        let Some(open) = self.conns.get_open_mut(key) else {
            return;
        };
        let Some(since) = since else {
            if let Some(n) = ack {
                self.answer(key, Some(n), |a| {
                    protocol::encode_ack(a, &serde_json::Value::Null)
                });
            }
            return self.resume_rooms(key, room_resume);
        };
        if open.recovering.is_some() {
            return self.answer(key, ack, |a| {
                protocol::encode_error(
                    a,
                    ErrorCode::BadArgs.as_str(),
                    "a recovery is already in progress",
                )
            });
        }
        open.last_offset = None;
        if let Some(n) = ack {
            self.answer(key, Some(n), |a| {
                protocol::encode_ack(a, &serde_json::Value::Null)
            });
        }
        self.begin_recovery(key, since);
        self.resume_rooms(key, room_resume);
    }

    /// Resumes each room of `resume` from its offset, forgetting the connection's cursor there
    /// (the client asked for everything after its offset).
    pub(super) fn resume_rooms(&mut self, key: usize, resume: RoomResume) {
        if resume.is_empty() || self.shared.mode().history().is_none() {
            return;
        }
        for (room, since) in resume {
            if let Some(open) = self.conns.get_open_mut(key) {
                if let Some(cursors) = open.rooms.as_mut() {
                    if cursors.recovering(&room).is_none() {
                        cursors.set_last(&room, None);
                    }
                }
            }
            self.begin_room_recovery(key, room, since);
        }
    }

    /// After a backplane outage, replays to each open connection what its user was sent since
    /// the last offset the connection received (events published while this instance was not
    /// subscribed are in history but reached none of its devices). The seam logic drops what
    /// a connection already has; the connection gets `recovered` at the end, as after a resume.
    pub(super) fn resync_all(&mut self) {
        type Resync = (usize, Option<Offset>, Vec<(RoomId, Offset)>);
        let keys: Vec<Resync> = self
            .conns
            .iter_mut()
            .filter_map(|(key, conn)| match conn {
                Connection::Open(o) if o.closing.is_none() => {
                    let rooms = o.rooms.as_mut().map(|c| c.resync()).unwrap_or_default();
                    let own = match o.recovering.as_mut() {
                        Some(rec) => {
                            rec.again = true;
                            None
                        }
                        None => o.last_offset,
                    };
                    Some((key, own, rooms))
                }
                _ => None,
            })
            .collect();
        log::debug!("core={} resync: {} connections resume", self.id, keys.len());
        for (key, offset, rooms) in keys {
            if offset.is_some() {
                self.begin_recovery(key, offset);
            }
            for (room, offset) in rooms {
                self.begin_room_recovery(key, room, Some(offset));
            }
        }
    }

    /// This instance began routing `room` for `user`, who joined it, only after Redis
    /// confirmed the room's channel: the user's connections resume the room from their last
    /// offset in it to catch what came between (those without one have nothing to resume from).
    pub(super) fn resync_room(&mut self, user: &UserId, room: &RoomId) {
        let keys = self.conns.user_keys(user);
        for key in keys {
            let last = match self.conns.get_open_mut(key) {
                Some(o) if o.closing.is_none() => o
                    .rooms
                    .as_mut()
                    .and_then(|c| c.recovering(room).is_none().then(|| c.last(room)).flatten()),
                _ => None,
            };
            if let Some(offset) = last {
                self.begin_room_recovery(key, room.clone(), Some(offset));
            }
        }
    }

    /// Resumes `room`'s history on connection `key` after `since` (`None`: not an offset, so
    /// `complete: false`): holds the room's live frames and asks for what was missed. Only a
    /// member gets anything: for anyone else the replay is empty and incomplete.
    pub(super) fn begin_room_recovery(&mut self, key: usize, room: RoomId, since: Option<Offset>) {
        let shared = Arc::clone(&self.shared);
        let Some(history) = shared.mode().history() else {
            return;
        };
        let Some(open) = self.conns.get_open_mut(key) else {
            return;
        };
        let (serial, user) = (open.serial, open.user.clone());
        // A room the session may not read replays nothing, like one it is not a member of.
        let readable = crate::access::may_read(open.access.as_deref(), &room);
        let deadline = Instant::now() + history::RECOVERY_TIMEOUT;
        let rec = Recovering {
            since,
            buffered: Vec::new(),
            overflow: false,
            deadline,
            again: false,
        };
        if !open
            .rooms
            .get_or_insert_with(Default::default)
            .begin(&room, rec)
        {
            return;
        }
        let answer = |replay| ReplayResult {
            key,
            serial,
            room: Some(room.clone()),
            replay,
        };
        match (history, since) {
            _ if !readable => self.on_replay(answer(history::Replay::default())),
            (History::Embedded(_), _) => {
                let member = shared
                    .rooms
                    .as_ref()
                    .is_some_and(|r| r.is_member(&user, &room));
                let replay = match (&shared.room_history, member) {
                    (Some(store), true) => store.replay(&room, since, crate::types::now_ms()),
                    _ => history::Replay::default(),
                };
                self.on_replay(answer(replay));
            }
            (History::Redis(bp), Some(since)) => {
                bp.request_replay(crate::backplane::ReplayRequest {
                    user,
                    room: Some(room),
                    since,
                    core: self.id,
                    key,
                    serial,
                    deadline,
                    max_bytes: self.answer_budget(),
                });
            }
            (History::Redis(_), None) => self.on_replay(answer(history::Replay::default())),
        }
    }

    /// `?since=` (or a `resume` event): hold live frames and ask for what was missed. `since`
    /// is `None` when the client's offset did not parse: it gets `complete: false`.
    pub(super) fn begin_recovery(&mut self, key: usize, since: Option<Offset>) {
        let shared = Arc::clone(&self.shared);
        let Some(history) = shared.mode().history() else {
            return;
        };
        let Some(open) = self.conns.get_open_mut(key) else {
            return;
        };
        if open.recovering.is_some() {
            return;
        }
        let serial = open.serial;
        let user = open.user.clone();
        open.recovering = Some(Box::new(Recovering {
            since,
            buffered: Vec::new(),
            overflow: false,
            deadline: Instant::now() + history::RECOVERY_TIMEOUT,
            again: false,
        }));
        match history {
            History::Embedded(store) => {
                // Embedded: the store answers at once. Deliveries already in this core's inbox
                // are in the replay too; the high-water mark drops them when they are drained.
                let replay = store.replay(&user, since, crate::types::now_ms());
                self.on_replay(ReplayResult {
                    key,
                    serial,
                    room: None,
                    replay,
                });
            }
            History::Redis(bp) => match since {
                Some(since) => bp.request_replay(crate::backplane::ReplayRequest {
                    user,
                    room: None,
                    since,
                    core: self.id,
                    key,
                    serial,
                    deadline: Instant::now() + history::RECOVERY_TIMEOUT,
                    max_bytes: self.answer_budget(),
                }),
                None => self.on_replay(ReplayResult {
                    key,
                    serial,
                    room: None,
                    replay: history::Replay::default(),
                }),
            },
        }
    }

    /// Sends the replay, then what arrived live meanwhile, then `recovered`. A replay longer
    /// than the answer budget keeps its newest events (see [`keep_newest_within`]).
    pub(super) fn on_replay(&mut self, mut result: ReplayResult) {
        keep_newest_within(&mut result.replay, self.answer_budget());
        let Some(open) = self.conns.get_open_mut(result.key) else {
            return;
        };
        if open.serial != result.serial {
            return;
        }
        let (rec, high) = match &result.room {
            None => (open.recovering.take(), open.last_offset),
            Some(room) => {
                let cursors = open.rooms.get_or_insert_with(Default::default);
                (cursors.finish(room), cursors.last(room))
            }
        };
        let Some(rec) = rec else {
            return;
        };
        let complete = result.replay.complete && !rec.overflow;
        let again = rec.again;
        let (frames, last) = match &result.room {
            None => {
                let done =
                    history::finish_recovery(*rec, result.replay, high, history::encode_recovered);
                open.last_offset = done.1;
                done
            }
            Some(room) => {
                let done = history::finish_recovery(*rec, result.replay, high, |c, l| {
                    rooms::encode_room_recovered(room, c, l)
                });
                if let Some(cursors) = open.rooms.as_mut() {
                    cursors.set_last(room, done.1);
                }
                done
            }
        };
        let m = &self.shared.metrics[self.id];
        if complete {
            add(&m.recoveries_complete, 1);
        } else {
            add(&m.recoveries_incomplete, 1);
        }
        for frame in frames {
            self.send(result.key, frame);
        }
        if again && last.is_some() {
            match result.room {
                None => self.begin_recovery(result.key, last),
                Some(room) => self.begin_room_recovery(result.key, room, last),
            }
        }
    }
}

/// Keeps the newest events of `replay` whose frames fit in `max_bytes`, `complete: false` when
/// any were dropped: the client pages further back with `history`. Redis replays are read that
/// way already (`history_worker`); this bounds the embedded and room replays too, so a replay
/// never makes its requester a slow consumer by itself, nor holds its core for a whole long
/// history.
fn keep_newest_within(replay: &mut history::Replay, max_bytes: usize) {
    let mut bytes = 0usize;
    let kept = replay
        .entries
        .iter()
        .rev()
        .take_while(|(_, frame)| {
            bytes += frame.len();
            bytes <= max_bytes
        })
        .count();
    let dropped = replay.entries.len() - kept;
    if dropped > 0 {
        replay.entries.drain(..dropped);
        replay.complete = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replay_over_the_budget_keeps_its_newest_events_and_is_incomplete() {
        let frame = |n: u64| (Offset(1, n), tungstenite::Utf8Bytes::from("x".repeat(100)));
        let mut replay = history::Replay {
            entries: (1..=10).map(frame).collect(),
            complete: true,
        };
        keep_newest_within(&mut replay, 350);
        let kept: Vec<u64> = replay.entries.iter().map(|(o, _)| o.1).collect();
        assert_eq!(kept, [8, 9, 10]);
        assert!(!replay.complete);

        let mut small = history::Replay {
            entries: (1..=3).map(frame).collect(),
            complete: true,
        };
        keep_newest_within(&mut small, 300);
        assert_eq!((small.entries.len(), small.complete), (3, true));
    }
}
