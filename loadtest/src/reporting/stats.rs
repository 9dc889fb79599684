//! Counters and latency histograms, their merging, and their transport between processes
//! (HDR V2 serialization + base64, so a worker's histogram merges losslessly in the parent).

use base64::Engine as _;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Latencies are recorded in microseconds, up to an hour, 3 significant digits.
pub const HIST_MAX_US: u64 = 3_600_000_000;

pub fn new_hist() -> Histogram<u64> {
    // Bounds are constants that hdrhistogram accepts; failure would be a programming error.
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("static histogram bounds")
}

pub fn hist_to_b64(h: &Histogram<u64>) -> String {
    let mut buf = Vec::new();
    // Serializing into a Vec only fails on internal inconsistencies; fall back to empty.
    if V2Serializer::new().serialize(h, &mut buf).is_err() {
        buf.clear();
    }
    base64::engine::general_purpose::STANDARD.encode(buf)
}

pub fn hist_from_b64(s: &str) -> Result<Histogram<u64>, String> {
    if s.is_empty() {
        return Ok(new_hist());
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| format!("histogram base64: {e}"))?;
    let h: Histogram<u64> = Deserializer::new()
        .deserialize(&mut raw.as_slice())
        .map_err(|e| format!("histogram decode: {e:?}"))?;
    Ok(h)
}

/// Adds `from` into `into`, clamping values if ranges differ instead of failing.
pub fn merge_hist(into: &mut Histogram<u64>, from: &Histogram<u64>) {
    if into.add(from).is_err() {
        for v in from.iter_recorded() {
            into.saturating_record_n(v.value_iterated_to(), v.count_at_value());
        }
    }
}

/// Event counts from the event loops; all fields add when merged.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counters {
    /// Messages written to a socket buffer.
    pub sent: u64,
    /// Messages whose sender connection was closed when due.
    pub skipped_dead_sender: u64,
    /// Messages dropped because a connection's unsent buffer passed its cap.
    pub skipped_backpressure: u64,
    /// First arrival of an expected delivery.
    pub delivered: u64,
    pub duplicates: u64,
    /// Delivered to a user that was neither sender nor recipient.
    pub misrouted: u64,
    /// Marker of this run but an earlier phase (arrived after that phase's drain).
    pub late: u64,
    /// newMessage without this run's marker.
    pub foreign: u64,
    pub error_frames: u64,
    pub other_frames: u64,
    pub pings: u64,
    pub closes_by_server: u64,
    pub protocol_errors: u64,
    pub disconnects: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
}

impl Counters {
    pub fn add(&mut self, o: &Counters) {
        self.sent += o.sent;
        self.skipped_dead_sender += o.skipped_dead_sender;
        self.skipped_backpressure += o.skipped_backpressure;
        self.delivered += o.delivered;
        self.duplicates += o.duplicates;
        self.misrouted += o.misrouted;
        self.late += o.late;
        self.foreign += o.foreign;
        self.error_frames += o.error_frames;
        self.other_frames += o.other_frames;
        self.pings += o.pings;
        self.closes_by_server += o.closes_by_server;
        self.protocol_errors += o.protocol_errors;
        self.disconnects += o.disconnects;
        self.bytes_read += o.bytes_read;
        self.bytes_written += o.bytes_written;
    }
}

pub fn merge_codes(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
    for (k, v) in from {
        *into.entry(k.clone()).or_default() += v;
    }
}

/// Latency percentiles in milliseconds, for reports.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            mean_ms: h.mean() / 1000.0,
        }
    }
}

/// One second of activity, merged across threads (and workers) for progress and plots.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tick {
    /// Seconds since the run's first phase started.
    pub sec: u64,
    pub counters: Counters,
    /// Latencies of deliveries that arrived during this second.
    pub hist_b64: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_round_trips_and_merges() {
        let mut a = new_hist();
        let mut b = new_hist();
        for v in 1..=1000u64 {
            a.record(v).unwrap();
            b.record(v * 1000).unwrap();
        }
        let a2 = hist_from_b64(&hist_to_b64(&a)).unwrap();
        assert_eq!(a2.len(), 1000);
        assert_eq!(a2.max(), a.max());
        let mut m = a2;
        merge_hist(&mut m, &hist_from_b64(&hist_to_b64(&b)).unwrap());
        assert_eq!(m.len(), 2000);
        assert!(m.value_at_quantile(0.999) > 900_000);
        assert!(hist_from_b64("").unwrap().is_empty());
        assert!(hist_from_b64("!!!").is_err());
        assert!(hist_from_b64("AAAA").is_err());
    }

    #[test]
    fn percentiles_in_ms() {
        let mut h = new_hist();
        for v in 1..=100u64 {
            h.record(v * 1000).unwrap();
        }
        let p = Percentiles::of(&h);
        assert_eq!(p.count, 100);
        assert!((p.p50_ms - 50.0).abs() < 0.1);
        assert!((p.p99_ms - 99.0).abs() < 0.1);
        assert!((p.max_ms - 100.0).abs() < 0.1);
        assert_eq!(Percentiles::of(&new_hist()), Percentiles::default());
    }

    #[test]
    fn counters_add() {
        let mut a = Counters {
            sent: 1,
            delivered: 2,
            ..Default::default()
        };
        a.add(&Counters {
            sent: 3,
            duplicates: 4,
            ..Default::default()
        });
        assert_eq!((a.sent, a.delivered, a.duplicates), (4, 2, 4));
    }
}
