//! The subscriber's side of rooms: drives [`RoomRoutes`] from loaded room sets and membership
//! controls, (un)subscribes room channels, and holds join and leave acks until routed.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use super::routing::Hosts;
use super::Subscriber;
use crate::backplane::room_routes::{ChannelChanges, RoomRoutes};
use crate::backplane::wire;
use crate::backplane::{RoomAck, RoomJob};
use crate::bus::{CoreMsg, RoomAnswer};
use crate::UserId;

/// Whether a held join or leave ack can go: the routes show it (a joined room's channel
/// confirmed), its deadline passed, or the user is not hosted here any more.
pub(super) fn ack_due(routes: &RoomRoutes, hosts: &Hosts, ack: &RoomAck, now: Instant) -> bool {
    let routed = match routes.is_member(&ack.user, &ack.room) {
        Some(true) => ack.joined && routes.room_confirmed(&ack.room),
        Some(false) => !ack.joined,
        None => false,
    };
    routed || now >= ack.deadline || !hosts.contains(&ack.user)
}

impl Subscriber {
    /// A membership change of a hosted user, from the user's channel.
    pub(super) fn on_room_control(&mut self, user: &str, joined: bool, room: &str) {
        let max = self.bp.rooms().map_or(0, |r| r.max_room_name_bytes);
        if !crate::rooms::valid_room(room, max) {
            self.bp.stats.invalid.fetch_add(1, Relaxed);
            return;
        }
        let Some((user, _)) = self.hosts.get(user) else {
            return;
        };
        let user = user.clone();
        let mut changes = ChannelChanges::default();
        self.routes
            .control(&user, joined, room.into(), &mut changes);
        self.apply_room_channels(changes);
    }

    /// Sends the room (un)subscriptions, each on the shard serving the room's channel (sharded
    /// commands on a Redis Cluster). A shard that is down subscribes, on reconnect, every room
    /// the routes list for it.
    pub(super) fn apply_room_channels(&mut self, changes: ChannelChanges) {
        self.bp
            .stats
            .room_members
            .store(self.routes.pairs() as u64, Relaxed);
        if changes == ChannelChanges::default() {
            return;
        }
        let prefix = self.bp.config.channel_prefix.clone();
        let shards = self.links.len();
        let by_shard = |links: &super::shards::Links, rooms: &[crate::rooms::RoomId]| {
            let mut out = vec![Vec::new(); shards];
            for room in rooms {
                let channel = wire::room_channel(&prefix, room);
                let shard = links.shard_of(&channel);
                if let Some(list) = out.get_mut(shard) {
                    list.push(channel);
                }
            }
            out
        };
        let unsubscribe = by_shard(&self.links, &changes.unsubscribe);
        let subscribe = by_shard(&self.links, &changes.subscribe);
        let (sub, unsub) = self.subs.commands();
        // Leaves first: a leave and a rejoin in one batch must end subscribed.
        for (i, channels) in unsubscribe.iter().enumerate() {
            self.links.write_channels(i, unsub, channels);
        }
        for (i, channels) in subscribe.iter().enumerate() {
            self.links.write_channels(i, sub, channels);
        }
    }

    /// Tells the cores hosting `user` to resume `room` on its connections from their last
    /// offsets in it.
    pub(super) fn resync(&self, user: UserId, room: &crate::rooms::RoomId) {
        if let Some(cores) = self.hosts.cores(&user) {
            for &core in cores {
                let msg = CoreMsg::ResyncRoom(user.clone(), room.clone());
                self.bus.send(core as usize, msg);
            }
        }
    }

    /// Applies loaded room sets, and acks joins and leaves the routes now show.
    pub(super) fn take_rooms(&mut self) {
        while let Some((user, result)) = self.bp.rooms_loaded.pop() {
            if !self.hosts.contains(&user) || !self.routes.loading(&user) {
                continue;
            }
            match result {
                Ok(rooms) => {
                    let mut changes = ChannelChanges::default();
                    self.routes.loaded(&user, rooms, &mut changes);
                    self.apply_room_channels(changes);
                }
                Err(_) => {
                    // The worker paced itself before answering: ask again.
                    self.bp.room_request(RoomJob::Load { user });
                }
            }
        }
        while let Some(ack) = self.bp.room_acks.pop() {
            self.room_acks.push(ack);
        }
        if self.room_acks.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut done = Vec::new();
        let (routes, hosts) = (&self.routes, &self.hosts);
        self.room_acks.retain(|a| {
            let go = ack_due(routes, hosts, a, now);
            if go {
                done.push((a.target, a.room.clone()));
            }
            !go
        });
        for (target, room) in done {
            let answer = RoomAnswer {
                key: target.key,
                serial: target.serial,
                ack: target.ack,
                resume: target.resume,
                result: Ok(serde_json::json!({ "room": &*room })),
            };
            self.bus
                .send(target.core, CoreMsg::RoomAnswer(Box::new(answer)));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::backplane::{Membership, RoomTarget};

    fn ack(user: &str, room: &str, joined: bool, deadline: Instant) -> RoomAck {
        RoomAck {
            user: user.into(),
            room: room.into(),
            joined,
            target: RoomTarget {
                core: 0,
                key: 1,
                serial: 2,
                ack: Some(3),
                resume: None,
            },
            deadline,
        }
    }

    #[test]
    fn acks_wait_until_the_routes_show_the_change() {
        let now = Instant::now();
        let later = now + Duration::from_secs(5);
        let u: UserId = "u".into();
        let mut hosts = Hosts::default();
        hosts.apply(Membership::Joined(u.clone(), 0));
        let mut routes = RoomRoutes::default();
        let mut changes = ChannelChanges::default();
        let join = ack("u", "team", true, later);
        assert!(!ack_due(&routes, &hosts, &join, now), "rooms not loaded");

        routes.start_load(&u);
        routes.loaded(&u, Vec::new(), &mut changes);
        routes.control(&u, true, "team".into(), &mut changes);
        assert!(
            !ack_due(&routes, &hosts, &join, now),
            "member, but the room's channel is not confirmed"
        );
        assert!(ack_due(&routes, &hosts, &join, later), "deadline");
        routes.confirmed("team");
        assert!(ack_due(&routes, &hosts, &join, now));

        let leave = ack("u", "team", false, later);
        assert!(!ack_due(&routes, &hosts, &leave, now), "still a member");
        routes.control(&u, false, "team".into(), &mut changes);
        assert!(ack_due(&routes, &hosts, &leave, now));

        let gone = ack("v", "team", true, later);
        assert!(ack_due(&routes, &hosts, &gone, now), "not hosted here");
    }
}
