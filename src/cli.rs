//! The `switchboard` binary's command line: every flag (also read from the environment and the
//! `--config` file), its parsers, and the mapping onto the library's `Config`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use switchboard::backplane::{self, RedisConfig, Routing};
use switchboard::config::{self, hooks, AuthMode, Config};
use switchboard::history;
use switchboard::rooms;

/// Real-time WebSocket messaging server: one event loop per CPU core.
///
/// Clients connect to ws://ADDR/ws?token=TOKEN. Plain HTTP on the same port: a chat page at
/// GET /, GET /healthz, GET /readyz and GET /metrics. Durations take a unit: 500ms, 10s, 2m (a bare
/// number is seconds). Every flag can also be set by its environment variable or by a key of the
/// same name in the --config file (flag > environment > file).
#[derive(Parser, Debug)]
#[command(name = "switchboard", version)]
pub(crate) struct Cli {
    /// Address every core listens on (SO_REUSEPORT). Port 0 picks a free port.
    #[arg(long, env = "SWITCHBOARD_LISTEN", default_value = config::DEFAULT_LISTEN)]
    pub(crate) listen: SocketAddr,

    /// Event-loop threads, one pinned per CPU [default: every CPU this process may use]
    #[arg(long, env = "SWITCHBOARD_CORES")]
    pub(crate) cores: Option<usize>,

    /// CPUs for the core threads: `auto` pins core k to the k-th CPU this process may use;
    /// `off`; or CPU ids like `0,2` (core k on the k-th, round robin). Several instances on one
    /// machine: give each its own list.
    #[arg(long, env = "SWITCHBOARD_PIN", default_value = "auto")]
    pub(crate) pin: config::Pin,

    /// HS256 secret: enables JWT auth (user id = `sub`, `exp` required). Without it the server
    /// starts only with `--dev-auth` or on a loopback `--listen` address.
    #[arg(long, env = "SWITCHBOARD_JWT_SECRET", hide_env_values = true)]
    pub(crate) jwt_secret: Option<String>,

    /// Dev auth (the token is the user id, unverified) without a JWT secret on any address; on a
    /// loopback `--listen` address it is the default without `--jwt-secret`.
    #[arg(long, env = "SWITCHBOARD_DEV_AUTH")]
    pub(crate) dev_auth: bool,

    /// Required JWT `aud` claim (JWT mode).
    #[arg(long, env = "SWITCHBOARD_JWT_AUDIENCE")]
    pub(crate) jwt_audience: Option<String>,

    /// Required JWT `iss` claim (JWT mode).
    #[arg(long, env = "SWITCHBOARD_JWT_ISSUER")]
    pub(crate) jwt_issuer: Option<String>,

    /// Clock-skew allowance for JWT `exp`/`nbf`.
    #[arg(long, env = "SWITCHBOARD_JWT_LEEWAY", default_value = "30s", value_parser = parse_duration)]
    pub(crate) jwt_leeway: Duration,

    /// Open WebSocket connections per process; past it, HTTP 503
    /// [default: open-file limit - 512]
    #[arg(long, env = "SWITCHBOARD_MAX_CONNECTIONS")]
    pub(crate) max_connections: Option<usize>,

    /// Largest client message (and frame) in bytes; past it, close 1009.
    #[arg(long, env = "SWITCHBOARD_MAX_MESSAGE_BYTES", default_value_t = config::DEFAULT_MAX_MESSAGE_BYTES)]
    pub(crate) max_message_bytes: usize,

    /// Outbound bytes buffered per connection before closing it as a slow consumer (4008).
    #[arg(long, env = "SWITCHBOARD_MAX_OUTBOUND_BYTES", default_value_t = config::DEFAULT_MAX_OUTBOUND_BYTES)]
    pub(crate) max_outbound_bytes: usize,

    /// Outbound bytes buffered for all connections together; past it the connections holding
    /// the most are closed as slow consumers (4008), biggest first.
    #[arg(long, env = "SWITCHBOARD_MAX_OUTBOUND_TOTAL_BYTES", default_value_t = config::DEFAULT_MAX_OUTBOUND_TOTAL_BYTES)]
    pub(crate) max_outbound_total_bytes: usize,

    /// Per-connection read buffer in bytes (the main cost of an idle connection).
    #[arg(long, env = "SWITCHBOARD_READ_BUFFER_BYTES", default_value_t = config::DEFAULT_READ_BUFFER_BYTES)]
    pub(crate) read_buffer_bytes: usize,

    /// Time a client has to send its HTTP upgrade request.
    #[arg(long, env = "SWITCHBOARD_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub(crate) handshake_timeout: Duration,

    /// Handshakes in progress in the process (sockets not authenticated yet: a request head
    /// still coming, a Socket.IO connection before its CONNECT); past it the oldest are dropped.
    #[arg(long, env = "SWITCHBOARD_MAX_HANDSHAKES", default_value_t = config::DEFAULT_MAX_HANDSHAKES)]
    pub(crate) max_handshakes: usize,

    /// Handshakes in progress from one source address; past it its new sockets are dropped.
    #[arg(long, env = "SWITCHBOARD_MAX_HANDSHAKES_PER_IP", default_value_t = config::DEFAULT_MAX_HANDSHAKES_PER_IP)]
    pub(crate) max_handshakes_per_ip: u32,

    /// WebSocket upgrades per second from one source address, before the token is checked;
    /// past it, HTTP 429. 0 = no limit.
    #[arg(long, env = "SWITCHBOARD_CONNECT_RATE_PER_IP", default_value_t = config::DEFAULT_CONNECT_RATE_PER_IP)]
    pub(crate) connect_rate_per_ip: u32,

    /// Upgrades from one source address allowed in a burst above its rate.
    #[arg(long, env = "SWITCHBOARD_CONNECT_BURST_PER_IP", default_value_t = config::DEFAULT_CONNECT_BURST_PER_IP)]
    pub(crate) connect_burst_per_ip: u32,

    /// Connections per second one user may open on this instance; past it, HTTP 429 (Socket.IO:
    /// a CONNECT_ERROR). 0 = no limit.
    #[arg(long, env = "SWITCHBOARD_CONNECT_RATE_PER_USER", default_value_t = config::DEFAULT_CONNECT_RATE_PER_USER)]
    pub(crate) connect_rate_per_user: u32,

    /// Connections of one user allowed in a burst above its rate.
    #[arg(long, env = "SWITCHBOARD_CONNECT_BURST_PER_USER", default_value_t = config::DEFAULT_CONNECT_BURST_PER_USER)]
    pub(crate) connect_burst_per_user: u32,

    /// Interval between server pings.
    #[arg(long, env = "SWITCHBOARD_PING_INTERVAL", default_value = "25s", value_parser = parse_duration)]
    pub(crate) ping_interval: Duration,

    /// Extra silence tolerated after a ping interval before closing (4000).
    #[arg(long, env = "SWITCHBOARD_PING_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub(crate) ping_timeout: Duration,

    /// Graceful-shutdown deadline after SIGTERM/SIGINT.
    #[arg(long, env = "SWITCHBOARD_SHUTDOWN_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub(crate) shutdown_timeout: Duration,

    /// Dispatches each core's cross-core inbox holds before dropping (and counting) new ones.
    #[arg(long, env = "SWITCHBOARD_INBOX_CAPACITY", default_value_t = config::DEFAULT_INBOX_CAPACITY)]
    pub(crate) inbox_capacity: usize,

    /// Largest HTTP request head in bytes; past it, HTTP 431.
    #[arg(long, env = "SWITCHBOARD_MAX_REQUEST_HEADER_BYTES", default_value_t = config::DEFAULT_MAX_REQUEST_HEADER_BYTES)]
    pub(crate) max_request_header_bytes: usize,

    /// Text frames a connection may send per second on average; 0 turns the limit off. Frames
    /// past it get a `rate_limited` error and are dropped.
    #[arg(long, env = "SWITCHBOARD_RATE_LIMIT", default_value_t = config::DEFAULT_RATE_LIMIT_PER_SEC)]
    pub(crate) rate_limit: u32,

    /// Burst above the rate; a connection that has this many frames refused in a row is closed
    /// with 1008.
    #[arg(long, env = "SWITCHBOARD_RATE_LIMIT_BURST", default_value_t = config::DEFAULT_RATE_LIMIT_BURST)]
    pub(crate) rate_limit_burst: u32,

    /// Where dispatches for other instances go: `none` (one instance, in-process) or `redis`.
    #[arg(long, env = "SWITCHBOARD_BACKPLANE", value_enum, default_value_t = BackplaneKind::None)]
    pub(crate) backplane: BackplaneKind,

    /// Redis URL for `--backplane redis`: redis://[user:password@]host:port.
    #[arg(
        long,
        env = "SWITCHBOARD_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub(crate) redis_url: String,

    /// Cross-instance routing: `per-user` (a channel per user, subscribed only where the user
    /// is connected) or `seed` (the original Node.js design's single channel and payload).
    #[arg(long, env = "SWITCHBOARD_ROUTING", value_enum, default_value_t = RoutingKind::PerUser)]
    pub(crate) routing: RoutingKind,

    /// Publications held while Redis is slow or down; past it the oldest are dropped (counted).
    #[arg(long, env = "SWITCHBOARD_PUBLISH_QUEUE", default_value_t = backplane::DEFAULT_PUBLISH_QUEUE)]
    pub(crate) publish_queue: usize,

    /// How long a core holds its first unwritten publication so more share one write to Redis
    /// (fewer wake-ups per message under load, at that much latency); 0 = a write per loop turn.
    #[arg(long, env = "SWITCHBOARD_PUBLISH_BATCH_WINDOW", default_value = "0ms", value_parser = parse_duration)]
    pub(crate) publish_batch_window: Duration,

    /// Shortest time between two writes of a core's link to Redis: a publication after a quiet
    /// spell goes at once, later ones within this time of the last write share the next write
    /// (fewer wake-ups under load, no latency at low rates); 0 = a write per loop turn.
    #[arg(long, env = "SWITCHBOARD_PUBLISH_PACE", default_value = "0ms", value_parser = parse_duration)]
    pub(crate) publish_pace: Duration,

    /// Longest delay between Redis reconnect attempts (backoff starts at 100ms, with jitter).
    #[arg(long, env = "SWITCHBOARD_REDIS_RECONNECT_MAX", default_value = "2s", value_parser = parse_duration)]
    pub(crate) redis_reconnect_max: Duration,

    /// Redis Cluster seed nodes, `host:port,host:port,...`: per-user channels then use sharded
    /// pub/sub (SPUBLISH/SSUBSCRIBE, Redis 7) on the shard owning each channel's slot.
    #[arg(long, env = "SWITCHBOARD_REDIS_CLUSTER", value_delimiter = ',')]
    pub(crate) redis_cluster: Vec<String>,

    /// With --redis-cluster and history on: replicas that must have a message (Redis WAIT)
    /// before it is acknowledged; one not copied in time is answered `unavailable`. 0 = no WAIT.
    #[arg(long, env = "SWITCHBOARD_REDIS_WAIT_REPLICAS", default_value_t = backplane::DEFAULT_WAIT_REPLICAS)]
    pub(crate) redis_wait_replicas: u32,

    /// How long WAIT waits for --redis-wait-replicas replicas.
    #[arg(long, env = "SWITCHBOARD_REDIS_WAIT_TIMEOUT", default_value = "100ms", value_parser = parse_duration)]
    pub(crate) redis_wait_timeout: Duration,

    /// Prefix of per-user channels: `{prefix}:u:{user}`.
    #[arg(long, env = "SWITCHBOARD_REDIS_PREFIX", default_value = backplane::DEFAULT_CHANNEL_PREFIX)]
    pub(crate) redis_prefix: String,

    /// Offsets, per-user history and resume (`?since=`): `on` or `off`. Applies to embedded mode
    /// and per-user Redis routing (also on `--redis-cluster`); with `--routing seed` it stays off.
    #[arg(long, env = "SWITCHBOARD_HISTORY", value_enum, default_value_t = OnOff::On)]
    pub(crate) history: OnOff,

    /// Events kept per user.
    #[arg(long, env = "SWITCHBOARD_HISTORY_MAX_LEN", default_value_t = history::DEFAULT_MAX_LEN)]
    pub(crate) history_max_len: usize,

    /// How long events are kept (ms, s, m or h).
    #[arg(long, env = "SWITCHBOARD_HISTORY_MAX_AGE", default_value = "24h", value_parser = parse_duration)]
    pub(crate) history_max_age: Duration,

    /// Largest page of `GET /api/history` and of the `history` event.
    #[arg(long, env = "SWITCHBOARD_HISTORY_MAX_PAGE", default_value_t = history::DEFAULT_MAX_PAGE)]
    pub(crate) history_max_page: usize,

    /// Threads reading history from Redis (replays, pages, `POST /api/publish`); they serve
    /// users in turn, not first come first served.
    #[arg(long, env = "SWITCHBOARD_HISTORY_WORKERS", default_value_t = config::history::DEFAULT_HISTORY_WORKERS)]
    pub(crate) history_workers: usize,

    /// History reads (replays and pages) of one user run at once; the rest wait their turn.
    #[arg(long, env = "SWITCHBOARD_HISTORY_READS_PER_USER", default_value_t = config::history::DEFAULT_READS_PER_USER)]
    pub(crate) history_reads_per_user: usize,

    /// History reads of one user waiting for a worker; past it a replay answers `complete:
    /// false` and a page is refused (`rate_limited`, HTTP 429).
    #[arg(long, env = "SWITCHBOARD_HISTORY_READ_QUEUE_PER_USER", default_value_t = config::history::DEFAULT_READ_QUEUE_PER_USER)]
    pub(crate) history_read_queue_per_user: usize,

    /// `GET /api/history` requests per second per user (per token's user; the API key's reads
    /// count for the user they name); past it, HTTP 429 with Retry-After. 0 = no limit.
    #[arg(long, env = "SWITCHBOARD_API_HISTORY_RATE", default_value_t = config::history::DEFAULT_API_HISTORY_RATE)]
    pub(crate) api_history_rate: u32,

    /// `GET /api/history` requests of one user allowed in a burst above its rate.
    #[arg(long, env = "SWITCHBOARD_API_HISTORY_BURST", default_value_t = config::history::DEFAULT_API_HISTORY_BURST)]
    pub(crate) api_history_burst: u32,

    /// How long a `sendMessage` `clientId` is remembered per recipient, so a resend of an
    /// unacknowledged message is stored once (ms, s, m or h).
    #[arg(long, env = "SWITCHBOARD_DEDUPE_WINDOW", default_value = "5m", value_parser = parse_duration)]
    pub(crate) dedupe_window: Duration,

    /// Embedded mode: bytes all users' histories may hold together (frames plus a fixed cost
    /// per event and per user); past it the largest users' oldest events are evicted.
    #[arg(long, env = "SWITCHBOARD_HISTORY_MAX_TOTAL_BYTES", default_value_t = history::DEFAULT_MAX_TOTAL_BYTES)]
    pub(crate) history_max_total_bytes: usize,

    /// Bytes one user's sends may store in other users' histories per minute on this instance
    /// (each recipient's copy, plus 256 per copy); past it the send is refused with
    /// `quota_exceeded` and nothing is stored or delivered. 0 = no limit.
    #[arg(long, env = "SWITCHBOARD_SENDER_BYTES_PER_MINUTE", default_value_t = history::DEFAULT_SENDER_BYTES_PER_MINUTE)]
    pub(crate) sender_bytes_per_minute: u64,

    /// Key for `POST /api/publish` (`Authorization: Bearer <key>`); without it the route is off.
    #[arg(long, env = "SWITCHBOARD_API_KEY", hide_env_values = true)]
    pub(crate) api_key: Option<String>,

    /// The chat page at `GET /` (a browser client of the protocol): `on` or `off` (then 404).
    #[arg(long, env = "SWITCHBOARD_CHAT_PAGE", value_enum, default_value_t = OnOff::On)]
    pub(crate) chat_page: OnOff,
    /// Rooms one user may be in; past it `joinRoom` gets `room_limit`.
    #[arg(long, env = "SWITCHBOARD_MAX_ROOMS_PER_USER", default_value_t = rooms::DEFAULT_MAX_ROOMS_PER_USER)]
    pub(crate) max_rooms_per_user: usize,

    /// Members one room may have; past it `joinRoom` gets `room_full`.
    #[arg(long, env = "SWITCHBOARD_MAX_ROOM_MEMBERS", default_value_t = rooms::DEFAULT_MAX_ROOM_MEMBERS)]
    pub(crate) max_room_members: usize,

    /// Longest room name in bytes (names use A-Z a-z 0-9 _ - . :); longer is `bad_room`.
    #[arg(long, env = "SWITCHBOARD_MAX_ROOM_NAME_BYTES", default_value_t = rooms::DEFAULT_MAX_ROOM_NAME_BYTES)]
    pub(crate) max_room_name_bytes: usize,

    /// Connections one user may hold across the cluster; with Redis the newest wins (the oldest
    /// is closed with 4009), embedded the one over it is closed with 4009. 0 = no limit.
    #[arg(long, env = "SWITCHBOARD_MAX_DEVICES", default_value_t = rooms::DEFAULT_MAX_DEVICES)]
    pub(crate) max_devices: u32,

    /// How long an instance that stopped refreshing its presence heartbeat (killed, hung)
    /// still counts as alive; its users go offline within about 4/3 of this.
    #[arg(long, env = "SWITCHBOARD_PRESENCE_TTL", default_value = "30s", value_parser = parse_duration)]
    pub(crate) presence_ttl: Duration,

    /// The application backend's hooks: `POST BASE/connect`, `BASE/join`, `BASE/publish`
    /// (http:// only). Without it, no hooks.
    #[arg(long, env = "SWITCHBOARD_HOOK_URL")]
    pub(crate) hook_url: Option<String>,

    /// How long one hook call may take; past it the call failed.
    #[arg(long, env = "SWITCHBOARD_HOOK_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub(crate) hook_timeout: Duration,

    /// Hook calls in flight at once (worker threads).
    #[arg(long, env = "SWITCHBOARD_HOOK_CONCURRENCY", default_value_t = hooks::DEFAULT_HOOK_CONCURRENCY)]
    pub(crate) hook_concurrency: usize,

    /// Hook calls waiting per worker; a call past it fails at once.
    #[arg(long, env = "SWITCHBOARD_HOOK_QUEUE", default_value_t = hooks::DEFAULT_HOOK_QUEUE)]
    pub(crate) hook_queue: usize,

    /// A failed hook call allows the request instead of refusing it (default: fail closed).
    #[arg(long, env = "SWITCHBOARD_HOOK_FAIL_OPEN")]
    pub(crate) hook_fail_open: bool,

    /// Browser origins allowed to open WebSockets and read `/api` answers (CORS): `*` or a
    /// comma-separated list like https://app.example.com. Default: dev mode any origin, JWT
    /// mode the server's own origin only.
    #[arg(long, env = "SWITCHBOARD_ALLOWED_ORIGINS", default_value = "")]
    pub(crate) allowed_origins: hooks::Origins,

    /// Room requests (join, leave, send, presence) waiting for the Redis rooms worker; past it
    /// new ones get an `internal` error `rooms busy` at once.
    #[arg(long, env = "SWITCHBOARD_MAX_ROOM_QUEUE", default_value_t = rooms::DEFAULT_MAX_ROOM_QUEUE)]
    pub(crate) max_room_queue: usize,

    /// A user's presence changes within this long after one was announced are coalesced into
    /// at most one `presenceChanged` at its end, embedded and with Redis (0 = announce every
    /// change).
    #[arg(long, env = "SWITCHBOARD_PRESENCE_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub(crate) presence_interval: Duration,

    /// Messages kept per room (a room message is stored once, in the room's history).
    #[arg(long, env = "SWITCHBOARD_ROOM_HISTORY_MAX_LEN", default_value_t = rooms::DEFAULT_ROOM_HISTORY_MAX_LEN)]
    pub(crate) room_history_max_len: usize,

    /// How long room messages are kept (ms, s, m or h).
    #[arg(long, env = "SWITCHBOARD_ROOM_HISTORY_MAX_AGE", default_value = "24h", value_parser = parse_duration)]
    pub(crate) room_history_max_age: Duration,

    /// Bytes of messages kept per room; the oldest go first (the newest is always kept).
    #[arg(long, env = "SWITCHBOARD_ROOM_HISTORY_MAX_BYTES", default_value_t = rooms::DEFAULT_ROOM_HISTORY_MAX_BYTES)]
    pub(crate) room_history_max_bytes: usize,

    // ---- Operations: drain, TLS, logs, metrics, config file (issue 18) ----
    /// SIGTERM/SIGINT drain: /readyz fails at once, new upgrades get 503, and open connections
    /// are closed with 1001 in batches spread over this period; a second signal closes the rest
    /// at once. 0 closes them all at once.
    #[arg(long, env = "SWITCHBOARD_DRAIN_PERIOD", default_value = "5s", value_parser = parse_duration)]
    pub(crate) drain_period: Duration,

    /// PEM certificate chain: the listen port then serves wss:// and https:// (TLS 1.2 and 1.3).
    /// SIGHUP reloads it (and the key) for new connections.
    #[arg(long, env = "SWITCHBOARD_TLS_CERT")]
    pub(crate) tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "SWITCHBOARD_TLS_KEY")]
    pub(crate) tls_key: Option<PathBuf>,

    /// Serve /metrics (with /healthz and /readyz) on this second address, plain HTTP, and no
    /// longer on the public port. Keep it on an internal interface.
    #[arg(long, env = "SWITCHBOARD_METRICS_LISTEN")]
    pub(crate) metrics_listen: Option<SocketAddr>,

    /// PEM file of the CA that signed Redis's certificate, for a rediss:// --redis-url (every
    /// connection to Redis then uses TLS with it); without it, the system's trusted roots.
    #[arg(long, env = "SWITCHBOARD_REDIS_CA_CERT")]
    pub(crate) redis_ca_cert: Option<PathBuf>,

    /// Redis Sentinel addresses, host:port,host:port,...: connections go to the master they
    /// name (asked at start and every 500ms), so a failover moves them; --redis-url then gives
    /// only the credentials and database.
    #[arg(long, env = "SWITCHBOARD_REDIS_SENTINEL", value_delimiter = ',')]
    pub(crate) redis_sentinel: Vec<String>,

    /// The master's name in Sentinel (`sentinel monitor NAME ...`).
    #[arg(long, env = "SWITCHBOARD_REDIS_SENTINEL_MASTER")]
    pub(crate) redis_sentinel_master: Option<String>,

    /// The password the sentinels ask for (their `requirepass`), sent as AUTH to each; Redis's
    /// own password stays in --redis-url.
    #[arg(
        long,
        env = "SWITCHBOARD_REDIS_SENTINEL_PASSWORD",
        hide_env_values = true
    )]
    pub(crate) redis_sentinel_password: Option<String>,

    /// A TOML file of settings, one key per flag with the flag's name (`listen =
    /// "0.0.0.0:8080"`, `cores = 2`, `redis-url = "redis://..."`); flags and environment
    /// variables override it.
    #[arg(long, env = "SWITCHBOARD_CONFIG")]
    pub(crate) config: Option<PathBuf>,

    /// Log level: off, error, warn, info, debug or trace, optionally per module
    /// (`info,switchboard::backplane=debug`); anything else is an error. RUST_LOG, when set,
    /// overrides it (and is checked the same way).
    #[arg(long, env = "SWITCHBOARD_LOG", default_value = "info", value_parser = parse_log_level)]
    pub(crate) log_level: String,

    /// Log lines as `text` or `json` (one object a line: ts, level, target, msg).
    #[arg(long, env = "SWITCHBOARD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub(crate) log_format: LogFormat,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

/// Checks a log filter: comma-separated directives, each a level or `module=level`.
pub(crate) fn parse_log_level(s: &str) -> Result<String, String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    for directive in s.split(',').map(str::trim) {
        let level = directive.rsplit_once('=').map_or(directive, |(_, l)| l);
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "unknown log level {level:?} in {s:?}: use off, error, warn, info, debug or \
                 trace, optionally as module=level"
            ));
        }
    }
    Ok(s.to_string())
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BackplaneKind {
    None,
    Redis,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OnOff {
    On,
    Off,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RoutingKind {
    PerUser,
    Seed,
}

/// Parses `500ms`, `10s`, `2m` or a bare number of seconds.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (try 500ms, 10s, 2m)"))?;
    match unit {
        "us" => Ok(Duration::from_micros(n)),
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!(
            "invalid duration unit in {s:?} (use us, ms, s, m or h)"
        )),
    }
}

impl Cli {
    pub(crate) fn into_config(self) -> Config {
        let defaults = Config::default();
        let auth = match self.jwt_secret {
            Some(secret) => AuthMode::Jwt {
                secret,
                audience: self.jwt_audience,
                issuer: self.jwt_issuer,
                leeway: self.jwt_leeway,
            },
            None => AuthMode::Dev,
        };
        Config {
            listen: self.listen,
            cores: self.cores.unwrap_or(defaults.cores),
            pin: self.pin.clone(),
            auth,
            max_connections: self.max_connections.unwrap_or(defaults.max_connections),
            max_message_bytes: self.max_message_bytes,
            max_outbound_bytes: self.max_outbound_bytes,
            max_outbound_total_bytes: self.max_outbound_total_bytes,
            read_buffer_bytes: self.read_buffer_bytes,
            handshake_timeout: self.handshake_timeout,
            max_handshakes: self.max_handshakes,
            max_handshakes_per_ip: self.max_handshakes_per_ip,
            connect_rate_per_ip: self.connect_rate_per_ip,
            connect_burst_per_ip: self.connect_burst_per_ip,
            connect_rate_per_user: self.connect_rate_per_user,
            connect_burst_per_user: self.connect_burst_per_user,
            ping_interval: self.ping_interval,
            ping_timeout: self.ping_timeout,
            shutdown_timeout: self.shutdown_timeout,
            inbox_capacity: self.inbox_capacity,
            max_request_header_bytes: self.max_request_header_bytes,
            rate_limit_per_sec: self.rate_limit,
            rate_limit_burst: self.rate_limit_burst,
            backplane: (self.backplane == BackplaneKind::Redis).then(|| RedisConfig {
                url: self.redis_url,
                routing: match self.routing {
                    RoutingKind::PerUser => Routing::PerUser,
                    RoutingKind::Seed => Routing::Seed,
                },
                publish_queue: self.publish_queue,
                reconnect_min: backplane::DEFAULT_RECONNECT_MIN.min(self.redis_reconnect_max),
                reconnect_max: self.redis_reconnect_max,
                publish_batch_window: self.publish_batch_window,
                publish_pace: self.publish_pace,
                wait_replicas: self.redis_wait_replicas,
                wait_timeout: self.redis_wait_timeout,
                channel_prefix: self.redis_prefix,
                cluster: self.redis_cluster,
                ca_cert: self.redis_ca_cert,
                sentinels: self.redis_sentinel,
                sentinel_master: self.redis_sentinel_master,
                sentinel_password: self.redis_sentinel_password,
            }),
            history: history::HistoryConfig {
                enabled: self.history == OnOff::On,
                max_len: self.history_max_len,
                max_age: self.history_max_age,
                max_page: self.history_max_page,
                api_key: self.api_key,
                dedupe_window: self.dedupe_window,
                workers: self.history_workers,
                reads_per_user: self.history_reads_per_user,
                read_queue_per_user: self.history_read_queue_per_user,
                api_rate: self.api_history_rate,
                api_burst: self.api_history_burst,
                max_total_bytes: self.history_max_total_bytes,
                sender_bytes_per_minute: self.sender_bytes_per_minute,
                ..history::HistoryConfig::default()
            },
            chat_page: self.chat_page == OnOff::On,
            rooms: rooms::RoomsConfig {
                max_rooms_per_user: self.max_rooms_per_user,
                max_room_members: self.max_room_members,
                max_room_name_bytes: self.max_room_name_bytes,
                max_devices: self.max_devices,
                presence_ttl: self.presence_ttl,
                max_room_queue: self.max_room_queue,
                presence_interval: self.presence_interval,
                history: rooms::RoomHistoryConfig {
                    max_len: self.room_history_max_len,
                    max_age: self.room_history_max_age,
                    max_bytes: self.room_history_max_bytes,
                },
            },
            hooks: hooks::HooksConfig {
                url: self.hook_url,
                timeout: self.hook_timeout,
                concurrency: self.hook_concurrency,
                queue: self.hook_queue,
                fail_open: self.hook_fail_open,
            },
            allowed_origins: self.allowed_origins,
            drain_period: self.drain_period,
            tls: match (self.tls_cert, self.tls_key) {
                (Some(cert), Some(key)) => Some(config::TlsConfig { cert, key }),
                _ => None,
            },
            metrics_listen: self.metrics_listen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("ten").is_err());
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert!(parse_duration("5d").is_err());
    }

    #[test]
    fn log_levels_are_checked() {
        assert!(parse_log_level("info").is_ok());
        assert!(parse_log_level("WARN,switchboard::backplane=debug").is_ok());
        assert!(parse_log_level("verbose").is_err());
        assert!(parse_log_level("info,switchboard=loud").is_err());
    }

    #[test]
    fn the_cli_is_consistent() {
        Cli::command().debug_assert();
    }
}
