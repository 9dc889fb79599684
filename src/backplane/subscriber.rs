//! The subscriber thread: one Redis connection per process (one per shard on a Redis Cluster),
//! multiplexed with membership changes from the cores on a `mio::Poll`.
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

use super::cluster::SlotMap;
use super::publisher::payload_hash;
use super::room_routes::{ChannelChanges, RoomRoutes};
use super::wire::{self, Skip};
use super::{Backoff, Backplane, Job, Membership, ReplayRequest, RoomAck, RoomJob, Routing};
use crate::bus::{Bus, CoreMsg, Dispatch, RoomAnswer, RoomDelivery};
use crate::history::Delivery;
use crate::UserId;

/// Shard `i`'s socket is registered as `Token(i)`; the waker sits above any shard.
const WAKER: Token = Token(usize::MAX - 1);
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

/// One shard's connection slot.
struct Shard {
    addr: String,
    conn: Option<Connection>,
    backoff: Backoff,
    retry_at: Instant,
    /// Channels Redis confirmed on this connection.
    confirmed: u64,
}

/// The subscriber and the state it owns.
pub struct Subscriber {
    /// Ready (every shard connected, every subscription confirmed) at the last check.
    ready: bool,
    /// Has been ready at least once: becoming ready again means an outage ended.
    ready_before: bool,
    bp: Arc<Backplane>,
    bus: Arc<Bus>,
    poll: Poll,
    hosts: HashMap<UserId, SmallVec<[u16; 4]>>,
    /// Users whose channel was subscribed (per-user routing), on whichever shard serves it.
    subscribed: HashSet<UserId>,
    topology: Option<SlotMap>,
    shards: Vec<Shard>,
    topology_retry_at: Instant,
    topology_backoff: Backoff,
    ever_connected: bool,
    outage_logged: bool,
    own: HashMap<u64, (u32, Instant)>,
    next_own_purge: Instant,
    /// Users whose channel Redis confirmed (history: replays wait for this).
    confirmed: HashSet<UserId>,
    /// Replay requests waiting for their user's subscription to be confirmed.
    pending_replays: HashMap<UserId, Vec<ReplayRequest>>,
    /// The history worker, when history is on.
    worker: Option<std::sync::mpsc::Sender<Job>>,
    /// Rooms on: which hosted users are in which rooms (see `room_routes`).
    routes: RoomRoutes,
    /// Joins and leaves done in Redis, acked once the routes show them.
    room_acks: Vec<RoomAck>,
}

impl Subscriber {
    /// Builds the poll and installs the waker the cores use.
    pub(crate) fn new(
        bp: Arc<Backplane>,
        bus: Arc<Bus>,
        worker: Option<std::sync::mpsc::Sender<Job>>,
    ) -> io::Result<Self> {
        let poll = Poll::new()?;
        let waker = Waker::new(poll.registry(), WAKER)?;
        let _ = bp.subscriber_waker.set(waker);
        let topology_backoff =
            Backoff::new(bp.config.reconnect_min, bp.config.reconnect_max, bp.node_id);
        Ok(Subscriber {
            ready: false,
            ready_before: false,
            bp,
            bus,
            poll,
            hosts: HashMap::new(),
            subscribed: HashSet::new(),
            topology: None,
            shards: Vec::new(),
            topology_retry_at: Instant::now(),
            topology_backoff,
            ever_connected: false,
            outage_logged: false,
            own: HashMap::new(),
            next_own_purge: Instant::now() + OWN_PAYLOAD_TTL,
            confirmed: HashSet::new(),
            pending_replays: HashMap::new(),
            worker,
            routes: RoomRoutes::default(),
            room_acks: Vec::new(),
        })
    }

    fn sharded(&self) -> bool {
        self.bp.config.sharded()
    }

    /// Runs until [`Backplane::stop`].
    pub(crate) fn run(mut self) {
        let mut events = Events::with_capacity(64);
        while !self.bp.stop.load(Relaxed) {
            self.ensure_connected();
            let now = Instant::now();
            let mut wake_at = now + Duration::from_secs(1);
            if self.topology.is_none() {
                wake_at = wake_at.min(self.topology_retry_at);
            }
            for shard in self.shards.iter().filter(|s| s.conn.is_none()) {
                wake_at = wake_at.min(shard.retry_at);
            }
            if let Err(e) = self
                .poll
                .poll(&mut events, Some(wake_at.saturating_duration_since(now)))
            {
                if e.kind() != io::ErrorKind::Interrupted {
                    log::error!("redis subscriber poll failed: {e}");
                    break;
                }
            }
            let mut readable: SmallVec<[usize; 8]> = SmallVec::new();
            for event in events.iter() {
                let Token(i) = event.token();
                if i < self.shards.len()
                    && (event.is_readable() || event.is_read_closed() || event.is_error())
                {
                    readable.push(i);
                }
            }
            for i in readable {
                self.read_all(i);
            }
            self.apply_membership();
            self.take_rooms();
            self.take_replays();
            self.keepalive();
            self.flush();
        }
        self.bp.stats.subscriber_connected.store(0, Relaxed);
    }

    /// Fetches the topology when unknown and (re)connects every shard whose retry time came.
    fn ensure_connected(&mut self) {
        let now = Instant::now();
        if self.topology.is_none() {
            if now < self.topology_retry_at {
                return;
            }
            match self.bp.config.topology() {
                Ok(map) => {
                    self.topology_backoff.reset();
                    self.shards = map
                        .shards
                        .iter()
                        .enumerate()
                        .map(|(i, addr)| Shard {
                            addr: addr.clone(),
                            conn: None,
                            backoff: Backoff::new(
                                self.bp.config.reconnect_min,
                                self.bp.config.reconnect_max,
                                self.bp.node_id ^ (i as u64 + 1),
                            ),
                            retry_at: now,
                            confirmed: 0,
                        })
                        .collect();
                    self.topology = Some(map);
                }
                Err(e) => {
                    if !self.outage_logged {
                        log::warn!(
                            "redis subscriber cannot reach redis: {e}; retrying with backoff"
                        );
                        self.outage_logged = true;
                    }
                    self.topology_retry_at = now + self.topology_backoff.next_delay();
                    return;
                }
            }
        }
        for i in 0..self.shards.len() {
            if self.shards[i].conn.is_none() && now >= self.shards[i].retry_at {
                self.connect(i);
            }
        }
    }

    fn connect(&mut self, i: usize) {
        match self.open(i) {
            Ok(conn) => {
                if self.ever_connected {
                    self.bp.stats.reconnects.fetch_add(1, Relaxed);
                    log::info!("redis subscriber reconnected to {}", self.shards[i].addr);
                }
                self.ever_connected = true;
                self.outage_logged = false;
                self.shards[i].backoff.reset();
                self.shards[i].conn = Some(conn);
                self.resubscribe(i);
                self.update_connected();
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
            }
        }
    }

    fn update_connected(&mut self) {
        let all = !self.shards.is_empty() && self.shards.iter().all(|s| s.conn.is_some());
        self.bp
            .stats
            .subscriber_connected
            .store(u64::from(all), Relaxed);
        let ready = all
            && self
                .shards
                .iter()
                .all(|s| s.conn.as_ref().is_some_and(|c| !c.ready_on_pong));
        self.bp.subscriber_ready.store(ready, SeqCst);
        if ready && !self.ready {
            if self.ready_before && self.bp.history().is_some() {
                // Back after an outage: whatever was published for our users while we were
                // unsubscribed is in their history but reached none of their devices. Every
                // core replays it to its open connections from the last offset each received.
                log::info!(
                    "redis subscriber ready again: open connections resume from their last offset"
                );
                for core in 0..self.bus.cores() {
                    self.bus.send(core, CoreMsg::Resync);
                }
            }
            self.ready_before = true;
        }
        self.ready = ready;
        let confirmed: u64 = self.shards.iter().map(|s| s.confirmed).sum();
        self.bp.stats.subscribed_channels.store(confirmed, Relaxed);
    }

    fn shard_of(&self, channel: &str) -> usize {
        match &self.topology {
            Some(map) if self.sharded() => map.shard_of(channel.as_bytes()),
            _ => 0,
        }
    }

    fn open(&mut self, i: usize) -> io::Result<Connection> {
        let url = self.bp.config.node_url(&self.shards[i].addr);
        let info = url
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
            Token(i),
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

    /// Subscribes everything shard `i` serves for this instance on its fresh connection, then
    /// a PING whose reply says Redis has processed all of it.
    fn resubscribe(&mut self, i: usize) {
        self.shards[i].confirmed = 0;
        let channels: Vec<String> = match self.bp.config.routing {
            Routing::Seed => vec![wire::SEED_CHANNEL.to_string()],
            Routing::PerUser => {
                let prefix = &self.bp.config.channel_prefix;
                let users: Vec<UserId> = self
                    .hosts
                    .keys()
                    .filter(|u| self.shard_of(&wire::user_channel(prefix, u)) == i)
                    .cloned()
                    .collect();
                let channels = users
                    .iter()
                    .map(|u| wire::user_channel(prefix, u))
                    .collect();
                self.subscribed.extend(users);
                let mut channels: Vec<String> = channels;
                if i == 0 && self.bp.rooms().is_some() {
                    channels.extend(
                        self.routes
                            .rooms()
                            .iter()
                            .map(|r| wire::room_channel(prefix, r)),
                    );
                }
                channels
            }
        };
        let command = if self.sharded() {
            "SSUBSCRIBE"
        } else {
            "SUBSCRIBE"
        };
        self.write_channels(i, command, &channels);
        if let Some(conn) = self.shards[i].conn.as_mut() {
            conn.ready_on_pong = true;
        }
        self.send_ping(i);
    }

    fn write_channels(&mut self, i: usize, command: &str, channels: &[String]) {
        let Some(conn) = self.shards[i].conn.as_mut() else {
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

    fn send_ping(&mut self, i: usize) {
        let Some(conn) = self.shards[i].conn.as_mut() else {
            return;
        };
        redis::cmd("PING").write_packed_command(&mut conn.out);
        conn.pings_in_flight += 1;
        conn.oldest_ping.get_or_insert_with(Instant::now);
        conn.last_ping = Instant::now();
    }

    fn keepalive(&mut self) {
        for i in 0..self.shards.len() {
            let Some(conn) = self.shards[i].conn.as_ref() else {
                continue;
            };
            if conn.oldest_ping.is_some_and(|t| t.elapsed() > PONG_TIMEOUT) {
                self.disconnect(i, "no PONG from redis");
            } else if conn.last_ping.elapsed() >= KEEPALIVE {
                self.send_ping(i);
            }
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
        if touched.is_empty() || self.bp.config.routing != Routing::PerUser {
            return;
        }
        let prefix = self.bp.config.channel_prefix.clone();
        let n = self.shards.len();
        let (mut subscribe, mut unsubscribe) = (vec![Vec::new(); n], vec![Vec::new(); n]);
        let mut rooms = ChannelChanges::default();
        for user in &touched {
            if !self.hosts.contains_key(user) {
                self.routes.drop_user(user, &mut rooms);
            }
        }
        self.apply_room_channels(rooms);
        for user in touched {
            let channel = wire::user_channel(&prefix, &user);
            let shard = self.shard_of(&channel);
            if self.shards.get(shard).is_none_or(|s| s.conn.is_none()) {
                // Disconnected: the reconnect re-subscribes from `hosts`.
                continue;
            }
            let wanted = self.hosts.contains_key(&user);
            let have = self.subscribed.contains(&user);
            if wanted && !have {
                subscribe[shard].push(channel);
                self.subscribed.insert(user);
            } else if !wanted && have {
                unsubscribe[shard].push(channel);
                self.subscribed.remove(&user);
                // Not confirmed from here on, even before Redis answers: a replay must wait
                // for the next subscription's confirmation.
                self.confirmed.remove(&user);
            }
        }
        let (sub, unsub) = if self.sharded() {
            ("SSUBSCRIBE", "SUNSUBSCRIBE")
        } else {
            ("SUBSCRIBE", "UNSUBSCRIBE")
        };
        for i in 0..n {
            self.write_channels(i, sub, &subscribe[i]);
            self.write_channels(i, unsub, &unsubscribe[i]);
        }
    }

    fn flush(&mut self) {
        for i in 0..self.shards.len() {
            let Some(conn) = self.shards[i].conn.as_mut() else {
                continue;
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
                self.disconnect(i, &format!("write failed: {e}"));
            }
        }
    }

    fn read_all(&mut self, i: usize) {
        loop {
            let Some(conn) = self.shards[i].conn.as_mut() else {
                return;
            };
            match conn.parser.parse_value(&mut conn.stream) {
                Ok(value) => self.on_value(i, value),
                Err(e) if e.is_timeout() => return,
                Err(e) => {
                    // Includes Redis closing the connection, e.g. a subscriber over its
                    // client-output-buffer-limit.
                    self.disconnect(i, &format!("read failed: {e}"));
                    return;
                }
            }
        }
    }

    /// Drops shard `i`'s connection; its channels are re-subscribed on reconnect.
    fn disconnect(&mut self, i: usize, why: &str) {
        let shard = &mut self.shards[i];
        if let Some(mut conn) = shard.conn.take() {
            let _ = self.poll.registry().deregister(&mut conn.stream);
            log::warn!("redis subscriber disconnected from {}: {why}", shard.addr);
        }
        shard.confirmed = 0;
        shard.retry_at = Instant::now() + shard.backoff.next_delay();
        self.outage_logged = true;
        if i == 0 {
            // The next connection subscribes every room again (`resubscribe`).
            self.routes.reset();
        }
        if self.bp.config.routing == Routing::PerUser {
            let prefix = self.bp.config.channel_prefix.clone();
            let lost: Vec<UserId> = self
                .subscribed
                .iter()
                .filter(|u| self.shard_of(&wire::user_channel(&prefix, u)) == i)
                .cloned()
                .collect();
            for u in lost {
                self.subscribed.remove(&u);
                self.confirmed.remove(&u);
            }
        }
        self.update_connected();
    }

    /// The cluster moved slots: forget the topology, reconnect everything from scratch.
    fn refresh_topology(&mut self, why: &str) {
        log::info!("redis cluster topology changed ({why}); refreshing");
        for i in 0..self.shards.len() {
            if let Some(mut conn) = self.shards[i].conn.take() {
                let _ = self.poll.registry().deregister(&mut conn.stream);
            }
        }
        self.shards.clear();
        self.subscribed.clear();
        self.confirmed.clear();
        self.topology = None;
        self.topology_retry_at = Instant::now();
        self.update_connected();
    }

    fn on_value(&mut self, i: usize, value: Value) {
        let items = match value {
            Value::Array(items) => items,
            Value::Push { kind, mut data } => {
                data.insert(0, Value::BulkString(kind.to_string().into_bytes()));
                data
            }
            // Outside subscribed mode (no channel yet) PING answers +PONG.
            Value::SimpleString(s) if s.eq_ignore_ascii_case("pong") => {
                self.on_pong(i);
                return;
            }
            Value::Okay | Value::SimpleString(_) => return, // AUTH
            Value::ServerError(e) => {
                let text = format!("{e:?}");
                if text.contains("MOVED") || text.contains("ASK") {
                    self.refresh_topology("MOVED");
                } else {
                    // E.g. LOADING from a Redis still reading its append-only file: a SUBSCRIBE
                    // it refused leaves a channel silently unsubscribed while later ones work,
                    // and a device would skip what was published in between. Start over: on
                    // reconnect every channel is subscribed again, and once all are confirmed
                    // every connection resumes from its last offset.
                    self.disconnect(i, &format!("server error {text}"));
                }
                return;
            }
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
            (b"message" | b"smessage", [_, Value::BulkString(ch), Value::BulkString(payload)]) => {
                self.on_message(ch, payload)
            }
            (b"pmessage", [_, _, Value::BulkString(ch), Value::BulkString(payload)]) => {
                self.on_message(ch, payload)
            }
            (b"subscribe" | b"ssubscribe", [_, Value::BulkString(ch), Value::Int(count)]) => {
                self.shards[i].confirmed = (*count).max(0) as u64;
                self.update_connected();
                let user =
                    wire::user_of_channel(&self.bp.config.channel_prefix, ch).map(UserId::from);
                if let Some(user) = user.filter(|u| self.subscribed.contains(u)) {
                    self.confirmed.insert(user.clone());
                    if self.bp.rooms().is_some() && self.routes.start_load(&user) {
                        self.bp.room_request(RoomJob::Load { user });
                    }
                } else if let Some(room) = wire::room_of_channel(&self.bp.config.channel_prefix, ch)
                {
                    for user in self.routes.confirmed(room) {
                        self.resync(user);
                    }
                }
            }
            (b"subscribe" | b"unsubscribe" | b"ssubscribe", [_, _, Value::Int(count)]) => {
                self.shards[i].confirmed = (*count).max(0) as u64;
                self.update_connected();
            }
            (b"sunsubscribe", [_, Value::BulkString(ch), Value::Int(count)]) => {
                self.shards[i].confirmed = (*count).max(0) as u64;
                // An SUNSUBSCRIBE we did not ask for means the slot moved to another shard.
                let user =
                    wire::user_of_channel(&self.bp.config.channel_prefix, ch).map(UserId::from);
                if user.is_some_and(|u| self.subscribed.contains(&u)) {
                    self.refresh_topology("slot migrated");
                } else {
                    self.update_connected();
                }
            }
            (b"pong", _) => self.on_pong(i),
            _ => log::debug!(
                "redis subscriber: ignored {:?}",
                String::from_utf8_lossy(kind)
            ),
        }
    }

    /// Hands each replay request to the worker once its user's channel is confirmed and the
    /// requesting core is listed as a host (its membership change travels on another queue), so
    /// every frame published after the query reaches the recovering connection.
    fn take_replays(&mut self) {
        while let Some(request) = self.bp.replays.pop() {
            self.pending_replays
                .entry(request.user.clone())
                .or_default()
                .push(request);
        }
        if self.pending_replays.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut ready = Vec::new();
        let (hosts, confirmed, routes) = (&self.hosts, &self.confirmed, &self.routes);
        let rooms_on = self.bp.rooms().is_some();
        self.pending_replays.retain(|user, requests| {
            let cores = hosts.get(user);
            // With rooms, the user's history also grows through room channels: those must be
            // routing to this instance too before the query runs.
            let rooms_ready = !rooms_on || routes.ready(user);
            requests.retain(|r| {
                // Past its deadline the core already answered the client.
                if now >= r.deadline {
                    return false;
                }
                let go = rooms_ready
                    && confirmed.contains(user)
                    && cores.is_some_and(|c| c.contains(&(r.core as u16)));
                if go {
                    ready.push(r.clone());
                }
                !go
            });
            !requests.is_empty()
        });
        for request in ready {
            self.to_worker(request);
        }
    }

    fn to_worker(&self, request: ReplayRequest) {
        if let Some(worker) = &self.worker {
            // Fails only when the worker exited (shutdown); the core's deadline answers then.
            let _ = worker.send(Job::Replay(request));
        }
    }

    fn on_pong(&mut self, i: usize) {
        if let Some(conn) = self.shards[i].conn.as_mut() {
            conn.pings_in_flight = conn.pings_in_flight.saturating_sub(1);
            if conn.pings_in_flight == 0 {
                conn.oldest_ping = None;
            }
            if std::mem::take(&mut conn.ready_on_pong) {
                self.update_connected();
            }
        }
    }

    fn on_message(&mut self, channel: &[u8], payload: &[u8]) {
        let bp = Arc::clone(&self.bp);
        let stats = &bp.stats;
        stats.received.fetch_add(1, Relaxed);
        if bp.rooms().is_some() {
            let prefix = &bp.config.channel_prefix;
            if let Some(room) = wire::room_of_channel(prefix, channel) {
                return self.route_room(room, payload);
            }
            if let Some(user) = wire::user_of_channel(prefix, channel) {
                if let Some((joined, room)) = wire::read_control(payload) {
                    return self.on_room_control(user, joined, room);
                }
            }
        }
        if bp.history().is_some() {
            let user = wire::user_of_channel(&bp.config.channel_prefix, channel);
            match user.map(|u| (u, wire::read_history_payload(payload))) {
                Some((user, Ok((offset, frame)))) => self.route_delivery(user, offset, frame),
                // An instance without history (an older version during a rolling upgrade, or
                // `--history off`) publishes frames without offsets: still delivered, as they
                // are, so a mixed fleet keeps working in this direction.
                Some((user, Err(_))) => match wire::read_user_payload(payload, bp.node_id) {
                    Ok(frame) => self.route(user, frame),
                    Err(_) => {
                        stats.invalid.fetch_add(1, Relaxed);
                    }
                },
                None => {
                    stats.invalid.fetch_add(1, Relaxed);
                }
            }
            return;
        }
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

    /// A room publication: one shared delivery per core, naming the room's local members.
    fn route_room(&self, room: &str, payload: &[u8]) {
        let stats = &self.bp.stats;
        let (offset, frame) = match wire::read_room_payload(payload) {
            Ok(decoded) => decoded,
            Err(_) => {
                stats.invalid.fetch_add(1, Relaxed);
                return;
            }
        };
        if offset.is_some() && self.ready_before && !self.ready {
            // As in `route_delivery`: back from an outage with some channels not confirmed yet,
            // a frame with an offset waits for the resync (it is in every member's history).
            stats.held_for_resync.fetch_add(1, Relaxed);
            return;
        }
        let Some(members) = self.routes.members(room) else {
            stats.not_hosted.fetch_add(1, Relaxed);
            return;
        };
        let delivery = Arc::new(RoomDelivery {
            members: Arc::clone(members),
            offset,
            frame,
            sio: Default::default(),
        });
        for core in 0..self.bus.cores() {
            if self.bus.send(core, CoreMsg::Room(Arc::clone(&delivery))) {
                stats.delivered.fetch_add(1, Relaxed);
            } else {
                stats.inbox_drops.fetch_add(1, Relaxed);
            }
        }
    }

    /// A membership change of a hosted user, from the user's channel.
    fn on_room_control(&mut self, user: &str, joined: bool, room: &str) {
        let max = self.bp.rooms().map_or(0, |r| r.max_room_name_bytes);
        if !crate::rooms::valid_room(room, max) {
            self.bp.stats.invalid.fetch_add(1, Relaxed);
            return;
        }
        let Some((user, _)) = self.hosts.get_key_value(user) else {
            return;
        };
        let user = user.clone();
        let mut changes = ChannelChanges::default();
        self.routes
            .control(&user, joined, room.into(), &mut changes);
        self.apply_room_channels(changes);
    }

    /// Sends the room (un)subscriptions (rooms live on the one non-cluster connection). While
    /// it is down, the reconnect subscribes every room the routes list.
    fn apply_room_channels(&mut self, changes: ChannelChanges) {
        self.bp
            .stats
            .room_members
            .store(self.routes.pairs() as u64, Relaxed);
        if changes == ChannelChanges::default() {
            return;
        }
        let prefix = self.bp.config.channel_prefix.clone();
        let channels = |rooms: &[crate::rooms::RoomId]| -> Vec<String> {
            rooms
                .iter()
                .map(|r| wire::room_channel(&prefix, r))
                .collect()
        };
        // Leaves first: a leave and a rejoin in one batch must end subscribed.
        self.write_channels(0, "UNSUBSCRIBE", &channels(&changes.unsubscribe));
        self.write_channels(0, "SUBSCRIBE", &channels(&changes.subscribe));
    }

    /// Tells the cores hosting `user` to resume its connections from their last offsets.
    fn resync(&self, user: UserId) {
        if let Some(cores) = self.hosts.get(&user) {
            for &core in cores {
                self.bus
                    .send(core as usize, CoreMsg::ResyncUser(user.clone()));
            }
        }
    }

    /// Applies loaded room sets, and acks joins and leaves the routes now show.
    fn take_rooms(&mut self) {
        while let Some((user, result)) = self.bp.rooms_loaded.pop() {
            if !self.hosts.contains_key(&user) || !self.routes.loading(&user) {
                continue;
            }
            match result {
                Ok(rooms) => {
                    let mut changes = ChannelChanges::default();
                    self.routes.loaded(&user, rooms, &mut changes);
                    self.apply_room_channels(changes);
                }
                Err(_) => {
                    // The worker paced itself before answering: ask again.
                    self.bp.room_request(RoomJob::Load { user });
                }
            }
        }
        while let Some(ack) = self.bp.room_acks.pop() {
            self.room_acks.push(ack);
        }
        if self.room_acks.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut done = Vec::new();
        let (routes, hosts) = (&self.routes, &self.hosts);
        self.room_acks.retain(|a| {
            let routed = match routes.is_member(&a.user, &a.room) {
                Some(true) => a.joined && routes.room_confirmed(&a.room),
                Some(false) => !a.joined,
                None => false,
            };
            let go = routed || now >= a.deadline || !hosts.contains_key(&a.user);
            if go {
                done.push((a.target, a.room.clone()));
            }
            !go
        });
        for (target, room) in done {
            let answer = RoomAnswer {
                key: target.key,
                serial: target.serial,
                ack: target.ack,
                result: Ok(serde_json::json!({ "room": &*room })),
            };
            self.bus
                .send(target.core, CoreMsg::RoomAnswer(Box::new(answer)));
        }
    }

    fn route_delivery(&self, user: &str, offset: crate::history::Offset, frame: Utf8Bytes) {
        let stats = &self.bp.stats;
        if self.ready_before && !self.ready {
            // Back from an outage, some channels confirmed, not all: a device handed this frame
            // now would move its last offset past what the outage hid from it, and the resync
            // (sent once every channel is confirmed) would start after the gap. The frame is in
            // the user's history, so the resync replays it.
            stats.held_for_resync.fetch_add(1, Relaxed);
            return;
        }
        let Some((user, cores)) = self.hosts.get_key_value(user) else {
            stats.not_hosted.fetch_add(1, Relaxed);
            return;
        };
        let delivery = Arc::new(Delivery {
            user: user.clone(),
            offset,
            frame,
            sio: Default::default(),
        });
        for &core in cores {
            if self
                .bus
                .send(core as usize, CoreMsg::Delivered(Arc::clone(&delivery)))
            {
                stats.delivered.fetch_add(1, Relaxed);
            } else {
                stats.inbox_drops.fetch_add(1, Relaxed);
            }
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
            sio: Default::default(),
            dedupe: None,
        });
        for &core in cores {
            if self
                .bus
                .send(core as usize, CoreMsg::Dispatch(Arc::clone(&dispatch)))
            {
                stats.delivered.fetch_add(1, Relaxed);
            } else {
                stats.inbox_drops.fetch_add(1, Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backplane::RedisConfig;
    use crate::history::Offset;

    fn request(user: &str, core: usize, deadline: Instant) -> ReplayRequest {
        ReplayRequest {
            user: user.into(),
            since: Offset(1, 1),
            core,
            key: 7,
            serial: 3,
            deadline,
        }
    }

    /// A replay may run only once Redis confirmed the user's channel and the requesting core is
    /// a host: before that, a publication could fall between the query and the subscription.
    #[test]
    fn replays_wait_for_the_confirmed_subscription_and_the_core() {
        let bp = Backplane::new(RedisConfig::new("redis://127.0.0.1:1"), 1);
        let bus = Arc::new(Bus::new(2, 16));
        let (tx, rx) = std::sync::mpsc::channel();
        let mut sub = Subscriber::new(Arc::clone(&bp), bus, Some(tx)).unwrap();
        let later = Instant::now() + Duration::from_secs(60);
        bp.request_replay(request("u1", 1, later));
        sub.take_replays();
        assert!(rx.try_recv().is_err(), "not subscribed yet");

        let u1 = UserId::from("u1");
        sub.confirmed.insert(u1.clone());
        sub.take_replays();
        assert!(
            rx.try_recv().is_err(),
            "confirmed, but core 1 is not a host yet"
        );

        sub.hosts.insert(u1.clone(), SmallVec::from_slice(&[0]));
        sub.take_replays();
        assert!(
            rx.try_recv().is_err(),
            "another core hosts u1, not the requester"
        );

        sub.hosts.insert(u1, SmallVec::from_slice(&[0, 1]));
        sub.take_replays();
        match rx.try_recv() {
            Ok(Job::Replay(r)) => assert_eq!((r.core, r.key, r.serial), (1, 7, 3)),
            other => panic!("expected the replay, got {other:?}"),
        }
        assert!(sub.pending_replays.is_empty());

        // A request past its deadline is dropped: the core has answered the client already.
        bp.request_replay(request("u2", 0, Instant::now()));
        sub.take_replays();
        assert!(sub.pending_replays.is_empty());
        assert!(rx.try_recv().is_err());
    }
}
