//! History settings: offsets, per-user history, resume, and the history and publish routes.

use std::time::Duration;

/// Events kept per user.
pub const DEFAULT_MAX_LEN: usize = 1000;
/// How long an event is kept.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// Largest page of `GET /api/history` and the `history` event.
pub const DEFAULT_MAX_PAGE: usize = 100;
/// Most users in one `POST /api/publish`.
pub const DEFAULT_MAX_PUBLISH_USERS: usize = 1000;
/// Largest `POST /api/publish` body, in bytes.
pub const DEFAULT_MAX_PUBLISH_BODY_BYTES: usize = 1024 * 1024;
/// How long a `sendMessage` `clientId` is remembered, so that a resend is recognised.
pub const DEFAULT_DEDUPE_WINDOW: Duration = Duration::from_secs(300);
/// Threads reading history from Redis (replays, pages, API publishes), per instance.
pub const DEFAULT_HISTORY_WORKERS: usize = 4;
/// History reads of one user the workers run at once; the user's others wait their turn.
pub const DEFAULT_READS_PER_USER: usize = 1;
/// History reads of one user waiting for a worker; past it a read is refused (a replay answers
/// `complete: false`, a page `rate_limited` or HTTP 429).
pub const DEFAULT_READ_QUEUE_PER_USER: usize = 16;
/// `GET /api/history` requests per second per user (0 = no limit); past it, HTTP 429.
pub const DEFAULT_API_HISTORY_RATE: u32 = 10;
/// `GET /api/history` requests of one user allowed in a burst above its rate.
pub const DEFAULT_API_HISTORY_BURST: u32 = 20;
/// What embedded history may hold in total (frames plus a fixed cost per event and per user)
/// before the largest users' oldest events are evicted.
pub const DEFAULT_MAX_TOTAL_BYTES: usize = 256 * 1024 * 1024;
/// Bytes one user's sends may add to other users' histories per minute (each recipient's copy
/// counts), as a bucket that refills continuously and holds one minute's worth.
pub const DEFAULT_SENDER_BYTES_PER_MINUTE: u64 = 8 * 1024 * 1024;
/// What each stored copy counts for besides its frame in the sender budget: a message to a
/// made-up id costs a ring, a stream key, an entry, whatever its size.
pub const SENDER_COPY_OVERHEAD: u64 = 256;

/// History settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryConfig {
    /// Offsets, history and resume. Applies to embedded mode and to per-user Redis routing (on
    /// one Redis or a cluster); with seed routing it is off (see
    /// [`crate::Config::history_active`]).
    pub enabled: bool,
    /// Events kept per user (`--history-max-len`).
    pub max_len: usize,
    /// Age past which events are dropped (`--history-max-age`).
    pub max_age: Duration,
    /// Largest history page (`--history-max-page`).
    pub max_page: usize,
    /// Key for `POST /api/publish` (`--api-key`); the route answers 404 without one.
    pub api_key: Option<String>,
    /// Most users in one `POST /api/publish`.
    pub max_publish_users: usize,
    /// Largest `POST /api/publish` body.
    pub max_publish_body_bytes: usize,
    /// How long an idempotency key (`sendMessage`'s `clientId`) is remembered per recipient
    /// (`--dedupe-window`): a resend within it is stored and delivered once.
    pub dedupe_window: Duration,
    /// Threads reading history from Redis (`--history-workers`).
    pub workers: usize,
    /// History reads of one user in flight at once (`--history-reads-per-user`).
    pub reads_per_user: usize,
    /// History reads of one user waiting for a worker (`--history-read-queue-per-user`).
    pub read_queue_per_user: usize,
    /// `GET /api/history` requests per second per user, 0 = no limit (`--api-history-rate`).
    pub api_rate: u32,
    /// Burst above `api_rate` (`--api-history-burst`).
    pub api_burst: u32,
    /// Embedded mode: what all users' histories may cost together
    /// (`--history-max-total-bytes`); past it the largest users' oldest events are evicted.
    pub max_total_bytes: usize,
    /// Bytes one user's sends may store in other users' histories per minute, per instance
    /// (`--sender-bytes-per-minute`); past it the send is refused with `quota_exceeded`.
    /// 0: no limit.
    pub sender_bytes_per_minute: u64,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            enabled: true,
            max_len: DEFAULT_MAX_LEN,
            max_age: DEFAULT_MAX_AGE,
            max_page: DEFAULT_MAX_PAGE,
            api_key: None,
            max_publish_users: DEFAULT_MAX_PUBLISH_USERS,
            max_publish_body_bytes: DEFAULT_MAX_PUBLISH_BODY_BYTES,
            dedupe_window: DEFAULT_DEDUPE_WINDOW,
            workers: DEFAULT_HISTORY_WORKERS,
            reads_per_user: DEFAULT_READS_PER_USER,
            read_queue_per_user: DEFAULT_READ_QUEUE_PER_USER,
            api_rate: DEFAULT_API_HISTORY_RATE,
            api_burst: DEFAULT_API_HISTORY_BURST,
            max_total_bytes: DEFAULT_MAX_TOTAL_BYTES,
            sender_bytes_per_minute: DEFAULT_SENDER_BYTES_PER_MINUTE,
        }
    }
}

impl HistoryConfig {
    /// Checks the bounds.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_len == 0 {
            return Err("--history-max-len must be at least 1".into());
        }
        if self.max_age < Duration::from_millis(1) {
            return Err("--history-max-age must be at least 1ms".into());
        }
        if self.max_page == 0 {
            return Err("--history-max-page must be at least 1".into());
        }
        if self.api_key.as_ref().is_some_and(|k| k.len() < 16) {
            return Err("--api-key must be at least 16 bytes".into());
        }
        if self.dedupe_window < Duration::from_millis(1) {
            return Err("--dedupe-window must be at least 1ms".into());
        }
        if self.max_total_bytes < 1024 * 1024 {
            return Err("--history-max-total-bytes must be at least 1048576 (1 MiB)".into());
        }
        if self.max_publish_users == 0 || self.max_publish_body_bytes < 64 {
            return Err("publish bounds must be at least 1 user and 64 bytes".into());
        }
        if self.workers == 0 || self.workers > 256 {
            return Err("--history-workers must be between 1 and 256".into());
        }
        if self.reads_per_user == 0 || self.read_queue_per_user == 0 {
            return Err(
                "--history-reads-per-user and --history-read-queue-per-user must be at least 1"
                    .into(),
            );
        }
        if self.api_rate > 0 && self.api_burst == 0 {
            return Err("--api-history-burst must be at least 1 when the rate is limited".into());
        }
        Ok(())
    }
}
