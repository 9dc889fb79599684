//! Presence changes coalesced per user (embedded mode): a user's first change after a quiet
//! `--presence-interval` is announced at once; changes within the interval after it wait for
//! its end, and only the state the user is in then is announced, if it differs from the last
//! one announced. A device reconnecting in a loop thus costs its rooms' members at most one
//! `presenceChanged` per interval, and none when it flaps back before the interval ends.
//!
//! [`Coalescer`] is the shared, pure state (every core's connects and disconnects go through
//! it); the `impl CoreLoop` below announces what it lets through.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::CoreLoop;
use crate::UserId;

/// What to do with a user's presence change now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Announce it now.
    Announce,
    /// Held: [`Coalescer::due`] hands it out at the end of the interval if it still stands.
    Held,
}

#[derive(Debug, Clone, Copy)]
struct UserPresence {
    /// The last state announced.
    announced: bool,
    /// When it was announced.
    at: Instant,
    /// The newest state not announced yet.
    pending: Option<bool>,
}

/// Per-user presence announcements, process-wide.
pub(crate) struct Coalescer {
    interval: Duration,
    users: Mutex<HashMap<UserId, UserPresence>>,
}

impl Coalescer {
    pub fn new(interval: Duration) -> Self {
        Coalescer {
            interval,
            users: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<UserId, UserPresence>> {
        self.users.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `user` went online (`true`) or offline at `now`.
    pub fn changed(&self, user: &UserId, online: bool, now: Instant) -> Verdict {
        if self.interval.is_zero() {
            return Verdict::Announce;
        }
        let mut users = self.lock();
        match users.get_mut(user) {
            Some(p) if now.saturating_duration_since(p.at) < self.interval => {
                p.pending = Some(online);
                Verdict::Held
            }
            _ => {
                let announced = UserPresence {
                    announced: online,
                    at: now,
                    pending: None,
                };
                users.insert(user.clone(), announced);
                Verdict::Announce
            }
        }
    }

    /// The held changes whose interval ended by `now` and that differ from what was announced:
    /// (user, online), marked announced. Users quiet for an interval are forgotten.
    pub fn due(&self, now: Instant) -> Vec<(UserId, bool)> {
        if self.interval.is_zero() {
            return Vec::new();
        }
        let mut out = Vec::new();
        self.lock().retain(|user, p| {
            if now.saturating_duration_since(p.at) < self.interval {
                return true;
            }
            match p.pending.take() {
                Some(state) if state != p.announced => {
                    out.push((user.clone(), state));
                    p.announced = state;
                    p.at = now;
                    true
                }
                _ => false,
            }
        });
        out
    }
}

impl CoreLoop {
    /// Announces the held presence changes that are due (any core may: the announcement is a
    /// dispatch to every core).
    pub(super) fn announce_due_presence(&mut self, now: Instant) {
        let shared = Arc::clone(&self.shared);
        let Some(rooms) = &shared.rooms else {
            return;
        };
        for (user, online) in shared.presence.due(now) {
            let notices = rooms.presence_notices(&user);
            self.announce_presence(notices, &user, online);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_change_goes_out_then_one_per_interval_with_the_latest_state() {
        let c = Coalescer::new(Duration::from_secs(1));
        let u: UserId = "u".into();
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        assert_eq!(c.changed(&u, true, t0), Verdict::Announce);
        assert_eq!(c.changed(&u, false, ms(100)), Verdict::Held);
        assert_eq!(c.changed(&u, true, ms(200)), Verdict::Held);
        // Back to what was announced: nothing to say at the end of the interval.
        assert!(c.due(ms(1000)).is_empty());
        assert_eq!(
            c.changed(&u, false, ms(1100)),
            Verdict::Announce,
            "quiet for an interval"
        );
        assert_eq!(c.changed(&u, true, ms(1200)), Verdict::Held);
        assert_eq!(c.changed(&u, false, ms(1300)), Verdict::Held);
        assert_eq!(c.changed(&u, true, ms(1400)), Verdict::Held);
        assert!(c.due(ms(1500)).is_empty(), "not yet");
        assert_eq!(c.due(ms(2100)), vec![(u.clone(), true)]);
        assert!(c.due(ms(3200)).is_empty());
        assert!(c.lock().is_empty(), "quiet users are forgotten");
    }

    #[test]
    fn an_interval_of_zero_announces_everything() {
        let c = Coalescer::new(Duration::ZERO);
        let u: UserId = "u".into();
        let t0 = Instant::now();
        assert!((0..10).all(|n| c.changed(&u, n % 2 == 0, t0) == Verdict::Announce));
        assert!(c.due(t0).is_empty());
    }
}
