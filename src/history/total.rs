//! The process-wide bound on embedded history (`--history-max-total-bytes`): what every ring
//! costs is counted in one atomic; past the bound the largest rings give up their oldest events
//! until the store is back under it.
//!
//! Why the largest first: a flood makes rings big (60 KB messages to made-up ids, or to one
//! victim), so it is the flood's own events that go first; a user with a modest history keeps
//! all of it until every ring is down to its size. Evicting the globally oldest instead would
//! take a quiet user's history (older than the flood) before the flood's.
//!
//! Cost on the hot path: an append adds its cost to the atomic and to its shard's; only over
//! the bound does it evict, one thread at a time, one shard lock at a time (the biggest shard's),
//! down to the bound minus [`SLACK_DIVISOR`]th so that the next evictions are that many bytes
//! of appends away. An evicted event is dropped as a length or age trim drops it: a resume from
//! before it reports `complete: false`.

use std::collections::BinaryHeap;
use std::sync::atomic::Ordering::Relaxed;

use super::{Entry, MemoryHistory, Ring, SHARDS};
use crate::types::UserId;

/// What an entry costs besides its frame and key: the `Entry` in the ring, the frame's shared
/// header, allocator overhead. Counted so that a flood of tiny events is bounded too.
const ENTRY_OVERHEAD: usize = 128;
/// What a ring costs besides its user id and entries: the map slot, the ring, the id's header.
const RING_OVERHEAD: usize = 160;
/// Least time between two [`release_freed_pages`] calls.
const TRIM_INTERVAL_MS: u64 = 250;
/// An eviction frees down to the bound minus this fraction of it.
const SLACK_DIVISOR: usize = 64;

/// What `entry` counts for in the total.
pub(super) fn entry_cost(entry: &Entry) -> usize {
    entry.frame.len() + entry.dedupe.as_ref().map_or(0, |k| k.len()) + ENTRY_OVERHEAD
}

/// What an empty ring of `user` counts for in the total.
pub(super) fn ring_cost(user: &str) -> usize {
    user.len() + RING_OVERHEAD
}

impl Ring {
    /// Drops the oldest entry, remembering its sequence as dropped.
    pub(super) fn pop_oldest(&mut self) {
        if let Some(entry) = self.entries.pop_front() {
            self.dropped_through = entry.seq;
            self.bytes -= entry.frame.len();
            self.cost -= entry_cost(&entry);
        }
    }
}

impl MemoryHistory {
    /// Adds `added` and removes `freed` from shard `index`'s cost and the total (called with
    /// that shard locked, so a shard's count never goes below zero).
    pub(super) fn account(&self, index: usize, added: usize, freed: usize) {
        if added > freed {
            self.shard_costs[index].fetch_add(added - freed, Relaxed);
            self.total.fetch_add(added - freed, Relaxed);
        } else if freed > added {
            self.shard_costs[index].fetch_sub(freed - added, Relaxed);
            self.total.fetch_sub(freed - added, Relaxed);
        }
    }

    /// What every ring costs together, as counted.
    pub fn total_bytes(&self) -> usize {
        self.total.load(Relaxed)
    }

    /// Events evicted by the total bound since start.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Relaxed)
    }

    /// Prometheus families for `/metrics`: the total as counted, and the evictions.
    pub fn render_prometheus(&self, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(
            out,
            "# HELP switchboard_history_bytes What embedded history holds, as counted against \
             --history-max-total-bytes.\n# TYPE switchboard_history_bytes gauge\n\
             switchboard_history_bytes {}",
            self.total_bytes()
        );
        let _ = writeln!(
            out,
            "# HELP switchboard_history_evicted_total Events evicted (largest users' oldest first) \
             to keep embedded history under --history-max-total-bytes.\n\
             # TYPE switchboard_history_evicted_total counter\n\
             switchboard_history_evicted_total {}",
            self.evicted()
        );
    }

    /// Past the total bound, evicts (largest rings' oldest events first) down to the bound
    /// minus the slack. One thread evicts at a time; the others return at once.
    pub(super) fn enforce_total(&self) {
        if self.total.load(Relaxed) <= self.max_total_bytes {
            return;
        }
        if self
            .evicting
            .swap(true, std::sync::atomic::Ordering::Acquire)
        {
            return;
        }
        // Cleared however this ends, so that a panic here cannot stop every later eviction.
        let _evicting = ClearOnDrop(&self.evicting);
        let target = self.max_total_bytes - self.max_total_bytes / SLACK_DIVISOR;
        loop {
            let total = self.total.load(Relaxed);
            if total <= target {
                break;
            }
            let mut by_cost: Vec<(usize, usize)> = (0..SHARDS)
                .map(|i| (self.shard_costs[i].load(Relaxed), i))
                .collect();
            by_cost.sort_unstable_by(|a, b| b.cmp(a));
            let (biggest, index) = by_cost[0];
            // The biggest shard comes down by the whole excess, or to the next one's size (so
            // that the largest rings of the whole store go first, not just of one shard), but by
            // a chunk at least, so that shards of equal size are not taken one event at a time.
            let chunk = (self.max_total_bytes / SLACK_DIVISOR / 4).max(1);
            let floor = biggest
                .saturating_sub(total - target)
                .max(by_cost[1].0.min(biggest.saturating_sub(chunk)));
            if self.evict_in_shard(index, floor) == 0 {
                break;
            }
        }
        // Not after every round: a trim walks the allocator's heaps and releases every free
        // page (a C loop of 60 KB blocks on the shared build machine: 16 ms to release 120 MB,
        // 1.7 ms over a 240 MB heap with nothing new to release), and what it returns is
        // reused by the next appends anyway. Every 250 ms under a flood: about 1% of a core.
        let now = crate::types::now_ms();
        if now.saturating_sub(self.trimmed_at_ms.load(Relaxed)) >= TRIM_INTERVAL_MS {
            self.trimmed_at_ms.store(now, Relaxed);
            release_freed_pages();
        }
    }

    /// Evicts the oldest events of shard `index`'s largest rings until the shard costs at most
    /// `floor` (at least one event, so each call makes progress); rings left empty are
    /// forgotten. Returns the cost freed.
    fn evict_in_shard(&self, index: usize, floor: usize) -> usize {
        let mut shard = self.shards[index].lock().unwrap_or_else(|p| p.into_inner());
        let mut largest: BinaryHeap<(usize, UserId)> = shard
            .rings
            .iter()
            .map(|(user, ring)| (ring.cost, user.clone()))
            .collect();
        let mut cost = self.shard_costs[index].load(Relaxed);
        let (mut freed, mut events) = (0, 0u64);
        while let Some((_, user)) = largest.pop() {
            let Some(ring) = shard.rings.get_mut(&user) else {
                continue;
            };
            let before = ring.cost;
            ring.pop_oldest();
            events += 1;
            let gone = if ring.entries.is_empty() {
                // The id and the ring's own cost go too.
                shard.rings.remove(&user);
                before
            } else {
                largest.push((ring.cost, user));
                before - ring.cost
            };
            freed += gone;
            cost = cost.saturating_sub(gone);
            if cost <= floor {
                break;
            }
        }
        self.account(index, 0, freed);
        self.evicted.fetch_add(events, Relaxed);
        freed
    }
}

/// Clears the eviction flag when dropped.
struct ClearOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::Release);
    }
}

/// Hands the pages evicted events freed back to the system (glibc keeps freed memory inside its
/// heaps otherwise, and the resident size would keep growing with fragmentation while the
/// counted total stays at the bound).
#[allow(unsafe_code)]
fn release_freed_pages() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; 0 keeps no pad.
    unsafe {
        libc::malloc_trim(0);
    }
}
