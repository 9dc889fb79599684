//! Presence changes coalesced per user with Redis (`--presence-interval`), cluster-wide, with
//! the embedded rule (`core_loop/presence.rs`): a user's first change after a quiet interval is
//! announced at once; a change within the interval after an announcement is held, and at the
//! interval's end the state the user is in then is announced, if it differs from the last one
//! announced. A user reconnecting in a loop thus costs each of its rooms at most one
//! `presenceChanged` per interval, and the final state is always announced.
//!
//! Keys: `p:pa:{user}` the last announcement (hash `on` 1/0, `at` ms on Redis's clock; expires
//! a while after it stops mattering), `p:pq` the held users (sorted set, user → when its
//! interval ends). Every instance's rooms worker runs [`FLUSH`] a few times per interval; it
//! takes the users whose interval ended and announces their state then, in one script, so
//! however many instances flush, a held change is announced once. (The scripts read Redis's
//! clock with `TIME` before writing: Redis 5 or newer, which replicates a script's effects.)

use std::time::Duration;

use super::Worker;

/// Held users one [`FLUSH`] takes at most; a full batch is followed by another at once.
const FLUSH_BATCH: usize = 256;

/// How often per interval a worker flushes: a held change is announced at most a quarter of
/// an interval after the interval ends.
const FLUSHES_PER_INTERVAL: u32 = 4;

/// The Lua functions of coalescing, for the scripts in `rooms_worker.rs`; they need
/// `presence_lib!` before them (`p`, `live`, `announce`). The script's **last** ARGV is the
/// interval in ms (0: every change announced at once).
macro_rules! coalesce_lib {
    () => {
        r#"
local interval = tonumber(ARGV[#ARGV])
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function announced(user, online, now)
  announce(user, online)
  local akey = p .. ':pa:' .. user
  redis.call('HSET', akey, 'on', online and '1' or '0', 'at', now)
  -- Kept past the interval so a late flush still compares against it; once gone, a flush
  -- announces the state as it is (a repeat at worst, never a missed change).
  redis.call('PEXPIRE', akey, interval * 4 + 10000)
end
-- `user` went online or offline: announced now, or held to the end of its interval.
local function changed(user, online)
  if interval <= 0 then
    announce(user, online)
    return
  end
  local now = now_ms()
  local at = tonumber(redis.call('HGET', p .. ':pa:' .. user, 'at') or '0')
  if now - at < interval then
    redis.call('ZADD', p .. ':pq', 'NX', at + interval, user)
    return
  end
  announced(user, online, now)
end
"#
    };
}

/// ARGV: prefix, node, batch, interval in ms. Announces the users whose interval ended, where
/// their state differs from the last announced; returns how many users it took.
pub(super) const FLUSH: &str = concat!(
    presence_lib!(),
    coalesce_lib!(),
    r#"
local queue = p .. ':pq'
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', queue, '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
for _, user in ipairs(due) do
  redis.call('ZREM', queue, user)
  local online = live(user) > 0
  if redis.call('HGET', p .. ':pa:' .. user, 'on') ~= (online and '1' or '0') then
    announced(user, online, now)
  end
end
return #due
"#
);

/// When the worker flushes next, `now` being a flush (or the start): `None` without coalescing.
/// A full batch means more are due: at once.
pub(super) fn next_flush(interval: Duration, took: usize) -> Option<Duration> {
    if interval.is_zero() {
        return None;
    }
    if took >= FLUSH_BATCH {
        return Some(Duration::ZERO);
    }
    Some((interval / FLUSHES_PER_INTERVAL).max(Duration::from_millis(10)))
}

impl Worker {
    /// `--presence-interval` as the scripts take it.
    pub(super) fn interval_ms(&self) -> u64 {
        self.config.presence_interval.as_millis() as u64
    }

    /// Announces the held presence changes whose interval ended (any instance's: one script
    /// takes each once). Returns when to flush next.
    pub(super) fn flush_presence(&mut self) -> Option<Duration> {
        let interval = self.interval_ms();
        let reply = self.call(|c, s, p, n| {
            s.flush
                .arg(p)
                .arg(n)
                .arg(FLUSH_BATCH)
                .arg(interval)
                .invoke::<i64>(c)
        });
        match reply {
            Ok(took) => next_flush(self.config.presence_interval, took.max(0) as usize),
            Err(e) => {
                // The heartbeat reports the outage; the next flush, an interval (at least half
                // a second) later, takes what is due then.
                log::debug!("redis: flushing held presence changes failed: {e}");
                Some(
                    self.config
                        .presence_interval
                        .max(Duration::from_millis(500)),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flushes_come_a_few_times_per_interval_and_at_once_after_a_full_batch() {
        assert_eq!(next_flush(Duration::ZERO, 0), None);
        assert_eq!(
            next_flush(Duration::from_secs(1), 3),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            next_flush(Duration::from_millis(20), 0),
            Some(Duration::from_millis(10))
        );
        assert_eq!(
            next_flush(Duration::from_secs(1), FLUSH_BATCH),
            Some(Duration::ZERO)
        );
    }
}
