//! The per-core user index: user id → this core's connection keys.
//!
//! Owned by exactly one core loop, so no locks. A user's entry exists only while at least one of
//! the user's connections on this core is open; removing the last key removes the entry, which
//! keeps the map from growing with users who have left.

use std::collections::HashMap;

use smallvec::SmallVec;

use crate::UserId;

/// Most users are on one or two devices; those keys live inline with no extra allocation.
type Keys = SmallVec<[usize; 2]>;

/// Maps each user with a connection on this core to those connections' slab keys.
#[derive(Default, Debug)]
pub struct UserIndex {
    users: HashMap<UserId, Keys>,
}

impl UserIndex {
    /// Adds `key` to `user`. Returns `true` when this is the user's first connection on this core.
    pub fn insert(&mut self, user: &UserId, key: usize) -> bool {
        let keys = self.users.entry(user.clone()).or_default();
        keys.push(key);
        keys.len() == 1
    }

    /// Removes `key` from `user`. Returns `true` when that was the user's last connection here.
    pub fn remove(&mut self, user: &str, key: usize) -> bool {
        let Some(keys) = self.users.get_mut(user) else {
            return false;
        };
        let Some(pos) = keys.iter().position(|&k| k == key) else {
            return false;
        };
        keys.swap_remove(pos);
        if keys.is_empty() {
            self.users.remove(user);
            true
        } else {
            false
        }
    }

    /// This core's connection keys for `user` (empty when none).
    pub fn get(&self, user: &str) -> &[usize] {
        self.users.get(user).map_or(&[], |k| k.as_slice())
    }

    /// Number of users with at least one connection here.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether no user has a connection here.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_and_last_device_are_reported() {
        let mut idx = UserIndex::default();
        let u: UserId = "u1".into();
        assert!(idx.insert(&u, 3));
        assert!(!idx.insert(&u, 9));
        assert_eq!(idx.get("u1"), &[3, 9]);
        assert!(!idx.remove("u1", 3));
        assert!(idx.remove("u1", 9));
        assert!(idx.is_empty());
        assert_eq!(idx.get("u1"), &[] as &[usize]);
    }

    #[test]
    fn removing_unknown_keys_is_harmless() {
        let mut idx = UserIndex::default();
        assert!(!idx.remove("nobody", 1));
        idx.insert(&"u".into(), 1);
        assert!(!idx.remove("u", 2));
        assert_eq!(idx.len(), 1);
    }
}
