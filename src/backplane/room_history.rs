//! Reading a room's history from Redis: the replay after an offset and a page, for the history
//! worker. The room's stream is written once per message by the rooms worker's `SEND` script,
//! which keeps its bounds exactly and records `low` (the newest offset no longer retained); the
//! reads here drop what is past the age (a quiet room is trimmed only at its next message).

use redis::streams::StreamRangeReply;
use tungstenite::Utf8Bytes;

use super::wire;
use super::PageRequest;
use crate::config::rooms::RoomHistoryConfig;
use crate::history::{with_room_offset, Offset, Replay};

/// Redis's clock minus the max age, in ms: entries older than that are expired.
fn age_cutoff(time: (u64, u64), config: &RoomHistoryConfig) -> u64 {
    let now_ms = time.0.saturating_mul(1000).saturating_add(time.1 / 1000);
    now_ms.saturating_sub(config.max_age.as_millis() as u64)
}

/// The stream's entries as frames with their room and offset, oldest or newest first as
/// read; `expired` is set when an entry older than `cutoff` was left out.
fn frames(
    reply: StreamRangeReply,
    room: &str,
    cutoff: u64,
    expired: &mut bool,
) -> Vec<(Offset, Utf8Bytes)> {
    let mut out = Vec::with_capacity(reply.ids.len());
    for entry in reply.ids {
        let Ok(offset) = entry.id.parse::<Offset>() else {
            continue;
        };
        if offset.0 < cutoff {
            *expired = true;
            continue;
        }
        if let Some(redis::Value::BulkString(b)) = entry.map.get("f") {
            if let Ok(f) = std::str::from_utf8(b) {
                out.push((offset, with_room_offset(f, room, offset)));
            }
        }
    }
    out
}

/// The room's retained messages after `since`, oldest first, read in one MULTI so the low-water
/// mark, the newest entry and the range agree. Complete when `since` is at or above `low` (what
/// followed it is all retained), at most the newest entry, and nothing after it expired.
pub(super) fn replay(
    conn: &mut redis::Connection,
    prefix: &str,
    room: &str,
    since: Offset,
    config: &RoomHistoryConfig,
) -> redis::RedisResult<Replay> {
    let stream = wire::room_stream_key(prefix, room);
    type Reads = (
        (u64, u64),
        Option<String>,
        StreamRangeReply,
        StreamRangeReply,
    );
    let (time, low, newest, after): Reads = redis::pipe()
        .atomic()
        .cmd("TIME")
        .cmd("HGET")
        .arg(wire::room_trim_key(prefix, room))
        .arg("low")
        .cmd("XREVRANGE")
        .arg(&stream)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .cmd("XRANGE")
        .arg(&stream)
        .arg(format!("({since}"))
        .arg("+")
        .arg("COUNT")
        .arg(config.max_len)
        .query(conn)?;
    let low = low.and_then(|l| l.parse::<Offset>().ok());
    let newest = newest.ids.first().and_then(|e| e.id.parse::<Offset>().ok());
    let mut expired = false;
    let entries = frames(after, room, age_cutoff(time, config), &mut expired);
    let complete = !expired
        && low.is_some_and(|low| since >= low)
        && newest.is_some_and(|newest| since <= newest);
    Ok(Replay { entries, complete })
}

/// A page of the room's history for `request.user`, newest first; `None` when the user is not
/// in the room (only members read it).
pub(super) fn page(
    conn: &mut redis::Connection,
    prefix: &str,
    room: &str,
    request: &PageRequest,
    config: &RoomHistoryConfig,
) -> redis::RedisResult<Option<Vec<Utf8Bytes>>> {
    let end = match request.before {
        Some(b) => format!("({b}"),
        None => "+".to_string(),
    };
    let (member, time): (bool, (u64, u64)) = redis::pipe()
        .cmd("SISMEMBER")
        .arg(wire::room_members_key(prefix, room))
        .arg(&*request.user)
        .cmd("TIME")
        .query(conn)?;
    if request.members_only && !member {
        return Ok(None);
    }
    if request.before == Some(Offset(0, 0)) {
        // Nothing comes before the first possible offset, and Redis refuses `(0-0` as a range
        // end.
        return Ok(Some(Vec::new()));
    }
    let cutoff = age_cutoff(time, config);
    let reply: StreamRangeReply = redis::cmd("XREVRANGE")
        .arg(wire::room_stream_key(prefix, room))
        .arg(end)
        .arg(cutoff)
        .arg("COUNT")
        .arg(request.limit)
        .query(conn)?;
    let mut expired = false;
    let page = frames(reply, room, cutoff, &mut expired);
    Ok(Some(page.into_iter().map(|(_, f)| f).collect()))
}
