//! The resync gate: after an outage, frames with offsets are held until every channel is
//! confirmed again (the cores then resume every connection from its last offset), and replay
//! requests wait until their user's channel is confirmed and the requesting core hosts it.

use std::collections::HashMap;
use std::time::Instant;

use super::Subscriber;
use crate::backplane::fair_reads::Lane;
use crate::backplane::{Job, ReplayRequest};
use crate::UserId;

/// See the module docs.
#[derive(Debug, Default)]
pub(super) struct ResyncGate {
    /// Ready (every shard connected, every subscription confirmed) at the last check.
    ready: bool,
    /// Has been ready at least once: becoming ready again means an outage ended.
    ready_before: bool,
    /// Replay requests waiting for their user's subscription to be confirmed.
    pending: HashMap<UserId, Vec<ReplayRequest>>,
}

impl ResyncGate {
    /// Records whether the subscriber is ready. Returns `true` when this ends an outage: ready
    /// again after having been ready before.
    pub fn set_ready(&mut self, ready: bool) -> bool {
        let back = ready && !self.ready && self.ready_before;
        if ready && !self.ready {
            self.ready_before = true;
        }
        self.ready = ready;
        back
    }

    /// Back from an outage with some channels not confirmed yet: a device handed a frame with
    /// an offset now would move its last offset past what the outage hid from it, and the
    /// resync (sent once every channel is confirmed) would start after the gap. Such a frame is
    /// in its users' history, so the resync replays it.
    pub fn holds(&self) -> bool {
        self.ready_before && !self.ready
    }

    /// Queues a replay request until [`ResyncGate::take_ready`] lets it go.
    pub fn wait(&mut self, request: ReplayRequest) {
        self.pending
            .entry(request.user.clone())
            .or_default()
            .push(request);
    }

    /// Takes the requests `may_run` lets go and drops those past their deadline (the core
    /// already answered the client).
    pub fn take_ready(
        &mut self,
        now: Instant,
        may_run: impl Fn(&ReplayRequest) -> bool,
    ) -> Vec<ReplayRequest> {
        let mut ready = Vec::new();
        self.pending.retain(|_, requests| {
            requests.retain(|r| {
                if now >= r.deadline {
                    return false;
                }
                let go = may_run(r);
                if go {
                    ready.push(r.clone());
                }
                !go
            });
            !requests.is_empty()
        });
        ready
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

impl Subscriber {
    /// Hands each replay request to the worker once its stream's channel is confirmed (the
    /// user's, or for a room the room's, routing to the user here) and the requesting core is
    /// listed as a host (its membership change travels on another queue), so every frame
    /// published after the query reaches the recovering connection. A room replay for a user
    /// the loaded routes show is not in the room is answered at once, empty and incomplete:
    /// only members read a room's history.
    pub(super) fn take_replays(&mut self) {
        while let Some(request) = self.bp.replays.pop() {
            self.gate.wait(request);
        }
        if self.gate.is_empty() {
            return;
        }
        let (hosts, subs, routes) = (&self.hosts, &self.subs, &self.routes);
        let ready = self.gate.take_ready(Instant::now(), |r| {
            let stream_ready = match &r.room {
                None => true,
                Some(room) => match routes.is_member(&r.user, room) {
                    Some(true) => routes.room_confirmed(room),
                    Some(false) => true,
                    None => false,
                },
            };
            stream_ready
                && subs.is_confirmed(&r.user)
                && hosts
                    .cores(&r.user)
                    .is_some_and(|c| c.contains(&(r.core as u16)))
        });
        for request in ready {
            let refused = request
                .room
                .as_ref()
                .is_some_and(|room| routes.is_member(&request.user, room) != Some(true));
            if refused {
                let result = crate::bus::ReplayResult {
                    key: request.key,
                    serial: request.serial,
                    room: request.room,
                    replay: crate::history::Replay::default(),
                };
                self.bus.send(
                    request.core,
                    crate::bus::CoreMsg::Replayed(Box::new(result)),
                );
                continue;
            }
            let Some(worker) = &self.worker else {
                continue;
            };
            let (core, key, serial) = (request.core, request.key, request.serial);
            let lane = Lane::User(request.user.clone());
            if let Err(Job::Replay(refused)) = worker.push(lane, Job::Replay(request)) {
                if self.bp.stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // Shutting down: the core's deadline answers.
                    continue;
                }
                // The user already has its bound of reads waiting: answered at once, as if
                // trimmed (`complete: false`), rather than queued behind its own flood.
                self.bp
                    .stats
                    .history_reads_refused
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let result = crate::bus::ReplayResult {
                    key,
                    serial,
                    room: refused.room,
                    replay: crate::history::Replay::default(),
                };
                self.bus
                    .send(core, crate::bus::CoreMsg::Replayed(Box::new(result)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::backplane::fair_reads::HistoryReads;
    use crate::backplane::{Backplane, Membership, RedisConfig};
    use crate::bus::Bus;
    use crate::history::Offset;

    /// The workers' queue read without blocking, as a channel would be.
    struct TryTake(Arc<HistoryReads<Job>>);

    impl TryTake {
        fn try_recv(&self) -> Result<Job, ()> {
            self.0.try_take().map(|(_, job)| job).ok_or(())
        }
    }

    fn request(user: &str, core: usize, deadline: Instant) -> ReplayRequest {
        ReplayRequest {
            user: user.into(),
            room: None,
            since: Offset(1, 1),
            core,
            key: 7,
            serial: 3,
            deadline,
            max_bytes: 1 << 20,
        }
    }

    /// A replay may run only once Redis confirmed the user's channel and the requesting core is
    /// a host: before that, a publication could fall between the query and the subscription.
    #[test]
    fn replays_wait_for_the_confirmed_subscription_and_the_core() {
        let bp = Backplane::new(RedisConfig::new("redis://127.0.0.1:1"), 1);
        let bus = Arc::new(Bus::new(2, 16));
        let jobs = Arc::new(HistoryReads::new(1, 16));
        let mut sub = Subscriber::new(Arc::clone(&bp), bus, Some(Arc::clone(&jobs))).unwrap();
        let rx = TryTake(jobs);
        let later = Instant::now() + Duration::from_secs(60);
        bp.request_replay(request("u1", 1, later));
        sub.take_replays();
        assert!(rx.try_recv().is_err(), "not subscribed yet");

        let u1 = UserId::from("u1");
        sub.subs.force_confirmed(u1.clone());
        sub.take_replays();
        assert!(
            rx.try_recv().is_err(),
            "confirmed, but core 1 is not a host yet"
        );

        sub.hosts.apply(Membership::Joined(u1.clone(), 0));
        sub.take_replays();
        assert!(
            rx.try_recv().is_err(),
            "another core hosts u1, not the requester"
        );

        sub.hosts.apply(Membership::Joined(u1, 1));
        sub.take_replays();
        match rx.try_recv() {
            Ok(Job::Replay(r)) => assert_eq!((r.core, r.key, r.serial), (1, 7, 3)),
            other => panic!("expected the replay, got {other:?}"),
        }
        assert!(sub.gate.is_empty());

        // A request past its deadline is dropped: the core has answered the client already.
        bp.request_replay(request("u2", 0, Instant::now()));
        sub.take_replays();
        assert!(sub.gate.is_empty());
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn frames_are_held_only_between_an_outage_and_the_next_ready() {
        let mut gate = ResyncGate::default();
        assert!(
            !gate.holds(),
            "the first start holds nothing: nothing was missed"
        );
        assert!(!gate.set_ready(false));
        assert!(!gate.holds());
        assert!(!gate.set_ready(true), "first ready: no outage ended");
        assert!(!gate.holds());
        assert!(!gate.set_ready(true));

        assert!(!gate.set_ready(false), "an outage begins");
        assert!(gate.holds());
        assert!(!gate.set_ready(false));
        assert!(gate.holds());
        assert!(gate.set_ready(true), "the outage ended: resync once");
        assert!(!gate.holds());
        assert!(!gate.set_ready(true));
    }

    #[test]
    fn replay_requests_go_once_allowed_and_expire_at_their_deadline() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(5);
        let mut gate = ResyncGate::default();
        gate.wait(request("a", 0, later));
        gate.wait(request("a", 1, later));
        gate.wait(request("b", 0, t0 + Duration::from_secs(1)));
        assert!(gate.take_ready(t0, |_| false).is_empty());

        let ready = gate.take_ready(t0, |r| &*r.user == "a" && r.core == 1);
        assert_eq!(ready.len(), 1);
        assert_eq!((&*ready[0].user, ready[0].core), ("a", 1));

        // Past b's deadline: dropped, never run.
        let ready = gate.take_ready(t0 + Duration::from_secs(2), |r| &*r.user == "a");
        assert_eq!(ready.len(), 1);
        assert_eq!((&*ready[0].user, ready[0].core), ("a", 0));
        assert!(gate.is_empty());
    }
}
