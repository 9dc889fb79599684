//! One client socket through its life: reading the HTTP request, answering plain HTTP, then the
//! open WebSocket. The core loop owns every [`Connection`] in its table and moves it between
//! states; the state owns the stream, so a connection cannot be in two states at once.
//!
//! Each state's rules are methods that return an outcome for the loop to act on
//! ([`HeadOutcome`], [`BodyOutcome`], [`ReplyOutcome`], [`ReadOutcome`], [`WriteOutcome`],
//! [`FlushOutcome`], [`TickOutcome`]); those that touch the socket are generic over the stream,
//! so they are tested here over an in-memory one.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use mio::net::TcpStream;

#[cfg(test)]
mod mock;
mod open;
mod reply;
mod request;
mod tls;

pub use open::{FlushOutcome, Open, ReadOutcome, TickOutcome, WriteOutcome};
pub use reply::{BodyOutcome, PendingBody, Reply, ReplyOutcome, ShutWrite, Waiting};
pub use request::{HeadOutcome, PendingRequest};
pub use tls::{crypto_provider, ServerTls, Socket};

/// A client socket that counts the bytes written through it, for `switchboard_bytes_out_total`.
#[derive(Debug)]
pub struct Stream {
    tcp: Socket,
    written: u64,
    /// The last read returned less than asked: the socket was empty then. The next read
    /// answers WouldBlock without a syscall; a new readable edge clears this (see
    /// [`Stream::readable_edge`]), because data arriving later raises one.
    drained: bool,
    /// Bytes the last write left unwritten: what the WebSocket still holds for the socket
    /// (tungstenite writes its whole output buffer in each call).
    backlog: usize,
}

impl Stream {
    /// Wraps an accepted socket.
    pub fn new(tcp: Socket) -> Self {
        Stream {
            tcp,
            written: 0,
            drained: false,
            backlog: 0,
        }
    }

    /// The TCP socket, for (de)registration.
    pub fn tcp(&mut self) -> &mut TcpStream {
        self.tcp.tcp()
    }

    /// A readable event arrived: the next read must ask the socket.
    pub fn readable_edge(&mut self) {
        self.drained = false;
    }

    /// Bytes written since the last call.
    pub fn take_written(&mut self) -> u64 {
        std::mem::take(&mut self.written)
    }

    /// Bytes the last write left queued (0 when the socket took everything).
    pub fn backlog(&self) -> usize {
        self.backlog
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
        self.drained = n > 0 && n < buf.len() && self.tcp.short_read_drains();
        Ok(n)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.tcp.write(buf).inspect_err(|e| {
            if e.kind() == io::ErrorKind::WouldBlock {
                self.backlog = buf.len();
            }
        })?;
        self.written += n as u64;
        self.backlog = buf.len() - n;
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
            Connection::Request(r) => r.stream.tcp(),
            Connection::Reply(r) => r.stream.tcp(),
            Connection::Open(o) => o.ws.get_mut().tcp(),
            Connection::Body(b) => b.stream.tcp(),
            Connection::Waiting(w) => w.stream.tcp(),
        }
    }

    /// A plain HTTP connection moves on to writing `out`, then closing; an open WebSocket is
    /// returned unchanged (replies are only sent before an upgrade).
    pub fn into_reply(self, out: Vec<u8>, deadline: Instant) -> Connection {
        let stream = match self {
            Connection::Request(r) => r.stream,
            Connection::Reply(r) => r.stream,
            Connection::Body(b) => b.stream,
            Connection::Waiting(w) => w.stream,
            open @ Connection::Open(_) => return open,
        };
        Connection::Reply(Reply {
            stream,
            out,
            written: 0,
            lingering: false,
            deadline,
        })
    }

    /// A request (or its body) is parked until another thread answers for `serial`; any other
    /// state is returned unchanged.
    pub fn into_waiting(self, serial: u64, deadline: Instant) -> Connection {
        let stream = match self {
            Connection::Request(r) => r.stream,
            Connection::Body(b) => b.stream,
            other => return other,
        };
        Connection::Waiting(Waiting {
            stream,
            serial,
            deadline,
        })
    }

    /// A waiting request goes back to reading (an upgrade whose hook allowed it goes on from
    /// there); any other state is returned unchanged.
    pub fn into_request(self, deadline: Instant) -> Connection {
        match self {
            Connection::Waiting(w) => Connection::Request(PendingRequest {
                stream: w.stream,
                buf: Vec::new(),
                deadline,
            }),
            other => other,
        }
    }

    /// What is due at a sweep at `now` (see [`Open::tick`] for an open connection).
    pub fn tick(&mut self, now: Instant, idle_timeout: Duration, ping: Duration) -> TickOutcome {
        let deadline = match self {
            Connection::Open(open) => return open.tick(now, idle_timeout, ping),
            Connection::Request(r) => r.deadline,
            Connection::Reply(r) => r.deadline,
            Connection::Body(b) => b.deadline,
            Connection::Waiting(w) if now >= w.deadline => return TickOutcome::WaitedOut,
            Connection::Waiting(_) => return TickOutcome::Idle,
        };
        if now >= deadline {
            TickOutcome::Expired
        } else {
            TickOutcome::Idle
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Connection, PendingRequest, TickOutcome, TokenBucket};
    use std::time::{Duration, Instant};

    fn request(deadline: Instant) -> Connection {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        tcp.set_nonblocking(true).unwrap();
        Connection::Request(PendingRequest {
            stream: super::Socket::Plain(mio::net::TcpStream::from_std(tcp)),
            buf: Vec::new(),
            deadline,
        })
    }

    #[test]
    fn transitions_keep_the_socket_and_refuse_the_wrong_state() {
        let t0 = Instant::now();
        let second = Duration::from_secs(1);
        let waiting = request(t0).into_waiting(7, t0 + second);
        assert!(matches!(&waiting, Connection::Waiting(w) if w.serial == 7));
        // Only a request or a body waits; a waiting connection stays as it is.
        let again = waiting.into_waiting(8, t0);
        assert!(matches!(&again, Connection::Waiting(w) if w.serial == 7));
        let back = again.into_request(t0 + second);
        assert!(matches!(&back, Connection::Request(r) if r.deadline == t0 + second));
        let again = back.into_waiting(7, t0 + second);
        let reply = again.into_reply(b"HTTP/1.1 503".to_vec(), t0 + second);
        assert!(matches!(&reply, Connection::Reply(r) if r.written == 0 && !r.lingering));
    }

    #[test]
    fn tick_reports_passed_deadlines() {
        let t0 = Instant::now();
        let (idle, ping) = (Duration::from_secs(60), Duration::from_secs(30));
        let mut conn = request(t0 + Duration::from_secs(1));
        assert_eq!(conn.tick(t0, idle, ping), TickOutcome::Idle);
        assert_eq!(
            conn.tick(t0 + Duration::from_secs(1), idle, ping),
            TickOutcome::Expired
        );
        let mut waiting = conn.into_waiting(1, t0 + Duration::from_secs(5));
        assert_eq!(waiting.tick(t0, idle, ping), TickOutcome::Idle);
        assert_eq!(
            waiting.tick(t0 + Duration::from_secs(5), idle, ping),
            TickOutcome::WaitedOut
        );
    }

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
