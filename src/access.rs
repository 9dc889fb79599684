//! Room permissions: which rooms a connection may join and send to, from its token's `rooms`
//! and `rooms_read` claims or from the connect hook's answer. Pure rules, no I/O.
//!
//! A pattern is an exact room name (`lobby`), a prefix ending in `*` (`team:42:*` matches
//! `team:42:` and every name that starts with it), or `*` alone (every room). `*` is not a room
//! name character, so a pattern is never ambiguous. `rooms` grants join and send; `rooms_read`
//! grants join only (the member receives the room's messages, sending gets `forbidden`).

use serde::Deserialize;

/// Most patterns kept from one token or hook answer; the rest are ignored (a token is small).
pub const MAX_PATTERNS: usize = 256;

/// What a connection may do in a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoomRight {
    /// Join (and receive), but not send.
    Read,
    /// Join and send.
    Write,
}

/// The rooms a connection may use. `None` where it is held means no restriction (no claim and
/// no hook: open, for development).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoomGrant {
    /// Patterns granting join and send.
    pub write: Vec<Box<str>>,
    /// Patterns granting join only.
    pub read: Vec<Box<str>>,
}

/// The two claims as they appear in a token or a hook answer.
#[derive(Debug, Default, Deserialize)]
pub struct GrantClaims {
    /// `rooms`: join and send.
    #[serde(default)]
    pub rooms: Option<Vec<String>>,
    /// `rooms_read`: join only.
    #[serde(default)]
    pub rooms_read: Option<Vec<String>>,
}

impl GrantClaims {
    /// The grant these claims make, or `None` when neither claim is present.
    pub fn grant(self) -> Option<RoomGrant> {
        if self.rooms.is_none() && self.rooms_read.is_none() {
            return None;
        }
        let keep = |v: Option<Vec<String>>| -> Vec<Box<str>> {
            v.unwrap_or_default()
                .into_iter()
                .filter(|p| !p.is_empty())
                .take(MAX_PATTERNS)
                .map(String::into_boxed_str)
                .collect()
        };
        Some(RoomGrant {
            write: keep(self.rooms),
            read: keep(self.rooms_read),
        })
    }
}

/// Whether `pattern` covers `room`.
pub fn matches(pattern: &str, room: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => room.starts_with(prefix),
        None => pattern == room,
    }
}

impl RoomGrant {
    /// The right this grant gives in `room`, if any.
    pub fn right(&self, room: &str) -> Option<RoomRight> {
        if self.write.iter().any(|p| matches(p, room)) {
            return Some(RoomRight::Write);
        }
        self.read
            .iter()
            .any(|p| matches(p, room))
            .then_some(RoomRight::Read)
    }

    /// Whether the holder may join `room`.
    pub fn may_join(&self, room: &str) -> bool {
        self.right(room).is_some()
    }

    /// Whether the holder may send to `room`.
    pub fn may_send(&self, room: &str) -> bool {
        self.right(room) == Some(RoomRight::Write)
    }
}

/// What an open connection's session allows, and until when. Held boxed by the connection,
/// and only when there is something to hold (a dev-mode connection without claims holds none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    /// When the session ends (Unix ms): the token's `exp` plus the leeway; `None`: never.
    pub expires_at_ms: Option<u64>,
    /// The rooms allowed; `None`: any room.
    pub grant: Option<RoomGrant>,
    /// `grant` came from the connect hook: a `refresh` token's claims do not replace it.
    pub hook_grant: bool,
}

impl Access {
    /// The session of a token with `exp` (Unix s) and `grant`, with `leeway_secs` of clock
    /// skew allowed; `None` when it neither expires nor restricts rooms.
    pub fn new(exp: Option<u64>, leeway_secs: u64, grant: Option<RoomGrant>) -> Option<Box<Self>> {
        let expires_at_ms = exp.map(|e| e.saturating_add(leeway_secs).saturating_mul(1000));
        (expires_at_ms.is_some() || grant.is_some()).then(|| {
            Box::new(Access {
                expires_at_ms,
                grant,
                hook_grant: false,
            })
        })
    }

    /// Whether the session is over at `now_ms`.
    pub fn expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_some_and(|at| now_ms >= at)
    }
}

/// Whether a connection with `access` may join `room` (no access held: any room).
pub fn may_join(access: Option<&Access>, room: &str) -> bool {
    access
        .and_then(|a| a.grant.as_ref())
        .is_none_or(|g| g.may_join(room))
}

/// Whether a connection with `access` may read `room`'s history (a `history` page, a resume):
/// the right to join it, as a member receives what the history holds.
pub fn may_read(access: Option<&Access>, room: &str) -> bool {
    may_join(access, room)
}

/// Whether a connection with `access` may send to `room` (no access held: any room).
pub fn may_send(access: Option<&Access>, room: &str) -> bool {
    access
        .and_then(|a| a.grant.as_ref())
        .is_none_or(|g| g.may_send(room))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(write: &[&str], read: &[&str]) -> RoomGrant {
        GrantClaims {
            rooms: Some(write.iter().map(|s| s.to_string()).collect()),
            rooms_read: Some(read.iter().map(|s| s.to_string()).collect()),
        }
        .grant()
        .unwrap()
    }

    #[test]
    fn exact_prefix_and_star_patterns() {
        assert!(matches("lobby", "lobby"));
        assert!(!matches("lobby", "lobby2"));
        assert!(matches("team:42:*", "team:42:general"));
        assert!(matches("team:42:*", "team:42:"));
        assert!(!matches("team:42:*", "team:43:general"));
        assert!(!matches("team:42:*", "team:42"));
        assert!(matches("*", "anything"));
    }

    #[test]
    fn write_beats_read_and_read_cannot_send() {
        let g = grant(&["team:42:*"], &["news", "team:*"]);
        assert!(g.may_send("team:42:dev"));
        assert!(g.may_join("team:7:dev"));
        assert!(!g.may_send("team:7:dev"));
        assert!(g.may_join("news") && !g.may_send("news"));
        assert!(!g.may_join("random"));
    }

    #[test]
    fn sessions_expire_at_exp_plus_leeway_and_hold_nothing_when_open() {
        assert_eq!(Access::new(None, 30, None), None);
        let a = Access::new(Some(100), 2, None).unwrap();
        assert!(!a.expired(101_999));
        assert!(a.expired(102_000));
        assert!(may_join(Some(&a), "any") && may_send(None, "any"));
        let g = Access::new(None, 0, Some(grant(&[], &["news"]))).unwrap();
        assert!(may_join(Some(&g), "news") && !may_send(Some(&g), "news"));
        assert!(!g.expired(u64::MAX));
    }

    #[test]
    fn no_claim_is_no_grant_and_an_empty_claim_grants_nothing() {
        assert_eq!(GrantClaims::default().grant(), None);
        let empty = GrantClaims {
            rooms: Some(vec![]),
            rooms_read: None,
        }
        .grant()
        .unwrap();
        assert!(!empty.may_join("lobby"));
    }
}
