//! Socket.IO v5 over Engine.IO v4, websocket transport only: just enough framing to load a
//! socket.io v4 server the way a browser client would. Every WebSocket text frame carries one
//! Engine.IO packet (`0` open, `1` close, `2` ping, `3` pong, `4` message); a `4` carries one
//! Socket.IO packet (`0` CONNECT, `1` DISCONNECT, `2` EVENT, `4` CONNECT_ERROR) for the
//! default namespace `/`, so no `/nsp,` prefix is written or expected.
//!
//! Events are written as `42["message",<payload>]` around the same `sendMessage` JSON the
//! native protocol sends; deliveries (`42["message",{"event":"newMessage",...}]`) are found by
//! the same marker substring search, so the hot path stays free of JSON parsing.

/// What one Engine.IO packet (one WebSocket text frame) turned out to be.
#[derive(Debug, PartialEq, Eq)]
pub enum Packet<'a> {
    /// `0{...}`: the Engine.IO handshake (sid, pingInterval, ...).
    Open,
    /// `1`: the server closes the Engine.IO session.
    Close,
    /// `2`: heartbeat; must be answered with `3` (and the same data, if any).
    Ping(&'a [u8]),
    /// `40{"sid":...}`: Socket.IO CONNECT acknowledged for the default namespace.
    ConnectAck,
    /// `44{"message":...}`: the server refused the CONNECT (e.g. the auth middleware failed).
    ConnectError(&'a [u8]),
    /// `41`: the server disconnected this namespace.
    Disconnect,
    /// `42[...]`: an event; the whole frame is classified by the marker search.
    Event,
    /// Anything else (pong, noop, binary/ack packets, other namespaces).
    Other,
}

/// Classifies one Engine.IO packet. Never panics on peer-controlled bytes.
pub fn classify(frame: &[u8]) -> Packet<'_> {
    match frame {
        [b'0', ..] => Packet::Open,
        [b'1', ..] => Packet::Close,
        [b'2', rest @ ..] => Packet::Ping(rest),
        [b'4', b'0', rest @ ..] if rest.first() != Some(&b'/') => Packet::ConnectAck,
        [b'4', b'1', rest @ ..] if rest.first() != Some(&b'/') => Packet::Disconnect,
        [b'4', b'2', rest @ ..] if rest.first() != Some(&b'/') => Packet::Event,
        [b'4', b'4', rest @ ..] if rest.first() != Some(&b'/') => Packet::ConnectError(rest),
        _ => Packet::Other,
    }
}

/// Request path for the WebSocket upgrade: `<base>?EIO=4&transport=websocket&token=<token>`.
/// `base` is normally `/socket.io/`.
pub fn upgrade_path(base: &str, token: &str) -> String {
    format!("{base}?EIO=4&transport=websocket&token={token}")
}

/// The Socket.IO CONNECT packet for the default namespace with `{"token": ...}` as auth.
pub fn connect_packet(token: &str) -> Vec<u8> {
    let mut out = b"40".to_vec();
    // A String always serialises.
    out.extend_from_slice(
        serde_json::to_string(&serde_json::json!({ "token": token }))
            .unwrap_or_default()
            .as_bytes(),
    );
    out
}

/// Pong for a ping carrying `data` (`2probe` -> `3probe`; plain `2` -> `3`).
pub fn pong(out: &mut Vec<u8>, data: &[u8]) {
    out.push(b'3');
    out.extend_from_slice(data);
}

/// What precedes / follows the `{"event":...}` payload of a `message` event.
pub const EVENT_PREFIX: &[u8] = b"42[\"message\",";
pub const EVENT_SUFFIX: &[u8] = b"]";

/// Short, printable reason for a CONNECT_ERROR (cold path): its `message`, if any.
pub fn connect_error_reason(data: &[u8]) -> String {
    let msg = serde_json::from_slice::<serde_json::Value>(data)
        .ok()
        .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_owned))
        .unwrap_or_else(|| "unparsable".to_owned());
    format!("socket.io connect_error: {msg}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenarios::marker::{self, Classifier, Frame};

    #[test]
    fn classifies_engine_io_and_socket_io_packets() {
        assert_eq!(
            classify(br#"0{"sid":"abc","upgrades":[],"pingInterval":25000,"pingTimeout":20000,"maxPayload":1000000}"#),
            Packet::Open
        );
        assert_eq!(classify(b"1"), Packet::Close);
        assert_eq!(classify(b"2"), Packet::Ping(b""));
        assert_eq!(classify(b"2probe"), Packet::Ping(b"probe"));
        assert_eq!(classify(b"3"), Packet::Other);
        assert_eq!(classify(b"6"), Packet::Other);
        assert_eq!(
            classify(br#"40{"sid":"wZX3oN0bSVIhsaknAAAI"}"#),
            Packet::ConnectAck
        );
        assert_eq!(classify(b"41"), Packet::Disconnect);
        assert_eq!(classify(br#"42["message",{}]"#), Packet::Event);
        assert_eq!(
            classify(br#"44{"message":"unauthorized"}"#),
            Packet::ConnectError(br#"{"message":"unauthorized"}"#)
        );
        // Other namespaces, acks, binary events and garbage are not ours.
        assert_eq!(classify(br#"40/admin,{"sid":"x"}"#), Packet::Other);
        assert_eq!(classify(br#"42/admin,["message",{}]"#), Packet::Other);
        assert_eq!(classify(br#"431[]"#), Packet::Other);
        assert_eq!(
            classify(br#"451-["x",{"_placeholder":true,"num":0}]"#),
            Packet::Other
        );
        assert_eq!(classify(b"4"), Packet::Other);
        assert_eq!(classify(b""), Packet::Other);
        assert_eq!(classify(b"x"), Packet::Other);
    }

    #[test]
    fn connect_and_upgrade_path() {
        assert_eq!(connect_packet("u17"), br#"40{"token":"u17"}"#.to_vec());
        assert_eq!(
            connect_packet("a\"b"),
            br#"40{"token":"a\"b"}"#.to_vec(),
            "escaped"
        );
        assert_eq!(
            upgrade_path("/socket.io/", "u3"),
            "/socket.io/?EIO=4&transport=websocket&token=u3"
        );
    }

    #[test]
    fn pongs_echo_ping_data() {
        let mut out = Vec::new();
        pong(&mut out, b"");
        assert_eq!(out, b"3");
        out.clear();
        pong(&mut out, b"probe");
        assert_eq!(out, b"3probe");
    }

    #[test]
    fn connect_error_reason_is_readable() {
        assert_eq!(
            connect_error_reason(br#"{"message":"unauthorized"}"#),
            "socket.io connect_error: unauthorized"
        );
        assert_eq!(
            connect_error_reason(b"nope"),
            "socket.io connect_error: unparsable"
        );
    }

    #[test]
    fn event_framing_round_trips_and_deliveries_are_found() {
        let mut out = EVENT_PREFIX.to_vec();
        marker::write_send_message(&mut out, "u7", "ab12", 9, 1000, 0);
        out.extend_from_slice(EVENT_SUFFIX);
        assert_eq!(classify(&out), Packet::Event);
        let v: serde_json::Value = serde_json::from_slice(&out[2..]).unwrap();
        assert_eq!(v[0], "message");
        assert_eq!(v[1]["event"], "sendMessage");
        assert_eq!(v[1]["args"]["to"], "u7");
        assert_eq!(v[1]["args"]["text"], "lt:ab12:9:1000");

        // What the Node peer emits: socket.emit('message', {event, args}).
        let delivery = br#"42["message",{"event":"newMessage","args":{"id":"3f1c","from":"u1","to":"u7","text":"lt:ab12:9:1000","ts":1764490000000}}]"#;
        assert_eq!(classify(delivery), Packet::Event);
        assert_eq!(
            Classifier::new("ab12").classify(delivery),
            Frame::Delivery {
                seq: 9,
                intended_ns: 1000
            }
        );
    }
}
