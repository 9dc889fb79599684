//! The publisher thread: drains the publication queue into pipelined `PUBLISH` commands (with
//! history on, one append script call per dispatch for all its target users instead).
//!
//! Whatever queued while the previous pipeline was in flight goes out in the next one, so the
//! number of round trips per message falls as load rises. A failed pipeline is kept and sent
//! again after reconnecting (at-least-once: Redis may have accepted part of it), while cores keep
//! queueing; past the queue bound the oldest publications are dropped and counted.

use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::cluster::SlotMap;
use super::redis_errors::{classify, ErrorReply};
use super::wire;
use super::{Backoff, Backplane, Publication, Routing};

/// Most publications in one pipeline.
const MAX_BATCH: usize = 4096;
/// Most users one append script call serves (a dispatch to more takes several calls), so one
/// call does not hold Redis for long. The cores' own links use it too.
pub(super) const MAX_USERS_PER_CALL: usize = 128;
/// Connect and I/O timeout for the publisher connection.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the publisher sleeps when the queue is empty (it is unparked on new work).
const IDLE_PARK: Duration = Duration::from_millis(500);
/// How long a stopping publisher keeps trying to flush what is queued.
const STOP_FLUSH: Duration = Duration::from_secs(1);

/// The fingerprint of a seed payload, shared with the subscriber to recognise our own.
pub(crate) fn payload_hash(payload: &[u8]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    payload.hash(&mut h);
    h.finish()
}

/// The script calls for one shard's publications, `members` (batch indexes, ascending): each a
/// range of `members` whose publications are of one dispatch (`same`) and consecutive among
/// them, at most `limit` long. [`Backplane::publish`] queues a dispatch's publications one after
/// the other, so a message usually takes one call; publications of one dispatch that another
/// core's interleaved are split rather than reordered.
pub(super) fn script_calls(
    members: &[usize],
    same: impl Fn(usize, usize) -> bool,
    limit: usize,
) -> Vec<std::ops::Range<usize>> {
    let mut calls = Vec::new();
    let mut start = 0;
    for at in 1..=members.len() {
        if at == members.len() || at - start >= limit.max(1) || !same(members[start], members[at]) {
            calls.push(start..at);
            start = at;
        }
    }
    calls
}

/// Runs until [`Backplane::stop`].
pub(crate) fn run(bp: Arc<Backplane>) {
    let mut publisher = Publisher {
        backoff: Backoff::new(
            bp.config.reconnect_min,
            bp.config.reconnect_max,
            bp.node_id ^ 0x9e37,
        ),
        bp,
        topology: None,
        conns: Vec::new(),
        ever_connected: false,
        outage_logged: false,
        script_sha: None,
    };
    publisher.run();
}

struct Publisher {
    bp: Arc<Backplane>,
    backoff: Backoff,
    /// Shards and their primaries (one "shard" without a cluster).
    topology: Option<SlotMap>,
    /// One connection per shard, `None` while down.
    conns: Vec<Option<redis::Connection>>,
    ever_connected: bool,
    outage_logged: bool,
    /// SHA1 of [`crate::history::APPEND_SCRIPT`], loaded on every (re)connect (a restarted
    /// Redis has an empty script cache), when history is on.
    script_sha: Option<String>,
}

impl Publisher {
    fn run(&mut self) {
        let bp = Arc::clone(&self.bp);
        let mut batch: Vec<Publication> = Vec::with_capacity(MAX_BATCH);
        let mut stop_deadline: Option<Instant> = None;
        loop {
            if bp.stop.load(Relaxed) {
                let deadline = *stop_deadline.get_or_insert_with(|| Instant::now() + STOP_FLUSH);
                if Instant::now() >= deadline || (batch.is_empty() && bp.publications.is_empty()) {
                    break;
                }
            }
            if batch.is_empty() {
                while batch.len() < MAX_BATCH {
                    match bp.publications.pop() {
                        Some(p) => batch.push(p),
                        None => break,
                    }
                }
            }
            if batch.is_empty() {
                // Connect ahead of need, so /healthz tells the truth and the first message
                // does not pay for the connection.
                if !bp.stop.load(Relaxed) && !self.connect_all() {
                    std::thread::sleep(self.backoff.next_delay());
                    continue;
                }
                std::thread::park_timeout(IDLE_PARK);
                continue;
            }
            if self.send(&mut batch) {
                self.backoff.reset();
            } else {
                bp.stats.publish_errors.fetch_add(1, Relaxed);
                bp.stats.publisher_connected.store(0, Relaxed);
                if !bp.stop.load(Relaxed) {
                    std::thread::sleep(self.backoff.next_delay());
                }
            }
        }
        bp.stats.publisher_connected.store(0, Relaxed);
    }

    /// Publishes the batch, one pipeline per shard; removes what Redis accepted. Returns `false`
    /// when anything is left for a retry.
    fn send(&mut self, batch: &mut Vec<Publication>) -> bool {
        let bp = Arc::clone(&self.bp);
        if self.topology.is_none() {
            match bp.topology() {
                Ok(map) => {
                    self.conns = (0..map.shards.len()).map(|_| None).collect();
                    self.topology = Some(map);
                }
                Err(e) => {
                    self.log_outage(&e.to_string());
                    return false;
                }
            }
        }
        let Some(map) = self.topology.clone() else {
            return false;
        };
        let sharded = bp.config.sharded();
        // Channel and payload of each publication, built once.
        let mut shard_of = Vec::with_capacity(batch.len());
        let mut wires: Vec<(String, Vec<u8>)> = Vec::with_capacity(batch.len());
        for p in batch.iter() {
            let mut payload = Vec::new();
            let channel = match bp.config.routing {
                // History: the script builds the payload (it needs the offset Redis assigns).
                Routing::PerUser if bp.history().is_some() => {
                    wire::user_channel(&bp.config.channel_prefix, &p.user)
                }
                Routing::PerUser => {
                    payload.reserve(p.dispatch.frame.len() + 24);
                    wire::write_user_payload(&mut payload, bp.node_id, p.dispatch.frame.as_str());
                    wire::user_channel(&bp.config.channel_prefix, &p.user)
                }
                Routing::Seed => {
                    wire::write_seed_payload(&mut payload, &p.dispatch, &p.user);
                    wire::SEED_CHANNEL.to_string()
                }
            };
            shard_of.push(if sharded {
                map.shard_of(channel.as_bytes())
            } else {
                0
            });
            wires.push((channel, payload));
        }
        let mut done = vec![false; batch.len()];
        // Stored on the primary, but not on `--redis-wait-replicas` replicas in time.
        let mut uncopied = vec![false; batch.len()];
        // Refused by Redis (out of memory, loading, ...): answered `unavailable`, not retried.
        let mut refused = vec![false; batch.len()];
        let wait = match (sharded, bp.history()) {
            (true, Some(_)) if bp.config.wait_replicas > 0 => Some(bp.config.wait_replicas),
            _ => None,
        };
        let mut all_ok = true;
        for shard in 0..map.shards.len() {
            let members: Vec<usize> = (0..batch.len()).filter(|&i| shard_of[i] == shard).collect();
            if members.is_empty() {
                continue;
            }
            if self.conns[shard].is_none() && !self.connect(shard, &map.shards[shard]) {
                all_ok = false;
                if sharded {
                    // The primary may have failed over: read the slot map again next time.
                    self.topology = None;
                }
                continue;
            }
            // One command per call, each with the batch indexes it settles.
            let mut calls: Vec<(redis::Cmd, Vec<usize>)> = Vec::with_capacity(members.len());
            let command = if sharded { "SPUBLISH" } else { "PUBLISH" };
            if let (Some(h), Some(sha), true) = (bp.history(), self.script_sha.as_deref(), sharded)
            {
                // A cluster: one call per user on its shard, its keys tagged into its channel's
                // slot (`tagged`); a user whose keys cannot be is published without history.
                for &i in &members {
                    let dispatch = &batch[i].dispatch;
                    let channel = wires[i].0.as_str();
                    let cmd = match super::tagged::append_keys(channel, dispatch.dedupe.as_deref())
                    {
                        Some(keys) => crate::history::append_call_keys(
                            sha,
                            bp.node_id,
                            h,
                            dispatch.frame.as_str(),
                            dispatch.dedupe.is_some(),
                            std::slice::from_ref(&keys),
                        ),
                        None => {
                            let mut payload = Vec::new();
                            let frame = dispatch.frame.as_str();
                            wire::write_user_payload(&mut payload, bp.node_id, frame);
                            let mut cmd = redis::cmd(command);
                            cmd.arg(channel).arg(payload);
                            cmd
                        }
                    };
                    calls.push((cmd, vec![i]));
                }
            } else if let Some((h, sha)) = bp.history().zip(self.script_sha.as_deref()) {
                // One atomic append + publish per dispatch for all its users here: see
                // APPEND_SCRIPT.
                let same = |a: usize, b: usize| Arc::ptr_eq(&batch[a].dispatch, &batch[b].dispatch);
                let limit = MAX_USERS_PER_CALL;
                let mut users: Vec<(&str, &str)> = Vec::new();
                for call in script_calls(&members, same, limit) {
                    let dispatch = &batch[members[call.start]].dispatch;
                    users.clear();
                    users.extend(
                        members[call.clone()]
                            .iter()
                            .map(|&i| (&*batch[i].user, wires[i].0.as_str())),
                    );
                    let cmd = crate::history::append_call(
                        sha,
                        &bp.config.channel_prefix,
                        bp.node_id,
                        h,
                        dispatch.frame.as_str(),
                        dispatch.dedupe.as_deref(),
                        &users,
                    );
                    calls.push((cmd, members[call].to_vec()));
                }
            } else {
                for &i in &members {
                    let (channel, payload) = &wires[i];
                    if bp.config.routing == Routing::Seed {
                        // Announce it before Redis can echo it back to our subscriber.
                        bp.own_payloads.push(payload_hash(payload));
                    }
                    let mut cmd = redis::cmd(command);
                    cmd.arg(channel.as_str()).arg(&payload[..]);
                    calls.push((cmd, vec![i]));
                }
            }
            // Scripts cannot WAIT; the same connection can, right after them.
            let wait_for = wait.map(|n| (n, bp.config.wait_timeout.as_millis() as u64));
            let Some(conn) = self.conns[shard].as_mut() else {
                continue;
            };
            let reload = self.script_sha.is_some().then_some(sharded);
            let replies = match query_calls(conn, &calls, wait_for, reload) {
                Ok(replies) => replies,
                Err(e) => {
                    // The connection failed (I/O, a timeout): everything is kept for a retry.
                    all_ok = false;
                    self.conns[shard] = None;
                    log::warn!(
                        "redis publish to {} failed: {e}; {} publications kept for retry",
                        map.shards[shard],
                        members.len()
                    );
                    self.outage_logged = true;
                    continue;
                }
            };
            let mut taken = 0;
            let mut not_copied = 0;
            for ((_, indexes), reply) in calls.iter().zip(replies) {
                match reply {
                    CallReply::Taken { copied } => {
                        taken += indexes.len();
                        not_copied += if copied { 0 } else { indexes.len() };
                        for &i in indexes {
                            done[i] = true;
                            uncopied[i] = !copied;
                        }
                    }
                    // Redis will not write now: these fail at once (their senders hear
                    // `unavailable`), the connection stays; nothing of them was stored.
                    CallReply::Failed(ErrorReply::RefusesWrites, why) => {
                        bp.stats
                            .publish_errors
                            .fetch_add(indexes.len() as u64, Relaxed);
                        bp.note_write_refused(&why);
                        for &i in indexes {
                            done[i] = true;
                            refused[i] = true;
                        }
                    }
                    // A demoted master or a moved slot (nothing ran: re-read the topology, the
                    // slot map or the master Sentinel names, before reconnecting), a second
                    // NOSCRIPT right after loading the script, anything else: kept for a retry
                    // on a new connection, as after a lost one.
                    CallReply::Failed(kind, why) => {
                        all_ok = false;
                        if self.conns[shard].take().is_some() {
                            if kind == ErrorReply::WrongNode {
                                self.topology = None;
                            }
                            if !self.outage_logged {
                                log::warn!(
                                    "redis publish to {} answered {why}; reconnecting{}, \
                                     publications kept for retry",
                                    map.shards[shard],
                                    match kind {
                                        ErrorReply::WrongNode => " to the node that takes writes",
                                        _ => "",
                                    }
                                );
                                self.outage_logged = true;
                            }
                        }
                    }
                }
            }
            if taken > 0 {
                bp.stats.published.fetch_add(taken as u64, Relaxed);
                bp.note_write_taken();
            }
            if not_copied > 0 {
                log::warn!(
                    "redis: {not_copied} publications on {} did not reach {} replicas in time; \
                     their acks say unavailable",
                    map.shards[shard],
                    wait.unwrap_or(0)
                );
            }
        }
        let mut i = 0;
        batch.retain(|p| {
            let keep = !done[i];
            if !keep {
                bp.settle(p, !uncopied[i] && !refused[i]);
            }
            i += 1;
            keep
        });
        all_ok && batch.is_empty()
    }

    /// Makes sure the topology is known and every shard connected.
    fn connect_all(&mut self) -> bool {
        if self.topology.is_none() {
            match self.bp.topology() {
                Ok(map) => {
                    self.conns = (0..map.shards.len()).map(|_| None).collect();
                    self.topology = Some(map);
                }
                Err(e) => {
                    self.log_outage(&e.to_string());
                    return false;
                }
            }
        }
        let Some(map) = self.topology.clone() else {
            return false;
        };
        let mut ok = true;
        for (shard, addr) in map.shards.iter().enumerate() {
            if self.conns[shard].is_none() {
                ok &= self.connect(shard, addr);
            }
        }
        if ok {
            self.backoff.reset();
        }
        ok
    }

    fn connect(&mut self, shard: usize, addr: &str) -> bool {
        let bp = Arc::clone(&self.bp);
        let result = bp
            .config
            .client(&bp.node_url(addr))
            .and_then(|client| client.get_connection_with_timeout(IO_TIMEOUT));
        let result = result.and_then(|mut c| {
            if bp.history().is_some() {
                self.script_sha = Some(load_append_script(&mut c, bp.config.sharded())?);
            }
            Ok(c)
        });
        match result {
            Ok(c) => {
                let _ = c.set_read_timeout(Some(IO_TIMEOUT));
                let _ = c.set_write_timeout(Some(IO_TIMEOUT));
                if self.ever_connected && self.outage_logged {
                    bp.stats.reconnects.fetch_add(1, Relaxed);
                    log::info!(
                        "redis publisher reconnected to {addr}; {} publications waiting",
                        bp.queue_depth()
                    );
                    settle_after_outage(&bp);
                }
                self.ever_connected = true;
                self.outage_logged = false;
                self.conns[shard] = Some(c);
                let all = self.conns.iter().all(Option::is_some);
                bp.stats.publisher_connected.store(u64::from(all), Relaxed);
                true
            }
            Err(e) => {
                self.log_outage(&e.to_string());
                false
            }
        }
    }

    fn log_outage(&mut self, e: &str) {
        if !self.outage_logged {
            log::warn!(
                "redis publisher cannot connect: {}; retrying with backoff",
                super::endpoint::plain_words(e)
            );
            self.outage_logged = true;
        }
    }
}

/// Loads the append script (the same text on every shard, so one SHA serves them all) and
/// returns its SHA.
fn load_append_script(conn: &mut redis::Connection, sharded: bool) -> redis::RedisResult<String> {
    let script = match sharded {
        true => crate::history::sharded_append_script(),
        false => crate::history::APPEND_SCRIPT.to_string(),
    };
    redis::cmd("SCRIPT").arg("LOAD").arg(script).query(conn)
}

/// What Redis answered one call of a pipeline.
#[derive(Debug, PartialEq, Eq)]
enum CallReply {
    /// Taken; `copied`: and, when `WAIT` was asked for, by enough replicas in time.
    Taken { copied: bool },
    /// An error reply, sorted, and its text.
    Failed(ErrorReply, String),
}

/// Sends `calls` (each with the batch indexes it settles) in one pipeline, followed by
/// `WAIT replicas ms` when asked, and returns one reply per call. Calls answered `NOSCRIPT` (the
/// script cache was flushed, or a failover reached a node without it; the script did not run)
/// are sent once more on the same connection after loading the script again (`reload`: whether
/// the sharded script), so nothing is lost or stored twice. An `Err` is the connection's
/// failure (I/O, a timeout): nothing is known of any call.
fn query_calls(
    conn: &mut redis::Connection,
    calls: &[(redis::Cmd, Vec<usize>)],
    wait: Option<(u32, u64)>,
    reload: Option<bool>,
) -> redis::RedisResult<Vec<CallReply>> {
    let all: Vec<&redis::Cmd> = calls.iter().map(|(cmd, _)| cmd).collect();
    let mut replies = query_round(conn, &all, wait)?;
    let again: Vec<usize> = (0..replies.len())
        .filter(|&i| matches!(replies[i], CallReply::Failed(ErrorReply::NoScript, _)))
        .collect();
    if let (false, Some(sharded)) = (again.is_empty(), reload) {
        load_append_script(conn, sharded)?;
        let retried: Vec<&redis::Cmd> = again.iter().map(|&i| all[i]).collect();
        for (i, reply) in again.into_iter().zip(query_round(conn, &retried, wait)?) {
            replies[i] = reply;
        }
    }
    Ok(replies)
}

/// One pipeline of `cmds` (and `WAIT`): a reply per command, error replies included.
fn query_round(
    conn: &mut redis::Connection,
    cmds: &[&redis::Cmd],
    wait: Option<(u32, u64)>,
) -> redis::RedisResult<Vec<CallReply>> {
    use redis::ConnectionLike;
    let mut out = Vec::new();
    for cmd in cmds {
        cmd.write_packed_command(&mut out);
    }
    if let Some((replicas, ms)) = wait {
        redis::cmd("WAIT")
            .arg(replicas)
            .arg(ms)
            .write_packed_command(&mut out);
    }
    let values = conn.req_packed_commands(&out, 0, cmds.len() + usize::from(wait.is_some()))?;
    Ok(call_replies(values, cmds.len(), wait.map(|(n, _)| n)))
}

/// Sorts the values a pipeline of `calls` commands (then `WAIT replicas`, if given) answered.
fn call_replies(values: Vec<redis::Value>, calls: usize, wait: Option<u32>) -> Vec<CallReply> {
    let copied = wait.is_none_or(|replicas| {
        matches!(values.get(calls), Some(redis::Value::Int(n)) if *n >= i64::from(replicas))
    });
    let mut replies: Vec<CallReply> = values
        .into_iter()
        .take(calls)
        .map(|value| match value {
            redis::Value::ServerError(e) => {
                let text = format!("{} {}", e.code(), e.details().unwrap_or_default());
                CallReply::Failed(classify(e.code()), text)
            }
            _ => CallReply::Taken { copied },
        })
        .collect();
    // Fewer values than calls cannot come from a healthy connection: the rest is unknown.
    while replies.len() < calls {
        replies.push(CallReply::Failed(ErrorReply::Other, "no reply".into()));
    }
    replies
}

/// After an outage, other instances' subscribers re-subscribe on their own backoff schedule.
/// Publications queued during the outage wait until this instance's subscriber is back and one
/// more maximum backoff interval has passed, so the backlog is not published to channels nobody
/// has re-subscribed to yet.
fn settle_after_outage(bp: &Backplane) {
    let deadline = Instant::now() + bp.config.reconnect_max * 3;
    while !bp.subscriber_ready.load(SeqCst) && Instant::now() < deadline && !bp.stop.load(Relaxed) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let settle = Instant::now() + bp.config.reconnect_max;
    while Instant::now() < settle && !bp.stop.load(Relaxed) {
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::{call_replies, script_calls, CallReply, ErrorReply};
    use redis::Value;

    fn error_value(resp: &[u8]) -> Value {
        redis::parse_redis_value(resp).expect("a RESP error")
    }

    #[test]
    fn each_call_gets_its_own_reply_and_wait_says_whether_copied() {
        let values = vec![
            Value::Okay,
            error_value(b"-OOM command not allowed when used memory > 'maxmemory'.\r\n"),
            error_value(b"-NOSCRIPT No matching script.\r\n"),
            error_value(b"-READONLY You can't write against a read only replica.\r\n"),
            Value::Int(1),
        ];
        let replies = call_replies(values.clone(), 4, None);
        assert_eq!(replies[0], CallReply::Taken { copied: true });
        assert!(matches!(
            &replies[1],
            CallReply::Failed(ErrorReply::RefusesWrites, why) if why.starts_with("OOM command")
        ));
        assert!(matches!(
            replies[2],
            CallReply::Failed(ErrorReply::NoScript, _)
        ));
        assert!(matches!(
            replies[3],
            CallReply::Failed(ErrorReply::WrongNode, _)
        ));
        // The last value is WAIT's: one replica reached.
        let replies = call_replies(values.clone(), 4, Some(1));
        assert_eq!(replies[0], CallReply::Taken { copied: true });
        let replies = call_replies(values, 4, Some(2));
        assert_eq!(replies[0], CallReply::Taken { copied: false });
        // Fewer values than calls: the rest is not taken.
        let replies = call_replies(vec![Value::Okay], 2, None);
        assert!(matches!(
            replies[1],
            CallReply::Failed(ErrorReply::Other, _)
        ));
    }

    #[test]
    fn a_dispatch_takes_one_call_for_its_consecutive_publications() {
        // Batch indexes 0..7, dispatch of each: A A B C C C A.
        let dispatch = ['A', 'A', 'B', 'C', 'C', 'C', 'A'];
        let same = |a: usize, b: usize| dispatch[a] == dispatch[b];
        let all: Vec<usize> = (0..7).collect();
        assert_eq!(script_calls(&all, same, 128), [0..2, 2..3, 3..6, 6..7]);
        // A bound on users per call splits a long run.
        assert_eq!(script_calls(&all, same, 2), [0..2, 2..3, 3..5, 5..6, 6..7]);
        // One user per call (a cluster) is the old one call per publication.
        assert_eq!(script_calls(&all, same, 1).len(), 7);
        assert_eq!(script_calls(&all, same, 0).len(), 7);
        // Members of one shard: ranges index `members`, not the batch; 0 and 1 are still one
        // dispatch, and so are 3 and 5 with nothing of this shard between them.
        let members = [0, 1, 3, 5, 6];
        let calls = script_calls(&members, |a, b| dispatch[a] == dispatch[b], 128);
        assert_eq!(calls, [0..2, 2..4, 4..5]);
        assert!(script_calls(&[], same, 128).is_empty());
    }
}
