//! The first state: reading the HTTP request head, before the handshake deadline.

use std::io::{self, Read, Write};
use std::time::Instant;

use tungstenite::protocol::{Role, WebSocketConfig};
use tungstenite::WebSocket;

use super::{PendingBody, Stream};
use crate::http::{self, Parse, Request, RequestError};

/// Bytes read from the socket per call while reading a request head.
const HEAD_CHUNK: usize = 2048;

/// Reading the request head, before the handshake deadline.
pub struct PendingRequest<S = super::Socket> {
    /// The socket.
    pub stream: S,
    /// Bytes read so far (at most `max_request_header_bytes`).
    pub buf: Vec<u8>,
    /// When the request must be complete.
    pub deadline: Instant,
}

/// What reading the request head came to.
// One per request head, moved once into the route: boxing the request would only add an
// allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum HeadOutcome {
    /// The socket is empty and the head is not complete: wait for the next readable event.
    Incomplete,
    /// The whole head, and the bytes read after it (a body, or the first WebSocket frames):
    /// route it.
    Complete(Request, Vec<u8>),
    /// `max` bytes without the end of the head: answer 431.
    TooLarge,
    /// Not a valid request head: answer with the error's status (see [`HeadOutcome::status`]).
    Invalid(RequestError),
    /// The client closed before the head was complete: drop the connection.
    Closed,
    /// The socket failed: drop the connection.
    Error(io::Error),
}

impl HeadOutcome {
    /// The HTTP status for an invalid head.
    pub fn status(e: &RequestError) -> u16 {
        match e {
            RequestError::Malformed | RequestError::AmbiguousLength | RequestError::BareLf => 400,
            RequestError::TooLarge => 431,
        }
    }
}

impl<S: Read> PendingRequest<S> {
    /// Reads until the head is complete, the socket is empty, or `max` bytes are in.
    pub fn read_head(&mut self, max: usize) -> HeadOutcome {
        let mut chunk = [0u8; HEAD_CHUNK];
        loop {
            let room = max.saturating_sub(self.buf.len()).min(chunk.len());
            if room == 0 {
                return HeadOutcome::TooLarge;
            }
            match self.stream.read(&mut chunk[..room]) {
                Ok(0) => return HeadOutcome::Closed,
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    match http::parse_request(&self.buf) {
                        Ok(Parse::Partial) => continue,
                        Ok(Parse::Complete(request, head_len)) => {
                            let rest = self.buf.split_off(head_len);
                            return HeadOutcome::Complete(request, rest);
                        }
                        Err(e) => return HeadOutcome::Invalid(e),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return HeadOutcome::Incomplete,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return HeadOutcome::Error(e),
            }
        }
    }
}

impl<S: Write> PendingRequest<S> {
    /// Writes the 101 that accepts `ws_key`. A fresh socket's send buffer is empty, so the 101
    /// (under 200 bytes) is written whole; `false` (a short write or an error) means the peer
    /// is already gone.
    pub fn write_upgrade(&mut self, ws_key: &str) -> bool {
        let response = http::upgrade_response(ws_key);
        matches!(self.stream.write(&response), Ok(n) if n == response.len())
    }

    /// Goes on to read the body of `request` (`len` bytes, `rest` the part already read),
    /// answering `Expect: 100-continue` first when more is to come.
    pub fn into_body(mut self, request: Request, mut rest: Vec<u8>, len: usize) -> PendingBody<S> {
        if request.expect_continue && rest.len() < len {
            // curl and others wait for this (up to a second) before sending a larger body. A
            // fresh socket's send buffer takes these 25 bytes whole; if not, the client sends
            // its body after its own timeout anyway.
            let _ = self.stream.write(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        rest.truncate(len);
        PendingBody {
            stream: self.stream,
            request,
            body: rest,
            len,
            deadline: self.deadline,
        }
    }
}

impl PendingRequest {
    /// The WebSocket over this socket once the 101 is written; `rest` holds the bytes read
    /// after the request head (the first frames, if any).
    pub fn into_websocket(self, rest: Vec<u8>, config: WebSocketConfig) -> WebSocket<Stream> {
        let stream = Stream::new(self.stream);
        if rest.is_empty() {
            WebSocket::from_raw_socket(stream, Role::Server, Some(config))
        } else {
            WebSocket::from_partially_read(stream, rest, Role::Server, Some(config))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connection::mock::{In, Mock, Out};

    fn pending(reads: impl IntoIterator<Item = In>) -> PendingRequest<Mock> {
        PendingRequest {
            stream: Mock::new(reads, []),
            buf: Vec::new(),
            deadline: Instant::now(),
        }
    }

    const HEAD: &[u8] = b"GET /ws?token=t HTTP/1.1\r\nHost: x\r\n\r\n";

    #[test]
    fn a_complete_head_with_bytes_after_it() {
        let mut bytes = HEAD.to_vec();
        bytes.extend_from_slice(b"rest");
        let mut req = pending([In::Data(bytes)]);
        match req.read_head(4096) {
            HeadOutcome::Complete(request, rest) => {
                assert_eq!(request.method, "GET");
                assert_eq!(request.path, "/ws");
                assert_eq!(rest, b"rest");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_partial_head_waits_then_completes() {
        let (a, b) = HEAD.split_at(10);
        let mut req = pending([In::Data(a.to_vec()), In::Block, In::Data(b.to_vec())]);
        assert!(matches!(req.read_head(4096), HeadOutcome::Incomplete));
        assert_eq!(req.buf, a);
        match req.read_head(4096) {
            HeadOutcome::Complete(request, rest) => {
                assert_eq!(request.path, "/ws");
                assert!(rest.is_empty());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_head_over_the_bound_is_too_large() {
        let mut head = b"GET /ws HTTP/1.1\r\nX-Long: ".to_vec();
        head.resize(5000, b'a');
        let mut req = pending([In::Data(head)]);
        assert!(matches!(req.read_head(100), HeadOutcome::TooLarge));
        assert_eq!(req.buf.len(), 100, "never reads past the bound");
    }

    #[test]
    fn eof_before_the_head_is_closed() {
        let mut req = pending([In::Data(b"GET /ws HT".to_vec()), In::Eof]);
        assert!(matches!(req.read_head(4096), HeadOutcome::Closed));
    }

    #[test]
    fn a_body_expected_with_100_continue_gets_it() {
        let mut req = pending([In::Data(b"POST /api/publish HTTP/1.1\r\n\r\n{".to_vec())]);
        let HeadOutcome::Complete(mut request, rest) = req.read_head(4096) else {
            panic!("complete");
        };
        request.expect_continue = true;
        let body = req.into_body(request, rest, 5);
        assert_eq!(body.body, b"{");
        assert_eq!(body.stream.written, b"HTTP/1.1 100 Continue\r\n\r\n");

        let req = pending([]);
        let request = Request {
            expect_continue: true,
            ..Request::default()
        };
        let body = req.into_body(request, b"{}extra".to_vec(), 2);
        assert_eq!(body.body, b"{}", "never more than the length");
        assert!(
            body.stream.written.is_empty(),
            "the body is all there: no 100"
        );
    }

    #[test]
    fn the_101_is_written_whole_or_refused() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let mut req = pending([]);
        assert!(req.write_upgrade(key));
        let written = String::from_utf8(req.stream.written.clone()).unwrap();
        assert!(written.starts_with("HTTP/1.1 101"));
        assert!(written.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));

        let mut req = pending([]);
        req.stream = Mock::new([], [Out::Take(10)]);
        assert!(!req.write_upgrade(key), "a short write");
    }

    #[test]
    fn garbage_is_invalid() {
        let mut req = pending([In::Data(b"\x16\x03\x01 not http\r\n\r\n".to_vec())]);
        match req.read_head(4096) {
            HeadOutcome::Invalid(e) => assert_eq!(HeadOutcome::status(&e), 400),
            other => panic!("{other:?}"),
        }
    }
}
