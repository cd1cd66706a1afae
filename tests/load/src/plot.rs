//! The PNG of the offered-load sweep: what came out against what was offered,
//! and the p99 event → POST latency at each step, and, when the run had the
//! realistic-scale step, its cost against the number of integrations; drawn
//! from the results JSON the tool writes (so `--replot` redraws a saved run).

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

/// The realistic-scale step's rows, as stored under `scale.sizes`:
/// (integrations, broker ms of CPU per 1,000 events, under-limit p99 ms).
fn scale_rows(results: &serde_json::Value) -> Vec<(f64, f64, f64)> {
    results["scale"]["sizes"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .filter_map(|r| {
                    Some((
                        r["integrations"].as_f64()?,
                        r["broker_ms_per_1k_events"].as_f64().unwrap_or(f64::NAN),
                        r["under_limit_event_to_post_ms"]["p99"].as_f64().unwrap_or(f64::NAN),
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Draws the sweep in `results` to `path` (PNG, 1000 × 420; 1500 × 420 with
/// the realistic-scale panel).
pub fn draw(results: &serde_json::Value, path: &Path) -> anyhow::Result<()> {
    let steps = steps(results)?;
    anyhow::ensure!(!steps.is_empty(), "the sweep is empty");
    register_font()?;
    let ceiling = results["ceiling_msgs_per_s"].as_f64().unwrap_or(0.0);
    let max_rate = steps.iter().map(|s| s.offered.max(s.achieved)).fold(0.0, f64::max) * 1.1;
    let scale = scale_rows(results);

    let width = if scale.is_empty() { 1000 } else { 1500 };
    let root = BitMapBackend::new(path, (width, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, rest) = root.split_horizontally(500);
    let (right, third) = rest.split_horizontally(500);
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
    if !scale.is_empty() {
        draw_scale(&third, &scale)?;
    }
    root.present().with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The realistic-scale panel: the broker's CPU per 1,000 events and the p99
/// event → POST of integrations under their limit, against the number of
/// integrations (both axes log scale).
fn draw_scale<DB>(area: &DrawingArea<DB, plotters::coord::Shift>, rows: &[(f64, f64, f64)]) -> anyhow::Result<()>
where
    DB: DrawingBackend,
    DB::ErrorType: 'static,
{
    let cpu: Vec<(f64, f64)> = rows.iter().filter(|r| r.1.is_finite()).map(|r| (r.0, r.1)).collect();
    let p99: Vec<(f64, f64)> = rows.iter().filter(|r| r.2.is_finite()).map(|r| (r.0, r.2)).collect();
    let most = rows.iter().map(|r| r.0).fold(10.0, f64::max) * 2.0;
    let top = cpu.iter().chain(&p99).map(|p| p.1).fold(10.0, f64::max) * 30.0; // room for the legend
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .margin_top(36)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .caption("realistic scale: cost vs integrations", ("sans-serif", 15))
        .build_cartesian_2d((50.0..most).log_scale(), (1.0..top).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("integrations (Zipf traffic, 1% slow handlers)")
        .y_desc("ms")
        .label_style(("sans-serif", 12))
        .draw()?;
    let series = [
        ("broker CPU per 1,000 events (ms)", &cpu[..], RGBColor(150, 60, 0)),
        ("p99 event → POST under the limit (ms)", &p99[..], BLUE),
    ];
    let reference = ("10 ms", [(50.0, 10.0), (most, 10.0)], RED.mix(0.4));
    lines(&mut chart, reference, &series)
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
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "no font for the plot's labels (install fonts-dejavu-core)"
            );
            eprintln!("SKIPPED: no font for the labels here; not drawing");
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
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG file");
        assert!(png.len() > 10_000, "with something drawn on it ({} bytes)", png.len());
        // With the realistic-scale step, a third panel: a wider picture.
        let mut with_scale = results.clone();
        let row = |n: f64, cpu: f64, p99: f64| {
            serde_json::json!({"integrations": n, "broker_ms_per_1k_events": cpu,
                "under_limit_event_to_post_ms": {"p99": p99}})
        };
        with_scale["scale"] = serde_json::json!({"sizes": [row(100.0, 150.0, 8.0), row(10000.0, 200.0, 20.0)]});
        super::draw(&with_scale, &path).unwrap();
        let wide = std::fs::read(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let width = |png: &[u8]| u32::from_be_bytes(png[16..20].try_into().unwrap());
        assert_eq!((width(&png), width(&wide)), (1000, 1500));
        assert!(super::draw(&serde_json::json!({}), &path).is_err(), "no sweep, no plot");
    }
}
