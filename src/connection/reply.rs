//! The plain HTTP states after the head: reading a request body, waiting for another thread's
//! answer, and writing the response.

use std::io::{self, Read, Write};
use std::time::Instant;

use mio::net::TcpStream;

/// Bytes read from the socket per call while reading a body.
const BODY_CHUNK: usize = 8192;

/// A socket whose write side can be shut while its read side stays open.
pub trait ShutWrite {
    /// Sends FIN: the response is complete.
    fn shut_write(&mut self);
}

impl ShutWrite for TcpStream {
    fn shut_write(&mut self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
}

/// Reading a request body up to its `Content-Length`.
pub struct PendingBody<S = super::Socket> {
    /// The socket.
    pub stream: S,
    /// The request head.
    pub request: crate::http::Request,
    /// The body so far.
    pub body: Vec<u8>,
    /// The whole body's length.
    pub len: usize,
    /// When the body must be complete.
    pub deadline: Instant,
}

/// What reading a body came to.
#[derive(Debug, PartialEq, Eq)]
pub enum BodyOutcome {
    /// The socket is empty before the body is complete: wait for the next readable event.
    Incomplete,
    /// `len` bytes are in `body`: answer the request.
    Complete,
    /// The client closed, or the socket failed, first: drop the connection.
    Closed,
}

impl<S: Read> PendingBody<S> {
    /// Reads until the body is complete or the socket is empty; never past `len`.
    pub fn read_body(&mut self) -> BodyOutcome {
        let mut chunk = [0u8; BODY_CHUNK];
        while self.body.len() < self.len {
            let room = (self.len - self.body.len()).min(chunk.len());
            match self.stream.read(&mut chunk[..room]) {
                Ok(0) => return BodyOutcome::Closed,
                Ok(n) => self.body.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return BodyOutcome::Incomplete,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return BodyOutcome::Closed,
            }
        }
        BodyOutcome::Complete
    }
}

/// Holding the socket until an answer arrives from another thread, or the deadline (503).
pub struct Waiting<S = super::Socket> {
    /// The socket.
    pub stream: S,
    /// Matches the answer to this connection (see [`crate::connection::Open::serial`]).
    pub serial: u64,
    /// When the client gets a 503 instead.
    pub deadline: Instant,
}

/// A plain HTTP response being written; afterwards the request side is drained until the
/// client closes, so the response is not lost to a TCP reset.
pub struct Reply<S = super::Socket> {
    /// The socket.
    pub stream: S,
    /// The whole response.
    pub out: Vec<u8>,
    /// How much of `out` is written.
    pub written: usize,
    /// Response written and write side shut: only draining remains.
    pub lingering: bool,
    /// When the connection is dropped whatever its state.
    pub deadline: Instant,
}

/// What progress on a reply came to.
#[derive(Debug, PartialEq, Eq)]
pub enum ReplyOutcome {
    /// Bytes remain to be written, or the client has not hung up yet: wait for the next event.
    Pending,
    /// The client hung up after the response (or the socket failed): drop the connection.
    Done,
}

impl<S: Read + Write + ShutWrite> Reply<S> {
    /// Writes what it can; once all is written, shuts the write side and drains the input.
    pub fn progress(&mut self) -> ReplyOutcome {
        if !self.lingering {
            match self.write_some() {
                Ok(true) => {
                    self.stream.shut_write();
                    self.lingering = true;
                }
                Ok(false) => return ReplyOutcome::Pending,
                Err(_) => return ReplyOutcome::Done,
            }
        }
        match self.drain_input() {
            Ok(false) => ReplyOutcome::Pending,
            Ok(true) | Err(_) => ReplyOutcome::Done,
        }
    }
}

impl<S: Read + Write> Reply<S> {
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
    use super::*;
    use crate::connection::mock::{In, Mock, Out};

    impl ShutWrite for Mock {
        fn shut_write(&mut self) {
            self.written.extend_from_slice(b"<FIN>");
        }
    }

    fn body(reads: impl IntoIterator<Item = In>, len: usize) -> PendingBody<Mock> {
        PendingBody {
            stream: Mock::new(reads, []),
            request: crate::http::Request::default(),
            body: b"ab".to_vec(),
            len,
            deadline: Instant::now(),
        }
    }

    #[test]
    fn a_body_in_pieces_completes_and_reads_no_further() {
        let reads = [
            In::Data(b"cd".to_vec()),
            In::Block,
            In::Data(b"efgh".to_vec()),
        ];
        let mut b = body(reads, 6);
        assert_eq!(b.read_body(), BodyOutcome::Incomplete);
        assert_eq!(b.body, b"abcd");
        assert_eq!(b.read_body(), BodyOutcome::Complete);
        assert_eq!(b.body, b"abcdef");
        assert_eq!(b.read_body(), BodyOutcome::Complete);
    }

    #[test]
    fn eof_before_the_body_is_closed() {
        let mut b = body([In::Data(b"c".to_vec()), In::Eof], 6);
        assert_eq!(b.read_body(), BodyOutcome::Closed);
    }

    #[test]
    fn a_reply_written_in_short_writes_then_lingers_until_eof() {
        let writes = [Out::Take(3), Out::Block, Out::Take(2)];
        let mut reply = Reply {
            stream: Mock::new([In::Data(b"more".to_vec())], writes),
            out: b"HTTP/1.1 404".to_vec(),
            written: 0,
            lingering: false,
            deadline: Instant::now(),
        };
        assert_eq!(reply.progress(), ReplyOutcome::Pending);
        assert_eq!(reply.written, 3);
        assert_eq!(
            reply.progress(),
            ReplyOutcome::Pending,
            "drained, no EOF yet"
        );
        assert!(reply.lingering);
        assert_eq!(reply.stream.written, b"HTTP/1.1 404<FIN>");
        reply.stream.push(In::Eof);
        assert_eq!(reply.progress(), ReplyOutcome::Done);
    }
}
