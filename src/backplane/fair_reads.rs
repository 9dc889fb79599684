//! The history workers' jobs and their queue: reads (replays, pages) and API publishes wait
//! here in one lane per user, and the workers take them round-robin between lanes, at most
//! `per_user` of one lane in flight at once. One user's flood of reads then fills only its own
//! lane: another user's read waits for at most one read of each busy lane, never behind the
//! whole flood.
//!
//! [`FairQueue`] is the pure state (unit-tested below); [`HistoryReads`] shares it between the
//! subscriber and cores (which push) and the workers (which take, then say when they are done).

use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex};

use super::{PageRequest, PublishRequest, ReplayRequest};
use crate::UserId;

/// Work for the history workers.
#[derive(Debug)]
pub(crate) enum Job {
    Replay(ReplayRequest),
    Page(PageRequest),
    Publish(PublishRequest),
}

impl Job {
    /// The lane it waits in: the reading user's, or the API publishes'.
    pub(crate) fn lane(&self) -> Lane {
        match self {
            Job::Replay(r) => Lane::User(r.user.clone()),
            Job::Page(p) => Lane::User(p.user.clone()),
            Job::Publish(_) => Lane::Publish,
        }
    }
}

/// Why a history job was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotQueued {
    /// The user already has `--history-read-queue-per-user` reads waiting: refuse this one
    /// (`rate_limited`, HTTP 429).
    Busy,
    /// No workers (history off, or shutting down).
    Off,
}

/// Whose lane a job waits in.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Lane {
    /// A user's reads: its replays and pages (its own history or a room's).
    User(UserId),
    /// `POST /api/publish` calls (trusted: they hold the API key), a lane of their own so they
    /// never wait behind a user's reads. Run one at a time, as on the single history thread
    /// before, and never refused: each waits on its own HTTP connection, bounded by the
    /// connections and the API's 5 s wait.
    Publish,
}

/// One lane: its waiting jobs and how many of its jobs the workers are running.
#[derive(Debug)]
struct LaneState<T> {
    waiting: VecDeque<T>,
    in_flight: usize,
    /// Listed in [`FairQueue::ready`] (each lane at most once).
    listed: bool,
}

/// Lanes served round-robin; see the module docs.
#[derive(Debug)]
pub(crate) struct FairQueue<T> {
    lanes: HashMap<Lane, LaneState<T>>,
    /// Lanes with a job waiting and fewer than `per_user` in flight, in turn order.
    ready: VecDeque<Lane>,
    per_user: usize,
    queue_per_user: usize,
}

impl<T> FairQueue<T> {
    /// At most `per_user` jobs of one lane in flight and `queue_per_user` waiting (both at
    /// least 1).
    pub fn new(per_user: usize, queue_per_user: usize) -> Self {
        FairQueue {
            lanes: HashMap::new(),
            ready: VecDeque::new(),
            per_user: per_user.max(1),
            queue_per_user: queue_per_user.max(1),
        }
    }

    /// Queues `job` in `lane`; gives it back when a user's lane already has `queue_per_user`
    /// waiting (the caller refuses it).
    pub fn push(&mut self, lane: Lane, job: T) -> Result<(), T> {
        let bounded = matches!(lane, Lane::User(_));
        let state = self.lanes.entry(lane.clone()).or_insert_with(|| LaneState {
            waiting: VecDeque::new(),
            in_flight: 0,
            listed: false,
        });
        if bounded && state.waiting.len() >= self.queue_per_user {
            return Err(job);
        }
        state.waiting.push_back(job);
        if !state.listed && state.in_flight < self.per_user {
            state.listed = true;
            self.ready.push_back(lane);
        }
        Ok(())
    }

    /// The next job, from the lane whose turn it is; the lane goes to the back of the turn
    /// order if it may run more. Call [`FairQueue::done`] with the lane once the job ran.
    pub fn pop(&mut self) -> Option<(Lane, T)> {
        let lane = self.ready.pop_front()?;
        let state = self.lanes.get_mut(&lane)?;
        state.listed = false;
        let job = state.waiting.pop_front()?;
        state.in_flight += 1;
        if !state.waiting.is_empty() && state.in_flight < self.per_user {
            state.listed = true;
            self.ready.push_back(lane.clone());
        }
        Some((lane, job))
    }

    /// A job of `lane` finished: the lane may run another. An idle lane is forgotten, so the
    /// map holds only users with reads waiting or running.
    pub fn done(&mut self, lane: &Lane) {
        let Some(state) = self.lanes.get_mut(lane) else {
            return;
        };
        state.in_flight = state.in_flight.saturating_sub(1);
        if state.waiting.is_empty() {
            if state.in_flight == 0 {
                self.lanes.remove(lane);
            }
        } else if !state.listed && state.in_flight < self.per_user {
            state.listed = true;
            self.ready.push_back(lane.clone());
        }
    }

    /// Jobs waiting in every lane.
    pub fn waiting(&self) -> usize {
        self.lanes.values().map(|l| l.waiting.len()).sum()
    }
}

/// The queue shared by its producers and the workers, with a stop flag.
pub(crate) struct HistoryReads<T> {
    state: Mutex<(FairQueue<T>, bool)>,
    wake: Condvar,
}

impl<T> HistoryReads<T> {
    pub fn new(per_user: usize, queue_per_user: usize) -> Self {
        HistoryReads {
            state: Mutex::new((FairQueue::new(per_user, queue_per_user), false)),
            wake: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (FairQueue<T>, bool)> {
        // The queue's invariants hold between its method calls: take it whatever panicked.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `job` for a worker; gives it back when its lane is full or the workers stopped.
    pub fn push(&self, lane: Lane, job: T) -> Result<(), T> {
        let mut state = self.lock();
        if state.1 {
            return Err(job);
        }
        state.0.push(lane, job)?;
        drop(state);
        self.wake.notify_one();
        Ok(())
    }

    /// Blocks until a job may run (`None` once stopped). Call [`HistoryReads::done`] after it.
    pub fn take(&self) -> Option<(Lane, T)> {
        let mut state = self.lock();
        loop {
            if state.1 {
                return None;
            }
            if let Some(next) = state.0.pop() {
                return Some(next);
            }
            state = self.wake.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The next job if one may run now, without blocking.
    #[cfg(test)]
    pub fn try_take(&self) -> Option<(Lane, T)> {
        self.lock().0.pop()
    }

    /// A job of `lane` finished.
    pub fn done(&self, lane: &Lane) {
        self.lock().0.done(lane);
        // A lane at its bound may have jobs a sleeping worker can take now.
        self.wake.notify_one();
    }

    /// Wakes every worker to exit; pushes are refused from now on.
    pub fn stop(&self) {
        self.lock().1 = true;
        self.wake.notify_all();
    }

    /// Jobs waiting, for metrics.
    pub fn waiting(&self) -> usize {
        self.lock().0.waiting()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> Lane {
        Lane::User(name.into())
    }

    #[test]
    fn lanes_take_turns_instead_of_first_come_first_served() {
        let mut q = FairQueue::new(8, 100);
        for n in 0..50 {
            q.push(user("flood"), n).unwrap();
        }
        q.push(user("victim"), 1000).unwrap();
        let (_, first) = q.pop().unwrap();
        let (lane, second) = q.pop().unwrap();
        assert_eq!(first, 0);
        assert_eq!((lane, second), (user("victim"), 1000), "not behind 49 more");
    }

    #[test]
    fn at_most_per_user_in_flight_for_one_lane() {
        let mut q = FairQueue::new(2, 100);
        for n in 0..5 {
            q.push(user("a"), n).unwrap();
        }
        assert_eq!(q.pop().map(|j| j.1), Some(0));
        assert_eq!(q.pop().map(|j| j.1), Some(1));
        assert!(q.pop().is_none(), "two in flight: the third waits");
        q.push(user("b"), 9).unwrap();
        assert_eq!(q.pop().map(|j| j.1), Some(9), "another lane still runs");
        q.done(&user("a"));
        assert_eq!(q.pop().map(|j| j.1), Some(2));
    }

    #[test]
    fn a_full_lane_refuses_and_others_still_queue() {
        let mut q = FairQueue::new(1, 2);
        q.push(user("a"), 1).unwrap();
        q.push(user("a"), 2).unwrap();
        assert_eq!(q.push(user("a"), 3), Err(3));
        assert!(q.push(user("b"), 4).is_ok());
        for n in 0..5 {
            assert!(
                q.push(Lane::Publish, n).is_ok(),
                "API publishes are not refused"
            );
        }
        assert_eq!(q.waiting(), 8);
    }

    #[test]
    fn idle_lanes_are_forgotten() {
        let mut q = FairQueue::new(1, 4);
        q.push(user("a"), 1).unwrap();
        let (lane, _) = q.pop().unwrap();
        q.done(&lane);
        assert!(q.lanes.is_empty() && q.ready.is_empty());
        assert!(q.pop().is_none());
    }

    #[test]
    fn shared_queue_hands_jobs_to_a_blocked_worker_and_stops() {
        let reads = std::sync::Arc::new(HistoryReads::new(1, 4));
        let worker = {
            let reads = std::sync::Arc::clone(&reads);
            std::thread::spawn(move || {
                let mut got = Vec::new();
                while let Some((lane, job)) = reads.take() {
                    got.push(job);
                    reads.done(&lane);
                    if got.len() == 2 {
                        reads.stop();
                    }
                }
                got
            })
        };
        reads.push(user("a"), 1).unwrap();
        reads.push(user("b"), 2).unwrap();
        let got = worker.join().unwrap();
        assert_eq!(got.len(), 2);
        assert!(reads.push(user("c"), 3).is_err(), "stopped: refused");
    }
}
