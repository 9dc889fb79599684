//! Redis backplane settings: the server or cluster, the routing, and the publisher's bounds.
//!
//! How the backplane connects with them (topology, node URLs) is in `backplane`.

use std::time::Duration;

/// Publications held while Redis is slow or down before the oldest are dropped.
pub const DEFAULT_PUBLISH_QUEUE: usize = 100_000;
/// First reconnect delay; doubled per failure up to the maximum, with jitter.
pub const DEFAULT_RECONNECT_MIN: Duration = Duration::from_millis(100);
/// Longest delay between reconnect attempts.
pub const DEFAULT_RECONNECT_MAX: Duration = Duration::from_secs(2);
/// Default [`RedisConfig::publish_batch_window`]: none, a write per loop turn.
pub const DEFAULT_PUBLISH_BATCH_WINDOW: Duration = Duration::ZERO;
/// Default [`RedisConfig::publish_pace`]: none, a write per loop turn.
pub const DEFAULT_PUBLISH_PACE: Duration = Duration::ZERO;
/// Default [`RedisConfig::wait_replicas`]: acknowledge once the primary has the message.
pub const DEFAULT_WAIT_REPLICAS: u32 = 0;
/// Default [`RedisConfig::wait_timeout`].
pub const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_millis(100);
/// Channel-name prefix for per-user routing.
pub const DEFAULT_CHANNEL_PREFIX: &str = "switchboard";

/// How dispatches are routed between instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// A channel per user; an instance subscribes only to the users it hosts.
    PerUser,
    /// The original Node.js design's single channel and payload, for mixed fleets.
    Seed,
}

/// Redis backplane settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`.
    pub url: String,
    /// Routing mode.
    pub routing: Routing,
    /// Bound of the publication queue.
    pub publish_queue: usize,
    /// Reconnect backoff bounds.
    pub reconnect_min: Duration,
    /// Reconnect backoff bounds.
    pub reconnect_max: Duration,
    /// How long a core holds its first unwritten publication so that more can share the write
    /// (and Redis's replies and pub/sub writes with it); zero writes at the end of every loop
    /// turn. Only for the cores' own links (per-user routing on one Redis).
    pub publish_batch_window: Duration,
    /// The shortest time between two writes of a core's link: a publication after a quiet
    /// spell is written at once; those that come within this time of the last write wait for
    /// it to pass and share the next write. Under load, one write (and one Redis read, reply
    /// and pub/sub write per instance) per pace instead of per message, for at most this much
    /// latency; when messages are further apart than this, no latency at all. Zero writes at
    /// the end of every loop turn. Only for the cores' own links.
    pub publish_pace: Duration,
    /// Per-user channel prefix (`{prefix}:u:{user}`).
    pub channel_prefix: String,
    /// On a Redis Cluster with history on: replicas that must have a message (Redis `WAIT`,
    /// after each shard's appends) before its ack goes out (`--redis-wait-replicas`); one that
    /// did not reach them within `wait_timeout` is answered `unavailable` (it is stored on the
    /// primary: a resend with its `clientId` is recognised). 0 = no `WAIT`.
    pub wait_replicas: u32,
    /// How long `WAIT` waits for the replicas (`--redis-wait-timeout`).
    pub wait_timeout: Duration,
    /// Redis Cluster seed nodes (`host:port`). When set, per-user channels use sharded pub/sub
    /// (`SPUBLISH`/`SSUBSCRIBE`) on the primary owning each channel's slot, and `url` is unused.
    pub cluster: Vec<String>,

    // TLS and Sentinel (operations).
    /// PEM file of the CA(s) that signed Redis's certificate, for a `rediss://` URL; without
    /// it the system's trusted roots are used (`--redis-ca-cert`).
    pub ca_cert: Option<std::path::PathBuf>,
    /// Redis Sentinel addresses (`host:port`, `--redis-sentinel`): when set, the master is
    /// the one they name [`RedisConfig::sentinel_master`], asked at start and after every
    /// failure, and only the credentials and database of `url` are used.
    pub sentinels: Vec<String>,
    /// The master's name in Sentinel (`--redis-sentinel-master`).
    pub sentinel_master: Option<String>,
    /// The password the sentinels ask for (`AUTH`, `--redis-sentinel-password`); Redis's own
    /// is in `url`.
    pub sentinel_password: Option<String>,
}

impl RedisConfig {
    /// Defaults for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig {
            url: url.into(),
            routing: Routing::PerUser,
            publish_queue: DEFAULT_PUBLISH_QUEUE,
            reconnect_min: DEFAULT_RECONNECT_MIN,
            reconnect_max: DEFAULT_RECONNECT_MAX,
            publish_batch_window: DEFAULT_PUBLISH_BATCH_WINDOW,
            publish_pace: DEFAULT_PUBLISH_PACE,
            channel_prefix: DEFAULT_CHANNEL_PREFIX.to_string(),
            wait_replicas: DEFAULT_WAIT_REPLICAS,
            wait_timeout: DEFAULT_WAIT_TIMEOUT,
            cluster: Vec::new(),
            ca_cert: None,
            sentinels: Vec::new(),
            sentinel_master: None,
            sentinel_password: None,
        }
    }

    /// Whether the URL asks for TLS (`rediss://`).
    pub fn tls(&self) -> bool {
        self.url.starts_with("rediss://")
    }

    /// The `--redis-ca-cert` file's PEM bytes, checked to hold at least one certificate.
    pub fn ca_pem(&self) -> Result<Option<Vec<u8>>, String> {
        use rustls::pki_types::pem::PemObject;
        let Some(path) = &self.ca_cert else {
            return Ok(None);
        };
        let pem = std::fs::read(path).map_err(|e| e.to_string())?;
        let certs = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        if certs.is_empty() {
            return Err("no PEM certificate in it".into());
        }
        Ok(Some(pem))
    }

    /// Whether sharded pub/sub on a Redis Cluster is used.
    pub fn sharded(&self) -> bool {
        !self.cluster.is_empty() && self.routing == Routing::PerUser
    }

    /// Checks the URL and bounds.
    pub fn validate(&self) -> Result<(), String> {
        use redis::IntoConnectionInfo;
        let info = self
            .url
            .as_str()
            .into_connection_info()
            .map_err(|e| format!("--redis-url: {e}"))?;
        match info.addr() {
            redis::ConnectionAddr::Tcp(..) => {
                if self.ca_cert.is_some() {
                    return Err("--redis-ca-cert needs a rediss:// --redis-url".into());
                }
            }
            redis::ConnectionAddr::TcpTls { insecure: true, .. } => {
                return Err(
                    "--redis-url: rediss:// without certificate checks (#insecure) \
                     is not supported; give the CA with --redis-ca-cert"
                        .into(),
                );
            }
            redis::ConnectionAddr::TcpTls { .. } => {}
            _ => return Err("--redis-url: only redis:// and rediss:// URLs are supported".into()),
        }
        match (self.sentinels.is_empty(), &self.sentinel_master) {
            (true, Some(_)) => return Err("--redis-sentinel-master needs --redis-sentinel".into()),
            (false, None) => return Err("--redis-sentinel needs --redis-sentinel-master".into()),
            (false, Some(_)) if !self.cluster.is_empty() => {
                return Err("--redis-sentinel and --redis-cluster exclude each other".into())
            }
            _ => {}
        }
        if self.sentinel_password.is_some() && self.sentinels.is_empty() {
            return Err("--redis-sentinel-password needs --redis-sentinel".into());
        }
        for node in &self.sentinels {
            if !is_host_port(node) {
                return Err(format!("--redis-sentinel: {node:?} is not host:port"));
            }
        }
        if let Some(path) = &self.ca_cert {
            self.ca_pem()
                .map_err(|e| format!("--redis-ca-cert {}: {e}", path.display()))?;
        }
        if self.publish_queue == 0 {
            return Err("--publish-queue must be at least 1".into());
        }
        if self.publish_batch_window > Duration::from_millis(100) {
            return Err("--publish-batch-window must be at most 100ms".into());
        }
        if self.publish_pace > Duration::from_millis(100) {
            return Err("--publish-pace must be at most 100ms".into());
        }
        if self.wait_replicas > 0 && !self.sharded() {
            return Err(
                "--redis-wait-replicas needs --redis-cluster with per-user routing (the \
                 cores' own links to one Redis do not WAIT yet)"
                    .into(),
            );
        }
        // Below the publisher's 2 s read timeout, which would take a slow WAIT for a dead link.
        if self.wait_timeout.is_zero() || self.wait_timeout > Duration::from_secs(1) {
            return Err("--redis-wait-timeout must be above zero and at most 1s".into());
        }
        if self.reconnect_min.is_zero() || self.reconnect_max < self.reconnect_min {
            return Err("reconnect backoff: min must be above zero and at most max".into());
        }
        for node in &self.cluster {
            if !is_host_port(node) {
                return Err(format!("--redis-cluster: {node:?} is not host:port"));
            }
        }
        // Braces would change the Redis Cluster hash tags the key names rely on.
        if self.channel_prefix.is_empty() || self.channel_prefix.contains([':', '{', '}']) {
            return Err("--redis-prefix must be non-empty and contain no ':', '{' or '}'".into());
        }
        Ok(())
    }
}

fn is_host_port(node: &str) -> bool {
    node.rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
}
