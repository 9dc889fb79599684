//! The subscriber thread: one Redis connection per process, multiplexed with membership changes
//! from the cores on a `mio::Poll`.
//!
//! It owns the process-wide map user → cores hosting the user. In `per-user` routing it keeps
//! exactly one Redis subscription per user in that map (subscribing on the first device in the
//! process, unsubscribing after the last, batched per wake-up); in `seed` routing it subscribes to
//! the one seed channel. Each incoming frame goes to the inboxes of the cores that host its user.
//! The socket is non-blocking and the RESP parser keeps partial replies between reads, so a
//! membership change never waits behind a blocking read.

use std::collections::{HashMap, HashSet};
use std::io::{self, Write};
use std::net::ToSocketAddrs;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token, Waker};
use redis::{IntoConnectionInfo, Value};
use smallvec::SmallVec;
use tungstenite::Utf8Bytes;

use super::publisher::payload_hash;
use super::wire::{self, Skip};
use super::{Backoff, Backplane, Membership, Routing};
use crate::bus::{Bus, Dispatch};
use crate::UserId;

const SOCKET: Token = Token(0);
const WAKER: Token = Token(1);
/// Channels per SUBSCRIBE/UNSUBSCRIBE command.
const CHANNELS_PER_COMMAND: usize = 1024;
/// A PING is sent this often to notice a dead connection that TCP has not reported.
const KEEPALIVE: Duration = Duration::from_secs(5);
/// No PONG within this long: the connection is considered dead.
const PONG_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an own seed payload is remembered while waiting for Redis to echo it.
const OWN_PAYLOAD_TTL: Duration = Duration::from_secs(60);

struct Connection {
    stream: TcpStream,
    parser: redis::Parser,
    out: Vec<u8>,
    last_ping: Instant,
    /// Sent PINGs not yet answered; the first is the one that marks re-subscription complete.
    pings_in_flight: u32,
    oldest_ping: Option<Instant>,
    ready_on_pong: bool,
}

/// The subscriber and the state it owns.
pub struct Subscriber {
    bp: Arc<Backplane>,
    bus: Arc<Bus>,
    poll: Poll,
    hosts: HashMap<UserId, SmallVec<[u16; 4]>>,
    /// Users subscribed on the current connection (per-user routing).
    subscribed: HashSet<UserId>,
    conn: Option<Connection>,
    backoff: Backoff,
    retry_at: Instant,
    ever_connected: bool,
    outage_logged: bool,
    own: HashMap<u64, (u32, Instant)>,
    next_own_purge: Instant,
}

impl Subscriber {
    /// Builds the poll and installs the waker the cores use.
    pub(crate) fn new(bp: Arc<Backplane>, bus: Arc<Bus>) -> io::Result<Self> {
        let poll = Poll::new()?;
        let waker = Waker::new(poll.registry(), WAKER)?;
        let _ = bp.subscriber_waker.set(waker);
        let backoff = Backoff::new(bp.config.reconnect_min, bp.config.reconnect_max, bp.node_id);
        Ok(Subscriber {
            bp,
            bus,
            poll,
            hosts: HashMap::new(),
            subscribed: HashSet::new(),
            conn: None,
            backoff,
            retry_at: Instant::now(),
            ever_connected: false,
            outage_logged: false,
            own: HashMap::new(),
            next_own_purge: Instant::now() + OWN_PAYLOAD_TTL,
        })
    }

    /// Runs until [`Backplane::stop`].
    pub(crate) fn run(mut self) {
        let mut events = Events::with_capacity(64);
        while !self.bp.stop.load(Relaxed) {
            let now = Instant::now();
            if self.conn.is_none() && now >= self.retry_at {
                self.connect();
            }
            let timeout = match &self.conn {
                None => self.retry_at.saturating_duration_since(Instant::now()),
                Some(_) => Duration::from_secs(1),
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    log::error!("redis subscriber poll failed: {e}");
                    break;
                }
            }
            let mut readable = false;
            for event in events.iter() {
                if event.token() == SOCKET {
                    readable |= event.is_readable() || event.is_read_closed() || event.is_error();
                }
            }
            if readable {
                self.read_all();
            }
            self.apply_membership();
            self.keepalive();
            self.flush();
        }
        self.bp.stats.subscriber_connected.store(0, Relaxed);
    }

    fn connect(&mut self) {
        match self.open() {
            Ok(conn) => {
                if self.ever_connected {
                    self.bp.stats.reconnects.fetch_add(1, Relaxed);
                    log::info!(
                        "redis subscriber reconnected; re-subscribing {} users",
                        self.hosts.len()
                    );
                }
                self.ever_connected = true;
                self.outage_logged = false;
                self.backoff.reset();
                self.conn = Some(conn);
                self.resubscribe();
                self.bp.stats.subscriber_connected.store(1, Relaxed);
            }
            Err(e) => {
                if !self.outage_logged {
                    log::warn!("redis subscriber cannot connect: {e}; retrying with backoff");
                    self.outage_logged = true;
                }
                self.retry_at = Instant::now() + self.backoff.next_delay();
            }
        }
    }

    fn open(&mut self) -> io::Result<Connection> {
        let info = self
            .bp
            .config
            .url
            .as_str()
            .into_connection_info()
            .map_err(io::Error::other)?;
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
        self.poll.registry().register(
            &mut stream,
            SOCKET,
            Interest::READABLE | Interest::WRITABLE,
        )?;
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
        Ok(Connection {
            stream,
            parser: redis::Parser::new(),
            out,
            last_ping: Instant::now(),
            pings_in_flight: 0,
            oldest_ping: None,
            ready_on_pong: false,
        })
    }

    /// Subscribes everything this instance needs on a fresh connection, then a PING whose reply
    /// says Redis has processed all of it.
    fn resubscribe(&mut self) {
        self.bp.subscriber_ready.store(false, SeqCst);
        self.subscribed.clear();
        let channels: Vec<String> = match self.bp.config.routing {
            Routing::Seed => vec![wire::SEED_CHANNEL.to_string()],
            Routing::PerUser => {
                self.subscribed.extend(self.hosts.keys().cloned());
                let prefix = &self.bp.config.channel_prefix;
                self.hosts
                    .keys()
                    .map(|u| wire::user_channel(prefix, u))
                    .collect()
            }
        };
        self.write_channels("SUBSCRIBE", &channels);
        if let Some(conn) = self.conn.as_mut() {
            conn.ready_on_pong = true;
        }
        self.send_ping();
    }

    fn write_channels(&mut self, command: &str, channels: &[String]) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        for chunk in channels.chunks(CHANNELS_PER_COMMAND) {
            let mut cmd = redis::cmd(command);
            for ch in chunk {
                cmd.arg(ch.as_str());
            }
            cmd.write_packed_command(&mut conn.out);
        }
    }

    fn send_ping(&mut self) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        redis::cmd("PING").write_packed_command(&mut conn.out);
        conn.pings_in_flight += 1;
        conn.oldest_ping.get_or_insert_with(Instant::now);
        conn.last_ping = Instant::now();
    }

    fn keepalive(&mut self) {
        let Some(conn) = self.conn.as_ref() else {
            return;
        };
        if conn.oldest_ping.is_some_and(|t| t.elapsed() > PONG_TIMEOUT) {
            self.disconnect("no PONG from redis");
            return;
        }
        if conn.last_ping.elapsed() >= KEEPALIVE {
            self.send_ping();
        }
    }

    /// Applies the cores' membership changes and (un)subscribes the users whose state changed.
    fn apply_membership(&mut self) {
        let mut touched: Vec<UserId> = Vec::new();
        while let Some(change) = self.bp.membership.pop() {
            match change {
                Membership::Joined(user, core) => {
                    let cores = self.hosts.entry(user.clone()).or_default();
                    if !cores.contains(&(core as u16)) {
                        cores.push(core as u16);
                    }
                    touched.push(user);
                }
                Membership::Left(user, core) => {
                    if let Some(cores) = self.hosts.get_mut(&user) {
                        cores.retain(|c| *c != core as u16);
                        if cores.is_empty() {
                            self.hosts.remove(&user);
                        }
                    }
                    touched.push(user);
                }
            }
        }
        if touched.is_empty() || self.bp.config.routing != Routing::PerUser || self.conn.is_none() {
            return;
        }
        let prefix = self.bp.config.channel_prefix.clone();
        let (mut subscribe, mut unsubscribe) = (Vec::new(), Vec::new());
        for user in touched {
            let wanted = self.hosts.contains_key(&user);
            let have = self.subscribed.contains(&user);
            if wanted && !have {
                subscribe.push(wire::user_channel(&prefix, &user));
                self.subscribed.insert(user);
            } else if !wanted && have {
                unsubscribe.push(wire::user_channel(&prefix, &user));
                self.subscribed.remove(&user);
            }
        }
        self.write_channels("SUBSCRIBE", &subscribe);
        self.write_channels("UNSUBSCRIBE", &unsubscribe);
    }

    fn flush(&mut self) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let mut written = 0;
        let result = loop {
            if written == conn.out.len() {
                break Ok(());
            }
            match conn.stream.write(&conn.out[written..]) {
                Ok(0) => break Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        conn.out.drain(..written);
        if let Err(e) = result {
            self.disconnect(&format!("write failed: {e}"));
        }
    }

    fn read_all(&mut self) {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return;
            };
            match conn.parser.parse_value(&mut conn.stream) {
                Ok(value) => self.on_value(value),
                Err(e) if e.is_timeout() => return,
                Err(e) => {
                    // Includes Redis closing the connection, e.g. a subscriber over its
                    // client-output-buffer-limit.
                    self.disconnect(&format!("read failed: {e}"));
                    return;
                }
            }
        }
    }

    fn disconnect(&mut self, why: &str) {
        if let Some(mut conn) = self.conn.take() {
            let _ = self.poll.registry().deregister(&mut conn.stream);
            log::warn!("redis subscriber disconnected: {why}");
        }
        self.bp.stats.subscriber_connected.store(0, Relaxed);
        self.bp.stats.subscribed_channels.store(0, Relaxed);
        self.bp.subscriber_ready.store(false, SeqCst);
        self.subscribed.clear();
        self.outage_logged = true;
        self.retry_at = Instant::now() + self.backoff.next_delay();
    }

    fn on_value(&mut self, value: Value) {
        let items = match value {
            Value::Array(items) => items,
            Value::Push { kind, mut data } => {
                data.insert(0, Value::BulkString(kind.to_string().into_bytes()));
                data
            }
            Value::Okay | Value::SimpleString(_) => return, // AUTH
            other => {
                log::warn!("redis subscriber: unexpected reply {other:?}");
                return;
            }
        };
        let kind = match items.first() {
            Some(Value::BulkString(k)) => k.as_slice(),
            Some(Value::SimpleString(k)) => k.as_bytes(),
            _ => return,
        };
        match (kind, items.as_slice()) {
            (b"message", [_, Value::BulkString(ch), Value::BulkString(payload)]) => {
                self.on_message(ch, payload)
            }
            (b"pmessage", [_, _, Value::BulkString(ch), Value::BulkString(payload)]) => {
                self.on_message(ch, payload)
            }
            (b"subscribe" | b"unsubscribe", [_, _, Value::Int(count)]) => {
                self.bp
                    .stats
                    .subscribed_channels
                    .store((*count).max(0) as u64, Relaxed);
            }
            (b"pong", _) => {
                if let Some(conn) = self.conn.as_mut() {
                    conn.pings_in_flight = conn.pings_in_flight.saturating_sub(1);
                    if conn.pings_in_flight == 0 {
                        conn.oldest_ping = None;
                    }
                    if std::mem::take(&mut conn.ready_on_pong) {
                        self.bp.subscriber_ready.store(true, SeqCst);
                    }
                }
            }
            _ => log::debug!(
                "redis subscriber: ignored {:?}",
                String::from_utf8_lossy(kind)
            ),
        }
    }

    fn on_message(&mut self, channel: &[u8], payload: &[u8]) {
        let bp = Arc::clone(&self.bp);
        let stats = &bp.stats;
        stats.received.fetch_add(1, Relaxed);
        let decoded = match self.bp.config.routing {
            Routing::PerUser => {
                match wire::user_of_channel(&self.bp.config.channel_prefix, channel) {
                    Some(user) => wire::read_user_payload(payload, self.bp.node_id)
                        .map(|f| (user.to_string(), f)),
                    None => Err(Skip::Invalid),
                }
            }
            Routing::Seed => {
                if self.is_own_seed_payload(payload) {
                    Err(Skip::Own)
                } else {
                    wire::read_seed_payload(payload)
                }
            }
        };
        match decoded {
            Ok((user, frame)) => self.route(&user, frame),
            Err(Skip::Own) => {
                stats.ignored_own.fetch_add(1, Relaxed);
            }
            Err(Skip::Invalid) => {
                stats.invalid.fetch_add(1, Relaxed);
                log::debug!(
                    "redis: skipped an invalid payload on {:?}",
                    String::from_utf8_lossy(channel)
                );
            }
        }
    }

    fn is_own_seed_payload(&mut self, payload: &[u8]) -> bool {
        let now = Instant::now();
        while let Some(hash) = self.bp.own_payloads.pop() {
            self.own.entry(hash).or_insert((0, now)).0 += 1;
        }
        if now >= self.next_own_purge {
            self.own
                .retain(|_, (_, at)| now.duration_since(*at) < OWN_PAYLOAD_TTL);
            self.next_own_purge = now + OWN_PAYLOAD_TTL;
        }
        let hash = payload_hash(payload);
        match self.own.get_mut(&hash) {
            Some((n, _)) => {
                *n -= 1;
                if *n == 0 {
                    self.own.remove(&hash);
                }
                true
            }
            None => false,
        }
    }

    fn route(&self, user: &str, frame: Utf8Bytes) {
        let stats = &self.bp.stats;
        let Some(cores) = self.hosts.get(user) else {
            stats.not_hosted.fetch_add(1, Relaxed);
            return;
        };
        // Received dispatches are never published again, so `args_at` is not used.
        let dispatch = Arc::new(Dispatch {
            users: vec![UserId::from(user)].into(),
            frame,
            args_at: 0,
        });
        for &core in cores {
            if self.bus.send(core as usize, Arc::clone(&dispatch)) {
                stats.delivered.fetch_add(1, Relaxed);
            } else {
                stats.inbox_drops.fetch_add(1, Relaxed);
            }
        }
    }
}
