//! Rooms and presence: the bounds, room-name rules, the frames, embedded mode's registry, and a
//! connection's position in each room's history (the per-room resume).
//!
//! A room is a set of users; every connection of a member receives the room's messages. With
//! the Redis backplane, membership and presence live in Redis and the room work runs on the
//! rooms worker (`backplane::rooms_worker`); without one, [`MemoryRooms`] holds them in memory
//! for the whole process. The wire side (events, error codes, close code 4009) is in
//! docs/PROTOCOL.md §9; the routing and its cost in docs/ARCHITECTURE.md.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tungstenite::Utf8Bytes;

// The settings live in `config::rooms` and the room id in `types`; they keep their paths here.
pub use crate::config::rooms::{
    RoomHistoryConfig, RoomsConfig, DEFAULT_MAX_DEVICES, DEFAULT_MAX_ROOMS_PER_USER,
    DEFAULT_MAX_ROOM_MEMBERS, DEFAULT_MAX_ROOM_NAME_BYTES, DEFAULT_MAX_ROOM_QUEUE,
    DEFAULT_PRESENCE_TTL, DEFAULT_ROOM_HISTORY_MAX_AGE, DEFAULT_ROOM_HISTORY_MAX_BYTES,
    DEFAULT_ROOM_HISTORY_MAX_LEN,
};
pub use crate::types::RoomId;

use crate::history::Recovering;
use crate::protocol::ErrorCode;
use crate::types::{Offset, UserId};

/// Why a room request was refused (besides bad arguments).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoomError {
    /// The caller is not in the room.
    NotMember,
    /// The caller is in too many rooms.
    RoomLimit,
    /// The room has too many members.
    RoomFull,
}

impl RoomError {
    /// The wire error code.
    pub fn code(self) -> ErrorCode {
        match self {
            RoomError::NotMember => ErrorCode::NotMember,
            RoomError::RoomLimit => ErrorCode::RoomLimit,
            RoomError::RoomFull => ErrorCode::RoomFull,
        }
    }

    /// The human message sent with the code.
    pub fn message(self, room: &str, config: &RoomsConfig) -> String {
        match self {
            RoomError::NotMember => format!("not a member of room {room:?}"),
            RoomError::RoomLimit => format!(
                "already in {} rooms (the most allowed)",
                config.max_rooms_per_user
            ),
            RoomError::RoomFull => format!(
                "room {room:?} has {} members (the most allowed)",
                config.max_room_members
            ),
        }
    }

    /// Parses the code the Redis scripts return.
    pub fn from_code(code: &str) -> Option<Self> {
        match code {
            "not_member" => Some(RoomError::NotMember),
            "room_limit" => Some(RoomError::RoomLimit),
            "room_full" => Some(RoomError::RoomFull),
            _ => None,
        }
    }
}

/// The events the server handles itself when rooms are on.
pub fn is_room_event(event: &str) -> bool {
    matches!(
        event,
        "joinRoom" | "leaveRoom" | "sendRoomMessage" | "presence"
    )
}

/// A room name is 1 to `max` bytes of ASCII letters, digits and `_ - . :`. The name is part
/// of Redis keys and channel names, and shows up in logs: nothing there needs escaping.
pub fn valid_room(name: &str, max: usize) -> bool {
    !name.is_empty()
        && name.len() <= max
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

/// The `bad_room` message for a name that is not valid.
pub fn bad_room_message(max: usize) -> String {
    format!("room must be 1 to {max} bytes of A-Z a-z 0-9 _ - . :")
}

/// `args` of `joinRoom`, `leaveRoom` and `presence`.
#[derive(Deserialize)]
pub struct RoomArgs<'a> {
    /// The room.
    #[serde(borrow)]
    pub room: std::borrow::Cow<'a, str>,
    /// `presence` only: list the members after this user id (the `next` of the previous page).
    #[serde(borrow, default)]
    pub after: Option<std::borrow::Cow<'a, str>>,
    /// `joinRoom` only: resume the room's history after this offset once joined.
    #[serde(borrow, default)]
    pub since: Option<std::borrow::Cow<'a, str>>,
}

/// One page of a `presence` answer: `{"room": R, "online": [...]}` with the online members in
/// byte order, those after `after` only, as many as fit in `max_bytes` (always at least one);
/// when some are left, `"next"` names the last one listed, for the next request's `after`. A
/// room of 10,000 members with long ids thus never makes an answer its requester cannot take.
pub fn presence_page<'a>(
    room: &str,
    online: impl IntoIterator<Item = &'a str>,
    after: Option<&str>,
    max_bytes: usize,
) -> serde_json::Value {
    let mut online: Vec<&str> = online
        .into_iter()
        .filter(|u| after.is_none_or(|a| *u > a))
        .collect();
    online.sort_unstable();
    online.dedup();
    // `{"event":"ack","ack":N,"args":{"room":R,"online":[],"next":U}}` around the ids: each id
    // listed costs its JSON length and a comma, and the last one may be repeated in `next`.
    let json_len = |s: &str| serde_json::to_string(s).map_or(6 * s.len() + 2, |j| j.len());
    let mut used = 64 + json_len(room);
    let fitting = online
        .iter()
        .take_while(|u| {
            let len = json_len(u);
            used += len + 1;
            used + len + 10 <= max_bytes
        })
        .count()
        .max(1)
        .min(online.len());
    let mut page = serde_json::json!({ "room": room, "online": &online[..fitting] });
    if fitting < online.len() {
        page["next"] = serde_json::Value::from(online[fitting - 1]);
    }
    page
}

/// Rooms a resume names, each with the offset in that room's history to resume after
/// (`None`: not an offset, answered `complete: false`). At most `max` rooms; names that are not
/// valid room names are skipped.
pub type RoomResume = Vec<(RoomId, Option<Offset>)>;

/// The `rooms` query parameter of a resume: `R1@O1,R2@O2` (neither room names nor offsets can
/// hold `@` or `,`).
pub fn parse_rooms_query(value: &str, max_name: usize, max: usize) -> RoomResume {
    value
        .split(',')
        .filter_map(|item| item.split_once('@'))
        .filter(|(room, _)| valid_room(room, max_name))
        .take(max)
        .map(|(room, offset)| (RoomId::from(room), offset.parse().ok()))
        .collect()
}

/// The `rooms` object of a `resume` event or a Socket.IO CONNECT: `{"R1": "O1", ...}`.
pub fn rooms_from_map<'a>(
    map: impl IntoIterator<Item = (&'a str, &'a str)>,
    max_name: usize,
    max: usize,
) -> RoomResume {
    map.into_iter()
        .filter(|(room, _)| valid_room(room, max_name))
        .take(max)
        .map(|(room, offset)| (RoomId::from(room), offset.parse().ok()))
        .collect()
}

/// `{"event":"recovered","args":{"room":R,"complete":C,"offset":"A-B"|null}}`: the end of a
/// room's replay.
pub fn encode_room_recovered(room: &str, complete: bool, last: Option<Offset>) -> Utf8Bytes {
    let offset = last.map_or_else(|| "null".to_string(), |o| format!("\"{o}\""));
    Utf8Bytes::from(format!(
        "{{\"event\":\"recovered\",\"args\":{{\"room\":\"{room}\",\"complete\":{complete},\"offset\":{offset}}}}}"
    ))
}

/// Rooms a connection tracks beyond which the oldest cursor is forgotten (its room then
/// resumes from nothing after an outage): above `--max-rooms-per-user`'s default, and small.
const MAX_CURSORS: usize = 256;

/// A connection's position in each room's history: the newest offset sent per room, and the
/// rooms whose replay it waits for (their live frames held meanwhile). Boxed in the connection
/// and created on its first room frame with an offset.
#[derive(Debug, Default)]
pub struct RoomCursors {
    last: Vec<(RoomId, Offset)>,
    recovering: Vec<(RoomId, Box<Recovering>)>,
}

impl RoomCursors {
    /// The newest offset of `room` sent to the connection.
    pub fn last(&self, room: &str) -> Option<Offset> {
        self.last.iter().find(|(r, _)| &**r == room).map(|e| e.1)
    }

    /// Every room with a cursor, and its offset.
    pub fn all(&self) -> impl Iterator<Item = &(RoomId, Offset)> {
        self.last.iter()
    }

    /// Sets (or, `None`, forgets) the newest offset of `room`.
    pub fn set_last(&mut self, room: &RoomId, offset: Option<Offset>) {
        let at = self.last.iter().position(|(r, _)| r == room);
        match (at, offset) {
            (Some(i), Some(o)) => self.last[i].1 = o,
            (Some(i), None) => {
                self.last.remove(i);
            }
            (None, Some(o)) => {
                if self.last.len() >= MAX_CURSORS {
                    self.last.remove(0);
                }
                self.last.push((room.clone(), o));
            }
            (None, None) => {}
        }
    }

    /// The recovery of `room` in progress, if any.
    pub fn recovering(&mut self, room: &str) -> Option<&mut Recovering> {
        self.recovering
            .iter_mut()
            .find(|(r, _)| &**r == room)
            .map(|(_, rec)| &mut **rec)
    }

    /// Starts recovering `room`; `false` when it already is.
    pub fn begin(&mut self, room: &RoomId, rec: Recovering) -> bool {
        if self.recovering.iter().any(|(r, _)| r == room) {
            return false;
        }
        self.recovering.push((room.clone(), Box::new(rec)));
        true
    }

    /// Ends the recovery of `room`.
    pub fn finish(&mut self, room: &str) -> Option<Box<Recovering>> {
        let at = self.recovering.iter().position(|(r, _)| &**r == room)?;
        Some(self.recovering.swap_remove(at).1)
    }

    /// Rooms whose replay waited past its deadline.
    pub fn overdue(&self, now: std::time::Instant) -> Vec<RoomId> {
        self.recovering
            .iter()
            .filter(|(_, rec)| now >= rec.deadline)
            .map(|(r, _)| r.clone())
            .collect()
    }

    /// Marks every recovery in progress to run again from where it ends (see
    /// [`Recovering::again`]); returns the rooms not recovering, with their cursors.
    pub fn resync(&mut self) -> Vec<(RoomId, Offset)> {
        for (_, rec) in self.recovering.iter_mut() {
            rec.again = true;
        }
        let busy: Vec<&RoomId> = self.recovering.iter().map(|(r, _)| r).collect();
        self.last
            .iter()
            .filter(|(r, _)| !busy.contains(&r))
            .cloned()
            .collect()
    }
}

/// `args` of `sendRoomMessage`.
#[derive(Deserialize)]
pub struct RoomMessageArgs<'a> {
    /// The room.
    #[serde(borrow)]
    pub room: std::borrow::Cow<'a, str>,
    /// The text (may be empty).
    #[serde(borrow)]
    pub text: std::borrow::Cow<'a, str>,
    /// Idempotency key, as `sendMessage`'s: a resend is stored and delivered once.
    #[serde(borrow, default, rename = "clientId")]
    pub client_id: Option<std::borrow::Cow<'a, str>>,
}

/// `newMessage` as a room member receives it.
#[derive(Serialize)]
pub struct RoomMessage<'a> {
    /// Message id (see `handlers::MessageIds`).
    pub id: &'a str,
    /// The sender.
    pub from: &'a str,
    /// The room.
    pub room: &'a str,
    /// The text.
    pub text: &'a str,
    /// Server time, ms since the epoch.
    pub ts: u64,
}

#[derive(Serialize)]
struct PresenceChanged<'a> {
    room: &'a str,
    user: &'a str,
    online: bool,
}

/// `{"event":"presenceChanged","args":{"room":R,"user":U,"online":B}}`.
pub fn encode_presence_changed(room: &str, user: &str, online: bool) -> Utf8Bytes {
    crate::protocol::encode_event("presenceChanged", &PresenceChanged { room, user, online })
        // Strings and a bool always serialize.
        .unwrap_or_else(|_| Utf8Bytes::from_static("{}"))
}

/// A connection over its user's device limit (`--max-devices`): closed with 4009.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverDeviceLimit;

/// A room whose members must hear that a user came online or went offline.
pub type PresenceNotice = (RoomId, Vec<UserId>);

#[derive(Default)]
struct Registry {
    /// Each user's rooms.
    rooms_of: HashMap<UserId, BTreeSet<RoomId>>,
    /// Each room's members, sorted (presence answers list them in order).
    members: HashMap<RoomId, BTreeSet<UserId>>,
    /// Open connections per user in the process.
    devices: HashMap<UserId, u32>,
}

impl Registry {
    fn notices(&self, user: &UserId) -> Vec<PresenceNotice> {
        self.rooms_of.get(user).map_or_else(Vec::new, |rooms| {
            rooms
                .iter()
                .map(|r| {
                    let members = self
                        .members
                        .get(r)
                        .map_or_else(Vec::new, |m| m.iter().cloned().collect());
                    (r.clone(), members)
                })
                .collect()
        })
    }
}

/// Embedded mode's rooms and presence, shared by every core behind one mutex. Membership
/// changes and presence transitions are rare next to messages, and a send holds the lock only
/// to copy the member list.
#[derive(Default)]
pub struct MemoryRooms {
    inner: Mutex<Registry>,
}

impl MemoryRooms {
    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        // Every update below is a few inserts/removes on plain maps: a panic cannot leave them
        // in a state worse than a missed update, so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds `user` to `room` (a no-op when already in it).
    pub fn join(&self, user: &UserId, room: &str, config: &RoomsConfig) -> Result<(), RoomError> {
        let mut reg = self.lock();
        if reg.rooms_of.get(user).is_some_and(|r| r.contains(room)) {
            return Ok(());
        }
        if reg.rooms_of.get(user).map_or(0, BTreeSet::len) >= config.max_rooms_per_user {
            return Err(RoomError::RoomLimit);
        }
        if reg.members.get(room).map_or(0, BTreeSet::len) >= config.max_room_members {
            return Err(RoomError::RoomFull);
        }
        let room: RoomId = room.into();
        reg.rooms_of
            .entry(user.clone())
            .or_default()
            .insert(room.clone());
        reg.members.entry(room).or_default().insert(user.clone());
        Ok(())
    }

    /// Removes `user` from `room`.
    pub fn leave(&self, user: &UserId, room: &str) -> Result<(), RoomError> {
        let mut reg = self.lock();
        let removed = reg
            .rooms_of
            .get_mut(user)
            .is_some_and(|rooms| rooms.remove(room));
        if !removed {
            return Err(RoomError::NotMember);
        }
        if reg.rooms_of.get(user).is_some_and(BTreeSet::is_empty) {
            reg.rooms_of.remove(user);
        }
        if let Some(members) = reg.members.get_mut(room) {
            members.remove(user);
            if members.is_empty() {
                reg.members.remove(room);
            }
        }
        Ok(())
    }

    /// The members of `room`, if `user` is one of them.
    pub fn members_for(&self, user: &UserId, room: &str) -> Result<Vec<UserId>, RoomError> {
        let reg = self.lock();
        match reg.members.get(room) {
            Some(m) if m.contains(user) => Ok(m.iter().cloned().collect()),
            _ => Err(RoomError::NotMember),
        }
    }

    /// Whether `user` is in `room`.
    pub fn is_member(&self, user: &str, room: &str) -> bool {
        self.lock()
            .rooms_of
            .get(user)
            .is_some_and(|r| r.contains(room))
    }

    /// The members of `room` with at least one open connection, if `user` is a member.
    pub fn online(&self, user: &UserId, room: &str) -> Result<Vec<UserId>, RoomError> {
        let reg = self.lock();
        match reg.members.get(room) {
            Some(m) if m.contains(user) => Ok(m
                .iter()
                .filter(|u| reg.devices.get(*u).is_some_and(|&n| n > 0))
                .cloned()
                .collect()),
            _ => Err(RoomError::NotMember),
        }
    }

    /// The members of `room`, sorted (the server API publishes to them).
    pub fn members(&self, room: &str) -> Vec<UserId> {
        let reg = self.lock();
        reg.members
            .get(room)
            .map_or_else(Vec::new, |m| m.iter().cloned().collect())
    }

    /// The members of `room` with at least one open connection, sorted, asked by the server.
    pub fn online_in(&self, room: &str) -> Vec<UserId> {
        let reg = self.lock();
        reg.members.get(room).map_or_else(Vec::new, |m| {
            m.iter()
                .filter(|u| reg.devices.contains_key(*u))
                .cloned()
                .collect()
        })
    }

    /// The open connections of `user`.
    pub fn devices(&self, user: &str) -> u32 {
        self.lock().devices.get(user).copied().unwrap_or(0)
    }

    /// Every user with an open connection, sorted.
    pub fn online_users(&self) -> Vec<UserId> {
        let mut users: Vec<UserId> = self.lock().devices.keys().cloned().collect();
        users.sort_unstable();
        users
    }

    /// Counts a new connection of `user`. `Err` when it would exceed `max_devices` (0 = no
    /// limit): it is then not counted. `Ok` lists who must hear the user came online (empty
    /// unless this is the user's first connection).
    pub fn connect(
        &self,
        user: &UserId,
        max_devices: u32,
    ) -> Result<Vec<PresenceNotice>, OverDeviceLimit> {
        let mut reg = self.lock();
        let n = reg.devices.get(user).copied().unwrap_or(0);
        if max_devices > 0 && n >= max_devices {
            return Err(OverDeviceLimit);
        }
        reg.devices.insert(user.clone(), n + 1);
        Ok(if n == 0 {
            reg.notices(user)
        } else {
            Vec::new()
        })
    }

    /// Who must hear that `user` came online or went offline: each of the user's rooms with
    /// its members (for a change announced later than it happened).
    pub fn presence_notices(&self, user: &UserId) -> Vec<PresenceNotice> {
        self.lock().notices(user)
    }

    /// Uncounts a connection of `user`; lists who must hear the user went offline.
    pub fn disconnect(&self, user: &UserId) -> Vec<PresenceNotice> {
        let mut reg = self.lock();
        match reg.devices.get_mut(user) {
            Some(n) if *n > 1 => {
                *n -= 1;
                Vec::new()
            }
            Some(_) => {
                reg.devices.remove(user);
                reg.notices(user)
            }
            None => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn presence_pages_are_bounded_ordered_and_resumable() {
        let ids: Vec<String> = (0..1000)
            .map(|n| format!("{n:04}{}", "u".repeat(250)))
            .collect();
        let all: Vec<&str> = ids.iter().rev().map(String::as_str).collect();
        let budget = 32 * 1024;
        let mut after: Option<String> = None;
        let mut seen = Vec::new();
        loop {
            let page = super::presence_page("r", all.iter().copied(), after.as_deref(), budget);
            let answer = format!(r#"{{"event":"ack","ack":123456,"args":{page}}}"#);
            assert!(answer.len() <= budget, "{} > {budget}", answer.len());
            let online = page["online"].as_array().unwrap();
            assert!(!online.is_empty());
            seen.extend(online.iter().map(|u| u.as_str().unwrap().to_string()));
            match page.get("next") {
                Some(next) => after = Some(next.as_str().unwrap().to_string()),
                None => break,
            }
        }
        assert_eq!(seen, ids, "every member once, in order");
        let small = super::presence_page("r", ["b", "a"], None, 4096);
        assert_eq!(
            small,
            serde_json::json!({"room": "r", "online": ["a", "b"]})
        );
    }

    use super::*;

    fn cfg(rooms: usize, members: usize) -> RoomsConfig {
        RoomsConfig {
            max_rooms_per_user: rooms,
            max_room_members: members,
            ..RoomsConfig::default()
        }
    }

    #[test]
    fn room_names() {
        assert!(valid_room("general", 64));
        assert!(valid_room("team-1.dev:ops_x", 64));
        for bad in ["", "a b", "é", "a/b", "a\nb", "{x}", "a*"] {
            assert!(!valid_room(bad, 64), "{bad:?}");
        }
        assert!(valid_room(&"a".repeat(64), 64));
        assert!(!valid_room(&"a".repeat(65), 64));
    }

    #[test]
    fn membership_and_its_bounds() {
        let r = MemoryRooms::default();
        let (a, b, c): (UserId, UserId, UserId) = ("a".into(), "b".into(), "c".into());
        let config = cfg(2, 2);
        r.join(&a, "x", &config).unwrap();
        r.join(&a, "x", &config).unwrap();
        r.join(&b, "x", &config).unwrap();
        assert_eq!(r.join(&c, "x", &config), Err(RoomError::RoomFull));
        r.join(&a, "y", &config).unwrap();
        assert_eq!(r.join(&a, "z", &config), Err(RoomError::RoomLimit));
        assert_eq!(r.members_for(&b, "x").unwrap(), vec![a.clone(), b.clone()]);
        assert_eq!(r.members_for(&c, "x"), Err(RoomError::NotMember));
        r.leave(&b, "x").unwrap();
        assert_eq!(r.leave(&b, "x"), Err(RoomError::NotMember));
        assert_eq!(r.members_for(&a, "x").unwrap(), vec![a.clone()]);
        r.join(&c, "x", &config).unwrap();
    }

    #[test]
    fn presence_counts_devices_and_reports_transitions() {
        let r = MemoryRooms::default();
        let (a, b): (UserId, UserId) = ("a".into(), "b".into());
        r.join(&a, "x", &RoomsConfig::default()).unwrap();
        r.join(&b, "x", &RoomsConfig::default()).unwrap();
        let first = r.connect(&a, 2).unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(&*first[0].0, "x");
        assert_eq!(first[0].1, vec![a.clone(), b.clone()]);
        assert!(r.connect(&a, 2).unwrap().is_empty(), "second device");
        assert!(r.connect(&a, 2).is_err(), "third device over the limit");
        assert_eq!(r.online(&b, "x").unwrap(), vec![a.clone()]);
        assert!(r.disconnect(&a).is_empty());
        assert_eq!(r.disconnect(&a).len(), 1, "last device");
        assert!(r.online(&b, "x").unwrap().is_empty());
        assert!(r.disconnect(&a).is_empty(), "unknown user");
    }

    #[test]
    fn room_resume_maps() {
        let got = parse_rooms_query("general@5-1,team:a@x,bad room@1-1,noat,c@2-2", 64, 10);
        let want: RoomResume = vec![
            ("general".into(), Some(Offset(5, 1))),
            ("team:a".into(), None),
            ("c".into(), Some(Offset(2, 2))),
        ];
        assert_eq!(got, want);
        assert_eq!(parse_rooms_query("a@1-1,b@1-1", 64, 1).len(), 1, "bounded");
        let map = rooms_from_map([("r", "1-2"), ("{x}", "1-2")], 64, 10);
        assert_eq!(map, vec![("r".into(), Some(Offset(1, 2)))]);
        let f = encode_room_recovered("r", true, Some(Offset(1, 2)));
        let v: serde_json::Value = serde_json::from_str(f.as_str()).unwrap();
        assert_eq!(v["args"]["room"], "r");
        assert_eq!(v["args"]["offset"], "1-2");
        assert!(encode_room_recovered("r", false, None).contains(r#""offset":null"#));
    }

    #[test]
    fn cursors_track_rooms_and_their_recoveries() {
        let mut c = RoomCursors::default();
        let r: RoomId = "r".into();
        c.set_last(&r, Some(Offset(1, 1)));
        c.set_last(&r, Some(Offset(1, 2)));
        assert_eq!(c.last("r"), Some(Offset(1, 2)));
        assert_eq!(c.last("s"), None);
        let rec = |deadline| Recovering {
            since: None,
            buffered: Vec::new(),
            overflow: false,
            deadline,
            again: false,
        };
        let now = std::time::Instant::now();
        assert!(c.begin(&r, rec(now)));
        assert!(!c.begin(&r, rec(now)), "one recovery per room");
        assert!(c.resync().is_empty(), "recovering rooms run again instead");
        assert!(c.recovering("r").unwrap().again);
        assert_eq!(c.overdue(now), vec![r.clone()]);
        assert!(c.finish("r").is_some() && c.finish("r").is_none());
        assert_eq!(c.resync(), vec![(r.clone(), Offset(1, 2))]);
        c.set_last(&r, None);
        assert_eq!(c.all().count(), 0);
    }

    #[test]
    fn presence_changed_frame() {
        let f = encode_presence_changed("x", "u\"1", false);
        let v: serde_json::Value = serde_json::from_str(f.as_str()).unwrap();
        assert_eq!(v["event"], "presenceChanged");
        assert_eq!(v["args"]["user"], "u\"1");
        assert_eq!(v["args"]["online"], false);
    }
}
