//! The scenarios: what traffic a run makes and how it is judged. `churn`, `room` and `soak`
//! are self-contained; the delivery scenarios (direct, fanout, idle, ramp) keep their
//! population and message marker here and run on the orchestration's event loops.

pub mod churn;
pub mod delivery;
pub mod marker;
pub mod population;
pub mod room;
pub mod soak;
