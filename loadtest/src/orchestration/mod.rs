//! Runs the delivery scenarios: event-loop threads (`engine`), one process's threads and
//! phases (`shard`), the delivery ledger, the phase plan (`director`), and the parent/worker
//! protocol (`control`, `fleet`) for runs over several processes.

pub mod control;
pub mod director;
pub mod engine;
pub mod fleet;
pub mod ledger;
pub mod shard;
