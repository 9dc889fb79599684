//! Routing to cores: which cores host which users, own seed payloads recognised so they are
//! skipped, and each publication's frame or room event handed to the cores' inboxes.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use smallvec::SmallVec;
use tungstenite::Utf8Bytes;

use super::incoming::{Incoming, Reader};
use super::Subscriber;
use crate::backplane::publisher::payload_hash;
use crate::backplane::{BackplaneStats, Membership};
use crate::bus::{Bus, CoreMsg, Dispatch, RoomDelivery};
use crate::history::{Delivery, Offset};
use crate::UserId;

/// How long an own seed payload is remembered while waiting for Redis to echo it.
const OWN_PAYLOAD_TTL: Duration = Duration::from_secs(60);

/// The process-wide map user → cores hosting the user, from the cores' membership changes.
#[derive(Debug, Default)]
pub(super) struct Hosts {
    map: HashMap<UserId, SmallVec<[u16; 4]>>,
}

impl Hosts {
    /// Applies one change and returns its user.
    pub fn apply(&mut self, change: Membership) -> UserId {
        match change {
            Membership::Joined(user, core) => {
                let cores = self.map.entry(user.clone()).or_default();
                if !cores.contains(&(core as u16)) {
                    cores.push(core as u16);
                }
                user
            }
            Membership::Left(user, core) => {
                if let Some(cores) = self.map.get_mut(&user) {
                    cores.retain(|c| *c != core as u16);
                    if cores.is_empty() {
                        self.map.remove(&user);
                    }
                }
                user
            }
        }
    }

    pub fn contains(&self, user: &str) -> bool {
        self.map.contains_key(user)
    }

    /// The cores hosting `user`, if any.
    pub fn cores(&self, user: &str) -> Option<&[u16]> {
        self.map.get(user).map(|c| c.as_slice())
    }

    /// The user's shared id and its cores, if hosted.
    pub fn get(&self, user: &str) -> Option<(&UserId, &[u16])> {
        self.map.get_key_value(user).map(|(u, c)| (u, c.as_slice()))
    }

    pub fn users(&self) -> impl Iterator<Item = &UserId> {
        self.map.keys()
    }
}

/// Seed routing: hashes of this instance's own payloads, handed over by the publisher, until
/// Redis echoes them back (or [`OWN_PAYLOAD_TTL`] passes).
#[derive(Debug)]
pub(super) struct OwnPayloads {
    /// Hash → (publications in flight, when first seen).
    counts: HashMap<u64, (u32, Instant)>,
    next_purge: Instant,
}

impl OwnPayloads {
    pub fn new(now: Instant) -> Self {
        OwnPayloads {
            counts: HashMap::new(),
            next_purge: now + OWN_PAYLOAD_TTL,
        }
    }

    /// Records the `published` hashes, then whether `payload` is one of them (consuming it).
    pub fn is_own(
        &mut self,
        published: impl IntoIterator<Item = u64>,
        payload: &[u8],
        now: Instant,
    ) -> bool {
        for hash in published {
            self.counts.entry(hash).or_insert((0, now)).0 += 1;
        }
        if now >= self.next_purge {
            self.counts
                .retain(|_, (_, at)| now.duration_since(*at) < OWN_PAYLOAD_TTL);
            self.next_purge = now + OWN_PAYLOAD_TTL;
        }
        let hash = payload_hash(payload);
        match self.counts.get_mut(&hash) {
            Some((n, _)) => {
                *n -= 1;
                if *n == 0 {
                    self.counts.remove(&hash);
                }
                true
            }
            None => false,
        }
    }
}

/// Queues `msg` for `core`, counting a delivery or an inbox drop. The core is not woken here:
/// the subscriber wakes each core once for everything one read brought
/// ([`Subscriber::wake_cores`]), not once per publication.
fn send(bus: &Bus, stats: &BackplaneStats, core: usize, msg: CoreMsg) {
    if bus.push(core, msg) {
        stats.delivered.fetch_add(1, Relaxed);
    } else {
        stats.inbox_drops.fetch_add(1, Relaxed);
    }
}

/// [`send`] of `msg()` to each of `cores` (the cores hosting one user).
fn send_each(bus: &Bus, stats: &BackplaneStats, cores: &[u16], msg: impl Fn() -> CoreMsg) {
    for &core in cores {
        send(bus, stats, usize::from(core), msg());
    }
}

/// A frame without offset for `user`: one shared dispatch to each core hosting the user.
pub(super) fn to_user(
    bus: &Bus,
    stats: &BackplaneStats,
    hosts: &Hosts,
    user: &str,
    frame: Utf8Bytes,
) {
    let Some(cores) = hosts.cores(user) else {
        stats.not_hosted.fetch_add(1, Relaxed);
        return;
    };
    // Received dispatches are never published again, so `args_at` is not used.
    let dispatch = Arc::new(Dispatch {
        users: vec![UserId::from(user)].into(),
        frame,
        args_at: 0,
        sio: Default::default(),
        dedupe: None,
    });
    send_each(bus, stats, cores, || {
        CoreMsg::Dispatch(Arc::clone(&dispatch))
    });
}

/// A frame with its offset in `user`'s history: one shared delivery to each core hosting it.
pub(super) fn to_user_at(
    bus: &Bus,
    stats: &BackplaneStats,
    hosts: &Hosts,
    user: &str,
    offset: Offset,
    frame: Utf8Bytes,
) {
    let Some((user, cores)) = hosts.get(user) else {
        stats.not_hosted.fetch_add(1, Relaxed);
        return;
    };
    let delivery = Arc::new(Delivery {
        user: user.clone(),
        offset,
        frame,
        sio: Default::default(),
    });
    send_each(bus, stats, cores, || {
        CoreMsg::Delivered(Arc::clone(&delivery))
    });
}

/// A room event: one shared delivery per core, naming the room's local `members`.
pub(super) fn to_room(
    bus: &Bus,
    stats: &BackplaneStats,
    room: &crate::rooms::RoomId,
    members: &Arc<[UserId]>,
    offset: Option<Offset>,
    frame: Utf8Bytes,
) {
    let delivery = Arc::new(RoomDelivery {
        room: room.clone(),
        members: Arc::clone(members),
        offset,
        frame,
        sio: Default::default(),
    });
    for core in 0..bus.cores() {
        send(bus, stats, core, CoreMsg::Room(Arc::clone(&delivery)));
    }
}

impl Subscriber {
    /// Wakes every core that has publications waiting in its inbox.
    pub(super) fn wake_cores(&self) {
        for core in 0..self.bus.cores() {
            self.bus.wake_if_queued(core);
        }
    }

    /// Reads a publication and hands its frame to the cores that host its users.
    pub(super) fn on_message(&mut self, channel: &[u8], payload: &[u8]) {
        let bp = Arc::clone(&self.bp);
        let stats = &bp.stats;
        stats.received.fetch_add(1, Relaxed);
        let reader = Reader {
            prefix: &bp.config.channel_prefix,
            node_id: bp.node_id,
            routing: bp.config.routing,
            rooms: bp.rooms().is_some(),
            history: bp.history().is_some(),
        };
        let own = &mut self.own;
        let incoming = reader.read(channel, payload, |payload| {
            let published = std::iter::from_fn(|| bp.own_payloads.pop());
            own.is_own(published, payload, Instant::now())
        });
        match incoming {
            Incoming::Room {
                room,
                offset,
                frame,
            } => {
                if offset.is_some() && self.gate.holds() {
                    // As for a user's frame: it is in the room's history, the resync replays
                    // it.
                    stats.held_for_resync.fetch_add(1, Relaxed);
                    return;
                }
                match self.routes.room(room) {
                    Some((room, members)) => {
                        to_room(&self.bus, stats, room, members, offset, frame)
                    }
                    None => {
                        stats.not_hosted.fetch_add(1, Relaxed);
                    }
                }
            }
            Incoming::Control { user, joined, room } => self.on_room_control(user, joined, room),
            Incoming::Disconnect { user } => {
                let cores = self.hosts.cores(user).unwrap_or_default();
                send_each(&self.bus, stats, cores, || {
                    CoreMsg::Disconnect(UserId::from(user))
                });
            }
            Incoming::Displace { core, key, serial } => {
                // The core number comes from Redis: one past this instance's cores is ignored.
                if core < self.bus.cores() {
                    send(&self.bus, stats, core, CoreMsg::Displace { key, serial });
                } else {
                    stats.invalid.fetch_add(1, Relaxed);
                }
            }
            Incoming::Delivery {
                user,
                offset,
                frame,
            } => {
                if self.gate.holds() {
                    // See `ResyncGate::holds`.
                    stats.held_for_resync.fetch_add(1, Relaxed);
                    return;
                }
                to_user_at(&self.bus, stats, &self.hosts, user, offset, frame);
            }
            Incoming::Frame { user, frame } => to_user(&self.bus, stats, &self.hosts, &user, frame),
            Incoming::Own => {
                stats.ignored_own.fetch_add(1, Relaxed);
            }
            Incoming::Invalid { log } => {
                stats.invalid.fetch_add(1, Relaxed);
                if log {
                    log::debug!(
                        "redis: skipped an invalid payload on {:?}",
                        String::from_utf8_lossy(channel)
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAME: &str = r#"{"event":"e","args":[1]}"#;

    fn inbox(bus: &Bus, core: usize) -> Vec<CoreMsg> {
        let mut msgs = Vec::new();
        bus.drain(core, |m| msgs.push(m));
        msgs
    }

    #[test]
    fn hosts_follow_the_first_and_last_connection_per_core() {
        let mut hosts = Hosts::default();
        let u = UserId::from("u");
        assert_eq!(&*hosts.apply(Membership::Joined(u.clone(), 1)), "u");
        hosts.apply(Membership::Joined(u.clone(), 1));
        hosts.apply(Membership::Joined(u.clone(), 0));
        assert_eq!(hosts.cores("u"), Some(&[1, 0][..]));
        hosts.apply(Membership::Left(u.clone(), 1));
        assert_eq!(hosts.cores("u"), Some(&[0][..]));
        hosts.apply(Membership::Left(u.clone(), 0));
        assert!(!hosts.contains("u"));
        hosts.apply(Membership::Left(u, 0));
        assert_eq!(hosts.users().count(), 0);
    }

    #[test]
    fn an_own_seed_payload_is_recognised_once_per_publication() {
        let t0 = Instant::now();
        let mut own = OwnPayloads::new(t0);
        let payload = b"payload";
        let hash = payload_hash(payload);
        assert!(own.is_own([hash, hash], payload, t0));
        assert!(own.is_own([], payload, t0));
        assert!(
            !own.is_own([], payload, t0),
            "published twice, echoed twice"
        );
        assert!(!own.is_own([hash], b"other", t0));
        // Never echoed: forgotten after the TTL.
        assert!(!own.is_own([], payload, t0 + OWN_PAYLOAD_TTL));
    }

    #[test]
    fn frames_go_to_each_hosting_core_once() {
        let bp_stats = BackplaneStats::default();
        let bus = Bus::new(3, 16);
        let mut hosts = Hosts::default();
        hosts.apply(Membership::Joined("u".into(), 0));
        hosts.apply(Membership::Joined("u".into(), 2));
        to_user(&bus, &bp_stats, &hosts, "u", FRAME.into());
        to_user_at(&bus, &bp_stats, &hosts, "u", Offset(1, 0), FRAME.into());
        assert!(matches!(
            &inbox(&bus, 0)[..],
            [CoreMsg::Dispatch(_), CoreMsg::Delivered(_)]
        ));
        assert!(inbox(&bus, 1).is_empty());
        match &inbox(&bus, 2)[..] {
            [CoreMsg::Dispatch(d), CoreMsg::Delivered(r)] => {
                assert_eq!(&*d.users, [UserId::from("u")]);
                assert_eq!((&*r.user, r.offset), ("u", Offset(1, 0)));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(bp_stats.delivered.load(Relaxed), 4);

        to_user(&bus, &bp_stats, &hosts, "nobody", FRAME.into());
        to_user_at(
            &bus,
            &bp_stats,
            &hosts,
            "nobody",
            Offset(1, 0),
            FRAME.into(),
        );
        assert_eq!(bp_stats.not_hosted.load(Relaxed), 2);
    }

    #[test]
    fn room_events_go_to_every_core_with_their_room_and_full_inboxes_count_drops() {
        let bp_stats = BackplaneStats::default();
        let bus = Bus::new(2, 1);
        let members: Arc<[UserId]> = vec![UserId::from("a")].into();
        let room: crate::rooms::RoomId = "r".into();
        to_room(&bus, &bp_stats, &room, &members, None, FRAME.into());
        to_room(&bus, &bp_stats, &room, &members, None, FRAME.into());
        assert_eq!(bp_stats.delivered.load(Relaxed), 2);
        assert_eq!(bp_stats.inbox_drops.load(Relaxed), 2);
        for core in 0..2 {
            match &inbox(&bus, core)[..] {
                [CoreMsg::Room(d)] => {
                    assert!(Arc::ptr_eq(&d.members, &members) && d.room == room)
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}
