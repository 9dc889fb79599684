//! One client socket through its life: reading the HTTP request, answering plain HTTP, then the
//! open WebSocket. The core loop owns every [`Connection`] in its slab and moves it between
//! states; the state owns the stream, so a connection cannot be in two states at once.

use std::io::{self, Read, Write};
use std::time::Instant;

use mio::net::TcpStream;
use tungstenite::WebSocket;

use crate::metrics::Closed;
use crate::UserId;

/// A TCP stream that counts the bytes written through it, for `switchboard_bytes_out_total`.
#[derive(Debug)]
pub struct Stream {
    tcp: TcpStream,
    written: u64,
    /// The last read returned less than asked: the socket was empty then. The next read
    /// answers WouldBlock without a syscall; a new readable edge clears this (see
    /// [`Stream::readable_edge`]), because data arriving later raises one.
    drained: bool,
}

impl Stream {
    /// Wraps an accepted stream.
    pub fn new(tcp: TcpStream) -> Self {
        Stream {
            tcp,
            written: 0,
            drained: false,
        }
    }

    /// The socket, for (de)registration.
    pub fn tcp(&mut self) -> &mut TcpStream {
        &mut self.tcp
    }

    /// A readable event arrived: the next read must ask the socket.
    pub fn readable_edge(&mut self) {
        self.drained = false;
    }

    /// Bytes written since the last call.
    pub fn take_written(&mut self) -> u64 {
        std::mem::take(&mut self.written)
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.drained {
            self.drained = false;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = self.tcp.read(buf)?;
        // Edge-triggered epoll reports data that arrives after this read, so a short read
        // spares the read that would only say WouldBlock.
        self.drained = n > 0 && n < buf.len();
        Ok(n)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.tcp.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tcp.flush()
    }
}

/// A connection in one of its states.
// Most slab entries are `Open`, so boxing it would only add an indirection per connection.
#[allow(clippy::large_enum_variant)]
pub enum Connection {
    /// Accepted; reading the HTTP request head.
    Request(PendingRequest),
    /// Writing a plain HTTP response, then closing.
    Reply(Reply),
    /// An upgraded WebSocket.
    Open(Open),
    /// Reading the body of a request (`POST /api/publish`).
    Body(PendingBody),
    /// A plain HTTP request whose answer comes from another thread (a Redis query).
    Waiting(Waiting),
}

/// Reading a request body up to its `Content-Length`.
pub struct PendingBody {
    /// The socket.
    pub stream: TcpStream,
    /// The request head.
    pub request: crate::http::Request,
    /// The body so far.
    pub body: Vec<u8>,
    /// The whole body's length.
    pub len: usize,
    /// When the body must be complete.
    pub deadline: Instant,
}

/// Holding the socket until an answer arrives from another thread, or the deadline (503).
pub struct Waiting {
    /// The socket.
    pub stream: TcpStream,
    /// Matches the answer to this connection (see [`Open::serial`]).
    pub serial: u64,
    /// When the client gets a 503 instead.
    pub deadline: Instant,
}

/// Reading the request head, before the handshake deadline.
pub struct PendingRequest {
    /// The socket.
    pub stream: TcpStream,
    /// Bytes read so far (at most `max_request_header_bytes`).
    pub buf: Vec<u8>,
    /// When the request must be complete.
    pub deadline: Instant,
}

/// A plain HTTP response being written; afterwards the request side is drained until the
/// client closes, so the response is not lost to a TCP reset.
pub struct Reply {
    /// The socket.
    pub stream: TcpStream,
    /// The whole response.
    pub out: Vec<u8>,
    /// How much of `out` is written.
    pub written: usize,
    /// Response written and write side shut: only draining remains.
    pub lingering: bool,
    /// When the connection is dropped whatever its state.
    pub deadline: Instant,
}

/// An open WebSocket.
pub struct Open {
    /// The WebSocket over the counted stream.
    pub ws: WebSocket<Stream>,
    /// The verified user.
    pub user: UserId,
    /// Last time any frame arrived.
    pub last_heard: Instant,
    /// When the next server ping is due.
    pub next_ping: Instant,
    /// Set when a close handshake began: the connection is dropped at this instant at the latest.
    pub closing: Option<Instant>,
    /// Why the server is closing it, counted when the connection is finally removed.
    pub ended: Option<Closed>,
    /// Queued output awaits the end-of-turn flush (the key is in the core's dirty list).
    pub dirty: bool,
    /// Still listed in the core's user index.
    pub indexed: bool,
    /// Per-core number of this connection, so a late answer meant for an earlier connection in
    /// the same slab slot is recognised and dropped.
    pub serial: u64,
    /// The offset of the newest event sent (history on): anything at or below is a duplicate.
    pub last_offset: Option<crate::history::Offset>,
    /// Set while the connection waits for its replay (`?since=`). Boxed: most connections
    /// never recover, and each byte here is paid by every idle connection.
    pub recovering: Option<Box<crate::history::Recovering>>,
    /// The connection's rate limit for text frames.
    pub bucket: TokenBucket,
    /// Socket.IO state when the connection came through `/socket.io/` (`None`: native).
    pub sio: Option<Box<crate::socketio::Session>>,
    /// Where the connection stands in its user's presence count.
    pub counted: Counted,
}

/// A connection's place in its user's presence and device count (rooms on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// Not counted: rooms off, refused at the device limit, or already uncounted.
    No,
    /// Asked Redis to count it; the verdict has not arrived.
    Pending,
    /// Counted: it must be uncounted when it is unindexed.
    Yes,
}

/// A token bucket: `rate` tokens a second up to `burst`; one token per client text frame.
/// Consecutive refusals are counted so a client that keeps flooding can be closed.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    tokens: f32,
    refilled: Instant,
    /// Frames refused in a row.
    pub refused: u32,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(burst: u32, now: Instant) -> Self {
        TokenBucket {
            tokens: burst as f32,
            refilled: now,
            refused: 0,
        }
    }

    /// Takes one token; `false` (and one more refusal) when the bucket is empty. A `rate` of 0
    /// means no limit.
    pub fn take(&mut self, rate: u32, burst: u32, now: Instant) -> bool {
        if rate == 0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f32();
        self.tokens = (self.tokens + elapsed * rate as f32).min(burst as f32);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.refused = 0;
            true
        } else {
            self.refused += 1;
            false
        }
    }
}

impl Connection {
    /// The socket, whatever the state.
    pub fn tcp(&mut self) -> &mut TcpStream {
        match self {
            Connection::Request(r) => &mut r.stream,
            Connection::Reply(r) => &mut r.stream,
            Connection::Open(o) => o.ws.get_mut().tcp(),
            Connection::Body(b) => &mut b.stream,
            Connection::Waiting(w) => &mut w.stream,
        }
    }
}

impl Reply {
    /// Writes what it can. `Ok(true)` once everything is written.
    pub fn write_some(&mut self) -> io::Result<bool> {
        while self.written < self.out.len() {
            match self.stream.write(&self.out[self.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Reads and discards input. `Ok(true)` when the client closed its side.
    pub fn drain_input(&mut self) -> io::Result<bool> {
        let mut scratch = [0u8; 4096];
        loop {
            match self.stream.read(&mut scratch) {
                Ok(0) => return Ok(true),
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::TokenBucket;
    use std::time::{Duration, Instant};

    #[test]
    fn bucket_allows_the_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(3, t0);
        assert!((0..3).all(|_| b.take(10, 3, t0)));
        assert!(!b.take(10, 3, t0));
        assert!(!b.take(10, 3, t0));
        assert_eq!(b.refused, 2);
        // 100 ms at 10/s refills one token.
        assert!(b.take(10, 3, t0 + Duration::from_millis(100)));
        assert_eq!(b.refused, 0);
        // Never more than the burst, however long the pause.
        let later = t0 + Duration::from_secs(60);
        assert!((0..3).all(|_| b.take(10, 3, later)));
        assert!(!b.take(10, 3, later));
    }

    #[test]
    fn rate_zero_is_no_limit() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1, t0);
        assert!((0..1000).all(|_| b.take(0, 1, t0)));
    }
}
