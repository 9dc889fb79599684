//! The names of the rooms worker's keys, chosen so that every script touches one hash slot on a
//! Redis Cluster (the same names on one Redis): user-side keys in the user's channel's slot,
//! room-side keys in the room's channel's slot (see [`wire::room_members_key`]), and the
//! instance registry under the one tag `{PREFIX:n}`.

use super::super::tagged;
use super::super::wire;

/// `{PREFIX:u:USER}:SUFFIX`, in the slot of the user's channel (which the membership scripts
/// publish on). A user id with a `}` that forms no tag has no such name (see `tagged`): its
/// keys are named `PREFIX:u:USER:SUFFIX`, which works on one Redis; on a cluster the script
/// fails with a cross-slot error and the request is answered `internal`.
fn user_key(prefix: &str, user: &str, suffix: &str) -> String {
    let channel = wire::user_channel(prefix, user);
    tagged::user_key(&channel, suffix).unwrap_or_else(|| format!("{channel}{suffix}"))
}

/// The user's rooms (a set of room names).
pub fn user_rooms(prefix: &str, user: &str) -> String {
    user_key(prefix, user, ":ur")
}

/// The user's connections per instance (a hash node id → count).
pub fn user_counts(prefix: &str, user: &str) -> String {
    user_key(prefix, user, ":p")
}

/// The user's devices under `--max-devices` (a sorted set, `devices.rs`).
pub fn user_devices(prefix: &str, user: &str) -> String {
    user_key(prefix, user, ":dev")
}

/// The user's last `presenceChanged` announcement (a hash, `coalesce.rs`).
pub fn user_announced(prefix: &str, user: &str) -> String {
    user_key(prefix, user, ":pa")
}

/// Every user-side key the presence scripts take, in their KEYS order.
pub struct UserKeys {
    pub counts: String,
    pub rooms: String,
    pub devices: String,
    pub announced: String,
}

impl UserKeys {
    pub fn new(prefix: &str, user: &str) -> Self {
        UserKeys {
            counts: user_counts(prefix, user),
            rooms: user_rooms(prefix, user),
            devices: user_devices(prefix, user),
            announced: user_announced(prefix, user),
        }
    }
}

/// The instance registry's keys, all tagged `{PREFIX:n}` (one slot).
pub struct Registry {
    tag: String,
}

impl Registry {
    pub fn new(prefix: &str) -> Self {
        Registry {
            tag: format!("{{{prefix}:n}}"),
        }
    }

    /// The instances with a heartbeat (a set of node ids).
    pub fn nodes(&self) -> String {
        format!("{}:nodes", self.tag)
    }

    /// Instances found without a heartbeat whose users are not all uncounted yet (a set).
    pub fn dead(&self) -> String {
        format!("{}:dead", self.tag)
    }

    /// The prefix of the heartbeat keys: `{PREFIX:n}:hb:NODE` expires after the TTL.
    pub fn heartbeat_prefix(&self) -> String {
        format!("{}:hb:", self.tag)
    }

    pub fn heartbeat(&self, node: &str) -> String {
        format!("{}:hb:{node}", self.tag)
    }

    /// The prefix of the per-instance user sets: `{PREFIX:n}:users:NODE`.
    pub fn users_prefix(&self) -> String {
        format!("{}:users:", self.tag)
    }

    /// The users an instance counted connections of (a set).
    pub fn users(&self, node: &str) -> String {
        format!("{}:users:{node}", self.tag)
    }

    /// The users whose presence change is held until the end of their interval (a sorted set,
    /// `coalesce.rs`).
    pub fn held(&self) -> String {
        format!("{}:pq", self.tag)
    }

    /// Who uncounts a dead instance's users: one sweeper at a time (expires after the TTL).
    pub fn claim(&self, node: &str) -> String {
        format!("{}:claim:{node}", self.tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backplane::cluster::slot;

    #[test]
    fn each_side_shares_one_slot() {
        for user in ["alice", "u1", "a{b}c", "é"] {
            let channel = wire::user_channel("sb", user);
            assert_eq!(
                slot(user_rooms("sb", user).as_bytes()),
                slot(channel.as_bytes())
            );
            assert_eq!(
                slot(user_counts("sb", user).as_bytes()),
                slot(channel.as_bytes())
            );
        }
        assert_eq!(user_rooms("sb", "alice"), "{sb:u:alice}:ur");
        assert_eq!(
            user_counts("sb", "a}b"),
            "sb:u:a}b:p",
            "no name in the slot"
        );
        for room in ["team", "a}b", "{x}"] {
            let channel = wire::room_channel("sb", room);
            let members = wire::room_members_key("sb", room);
            assert_eq!(slot(members.as_bytes()), slot(channel.as_bytes()), "{room}");
        }
        let r = Registry::new("sb");
        let keys = [
            r.nodes(),
            r.dead(),
            r.heartbeat("n1"),
            r.users("n1"),
            r.claim("n1"),
        ];
        for key in &keys {
            assert_eq!(slot(key.as_bytes()), slot(b"{sb:n}"), "{key}");
        }
        assert!(r.heartbeat("n1").starts_with(&r.heartbeat_prefix()));
        assert!(r.users("n1").starts_with(&r.users_prefix()));
    }
}
