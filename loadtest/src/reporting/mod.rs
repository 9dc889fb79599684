//! What a run reports: histograms and counters (`stats`), the final report and progress
//! lines (`report`), the SVG plot, and samples of the machine and the server (`sysinfo`).

pub mod plot;
pub mod report;
pub mod stats;
pub mod sysinfo;
