//! Plain leaf types shared by every layer: user and room ids, history offsets, the wall clock.
//!
//! Nothing here imports from the crate: every other module may use these.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// A user id, shared cheaply between connections, indexes and dispatches.
pub type UserId = Arc<str>;

/// A room name, shared cheaply.
pub type RoomId = Arc<str>;

/// A position in one user's history: two numbers, compared as a tuple, written `A-B`.
///
/// Redis mode: the stream entry id (milliseconds, sequence). Embedded mode: (process start in
/// milliseconds, per-user sequence), so an offset from an earlier run is never taken for a
/// current one. Clients treat it as opaque.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Offset(pub u64, pub u64);

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

/// A string that is not an offset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an offset (expected two decimal numbers joined by '-')")]
pub struct BadOffset;

impl FromStr for Offset {
    type Err = BadOffset;

    fn from_str(s: &str) -> Result<Self, BadOffset> {
        let (a, b) = s.split_once('-').ok_or(BadOffset)?;
        let num = |t: &str| {
            if t.is_empty() || t.len() > 20 || !t.bytes().all(|c| c.is_ascii_digit()) {
                return Err(BadOffset);
            }
            t.parse::<u64>().map_err(|_| BadOffset)
        };
        Ok(Offset(num(a)?, num(b)?))
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
