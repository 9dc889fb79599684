//! The sender budget (`--sender-bytes-per-minute`): what one user's sends may make this instance
//! store in other users' histories, so that one account cannot fill memory or Redis with
//! messages to made-up ids (issue 16).
//!
//! Each stored copy for another user costs its frame plus [`SENDER_COPY_OVERHEAD`] (a copy to a
//! made-up id costs a ring or a stream key whatever its size); the sender's own copy is free (its
//! own history is bounded by `--history-max-len`). The budget is a bucket per user, shared by
//! the user's connections on every core, refilled continuously and holding one minute's worth;
//! a send that does not fit is refused whole (`quota_exceeded`), nothing stored or delivered.
//! Recipients that must exist are not an option: the server has no user directory (a user is
//! whoever a valid token names), so a budget is what bounds the sender.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::bus::Dispatch;
use crate::config::history::SENDER_COPY_OVERHEAD;
use crate::UserId;

/// Mutex shards: a send locks its sender's only.
const SHARDS: usize = 16;
/// Users kept per shard at least until the shard is pruned of full buckets.
const PRUNE_FLOOR: usize = 1024;
/// The refill window: the budget is per minute.
const WINDOW: Duration = Duration::from_secs(60);

/// Per-user buckets of bytes that may be stored for others.
pub(crate) struct SenderBudgets {
    per_minute: u64,
    shards: Box<[Mutex<Shard>]>,
}

#[derive(Default)]
struct Shard {
    buckets: HashMap<UserId, Bucket>,
    prune_at: usize,
}

/// Bytes left and when they were counted.
struct Bucket {
    left: u64,
    at: Instant,
}

impl SenderBudgets {
    /// `per_minute` bytes per user and minute; 0 is no limit.
    pub fn new(per_minute: u64) -> Self {
        SenderBudgets {
            per_minute,
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        buckets: HashMap::new(),
                        prune_at: PRUNE_FLOOR,
                    })
                })
                .collect(),
        }
    }

    /// The budget per minute (0: none).
    pub fn per_minute(&self) -> u64 {
        self.per_minute
    }

    /// Takes `cost` bytes from `sender`'s bucket at `now`; `false` (and nothing taken) when they
    /// are not left.
    pub fn take(&self, sender: &UserId, cost: u64, now: Instant) -> bool {
        if self.per_minute == 0 || cost == 0 {
            return true;
        }
        let mut h = std::hash::DefaultHasher::new();
        sender.hash(&mut h);
        let mut shard = self.shards[(h.finish() % SHARDS as u64) as usize]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if shard.buckets.len() >= shard.prune_at {
            // A bucket untouched for a whole window is full again: as good as absent.
            shard
                .buckets
                .retain(|_, b| now.saturating_duration_since(b.at) < WINDOW);
            shard.prune_at = (shard.buckets.len() * 2).max(PRUNE_FLOOR);
        }
        let per_minute = self.per_minute;
        let bucket = shard.buckets.entry(sender.clone()).or_insert(Bucket {
            left: per_minute,
            at: now,
        });
        let elapsed = now.saturating_duration_since(bucket.at);
        let refill = (per_minute as u128 * elapsed.as_nanos() / WINDOW.as_nanos()) as u64;
        if refill > 0 {
            bucket.left = bucket.left.saturating_add(refill).min(per_minute);
            bucket.at = now;
        }
        if bucket.left < cost {
            return false;
        }
        bucket.left -= cost;
        true
    }
}

/// What `outbox` would store for users other than `sender`: each such recipient's copy of each
/// dispatch, frame plus the fixed overhead.
pub(crate) fn cost_for_others(sender: &UserId, outbox: &[std::sync::Arc<Dispatch>]) -> u64 {
    outbox
        .iter()
        .map(|d| {
            let others = d.users.iter().filter(|u| *u != sender).count() as u64;
            others * (d.frame.len() as u64 + SENDER_COPY_OVERHEAD)
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minute_of_bytes_then_the_refill_per_user() {
        let budgets = SenderBudgets::new(6000);
        let (a, b): (UserId, UserId) = ("a".into(), "b".into());
        let t0 = Instant::now();
        assert!(budgets.take(&a, 4000, t0));
        assert!(!budgets.take(&a, 4000, t0), "2000 left");
        assert!(budgets.take(&b, 4000, t0), "another user has its own");
        assert!(budgets.take(&a, 2000, t0), "a refusal took nothing");
        assert!(!budgets.take(&a, 1, t0));
        // 10 s of a 6000-per-minute budget: 1000 back.
        assert!(budgets.take(&a, 1000, t0 + Duration::from_secs(10)));
        assert!(!budgets.take(&a, 100, t0 + Duration::from_secs(10)));
        assert!(
            !budgets.take(&a, 7000, t0 + Duration::from_secs(600)),
            "never more than a minute's worth"
        );
        assert!(SenderBudgets::new(0).take(&a, u64::MAX, t0), "0: no limit");
    }

    #[test]
    fn full_buckets_are_forgotten() {
        let budgets = SenderBudgets::new(1000);
        let t0 = Instant::now();
        for n in 0..(PRUNE_FLOOR * SHARDS * 2) {
            budgets.take(&UserId::from(format!("early{n}")), 1, t0);
        }
        // A minute later the early buckets are full again; enough later senders make every
        // shard reach its pruning size.
        for n in 0..(PRUNE_FLOOR * SHARDS * 8) {
            budgets.take(&UserId::from(format!("late{n}")), 1, t0 + WINDOW);
        }
        let early: usize = budgets
            .shards
            .iter()
            .map(|s| {
                let shard = s.lock().unwrap();
                shard
                    .buckets
                    .keys()
                    .filter(|k| k.starts_with("early"))
                    .count()
            })
            .sum();
        assert_eq!(early, 0);
    }

    #[test]
    fn only_copies_for_others_count() {
        let me: UserId = "me".into();
        let d = |users: &[&str]| {
            let users = users.iter().map(|u| UserId::from(*u)).collect();
            std::sync::Arc::new(crate::bus::encode_dispatch(users, "e", &"x").unwrap())
        };
        let len = d(&[]).frame.len() as u64;
        assert_eq!(cost_for_others(&me, &[d(&["me"])]), 0);
        assert_eq!(
            cost_for_others(&me, &[d(&["me", "you"]), d(&["a", "b"])]),
            3 * (len + SENDER_COPY_OVERHEAD)
        );
    }
}
