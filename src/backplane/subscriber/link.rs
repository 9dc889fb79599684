//! The subscriber's Redis links: one non-blocking socket per shard with its RESP parser,
//! PING/PONG keepalive and reconnect backoff, and the Redis Cluster topology that lists them.
//! What a reply means is read in [`super::reply`].

use std::io::{self, Write};
use std::net::ToSocketAddrs;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use redis::{IntoConnectionInfo, Value};

use crate::backplane::cluster::SlotMap;
use crate::backplane::{Backoff, Backplane};

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

    /// Queues `command` for `channels`, at most [`CHANNELS_PER_COMMAND`] per command.
    pub fn write_channels(&mut self, command: &str, channels: &[String]) {
        for chunk in channels.chunks(CHANNELS_PER_COMMAND) {
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
    stream: TcpStream,
    parser: redis::Parser,
    pub state: LinkState,
}

impl RedisLink {
    /// Connects to `url` (blocking, with a timeout), registers the socket as `token` and queues
    /// the AUTH the URL asks for.
    fn open(url: &str, registry: &Registry, token: Token) -> io::Result<Self> {
        let info = url.into_connection_info().map_err(io::Error::other)?;
        let redis::ConnectionAddr::Tcp(host, port) = info.addr().clone() else {
            return Err(io::Error::other("only redis:// URLs are supported"));
        };
        let addr = (host.as_str(), port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::other("redis host did not resolve"))?;
        let std_stream = std::net::TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
        std_stream.set_nodelay(true)?;
        std_stream.set_nonblocking(true)?;
        let mut stream = TcpStream::from_std(std_stream);
        registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)?;
        let mut out = Vec::new();
        let settings = info.redis_settings();
        if let Some(password) = settings.password() {
            let mut auth = redis::cmd("AUTH");
            if let Some(user) = settings.username() {
                auth.arg(user);
            }
            auth.arg(password);
            auth.write_packed_command(&mut out);
        }
        Ok(RedisLink {
            stream,
            parser: redis::Parser::new(),
            state: LinkState::new(out, Instant::now()),
        })
    }

    /// The next complete reply; a timeout error means no complete reply is buffered yet.
    pub fn read(&mut self) -> redis::RedisResult<Value> {
        self.parser.parse_value(&mut self.stream)
    }

    /// Writes queued bytes until done or WouldBlock.
    fn flush(&mut self) -> io::Result<()> {
        let out = &mut self.state.out;
        let mut written = 0;
        let result = loop {
            if written == out.len() {
                break Ok(());
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

/// One shard's slot: its address, its link while connected, and when to retry.
struct ShardSlot {
    addr: String,
    link: Option<RedisLink>,
    backoff: Backoff,
    retry_at: Instant,
    /// Channels Redis confirmed on this link.
    confirmed: u64,
}

/// Every shard's slot, shard `i`'s socket registered as `Token(i)`, and the topology that
/// lists the shards (one shard without a Redis Cluster).
pub(super) struct Links {
    sharded: bool,
    topology: Option<SlotMap>,
    shards: Vec<ShardSlot>,
    topology_retry_at: Instant,
    topology_backoff: Backoff,
    ever_connected: bool,
    outage_logged: bool,
}

impl Links {
    pub fn new(bp: &Backplane) -> Self {
        Links {
            sharded: bp.config.sharded(),
            topology: None,
            shards: Vec::new(),
            topology_retry_at: Instant::now(),
            topology_backoff: Backoff::new(
                bp.config.reconnect_min,
                bp.config.reconnect_max,
                bp.node_id,
            ),
            ever_connected: false,
            outage_logged: false,
        }
    }

    /// Number of shards (0 while the topology is unknown).
    pub fn len(&self) -> usize {
        self.shards.len()
    }

    /// When the loop must wake at the latest to retry what is down.
    pub fn wake_at(&self, now: Instant) -> Instant {
        let mut wake_at = now + Duration::from_secs(1);
        if self.topology.is_none() {
            wake_at = wake_at.min(self.topology_retry_at);
        }
        for shard in self.shards.iter().filter(|s| s.link.is_none()) {
            wake_at = wake_at.min(shard.retry_at);
        }
        wake_at
    }

    /// Fetches the topology when unknown and its retry time came. Returns whether it is known.
    pub fn ensure_topology(&mut self, bp: &Backplane, now: Instant) -> bool {
        if self.topology.is_some() {
            return true;
        }
        if now < self.topology_retry_at {
            return false;
        }
        match bp.config.topology() {
            Ok(map) => {
                self.topology_backoff.reset();
                self.shards = map
                    .shards
                    .iter()
                    .enumerate()
                    .map(|(i, addr)| ShardSlot {
                        addr: addr.clone(),
                        link: None,
                        backoff: Backoff::new(
                            bp.config.reconnect_min,
                            bp.config.reconnect_max,
                            bp.node_id ^ (i as u64 + 1),
                        ),
                        retry_at: now,
                        confirmed: 0,
                    })
                    .collect();
                self.topology = Some(map);
                true
            }
            Err(e) => {
                if !self.outage_logged {
                    log::warn!("redis subscriber cannot reach redis: {e}; retrying with backoff");
                    self.outage_logged = true;
                }
                self.topology_retry_at = now + self.topology_backoff.next_delay();
                false
            }
        }
    }

    /// Whether shard `i` is down and its retry time came.
    pub fn due(&self, i: usize, now: Instant) -> bool {
        self.shards[i].link.is_none() && now >= self.shards[i].retry_at
    }

    /// Connects shard `i`. Returns `false` (and schedules a retry) when that failed.
    pub fn connect(&mut self, i: usize, bp: &Backplane, registry: &Registry) -> bool {
        let url = bp.config.node_url(&self.shards[i].addr);
        match RedisLink::open(&url, registry, Token(i)) {
            Ok(link) => {
                if self.ever_connected {
                    bp.stats.reconnects.fetch_add(1, Relaxed);
                    log::info!("redis subscriber reconnected to {}", self.shards[i].addr);
                }
                self.ever_connected = true;
                self.outage_logged = false;
                self.shards[i].backoff.reset();
                self.shards[i].link = Some(link);
                true
            }
            Err(e) => {
                if !self.outage_logged {
                    log::warn!(
                        "redis subscriber cannot connect to {}: {e}; retrying with backoff",
                        self.shards[i].addr
                    );
                    self.outage_logged = true;
                }
                let shard = &mut self.shards[i];
                shard.retry_at = Instant::now() + shard.backoff.next_delay();
                false
            }
        }
    }

    /// Drops shard `i`'s link and schedules its reconnect.
    pub fn disconnect(&mut self, i: usize, registry: &Registry, why: &str) {
        let shard = &mut self.shards[i];
        if let Some(mut link) = shard.link.take() {
            let _ = registry.deregister(&mut link.stream);
            log::warn!("redis subscriber disconnected from {}: {why}", shard.addr);
        }
        shard.confirmed = 0;
        shard.retry_at = Instant::now() + shard.backoff.next_delay();
        self.outage_logged = true;
    }

    /// Drops every link and the topology: the next turn fetches it again.
    pub fn clear(&mut self, registry: &Registry) {
        for shard in &mut self.shards {
            if let Some(mut link) = shard.link.take() {
                let _ = registry.deregister(&mut link.stream);
            }
        }
        self.shards.clear();
        self.topology = None;
        self.topology_retry_at = Instant::now();
    }

    /// The shard serving `channel` (0 without a Redis Cluster).
    pub fn shard_of(&self, channel: &str) -> usize {
        match &self.topology {
            Some(map) if self.sharded => map.shard_of(channel.as_bytes()),
            _ => 0,
        }
    }

    pub fn link(&mut self, i: usize) -> Option<&mut RedisLink> {
        self.shards.get_mut(i).and_then(|s| s.link.as_mut())
    }

    pub fn is_connected(&self, i: usize) -> bool {
        self.shards.get(i).is_some_and(|s| s.link.is_some())
    }

    /// Every shard is connected.
    pub fn all_connected(&self) -> bool {
        !self.shards.is_empty() && self.shards.iter().all(|s| s.link.is_some())
    }

    /// Every shard is connected and Redis processed its re-subscription.
    pub fn all_ready(&self) -> bool {
        self.all_connected()
            && self
                .shards
                .iter()
                .all(|s| s.link.as_ref().is_some_and(|l| !l.state.awaiting_ready()))
    }

    /// Records the channel count Redis reported on shard `i`.
    pub fn set_confirmed(&mut self, i: usize, count: i64) {
        self.shards[i].confirmed = count.max(0) as u64;
    }

    /// Channels confirmed over all shards.
    pub fn confirmed(&self) -> u64 {
        self.shards.iter().map(|s| s.confirmed).sum()
    }

    /// Queues `command` for `channels` on shard `i`, if connected.
    pub fn write_channels(&mut self, i: usize, command: &str, channels: &[String]) {
        if let Some(link) = self.link(i) {
            link.state.write_channels(command, channels);
        }
    }

    /// Queues a PING on shard `i`, if connected.
    pub fn ping(&mut self, i: usize) {
        if let Some(link) = self.link(i) {
            link.state.ping(Instant::now());
        }
    }

    /// Writes shard `i`'s queued bytes (nothing when it is down).
    pub fn flush(&mut self, i: usize) -> io::Result<()> {
        self.link(i).map_or(Ok(()), RedisLink::flush)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
