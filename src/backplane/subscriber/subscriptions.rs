//! The subscription set: which channels this instance must be subscribed to, which ones Redis
//! confirmed, and the SUBSCRIBE/UNSUBSCRIBE batch each wake-up's membership changes need.
//!
//! In `per-user` routing there is exactly one subscription per hosted user, on whichever shard
//! serves the user's channel: subscribed on the first device in the process, unsubscribed after
//! the last. In `seed` routing the one seed channel is subscribed. Pure state: the subscriber
//! writes the commands.

use std::collections::HashSet;

use crate::backplane::wire;
use crate::backplane::Routing;
use crate::UserId;

/// Per-shard channels to send after one wake-up's membership changes.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Batch {
    /// `subscribe[i]`: channels to subscribe on shard `i`.
    pub subscribe: Vec<Vec<String>>,
    /// `unsubscribe[i]`: channels to unsubscribe on shard `i`.
    pub unsubscribe: Vec<Vec<String>>,
}

/// See the module docs.
#[derive(Debug)]
pub(super) struct Subscriptions {
    routing: Routing,
    prefix: String,
    sharded: bool,
    /// Users whose channel was subscribed (per-user routing), on whichever shard serves it.
    subscribed: HashSet<UserId>,
    /// Users whose channel Redis confirmed (history: replays wait for this).
    confirmed: HashSet<UserId>,
}

impl Subscriptions {
    pub fn new(routing: Routing, prefix: String, sharded: bool) -> Self {
        Subscriptions {
            routing,
            prefix,
            sharded,
            subscribed: HashSet::new(),
            confirmed: HashSet::new(),
        }
    }

    /// One channel per hosted user (`per-user` routing).
    pub fn per_user(&self) -> bool {
        self.routing == Routing::PerUser
    }

    /// The subscribe and unsubscribe commands: sharded ones on a Redis Cluster.
    pub fn commands(&self) -> (&'static str, &'static str) {
        if self.sharded {
            ("SSUBSCRIBE", "SUNSUBSCRIBE")
        } else {
            ("SUBSCRIBE", "UNSUBSCRIBE")
        }
    }

    /// Every channel shard `shard` serves for this instance, for its fresh connection: the
    /// channels of the `hosted` users there (now counted as subscribed), or the seed channel.
    pub fn resubscribe<'a>(
        &mut self,
        shard: usize,
        hosted: impl Iterator<Item = &'a UserId>,
        shard_of: impl Fn(&str) -> usize,
    ) -> Vec<String> {
        match self.routing {
            Routing::Seed => vec![wire::SEED_CHANNEL.to_string()],
            Routing::PerUser => {
                let prefix = &self.prefix;
                let users: Vec<UserId> = hosted
                    .filter(|u| shard_of(&wire::user_channel(prefix, u)) == shard)
                    .cloned()
                    .collect();
                let channels = users
                    .iter()
                    .map(|u| wire::user_channel(prefix, u))
                    .collect();
                self.subscribed.extend(users);
                channels
            }
        }
    }

    /// The (un)subscriptions for the users whose hosts changed this wake-up, in order: a user
    /// `hosted` now and not subscribed is subscribed, one subscribed and no longer hosted is
    /// unsubscribed. Users on a shard that is not `connected` are skipped: the reconnect
    /// subscribes from the hosts.
    pub fn update(
        &mut self,
        touched: Vec<UserId>,
        hosted: impl Fn(&UserId) -> bool,
        shards: usize,
        shard_of: impl Fn(&str) -> usize,
        connected: impl Fn(usize) -> bool,
    ) -> Batch {
        let mut batch = Batch {
            subscribe: vec![Vec::new(); shards],
            unsubscribe: vec![Vec::new(); shards],
        };
        if !self.per_user() {
            return batch;
        }
        for user in touched {
            let channel = wire::user_channel(&self.prefix, &user);
            let shard = shard_of(&channel);
            if shard >= shards || !connected(shard) {
                // Disconnected: the reconnect re-subscribes from the hosts.
                continue;
            }
            let wanted = hosted(&user);
            let have = self.subscribed.contains(&user);
            if wanted && !have {
                batch.subscribe[shard].push(channel);
                self.subscribed.insert(user);
            } else if !wanted && have {
                batch.unsubscribe[shard].push(channel);
                self.subscribed.remove(&user);
                // Not confirmed from here on, even before Redis answers: a replay must wait
                // for the next subscription's confirmation.
                self.confirmed.remove(&user);
            }
        }
        batch
    }

    /// Redis confirmed `user`'s channel. Returns `false` (and records nothing) when it is not
    /// subscribed any more.
    pub fn confirm(&mut self, user: &UserId) -> bool {
        if !self.subscribed.contains(user) {
            return false;
        }
        self.confirmed.insert(user.clone());
        true
    }

    pub fn is_subscribed(&self, user: &str) -> bool {
        self.subscribed.contains(user)
    }

    pub fn is_confirmed(&self, user: &str) -> bool {
        self.confirmed.contains(user)
    }

    /// Shard `shard`'s connection dropped: its users are neither subscribed nor confirmed.
    pub fn lost(&mut self, shard: usize, shard_of: impl Fn(&str) -> usize) {
        if !self.per_user() {
            return;
        }
        let prefix = &self.prefix;
        let lost: Vec<UserId> = self
            .subscribed
            .iter()
            .filter(|u| shard_of(&wire::user_channel(prefix, u)) == shard)
            .cloned()
            .collect();
        for u in lost {
            self.subscribed.remove(&u);
            self.confirmed.remove(&u);
        }
    }

    /// Every connection dropped (the topology changed).
    pub fn clear(&mut self) {
        self.subscribed.clear();
        self.confirmed.clear();
    }

    /// Marks `user` confirmed whether subscribed or not.
    #[cfg(test)]
    pub fn force_confirmed(&mut self, user: UserId) {
        self.confirmed.insert(user);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn per_user() -> Subscriptions {
        Subscriptions::new(Routing::PerUser, "sb".into(), false)
    }

    fn user(name: &str) -> UserId {
        UserId::from(name)
    }

    /// One wake-up with `touched` users and the `hosted` set after it, on one connected shard.
    fn wake(subs: &mut Subscriptions, touched: &[&str], hosted: &[&str]) -> Batch {
        let hosted: HashSet<UserId> = hosted.iter().map(|u| user(u)).collect();
        subs.update(
            touched.iter().map(|u| user(u)).collect(),
            |u| hosted.contains(u),
            1,
            |_| 0,
            |_| true,
        )
    }

    fn batch(subscribe: &[&str], unsubscribe: &[&str]) -> Batch {
        let list = |l: &[&str]| vec![l.iter().map(|u| format!("sb:u:{u}")).collect()];
        Batch {
            subscribe: list(subscribe),
            unsubscribe: list(unsubscribe),
        }
    }

    #[test]
    fn the_first_device_subscribes_the_user() {
        let mut subs = per_user();
        assert_eq!(wake(&mut subs, &["a"], &["a"]), batch(&["a"], &[]));
        assert!(subs.is_subscribed("a"));
        // A second device (or core) of the same user: already subscribed.
        assert_eq!(wake(&mut subs, &["a"], &["a"]), batch(&[], &[]));
    }

    #[test]
    fn the_last_device_unsubscribes_the_user_and_its_confirmation() {
        let mut subs = per_user();
        wake(&mut subs, &["a"], &["a"]);
        assert!(subs.confirm(&user("a")));
        assert!(subs.is_confirmed("a"));
        assert_eq!(wake(&mut subs, &["a"], &[]), batch(&[], &["a"]));
        assert!(!subs.is_subscribed("a"));
        assert!(
            !subs.is_confirmed("a"),
            "not confirmed before Redis answers"
        );
        assert!(
            !subs.confirm(&user("a")),
            "a late confirmation of the old subscription"
        );
        assert!(!subs.is_confirmed("a"));
    }

    #[test]
    fn changes_are_batched_per_wake_up_and_per_shard() {
        let mut subs = Subscriptions::new(Routing::PerUser, "sb".into(), true);
        assert_eq!(subs.commands(), ("SSUBSCRIBE", "SUNSUBSCRIBE"));
        let shard_of = |ch: &str| usize::from(ch.ends_with('b') || ch.ends_with('d'));
        let hosted: HashSet<UserId> = ["a", "b", "c"].iter().map(|u| user(u)).collect();
        let touched = ["a", "b", "c", "a"].iter().map(|u| user(u)).collect();
        let first = subs.update(touched, |u| hosted.contains(u), 2, shard_of, |_| true);
        assert_eq!(first.subscribe, [vec!["sb:u:a", "sb:u:c"], vec!["sb:u:b"]]);
        assert_eq!(first.unsubscribe, [Vec::<String>::new(), Vec::new()]);

        // Joined and left within one wake-up: nothing to send.
        let hosted: HashSet<UserId> = ["b", "c"].iter().map(|u| user(u)).collect();
        let touched = ["a", "d", "d"].iter().map(|u| user(u)).collect();
        let second = subs.update(touched, |u| hosted.contains(u), 2, shard_of, |_| true);
        assert_eq!(second.subscribe, [Vec::<String>::new(), Vec::new()]);
        assert_eq!(second.unsubscribe, [vec!["sb:u:a"], vec![]]);
    }

    #[test]
    fn a_disconnected_shard_waits_for_the_reconnect() {
        let mut subs = per_user();
        let hosted = |_: &UserId| true;
        let batch = subs.update(vec![user("a")], hosted, 1, |_| 0, |_| false);
        assert_eq!(batch.subscribe, [Vec::<String>::new()]);
        assert!(!subs.is_subscribed("a"));
        // No topology yet: no shard at all.
        let batch = subs.update(vec![user("a")], hosted, 0, |_| 0, |_| true);
        assert_eq!(batch, Batch::default());
    }

    #[test]
    fn resubscribe_after_a_reconnect_lists_every_hosted_user_of_the_shard() {
        let mut subs = Subscriptions::new(Routing::PerUser, "sb".into(), true);
        let hosted: Vec<UserId> = ["a", "b", "c"].iter().map(|u| user(u)).collect();
        let shard_of = |ch: &str| usize::from(ch.ends_with('b'));
        wake_all(&mut subs, &hosted, shard_of);
        subs.confirm(&user("a"));
        subs.confirm(&user("b"));

        subs.lost(0, shard_of);
        assert!(!subs.is_subscribed("a") && !subs.is_subscribed("c"));
        assert!(!subs.is_confirmed("a"));
        assert!(
            subs.is_subscribed("b") && subs.is_confirmed("b"),
            "other shard"
        );

        let mut channels = subs.resubscribe(0, hosted.iter(), shard_of);
        channels.sort();
        assert_eq!(channels, ["sb:u:a", "sb:u:c"]);
        assert!(subs.is_subscribed("a") && subs.is_subscribed("c"));
        assert!(!subs.is_confirmed("a"), "confirmed once Redis answers");

        subs.clear();
        assert!(!subs.is_subscribed("b") && !subs.is_confirmed("b"));
    }

    fn wake_all(subs: &mut Subscriptions, hosted: &[UserId], shard_of: fn(&str) -> usize) {
        let batch = subs.update(hosted.to_vec(), |_| true, 2, shard_of, |_| true);
        assert_eq!(batch.subscribe.concat().len(), hosted.len());
    }

    #[test]
    fn seed_routing_subscribes_the_seed_channel_only() {
        let mut subs = Subscriptions::new(Routing::Seed, "sb".into(), false);
        let hosted = [user("a")];
        assert_eq!(
            subs.resubscribe(0, hosted.iter(), |_| 0),
            [wire::SEED_CHANNEL]
        );
        let batch = subs.update(vec![user("a")], |_| true, 1, |_| 0, |_| true);
        assert_eq!(batch.subscribe, [Vec::<String>::new()]);
        assert!(!subs.is_subscribed("a"));
    }
}
