//! The non-blocking client the mio scenarios share: connect a socket (optionally from a chosen
//! source address), upgrade it, and move bytes in and out of a [`WsStream`] without blocking.
//! What a frame means, and what to do when a socket goes away, stays with the caller.

use crate::transport::codec::{self, Handshake};
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use nix::sys::socket::{setsockopt, sockopt};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};

/// Starts a non-blocking TCP connect to `addr`, from `source` if given (its port chosen at
/// connect time, per 4-tuple), registered for reads and writes under `token`.
pub fn connect_socket(
    registry: &Registry,
    token: Token,
    addr: SocketAddr,
    source: Option<IpAddr>,
) -> io::Result<TcpStream> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    sock.set_nonblocking(true)?;
    sock.set_tcp_nodelay(true)?;
    if let Some(ip) = source {
        setsockopt(&sock, sockopt::IpBindAddressNoPort, &true)?;
        sock.bind(&SocketAddr::new(ip, 0).into())?;
    }
    match sock.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EINPROGRESS as i32) => {}
        Err(e) => return Err(e),
    }
    let mut stream = TcpStream::from_std(std::net::TcpStream::from(sock));
    registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)?;
    Ok(stream)
}

/// After a readiness event on a connecting socket: `Ok(true)` once connected, `Ok(false)` on
/// a spurious wake-up (still in progress), `Err` when the connect failed.
pub fn connect_done(stream: &TcpStream) -> io::Result<bool> {
    if let Some(e) = stream.take_error()? {
        return Err(e);
    }
    match stream.peer_addr() {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
        Err(e) => Err(e),
    }
}

/// Writes as much of `buf` as the socket takes; returns the bytes written and, if the socket
/// failed, why (WouldBlock is not a failure).
pub fn write_some(stream: &mut TcpStream, buf: &[u8]) -> (usize, Option<String>) {
    let mut done = 0;
    while done < buf.len() {
        match stream.write(&buf[done..]) {
            Ok(0) => return (done, Some("write returned 0".to_owned())),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (done, Some(reason(&e))),
        }
    }
    (done, None)
}

/// What one read from a non-blocking socket gave.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadResult {
    /// `n` bytes are at the start of the buffer.
    Data(usize),
    /// Nothing more to read now (WouldBlock), or there is no socket.
    Drained,
    /// The socket is gone: `"eof"` or the I/O error's [`reason`].
    Gone(String),
}

/// One read into `buf`, retried on EINTR.
pub fn read_some(stream: &mut TcpStream, buf: &mut [u8]) -> ReadResult {
    loop {
        return match stream.read(buf) {
            Ok(0) => ReadResult::Gone("eof".to_owned()),
            Ok(n) => ReadResult::Data(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => ReadResult::Drained,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => ReadResult::Gone(reason(&e)),
        };
    }
}

/// A short name for an I/O error, used as a failure or disconnect reason.
pub fn reason(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => nix::errno::Errno::from_raw(code).desc().to_owned(),
        None => format!("{:?}", e.kind()),
    }
}

/// Bytes queued for a socket, and how many of them are already written.
#[derive(Default)]
pub struct Outbox {
    buf: Vec<u8>,
    pos: usize,
}

impl Outbox {
    /// The queue to append frames to.
    pub fn queue(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Bytes queued and not written yet.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Writes what the socket takes (see [`write_some`]); the written bytes leave the queue.
    pub fn flush(&mut self, stream: &mut TcpStream) -> (usize, Option<String>) {
        let (n, failed) = write_some(stream, &self.buf[self.pos..]);
        self.pos += n;
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > 1 << 20 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        (n, failed)
    }
}

/// One client connection's wire state: the socket (None when closed), unparsed input, queued
/// output, and the accept value its upgrade waits for.
#[derive(Default)]
pub struct WsStream {
    pub stream: Option<TcpStream>,
    /// Bytes read and not parsed yet (the upgrade response, or an incomplete frame).
    pub rbuf: Vec<u8>,
    pub out: Outbox,
    accept: String,
}

impl WsStream {
    /// A connection upgraded elsewhere (e.g. by the blocking client), with the bytes that
    /// followed the upgrade response.
    pub fn upgraded(stream: TcpStream, rbuf: Vec<u8>) -> Self {
        Self {
            stream: Some(stream),
            rbuf,
            ..Self::default()
        }
    }

    /// Queues the upgrade request for `path` (with its `?token=`) on `host`, key from `rng`.
    pub fn start_upgrade(&mut self, host: &str, path: &str, rng: &mut u64) {
        let (req, accept) = codec::upgrade(host, path, codec::key_bytes(rng));
        self.accept = accept;
        self.out.queue().extend_from_slice(&req);
    }

    /// Queues a text frame carrying `payload`, masked with a key from `rng`.
    pub fn queue_text(&mut self, payload: &[u8], rng: &mut u64) {
        codec::encode_frame(self.out.queue(), codec::OP_TEXT, payload, codec::mask(rng));
    }

    /// Queues the pong answering a ping that carried `payload`.
    pub fn queue_pong(&mut self, payload: &[u8], rng: &mut u64) {
        codec::encode_pong(self.out.queue(), payload, codec::mask(rng));
    }

    /// Queues the close frame answering a server close that carried `payload`.
    pub fn queue_close_reply(&mut self, payload: &[u8], rng: &mut u64) {
        codec::encode_close_reply(self.out.queue(), payload, codec::mask(rng));
    }

    /// Queues a close frame with status 1000 (normal closure).
    pub fn queue_close_normal(&mut self, rng: &mut u64) {
        codec::encode_close_normal(self.out.queue(), codec::mask(rng));
    }

    /// Parses the upgrade response buffered in `rbuf`; once accepted, `rbuf` keeps only the
    /// bytes that followed it (the first frames).
    pub fn upgrade_response(&mut self) -> Handshake {
        let h = codec::parse_handshake(&self.rbuf, &self.accept);
        if let Handshake::Accepted { header_len } = h {
            self.rbuf.drain(..header_len);
            self.accept = String::new();
        }
        h
    }

    /// Writes queued bytes (none without a socket): bytes written, and why the socket failed.
    pub fn flush(&mut self) -> (usize, Option<String>) {
        match self.stream.as_mut() {
            Some(stream) => self.out.flush(stream),
            None => (0, None),
        }
    }

    /// One read into `buf`; [`ReadResult::Drained`] without a socket.
    pub fn read(&mut self, buf: &mut [u8]) -> ReadResult {
        match self.stream.as_mut() {
            Some(stream) => read_some(stream, buf),
            None => ReadResult::Drained,
        }
    }

    /// Deregisters and closes the socket, and releases the buffers.
    pub fn close(&mut self, registry: &Registry) {
        if let Some(mut s) = self.stream.take() {
            let _ = registry.deregister(&mut s);
        }
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::time::{Duration, Instant};

    #[test]
    fn upgrades_and_keeps_the_bytes_after_the_response() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut key = String::new();
            let mut r = std::io::BufReader::new(s.try_clone().unwrap());
            loop {
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                if let Some(k) = line.strip_prefix("Sec-WebSocket-Key: ") {
                    key = k.trim().to_owned();
                }
                if line == "\r\n" {
                    break;
                }
            }
            let accept = codec::accept_for(&key);
            let resp = format!(
                "HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
            );
            s.write_all(resp.as_bytes()).unwrap();
            s.write_all(&[0x81, 0x02, b'h', b'i']).unwrap();
        });
        let mut ws = WsStream {
            stream: Some(TcpStream::connect(addr).unwrap()),
            ..WsStream::default()
        };
        let mut rng = 1;
        ws.start_upgrade(&addr.to_string(), "/ws?token=u1", &mut rng);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = [0u8; 4096];
        loop {
            assert!(Instant::now() < deadline, "no upgrade");
            let (_, failed) = ws.flush();
            assert_eq!(failed, None);
            if let ReadResult::Data(n) = ws.read(&mut buf) {
                ws.rbuf.extend_from_slice(&buf[..n]);
            }
            match ws.upgrade_response() {
                Handshake::Incomplete => std::thread::sleep(Duration::from_millis(5)),
                Handshake::Rejected(why) => panic!("{why}"),
                Handshake::Accepted { .. } => break,
            }
        }
        server.join().unwrap();
        while ws.rbuf.len() < 4 && Instant::now() < deadline {
            if let ReadResult::Data(n) = ws.read(&mut buf) {
                ws.rbuf.extend_from_slice(&buf[..n]);
            }
        }
        assert_eq!(ws.rbuf, [0x81, 0x02, b'h', b'i']);
        assert_eq!(ws.out.pending(), 0);
    }
}
