//! The wire protocol: client envelopes in, server events out, error codes and close codes.
//!
//! docs/PROTOCOL.md is the prose version of this file; keep the two in step.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::Utf8Bytes;

/// A decoded client envelope: `{"event": "...", "args": ..., "ack": n}`.
#[derive(Debug, Deserialize)]
pub struct Envelope<'a> {
    /// Handler name.
    #[serde(borrow)]
    pub event: std::borrow::Cow<'a, str>,
    /// Handler arguments; `null` when absent.
    #[serde(borrow, default)]
    pub args: Option<&'a RawValue>,
    /// When present, the server answers with an `ack` or `error` event carrying this number.
    #[serde(default)]
    pub ack: Option<u64>,
}

/// Error codes sent in `{"event": "error", "args": {"code": ..., "message": ...}}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The text frame is not JSON.
    BadJson,
    /// JSON, but not an object with a string `event` (and a non-negative integer `ack`).
    BadEnvelope,
    /// No handler is registered for the event name.
    UnknownEvent,
    /// The handler could not use `args`.
    BadArgs,
    /// The handler failed; nothing was dispatched.
    Internal,
    /// The connection sent faster than its rate limit; the frame was dropped.
    RateLimited,
    /// The event could not be handed to Redis (the publication queue overflowed during an
    /// outage): nothing was stored; the client may send it again.
    Unavailable,
    /// The room name is empty, too long, or uses a character outside the allowed set.
    BadRoom,
    /// The caller is not a member of the room it sent to, left, or asked about.
    NotMember,
    /// The caller is already in `--max-rooms-per-user` rooms.
    RoomLimit,
    /// The room already has `--max-room-members` members.
    RoomFull,
    /// The token's room claims (or the connect hook) do not allow this room, or the
    /// application's hook refused the request.
    Forbidden,
    /// A `refresh` token was refused: invalid, expired, or for another user.
    BadToken,
    /// The application's hook could not be asked (timeout, error, full queue) and hooks fail
    /// closed: nothing was done; the client may try again.
    HookUnavailable,
    /// The send would store more for other users than the sender's budget has left
    /// (`--sender-bytes-per-minute`): nothing was stored or delivered; the client may send
    /// again once the budget has refilled.
    QuotaExceeded,
}

impl ErrorCode {
    /// The code string on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::BadEnvelope => "bad_envelope",
            ErrorCode::UnknownEvent => "unknown_event",
            ErrorCode::BadArgs => "bad_args",
            ErrorCode::Internal => "internal",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::BadRoom => "bad_room",
            ErrorCode::NotMember => "not_member",
            ErrorCode::RoomLimit => "room_limit",
            ErrorCode::RoomFull => "room_full",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::BadToken => "bad_token",
            ErrorCode::HookUnavailable => "hook_unavailable",
            ErrorCode::QuotaExceeded => "quota_exceeded",
        }
    }
}

/// Why the server closes an open WebSocket; each maps to one close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The server is shutting down: 1001.
    Shutdown,
    /// The client broke RFC 6455 (unmasked frame, bad opcode, ...): 1002.
    ProtocolError,
    /// The client sent a binary frame: 1003.
    BinaryFrame,
    /// A text frame was not valid UTF-8: 1007.
    InvalidUtf8,
    /// A message or frame exceeded `max_message_bytes`: 1009.
    MessageTooBig,
    /// Nothing was heard for `ping_interval + ping_timeout`: 4000.
    HeartbeatTimeout,
    /// More than `max_outbound_bytes` waited to be written: 4008.
    SlowConsumer,
    /// The client kept sending past its rate limit: 1008.
    RateLimited,
    /// A Socket.IO client sent the Engine.IO close packet `1`: 1000.
    ClientEnded,
    /// A Socket.IO connection joined no namespace within the handshake timeout: 4001.
    ConnectTimeout,
    /// A Socket.IO client broke the Engine.IO / Socket.IO framing: 4002.
    BadPacket,
    /// The user already has `--max-devices` connections in the cluster: 4009.
    DeviceLimit,
    /// The token's `exp` passed (plus `--jwt-leeway`) without a `refresh`: 4010.
    SessionExpired,
    /// `POST /api/disconnect` named the connection's user: 4011.
    Disconnected,
}

/// Close code for a client that stopped reading (outbound buffer over its bound).
pub const CLOSE_SLOW_CONSUMER: u16 = 4008;
/// Close code for a connection over the user's cluster-wide device limit.
pub const CLOSE_DEVICE_LIMIT: u16 = 4009;
/// Close code for a session whose token expired without a `refresh`.
pub const CLOSE_SESSION_EXPIRED: u16 = 4010;
/// Close code for a connection closed by `POST /api/disconnect`.
pub const CLOSE_DISCONNECTED: u16 = 4011;
/// Close code for a client that stopped answering pings.
pub const CLOSE_HEARTBEAT_TIMEOUT: u16 = 4000;

impl CloseReason {
    /// The RFC 6455 close code sent.
    pub fn code(self) -> u16 {
        match self {
            CloseReason::Shutdown => 1001,
            CloseReason::ProtocolError => 1002,
            CloseReason::BinaryFrame => 1003,
            CloseReason::InvalidUtf8 => 1007,
            CloseReason::MessageTooBig => 1009,
            CloseReason::HeartbeatTimeout => CLOSE_HEARTBEAT_TIMEOUT,
            CloseReason::SlowConsumer => CLOSE_SLOW_CONSUMER,
            CloseReason::RateLimited => 1008,
            CloseReason::ClientEnded => 1000,
            CloseReason::ConnectTimeout => 4001,
            CloseReason::BadPacket => 4002,
            CloseReason::DeviceLimit => CLOSE_DEVICE_LIMIT,
            CloseReason::SessionExpired => CLOSE_SESSION_EXPIRED,
            CloseReason::Disconnected => CLOSE_DISCONNECTED,
        }
    }

    /// The reason text sent in the close frame (at most 123 bytes by RFC 6455).
    pub fn text(self) -> &'static str {
        match self {
            CloseReason::Shutdown => "server shutting down",
            CloseReason::ProtocolError => "protocol error",
            CloseReason::BinaryFrame => "binary frames are not supported",
            CloseReason::InvalidUtf8 => "invalid utf-8",
            CloseReason::MessageTooBig => "message too big",
            CloseReason::HeartbeatTimeout => "heartbeat timeout",
            CloseReason::SlowConsumer => "slow consumer",
            CloseReason::RateLimited => "rate limit exceeded",
            CloseReason::ClientEnded => "engine.io close",
            CloseReason::ConnectTimeout => "no socket.io connect in time",
            CloseReason::BadPacket => "invalid socket.io packet",
            CloseReason::DeviceLimit => "device limit reached",
            CloseReason::SessionExpired => "session expired: refresh the token in time",
            CloseReason::Disconnected => "disconnected by the server",
        }
    }

    /// The close frame for this reason.
    pub fn frame(self) -> tungstenite::protocol::CloseFrame {
        tungstenite::protocol::CloseFrame {
            code: CloseCode::from(self.code()),
            reason: Utf8Bytes::from_static(self.text()),
        }
    }
}

/// A frame the client sent that could not be turned into an envelope.
#[derive(Debug, PartialEq, Eq)]
pub struct EnvelopeError {
    /// The error code to report.
    pub code: ErrorCode,
    /// A human-readable explanation.
    pub message: String,
    /// The `ack` number, when one could still be recovered from the frame.
    pub ack: Option<u64>,
}

/// Parses a client text frame. Fast path: one typed parse. Only when it fails is the frame parsed
/// again, untyped, to say precisely what is wrong.
pub fn parse_envelope(text: &str) -> Result<Envelope<'_>, EnvelopeError> {
    match serde_json::from_str::<Envelope<'_>>(text) {
        // `RawValue` skips `args` without serde_json's recursion limit: enforce it here, so a
        // frame is refused as bad_json whatever the handler does with its args.
        Ok(env) if env.args.is_some_and(|a| too_deep(a.get(), MAX_DEPTH - 1)) => {
            Err(EnvelopeError {
                code: ErrorCode::BadJson,
                message: format!("frame is not valid JSON: nested deeper than {MAX_DEPTH} levels"),
                ack: None,
            })
        }
        Ok(env) => Ok(env),
        Err(_) => Err(diagnose(text)),
    }
}

/// Deepest nesting of arrays and objects accepted in a frame (serde_json's own limit).
pub const MAX_DEPTH: usize = 128;

/// Whether already-validated JSON nests arrays/objects more than `limit` levels deep.
pub(crate) fn too_deep(json: &str, limit: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for b in json.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

fn diagnose(text: &str) -> EnvelopeError {
    let value: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            return EnvelopeError {
                code: ErrorCode::BadJson,
                message: format!("frame is not valid JSON: {e}"),
                ack: None,
            }
        }
    };
    let Some(obj) = value.as_object() else {
        return EnvelopeError {
            code: ErrorCode::BadEnvelope,
            message: "envelope must be a JSON object".into(),
            ack: None,
        };
    };
    let ack = obj.get("ack").and_then(Value::as_u64);
    let message = match (obj.get("event"), obj.get("ack")) {
        (None, _) => "envelope has no \"event\"",
        (Some(e), _) if !e.is_string() => "\"event\" must be a string",
        (_, Some(a)) if !a.is_u64() && !a.is_null() => "\"ack\" must be a non-negative integer",
        _ => "envelope is malformed",
    };
    EnvelopeError {
        code: ErrorCode::BadEnvelope,
        message: message.into(),
        ack,
    }
}

#[derive(Serialize)]
struct Outgoing<'a, T: ?Sized> {
    event: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    ack: Option<u64>,
    args: &'a T,
}

/// Encodes a server event once; the result is shared by every recipient.
pub fn encode_event<T: Serialize + ?Sized>(
    event: &str,
    args: &T,
) -> Result<Utf8Bytes, serde_json::Error> {
    encode(event, None, args)
}

fn encode<T: Serialize + ?Sized>(
    event: &str,
    ack: Option<u64>,
    args: &T,
) -> Result<Utf8Bytes, serde_json::Error> {
    serde_json::to_string(&Outgoing { event, ack, args }).map(Utf8Bytes::from)
}

/// An event encoded once, `{"event":E,"args":A}`, with where `,"args":` starts in it (so the
/// backplane can splice other fields in without re-encoding; see `backplane::wire`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchFrame {
    /// The complete text frame payload.
    pub frame: Utf8Bytes,
    /// Byte offset of `,"args":` in `frame`.
    pub args_at: usize,
}

/// Encodes `{"event":E,"args":A}` once, remembering where `,"args":` starts.
pub fn encode_dispatch_frame<T: Serialize + ?Sized>(
    event: &str,
    args: &T,
) -> Result<DispatchFrame, serde_json::Error> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(b"{\"event\":");
    serde_json::to_writer(&mut out, event)?;
    let args_at = out.len();
    out.extend_from_slice(b",\"args\":");
    serde_json::to_writer(&mut out, args)?;
    out.push(b'}');
    let text = String::from_utf8(out).map_err(|e| serde::ser::Error::custom(e.to_string()))?;
    Ok(DispatchFrame {
        frame: Utf8Bytes::from(text),
        args_at,
    })
}

/// `{"event": "ack", "ack": n, "args": result}` (without `ack` for `None`: the Socket.IO ack
/// packet carries the number instead).
pub fn encode_ack(ack: Option<u64>, result: &Value) -> Utf8Bytes {
    encode("ack", ack, result).unwrap_or_else(|_| Utf8Bytes::from_static("{}"))
}

/// `{"event": "error", ["ack": n,] "args": {"code": ..., "message": ...}}`.
pub fn encode_error(ack: Option<u64>, code: &str, message: &str) -> Utf8Bytes {
    #[derive(Serialize)]
    struct ErrorArgs<'a> {
        code: &'a str,
        message: &'a str,
    }
    encode("error", ack, &ErrorArgs { code, message })
        .unwrap_or_else(|_| Utf8Bytes::from_static("{}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_envelope() {
        let env = parse_envelope(r#"{"event":"sendMessage","args":{"to":"u2"},"ack":7}"#).unwrap();
        assert_eq!(env.event, "sendMessage");
        assert_eq!(env.args.unwrap().get(), r#"{"to":"u2"}"#);
        assert_eq!(env.ack, Some(7));
        let env = parse_envelope(r#"{"event":"x"}"#).unwrap();
        assert!(env.args.is_none() && env.ack.is_none());
    }

    #[test]
    fn escaped_event_names_are_decoded() {
        let env = parse_envelope(r#"{"event":"send\u004dessage"}"#).unwrap();
        assert_eq!(env.event, "sendMessage");
    }

    #[test]
    fn diagnoses_bad_frames() {
        assert_eq!(parse_envelope("{").unwrap_err().code, ErrorCode::BadJson);
        assert_eq!(
            parse_envelope("[1]").unwrap_err().code,
            ErrorCode::BadEnvelope
        );
        let e = parse_envelope(r#"{"args":1,"ack":3}"#).unwrap_err();
        assert_eq!((e.code, e.ack), (ErrorCode::BadEnvelope, Some(3)));
        assert_eq!(
            parse_envelope(r#"{"event":5}"#).unwrap_err().code,
            ErrorCode::BadEnvelope
        );
        let e = parse_envelope(r#"{"event":"x","ack":-1}"#).unwrap_err();
        assert!(e.message.contains("ack"));
    }

    #[test]
    fn deep_nesting_is_bad_json_not_a_crash() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let text = format!(r#"{{"event":"x","args":{deep}}}"#);
        assert_eq!(parse_envelope(&text).unwrap_err().code, ErrorCode::BadJson);
    }

    #[test]
    fn nesting_up_to_the_limit_is_accepted() {
        let ok = format!(
            r#"{{"event":"x","args":{}"[{{\"]"{}}}"#,
            "[".repeat(MAX_DEPTH - 1),
            "]".repeat(MAX_DEPTH - 1)
        );
        assert!(parse_envelope(&ok).is_ok());
        let deep = format!(
            r#"{{"event":"x","args":{}{}}}"#,
            "[".repeat(MAX_DEPTH),
            "]".repeat(MAX_DEPTH)
        );
        assert_eq!(parse_envelope(&deep).unwrap_err().code, ErrorCode::BadJson);
    }

    #[test]
    fn dispatch_frames_match_event_frames() {
        let args = serde_json::json!({"a": [1, "x"]});
        let d = encode_dispatch_frame("ev\"t", &args).unwrap();
        assert_eq!(d.frame, encode_event("ev\"t", &args).unwrap());
        assert!(d.frame.as_str()[d.args_at..].starts_with(",\"args\":"));
    }

    #[test]
    fn encodes_events_acks_and_errors() {
        let f = encode_event("newMessage", &serde_json::json!({"a": 1})).unwrap();
        assert_eq!(f.as_str(), r#"{"event":"newMessage","args":{"a":1}}"#);
        assert_eq!(
            encode_ack(Some(4), &Value::Null).as_str(),
            r#"{"event":"ack","ack":4,"args":null}"#
        );
        assert_eq!(
            encode_error(None, "bad_json", "x").as_str(),
            r#"{"event":"error","args":{"code":"bad_json","message":"x"}}"#
        );
    }
}
