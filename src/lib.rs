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
//! - [`runtime`] starts one [`core_loop`] per core, pinned, each with its own listener.
//! - A [`connection`] reads its HTTP request ([`http`]), is authenticated ([`auth`]) and
//!   upgraded to a WebSocket inside the loop, then indexed by user ([`user_index`]).
//! - [`socketio`] clients (Socket.IO v5 over Engine.IO v4, at `/socket.io/`) are connections of
//!   the same loop; their events unwrap to the same envelopes.
//! - Client envelopes ([`protocol`]) go to [`handlers`]; a handler's dispatch is encoded once and
//!   delivered to this core's connections at once and to the other cores through the [`bus`]
//!   (bounded lock-free inboxes plus `mio::Waker`).
//! - With a [`backplane`], dispatches also go to other instances through Redis pub/sub: a
//!   publisher thread pipelines what the cores queue, a subscriber thread feeds the inboxes.
//! - With [`history`] on (the default), every event a user gets carries a per-user offset and is
//!   kept (embedded: a ring per user; Redis: a stream per user, appended and published by one
//!   script), so a device that reconnects with `?since=` gets what it missed, then live events.
//!   [`api`] serves `GET /api/history` and `POST /api/publish`.
//! - [`rooms`]: users join rooms; a room message reaches every device of every member, through
//!   one publication on the room's Redis channel that the instances hosting members subscribe
//!   to. Presence (who is online, `presenceChanged`) and the per-user device limit are counted
//!   in Redis (embedded: in memory), with a heartbeat per instance so a dead one's users expire.
//! - [`metrics`] are per-core counters summed on demand for `/metrics` and `/healthz`.
//! - [`web`] is the chat page served at `GET /`, a browser client of the public protocol.
//! - [`config`] holds every bound and its documented default.
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

pub mod api;
pub mod auth;
pub mod backplane;
pub mod bus;
pub mod config;
pub mod connection;
mod core_loop;
pub mod handlers;
pub mod history;
pub mod http;
pub mod metrics;
pub mod protocol;
pub mod rooms;
pub mod runtime;
pub mod socketio;
pub mod types;
pub mod user_index;
pub mod web;

pub use types::UserId;

pub use config::{AuthMode, Config};
pub use handlers::{Args, ConnectionId, Context, Handler, HandlerError, HandlerResult, Handlers};
pub use runtime::{CoreStats, Server, ServerHandle, StartError, Stopper};
