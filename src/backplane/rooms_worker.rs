//! The rooms worker: membership, room messages, presence and the device limit, as Lua scripts
//! on the worker's own blocking Redis connections (one per shard on a Redis Cluster, see
//! [`ShardConns`]), so no core ever waits for Redis.
//!
//! Keys (prefix `p`, the channel prefix; the names in `keys.rs`), each script touching one
//! hash slot, the same names on one Redis and on a cluster:
//! - user side, in the slot of the user's channel `p:u:USER`: `{p:u:USER}:ur` the user's rooms
//!   (set), `{p:u:USER}:p` the user's connections per instance (hash node → count),
//!   `{p:u:USER}:dev` its devices under `--max-devices` (`devices.rs`), `{p:u:USER}:pa` its
//!   last `presenceChanged` (`coalesce.rs`);
//! - room side, in the slot of the room's channel `{p:r:ROOM}`: `{p:r:ROOM}:m` the members
//!   (set), `{p:r:ROOM}:h` the history stream, `{p:r:ROOM}:t` its byte count and low-water
//!   mark, `{p:r:ROOM}:d:KEY` the idempotency keys (see [`scripts::SEND`]);
//! - the instance registry, under the one tag `{p:n}`: `:hb:NODE` an instance's heartbeat
//!   (expires after `--presence-ttl`), `:nodes` the instances with one, `:dead` those found
//!   without one whose users are not all uncounted yet, `:users:NODE` the users an instance
//!   counted, `:claim:NODE` who uncounts a dead one, `:pq` the held presence changes.
//!
//! Channels: `p:u:USER` carries membership changes (`<node> ! +room`) and close requests
//! (`<node> ! d<device>`, `devices.rs`), `{p:r:ROOM}` the room's events; `PUBLISH` on one
//! Redis, `SPUBLISH` on a cluster (sharded pub/sub, on the shard of the channel's slot).
//!
//! What spans two slots is two steps, ordered so that a crash in between leaves a state the
//! next join or leave repairs: a join adds the user to the room's members, then the room to
//! the user's rooms (undoing the first at `room_limit`); a leave removes the room from the
//! user's rooms, then the user from the members. In between, the user is a member who is not
//! routed the room (can send and read its history, gets no live event), never the other way.
//! Both steps run on every join and leave, so a retry completes a half-done one. Presence
//! counts a user's connections in the user's slot; the instances that count are all but the
//! dead ones, read from the registry at each heartbeat and passed to the scripts; the
//! `presenceChanged` events then go to each of the user's rooms in the room's slot.
//!
//! Every third of the TTL the worker refreshes this instance's heartbeat and reads the dead
//! instances: one killed without a goodbye has its users uncounted, one by one, and those left
//! with no live connection announced offline to their rooms, exactly once (the uncount that
//! removed the count announces). Presence changes are coalesced per user over
//! `--presence-interval`: a few times per interval the worker also announces the held ones that
//! are due (`coalesce.rs`).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::redis_errors::{classify_error, ErrorReply};
use super::shard_conns::ShardConns;
use super::{wire, Backoff, Backplane, RoomAck, RoomJob, RoomTarget};
use crate::bus::{ApiAnswer, Bus, CoreMsg, RoomAnswer};
use crate::protocol::ErrorCode;
use crate::rooms::{RoomError, RoomId, RoomsConfig};
use crate::UserId;

pub(super) mod api_queries;
#[macro_use]
mod coalesce;
#[macro_use]
mod devices;
mod keys;
mod presence;
mod scripts;

use keys::Registry;
use scripts::Scripts;

/// How long a done join or leave may wait for this instance's routes before it is acked anyway.
const ACK_WAIT: Duration = Duration::from_secs(5);

struct Worker {
    bp: Arc<Backplane>,
    bus: Arc<Bus>,
    config: RoomsConfig,
    conns: ShardConns,
    backoff: Backoff,
    scripts: Scripts,
    prefix: String,
    node: String,
    registry: Registry,
    /// `SPUBLISH` on a Redis Cluster (the subscriber listens with `SSUBSCRIBE`), else `PUBLISH`.
    publish: &'static str,
    /// The instances found dead at the last registry read, space separated: their counts do
    /// not count (passed to the presence scripts).
    dead: String,
}

/// Runs until [`RoomJob::Stop`] (sent by [`Backplane::stop`] after the cores finished).
pub(crate) fn run(bp: Arc<Backplane>, bus: Arc<Bus>, rx: Receiver<RoomJob>) {
    let Some(config) = bp.rooms().cloned() else {
        return;
    };
    let beat_every = config.presence_ttl / 3;
    let mut w = Worker::new(bp, bus, config);
    let mut next_beat = Instant::now();
    let mut next_flush = coalesce::next_flush(w.config.presence_interval, 0).map(|d| next_beat + d);
    let mut failing = false;
    loop {
        let now = Instant::now();
        if next_flush.is_some_and(|at| now >= at) {
            next_flush = w.flush_presence().map(|d| now + d);
        }
        if now >= next_beat {
            next_beat = match w.heartbeat() {
                Ok(()) => {
                    if std::mem::take(&mut failing) {
                        log::info!("redis presence heartbeat refreshed again");
                    }
                    now + beat_every
                }
                Err(e) => {
                    // Once per outage: the other Redis threads log theirs too.
                    if !std::mem::replace(&mut failing, true) {
                        log::warn!(
                            "redis presence heartbeat failed: {}; retrying",
                            super::endpoint::plain_words(&e.to_string())
                        );
                    }
                    now + beat_every.min(Duration::from_millis(500))
                }
            };
        }
        let wake = next_flush.map_or(next_beat, |at| at.min(next_beat));
        match rx.recv_timeout(wake.saturating_duration_since(Instant::now())) {
            Ok(RoomJob::Stop) | Err(RecvTimeoutError::Disconnected) => {
                if let Err(e) = w.goodbye() {
                    log::warn!("redis presence goodbye failed: {e}; the sweep will expire us");
                }
                return;
            }
            Ok(job) => {
                w.bp.room_job_taken(&job);
                w.handle(job)
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
}

impl Worker {
    fn new(bp: Arc<Backplane>, bus: Arc<Bus>, config: RoomsConfig) -> Self {
        let prefix = bp.config.channel_prefix.clone();
        Worker {
            backoff: Backoff::new(
                bp.config.reconnect_min,
                bp.config.reconnect_max,
                bp.node_id ^ 0x7005,
            ),
            registry: Registry::new(&prefix),
            prefix,
            node: format!("{:016x}", bp.node_id),
            publish: if bp.config.sharded() {
                "SPUBLISH"
            } else {
                "PUBLISH"
            },
            bp,
            bus,
            config,
            conns: ShardConns::default(),
            scripts: Scripts::new(),
            dead: String::new(),
        }
    }

    /// Runs `f` on the connection to the shard owning `key` (the one Redis without a cluster),
    /// opening it first; a failure drops every connection and the topology.
    fn on<T>(
        &mut self,
        key: &str,
        f: impl FnOnce(&mut redis::Connection, &Scripts) -> redis::RedisResult<T>,
    ) -> redis::RedisResult<T> {
        let result = match self.conns.for_key(&self.bp, key.as_bytes()) {
            Ok((_, conn)) => f(conn, &self.scripts),
            Err(e) => Err(e),
        };
        match &result {
            Ok(_) => self.backoff.reset(),
            // Redis answered and will not write now (out of memory, loading, ...): the
            // connection is fine, a new one would be refused the same.
            Err(e) if classify_error(e) == ErrorReply::RefusesWrites => {
                self.bp.note_write_refused(&e.to_string())
            }
            Err(_) => self.conns.reset(),
        }
        result
    }

    fn answer(
        &self,
        target: RoomTarget,
        result: Result<serde_json::Value, (&'static str, String)>,
    ) {
        let answer = RoomAnswer {
            key: target.key,
            serial: target.serial,
            ack: target.ack,
            resume: target.resume,
            result,
        };
        if !self
            .bus
            .send(target.core, CoreMsg::RoomAnswer(Box::new(answer)))
        {
            self.bp.stats.inbox_drops.fetch_add(1, Relaxed);
        }
    }

    /// A script's `!code` reply as the client's error; anything unexpected is `internal`.
    fn refusal(&self, reply: &str, room: &str) -> (&'static str, String) {
        match reply.strip_prefix('!').and_then(RoomError::from_code) {
            Some(e) => (e.code().as_str(), e.message(room, &self.config)),
            None => (
                ErrorCode::Internal.as_str(),
                format!("unexpected reply from redis: {reply:?}"),
            ),
        }
    }

    fn unavailable(&mut self, e: &redis::RedisError) -> (&'static str, String) {
        if classify_error(e) == ErrorReply::RefusesWrites {
            // Logged once per spell (`note_write_refused`); the client may try again later.
            let message = format!("rooms unavailable: {e}");
            return (ErrorCode::Unavailable.as_str(), message);
        }
        log::warn!("redis rooms request failed: {e}");
        (
            ErrorCode::Internal.as_str(),
            format!("rooms unavailable: {e}"),
        )
    }

    /// `<node> ! +room` (joined) or `<node> ! -room` (left), for the user's channel.
    fn control(&self, joined: bool, room: &str) -> String {
        let sign = if joined { '+' } else { '-' };
        format!("{} ! {sign}{room}", self.node)
    }

    /// Joins: the room's members first (the room's slot), then the user's rooms and the
    /// control on the user's channel (the user's slot); see the module docs for the order.
    fn join(&mut self, user: &str, room: &str) -> redis::RedisResult<String> {
        let members = wire::room_members_key(&self.prefix, room);
        let max_members = self.config.max_room_members;
        let added = self.on(&members, |c, s| {
            s.room_join
                .key(&members)
                .arg(user)
                .arg(max_members)
                .invoke::<String>(c)
        })?;
        if added.starts_with('!') {
            return Ok(added);
        }
        let rooms = keys::user_rooms(&self.prefix, user);
        let (channel, control) = (
            wire::user_channel(&self.prefix, user),
            self.control(true, room),
        );
        let (max_rooms, publish) = (self.config.max_rooms_per_user, self.publish);
        let reply = self.on(&rooms, |c, s| {
            s.user_join
                .key(&rooms)
                .arg(room)
                .arg(max_rooms)
                .arg(publish)
                .arg(&channel)
                .arg(&control)
                .invoke::<String>(c)
        })?;
        if reply.starts_with('!') && added == "added" {
            // Over the user's limit: this join's member entry goes again.
            self.on(&members, |c, _| {
                redis::cmd("SREM").arg(&members).arg(user).query::<i64>(c)
            })?;
        }
        Ok(reply)
    }

    /// Leaves: the user's rooms and the control first, then the room's members.
    fn leave(&mut self, user: &str, room: &str) -> redis::RedisResult<String> {
        let rooms = keys::user_rooms(&self.prefix, user);
        let (channel, control) = (
            wire::user_channel(&self.prefix, user),
            self.control(false, room),
        );
        let publish = self.publish;
        let routed: i64 = self.on(&rooms, |c, s| {
            s.user_leave
                .key(&rooms)
                .arg(room)
                .arg(publish)
                .arg(&channel)
                .arg(&control)
                .invoke(c)
        })?;
        let members = wire::room_members_key(&self.prefix, room);
        let member: i64 = self.on(&members, |c, _| {
            redis::cmd("SREM").arg(&members).arg(user).query(c)
        })?;
        Ok(if routed == 0 && member == 0 {
            "!not_member".into()
        } else {
            "ok".into()
        })
    }

    fn handle(&mut self, job: RoomJob) {
        match job {
            RoomJob::Join { user, room, target } => {
                let reply = self.join(&user, &room);
                self.membership_done(reply, user, room, true, target);
            }
            RoomJob::Leave { user, room, target } => {
                let reply = self.leave(&user, &room);
                self.membership_done(reply, user, room, false, target);
            }
            RoomJob::Send {
                user,
                room,
                frame,
                id,
                ts,
                dedupe,
                target,
            } => {
                let bounds = &self.config.history;
                let history = self.bp.history().map(|_| {
                    let age = bounds.max_age.as_millis() as u64;
                    (bounds.max_len, age, bounds.max_bytes)
                });
                let window = self
                    .bp
                    .history()
                    .map_or(crate::history::DEFAULT_DEDUPE_WINDOW, |h| h.dedupe_window);
                let (prefix, node, publish) =
                    (self.prefix.clone(), self.node.clone(), self.publish);
                let channel = wire::room_channel(&prefix, &room);
                let reply = self.on(&channel, |c, s| {
                    let (on, max_len, max_age, max_bytes) = match history {
                        Some((len, age, bytes)) => ("1", len, age, bytes),
                        None => ("0", 0, 0, 0),
                    };
                    s.send
                        .arg(&prefix)
                        .arg(&node)
                        .arg(&*room)
                        .arg(&*user)
                        .arg(frame.as_str())
                        .arg(on)
                        .arg(max_len)
                        .arg(max_age)
                        .arg(dedupe.as_deref().unwrap_or(""))
                        .arg(window.as_millis() as u64)
                        .arg(max_bytes)
                        .arg(publish)
                        .invoke::<String>(c)
                });
                let result = match reply {
                    Ok(r) if r.starts_with('!') => Err(self.refusal(&r, &room)),
                    Ok(_) => {
                        self.bp.note_write_taken();
                        Ok(serde_json::json!({ "id": id, "ts": ts }))
                    }
                    Err(e) => Err(self.unavailable(&e)),
                };
                self.answer(target, result);
            }
            RoomJob::Presence { user, room, target } => {
                let result = match self.room_online(&room, Some(&user)) {
                    Ok(Some(online)) => Ok(serde_json::json!({ "room": &*room, "online": online })),
                    Ok(None) => Err(self.refusal("!not_member", &room)),
                    Err(e) => Err(self.unavailable(&e)),
                };
                self.answer(target, result);
            }
            RoomJob::Load { user } => {
                let rooms = keys::user_rooms(&self.prefix, &user);
                let reply = self.on(&rooms, |c, _| {
                    redis::cmd("SMEMBERS").arg(&rooms).query::<Vec<String>>(c)
                });
                let result = match reply {
                    Ok(rooms) => Ok(rooms.into_iter().map(RoomId::from).collect()),
                    Err(e) => {
                        log::warn!("redis: loading the rooms of {user} failed: {e}");
                        // The subscriber asks again at once: pace the retries here.
                        std::thread::sleep(self.backoff.next_delay());
                        Err(e.to_string())
                    }
                };
                self.bp.rooms_loaded.push((user, result));
                self.bp.wake_subscriber();
            }
            RoomJob::Connected {
                user,
                core,
                key,
                serial,
            } => self.connected(user, core, key, serial),
            RoomJob::Disconnected {
                user,
                core,
                key,
                serial,
            } => self.disconnected(&user, core, key, serial),
            RoomJob::Api {
                query,
                target,
                pending,
            } => {
                let result = self.api(&query).map_err(|e| {
                    log::warn!("redis: server API request failed: {e}");
                    e.to_string()
                });
                let answer = ApiAnswer {
                    key: target.key,
                    serial: target.serial,
                    result,
                    pending,
                };
                if !self.bus.send(target.core, CoreMsg::Api(Box::new(answer))) {
                    self.bp.stats.inbox_drops.fetch_add(1, Relaxed);
                }
            }
            RoomJob::Stop => {}
        }
    }

    /// A join or leave went through: the subscriber acks it once this instance routes by it.
    fn membership_done(
        &mut self,
        reply: redis::RedisResult<String>,
        user: UserId,
        room: RoomId,
        joined: bool,
        target: RoomTarget,
    ) {
        match reply {
            Ok(r) if r == "ok" => {
                self.bp.room_acks.push(RoomAck {
                    user,
                    room,
                    joined,
                    target,
                    deadline: Instant::now() + ACK_WAIT,
                });
                self.bp.wake_subscriber();
            }
            Ok(r) => {
                let refusal = self.refusal(&r, &room);
                self.answer(target, Err(refusal));
            }
            Err(e) => {
                let error = self.unavailable(&e);
                self.answer(target, Err(error));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backplane::RedisConfig;

    /// A worker that never connects: these tests cover what it does with a script's reply.
    fn worker(cores: usize) -> (Worker, Arc<Backplane>, Arc<Bus>) {
        let bp = Backplane::new(RedisConfig::new("redis://127.0.0.1:1"), 0xabc);
        let bus = Arc::new(Bus::new(cores, 16));
        let config = RoomsConfig {
            max_rooms_per_user: 3,
            max_room_members: 4,
            ..RoomsConfig::default()
        };
        let w = Worker::new(Arc::clone(&bp), Arc::clone(&bus), config);
        (w, bp, bus)
    }

    fn target(core: usize) -> RoomTarget {
        RoomTarget {
            core,
            key: 5,
            serial: 6,
            ack: Some(7),
            resume: None,
        }
    }

    fn answers(bus: &Bus, core: usize) -> Vec<RoomAnswer> {
        let mut out = Vec::new();
        bus.drain(core, |m| match m {
            CoreMsg::RoomAnswer(a) => out.push(*a),
            other => panic!("unexpected {other:?}"),
        });
        out
    }

    #[test]
    fn script_refusals_become_the_clients_error_codes() {
        let (w, _, _) = worker(1);
        assert_eq!(
            w.refusal("!room_full", "team"),
            (
                "room_full",
                "room \"team\" has 4 members (the most allowed)".into()
            )
        );
        assert_eq!(
            w.refusal("!room_limit", "team"),
            ("room_limit", "already in 3 rooms (the most allowed)".into())
        );
        assert_eq!(w.refusal("!not_member", "team").0, "not_member");
        for odd in ["!what", "room_full", ""] {
            let (code, message) = w.refusal(odd, "team");
            assert_eq!(code, "internal");
            assert!(
                message.starts_with("unexpected reply from redis"),
                "{message}"
            );
        }
    }

    #[test]
    fn a_done_membership_change_waits_for_the_routes_a_refused_one_is_answered() {
        let (mut w, bp, bus) = worker(2);
        let before = Instant::now();
        w.membership_done(Ok("ok".into()), "u".into(), "team".into(), true, target(1));
        let ack = bp.room_acks.pop().expect("held for the subscriber");
        assert!(bp.room_acks.pop().is_none());
        assert_eq!((&*ack.user, &*ack.room, ack.joined), ("u", "team", true));
        assert_eq!((ack.target.core, ack.target.key), (1, 5));
        assert!(ack.deadline >= before + ACK_WAIT);
        assert!(
            answers(&bus, 1).is_empty(),
            "acked by the subscriber, not here"
        );

        w.membership_done(
            Ok("!room_full".into()),
            "u".into(),
            "team".into(),
            true,
            target(1),
        );
        let error: redis::RedisError = (redis::ErrorKind::Io, "gone").into();
        w.membership_done(Err(error), "u".into(), "team".into(), false, target(1));
        assert!(bp.room_acks.pop().is_none());
        let got = answers(&bus, 1);
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].key, got[0].serial, got[0].ack), (5, 6, Some(7)));
        assert_eq!(got[0].result.as_ref().unwrap_err().0, "room_full");
        let (code, message) = got[1].result.as_ref().unwrap_err();
        assert_eq!(*code, "internal");
        assert!(message.starts_with("rooms unavailable: "), "{message}");
        assert!(answers(&bus, 0).is_empty());
    }

    /// Redis refusing the write (out of memory, ...) is `unavailable` for the client: it may
    /// try again later, nothing is wrong with its request.
    #[test]
    fn a_write_refusal_is_answered_unavailable() {
        let (mut w, _, bus) = worker(1);
        let oom = crate::backplane::redis_errors::tests::reply_error(b"-OOM no memory\r\n");
        w.membership_done(Err(oom), "u".into(), "team".into(), true, target(0));
        let got = answers(&bus, 0);
        assert_eq!(got[0].result.as_ref().unwrap_err().0, "unavailable");
    }
}
