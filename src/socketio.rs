//! Socket.IO v5 over Engine.IO v4, WebSocket transport only: the packet parser, the encoders,
//! and what one Engine.IO connection remembers. Pure (no I/O); `core_loop/sio.rs` drives it.
//!
//! Over a WebSocket every text frame is one Engine.IO packet: `0` open, `1` close, `2` ping,
//! `3` pong, `4` message, `5` upgrade, `6` noop. A message carries one Socket.IO packet,
//! `<type>[<attachments>-][<namespace>,][<ack id>][<JSON>]`, of type `0` CONNECT, `1` DISCONNECT,
//! `2` EVENT, `3` ACK, `4` CONNECT_ERROR, `5` BINARY_EVENT or `6` BINARY_ACK.
//!
//! Events reach the client as `42["message",<native frame>]`: the native frame already is the
//! `{"event":...,"args":...}` object the original frontends listen for, so a dispatch is wrapped,
//! never re-encoded, and the wrapping is cached per dispatch ([`FrameCache`]).

use std::sync::OnceLock;
use std::time::Instant;

use serde_json::value::RawValue;
use tungstenite::Utf8Bytes;

/// Longest namespace name a packet may carry (the two served are far shorter).
pub const MAX_NAMESPACE_BYTES: usize = 128;
/// Largest ack id accepted: JavaScript's `Number.MAX_SAFE_INTEGER`, what socket.io-client can count to.
pub const MAX_ACK_ID: u64 = (1 << 53) - 1;
/// Most binary attachments a packet may announce (each is skipped, never read).
pub const MAX_ATTACHMENTS: u32 = 64;

/// The Engine.IO heartbeat ping the server sends every ping interval.
pub const PING: &str = "2";

/// A namespace served. `/` and `/socket` (the original design's) see the same events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Namespace {
    /// `/`, the default.
    Root,
    /// `/socket`.
    Socket,
}

impl Namespace {
    /// Every namespace served.
    pub const ALL: [Namespace; 2] = [Namespace::Root, Namespace::Socket];

    /// The namespace named `name`, if served.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "/" => Some(Namespace::Root),
            "/socket" => Some(Namespace::Socket),
            _ => None,
        }
    }

    fn index(self) -> usize {
        match self {
            Namespace::Root => 0,
            Namespace::Socket => 1,
        }
    }

    /// What precedes the ack id or payload of a packet for this namespace.
    fn prefix(self) -> &'static str {
        match self {
            Namespace::Root => "",
            Namespace::Socket => "/socket,",
        }
    }
}

/// A set of namespaces: those a connection has joined.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Namespaces(u8);

impl Namespaces {
    /// Adds `ns`.
    pub fn insert(&mut self, ns: Namespace) {
        self.0 |= 1 << ns.index();
    }

    /// Removes `ns`.
    pub fn remove(&mut self, ns: Namespace) {
        self.0 &= !(1 << ns.index());
    }

    /// Whether `ns` is in the set.
    pub fn contains(self, ns: Namespace) -> bool {
        self.0 & (1 << ns.index()) != 0
    }

    /// No namespace joined.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The members, in [`Namespace::ALL`] order.
    pub fn iter(self) -> impl Iterator<Item = Namespace> {
        Namespace::ALL
            .into_iter()
            .filter(move |&ns| self.contains(ns))
    }
}

/// One Engine.IO packet from a client.
#[derive(Debug, PartialEq, Eq)]
pub enum EnginePacket<'a> {
    /// `1`: the client ends the session.
    Close,
    /// `2<data>`: a client ping (EIO 4 clients do not send one; answered anyway).
    Ping(&'a str),
    /// `3`: the answer to the server's ping.
    Pong,
    /// `4<packet>`: a Socket.IO packet.
    Message(&'a str),
    /// `6`: nothing.
    Noop,
}

/// Socket.IO packet types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketType {
    /// `0`: join a namespace, with an optional auth object.
    Connect,
    /// `1`: leave a namespace.
    Disconnect,
    /// `2`: an event, `["name", ...args]`.
    Event,
    /// `3`: the answer to a server event's ack (the server never asks for one).
    Ack,
    /// `4`: a refused CONNECT (server → client only).
    ConnectError,
    /// `5`: an event with binary attachments.
    BinaryEvent,
    /// `6`: an ack with binary attachments.
    BinaryAck,
}

/// One Socket.IO packet, borrowed from the frame.
#[derive(Debug)]
pub struct Packet<'a> {
    /// The type.
    pub kind: PacketType,
    /// Binary attachments announced (binary types only; they follow as binary frames).
    pub attachments: u32,
    /// The namespace name as sent (`/` when absent); may be one not served.
    pub nsp: &'a str,
    /// The ack id: the client waits for an ACK packet with it.
    pub id: Option<u64>,
    /// The JSON payload, unparsed.
    pub data: Option<&'a RawValue>,
}

/// A frame that is not a valid Engine.IO / Socket.IO packet. The caller closes the connection
/// (a client that breaks the framing cannot be answered in it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// An empty frame.
    #[error("empty packet")]
    Empty,
    /// An Engine.IO type other than close, ping, pong, message and noop.
    #[error("unknown or unexpected engine.io packet type")]
    EngineType,
    /// A Socket.IO type outside 0-6.
    #[error("unknown socket.io packet type")]
    PacketType,
    /// A binary packet without a valid `<n>-` attachment count, or more than [`MAX_ATTACHMENTS`].
    #[error("invalid attachment count")]
    Attachments,
    /// A namespace longer than [`MAX_NAMESPACE_BYTES`].
    #[error("namespace too long")]
    Namespace,
    /// An ack id over [`MAX_ACK_ID`].
    #[error("ack id too large")]
    AckId,
    /// A payload that is not JSON, or nests deeper than the native protocol allows.
    #[error("payload is not valid JSON")]
    Json,
}

/// Parses one Engine.IO packet (one WebSocket text frame).
pub fn parse_engine(text: &str) -> Result<EnginePacket<'_>, PacketError> {
    // The type is one ASCII byte, so `text[1..]` is on a character boundary.
    match text.as_bytes().first() {
        None => Err(PacketError::Empty),
        Some(b'1') => Ok(EnginePacket::Close),
        Some(b'2') => Ok(EnginePacket::Ping(&text[1..])),
        Some(b'3') => Ok(EnginePacket::Pong),
        Some(b'4') => Ok(EnginePacket::Message(&text[1..])),
        Some(b'6') => Ok(EnginePacket::Noop),
        // `0` open is server → client; `5` upgrade only follows a polling session.
        Some(_) => Err(PacketError::EngineType),
    }
}

/// Parses one Socket.IO packet (an Engine.IO message's text), the way socket.io-parser reads it.
pub fn parse_packet(text: &str) -> Result<Packet<'_>, PacketError> {
    let b = text.as_bytes();
    let kind = match b.first() {
        None => return Err(PacketError::Empty),
        Some(b'0') => PacketType::Connect,
        Some(b'1') => PacketType::Disconnect,
        Some(b'2') => PacketType::Event,
        Some(b'3') => PacketType::Ack,
        Some(b'4') => PacketType::ConnectError,
        Some(b'5') => PacketType::BinaryEvent,
        Some(b'6') => PacketType::BinaryAck,
        Some(_) => return Err(PacketError::PacketType),
    };
    let mut i = 1;
    let mut attachments = 0;
    if matches!(kind, PacketType::BinaryEvent | PacketType::BinaryAck) {
        let digits = b[i..].iter().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 || b.get(i + digits) != Some(&b'-') {
            return Err(PacketError::Attachments);
        }
        attachments = text[i..i + digits]
            .parse::<u32>()
            .ok()
            .filter(|&n| n <= MAX_ATTACHMENTS)
            .ok_or(PacketError::Attachments)?;
        i += digits + 1;
    }
    let mut nsp = "/";
    if b.get(i) == Some(&b'/') {
        let len = b[i..].iter().take_while(|&&c| c != b',').count();
        if len > MAX_NAMESPACE_BYTES {
            return Err(PacketError::Namespace);
        }
        // Ends before a ',' (ASCII) or at the end: a character boundary either way.
        nsp = &text[i..i + len];
        i += len;
        if b.get(i) == Some(&b',') {
            i += 1;
        }
    }
    let digits = b[i..].iter().take_while(|c| c.is_ascii_digit()).count();
    let mut id = None;
    if digits > 0 {
        let n = text[i..i + digits]
            .parse::<u64>()
            .ok()
            .filter(|&n| n <= MAX_ACK_ID)
            .ok_or(PacketError::AckId)?;
        id = Some(n);
        i += digits;
    }
    let rest = &text[i..];
    let data = if rest.is_empty() {
        None
    } else {
        let raw: &RawValue = serde_json::from_str(rest).map_err(|_| PacketError::Json)?;
        // One level for the `["message", ...]` array: the envelope inside gets the native limit.
        if crate::protocol::too_deep(raw.get(), crate::protocol::MAX_DEPTH + 1) {
            return Err(PacketError::Json);
        }
        Some(raw)
    };
    Ok(Packet {
        kind,
        attachments,
        nsp,
        id,
        data,
    })
}

/// The message object of an EVENT `["message", {...}]`; the error is the reason for the client.
pub fn event_message(data: Option<&RawValue>) -> Result<&RawValue, &'static str> {
    const SHAPE: &str = "socket.io events must be [\"message\", {\"event\": ..., \"args\": ...}]";
    let raw = data.ok_or(SHAPE)?;
    match serde_json::from_str::<(std::borrow::Cow<'_, str>, &RawValue)>(raw.get()) {
        Ok((name, message)) if name == "message" => Ok(message),
        _ => Err(SHAPE),
    }
}

/// A CONNECT payload: `{"token": "...", "since": "<offset>", "rooms": {"<room>": "<offset>"}}`,
/// each optional.
#[derive(Debug, Default, PartialEq, Eq, serde::Deserialize)]
pub struct ConnectAuth {
    /// Checked like the native endpoint's token.
    #[serde(default)]
    pub token: Option<String>,
    /// Resume after this offset, like the native `?since=`.
    #[serde(default)]
    pub since: Option<String>,
    /// Resume each room's history after its offset, like the native `?rooms=`.
    #[serde(default)]
    pub rooms: Option<ConnectRooms>,
}

/// The `rooms` of a CONNECT payload: room → offset to resume after.
pub type ConnectRooms = std::collections::BTreeMap<String, String>;

/// The auth object of a CONNECT (empty when absent); the error is the reason for the client.
pub fn connect_auth(data: Option<&RawValue>) -> Result<ConnectAuth, &'static str> {
    match data {
        None => Ok(ConnectAuth::default()),
        Some(raw) => serde_json::from_str(raw.get())
            .map_err(|_| "the auth payload must be an object with string token and since"),
    }
}

/// The Engine.IO open packet: `0{"sid":...,"upgrades":[],"pingInterval":...,...}`.
pub fn open_packet(
    sid: &str,
    ping_interval_ms: u128,
    ping_timeout_ms: u128,
    max_payload: usize,
) -> String {
    format!(
        "0{{\"sid\":\"{sid}\",\"upgrades\":[],\"pingInterval\":{ping_interval_ms},\
         \"pingTimeout\":{ping_timeout_ms},\"maxPayload\":{max_payload}}}"
    )
}

/// The answer to a client ping: `3` and the ping's data.
pub fn pong(data: &str) -> String {
    format!("3{data}")
}

/// A connection's Engine.IO session id (an identifier, not a secret: nothing is looked up by it).
pub fn engine_sid(node: u64, core: usize, serial: u64) -> String {
    format!("{node:016x}{core:04x}{serial:x}")
}

/// CONNECT accepted: `40[/socket,]{"sid":"<engine sid>-<n>"}`.
pub fn connect_ok(ns: Namespace, engine_sid: &str) -> String {
    format!(
        "40{}{{\"sid\":\"{engine_sid}-{}\"}}",
        ns.prefix(),
        ns.index()
    )
}

/// CONNECT refused: `44[<nsp>,]{"message":...}`, for the namespace as the client named it.
pub fn connect_error(nsp: &str, message: &str) -> String {
    let mut out = String::from("44");
    if nsp != "/" {
        out.push_str(nsp);
        out.push(',');
    }
    #[derive(serde::Serialize)]
    struct Refusal<'a> {
        message: &'a str,
    }
    // A struct of one string always serialises.
    out.push_str(&serde_json::to_string(&Refusal { message }).unwrap_or_default());
    out
}

/// An event for the client: `42[/socket,]["message",<native frame>]`.
pub fn event(ns: Namespace, native: &str) -> Utf8Bytes {
    let prefix = ns.prefix();
    let mut out = String::with_capacity(native.len() + prefix.len() + 14);
    out.push_str("42");
    out.push_str(prefix);
    out.push_str("[\"message\",");
    out.push_str(native);
    out.push(']');
    Utf8Bytes::from(out)
}

/// The answer to a client's ack id: `43[/socket,]<id>[<answer>]`.
pub fn ack(ns: Namespace, id: u64, answer: &str) -> Utf8Bytes {
    Utf8Bytes::from(format!("43{}{id}[{answer}]", ns.prefix()))
}

/// Packs a namespace and a Socket.IO ack id into the `u64` ack the native paths carry (ack ids
/// are per namespace; async answers such as history pages must find theirs).
pub fn tag_ack(ns: Namespace, id: u64) -> u64 {
    (id << 1) | ns.index() as u64
}

/// The namespace and ack id packed by [`tag_ack`].
pub fn untag_ack(tag: u64) -> (Namespace, u64) {
    let ns = if tag & 1 == 0 {
        Namespace::Root
    } else {
        Namespace::Socket
    };
    (ns, tag >> 1)
}

/// The Socket.IO frames of one dispatched event, built at most once per namespace however many
/// connections get it (on any core), next to the native frame they wrap.
#[derive(Debug, Default)]
pub struct FrameCache([OnceLock<Utf8Bytes>; 2]);

impl FrameCache {
    /// The frame for `ns`, wrapping `native` the first time.
    pub fn get(&self, ns: Namespace, native: &Utf8Bytes) -> Utf8Bytes {
        self.0[ns.index()]
            .get_or_init(|| event(ns, native.as_str()))
            .clone()
    }
}

/// What a Socket.IO connection remembers besides the WebSocket. Boxed in the connection, so a
/// native connection pays one pointer.
#[derive(Debug)]
pub struct Session {
    /// Namespaces joined; the user is in the core's index while this is not empty.
    pub namespaces: Namespaces,
    /// Namespaces whose CONNECT waits for the application's connect hook.
    pub connecting: Namespaces,
    /// Namespace of the packet being handled: where an answer without an ack id goes.
    pub reply_to: Namespace,
    /// Token of the upgrade request (`Authorization: Bearer`, else `?token=`), used by a CONNECT
    /// whose payload has none.
    pub request_token: Option<Box<str>>,
    /// `?since=` of the upgrade request: the resume starts at the first CONNECT.
    pub since: Option<Box<str>>,
    /// `?rooms=` of the upgrade request, resumed at the first CONNECT too.
    pub rooms: Option<Box<str>>,
    /// While no namespace is joined: when the connection is closed unless one is.
    pub connect_by: Option<Instant>,
    /// Binary frames still to drop: the attachments of a refused binary packet.
    pub skip_binary: u32,
    /// The connection holds a `--max-connections` slot: taken at its first accepted CONNECT,
    /// so sockets that never authenticate keep no one else out.
    pub holds_slot: bool,
}

impl Session {
    /// A session that must CONNECT by `connect_by`.
    pub fn new(
        request_token: Option<String>,
        since: Option<String>,
        rooms: Option<String>,
        connect_by: Instant,
    ) -> Self {
        Session {
            namespaces: Namespaces::default(),
            connecting: Namespaces::default(),
            reply_to: Namespace::Root,
            request_token: request_token.map(String::into_boxed_str),
            since: since.map(String::into_boxed_str),
            rooms: rooms.map(String::into_boxed_str),
            connect_by: Some(connect_by),
            skip_binary: 0,
            holds_slot: false,
        }
    }
}

/// The query parameters that select the Engine.IO WebSocket transport, checked in this order;
/// `Err` is the HTTP 400 JSON body (Engine.IO's error codes).
pub fn check_query(
    eio: Option<&str>,
    transport: Option<&str>,
    sid: Option<&str>,
) -> Result<(), String> {
    let body = |code: u8, message: &str| {
        serde_json::json!({ "code": code, "message": message }).to_string()
    };
    if transport != Some("websocket") {
        return Err(body(
            0,
            "only the websocket transport is served: set transports: [\"websocket\"] in the client",
        ));
    }
    if eio != Some("4") {
        return Err(body(
            5,
            "unsupported protocol version: EIO=4 (socket.io v3/v4 clients) only",
        ));
    }
    if sid.is_some() {
        return Err(body(
            1,
            "session id unknown: there are no polling sessions to upgrade",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(text: &str) -> Packet<'_> {
        parse_packet(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn engine_packets() {
        assert_eq!(parse_engine("1"), Ok(EnginePacket::Close));
        assert_eq!(parse_engine("2probe"), Ok(EnginePacket::Ping("probe")));
        assert_eq!(parse_engine("3"), Ok(EnginePacket::Pong));
        assert_eq!(parse_engine("40"), Ok(EnginePacket::Message("0")));
        assert_eq!(parse_engine("6"), Ok(EnginePacket::Noop));
        assert_eq!(parse_engine(""), Err(PacketError::Empty));
        for bad in ["0", "5", "7", "x", "é"] {
            assert_eq!(parse_engine(bad), Err(PacketError::EngineType), "{bad}");
        }
    }

    #[test]
    fn connect_packets_with_and_without_namespace_and_auth() {
        let p = packet("0");
        assert_eq!((p.kind, p.nsp, p.id), (PacketType::Connect, "/", None));
        assert!(p.data.is_none());
        let p = packet(r#"0{"token":"u1"}"#);
        assert_eq!(connect_auth(p.data).unwrap().token.as_deref(), Some("u1"));
        let p = packet(r#"0/socket,{"token":"u1"}"#);
        assert_eq!(p.nsp, "/socket");
        assert_eq!(Namespace::from_name(p.nsp), Some(Namespace::Socket));
        assert_eq!(connect_auth(p.data).unwrap().token.as_deref(), Some("u1"));
        // socket.io-parser accepts a namespace without its ',' when nothing follows.
        assert_eq!(packet("1/socket").nsp, "/socket");
        assert_eq!(packet("0/admin,").nsp, "/admin");
        assert_eq!(connect_auth(packet("0{}").data), Ok(ConnectAuth::default()));
        let auth = connect_auth(packet(r#"0{"token":"t","since":"1-2","x":1}"#).data).unwrap();
        assert_eq!(
            (auth.token.as_deref(), auth.since.as_deref()),
            (Some("t"), Some("1-2"))
        );
        let auth = connect_auth(packet(r#"0{"rooms":{"general":"1-2"}}"#).data).unwrap();
        let rooms = auth.rooms.expect("rooms");
        assert_eq!(rooms.get("general").map(String::as_str), Some("1-2"));
        assert!(connect_auth(packet(r#"0{"rooms":["general"]}"#).data).is_err());
        assert!(connect_auth(packet(r#"0{"token":5}"#).data).is_err());
        assert!(connect_auth(packet("0[1]").data).is_err());
    }

    #[test]
    fn events_with_ack_ids() {
        let p = packet(r#"2/socket,17["message",{"event":"sendMessage","args":{"to":"u2"}}]"#);
        assert_eq!(
            (p.kind, p.nsp, p.id),
            (PacketType::Event, "/socket", Some(17))
        );
        let m = event_message(p.data).unwrap();
        assert_eq!(m.get(), r#"{"event":"sendMessage","args":{"to":"u2"}}"#);
        let p = packet(r#"2["message",{"event":"x"}]"#);
        assert_eq!(p.id, None);
        assert!(event_message(p.data).is_ok());
        for bad in [
            r#"2["other",{}]"#,
            r#"2["message"]"#,
            r#"2["message",{},1]"#,
            r#"2{"event":"x"}"#,
            "2",
            r#"2[5,{}]"#,
        ] {
            assert!(event_message(packet(bad).data).is_err(), "{bad}");
        }
        assert_eq!(
            packet(&format!("2{MAX_ACK_ID}[\"message\",{{}}]")).id,
            Some(MAX_ACK_ID)
        );
        assert_eq!(
            parse_packet(&format!("2{}[]", MAX_ACK_ID + 1)).unwrap_err(),
            PacketError::AckId
        );
        assert_eq!(
            parse_packet("299999999999999999999999[]").unwrap_err(),
            PacketError::AckId
        );
    }

    #[test]
    fn binary_packets_announce_attachments() {
        let p = packet(r#"52-["message",{"_placeholder":true,"num":0}]"#);
        assert_eq!((p.kind, p.attachments), (PacketType::BinaryEvent, 2));
        let p = packet("61-/socket,4[{}]");
        assert_eq!(
            (p.kind, p.attachments, p.nsp, p.id),
            (PacketType::BinaryAck, 1, "/socket", Some(4))
        );
        for bad in ["5[]", "5-[]", "5x-[]", "565-[]", "599999999999-[]"] {
            assert_eq!(
                parse_packet(bad).unwrap_err(),
                PacketError::Attachments,
                "{bad}"
            );
        }
    }

    #[test]
    fn malformed_packets_are_errors_not_panics() {
        assert_eq!(parse_packet("").unwrap_err(), PacketError::Empty);
        assert_eq!(parse_packet("7").unwrap_err(), PacketError::PacketType);
        assert_eq!(parse_packet("é").unwrap_err(), PacketError::PacketType);
        assert_eq!(parse_packet("2[").unwrap_err(), PacketError::Json);
        assert_eq!(parse_packet("2/é,[").unwrap_err(), PacketError::Json);
        // Whitespace around the payload is JSON's business, as with socket.io-parser.
        assert!(parse_packet("2 [] ").is_ok());
        let long = format!("0/{},", "a".repeat(MAX_NAMESPACE_BYTES));
        assert_eq!(parse_packet(&long).unwrap_err(), PacketError::Namespace);
        let deep = format!("2{}{}", "[".repeat(200), "]".repeat(200));
        assert_eq!(parse_packet(&deep).unwrap_err(), PacketError::Json);
        // Multi-byte characters in the namespace are kept whole.
        assert_eq!(packet("0/é€,").nsp, "/é€");
    }

    #[test]
    fn encoders() {
        assert_eq!(
            open_packet("abc", 25000, 20000, 65536),
            r#"0{"sid":"abc","upgrades":[],"pingInterval":25000,"pingTimeout":20000,"maxPayload":65536}"#
        );
        assert_eq!(connect_ok(Namespace::Root, "s"), r#"40{"sid":"s-0"}"#);
        assert_eq!(
            connect_ok(Namespace::Socket, "s"),
            r#"40/socket,{"sid":"s-1"}"#
        );
        assert_eq!(
            connect_error("/admin", "invalid \"namespace\""),
            r#"44/admin,{"message":"invalid \"namespace\""}"#
        );
        assert_eq!(
            connect_error("/", "missing token"),
            r#"44{"message":"missing token"}"#
        );
        let native = r#"{"event":"newMessage","args":{"a":1}}"#;
        assert_eq!(
            event(Namespace::Root, native).as_str(),
            r#"42["message",{"event":"newMessage","args":{"a":1}}]"#
        );
        assert_eq!(
            event(Namespace::Socket, native).as_str(),
            r#"42/socket,["message",{"event":"newMessage","args":{"a":1}}]"#
        );
        assert_eq!(ack(Namespace::Socket, 3, "{}").as_str(), "43/socket,3[{}]");
        assert_eq!(pong("probe"), "3probe");
        // What is encoded parses back.
        let frame = ack(Namespace::Socket, 9, "{}");
        let p = packet(&frame.as_str()[1..]);
        assert_eq!((p.kind, p.nsp, p.id), (PacketType::Ack, "/socket", Some(9)));
    }

    #[test]
    fn ack_tags_round_trip() {
        for ns in Namespace::ALL {
            for id in [0, 1, 12345, MAX_ACK_ID] {
                assert_eq!(untag_ack(tag_ack(ns, id)), (ns, id));
            }
        }
    }

    #[test]
    fn frame_cache_builds_each_namespace_once() {
        let native = Utf8Bytes::from_static(r#"{"event":"e","args":1}"#);
        let cache = FrameCache::default();
        let a = cache.get(Namespace::Socket, &native);
        let b = cache.get(Namespace::Socket, &native);
        assert_eq!(
            a.as_str().as_ptr(),
            b.as_str().as_ptr(),
            "shared, not rebuilt"
        );
        assert_eq!(
            cache.get(Namespace::Root, &native),
            event(Namespace::Root, native.as_str())
        );
    }

    #[test]
    fn namespace_sets() {
        let mut s = Namespaces::default();
        assert!(s.is_empty());
        s.insert(Namespace::Socket);
        assert_eq!(s.iter().collect::<Vec<_>>(), [Namespace::Socket]);
        s.insert(Namespace::Root);
        assert_eq!(s.iter().count(), 2);
        s.remove(Namespace::Socket);
        assert!(s.contains(Namespace::Root) && !s.contains(Namespace::Socket));
    }

    #[test]
    fn only_the_websocket_transport_of_eio_4() {
        assert!(check_query(Some("4"), Some("websocket"), None).is_ok());
        let polling = check_query(Some("4"), Some("polling"), None).unwrap_err();
        assert!(
            polling.contains("\"code\":0") && polling.contains("websocket"),
            "{polling}"
        );
        assert!(check_query(Some("4"), None, None).is_err());
        assert!(check_query(Some("3"), Some("websocket"), None)
            .unwrap_err()
            .contains("\"code\":5"));
        assert!(check_query(Some("4"), Some("websocket"), Some("x"))
            .unwrap_err()
            .contains("\"code\":1"));
    }
}
