//! Rooms settings: the bounds of rooms, room history, presence and the per-user device limit.

use std::time::Duration;

/// Rooms one user may be in at once.
pub const DEFAULT_MAX_ROOMS_PER_USER: usize = 100;
/// Members one room may have.
pub const DEFAULT_MAX_ROOM_MEMBERS: usize = 10_000;
/// Longest room name, in bytes.
pub const DEFAULT_MAX_ROOM_NAME_BYTES: usize = 64;
/// Connections one user may hold across the cluster; 0 means no limit.
pub const DEFAULT_MAX_DEVICES: u32 = 0;
/// Room requests (join, leave, send, presence) waiting for the Redis rooms worker; past it new
/// ones are refused at once (`internal` error `rooms busy`) rather than queued behind a flood.
pub const DEFAULT_MAX_ROOM_QUEUE: usize = 4096;
/// A user's presence changes within this long after one was announced are held and coalesced
/// into at most one `presenceChanged` at its end (0 = announce every change), embedded
/// (`core_loop/presence.rs`) and with Redis, cluster-wide (`rooms_worker/coalesce.rs`).
pub const DEFAULT_PRESENCE_INTERVAL: Duration = Duration::from_secs(1);
/// How long an instance that stopped refreshing its heartbeat counts as alive. Its users go
/// offline (with `presenceChanged`) within about 4/3 of this after it died.
pub const DEFAULT_PRESENCE_TTL: Duration = Duration::from_secs(30);

/// Messages kept per room (`--room-history-max-len`).
pub const DEFAULT_ROOM_HISTORY_MAX_LEN: usize = 1000;
/// How long a room message is kept (`--room-history-max-age`).
pub const DEFAULT_ROOM_HISTORY_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// Bytes of frames kept per room (`--room-history-max-bytes`): 16 MiB, so a room of 64 KiB
/// messages keeps its last 256 or so, whatever `--room-history-max-len` says.
pub const DEFAULT_ROOM_HISTORY_MAX_BYTES: usize = 16 * 1024 * 1024;

/// The bounds of one room's history, kept once per room (a stream per room with Redis).
/// Each bound drops the oldest messages first; the newest message is always kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomHistoryConfig {
    /// Messages kept per room.
    pub max_len: usize,
    /// Age past which a room message is dropped.
    pub max_age: Duration,
    /// Bytes of frames (offset included) kept per room.
    pub max_bytes: usize,
}

impl Default for RoomHistoryConfig {
    fn default() -> Self {
        RoomHistoryConfig {
            max_len: DEFAULT_ROOM_HISTORY_MAX_LEN,
            max_age: DEFAULT_ROOM_HISTORY_MAX_AGE,
            max_bytes: DEFAULT_ROOM_HISTORY_MAX_BYTES,
        }
    }
}

/// Bounds of rooms, presence and devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomsConfig {
    /// Rooms one user may be in (`--max-rooms-per-user`); past it `joinRoom` gets `room_limit`.
    pub max_rooms_per_user: usize,
    /// Members one room may have (`--max-room-members`); past it `joinRoom` gets `room_full`.
    pub max_room_members: usize,
    /// Longest room name in bytes (`--max-room-name-bytes`); longer is `bad_room`.
    pub max_room_name_bytes: usize,
    /// Connections per user across the cluster (`--max-devices`, 0 = off). With Redis the newest
    /// wins (the oldest is closed with 4009); embedded the connection over it is closed with 4009.
    pub max_devices: u32,
    /// Heartbeat expiry of an instance (`--presence-ttl`), refreshed every third of it.
    pub presence_ttl: Duration,
    /// Room requests waiting for the Redis rooms worker (`--max-room-queue`).
    pub max_room_queue: usize,
    /// Presence changes of one user coalesced over this long (`--presence-interval`).
    pub presence_interval: Duration,
    /// The bounds of each room's history (with history on).
    pub history: RoomHistoryConfig,
}

impl Default for RoomsConfig {
    fn default() -> Self {
        RoomsConfig {
            max_rooms_per_user: DEFAULT_MAX_ROOMS_PER_USER,
            max_room_members: DEFAULT_MAX_ROOM_MEMBERS,
            max_room_name_bytes: DEFAULT_MAX_ROOM_NAME_BYTES,
            max_devices: DEFAULT_MAX_DEVICES,
            presence_ttl: DEFAULT_PRESENCE_TTL,
            max_room_queue: DEFAULT_MAX_ROOM_QUEUE,
            presence_interval: DEFAULT_PRESENCE_INTERVAL,
            history: RoomHistoryConfig::default(),
        }
    }
}

impl RoomsConfig {
    /// Checks the bounds.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_rooms_per_user == 0 || self.max_room_members == 0 {
            return Err("--max-rooms-per-user and --max-room-members must be at least 1".into());
        }
        if !(1..=200).contains(&self.max_room_name_bytes) {
            return Err("--max-room-name-bytes must be 1 to 200".into());
        }
        if self.max_room_queue == 0 {
            return Err("--max-room-queue must be at least 1".into());
        }
        if self.presence_ttl < Duration::from_millis(300) {
            return Err("--presence-ttl must be at least 300ms".into());
        }
        let h = &self.history;
        if h.max_len == 0 || h.max_age < Duration::from_millis(1) || h.max_bytes < 1024 {
            return Err("room history bounds: --room-history-max-len at least 1, \
                 --room-history-max-age at least 1ms, --room-history-max-bytes at least 1024"
                .into());
        }
        Ok(())
    }
}
