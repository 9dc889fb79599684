//! History: offsets, the frames that carry them, the in-memory store of embedded mode (a ring per
//! user, or per room for room histories), and the Redis script that appends and publishes a
//! user's event in one step.
//!
//! Every event dispatched to a user gets an [`Offset`], strictly increasing per user, and the
//! frame each device receives carries it: `{"event":E,"args":A,"offset":"A-B"}`. A device that
//! reconnects with `?since=<offset>` is sent every retained event after it, then live events,
//! then `{"event":"recovered","args":{"complete":bool,"offset":...}}` (see docs/PROTOCOL.md).
//!
//! - Embedded mode ([`MemoryHistory`]): a bounded ring per user, in shards behind short mutexes.
//!   The offset is assigned and the delivery pushed to every core's inbox under the user's shard
//!   lock, so every core sees a user's frames in offset order. All rings together are bounded
//!   by `--history-max-total-bytes`: past it the largest rings give up their oldest events
//!   (`history/total.rs`).
//! - Redis mode: a stream per user; [`APPEND_SCRIPT`] appends, trims and publishes atomically
//!   (one call per dispatch for all its users), so a live device and a recovering one never
//!   disagree on what exists or in what order.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::Mutex;
use std::time::Duration;

use tungstenite::Utf8Bytes;

// The settings live in `config::history` and the offset in `types`; they keep their paths here.
pub use crate::config::history::{
    HistoryConfig, DEFAULT_DEDUPE_WINDOW, DEFAULT_MAX_AGE, DEFAULT_MAX_LEN, DEFAULT_MAX_PAGE,
    DEFAULT_MAX_PUBLISH_BODY_BYTES, DEFAULT_MAX_PUBLISH_USERS, DEFAULT_MAX_TOTAL_BYTES,
    DEFAULT_SENDER_BYTES_PER_MINUTE,
};
pub use crate::types::{BadOffset, Offset};

use crate::types::UserId;

/// Live frames a recovering connection holds while its replay is fetched; past it the recovery
/// ends with `complete: false`.
pub const RECOVERY_BUFFER: usize = 10_000;
/// How long a recovering connection waits for its replay before it ends with `complete: false`.
pub const RECOVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Mutex shards of the embedded store: enough that cores rarely meet on one.
const SHARDS: usize = 64;

/// `{"event":E,"args":A}` → `{"event":E,"args":A,"offset":"A-B"}`: the dispatch frame always
/// ends with its object's `}`, so the field is spliced in without re-encoding.
pub fn with_offset(frame: &str, offset: Offset) -> Utf8Bytes {
    let head = frame.strip_suffix('}').unwrap_or(frame);
    Utf8Bytes::from(format!("{head},\"offset\":\"{offset}\"}}"))
}

/// `{"event":E,"args":A}` → `{"event":E,"args":A,"room":R,"offset":"A-B"}`: a frame kept in
/// room `R`'s history, its offset one in that room's stream. Room names need no JSON escaping
/// (`rooms::valid_room`).
pub fn with_room_offset(frame: &str, room: &str, offset: Offset) -> Utf8Bytes {
    let head = frame.strip_suffix('}').unwrap_or(frame);
    Utf8Bytes::from(format!(
        "{head},\"room\":\"{room}\",\"offset\":\"{offset}\"}}"
    ))
}

/// `{"event":"recovered","args":{"complete":C,"offset":"A-B"|null}}`.
pub fn encode_recovered(complete: bool, last: Option<Offset>) -> Utf8Bytes {
    let offset = match last {
        Some(o) => format!("\"{o}\""),
        None => "null".to_string(),
    };
    Utf8Bytes::from(format!(
        "{{\"event\":\"recovered\",\"args\":{{\"complete\":{complete},\"offset\":{offset}}}}}"
    ))
}

/// `{"events":[F1,F2,...]}`: history frames (each an event object with its offset) as a JSON
/// document, spliced without re-encoding.
pub fn page_json(frames: &[Utf8Bytes]) -> String {
    let mut out = String::with_capacity(16 + frames.iter().map(|f| f.len() + 1).sum::<usize>());
    out.push_str("{\"events\":[");
    for (i, f) in frames.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(f.as_str());
    }
    out.push_str("]}");
    out
}

/// `{"event":"ack","ack":n,"args":{"events":[...]}}`: the answer to a `history` event, at most
/// `max_bytes` long. When the page's frames (newest first) do not all fit, it carries the newest
/// that do (always at least one) and `"more":true`: the client asks again with `before` set to
/// the offset of the last event it got, so an answer never closes its requester as a slow
/// consumer.
pub fn encode_page_ack(ack: Option<u64>, frames: &[Utf8Bytes], max_bytes: usize) -> Utf8Bytes {
    let ack = ack.map(|n| format!("\"ack\":{n},")).unwrap_or_default();
    // The envelope around the events: `{"event":"ack",` + ack + `"args":` + `,"more":true}}`.
    let mut used = 40 + ack.len() + 16;
    let fitting = frames
        .iter()
        .take_while(|f| {
            used += f.len() + 1;
            used <= max_bytes
        })
        .count()
        .max(1)
        .min(frames.len());
    let more = if fitting < frames.len() {
        ",\"more\":true"
    } else {
        ""
    };
    let events = page_json(&frames[..fitting]);
    let events = events.strip_suffix('}').unwrap_or(&events);
    Utf8Bytes::from(format!(
        "{{\"event\":\"ack\",{ack}\"args\":{events}{more}}}}}"
    ))
}

/// One event delivered to one user's devices: shared by every core it goes to.
#[derive(Debug)]
pub struct Delivery {
    /// The user.
    pub user: UserId,
    /// Its offset in the user's history.
    pub offset: Offset,
    /// The frame, offset included.
    pub frame: Utf8Bytes,
    /// `frame` wrapped for Socket.IO connections, built on first use.
    pub sio: crate::socketio::FrameCache,
}

/// What a resume gets: the retained events after `since`, oldest first.
#[derive(Debug, Default)]
pub struct Replay {
    /// Events after `since`, oldest first, frames with their offsets.
    pub entries: Vec<(Offset, Utf8Bytes)>,
    /// `false` when events after `since` may be missing (trimmed, expired, another epoch).
    pub complete: bool,
}

/// A connection waiting for its replay; live frames are held here meanwhile.
#[derive(Debug)]
pub struct Recovering {
    /// The offset the client asked to resume after (`None`: unparsable, so incomplete).
    pub since: Option<Offset>,
    /// Live frames that arrived meanwhile, in offset order.
    pub buffered: Vec<(Offset, Utf8Bytes)>,
    /// More than [`RECOVERY_BUFFER`] frames arrived: some were dropped.
    pub overflow: bool,
    /// When the recovery gives up and reports `complete: false`.
    pub deadline: std::time::Instant,
    /// The Redis subscriber came back from an outage while this recovery ran (its replay may
    /// have been read before what the outage hid was published): another recovery follows from
    /// where this one ends.
    pub again: bool,
}

impl Recovering {
    /// Holds a live frame until the replay is in; past [`RECOVERY_BUFFER`] frames the recovery
    /// is marked incomplete instead.
    pub fn hold(&mut self, offset: Offset, frame: &Utf8Bytes) {
        if self.buffered.len() < RECOVERY_BUFFER {
            self.buffered.push((offset, frame.clone()));
        } else {
            self.overflow = true;
        }
    }
}

/// Finishes a recovery: the frames to send in order and the final `recovered` frame, given the
/// replay and the connection's high-water mark (`recovered` encodes that frame: the user's
/// stream's or a room's). Returns the new high-water mark too.
pub fn finish_recovery(
    rec: Recovering,
    replay: Replay,
    mut high: Option<Offset>,
    recovered: impl FnOnce(bool, Option<Offset>) -> Utf8Bytes,
) -> (Vec<Utf8Bytes>, Option<Offset>) {
    let mut out = Vec::with_capacity(replay.entries.len() + rec.buffered.len() + 1);
    let complete = replay.complete && !rec.overflow;
    // An incomplete recovery's `since` may be anything (another run's, garbage): only a valid one
    // may hide frames.
    let since = rec.since.filter(|_| complete);
    let fresh = |o: Offset, high: Option<Offset>| Some(o) > high && Some(o) > since;
    for (offset, frame) in replay.entries.into_iter().chain(rec.buffered) {
        if fresh(offset, high) {
            high = Some(offset);
            out.push(frame);
        }
    }
    let last = high.max(since);
    out.push(recovered(complete, last));
    (out, last)
}

/// One lock's worth of users. The sequence is per shard, not per user, so a user whose ring
/// was purged and is created again never reuses a sequence an old offset could name.
#[derive(Default)]
struct RingShard {
    seq: u64,
    rings: HashMap<UserId, Ring>,
}

struct Ring {
    /// The retained events, oldest first.
    entries: VecDeque<Entry>,
    /// Bytes of the retained frames.
    bytes: usize,
    /// What the ring counts for in the store's total: its frames and keys plus a fixed cost
    /// per entry and per ring (`total::entry_cost`, `total::ring_cost`).
    cost: usize,
    /// The last sequence assigned.
    last_seq: u64,
    /// The highest sequence dropped by a bound.
    dropped_through: u64,
}

/// One retained event of a ring.
struct Entry {
    /// Offset sequence.
    seq: u64,
    /// Append time in ms.
    at_ms: u64,
    /// The frame with its offset.
    frame: Utf8Bytes,
    /// The dispatch's idempotency key, if it had one.
    dedupe: Option<Box<str>>,
}

/// Embedded mode's history: a bounded ring per user (or, [`MemoryHistory::for_rooms`], per
/// room).
pub struct MemoryHistory {
    epoch: u64,
    /// Keyed by room: frames are framed with [`with_room_offset`].
    rooms: bool,
    max_len: usize,
    max_bytes: usize,
    max_age_ms: u64,
    dedupe_window_ms: u64,
    shards: Box<[Mutex<RingShard>]>,
    /// The process-wide bound on what all rings cost together (`--history-max-total-bytes`);
    /// past it the largest rings give up their oldest events (`total.rs`).
    max_total_bytes: usize,
    /// What all rings cost together: the only state appends share across shards.
    total: AtomicUsize,
    /// What each shard's rings cost, so the eviction finds the biggest without locking all.
    shard_costs: Box<[AtomicUsize]>,
    /// Set while a thread evicts: the others append on, past the bound by what they add
    /// meanwhile, instead of queueing on the same locks.
    evicting: AtomicBool,
    /// Events evicted by the total bound since start.
    evicted: AtomicU64,
    /// When freed pages were last handed back to the system (`total.rs`), in ms.
    trimmed_at_ms: AtomicU64,
}

impl MemoryHistory {
    /// An empty store whose offsets start with `epoch` (the process start in ms).
    pub fn new(config: &HistoryConfig, epoch: u64) -> Self {
        MemoryHistory {
            epoch,
            rooms: false,
            max_len: config.max_len,
            max_bytes: usize::MAX,
            max_age_ms: config.max_age.as_millis() as u64,
            dedupe_window_ms: config.dedupe_window.as_millis() as u64,
            shards: (0..SHARDS)
                .map(|_| Mutex::new(RingShard::default()))
                .collect(),
            max_total_bytes: config.max_total_bytes,
            total: AtomicUsize::new(0),
            shard_costs: (0..SHARDS).map(|_| AtomicUsize::new(0)).collect(),
            evicting: AtomicBool::new(false),
            evicted: AtomicU64::new(0),
            trimmed_at_ms: AtomicU64::new(0),
        }
    }

    /// An empty store of room histories, keyed by room name, bounded by the room history
    /// settings (length, age and bytes per room); the dedupe window is `history`'s.
    pub fn for_rooms(
        config: &crate::config::rooms::RoomHistoryConfig,
        history: &HistoryConfig,
        epoch: u64,
    ) -> Self {
        MemoryHistory {
            rooms: true,
            max_len: config.max_len,
            max_bytes: config.max_bytes,
            max_age_ms: config.max_age.as_millis() as u64,
            // Room histories are bounded per room (bytes) and by the rooms there can be.
            max_total_bytes: usize::MAX,
            ..Self::new(history, epoch)
        }
    }

    fn shard_index(user: &str) -> usize {
        let mut h = std::hash::DefaultHasher::new();
        user.hash(&mut h);
        (h.finish() % SHARDS as u64) as usize
    }

    fn shard(&self, user: &str) -> std::sync::MutexGuard<'_, RingShard> {
        // A panic while holding the lock leaves a consistent ring (every update is one push
        // or pop), so a poisoned lock is still usable.
        self.shards[Self::shard_index(user)]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The sequence of the entry of `ring` holding idempotency key `key`, if one was appended
    /// within the dedupe window.
    fn earlier(&self, ring: &Ring, key: &str, now_ms: u64) -> Option<u64> {
        let window_start = now_ms.saturating_sub(self.dedupe_window_ms);
        ring.entries
            .iter()
            .rev()
            .take_while(|e| e.at_ms >= window_start)
            .find(|e| e.dedupe.as_deref() == Some(key))
            .map(|e| e.seq)
    }

    /// Drops what the ring's own bounds (length, bytes, age) no longer allow; returns the cost
    /// freed, for the caller to release from the totals.
    fn trim(&self, ring: &mut Ring, now_ms: u64) -> usize {
        let before = ring.cost;
        // The newest entry stays whatever its size: a bound never empties a ring it just grew.
        while ring.entries.len() > self.max_len
            || (ring.bytes > self.max_bytes && ring.entries.len() > 1)
            || ring
                .entries
                .front()
                .is_some_and(|e| now_ms.saturating_sub(e.at_ms) > self.max_age_ms)
        {
            ring.pop_oldest();
        }
        before - ring.cost
    }

    /// Assigns the next offset of `user` to `frame` (a dispatch frame without offset), keeps it,
    /// and calls `deliver` with the delivery while the user's shard is still locked, so
    /// deliveries of one user leave in offset order.
    ///
    /// With an idempotency key `dedupe` that this user's ring already holds from within the
    /// dedupe window, nothing is appended or delivered and the earlier offset is returned: a
    /// client resending what it was never acknowledged for gets it stored once.
    pub fn append(
        &self,
        user: &UserId,
        frame: &str,
        dedupe: Option<&str>,
        now_ms: u64,
        deliver: impl FnOnce(Delivery),
    ) -> Offset {
        let index = Self::shard_index(user);
        let mut guard = self.shard(user);
        let shard = &mut *guard;
        if let (Some(key), Some(ring)) = (dedupe, shard.rings.get(user)) {
            if let Some(seq) = self.earlier(ring, key, now_ms) {
                return Offset(self.epoch, seq);
            }
        }
        // A new ring knows nothing of the shard's earlier sequences: as if they were dropped.
        let mut added = 0;
        let ring = shard.rings.entry(user.clone()).or_insert_with(|| {
            added += total::ring_cost(user);
            Ring {
                entries: VecDeque::new(),
                bytes: 0,
                cost: total::ring_cost(user),
                last_seq: shard.seq,
                dropped_through: shard.seq,
            }
        });
        shard.seq += 1;
        ring.last_seq = shard.seq;
        let offset = Offset(self.epoch, ring.last_seq);
        let framed = if self.rooms {
            with_room_offset(frame, user, offset)
        } else {
            with_offset(frame, offset)
        };
        let entry = Entry {
            seq: ring.last_seq,
            at_ms: now_ms,
            frame: framed.clone(),
            dedupe: dedupe.map(Box::from),
        };
        added += total::entry_cost(&entry);
        ring.bytes += framed.len();
        ring.cost += total::entry_cost(&entry);
        ring.entries.push_back(entry);
        let freed = self.trim(ring, now_ms);
        self.account(index, added, freed);
        deliver(Delivery {
            user: user.clone(),
            offset,
            frame: framed,
            sio: Default::default(),
        });
        drop(guard);
        // Past the total bound, the eviction runs here, with no shard lock held (it takes one
        // at a time), on the appending thread: the flood pays for its own eviction.
        self.enforce_total();
        offset
    }

    /// Drops expired events of every user and forgets users with none left, so users who stop
    /// receiving events do not keep memory for good. Call now and then (core 0's sweep does).
    pub fn purge(&self, now_ms: u64) {
        for (index, shard) in self.shards.iter().enumerate() {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            let mut freed = 0;
            shard.rings.retain(|_, ring| {
                freed += self.trim(ring, now_ms);
                if ring.entries.is_empty() {
                    freed += ring.cost;
                }
                !ring.entries.is_empty()
            });
            self.account(index, 0, freed);
        }
    }

    /// The retained events of `user` after `since`, oldest first.
    pub fn replay(&self, user: &UserId, since: Option<Offset>, now_ms: u64) -> Replay {
        let Some(since) = since.filter(|s| s.0 == self.epoch) else {
            return Replay::default();
        };
        let mut shard = self.shard(user);
        let Some(ring) = shard.rings.get_mut(user) else {
            return Replay::default();
        };
        let freed = self.trim(ring, now_ms);
        self.account(Self::shard_index(user), 0, freed);
        let entries = ring
            .entries
            .iter()
            .filter(|e| e.seq > since.1)
            .map(|e| (Offset(self.epoch, e.seq), e.frame.clone()))
            .collect();
        Replay {
            entries,
            complete: since.1 >= ring.dropped_through && since.1 <= ring.last_seq,
        }
    }

    /// Up to `limit` events of `user` before `before` (all when `None`), newest first.
    pub fn page(
        &self,
        user: &UserId,
        before: Option<Offset>,
        limit: usize,
        now_ms: u64,
    ) -> Vec<(Offset, Utf8Bytes)> {
        let mut shard = self.shard(user);
        let Some(ring) = shard.rings.get_mut(user) else {
            return Vec::new();
        };
        let freed = self.trim(ring, now_ms);
        self.account(Self::shard_index(user), 0, freed);
        ring.entries
            .iter()
            .rev()
            .map(|e| (Offset(self.epoch, e.seq), e.frame.clone()))
            .filter(|(o, _)| before.is_none_or(|b| *o < b))
            .take(limit)
            .collect()
    }
}

/// Appends one dispatch to the streams of several users and publishes it on each user's channel,
/// trimming each stream by count and age, all in one atomic call: one `EVALSHA` per message
/// whatever the number of target users (the sender's copy and the recipient's of a direct
/// message).
///
/// KEYS, per user in order: stream ([`stream_key`]), channel, and, when the dispatch has an
/// idempotency key, the user's dedupe key ([`dedupe_key`]); so 2 or 3 keys per user. ARGV: node
/// id (16 hex digits), frame without offset, max length, max age in ms, and with dedupe keys the
/// dedupe window in ms (its presence is what says there are 3 keys per user). Returns one entry
/// id per user, in KEYS order. A user whose dedupe key is already recorded (a client's resend of
/// a message it was never acknowledged for) gets the id recorded there, and nothing is appended
/// or published for that user.
///
/// Per user: `XADD MAXLEN ~` assigns the offset (the stream keeps at least the last max length
/// entries: Redis trims whole radix-tree nodes only, so up to one node more, at most
/// `stream-node-max-entries`, 100 by default); the age trim, `XTRIM MINID` at that id's time minus the max age (the id's ms part
/// is Redis's clock, so no `TIME` call), runs on about one append in 16 (those whose id's ms is
/// a multiple of 16); `PEXPIRE` by the max age, so an idle stream goes whole; then `PUBLISH` of
/// `<node> <offset> <frame with offset>`. Stream entries hold the frame without offset in field
/// `f`. The reads (`history_worker`) enforce both bounds exactly: what is past the last max
/// length entries or older than the max age is never replayed nor paged, and a `since` there
/// is `complete: false`.
///
/// Cost (`cargo bench --bench redis_cpu`): see docs/BENCHMARKS.md.
pub const APPEND_SCRIPT: &str = r#"
local stride = ARGV[5] and 3 or 2
local node, frame, maxlen = ARGV[1], ARGV[2], ARGV[3]
local maxage = tonumber(ARGV[4])
local head = string.sub(frame, 1, -2) .. ',"offset":"'
local ids = {}
for i = 1, #KEYS, stride do
  local stream = KEYS[i]
  local id = stride == 3 and redis.call('GET', KEYS[i + 2])
  if not id then
    id = redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'f', frame)
    local ms = tonumber(string.match(id, '^%d+'))
    if ms % 16 == 0 and ms > maxage then
      redis.call('XTRIM', stream, 'MINID', string.format('%d', ms - maxage))
    end
    redis.call('PEXPIRE', stream, maxage)
    if stride == 3 then
      redis.call('SET', KEYS[i + 2], id, 'PX', ARGV[5])
    end
    redis.call('PUBLISH', KEYS[i + 1], node .. ' ' .. id .. ' ' .. head .. id .. '"}')
  end
  ids[#ids + 1] = id
end
return ids
"#;

/// The `EVALSHA` of [`APPEND_SCRIPT`] (loaded as `sha`) appending `frame` (without offset) to
/// the stream of every user of `users`, (user, channel) pairs, and publishing it on the channel.
/// `node` is this instance's id, `dedupe` the dispatch's idempotency key.
pub fn append_call(
    sha: &str,
    prefix: &str,
    node: u64,
    config: &HistoryConfig,
    frame: &str,
    dedupe: Option<&str>,
    users: &[(&str, &str)],
) -> redis::Cmd {
    let keys: Vec<UserKeys<'_>> = users
        .iter()
        .map(|(user, channel)| UserKeys {
            stream: stream_key(prefix, user),
            channel,
            dedupe: dedupe.map(|key| dedupe_key(prefix, user, key)),
        })
        .collect();
    append_call_keys(sha, node, config, frame, dedupe.is_some(), &keys)
}

/// One user's keys for [`APPEND_SCRIPT`]: its stream, its channel, and with an idempotency key
/// its dedupe key. On a Redis Cluster they are hash-tagged to share the channel's slot
/// (`backplane::tagged`); on one Redis they are [`stream_key`] and [`dedupe_key`].
pub struct UserKeys<'a> {
    /// The user's history stream.
    pub stream: String,
    /// The user's channel.
    pub channel: &'a str,
    /// The dedupe key, when the dispatch has an idempotency key.
    pub dedupe: Option<String>,
}

/// [`append_call`] with the keys named by the caller; `dedupe` says whether each user's
/// `dedupe` key is passed (all or none).
pub fn append_call_keys(
    sha: &str,
    node: u64,
    config: &HistoryConfig,
    frame: &str,
    dedupe: bool,
    users: &[UserKeys<'_>],
) -> redis::Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    let per_user = if dedupe { 3 } else { 2 };
    cmd.arg(sha).arg(users.len() * per_user);
    for user in users {
        cmd.arg(&user.stream).arg(user.channel);
        if let (true, Some(key)) = (dedupe, &user.dedupe) {
            cmd.arg(key);
        }
    }
    cmd.arg(format!("{node:016x}"))
        .arg(frame)
        .arg(config.max_len)
        .arg(config.max_age.as_millis() as u64);
    if dedupe {
        cmd.arg(config.dedupe_window.as_millis() as u64);
    }
    cmd
}

/// [`APPEND_SCRIPT`] for a Redis Cluster: the same steps, published with `SPUBLISH` (sharded
/// pub/sub, on the shard owning the channel's slot, which the keys share).
pub fn sharded_append_script() -> String {
    APPEND_SCRIPT.replace("redis.call('PUBLISH',", "redis.call('SPUBLISH',")
}

/// `{prefix}:d:{len}:{user}:{key}`: remembers that `user`'s stream holds the dispatch with
/// idempotency key `key`. The length prefix keeps two (user, key) pairs from sharing a name.
pub fn dedupe_key(prefix: &str, user: &str, key: &str) -> String {
    format!("{prefix}:d:{}:{user}:{key}", user.len())
}

/// `{prefix}:h:{user}`: the user's history stream.
pub fn stream_key(prefix: &str, user: &str) -> String {
    format!("{prefix}:h:{user}")
}

mod total;

#[cfg(test)]
mod tests;
