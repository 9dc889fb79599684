//! `--plot FILE.svg`: latency over time (p50/p99/max per second) above the latency
//! percentile curve of the whole run, drawn with plotters' SVG backend.

use crate::reporting::report::TimelinePoint;
use hdrhistogram::Histogram;
use plotters::prelude::*;
use std::path::Path;

/// Percentile curve points: x in "nines" (1 = 90%, 2 = 99%, 3 = 99.9%), y in ms.
pub fn percentile_curve(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let mut pts = Vec::new();
    let mut nines = 0.0;
    while nines <= 5.0 {
        let q = 1.0 - 10f64.powf(-nines);
        pts.push((nines, h.value_at_quantile(q) as f64 / 1000.0));
        nines += 0.05;
    }
    pts.push((5.0, h.max() as f64 / 1000.0));
    pts
}

pub fn write_svg(
    path: &Path,
    title: &str,
    timeline: &[TimelinePoint],
    hist: &Histogram<u64>,
) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| format!("plot {}: {e}", path.display());
    let root = SVGBackend::new(path, (1000, 800)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (top, bottom) = root.split_vertically(400);

    let t_max = timeline.iter().map(|p| p.sec + 1).max().unwrap_or(1) as f64;
    let y_max = timeline
        .iter()
        .map(|p| p.max_ms)
        .fold(0.0f64, f64::max)
        .max(1.0)
        * 1.05;
    let mut chart = ChartBuilder::on(&top)
        .caption(format!("{title}: latency per second"), ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..t_max, 0.0..y_max)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("seconds since start")
        .y_desc("ms from intended send")
        .draw()
        .map_err(|e| err(&e))?;
    type Pick = fn(&TimelinePoint) -> f64;
    let series: [(&str, RGBColor, Pick); 3] = [
        ("max", RED, |p| p.max_ms),
        ("p99", BLUE, |p| p.p99_ms),
        ("p50", GREEN, |p| p.p50_ms),
    ];
    for (name, color, f) in series {
        chart
            .draw_series(LineSeries::new(
                timeline
                    .iter()
                    .filter(|p| p.delivered > 0)
                    .map(|p| (p.sec as f64 + 1.0, f(p))),
                color,
            ))
            .map_err(|e| err(&e))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| err(&e))?;

    let curve = percentile_curve(hist);
    let c_max = curve.iter().map(|p| p.1).fold(0.0f64, f64::max).max(1.0) * 1.05;
    let mut chart = ChartBuilder::on(&bottom)
        .caption("latency percentiles (whole run)", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..5.0, 0.0..c_max)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .x_labels(6)
        .x_label_formatter(&|n| {
            let p = 100.0 * (1.0 - 10f64.powf(-n));
            format!("{p:.3}%")
        })
        .y_desc("ms")
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .draw_series(LineSeries::new(curve, BLUE))
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reporting::stats;

    #[test]
    fn curve_is_monotonic_and_svg_is_written() {
        let mut h = stats::new_hist();
        for v in 1..=10_000u64 {
            h.record(v).unwrap();
        }
        let c = percentile_curve(&h);
        assert!(c.windows(2).all(|w| w[1].1 >= w[0].1));
        assert!((c.last().unwrap().1 - 10.0).abs() < 0.1);
        assert!(percentile_curve(&stats::new_hist()).is_empty());

        let tl: Vec<TimelinePoint> = (0..5)
            .map(|s| TimelinePoint {
                sec: s,
                sent: 10,
                delivered: 40,
                p50_ms: 1.0,
                p99_ms: 2.0,
                max_ms: 3.0,
            })
            .collect();
        let path = std::env::temp_dir().join(format!("lt-plot-{}.svg", std::process::id()));
        write_svg(&path, "test", &tl, &h).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(svg.contains("<svg") && svg.contains("polyline"));
    }
}
