//! Recovery with history on: `?since=` and `resume`, the replay and what arrived meanwhile, and
//! the resyncs after a backplane outage or a late room channel.

use std::sync::Arc;
use std::time::Instant;

use super::mode::History;
use super::CoreLoop;
use crate::bus::ReplayResult;
use crate::connection::Connection;
use crate::handlers::Args;
use crate::history::{self, Offset, Recovering};
use crate::metrics::add;
use crate::protocol::{self, ErrorCode};

impl CoreLoop {
    /// `resume {since}`: what `?since=` does, for clients that cannot change the URL. The replay
    /// starts after `since` whatever this connection already got (the client skips offsets it
    /// has), so a client should send it first.
    pub(super) fn on_resume(&mut self, key: usize, ack: Option<u64>, args: Args<'_>) {
        #[derive(serde::Deserialize)]
        struct Resume<'a> {
            #[serde(borrow)]
            since: std::borrow::Cow<'a, str>,
        }
        let since = match args.parse::<Resume<'_>>() {
            Ok(r) => r.since.parse::<Offset>().ok(),
            Err(e) => {
                add(&self.metrics().client_errors, 1);
                return self.answer(key, ack, |a| protocol::encode_error(a, &e.code, &e.message));
            }
        };
        let Some(open) = self.conns.get_open_mut(key) else {
            return;
        };
        if open.recovering.is_some() {
            return self.answer(key, ack, |a| {
                protocol::encode_error(
                    a,
                    ErrorCode::BadArgs.as_str(),
                    "a recovery is already in progress",
                )
            });
        }
        open.last_offset = None;
        if let Some(n) = ack {
            self.answer(key, Some(n), |a| {
                protocol::encode_ack(a, &serde_json::Value::Null)
            });
        }
        self.begin_recovery(key, since);
    }

    /// After a backplane outage, replays to each open connection what its user was sent since
    /// the last offset the connection received (events published while this instance was not
    /// subscribed are in history but reached none of its devices). The seam logic drops what
    /// a connection already has; the connection gets `recovered` at the end, as after a resume.
    pub(super) fn resync_all(&mut self) {
        let keys: Vec<(usize, Offset)> = self
            .conns
            .iter_mut()
            .filter_map(|(key, conn)| match conn {
                Connection::Open(o) if o.closing.is_none() => match o.recovering.as_mut() {
                    Some(rec) => {
                        rec.again = true;
                        None
                    }
                    None => o.last_offset.map(|offset| (key, offset)),
                },
                _ => None,
            })
            .collect();
        log::debug!("core={} resync: {} connections resume", self.id, keys.len());
        for (key, offset) in keys {
            self.begin_recovery(key, Some(offset));
        }
    }

    /// This instance began routing a room the user joined only after Redis confirmed its
    /// channel: the user's connections resume from their last offset to catch what came
    /// between (those without an offset yet have nothing to resume from).
    pub(super) fn resync_user(&mut self, user: &str) {
        let keys = self.conns.user_keys(user);
        for key in keys {
            let last = match self.conns.get_open(key) {
                Some(o) if o.closing.is_none() && o.recovering.is_none() => o.last_offset,
                _ => None,
            };
            if let Some(offset) = last {
                self.begin_recovery(key, Some(offset));
            }
        }
    }

    /// `?since=` (or a `resume` event): hold live frames and ask for what was missed. `since`
    /// is `None` when the client's offset did not parse: it gets `complete: false`.
    pub(super) fn begin_recovery(&mut self, key: usize, since: Option<Offset>) {
        let shared = Arc::clone(&self.shared);
        let Some(history) = shared.mode().history() else {
            return;
        };
        let Some(open) = self.conns.get_open_mut(key) else {
            return;
        };
        if open.recovering.is_some() {
            return;
        }
        let serial = open.serial;
        let user = open.user.clone();
        open.recovering = Some(Box::new(Recovering {
            since,
            buffered: Vec::new(),
            overflow: false,
            deadline: Instant::now() + history::RECOVERY_TIMEOUT,
            again: false,
        }));
        match history {
            History::Embedded(store) => {
                // Embedded: the store answers at once. Deliveries already in this core's inbox
                // are in the replay too; the high-water mark drops them when they are drained.
                let replay = store.replay(&user, since, crate::types::now_ms());
                self.on_replay(ReplayResult {
                    key,
                    serial,
                    replay,
                });
            }
            History::Redis(bp) => match since {
                Some(since) => bp.request_replay(crate::backplane::ReplayRequest {
                    user,
                    since,
                    core: self.id,
                    key,
                    serial,
                    deadline: Instant::now() + history::RECOVERY_TIMEOUT,
                }),
                None => self.on_replay(ReplayResult {
                    key,
                    serial,
                    replay: history::Replay::default(),
                }),
            },
        }
    }

    /// Sends the replay, then what arrived live meanwhile, then `recovered`.
    pub(super) fn on_replay(&mut self, result: ReplayResult) {
        let Some(open) = self.conns.get_open_mut(result.key) else {
            return;
        };
        if open.serial != result.serial {
            return;
        }
        let Some(rec) = open.recovering.take() else {
            return;
        };
        let complete = result.replay.complete && !rec.overflow;
        let again = rec.again;
        let (frames, last) = history::finish_recovery(*rec, result.replay, open.last_offset);
        open.last_offset = last;
        let m = &self.shared.metrics[self.id];
        if complete {
            add(&m.recoveries_complete, 1);
        } else {
            add(&m.recoveries_incomplete, 1);
        }
        for frame in frames {
            self.send(result.key, frame);
        }
        if again && last.is_some() {
            self.begin_recovery(result.key, last);
        }
    }
}
