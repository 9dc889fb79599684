//! Per-core counters, written only by their core (relaxed atomics on a private cache line) and
//! summed on demand for `/metrics` (Prometheus text) and `/healthz` (JSON).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::protocol::CloseReason;
pub use histogram::{Histogram, Unit, BYTES_BOUNDS, LATENCY_BOUNDS_US};

pub mod histogram;
pub mod process;

/// Why a connection ended, as counted in `switchboard_connections_closed_total{reason=...}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// The client sent a close frame.
    ClientClose,
    /// The TCP connection failed or was reset without a close frame.
    Reset,
    /// The server closed it for a [`CloseReason`].
    Server(CloseReason),
}

const CLOSE_LABELS: [&str; 15] = [
    "client_close",
    "reset",
    "shutdown",
    "protocol_error",
    "binary_frame",
    "invalid_utf8",
    "message_too_big",
    "heartbeat_timeout",
    "slow_consumer",
    "rate_limited",
    "connect_timeout",
    "bad_packet",
    "device_limit",
    "session_expired",
    "disconnected",
];

impl Closed {
    fn index(self) -> usize {
        match self {
            Closed::ClientClose => 0,
            Closed::Reset => 1,
            Closed::Server(CloseReason::Shutdown) => 2,
            Closed::Server(CloseReason::ProtocolError) => 3,
            Closed::Server(CloseReason::BinaryFrame) => 4,
            Closed::Server(CloseReason::InvalidUtf8) => 5,
            Closed::Server(CloseReason::MessageTooBig) => 6,
            Closed::Server(CloseReason::HeartbeatTimeout) => 7,
            Closed::Server(CloseReason::SlowConsumer) => 8,
            Closed::Server(CloseReason::RateLimited) => 9,
            // The client asked for it, as with a close frame.
            Closed::Server(CloseReason::ClientEnded) => 0,
            Closed::Server(CloseReason::ConnectTimeout) => 10,
            Closed::Server(CloseReason::BadPacket) => 11,
            Closed::Server(CloseReason::DeviceLimit) => 12,
            Closed::Server(CloseReason::SessionExpired) => 13,
            Closed::Server(CloseReason::Disconnected) => 14,
        }
    }
}

/// One core's counters. Aligned to its own cache lines so cores never contend.
#[derive(Default, Debug)]
#[repr(align(128))]
pub struct CoreMetrics {
    /// Gauge: open WebSocket connections on this core.
    pub connections_open: AtomicU64,
    /// Gauge: sockets held by this core (open, handshaking, closing).
    pub sockets: AtomicU64,
    /// Gauge: users with at least one connection on this core.
    pub users: AtomicU64,
    /// Gauge: bytes queued for this core's connections and not yet written to their sockets.
    pub outbound_buffered: AtomicU64,
    /// WebSocket upgrades completed.
    pub connections_accepted: AtomicU64,
    /// Sockets dropped at accept: their address had `--max-handshakes-per-ip` in progress, or
    /// the process `--max-handshakes` and nothing could be shed.
    pub handshakes_refused: AtomicU64,
    /// Upgrades (or Socket.IO CONNECTs) refused for their address's or user's connect rate.
    pub connects_rate_limited: AtomicU64,
    /// `GET /api/history` requests refused (429) for their user's rate.
    pub api_history_rate_limited: AtomicU64,
    /// Sends refused for their sender's `--sender-bytes-per-minute` budget.
    pub sends_over_budget: AtomicU64,
    /// Unauthenticated sockets dropped, oldest first, to make room (`--max-handshakes`, or the
    /// process out of file descriptors).
    pub handshakes_shed: AtomicU64,
    closed: [AtomicU64; CLOSE_LABELS.len()],
    /// Text frames received from clients.
    pub frames_in: AtomicU64,
    /// Frames queued to clients (events, acks, errors, pings).
    pub frames_out: AtomicU64,
    /// Bytes written to client sockets.
    pub bytes_out: AtomicU64,
    /// Dispatches originated by handlers on this core.
    pub dispatches: AtomicU64,
    /// Dispatches this core could not queue for another core (that inbox was full).
    pub inbox_drops: AtomicU64,
    /// Upgrades refused with 401.
    pub auth_failures: AtomicU64,
    /// Requests that never became a WebSocket: timeouts, malformed, 4xx/5xx other than 401.
    pub handshake_failures: AtomicU64,
    /// Upgrades refused because `max_connections` was reached.
    pub rejected_over_capacity: AtomicU64,
    /// `error` events sent for bad client input.
    pub client_errors: AtomicU64,
    /// Plain HTTP requests answered (health, metrics, errors).
    pub http_requests: AtomicU64,
    /// Resumes (`?since=`, `resume`) that ended with `complete: true`.
    pub recoveries_complete: AtomicU64,
    /// Resumes that ended with `complete: false` (history lost, unknown offset, timeout).
    pub recoveries_incomplete: AtomicU64,
    /// From reading a client's text frame to the end of the flush that wrote what it caused
    /// on this core (its ack, its local deliveries).
    pub message_latency: Histogram<14>,
    /// From a client request whose ack waits for Redis to that ack going out.
    pub ack_wait: Histogram<14>,
    /// Bytes a connection still had queued after each flush (0 when the socket took it all).
    pub outbound_backlog: Histogram<10>,
}

// The two histogram shapes, each with its own bounds.
impl Default for Histogram<14> {
    fn default() -> Self {
        Histogram::new(&LATENCY_BOUNDS_US)
    }
}

impl Default for Histogram<10> {
    fn default() -> Self {
        Histogram::new(&BYTES_BOUNDS)
    }
}

/// Adds `n` to a counter owned by the calling core.
#[inline]
pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Relaxed);
}

impl CoreMetrics {
    /// Counts a connection that ended for `why`.
    pub fn closed(&self, why: Closed) {
        add(&self.closed[why.index()], 1);
    }
}

fn sum(cores: &[CoreMetrics], f: impl Fn(&CoreMetrics) -> &AtomicU64) -> u64 {
    cores.iter().map(|c| f(c).load(Relaxed)).sum()
}

/// The `/healthz` body.
pub fn render_health(cores: &[CoreMetrics], status: &str, extra: &str) -> String {
    let mut per_core = String::new();
    for (i, c) in cores.iter().enumerate() {
        if i > 0 {
            per_core.push(',');
        }
        let _ = write!(
            per_core,
            r#"{{"core":{i},"connections":{},"sockets":{},"users":{}}}"#,
            c.connections_open.load(Relaxed),
            c.sockets.load(Relaxed),
            c.users.load(Relaxed)
        );
    }
    format!(
        r#"{{"status":"{status}","cores":{},"connections":{},"per_core":[{per_core}]{extra}}}"#,
        cores.len(),
        sum(cores, |c| &c.connections_open),
    )
}

/// The `/metrics` body in Prometheus text exposition format.
pub fn render_prometheus(cores: &[CoreMetrics]) -> String {
    let mut out = String::with_capacity(4096);
    let mut family =
        |name: &str, kind: &str, help: &str, f: &dyn Fn(&CoreMetrics) -> &AtomicU64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {}", sum(cores, f));
        };
    family(
        "switchboard_connections_open",
        "gauge",
        "Open WebSocket connections.",
        &|c| &c.connections_open,
    );
    family(
        "switchboard_outbound_buffered_bytes",
        "gauge",
        "Bytes queued for clients and not yet written to their sockets.",
        &|c| &c.outbound_buffered,
    );
    family(
        "switchboard_connections_accepted_total",
        "counter",
        "WebSocket upgrades completed.",
        &|c| &c.connections_accepted,
    );
    family(
        "switchboard_handshakes_refused_total",
        "counter",
        "Sockets dropped at accept: too many handshakes in progress from their address or in all.",
        &|c| &c.handshakes_refused,
    );
    family(
        "switchboard_connects_rate_limited_total",
        "counter",
        "Connections refused (429, or a Socket.IO CONNECT_ERROR) for their address's or user's connect rate.",
        &|c| &c.connects_rate_limited,
    );
    family(
        "switchboard_api_history_rate_limited_total",
        "counter",
        "GET /api/history requests refused (429) for their user's --api-history-rate.",
        &|c| &c.api_history_rate_limited,
    );
    family(
        "switchboard_sends_over_budget_total",
        "counter",
        "Sends refused (quota_exceeded) for what they would store for other users past the sender's budget.",
        &|c| &c.sends_over_budget,
    );
    family(
        "switchboard_handshakes_shed_total",
        "counter",
        "Unauthenticated sockets dropped, oldest first, to make room for new ones.",
        &|c| &c.handshakes_shed,
    );
    family(
        "switchboard_frames_in_total",
        "counter",
        "Text frames received from clients.",
        &|c| &c.frames_in,
    );
    family(
        "switchboard_frames_out_total",
        "counter",
        "Frames queued to clients.",
        &|c| &c.frames_out,
    );
    family(
        "switchboard_bytes_out_total",
        "counter",
        "Bytes written to client sockets.",
        &|c| &c.bytes_out,
    );
    family(
        "switchboard_dispatches_total",
        "counter",
        "Dispatches originated by handlers.",
        &|c| &c.dispatches,
    );
    family(
        "switchboard_inbox_drops_total",
        "counter",
        "Dispatches dropped because a core's inbox was full.",
        &|c| &c.inbox_drops,
    );
    family(
        "switchboard_auth_failures_total",
        "counter",
        "Upgrades refused with 401.",
        &|c| &c.auth_failures,
    );
    family(
        "switchboard_handshake_failures_total",
        "counter",
        "Requests that timed out or were malformed before an upgrade.",
        &|c| &c.handshake_failures,
    );
    family(
        "switchboard_rejected_over_capacity_total",
        "counter",
        "Upgrades refused with 503 at max_connections.",
        &|c| &c.rejected_over_capacity,
    );
    family(
        "switchboard_client_errors_total",
        "counter",
        "Error events sent for bad input.",
        &|c| &c.client_errors,
    );
    family(
        "switchboard_recoveries_complete_total",
        "counter",
        "Resumes that replayed everything missed.",
        &|c| &c.recoveries_complete,
    );
    family(
        "switchboard_recoveries_incomplete_total",
        "counter",
        "Resumes that could not replay everything missed (complete: false).",
        &|c| &c.recoveries_incomplete,
    );
    family(
        "switchboard_http_requests_total",
        "counter",
        "Plain HTTP requests answered.",
        &|c| &c.http_requests,
    );
    let _ = writeln!(
        out,
        "# HELP switchboard_connections_closed_total Connections closed, by reason.\n\
         # TYPE switchboard_connections_closed_total counter"
    );
    for (i, label) in CLOSE_LABELS.iter().enumerate() {
        let n: u64 = cores.iter().map(|c| c.closed[i].load(Relaxed)).sum();
        let _ = writeln!(
            out,
            "switchboard_connections_closed_total{{reason=\"{label}\"}} {n}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP switchboard_core_connections_open Open connections per core.\n\
         # TYPE switchboard_core_connections_open gauge"
    );
    for (i, c) in cores.iter().enumerate() {
        let _ = writeln!(
            out,
            "switchboard_core_connections_open{{core=\"{i}\"}} {}",
            c.connections_open.load(Relaxed)
        );
    }
    histogram::render(
        &mut out,
        "switchboard_message_latency_seconds",
        "From reading a client's frame to the end of the flush that wrote its answer and local deliveries.",
        Unit::Seconds,
        cores.iter().map(|c| &c.message_latency),
    );
    histogram::render(
        &mut out,
        "switchboard_ack_wait_seconds",
        "From a request whose ack waits for Redis to the ack going out.",
        Unit::Seconds,
        cores.iter().map(|c| &c.ack_wait),
    );
    histogram::render(
        &mut out,
        "switchboard_outbound_backlog_bytes",
        "Bytes a connection still had queued after a flush.",
        Unit::Bytes,
        cores.iter().map(|c| &c.outbound_backlog),
    );
    process::render(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_across_cores() {
        let cores: Vec<CoreMetrics> = (0..2).map(|_| CoreMetrics::default()).collect();
        add(&cores[0].frames_in, 2);
        add(&cores[1].frames_in, 3);
        cores[1].closed(Closed::Server(CloseReason::SlowConsumer));
        let text = render_prometheus(&cores);
        assert!(text.contains("switchboard_frames_in_total 5\n"));
        assert!(text.contains("switchboard_connections_closed_total{reason=\"slow_consumer\"} 1\n"));
        let health: serde_json::Value =
            serde_json::from_str(&render_health(&cores, "ok", "")).unwrap();
        assert_eq!(health["cores"], 2);
        assert_eq!(health["per_core"][1]["connections"], 0);
    }
}
