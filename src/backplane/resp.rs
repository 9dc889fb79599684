//! A lean RESP reader for the links the loops read themselves (the subscriber's, each core's
//! publishing link): replies parsed in place from one read buffer, borrowing their bytes, so a
//! publication costs no allocation here (the frame is copied once, later, into the `Bytes` every
//! core shares). The buffer is filled by one large read per readiness event; a short read means
//! the socket is drained (edge-triggered epoll reports later data), so no read is spent on
//! `WouldBlock`.
//!
//! Speaks what Redis sends a RESP2 client (`+ - : $ *`) plus RESP3's push (`>`) and null (`_`),
//! which a RESP2 connection never gets but cost nothing to accept. Anything else is malformed:
//! the caller drops the connection.

use std::io::{self, Read};

use smallvec::SmallVec;

/// What one read asks for at least; the buffer starts this big and is compacted, not grown,
/// unless a single reply is bigger.
pub const READ_CHUNK: usize = 64 * 1024;
/// The largest reply a link accepts (Redis's own `proto-max-bulk-len` default is 512 MiB; a
/// switchboard frame is bounded far below this): past it the connection is dropped.
pub const MAX_REPLY: usize = 64 * 1024 * 1024;
/// Aggregates nested deeper than this are malformed (Redis sends none deeper than 2 to us).
const MAX_DEPTH: usize = 8;

/// A scalar: a whole reply, or one item of an array reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Item<'a> {
    /// `+OK`, `+PONG`, ...
    Simple(&'a [u8]),
    /// `-ERR ...`: the error line, code first.
    Error(&'a [u8]),
    /// `:42`
    Int(i64),
    /// `$3\r\nabc`: a binary-safe string.
    Bulk(&'a [u8]),
    /// `$-1`, `*-1` or `_`.
    Nil,
    /// An array inside an array: skipped, only its presence is kept.
    Nested,
}

/// One complete reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value<'a> {
    /// A scalar reply.
    Item(Item<'a>),
    /// An array (`*`) or push (`>`) reply, its items in order. Up to four are held inline,
    /// which covers every push the subscriber gets.
    Array(SmallVec<[Item<'a>; 4]>),
}

impl<'a> Value<'a> {
    /// The error line when this is an error reply.
    pub fn error(&self) -> Option<&'a [u8]> {
        match self {
            Value::Item(Item::Error(e)) => Some(e),
            _ => None,
        }
    }
}

/// The bytes are not RESP (or nest deeper, or grow larger, than a link accepts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

/// Parses the first complete reply of `buf`: `Ok(None)` when it is not complete yet,
/// otherwise the reply and the bytes it took.
pub fn parse(buf: &[u8]) -> Result<Option<(Value<'_>, usize)>, Malformed> {
    let Some((kind, line, mut at)) = line(buf, 0)? else {
        return Ok(None);
    };
    let value = match kind {
        b'*' | b'>' => {
            let n = length(line)?;
            let mut items = SmallVec::new();
            if let Some(n) = n {
                for _ in 0..n {
                    match item(buf, at, 1)? {
                        Some((it, next)) => {
                            items.push(it);
                            at = next;
                        }
                        None => return Ok(None),
                    }
                }
                Value::Array(items)
            } else {
                Value::Item(Item::Nil)
            }
        }
        _ => match scalar(buf, kind, line, at)? {
            Some((it, next)) => {
                at = next;
                Value::Item(it)
            }
            None => return Ok(None),
        },
    };
    Ok(Some((value, at)))
}

/// The item starting at `at`: a scalar, or a nested aggregate skipped whole.
fn item(buf: &[u8], at: usize, depth: usize) -> Result<Option<(Item<'_>, usize)>, Malformed> {
    let Some((kind, line, mut next)) = line(buf, at)? else {
        return Ok(None);
    };
    if kind != b'*' && kind != b'>' {
        return scalar(buf, kind, line, next);
    }
    if depth >= MAX_DEPTH {
        return Err(Malformed);
    }
    let Some(n) = length(line)? else {
        return Ok(Some((Item::Nil, next)));
    };
    for _ in 0..n {
        match item(buf, next, depth + 1)? {
            Some((_, after)) => next = after,
            None => return Ok(None),
        }
    }
    Ok(Some((Item::Nested, next)))
}

/// A scalar whose header line (`kind`, `line`) ends before `at`.
fn scalar<'a>(
    buf: &'a [u8],
    kind: u8,
    line: &'a [u8],
    at: usize,
) -> Result<Option<(Item<'a>, usize)>, Malformed> {
    let it = match kind {
        b'+' => Item::Simple(line),
        b'-' => Item::Error(line),
        b':' => Item::Int(integer(line)?),
        b'_' => Item::Nil,
        b'$' => {
            let Some(len) = length(line)? else {
                return Ok(Some((Item::Nil, at)));
            };
            let end = at + len;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(Malformed);
            }
            return Ok(Some((Item::Bulk(&buf[at..end]), end + 2)));
        }
        _ => return Err(Malformed),
    };
    Ok(Some((it, at)))
}

/// A header line: its type byte, its text, and where the next line starts.
type Line<'a> = (u8, &'a [u8], usize);

/// The header line at `at`.
fn line(buf: &[u8], at: usize) -> Result<Option<Line<'_>>, Malformed> {
    let Some(rest) = buf.get(at..).filter(|r| !r.is_empty()) else {
        return Ok(None);
    };
    let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
        // A header line is short: a long run without one is not RESP.
        return if rest.len() > 64 * 1024 {
            Err(Malformed)
        } else {
            Ok(None)
        };
    };
    if nl < 2 || rest[nl - 1] != b'\r' {
        return Err(Malformed);
    }
    Ok(Some((rest[0], &rest[1..nl - 1], at + nl + 1)))
}

fn integer(text: &[u8]) -> Result<i64, Malformed> {
    std::str::from_utf8(text)
        .ok()
        .and_then(|t| t.parse().ok())
        .ok_or(Malformed)
}

/// A length line: `None` for -1 (nil); past [`MAX_REPLY`] or otherwise negative, malformed.
fn length(text: &[u8]) -> Result<Option<usize>, Malformed> {
    match integer(text)? {
        -1 => Ok(None),
        n if (0..=MAX_REPLY as i64).contains(&n) => Ok(Some(n as usize)),
        _ => Err(Malformed),
    }
}

/// A link's read buffer: bytes read and not parsed yet.
#[derive(Debug)]
pub struct ReadBuf {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

impl Default for ReadBuf {
    /// An empty buffer; its first [`ReadBuf::fill`] allocates [`READ_CHUNK`] (so a buffer can
    /// be taken out of its link for a moment without allocating).
    fn default() -> Self {
        ReadBuf {
            data: Vec::new(),
            start: 0,
            end: 0,
        }
    }
}

impl ReadBuf {
    /// Reads once from `src` into the free space. `Ok(true)`: more may be waiting; `Ok(false)`:
    /// the socket is drained for now (WouldBlock, or with `short_read_drains` a read that did
    /// not fill the space: true of a plain TCP socket, not of TLS, whose reads stop at a record).
    /// End of stream is an error, as is a reply past [`MAX_REPLY`].
    pub fn fill(&mut self, src: &mut impl Read, short_read_drains: bool) -> io::Result<bool> {
        self.make_room()?;
        loop {
            let free = &mut self.data[self.end..];
            let want = free.len();
            match src.read(free) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    self.end += n;
                    return Ok(n == want || !short_read_drains);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// The next complete reply, taken from the buffer; `Ok(None)` when none is complete.
    pub fn next(&mut self) -> Result<Option<Value<'_>>, Malformed> {
        match parse(&self.data[self.start..self.end])? {
            Some((value, used)) => {
                self.start += used;
                Ok(Some(value))
            }
            None => Ok(None),
        }
    }

    /// Forgets everything buffered (a new connection).
    pub fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// At least a quarter of [`READ_CHUNK`] free at the end: moves the unparsed bytes to the
    /// front, and grows (doubling, up to [`MAX_REPLY`] and one chunk) only when one reply
    /// fills the buffer.
    fn make_room(&mut self) -> io::Result<()> {
        if self.data.len() < READ_CHUNK {
            self.data.resize(READ_CHUNK, 0);
        }
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.data.len() - self.end >= READ_CHUNK / 4 {
            return Ok(());
        }
        if self.start > 0 {
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.data.len() - self.end < READ_CHUNK / 4 {
            if self.data.len() >= MAX_REPLY + READ_CHUNK {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "redis reply larger than a link accepts",
                ));
            }
            let grown = (self.data.len() * 2).min(MAX_REPLY + READ_CHUNK);
            self.data.resize(grown, 0);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(buf: &[u8]) -> (Value<'_>, usize) {
        parse(buf).unwrap().expect("complete")
    }

    #[test]
    fn scalars_arrays_and_pushes() {
        assert_eq!(one(b"+OK\r\n"), (Value::Item(Item::Simple(b"OK")), 5));
        assert_eq!(
            one(b"-NOSCRIPT No matching script\r\n").0.error(),
            Some(&b"NOSCRIPT No matching script"[..])
        );
        assert_eq!(one(b":-42\r\n").0, Value::Item(Item::Int(-42)));
        assert_eq!(one(b"$3\r\na\r\n\r\n").0, Value::Item(Item::Bulk(b"a\r\n")));
        assert_eq!(one(b"$-1\r\n").0, Value::Item(Item::Nil));
        assert_eq!(one(b"*-1\r\n").0, Value::Item(Item::Nil));
        assert_eq!(one(b"_\r\n").0, Value::Item(Item::Nil));
        let msg = b"*3\r\n$7\r\nmessage\r\n$6\r\nsb:u:a\r\n$2\r\nhi\r\n+PONG\r\n";
        let (value, used) = one(msg);
        assert_eq!(
            value,
            Value::Array(SmallVec::from_slice(&[
                Item::Bulk(b"message"),
                Item::Bulk(b"sb:u:a"),
                Item::Bulk(b"hi")
            ]))
        );
        assert_eq!(&msg[used..], b"+PONG\r\n", "stops after the first reply");
        let push = b">3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n";
        assert_eq!(
            one(push).0,
            Value::Array(SmallVec::from_slice(&[
                Item::Bulk(b"subscribe"),
                Item::Bulk(b"c"),
                Item::Int(1)
            ]))
        );
        // An EVALSHA reply with more ids than fit inline, and nested arrays skipped whole.
        let ids = b"*5\r\n$3\r\n1-0\r\n$3\r\n2-0\r\n$3\r\n3-0\r\n$3\r\n4-0\r\n$3\r\n5-0\r\n";
        assert!(matches!(one(ids).0, Value::Array(items) if items.len() == 5));
        let nested = b"*2\r\n*2\r\n:1\r\n*1\r\n$1\r\nx\r\n:7\r\n";
        assert_eq!(
            one(nested),
            (
                Value::Array(SmallVec::from_slice(&[Item::Nested, Item::Int(7)])),
                nested.len()
            )
        );
    }

    #[test]
    fn every_prefix_of_a_reply_is_incomplete_not_malformed() {
        let msg = b"*3\r\n$7\r\nmessage\r\n$6\r\nsb:u:a\r\n$2\r\nhi\r\n";
        for cut in 0..msg.len() {
            assert_eq!(parse(&msg[..cut]), Ok(None), "cut at {cut}");
        }
        assert!(parse(msg).unwrap().is_some());
    }

    #[test]
    fn what_is_not_resp_is_malformed() {
        for bad in [
            &b"?x\r\n"[..],
            b"+OK\n",
            b":12a\r\n",
            b"$-2\r\n",
            b"$2\r\nabcd\r\n",
            b"*1\r\n%1\r\n",
            b"$999999999999\r\n",
            b"\r\n",
        ] {
            assert_eq!(
                parse(bad),
                Err(Malformed),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let deep = "*1\r\n".repeat(MAX_DEPTH + 1) + ":1\r\n";
        assert_eq!(parse(deep.as_bytes()), Err(Malformed));
        assert_eq!(parse(&[b'+'; 70 * 1024]), Err(Malformed), "no line end");
    }

    /// Hands out its bytes `step` at a time, then WouldBlock.
    struct Trickle<'a> {
        bytes: &'a [u8],
        step: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.bytes.is_empty() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = self.step.min(buf.len()).min(self.bytes.len());
            buf[..n].copy_from_slice(&self.bytes[..n]);
            self.bytes = &self.bytes[n..];
            Ok(n)
        }
    }

    #[test]
    fn the_buffer_keeps_partial_replies_and_grows_only_for_a_big_one() {
        let big = vec![b'x'; 3 * READ_CHUNK];
        let mut wire = Vec::new();
        for i in 0..1000 {
            let payload = format!("frame {i}");
            wire.extend_from_slice(
                format!(
                    "*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n${}\r\n{payload}\r\n",
                    payload.len()
                )
                .as_bytes(),
            );
        }
        wire.extend_from_slice(format!("${}\r\n", big.len()).as_bytes());
        wire.extend_from_slice(&big);
        wire.extend_from_slice(b"\r\n+PONG\r\n");
        let mut src = Trickle {
            bytes: &wire,
            step: 7000,
        };
        let mut buf = ReadBuf::default();
        let mut got = Vec::new();
        let mut fills = 0;
        loop {
            let more = buf.fill(&mut src, true).unwrap();
            fills += 1;
            while let Some(value) = buf.next().unwrap() {
                got.push(match value {
                    Value::Array(items) => match items[2] {
                        Item::Bulk(p) => String::from_utf8_lossy(p).into_owned(),
                        other => panic!("{other:?}"),
                    },
                    Value::Item(Item::Bulk(b)) => format!("big {}", b.len()),
                    Value::Item(other) => format!("{other:?}"),
                });
            }
            if !more && src.bytes.is_empty() {
                break;
            }
        }
        assert!(fills > wire.len() / 7000, "short reads stop each fill");
        assert_eq!(got.len(), 1002);
        assert_eq!(got[999], "frame 999");
        assert_eq!(got[1000], format!("big {}", big.len()));
        assert_eq!(got[1001], "Simple([80, 79, 78, 71])");
        assert!(
            buf.data.len() <= 4 * READ_CHUNK,
            "grew for the big reply only"
        );
        assert!(matches!(
            buf.fill(
                &mut Trickle {
                    bytes: b"",
                    step: 1
                },
                true
            ),
            Ok(false)
        ));
        assert_eq!(
            buf.fill(&mut io::empty(), true).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }
}
