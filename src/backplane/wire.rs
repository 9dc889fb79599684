//! What travels on the Redis channels: channel names and payloads for both routing modes.
//!
//! - `per-user`: channel `{prefix}:u:{user}`, payload `{node id, 16 hex digits} {frame}`: the
//!   frame is the exact text every device receives, so no instance re-encodes it. The node id lets
//!   an instance skip its own publications (it already delivered them locally).
//! - `seed`: channel `message:outgoing_socket_message`, payload
//!   `{"event": "<name>", "id": "<target user id>", "args": <any>}`: the original Node.js design's
//!   format, byte for byte, so a fleet can migrate one instance at a time.

use serde::Deserialize;
use serde_json::value::RawValue;
use tungstenite::Utf8Bytes;

use crate::bus::Dispatch;

/// The seed design's channel: node-redis-pubsub scope `message` + channel `outgoing_socket_message`.
pub const SEED_CHANNEL: &str = "message:outgoing_socket_message";

/// `{prefix}:u:{user}`.
pub fn user_channel(prefix: &str, user: &str) -> String {
    let mut s = String::with_capacity(prefix.len() + 3 + user.len());
    s.push_str(prefix);
    s.push_str(":u:");
    s.push_str(user);
    s
}

/// The user a per-user channel is for.
pub fn user_of_channel<'a>(prefix: &str, channel: &'a [u8]) -> Option<&'a str> {
    let rest = channel
        .strip_prefix(prefix.as_bytes())?
        .strip_prefix(b":u:")?;
    std::str::from_utf8(rest).ok().filter(|u| !u.is_empty())
}

/// `{PREFIX:r:ROOM}`, braces included: the room's channel, subscribed by every instance hosting
/// a member. The braces make the whole name a Redis Cluster hash tag, so the room's history
/// keys ([`room_stream_key`]) share its slot.
pub fn room_channel(prefix: &str, room: &str) -> String {
    format!("{{{prefix}:r:{room}}}")
}

/// `{PREFIX:r:ROOM}:h`: the room's history stream, stored once per room.
pub fn room_stream_key(prefix: &str, room: &str) -> String {
    format!("{{{prefix}:r:{room}}}:h")
}

/// `{PREFIX:r:ROOM}:m`: the room's members (a set of user ids), in the room's slot so that a
/// send checks membership in the same script that stores and publishes.
pub fn room_members_key(prefix: &str, room: &str) -> String {
    format!("{{{prefix}:r:{room}}}:m")
}

/// `{PREFIX:r:ROOM}:t`: the room stream's byte count and low-water mark (`low`).
pub fn room_trim_key(prefix: &str, room: &str) -> String {
    format!("{{{prefix}:r:{room}}}:t")
}

/// The room a room channel is for.
pub fn room_of_channel<'a>(prefix: &str, channel: &'a [u8]) -> Option<&'a str> {
    let rest = channel
        .strip_prefix(b"{")?
        .strip_prefix(prefix.as_bytes())?
        .strip_prefix(b":r:")?
        .strip_suffix(b"}")?;
    std::str::from_utf8(rest).ok().filter(|r| !r.is_empty())
}

/// Checks a room payload, `<node> <offset> <frame with offset>` for a message kept in the
/// room's history or `<node> - <frame>` for an event kept nowhere (`presenceChanged`, or
/// any room event with history off), and returns the offset (if any) and the frame. The node
/// is not used: an instance delivers its own room publications too (nothing is delivered
/// locally first for rooms).
pub fn read_room_payload(
    payload: &[u8],
) -> Result<(Option<crate::history::Offset>, Utf8Bytes), Skip> {
    if payload.get(16..19) == Some(b" - ") {
        let frame = &payload[19..];
        if !is_event_frame(frame) {
            return Err(Skip::Invalid);
        }
        let text = std::str::from_utf8(frame).map_err(|_| Skip::Invalid)?;
        return Ok((None, Utf8Bytes::from(text.to_string())));
    }
    read_history_payload(payload).map(|(offset, frame)| (Some(offset), frame))
}

/// A membership change published on a user's channel, `<node> ! +<room>` (joined) or
/// `<node> ! -<room>` (left): every instance hosting the user updates its room routes.
pub fn read_control(payload: &[u8]) -> Option<(bool, &str)> {
    let rest = payload.get(16..)?.strip_prefix(b" ! ")?;
    let (joined, room) = match rest.split_first()? {
        (b'+', room) => (true, room),
        (b'-', room) => (false, room),
        _ => return None,
    };
    std::str::from_utf8(room)
        .ok()
        .filter(|r| !r.is_empty())
        .map(|r| (joined, r))
}

/// The payload on a user's channel that closes every connection of the user on every
/// instance (`POST /api/disconnect`): `<node> ! x`.
pub fn disconnect_payload(node: u64) -> String {
    format!("{node:016x} ! x")
}

/// Whether `payload` is a [`disconnect_payload`].
pub fn is_disconnect(payload: &[u8]) -> bool {
    payload.len() == 20 && payload[16..] == *b" ! x"
}

/// One connection, cluster-wide: `<node>/<core>/<key>/<serial>` (node in 16 hex digits). The
/// rooms worker keeps these in a user's device set for `--max-devices` (newest wins).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceId {
    /// The instance holding the connection.
    pub node: u64,
    /// Its core.
    pub core: usize,
    /// Its slab key on that core.
    pub key: usize,
    /// Its serial: the slab key alone may have been reused since.
    pub serial: u64,
}

impl std::fmt::Display for DeviceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let DeviceId {
            node,
            core,
            key,
            serial,
        } = self;
        write!(f, "{node:016x}/{core}/{key}/{serial}")
    }
}

/// The payload on a user's channel that closes one of the user's connections with 4009, because
/// a newer one took its place under `--max-devices`: `<node> ! d<device id>`. Published by the
/// `CONNECT` script, read by the instance holding the device.
pub fn read_displace(payload: &[u8]) -> Option<DeviceId> {
    let rest = payload.get(16..)?.strip_prefix(b" ! d")?;
    let mut parts = std::str::from_utf8(rest).ok()?.split('/');
    let node = parts.next().filter(|n| n.len() == 16)?;
    let device = DeviceId {
        node: u64::from_str_radix(node, 16).ok()?,
        core: parts.next()?.parse().ok()?,
        key: parts.next()?.parse().ok()?,
        serial: parts.next()?.parse().ok()?,
    };
    parts.next().is_none().then_some(device)
}

/// Appends the per-user payload for `frame` from `node` to `out`.
pub fn write_user_payload(out: &mut Vec<u8>, node: u64, frame: &str) {
    use std::io::Write;
    let _ = write!(out, "{node:016x} ");
    out.extend_from_slice(frame.as_bytes());
}

/// Why a payload was skipped.
#[derive(Debug, PartialEq, Eq)]
pub enum Skip {
    /// Published by this very instance.
    Own,
    /// Not a payload switchboard (or the seed) would publish.
    Invalid,
}

/// Checks a per-user payload and returns the frame to deliver.
pub fn read_user_payload(payload: &[u8], own_node: u64) -> Result<Utf8Bytes, Skip> {
    if payload.len() < 18 || payload[16] != b' ' {
        return Err(Skip::Invalid);
    }
    let node = std::str::from_utf8(&payload[..16])
        .ok()
        .and_then(|h| u64::from_str_radix(h, 16).ok());
    match node {
        None => return Err(Skip::Invalid),
        Some(n) if n == own_node => return Err(Skip::Own),
        Some(_) => {}
    }
    let frame = &payload[17..];
    if !is_event_frame(frame) {
        return Err(Skip::Invalid);
    }
    let text = std::str::from_utf8(frame).map_err(|_| Skip::Invalid)?;
    Ok(Utf8Bytes::from(text.to_string()))
}

/// Checks a history payload, `<node> <offset> <frame with offset>` (published by
/// [`crate::history::APPEND_SCRIPT`]), and returns the offset and frame. Own publications are
/// delivered too: with history on, local devices get their frames through Redis.
pub fn read_history_payload(payload: &[u8]) -> Result<(crate::history::Offset, Utf8Bytes), Skip> {
    let rest = payload.get(17..).filter(|_| payload[16] == b' ');
    let rest = rest.ok_or(Skip::Invalid)?;
    let space = rest.iter().position(|&b| b == b' ').ok_or(Skip::Invalid)?;
    let offset = std::str::from_utf8(&rest[..space])
        .ok()
        .and_then(|o| o.parse().ok())
        .ok_or(Skip::Invalid)?;
    let frame = &rest[space + 1..];
    if !is_event_frame(frame) {
        return Err(Skip::Invalid);
    }
    let text = std::str::from_utf8(frame).map_err(|_| Skip::Invalid)?;
    Ok((offset, Utf8Bytes::from(text.to_string())))
}

/// A frame is deliverable when it is a JSON object with a string `event`.
fn is_event_frame(frame: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct EventOnly<'a> {
        #[serde(borrow)]
        #[allow(dead_code)]
        event: std::borrow::Cow<'a, str>,
    }
    serde_json::from_slice::<EventOnly<'_>>(frame).is_ok()
}

/// The seed payload for one target user of `dispatch`:
/// `{"event":E,"id":U,"args":A}`, spliced from the already encoded frame `{"event":E,"args":A}`.
pub fn write_seed_payload(out: &mut Vec<u8>, dispatch: &Dispatch, user: &str) {
    let frame = dispatch.frame.as_str();
    let (head, tail) = frame.split_at(dispatch.args_at);
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(b",\"id\":");
    // A user id is a string; serializing a &str cannot fail.
    let _ = serde_json::to_writer(&mut *out, user);
    out.extend_from_slice(tail.as_bytes());
}

#[derive(Deserialize)]
struct SeedPayload<'a> {
    #[serde(borrow)]
    event: std::borrow::Cow<'a, str>,
    id: SeedId<'a>,
    #[serde(borrow, default)]
    args: Option<&'a RawValue>,
}

/// The seed's user ids are strings, but a JavaScript publisher may send a number.
#[derive(Deserialize)]
#[serde(untagged)]
enum SeedId<'a> {
    Str(#[serde(borrow)] std::borrow::Cow<'a, str>),
    Num(serde_json::Number),
}

/// Decodes a seed payload into (target user, frame).
pub fn read_seed_payload(payload: &[u8]) -> Result<(String, Utf8Bytes), Skip> {
    let p: SeedPayload<'_> = serde_json::from_slice(payload).map_err(|_| Skip::Invalid)?;
    let user = match p.id {
        SeedId::Str(s) => s.into_owned(),
        SeedId::Num(n) => n.to_string(),
    };
    if !crate::auth::valid_user_id(&user) {
        return Err(Skip::Invalid);
    }
    let args = p.args.map_or("null", RawValue::get);
    let frame =
        crate::protocol::encode_event(&p.event, &RawArgs(args)).map_err(|_| Skip::Invalid)?;
    Ok((user, frame))
}

/// Serializes already valid JSON text verbatim.
struct RawArgs<'a>(&'a str);

impl serde::Serialize for RawArgs<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match serde_json::from_str::<&RawValue>(self.0) {
            Ok(raw) => raw.serialize(s),
            Err(e) => Err(serde::ser::Error::custom(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::encode_dispatch;

    #[test]
    fn user_channels_round_trip() {
        let ch = user_channel("sb", "alice:1");
        assert_eq!(ch, "sb:u:alice:1");
        assert_eq!(user_of_channel("sb", ch.as_bytes()), Some("alice:1"));
        assert_eq!(user_of_channel("sb", b"other:u:x"), None);
        assert_eq!(user_of_channel("sb", b"sb:u:"), None);
    }

    #[test]
    fn room_channels_payloads_and_controls() {
        let ch = room_channel("sb", "team:1");
        assert_eq!(room_of_channel("sb", ch.as_bytes()), Some("team:1"));
        assert_eq!(ch, "{sb:r:team:1}");
        assert_eq!(room_of_channel("sb", b"sb:u:x"), None);
        assert_eq!(
            room_of_channel("sb", b"sb:r:team"),
            None,
            "the old layout's channel"
        );
        let slot = super::super::cluster::slot;
        assert_eq!(
            slot(ch.as_bytes()),
            slot(room_stream_key("sb", "team:1").as_bytes())
        );
        assert_eq!(
            slot(ch.as_bytes()),
            slot(room_trim_key("sb", "team:1").as_bytes())
        );
        let (offset, frame) =
            read_room_payload(b"0000000000000abc 5-1 {\"event\":\"e\",\"offset\":\"5-1\"}")
                .unwrap();
        assert_eq!(offset, Some(crate::history::Offset(5, 1)));
        assert!(frame.as_str().starts_with("{\"event\""));
        let (offset, frame) = read_room_payload(b"0000000000000abc - {\"event\":\"p\"}").unwrap();
        assert_eq!(offset, None);
        assert_eq!(frame.as_str(), "{\"event\":\"p\"}");
        assert_eq!(
            read_room_payload(b"0000000000000abc - [1]"),
            Err(Skip::Invalid)
        );
        assert_eq!(read_room_payload(b"x"), Err(Skip::Invalid));
        assert_eq!(
            read_control(b"0000000000000abc ! +general"),
            Some((true, "general"))
        );
        assert_eq!(
            read_control(b"0000000000000abc ! -general"),
            Some((false, "general"))
        );
        assert_eq!(read_control(b"0000000000000abc ! *general"), None);
        assert_eq!(read_control(b"0000000000000abc ! +"), None);
        assert_eq!(read_control(b"0000000000000abc 1-1 {}"), None);
        assert!(is_disconnect(disconnect_payload(0xabc).as_bytes()));
        assert_eq!(read_control(disconnect_payload(0xabc).as_bytes()), None);
        assert!(!is_disconnect(b"0000000000000abc ! +x"));
    }

    #[test]
    fn displace_payloads_name_one_device() {
        let device = DeviceId {
            node: 0xabc,
            core: 1,
            key: 42,
            serial: 7,
        };
        assert_eq!(device.to_string(), "0000000000000abc/1/42/7");
        let payload = format!("0000000000000def ! d{device}");
        assert_eq!(read_displace(payload.as_bytes()), Some(device));
        assert_eq!(read_control(payload.as_bytes()), None);
        assert!(!is_disconnect(payload.as_bytes()));
        for bad in [
            "0000000000000def ! d0000000000000abc/1/42",
            "0000000000000def ! d0000000000000abc/1/42/7/8",
            "0000000000000def ! dabc/1/42/7",
            "0000000000000def ! d0000000000000abc/x/42/7",
            "0000000000000def ! +0000000000000abc/1/42/7",
            "0000000000000def ! d",
        ] {
            assert_eq!(read_displace(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn user_payloads_carry_the_node_and_the_frame() {
        let mut out = Vec::new();
        write_user_payload(&mut out, 0xabc, r#"{"event":"e","args":1}"#);
        assert_eq!(&out[..17], b"0000000000000abc ");
        assert_eq!(
            read_user_payload(&out, 7).unwrap().as_str(),
            r#"{"event":"e","args":1}"#
        );
        assert_eq!(read_user_payload(&out, 0xabc), Err(Skip::Own));
        assert_eq!(read_user_payload(b"garbage", 7), Err(Skip::Invalid));
        assert_eq!(
            read_user_payload(b"zzzzzzzzzzzzzzzz {\"event\":\"e\"}", 7),
            Err(Skip::Invalid)
        );
        assert_eq!(
            read_user_payload(b"0000000000000001 [1,2]", 7),
            Err(Skip::Invalid)
        );
        assert_eq!(
            read_user_payload(b"0000000000000001 {\"event\":\xff}", 7),
            Err(Skip::Invalid)
        );
    }

    #[test]
    fn history_payloads_carry_the_offset() {
        let p = b"0000000000000abc 17-3 {\"event\":\"e\",\"args\":1,\"offset\":\"17-3\"}";
        let (offset, frame) = read_history_payload(p).unwrap();
        assert_eq!(offset, crate::history::Offset(17, 3));
        assert!(frame.as_str().ends_with(r#""offset":"17-3"}"#));
        for bad in [
            &b"short"[..],
            b"0000000000000abc x-3 {\"event\":\"e\"}",
            b"0000000000000abc 17-3",
            b"0000000000000abc 17-3 [1]",
        ] {
            assert_eq!(read_history_payload(bad), Err(Skip::Invalid));
        }
    }

    #[test]
    fn seed_payload_is_the_seed_format_exactly() {
        let d = encode_dispatch(
            vec!["u1".into()],
            "newMessage",
            &serde_json::json!({"text": "hi"}),
        )
        .unwrap();
        let mut out = Vec::new();
        write_seed_payload(&mut out, &d, "u\"1");
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"event":"newMessage","id":"u\"1","args":{"text":"hi"}}"#
        );
        let (user, frame) = read_seed_payload(&out).unwrap();
        assert_eq!(user, "u\"1");
        assert_eq!(
            frame.as_str(),
            r#"{"event":"newMessage","args":{"text":"hi"}}"#
        );
    }

    #[test]
    fn numbers_past_f64_range_pass_through_verbatim() {
        // Found by fuzz/backplane_wire: valid JSON by the grammar, so it is forwarded as sent.
        let payload = br#"{"event":"e","id":"u","args":[9999,99999999999999999999e9999]}"#;
        let (_, frame) = read_seed_payload(payload).unwrap();
        assert_eq!(
            frame.as_str(),
            r#"{"event":"e","args":[9999,99999999999999999999e9999]}"#
        );
    }

    #[test]
    fn seed_payloads_from_javascript_are_accepted() {
        let (user, frame) = read_seed_payload(br#"{"id": 42, "event": "x"}"#).unwrap();
        assert_eq!(user, "42");
        assert_eq!(frame.as_str(), r#"{"event":"x","args":null}"#);
        assert_eq!(
            read_seed_payload(b"{\"event\":1,\"id\":\"u\"}").unwrap_err(),
            Skip::Invalid
        );
        assert_eq!(read_seed_payload(b"not json").unwrap_err(), Skip::Invalid);
        assert_eq!(
            read_seed_payload(br#"{"event":"x","id":""}"#).unwrap_err(),
            Skip::Invalid
        );
    }
}
