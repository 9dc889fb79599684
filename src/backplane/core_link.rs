//! A core's own publishing connection to Redis (per-user routing on one Redis): a non-blocking
//! socket the core registers in its own `mio::Poll`, driving a [`Pipeline`]. The core pushes its
//! publications here and, once per loop turn, [`CoreLink::turn`] writes what queued as one
//! burst; replies are read when the socket is readable and settle the publications, so a held
//! ack is answered by the core itself, with no thread hand-off.
//!
//! Replies nobody waits for (no held ack among their publications) do not wake the core: while
//! only such replies are due, the socket is registered for writability alone and the replies
//! are read on the core's next turn, which comes soon anyway (this instance's subscriber hands
//! the same publications back for local devices), or after [`LAZY_READ`] at the latest. So a
//! message costs the core one wake-up less. Once nothing has been in flight for [`LAZY_READ`]
//! the socket is registered for reading again, so a connection Redis closes while idle is
//! noticed at once.
//!
//! Connection states: down (backing off until a time), connecting (non-blocking, with a
//! deadline), up. After an outage, publications wait until this instance's subscriber is ready
//! again plus one `reconnect_max` (other instances re-subscribe on their own schedule): a
//! deadline the loop checks, never a sleep.

use std::io::{self, Write};
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;

use crate::connection::Socket;
use mio::{Interest, Registry, Token};

use super::endpoint::Endpoint;
use super::pipeline::{Encoding, Pipeline};
use super::resp::ReadBuf;
use super::{Backoff, Backplane};
use crate::bus::{AckWaiter, Dispatch};

/// A connection attempt that has not completed by then is abandoned.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a link waiting for the subscriber after an outage looks again.
const GATE_POLL: Duration = Duration::from_millis(20);
/// How long a stopping core keeps flushing what is queued (as the publisher thread).
pub const STOP_FLUSH: Duration = Duration::from_secs(1);
/// How long replies nobody waits for may sit unread when nothing else wakes the core.
pub const LAZY_READ: Duration = Duration::from_millis(1);

enum Conn {
    Down {
        retry_at: Instant,
    },
    Connecting {
        stream: Socket,
        deadline: Instant,
    },
    Up {
        stream: Socket,
        writable: bool,
        /// Registered for reading (see the module docs).
        reading: bool,
    },
}

/// What holds publications back after a reconnect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    Open,
    /// Until the subscriber is ready (or this passes), then one `reconnect_max` more.
    Subscriber {
        give_up: Instant,
    },
    Until(Instant),
}

/// One core's publishing link.
pub struct CoreLink {
    bp: Arc<Backplane>,
    token: Token,
    pipe: Pipeline,
    enc: Encoding,
    conn: Conn,
    /// Replies read and not parsed yet.
    buf: ReadBuf,
    backoff: Backoff,
    gate: Gate,
    ever_connected: bool,
    /// Up with its setup answered: counted in `links_up` (see [`CoreLink::check_usable`]).
    usable: bool,
    /// The link failed since it was last up: the next connect is a reconnect after an outage.
    lost: bool,
    /// The depth last added to the backplane's gauge.
    reported_depth: usize,
    /// Since when unwritten publications wait for the batch window to pass.
    pending_since: Option<Instant>,
    /// When publications were last written (for `--publish-pace`).
    last_write: Option<Instant>,
    /// Since when nothing is in flight (see [`CoreLink::sync_interest`]).
    idle_since: Option<Instant>,
}

impl CoreLink {
    /// A link for core `core` of `cores`, registered under `token` once it connects. It holds
    /// at most `--publish-queue / cores` (at least 1) unwritten publications.
    pub fn new(bp: &Arc<Backplane>, core: usize, cores: usize, token: Token) -> Self {
        let cfg = &bp.config;
        bp.links.fetch_add(1, SeqCst);
        CoreLink {
            pipe: Pipeline::new(cfg.publish_queue / cores.max(1)),
            enc: Encoding::new(&cfg.channel_prefix, bp.node_id, bp.history().cloned()),
            conn: Conn::Down {
                retry_at: Instant::now(),
            },
            buf: ReadBuf::default(),
            backoff: Backoff::new(
                cfg.reconnect_min,
                cfg.reconnect_max,
                bp.node_id ^ (0x9e37 + core as u64),
            ),
            gate: Gate::Open,
            ever_connected: false,
            usable: false,
            lost: false,
            reported_depth: 0,
            pending_since: None,
            last_write: None,
            idle_since: None,
            token,
            bp: Arc::clone(bp),
        }
    }

    /// Queues `dispatch` for each of its users (written at the end of the turn).
    pub fn publish(&mut self, dispatch: &Arc<Dispatch>, waiter: Option<&Arc<AckWaiter>>) {
        self.pipe.push(dispatch, waiter);
    }

    /// The socket is ready: complete the connect, read and settle replies, write what waits.
    pub fn on_event(&mut self, registry: &Registry, readable: bool, writable: bool) {
        if let Conn::Connecting { stream, .. } = &mut self.conn {
            match connect_result(stream.tcp()) {
                Ok(true) => self.connected(),
                Ok(false) => return,
                Err(e) => return self.fail(registry, &format!("connect: {e}")),
            }
        }
        if writable {
            if let Conn::Up { writable, .. } = &mut self.conn {
                *writable = true;
            }
        }
        if readable {
            self.read(registry);
        }
        self.flush(registry);
    }

    /// Once per loop turn: timers (reconnect, connect timeout, the gate after an outage), then
    /// everything queued this turn is encoded and written as one burst. Acks now due are
    /// appended to `ready`.
    pub fn turn(&mut self, registry: &Registry, now: Instant, ready: &mut Vec<Arc<AckWaiter>>) {
        if self.bp.master_moved() && !matches!(self.conn, Conn::Down { .. }) {
            self.fail(registry, "the Redis master moved (Sentinel)");
        }
        if matches!(self.conn, Conn::Up { reading: false, .. }) && self.pipe.awaiting_replies() {
            self.read(registry);
        }
        match &self.conn {
            Conn::Down { retry_at } if now >= *retry_at => self.connect(registry, now),
            Conn::Connecting { deadline, .. } if now >= *deadline => {
                self.fail(registry, "connect timed out")
            }
            _ => {}
        }
        match self.gate {
            Gate::Subscriber { give_up } if self.bp.subscriber_ready() || now >= give_up => {
                self.gate = Gate::Until(now + self.bp.config.reconnect_max);
            }
            Gate::Until(t) if now >= t => self.gate = Gate::Open,
            _ => {}
        }
        if matches!(self.conn, Conn::Up { .. })
            && self.gate == Gate::Open
            && self.window_passed(now)
        {
            self.pending_since = None;
            if self.pipe.has_unsent() {
                self.last_write = Some(now);
            }
            self.pipe.encode(&self.enc);
            self.flush(registry);
        }
        self.sync_interest(registry, now);
        self.pipe.take_ready(ready);
        self.report();
    }

    /// Registers the socket for reading unless only replies nobody waits for are due.
    /// Back to reading only once nothing has been in flight for [`LAZY_READ`]: between
    /// messages a few hundred microseconds apart, the interest then stays as it is instead of
    /// costing two `epoll_ctl` per message.
    fn sync_interest(&mut self, registry: &Registry, now: Instant) {
        if self.pipe.awaiting_replies() {
            self.idle_since = None;
        } else {
            self.idle_since.get_or_insert(now);
        }
        let Conn::Up {
            stream, reading, ..
        } = &mut self.conn
        else {
            return;
        };
        let want = self.pipe.replies_urgent()
            || self
                .idle_since
                .is_some_and(|t| *reading || now >= t + LAZY_READ);
        if *reading == want {
            return;
        }
        let interest = if want {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::WRITABLE
        };
        // Re-armed for reading, epoll reports replies that came meanwhile at once.
        match registry.reregister(stream.tcp(), self.token, interest) {
            Ok(()) => *reading = want,
            Err(e) => self.fail(registry, &format!("reregister: {e}")),
        }
    }

    /// Whether what waits may be written now: the first unwritten publication has waited out
    /// the batch window (starting the wait when there is one), and the last write is at least
    /// the pace old.
    fn window_passed(&mut self, now: Instant) -> bool {
        if !self.pipe.has_unsent() {
            return true;
        }
        if !self.bp.config.publish_batch_window.is_zero() {
            self.pending_since.get_or_insert(now);
        }
        self.held_until().is_none_or(|at| now >= at)
    }

    /// When the publications it holds may be written (the window and the pace both passed),
    /// if it holds any.
    fn held_until(&self) -> Option<Instant> {
        let window = self
            .pending_since
            .filter(|_| self.pipe.has_unsent())
            .map(|t| t + self.bp.config.publish_batch_window);
        match (window, self.paced_at()) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// When the pace lets unwritten publications go, if it holds them at all.
    fn paced_at(&self) -> Option<Instant> {
        let pace = self.bp.config.publish_pace;
        match self.last_write {
            Some(t) if !pace.is_zero() && self.pipe.has_unsent() => Some(t + pace),
            _ => None,
        }
    }

    /// When [`Self::turn`] must run next, at the latest.
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let conn = match &self.conn {
            Conn::Down { retry_at } => Some(*retry_at),
            Conn::Connecting { deadline, .. } => Some(*deadline),
            Conn::Up { reading, .. } => {
                let window = self.held_until();
                // Not reading: replies due are read within LAZY_READ, and reading resumes
                // LAZY_READ after the last one.
                let lazy = match (reading, self.idle_since) {
                    (true, _) => None,
                    (false, _) if self.pipe.awaiting_replies() => Some(now + LAZY_READ),
                    (false, idle) => idle.map(|t| t + LAZY_READ),
                };
                earliest(window, lazy)
            }
        };
        let gate = match self.gate {
            Gate::Open => None,
            Gate::Subscriber { give_up } => Some(give_up.min(now + GATE_POLL)),
            Gate::Until(t) => Some(t),
        };
        earliest(conn, gate)
    }

    /// Nothing waits to be written or answered.
    pub fn is_idle(&self) -> bool {
        self.pipe.is_idle()
    }

    /// The core is exiting: take the link out of the gauges.
    pub fn close(mut self, registry: &Registry) {
        self.set_down(registry);
        self.pipe.reset();
        self.bp.link_depth.fetch_sub(self.reported_depth, SeqCst);
        self.bp.links.fetch_sub(1, SeqCst);
    }

    fn connect(&mut self, registry: &Registry, now: Instant) {
        let attempt = Endpoint::resolve(&self.bp.redis_url()).and_then(|endpoint| {
            let tcp = TcpStream::connect(endpoint.addr)?;
            // rediss://: TLS over the connecting socket; its handshake runs in the link's
            // non-blocking reads and writes, the AUTH and the rest waiting in rustls till then.
            let mut stream = endpoint.wrap(tcp, self.bp.redis_tls.as_ref())?;
            registry.register(
                stream.tcp(),
                self.token,
                Interest::READABLE | Interest::WRITABLE,
            )?;
            Ok((stream, endpoint))
        });
        match attempt {
            Ok((stream, endpoint)) => {
                let mut handshake = Vec::new();
                let mut names = Vec::new();
                if endpoint.write_auth(&mut handshake) == 1 {
                    names.push("AUTH");
                }
                if endpoint.write_select(&mut handshake) == 1 {
                    names.push("SELECT");
                }
                if !self.bp.config.sentinels.is_empty() {
                    redis::cmd("ROLE").write_packed_command(&mut handshake);
                    names.push("ROLE");
                }
                self.pipe.connected(&self.enc, &handshake, &names);
                self.conn = Conn::Connecting {
                    stream,
                    deadline: now + CONNECT_TIMEOUT,
                };
            }
            Err(e) => self.fail(registry, &format!("connect: {e}")),
        }
    }

    fn connected(&mut self) {
        let Conn::Connecting { mut stream, .. } = std::mem::replace(
            &mut self.conn,
            Conn::Down {
                retry_at: Instant::now(),
            },
        ) else {
            return;
        };
        let _ = stream.tcp().set_nodelay(true);
        self.buf.clear();
        self.conn = Conn::Up {
            stream,
            writable: true,
            reading: true,
        };
        // After an outage, publications wait for the subscriber's resync (the gate) from the
        // first byte on: they are pipelined behind the setup commands.
        if self.ever_connected && self.lost {
            self.gate = Gate::Subscriber {
                give_up: Instant::now() + self.bp.config.reconnect_max * 3,
            };
        }
        self.usable = false;
        self.check_usable();
    }

    /// Once the setup commands (AUTH, SELECT, ROLE) are answered without error, the link counts
    /// as up: readiness, the backoff reset and the "reconnected" line wait for that, so a wrong
    /// password is an outage with a growing backoff, not a link that flaps up at every connect.
    fn check_usable(&mut self) {
        if self.usable || !matches!(self.conn, Conn::Up { .. }) || self.pipe.setup_unanswered() {
            return;
        }
        self.usable = true;
        self.backoff.reset();
        self.bp.links_up.fetch_add(1, SeqCst);
        if self.ever_connected && self.lost {
            // One line and one count per outage, whichever core gets through first.
            if self.bp.link_outage.swap(false, SeqCst) {
                self.bp.stats.reconnects.fetch_add(1, Relaxed);
                log::info!(
                    "redis publishing links reconnected; {} publications waiting",
                    self.bp.queue_depth()
                );
            }
        }
        self.ever_connected = true;
        self.lost = false;
    }

    /// Reads the socket one large read at a time and settles a publication per reply; a read
    /// that did not fill the buffer drained the socket (see [`ReadBuf::fill`]).
    fn read(&mut self, registry: &Registry) {
        loop {
            let Conn::Up { stream, .. } = &mut self.conn else {
                return;
            };
            // Plain TCP: a short read drained the socket. TLS: rustls hands out one record at a
            // time, so only WouldBlock says the socket is drained.
            let short_read_drains = stream.is_plain();
            let more = match self.buf.fill(stream, short_read_drains) {
                Ok(more) => more,
                Err(e) => {
                    let why = super::endpoint::plain_words(&e.to_string());
                    return self.fail(registry, &format!("read: {why}"));
                }
            };
            let settled = loop {
                match self.buf.next() {
                    Ok(Some(value)) => {
                        if let Err(e) = self.pipe.on_reply(&value) {
                            break Err(e.to_string());
                        }
                        if let Some(rtt) = self.pipe.round_trip.take() {
                            self.bp.stats.redis_round_trip.observe_duration(rtt);
                        }
                    }
                    Ok(None) => break Ok(()),
                    Err(_) => break Err("read: malformed reply".to_string()),
                }
            };
            if let Err(why) = settled {
                return self.fail(registry, &why);
            }
            self.check_usable();
            if !more {
                return;
            }
        }
    }

    /// Writes buffered bytes until done or WouldBlock.
    fn flush(&mut self, registry: &Registry) {
        let Conn::Up {
            stream, writable, ..
        } = &mut self.conn
        else {
            return;
        };
        let out = self.pipe.out();
        let mut written = 0;
        let mut error = None;
        while *writable && written < out.len() {
            match stream.write(&out[written..]) {
                Ok(0) => error = Some(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => *writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => error = Some(e),
            }
            if error.is_some() {
                break;
            }
        }
        out.drain(..written);
        if error.is_none() && *writable && out.is_empty() {
            // TLS: records rustls still holds (the handshake, a tail the socket refused).
            match stream.flush() {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => *writable = false,
                Err(e) => error = Some(e),
            }
        }
        if let Some(e) = error {
            self.fail(registry, &format!("write: {e}"));
        }
    }

    /// The connection failed: everything unanswered is kept for the next one, after a backoff.
    fn fail(&mut self, registry: &Registry, why: &str) {
        let was_up = self.set_down(registry);
        if was_up || self.pipe.has_unsent() {
            self.bp.stats.publish_errors.fetch_add(1, Relaxed);
        }
        self.pipe.reset();
        self.lost = true;
        self.gate = Gate::Open;
        self.conn = Conn::Down {
            retry_at: Instant::now() + self.backoff.next_delay(),
        };
        // One line per outage for all the cores' links.
        if !self.bp.link_outage.swap(true, SeqCst) {
            log::warn!(
                "redis publishing link failed ({why}); {} publications kept, retrying with backoff",
                self.bp.queue_depth() + self.pipe.depth()
            );
        }
    }

    /// Drops the socket; returns whether it was up (its setup answered).
    fn set_down(&mut self, registry: &Registry) -> bool {
        let old = std::mem::replace(
            &mut self.conn,
            Conn::Down {
                retry_at: Instant::now(),
            },
        );
        match old {
            Conn::Up { mut stream, .. } => {
                let _ = registry.deregister(stream.tcp());
                let was_usable = std::mem::take(&mut self.usable);
                if was_usable {
                    self.bp.links_up.fetch_sub(1, SeqCst);
                }
                was_usable
            }
            Conn::Connecting { mut stream, .. } => {
                let _ = registry.deregister(stream.tcp());
                false
            }
            Conn::Down { .. } => false,
        }
    }

    /// Publishes the counters and this link's share of the queue depth.
    fn report(&mut self) {
        let stats = &self.bp.stats;
        let took_writes = self.pipe.published > 0;
        if self.pipe.published > 0 {
            stats
                .published
                .fetch_add(std::mem::take(&mut self.pipe.published), Relaxed);
        }
        if self.pipe.refused > 0 {
            stats
                .publish_errors
                .fetch_add(std::mem::take(&mut self.pipe.refused), Relaxed);
            let why = self.pipe.refusal.take().unwrap_or_default();
            self.bp.note_write_refused(&why);
        } else if took_writes {
            self.bp.note_write_taken();
        }
        if self.pipe.dropped > 0 {
            stats
                .dropped
                .fetch_add(std::mem::take(&mut self.pipe.dropped), Relaxed);
        }
        let depth = self.pipe.depth();
        if depth != self.reported_depth {
            if depth > self.reported_depth {
                self.bp
                    .link_depth
                    .fetch_add(depth - self.reported_depth, SeqCst);
            } else {
                self.bp
                    .link_depth
                    .fetch_sub(self.reported_depth - depth, SeqCst);
            }
            self.reported_depth = depth;
        }
    }
}

/// The earlier of two optional deadlines.
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Whether a non-blocking connect completed (`Ok(false)`: not yet).
fn connect_result(stream: &TcpStream) -> io::Result<bool> {
    if let Some(e) = stream.take_error()? {
        return Err(e);
    }
    match stream.peer_addr() {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests;
