//! switchboard: a real-time WebSocket messaging server, one `mio` event loop per CPU core.
//!
//! ```text
//!            SO_REUSEPORT: the kernel spreads new connections over the cores' listeners
//!        ┌────────────────────────────┐          ┌────────────────────────────┐
//!        │ core 0 (pinned thread)     │          │ core 1 (pinned thread)     │
//!        │  Poll + listener           │  inbox   │  Poll + listener           │
//!        │  Slab<Connection>          │ ───────▶ │  Slab<Connection>          │
//!        │  UserIndex: user → keys    │ ◀─────── │  UserIndex: user → keys    │
//!        └────────────────────────────┘  (bus)   └────────────────────────────┘
//! ```
//!
//! - [`runtime`] starts one `core_loop` per core, pinned, each with its own listener.
//! - A [`connection`] reads its HTTP request ([`http`]), is authenticated ([`auth`]) and
//!   upgraded to a WebSocket inside the loop, then indexed by user ([`user_index`]).
//! - [`socketio`] clients (Socket.IO v5 over Engine.IO v4, at `/socket.io/`) are connections of
//!   the same loop; their events unwrap to the same envelopes.
//! - Client envelopes ([`protocol`]) go to [`handlers`]; a handler's dispatch is encoded once and
//!   delivered to this core's connections at once and to the other cores through the [`bus`]
//!   (bounded lock-free inboxes plus `mio::Waker`).
//! - With a [`backplane`], dispatches also go to other instances through Redis pub/sub: a
//!   each core writes its publications on its own non-blocking connection once per turn (a
//!   publisher thread on a cluster or with seed routing), a subscriber thread feeds the inboxes.
//! - With [`history`] on (the default), every event a user gets carries a per-user offset and is
//!   kept (embedded: a ring per user; Redis: a stream per user, appended and published by one
//!   script), so a device that reconnects with `?since=` gets what it missed, then live events.
//!   [`api`] serves `GET /api/history` and `POST /api/publish`.
//! - [`rooms`]: users join rooms; a room message reaches every device of every member, through
//!   one publication on the room's Redis channel that the instances hosting members subscribe
//!   to. Presence (who is online, `presenceChanged`) and the per-user device limit are counted
//!   in Redis (embedded: in memory), with a heartbeat per instance so a dead one's users expire.
//! - The application stays in charge: [`access`] holds a session's room permissions (JWT
//!   `rooms`/`rooms_read` claims, or the connect hook's answer) and its expiry (`exp`, moved by a
//!   `refresh`); [`hooks`] asks the application's backend over HTTP before a connect, a join or
//!   a publish, on worker threads; the server API under `/api` publishes to users, rooms or
//!   everyone, disconnects users cluster-wide, and answers presence, counts and history.
//! - [`metrics`] are per-core counters summed on demand for `/metrics` and `/healthz`.
//! - [`web`] is the chat page served at `GET /`, a browser client of the public protocol.
//! - [`config`] holds every bound and its documented default.
//!
//! # Layers
//!
//! The modules in order, lowest first. A module imports only modules before it in this list;
//! `tests/layers.rs` checks that, and that the `mod` lines below keep the same order (blank
//! lines there separate groups of modules that import none of each other, which rustfmt keeps
//! sorted). Tempted to import upward? Move the type down, or pass a closure.
//!
//! 1. [`types`]: leaf types (`UserId`, `RoomId`, `Offset`) and the wall clock; imports nothing.
//! 2. [`config`]: `Config`, its validation and defaults, one file per feature's settings.
//! 3. [`protocol`]: the envelope codec, error codes and close reasons.
//! 4. [`access`]: room permissions from token claims or the connect hook, session expiry.
//! 5. [`http`]: the HTTP/1.1 request parser, the responses, origins and CORS.
//! 6. [`metrics`]: per-core counters and their `/metrics` and `/healthz` renderings.
//! 7. [`socketio`]: the Socket.IO and Engine.IO codec and the per-dispatch frame cache.
//! 8. [`web`]: the chat page.
//! 9. [`auth`]: tokens to user ids, expiry and room claims.
//! 10. [`history`]: offsets on frames, the embedded store, the Redis append script.
//! 11. [`rooms`]: room rules, room frames, the embedded registry, per-room resume cursors.
//! 12. [`user_index`]: a core's user → connections index.
//! 13. [`bus`]: the per-core inboxes and what travels on them (`Dispatch`, `AckWaiter`).
//! 14. [`api`]: the HTTP API's request parsing and answers.
//! 15. [`handlers`]: the handler registry, the handler context, `sendMessage`.
//! 16. [`hooks`]: the application backend's HTTP hooks, called by a pool of worker threads.
//! 17. [`connection`]: a connection's states.
//! 18. [`backplane`]: the Redis publishing links and publisher, subscriber and workers.
//! 19. `core_loop`: one core's event loop.
//! 20. [`runtime`]: the threads, start and stop.
//!
//! Embedding: build a [`Config`], add handlers to a [`Server`], call [`Server::start`].
//!
//! ```no_run
//! use switchboard::{Config, Server, HandlerResult};
//! let handle = Server::new(Config::default())
//!     .handler("echo", |ctx: &mut switchboard::Context<'_>, args: switchboard::Args<'_>| -> HandlerResult {
//!         let me = ctx.user().clone();
//!         let value: serde_json::Value = args.parse()?;
//!         ctx.dispatch([me], "echo", &value)?;
//!         Ok(serde_json::Value::Null)
//!     })
//!     .start()
//!     .expect("server starts");
//! println!("listening on {}", handle.local_addr());
//! handle.join();
//! ```

#![warn(missing_docs)]

pub mod types;

pub mod config;

pub mod protocol;

pub mod access;
pub mod http;
pub mod metrics;
pub mod socketio;
pub mod web;

pub mod auth;
pub mod history;
pub mod rooms;
pub mod user_index;

pub mod bus;

pub mod api;
pub mod handlers;
pub mod hooks;

pub mod connection;

pub mod backplane;

mod core_loop;

pub mod runtime;

pub use types::UserId;

pub use config::{AuthMode, Config};
pub use handlers::{Args, ConnectionId, Context, Handler, HandlerError, HandlerResult, Handlers};
pub use runtime::{CoreStats, Server, ServerHandle, StartError, Stopper};
