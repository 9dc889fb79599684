//! A user's history keys on a Redis Cluster: named after the user's channel so that they hash to
//! its slot, and the one script that appends, records the idempotency key and `SPUBLISH`es runs
//! on the shard owning that slot (a script may touch one slot only).
//!
//! The channel `PREFIX:u:USER` (the prefix holds no braces) becomes the hash tag of its keys:
//! `{PREFIX:u:USER}:h` (stream), `{PREFIX:u:USER}:d:KEY` (idempotency key). A user id with
//! braces may carry a tag of its own: then the channel's name plus the suffix keeps it. A user id
//! with a `}` that forms no tag (`a}b`, `a{}b`) has no name in its channel's slot: such a user gets live
//! delivery without history on a cluster.

use super::cluster::slot;
use super::wire;
use crate::history::UserKeys;

/// The key `suffix` of the user whose channel is `channel`, in the channel's slot; `None` when
/// no such name exists (see the module docs).
pub fn user_key(channel: &str, suffix: &str) -> Option<String> {
    let want = slot(channel.as_bytes());
    let wrapped = format!("{{{channel}}}{suffix}");
    if slot(wrapped.as_bytes()) == want {
        return Some(wrapped);
    }
    let appended = format!("{channel}{suffix}");
    (slot(appended.as_bytes()) == want).then_some(appended)
}

/// The user's history stream on a cluster.
pub fn stream_key(prefix: &str, user: &str) -> Option<String> {
    user_key(&wire::user_channel(prefix, user), ":h")
}

/// Every key [`crate::history::APPEND_SCRIPT`] needs for `user`, whose channel is `channel`, on a
/// cluster; `None` for a user without history there.
pub fn append_keys<'a>(channel: &'a str, dedupe: Option<&str>) -> Option<UserKeys<'a>> {
    let stream = user_key(channel, ":h")?;
    let dedupe = match dedupe {
        Some(key) => Some(user_key(channel, &format!(":d:{key}"))?),
        None => None,
    };
    Some(UserKeys {
        stream,
        channel,
        dedupe,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_the_channels_slot() {
        for user in ["alice", "u1", "a{b}c", "a{b", "{x}", "é"] {
            let channel = wire::user_channel("sb", user);
            let keys = append_keys(&channel, Some("5:alice:c-1")).expect(user);
            assert_eq!(
                slot(keys.stream.as_bytes()),
                slot(channel.as_bytes()),
                "{user}"
            );
            let dedupe = keys.dedupe.unwrap();
            assert_eq!(slot(dedupe.as_bytes()), slot(channel.as_bytes()), "{user}");
            assert_ne!(keys.stream, dedupe);
        }
        assert_eq!(stream_key("sb", "alice").unwrap(), "{sb:u:alice}:h");
        assert_eq!(stream_key("sb", "a{b}c").unwrap(), "sb:u:a{b}c:h");
        // A `}` outside any tag, or an empty tag: no name in the channel's slot.
        assert_eq!(stream_key("sb", "a}b"), None);
        assert_eq!(stream_key("sb", "a{}b"), None);
    }
}
