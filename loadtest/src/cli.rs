//! Command-line flags and their validation.

use clap::{Parser, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;

/// Sockets one process may hold: the hard open-files limit here is 20,000 per process.
pub const MAX_CONNS_PER_PROCESS: usize = 19_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Random senders to random users at --rate messages/s (open loop).
    Direct,
    /// One sender to one recipient that has --devices connections.
    Fanout,
    /// Hold connections for --duration; with --server-pid, report RSS per connection.
    Idle,
    /// Raise the rate step by step until p99 exceeds --p99-bound-ms or a message is lost.
    Ramp,
    /// Hold connections for --duration while closing and reopening --churn-per-sec of them
    /// (clean close, FIN, reset in turn), with an optional light --rate of messages; samples
    /// the server's RSS, fds and /healthz every --sample-every s and reports the RSS slope.
    Churn,
    /// Like direct, with devices that reconnect and resume by offset (`?since=`) whenever
    /// their connection drops; reports sent/delivered/lost/duplicated per device (soak.sh).
    Soak,
    /// One room of --users members (--devices each); member 0 sends room messages at --rate;
    /// reports deliveries/s, loss, duplicates and latency.
    Room,
}

/// Wire protocol spoken to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Protocol {
    /// switchboard's own: JSON `{event, args}` text frames on a plain WebSocket.
    Native,
    /// Socket.IO v5 over Engine.IO v4, websocket transport only (a socket.io v4 server).
    Socketio,
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "loadtest",
    version,
    about = "Open-loop load generator for the switchboard WebSocket server"
)]
pub struct Args {
    #[arg(value_enum)]
    pub scenario: Scenario,

    /// Server address; repeat for several instances (devices are spread round-robin).
    #[arg(long = "addr", default_value = "127.0.0.1:8080")]
    pub addrs: Vec<SocketAddr>,

    /// Wire protocol: `native` (switchboard) or `socketio` (Socket.IO v5 / Engine.IO v4
    /// over a WebSocket, for a socket.io v4 server).
    #[arg(long, value_enum, default_value_t = Protocol::Native)]
    pub protocol: Protocol,

    /// WebSocket path; `?token=...` is appended (default `/ws`, or `/socket.io/` with
    /// `--protocol socketio`, where `?EIO=4&transport=websocket&token=...` is appended).
    #[arg(long)]
    pub path: Option<String>,

    /// Number of users (direct, idle, ramp).
    #[arg(long, default_value_t = 200)]
    pub users: u64,

    /// Connections per user; for fanout, the recipient's connections.
    #[arg(long, default_value_t = 2)]
    pub devices: u32,

    /// Fanout only: connections of the sending user.
    #[arg(long, default_value_t = 1)]
    pub sender_devices: u32,

    /// User ids are `<prefix><n>`.
    #[arg(long, default_value = "u")]
    pub user_prefix: String,

    /// Total messages per second (direct, fanout, soak; churn: 0 for none).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,

    /// Churn: connections closed and reopened per second.
    #[arg(long, default_value_t = 200.0)]
    pub churn_per_sec: f64,

    /// Churn: share of reopened connections that come back as a user the server has never
    /// seen (0 = always the same user, 1 = always a new one).
    #[arg(long, default_value_t = 0.0)]
    pub fresh_users: f64,

    /// Churn: seconds between samples of the server's RSS, fds and /healthz.
    #[arg(long, default_value_t = 10.0)]
    pub sample_every: f64,

    /// Churn: samples from this many seconds on are the steady state (start RSS, slope).
    #[arg(long, default_value_t = 60.0)]
    pub steady_after: f64,

    /// Seconds of sending (or holding, for idle).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,

    /// Seconds to wait for stragglers after sending stops.
    #[arg(long, default_value_t = 3.0)]
    pub drain: f64,

    /// Ramp: first rate (messages/s).
    #[arg(long, default_value_t = 1000.0)]
    pub start_rate: f64,

    /// Ramp: rate increase per step.
    #[arg(long, default_value_t = 1000.0)]
    pub step: f64,

    /// Ramp: seconds per step (each step is followed by --drain).
    #[arg(long, default_value_t = 5.0)]
    pub step_duration: f64,

    /// Ramp: a step fails when its p99 latency exceeds this.
    #[arg(long, default_value_t = 50.0)]
    pub p99_bound_ms: f64,

    /// Ramp: stop after this many steps even if every step held.
    #[arg(long, default_value_t = 20)]
    pub max_steps: u32,

    /// Pad each message payload to about this many bytes (0 = no padding).
    #[arg(long, default_value_t = 0)]
    pub size: usize,

    /// Event-loop threads per process. One by default: on a small machine shared with the
    /// server, a second generator thread steals the server's CPUs and inflates its tail latency
    /// (measured: p99 9.7 ms with 2 threads vs 4.1 ms with 1 at 10,000 messages/s on 2 vCPUs).
    #[arg(long, default_value_t = 1)]
    pub threads: u32,

    /// Worker processes (each with its own shard of users), for more than 19,000 sockets.
    #[arg(long, default_value_t = 1)]
    pub workers: u32,

    /// Concurrent connection attempts per process.
    #[arg(long, default_value_t = 512)]
    pub connect_concurrency: usize,

    /// Seconds before a connect + handshake counts as failed.
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout: f64,

    /// Mint HS256 JWTs (sub = user id) with this secret instead of dev tokens.
    #[arg(long, env = "LOADTEST_JWT_SECRET")]
    pub jwt_secret: Option<String>,

    /// Lifetime of minted JWTs in seconds.
    #[arg(long, default_value_t = 3600)]
    pub jwt_ttl: u64,

    /// Server process(es) to sample VmRSS from (idle: RSS per connection) and, in direct,
    /// fanout and ramp, CPU time over each send window (server CPU per delivery); repeat for
    /// several instances (and every process of a multi-process server), they are summed.
    #[arg(long)]
    pub server_pid: Vec<u32>,

    /// Backplane process(es), e.g. redis-server: their CPU time over each send window is
    /// counted with the servers' (reported apart as "of which Redis"), not their RSS; repeat
    /// for several.
    #[arg(long)]
    pub redis_pid: Vec<u32>,

    /// Direct and ramp: only this many users send (spread evenly over the user ids: user g
    /// sends iff floor((g+1)·N/users) > floor(g·N/users)); recipients stay random over all
    /// users. Default: every user sends.
    #[arg(long)]
    pub senders: Option<u64>,

    /// Print the summary as JSON on stdout (the human summary goes to stderr).
    #[arg(long)]
    pub json: bool,

    /// Write an SVG with latency over time and the percentile curve.
    #[arg(long)]
    pub plot: Option<PathBuf>,

    /// No per-second progress lines.
    #[arg(long)]
    pub quiet: bool,

    /// Unsent bytes allowed per connection before new sends are dropped and counted.
    #[arg(long, default_value_t = 8 << 20)]
    pub write_buffer_cap: usize,

    /// Loopback only: spread connections over this many 127.0.x.y source addresses
    /// (0 = let the kernel pick the source; slow past ~10k sockets to one port).
    #[arg(long, default_value_t = 64)]
    pub source_spread: u32,

    /// Seed for sender/recipient choice (default: random).
    #[arg(long)]
    pub seed: Option<u64>,

    // Set by the parent when it re-executes itself as a worker.
    #[arg(long, hide = true)]
    pub worker_index: Option<u32>,
    #[arg(long, hide = true)]
    pub run_id: Option<String>,
}

impl Args {
    pub fn validate(&self) -> Result<(), String> {
        let pos = |v: f64, name: &str| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(format!("--{name} must be > 0"))
            }
        };
        if self.addrs.is_empty() {
            return Err("need at least one --addr".into());
        }
        if !self.ws_path().starts_with('/') {
            return Err("--path must start with '/'".into());
        }
        if self
            .user_prefix
            .bytes()
            .any(|b| !(b.is_ascii_alphanumeric() || b == b'_' || b == b'-'))
        {
            return Err("--user-prefix may only use [A-Za-z0-9_-]".into());
        }
        if self.threads == 0 || self.threads > 64 {
            return Err("--threads must be 1..=64".into());
        }
        if self.workers == 0 || self.workers > 64 {
            return Err("--workers must be 1..=64".into());
        }
        if self.devices == 0 || self.sender_devices == 0 {
            return Err("--devices and --sender-devices must be >= 1".into());
        }
        if self.connect_concurrency == 0 {
            return Err("--connect-concurrency must be >= 1".into());
        }
        pos(self.duration, "duration")?;
        pos(self.connect_timeout, "connect-timeout")?;
        if !(self.drain.is_finite() && self.drain >= 0.0) {
            return Err("--drain must be >= 0".into());
        }
        match self.scenario {
            Scenario::Direct | Scenario::Fanout | Scenario::Soak | Scenario::Room => {
                pos(self.rate, "rate")?
            }
            Scenario::Ramp => {
                pos(self.start_rate, "start-rate")?;
                pos(self.step_duration, "step-duration")?;
                pos(self.p99_bound_ms, "p99-bound-ms")?;
                if !(self.step.is_finite() && self.step >= 0.0) {
                    return Err("--step must be >= 0".into());
                }
                if self.max_steps == 0 {
                    return Err("--max-steps must be >= 1".into());
                }
            }
            Scenario::Idle => {}
            Scenario::Churn => {
                let non_neg = |v: f64| v.is_finite() && v >= 0.0;
                if !non_neg(self.rate) || !non_neg(self.churn_per_sec) {
                    return Err("--rate and --churn-per-sec must be >= 0".into());
                }
                if !(0.0..=1.0).contains(&self.fresh_users) {
                    return Err("--fresh-users must be in 0..=1".into());
                }
                pos(self.sample_every, "sample-every")?;
                if !non_neg(self.steady_after) {
                    return Err("--steady-after must be >= 0".into());
                }
                if self.workers != 1 || self.threads != 1 {
                    return Err("churn runs one process with one thread".into());
                }
            }
        }
        if let Some(n) = self.senders {
            if !matches!(self.scenario, Scenario::Direct | Scenario::Ramp) {
                return Err("--senders applies to direct and ramp only".into());
            }
            if n == 0 || n > self.users {
                return Err("--senders must be 1..=--users".into());
            }
            if n < u64::from(self.workers) {
                return Err("--senders must be at least --workers".into());
            }
        }
        if self.scenario != Scenario::Fanout {
            if self.users == 0 {
                return Err("--users must be >= 1".into());
            }
            if self.users < u64::from(self.workers) {
                return Err("--users must be at least --workers".into());
            }
        }
        let per_process = self.conns_per_worker();
        if per_process > MAX_CONNS_PER_PROCESS as u64 {
            return Err(format!(
                "{per_process} connections per process exceeds {MAX_CONNS_PER_PROCESS} \
                 (open-files limit); raise --workers{}",
                if self.scenario == Scenario::Fanout {
                    " (fanout: each worker runs its own sender/recipient pair, so lower --devices)"
                } else {
                    ""
                }
            ));
        }
        Ok(())
    }

    /// The WebSocket path, defaulted by protocol.
    pub fn ws_path(&self) -> &str {
        match (&self.path, self.protocol) {
            (Some(p), _) => p,
            (None, Protocol::Native) => "/ws",
            (None, Protocol::Socketio) => "/socket.io/",
        }
    }

    /// Connections of the largest worker shard.
    pub fn conns_per_worker(&self) -> u64 {
        match self.scenario {
            Scenario::Fanout => u64::from(self.devices) + u64::from(self.sender_devices),
            _ => self.users.div_ceil(u64::from(self.workers)) * u64::from(self.devices),
        }
    }

    pub fn total_conns(&self) -> u64 {
        match self.scenario {
            Scenario::Fanout => self.conns_per_worker() * u64::from(self.workers),
            _ => self.users * u64::from(self.devices),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("loadtest").chain(v.iter().copied())).unwrap()
    }

    #[test]
    fn defaults_and_repeated_addrs() {
        let a = parse(&["direct", "--addr", "127.0.0.1:1", "--addr", "127.0.0.1:2"]);
        assert_eq!(a.addrs.len(), 2);
        assert_eq!(a.scenario, Scenario::Direct);
        assert!(a.validate().is_ok());
        let d = parse(&["idle"]);
        assert_eq!(d.addrs, vec!["127.0.0.1:8080".parse().unwrap()]);
    }

    #[test]
    fn enforces_per_process_socket_limit() {
        let a = parse(&["idle", "--users", "10000", "--devices", "2"]);
        assert!(a.validate().unwrap_err().contains("--workers"));
        let b = parse(&[
            "idle",
            "--users",
            "10000",
            "--devices",
            "2",
            "--workers",
            "2",
        ]);
        assert!(b.validate().is_ok());
        assert_eq!(b.total_conns(), 20_000);
        let f = parse(&["fanout", "--devices", "25000", "--workers", "4"]);
        assert!(f.validate().is_err());
    }

    #[test]
    fn protocol_defaults_the_path() {
        let n = parse(&["direct"]);
        assert_eq!(n.protocol, Protocol::Native);
        assert_eq!(n.ws_path(), "/ws");
        let s = parse(&["direct", "--protocol", "socketio"]);
        assert_eq!(s.protocol, Protocol::Socketio);
        assert_eq!(s.ws_path(), "/socket.io/");
        let p = parse(&["direct", "--protocol", "socketio", "--path", "/sio/"]);
        assert_eq!(p.ws_path(), "/sio/");
        assert!(parse(&["direct", "--path", "ws"]).validate().is_err());
    }

    #[test]
    fn rejects_bad_values() {
        assert!(parse(&["direct", "--rate", "0"]).validate().is_err());
        assert!(parse(&["direct", "--threads", "0"]).validate().is_err());
        assert!(parse(&["direct", "--user-prefix", "a b"])
            .validate()
            .is_err());
        assert!(parse(&["ramp", "--max-steps", "0"]).validate().is_err());
    }

    #[test]
    fn senders_and_cpu_pids() {
        let a = parse(&[
            "direct",
            "--senders",
            "50",
            "--server-pid",
            "10",
            "--server-pid",
            "11",
            "--redis-pid",
            "20",
        ]);
        assert!(a.validate().is_ok());
        assert_eq!(
            (a.senders, a.server_pid, a.redis_pid),
            (Some(50), vec![10, 11], vec![20])
        );
        assert_eq!(parse(&["direct"]).senders, None);
        assert!(parse(&["ramp", "--senders", "200"]).validate().is_ok());
        assert!(parse(&["direct", "--senders", "0"]).validate().is_err());
        assert!(parse(&["direct", "--senders", "201"]).validate().is_err());
        assert!(parse(&["fanout", "--senders", "1"]).validate().is_err());
        assert!(parse(&["direct", "--senders", "1", "--workers", "2"])
            .validate()
            .is_err());
    }

    #[test]
    fn churn_flags() {
        let c = parse(&["churn", "--rate", "0", "--users", "4000"]);
        assert!(c.validate().is_ok());
        assert_eq!((c.churn_per_sec, c.sample_every), (200.0, 10.0));
        assert!(parse(&["churn", "--fresh-users", "1.5"])
            .validate()
            .is_err());
        assert!(parse(&["churn", "--sample-every", "0"]).validate().is_err());
        assert!(parse(&["churn", "--workers", "2"]).validate().is_err());
        assert!(parse(&["churn", "--users", "10000"]).validate().is_err());
    }
}
