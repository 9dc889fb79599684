//! Per-phase delivery ledger: one "sent" bit per message and one bit per expected
//! (message, device) pair, shared lock-free by all event-loop threads.
//!
//! Size is messages × slots_per_msg bits, i.e. bounded by rate × duration × (devices of
//! sender + recipient); a first delivery sets its bit, a second one finds it set and is a
//! duplicate. Missing deliveries are counted once, after the drain, by `tally`.

use crate::scenarios::population::Population;
use std::sync::atomic::{AtomicU64, Ordering};

/// Refuse to allocate more than this many ledger bits (512 MiB) rather than thrash.
pub const MAX_BITS: u64 = 4 << 30;

pub struct Ledger {
    /// Global sequence number of this phase's first message.
    pub seq_base: u64,
    pub count: u64,
    slots: u64,
    sent: Vec<AtomicU64>,
    delivered: Vec<AtomicU64>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Mark {
    First,
    Duplicate,
    /// Sequence number outside this phase (a straggler from an earlier phase).
    OutOfPhase,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub sent: u64,
    /// Deliveries owed to connections that were open when the phase started.
    pub expected: u64,
    pub delivered_expected: u64,
    pub missing: u64,
    /// Messages with at least one missing delivery.
    pub messages_incomplete: u64,
}

fn words(bits: u64) -> Vec<AtomicU64> {
    (0..bits.div_ceil(64)).map(|_| AtomicU64::new(0)).collect()
}

impl Ledger {
    pub fn bits_needed(count: u64, slots: u32) -> u64 {
        count.saturating_mul(u64::from(slots) + 1)
    }

    pub fn new(seq_base: u64, count: u64, slots: u32) -> Self {
        Self {
            seq_base,
            count,
            slots: u64::from(slots),
            sent: words(count),
            delivered: words(count * u64::from(slots)),
        }
    }

    fn index(&self, seq: u64) -> Option<u64> {
        let i = seq.checked_sub(self.seq_base)?;
        (i < self.count).then_some(i)
    }

    pub fn mark_sent(&self, seq: u64) {
        if let Some(i) = self.index(seq) {
            self.sent[(i / 64) as usize].fetch_or(1 << (i % 64), Ordering::Relaxed);
        }
    }

    pub fn mark_delivered(&self, seq: u64, slot: u32) -> Mark {
        let Some(i) = self.index(seq) else {
            return Mark::OutOfPhase;
        };
        if u64::from(slot) >= self.slots {
            return Mark::OutOfPhase;
        }
        let bit = i * self.slots + u64::from(slot);
        let mask = 1u64 << (bit % 64);
        let prev = self.delivered[(bit / 64) as usize].fetch_or(mask, Ordering::Relaxed);
        if prev & mask == 0 {
            Mark::First
        } else {
            Mark::Duplicate
        }
    }

    fn is_set(v: &[AtomicU64], bit: u64) -> bool {
        v[(bit / 64) as usize].load(Ordering::Relaxed) & (1 << (bit % 64)) != 0
    }

    /// Counts expected and missing deliveries over sent messages. `live[c]` says whether
    /// connection c was open at phase start; closed ones are owed nothing.
    pub fn tally(&self, pop: &Population, live: &[bool]) -> Tally {
        let mut t = Tally::default();
        for i in 0..self.count {
            if !Self::is_set(&self.sent, i) {
                continue;
            }
            t.sent += 1;
            let route = pop.route(self.seq_base + i);
            let mut incomplete = false;
            for (slot, conn) in pop.expected(&route) {
                if !live.get(conn as usize).copied().unwrap_or(false) {
                    continue;
                }
                t.expected += 1;
                if Self::is_set(&self.delivered, i * self.slots + u64::from(slot)) {
                    t.delivered_expected += 1;
                } else {
                    t.missing += 1;
                    incomplete = true;
                }
            }
            t.messages_incomplete += u64::from(incomplete);
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenarios::population::Shard;

    #[test]
    fn first_duplicate_and_out_of_phase() {
        let l = Ledger::new(100, 10, 4);
        assert_eq!(l.mark_delivered(105, 3), Mark::First);
        assert_eq!(l.mark_delivered(105, 3), Mark::Duplicate);
        assert_eq!(l.mark_delivered(105, 2), Mark::First);
        assert_eq!(l.mark_delivered(99, 0), Mark::OutOfPhase);
        assert_eq!(l.mark_delivered(110, 0), Mark::OutOfPhase);
        assert_eq!(l.mark_delivered(105, 4), Mark::OutOfPhase);
    }

    #[test]
    fn tally_counts_missing_only_for_sent_messages_and_live_conns() {
        let pop = Population::uniform("u", 4, 2, Shard { index: 0, count: 1 }, 1, 9);
        let l = Ledger::new(0, 200, pop.slots_per_msg);
        let mut live = vec![true; pop.conns.len()];
        // Messages 0..100 sent and fully delivered; 100..150 sent, nothing delivered;
        // 150..200 never sent.
        let mut want_expected = 0;
        let mut want_missing = 0;
        for seq in 0..150 {
            l.mark_sent(seq);
            let r = pop.route(seq);
            for (slot, _) in pop.expected(&r) {
                want_expected += 1;
                if seq < 100 {
                    assert_eq!(l.mark_delivered(seq, slot), Mark::First);
                } else {
                    want_missing += 1;
                }
            }
        }
        let t = l.tally(&pop, &live);
        assert_eq!(t.sent, 150);
        assert_eq!(t.expected, want_expected);
        assert_eq!(t.missing, want_missing);
        assert_eq!(t.delivered_expected, want_expected - want_missing);
        assert_eq!(t.messages_incomplete, 50);

        // A connection that was down at phase start is owed nothing.
        live.iter_mut().for_each(|l| *l = false);
        let t = l.tally(&pop, &live);
        assert_eq!((t.expected, t.missing, t.sent), (0, 0, 150));
    }
}
