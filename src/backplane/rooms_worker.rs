//! The rooms worker: membership, room messages, presence and the device limit, each one Lua
//! script on the worker's own blocking Redis connection, so no core ever waits for Redis.
//!
//! Keys (prefix `p`, the channel prefix): `p:ur:{user}` the user's rooms (set), `p:rm:{room}`
//! the room's members (set), `p:p:{user}` connections per instance (hash node → count),
//! `p:n:{node}` an instance's heartbeat (expires after `--presence-ttl`), `p:n:{node}:users`
//! the users it counted, `p:nodes` every instance that has a heartbeat, `p:d:{user}` the user's
//! devices under `--max-devices` (sorted set, see `devices.rs`: newest wins), `p:pa:{user}` and
//! `p:pq` the presence announcements and held changes (`coalesce.rs`). Channels: `p:u:{user}`
//! carries membership changes (`<node> ! +room`) and close requests (`<node> ! d<device>`),
//! `{p:r:ROOM}` (braces included: a Redis Cluster hash tag) the room's events. The room's
//! history lives beside its channel, in the same hash slot: `{p:r:ROOM}:h` the stream,
//! `{p:r:ROOM}:t` its byte count and low-water mark, `{p:r:ROOM}:d:KEY` the idempotency keys
//! (see [`SEND`]).
//!
//! Every third of the TTL the worker refreshes this instance's heartbeat and sweeps: an
//! instance whose heartbeat expired (killed without a goodbye) is removed, its connections
//! uncounted, and the users left with none are announced offline to their rooms. The sweep is
//! one script, so when several instances sweep, exactly one announces. Presence changes are
//! coalesced per user over `--presence-interval`: a few times per interval the worker also
//! announces the held ones that are due (`coalesce.rs`).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::{Script, Value};

use super::{Backoff, Backplane, RoomAck, RoomJob, RoomTarget};
use crate::bus::{Admission, ApiAnswer, Bus, CoreMsg, RoomAnswer};
use crate::protocol::ErrorCode;
use crate::rooms::{RoomError, RoomId, RoomsConfig};
use crate::UserId;

const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a done join or leave may wait for this instance's routes before it is acked anyway.
const ACK_WAIT: Duration = Duration::from_secs(5);

/// Shared by the presence scripts (and the server API's, in `api_queries.rs`): ARGV[1] is the
/// prefix, ARGV[2] this instance's node id.
/// `live(user)` counts the user's connections on instances whose heartbeat exists (this one
/// always counts: a long job may delay its own refresh); `announce` publishes
/// `presenceChanged` on each of the user's rooms, as an event kept in no history.
macro_rules! presence_lib {
    () => {
        r#"
local p = ARGV[1]
local node = ARGV[2]
local function live(user)
  local h = redis.call('HGETALL', p .. ':p:' .. user)
  local total = 0
  for i = 1, #h, 2 do
    if h[i] == node or redis.call('EXISTS', p .. ':n:' .. h[i]) == 1 then
      total = total + tonumber(h[i + 1])
    end
  end
  return total
end
local function announce(user, online)
  for _, room in ipairs(redis.call('SMEMBERS', p .. ':ur:' .. user)) do
    local frame = cjson.encode({event = 'presenceChanged',
      args = {room = room, user = user, online = online}})
    redis.call('PUBLISH', '{' .. p .. ':r:' .. room .. '}', node .. ' - ' .. frame)
  end
end
"#
    };
}

// After the macro: the server API's scripts use it too.
pub(super) mod api_queries;
#[macro_use]
mod coalesce;
#[macro_use]
mod devices;

/// ARGV: prefix, node, room, user, max rooms per user, max members. Joins and tells every
/// instance hosting the user, on the user's channel, in the same step.
const JOIN: &str = r#"
local p, node, room, user = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local ukey, mkey = p .. ':ur:' .. user, p .. ':rm:' .. room
if redis.call('SISMEMBER', ukey, room) == 1 then return 'ok' end
if redis.call('SCARD', ukey) >= tonumber(ARGV[5]) then return '!room_limit' end
if redis.call('SCARD', mkey) >= tonumber(ARGV[6]) then return '!room_full' end
redis.call('SADD', ukey, room)
redis.call('SADD', mkey, user)
redis.call('PUBLISH', p .. ':u:' .. user, node .. ' ! +' .. room)
return 'ok'
"#;

/// ARGV: prefix, node, room, user.
const LEAVE: &str = r#"
local p, node, room, user = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if redis.call('SREM', p .. ':ur:' .. user, room) == 0 then return '!not_member' end
redis.call('SREM', p .. ':rm:' .. room, user)
redis.call('PUBLISH', p .. ':u:' .. user, node .. ' ! -' .. room)
return 'ok'
"#;

/// ARGV: prefix, node, room, sender, frame (without offset), history `1`/`0`, max length,
/// max age in ms, idempotency key (empty: none), dedupe window in ms, max bytes.
///
/// With history the frame is stored **once**, in the room's stream `{p:r:ROOM}:h` (field `f`),
/// and published on the room's channel with its offset and room spliced in; every member
/// device gets that one publication. The bounds are exact: after the append the oldest entries
/// go while the room is over its length or byte bound or they are past the age (the new entry
/// always stays), read oldest first (one entry, then 16 at a time), then one exact
/// `XTRIM MINID`. `{p:r:ROOM}:t` keeps the byte count (`bytes`) and
/// `low`, the newest offset no longer retained (or, for a new stream, its first entry): a
/// resume after an offset at or above `low` is complete. Both keys expire after the max age
/// without appends. Returns the id (`-` without history) or `!not_member`; with an idempotency
/// key already recorded for the room, that earlier answer, and nothing is stored or published
/// again.
const SEND: &str = r#"
local p, node, room, user, frame = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local tag = '{' .. p .. ':r:' .. room .. '}'
if redis.call('SISMEMBER', p .. ':rm:' .. room, user) == 0 then return '!not_member' end
local dkey = false
if ARGV[9] ~= '' then
  dkey = tag .. ':d:' .. ARGV[9]
  local earlier = redis.call('GET', dkey)
  if earlier then return earlier end
end
if ARGV[6] ~= '1' then
  redis.call('PUBLISH', tag, node .. ' - ' .. frame)
  if dkey then redis.call('SET', dkey, '-', 'PX', ARGV[10]) end
  return '-'
end
local stream, tkey = tag .. ':h', tag .. ':t'
local maxlen, maxage, maxbytes = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[11])
local id = redis.call('XADD', stream, '*', 'f', frame)
local len = redis.call('XLEN', stream)
local total
if len == 1 then
  total = #frame
  redis.call('HSET', tkey, 'bytes', total, 'low', id)
else
  total = redis.call('HINCRBY', tkey, 'bytes', #frame)
end
local cutoff = tonumber(string.match(id, '^%d+')) - maxage
-- The oldest entry alone first: usually it stays, and nothing more is read.
local from, keep, dropped, count = '-', false, false, 1
while not keep do
  local batch = redis.call('XRANGE', stream, from, '+', 'COUNT', count)
  count = 16
  if #batch == 0 then break end
  for _, e in ipairs(batch) do
    local old = tonumber(string.match(e[1], '^%d+')) < cutoff
    if e[1] ~= id and (len > maxlen or total > maxbytes or old) then
      len, total, dropped = len - 1, total - #e[2][2], e[1]
    else
      keep = e[1]
      break
    end
  end
  from = '(' .. batch[#batch][1]
end
if dropped then
  redis.call('XTRIM', stream, 'MINID', keep)
  redis.call('HSET', tkey, 'bytes', total, 'low', dropped)
end
redis.call('PEXPIRE', stream, maxage)
redis.call('PEXPIRE', tkey, maxage)
if dkey then redis.call('SET', dkey, id, 'PX', ARGV[10]) end
local framed = string.sub(frame, 1, -2) .. ',"room":"' .. room .. '","offset":"' .. id .. '"}'
redis.call('PUBLISH', tag, node .. ' ' .. id .. ' ' .. framed)
return id
"#;

/// ARGV: prefix, node, room, user. The members with a live connection, or `!not_member`.
const PRESENCE: &str = concat!(
    presence_lib!(),
    r#"
local room, user = ARGV[3], ARGV[4]
local mkey = p .. ':rm:' .. room
if redis.call('SISMEMBER', mkey, user) == 0 then return '!not_member' end
local out = {}
for _, m in ipairs(redis.call('SMEMBERS', mkey)) do
  if live(m) > 0 then out[#out + 1] = m end
end
table.sort(out)
return out
"#
);

/// ARGV: prefix, node, user, device limit (0 = none), device id, presence interval in ms.
/// Counts the connection and returns the user's live connections before it. At the limit the
/// oldest device makes room (`devices.rs`: newest wins); the user coming online is announced
/// or held (`coalesce.rs`).
const CONNECT: &str = concat!(
    presence_lib!(),
    devices_lib!(),
    coalesce_lib!(),
    r#"
local user, limit = ARGV[3], tonumber(ARGV[4])
local before = live(user)
if limit > 0 then admit_device(user, ARGV[5], limit) end
redis.call('HINCRBY', p .. ':p:' .. user, node, 1)
redis.call('SADD', p .. ':n:' .. node .. ':users', user)
if before == 0 then changed(user, true) end
return before
"#
);

/// ARGV: prefix, node, user, device id, presence interval in ms. Uncounts one connection.
const DISCONNECT: &str = concat!(
    presence_lib!(),
    devices_lib!(),
    coalesce_lib!(),
    r#"
local user = ARGV[3]
forget_device(user, ARGV[4])
local n = redis.call('HINCRBY', p .. ':p:' .. user, node, -1)
if n > 0 then return n end
redis.call('HDEL', p .. ':p:' .. user, node)
redis.call('SREM', p .. ':n:' .. node .. ':users', user)
-- Below zero: a sweep already removed this instance's count (and announced).
if n == 0 and live(user) == 0 then changed(user, false) end
return 0
"#
);

/// ARGV: prefix, node, presence interval in ms. Removes every instance whose heartbeat expired;
/// returns how many.
const SWEEP: &str = concat!(
    presence_lib!(),
    devices_lib!(),
    coalesce_lib!(),
    r#"
local swept = 0
for _, dead in ipairs(redis.call('SMEMBERS', p .. ':nodes')) do
  if dead ~= node and redis.call('EXISTS', p .. ':n:' .. dead) == 0 then
    redis.call('SREM', p .. ':nodes', dead)
    local ukey = p .. ':n:' .. dead .. ':users'
    for _, user in ipairs(redis.call('SMEMBERS', ukey)) do
      redis.call('HDEL', p .. ':p:' .. user, dead)
      forget_devices_of(user, dead)
      if live(user) == 0 then changed(user, false) end
    end
    redis.call('DEL', ukey)
    swept = swept + 1
  end
end
return swept
"#
);

/// ARGV: prefix, node, presence interval in ms. This instance leaves: its connections are
/// uncounted and the users left with none announced offline (or held, for another instance's
/// flush), as a sweep would after the TTL, only at once.
const GOODBYE: &str = concat!(
    presence_lib!(),
    devices_lib!(),
    coalesce_lib!(),
    r#"
redis.call('DEL', p .. ':n:' .. node)
redis.call('SREM', p .. ':nodes', node)
local ukey = p .. ':n:' .. node .. ':users'
local users = redis.call('SMEMBERS', ukey)
for _, user in ipairs(users) do
  redis.call('HDEL', p .. ':p:' .. user, node)
  forget_devices_of(user, node)
end
for _, user in ipairs(users) do
  if live(user) == 0 then changed(user, false) end
end
redis.call('DEL', ukey)
return #users
"#
);

struct Scripts {
    join: Script,
    leave: Script,
    send: Script,
    presence: Script,
    connect: Script,
    disconnect: Script,
    sweep: Script,
    goodbye: Script,
    flush: Script,
}

impl Scripts {
    fn new() -> Self {
        Scripts {
            join: Script::new(JOIN),
            leave: Script::new(LEAVE),
            send: Script::new(SEND),
            presence: Script::new(PRESENCE),
            connect: Script::new(CONNECT),
            disconnect: Script::new(DISCONNECT),
            sweep: Script::new(SWEEP),
            goodbye: Script::new(GOODBYE),
            flush: Script::new(coalesce::FLUSH),
        }
    }
}

struct Worker {
    bp: Arc<Backplane>,
    bus: Arc<Bus>,
    config: RoomsConfig,
    conn: Option<redis::Connection>,
    backoff: Backoff,
    scripts: Scripts,
    prefix: String,
    node: String,
}

/// Runs until [`RoomJob::Stop`] (sent by [`Backplane::stop`] after the cores finished).
pub(crate) fn run(bp: Arc<Backplane>, bus: Arc<Bus>, rx: Receiver<RoomJob>) {
    let Some(config) = bp.rooms().cloned() else {
        return;
    };
    let beat_every = config.presence_ttl / 3;
    let mut w = Worker {
        backoff: Backoff::new(
            bp.config.reconnect_min,
            bp.config.reconnect_max,
            bp.node_id ^ 0x7005,
        ),
        prefix: bp.config.channel_prefix.clone(),
        node: format!("{:016x}", bp.node_id),
        bp,
        bus,
        config,
        conn: None,
        scripts: Scripts::new(),
    };
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
                let interval = w.interval_ms();
                let goodbye = |c: &mut redis::Connection, s: &Scripts, p: &str, n: &str| {
                    s.goodbye.arg(p).arg(n).arg(interval).invoke::<i64>(c)
                };
                if let Err(e) = w.call(goodbye) {
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
    /// Runs `f` on the connection, (re)opening it first; a failure drops the connection.
    fn call<T>(
        &mut self,
        f: impl FnOnce(&mut redis::Connection, &Scripts, &str, &str) -> redis::RedisResult<T>,
    ) -> redis::RedisResult<T> {
        if self.bp.master_moved() {
            self.conn = None;
        }
        if self.conn.is_none() {
            let c = self
                .bp
                .config
                .client(&self.bp.redis_url())?
                .get_connection_with_timeout(IO_TIMEOUT)?;
            c.set_read_timeout(Some(IO_TIMEOUT))?;
            c.set_write_timeout(Some(IO_TIMEOUT))?;
            self.conn = Some(c);
        }
        let Some(conn) = self.conn.as_mut() else {
            return Err((redis::ErrorKind::Io, "not connected").into());
        };
        let result = f(conn, &self.scripts, &self.prefix, &self.node);
        match &result {
            Ok(_) => self.backoff.reset(),
            Err(_) => self.conn = None,
        }
        result
    }

    /// Refreshes this instance's heartbeat, then removes instances whose heartbeat expired.
    fn heartbeat(&mut self) -> redis::RedisResult<()> {
        let ttl_ms = self.config.presence_ttl.as_millis() as u64;
        let interval = self.interval_ms();
        let swept = self.call(|c, s, p, n| {
            redis::pipe()
                .cmd("SET")
                .arg(format!("{p}:n:{n}"))
                .arg(1)
                .arg("PX")
                .arg(ttl_ms)
                .ignore()
                .cmd("SADD")
                .arg(format!("{p}:nodes"))
                .arg(n)
                .ignore()
                .exec(c)?;
            s.sweep.arg(p).arg(n).arg(interval).invoke::<i64>(c)
        })?;
        if swept > 0 {
            log::info!("presence: {swept} instance(s) stopped refreshing their heartbeat; their users were uncounted");
        }
        Ok(())
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
        log::warn!("redis rooms request failed: {e}");
        (
            ErrorCode::Internal.as_str(),
            format!("rooms unavailable: {e}"),
        )
    }

    fn handle(&mut self, job: RoomJob) {
        match job {
            RoomJob::Join { user, room, target } => {
                let (max_rooms, max_members) =
                    (self.config.max_rooms_per_user, self.config.max_room_members);
                let reply = self.call(|c, s, p, n| {
                    s.join
                        .arg(p)
                        .arg(n)
                        .arg(&*room)
                        .arg(&*user)
                        .arg(max_rooms)
                        .arg(max_members)
                        .invoke::<String>(c)
                });
                self.membership_done(reply, user, room, true, target);
            }
            RoomJob::Leave { user, room, target } => {
                let reply = self.call(|c, s, p, n| {
                    s.leave
                        .arg(p)
                        .arg(n)
                        .arg(&*room)
                        .arg(&*user)
                        .invoke::<String>(c)
                });
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
                let reply = self.call(|c, s, p, n| {
                    let (on, max_len, max_age, max_bytes) = match history {
                        Some((len, age, bytes)) => ("1", len, age, bytes),
                        None => ("0", 0, 0, 0),
                    };
                    s.send
                        .arg(p)
                        .arg(n)
                        .arg(&*room)
                        .arg(&*user)
                        .arg(frame.as_str())
                        .arg(on)
                        .arg(max_len)
                        .arg(max_age)
                        .arg(dedupe.as_deref().unwrap_or(""))
                        .arg(window.as_millis() as u64)
                        .arg(max_bytes)
                        .invoke::<String>(c)
                });
                let result = match reply {
                    Ok(r) if r.starts_with('!') => Err(self.refusal(&r, &room)),
                    Ok(_) => Ok(serde_json::json!({ "id": id, "ts": ts })),
                    Err(e) => Err(self.unavailable(&e)),
                };
                self.answer(target, result);
            }
            RoomJob::Presence { user, room, target } => {
                let reply = self.call(|c, s, p, n| {
                    s.presence
                        .arg(p)
                        .arg(n)
                        .arg(&*room)
                        .arg(&*user)
                        .invoke::<Value>(c)
                });
                let result = match reply {
                    Ok(Value::Array(items)) => {
                        let online: Vec<String> = items
                            .iter()
                            .filter_map(|v| redis::from_redis_value_ref::<String>(v).ok())
                            .collect();
                        Ok(serde_json::json!({ "room": &*room, "online": online }))
                    }
                    Ok(other) => {
                        let text =
                            redis::from_redis_value_ref::<String>(&other).unwrap_or_default();
                        Err(self.refusal(&text, &room))
                    }
                    Err(e) => Err(self.unavailable(&e)),
                };
                self.answer(target, result);
            }
            RoomJob::Load { user } => {
                let reply = self.call(|c, _, p, _| {
                    redis::cmd("SMEMBERS")
                        .arg(format!("{p}:ur:{user}"))
                        .query::<Vec<String>>(c)
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
            } => {
                let limit = self.config.max_devices;
                let device = devices::device_id(self.bp.node_id, core, key, serial);
                let interval = self.interval_ms();
                let reply = self.call(|c, s, p, n| {
                    s.connect
                        .arg(p)
                        .arg(n)
                        .arg(&*user)
                        .arg(limit)
                        .arg(&device)
                        .arg(interval)
                        .invoke::<i64>(c)
                });
                let (admitted, counted) = match reply {
                    Ok(before) => (before >= 0, before >= 0),
                    Err(e) => {
                        // Fail open: a Redis outage must not lock every user out.
                        log::warn!("redis: counting a connection of {user} failed: {e}");
                        (true, false)
                    }
                };
                let verdict = Admission {
                    key,
                    serial,
                    user,
                    admitted,
                    counted,
                };
                if !self.bus.send(core, CoreMsg::Admission(Box::new(verdict))) {
                    self.bp.stats.inbox_drops.fetch_add(1, Relaxed);
                }
            }
            RoomJob::Disconnected {
                user,
                core,
                key,
                serial,
            } => {
                let device = devices::device_id(self.bp.node_id, core, key, serial);
                let interval = self.interval_ms();
                let reply = self.call(|c, s, p, n| {
                    s.disconnect
                        .arg(p)
                        .arg(n)
                        .arg(&*user)
                        .arg(&device)
                        .arg(interval)
                        .invoke::<i64>(c)
                });
                if let Err(e) = reply {
                    log::warn!("redis: uncounting a connection of {user} failed: {e}");
                }
            }
            RoomJob::Api {
                query,
                target,
                pending,
            } => {
                let result = self
                    .call(|c, _, p, n| api_queries::run(c, p, n, &query))
                    .map_err(|e| {
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
        let w = Worker {
            backoff: Backoff::new(Duration::from_millis(1), Duration::from_millis(2), 1),
            prefix: "sb".into(),
            node: format!("{:016x}", 0xabc),
            bp: Arc::clone(&bp),
            bus: Arc::clone(&bus),
            config: RoomsConfig {
                max_rooms_per_user: 3,
                max_room_members: 4,
                ..RoomsConfig::default()
            },
            conn: None,
            scripts: Scripts::new(),
        };
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
}
