//! Admission before authentication: the handshakes in progress (sockets accepted that have not
//! yet proved who they are: a request head still coming, a Socket.IO connection before its
//! first CONNECT), bounded per process and per source address, and the shedding of the oldest
//! of them when the bound or the process's file descriptors run out.
//!
//! [`Gate`] is the process-wide count every core shares (one lock, taken once when a socket is
//! accepted and once when its handshake ends); the `impl CoreLoop` below keeps this core's
//! handshakes by key, so it can end and shed them. Steps added to admission later (hooks,
//! authorization) go beside these functions, not into them.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

use super::key_budgets::KeyBudgets;
use super::CoreLoop;
use crate::metrics::{add, Closed};
use crate::UserId;

/// Why a new socket was not admitted to a handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Its source address already has `--max-handshakes-per-ip` in progress: refuse it.
    PerAddress,
    /// The process has `--max-handshakes` in progress: shed the oldest, or refuse it.
    Full,
}

/// Handshakes in progress in the process, in total and per source address.
pub(crate) struct Gate {
    max_total: usize,
    max_per_address: u32,
    counts: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    total: usize,
    per_address: HashMap<IpAddr, u32>,
}

impl Gate {
    pub fn new(max_total: usize, max_per_address: u32) -> Self {
        Gate {
            max_total,
            max_per_address,
            counts: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        // The counts stay consistent whatever panicked while holding them: take them anyway.
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a handshake from `peer`, or says why not.
    pub fn begin(&self, peer: IpAddr) -> Result<(), Refusal> {
        let mut counts = self.lock();
        let mine = counts.per_address.get(&peer).copied().unwrap_or(0);
        if mine >= self.max_per_address {
            return Err(Refusal::PerAddress);
        }
        if counts.total >= self.max_total {
            return Err(Refusal::Full);
        }
        counts.total += 1;
        *counts.per_address.entry(peer).or_insert(0) += 1;
        Ok(())
    }

    /// A handshake from `peer` ended (authenticated, answered or dropped).
    pub fn end(&self, peer: IpAddr) {
        let mut counts = self.lock();
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.per_address.get_mut(&peer) {
            *n -= 1;
            if *n == 0 {
                counts.per_address.remove(&peer);
            }
        }
    }

    /// Handshakes in progress in the process.
    #[cfg(test)]
    pub fn in_progress(&self) -> usize {
        self.lock().total
    }
}

/// Connect rates per key (a source address, a user): a bucket of connects each, kept while it
/// is not full again, so the map holds only keys that connected lately.
pub(crate) type ConnectRates<K> = KeyBudgets<K>;

/// Keys kept at least until the map is pruned.
const RATES_PRUNE_FLOOR: usize = 4096;

impl<K: Hash + Eq + Clone> KeyBudgets<K> {
    /// `rate` connects a second per key, `burst` above it; a `rate` of 0 is no limit. Taken
    /// once per connect, so one lock for all the keys.
    pub fn connect_rates(rate: u32, burst: u32) -> Self {
        KeyBudgets::new(f64::from(rate), u64::from(burst), 1, RATES_PRUNE_FLOOR)
    }
}

/// One of this core's handshakes in progress.
#[derive(Debug, Clone, Copy)]
pub(super) struct Handshake {
    peer: IpAddr,
    since: Instant,
}

impl CoreLoop {
    /// The upgrade on `key` is within its source address's connect rate (checked before the
    /// token, so a flood of bad tokens costs no token check past it). `false`: answer 429.
    pub(super) fn connect_rate_ip_allows(&mut self, key: usize) -> bool {
        let Some(peer) = self.handshakes.get(&key).map(|h| h.peer) else {
            return true;
        };
        let allowed = self.shared.connect_rates_ip.take(&peer, 1, Instant::now());
        if !allowed {
            add(&self.metrics().connects_rate_limited, 1);
        }
        allowed
    }

    /// A new connection of `user` is within the user's connect rate. `false`: refuse it (429,
    /// or a CONNECT_ERROR for Socket.IO).
    pub(super) fn connect_rate_user_allows(&mut self, user: &UserId) -> bool {
        let allowed = self.shared.connect_rates_user.take(user, 1, Instant::now());
        if !allowed {
            add(&self.metrics().connects_rate_limited, 1);
        }
        allowed
    }

    /// Whether a socket just accepted from `peer` may start its handshake: within the bound per
    /// address, and within the process's bound once this core shed its oldest handshake if it
    /// had to.
    pub(super) fn begin_handshake(&mut self, peer: IpAddr) -> bool {
        match self.shared.gate.begin(peer) {
            Ok(()) => true,
            Err(Refusal::PerAddress) => false,
            Err(Refusal::Full) => {
                self.shed_oldest_handshakes(1) > 0 && self.shared.gate.begin(peer).is_ok()
            }
        }
    }

    /// Lists `key` as a handshake from `peer` (counted by [`Self::begin_handshake`]).
    pub(super) fn track_handshake(&mut self, key: usize, peer: IpAddr) {
        let since = Instant::now();
        if let Some(old) = self.handshakes.insert(key, Handshake { peer, since }) {
            // Not expected (a key is ended when removed); keep the count right regardless.
            self.shared.gate.end(old.peer);
        }
    }

    /// The connection under `key` proved who it is, was answered, or is gone: its handshake
    /// no longer counts.
    pub(super) fn end_handshake(&mut self, key: usize) {
        if let Some(h) = self.handshakes.remove(&key) {
            self.shared.gate.end(h.peer);
        }
    }

    /// Drops up to `n` of this core's oldest handshakes in progress; returns how many.
    pub(super) fn shed_oldest_handshakes(&mut self, n: usize) -> usize {
        let mut oldest: Vec<(Instant, usize)> =
            self.handshakes.iter().map(|(&k, h)| (h.since, k)).collect();
        let n = n.min(oldest.len());
        if n == 0 {
            return 0;
        }
        oldest.select_nth_unstable(n - 1);
        for &(_, key) in &oldest[..n] {
            log::debug!("core={} conn={key} shed: oldest unauthenticated", self.id);
            add(&self.metrics().handshakes_shed, 1);
            self.remove(key, Closed::Reset);
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn connect_rates_allow_the_burst_then_the_rate_per_key() {
        let rates = ConnectRates::connect_rates(10, 3);
        let t0 = Instant::now();
        assert!((0..3).all(|_| rates.take(&"a", 1, t0)));
        assert!(!rates.take(&"a", 1, t0));
        assert!(rates.take(&"b", 1, t0), "another key has its own bucket");
        assert!(rates.take(&"a", 1, t0 + Duration::from_millis(100)));
        let off = ConnectRates::connect_rates(0, 0);
        assert!((0..100).all(|_| off.take(&"a", 1, t0)));
    }

    #[test]
    fn connect_rates_forget_full_buckets() {
        let rates = ConnectRates::connect_rates(1000, 1);
        let t0 = Instant::now();
        for n in 0..RATES_PRUNE_FLOOR {
            rates.take(&n, 1, t0);
        }
        rates.take(&usize::MAX, 1, t0 + Duration::from_secs(1));
        let kept = rates.keys().len();
        assert_eq!(kept, 1, "only the key seen since the others refilled");
    }

    #[test]
    fn bounds_per_address_and_in_total() {
        let gate = Gate::new(3, 2);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        assert_eq!(gate.begin(a), Ok(()));
        assert_eq!(gate.begin(a), Ok(()));
        assert_eq!(gate.begin(a), Err(Refusal::PerAddress));
        assert_eq!(gate.begin(b), Ok(()));
        assert_eq!(gate.begin(b), Err(Refusal::Full));
        assert_eq!(gate.in_progress(), 3);
        gate.end(a);
        assert_eq!(gate.begin(b), Ok(()));
        assert_eq!(gate.begin(a), Err(Refusal::Full));
        gate.end(a);
        gate.end(b);
        gate.end(b);
        assert_eq!(gate.in_progress(), 0);
        assert!(
            gate.lock().per_address.is_empty(),
            "no address is kept once it has none"
        );
    }
}
