//! A history worker (`--history-workers` of them): runs replay and page queries against the users'
//! and rooms' Redis streams, and API publishes, on its own blocking connections (one per shard on
//! a cluster), so neither the subscriber nor a core ever waits for Redis. The workers take their
//! jobs from one queue that serves users in turn (`fair_reads`).
//!
//! The subscriber queues a replay only once this instance's subscription to the user's channel
//! is confirmed; the answer goes to the requesting core's inbox.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use super::fair_reads::HistoryReads;
use super::shard_conns::ShardConns;
use super::{Backoff, Backplane, Job, PageRequest, PublishRequest, ReplayRequest};
use crate::bus::{Bus, CoreMsg, PageError, PageResult, PublishResult, ReplayResult};
use crate::history::{self, HistoryConfig, Offset, Replay};
use crate::UserId;

/// Runs jobs from the fair queue until the backplane stops; `n` tells the workers apart.
pub(crate) fn run(bp: Arc<Backplane>, bus: Arc<Bus>, jobs: &HistoryReads<Job>, n: u64) {
    let Some(config) = bp.history().cloned() else {
        return;
    };
    let mut conns = ShardConns::default();
    let mut backoff = Backoff::new(
        bp.config.reconnect_min,
        bp.config.reconnect_max,
        bp.node_id ^ 0x5eed ^ n,
    );
    let rooms = bp.rooms().map(|r| r.history.clone()).unwrap_or_default();
    while let Some((lane, job)) = jobs.take() {
        match job {
            Job::Replay(request) if Instant::now() < request.deadline => {
                let worker = (&mut conns, &mut backoff);
                replay(&bp, &bus, worker, &config, &rooms, request);
            }
            // The core answered the client already.
            Job::Replay(_) => {}
            Job::Page(p) => {
                let result =
                    match stream_of(&bp, &p.user, p.room.as_deref()) {
                        // No history on a cluster for this user id (see `tagged`).
                        None => Ok(Some(Vec::new())),
                        Some(key) => conns
                            .for_key(&bp, key.as_bytes())
                            .and_then(|(_, c)| match &p.room {
                                None => page(c, &key, &p, &config).map(Some),
                                Some(room) => {
                                    let prefix = &bp.config.channel_prefix;
                                    super::room_history::page(c, prefix, room, &p, &rooms)
                                }
                            }),
                    };
                let result = result
                    .map_err(|e| {
                        conns.reset();
                        PageError::Unavailable(e.to_string())
                    })
                    .and_then(|page| page.ok_or(PageError::NotMember));
                let answer = PageResult {
                    key: p.key,
                    serial: p.serial,
                    ack: p.ack,
                    result,
                };
                send(&bp, &bus, p.core, CoreMsg::Page(Box::new(answer)));
            }
            Job::Publish(p) => {
                let result = publish(&mut conns, &bp, &config, &p).map_err(|e| {
                    conns.reset();
                    e.to_string()
                });
                let answer = PublishResult {
                    key: p.key,
                    serial: p.serial,
                    result,
                };
                send(&bp, &bus, p.core, CoreMsg::Published(Box::new(answer)));
            }
        }
        jobs.done(&lane);
    }
}

/// Hands an answer to core `core`; a full inbox drops it (counted), and the core's own
/// deadline answers the client instead.
fn send(bp: &Backplane, bus: &Bus, core: usize, msg: CoreMsg) {
    if !bus.send(core, msg) {
        bp.stats.inbox_drops.fetch_add(1, Relaxed);
    }
}

/// Runs one replay and sends the answer to the requesting core; a failed query goes back
/// through the subscriber (after a backoff).
fn replay(
    bp: &Arc<Backplane>,
    bus: &Bus,
    (conns, backoff): (&mut ShardConns, &mut Backoff),
    config: &HistoryConfig,
    rooms: &crate::rooms::RoomHistoryConfig,
    request: ReplayRequest,
) {
    let result = match stream_of(bp, &request.user, request.room.as_deref()) {
        None => Ok(Replay::default()),
        Some(key) => conns
            .for_key(bp, key.as_bytes())
            .and_then(|(_, c)| match &request.room {
                None => query(c, &key, &request, config),
                Some(room) => {
                    let prefix = &bp.config.channel_prefix;
                    super::room_history::replay(c, prefix, room, request.since, rooms)
                }
            }),
    };
    let replay = match result {
        Ok(replay) => {
            backoff.reset();
            replay
        }
        Err(e) => {
            // Redis may be restarting. The request goes back through the subscriber, which
            // holds it until the user's channel is confirmed again: querying as soon as Redis
            // answers could run before the re-subscription and miss what is published in
            // between.
            log::warn!(
                "redis history query for {} failed: {}",
                request.user,
                super::endpoint::plain_words(&e.to_string())
            );
            conns.reset();
            std::thread::sleep(backoff.next_delay());
            bp.request_replay(request);
            return;
        }
    };
    let result = ReplayResult {
        key: request.key,
        serial: request.serial,
        room: request.room,
        replay,
    };
    send(bp, bus, request.core, CoreMsg::Replayed(Box::new(result)));
}

/// The stream a replay or page reads: the room's, or the user's (hash-tagged into its channel's
/// slot on a cluster; `None` for a user without history there).
fn stream_of(bp: &Backplane, user: &str, room: Option<&str>) -> Option<String> {
    let prefix = &bp.config.channel_prefix;
    match room {
        Some(room) => Some(super::wire::room_stream_key(prefix, room)),
        None if bp.config.sharded() => super::tagged::stream_key(prefix, user),
        None => Some(history::stream_key(prefix, user)),
    }
}

/// Appends and publishes the dispatch for every user. On one Redis, one call of the append
/// script for all of them: atomic, so all users get the event, or (on an error) none does. On a
/// cluster a call per user, on the user's shard (a script keeps to one slot): an error may leave
/// some users with it and others without.
fn publish(
    conns: &mut ShardConns,
    bp: &Backplane,
    config: &HistoryConfig,
    request: &PublishRequest,
) -> redis::RedisResult<Vec<(UserId, Offset)>> {
    let prefix = &bp.config.channel_prefix;
    let users = &request.dispatch.users;
    let frame = request.dispatch.frame.as_str();
    let channels: Vec<String> = users
        .iter()
        .map(|u| super::wire::user_channel(prefix, u))
        .collect();
    let mut ids: Vec<(UserId, String)> = Vec::with_capacity(users.len());
    if bp.config.sharded() {
        let script = history::sharded_append_script();
        for (user, channel) in users.iter().zip(&channels) {
            let Some(keys) = super::tagged::append_keys(channel, None) else {
                continue;
            };
            let (sha, conn) = conns.with_script(bp, channel.as_bytes(), &script)?;
            let call = history::append_call_keys(&sha, bp.node_id, config, frame, false, &[keys]);
            let mut id: Vec<String> = call.query(conn)?;
            ids.extend(id.pop().map(|id| (user.clone(), id)));
        }
    } else {
        let (sha, conn) = conns.with_script(bp, b"", history::APPEND_SCRIPT)?;
        let pairs: Vec<(&str, &str)> = users
            .iter()
            .zip(&channels)
            .map(|(u, c)| (&**u, c.as_str()))
            .collect();
        let call = history::append_call(&sha, prefix, bp.node_id, config, frame, None, &pairs);
        let got: Vec<String> = call.query(conn)?;
        if got.len() != users.len() {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "unexpected reply to the append script",
            )));
        }
        ids.extend(users.iter().cloned().zip(got));
    }
    let mut out = Vec::with_capacity(ids.len());
    for (user, id) in ids {
        let offset = id.parse::<Offset>().map_err(|_| {
            redis::RedisError::from((redis::ErrorKind::Client, "redis returned a bad stream id"))
        })?;
        out.push((user, offset));
    }
    Ok(out)
}

/// The oldest stream id the max age keeps, by Redis's clock (`TIME`), as `(ms, 0)`: the append
/// script trims by age only now and then, so the reads drop what is older themselves.
fn age_cutoff(conn: &mut redis::Connection, config: &HistoryConfig) -> redis::RedisResult<Offset> {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query(conn)?;
    let now_ms = secs.saturating_mul(1000).saturating_add(micros / 1000);
    Ok(Offset(
        now_ms.saturating_sub(config.max_age.as_millis() as u64),
        0,
    ))
}

/// `XREVRANGE key (before start COUNT limit`: newest first, none older than the max age and none
/// past the last `max_len` (the stream may hold a few more: see [`history::APPEND_SCRIPT`]), and
/// read no further than just past `request.max_bytes` of frames.
fn page(
    conn: &mut redis::Connection,
    key: &str,
    request: &PageRequest,
    config: &HistoryConfig,
) -> redis::RedisResult<Vec<tungstenite::Utf8Bytes>> {
    if request.before == Some(Offset(0, 0)) {
        // Nothing comes before the first possible offset, and Redis refuses `(0-0` as a range
        // end: answer the empty page here rather than a 503.
        return Ok(Vec::new());
    }
    let end = match request.before {
        Some(b) => format!("({b}"),
        None => "+".to_string(),
    };
    let mut start = age_cutoff(conn, config)?;
    let len: usize = redis::cmd("XLEN").arg(key).query(conn)?;
    if let Some(excess) = len.checked_sub(config.max_len).filter(|n| *n > 0) {
        // The oldest entry an exact trim would keep is the one after the `excess` oldest.
        let oldest: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(key)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(excess + 1)
            .query(conn)?;
        if let Some(kept) = oldest.ids.last().and_then(|e| e.id.parse::<Offset>().ok()) {
            start = start.max(kept);
        }
    }
    // In batches, stopping once the frames pass `max_bytes`: the one that passes it is kept,
    // so the core's answer sees that not all fit (`"more": true`).
    let (mut end, start) = (end, start.to_string());
    let mut frames = Vec::new();
    let mut bytes = 0usize;
    let mut batch = FIRST_BATCH.min(request.limit);
    while frames.len() < request.limit && bytes <= request.max_bytes {
        let (got, entries) = newest_first(conn, key, &end, &start, batch)?;
        for (offset, frame) in entries {
            end = format!("({offset}");
            if let Some(frame) = frame {
                bytes += frame.len();
                frames.push(frame);
            }
            if bytes > request.max_bytes {
                break;
            }
        }
        if got < batch {
            break;
        }
        batch = next_batch(request.max_bytes, bytes, frames.len(), request.limit);
    }
    Ok(frames)
}

/// One `XREVRANGE key end start COUNT count`: how many entries came, and each one's offset with
/// its frame (the offset spliced in; `None` for an entry without a readable frame).
type Entries = (usize, Vec<(Offset, Option<tungstenite::Utf8Bytes>)>);

fn newest_first(
    conn: &mut redis::Connection,
    key: &str,
    end: &str,
    start: &str,
    count: usize,
) -> redis::RedisResult<Entries> {
    let reply: redis::streams::StreamRangeReply = redis::cmd("XREVRANGE")
        .arg(key)
        .arg(end)
        .arg(start)
        .arg("COUNT")
        .arg(count)
        .query(conn)?;
    let got = reply.ids.len();
    let entries = reply
        .ids
        .into_iter()
        .filter_map(|entry| {
            let offset = entry.id.parse::<Offset>().ok()?;
            let frame = match entry.map.get("f") {
                Some(redis::Value::BulkString(b)) => std::str::from_utf8(b).ok(),
                _ => None,
            };
            Some((offset, frame.map(|f| history::with_offset(f, offset))))
        })
        .collect();
    Ok((got, entries))
}

/// Entries asked for in the first `XREVRANGE` of a replay or page.
const FIRST_BATCH: usize = 32;
/// Most entries asked for in one `XREVRANGE`.
const MAX_BATCH: usize = 512;

/// The next batch of a byte-budgeted read: as many entries as the bytes left hold at the size
/// seen so far (one more, to see the budget pass), at most `MAX_BATCH` and the entries still
/// wanted (`max_entries` in all).
fn next_batch(max_bytes: usize, bytes: usize, entries: usize, max_entries: usize) -> usize {
    let average = bytes / entries.max(1) + 1;
    (max_bytes.saturating_sub(bytes) / average)
        .saturating_add(1)
        .clamp(1, MAX_BATCH)
        .min(max_entries.saturating_sub(entries).max(1))
}

/// The events after `request.since`, newest first in `XREVRANGE` batches down to `since`
/// itself, then put back in order. `since` is read too, because its presence is what proves
/// nothing after it was trimmed (streams are trimmed from the oldest end only). The read stops
/// at whichever comes first, and only reaching `since` makes the replay complete:
/// - `since` (complete, if it is within the max age);
/// - `max_len` entries after it: an exact trim would have dropped `since` (streams are trimmed
///   approximately: whole nodes, by age only now and then, so the bounds are enforced here);
/// - an entry older than the max age;
/// - `request.max_bytes` of frames: the replay keeps the newest that fit (what the client is
///   about to see live next to) and the client pages further back with `history`. So one
///   replay reads and queues at most about that many bytes, never a whole long history, and
///   never makes its requester a slow consumer by itself.
fn query(
    conn: &mut redis::Connection,
    key: &str,
    request: &ReplayRequest,
    config: &HistoryConfig,
) -> redis::RedisResult<Replay> {
    let cutoff = age_cutoff(conn, config)?;
    let mut replay = Replay::default();
    let mut bytes = 0usize;
    let mut end = "+".to_string();
    let mut batch = FIRST_BATCH;
    let since = request.since.to_string();
    'read: loop {
        let (got, entries) = newest_first(conn, key, &end, &since, batch)?;
        for (offset, frame) in entries {
            end = format!("({offset}");
            if offset <= request.since {
                // With `max_len` entries after it, an exact trim would have dropped `since`.
                replay.complete = offset == request.since
                    && offset >= cutoff
                    && replay.entries.len() < config.max_len;
                break 'read;
            }
            if offset < cutoff || replay.entries.len() >= config.max_len {
                break 'read;
            }
            let Some(frame) = frame else {
                continue;
            };
            if bytes + frame.len() > request.max_bytes {
                break 'read;
            }
            bytes += frame.len();
            replay.entries.push((offset, frame));
        }
        if got < batch {
            // Reached the stream's oldest entry without meeting `since`: trimmed, or never
            // there.
            break;
        }
        // `since` itself is one more entry to read past `max_len` after it.
        let wanted = config.max_len + 1;
        batch = next_batch(request.max_bytes, bytes, replay.entries.len(), wanted);
    }
    replay.entries.reverse();
    Ok(replay)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_follow_the_bytes_left_and_the_entries_wanted() {
        // 60 KB entries and 512 KiB left: about 8 more, not hundreds.
        assert_eq!(next_batch(512 * 1024, 60_000, 1, 1001), 8);
        // Small entries: the cap.
        assert_eq!(next_batch(512 * 1024, 200, 1, 100_000), MAX_BATCH);
        // Never more than wanted, never zero.
        assert_eq!(next_batch(512 * 1024, 200, 1, 5), 4);
        assert_eq!(next_batch(100, 500, 5, 1001), 1);
        assert_eq!(next_batch(usize::MAX, 0, 0, 100), 100);
    }
}
