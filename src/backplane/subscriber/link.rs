//! One Redis link of the subscriber: a non-blocking socket in subscribed mode with its read
//! buffer (parsed in place by [`crate::backplane::resp`]), the commands queued for it, and its PING/PONG keepalive. What a reply means is read
//! in [`super::reply`]; the links of every shard are kept in [`super::shards`].

use std::io::{self, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use crate::backplane::endpoint::Endpoint;
use crate::backplane::resp::ReadBuf;
use crate::connection::Socket;

/// Channels per SUBSCRIBE/UNSUBSCRIBE command.
const CHANNELS_PER_COMMAND: usize = 1024;
/// A PING is sent this often to notice a dead connection that TCP has not reported.
const KEEPALIVE: Duration = Duration::from_secs(5);
/// No PONG within this long: the connection is considered dead.
const PONG_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A link's protocol state, apart from its socket: the bytes to send and the PINGs in flight.
#[derive(Debug)]
pub(super) struct LinkState {
    out: Vec<u8>,
    last_ping: Instant,
    /// Sent PINGs not yet answered; the first is the one that marks re-subscription complete.
    pings_in_flight: u32,
    oldest_ping: Option<Instant>,
    ready_on_pong: bool,
}

/// What [`LinkState::keepalive`] asks for.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Keepalive {
    /// Nothing to do.
    Idle,
    /// Time for a PING.
    Ping,
    /// A PING went unanswered too long: drop the link.
    Dead,
}

impl LinkState {
    fn new(out: Vec<u8>, now: Instant) -> Self {
        LinkState {
            out,
            last_ping: now,
            pings_in_flight: 0,
            oldest_ping: None,
            ready_on_pong: false,
        }
    }

    /// Queues `command` for `channels`, at most [`CHANNELS_PER_COMMAND`] per command; the
    /// sharded commands (`SSUBSCRIBE`, `SUNSUBSCRIBE`) one channel each, since a cluster refuses
    /// one that names channels of several hash slots (`CROSSSLOT`).
    pub fn write_channels(&mut self, command: &str, channels: &[String]) {
        let sharded = matches!(command, "SSUBSCRIBE" | "SUNSUBSCRIBE");
        let per_command = if sharded { 1 } else { CHANNELS_PER_COMMAND };
        for chunk in channels.chunks(per_command) {
            let mut cmd = redis::cmd(command);
            for ch in chunk {
                cmd.arg(ch.as_str());
            }
            cmd.write_packed_command(&mut self.out);
        }
    }

    /// Queues a PING.
    pub fn ping(&mut self, now: Instant) {
        redis::cmd("PING").write_packed_command(&mut self.out);
        self.pings_in_flight += 1;
        self.oldest_ping.get_or_insert(now);
        self.last_ping = now;
    }

    /// The next PONG completes a re-subscription.
    pub fn ready_on_pong(&mut self) {
        self.ready_on_pong = true;
    }

    /// Whether a re-subscription still waits for its PONG.
    pub fn awaiting_ready(&self) -> bool {
        self.ready_on_pong
    }

    /// A PONG arrived. Returns `true` when it completes a re-subscription.
    pub fn on_pong(&mut self) -> bool {
        self.pings_in_flight = self.pings_in_flight.saturating_sub(1);
        if self.pings_in_flight == 0 {
            self.oldest_ping = None;
        }
        std::mem::take(&mut self.ready_on_pong)
    }

    pub fn keepalive(&self, now: Instant) -> Keepalive {
        if self
            .oldest_ping
            .is_some_and(|t| now.saturating_duration_since(t) > PONG_TIMEOUT)
        {
            Keepalive::Dead
        } else if now.saturating_duration_since(self.last_ping) >= KEEPALIVE {
            Keepalive::Ping
        } else {
            Keepalive::Idle
        }
    }
}

/// One connection to a Redis node in subscribed mode.
pub(super) struct RedisLink {
    /// Plain TCP, or TLS for `rediss://` (`Endpoint::wrap`).
    stream: Socket,
    /// Bytes read and not parsed yet: the subscriber takes it out while it acts on replies.
    pub buf: ReadBuf,
    pub state: LinkState,
}

impl RedisLink {
    /// Connects to `url` (blocking, with a timeout), registers the socket as `token` and queues
    /// the AUTH the URL asks for.
    pub fn open(
        url: &str,
        tls: Option<&Arc<rustls::ClientConfig>>,
        registry: &Registry,
        token: Token,
    ) -> io::Result<Self> {
        let endpoint = Endpoint::resolve(url)?;
        let std_stream = std::net::TcpStream::connect_timeout(&endpoint.addr, CONNECT_TIMEOUT)?;
        std_stream.set_nodelay(true)?;
        std_stream.set_nonblocking(true)?;
        let mut stream = endpoint.wrap(TcpStream::from_std(std_stream), tls)?;
        let interest = Interest::READABLE | Interest::WRITABLE;
        registry.register(stream.tcp(), token, interest)?;
        let mut out = Vec::new();
        endpoint.write_auth(&mut out);
        Ok(RedisLink {
            stream,
            buf: ReadBuf::default(),
            state: LinkState::new(out, Instant::now()),
        })
    }

    /// Reads once into the buffer; `Ok(true)` when more may be waiting (see [`ReadBuf::fill`]).
    pub fn fill(&mut self) -> io::Result<bool> {
        // TLS reads stop at a record: only WouldBlock says the socket is drained.
        let short_read_drains = self.stream.is_plain();
        self.buf.fill(&mut self.stream, short_read_drains)
    }

    /// Takes the socket off the poll and closes it.
    pub fn deregister(mut self, registry: &Registry) {
        let _ = registry.deregister(self.stream.tcp());
    }

    /// Writes queued bytes until done or WouldBlock.
    pub fn flush(&mut self) -> io::Result<()> {
        let out = &mut self.state.out;
        let mut written = 0;
        let result = loop {
            if written == out.len() {
                // TLS: records rustls still holds (the handshake, a tail the socket refused).
                break match self.stream.flush() {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
                    other => other,
                };
            }
            match self.stream.write(&out[written..]) {
                Ok(0) => break Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        out.drain(..written);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::Value;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn commands(out: &[u8]) -> Vec<Value> {
        let mut parser = redis::Parser::new();
        let mut rest = out;
        let mut values = Vec::new();
        // The parser buffers what it read ahead; it fails once everything is parsed.
        while let Ok(value) = parser.parse_value(&mut rest) {
            values.push(value);
        }
        values
    }

    #[test]
    fn channels_are_sent_in_commands_of_at_most_1024() {
        let mut state = LinkState::new(Vec::new(), Instant::now());
        let channels: Vec<String> = (0..2050).map(|i| format!("sb:u:{i}")).collect();
        state.write_channels("SUBSCRIBE", &channels);
        let sent = commands(&state.out);
        let sizes: Vec<usize> = sent
            .iter()
            .map(|v| match v {
                Value::Array(items) => items.len() - 1,
                other => panic!("not a command: {other:?}"),
            })
            .collect();
        assert_eq!(sizes, [1024, 1024, 2]);
        assert_eq!(
            sent[2],
            Value::Array(vec![
                bulk("SUBSCRIBE"),
                bulk("sb:u:2048"),
                bulk("sb:u:2049")
            ])
        );

        state.out.clear();
        state.write_channels("UNSUBSCRIBE", &[]);
        assert!(state.out.is_empty(), "no channels, no command");

        // Sharded: a command per channel (channels of different slots cannot share one).
        for command in ["SSUBSCRIBE", "SUNSUBSCRIBE"] {
            state.out.clear();
            state.write_channels(command, &channels[..3]);
            let sent = commands(&state.out);
            assert_eq!(sent.len(), 3, "{command}");
            assert_eq!(sent[1], Value::Array(vec![bulk(command), bulk("sb:u:1")]));
        }
    }

    #[test]
    fn the_first_pong_after_a_resubscription_marks_it_ready() {
        let t0 = Instant::now();
        let mut state = LinkState::new(Vec::new(), t0);
        state.ready_on_pong();
        state.ping(t0);
        state.ping(t0 + Duration::from_secs(5));
        assert!(state.awaiting_ready());
        assert!(state.on_pong(), "the re-subscription's PONG");
        assert!(!state.awaiting_ready());
        assert!(!state.on_pong(), "a keepalive PONG");
        assert_eq!(state.pings_in_flight, 0);
        assert_eq!(state.oldest_ping, None);
        assert!(!state.on_pong(), "an unexpected PONG does not underflow");
    }

    #[test]
    fn keepalive_pings_when_idle_and_gives_up_without_a_pong() {
        let t0 = Instant::now();
        let mut state = LinkState::new(Vec::new(), t0);
        assert_eq!(
            state.keepalive(t0 + Duration::from_secs(1)),
            Keepalive::Idle
        );
        assert_eq!(state.keepalive(t0 + KEEPALIVE), Keepalive::Ping);
        state.ping(t0 + KEEPALIVE);
        assert_eq!(
            state.keepalive(t0 + KEEPALIVE + Duration::from_secs(1)),
            Keepalive::Idle
        );
        // Unanswered: another PING is due before the first one times out.
        assert_eq!(state.keepalive(t0 + KEEPALIVE * 2), Keepalive::Ping);
        state.ping(t0 + KEEPALIVE * 2);
        let late = t0 + KEEPALIVE + PONG_TIMEOUT + Duration::from_millis(1);
        assert_eq!(
            state.keepalive(late),
            Keepalive::Dead,
            "timed from the oldest PING"
        );
        state.on_pong();
        state.on_pong();
        assert_eq!(
            state.keepalive(late),
            Keepalive::Ping,
            "answered: the next PING is due"
        );
        let soon = t0 + KEEPALIVE * 2 + Duration::from_secs(1);
        assert_eq!(state.keepalive(soon), Keepalive::Idle);
    }
}
