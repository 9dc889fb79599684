//! What a publication received from Redis is: a room event, a membership control, a user's
//! frame with or without its offset, an own payload or an invalid one. Read without any I/O.

use std::borrow::Cow;

use tungstenite::Utf8Bytes;

use crate::backplane::wire::{self, Skip};
use crate::backplane::Routing;
use crate::history::Offset;

/// What the subscriber needs to know to read a publication.
pub(super) struct Reader<'c> {
    pub prefix: &'c str,
    pub node_id: u64,
    pub routing: Routing,
    pub rooms: bool,
    pub history: bool,
}

/// A publication received from Redis, read.
#[derive(Debug)]
pub(super) enum Incoming<'a> {
    /// A room event, for the room's local members.
    Room {
        room: &'a str,
        offset: Option<Offset>,
        frame: Utf8Bytes,
    },
    /// A membership change of `user`, from its channel.
    Control {
        user: &'a str,
        joined: bool,
        room: &'a str,
    },
    /// Close every connection of `user` (`POST /api/disconnect` on some instance).
    Disconnect { user: &'a str },
    /// Close this instance's connection `key` on `core` (if still `serial`) with 4009: a newer
    /// device of its user took its place under `--max-devices`. Another instance's device:
    /// [`Incoming::Own`], nothing to do here.
    Displace {
        core: usize,
        key: usize,
        serial: u64,
    },
    /// A user's frame with its offset (history on).
    Delivery {
        user: &'a str,
        offset: Offset,
        frame: Utf8Bytes,
    },
    /// A user's frame without offset.
    Frame {
        user: Cow<'a, str>,
        frame: Utf8Bytes,
    },
    /// This instance's own publication, delivered locally already.
    Own,
    /// Not a valid payload: counted, skipped and, when `log`, logged at debug level.
    Invalid { log: bool },
}

impl Reader<'_> {
    /// Reads `payload` received on `channel`; `is_own` recognises own seed payloads.
    pub fn read<'a>(
        &self,
        channel: &'a [u8],
        payload: &'a [u8],
        is_own: impl FnOnce(&[u8]) -> bool,
    ) -> Incoming<'a> {
        let prefix = self.prefix;
        if self.rooms {
            if let Some(room) = wire::room_of_channel(prefix, channel) {
                return match wire::read_room_payload(payload) {
                    Ok((offset, frame)) => Incoming::Room {
                        room,
                        offset,
                        frame,
                    },
                    Err(_) => Incoming::Invalid { log: false },
                };
            }
            if let Some(user) = wire::user_of_channel(prefix, channel) {
                if wire::is_disconnect(payload) {
                    return Incoming::Disconnect { user };
                }
                if let Some(device) = wire::read_displace(payload) {
                    if device.node != self.node_id {
                        return Incoming::Own;
                    }
                    return Incoming::Displace {
                        core: device.core,
                        key: device.key,
                        serial: device.serial,
                    };
                }
                if let Some((joined, room)) = wire::read_control(payload) {
                    return Incoming::Control { user, joined, room };
                }
            }
        }
        if self.history {
            let user = wire::user_of_channel(prefix, channel);
            return match user.map(|u| (u, wire::read_history_payload(payload))) {
                Some((user, Ok((offset, frame)))) => Incoming::Delivery {
                    user,
                    offset,
                    frame,
                },
                // An instance without history (an older version during a rolling upgrade, or
                // `--history off`) publishes frames without offsets: still delivered, as they
                // are, so a mixed fleet keeps working in this direction.
                Some((user, Err(_))) => match wire::read_user_payload(payload, self.node_id) {
                    Ok(frame) => Incoming::Frame {
                        user: Cow::Borrowed(user),
                        frame,
                    },
                    Err(_) => Incoming::Invalid { log: false },
                },
                None => Incoming::Invalid { log: false },
            };
        }
        let decoded = match self.routing {
            Routing::PerUser => match wire::user_of_channel(prefix, channel) {
                Some(user) => {
                    wire::read_user_payload(payload, self.node_id).map(|f| (Cow::Borrowed(user), f))
                }
                None => Err(Skip::Invalid),
            },
            Routing::Seed => {
                if is_own(payload) {
                    Err(Skip::Own)
                } else {
                    wire::read_seed_payload(payload).map(|(u, f)| (Cow::Owned(u), f))
                }
            }
        };
        match decoded {
            Ok((user, frame)) => Incoming::Frame { user, frame },
            Err(Skip::Own) => Incoming::Own,
            Err(Skip::Invalid) => Incoming::Invalid { log: true },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAME: &str = r#"{"event":"e","args":[1]}"#;

    fn reader(routing: Routing, rooms: bool, history: bool) -> Reader<'static> {
        Reader {
            prefix: "sb",
            node_id: 0xabc,
            routing,
            rooms,
            history,
        }
    }

    fn user_payload(node: u64) -> Vec<u8> {
        let mut out = Vec::new();
        wire::write_user_payload(&mut out, node, FRAME);
        out
    }

    #[test]
    fn per_user_payloads_of_other_instances_are_delivered_own_ones_skipped() {
        let r = reader(Routing::PerUser, false, false);
        let other = user_payload(0x1);
        match r.read(b"sb:u:alice", &other, |_| unreachable!()) {
            Incoming::Frame { user, frame } => assert_eq!((&*user, &*frame), ("alice", FRAME)),
            other => panic!("expected a frame, got {other:?}"),
        }
        let own = user_payload(0xabc);
        assert!(matches!(
            r.read(b"sb:u:alice", &own, |_| false),
            Incoming::Own
        ));
        assert!(matches!(
            r.read(b"other:u:alice", &other, |_| false),
            Incoming::Invalid { log: true }
        ));
        assert!(matches!(
            r.read(b"sb:u:alice", b"junk", |_| false),
            Incoming::Invalid { log: true }
        ));
    }

    #[test]
    fn seed_payloads_name_their_user_and_own_ones_are_skipped() {
        let r = reader(Routing::Seed, false, false);
        let payload = br#"{"event":"e","id":"bob","args":[1]}"#;
        match r.read(wire::SEED_CHANNEL.as_bytes(), payload, |_| false) {
            Incoming::Frame { user, .. } => assert_eq!(&*user, "bob"),
            other => panic!("expected a frame, got {other:?}"),
        }
        let own = r.read(wire::SEED_CHANNEL.as_bytes(), payload, |p| p == payload);
        assert!(matches!(own, Incoming::Own));
    }

    #[test]
    fn history_payloads_carry_offsets_and_old_ones_still_deliver() {
        let r = reader(Routing::PerUser, false, true);
        let payload = br#"0000000000000001 5-1 {"event":"e","offset":"5-1"}"#;
        match r.read(b"sb:u:alice", payload, |_| false) {
            Incoming::Delivery { user, offset, .. } => {
                assert_eq!((user, offset), ("alice", Offset(5, 1)))
            }
            other => panic!("expected a delivery, got {other:?}"),
        }
        // From an instance without history: no offset.
        let plain = user_payload(0x1);
        assert!(matches!(
            r.read(b"sb:u:alice", &plain, |_| false),
            Incoming::Frame { .. }
        ));
        // Own payloads without offsets are invalid with history on.
        let own = user_payload(0xabc);
        assert!(matches!(
            r.read(b"sb:u:alice", &own, |_| false),
            Incoming::Invalid { log: false }
        ));
    }

    #[test]
    fn rooms_read_room_events_and_membership_controls() {
        let r = reader(Routing::PerUser, true, true);
        let event = br#"0000000000000001 - {"event":"p"}"#;
        match r.read(b"{sb:r:team}", event, |_| false) {
            Incoming::Room { room, offset, .. } => assert_eq!((room, offset), ("team", None)),
            other => panic!("expected a room event, got {other:?}"),
        }
        assert!(matches!(
            r.read(b"{sb:r:team}", b"junk", |_| false),
            Incoming::Invalid { log: false }
        ));
        let control = b"0000000000000001 ! +team";
        match r.read(b"sb:u:alice", control, |_| false) {
            Incoming::Control { user, joined, room } => {
                assert_eq!((user, joined, room), ("alice", true, "team"))
            }
            other => panic!("expected a control, got {other:?}"),
        }
        // Rooms off: a room channel is not a user channel.
        let r = reader(Routing::PerUser, false, true);
        assert!(matches!(
            r.read(b"{sb:r:team}", event, |_| false),
            Incoming::Invalid { log: false }
        ));
    }

    #[test]
    fn a_displaced_device_is_closed_only_by_the_instance_holding_it() {
        let r = reader(Routing::PerUser, true, true);
        let here = b"0000000000000001 ! d0000000000000abc/1/42/7";
        match r.read(b"sb:u:alice", here, |_| false) {
            Incoming::Displace { core, key, serial } => assert_eq!((core, key, serial), (1, 42, 7)),
            other => panic!("expected a displace, got {other:?}"),
        }
        let elsewhere = b"0000000000000abc ! d0000000000000def/1/42/7";
        assert!(matches!(
            r.read(b"sb:u:alice", elsewhere, |_| false),
            Incoming::Own
        ));
    }
}
