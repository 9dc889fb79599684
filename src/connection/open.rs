//! The open WebSocket: its state, and the rules for reading frames, queueing and flushing
//! output, closing, and what is due at a sweep. The rules work over any `Read + Write` stream
//! and return outcomes; the core loop acts on them.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use tungstenite::error::ProtocolError;
use tungstenite::{Message, Utf8Bytes, WebSocket};

use super::{Counted, Stream, TokenBucket};
use crate::metrics::Closed;
use crate::protocol::CloseReason;
use crate::UserId;

/// An open WebSocket.
pub struct Open<S = Stream> {
    /// The WebSocket over the counted stream.
    pub ws: WebSocket<S>,
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
    /// Its position in each room's history, once a room frame with an offset reached it.
    pub rooms: Option<Box<crate::rooms::RoomCursors>>,
    /// The connection's rate limit for text frames.
    pub bucket: TokenBucket,
    /// Socket.IO state when the connection came through `/socket.io/` (`None`: native).
    pub sio: Option<Box<crate::socketio::Session>>,
    /// Where the connection stands in its user's presence count.
    pub counted: Counted,
    /// When its session expires and which rooms it may use; `None`: never, and any room.
    pub access: Option<Box<crate::access::Access>>,
    /// Bytes queued and not yet written to the socket (frame headers estimated), for the
    /// process-wide outbound budget.
    pub outbound: usize,
}

/// What one read from an open connection came to.
#[derive(Debug)]
pub enum ReadOutcome {
    /// A text message (never while closing): count it, rate-limit it, handle it.
    Text(Utf8Bytes),
    /// A binary message (never while closing): refused unless Socket.IO skips it.
    Binary,
    /// tungstenite queued a pong: flush this turn.
    Pong,
    /// The client sent a close frame: `closing` is set and tungstenite queued the reply; unindex
    /// the connection and flush. The next read reports the end.
    PeerClosing,
    /// Nothing to act on (a pong, a message while closing, an interrupted read): read on.
    Continue,
    /// No more input now: wait for the next readable event.
    WouldBlock,
    /// The client broke the protocol or a bound: close with this reason.
    Close(CloseReason),
    /// The connection is over: drop it now.
    Remove(Closed),
}

/// What queueing a frame came to.
#[derive(Debug, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Queued: count it and flush at the end of the turn.
    Queued,
    /// The connection is closing: the frame is dropped.
    Closing,
    /// The outbound buffer is over its bound: close as a slow consumer.
    Close(CloseReason),
    /// The socket failed: drop the connection.
    Remove(Closed),
}

/// What a flush came to.
#[derive(Debug, PartialEq, Eq)]
pub enum FlushOutcome {
    /// Everything queued is written.
    Done,
    /// The socket took what it could; the writable event resumes the flush.
    Pending,
    /// The connection is over: drop it now.
    Remove(Closed),
}

/// What is due for an open connection at a sweep.
#[derive(Debug, PartialEq, Eq)]
pub enum TickOutcome {
    /// Nothing.
    Idle,
    /// Its close grace ended: drop it.
    Expired,
    /// Nothing heard for the idle timeout: close it (heartbeat timeout).
    Silent,
    /// A ping is due (the next one is scheduled): queue it with [`Open::ping`].
    PingDue,
    /// (Plain HTTP) the answer did not come in time: reply 503.
    WaitedOut,
}

impl<S> Open<S> {
    /// A connection just upgraded at `now`: indexed when it has a user (a Socket.IO
    /// connection has none until its first CONNECT).
    pub fn new(
        ws: WebSocket<S>,
        user: Option<UserId>,
        now: Instant,
        ping_interval: Duration,
        serial: u64,
        burst: u32,
        sio: Option<Box<crate::socketio::Session>>,
    ) -> Self {
        Open {
            ws,
            indexed: user.is_some(),
            user: user.unwrap_or_else(|| UserId::from("")),
            last_heard: now,
            next_ping: now + ping_interval,
            closing: None,
            ended: None,
            dirty: false,
            serial,
            bucket: TokenBucket::new(burst, now),
            last_offset: None,
            recovering: None,
            rooms: None,
            sio,
            counted: Counted::No,
            access: None,
            outbound: 0,
        }
    }

    /// What is due at `now`; schedules the next ping when one is due.
    pub fn tick(
        &mut self,
        now: Instant,
        idle_timeout: Duration,
        ping_interval: Duration,
    ) -> TickOutcome {
        match self.closing {
            Some(deadline) if now >= deadline => TickOutcome::Expired,
            Some(_) => TickOutcome::Idle,
            None if now.duration_since(self.last_heard) >= idle_timeout => TickOutcome::Silent,
            None if now >= self.next_ping => {
                self.next_ping = now + ping_interval;
                TickOutcome::PingDue
            }
            None => TickOutcome::Idle,
        }
    }

    /// The serial to time the replay out with, when a recovery has waited past its deadline.
    pub fn replay_overdue(&self, now: Instant) -> Option<u64> {
        let overdue = self.recovering.as_ref().is_some_and(|r| now >= r.deadline);
        overdue.then_some(self.serial)
    }

    /// The rooms whose replay waited past its deadline.
    pub fn room_replays_overdue(&self, now: Instant) -> Vec<crate::rooms::RoomId> {
        self.rooms
            .as_ref()
            .map_or_else(Vec::new, |c| c.overdue(now))
    }

    /// A Socket.IO connection that has not CONNECTed to any namespace in time.
    pub fn connect_overdue(&self, now: Instant) -> bool {
        let connect_by = self.sio.as_ref().and_then(|s| s.connect_by);
        self.closing.is_none() && connect_by.is_some_and(|t| now >= t)
    }
}

impl<S: Read + Write> Open<S> {
    /// Reads one message (tungstenite buffers; the socket is read when its buffer is empty).
    pub fn read_frame(&mut self, close_grace: Duration) -> ReadOutcome {
        let result = self.ws.read();
        if result.is_ok() {
            self.last_heard = Instant::now();
        }
        let closing = self.closing.is_some();
        match result {
            Ok(Message::Text(text)) if !closing => ReadOutcome::Text(text),
            Ok(Message::Binary(_)) if !closing => ReadOutcome::Binary,
            Ok(Message::Ping(_)) => ReadOutcome::Pong,
            Ok(Message::Close(_)) => {
                self.closing.get_or_insert(self.last_heard + close_grace);
                ReadOutcome::PeerClosing
            }
            Ok(_) => ReadOutcome::Continue,
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                ReadOutcome::WouldBlock
            }
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::Interrupted => {
                ReadOutcome::Continue
            }
            Err(tungstenite::Error::ConnectionClosed) | Err(tungstenite::Error::AlreadyClosed) => {
                ReadOutcome::Remove(Closed::ClientClose)
            }
            Err(e) if closing => {
                log::debug!("error while closing: {e}");
                ReadOutcome::Remove(Closed::Reset)
            }
            // tungstenite's name for a peer that hung up without a close frame.
            Err(tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake)) => {
                ReadOutcome::Remove(Closed::Reset)
            }
            Err(tungstenite::Error::Protocol(p)) => {
                log::debug!("protocol error: {p}");
                ReadOutcome::Close(CloseReason::ProtocolError)
            }
            Err(tungstenite::Error::Utf8(_)) => ReadOutcome::Close(CloseReason::InvalidUtf8),
            Err(tungstenite::Error::Capacity(_)) => ReadOutcome::Close(CloseReason::MessageTooBig),
            Err(tungstenite::Error::WriteBufferFull(_)) => {
                ReadOutcome::Close(CloseReason::SlowConsumer)
            }
            Err(_) => ReadOutcome::Remove(Closed::Reset),
        }
    }

    /// Queues a text frame for the end-of-turn flush (tungstenite writes early only past its
    /// write buffer size).
    pub fn queue_text(&mut self, frame: Utf8Bytes) -> WriteOutcome {
        if self.closing.is_some() {
            return WriteOutcome::Closing;
        }
        match self.ws.write(Message::Text(frame)) {
            Ok(()) => WriteOutcome::Queued,
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                WriteOutcome::Queued
            }
            Err(tungstenite::Error::WriteBufferFull(_)) => {
                WriteOutcome::Close(CloseReason::SlowConsumer)
            }
            Err(_) => WriteOutcome::Remove(Closed::Reset),
        }
    }

    /// Queues the heartbeat: an Engine.IO ping for Socket.IO (its clients time out on those), a
    /// WebSocket ping otherwise. `true` when queued.
    pub fn ping(&mut self) -> bool {
        let ping = match self.sio {
            Some(_) => Message::Text(Utf8Bytes::from_static(crate::socketio::PING)),
            None => Message::Ping(Default::default()),
        };
        self.ws.write(ping).is_ok()
    }

    /// Marks queued output for the end-of-turn flush; `true` when it was not marked yet (the
    /// caller lists it).
    pub fn mark_dirty(&mut self) -> bool {
        !std::mem::replace(&mut self.dirty, true)
    }

    /// Writes what is queued, as far as the socket takes it (clears the dirty mark).
    pub fn flush(&mut self) -> FlushOutcome {
        self.dirty = false;
        match self.ws.flush() {
            Ok(()) => FlushOutcome::Done,
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                FlushOutcome::Pending
            }
            Err(tungstenite::Error::ConnectionClosed) => FlushOutcome::Remove(Closed::ClientClose),
            Err(_) => FlushOutcome::Remove(Closed::Reset),
        }
    }

    /// Starts a server-initiated close: queues the close frame and sets the deadline `grace`.
    /// `false` when a close already began.
    pub fn begin_close(&mut self, reason: CloseReason, grace: Instant) -> bool {
        if self.closing.is_some() {
            return false;
        }
        self.closing = Some(grace);
        self.ended = Some(Closed::Server(reason));
        if reason == CloseReason::SlowConsumer {
            // The buffer is full by definition; make room for the close frame alone.
            self.ws.set_config(|c| c.max_write_buffer_size += 256);
        }
        // WouldBlock: the frame is queued and goes out with the flush; any other error shows
        // on the next read or flush.
        let _ = self.ws.close(Some(reason.frame()));
        true
    }
}

#[cfg(test)]
mod tests {
    use tungstenite::protocol::{Role, WebSocketConfig};

    use super::*;
    use crate::connection::mock::{client_bytes, server_messages, In, Mock, Out};

    const GRACE: Duration = Duration::from_secs(2);

    fn open(
        reads: impl IntoIterator<Item = In>,
        writes: impl IntoIterator<Item = Out>,
    ) -> Open<Mock> {
        let config = WebSocketConfig::default()
            .read_buffer_size(256)
            .write_buffer_size(512)
            .max_write_buffer_size(1024)
            .max_message_size(Some(512))
            .max_frame_size(Some(512));
        let ws = WebSocket::from_raw_socket(Mock::new(reads, writes), Role::Server, Some(config));
        let now = Instant::now();
        Open::new(ws, Some(UserId::from("u")), now, GRACE, 1, 10, None)
    }

    fn text(outcome: ReadOutcome) -> String {
        match outcome {
            ReadOutcome::Text(t) => t.as_str().to_string(),
            other => panic!("expected text, got {other:?}"),
        }
    }

    #[test]
    fn frames_split_by_would_block_are_read_whole() {
        let bytes = client_bytes([Message::text("hello"), Message::text("world")]);
        let (a, b) = bytes.split_at(4);
        let mut o = open([In::Data(a.to_vec()), In::Block, In::Data(b.to_vec())], []);
        assert!(matches!(o.read_frame(GRACE), ReadOutcome::WouldBlock));
        assert_eq!(text(o.read_frame(GRACE)), "hello");
        assert_eq!(text(o.read_frame(GRACE)), "world");
        assert!(matches!(o.read_frame(GRACE), ReadOutcome::WouldBlock));
    }

    #[test]
    fn ping_queues_a_pong_and_close_starts_closing() {
        let bytes = client_bytes([Message::Ping(b"p".to_vec().into()), Message::Close(None)]);
        let mut o = open([In::Data(bytes)], []);
        assert!(matches!(o.read_frame(GRACE), ReadOutcome::Pong));
        assert!(matches!(o.read_frame(GRACE), ReadOutcome::PeerClosing));
        assert!(o.closing.is_some());
        // The reply to the close frame written, the handshake is over.
        assert_eq!(o.flush(), FlushOutcome::Remove(Closed::ClientClose));
        let sent = server_messages(&o.ws.get_ref().written);
        assert!(matches!(sent.first(), Some(Message::Pong(p)) if p.as_ref() == b"p"));
        assert!(matches!(sent.get(1), Some(Message::Close(_))));
        assert_eq!(o.queue_text("late".into()), WriteOutcome::Closing);
    }

    #[test]
    fn bad_input_maps_to_close_reasons() {
        let bin = client_bytes([Message::binary(vec![1, 2, 3])]);
        let mut o = open([In::Data(bin)], []);
        assert!(matches!(o.read_frame(GRACE), ReadOutcome::Binary));

        let big = client_bytes([Message::text("x".repeat(600))]);
        let mut o = open([In::Data(big)], []);
        assert!(matches!(
            o.read_frame(GRACE),
            ReadOutcome::Close(CloseReason::MessageTooBig)
        ));

        let mut o = open([In::Data(b"\x81\x05hello".to_vec())], []);
        assert!(
            matches!(
                o.read_frame(GRACE),
                ReadOutcome::Close(CloseReason::ProtocolError)
            ),
            "an unmasked client frame"
        );
    }

    #[test]
    fn eof_without_a_close_frame_is_a_reset() {
        let mut o = open([In::Eof], []);
        assert!(matches!(
            o.read_frame(GRACE),
            ReadOutcome::Remove(Closed::Reset)
        ));
    }

    #[test]
    fn a_flush_that_blocks_finishes_later() {
        let mut o = open([], [Out::Take(3), Out::Block, Out::Take(4), Out::Block]);
        assert_eq!(o.queue_text("one".into()), WriteOutcome::Queued);
        assert_eq!(o.queue_text("two".into()), WriteOutcome::Queued);
        o.dirty = true;
        assert_eq!(o.flush(), FlushOutcome::Pending);
        assert!(!o.dirty);
        assert_eq!(o.ws.get_ref().written.len(), 3);
        assert_eq!(o.flush(), FlushOutcome::Pending);
        assert_eq!(o.ws.get_ref().written.len(), 7);
        assert_eq!(o.flush(), FlushOutcome::Done);
        let sent = server_messages(&o.ws.get_ref().written);
        let texts: Vec<&str> = sent.iter().filter_map(|m| m.to_text().ok()).collect();
        assert_eq!(texts, ["one", "two"]);
    }

    #[test]
    fn a_full_outbound_buffer_is_a_slow_consumer() {
        let mut o = open([], std::iter::repeat_with(|| Out::Block).take(64));
        let frame = Utf8Bytes::from("y".repeat(300));
        let mut outcome = WriteOutcome::Queued;
        for _ in 0..10 {
            outcome = o.queue_text(frame.clone());
            if outcome != WriteOutcome::Queued {
                break;
            }
        }
        assert_eq!(outcome, WriteOutcome::Close(CloseReason::SlowConsumer));
        assert!(o.begin_close(CloseReason::SlowConsumer, Instant::now() + GRACE));
        assert!(!o.begin_close(CloseReason::Shutdown, Instant::now()));
        assert_eq!(o.ended, Some(Closed::Server(CloseReason::SlowConsumer)));
    }

    #[test]
    fn tick_expires_closes_silences_and_pings() {
        let mut o = open([], []);
        let t0 = o.last_heard;
        let idle = Duration::from_secs(10);
        assert_eq!(o.tick(t0, idle, GRACE), TickOutcome::Idle);
        assert_eq!(o.tick(t0 + GRACE, idle, GRACE), TickOutcome::PingDue);
        assert_eq!(o.next_ping, t0 + GRACE + GRACE);
        assert_eq!(o.tick(t0 + GRACE, idle, GRACE), TickOutcome::Idle);
        assert_eq!(o.tick(t0 + idle, idle, GRACE), TickOutcome::Silent);
        o.closing = Some(t0 + idle);
        assert_eq!(o.tick(t0, idle, GRACE), TickOutcome::Idle);
        assert_eq!(o.tick(t0 + idle, idle, GRACE), TickOutcome::Expired);
        assert!(o.ping());
    }
}
