//! The device limit with Redis (`--max-devices`): newest wins. Each counted connection of a
//! user is an entry of `{p:u:USER}:dev` (sorted set in the user's slot, [`DeviceId`] → connect
//! time in ms, Redis's clock, raised past the newest entry's so admissions never tie). A
//! connection that finds the user at the limit drops the entries of instances found dead (a
//! crashed instance's devices: nobody is told), then the oldest live ones, each with a close
//! request `<node> ! d<device>` on the user's channel (the instance holding it closes it with
//! 4009), and is itself always admitted. So a crash never locks a user out, and the limit
//! holds: the set never has more than the limit, a device over it closes at once on its live
//! instance.
//!
//! Why not refuse the newest with a short heartbeat TTL instead: the lockout would still last
//! the TTL, clients would have to retry 4009 on a timer (and a user really over the limit
//! would retry forever), and a short TTL sweeps a slow but live instance's users as offline.
//!
//! The set is only kept with a limit (`CONNECT` adds nothing without one); `DISCONNECT` and
//! `UNCOUNT` (a dead instance's sweep, a goodbye) remove entries whatever the limit, so it is
//! never larger than the limit plus the connections opened before the limit was set.

use crate::backplane::wire::DeviceId;

/// The Lua functions of the device set, for the user-side scripts in `scripts.rs`; they need
/// `presence_lib!` before them (KEYS[3] the device set, `node`, `dead`, `publish`,
/// `channel`).
macro_rules! devices_lib {
    () => {
        r#"
-- Newest wins: makes room for `device` under `limit`, then adds it.
local function admit_device(device, limit)
  local dkey = KEYS[3]
  if redis.call('ZCARD', dkey) >= limit then
    for _, d in ipairs(redis.call('ZRANGE', dkey, 0, -1)) do
      local holder = string.sub(d, 1, 16)
      if holder ~= node and dead[holder] then redis.call('ZREM', dkey, d) end
    end
    local over = redis.call('ZCARD', dkey) - limit + 1
    if over > 0 then
      for _, d in ipairs(redis.call('ZRANGE', dkey, 0, over - 1)) do
        redis.call('ZREM', dkey, d)
        redis.call(publish, channel, node .. ' ! d' .. d)
      end
    end
  end
  -- Scores order the devices by admission: two admitted in the same millisecond must not tie
  -- (ties sort by name, and the newer could then be closed as the oldest).
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local newest = redis.call('ZRANGE', dkey, -1, -1, 'WITHSCORES')
  if newest[2] and tonumber(newest[2]) >= now then now = tonumber(newest[2]) + 1 end
  redis.call('ZADD', dkey, now, device)
end
local function forget_device(device)
  redis.call('ZREM', KEYS[3], device)
end
-- The devices `holder` (an instance that is gone) had.
local function forget_devices_of(holder)
  for _, d in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
    if string.sub(d, 1, 16) == holder then redis.call('ZREM', KEYS[3], d) end
  end
end
"#
    };
}

/// This instance's connection `key` (`serial`) on `core`, as the device set names it.
pub(super) fn device_id(node: u64, core: usize, key: usize, serial: u64) -> String {
    DeviceId {
        node,
        core,
        key,
        serial,
    }
    .to_string()
}
