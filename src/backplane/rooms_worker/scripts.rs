//! The rooms worker's Lua scripts. Each one touches the keys of one hash slot (the keys are
//! named in `keys.rs`), so it runs on a Redis Cluster's shard as on one Redis; what spans two
//! slots is two scripts, run in an order that a crash in between leaves repairable (see
//! `rooms_worker.rs`). Publications go out with the command the worker passes: `PUBLISH` on one
//! Redis, `SPUBLISH` (sharded pub/sub, in the channel's slot) on a cluster.

use redis::Script;

/// The user-side presence scripts' shared part. KEYS: [1] the user's counts (hash node →
/// count), [2] the user's rooms, [3] the user's devices (`devices.rs`), [4] the user's last
/// announcement (`coalesce.rs`). ARGV: [1] this instance's node id, [2] the instances found dead
/// (space separated, from the worker's last registry read), [3] the publish command, [4] the
/// user's channel, [5] `--presence-interval` in ms; then the script's own. `live()` counts the
/// user's connections on every instance but the dead ones (this one always counts: a long job
/// may delay its own heartbeat). `rooms_after(first...)` is the reply that announces: the
/// given numbers, then the user's rooms.
macro_rules! presence_lib {
    () => {
        r#"
local node, publish, channel = ARGV[1], ARGV[3], ARGV[4]
local interval = tonumber(ARGV[5])
local dead = {}
for d in string.gmatch(ARGV[2], '%S+') do dead[d] = true end
local function live()
  local h = redis.call('HGETALL', KEYS[1])
  local total = 0
  for i = 1, #h, 2 do
    if h[i] == node or not dead[h[i]] then total = total + tonumber(h[i + 1]) end
  end
  return total
end
local function rooms_after(...)
  local out = {...}
  for _, room in ipairs(redis.call('SMEMBERS', KEYS[2])) do out[#out + 1] = room end
  return out
end
"#
    };
}

/// Room side of a join. KEYS[1] the room's members; ARGV user, max members. Returns `member`
/// (already), `added` or `!room_full`.
pub const ROOM_JOIN: &str = r#"
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 'member' end
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) then return '!room_full' end
redis.call('SADD', KEYS[1], ARGV[1])
return 'added'
"#;

/// User side of a join. KEYS[1] the user's rooms; ARGV room, max rooms per user, publish
/// command, the user's channel, the control payload. Adds the room and tells every instance
/// hosting the user, on the user's channel, in the same step. Returns `ok` or `!room_limit`.
pub const USER_JOIN: &str = r#"
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 'ok' end
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) then return '!room_limit' end
redis.call('SADD', KEYS[1], ARGV[1])
redis.call(ARGV[3], ARGV[4], ARGV[5])
return 'ok'
"#;

/// User side of a leave. KEYS[1] the user's rooms; ARGV room, publish command, the user's
/// channel, the control payload. Returns 1 when the user was in the room, else 0.
pub const USER_LEAVE: &str = r#"
if redis.call('SREM', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call(ARGV[2], ARGV[3], ARGV[4])
return 1
"#;

/// ARGV: prefix, node, room, sender, frame (without offset), history `1`/`0`, max length,
/// max age in ms, idempotency key (empty: none), dedupe window in ms, max bytes, publish
/// command. Every key is in the room's slot (`{p:r:ROOM}`), the members set included.
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
pub const SEND: &str = r#"
local p, node, room, user, frame = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local publish = ARGV[12]
local tag = '{' .. p .. ':r:' .. room .. '}'
if redis.call('SISMEMBER', tag .. ':m', user) == 0 then return '!not_member' end
local dkey = false
if ARGV[9] ~= '' then
  dkey = tag .. ':d:' .. ARGV[9]
  local earlier = redis.call('GET', dkey)
  if earlier then return earlier end
end
if ARGV[6] ~= '1' then
  redis.call(publish, tag, node .. ' - ' .. frame)
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
redis.call(publish, tag, node .. ' ' .. id .. ' ' .. framed)
return id
"#;

/// The user-side scripts (KEYS and ARGV[1..5] as `presence_lib!` says) each end with a change
/// code: -1 nothing to announce, 0 announce now (the user's rooms follow), above 0 the change is
/// held until then (ms, Redis's clock; `coalesce.rs`).
///
/// CONNECT: ARGV[6] the device limit (0 = none), ARGV[7] the device id. Counts the connection
/// (at the limit the oldest device makes room, `devices.rs`). Returns `{before, ours, change,
/// rooms...}`: the user's live connections before it, this instance's count of the user after
/// it.
pub const CONNECT: &str = concat!(
    presence_lib!(),
    devices_lib!(),
    coalesce_lib!(),
    r#"
local limit = tonumber(ARGV[6])
local before = live()
if limit > 0 then admit_device(ARGV[7], limit) end
local ours = redis.call('HINCRBY', KEYS[1], node, 1)
if before > 0 then return {before, ours, -1} end
local held = changed(true)
if held > 0 then return {before, ours, held} end
return rooms_after(before, ours, 0)
"#
);

/// DISCONNECT: ARGV[6] the device id. Uncounts one connection. Returns `{ours, change,
/// rooms...}`: this instance's count of the user after it.
pub const DISCONNECT: &str = concat!(
    presence_lib!(),
    devices_lib!(),
    coalesce_lib!(),
    r#"
forget_device(ARGV[6])
local n = redis.call('HINCRBY', KEYS[1], node, -1)
if n > 0 then return {n, -1} end
redis.call('HDEL', KEYS[1], node)
-- Below zero: a sweep already removed this instance's count (and announced).
if n < 0 or live() > 0 then return {0, -1} end
local held = changed(false)
if held > 0 then return {0, held} end
return rooms_after(0, 0)
"#
);

/// UNCOUNT: ARGV[6] the gone instance. Removes its count and devices of the user. Returns
/// `{change, rooms...}`. Only the call that removed the count announces, so two sweepers (or
/// a sweep and a goodbye) announce once.
pub const UNCOUNT: &str = concat!(
    presence_lib!(),
    devices_lib!(),
    coalesce_lib!(),
    r#"
forget_devices_of(ARGV[6])
if redis.call('HDEL', KEYS[1], ARGV[6]) == 0 or live() > 0 then return {-1} end
local held = changed(false)
if held > 0 then return {held} end
return rooms_after(0)
"#
);

/// SETTLE: a held change's interval ended. Returns `{1, rooms...}` (announce online), `{-1,
/// rooms...}` (offline) when the user's state differs from the last one announced, else `{0}`.
pub const SETTLE: &str = concat!(
    presence_lib!(),
    coalesce_lib!(),
    r#"
local online = live() > 0
if redis.call('HGET', KEYS[4], 'on') == (online and '1' or '0') then return {0} end
record(online, now_ms())
return rooms_after(online and 1 or -1)
"#
);

/// KEYS: the registry's nodes, dead, this instance's heartbeat; ARGV: node, TTL in ms, the
/// heartbeat key prefix. Refreshes this instance's heartbeat, moves every instance whose
/// heartbeat expired from the nodes to the dead, and returns the dead.
pub const HEARTBEAT: &str = r#"
redis.call('SET', KEYS[3], 1, 'PX', ARGV[2])
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[2], ARGV[1])
for _, n in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[3] .. n) == 0 then
    redis.call('SREM', KEYS[1], n)
    redis.call('SADD', KEYS[2], n)
  end
end
return redis.call('SMEMBERS', KEYS[2])
"#;

/// KEYS: the registry's nodes; ARGV: node, heartbeat key prefix, users key prefix. Every user
/// counted by an instance whose heartbeat exists (this one always), sorted and distinct.
pub const EVERYONE: &str = r#"
local node = ARGV[1]
local seen, out = {}, {}
local nodes = redis.call('SMEMBERS', KEYS[1])
nodes[#nodes + 1] = node
for _, n in ipairs(nodes) do
  if n == node or redis.call('EXISTS', ARGV[2] .. n) == 1 then
    for _, u in ipairs(redis.call('SMEMBERS', ARGV[3] .. n)) do
      if not seen[u] then seen[u] = true; out[#out + 1] = u end
    end
  end
end
table.sort(out)
return out
"#;

/// Every script, hashed once.
pub struct Scripts {
    pub room_join: Script,
    pub user_join: Script,
    pub user_leave: Script,
    pub send: Script,
    pub connect: Script,
    pub disconnect: Script,
    pub uncount: Script,
    pub settle: Script,
    pub flush: Script,
    pub heartbeat: Script,
    pub everyone: Script,
}

impl Scripts {
    pub fn new() -> Self {
        Scripts {
            room_join: Script::new(ROOM_JOIN),
            user_join: Script::new(USER_JOIN),
            user_leave: Script::new(USER_LEAVE),
            send: Script::new(SEND),
            connect: Script::new(CONNECT),
            disconnect: Script::new(DISCONNECT),
            uncount: Script::new(UNCOUNT),
            settle: Script::new(SETTLE),
            flush: Script::new(super::coalesce::FLUSH),
            heartbeat: Script::new(HEARTBEAT),
            everyone: Script::new(EVERYONE),
        }
    }
}
