//! The subscriber's room routes: which hosted users are in which rooms, and so which room
//! channels this instance subscribes to and which local users a room publication goes to.
//!
//! A user's rooms are loaded from Redis once the instance's subscription to the user's channel
//! is confirmed; from then on membership changes arrive on that channel, in Redis order with
//! the room publications. Changes that arrive while the load is in flight are logged and
//! replayed over the loaded set, so whichever came last in Redis wins for each room.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::rooms::RoomId;
use crate::UserId;

/// Channel changes the subscriber must send.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct ChannelChanges {
    pub subscribe: Vec<RoomId>,
    pub unsubscribe: Vec<RoomId>,
}

#[derive(Debug, Default)]
struct UserRooms {
    rooms: HashSet<RoomId>,
    /// `Some` while the load is in flight: the changes seen meanwhile, in order.
    loading: Option<Vec<(bool, RoomId)>>,
}

#[derive(Debug)]
struct LocalRoom {
    members: HashSet<UserId>,
    /// The members as one shared slice: every publication of the room carries it to the
    /// cores, so it is rebuilt on a membership change, never per message.
    snapshot: Arc<[UserId]>,
    /// Redis confirmed the subscription.
    confirmed: bool,
    /// Users who joined before the subscription was confirmed: they resume once it is.
    resync: Vec<UserId>,
}

/// See the module docs.
#[derive(Debug, Default)]
pub(crate) struct RoomRoutes {
    users: HashMap<UserId, UserRooms>,
    rooms: HashMap<RoomId, LocalRoom>,
    /// (room, local member) pairs: a gauge for `/healthz`.
    pairs: usize,
}

impl RoomRoutes {
    /// The user's channel is confirmed: its rooms must be (re)loaded. Returns `false` when a
    /// load is already in flight.
    pub fn start_load(&mut self, user: &UserId) -> bool {
        let entry = self.users.entry(user.clone()).or_default();
        if entry.loading.is_some() {
            return false;
        }
        entry.loading = Some(Vec::new());
        true
    }

    /// Whether a load of `user`'s rooms is in flight.
    pub fn loading(&self, user: &str) -> bool {
        self.users.get(user).is_some_and(|u| u.loading.is_some())
    }

    /// The load came back: the loaded set, then what changed meanwhile.
    pub fn loaded(&mut self, user: &UserId, rooms: Vec<RoomId>, ch: &mut ChannelChanges) {
        let Some(entry) = self.users.get_mut(user) else {
            return;
        };
        let Some(log) = entry.loading.take() else {
            return;
        };
        let mut target: HashSet<RoomId> = rooms.into_iter().collect();
        for (joined, room) in log {
            if joined {
                target.insert(room);
            } else {
                target.remove(&room);
            }
        }
        let current: Vec<RoomId> = entry.rooms.iter().cloned().collect();
        for room in current.iter().filter(|r| !target.contains(*r)) {
            self.remove(user, room, ch);
        }
        for room in target {
            // Resync: a device that was here before the load may have missed what the room
            // published until its channel is confirmed.
            self.add(user, room, true, ch);
        }
    }

    /// A membership change from the user's channel.
    pub fn control(&mut self, user: &UserId, joined: bool, room: RoomId, ch: &mut ChannelChanges) {
        let Some(entry) = self.users.get_mut(user) else {
            // Not loaded (nor loading): the load, when it comes, reads the new state.
            return;
        };
        if let Some(log) = entry.loading.as_mut() {
            log.push((joined, room));
        } else if joined {
            self.add(user, room, true, ch);
        } else {
            self.remove(user, &room, ch);
        }
    }

    fn add(&mut self, user: &UserId, room: RoomId, resync: bool, ch: &mut ChannelChanges) {
        let Some(entry) = self.users.get_mut(user) else {
            return;
        };
        if !entry.rooms.insert(room.clone()) {
            return;
        }
        let local = self.rooms.entry(room.clone()).or_insert_with(|| {
            ch.subscribe.push(room.clone());
            LocalRoom {
                members: HashSet::new(),
                snapshot: Arc::from(Vec::new()),
                confirmed: false,
                resync: Vec::new(),
            }
        });
        if local.members.insert(user.clone()) {
            self.pairs += 1;
        }
        local.snapshot = local.members.iter().cloned().collect();
        if resync && !local.confirmed {
            local.resync.push(user.clone());
        }
    }

    fn remove(&mut self, user: &UserId, room: &RoomId, ch: &mut ChannelChanges) {
        if let Some(entry) = self.users.get_mut(user) {
            entry.rooms.remove(room);
        }
        let Some(local) = self.rooms.get_mut(room) else {
            return;
        };
        if local.members.remove(user) {
            self.pairs -= 1;
        }
        if local.members.is_empty() {
            self.rooms.remove(room);
            ch.unsubscribe.push(room.clone());
        } else {
            local.snapshot = local.members.iter().cloned().collect();
        }
    }

    /// The user's last connection here is gone.
    pub fn drop_user(&mut self, user: &UserId, ch: &mut ChannelChanges) {
        let Some(entry) = self.users.remove(user) else {
            return;
        };
        for room in entry.rooms {
            if let Some(local) = self.rooms.get_mut(&room) {
                if local.members.remove(user) {
                    self.pairs -= 1;
                }
                if local.members.is_empty() {
                    self.rooms.remove(&room);
                    ch.unsubscribe.push(room);
                } else {
                    local.snapshot = local.members.iter().cloned().collect();
                }
            }
        }
    }

    /// Redis confirmed the room's channel; returns the users to resync.
    pub fn confirmed(&mut self, room: &str) -> Vec<UserId> {
        match self.rooms.get_mut(room) {
            Some(local) => {
                local.confirmed = true;
                std::mem::take(&mut local.resync)
            }
            None => Vec::new(),
        }
    }

    /// A subscriber connection dropped: the rooms whose channel it served (`on_link`) are not
    /// confirmed any more, until the next connection subscribes them again.
    pub fn reset(&mut self, on_link: impl Fn(&str) -> bool) {
        for (room, local) in self.rooms.iter_mut() {
            if on_link(room) {
                local.confirmed = false;
            }
        }
    }

    /// (room, local member) pairs routed.
    pub fn pairs(&self) -> usize {
        self.pairs
    }

    /// Every room with a local member.
    pub fn rooms(&self) -> Vec<RoomId> {
        self.rooms.keys().cloned().collect()
    }

    /// The room's shared name and its local members.
    pub fn room(&self, room: &str) -> Option<(&RoomId, &Arc<[UserId]>)> {
        self.rooms
            .get_key_value(room)
            .map(|(r, l)| (r, &l.snapshot))
    }

    /// `Some(in the room)` once the user's rooms are loaded.
    pub fn is_member(&self, user: &str, room: &str) -> Option<bool> {
        let entry = self.users.get(user)?;
        if entry.loading.is_some() {
            return None;
        }
        Some(entry.rooms.contains(room))
    }

    /// Whether Redis confirmed the room's channel.
    pub fn room_confirmed(&self, room: &str) -> bool {
        self.rooms.get(room).is_some_and(|l| l.confirmed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> RoomId {
        s.into()
    }

    #[test]
    fn changes_during_a_load_win_over_the_loaded_set() {
        let mut routes = RoomRoutes::default();
        let u: UserId = "u".into();
        let mut ch = ChannelChanges::default();
        routes.control(&u, true, r("ignored"), &mut ch);
        assert!(routes.users.is_empty(), "not loading: the load reads it");
        assert!(routes.start_load(&u));
        assert!(!routes.start_load(&u));
        routes.control(&u, false, r("a"), &mut ch);
        routes.control(&u, true, r("c"), &mut ch);
        assert_eq!(routes.is_member("u", "c"), None, "loading");
        routes.loaded(&u, vec![r("a"), r("b")], &mut ch);
        let mut subs = ch.subscribe.clone();
        subs.sort();
        assert_eq!(subs, vec![r("b"), r("c")]);
        assert_eq!(routes.is_member("u", "a"), Some(false));
        assert_eq!(routes.is_member("u", "b"), Some(true));
        assert!(!routes.room_confirmed("b"), "channels not confirmed");
        assert_eq!(routes.confirmed("b"), vec![u.clone()]);
        assert!(routes.confirmed("c").len() == 1 && routes.room_confirmed("c"));
    }

    #[test]
    fn members_and_unsubscribes() {
        let mut routes = RoomRoutes::default();
        let (a, b): (UserId, UserId) = ("a".into(), "b".into());
        let mut ch = ChannelChanges::default();
        for u in [&a, &b] {
            routes.start_load(u);
            routes.loaded(u, vec![r("x")], &mut ch);
        }
        assert_eq!(ch.subscribe, vec![r("x")], "one subscription for both");
        assert_eq!(routes.room("x").map(|r| r.1).unwrap().len(), 2);
        assert_eq!(routes.pairs(), 2);
        routes.confirmed("x");
        routes.control(&a, false, r("x"), &mut ch);
        assert_eq!(
            &**routes.room("x").map(|r| r.1).unwrap(),
            std::slice::from_ref(&b)
        );
        assert!(ch.unsubscribe.is_empty());
        routes.control(&a, true, r("x"), &mut ch);
        assert!(
            routes.confirmed("x").is_empty(),
            "confirmed already: no resync"
        );
        routes.drop_user(&b, &mut ch);
        routes.drop_user(&a, &mut ch);
        assert_eq!(ch.unsubscribe, vec![r("x")]);
        assert!(routes.room("x").map(|r| r.1).is_none());
        assert_eq!(routes.pairs(), 0);
    }

    #[test]
    fn a_dropped_link_unconfirms_only_the_rooms_it_served() {
        let mut routes = RoomRoutes::default();
        let mut ch = ChannelChanges::default();
        let a: UserId = "a".into();
        routes.start_load(&a);
        routes.loaded(&a, vec![r("x"), r("y")], &mut ch);
        routes.confirmed("x");
        routes.confirmed("y");
        routes.reset(|room| room == "x");
        assert!(!routes.room_confirmed("x"));
        assert!(routes.room_confirmed("y"), "served by another shard's link");
        routes.reset(|_| true);
        assert!(!routes.room_confirmed("y"));
    }
}
