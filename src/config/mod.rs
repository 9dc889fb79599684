//! Server configuration: every bound with its documented `DEFAULT_*`, and validation before bind.
//!
//! The binary fills a [`Config`] from CLI flags and environment variables (see `src/main.rs`);
//! embedders and tests build one from [`Config::default`] and change the fields they care about.
//! [`Config::validate`] runs before any socket is bound, so a bad value is a one-line error.
//!
//! Each feature's settings have a file of their own ([`redis`], [`history`], [`rooms`],
//! [`hooks`]) and keep
//! their old paths through re-exports (`backplane::RedisConfig`, ...). This module imports nothing
//! from the crate but `types`, so every layer may read it.

pub mod file;
pub mod history;
pub mod hooks;
pub mod redis;
pub mod rooms;

use std::net::SocketAddr;
use std::time::Duration;

use self::history::HistoryConfig;
use self::hooks::{HooksConfig, Origins};
use self::redis::{RedisConfig, Routing};
use self::rooms::RoomsConfig;

/// Address the server listens on when none is given.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Largest WebSocket message (and frame) a client may send, in bytes.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Bytes queued for one connection before it is closed as a slow consumer.
pub const DEFAULT_MAX_OUTBOUND_BYTES: usize = 1024 * 1024;
/// Outbound bytes buffered for all connections of the process together; past it the biggest
/// slow consumers are closed (4008) until the total is back under it.
pub const DEFAULT_MAX_OUTBOUND_TOTAL_BYTES: usize = 256 * 1024 * 1024;
/// Eager per-connection read buffer. tungstenite defaults to 128 KiB; chat frames are small,
/// and this buffer dominates the memory of an idle connection.
pub const DEFAULT_READ_BUFFER_BYTES: usize = 2 * 1024;
/// Time a client has to send a complete HTTP upgrade request.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Interval between server pings on an open connection.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(25);
/// How long past a ping interval a silent connection is kept before it is closed.
pub const DEFAULT_PING_TIMEOUT: Duration = Duration::from_secs(20);
/// How long graceful shutdown waits for close handshakes and flushes.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// Dispatches one core may hold for another before it drops (and counts) new ones.
pub const DEFAULT_INBOX_CAPACITY: usize = 64 * 1024;
/// Handshakes in progress in the process (sockets that have not authenticated yet: a request
/// head still coming, a Socket.IO connection before its first CONNECT); past it the oldest are
/// dropped to make room.
pub const DEFAULT_MAX_HANDSHAKES: usize = 4096;
/// Handshakes in progress from one source address; past it new sockets from it are dropped.
pub const DEFAULT_MAX_HANDSHAKES_PER_IP: u32 = 256;
/// WebSocket upgrades one source address may make per second, before authentication (0 = no
/// limit); past it, HTTP 429.
pub const DEFAULT_CONNECT_RATE_PER_IP: u32 = 100;
/// Upgrades one source address may make in a burst above its rate.
pub const DEFAULT_CONNECT_BURST_PER_IP: u32 = 1000;
/// Connections one user may open per second, across this instance (0 = no limit); past it,
/// HTTP 429 (Socket.IO: a CONNECT_ERROR).
pub const DEFAULT_CONNECT_RATE_PER_USER: u32 = 10;
/// Connections one user may open in a burst above its rate.
pub const DEFAULT_CONNECT_BURST_PER_USER: u32 = 20;
/// Largest HTTP request head (request line + headers) accepted; past it, HTTP 431.
pub const DEFAULT_MAX_REQUEST_HEADER_BYTES: usize = 8 * 1024;
/// File descriptors kept free for listeners, pending handshakes, Redis and logs when
/// `max_connections` is derived from the open-file limit (at most a quarter of a small limit:
/// see [`fd_headroom`]).
pub const FD_HEADROOM: u64 = 512;

/// The descriptors kept free under an open-file limit of `limit`: [`FD_HEADROOM`], or a quarter
/// of a limit too small for it (a 256-descriptor test process still gets 192 connections).
pub fn fd_headroom(limit: u64) -> u64 {
    FD_HEADROOM.min(limit / 4)
}
/// Text frames a connection may send per second, on average (0 turns the limit off).
pub const DEFAULT_RATE_LIMIT_PER_SEC: u32 = 200;
/// Text frames a connection may send in a burst above its rate; also how many frames in a row
/// may be refused (each with a `rate_limited` error) before the connection is closed with 1008.
pub const DEFAULT_RATE_LIMIT_BURST: u32 = 400;
/// Longest user id accepted from a token, in bytes.
pub const MAX_USER_ID_BYTES: usize = 256;
/// Leeway for the JWT `exp` (and `nbf`) check, to absorb clock skew between issuer and server.
pub const DEFAULT_JWT_LEEWAY: Duration = Duration::from_secs(30);
/// How long SIGTERM spreads the 1001 closes of open connections over, so their clients do not
/// all reconnect (to the other instances) in the same second.
pub const DEFAULT_DRAIN_PERIOD: Duration = Duration::from_secs(5);
/// Longest `--drain-period` accepted.
pub const MAX_DRAIN_PERIOD: Duration = Duration::from_secs(600);

/// How clients prove who they are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthMode {
    /// The token is the user id. For local development and load tests only.
    Dev,
    /// HS256 JSON Web Tokens; the user id is the `sub` claim and `exp` is required.
    Jwt {
        /// The shared HMAC secret.
        secret: String,
        /// Required `aud` claim, when set.
        audience: Option<String>,
        /// Required `iss` claim, when set.
        issuer: Option<String>,
        /// Clock-skew allowance for `exp`/`nbf`.
        leeway: Duration,
    },
}

/// Where the core threads run.
///
/// Pinning pays even when instances share CPUs: two `--cores 1` instances on a 2-CPU machine
/// both pinned to the first CPU cost about 33 µs of CPU per delivery (servers and Redis, history
/// on) against about 45 µs with their core threads left to float (docs/BENCHMARKS.md, "CPU per
/// delivery"). So `auto` always pins; give instances that share a machine their own CPUs with a
/// list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Pin {
    /// Pin core `k` to the `k`-th CPU this process may use (round robin). The default
    /// (`--pin auto`).
    #[default]
    Auto,
    /// Pin nothing (`--pin off`).
    Off,
    /// Pin core `k` to CPU `cpus[k % cpus.len()]` (`--pin 2,3`), e.g. one CPU set per instance.
    Cpus(Vec<usize>),
}

impl Pin {
    /// The CPU for each of `cores` core threads, given the CPUs this process may use.
    pub fn plan(&self, cores: usize, allowed: &[usize]) -> Vec<Option<usize>> {
        match self {
            Pin::Auto if !allowed.is_empty() => (0..cores)
                .map(|k| Some(allowed[k % allowed.len()]))
                .collect(),
            Pin::Auto | Pin::Off => vec![None; cores],
            Pin::Cpus(cpus) => (0..cores)
                .map(|k| cpus.get(k % cpus.len().max(1)).copied())
                .collect(),
        }
    }
}

impl std::str::FromStr for Pin {
    type Err = String;

    /// `auto`, `off`, or a comma-separated list of CPU ids (`0,2`).
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "auto" => Ok(Pin::Auto),
            "off" => Ok(Pin::Off),
            list => {
                let cpus = list
                    .split(',')
                    .map(|c| c.trim().parse::<usize>())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| format!("--pin takes auto, off or CPU ids like 0,2; got {s:?}"))?;
                if cpus.is_empty() {
                    return Err("--pin needs at least one CPU id".into());
                }
                Ok(Pin::Cpus(cpus))
            }
        }
    }
}

/// A validated server configuration. Build with [`Config::default`] and adjust fields.
#[derive(Clone, Debug)]
pub struct Config {
    /// Address every core's `SO_REUSEPORT` listener binds. Port 0 picks a free port.
    pub listen: SocketAddr,
    /// Number of core loops (threads), each pinned to a CPU (see [`Pin`]).
    pub cores: usize,
    /// Which CPUs the core threads are pinned to.
    pub pin: Pin,
    /// Authentication mode.
    pub auth: AuthMode,
    /// Open WebSocket connections allowed in this process; past it upgrades get HTTP 503.
    pub max_connections: usize,
    /// Largest inbound message and frame, in bytes (close 1009 past it).
    pub max_message_bytes: usize,
    /// Outbound bytes buffered per connection before it is closed as a slow consumer (4008).
    pub max_outbound_bytes: usize,
    /// Outbound bytes buffered in the whole process; past it the connections holding the most
    /// are closed as slow consumers (4008), biggest first.
    pub max_outbound_total_bytes: usize,
    /// Per-connection read buffer, in bytes.
    pub read_buffer_bytes: usize,
    /// Deadline for a complete HTTP request after accept.
    pub handshake_timeout: Duration,
    /// Handshakes in progress in the process; past it the oldest are dropped.
    pub max_handshakes: usize,
    /// Handshakes in progress from one source address; past it new sockets are dropped.
    pub max_handshakes_per_ip: u32,
    /// Upgrades per second from one source address, before authentication (0 = no limit).
    pub connect_rate_per_ip: u32,
    /// Burst of upgrades from one source address above its rate.
    pub connect_burst_per_ip: u32,
    /// Connections per second one user may open on this instance (0 = no limit).
    pub connect_rate_per_user: u32,
    /// Burst of connections of one user above its rate.
    pub connect_burst_per_user: u32,
    /// Interval between server pings.
    pub ping_interval: Duration,
    /// Grace after a missed ping interval before a silent connection is closed (4000).
    pub ping_timeout: Duration,
    /// Graceful-shutdown deadline.
    pub shutdown_timeout: Duration,
    /// Capacity of each core's cross-core inbox.
    pub inbox_capacity: usize,
    /// Largest HTTP request head accepted.
    pub max_request_header_bytes: usize,
    /// Per-connection token bucket for client text frames: frames per second (0 = off).
    pub rate_limit_per_sec: u32,
    /// Bucket size, and the number of refused frames in a row before a 1008 close.
    pub rate_limit_burst: u32,
    /// The Redis backplane; `None` runs embedded (one instance, every core, in-process).
    pub backplane: Option<RedisConfig>,
    /// Offsets, per-user history, resume and the history/publish routes.
    pub history: HistoryConfig,
    /// Serve the chat page ([`crate::web`]) at `GET /` and `GET /index.html`; off, both are 404.
    pub chat_page: bool,
    /// Rooms, presence and the per-user device limit.
    pub rooms: RoomsConfig,
    /// The application backend's HTTP hooks.
    pub hooks: HooksConfig,
    /// Browser origins allowed to upgrade and to call `/api` (CORS).
    pub allowed_origins: Origins,

    // Operations (readiness and drain, TLS, the metrics listener).
    /// How long a drain ([`crate::Stopper::drain`], SIGTERM in the binary) spreads the 1001
    /// closes of open connections over; zero closes them all at once.
    pub drain_period: Duration,
    /// TLS on the listen port (`wss://`, `https://`); `None` serves plain TCP.
    pub tls: Option<TlsConfig>,
    /// A second, plain-HTTP address serving `/metrics`, `/healthz` and `/readyz`; with it,
    /// `/metrics` is no longer served on the public port.
    pub metrics_listen: Option<SocketAddr>,
}

/// The server's certificate and key, PEM files read at start and on each reload (SIGHUP).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsConfig {
    /// The certificate chain, leaf first (`--tls-cert`).
    pub cert: std::path::PathBuf,
    /// The private key: PKCS#8, PKCS#1 or SEC1 (`--tls-key`).
    pub key: std::path::PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: DEFAULT_LISTEN
                .parse()
                .expect("DEFAULT_LISTEN is a valid address"),
            cores: default_cores(),
            pin: Pin::Auto,
            auth: AuthMode::Dev,
            max_connections: default_max_connections(),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_outbound_bytes: DEFAULT_MAX_OUTBOUND_BYTES,
            max_outbound_total_bytes: DEFAULT_MAX_OUTBOUND_TOTAL_BYTES,
            read_buffer_bytes: DEFAULT_READ_BUFFER_BYTES,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            max_handshakes_per_ip: DEFAULT_MAX_HANDSHAKES_PER_IP,
            connect_rate_per_ip: DEFAULT_CONNECT_RATE_PER_IP,
            connect_burst_per_ip: DEFAULT_CONNECT_BURST_PER_IP,
            connect_rate_per_user: DEFAULT_CONNECT_RATE_PER_USER,
            connect_burst_per_user: DEFAULT_CONNECT_BURST_PER_USER,
            ping_interval: DEFAULT_PING_INTERVAL,
            ping_timeout: DEFAULT_PING_TIMEOUT,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            inbox_capacity: DEFAULT_INBOX_CAPACITY,
            max_request_header_bytes: DEFAULT_MAX_REQUEST_HEADER_BYTES,
            rate_limit_per_sec: DEFAULT_RATE_LIMIT_PER_SEC,
            rate_limit_burst: DEFAULT_RATE_LIMIT_BURST,
            backplane: None,
            history: HistoryConfig::default(),
            chat_page: true,
            rooms: RoomsConfig::default(),
            hooks: HooksConfig::default(),
            allowed_origins: Origins::Default,
            drain_period: DEFAULT_DRAIN_PERIOD,
            tls: None,
            metrics_listen: None,
        }
    }
}

/// A configuration value that cannot work. The message names the option.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Checks every bound; call before binding. Returns the first problem found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |m: &str| Err(ConfigError(m.to_string()));
        if self.cores == 0 {
            return err("--cores must be at least 1");
        }
        if self.cores > 1024 {
            return err("--cores must be at most 1024");
        }
        if self.max_connections == 0 {
            return err("--max-connections must be at least 1");
        }
        if self.max_message_bytes < 128 {
            return err("--max-message-bytes must be at least 128");
        }
        if self.max_outbound_bytes < 2 * self.max_message_bytes.min(64 * 1024) {
            return err(
                "--max-outbound-bytes must be at least twice the largest message (or 128 KiB)",
            );
        }
        if self.max_outbound_total_bytes < 2 * self.max_message_bytes {
            return err("--max-outbound-total-bytes must be at least twice the largest message");
        }
        let budget = self.history.sender_bytes_per_minute;
        if budget > 0 && budget < 2 * self.max_message_bytes as u64 {
            // One message of the largest size must fit, with its envelope.
            return err(
                "--sender-bytes-per-minute must be 0 or at least twice the largest message",
            );
        }
        if self.read_buffer_bytes < 256 {
            return err("--read-buffer-bytes must be at least 256");
        }
        if self.max_handshakes == 0 || self.max_handshakes_per_ip == 0 {
            return err("--max-handshakes and --max-handshakes-per-ip must be at least 1");
        }
        if self.connect_rate_per_ip > 0 && self.connect_burst_per_ip == 0
            || self.connect_rate_per_user > 0 && self.connect_burst_per_user == 0
        {
            return err("--connect-burst-per-ip and --connect-burst-per-user must be at least 1");
        }
        if self.handshake_timeout.is_zero() {
            return err("--handshake-timeout must be above zero");
        }
        if self.ping_interval.is_zero() || self.ping_timeout.is_zero() {
            return err("--ping-interval and --ping-timeout must be above zero");
        }
        if self.inbox_capacity < 16 {
            return err("--inbox-capacity must be at least 16");
        }
        if self.max_request_header_bytes < 512 {
            return err("--max-request-header-bytes must be at least 512");
        }
        if self.rate_limit_per_sec > 0 && self.rate_limit_burst == 0 {
            return err("--rate-limit-burst must be at least 1 when --rate-limit is on");
        }
        if self.drain_period > MAX_DRAIN_PERIOD {
            return err("--drain-period must be at most 10m");
        }
        if let Some(redis) = &self.backplane {
            redis.validate().map_err(ConfigError)?;
        }
        self.history.validate().map_err(ConfigError)?;
        self.rooms.validate().map_err(ConfigError)?;
        self.hooks.validate().map_err(ConfigError)?;
        if let AuthMode::Jwt { secret, .. } = &self.auth {
            if secret.len() < 16 {
                return err("the JWT secret must be at least 16 bytes");
            }
        }
        Ok(())
    }

    /// Whether history is in force: it is enabled and the deployment supports it. History needs
    /// per-user routing (on one Redis or a Redis Cluster), or no Redis at all; with seed routing
    /// it stays off, and the binary says so at startup.
    pub fn history_active(&self) -> bool {
        self.history.enabled
            && self
                .backplane
                .as_ref()
                .is_none_or(|r| r.routing == Routing::PerUser)
    }

    /// Whether rooms, presence and the device limit are in force: embedded, or per-user routing
    /// (on one Redis or a Redis Cluster: every rooms script touches one hash slot). The seed
    /// format has no room channel; there the room events are unknown events and the binary
    /// says so at startup.
    pub fn rooms_active(&self) -> bool {
        self.backplane
            .as_ref()
            .is_none_or(|r| r.routing == Routing::PerUser)
    }

    /// The idle time after which an open connection that sent nothing is closed.
    pub fn idle_timeout(&self) -> Duration {
        self.ping_interval + self.ping_timeout
    }
}

/// Dev auth runs only when asked for (`asked`: `--dev-auth`) or on a loopback listen address,
/// where no one else can connect; anywhere else the binary refuses to start without a JWT
/// secret. Embedders that build [`AuthMode::Dev`] themselves have asked for it.
pub fn check_dev_auth(config: &Config, asked: bool) -> Result<(), ConfigError> {
    if config.auth != AuthMode::Dev || asked || config.listen.ip().is_loopback() {
        return Ok(());
    }
    Err(ConfigError(format!(
        "no --jwt-secret (SWITCHBOARD_JWT_SECRET) on the non-loopback address {}: set a JWT \
         secret, or pass --dev-auth to run unauthenticated (the token is the user id)",
        config.listen
    )))
}

/// Every CPU this process may run on.
pub fn default_cores() -> usize {
    std::thread::available_parallelism()
        .map(usize::from)
        .unwrap_or(1)
}

/// The open-file limit (raised to its hard maximum first) less [`fd_headroom`].
pub fn default_max_connections() -> usize {
    let limit = raise_nofile_limit();
    limit.saturating_sub(fd_headroom(limit)).max(1) as usize
}

/// Raises the soft open-file limit to the hard one and returns the soft limit in force.
pub fn raise_nofile_limit() -> u64 {
    use rlimit::Resource;
    match Resource::NOFILE.get() {
        Ok((soft, hard)) => {
            if soft < hard && Resource::NOFILE.set(hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Err(_) => 1024,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn auto_pins_round_robin_over_the_allowed_cpus() {
        assert_eq!(Pin::Auto.plan(2, &[0, 1]), vec![Some(0), Some(1)]);
        assert_eq!(Pin::Auto.plan(3, &[4, 5]), vec![Some(4), Some(5), Some(4)]);
        assert_eq!(Pin::Auto.plan(1, &[0, 1]), vec![Some(0)]);
        assert_eq!(Pin::Auto.plan(1, &[]), vec![None]);
        assert_eq!(Pin::Off.plan(2, &[0, 1]), vec![None, None]);
        assert_eq!(Pin::Cpus(vec![1]).plan(2, &[0, 1]), vec![Some(1), Some(1)]);
    }

    #[test]
    fn pin_parses_auto_off_and_lists() {
        assert_eq!("auto".parse::<Pin>(), Ok(Pin::Auto));
        assert_eq!("off".parse::<Pin>(), Ok(Pin::Off));
        assert_eq!("1, 3".parse::<Pin>(), Ok(Pin::Cpus(vec![1, 3])));
        assert!("".parse::<Pin>().is_err());
        assert!("1,x".parse::<Pin>().is_err());
    }

    #[test]
    fn zero_cores_is_rejected() {
        let cfg = Config {
            cores: 0,
            ..Config::default()
        };
        assert!(cfg.validate().unwrap_err().0.contains("--cores"));
    }

    #[test]
    fn short_jwt_secret_is_rejected() {
        let cfg = Config {
            auth: AuthMode::Jwt {
                secret: "short".into(),
                audience: None,
                issuer: None,
                leeway: DEFAULT_JWT_LEEWAY,
            },
            ..Config::default()
        };
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn dev_auth_needs_loopback_or_asking() {
        let mut cfg = Config::default();
        assert!(check_dev_auth(&cfg, false).is_ok(), "loopback");
        cfg.listen = "0.0.0.0:8080".parse().unwrap();
        let refused = check_dev_auth(&cfg, false).unwrap_err().0;
        assert!(refused.contains("--jwt-secret") && refused.contains("--dev-auth"));
        assert!(check_dev_auth(&cfg, true).is_ok(), "asked for");
        cfg.listen = "[::1]:8080".parse().unwrap();
        assert!(check_dev_auth(&cfg, false).is_ok(), "IPv6 loopback");
        cfg.listen = "0.0.0.0:8080".parse().unwrap();
        cfg.auth = AuthMode::Jwt {
            secret: "0123456789abcdef".into(),
            audience: None,
            issuer: None,
            leeway: DEFAULT_JWT_LEEWAY,
        };
        assert!(check_dev_auth(&cfg, false).is_ok(), "JWT on any address");
    }

    #[test]
    fn history_is_active_only_where_supported() {
        let mut cfg = Config::default();
        cfg.history.enabled = true;
        assert!(cfg.history_active(), "embedded");
        cfg.backplane = Some(RedisConfig::new("redis://127.0.0.1:6379"));
        assert!(cfg.history_active(), "per-user routing");
        let mut seed = RedisConfig::new("redis://127.0.0.1:6379");
        seed.routing = Routing::Seed;
        cfg.backplane = Some(seed);
        assert!(!cfg.history_active(), "seed routing");
        let mut cluster = RedisConfig::new("redis://127.0.0.1:6379");
        cluster.cluster = vec!["127.0.0.1:7000".into()];
        cfg.backplane = Some(cluster);
        assert!(cfg.history_active(), "cluster, per-user routing");
        assert!(cfg.rooms_active(), "rooms on a cluster too");
        cfg.history.max_len = 0;
        assert!(cfg.validate().unwrap_err().0.contains("--history-max-len"));
    }

    #[test]
    fn wait_replicas_needs_a_cluster_and_a_short_timeout() {
        let mut one = RedisConfig::new("redis://127.0.0.1:6379");
        one.wait_replicas = 1;
        assert!(one.validate().unwrap_err().contains("--redis-cluster"));
        one.cluster = vec!["127.0.0.1:7000".into()];
        assert!(one.validate().is_ok());
        one.wait_timeout = Duration::from_secs(2);
        assert!(one.validate().unwrap_err().contains("--redis-wait-timeout"));
    }

    #[test]
    fn max_connections_leaves_headroom() {
        let limit = raise_nofile_limit();
        assert_eq!(
            default_max_connections() as u64,
            limit.saturating_sub(fd_headroom(limit)).max(1)
        );
        assert_eq!(fd_headroom(20_000), FD_HEADROOM);
        assert_eq!(fd_headroom(256), 64);
    }
}
