//! Drawing a [`Scene`] with plotters, on any backend (PNG bitmap or SVG).
//!
//! ```text
//! ┌──────────────────────── title ────────────────────────┬──────────────┐
//! │ y label │ chart: grid, curves, markers                │ Runs         │
//! │ (loss,  │                                             │ ━ run-a      │
//! │  nats/  │                                             │ ━ run-b      │
//! │  token) │                                             │ Series       │
//! │         │                                             │ ─ train loss │
//! │         └──────────────── x label ────────────────────┤ ...          │
//! └───────────────────────────────────────────────────────┴──────────────┘
//! ```
//!
//! Colour tells the run apart, style the series: a solid line is training loss (a faint
//! line under it the raw values), a thin line with dots validation during training,
//! hollow markers offline validation per dataset (one shape per dataset), a dashed line
//! with diamonds their mean. The legend sits in its own panel, never over curves. Text
//! uses the embedded DejaVu Sans, so no system font is needed.

use plotters::coord::Shift;
use plotters::coord::cartesian::Cartesian2d;
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::prelude::*;

use super::axis::{YScale, format_decimal, format_x, linear_ticks};
use super::legend::Legend;
use super::marker::{Marker, Shape};
use super::scene::{DrawResult, FAMILY, INK, PALETTE, Scene, dataset_shapes, register_fonts};
use super::series::{Point, decimate};

/// Most points drawn per line (a dense curve keeps its envelope, see [`decimate`]).
const MAX_POINTS: usize = 3000;

const GRID: RGBColor = RGBColor(228, 228, 228);

/// Draw the whole picture on `root`.
pub fn render<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, scene: &Scene) -> DrawResult<DB> {
    register_fonts();
    root.fill(&WHITE)?;
    let (width, _) = root.dim_in_pixel();
    let body = root
        .margin(10, 0, 0, 0)
        .titled(&scene.title, (FAMILY, 24).into_font().color(&INK))?;

    let legend = Legend::new(scene);
    let legend_width = legend.width(root)?.min(width / 3);
    let (plot_area, legend_area) = body.split_horizontally(width - legend_width);
    // Task metrics, when there are any, get the lower part.
    let has_tasks = scene.runs.iter().any(|r| !r.tasks.is_empty());
    let (plot_area, task_area) = if has_tasks {
        let (_, h) = plot_area.dim_in_pixel();
        let (a, b) = plot_area.split_vertically(h * 62 / 100);
        (a, Some(b))
    } else {
        (plot_area, None)
    };

    let (x0, x1) = scene.x_range;
    let (y0, y1) = scene.y.axis_range();
    let y_ticks: Vec<f64> = scene.y.ticks.iter().map(|&t| scene.y.to_axis(t)).collect();
    let mut chart = ChartBuilder::on(&plot_area)
        .margin_top(12)
        .margin_left(10)
        .margin_right(18)
        .margin_bottom(8)
        .x_label_area_size(52)
        .y_label_area_size(78)
        .build_cartesian_2d(
            TickAxis::new(x0, x1, scene.x_ticks.clone()),
            TickAxis::new(y0, y1, y_ticks),
        )?;

    let x_step = match scene.x_ticks.as_slice() {
        [a, b, ..] => b - a,
        _ => (x1 - x0) / 5.0,
    };
    let x_fmt = |v: &f64| format_x(scene.x_axis, *v, x_step);
    let y_fmt = |v: &f64| scene.y.label(*v);
    let y_desc = if scene.y.log {
        scene.y_labels.1
    } else {
        scene.y_labels.0
    };
    chart
        .configure_mesh()
        .x_desc(scene.x_axis.label())
        .y_desc(y_desc)
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt)
        .label_style((FAMILY, 15).into_font().color(&INK))
        .axis_desc_style((FAMILY, 17).into_font().color(&INK))
        .bold_line_style(GRID.stroke_width(1))
        .light_line_style(WHITE.mix(0.0))
        .axis_style(RGBColor(120, 120, 120).stroke_width(1))
        .set_all_tick_mark_size(5)
        .draw()?;

    let top = chart.plotting_area().get_pixel_range().1.start;
    let mut layers = Layers {
        chart,
        clip: Clip {
            x: scene.x_range,
            y: (y0, y1),
        },
        y: &scene.y,
    };
    let datasets = dataset_shapes(scene.runs);
    let coloured =
        || (scene.runs.iter().enumerate()).map(|(i, run)| (run, PALETTE[i % PALETTE.len()]));
    // Back to front: raw training loss, smoothed, offline validation, online validation.
    for (run, colour) in coloured() {
        if !run.train_smooth.is_empty() {
            let raw = decimate(&run.train_raw, MAX_POINTS);
            layers.line(&raw, colour.mix(0.22).stroke_width(1))?;
        }
    }
    for (run, colour) in coloured() {
        let main = if run.train_smooth.is_empty() {
            &run.train_raw
        } else {
            &run.train_smooth
        };
        layers.line(&decimate(main, MAX_POINTS), colour.stroke_width(2))?;
        if main.len() == 1 {
            // A run that has logged one step: a line of one point would not show.
            layers.markers(main, Shape::Circle, 3, colour.filled())?;
        }
    }
    for (run, colour) in coloured() {
        for (dataset, pts) in &run.offline {
            let shape = datasets
                .iter()
                .find(|d| &d.0 == dataset)
                .map_or(Shape::Square, |d| d.1);
            layers.markers(pts, shape, 5, colour.stroke_width(2))?;
        }
        if run.offline.len() >= 2 {
            layers.dashed(&run.offline_mean, colour.stroke_width(2))?;
            layers.markers(&run.offline_mean, Shape::Diamond, 6, colour.filled())?;
        }
    }
    for (run, colour) in coloured() {
        layers.line(&run.online_val, colour.stroke_width(1))?;
        layers.markers(&run.online_val, Shape::Circle, 4, colour.filled())?;
    }

    legend.draw(&legend_area, top)?;
    if let Some(area) = task_area {
        task_panel(&area, scene)?;
    }
    Ok(())
}

/// The downstream task panel: one line per run and task (its headline metric, see
/// `plot::tasks`), in the run's colour, marked per task; a key of the tasks' markers
/// in its top left corner.
fn task_panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, scene: &Scene) -> DrawResult<DB> {
    let all = || scene.runs.iter().flat_map(|r| r.tasks.values().flatten());
    let (lo, hi) = all().fold((f64::MAX, f64::MIN), |(lo, hi), p| {
        (lo.min(p.1), hi.max(p.1))
    });
    // Room above the lines for the key.
    let span = (hi - lo).max(1e-3 * hi.abs().max(1.0));
    let mut names: Vec<&(String, String)> =
        scene.runs.iter().flat_map(|r| r.tasks.keys()).collect();
    names.sort();
    names.dedup();
    let (y0, y1) = (
        lo - 0.08 * span,
        hi + span * (0.12 + 0.1 * names.len() as f64),
    );
    let (x0, x1) = scene.x_range;
    let y_ticks = linear_ticks(y0, y1, 4);
    let mut chart = ChartBuilder::on(area)
        .margin_top(6)
        .margin_left(10)
        .margin_right(18)
        .margin_bottom(8)
        .x_label_area_size(40)
        .y_label_area_size(78)
        .build_cartesian_2d(
            TickAxis::new(x0, x1, scene.x_ticks.clone()),
            TickAxis::new(y0, y1, y_ticks.clone()),
        )?;
    let x_step = match scene.x_ticks.as_slice() {
        [a, b, ..] => b - a,
        _ => (x1 - x0) / 5.0,
    };
    let y_step = match y_ticks.as_slice() {
        [a, b, ..] => b - a,
        _ => span,
    };
    let x_fmt = |v: &f64| format_x(scene.x_axis, *v, x_step);
    let y_fmt = |v: &f64| format_decimal(*v, y_step);
    chart
        .configure_mesh()
        .y_desc("task metric")
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt)
        .label_style((FAMILY, 14).into_font().color(&INK))
        .axis_desc_style((FAMILY, 16).into_font().color(&INK))
        .bold_line_style(GRID.stroke_width(1))
        .light_line_style(WHITE.mix(0.0))
        .axis_style(RGBColor(120, 120, 120).stroke_width(1))
        .set_all_tick_mark_size(5)
        .draw()?;
    let shape_of = |key: &(String, String)| {
        let k = names.iter().position(|n| *n == key).unwrap_or(0);
        Shape::FOR_DATASETS[k % Shape::FOR_DATASETS.len()]
    };
    let clip = Clip {
        x: scene.x_range,
        y: (y0, y1),
    };
    for (i, run) in scene.runs.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        for (key, pts) in &run.tasks {
            for piece in clip.polyline(pts) {
                chart.draw_series(LineSeries::new(piece, colour.stroke_width(2)))?;
            }
            let inside = pts.iter().copied().filter(|p| clip.contains(*p));
            chart.draw_series(
                inside.map(|p| Marker::new(p, shape_of(key), 5, colour.stroke_width(2))),
            )?;
        }
    }
    // The key, in pixels from the plotting area's top left corner (`area` counts from
    // its own).
    let (xs, ys) = chart.plotting_area().get_pixel_range();
    let (bx, by) = area.get_base_pixel();
    for (i, key) in names.iter().enumerate() {
        let (x, y) = (xs.start - bx + 16, ys.start - by + 12 + 17 * i as i32);
        area.draw(&Marker::new((x, y), shape_of(key), 5, INK.stroke_width(2)))?;
        area.draw(&Text::new(
            format!("{} ({})", key.0, key.1),
            (x + 12, y - 7),
            (FAMILY, 13).into_font().color(&INK),
        ))?;
    }
    Ok(())
}

/// Draws series on the chart: losses mapped onto the loss axis, clipped to the ranges.
struct Layers<'a, 'b, DB: DrawingBackend> {
    chart: ChartContext<'a, DB, Cartesian2d<TickAxis, TickAxis>>,
    clip: Clip,
    y: &'b YScale,
}

impl<DB: DrawingBackend> Layers<'_, '_, DB> {
    /// Points on the drawn axes (a non-positive loss has no place on a log axis).
    fn on_axes(&self, pts: &[Point]) -> Vec<Point> {
        pts.iter()
            .filter(|p| !self.y.log || p.1 > 0.0)
            .map(|&(x, y)| (x, self.y.to_axis(y)))
            .collect()
    }

    fn line(&mut self, pts: &[Point], style: ShapeStyle) -> DrawResult<DB> {
        for piece in self.clip.polyline(&self.on_axes(pts)) {
            self.chart.draw_series(LineSeries::new(piece, style))?;
        }
        Ok(())
    }

    fn dashed(&mut self, pts: &[Point], style: ShapeStyle) -> DrawResult<DB> {
        for piece in self.clip.polyline(&self.on_axes(pts)) {
            self.chart
                .draw_series(DashedLineSeries::new(piece, 7, 5, style))?;
        }
        Ok(())
    }

    fn markers(
        &mut self,
        pts: &[Point],
        shape: Shape,
        size: i32,
        style: ShapeStyle,
    ) -> DrawResult<DB> {
        let inside: Vec<Point> = self
            .on_axes(pts)
            .into_iter()
            .filter(|p| self.clip.contains(*p))
            .collect();
        self.chart.draw_series(
            inside
                .into_iter()
                .map(|p| Marker::new(p, shape, size, style)),
        )?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// A linear f64 axis with given ticks.

/// A linear axis over `[lo, hi]` whose grid lines and labels sit at `ticks` (plotters'
/// own key points cannot be chosen on a log-transformed axis).
struct TickAxis {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
}

impl TickAxis {
    fn new(lo: f64, hi: f64, ticks: Vec<f64>) -> Self {
        let ticks = ticks.into_iter().filter(|t| *t >= lo && *t <= hi).collect();
        TickAxis { lo, hi, ticks }
    }
}

impl Ranged for TickAxis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        if self.hi == self.lo {
            return (limit.0 + limit.1) / 2;
        }
        // Halves: the span of an axis near the ends of f64 is not a finite number.
        let t = (v / 2.0 - self.lo / 2.0) / (self.hi / 2.0 - self.lo / 2.0);
        let px = limit.0 as f64 + t * (limit.1 - limit.0) as f64;
        px.round().clamp(-1e6, 1e6) as i32
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.lo..self.hi
    }
}

// ---------------------------------------------------------------------------------------
// Clipping to the chart's ranges (plotters draws lines past the plotting area).

struct Clip {
    x: (f64, f64),
    y: (f64, f64),
}

impl Clip {
    fn contains(&self, (x, y): Point) -> bool {
        x >= self.x.0 && x <= self.x.1 && y >= self.y.0 && y <= self.y.1
    }

    /// The pieces of a polyline inside the box (Liang–Barsky per segment).
    fn polyline(&self, pts: &[Point]) -> Vec<Vec<Point>> {
        let mut pieces: Vec<Vec<Point>> = Vec::new();
        let mut current: Vec<Point> = Vec::new();
        if pts.len() == 1 && self.contains(pts[0]) {
            return vec![pts.to_vec()];
        }
        for w in pts.windows(2) {
            match self.segment(w[0], w[1]) {
                Some((a, b)) => {
                    if current.last() != Some(&a) {
                        if current.len() >= 2 {
                            pieces.push(std::mem::take(&mut current));
                        }
                        current.clear();
                        current.push(a);
                    }
                    current.push(b);
                }
                None => {
                    if current.len() >= 2 {
                        pieces.push(std::mem::take(&mut current));
                    }
                    current.clear();
                }
            }
        }
        if current.len() >= 2 {
            pieces.push(current);
        }
        pieces
    }

    fn segment(&self, a: Point, b: Point) -> Option<(Point, Point)> {
        let (dx, dy) = (b.0 - a.0, b.1 - a.1);
        let (mut t0, mut t1) = (0.0f64, 1.0f64);
        for (p, q) in [
            (-dx, a.0 - self.x.0),
            (dx, self.x.1 - a.0),
            (-dy, a.1 - self.y.0),
            (dy, self.y.1 - a.1),
        ] {
            if p == 0.0 {
                if q < 0.0 {
                    return None;
                }
            } else {
                let t = q / p;
                if p < 0.0 {
                    t0 = t0.max(t);
                } else {
                    t1 = t1.min(t);
                }
            }
        }
        if t0 > t1 {
            return None;
        }
        let at = |t: f64| {
            if t == 0.0 {
                a
            } else if t == 1.0 {
                b
            } else {
                (a.0 + t * dx, a.1 + t * dy)
            }
        };
        Some((at(t0), at(t1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipping_cuts_lines_at_the_box() {
        let clip = Clip {
            x: (0.0, 10.0),
            y: (0.0, 1.0),
        };
        let pieces = clip.polyline(&[(0.0, 0.5), (2.0, 2.0), (4.0, 0.5), (6.0, 0.5)]);
        assert_eq!(pieces.len(), 2);
        assert_eq!(pieces[0], vec![(0.0, 0.5), ((0.5 / 1.5) * 2.0, 1.0)]);
        assert_eq!(pieces[1].last(), Some(&(6.0, 0.5)));
        assert!(clip.polyline(&[(0.0, 5.0), (1.0, 6.0)]).is_empty());
    }
}
