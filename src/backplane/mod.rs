//! The Redis backplane: how a dispatch reaches the user's connections on other instances.
//!
//! Who publishes:
//! - with per-user routing on one Redis (the default), each core loop owns a non-blocking
//!   publishing connection in its own poll (`core_link`, its state in `pipeline`): what a
//!   turn published goes out in one write, and the replies settle held acks on that core;
//! - with `--redis-cluster` or `--routing seed`, the [`publisher`] thread drains a bounded
//!   lock-free queue that cores push publications onto, and sends whatever has queued as one
//!   pipeline, so one round trip carries many messages;
//! - the [`subscriber`] owns the one subscriber connection, keeps the process-wide map of which
//!   cores host which users (fed by the cores when a user's first device on a core arrives and
//!   its last leaves), subscribes per user (or to the seed channel), and pushes each incoming
//!   frame into the inboxes of the cores hosting its user.
//!
//! With history on, the history worker answers replays and pages; with rooms on (per-user
//! routing on one Redis), the `rooms_worker` runs membership, room messages and presence as
//! Lua scripts, and the subscriber keeps the room routes (`room_routes`).
//!
//! Local delivery never waits for Redis: the core delivers a dispatch to its own and its sibling
//! cores' connections first and only then queues the publication for other instances.

mod backoff;
pub mod cluster;
pub(crate) mod core_link;
mod endpoint;
mod fair_reads;
mod history_worker;
pub(crate) mod pipeline;
pub mod publisher;
pub(crate) mod redis_errors;
pub(crate) mod resp;
mod room_history;
mod room_routes;
mod rooms_worker;
pub(crate) use rooms_worker::api_queries::{ApiQuery, ApiTarget};
mod sentinel;
mod shard_conns;
pub mod subscriber;
mod tagged;
pub mod wire;

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use crossbeam_queue::{ArrayQueue, SegQueue};

// The settings live in `config::redis`, below every feature; they keep their paths here.
pub use crate::config::redis::{
    RedisConfig, Routing, DEFAULT_CHANNEL_PREFIX, DEFAULT_PUBLISH_QUEUE, DEFAULT_RECONNECT_MAX,
    DEFAULT_RECONNECT_MIN, DEFAULT_WAIT_REPLICAS, DEFAULT_WAIT_TIMEOUT,
};

pub(crate) use self::backoff::Backoff;
use self::fair_reads::HistoryReads;
pub(crate) use self::fair_reads::Job;
pub use self::fair_reads::NotQueued;
use crate::bus::{AckWaiter, Bus, Dispatch};
use crate::history::{HistoryConfig, Offset};
use crate::rooms::{RoomId, RoomsConfig};
use crate::UserId;

/// A publication: one dispatch for one target user.
pub struct Publication {
    /// The target user.
    pub user: UserId,
    /// The shared, already encoded dispatch.
    pub dispatch: Arc<Dispatch>,
    /// The client request whose `ack` waits for this publication, if any.
    pub waiter: Option<Arc<AckWaiter>>,
}

/// A recovering connection's request for the events of `user` after `since`. It is run only
/// once Redis confirmed this instance's subscription to the user's channel, so nothing published
/// between the query and the subscription can fall in between.
#[derive(Debug, Clone)]
pub struct ReplayRequest {
    /// The user.
    pub user: UserId,
    /// The room whose history to replay (run once the room's channel routes to this instance
    /// for the user, refused when the user is not in it); `None`: the user's own history.
    pub room: Option<RoomId>,
    /// The offset the client has.
    pub since: Offset,
    /// The core owning the connection.
    pub core: usize,
    /// The connection's slab key there.
    pub key: usize,
    /// The connection's serial.
    pub serial: u64,
    /// When the core stops waiting (and answers `complete: false` itself).
    pub deadline: std::time::Instant,
    /// Most bytes of frames the replay carries (the newest that fit; `complete: false` if
    /// that is not all): half the outbound bound, so the replay never makes its requester a
    /// slow consumer by itself.
    pub max_bytes: usize,
}

/// A request for a page of `user`'s history, newest first, for a `history` event (`ack`) or a
/// waiting `GET /api/history` (no `ack`).
#[derive(Debug, Clone)]
pub struct PageRequest {
    /// The user.
    pub user: UserId,
    /// The room whose history to page; `None`: the user's own.
    pub room: Option<RoomId>,
    /// `user` must be a member of `room` (`false`: the server API's key reads any room).
    pub members_only: bool,
    /// Only events before this offset.
    pub before: Option<Offset>,
    /// At most this many.
    pub limit: usize,
    /// The core owning the connection.
    pub core: usize,
    /// The connection's slab key there.
    pub key: usize,
    /// The connection's serial.
    pub serial: u64,
    /// The `history` event's ack number; `None` for HTTP.
    pub ack: Option<u64>,
    /// The read stops just past this many bytes of frames: the `history` event's answer budget
    /// (the answer then says `"more": true`); `usize::MAX` for HTTP (bounded by the limit).
    pub max_bytes: usize,
}

/// A `POST /api/publish` waiting for its offsets: the dispatch is appended and published for
/// every user in one MULTI/EXEC, so it happens for all of them or for none.
#[derive(Debug)]
pub struct PublishRequest {
    /// The dispatch.
    pub dispatch: Arc<Dispatch>,
    /// The core owning the HTTP connection.
    pub core: usize,
    /// The connection's slab key there.
    pub key: usize,
    /// The connection's serial.
    pub serial: u64,
}

/// Where the answer to a room request goes: a connection (and its ack number).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RoomTarget {
    pub core: usize,
    pub key: usize,
    pub serial: u64,
    pub ack: Option<u64>,
    /// `joinRoom` with `since`: once joined, resume the room's history after it (`Some(None)`:
    /// not an offset, answered `complete: false`).
    pub resume: Option<Option<Offset>>,
}

/// Work for the rooms worker.
#[derive(Debug)]
pub(crate) enum RoomJob {
    Join {
        user: UserId,
        room: RoomId,
        target: RoomTarget,
    },
    Leave {
        user: UserId,
        room: RoomId,
        target: RoomTarget,
    },
    /// A room message: `frame` (without offset) goes to every member, in one script.
    Send {
        user: UserId,
        room: RoomId,
        frame: tungstenite::Utf8Bytes,
        id: String,
        ts: u64,
        /// The idempotency key (`clientId`): a resend is stored and published once.
        dedupe: Option<String>,
        target: RoomTarget,
    },
    Presence {
        user: UserId,
        room: RoomId,
        target: RoomTarget,
    },
    /// The user's rooms, for the subscriber's routes (after its channel is confirmed).
    Load {
        user: UserId,
    },
    /// A connection opened: count it (or refuse it at the device limit).
    Connected {
        user: UserId,
        core: usize,
        key: usize,
        serial: u64,
    },
    /// A counted connection ended: uncount it, and drop it from the user's devices.
    Disconnected {
        user: UserId,
        core: usize,
        key: usize,
        serial: u64,
    },
    /// A server API request for a waiting HTTP connection.
    Api {
        query: ApiQuery,
        target: ApiTarget,
        /// A publication waiting for its users (room, everyone), handed back with them.
        pending: Option<Arc<Dispatch>>,
    },
    Stop,
}

impl RoomJob {
    /// A client's request (join, leave, send, presence), which `--max-room-queue` bounds.
    fn is_client_request(&self) -> bool {
        matches!(
            self,
            RoomJob::Join { .. }
                | RoomJob::Leave { .. }
                | RoomJob::Send { .. }
                | RoomJob::Presence { .. }
        )
    }
}

/// A successful join or leave, held by the subscriber until its routes show it (the room's
/// channel confirmed, for a join), so a message sent right after the ack reaches this instance.
#[derive(Debug)]
pub(crate) struct RoomAck {
    pub user: UserId,
    pub room: RoomId,
    pub joined: bool,
    pub target: RoomTarget,
    /// Past it the ack goes out anyway (Redis has the membership; only routing lags).
    pub deadline: std::time::Instant,
}

/// A change in which cores host a user, sent by a core to the subscriber.
pub(crate) enum Membership {
    /// The user's first connection on `core` opened.
    Joined(UserId, usize),
    /// The user's last connection on `core` closed.
    Left(UserId, usize),
}

/// Counters and gauges, shown in `/healthz` and `/metrics`.
#[derive(Default, Debug)]
pub struct BackplaneStats {
    /// 1 while the publisher connection is up.
    pub publisher_connected: AtomicU64,
    /// 1 while the subscriber connection is up (and its subscriptions were sent).
    pub subscriber_connected: AtomicU64,
    /// Channels Redis confirmed this instance is subscribed to.
    pub subscribed_channels: AtomicU64,
    /// Publications Redis accepted.
    pub published: AtomicU64,
    /// Pipelines that failed (their publications are retried after reconnecting).
    pub publish_errors: AtomicU64,
    /// Publications dropped because the queue was full (the oldest go first).
    pub dropped: AtomicU64,
    /// Successful reconnects of either connection.
    pub reconnects: AtomicU64,
    /// Messages received from Redis.
    pub received: AtomicU64,
    /// Received messages this instance published itself (already delivered locally).
    pub ignored_own: AtomicU64,
    /// Received payloads that were not valid, counted and skipped.
    pub invalid: AtomicU64,
    /// Received messages for users with no connection here (seed mode, or after leaving).
    pub not_hosted: AtomicU64,
    /// Frames handed to core inboxes.
    pub delivered: AtomicU64,
    /// Frames dropped because a core inbox was full.
    pub inbox_drops: AtomicU64,
    /// Frames received after an outage before every channel was confirmed again: not handed
    /// to devices live, replayed to them by the resync instead.
    pub held_for_resync: AtomicU64,
    /// Gauge: (room, member) pairs this instance routes room publications to.
    pub room_members: AtomicU64,
    /// Held acks a core answered itself when its own link settled them (no bus round trip).
    pub acked_inline: AtomicU64,
    /// History reads refused because the user already had `--history-read-queue-per-user`
    /// waiting.
    pub history_reads_refused: AtomicU64,
    /// From encoding a publishing command on a core's link to Redis's reply.
    pub redis_round_trip: crate::metrics::Histogram<14>,
}

/// The backplane as the cores see it.
pub struct Backplane {
    config: RedisConfig,
    node_id: u64,
    publications: ArrayQueue<Publication>,
    publisher_thread: OnceLock<std::thread::Thread>,
    membership: SegQueue<Membership>,
    subscriber_waker: OnceLock<mio::Waker>,
    /// Seed mode: hashes of our own payloads in flight, handed from publisher to subscriber.
    own_payloads: SegQueue<u64>,
    /// The subscriber has (re)subscribed since its last reconnect.
    subscriber_ready: AtomicBool,
    stop: AtomicBool,
    /// Set when history is active: publications go through [`crate::history::APPEND_SCRIPT`].
    history: OnceLock<HistoryConfig>,
    /// Replay requests from the cores, for the subscriber.
    replays: SegQueue<ReplayRequest>,
    /// The history workers' queue, fair between users (pages and publishes go straight there;
    /// replays through the subscriber).
    jobs: OnceLock<Arc<HistoryReads<Job>>>,
    /// The cores' inboxes, for held acks (set by [`Backplane::start`]).
    bus: OnceLock<Arc<Bus>>,
    /// Set when rooms are on (per-user routing, on one Redis or a cluster).
    rooms: OnceLock<RoomsConfig>,
    /// The rooms worker's queue.
    room_jobs: OnceLock<std::sync::mpsc::Sender<RoomJob>>,
    /// Client room requests in that queue, bounded by `--max-room-queue` (connection counts
    /// and the subscriber's loads are not: dropping one would leave a count wrong).
    room_requests_queued: AtomicUsize,
    /// Loaded room memberships, from the rooms worker to the subscriber.
    rooms_loaded: SegQueue<(UserId, Result<Vec<RoomId>, String>)>,
    /// Joins and leaves done in Redis, for the subscriber to ack once routed.
    room_acks: SegQueue<RoomAck>,
    /// The cores' publishing links ([`core_link`]): how many exist, how many are up, what
    /// they hold unwritten, and whether an outage was logged (once for all of them).
    links: AtomicUsize,
    links_up: AtomicUsize,
    link_depth: AtomicUsize,
    link_outage: AtomicBool,
    /// When Redis last refused a publication's write (ms since the epoch; 0: not since the
    /// last one it took), and whether that spell was logged.
    write_refused_at: AtomicU64,
    write_refusal_logged: AtomicBool,
    /// TLS settings for the non-blocking links when the URL is `rediss://`.
    pub(crate) redis_tls: Option<Arc<rustls::ClientConfig>>,
    /// With Sentinel: the master's `host:port` as the sentinels last named it.
    master: std::sync::Mutex<Option<String>>,
    /// The sentinel thread, unparked at stop.
    sentinel_thread: OnceLock<std::thread::Thread>,
    /// Counts the master's moves (Sentinel): each thread's connection compares it.
    master_epoch: AtomicU64,
    /// Counters.
    pub stats: BackplaneStats,
}

impl Backplane {
    /// Creates the shared state; [`Backplane::start`] launches the threads.
    pub fn new(config: RedisConfig, node_id: u64) -> Arc<Self> {
        // The `redis` crate's own TLS connections use the process's default provider.
        let _ = crate::connection::crypto_provider().install_default();
        // `Config::validate` read the CA file already; a failure now leaves the links without
        // TLS settings, and each connection attempt says why.
        let redis_tls = config.tls_client_config().unwrap_or_else(|e| {
            log::error!("--redis-ca-cert: {e}");
            None
        });
        Arc::new(Backplane {
            redis_tls,
            master: std::sync::Mutex::new(None),
            sentinel_thread: OnceLock::new(),
            master_epoch: AtomicU64::new(0),
            publications: ArrayQueue::new(config.publish_queue),
            config,
            node_id,
            publisher_thread: OnceLock::new(),
            membership: SegQueue::new(),
            subscriber_waker: OnceLock::new(),
            own_payloads: SegQueue::new(),
            subscriber_ready: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            history: OnceLock::new(),
            replays: SegQueue::new(),
            jobs: OnceLock::new(),
            bus: OnceLock::new(),
            rooms: OnceLock::new(),
            room_jobs: OnceLock::new(),
            room_requests_queued: AtomicUsize::new(0),
            rooms_loaded: SegQueue::new(),
            room_acks: SegQueue::new(),
            links: AtomicUsize::new(0),
            links_up: AtomicUsize::new(0),
            link_depth: AtomicUsize::new(0),
            link_outage: AtomicBool::new(false),
            write_refused_at: AtomicU64::new(0),
            write_refusal_logged: AtomicBool::new(false),
            stats: BackplaneStats::default(),
        })
    }

    /// Turns history on (per-user routing only): call before [`Backplane::start`].
    pub fn enable_history(&self, config: HistoryConfig) {
        let _ = self.history.set(config);
    }

    /// Turns rooms and presence on (per-user routing, on one Redis or a cluster): call before
    /// [`Backplane::start`].
    pub fn enable_rooms(&self, config: RoomsConfig) {
        let _ = self.rooms.set(config);
    }

    /// The rooms settings, when rooms are on.
    pub fn rooms(&self) -> Option<&RoomsConfig> {
        self.rooms.get()
    }

    /// Queues a room request for the rooms worker. `false` when there is none (rooms off, or
    /// shutting down).
    pub(crate) fn room_request(&self, job: RoomJob) -> bool {
        let bounded = job.is_client_request();
        if bounded {
            let max = self.rooms.get().map_or(usize::MAX, |r| r.max_room_queue);
            if self.room_requests_queued.fetch_add(1, SeqCst) >= max {
                self.room_requests_queued.fetch_sub(1, SeqCst);
                return false;
            }
        }
        let sent = self
            .room_jobs
            .get()
            .is_some_and(|jobs| jobs.send(job).is_ok());
        if bounded && !sent {
            self.room_requests_queued.fetch_sub(1, SeqCst);
        }
        sent
    }

    /// The rooms worker took `job` off its queue (see [`Backplane::room_request`]).
    pub(crate) fn room_job_taken(&self, job: &RoomJob) {
        if job.is_client_request() {
            self.room_requests_queued.fetch_sub(1, SeqCst);
        }
    }

    /// The history settings, when history is on.
    pub fn history(&self) -> Option<&HistoryConfig> {
        self.history.get()
    }

    /// Asks for the events a recovering connection missed; the answer arrives in the core's
    /// inbox as [`crate::bus::CoreMsg::Replayed`].
    pub fn request_replay(&self, request: ReplayRequest) {
        self.replays.push(request);
        self.wake_subscriber();
    }

    /// Asks the history workers for a page; the answer arrives in the core's inbox as
    /// [`crate::bus::CoreMsg::Page`].
    pub fn request_page(&self, request: PageRequest) -> Result<(), NotQueued> {
        self.queue_job(Job::Page(request))
    }

    /// Queues `job` in its lane.
    pub(crate) fn queue_job(&self, job: Job) -> Result<(), NotQueued> {
        let Some(jobs) = self.jobs.get() else {
            return Err(NotQueued::Off);
        };
        jobs.push(job.lane(), job).map_err(|_| {
            if self.stop.load(Relaxed) {
                NotQueued::Off
            } else {
                self.stats.history_reads_refused.fetch_add(1, Relaxed);
                NotQueued::Busy
            }
        })
    }

    /// Has the history worker append and publish `request.dispatch` for all its users at once;
    /// the offsets arrive in the core's inbox as [`crate::bus::CoreMsg::Published`]. Returns
    /// `false` when there is no worker (history off).
    pub fn request_publish(&self, request: PublishRequest) -> bool {
        self.queue_job(Job::Publish(request)).is_ok()
    }

    /// Starts the publisher and subscriber threads (and the history worker with history on).
    pub fn start(self: &Arc<Self>, bus: Arc<Bus>) -> std::io::Result<Vec<JoinHandle<()>>> {
        let mut threads = Vec::new();
        if !self.config.sentinels.is_empty() {
            let thread = sentinel::start(self)?;
            let _ = self.sentinel_thread.set(thread.thread().clone());
            threads.push(thread);
        }
        let _ = self.bus.set(Arc::clone(&bus));
        if let Some(config) = self.history.get() {
            let jobs = Arc::new(HistoryReads::new(
                config.reads_per_user,
                config.read_queue_per_user,
            ));
            let _ = self.jobs.set(Arc::clone(&jobs));
            for n in 0..config.workers {
                let (this, bus, jobs) = (Arc::clone(self), Arc::clone(&bus), Arc::clone(&jobs));
                threads.push(
                    std::thread::Builder::new()
                        .name(format!("switchboard-redis-history-{n}"))
                        .spawn(move || history_worker::run(this, bus, &jobs, n as u64))?,
                );
            }
        }
        if self.rooms.get().is_some() {
            let (tx, rx) = std::sync::mpsc::channel();
            let _ = self.room_jobs.set(tx);
            let this = Arc::clone(self);
            let bus = Arc::clone(&bus);
            threads.push(
                std::thread::Builder::new()
                    .name("switchboard-redis-rooms".into())
                    .spawn(move || rooms_worker::run(this, bus, rx))?,
            );
        }
        let sub = subscriber::Subscriber::new(Arc::clone(self), bus, self.jobs.get().cloned())?;
        let sub_thread = std::thread::Builder::new()
            .name("switchboard-redis-sub".into())
            .spawn(move || sub.run())?;
        threads.push(sub_thread);
        if !self.core_links() {
            let this = Arc::clone(self);
            let pub_thread = std::thread::Builder::new()
                .name("switchboard-redis-pub".into())
                .spawn(move || publisher::run(this))?;
            let _ = self.publisher_thread.set(pub_thread.thread().clone());
            threads.push(pub_thread);
        }
        Ok(threads)
    }

    /// Whether each core publishes on its own connection (`core_link`): per-user routing on
    /// one Redis. A cluster (a connection per shard) and seed routing (fingerprints handed to
    /// the subscriber) keep the [`publisher`] thread.
    pub fn core_links(&self) -> bool {
        self.config.routing == Routing::PerUser && self.config.cluster.is_empty()
    }

    /// Whether every publishing connection is up: every core's link, or the publisher's.
    pub fn publisher_connected(&self) -> bool {
        if self.core_links() {
            let links = self.links.load(SeqCst);
            links > 0 && self.links_up.load(SeqCst) == links
        } else {
            self.stats.publisher_connected.load(Relaxed) == 1
        }
    }

    /// Asks both threads to finish (the publisher flushes what it can first).
    pub fn stop(&self) {
        self.stop.store(true, Relaxed);
        for t in [self.publisher_thread.get(), self.sentinel_thread.get()]
            .into_iter()
            .flatten()
        {
            t.unpark();
        }
        if let Some(w) = self.subscriber_waker.get() {
            let _ = w.wake();
        }
        if let Some(jobs) = self.jobs.get() {
            jobs.stop();
        }
        if let Some(jobs) = self.room_jobs.get() {
            // After every core's last `Disconnected`: the worker uncounts those connections,
            // then says goodbye (drops this instance's heartbeat and its presence entries).
            let _ = jobs.send(RoomJob::Stop);
        }
    }

    /// The routing mode.
    pub fn routing(&self) -> Routing {
        self.config.routing
    }

    /// Queues `dispatch` for every target user. Never blocks: past the bound the oldest queued
    /// publication is dropped and counted (and its waiter, if any, told). `waiter` is settled
    /// once per user of `dispatch`.
    pub fn publish(&self, dispatch: &Arc<Dispatch>, waiter: Option<&Arc<AckWaiter>>) {
        for user in dispatch.users.iter() {
            let publication = Publication {
                user: user.clone(),
                dispatch: Arc::clone(dispatch),
                waiter: waiter.cloned(),
            };
            if let Some(dropped) = self.publications.force_push(publication) {
                self.stats.dropped.fetch_add(1, Relaxed);
                self.settle(&dropped, false);
            }
        }
        if let Some(t) = self.publisher_thread.get() {
            // Cheap when the publisher is busy: unpark only issues a futex wake if it is parked.
            t.unpark();
        }
    }

    /// Tells the publication's waiter, if any, that Redis took it (or that it was dropped).
    pub(crate) fn settle(&self, publication: &Publication, taken: bool) {
        if let Some(w) = &publication.waiter {
            w.settle(taken, self.bus.get());
        }
    }

    /// A core reports that `user`'s first connection on `core` opened.
    pub(crate) fn user_joined(&self, user: &UserId, core: usize) {
        self.membership.push(Membership::Joined(user.clone(), core));
        self.wake_subscriber();
    }

    /// A core reports that `user`'s last connection on `core` closed.
    pub(crate) fn user_left(&self, user: &UserId, core: usize) {
        self.membership.push(Membership::Left(user.clone(), core));
        self.wake_subscriber();
    }

    fn wake_subscriber(&self) {
        if let Some(w) = self.subscriber_waker.get() {
            let _ = w.wake();
        }
    }

    /// Whether the subscriber is connected and Redis has processed all its subscriptions.
    pub fn subscriber_ready(&self) -> bool {
        self.subscriber_ready
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Publications waiting for Redis (the cores' links and the publisher's queue).
    pub fn queue_depth(&self) -> usize {
        self.publications.len() + self.link_depth.load(SeqCst)
    }

    /// `"backplane":{...}` for `/healthz`.
    pub fn render_health(&self) -> String {
        let s = &self.stats;
        let state = if self.publisher_connected() && s.subscriber_connected.load(Relaxed) == 1 {
            "connected"
        } else {
            "degraded"
        };
        format!(
            r#","backplane":{{"kind":"redis","routing":"{}","state":"{state}","subscriber_ready":{},"publisher_connected":{},"subscriber_connected":{},"subscribed_channels":{},"queue_depth":{},"published":{},"publish_errors":{},"dropped":{},"reconnects":{},"received":{},"ignored_own":{},"invalid":{},"not_hosted":{},"delivered":{},"room_members":{},"acked_inline":{}}}"#,
            match self.config.routing {
                Routing::PerUser => "per-user",
                Routing::Seed => "seed",
            },
            self.subscriber_ready
                .load(std::sync::atomic::Ordering::SeqCst),
            self.publisher_connected(),
            s.subscriber_connected.load(Relaxed) == 1,
            s.subscribed_channels.load(Relaxed),
            self.queue_depth(),
            s.published.load(Relaxed),
            s.publish_errors.load(Relaxed),
            s.dropped.load(Relaxed),
            s.reconnects.load(Relaxed),
            s.received.load(Relaxed),
            s.ignored_own.load(Relaxed),
            s.invalid.load(Relaxed),
            s.not_hosted.load(Relaxed),
            s.delivered.load(Relaxed),
            s.room_members.load(Relaxed),
            s.acked_inline.load(Relaxed),
        )
    }

    /// Prometheus families for `/metrics`.
    pub fn render_prometheus(&self, out: &mut String) {
        let s = &self.stats;
        let rows: [(&str, &str, &str, u64); 19] = [
            (
                "switchboard_backplane_publisher_connected",
                "gauge",
                "1 while every Redis publishing connection is up.",
                u64::from(self.publisher_connected()),
            ),
            (
                "switchboard_backplane_subscriber_connected",
                "gauge",
                "1 while the Redis subscriber connection is up.",
                s.subscriber_connected.load(Relaxed),
            ),
            (
                "switchboard_backplane_subscribed_channels",
                "gauge",
                "Channels Redis confirmed.",
                s.subscribed_channels.load(Relaxed),
            ),
            (
                "switchboard_backplane_queue_depth",
                "gauge",
                "Publications waiting for Redis.",
                self.queue_depth() as u64,
            ),
            (
                "switchboard_backplane_published_total",
                "counter",
                "Publications Redis accepted.",
                s.published.load(Relaxed),
            ),
            (
                "switchboard_backplane_publish_errors_total",
                "counter",
                "Failed publish pipelines (retried).",
                s.publish_errors.load(Relaxed),
            ),
            (
                "switchboard_backplane_dropped_total",
                "counter",
                "Publications dropped from a full queue.",
                s.dropped.load(Relaxed),
            ),
            (
                "switchboard_backplane_reconnects_total",
                "counter",
                "Redis reconnects.",
                s.reconnects.load(Relaxed),
            ),
            (
                "switchboard_backplane_received_total",
                "counter",
                "Messages received from Redis.",
                s.received.load(Relaxed),
            ),
            (
                "switchboard_backplane_ignored_own_total",
                "counter",
                "Own publications received back and skipped.",
                s.ignored_own.load(Relaxed),
            ),
            (
                "switchboard_history_reads_waiting",
                "gauge",
                "History reads (replays, pages) and API publishes waiting for a worker.",
                self.jobs.get().map_or(0, |j| j.waiting() as u64),
            ),
            (
                "switchboard_history_reads_refused_total",
                "counter",
                "History reads refused: the user had --history-read-queue-per-user waiting.",
                s.history_reads_refused.load(Relaxed),
            ),
            (
                "switchboard_backplane_invalid_total",
                "counter",
                "Invalid payloads skipped.",
                s.invalid.load(Relaxed),
            ),
            (
                "switchboard_backplane_not_hosted_total",
                "counter",
                "Messages for users not hosted here.",
                s.not_hosted.load(Relaxed),
            ),
            (
                "switchboard_backplane_delivered_total",
                "counter",
                "Frames handed to core inboxes.",
                s.delivered.load(Relaxed),
            ),
            (
                "switchboard_backplane_inbox_drops_total",
                "counter",
                "Frames dropped at a full core inbox.",
                s.inbox_drops.load(Relaxed),
            ),
            (
                "switchboard_backplane_held_for_resync_total",
                "counter",
                "Frames received after an outage before the resync, replayed by it instead.",
                s.held_for_resync.load(Relaxed),
            ),
            (
                "switchboard_backplane_room_members",
                "gauge",
                "(room, member) pairs this instance routes room events to.",
                s.room_members.load(Relaxed),
            ),
            (
                "switchboard_backplane_acked_inline_total",
                "counter",
                "Held acks answered by the core whose own Redis link stored them.",
                s.acked_inline.load(Relaxed),
            ),
        ];
        for (name, kind, help, value) in rows {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        crate::metrics::histogram::render(
            out,
            "switchboard_redis_round_trip_seconds",
            "From encoding a publishing command on a core's Redis link to its reply.",
            crate::metrics::Unit::Seconds,
            std::iter::once(&s.redis_round_trip),
        );
    }
}

#[cfg(test)]
mod tests;
