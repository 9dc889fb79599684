//! The state every core reads: configuration, handlers, hooks, the bus, the backplane, metrics and the
//! process-wide atomics. The runtime builds it once at start; the loops only read it (the atomics
//! aside).

use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;

use tungstenite::protocol::WebSocketConfig;

use crate::auth::Authenticator;
use crate::backplane::Backplane;
use crate::bus::Bus;
use crate::config::Config;
use crate::handlers::Handlers;
use crate::metrics::CoreMetrics;

/// State every core reads; written only at start, except the atomics.
pub(crate) struct Shared {
    pub config: Config,
    pub ws_config: WebSocketConfig,
    pub auth: Authenticator,
    pub handlers: Handlers,
    /// The application's hooks, with `--hook-url`.
    pub hooks: Option<Arc<crate::hooks::Hooks>>,
    pub bus: Arc<Bus>,
    pub backplane: Option<Arc<Backplane>>,
    pub metrics: Box<[CoreMetrics]>,
    pub shutdown: AtomicBool,
    /// Set by a drain: readiness fails, upgrades are refused, open connections are closed in
    /// batches over `config.drain_period`, then each core shuts down.
    pub draining: AtomicBool,
    /// Set once every core listens and the backplane threads run: readiness needs it.
    pub started: AtomicBool,
    /// Tells the `--metrics-listen` thread to end.
    pub metrics_stop: AtomicBool,
    /// Set when a core loop failed or panicked.
    pub failed: AtomicBool,
    /// Open WebSocket connections in the process, for `max_connections`.
    pub open_connections: AtomicUsize,
    /// Handshakes in progress in the process, for `max_handshakes` (`gate.rs`).
    pub gate: super::gate::Gate,
    /// Presence changes coalesced per user, embedded (`presence.rs`).
    pub presence: super::presence::Coalescer,
    /// Upgrades per source address, for `connect_rate_per_ip` (`gate.rs`).
    pub connect_rates_ip: super::gate::ConnectRates<std::net::IpAddr>,
    /// Connections per user, for `connect_rate_per_user` (`gate.rs`).
    pub connect_rates_user: super::gate::ConnectRates<crate::UserId>,
    /// `GET /api/history` requests per user, for `history.api_rate` (`api.rs`).
    pub api_history_rates: super::gate::ConnectRates<crate::UserId>,
    /// Bytes each user's sends may store for others, for `sender_bytes_per_minute`.
    pub sender_budgets: super::sender_budget::SenderBudgets,
    pub node_id: u64,
    /// Embedded mode's history, when history is active without a backplane.
    pub history: Option<crate::history::MemoryHistory>,
    /// Embedded mode's rooms and presence (with Redis they live there).
    pub rooms: Option<crate::rooms::MemoryRooms>,
    /// TLS on the listen port, when configured.
    pub tls: Option<Arc<crate::connection::ServerTls>>,
    /// Embedded mode's room histories, one ring per room, when history is active.
    pub room_history: Option<crate::history::MemoryHistory>,
}
