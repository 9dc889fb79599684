//! The history worker: runs replay queries against the users' Redis streams on its own blocking
//! connection, so neither the subscriber nor a core ever waits for Redis.
//!
//! The subscriber hands it a request only once this instance's subscription to the user's
//! channel is confirmed; the answer goes to the requesting core's inbox.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Backoff, Backplane, ReplayRequest};
use crate::bus::{Bus, CoreMsg, ReplayResult};
use crate::history::{self, Offset, Replay};

const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs until the subscriber (the only sender) is gone or the backplane stops.
pub(crate) fn run(bp: Arc<Backplane>, bus: Arc<Bus>, rx: Receiver<ReplayRequest>) {
    let Some(config) = bp.history().cloned() else {
        return;
    };
    let mut conn: Option<redis::Connection> = None;
    let mut backoff = Backoff::new(
        bp.config.reconnect_min,
        bp.config.reconnect_max,
        bp.node_id ^ 0x5eed,
    );
    while !bp.stop.load(Relaxed) {
        let request = match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        if Instant::now() >= request.deadline {
            continue;
        }
        if conn.is_none() {
            conn = redis::Client::open(bp.config.url.as_str())
                .and_then(|c| c.get_connection_with_timeout(IO_TIMEOUT))
                .inspect(|c| {
                    let _ = c.set_read_timeout(Some(IO_TIMEOUT));
                    let _ = c.set_write_timeout(Some(IO_TIMEOUT));
                })
                .ok();
        }
        let result = match conn.as_mut() {
            Some(c) => query(c, &bp.config.channel_prefix, &request, config.max_len),
            None => Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "not connected",
            ))),
        };
        let replay = match result {
            Ok(replay) => {
                backoff.reset();
                replay
            }
            Err(e) => {
                // Redis may be restarting. The request goes back through the subscriber, which
                // holds it until the user's channel is confirmed again: querying as soon as
                // Redis answers could run before the re-subscription and miss what is
                // published in between.
                log::warn!("redis history query for {} failed: {e}", request.user);
                conn = None;
                std::thread::sleep(backoff.next_delay());
                bp.request_replay(request);
                continue;
            }
        };
        let result = ReplayResult {
            key: request.key,
            serial: request.serial,
            replay,
        };
        if !bus.send(request.core, CoreMsg::Replayed(Box::new(result))) {
            // The core's recovery deadline answers the client instead.
            bp.stats.inbox_drops.fetch_add(1, Relaxed);
        }
    }
}

/// `XRANGE key since + COUNT n`: `since` itself is asked for too, because its presence is what
/// proves nothing after it was trimmed (streams are trimmed from the oldest end only).
fn query(
    conn: &mut redis::Connection,
    prefix: &str,
    request: &ReplayRequest,
    max_len: usize,
) -> redis::RedisResult<Replay> {
    let key = history::stream_key(prefix, &request.user);
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(&key)
        .arg(request.since.to_string())
        .arg("+")
        .arg("COUNT")
        .arg(max_len + 1)
        .query(conn)?;
    let mut replay = Replay::default();
    for (i, entry) in reply.ids.into_iter().enumerate() {
        let Ok(offset) = entry.id.parse::<Offset>() else {
            continue;
        };
        if i == 0 && offset == request.since {
            replay.complete = true;
        }
        if offset <= request.since {
            continue;
        }
        let frame = match entry.map.get("f") {
            Some(redis::Value::BulkString(b)) => std::str::from_utf8(b).ok(),
            _ => None,
        };
        if let Some(frame) = frame {
            replay
                .entries
                .push((offset, history::with_offset(frame, offset)));
        }
    }
    Ok(replay)
}
