//! Who connects where, and who sends to whom: users, their devices (connections), the
//! address each connection uses, and the deterministic sender/recipient of every message.
//!
//! Routing is a pure function of (seed, seq), so the thread that receives a delivery can
//! recompute where the message was meant to go without any shared per-message table.

use crate::rng::splitmix64;

/// One user of this shard. Its connections are `first_conn .. first_conn + devices`.
#[derive(Debug, Clone)]
pub struct User {
    /// Index used in the user id (`<prefix><global>`), unique across worker processes.
    pub global: u64,
    pub first_conn: u32,
    pub devices: u32,
}

#[derive(Debug, Clone, Copy)]
pub struct ConnSpec {
    pub user: u32,
    pub dev: u32,
    /// Index into the list of server addresses.
    pub addr: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// Random sender (random device) to a random user of the shard, possibly itself.
    Uniform,
    /// User 0 (random device) to user 1.
    Fanout,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub sender: u32,
    pub sender_dev: u32,
    pub recipient: u32,
}

#[derive(Debug, Clone)]
pub struct Population {
    pub prefix: String,
    pub users: Vec<User>,
    pub conns: Vec<ConnSpec>,
    pub routing: Routing,
    /// Upper bound of expected deliveries per message: the ledger's row width.
    pub slots_per_msg: u32,
    pub seed: u64,
    /// Uniform routing with `--senders`: the users (indexes into `users`) that send; None
    /// means every user.
    pub senders: Option<Vec<u32>>,
}

/// Which part of the global user space a process owns.
#[derive(Debug, Clone, Copy)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl Population {
    /// `users` users with `devices` connections each; this shard owns a contiguous slice.
    pub fn uniform(
        prefix: &str,
        users: u64,
        devices: u32,
        shard: Shard,
        n_addrs: u32,
        seed: u64,
    ) -> Self {
        let lo = users * u64::from(shard.index) / u64::from(shard.count);
        let hi = users * u64::from(shard.index + 1) / u64::from(shard.count);
        let specs: Vec<(u64, u32)> = (lo..hi).map(|g| (g, devices)).collect();
        Self::build(prefix, &specs, Routing::Uniform, n_addrs, seed)
    }

    /// One sender with `sender_devices` and one recipient with `devices`, per shard.
    pub fn fanout(
        prefix: &str,
        sender_devices: u32,
        devices: u32,
        shard: Shard,
        n_addrs: u32,
        seed: u64,
    ) -> Self {
        let base = 2 * u64::from(shard.index);
        let specs = [(base, sender_devices), (base + 1, devices)];
        Self::build(prefix, &specs, Routing::Fanout, n_addrs, seed)
    }

    fn build(
        prefix: &str,
        specs: &[(u64, u32)],
        routing: Routing,
        n_addrs: u32,
        seed: u64,
    ) -> Self {
        let mut users = Vec::with_capacity(specs.len());
        let mut conns = Vec::new();
        let n_addrs = n_addrs.max(1);
        for (i, &(global, devices)) in specs.iter().enumerate() {
            users.push(User {
                global,
                first_conn: conns.len() as u32,
                devices,
            });
            for dev in 0..devices {
                // Offsetting by the user spreads one user's devices over different instances.
                let addr = ((global + u64::from(dev)) % u64::from(n_addrs)) as u32;
                conns.push(ConnSpec {
                    user: i as u32,
                    dev,
                    addr,
                });
            }
        }
        let max_dev = users.iter().map(|u| u.devices).max().unwrap_or(0);
        let slots_per_msg = match routing {
            Routing::Uniform => 2 * max_dev,
            Routing::Fanout => users.iter().map(|u| u.devices).sum(),
        };
        Self {
            prefix: prefix.to_owned(),
            users,
            conns,
            routing,
            slots_per_msg,
            seed,
            senders: None,
        }
    }

    /// Only `n` of all `total` users send, spread evenly over the global user ids (user g
    /// sends iff `floor((g+1)·n/total) > floor(g·n/total)`), so every shard of a `--workers`
    /// run holds about its share of them. Recipients stay uniform over the shard's users.
    pub fn with_senders(mut self, n: u64, total: u64) -> Self {
        let total = total.max(1);
        let is_sender = |g: u64| (g + 1) * n / total > g * n / total;
        self.senders = Some(
            self.users
                .iter()
                .enumerate()
                .filter(|(_, u)| is_sender(u.global))
                .map(|(i, _)| i as u32)
                .collect(),
        );
        self
    }

    pub fn user_id(&self, user: u32) -> String {
        format!("{}{}", self.prefix, self.users[user as usize].global)
    }

    pub fn conn_of(&self, user: u32, dev: u32) -> u32 {
        self.users[user as usize].first_conn + dev
    }

    /// Can this shard send anything at all?
    pub fn can_send(&self) -> bool {
        match self.routing {
            Routing::Uniform => {
                !self.users.is_empty() && self.senders.as_ref().is_none_or(|s| !s.is_empty())
            }
            Routing::Fanout => self.users.len() == 2 && self.users[0].devices > 0,
        }
    }

    pub fn route(&self, seq: u64) -> Route {
        let h = splitmix64(self.seed ^ seq.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let pick = |bits: u64, n: u32| (((bits & 0xFFFF_FFFF) * u64::from(n)) >> 32) as u32;
        match self.routing {
            Routing::Uniform => {
                let n = self.users.len() as u32;
                let sender = match &self.senders {
                    None => pick(h, n),
                    Some(s) => s[pick(h, s.len() as u32) as usize],
                };
                let recipient = pick(h >> 32, n);
                let h2 = splitmix64(h);
                let sender_dev = pick(h2, self.users[sender as usize].devices);
                Route {
                    sender,
                    sender_dev,
                    recipient,
                }
            }
            Routing::Fanout => Route {
                sender: 0,
                sender_dev: pick(h, self.users[0].devices),
                recipient: 1,
            },
        }
    }

    /// Ledger column for a delivery of `route` on device `dev` of `user`: recipient devices
    /// first, then sender devices. None means the server delivered to someone it should not.
    pub fn slot(&self, route: &Route, user: u32, dev: u32) -> Option<u32> {
        if user == route.recipient {
            Some(dev)
        } else if user == route.sender {
            Some(self.users[route.recipient as usize].devices + dev)
        } else {
            None
        }
    }

    /// Every (slot, connection) that should receive `route`; a self-send is one set.
    pub fn expected(&self, route: &Route) -> impl Iterator<Item = (u32, u32)> + '_ {
        let r = &self.users[route.recipient as usize];
        let s = &self.users[route.sender as usize];
        let rd = r.devices;
        let recipient = (0..rd).map(move |d| (d, r.first_conn + d));
        let sender_devs = if route.sender == route.recipient {
            0
        } else {
            s.devices
        };
        let sender = (0..sender_devs).map(move |d| (rd + d, s.first_conn + d));
        recipient.chain(sender)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_partition_users_and_keep_devices_together() {
        let total = 10;
        let mut seen = Vec::new();
        for i in 0..3 {
            let p = Population::uniform("u", total, 2, Shard { index: i, count: 3 }, 2, 1);
            assert_eq!(p.conns.len(), p.users.len() * 2);
            for (ui, u) in p.users.iter().enumerate() {
                seen.push(u.global);
                for d in 0..u.devices {
                    let c = p.conns[p.conn_of(ui as u32, d) as usize];
                    assert_eq!((c.user, c.dev), (ui as u32, d));
                }
            }
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..total).collect::<Vec<_>>());
    }

    #[test]
    fn devices_of_a_user_use_different_addresses() {
        let p = Population::uniform("u", 4, 2, Shard { index: 0, count: 1 }, 2, 1);
        for u in 0..4 {
            let a = p.conns[p.conn_of(u, 0) as usize].addr;
            let b = p.conns[p.conn_of(u, 1) as usize].addr;
            assert_ne!(a, b);
        }
        assert_eq!(p.user_id(3), "u3");
    }

    #[test]
    fn routes_are_deterministic_and_in_range() {
        let p = Population::uniform("u", 50, 3, Shard { index: 1, count: 2 }, 1, 7);
        let mut self_sends = 0;
        for seq in 0..10_000 {
            let r = p.route(seq);
            assert_eq!(r, p.route(seq));
            assert!((r.sender as usize) < p.users.len());
            assert!((r.recipient as usize) < p.users.len());
            assert!(r.sender_dev < 3);
            self_sends += u32::from(r.sender == r.recipient);
        }
        // About 1 in 25 picks itself; both branches get exercised.
        assert!(self_sends > 100 && self_sends < 1000, "{self_sends}");
    }

    #[test]
    fn slots_cover_expected_set_exactly_once() {
        let p = Population::uniform("u", 5, 2, Shard { index: 0, count: 1 }, 1, 3);
        for seq in 0..500 {
            let r = p.route(seq);
            let expected: Vec<(u32, u32)> = p.expected(&r).collect();
            let want = if r.sender == r.recipient { 2 } else { 4 };
            assert_eq!(expected.len(), want);
            for &(slot, conn) in &expected {
                let c = p.conns[conn as usize];
                assert_eq!(p.slot(&r, c.user, c.dev), Some(slot));
                assert!(slot < p.slots_per_msg);
            }
            // A bystander gets no slot.
            for u in 0..5 {
                if u != r.sender && u != r.recipient {
                    assert_eq!(p.slot(&r, u, 0), None);
                }
            }
        }
    }

    #[test]
    fn senders_are_a_spread_subset_and_recipients_stay_uniform() {
        let all = Population::uniform("u", 200, 2, Shard { index: 0, count: 1 }, 1, 5);
        let p = all.clone().with_senders(50, 200);
        let s = p.senders.clone().unwrap();
        assert_eq!(s.len(), 50);
        // Every fourth user: 3, 7, 11, ...
        assert_eq!(&s[..3], &[3, 7, 11]);
        let mut senders = std::collections::BTreeSet::new();
        let mut recipients = std::collections::BTreeSet::new();
        for seq in 0..20_000 {
            let r = p.route(seq);
            assert!(s.contains(&r.sender), "{r:?}");
            assert!(r.sender_dev < 2);
            senders.insert(r.sender);
            recipients.insert(r.recipient);
            // Recipients (and devices) are drawn as without --senders.
            let u = all.route(seq);
            assert_eq!((r.recipient, r.sender_dev), (u.recipient, u.sender_dev));
        }
        assert_eq!((senders.len(), recipients.len()), (50, 200));
        // All users as senders picks the same routes as no --senders at all.
        let every = all.clone().with_senders(200, 200);
        assert_eq!(every.senders.as_ref().unwrap().len(), 200);
        // Shards of a --workers run each get about their share.
        let counts: Vec<usize> = (0..3)
            .map(|i| {
                Population::uniform("u", 200, 2, Shard { index: i, count: 3 }, 1, 5)
                    .with_senders(50, 200)
                    .senders
                    .unwrap()
                    .len()
            })
            .collect();
        assert_eq!(counts.iter().sum::<usize>(), 50);
        assert!(counts.iter().all(|&c| (16..=17).contains(&c)), "{counts:?}");
        let one = Population::uniform("u", 10, 1, Shard { index: 0, count: 2 }, 1, 5);
        assert!(!one.with_senders(1, 10).can_send());
    }

    #[test]
    fn fanout_layout() {
        let p = Population::fanout("u", 1, 100, Shard { index: 2, count: 3 }, 2, 3);
        assert_eq!(p.users.len(), 2);
        assert_eq!(p.conns.len(), 101);
        assert_eq!(p.slots_per_msg, 101);
        assert_eq!(p.user_id(0), "u4");
        assert_eq!(p.user_id(1), "u5");
        let r = p.route(5);
        assert_eq!((r.sender, r.recipient, r.sender_dev), (0, 1, 0));
        assert_eq!(p.expected(&r).count(), 101);
        assert_eq!(p.slot(&r, 0, 0), Some(100));
    }
}
