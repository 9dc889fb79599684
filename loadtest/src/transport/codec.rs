//! WebSocket client wire codec: the HTTP upgrade handshake, RFC 6455 frames and masking.
//!
//! Why hand-rolled instead of tungstenite: the generator's read path must stay far cheaper
//! than the server it measures. tungstenite copies every message into an owned buffer and
//! UTF-8-validates it; here a delivery costs one header parse plus one substring search over
//! bytes still sitting in the 64 KiB read buffer. The codec is deliberately small (client
//! role only, no extensions) and every branch that a peer controls returns an error instead
//! of panicking.

use crate::rng::splitmix64;
use base64::Engine as _;
use sha1::{Digest, Sha1};

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Largest handshake response we accept; a longer one means we are not talking to the server.
const MAX_HANDSHAKE_BYTES: usize = 16 * 1024;

const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// A parsed frame header; the payload is `buf[header_len .. header_len + payload_len]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    pub opcode: u8,
    pub header_len: usize,
    pub payload_len: usize,
}

impl FrameHeader {
    pub fn total_len(&self) -> usize {
        self.header_len + self.payload_len
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// RFC 6455 5.1: a client must fail the connection on a masked server frame.
    MaskedServerFrame,
    ReservedBits,
    UnknownOpcode(u8),
    /// Control frames must be final and at most 125 bytes (RFC 6455 5.5).
    BadControlFrame,
    /// The most significant bit of a 64-bit length must be zero.
    BadLength,
    TooLarge(u64),
}

impl std::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::MaskedServerFrame => write!(f, "masked frame from server"),
            Self::ReservedBits => write!(f, "reserved bits set"),
            Self::UnknownOpcode(op) => write!(f, "unknown opcode {op:#x}"),
            Self::BadControlFrame => write!(f, "fragmented or oversized control frame"),
            Self::BadLength => write!(f, "invalid 64-bit payload length"),
            Self::TooLarge(n) => write!(f, "frame of {n} bytes exceeds the limit"),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Parse {
    /// Not enough bytes yet for the whole frame (header and payload).
    Incomplete,
    Frame(FrameHeader),
    Error(ProtocolError),
}

/// Parses one server frame at the start of `buf`. Returns `Frame` only when the whole
/// payload is present, so callers can hand out a borrowed slice without copying.
pub fn parse_frame(buf: &[u8], max_payload: usize) -> Parse {
    if buf.len() < 2 {
        return Parse::Incomplete;
    }
    let b0 = buf[0];
    let b1 = buf[1];
    let fin = b0 & 0x80 != 0;
    if b0 & 0x70 != 0 {
        return Parse::Error(ProtocolError::ReservedBits);
    }
    let opcode = b0 & 0x0F;
    match opcode {
        OP_CONTINUATION | OP_TEXT | OP_BINARY => {}
        OP_CLOSE | OP_PING | OP_PONG => {
            if !fin || (b1 & 0x7F) > 125 {
                return Parse::Error(ProtocolError::BadControlFrame);
            }
        }
        other => return Parse::Error(ProtocolError::UnknownOpcode(other)),
    }
    if b1 & 0x80 != 0 {
        return Parse::Error(ProtocolError::MaskedServerFrame);
    }
    let (header_len, len) = match b1 & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Parse::Incomplete;
            }
            (4, u64::from(u16::from_be_bytes([buf[2], buf[3]])))
        }
        127 => {
            if buf.len() < 10 {
                return Parse::Incomplete;
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let n = u64::from_be_bytes(b);
            if n >> 63 != 0 {
                return Parse::Error(ProtocolError::BadLength);
            }
            (10, n)
        }
        n => (2, u64::from(n)),
    };
    if len > max_payload as u64 {
        return Parse::Error(ProtocolError::TooLarge(len));
    }
    // Checked above against max_payload, which is a usize.
    let payload_len = len as usize;
    if buf.len() < header_len + payload_len {
        return Parse::Incomplete;
    }
    Parse::Frame(FrameHeader {
        fin,
        opcode,
        header_len,
        payload_len,
    })
}

/// XORs `data` with the 4-byte masking key (RFC 6455 5.3); the same call unmasks.
pub fn apply_mask(data: &mut [u8], mask: [u8; 4]) {
    // Word-at-a-time: payloads are small, but this is on the hot send path.
    let word = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(b) ^ word).to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i & 3];
    }
}

/// A fresh masking key from `rng` (one splitmix64 step). RFC 6455 5.3 asks only that the
/// server cannot predict it; a load generator needs no cryptographic source.
pub fn mask(rng: &mut u64) -> [u8; 4] {
    *rng = splitmix64(*rng);
    (*rng as u32).to_le_bytes()
}

/// The 16 random bytes of a Sec-WebSocket-Key, from `rng` (two splitmix64 steps).
pub fn key_bytes(rng: &mut u64) -> [u8; 16] {
    let mut key = [0u8; 16];
    for half in key.chunks_exact_mut(8) {
        *rng = splitmix64(*rng);
        half.copy_from_slice(&rng.to_le_bytes());
    }
    key
}

/// Appends one masked client frame (FIN set) carrying `payload` to `out`.
pub fn encode_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(0x80 | (opcode & 0x0F));
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= usize::from(u16::MAX) {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], mask);
}

/// Appends the pong answering a ping that carried `payload`.
pub fn encode_pong(out: &mut Vec<u8>, payload: &[u8], mask: [u8; 4]) {
    encode_frame(out, OP_PONG, payload, mask);
}

/// Appends the close frame answering a server close with `payload`: it echoes the status
/// code, if any (RFC 6455 5.5.1).
pub fn encode_close_reply(out: &mut Vec<u8>, payload: &[u8], mask: [u8; 4]) {
    encode_frame(out, OP_CLOSE, payload.get(..2).unwrap_or(&[]), mask);
}

/// Appends a close frame with status 1000 (normal closure).
pub fn encode_close_normal(out: &mut Vec<u8>, mask: [u8; 4]) {
    encode_frame(out, OP_CLOSE, &1000u16.to_be_bytes(), mask);
}

/// The disconnect reason for a server close frame with this payload.
pub fn server_close_reason(payload: &[u8]) -> String {
    match payload {
        [a, b, ..] => format!("server close {}", u16::from_be_bytes([*a, *b])),
        _ => "server close".to_owned(),
    }
}

/// Builds the HTTP/1.1 upgrade request for `path` (which carries `?token=`).
pub fn handshake_request(host: &str, path: &str, key: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
}

/// A fresh Sec-WebSocket-Key from 16 random bytes.
pub fn handshake_key(random: [u8; 16]) -> String {
    base64::engine::general_purpose::STANDARD.encode(random)
}

/// The upgrade request for `path` with a key made of `random`, and the accept value the
/// server must answer with.
pub fn upgrade(host: &str, path: &str, random: [u8; 16]) -> (Vec<u8>, String) {
    let key = handshake_key(random);
    (handshake_request(host, path, &key), accept_for(&key))
}

/// The Sec-WebSocket-Accept value the server must answer for `key`.
pub fn accept_for(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.as_bytes());
    h.update(WS_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

#[derive(Debug, PartialEq, Eq)]
pub enum Handshake {
    Incomplete,
    /// Upgrade accepted; frames start at `header_len`.
    Accepted {
        header_len: usize,
    },
    Rejected(String),
}

/// Parses the server's upgrade response at the start of `buf`.
pub fn parse_handshake(buf: &[u8], expected_accept: &str) -> Handshake {
    let Some(end) = memchr::memmem::find(buf, b"\r\n\r\n") else {
        if buf.len() > MAX_HANDSHAKE_BYTES {
            return Handshake::Rejected("handshake response too large".into());
        }
        return Handshake::Incomplete;
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or("");
    let mut parts = status.split_whitespace();
    let _version = parts.next();
    let code = parts.next().unwrap_or("");
    if code != "101" {
        // Keep the reason short: it becomes a key in the failure histogram.
        return Handshake::Rejected(format!("http {}", if code.is_empty() { "?" } else { code }));
    }
    let mut accept_ok = false;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("sec-websocket-accept") {
                accept_ok = value.trim() == expected_accept;
            }
        }
    }
    if !accept_ok {
        return Handshake::Rejected("bad Sec-WebSocket-Accept".into());
    }
    Handshake::Accepted {
        header_len: end + 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testserver::server_frame;

    /// Decodes a masked client frame the way a server would, to check our encoder.
    fn decode_client(buf: &[u8]) -> (u8, Vec<u8>) {
        assert!(buf[1] & 0x80 != 0, "client frames must be masked");
        let (hl, len) = match buf[1] & 0x7F {
            126 => (4, u16::from_be_bytes([buf[2], buf[3]]) as usize),
            127 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&buf[2..10]);
                (10, u64::from_be_bytes(b) as usize)
            }
            n => (2, n as usize),
        };
        let mut mask = [0u8; 4];
        mask.copy_from_slice(&buf[hl..hl + 4]);
        let mut payload = buf[hl + 4..hl + 4 + len].to_vec();
        apply_mask(&mut payload, mask);
        assert_eq!(buf.len(), hl + 4 + len);
        (buf[0] & 0x0F, payload)
    }

    #[test]
    fn masking_round_trips_and_matches_rfc_example() {
        // RFC 6455 5.7: "Hello" masked with 37 fa 21 3d.
        let mut data = *b"Hello";
        apply_mask(&mut data, [0x37, 0xfa, 0x21, 0x3d]);
        assert_eq!(data, [0x7f, 0x9f, 0x4d, 0x51, 0x58]);
        let mut long: Vec<u8> = (0..=255u8).collect();
        let orig = long.clone();
        apply_mask(&mut long, [1, 2, 3, 4]);
        assert_ne!(long, orig);
        for (i, (a, b)) in long.iter().zip(&orig).enumerate() {
            assert_eq!(*a, *b ^ [1, 2, 3, 4][i % 4]);
        }
        apply_mask(&mut long, [1, 2, 3, 4]);
        assert_eq!(long, orig);
    }

    #[test]
    fn mask_keys_come_from_the_rng_and_mask_a_frame() {
        // Same seed, same keys; each call advances the stream.
        let (mut a, mut b) = (7u64, 7u64);
        let k1 = mask(&mut a);
        assert_eq!(k1, mask(&mut b));
        assert_ne!(mask(&mut a), k1);
        assert_eq!(k1, (splitmix64(7) as u32).to_le_bytes());
        let mut r = 7u64;
        let key = key_bytes(&mut r);
        assert_eq!(key[..8], splitmix64(7).to_le_bytes());
        assert_eq!(key[8..], splitmix64(splitmix64(7)).to_le_bytes());
        assert_eq!(handshake_key(key).len(), 24);
        // RFC 6455 5.7: a masked "Hello" with key 37 fa 21 3d, as a whole frame.
        let mut out = Vec::new();
        encode_frame(&mut out, OP_TEXT, b"Hello", [0x37, 0xfa, 0x21, 0x3d]);
        assert_eq!(
            out,
            [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58]
        );
    }

    #[test]
    fn control_replies() {
        let mut out = Vec::new();
        encode_close_reply(&mut out, &[0x03, 0xe9, b'b', b'y'], [1, 2, 3, 4]);
        assert_eq!(decode_client(&out), (OP_CLOSE, vec![0x03, 0xe9]));
        out.clear();
        encode_close_reply(&mut out, &[], [1, 2, 3, 4]);
        assert_eq!(decode_client(&out), (OP_CLOSE, vec![]));
        out.clear();
        encode_close_normal(&mut out, [1, 2, 3, 4]);
        assert_eq!(decode_client(&out), (OP_CLOSE, vec![0x03, 0xe8]));
        assert_eq!(
            server_close_reason(&[0x03, 0xe9, b'x']),
            "server close 1001"
        );
        assert_eq!(server_close_reason(&[]), "server close");
    }

    #[test]
    fn encodes_all_length_forms() {
        for n in [0usize, 5, 125, 126, 1000, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
            let mut out = Vec::new();
            encode_frame(&mut out, OP_TEXT, &payload, [9, 8, 7, 6]);
            let (op, got) = decode_client(&out);
            assert_eq!(op, OP_TEXT);
            assert_eq!(got, payload, "length {n}");
        }
    }

    #[test]
    fn parses_7_16_and_64_bit_lengths() {
        for n in [0usize, 125, 126, 65535, 65536, 200_000] {
            let payload = vec![b'a'; n];
            let f = server_frame(true, OP_TEXT, &payload);
            match parse_frame(&f, 1 << 20) {
                Parse::Frame(h) => {
                    assert_eq!(h.payload_len, n);
                    assert_eq!(h.total_len(), f.len());
                    assert!(h.fin);
                }
                other => panic!("{n}: {other:?}"),
            }
        }
    }

    #[test]
    fn partial_frames_are_incomplete_at_every_cut() {
        let f = server_frame(true, OP_TEXT, &vec![b'x'; 300]);
        for cut in 0..f.len() {
            assert_eq!(
                parse_frame(&f[..cut], 1 << 20),
                Parse::Incomplete,
                "cut {cut}"
            );
        }
        assert!(matches!(parse_frame(&f, 1 << 20), Parse::Frame(_)));
        // Two frames back to back: the first parses and reports its exact length.
        let mut two = f.clone();
        two.extend(server_frame(true, OP_PING, b"p"));
        let Parse::Frame(h) = parse_frame(&two, 1 << 20) else {
            panic!("first frame")
        };
        let Parse::Frame(h2) = parse_frame(&two[h.total_len()..], 1 << 20) else {
            panic!("second frame")
        };
        assert_eq!(h2.opcode, OP_PING);
    }

    #[test]
    fn rejects_malformed_frames() {
        let masked = [0x81, 0x81, 1, 2, 3, 4, b'a'];
        assert_eq!(
            parse_frame(&masked, 100),
            Parse::Error(ProtocolError::MaskedServerFrame)
        );
        assert_eq!(
            parse_frame(&[0xC1, 0], 100),
            Parse::Error(ProtocolError::ReservedBits)
        );
        assert_eq!(
            parse_frame(&[0x83, 0], 100),
            Parse::Error(ProtocolError::UnknownOpcode(3))
        );
        // Fragmented ping.
        assert_eq!(
            parse_frame(&[0x09, 0], 100),
            Parse::Error(ProtocolError::BadControlFrame)
        );
        // Ping claiming 126 bytes.
        assert_eq!(
            parse_frame(&[0x89, 126, 0, 126], 1000),
            Parse::Error(ProtocolError::BadControlFrame)
        );
        let mut huge = vec![0x81, 127];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(
            parse_frame(&huge, 100),
            Parse::Error(ProtocolError::BadLength)
        );
        assert_eq!(
            parse_frame(&server_frame(true, OP_TEXT, &[0; 200]), 100),
            Parse::Error(ProtocolError::TooLarge(200))
        );
    }

    #[test]
    fn ping_payload_becomes_masked_pong() {
        let ping = server_frame(true, OP_PING, b"hb-42");
        let Parse::Frame(h) = parse_frame(&ping, 1024) else {
            panic!("ping")
        };
        assert_eq!(h.opcode, OP_PING);
        let payload = &ping[h.header_len..h.total_len()];
        let mut out = Vec::new();
        encode_frame(&mut out, OP_PONG, payload, [0xde, 0xad, 0xbe, 0xef]);
        let (op, got) = decode_client(&out);
        assert_eq!(op, OP_PONG);
        assert_eq!(got, b"hb-42");
    }

    #[test]
    fn handshake_accept_key_matches_rfc() {
        // RFC 6455 1.3 example.
        assert_eq!(
            accept_for("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn handshake_response_parsing() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let acc = accept_for(key);
        let ok = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nsec-websocket-accept: {acc}\r\n\r\n"
        );
        let mut b = ok.into_bytes();
        b.extend_from_slice(&[0x81, 0x00]);
        let b = b.as_slice();
        assert_eq!(parse_handshake(&b[..20], &acc), Handshake::Incomplete);
        let Handshake::Accepted { header_len } = parse_handshake(b, &acc) else {
            panic!("accepted")
        };
        assert_eq!(&b[header_len..], b"\x81\x00");
        let denied = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(
            parse_handshake(denied, &acc),
            Handshake::Rejected("http 401".into())
        );
        let wrong = "HTTP/1.1 101 OK\r\nSec-WebSocket-Accept: nope\r\n\r\n";
        assert!(matches!(
            parse_handshake(wrong.as_bytes(), &acc),
            Handshake::Rejected(_)
        ));
        let req = String::from_utf8(handshake_request("h:1", "/ws?token=u1", key)).unwrap();
        assert!(req.starts_with("GET /ws?token=u1 HTTP/1.1\r\n"));
        assert!(req.ends_with("\r\n\r\n"));
    }
}
