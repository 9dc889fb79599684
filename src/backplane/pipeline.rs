//! One core's publishing pipeline, apart from its socket: the publications not written yet
//! (bounded), the commands written and waiting for their replies (each with the publications it
//! settles), and the bytes to write. [`super::core_link`] drives it over a non-blocking socket;
//! everything here is tested without one.
//!
//! Order: publications are numbered as they are pushed; whatever must be sent again (a lost
//! connection, a `NOSCRIPT` reply) goes back in that order, ahead of what was never sent, and is
//! never dropped by the bound (as the publisher thread keeps its failed batch).

use std::collections::VecDeque;
use std::sync::Arc;

use super::redis_errors::{classify, ErrorReply};
use super::resp::{Item, Value};
use super::{publisher, wire, Publication};
use crate::bus::{AckWaiter, Dispatch};
use crate::history::HistoryConfig;

/// Most publications written and not yet answered; the rest waits (bounded) in the queue, so
/// a slow Redis cannot grow the output buffer without limit.
pub(crate) const MAX_IN_FLIGHT: usize = 4096;

/// What the encoding needs to know, fixed at start.
#[derive(Debug, Clone)]
pub(crate) struct Encoding {
    pub prefix: String,
    pub node_id: u64,
    /// History on: one `EVALSHA` of the append script per dispatch; off: one `PUBLISH` per user.
    pub history: Option<HistoryConfig>,
    /// SHA1 of [`crate::history::APPEND_SCRIPT`].
    pub sha: String,
}

impl Encoding {
    pub fn new(prefix: &str, node_id: u64, history: Option<HistoryConfig>) -> Self {
        let sha = redis::Script::new(crate::history::APPEND_SCRIPT)
            .get_hash()
            .to_string();
        Encoding {
            prefix: prefix.to_string(),
            node_id,
            history,
            sha,
        }
    }
}

/// A queued publication and its place in the order.
struct Entry {
    seq: u64,
    publication: Publication,
}

/// A command written and waiting for its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    /// `AUTH`, `SELECT` or `SCRIPT LOAD`: an error reply means the connection is unusable.
    Setup(&'static str),
    /// A publishing command settling the next `n` publications of `sent`; `acks`: one of
    /// them holds a client's ack; `encoded_at`: when it was encoded (the round-trip histogram).
    Publish {
        n: usize,
        acks: bool,
        encoded_at: std::time::Instant,
    },
}

impl Sent {
    /// Whether someone waits for this reply: a setup command, or an ack held on it.
    fn urgent(self) -> bool {
        matches!(self, Sent::Setup(_) | Sent::Publish { acks: true, .. })
    }
}

/// Why the connection must be dropped (everything in flight is kept and sent again).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ReplyError {
    /// A setup command failed (bad password, unknown database, ...).
    Setup(&'static str, String),
    /// A publishing command failed with an error other than `NOSCRIPT`.
    Publish(String),
    /// A reply nobody asked for.
    Unexpected,
}

/// Whether a `ROLE` reply says "master".
fn is_master(reply: &Value<'_>) -> bool {
    let Value::Array(items) = reply else {
        return false;
    };
    matches!(items.first(), Some(Item::Bulk(role) | Item::Simple(role)) if *role == b"master")
}

impl std::fmt::Display for ReplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplyError::Setup(command, e) => write!(
                f,
                "{} (Redis refused {command})",
                super::endpoint::plain_words(e)
            ),
            ReplyError::Publish(e) => write!(
                f,
                "{} (Redis refused a publication)",
                super::endpoint::plain_words(e)
            ),
            ReplyError::Unexpected => f.write_str("Redis sent a reply nobody asked for"),
        }
    }
}

/// The pipeline state.
pub(crate) struct Pipeline {
    /// Never written; past `bound` the oldest dispatch's publications are dropped.
    queued: VecDeque<Entry>,
    /// Written before and failed: sent first, never dropped.
    retry: VecDeque<Entry>,
    /// Written, in command order, waiting for their replies.
    sent: VecDeque<Entry>,
    commands: VecDeque<Sent>,
    /// How many of `commands` are [`Sent::urgent`].
    urgent: usize,
    out: Vec<u8>,
    bound: usize,
    next_seq: u64,
    /// Redis lost the script: load it before the next append.
    need_load: bool,
    /// Waiters whose last publication settled, for the caller to answer.
    ready: Vec<Arc<AckWaiter>>,
    /// Publications Redis took, since the caller last looked.
    pub published: u64,
    /// Publications dropped by the bound, since the caller last looked.
    pub dropped: u64,
    /// Publications Redis refused to write (see [`ErrorReply::RefusesWrites`]), since the
    /// caller last looked, and the last such reply.
    pub refused: u64,
    pub refusal: Option<String>,
    /// From encoding the last publishing command answered to its reply, if one was answered
    /// since the caller last looked (`switchboard_redis_round_trip_seconds`).
    pub round_trip: Option<std::time::Duration>,
}

impl Pipeline {
    /// An empty pipeline holding at most `bound` (at least 1) unwritten publications.
    pub fn new(bound: usize) -> Self {
        Pipeline {
            queued: VecDeque::new(),
            retry: VecDeque::new(),
            sent: VecDeque::new(),
            commands: VecDeque::new(),
            urgent: 0,
            out: Vec::new(),
            bound: bound.max(1),
            next_seq: 0,
            need_load: false,
            ready: Vec::new(),
            published: 0,
            dropped: 0,
            refused: 0,
            refusal: None,
            round_trip: None,
        }
    }

    /// Queues `dispatch` for each of its users. Past the bound, the oldest queued dispatch's
    /// publications are all dropped and their waiter refused (`unavailable`): a refused message
    /// is then stored for none of its users. The dispatch being pushed is never the one dropped.
    pub fn push(&mut self, dispatch: &Arc<Dispatch>, waiter: Option<&Arc<AckWaiter>>) {
        for user in dispatch.users.iter() {
            self.queued.push_back(Entry {
                seq: self.next_seq,
                publication: Publication {
                    user: user.clone(),
                    dispatch: Arc::clone(dispatch),
                    waiter: waiter.cloned(),
                },
            });
            self.next_seq += 1;
        }
        while self.queued.len() > self.bound {
            let Some(front) = self.queued.front() else {
                break;
            };
            if Arc::ptr_eq(&front.publication.dispatch, dispatch) {
                break;
            }
            let oldest = Arc::clone(&front.publication.dispatch);
            while self
                .queued
                .front()
                .is_some_and(|e| Arc::ptr_eq(&e.publication.dispatch, &oldest))
            {
                if let Some(e) = self.queued.pop_front() {
                    self.dropped += 1;
                    self.settle(&e.publication, false);
                }
            }
        }
    }

    /// A new connection: forget what the old one had pending (the caller [`Self::reset`] it)
    /// and queue the setup commands: `handshake` (its `commands` AUTH/SELECT) and, with
    /// history, `SCRIPT LOAD` (a restarted Redis has an empty script cache).
    pub fn connected(&mut self, enc: &Encoding, handshake: &[u8], names: &[&'static str]) {
        self.out.clear();
        self.out.extend_from_slice(handshake);
        for &name in names {
            self.sent_command(Sent::Setup(name));
        }
        self.need_load = enc.history.is_some();
    }

    /// Encodes what waits (the retries first) into the output buffer, up to
    /// [`MAX_IN_FLIGHT`] publications in flight: one `EVALSHA` per run of one dispatch's
    /// publications with history, one `PUBLISH` per publication without.
    pub fn encode(&mut self, enc: &Encoding) {
        let room = MAX_IN_FLIGHT.saturating_sub(self.sent.len());
        let take = room.min(self.retry.len() + self.queued.len());
        if take == 0 {
            return;
        }
        if self.need_load && enc.history.is_some() {
            redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(crate::history::APPEND_SCRIPT)
                .write_packed_command(&mut self.out);
            self.sent_command(Sent::Setup("SCRIPT LOAD"));
            self.need_load = false;
        }
        let encoded_at = std::time::Instant::now();
        let first = self.sent.len();
        for _ in 0..take {
            let next = self.retry.pop_front().or_else(|| self.queued.pop_front());
            if let Some(e) = next {
                self.sent.push_back(e);
            }
        }
        let batch = self.sent.range(first..).map(|e| &e.publication);
        match &enc.history {
            Some(h) => {
                let batch: Vec<&Publication> = batch.collect();
                let members: Vec<usize> = (0..batch.len()).collect();
                let same = |a: usize, b: usize| Arc::ptr_eq(&batch[a].dispatch, &batch[b].dispatch);
                for call in publisher::script_calls(&members, same, publisher::MAX_USERS_PER_CALL) {
                    let dispatch = &batch[call.start].dispatch;
                    let channels: Vec<String> = batch[call.clone()]
                        .iter()
                        .map(|p| wire::user_channel(&enc.prefix, &p.user))
                        .collect();
                    let args: Vec<(&str, &str)> = batch[call.clone()]
                        .iter()
                        .zip(&channels)
                        .map(|(p, c)| (&*p.user, c.as_str()))
                        .collect();
                    crate::history::append_call(
                        &enc.sha,
                        &enc.prefix,
                        enc.node_id,
                        h,
                        dispatch.frame.as_str(),
                        dispatch.dedupe.as_deref(),
                        &args,
                    )
                    .write_packed_command(&mut self.out);
                    let acks = batch[call.clone()].iter().any(|p| p.waiter.is_some());
                    let command = Sent::Publish {
                        n: call.len(),
                        acks,
                        encoded_at,
                    };
                    // Not `sent_command`: `batch` borrows `sent`.
                    self.urgent += usize::from(command.urgent());
                    self.commands.push_back(command);
                }
            }
            None => {
                let mut payload = Vec::new();
                for p in batch {
                    payload.clear();
                    wire::write_user_payload(&mut payload, enc.node_id, p.dispatch.frame.as_str());
                    redis::cmd("PUBLISH")
                        .arg(wire::user_channel(&enc.prefix, &p.user))
                        .arg(&payload[..])
                        .write_packed_command(&mut self.out);
                    let command = Sent::Publish {
                        n: 1,
                        acks: p.waiter.is_some(),
                        encoded_at,
                    };
                    self.urgent += usize::from(command.urgent());
                    self.commands.push_back(command);
                }
            }
        }
    }

    /// Matches one reply to the oldest command in flight and settles its publications. A
    /// `NOSCRIPT` error (Redis lost its script cache) queues them again behind a `SCRIPT LOAD`.
    /// An error means the caller drops the connection and calls [`Self::reset`].
    pub fn on_reply(&mut self, value: &Value<'_>) -> Result<(), ReplyError> {
        let Some(command) = self.commands.pop_front() else {
            return Err(ReplyError::Unexpected);
        };
        self.urgent -= usize::from(command.urgent());
        let error = value.error().map(String::from_utf8_lossy);
        let n = match command {
            Sent::Setup(name) => {
                return match error {
                    Some(e) => Err(ReplyError::Setup(name, e.into_owned())),
                    // With Sentinel the link asks first: a demoted master would take PUBLISH
                    // (it is not a write) and its subscribers would never see it.
                    None if name == "ROLE" && !is_master(value) => Err(ReplyError::Setup(
                        name,
                        "READONLY: this Redis is a replica, not the master".into(),
                    )),
                    None => Ok(()),
                };
            }
            Sent::Publish { n, encoded_at, .. } => {
                self.round_trip = Some(encoded_at.elapsed());
                n.min(self.sent.len())
            }
        };
        match error {
            // Redis answered and would not write (out of memory, still loading, a failed
            // snapshot): the connection is fine, reconnecting would not help. The publications
            // fail now, so their senders hear `unavailable` at once instead of waiting on a
            // retry loop; none of them was acknowledged.
            Some(e) if classify(&e) == ErrorReply::RefusesWrites => {
                for _ in 0..n {
                    if let Some(e) = self.sent.pop_front() {
                        self.refused += 1;
                        self.settle(&e.publication, false);
                    }
                }
                self.refusal = Some(e.into_owned());
                Ok(())
            }
            Some(e) if classify(&e) == ErrorReply::NoScript => {
                let again: Vec<Entry> = self.sent.drain(..n).collect();
                self.retry.extend(again);
                // Replies come in command order, but a reset may have left retries behind:
                // keep the push order.
                self.retry.make_contiguous().sort_by_key(|e| e.seq);
                self.need_load = true;
                Ok(())
            }
            Some(e) => {
                // Back where it came from: `reset` requeues it with the rest.
                self.urgent += usize::from(command.urgent());
                self.commands.push_front(command);
                Err(ReplyError::Publish(e.into_owned()))
            }
            None => {
                for _ in 0..n {
                    if let Some(e) = self.sent.pop_front() {
                        self.published += 1;
                        self.settle(&e.publication, true);
                    }
                }
                Ok(())
            }
        }
    }

    /// The connection is gone: everything written and unanswered is sent again (in push order,
    /// ahead of what was never written) on the next connection.
    pub fn reset(&mut self) {
        self.retry.extend(self.sent.drain(..));
        self.retry.make_contiguous().sort_by_key(|e| e.seq);
        self.commands.clear();
        self.urgent = 0;
        self.out.clear();
        self.need_load = false;
    }

    /// The bytes to write; the caller drains what it wrote.
    pub fn out(&mut self) -> &mut Vec<u8> {
        &mut self.out
    }

    /// Publications not written yet (or to be written again).
    pub fn depth(&self) -> usize {
        self.queued.len() + self.retry.len()
    }

    /// Whether something waits to be encoded.
    pub fn has_unsent(&self) -> bool {
        !self.queued.is_empty() || !self.retry.is_empty()
    }

    /// Commands written and not answered yet.
    pub fn awaiting_replies(&self) -> bool {
        !self.commands.is_empty()
    }

    /// Whether a command in flight has a reply someone waits for (a setup command, a held
    /// ack): the caller then reads replies as soon as they come.
    pub fn replies_urgent(&self) -> bool {
        self.urgent > 0
    }

    /// A setup command (AUTH, SELECT, ROLE, SCRIPT LOAD) is still waiting for its reply.
    pub fn setup_unanswered(&self) -> bool {
        self.commands.iter().any(|c| matches!(c, Sent::Setup(_)))
    }

    fn sent_command(&mut self, command: Sent) {
        self.urgent += usize::from(command.urgent());
        self.commands.push_back(command);
    }

    /// Nothing queued, nothing in flight.
    pub fn is_idle(&self) -> bool {
        !self.has_unsent() && self.sent.is_empty()
    }

    /// The waiters whose ack is due, for the caller to answer.
    pub fn take_ready(&mut self, into: &mut Vec<Arc<AckWaiter>>) {
        into.append(&mut self.ready);
    }

    fn settle(&mut self, publication: &Publication, taken: bool) {
        if let Some(w) = &publication.waiter {
            if w.settle_ready(taken) {
                self.ready.push(Arc::clone(w));
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::backplane::resp::Item;

    fn dispatch(users: &[&str], text: &str) -> Arc<Dispatch> {
        let users = users.iter().map(|u| (*u).into()).collect();
        Arc::new(crate::bus::encode_dispatch(users, "e", text).unwrap())
    }

    fn waiter(publications: usize) -> Arc<AckWaiter> {
        Arc::new(AckWaiter::new(
            0,
            1,
            1,
            7,
            serde_json::Value::Null,
            publications,
        ))
    }

    fn enc(history: bool) -> Encoding {
        Encoding::new("sb", 1, history.then(HistoryConfig::default))
    }

    /// The RESP commands in `out`, each as its arguments (shared with `core_link`'s tests).
    pub(in crate::backplane) fn commands(out: &[u8]) -> Vec<Vec<String>> {
        let mut parser = redis::Parser::new();
        let mut rest = out;
        let mut all = Vec::new();
        while let Ok(redis::Value::Array(items)) = parser.parse_value(&mut rest) {
            all.push(
                items
                    .into_iter()
                    .map(|v| match v {
                        redis::Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
                        other => format!("{other:?}"),
                    })
                    .collect(),
            );
        }
        all
    }

    fn error(text: &'static str) -> Value<'static> {
        Value::Item(Item::Error(text.as_bytes()))
    }

    const OK: Value<'static> = Value::Item(Item::Simple(b"OK"));

    fn ids() -> Value<'static> {
        Value::Array(Default::default())
    }

    fn texts(p: &Pipeline) -> Vec<String> {
        p.retry
            .iter()
            .chain(&p.queued)
            .map(|e| format!("{}:{}", e.publication.user, e.publication.dispatch.frame))
            .collect()
    }

    #[test]
    fn past_the_bound_the_oldest_dispatch_is_dropped_and_refused() {
        let mut p = Pipeline::new(2);
        let (w1, w2, w3) = (waiter(2), waiter(2), waiter(2));
        p.push(&dispatch(&["a", "b"], "1"), Some(&w1));
        p.push(&dispatch(&["a", "b"], "2"), Some(&w2));
        assert_eq!(p.dropped, 2, "the whole first dispatch goes");
        assert_eq!(p.depth(), 2);
        let mut ready = Vec::new();
        p.take_ready(&mut ready);
        assert_eq!(ready.len(), 1);
        assert!(Arc::ptr_eq(&ready[0], &w1) && !w1.taken(), "refused");
        // A dispatch bigger than the bound is not dropped by its own push.
        p.push(&dispatch(&["a", "b", "c"], "3"), Some(&w3));
        assert_eq!(p.depth(), 3);
        assert!(!w2.taken());
        assert!(w3.taken());
    }

    #[test]
    fn replies_settle_in_order_and_the_last_one_readies_the_ack() {
        let e = enc(false);
        let mut p = Pipeline::new(100);
        let w = waiter(3);
        p.push(&dispatch(&["a", "b"], "x"), Some(&w));
        p.push(&dispatch(&["c"], "y"), Some(&w));
        p.connected(&e, b"", &[]);
        p.encode(&e);
        let sent = commands(p.out());
        assert_eq!(sent.len(), 3);
        assert_eq!(sent[0][..2], ["PUBLISH", "sb:u:a"]);
        assert_eq!(sent[2][..2], ["PUBLISH", "sb:u:c"]);
        assert!(p.depth() == 0 && !p.is_idle());
        let mut ready = Vec::new();
        for i in 0..3 {
            p.take_ready(&mut ready);
            assert!(ready.is_empty(), "ready after {i} replies");
            p.on_reply(&Value::Item(Item::Int(1))).unwrap();
        }
        p.take_ready(&mut ready);
        assert_eq!(ready.len(), 1);
        assert!(w.taken());
        assert_eq!(p.published, 3);
        assert!(p.is_idle());
        assert_eq!(p.on_reply(&OK), Err(ReplyError::Unexpected));
    }

    #[test]
    fn history_sends_one_append_per_dispatch_after_the_setup() {
        let e = enc(true);
        let mut p = Pipeline::new(100);
        p.push(&dispatch(&["a", "b"], "x"), None);
        p.push(&dispatch(&["c"], "y"), None);
        let mut auth = Vec::new();
        redis::cmd("AUTH").arg("pw").write_packed_command(&mut auth);
        p.connected(&e, &auth, &["AUTH"]);
        p.encode(&e);
        let sent = commands(p.out());
        let names: Vec<&str> = sent.iter().map(|c| c[0].as_str()).collect();
        assert_eq!(names, ["AUTH", "SCRIPT", "EVALSHA", "EVALSHA"]);
        assert_eq!(sent[2][1], e.sha);
        assert_eq!(sent[2][2], "4", "two users, two keys each");
        p.on_reply(&OK).unwrap();
        p.on_reply(&Value::Item(Item::Bulk(e.sha.as_bytes())))
            .unwrap();
        p.on_reply(&ids()).unwrap();
        assert_eq!(p.published, 2);
        p.on_reply(&ids()).unwrap();
        assert!(p.is_idle());
        // A failed AUTH makes the connection unusable.
        p.connected(&e, &auth, &["AUTH"]);
        assert!(matches!(
            p.on_reply(&error("WRONGPASS invalid")),
            Err(ReplyError::Setup("AUTH", _))
        ));
        // With Sentinel, a link that reached a replica drops it.
        let role = |r: &'static str| Value::Array([Item::Bulk(r.as_bytes())].into_iter().collect());
        p.reset();
        p.connected(&e, b"", &["ROLE"]);
        assert!(matches!(
            p.on_reply(&role("slave")),
            Err(ReplyError::Setup("ROLE", _))
        ));
        p.reset();
        p.connected(&e, b"", &["ROLE"]);
        assert_eq!(p.on_reply(&role("master")), Ok(()));
    }

    /// `OOM` (and the other write refusals): the connection stays, the command's publications
    /// fail now (their waiter is refused), nothing is queued again.
    #[test]
    fn a_write_refusal_fails_its_publications_and_keeps_the_connection() {
        let e = enc(false);
        let mut p = Pipeline::new(100);
        let w = waiter(1);
        p.push(&dispatch(&["a"], "1"), Some(&w));
        p.connected(&e, b"", &[]);
        p.encode(&e);
        let oom = "OOM command not allowed when used memory > 'maxmemory'.";
        assert_eq!(p.on_reply(&error(oom)), Ok(()));
        assert_eq!(p.refused, 1);
        assert_eq!(p.refusal.as_deref(), Some(oom));
        assert!(p.is_idle(), "nothing to send again");
        let mut ready = Vec::new();
        p.take_ready(&mut ready);
        assert_eq!(ready.len(), 1);
        assert!(!ready[0].taken(), "the sender hears unavailable");
    }

    #[test]
    fn an_error_requeues_what_was_in_flight_before_what_was_queued() {
        let e = enc(false);
        let mut p = Pipeline::new(100);
        p.push(&dispatch(&["a"], "1"), None);
        p.push(&dispatch(&["b"], "2"), None);
        p.push(&dispatch(&["c"], "3"), None);
        p.connected(&e, b"", &[]);
        p.encode(&e);
        p.on_reply(&Value::Item(Item::Int(0))).unwrap();
        p.push(&dispatch(&["d"], "4"), None);
        assert!(matches!(
            p.on_reply(&error("ERR unexpected")),
            Err(ReplyError::Publish(_))
        ));
        p.reset();
        assert_eq!(
            texts(&p),
            [
                r#"b:{"event":"e","args":"2"}"#,
                r#"c:{"event":"e","args":"3"}"#,
                r#"d:{"event":"e","args":"4"}"#
            ]
        );
        assert!(p.out().is_empty());
        // The retries are never dropped by the bound; new pushes are.
        let mut small = Pipeline::new(1);
        small.push(&dispatch(&["a"], "1"), None);
        small.connected(&e, b"", &[]);
        small.encode(&e);
        small.reset();
        small.push(&dispatch(&["b"], "2"), None);
        small.push(&dispatch(&["c"], "3"), None);
        assert_eq!(small.dropped, 1);
        assert_eq!(small.depth(), 2, "the retry and the newest");
        // Sent again on the next connection, retries first.
        small.connected(&e, b"", &[]);
        small.encode(&e);
        let users: Vec<String> = commands(small.out())
            .into_iter()
            .map(|c| c[1].clone())
            .collect();
        assert_eq!(users, ["sb:u:a", "sb:u:c"]);
    }

    #[test]
    fn noscript_reloads_the_script_and_resends_in_order() {
        let e = enc(true);
        let mut p = Pipeline::new(100);
        p.push(&dispatch(&["a"], "1"), None);
        p.push(&dispatch(&["b"], "2"), None);
        p.push(&dispatch(&["c"], "3"), None);
        p.connected(&e, b"", &[]);
        p.encode(&e);
        p.out().clear();
        p.on_reply(&Value::Item(Item::Bulk(b""))).unwrap(); // SCRIPT LOAD
        p.on_reply(&ids()).unwrap(); // a: stored
        p.on_reply(&error("NOSCRIPT No matching script")).unwrap();
        p.on_reply(&error("NOSCRIPT No matching script")).unwrap();
        assert_eq!(p.published, 1);
        assert_eq!(p.depth(), 2);
        p.encode(&e);
        let sent = commands(p.out());
        let names: Vec<&str> = sent.iter().map(|c| c[0].as_str()).collect();
        assert_eq!(names, ["SCRIPT", "EVALSHA", "EVALSHA"]);
        assert_eq!(sent[1][3], "sb:h:b");
        assert_eq!(sent[2][3], "sb:h:c");
        for _ in 0..3 {
            p.on_reply(&ids()).unwrap();
        }
        assert_eq!(p.published, 3);
        assert!(p.is_idle());
    }

    #[test]
    fn at_most_max_in_flight_are_written() {
        let e = enc(false);
        let mut p = Pipeline::new(usize::MAX);
        let d = dispatch(&["a"], "x");
        for _ in 0..MAX_IN_FLIGHT + 5 {
            p.push(&d, None);
        }
        p.connected(&e, b"", &[]);
        p.encode(&e);
        assert_eq!(p.depth(), 5);
        p.encode(&e);
        assert_eq!(p.depth(), 5, "nothing more until replies come");
    }
}
