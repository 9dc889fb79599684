//! Fixed-bucket histograms for `/metrics`: each writer owns its histogram's atomics (a core's,
//! or the backplane's shared one), observing costs a few relaxed adds, and `/metrics` sums the
//! buckets of every copy into one Prometheus histogram.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds of the latency buckets, in microseconds: 50 µs to 5 s.
pub const LATENCY_BOUNDS_US: [u64; 14] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
    5_000_000,
];

/// Upper bounds of the byte-size buckets: 0 (nothing left) to 4 MiB.
pub const BYTES_BOUNDS: [u64; 10] = [
    0, 1_024, 4_096, 16_384, 65_536, 131_072, 262_144, 524_288, 1_048_576, 4_194_304,
];

/// A histogram over bounds fixed at compile time. Values above the last bound count only in
/// `+Inf` (the total).
#[derive(Debug)]
pub struct Histogram<const N: usize> {
    bounds: &'static [u64; N],
    buckets: [AtomicU64; N],
    count: AtomicU64,
    sum: AtomicU64,
}

impl<const N: usize> Histogram<N> {
    /// An empty histogram over `bounds` (ascending).
    pub const fn new(bounds: &'static [u64; N]) -> Self {
        Histogram {
            bounds,
            buckets: [const { AtomicU64::new(0) }; N],
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0),
        }
    }

    /// Counts `value` (microseconds for latencies, bytes for sizes).
    #[inline]
    pub fn observe(&self, value: u64) {
        let bucket = self.bounds.partition_point(|&bound| bound < value);
        if let Some(b) = self.buckets.get(bucket) {
            b.fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum.fetch_add(value, Relaxed);
    }

    /// Counts a duration, in microseconds.
    #[inline]
    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_micros().min(u64::MAX as u128) as u64);
    }
}

/// How a histogram's values print: latencies in seconds (from microseconds), sizes as they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Observed in microseconds, shown in seconds.
    Seconds,
    /// Shown as observed.
    Bytes,
}

impl Unit {
    fn show(self, v: u64) -> String {
        match self {
            Unit::Seconds => format!("{}", v as f64 / 1e6),
            Unit::Bytes => v.to_string(),
        }
    }
}

/// Writes one Prometheus histogram family, the sum of `copies`.
pub fn render<'a, const N: usize>(
    out: &mut String,
    name: &str,
    help: &str,
    unit: Unit,
    copies: impl Iterator<Item = &'a Histogram<N>> + Clone,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    let Some(first) = copies.clone().next() else {
        return;
    };
    let mut cumulative = 0;
    for (i, bound) in first.bounds.iter().enumerate() {
        cumulative += copies
            .clone()
            .map(|h| h.buckets[i].load(Relaxed))
            .sum::<u64>();
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"{}\"}} {cumulative}",
            unit.show(*bound)
        );
    }
    let count: u64 = copies.clone().map(|h| h.count.load(Relaxed)).sum();
    let sum: u64 = copies.map(|h| h.sum.load(Relaxed)).sum();
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
    let _ = writeln!(out, "{name}_sum {}", unit.show(sum));
    let _ = writeln!(out, "{name}_count {count}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_summed_over_copies() {
        let a = Histogram::new(&LATENCY_BOUNDS_US);
        let b = Histogram::new(&LATENCY_BOUNDS_US);
        a.observe(40); // <= 50µs
        a.observe(50); // <= 50µs (bounds are inclusive)
        b.observe(700); // <= 1ms
        b.observe_duration(Duration::from_secs(9)); // +Inf only
        let mut out = String::new();
        render(
            &mut out,
            "x_seconds",
            "X.",
            Unit::Seconds,
            [&a, &b].into_iter(),
        );
        assert!(
            out.contains("x_seconds_bucket{le=\"0.00005\"} 2\n"),
            "{out}"
        );
        assert!(out.contains("x_seconds_bucket{le=\"0.0005\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"0.001\"} 3\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"5\"} 3\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("x_seconds_count 4\n"), "{out}");
        assert!(out.contains("x_seconds_sum 9.00079\n"), "{out}");
    }

    #[test]
    fn zero_bytes_has_its_own_bucket() {
        let h = Histogram::new(&BYTES_BOUNDS);
        h.observe(0);
        h.observe(1);
        let mut out = String::new();
        render(&mut out, "b_bytes", "B.", Unit::Bytes, std::iter::once(&h));
        assert!(out.contains("b_bytes_bucket{le=\"0\"} 1\n"), "{out}");
        assert!(out.contains("b_bytes_bucket{le=\"1024\"} 2\n"), "{out}");
    }
}
