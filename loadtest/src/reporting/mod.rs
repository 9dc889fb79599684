//! What a run reports: histograms and counters (`stats`), the final report and progress
//! lines (`report`), the SVG plot, samples of the machine and the server (`sysinfo`), and the
//! server side's CPU over each phase's send window (`servercpu`).

pub mod plot;
pub mod report;
pub mod servercpu;
pub mod stats;
pub mod sysinfo;
