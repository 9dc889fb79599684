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

use std::time::Duration;

use super::key_budgets::KeyBudgets;
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
pub(crate) type SenderBudgets = KeyBudgets<UserId>;

impl KeyBudgets<UserId> {
    /// `per_minute` bytes per user and minute; 0 is no limit.
    pub fn sender_bytes(per_minute: u64) -> Self {
        let rate = per_minute as f64 / WINDOW.as_secs_f64();
        KeyBudgets::new(rate, per_minute, SHARDS, PRUNE_FLOOR)
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
    use std::time::Instant;

    #[test]
    fn a_minute_of_bytes_then_the_refill_per_user() {
        let budgets = SenderBudgets::sender_bytes(6000);
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
        assert!(
            SenderBudgets::sender_bytes(0).take(&a, u64::MAX, t0),
            "0: no limit"
        );
    }

    #[test]
    fn full_buckets_are_forgotten() {
        let budgets = SenderBudgets::sender_bytes(1000);
        let t0 = Instant::now();
        for n in 0..(PRUNE_FLOOR * SHARDS * 2) {
            budgets.take(&UserId::from(format!("early{n}")), 1, t0);
        }
        // A minute later the early buckets are full again; enough later senders make every
        // shard reach its pruning size.
        for n in 0..(PRUNE_FLOOR * SHARDS * 8) {
            budgets.take(&UserId::from(format!("late{n}")), 1, t0 + WINDOW);
        }
        let early = budgets
            .keys()
            .iter()
            .filter(|k| k.starts_with("early"))
            .count();
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
