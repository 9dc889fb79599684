//! The in-process bus: one bounded lock-free inbox per core, woken through its `mio::Waker`.
//!
//! A dispatch is encoded once into a [`Dispatch`] and shared by `Arc` between cores; each core
//! looks the target users up in its own index. With history on, what travels is a
//! [`Delivery`] (one user's frame with its offset) and the answers to replay requests; see
//! [`CoreMsg`]. A full inbox never blocks the sender: the message is dropped for that core and
//! counted (`switchboard_inbox_drops_total`). An [`AckWaiter`] holds a client's ack until Redis
//! took its publications, then travels back to its core.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use crossbeam_queue::ArrayQueue;
use mio::Waker;
use serde::Serialize;
use tungstenite::Utf8Bytes;

use serde_json::value::RawValue;

use crate::access::RoomGrant;
use crate::auth::Identity;
use crate::history::{Delivery, Replay};
use crate::http::Request;
use crate::protocol::{encode_dispatch_frame, DispatchFrame};
use crate::socketio::FrameCache;
use crate::types::{Offset, RoomId, UserId};

/// What a core receives in its inbox.
#[derive(Debug)]
pub enum CoreMsg {
    /// A dispatch without offsets (history off): every local device of its users gets it.
    Dispatch(Arc<Dispatch>),
    /// One user's frame with its offset (history on), in offset order per user.
    Delivered(Arc<Delivery>),
    /// The answer to a connection's replay request.
    Replayed(Box<ReplayResult>),
    /// A page of history for a `history` event or a waiting `GET /api/history`.
    Page(Box<PageResult>),
    /// The offsets of a waiting `POST /api/publish`.
    Published(Box<PublishResult>),
    /// Redis took (or dropped) every publication of a request whose ack was held.
    Acked(Arc<AckWaiter>),
    /// The Redis subscriber is back after an outage: every open connection that has received
    /// an offset resumes from it, as if it had reconnected with `?since=`.
    Resync,
    /// A room event for this core's connections of the listed members.
    Room(Arc<RoomDelivery>),
    /// The answer to a room request that went to Redis (`joinRoom`, `leaveRoom`,
    /// `sendRoomMessage`, `presence`).
    RoomAnswer(Box<RoomAnswer>),
    /// Whether a new connection is within its user's device limit, counted in Redis.
    Admission(Box<Admission>),
    /// This instance subscribed a room's channel after the user joined it: what the room
    /// published before the subscription took effect is in the room's history but reached
    /// none of the user's devices here, so its open connections resume the room from their
    /// last offset in it.
    ResyncRoom(UserId, RoomId),
    /// The application's hook answered (or failed) for a connection's parked request.
    Hook(Box<HookDone>),
    /// Close every connection of this user here with 4011 (`POST /api/disconnect`).
    Disconnect(UserId),
    /// Close connection `key` here with 4009 if it is still `serial`: a newer device of its user
    /// took its place under `--max-devices` (with Redis, newest wins).
    Displace {
        /// The connection's slab key.
        key: usize,
        /// Its serial, so a reused key is left alone.
        serial: u64,
    },
    /// The answer to a server API request that went to Redis (presence, counts, members).
    Api(Box<ApiAnswer>),
}

/// What the application's hook said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookVerdict {
    /// Go on. `grant` (connect only) replaces the token's rooms; `text` (publish only)
    /// replaces the message's text.
    Allow {
        /// Rooms the connection may use, from the answer's `rooms`/`rooms_read`.
        grant: Option<RoomGrant>,
        /// The rewritten text.
        text: Option<String>,
    },
    /// Refused, with the answer's `reason`.
    Deny(String),
    /// The hook could not be asked or gave no usable answer, and hooks fail closed.
    Failed(String),
}

/// What a connection was doing when it asked the hook, so it can go on where it stopped.
#[derive(Debug)]
pub enum HookResume {
    /// A native WebSocket upgrade, checked and authenticated, waiting to be answered.
    Upgrade {
        /// The request head.
        req: Box<Request>,
        /// Bytes read after the head.
        rest: Vec<u8>,
        /// The verified token.
        identity: Identity,
    },
    /// A Socket.IO CONNECT, authenticated.
    SioConnect {
        /// Its namespace name.
        nsp: String,
        /// Its `since` (resume from), if any.
        since: Option<String>,
        /// Its `rooms` (each room resumed from its offset), if any.
        rooms: Option<crate::socketio::ConnectRooms>,
        /// The verified token.
        identity: Identity,
    },
    /// A client request (`joinRoom`, `sendRoomMessage`, `sendMessage`).
    Request {
        /// The event.
        event: String,
        /// Its args, as sent.
        args: Option<Box<RawValue>>,
        /// Its ack (native or tagged Socket.IO).
        ack: Option<u64>,
    },
}

/// A hook's verdict for the connection `key` with `serial` on the receiving core.
#[derive(Debug)]
pub struct HookDone {
    /// The connection's slab key.
    pub key: usize,
    /// The connection's serial (a reused slot has another).
    pub serial: u64,
    /// The verdict.
    pub verdict: HookVerdict,
    /// Where the connection stopped.
    pub resume: HookResume,
}

/// The answer to a server API request for the waiting HTTP connection `key` with `serial`.
#[derive(Debug)]
pub struct ApiAnswer {
    /// The connection's slab key.
    pub key: usize,
    /// The connection's serial.
    pub serial: u64,
    /// The JSON body to answer with, a user list to publish `pending` to, or why Redis could
    /// not answer.
    pub result: Result<ApiData, String>,
    /// A publication waiting for its users (room or everyone).
    pub pending: Option<Arc<Dispatch>>,
}

/// What Redis answered to a server API request.
#[derive(Debug)]
pub enum ApiData {
    /// The body of a 200.
    Json(String),
    /// Users to publish the pending dispatch to.
    Users(Vec<UserId>),
}

/// One room event for the local connections of `members`. One frame, shared by every member
/// connection of the instance: the offset (with history on) is the same for every member.
#[derive(Debug)]
pub struct RoomDelivery {
    /// The room.
    pub room: RoomId,
    /// The room's members hosted by this instance (a snapshot shared by every message).
    pub members: Arc<[UserId]>,
    /// The offset in the room's history; `None` for events kept nowhere.
    pub offset: Option<Offset>,
    /// The frame, offset included.
    pub frame: Utf8Bytes,
    /// `frame` wrapped for Socket.IO connections, built on first use.
    pub sio: FrameCache,
}

/// The answer to a room request for connection `key` with `serial`.
#[derive(Debug)]
pub struct RoomAnswer {
    /// The connection's slab key on the receiving core.
    pub key: usize,
    /// The connection's serial.
    pub serial: u64,
    /// The request's ack number.
    pub ack: Option<u64>,
    /// A `joinRoom` with `since`: the room's replay to start once the join is acked.
    pub resume: Option<Option<Offset>>,
    /// The ack result, or the error (code, message).
    pub result: Result<serde_json::Value, (&'static str, String)>,
}

/// The device-limit verdict for connection `key` with `serial` of `user`.
#[derive(Debug)]
pub struct Admission {
    /// The connection's slab key on the receiving core.
    pub key: usize,
    /// The connection's serial.
    pub serial: u64,
    /// The user.
    pub user: UserId,
    /// `false`: the user is at the device limit; close with 4009.
    pub admitted: bool,
    /// The connection was counted in Redis (it must be uncounted when it ends). `false` with
    /// `admitted` when Redis could not be asked: the connection is let in, uncounted.
    pub counted: bool,
}

/// The outcome of a `POST /api/publish` for connection `key` with `serial`.
#[derive(Debug)]
pub struct PublishResult {
    /// The connection's slab key on the receiving core.
    pub key: usize,
    /// The connection's serial.
    pub serial: u64,
    /// Each user's offset, or why nothing was published.
    pub result: Result<Vec<(UserId, Offset)>, String>,
}

/// A page of history, newest first, for connection `key` with `serial`.
#[derive(Debug)]
pub struct PageResult {
    /// The connection's slab key on the receiving core.
    pub key: usize,
    /// The connection's serial.
    pub serial: u64,
    /// The `history` event's ack number; `None` for HTTP.
    pub ack: Option<u64>,
    /// The frames (offsets included), or why there are none.
    pub result: Result<Vec<Utf8Bytes>, PageError>,
}

/// Why a history page has no frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageError {
    /// A room's history, asked for by a user not in the room.
    NotMember,
    /// Redis could not answer (the reason).
    Unavailable(String),
}

/// The events a recovering connection missed, for the connection `key` with `serial` (a slab
/// slot reused by another connection has another serial, so a late answer is dropped).
#[derive(Debug)]
pub struct ReplayResult {
    /// The connection's slab key on the receiving core.
    pub key: usize,
    /// The connection's serial.
    pub serial: u64,
    /// The room whose history this is; `None`: the user's own.
    pub room: Option<RoomId>,
    /// What to replay.
    pub replay: Replay,
}

/// One encoded event for a set of users. Cheap to share: the frame is reference-counted.
#[derive(Debug)]
pub struct Dispatch {
    /// The users whose every live connection receives `frame`. No duplicates.
    pub users: Box<[UserId]>,
    /// The complete text frame payload, encoded once: `{"event":E,"args":A}`.
    pub frame: Utf8Bytes,
    /// Byte offset of `,"args":` in `frame` (used to build the seed backplane format).
    pub args_at: usize,
    /// `frame` wrapped for Socket.IO connections, built on first use.
    pub sio: FrameCache,
    /// Idempotency key (history on): a second dispatch with the same key is stored and
    /// delivered to a user once within the dedupe window. See [`crate::handlers::Context::dispatch_once`].
    pub dedupe: Option<Box<str>>,
}

impl Dispatch {
    /// A dispatch of `frame` to `users`, without an idempotency key.
    pub fn new(users: Vec<UserId>, frame: DispatchFrame) -> Self {
        Dispatch {
            users: users.into_boxed_slice(),
            frame: frame.frame,
            args_at: frame.args_at,
            sio: Default::default(),
            dedupe: None,
        }
    }
}

/// Encodes `{"event":E,"args":A}` once (see [`encode_dispatch_frame`]) into a dispatch for
/// `users`.
pub fn encode_dispatch<T: Serialize + ?Sized>(
    users: Vec<UserId>,
    event: &str,
    args: &T,
) -> Result<Dispatch, serde_json::Error> {
    encode_dispatch_frame(event, args).map(|frame| Dispatch::new(users, frame))
}

/// A client request whose `ack` is held until Redis has taken every publication of its
/// dispatches (appended to the history with history on), so an acknowledged message survives
/// this instance dying; a message without an ack may be resent (with the same idempotency key).
/// The last publication to settle sends the waiter to its core as [`CoreMsg::Acked`].
#[derive(Debug)]
pub struct AckWaiter {
    /// The core owning the connection.
    pub core: usize,
    /// The connection's slab key there.
    pub key: usize,
    /// The connection's serial (a reused slab slot has another).
    pub serial: u64,
    /// The client's ack number (native, or a tagged Socket.IO ack id).
    pub ack: u64,
    /// The handler's result, sent in the ack when everything was taken.
    pub result: serde_json::Value,
    /// Publications not settled yet.
    remaining: AtomicUsize,
    /// Set when a publication was dropped (queue overflow): the client gets an error instead.
    dropped: AtomicBool,
    /// When the request came in (for `switchboard_ack_wait_seconds`).
    pub created: std::time::Instant,
}

impl AckWaiter {
    /// A waiter for `publications` publications.
    pub fn new(
        core: usize,
        key: usize,
        serial: u64,
        ack: u64,
        result: serde_json::Value,
        publications: usize,
    ) -> Self {
        AckWaiter {
            core,
            key,
            serial,
            ack,
            result,
            remaining: AtomicUsize::new(publications),
            dropped: AtomicBool::new(false),
            created: std::time::Instant::now(),
        }
    }

    /// `true` when every publication was taken by Redis.
    pub fn taken(&self) -> bool {
        !self.dropped.load(Ordering::SeqCst)
    }

    /// One publication settled (`taken` by Redis, or dropped); the last one hands the waiter to
    /// its core.
    pub(crate) fn settle(self: &Arc<Self>, taken: bool, bus: Option<&Arc<Bus>>) {
        if self.settle_ready(taken) {
            // A full inbox loses the ack; the client's resend is recognised by its key.
            if let Some(bus) = bus {
                let _ = bus.send(self.core, CoreMsg::Acked(Arc::clone(self)));
            }
        }
    }

    /// One publication settled; returns `true` for the last one, and the caller then delivers
    /// the ack itself (a core settling its own waiters answers inline, without the bus).
    pub(crate) fn settle_ready(&self, taken: bool) -> bool {
        if !taken {
            self.dropped.store(true, Ordering::SeqCst);
        }
        self.remaining.fetch_sub(1, Ordering::SeqCst) == 1
    }
}

/// A core's inbox.
struct Inbox {
    queue: ArrayQueue<CoreMsg>,
    /// Set by the core when its `Poll` exists (the waker is bound to it).
    waker: OnceLock<Waker>,
    /// `true` while a wake is outstanding, so a burst of sends costs one eventfd write.
    pending: AtomicBool,
}

/// Every core's inbox, shared by all cores.
pub struct Bus {
    inboxes: Box<[Inbox]>,
}

impl Bus {
    /// An inbox of `capacity` dispatches for each of `cores` cores.
    pub fn new(cores: usize, capacity: usize) -> Self {
        let inboxes = (0..cores)
            .map(|_| Inbox {
                queue: ArrayQueue::new(capacity),
                waker: OnceLock::new(),
                pending: AtomicBool::new(false),
            })
            .collect();
        Bus { inboxes }
    }

    /// Number of cores on the bus.
    pub fn cores(&self) -> usize {
        self.inboxes.len()
    }

    /// Installs `core`'s waker. Called once by the core after it builds its `Poll`.
    pub fn set_waker(&self, core: usize, waker: Waker) {
        let _ = self.inboxes[core].waker.set(waker);
    }

    /// Queues `dispatch` for `core` and wakes it. Returns `false` when the inbox was full and
    /// the dispatch was dropped for that core.
    pub fn send(&self, core: usize, dispatch: CoreMsg) -> bool {
        let inbox = &self.inboxes[core];
        let queued = inbox.queue.push(dispatch).is_ok();
        self.wake(core);
        queued
    }

    /// Queues `dispatch` for `core` without waking it; the caller wakes it later (once per
    /// loop turn). Returns `false` when the inbox was full and the dispatch was dropped.
    pub fn push(&self, core: usize, dispatch: CoreMsg) -> bool {
        self.inboxes[core].queue.push(dispatch).is_ok()
    }

    /// Wakes `core` unless a wake is already outstanding.
    pub fn wake(&self, core: usize) {
        let inbox = &self.inboxes[core];
        // SeqCst on both sides (here and in `drain`): the core clears the flag before it drains,
        // so a push that lands after the drain began either is seen by it or sets the flag
        // again and wakes the core. Weaker orderings could lose that wake.
        if !inbox.pending.swap(true, Ordering::SeqCst) {
            if let Some(waker) = inbox.waker.get() {
                // A failed eventfd write means the Poll is gone: the core has exited.
                let _ = waker.wake();
            }
        }
    }

    /// Wakes `core` if messages wait in its inbox: one wake for a batch of [`Bus::push`]es.
    /// A core that already took them (it was awake) is not woken again.
    pub fn wake_if_queued(&self, core: usize) {
        if !self.inboxes[core].queue.is_empty() {
            self.wake(core);
        }
    }

    /// Takes every queued dispatch for `core`, calling `f` on each.
    pub fn drain(&self, core: usize, mut f: impl FnMut(CoreMsg)) {
        let inbox = &self.inboxes[core];
        inbox.pending.store(false, Ordering::SeqCst);
        while let Some(d) = inbox.queue.pop() {
            f(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dispatch(text: &'static str) -> CoreMsg {
        CoreMsg::Dispatch(Arc::new(Dispatch {
            users: vec!["u".into()].into(),
            frame: Utf8Bytes::from_static(text),
            args_at: 0,
            sio: Default::default(),
            dedupe: None,
        }))
    }

    #[test]
    fn full_inbox_drops_without_blocking() {
        let bus = Bus::new(2, 16);
        for _ in 0..16 {
            assert!(bus.send(1, dispatch("a")));
        }
        assert!(!bus.send(1, dispatch("b")));
        let mut seen = 0;
        bus.drain(1, |_| seen += 1);
        assert_eq!(seen, 16);
        bus.drain(0, |_| panic!("core 0 got nothing"));
    }

    #[test]
    fn waker_fires_once_per_burst() {
        let mut poll = mio::Poll::new().unwrap();
        let bus = Bus::new(1, 16);
        bus.set_waker(0, Waker::new(poll.registry(), mio::Token(7)).unwrap());
        bus.send(0, dispatch("a"));
        bus.send(0, dispatch("b"));
        let mut events = mio::Events::with_capacity(8);
        poll.poll(&mut events, Some(std::time::Duration::from_secs(5)))
            .unwrap();
        assert_eq!(
            events.iter().filter(|e| e.token() == mio::Token(7)).count(),
            1
        );
        let mut n = 0;
        bus.drain(0, |_| n += 1);
        assert_eq!(n, 2);
    }

    #[test]
    fn pushes_wake_once_when_asked_and_only_with_something_queued() {
        // One Poll per core (mio allows one Waker per Poll).
        let mut polls = [mio::Poll::new().unwrap(), mio::Poll::new().unwrap()];
        let bus = Bus::new(2, 16);
        for (core, poll) in polls.iter().enumerate() {
            bus.set_waker(core, Waker::new(poll.registry(), mio::Token(core)).unwrap());
        }
        let mut events = mio::Events::with_capacity(8);
        let mut woken = |poll: &mut mio::Poll| {
            poll.poll(&mut events, Some(std::time::Duration::from_millis(50)))
                .unwrap();
            !events.is_empty()
        };
        bus.push(0, dispatch("a"));
        bus.push(0, dispatch("b"));
        assert!(!woken(&mut polls[0]), "a push does not wake");
        bus.wake_if_queued(0);
        bus.wake_if_queued(1);
        assert!(woken(&mut polls[0]));
        assert!(!woken(&mut polls[1]), "core 1 has nothing queued");
        bus.drain(0, |_| {});
        bus.wake_if_queued(0);
        assert!(!woken(&mut polls[0]), "taken already: no wake");
    }
}
