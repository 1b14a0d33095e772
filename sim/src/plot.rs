//! SVG plots (plotters, SVG backend, line series only): per-round dirty vs sent bytes,
//! throughput over time, and the sweep of total time and downtime against dirty rate.

use std::path::Path;

use plotters::prelude::*;

use crate::report::Report;

const COLORS: [RGBColor; 6] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
];

fn err<E: std::fmt::Display>(e: E) -> String {
    format!("plot: {e}")
}

/// One line of a chart.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// Draws `series` on one chart into `area`.
fn chart<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let pts = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0f64);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1) = (0.0, 1.0);
    }
    if x1 - x0 < 1e-9 {
        x1 = x0 + 1.0;
    }
    if y1 <= 0.0 {
        y1 = 1.0;
    }
    let mut c = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, 0f64..y1 * 1.08)
        .map_err(err)?;
    c.configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .draw()
        .map_err(err)?;
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        c.draw_series(LineSeries::new(
            s.points.iter().copied(),
            color.stroke_width(2),
        ))
        .map_err(err)?
        .label(s.label.clone())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(err)?;
    Ok(())
}

/// Per-round dirty bytes vs bytes sent, in MiB.
pub fn rounds(report: &Report, path: &Path) -> Result<(), String> {
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let dirty = report
        .rounds
        .iter()
        .map(|r| (r.round as f64, mib(r.dirty_bytes)))
        .collect();
    let sent = report
        .rounds
        .iter()
        .map(|r| (r.round as f64, mib(r.sent_bytes)))
        .collect();
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    chart(
        &root,
        &format!(
            "seed {} {}: dirty vs sent per round",
            report.seed, report.profile
        ),
        "round",
        "MiB",
        &[
            Series {
                label: "dirty".into(),
                points: dirty,
            },
            Series {
                label: "sent (data)".into(),
                points: sent,
            },
        ],
    )?;
    root.present().map_err(err)
}

/// Payload throughput over time.
pub fn throughput(report: &Report, path: &Path) -> Result<(), String> {
    let pts = report.throughput.iter().map(|p| (p[0], p[1])).collect();
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    chart(
        &root,
        &format!(
            "seed {} {}: payload throughput ({} Gb/s link)",
            report.seed, report.profile, report.link_gbps
        ),
        "time (ms)",
        "Gb/s",
        &[Series {
            label: "placed payload".into(),
            points: pts,
        }],
    )?;
    root.present().map_err(err)
}

/// Total time (left) and downtime (right) against dirty rate, one line per profile.
pub fn sweep(total: &[Series], downtime: &[Series], path: &Path) -> Result<(), String> {
    let root = SVGBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (l, r) = root.split_horizontally(700);
    chart(
        &l,
        "total migration time",
        "dirty rate (GB/s)",
        "seconds",
        total,
    )?;
    chart(
        &r,
        "downtime",
        "dirty rate (GB/s)",
        "milliseconds",
        downtime,
    )?;
    root.present().map_err(err)
}
