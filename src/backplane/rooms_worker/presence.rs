//! The rooms worker's presence: counting connections (and the device limit, `devices.rs`),
//! the heartbeat and the sweep of dead instances, `presenceChanged` to a user's rooms, and who
//! in a room is online. A user's counts live in the user's slot; the announcements go to each
//! room's channel in the room's slot (see the module docs of `rooms_worker.rs`).

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;

use redis::Value;

use super::{devices, keys, Worker};
use crate::backplane::wire;
use crate::bus::{Admission, CoreMsg};
use crate::UserId;

/// A presence script's array reply: its leading integers, then the room names.
pub(super) fn split_reply(reply: Vec<Value>, ints: usize) -> (Vec<i64>, Vec<String>) {
    let mut numbers = Vec::with_capacity(ints);
    let mut rooms = Vec::new();
    for (i, v) in reply.iter().enumerate() {
        if i < ints {
            numbers.push(redis::from_redis_value_ref::<i64>(v).unwrap_or(0));
        } else if let Ok(room) = redis::from_redis_value_ref::<String>(v) {
            rooms.push(room);
        }
    }
    numbers.resize(ints, 0);
    (numbers, rooms)
}

/// The live connections in a user's counts (node → count): all but those of `dead` instances
/// (this instance's always count).
fn live_total(counts: &HashMap<String, i64>, node: &str, dead: &str) -> i64 {
    let dead: Vec<&str> = dead.split_whitespace().collect();
    counts
        .iter()
        .filter(|(n, _)| n.as_str() == node || !dead.contains(&n.as_str()))
        .map(|(_, c)| *c)
        .sum()
}

/// The ARGV every user-side presence script starts with (`presence_lib!` in `scripts.rs`).
pub(super) struct PresenceArgs {
    node: String,
    dead: String,
    publish: &'static str,
    channel: String,
    interval: u64,
}

/// Runs a user-side presence script with the user's keys, the common ARGV, then `extra`.
pub(super) fn run_user_script<T: redis::FromRedisValue>(
    script: &redis::Script,
    keys: &keys::UserKeys,
    args: &PresenceArgs,
    extra: &[String],
    conn: &mut redis::Connection,
) -> redis::RedisResult<T> {
    let mut call = script.key(&keys.counts);
    call.key(&keys.rooms)
        .key(&keys.devices)
        .key(&keys.announced)
        .arg(&args.node)
        .arg(&args.dead)
        .arg(args.publish)
        .arg(&args.channel)
        .arg(args.interval);
    for arg in extra {
        call.arg(arg);
    }
    call.invoke(conn)
}

impl Worker {
    pub(super) fn presence_args(&self, user: &str) -> PresenceArgs {
        PresenceArgs {
            node: self.node.clone(),
            dead: self.dead.clone(),
            publish: self.publish,
            channel: wire::user_channel(&self.prefix, user),
            interval: self.interval_ms(),
        }
    }

    /// Acts on a presence script's change code (see `scripts.rs`): announce now, hold, or
    /// nothing.
    fn after_change(&mut self, user: &str, change: i64, rooms: &[String], online: bool) {
        match change {
            0 => self.announce(user, rooms, online),
            due if due > 0 => self.hold(user, due),
            _ => {}
        }
    }

    /// A connection opened: registers the user under this instance, then counts it (at the
    /// limit the oldest device makes room) and, for the user's first live connection, announces
    /// the user online in each of its rooms (or holds that, `coalesce.rs`).
    pub(super) fn connected(&mut self, user: UserId, core: usize, key: usize, serial: u64) {
        let device = devices::device_id(self.bp.node_id, core, key, serial);
        let reply = self.count(&user, &device);
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

    /// Returns the user's live connections before this one.
    fn count(&mut self, user: &str, device: &str) -> redis::RedisResult<i64> {
        // Registered first: a crash before the count leaves a registered user without one
        // (harmless), never a count the sweep cannot find.
        let users = self.registry.users(&self.node);
        self.on(&users, |c, _| {
            redis::cmd("SADD").arg(&users).arg(user).query::<i64>(c)
        })?;
        let user_keys = keys::UserKeys::new(&self.prefix, user);
        let args = self.presence_args(user);
        let extra = [self.config.max_devices.to_string(), device.to_string()];
        let reply: Vec<Value> = self.on(&user_keys.counts, |c, s| {
            run_user_script(&s.connect, &user_keys, &args, &extra, c)
        })?;
        let (numbers, rooms) = split_reply(reply, 3);
        let (before, ours, change) = (numbers[0], numbers[1], numbers[2]);
        if ours <= 0 {
            self.unregister(user)?;
        }
        self.after_change(user, change, &rooms, true);
        Ok(before)
    }

    /// This instance counts no connection of `user` any more.
    fn unregister(&mut self, user: &str) -> redis::RedisResult<()> {
        let users = self.registry.users(&self.node);
        self.on(&users, |c, _| {
            redis::cmd("SREM").arg(&users).arg(user).query::<i64>(c)
        })?;
        Ok(())
    }

    /// A counted connection ended: uncounts it and, for the user's last live connection,
    /// announces the user offline (or holds that).
    pub(super) fn disconnected(&mut self, user: &str, core: usize, key: usize, serial: u64) {
        let device = devices::device_id(self.bp.node_id, core, key, serial);
        let user_keys = keys::UserKeys::new(&self.prefix, user);
        let args = self.presence_args(user);
        let reply: redis::RedisResult<Vec<Value>> = self.on(&user_keys.counts, |c, s| {
            run_user_script(&s.disconnect, &user_keys, &args, &[device], c)
        });
        let result = reply.and_then(|reply| {
            let (numbers, rooms) = split_reply(reply, 2);
            self.after_change(user, numbers[1], &rooms, false);
            if numbers[0] <= 0 {
                self.unregister(user)?;
            }
            Ok(())
        });
        if let Err(e) = result {
            log::warn!("redis: uncounting a connection of {user} failed: {e}");
        }
    }

    /// Publishes `presenceChanged` on each of `rooms`' channels, as an event kept in no
    /// history. Best effort: a failure is logged (a room's members miss one change).
    pub(super) fn announce(&mut self, user: &str, rooms: &[String], online: bool) {
        for room in rooms {
            let frame = serde_json::json!({
                "event": "presenceChanged",
                "args": { "room": room, "user": user, "online": online },
            });
            let channel = wire::room_channel(&self.prefix, room);
            let payload = format!("{} - {frame}", self.node);
            let publish = self.publish;
            let sent = self.on(&channel, |c, _| {
                redis::cmd(publish)
                    .arg(&channel)
                    .arg(&payload)
                    .query::<i64>(c)
            });
            if let Err(e) = sent {
                log::warn!("redis: announcing {user} in {room} failed: {e}");
            }
        }
    }

    /// Refreshes this instance's heartbeat, reads the dead instances, and uncounts the users
    /// of each one no other instance is uncounting.
    pub(super) fn heartbeat(&mut self) -> redis::RedisResult<()> {
        let ttl_ms = self.config.presence_ttl.as_millis() as u64;
        let r = &self.registry;
        let (nodes, dead, beat, beats) = (
            r.nodes(),
            r.dead(),
            r.heartbeat(&self.node),
            r.heartbeat_prefix(),
        );
        let node = self.node.clone();
        let found: Vec<String> = self.on(&nodes, |c, s| {
            s.heartbeat
                .key(&nodes)
                .key(&dead)
                .key(&beat)
                .arg(&node)
                .arg(ttl_ms)
                .arg(&beats)
                .invoke(c)
        })?;
        self.dead = found.join(" ");
        for gone in found {
            let claim = self.registry.claim(&gone);
            let node = self.node.clone();
            let claimed: Option<String> = self.on(&claim, |c, _| {
                redis::cmd("SET")
                    .arg(&claim)
                    .arg(&node)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl_ms)
                    .query(c)
            })?;
            if claimed.is_some() {
                let swept = self.uncount_instance(&gone)?;
                log::info!(
                    "presence: instance {gone} stopped refreshing its heartbeat; its {swept} \
                     user(s) were uncounted"
                );
            }
        }
        Ok(())
    }

    /// Uncounts every user `gone` counted, announcing offline those left with no live
    /// connection, then drops `gone` from the registry. Returns how many users it had.
    fn uncount_instance(&mut self, gone: &str) -> redis::RedisResult<usize> {
        let users_key = self.registry.users(gone);
        let users: Vec<String> = self.on(&users_key, |c, _| {
            redis::cmd("SMEMBERS").arg(&users_key).query(c)
        })?;
        let dead = if self.dead.split_whitespace().any(|d| d == gone) {
            self.dead.clone()
        } else {
            format!("{} {gone}", self.dead)
        };
        for user in &users {
            let user_keys = keys::UserKeys::new(&self.prefix, user);
            let mut args = self.presence_args(user);
            args.dead.clone_from(&dead);
            let reply: Vec<Value> = self.on(&user_keys.counts, |c, s| {
                run_user_script(&s.uncount, &user_keys, &args, &[gone.to_string()], c)
            })?;
            let (numbers, rooms) = split_reply(reply, 1);
            self.after_change(user, numbers[0], &rooms, false);
        }
        // Only once every user is uncounted does `gone` leave the dead (a sweeper that stops
        // half-way leaves it there for the next one, after the claim expires).
        let (dead_key, claim) = (self.registry.dead(), self.registry.claim(gone));
        self.on(&dead_key, |c, _| {
            redis::pipe()
                .cmd("DEL")
                .arg(&users_key)
                .ignore()
                .cmd("SREM")
                .arg(&dead_key)
                .arg(gone)
                .ignore()
                .cmd("DEL")
                .arg(&claim)
                .ignore()
                .exec(c)
        })?;
        Ok(users.len())
    }

    /// This instance leaves: it is dead to the others at once, its connections are uncounted
    /// and the users left with none announced offline, as a sweep would after the TTL.
    pub(super) fn goodbye(&mut self) -> redis::RedisResult<()> {
        let r = &self.registry;
        let (nodes, dead, beat) = (r.nodes(), r.dead(), r.heartbeat(&self.node));
        let node = self.node.clone();
        self.on(&nodes, |c, _| {
            redis::pipe()
                .atomic()
                .cmd("DEL")
                .arg(&beat)
                .ignore()
                .cmd("SREM")
                .arg(&nodes)
                .arg(&node)
                .ignore()
                .cmd("SADD")
                .arg(&dead)
                .arg(&node)
                .ignore()
                .exec(c)
        })?;
        self.uncount_instance(&node)?;
        Ok(())
    }

    /// The members of `room` with a live connection, sorted; `None` when `asker` (if given)
    /// is not a member. Reads the members in the room's slot, then each member's counts in
    /// the member's slot, one pipeline per shard.
    pub(super) fn room_online(
        &mut self,
        room: &str,
        asker: Option<&str>,
    ) -> redis::RedisResult<Option<Vec<String>>> {
        let members_key = wire::room_members_key(&self.prefix, room);
        let asker = asker.unwrap_or_default().to_string();
        let (member, members): (bool, Vec<String>) = self.on(&members_key, |c, _| {
            redis::pipe()
                .cmd("SISMEMBER")
                .arg(&members_key)
                .arg(&asker)
                .cmd("SMEMBERS")
                .arg(&members_key)
                .query(c)
        })?;
        if !asker.is_empty() && !member {
            return Ok(None);
        }
        let counts = self.counts_of(&members)?;
        let mut online: Vec<String> = members
            .into_iter()
            .zip(counts)
            .filter(|(_, n)| *n > 0)
            .map(|(m, _)| m)
            .collect();
        online.sort_unstable();
        Ok(Some(online))
    }

    /// Each user's live connections, in order: one `HGETALL` pipeline per shard.
    pub(super) fn counts_of(&mut self, users: &[String]) -> redis::RedisResult<Vec<i64>> {
        let keys: Vec<String> = users
            .iter()
            .map(|u| keys::user_counts(&self.prefix, u))
            .collect();
        let mut by_shard: HashMap<usize, Vec<usize>> = HashMap::new();
        for (i, key) in keys.iter().enumerate() {
            let shard = match self.conns.for_key(&self.bp, key.as_bytes()) {
                Ok((shard, _)) => shard,
                Err(e) => {
                    self.conns.reset();
                    return Err(e);
                }
            };
            by_shard.entry(shard).or_default().push(i);
        }
        let mut totals = vec![0; users.len()];
        for indices in by_shard.into_values() {
            let first = keys[indices[0]].clone();
            let mut pipe = redis::pipe();
            for &i in &indices {
                pipe.cmd("HGETALL").arg(&keys[i]);
            }
            let replies: Vec<HashMap<String, i64>> = self.on(&first, |c, _| pipe.query(c))?;
            for (&i, counts) in indices.iter().zip(&replies) {
                totals[i] = live_total(counts, &self.node, &self.dead);
            }
        }
        Ok(totals)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_split_into_numbers_and_rooms() {
        let reply = vec![
            Value::Int(0),
            Value::Int(1),
            Value::BulkString(b"team".to_vec()),
            Value::BulkString(b"ops".to_vec()),
        ];
        assert_eq!(
            split_reply(reply, 2),
            (vec![0, 1], vec!["team".to_string(), "ops".to_string()])
        );
        assert_eq!(split_reply(vec![Value::Int(3)], 2), (vec![3, 0], vec![]));
    }

    #[test]
    fn dead_instances_do_not_count_this_one_always_does() {
        let counts: HashMap<String, i64> =
            [("me".to_string(), 1), ("a".into(), 2), ("b".into(), 4)].into();
        assert_eq!(live_total(&counts, "me", ""), 7);
        assert_eq!(live_total(&counts, "me", "a b"), 1);
        assert_eq!(live_total(&counts, "me", "me a"), 5, "this instance counts");
    }
}
