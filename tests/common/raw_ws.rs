//! A WebSocket spoken by hand over a plain `TcpStream` (frames tungstenite will not send), and
//! the frame codec it uses.

use super::*;

/// A WebSocket spoken by hand over a plain `TcpStream`: for frames tungstenite will not send
/// (unmasked, invalid UTF-8) and for clients that never read or never answer pings.
pub struct RawWs {
    pub stream: TcpStream,
    /// Bytes read past the last returned frame.
    buf: Vec<u8>,
}

/// A frame as read by [`RawWs::read_frame`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl RawFrame {
    /// The close code of a close frame (1005 when it carries none).
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == 0x8).then(|| match self.payload.get(..2) {
            Some(b) => u16::from_be_bytes([b[0], b[1]]),
            None => 1005,
        })
    }
}

impl RawWs {
    /// Upgrades a fresh connection to `addr` with `?token=`; panics unless the answer is 101.
    pub fn connect(addr: SocketAddr, token: &str) -> Self {
        Self::upgrade(TcpStream::connect(addr).expect("connect"), token)
    }

    /// Upgrades an already connected stream.
    pub fn upgrade(stream: TcpStream, token: &str) -> Self {
        Self::upgrade_path(stream, &format!("/ws?token={token}"))
    }

    /// Upgrades a fresh connection to `addr` at `path_and_query` (e.g. `/socket.io/?...`).
    pub fn connect_path(addr: SocketAddr, path_and_query: &str) -> Self {
        Self::upgrade_path(TcpStream::connect(addr).expect("connect"), path_and_query)
    }

    /// Upgrades an already connected stream at `path_and_query`.
    pub fn upgrade_path(mut stream: TcpStream, path_and_query: &str) -> Self {
        stream.set_nodelay(true).unwrap();
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        let req = format!(
            "GET {path_and_query} HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\n\
             Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = stream.read(&mut chunk).expect("read the upgrade response");
            assert!(n > 0, "server closed during the upgrade");
            buf.extend_from_slice(&chunk[..n]);
        };
        assert!(
            buf.starts_with(b"HTTP/1.1 101 "),
            "upgrade refused: {}",
            String::from_utf8_lossy(&buf)
        );
        let rest = buf.split_off(head_end);
        RawWs { stream, buf: rest }
    }

    /// Writes one frame. `mask` is what a client must do; `rsv` sets RSV1-3 (bits 4-6).
    pub fn write_frame(&mut self, fin: bool, rsv: u8, opcode: u8, payload: &[u8], mask: bool) {
        self.stream
            .write_all(&encode_frame(fin, rsv, opcode, payload, mask))
            .expect("write frame");
    }

    /// A masked, final text frame with arbitrary (possibly invalid UTF-8) bytes.
    pub fn send_text_bytes(&mut self, payload: &[u8]) {
        self.write_frame(true, 0, 0x1, payload, true);
    }

    /// Reads the next frame; `None` at EOF, on a reset, or at the deadline.
    pub fn read_frame(&mut self, deadline: Instant) -> Option<RawFrame> {
        loop {
            if let Some((frame, used)) = decode_frame(&self.buf) {
                self.buf.drain(..used);
                return Some(frame);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 64 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads frames until a close frame (returns its code) or the end of the connection
    /// (returns `None`); `seen` counts the other frames by opcode.
    pub fn read_until_close(&mut self, deadline: Instant, seen: &mut Vec<u8>) -> Option<u16> {
        while let Some(frame) = self.read_frame(deadline) {
            if let Some(code) = frame.close_code() {
                return Some(code);
            }
            seen.push(frame.opcode);
        }
        None
    }
}

/// Encodes a client (or, unmasked, server) frame.
pub fn encode_frame(fin: bool, rsv: u8, opcode: u8, payload: &[u8], mask: bool) -> Vec<u8> {
    let mut out = vec![(u8::from(fin) << 7) | ((rsv & 0x7) << 4) | (opcode & 0xf)];
    let mask_bit = if mask { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= 0xffff => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if mask {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// Decodes one frame from the start of `buf`: the frame and the bytes it took.
pub fn decode_frame(buf: &[u8]) -> Option<(RawFrame, usize)> {
    let b0 = *buf.first()?;
    let b1 = *buf.get(1)?;
    let (len, mut at) = match b1 & 0x7f {
        126 => (
            u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let key = if b1 & 0x80 != 0 {
        let k: [u8; 4] = buf.get(at..at + 4)?.try_into().ok()?;
        at += 4;
        Some(k)
    } else {
        None
    };
    let mut payload = buf.get(at..at + len)?.to_vec();
    if let Some(k) = key {
        payload
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b ^= k[i % 4]);
    }
    let frame = RawFrame {
        fin: b0 & 0x80 != 0,
        opcode: b0 & 0x0f,
        payload,
    };
    Some((frame, at + len))
}
