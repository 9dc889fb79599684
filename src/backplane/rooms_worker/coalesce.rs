//! Presence changes coalesced per user with Redis (`--presence-interval`), cluster-wide, with
//! the embedded rule (`core_loop/presence.rs`): a user's first change after a quiet interval is
//! announced at once; a change within the interval after an announcement is held, and at the
//! interval's end the state the user is in then is announced, if it differs from the last one
//! announced. A user reconnecting in a loop thus costs each of its rooms at most one
//! `presenceChanged` per interval, and the final state is always announced.
//!
//! Keys: `{p:u:USER}:pa` the last announcement (hash `on` 1/0, `at` ms on Redis's clock, in the
//! user's slot; expires a while after it stops mattering), `{p:n}:pq` the held users (sorted
//! set in the registry's slot, user → when its interval ends). The user-side scripts decide
//! (`coalesce_lib!`) and return when a held change is due; the worker then adds the user to
//! the queue (a second step in another slot: an instance that dies in between loses that held
//! change, and the user's last announcement stands). Every instance's rooms worker runs
//! [`FLUSH`] a few times per interval: it takes the users whose interval ended, in one script,
//! so however many instances flush, a held change is settled once (`SETTLE`, in the user's
//! slot, announces the state then if it differs). The scripts read Redis's clock with `TIME`
//! before writing: Redis 5 or newer, which replicates a script's effects.

use std::time::Duration;

use super::{keys, Worker};

/// Held users one [`FLUSH`] takes at most; a full batch is followed by another at once.
const FLUSH_BATCH: usize = 256;

/// How often per interval a worker flushes: a held change is announced at most a quarter of
/// an interval after the interval ends.
const FLUSHES_PER_INTERVAL: u32 = 4;

/// The Lua functions of coalescing, for the user-side scripts in `scripts.rs`; they need
/// `presence_lib!` before them (KEYS[4] the last announcement, `interval`).
/// `changed(online)` returns 0 when the change is to be announced now (and records it), else
/// when the held change is due (ms, Redis's clock).
macro_rules! coalesce_lib {
    () => {
        r#"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function record(online, now)
  redis.call('HSET', KEYS[4], 'on', online and '1' or '0', 'at', now)
  -- Kept past the interval so a late flush still compares against it; once gone, a flush
  -- announces the state as it is (a repeat at worst, never a missed change).
  redis.call('PEXPIRE', KEYS[4], interval * 4 + 10000)
end
local function changed(online)
  if interval <= 0 then return 0 end
  local now = now_ms()
  local at = tonumber(redis.call('HGET', KEYS[4], 'at') or '0')
  if now - at < interval then return at + interval end
  record(online, now)
  return 0
end
"#
    };
}

/// KEYS: the held queue; ARGV: batch. Takes the users whose interval ended (Redis's clock).
pub(super) const FLUSH: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, user in ipairs(due) do redis.call('ZREM', KEYS[1], user) end
return due
"#;

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

    /// Queues `user`'s held change, due at `due` (ms, Redis's clock); a user already queued
    /// keeps its earlier time.
    pub(super) fn hold(&mut self, user: &str, due: i64) {
        let queue = self.registry.held();
        let queued = self.on(&queue, |c, _| {
            redis::cmd("ZADD")
                .arg(&queue)
                .arg("NX")
                .arg(due)
                .arg(user)
                .query::<i64>(c)
        });
        if let Err(e) = queued {
            log::warn!("redis: holding a presence change of {user} failed: {e}");
        }
    }

    /// Announces the held presence changes whose interval ended (any instance's: one script
    /// takes each once). Returns when to flush next.
    pub(super) fn flush_presence(&mut self) -> Option<Duration> {
        let queue = self.registry.held();
        let reply = self.on(&queue, |c, s| {
            s.flush
                .key(&queue)
                .arg(FLUSH_BATCH)
                .invoke::<Vec<String>>(c)
        });
        let due = match reply {
            Ok(due) => due,
            Err(e) => {
                // The heartbeat reports the outage; the next flush, an interval (at least half
                // a second) later, takes what is due then.
                log::debug!("redis: flushing held presence changes failed: {e}");
                return Some(
                    self.config
                        .presence_interval
                        .max(Duration::from_millis(500)),
                );
            }
        };
        for user in &due {
            if let Err(e) = self.settle(user) {
                log::warn!("redis: settling the presence of {user} failed: {e}");
            }
        }
        next_flush(self.config.presence_interval, due.len())
    }

    /// A held change's interval ended: announces the user's state if it differs from the last
    /// one announced.
    fn settle(&mut self, user: &str) -> redis::RedisResult<()> {
        let user_keys = keys::UserKeys::new(&self.prefix, user);
        let args = self.presence_args(user);
        let reply: Vec<redis::Value> = self.on(&user_keys.counts, |c, s| {
            super::presence::run_user_script(&s.settle, &user_keys, &args, &[], c)
        })?;
        let (numbers, rooms) = super::presence::split_reply(reply, 1);
        if numbers[0] != 0 {
            self.announce(user, &rooms, numbers[0] > 0);
        }
        Ok(())
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
