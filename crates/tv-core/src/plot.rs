//! PNG charts of an analysis: each model's group L2 norms as horizontal
//! bars, the pairwise cosine and sign-conflict matrices as labelled
//! heatmaps, and line charts of cosines by layer and of trimmed energy. Text is set
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

/// The most bars a group chart draws; further groups share one bar.
pub const MAX_BARS: usize = 40;
/// The most characters of a label drawn.
const MAX_LABEL: usize = 48;

/// A label cut to [`MAX_LABEL`] characters, with control characters escaped.
fn label(text: &str) -> String {
    let text = crate::error::escape_controls(text);
    if text.chars().count() <= MAX_LABEL {
        return text.into_owned();
    }
    let mut cut: String = text.chars().take(MAX_LABEL - 1).collect();
    cut.push('…');
    cut
}

/// The bars of a group chart: every group when there are at most
/// [`MAX_BARS`], else the `MAX_BARS - 1` largest (in the given order) and
/// one "N others" bar holding the L2 norm of all the rest together
/// (√Σ L2², as the groups' elements are disjoint).
pub fn fold_groups(groups: &[(String, f64)]) -> Vec<(String, f64)> {
    if groups.len() <= MAX_BARS {
        return groups.iter().map(|(g, v)| (label(g), *v)).collect();
    }
    let keep = MAX_BARS - 1;
    let size = |v: f64| if v.is_nan() { f64::INFINITY } else { v };
    let mut order: Vec<usize> = (0..groups.len()).collect();
    // Largest first; ties keep the earlier group.
    order.sort_by(|&a, &b| {
        size(groups[b].1)
            .total_cmp(&size(groups[a].1))
            .then(a.cmp(&b))
    });
    let mut shown: Vec<usize> = order[..keep].to_vec();
    shown.sort_unstable();
    let rest = &order[keep..];
    let others = rest
        .iter()
        .map(|&i| groups[i].1 * groups[i].1)
        .sum::<f64>()
        .sqrt();
    let mut bars: Vec<(String, f64)> = shown
        .iter()
        .map(|&i| (label(&groups[i].0), groups[i].1))
        .collect();
    bars.push((format!("{} others", rest.len()), others));
    bars
}

/// Horizontal bars of each group's L2, one row per group, in the given
/// order; beyond [`MAX_BARS`] groups the smallest share one bar, so the
/// image stays the same size however large the model.
pub fn group_bars(title: &str, groups: &[(String, f64)], path: &Path) -> Result<()> {
    ensure_font();
    let groups = fold_groups(groups);
    let title = label(title);
    let rows = groups.len().max(1);
    let height = (90 + 22 * rows) as u32;
    let label_width = groups
        .iter()
        .map(|(g, _)| g.chars().count())
        .max()
        .unwrap_or(5) as u32
        * 8
        + 20;
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
    heatmaps(
        names,
        &[("pairwise cosine similarity of task vectors", matrix)],
        path,
    )
}

/// Side-by-side heatmaps of the sign-conflict fractions, plain and
/// weighted by min(|d_i|, |d_j|).
pub fn sign_conflict_heatmaps(
    names: &[String],
    plain: &[Vec<f64>],
    weighted: &[Vec<f64>],
    path: &Path,
) -> Result<()> {
    heatmaps(
        names,
        &[
            ("sign conflict (fraction of shared non-zeros)", plain),
            ("sign conflict weighted by min(|d_i|, |d_j|)", weighted),
        ],
        path,
    )
}

/// Labelled K×K heatmaps side by side, each with its title: blue for −1,
/// white for 0, red for +1, the value in each cell when cells are large.
fn heatmaps(names: &[String], panels: &[(&str, &[Vec<f64>])], path: &Path) -> Result<()> {
    ensure_font();
    let n = names.len().max(1);
    let names: Vec<String> = names.iter().map(|s| label(s)).collect();
    // Cells shrink with many models, so the image stays near 2400 pixels.
    let cell = (2400 / n as u32).clamp(2, 70);
    let label = names.iter().map(|s| s.chars().count()).max().unwrap_or(4) as u32 * 8 + 40;
    let panel = (label + cell * n as u32 + 40).max(420);
    let size = (panel * panels.len() as u32, cell * n as u32 + 100);
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::new(path, size).into_drawing_area();
        root.fill(&WHITE)?;
        let areas = root.split_evenly((1, panels.len()));
        for (area, (title, matrix)) in areas.iter().zip(panels) {
            draw_heatmap(area, title, &names, matrix, cell, label)?;
        }
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| plot_error(path, e))
}

fn draw_heatmap(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    title: &str,
    names: &[String],
    matrix: &[Vec<f64>],
    cell: u32,
    label: u32,
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let n = names.len().max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(label)
        .build_cartesian_2d((0..n - 1).into_segmented(), (0..n - 1).into_segmented())?;
    // Columns are numbered; rows carry "name [k]", row 1 at the top.
    let column = |v: &SegmentValue<usize>| match v {
        SegmentValue::CenterOf(j) if *j < n && n > 40 && (j + 1) % 10 != 0 => String::new(),
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
        .x_labels(n.min(40))
        .y_labels(n.min(40))
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
            if cell < 40 {
                continue;
            }
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
    Ok(())
}

/// The most lines a chart labels in its legend.
const MAX_LEGEND: usize = 15;

/// One line of a line chart: its label and its (x, y) points (None: gap).
pub struct Line {
    pub label: String,
    pub points: Vec<(f64, Option<f64>)>,
}

/// Each pair's cosine against the layer group, groups in the given order
/// (`embed`, `layer_0`, ..., `lm_head`, `other`) along x.
pub fn cosine_by_layer(groups: &[String], lines: &[Line], path: &Path) -> Result<()> {
    by_group(
        "cosine of each pair of task vectors by layer group",
        "cosine",
        groups,
        lines,
        (-1.0, 1.0),
        path,
    )
}

/// Lines over the layer groups (in the given order along x).
pub fn by_group(
    caption: &str,
    y_desc: &str,
    groups: &[String],
    lines: &[Line],
    y: (f64, f64),
    path: &Path,
) -> Result<()> {
    let ticks: Vec<String> = groups
        .iter()
        .map(|g| match g.strip_prefix("layer_") {
            Some(n) => n.to_string(),
            None => label(g),
        })
        .collect();
    line_chart(
        caption,
        ("layer group", y_desc),
        (0.0, (groups.len().max(2) - 1) as f64),
        y,
        Some(&ticks),
        &[("", lines)],
        path,
    )
}

/// Energy kept against density, one line per model; one panel per scope.
pub fn trim_energy(tensor: &[Line], model: &[Line], path: &Path) -> Result<()> {
    line_chart(
        "",
        ("density", "fraction of energy kept"),
        (0.0, 1.0),
        (0.0, 1.0),
        None,
        &[
            ("energy kept, each tensor trimmed", tensor),
            ("energy kept, one threshold per model", model),
        ],
        path,
    )
}

/// Panels of lines side by side, over shared axes.
fn line_chart(
    caption: &str,
    axes: (&str, &str),
    x: (f64, f64),
    y: (f64, f64),
    ticks: Option<&[String]>,
    panels: &[(&str, &[Line])],
    path: &Path,
) -> Result<()> {
    ensure_font();
    let size = (760 * panels.len() as u32, 520);
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::new(path, size).into_drawing_area();
        root.fill(&WHITE)?;
        let root = if caption.is_empty() {
            root
        } else {
            root.titled(caption, (FONT, 20))?
        };
        let areas = root.split_evenly((1, panels.len()));
        for (area, (title, lines)) in areas.iter().zip(panels) {
            let mut chart = ChartBuilder::on(area)
                .caption(*title, (FONT, 16))
                .margin(14)
                .margin_right(36)
                .x_label_area_size(40)
                .y_label_area_size(56)
                .build_cartesian_2d(x.0..x.1, y.0..y.1)?;
            let tick = |v: &f64| match ticks {
                Some(t) => {
                    let i = v.round();
                    if (v - i).abs() < 1e-6 && i >= 0.0 {
                        t.get(i as usize).cloned().unwrap_or_default()
                    } else {
                        String::new()
                    }
                }
                None => format!("{v:.1}"),
            };
            let n_ticks = ticks.map_or(11, |t| t.len().clamp(2, 25));
            chart
                .configure_mesh()
                .x_desc(axes.0)
                .y_desc(axes.1)
                .x_labels(n_ticks)
                .x_label_formatter(&tick)
                .label_style((FONT, 13))
                .draw()?;
            for (k, line) in lines.iter().enumerate() {
                // A line without a point (a zero task vector) is left out.
                if !line.points.iter().any(|p| p.1.is_some_and(f64::is_finite)) {
                    continue;
                }
                let color = Palette99::pick(k).to_rgba();
                // Gaps split a line into runs.
                let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
                for &(px, py) in &line.points {
                    match py.filter(|v| v.is_finite()) {
                        Some(v) => runs.last_mut().expect("run").push((px, v)),
                        None => runs.push(Vec::new()),
                    }
                }
                for (r, run) in runs.into_iter().enumerate() {
                    let series =
                        chart.draw_series(LineSeries::new(run.clone(), color.stroke_width(2)))?;
                    if r == 0 && k < MAX_LEGEND && lines.len() > 1 {
                        series.label(label(&line.label)).legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                        });
                    }
                    chart.draw_series(run.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
                }
            }
            if lines.len() > 1 {
                chart
                    .configure_series_labels()
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK.mix(0.3))
                    .label_font((FONT, 12))
                    .position(SeriesLabelPosition::LowerRight)
                    .draw()?;
            }
        }
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| plot_error(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Width and height from a PNG's IHDR chunk.
    fn png_size(path: &Path) -> (u32, u32) {
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        let be = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().unwrap());
        (be(16), be(20))
    }

    #[test]
    fn thousands_of_groups_fold_into_one_bar_at_a_bounded_size() {
        let groups: Vec<(String, f64)> = (0..5000)
            .map(|i| (format!("layer_{i}"), ((i * 7919) % 5000) as f64 / 100.0))
            .collect();
        let bars = fold_groups(&groups);
        assert_eq!(bars.len(), MAX_BARS);
        assert_eq!(bars.last().unwrap().0, "4961 others");
        // The 39 largest, in their original order.
        let mut sizes: Vec<f64> = groups.iter().map(|g| g.1).collect();
        sizes.sort_by(|a, b| b.total_cmp(a));
        let smallest_shown = sizes[MAX_BARS - 2];
        assert!(bars[..MAX_BARS - 1].iter().all(|b| b.1 >= smallest_shown));
        let rest: f64 = sizes[MAX_BARS - 1..]
            .iter()
            .map(|v| v * v)
            .sum::<f64>()
            .sqrt();
        assert!((bars.last().unwrap().1 - rest).abs() <= 1e-9 * rest);
        let order: Vec<usize> = bars[..MAX_BARS - 1]
            .iter()
            .map(|b| b.0["layer_".len()..].parse().unwrap())
            .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bars.png");
        group_bars("m\n\u{1b}[31m", &groups, &path).unwrap();
        let (w, h) = png_size(&path);
        assert_eq!(w, 900);
        assert!(h <= 90 + 22 * MAX_BARS as u32, "{h}");
        // Few groups are drawn as they are.
        assert_eq!(fold_groups(&groups[..3]).len(), 3);
        // A huge group name does not widen the chart without bound.
        let long = vec![("x".repeat(100_000), 1.0)];
        group_bars("m", &long, &path).unwrap();
        assert_eq!(png_size(&path).0, 900);
    }

    #[test]
    fn a_heatmap_of_many_models_stays_bounded() {
        let n = 300;
        let names: Vec<String> = (0..n).map(|i| format!("model-{i}")).collect();
        let matrix: Vec<Vec<f64>> = (0..n)
            .map(|i| (0..n).map(|j| if i == j { 1.0 } else { 0.1 }).collect())
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cos.png");
        cosine_heatmap(&names, &matrix, &path).unwrap();
        let (w, h) = png_size(&path);
        assert!(w <= 3000 && h <= 3000, "{w}x{h}");
    }
}
