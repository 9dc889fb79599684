//! Routing to cores: which cores host which users, what a publication received from Redis is
//! (own seed payloads recognised and skipped), and handing its frame to the cores' inboxes.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use smallvec::SmallVec;
use tungstenite::Utf8Bytes;

use crate::backplane::publisher::payload_hash;
use crate::backplane::wire::{self, Skip};
use crate::backplane::{BackplaneStats, Membership, Routing};
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

/// What the subscriber needs to know to read a publication.
pub(super) struct Reader<'c> {
    pub prefix: &'c str,
    pub node_id: u64,
    pub routing: Routing,
    pub rooms: bool,
    pub history: bool,
}

/// A publication received from Redis, read.
#[derive(Debug)]
pub(super) enum Incoming<'a> {
    /// A room event, for the room's local members.
    Room {
        room: &'a str,
        offset: Option<Offset>,
        frame: Utf8Bytes,
    },
    /// A membership change of `user`, from its channel.
    Control {
        user: &'a str,
        joined: bool,
        room: &'a str,
    },
    /// A user's frame with its offset (history on).
    Delivery {
        user: &'a str,
        offset: Offset,
        frame: Utf8Bytes,
    },
    /// A user's frame without offset.
    Frame {
        user: Cow<'a, str>,
        frame: Utf8Bytes,
    },
    /// This instance's own publication, delivered locally already.
    Own,
    /// Not a valid payload: counted, skipped and, when `log`, logged at debug level.
    Invalid { log: bool },
}

impl Reader<'_> {
    /// Reads `payload` received on `channel`; `is_own` recognises own seed payloads.
    pub fn read<'a>(
        &self,
        channel: &'a [u8],
        payload: &'a [u8],
        is_own: impl FnOnce(&[u8]) -> bool,
    ) -> Incoming<'a> {
        let prefix = self.prefix;
        if self.rooms {
            if let Some(room) = wire::room_of_channel(prefix, channel) {
                return match wire::read_room_payload(payload) {
                    Ok((offset, frame)) => Incoming::Room {
                        room,
                        offset,
                        frame,
                    },
                    Err(_) => Incoming::Invalid { log: false },
                };
            }
            if let Some(user) = wire::user_of_channel(prefix, channel) {
                if let Some((joined, room)) = wire::read_control(payload) {
                    return Incoming::Control { user, joined, room };
                }
            }
        }
        if self.history {
            let user = wire::user_of_channel(prefix, channel);
            return match user.map(|u| (u, wire::read_history_payload(payload))) {
                Some((user, Ok((offset, frame)))) => Incoming::Delivery {
                    user,
                    offset,
                    frame,
                },
                // An instance without history (an older version during a rolling upgrade, or
                // `--history off`) publishes frames without offsets: still delivered, as they
                // are, so a mixed fleet keeps working in this direction.
                Some((user, Err(_))) => match wire::read_user_payload(payload, self.node_id) {
                    Ok(frame) => Incoming::Frame {
                        user: Cow::Borrowed(user),
                        frame,
                    },
                    Err(_) => Incoming::Invalid { log: false },
                },
                None => Incoming::Invalid { log: false },
            };
        }
        let decoded = match self.routing {
            Routing::PerUser => match wire::user_of_channel(prefix, channel) {
                Some(user) => {
                    wire::read_user_payload(payload, self.node_id).map(|f| (Cow::Borrowed(user), f))
                }
                None => Err(Skip::Invalid),
            },
            Routing::Seed => {
                if is_own(payload) {
                    Err(Skip::Own)
                } else {
                    wire::read_seed_payload(payload).map(|(u, f)| (Cow::Owned(u), f))
                }
            }
        };
        match decoded {
            Ok((user, frame)) => Incoming::Frame { user, frame },
            Err(Skip::Own) => Incoming::Own,
            Err(Skip::Invalid) => Incoming::Invalid { log: true },
        }
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

/// Sends `msg` to `core`, counting a delivery or an inbox drop.
fn send(bus: &Bus, stats: &BackplaneStats, core: usize, msg: CoreMsg) {
    if bus.send(core, msg) {
        stats.delivered.fetch_add(1, Relaxed);
    } else {
        stats.inbox_drops.fetch_add(1, Relaxed);
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
    for &core in cores {
        send(
            bus,
            stats,
            core as usize,
            CoreMsg::Dispatch(Arc::clone(&dispatch)),
        );
    }
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
    for &core in cores {
        send(
            bus,
            stats,
            core as usize,
            CoreMsg::Delivered(Arc::clone(&delivery)),
        );
    }
}

/// A room event: one shared delivery per core, naming the room's local `members`.
pub(super) fn to_room(
    bus: &Bus,
    stats: &BackplaneStats,
    members: Option<&Arc<[UserId]>>,
    offset: Option<Offset>,
    frame: Utf8Bytes,
) {
    let Some(members) = members else {
        stats.not_hosted.fetch_add(1, Relaxed);
        return;
    };
    let delivery = Arc::new(RoomDelivery {
        members: Arc::clone(members),
        offset,
        frame,
        sio: Default::default(),
    });
    for core in 0..bus.cores() {
        send(bus, stats, core, CoreMsg::Room(Arc::clone(&delivery)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAME: &str = r#"{"event":"e","args":[1]}"#;

    fn reader(routing: Routing, rooms: bool, history: bool) -> Reader<'static> {
        Reader {
            prefix: "sb",
            node_id: 0xabc,
            routing,
            rooms,
            history,
        }
    }

    fn user_payload(node: u64) -> Vec<u8> {
        let mut out = Vec::new();
        wire::write_user_payload(&mut out, node, FRAME);
        out
    }

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
    fn per_user_payloads_of_other_instances_are_delivered_own_ones_skipped() {
        let r = reader(Routing::PerUser, false, false);
        let other = user_payload(0x1);
        match r.read(b"sb:u:alice", &other, |_| unreachable!()) {
            Incoming::Frame { user, frame } => assert_eq!((&*user, &*frame), ("alice", FRAME)),
            other => panic!("expected a frame, got {other:?}"),
        }
        let own = user_payload(0xabc);
        assert!(matches!(
            r.read(b"sb:u:alice", &own, |_| false),
            Incoming::Own
        ));
        assert!(matches!(
            r.read(b"other:u:alice", &other, |_| false),
            Incoming::Invalid { log: true }
        ));
        assert!(matches!(
            r.read(b"sb:u:alice", b"junk", |_| false),
            Incoming::Invalid { log: true }
        ));
    }

    #[test]
    fn seed_payloads_name_their_user_and_own_ones_are_skipped() {
        let r = reader(Routing::Seed, false, false);
        let payload = br#"{"event":"e","id":"bob","args":[1]}"#;
        match r.read(wire::SEED_CHANNEL.as_bytes(), payload, |_| false) {
            Incoming::Frame { user, .. } => assert_eq!(&*user, "bob"),
            other => panic!("expected a frame, got {other:?}"),
        }
        let own = r.read(wire::SEED_CHANNEL.as_bytes(), payload, |p| p == payload);
        assert!(matches!(own, Incoming::Own));
    }

    #[test]
    fn history_payloads_carry_offsets_and_old_ones_still_deliver() {
        let r = reader(Routing::PerUser, false, true);
        let payload = br#"0000000000000001 5-1 {"event":"e","offset":"5-1"}"#;
        match r.read(b"sb:u:alice", payload, |_| false) {
            Incoming::Delivery { user, offset, .. } => {
                assert_eq!((user, offset), ("alice", Offset(5, 1)))
            }
            other => panic!("expected a delivery, got {other:?}"),
        }
        // From an instance without history: no offset.
        let plain = user_payload(0x1);
        assert!(matches!(
            r.read(b"sb:u:alice", &plain, |_| false),
            Incoming::Frame { .. }
        ));
        // Own payloads without offsets are invalid with history on.
        let own = user_payload(0xabc);
        assert!(matches!(
            r.read(b"sb:u:alice", &own, |_| false),
            Incoming::Invalid { log: false }
        ));
    }

    #[test]
    fn rooms_read_room_events_and_membership_controls() {
        let r = reader(Routing::PerUser, true, true);
        let event = br#"0000000000000001 - {"event":"p"}"#;
        match r.read(b"sb:r:team", event, |_| false) {
            Incoming::Room { room, offset, .. } => assert_eq!((room, offset), ("team", None)),
            other => panic!("expected a room event, got {other:?}"),
        }
        assert!(matches!(
            r.read(b"sb:r:team", b"junk", |_| false),
            Incoming::Invalid { log: false }
        ));
        let control = b"0000000000000001 ! +team";
        match r.read(b"sb:u:alice", control, |_| false) {
            Incoming::Control { user, joined, room } => {
                assert_eq!((user, joined, room), ("alice", true, "team"))
            }
            other => panic!("expected a control, got {other:?}"),
        }
        // Rooms off: a room channel is not a user channel.
        let r = reader(Routing::PerUser, false, true);
        assert!(matches!(
            r.read(b"sb:r:team", event, |_| false),
            Incoming::Invalid { log: false }
        ));
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
    fn room_events_go_to_every_core_and_full_inboxes_count_drops() {
        let bp_stats = BackplaneStats::default();
        let bus = Bus::new(2, 1);
        let members: Arc<[UserId]> = vec![UserId::from("a")].into();
        to_room(&bus, &bp_stats, Some(&members), None, FRAME.into());
        to_room(&bus, &bp_stats, Some(&members), None, FRAME.into());
        assert_eq!(bp_stats.delivered.load(Relaxed), 2);
        assert_eq!(bp_stats.inbox_drops.load(Relaxed), 2);
        for core in 0..2 {
            match &inbox(&bus, core)[..] {
                [CoreMsg::Room(d)] => assert!(Arc::ptr_eq(&d.members, &members)),
                other => panic!("unexpected {other:?}"),
            }
        }
        to_room(&bus, &bp_stats, None, None, FRAME.into());
        assert_eq!(bp_stats.not_hosted.load(Relaxed), 1);
    }
}
