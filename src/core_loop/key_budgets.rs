//! Budgets per key, shared by every core: a token bucket per key (a source address, a user) that
//! refills continuously up to its burst, kept only while it is not full again. The connect rates
//! (`gate.rs`), the history API's read rate and the sender budget in bytes (`sender_budget.rs`)
//! are each one of these.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A bucket per key, in mutex shards (a take locks its key's shard only).
pub(crate) struct KeyBudgets<K> {
    /// Units a second; 0 is no limit.
    rate: f64,
    /// What a full bucket holds.
    burst: u64,
    /// How long an empty bucket takes to fill: one untouched that long is as good as absent.
    fills_in: Duration,
    /// Keys a shard keeps at least before it is pruned of full buckets.
    prune_floor: usize,
    shards: Box<[Mutex<Shard<K>>]>,
}

struct Shard<K> {
    buckets: HashMap<K, Bucket>,
    /// The shard is pruned of full buckets when it reaches this size.
    prune_at: usize,
}

/// What is left, as of when.
struct Bucket {
    left: f64,
    at: Instant,
}

impl<K: Hash + Eq + Clone> KeyBudgets<K> {
    /// `rate` units a second per key, at most `burst` at once (a `rate` of 0 is no limit), in
    /// `shards` shards each pruned once it holds `prune_floor` keys (or twice what its last
    /// pruning kept).
    pub fn new(rate: f64, burst: u64, shards: usize, prune_floor: usize) -> Self {
        let fills_in = if rate > 0.0 {
            Duration::try_from_secs_f64(burst as f64 / rate).unwrap_or(Duration::MAX)
        } else {
            Duration::ZERO
        };
        KeyBudgets {
            rate,
            burst,
            fills_in,
            prune_floor,
            shards: (0..shards.max(1))
                .map(|_| {
                    Mutex::new(Shard {
                        buckets: HashMap::new(),
                        prune_at: prune_floor,
                    })
                })
                .collect(),
        }
    }

    /// No limit: every take succeeds.
    pub fn is_unlimited(&self) -> bool {
        self.rate == 0.0
    }

    /// What a full bucket holds.
    pub fn burst(&self) -> u64 {
        self.burst
    }

    /// Takes `cost` from `key`'s bucket at `now`; `false` (and nothing taken) when it is not
    /// left.
    pub fn take(&self, key: &K, cost: u64, now: Instant) -> bool {
        if self.is_unlimited() || cost == 0 {
            return true;
        }
        let shard = if self.shards.len() == 1 {
            0
        } else {
            let mut h = DefaultHasher::new();
            key.hash(&mut h);
            (h.finish() % self.shards.len() as u64) as usize
        };
        let mut shard = self.shards[shard].lock().unwrap_or_else(|p| p.into_inner());
        if shard.buckets.len() >= shard.prune_at {
            let fills_in = self.fills_in;
            shard
                .buckets
                .retain(|_, b| now.saturating_duration_since(b.at) < fills_in);
            shard.prune_at = (shard.buckets.len() * 2).max(self.prune_floor);
        }
        let burst = self.burst as f64;
        let bucket = shard.buckets.entry(key.clone()).or_insert(Bucket {
            left: burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.left = (bucket.left + elapsed * self.rate).min(burst);
        bucket.at = now;
        if bucket.left < cost as f64 {
            return false;
        }
        bucket.left -= cost as f64;
        true
    }

    /// The keys that have a bucket.
    #[cfg(test)]
    pub fn keys(&self) -> Vec<K> {
        self.shards
            .iter()
            .flat_map(|s| {
                s.lock()
                    .unwrap()
                    .buckets
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_burst_then_the_rate_per_key_in_any_cost() {
        let budgets = KeyBudgets::new(100.0, 1000, 4, 8);
        let t0 = Instant::now();
        assert!(budgets.take(&"a", 700, t0));
        assert!(!budgets.take(&"a", 400, t0), "300 left");
        assert!(budgets.take(&"a", 300, t0), "a refusal took nothing");
        assert!(budgets.take(&"b", 1000, t0), "another key has its own");
        assert!(budgets.take(&"a", 50, t0 + Duration::from_millis(500)));
        assert!(!budgets.take(&"a", 1, t0 + Duration::from_millis(500)));
        assert!(KeyBudgets::new(0.0, 0, 1, 8).take(&"a", u64::MAX, t0));
    }

    #[test]
    fn buckets_full_again_are_forgotten_shard_by_shard() {
        let budgets = KeyBudgets::new(1.0, 10, 4, 8);
        let t0 = Instant::now();
        for n in 0..32 {
            budgets.take(&n, 1, t0);
        }
        // Ten seconds fill a bucket of 10 at 1 a second: enough later keys prune every shard.
        for n in 100..200 {
            budgets.take(&n, 1, t0 + Duration::from_secs(10));
        }
        assert!(budgets.keys().iter().all(|&k| k >= 100));
    }
}
