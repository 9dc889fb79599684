//! Where dispatches go and history lives, decided once at start: embedded (this process is the
//! whole server) or with a Redis backplane. The loop matches on [`Mode`] and [`History`]
//! instead of testing the configuration and the options in [`Shared`].

use super::Shared;
use crate::backplane::Backplane;
use crate::history::MemoryHistory;

/// How this server runs.
#[derive(Clone, Copy)]
pub(super) enum Mode<'a> {
    /// No Redis: the cores are all there is; history, when on, is the in-process store.
    Embedded {
        /// The store, when history is on.
        history: Option<&'a MemoryHistory>,
    },
    /// With Redis: other instances get every dispatch; with history on, Redis assigns the
    /// offsets and keeps the events, and its answers come back through the inbox.
    Backplane {
        /// The backplane.
        bp: &'a Backplane,
        /// History is on.
        history: bool,
    },
}

/// Where history lives, when it is on.
#[derive(Clone, Copy)]
pub(super) enum History<'a> {
    /// In this process: it answers at once.
    Embedded(&'a MemoryHistory),
    /// In Redis: ask the backplane; the answer arrives through the inbox.
    Redis(&'a Backplane),
}

impl<'a> Mode<'a> {
    /// Where history lives; `None` when it is off.
    pub fn history(self) -> Option<History<'a>> {
        match self {
            Mode::Embedded { history } => history.map(History::Embedded),
            Mode::Backplane { bp, history } => history.then_some(History::Redis(bp)),
        }
    }
}

impl Shared {
    /// The mode this server runs in.
    pub(super) fn mode(&self) -> Mode<'_> {
        match &self.backplane {
            Some(bp) => Mode::Backplane {
                bp,
                history: self.config.history_active(),
            },
            None => Mode::Embedded {
                history: self.history.as_ref(),
            },
        }
    }
}
