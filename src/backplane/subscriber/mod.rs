//! The subscriber thread: one Redis connection per process (one per shard on a Redis Cluster),
//! multiplexed with membership changes from the cores on a `mio::Poll`.
//!
//! It owns the process-wide map user → cores hosting the user. In `per-user` routing it keeps
//! exactly one Redis subscription per user in that map (subscribing on the first device in the
//! process, unsubscribing after the last, batched per wake-up); in `seed` routing it subscribes to
//! the one seed channel. Each incoming frame goes to the inboxes of the cores that host its user.
//! The socket is non-blocking and the RESP parser keeps partial replies between reads, so a
//! membership change never waits behind a blocking read.
//!
//! This file is the thread: the loop and the wiring between its parts, each a state object
//! of its own:
//! - `link`: one Redis link (socket, queued commands, keepalive);
//! - `shards`: the cluster topology and a link per shard, reconnected with backoff;
//! - `reply`: what a RESP reply on a link means;
//! - `subscriptions`: which channels must be subscribed, batched per wake-up;
//! - `incoming`: what a publication received from Redis is;
//! - `routing`: which cores host which users, own seed payloads, delivering to inboxes;
//! - `resync`: the gate after an outage, and replay requests waiting for confirmation;
//! - `rooms`: the room routes (`room_routes`) driven from Redis, and held room acks.

mod incoming;
mod link;
mod reply;
mod resync;
mod rooms;
mod routing;
mod shards;
mod subscriptions;

use std::io;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::Arc;
use std::time::Instant;

use mio::{Events, Poll, Token, Waker};
use smallvec::SmallVec;

use self::link::Keepalive;
use self::reply::{Reply, Resp};
use self::resync::ResyncGate;
use self::routing::{Hosts, OwnPayloads};
use self::shards::Links;
use self::subscriptions::Subscriptions;
use super::fair_reads::HistoryReads;
use super::resp::Value;
use super::room_routes::{ChannelChanges, RoomRoutes};
use super::wire;
use super::{Backplane, Job, RoomAck, RoomJob};
use crate::bus::{Bus, CoreMsg};
use crate::UserId;

/// Shard `i`'s socket is registered as `Token(i)`; the waker sits above any shard.
const WAKER: Token = Token(usize::MAX - 1);

/// The subscriber and the state it owns.
pub struct Subscriber {
    bp: Arc<Backplane>,
    bus: Arc<Bus>,
    poll: Poll,
    /// The Redis links and the topology.
    links: Links,
    /// Which channels are subscribed and confirmed.
    subs: Subscriptions,
    /// Which cores host which users.
    hosts: Hosts,
    /// Seed routing: own payloads Redis has yet to echo.
    own: OwnPayloads,
    /// Readiness, frames held after an outage, and waiting replay requests.
    gate: ResyncGate,
    /// The history workers' queue, when history is on.
    worker: Option<Arc<HistoryReads<Job>>>,
    /// Rooms on: which hosted users are in which rooms (see `room_routes`).
    routes: RoomRoutes,
    /// Joins and leaves done in Redis, acked once the routes show them.
    room_acks: Vec<RoomAck>,
}

impl Subscriber {
    /// Builds the poll and installs the waker the cores use.
    pub(crate) fn new(
        bp: Arc<Backplane>,
        bus: Arc<Bus>,
        worker: Option<Arc<HistoryReads<Job>>>,
    ) -> io::Result<Self> {
        let poll = Poll::new()?;
        let waker = Waker::new(poll.registry(), WAKER)?;
        let _ = bp.subscriber_waker.set(waker);
        let subs = Subscriptions::new(
            bp.config.routing,
            bp.config.channel_prefix.clone(),
            bp.config.sharded(),
        );
        Ok(Subscriber {
            links: Links::new(&bp),
            subs,
            hosts: Hosts::default(),
            own: OwnPayloads::new(Instant::now()),
            gate: ResyncGate::default(),
            bp,
            bus,
            poll,
            worker,
            routes: RoomRoutes::default(),
            room_acks: Vec::new(),
        })
    }

    /// Runs until [`Backplane::stop`].
    pub(crate) fn run(mut self) {
        let mut events = Events::with_capacity(64);
        while !self.bp.stop.load(Relaxed) {
            if self.bp.master_moved() {
                for i in 0..self.links.len() {
                    self.disconnect(i, "the Redis master moved (Sentinel)");
                }
            }
            self.ensure_connected();
            let now = Instant::now();
            let wake_at = self.links.wake_at(now);
            if let Err(e) = self
                .poll
                .poll(&mut events, Some(wake_at.saturating_duration_since(now)))
            {
                if e.kind() != io::ErrorKind::Interrupted {
                    log::error!("redis subscriber poll failed: {e}");
                    break;
                }
            }
            let mut readable: SmallVec<[usize; 8]> = SmallVec::new();
            for event in events.iter() {
                let Token(i) = event.token();
                if i < self.links.len()
                    && (event.is_readable() || event.is_read_closed() || event.is_error())
                {
                    readable.push(i);
                }
            }
            for i in readable {
                self.read_all(i);
            }
            self.apply_membership();
            self.take_rooms();
            self.take_replays();
            self.keepalive();
            self.flush();
            // Whatever this turn queued (a resync releasing held frames, say) wakes its core.
            self.wake_cores();
        }
        self.bp.stats.subscriber_connected.store(0, Relaxed);
    }

    /// Fetches the topology when unknown and (re)connects every shard whose retry time came.
    fn ensure_connected(&mut self) {
        let now = Instant::now();
        if !self.links.ensure_topology(&self.bp, now) {
            return;
        }
        for i in 0..self.links.len() {
            if !self.links.due(i, now) {
                continue;
            }
            if self.links.connect(i, &self.bp, self.poll.registry()) {
                self.resubscribe(i);
                self.update_connected();
            } else if self.bp.config.sharded() {
                // A primary that is gone may have been replaced by its replica: ask the
                // cluster again (after a backoff) rather than call the dead address forever.
                self.links.forget_topology(self.poll.registry());
                self.subs.clear();
                self.update_connected();
                return;
            }
        }
    }

    /// Publishes readiness; back after an outage, tells every core to resync.
    fn update_connected(&mut self) {
        let all = self.links.all_connected();
        self.bp
            .stats
            .subscriber_connected
            .store(u64::from(all), Relaxed);
        let ready = self.links.all_ready();
        self.bp.subscriber_ready.store(ready, SeqCst);
        if self.gate.set_ready(ready) && self.bp.history().is_some() {
            // Back after an outage: whatever was published for our users while we were
            // unsubscribed is in their history but reached none of their devices. Every
            // core replays it to its open connections from the last offset each received.
            log::info!(
                "redis subscriber ready again: open connections resume from their last offset"
            );
            for core in 0..self.bus.cores() {
                self.bus.send(core, CoreMsg::Resync);
            }
        }
        let confirmed = self.links.confirmed();
        self.bp.stats.subscribed_channels.store(confirmed, Relaxed);
    }

    /// Subscribes everything shard `i` serves for this instance on its fresh connection, then
    /// a PING whose reply says Redis has processed all of it.
    fn resubscribe(&mut self, i: usize) {
        self.links.set_confirmed(i, 0);
        let links = &self.links;
        let mut channels = self
            .subs
            .resubscribe(i, self.hosts.users(), |ch| links.shard_of(ch));
        if self.subs.per_user() && self.bp.rooms().is_some() {
            let prefix = &self.bp.config.channel_prefix;
            channels.extend(
                self.routes
                    .rooms()
                    .iter()
                    .map(|r| wire::room_channel(prefix, r))
                    .filter(|ch| links.shard_of(ch) == i),
            );
        }
        let (command, _) = self.subs.commands();
        self.links.write_channels(i, command, &channels);
        if let Some(link) = self.links.link(i) {
            link.state.ready_on_pong();
        }
        self.links.ping(i);
    }

    fn keepalive(&mut self) {
        for i in 0..self.links.len() {
            let Some(link) = self.links.link(i) else {
                continue;
            };
            match link.state.keepalive(Instant::now()) {
                Keepalive::Dead => self.disconnect(i, "no PONG from redis"),
                Keepalive::Ping => self.links.ping(i),
                Keepalive::Idle => {}
            }
        }
    }

    /// Applies the cores' membership changes and (un)subscribes the users whose state changed.
    fn apply_membership(&mut self) {
        let mut touched: Vec<UserId> = Vec::new();
        while let Some(change) = self.bp.membership.pop() {
            touched.push(self.hosts.apply(change));
        }
        if touched.is_empty() || !self.subs.per_user() {
            return;
        }
        let mut rooms = ChannelChanges::default();
        for user in &touched {
            if !self.hosts.contains(user) {
                self.routes.drop_user(user, &mut rooms);
            }
        }
        self.apply_room_channels(rooms);
        let (hosts, links) = (&self.hosts, &self.links);
        let batch = self.subs.update(
            touched,
            |u| hosts.contains(u),
            links.len(),
            |ch| links.shard_of(ch),
            |i| links.is_connected(i),
        );
        let (sub, unsub) = self.subs.commands();
        for (i, (subscribe, unsubscribe)) in
            batch.subscribe.iter().zip(&batch.unsubscribe).enumerate()
        {
            self.links.write_channels(i, sub, subscribe);
            self.links.write_channels(i, unsub, unsubscribe);
        }
    }

    fn flush(&mut self) {
        for i in 0..self.links.len() {
            if let Err(e) = self.links.flush(i) {
                self.disconnect(i, &format!("write failed: {e}"));
            }
        }
    }

    /// Reads what shard `i`'s socket holds, one large read at a time, and acts on every
    /// complete reply. A read that did not fill the buffer drained the socket: no further
    /// read only to hear `WouldBlock` (the poll is edge-triggered and reports later data).
    fn read_all(&mut self, i: usize) {
        loop {
            let Some(link) = self.links.link(i) else {
                return;
            };
            let more = match link.fill() {
                Ok(more) => more,
                // Includes Redis closing the connection, e.g. a subscriber over its
                // client-output-buffer-limit.
                Err(e) => return self.disconnect(i, &format!("read failed: {e}")),
            };
            // The replies borrow the buffer while they change the subscriber: take it out
            // (no allocation) and put it back unless the link went meanwhile.
            let mut buf = std::mem::take(&mut link.buf);
            loop {
                match buf.next() {
                    Ok(Some(value)) => self.on_value(i, value),
                    Ok(None) => break,
                    Err(_) => return self.disconnect(i, "read failed: malformed reply"),
                }
                if self.links.link(i).is_none() {
                    return;
                }
            }
            // Each core is woken once for what this read brought.
            self.wake_cores();
            match self.links.link(i) {
                Some(link) => link.buf = buf,
                None => return,
            }
            if !more {
                return;
            }
        }
    }

    /// Drops shard `i`'s connection; its channels are re-subscribed on reconnect.
    fn disconnect(&mut self, i: usize, why: &str) {
        self.links.disconnect(i, self.poll.registry(), why);
        // The next connection subscribes the shard's rooms again (`resubscribe`).
        let links = &self.links;
        let prefix = &self.bp.config.channel_prefix;
        self.routes
            .reset(|room| links.shard_of(&wire::room_channel(prefix, room)) == i);
        self.subs.lost(i, |ch| links.shard_of(ch));
        self.update_connected();
    }

    /// The cluster moved slots: forget the topology, reconnect everything from scratch.
    fn refresh_topology(&mut self, why: &str) {
        log::info!("redis cluster topology changed ({why}); refreshing");
        self.links.clear(self.poll.registry());
        self.subs.clear();
        self.routes.reset(|_| true);
        self.update_connected();
    }

    fn on_pong(&mut self, i: usize) {
        if let Some(link) = self.links.link(i) {
            if link.state.on_pong() {
                self.update_connected();
            }
        }
    }

    fn on_value(&mut self, i: usize, value: Value<'_>) {
        let items = match reply::resp(&value) {
            Resp::Items(items) => items,
            Resp::Pong => return self.on_pong(i),
            Resp::Status => return, // AUTH
            Resp::Moved => return self.refresh_topology("MOVED"),
            Resp::ServerError(text) => {
                // E.g. LOADING from a Redis still reading its append-only file: a SUBSCRIBE
                // it refused leaves a channel silently unsubscribed while later ones work,
                // and a device would skip what was published in between. Start over: on
                // reconnect every channel is subscribed again, and once all are confirmed
                // every connection resumes from its last offset.
                return self.disconnect(i, &format!("server error {text}"));
            }
            Resp::Unexpected(other) => {
                log::warn!("redis subscriber: unexpected reply {other:?}");
                return;
            }
        };
        match reply::classify(items) {
            None => {}
            Some(Reply::Message { channel, payload }) => self.on_message(channel, payload),
            Some(Reply::Subscribed { channel, count }) => {
                self.links.set_confirmed(i, count);
                self.update_connected();
                let prefix = &self.bp.config.channel_prefix;
                match wire::user_of_channel(prefix, channel).map(UserId::from) {
                    Some(user) if self.subs.confirm(&user) => {
                        if self.bp.rooms().is_some() && self.routes.start_load(&user) {
                            self.bp.room_request(RoomJob::Load { user });
                        }
                    }
                    _ => {
                        if let Some(room) = wire::room_of_channel(prefix, channel) {
                            let room = crate::rooms::RoomId::from(room);
                            for user in self.routes.confirmed(&room) {
                                self.resync(user, &room);
                            }
                        }
                    }
                }
            }
            Some(Reply::Count(count)) => {
                self.links.set_confirmed(i, count);
                self.update_connected();
            }
            Some(Reply::SUnsubscribed { channel, count }) => {
                self.links.set_confirmed(i, count);
                // An SUNSUBSCRIBE we did not ask for means the slot moved to another shard.
                let prefix = &self.bp.config.channel_prefix;
                let user = wire::user_of_channel(prefix, channel);
                let room = wire::room_of_channel(prefix, channel);
                if user.is_some_and(|u| self.subs.is_subscribed(u))
                    || room.is_some_and(|r| self.routes.room(r).is_some())
                {
                    self.refresh_topology("slot migrated");
                } else {
                    self.update_connected();
                }
            }
            Some(Reply::Pong) => self.on_pong(i),
            Some(Reply::Ignored(kind)) => log::debug!(
                "redis subscriber: ignored {:?}",
                String::from_utf8_lossy(kind)
            ),
        }
    }
}
