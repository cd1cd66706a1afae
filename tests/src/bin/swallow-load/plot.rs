//! The PNG of the offered-load sweep: what came out against what was offered,
//! and the p99 event → POST latency at each step, drawn from the results
//! JSON the tool writes (so `--replot` redraws a saved run).

use std::path::Path;

use anyhow::{Context, bail};
use plotters::prelude::*;

/// One step of the sweep, as stored under `sweep` in the results.
struct Step {
    offered: f64,
    achieved: f64,
    p99_ms: f64,
    /// The broker's own two hops at the same rate (absent in older results).
    floor_p99_ms: f64,
}

/// Fonts tried, in order, for the labels (plotters draws text with
/// ab_glyph from a TrueType file; Debian ships DejaVu in `fonts-dejavu-core`).
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
];

fn register_font() -> anyhow::Result<()> {
    for path in FONTS {
        if let Ok(bytes) = std::fs::read(path) {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return Ok(());
            }
        }
    }
    bail!("no TrueType font found for the plot's labels (tried {FONTS:?}); install fonts-dejavu-core")
}

fn steps(results: &serde_json::Value) -> anyhow::Result<Vec<Step>> {
    let sweep = results["sweep"].as_array().context("the results have no `sweep`")?;
    sweep
        .iter()
        .map(|s| {
            Ok(Step {
                offered: s["offered_msgs_per_s"].as_f64().context("offered_msgs_per_s")?,
                achieved: s["achieved_msgs_per_s"].as_f64().context("achieved_msgs_per_s")?,
                p99_ms: s["event_to_post_ms"]["p99"].as_f64().unwrap_or(f64::NAN),
                floor_p99_ms: s["broker_floor_ms"]["p99"].as_f64().unwrap_or(f64::NAN),
            })
        })
        .collect()
}

/// Draws the sweep in `results` to `path` (PNG, 1000 × 420).
pub fn draw(results: &serde_json::Value, path: &Path) -> anyhow::Result<()> {
    let steps = steps(results)?;
    anyhow::ensure!(!steps.is_empty(), "the sweep is empty");
    register_font()?;
    let ceiling = results["ceiling_msgs_per_s"].as_f64().unwrap_or(0.0);
    let max_rate = steps.iter().map(|s| s.offered.max(s.achieved)).fold(0.0, f64::max) * 1.1;

    let root = BitMapBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(500);
    let title = format!(
        "swallow pipeline, offered-load sweep (broker ceiling {:.0} msg/s)",
        ceiling
    );
    root.titled(&title, ("sans-serif", 18))?;

    let mut chart = ChartBuilder::on(&left)
        .margin(12)
        .margin_top(36)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .caption("replies out vs events offered", ("sans-serif", 15))
        .build_cartesian_2d(0.0..max_rate, 0.0..max_rate)?;
    chart
        .configure_mesh()
        .x_desc("offered (events/s)")
        .y_desc("achieved (replies/s)")
        .label_style(("sans-serif", 12))
        .draw()?;
    let points: Vec<(f64, f64)> = steps.iter().map(|s| (s.offered, s.achieved)).collect();
    let reference = (
        "achieved = offered",
        [(0.0, 0.0), (max_rate, max_rate)],
        BLACK.mix(0.25),
    );
    lines(&mut chart, reference, &[("swallow", &points[..], BLUE)])?;

    let p99 = |of: fn(&Step) -> f64| -> Vec<(f64, f64)> {
        steps
            .iter()
            .filter(|s| of(s).is_finite() && of(s) > 0.0)
            .map(|s| (s.offered, of(s)))
            .collect()
    };
    let (latencies, floor) = (p99(|s| s.p99_ms), p99(|s| s.floor_p99_ms));
    let top = latencies.iter().chain(&floor).map(|p| p.1).fold(25.0, f64::max) * 2.0;
    let mut chart = ChartBuilder::on(&right)
        .margin(12)
        .margin_top(36)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .caption("p99 event → POST (log scale)", ("sans-serif", 15))
        .build_cartesian_2d(0.0..max_rate, (1.0..top).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("offered (events/s)")
        .y_desc("p99 (ms)")
        .label_style(("sans-serif", 12))
        .draw()?;
    let reference = (
        "target at half load: 25 ms",
        [(0.0, 25.0), (max_rate, 25.0)],
        RED.mix(0.4),
    );
    let floor_color = RGBColor(0, 140, 70);
    let series = [
        ("swallow p99", &latencies[..], BLUE),
        ("broker alone, same two hops, p99", &floor[..], floor_color),
    ];
    lines(&mut chart, reference, &series)?;
    root.present().with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// A measured series: its legend, its points, its colour.
type Series<'a> = (&'a str, &'a [(f64, f64)], RGBColor);

/// A reference line and each series of measured points joined, with their legend.
fn lines<'a, DB, CT>(
    chart: &mut ChartContext<'a, DB, CT>,
    (reference_label, reference, reference_color): (&str, [(f64, f64); 2], RGBAColor),
    series: &[Series],
) -> anyhow::Result<()>
where
    DB: DrawingBackend + 'a,
    DB::ErrorType: 'static,
    CT: CoordTranslate<From = (f64, f64)>,
{
    chart
        .draw_series(LineSeries::new(reference, reference_color))?
        .label(reference_label)
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], reference_color));
    for &(label, points, color) in series {
        chart
            .draw_series(LineSeries::new(points.to_vec(), color.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2)));
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 12))
        .border_style(BLACK.mix(0.3))
        .background_style(WHITE)
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn draws_a_png_from_the_results() {
        if !super::FONTS.iter().any(|f| std::path::Path::new(f).exists()) {
            eprintln!("no font for the labels here; not drawing");
            return;
        }
        let step = |fraction: f64, achieved: f64, p99: f64| {
            serde_json::json!({"fraction": fraction, "offered_msgs_per_s": 4000.0 * fraction,
                "achieved_msgs_per_s": achieved, "event_to_post_ms": {"p99": p99},
                "broker_floor_ms": {"p99": p99 / 2.0}})
        };
        let results = serde_json::json!({
            "ceiling_msgs_per_s": 20000.0,
            "sweep": [step(0.25, 1000.0, 6.0), step(0.5, 2000.0, 12.0), step(1.25, 4100.0, 900.0)],
        });
        let path = std::env::temp_dir().join(format!("swallow-load-plot-{}.png", std::process::id()));
        super::draw(&results, &path).unwrap();
        let png = std::fs::read(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG file");
        assert!(png.len() > 10_000, "with something drawn on it ({} bytes)", png.len());
        assert!(super::draw(&serde_json::json!({}), &path).is_err(), "no sweep, no plot");
    }
}
