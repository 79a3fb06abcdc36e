//! PNG charts of an analysis: each model's group L2 norms as horizontal
//! bars, and the pairwise cosine matrix as a labelled heatmap. Text is set
//! in DejaVu Sans, embedded, so no system fonts are needed.

use crate::error::{Error, Result};
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};
use std::path::Path;
use std::sync::Once;

const FONT: &str = "sans-serif";

fn ensure_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
    });
}

fn plot_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::io("cannot draw", path, std::io::Error::other(e.to_string()))
}

/// Horizontal bars of each group's L2, one row per group, in the given order.
pub fn group_bars(title: &str, groups: &[(String, f64)], path: &Path) -> Result<()> {
    ensure_font();
    let rows = groups.len().max(1);
    let height = (90 + 22 * rows) as u32;
    let label_width = groups.iter().map(|(g, _)| g.len()).max().unwrap_or(5) as u32 * 8 + 20;
    let max = groups
        .iter()
        .map(|(_, v)| *v)
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max);
    let x_max = if max > 0.0 { max * 1.15 } else { 1.0 };
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::new(path, (900, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("{title}: task-vector L2 by group"), (FONT, 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(label_width)
            .build_cartesian_2d(0.0..x_max, (0..rows - 1).into_segmented())?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(rows)
            .y_label_formatter(&|v| match v {
                // Row 0 is drawn at the top.
                SegmentValue::CenterOf(i) if *i < rows => groups
                    .get(rows - 1 - *i)
                    .map(|g| g.0.clone())
                    .unwrap_or_default(),
                _ => String::new(),
            })
            .x_desc("L2 norm")
            .label_style((FONT, 13))
            .draw()?;
        chart.draw_series(groups.iter().enumerate().map(|(i, (_, v))| {
            let v = if v.is_finite() { *v } else { 0.0 };
            let y = rows - 1 - i;
            let mut bar = Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(y)),
                    (v, SegmentValue::Exact(y + 1)),
                ],
                RGBColor(70, 110, 180).filled(),
            );
            bar.set_margin(3, 3, 0, 0);
            bar
        }))?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| plot_error(path, e))
}

/// A heatmap of the cosine matrix with the value in each cell.
pub fn cosine_heatmap(names: &[String], matrix: &[Vec<f64>], path: &Path) -> Result<()> {
    ensure_font();
    let n = names.len().max(1);
    let cell = 70u32;
    let label = names.iter().map(|s| s.len()).max().unwrap_or(4) as u32 * 8 + 40;
    let size = (label + cell * n as u32 + 40, cell * n as u32 + 100);
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::new(path, size).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("pairwise cosine similarity of task vectors", (FONT, 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(label)
            .build_cartesian_2d((0..n - 1).into_segmented(), (0..n - 1).into_segmented())?;
        // Columns are numbered; rows carry "name [k]", row 1 at the top.
        let column = |v: &SegmentValue<usize>| match v {
            SegmentValue::CenterOf(j) if *j < n => format!("[{}]", j + 1),
            _ => String::new(),
        };
        let row = |v: &SegmentValue<usize>| match v {
            SegmentValue::CenterOf(i) if *i < n => {
                let k = n - 1 - *i;
                format!("{} [{}]", names.get(k).cloned().unwrap_or_default(), k + 1)
            }
            _ => String::new(),
        };
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(n)
            .y_labels(n)
            .x_label_formatter(&column)
            .y_label_formatter(&row)
            .label_style((FONT, 13))
            .draw()?;
        for (i, row) in matrix.iter().enumerate() {
            for (j, &c) in row.iter().enumerate() {
                let c = if c.is_finite() {
                    c.clamp(-1.0, 1.0)
                } else {
                    0.0
                };
                // Blue for -1, white for 0, red for +1.
                let t = c.abs();
                let fade = |full: u8| (255.0 - (255.0 - f64::from(full)) * t) as u8;
                let color = if c >= 0.0 {
                    RGBColor(fade(200), fade(40), fade(40))
                } else {
                    RGBColor(fade(40), fade(70), fade(200))
                };
                let (x0, y0) = (SegmentValue::Exact(j), SegmentValue::Exact(n - 1 - i));
                let (x1, y1) = (SegmentValue::Exact(j + 1), SegmentValue::Exact(n - i));
                chart.draw_series(std::iter::once(Rectangle::new(
                    [(x0, y0), (x1, y1)],
                    color.filled(),
                )))?;
                let text_color = if t > 0.6 { WHITE } else { BLACK };
                chart.draw_series(std::iter::once(Text::new(
                    format!("{c:.2}"),
                    (SegmentValue::CenterOf(j), SegmentValue::CenterOf(n - 1 - i)),
                    (FONT, 14).into_font().color(&text_color).pos(
                        plotters::style::text_anchor::Pos::new(
                            plotters::style::text_anchor::HPos::Center,
                            plotters::style::text_anchor::VPos::Center,
                        ),
                    ),
                )))?;
            }
        }
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| plot_error(path, e))
}
