//! Publishing to Redis from the core: with per-user routing on one Redis, the core's own link
//! (`backplane::core_link`), registered in this loop's poll; otherwise the shared queue of the
//! publisher thread. Held acks the link settles are answered here, without the bus.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use super::CoreLoop;
use crate::backplane::Backplane;
use crate::bus::{AckWaiter, CoreMsg, Dispatch};

impl CoreLoop {
    /// Queues `dispatch` for Redis: on this core's link (written at the end of the turn), or
    /// for the publisher thread.
    pub(super) fn publish(
        &mut self,
        bp: &Backplane,
        dispatch: &Arc<Dispatch>,
        waiter: Option<&Arc<AckWaiter>>,
    ) {
        match &mut self.link {
            Some(link) => link.publish(dispatch, waiter),
            None => bp.publish(dispatch, waiter),
        }
    }

    /// The link's socket is ready.
    pub(super) fn on_link_event(&mut self, readable: bool, writable: bool) {
        if let Some(link) = &mut self.link {
            link.on_event(self.poll.registry(), readable, writable);
        }
    }

    /// Once per turn, before the connections are flushed: the link writes what this turn
    /// queued, and the acks its replies made due are answered (inline: they are this core's).
    pub(super) fn link_turn(&mut self, now: Instant) {
        let Some(link) = &mut self.link else {
            return;
        };
        let mut ready = std::mem::take(&mut self.acks_ready);
        link.turn(self.poll.registry(), now, &mut ready);
        for waiter in ready.drain(..) {
            if waiter.core == self.id {
                if let Some(bp) = &self.shared.backplane {
                    bp.stats.acked_inline.fetch_add(1, Relaxed);
                }
                self.on_acked(&waiter);
            } else {
                // Not made by this loop today; kept correct should another core's waiter
                // ever ride on this link.
                let _ = self.shared.bus.send(waiter.core, CoreMsg::Acked(waiter));
            }
        }
        self.acks_ready = ready;
    }

    /// When the link needs the loop next (reconnect, connect timeout, the gate after an outage).
    pub(super) fn link_deadline(&self, now: Instant) -> Option<Instant> {
        self.link.as_ref().and_then(|l| l.next_deadline(now))
    }

    /// Whether shutdown may end the loop as far as the link goes: nothing left to write or
    /// answer, or the flush allowance spent.
    pub(super) fn link_drained(&self, now: Instant) -> bool {
        match (&self.link, self.link_stop) {
            (Some(link), Some(stop)) => link.is_idle() || now >= stop,
            (Some(link), None) => link.is_idle(),
            (None, _) => true,
        }
    }
}
