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

use std::sync::Once;

use plotters::coord::Shift;
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::element::{DashedPathElement, Drawable, PointCollection};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters_backend::{BackendCoord, DrawingErrorKind};

use super::axis::{XAxis, YScale, format_x};
use super::series::{Point, RunSeries, decimate};

/// DejaVu Sans (Bitstream Vera licence, see `assets/fonts/LICENSE-DejaVu.txt`).
static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";

/// Most points drawn per line (a dense curve keeps its envelope, see [`decimate`]).
const MAX_POINTS: usize = 3000;

/// Tableau 10: distinct, colour-blind-friendlier than the primaries.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];
const INK: RGBColor = RGBColor(40, 40, 40);
const SAMPLE: RGBColor = RGBColor(70, 70, 70);
const GRID: RGBColor = RGBColor(228, 228, 228);

/// Register the embedded font under "sans-serif" (once per process).
pub fn register_fonts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Only fails on a corrupt font file, which a unit test rules out.
        let _ = plotters::style::register_font(FAMILY, FontStyle::Normal, FONT);
    });
}

/// What to draw.
pub struct Scene<'a> {
    pub title: String,
    pub runs: &'a [RunSeries],
    pub x_axis: XAxis,
    pub x_range: (f64, f64),
    pub x_ticks: Vec<f64>,
    pub y: YScale,
}

type DrawResult<DB> = Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

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
        "loss (nats/token, log scale)"
    } else {
        "loss (nats/token)"
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

    let clip = Clip {
        x: scene.x_range,
        y: (y0, y1),
    };
    let to_axis = |pts: &[Point]| -> Vec<Point> {
        pts.iter()
            .filter(|p| !scene.y.log || p.1 > 0.0)
            .map(|&(x, y)| (x, scene.y.to_axis(y)))
            .collect()
    };
    let datasets = dataset_shapes(scene.runs);

    // Back to front: raw training loss, smoothed, offline validation, online validation.
    for (i, run) in scene.runs.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        if !run.train_smooth.is_empty() {
            let pts = to_axis(&decimate(&run.train_raw, MAX_POINTS));
            for piece in clip.polyline(&pts) {
                chart.draw_series(LineSeries::new(piece, colour.mix(0.22).stroke_width(1)))?;
            }
        }
    }
    for (i, run) in scene.runs.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let main = if run.train_smooth.is_empty() {
            &run.train_raw
        } else {
            &run.train_smooth
        };
        let pts = to_axis(&decimate(main, MAX_POINTS));
        for piece in clip.polyline(&pts) {
            chart.draw_series(LineSeries::new(piece, colour.stroke_width(2)))?;
        }
        if let [p] = pts[..]
            && clip.contains(p)
        {
            // A run that has logged one step: a line of one point would not show.
            chart.draw_series([Marker::new(p, Shape::Circle, 3, colour.filled())])?;
        }
    }
    for (i, run) in scene.runs.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        for (dataset, pts) in &run.offline {
            let shape = datasets
                .iter()
                .find(|d| &d.0 == dataset)
                .map_or(Shape::Square, |d| d.1);
            chart.draw_series(
                to_axis(pts)
                    .into_iter()
                    .filter(|p| clip.contains(*p))
                    .map(|p| Marker::new(p, shape, 5, colour.stroke_width(2))),
            )?;
        }
        if run.offline.len() >= 2 {
            let pts = to_axis(&run.offline_mean);
            for piece in clip.polyline(&pts) {
                chart.draw_series(DashedLineSeries::new(piece, 7, 5, colour.stroke_width(2)))?;
            }
            chart.draw_series(
                pts.iter()
                    .filter(|p| clip.contains(**p))
                    .map(|&p| Marker::new(p, Shape::Diamond, 6, colour.filled())),
            )?;
        }
    }
    for (i, run) in scene.runs.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let pts = to_axis(&run.online_val);
        for piece in clip.polyline(&pts) {
            chart.draw_series(LineSeries::new(piece, colour.stroke_width(1)))?;
        }
        chart.draw_series(
            pts.iter()
                .filter(|p| clip.contains(**p))
                .map(|&p| Marker::new(p, Shape::Circle, 4, colour.filled())),
        )?;
    }

    legend.draw(
        &legend_area,
        chart.plotting_area().get_pixel_range().1.start,
    )?;
    Ok(())
}

/// The marker shape of each offline dataset, the same in every run.
fn dataset_shapes(runs: &[RunSeries]) -> Vec<(String, Shape)> {
    let mut names: Vec<&String> = runs.iter().flat_map(|r| r.offline.keys()).collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .enumerate()
        .map(|(i, n)| {
            (
                n.clone(),
                Shape::FOR_DATASETS[i % Shape::FOR_DATASETS.len()],
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Legend

enum Sample {
    /// A line of this width and opacity.
    Line(u32, f64),
    /// A thin line through a filled marker.
    LineMarker(Shape),
    /// A hollow marker.
    Hollow(Shape),
    /// A dashed line through a filled marker.
    DashedMarker(Shape),
}

enum Row {
    Header(&'static str),
    Run(RGBColor, String),
    Series(Sample, String),
}

struct Legend {
    rows: Vec<Row>,
}

const PAD: i32 = 14;
const SWATCH: i32 = 30;
const GAP: i32 = 10;
const MAX_TEXT: u32 = 330;

impl Legend {
    fn new(scene: &Scene) -> Self {
        let runs = scene.runs;
        let mut rows = vec![Row::Header("Runs")];
        for (i, run) in runs.iter().enumerate() {
            let name = if run.points().next().is_none() {
                format!("{} (no data yet)", run.name)
            } else {
                run.name.clone()
            };
            rows.push(Row::Run(PALETTE[i % PALETTE.len()], name));
        }
        rows.push(Row::Header("Series"));
        let smoothed = runs.iter().any(|r| !r.train_smooth.is_empty());
        if runs.iter().any(|r| !r.train_raw.is_empty()) {
            let label = if smoothed {
                "training loss (smoothed)"
            } else {
                "training loss"
            };
            rows.push(Row::Series(Sample::Line(2, 1.0), label.into()));
        }
        if smoothed {
            rows.push(Row::Series(
                Sample::Line(1, 0.3),
                "training loss (raw)".into(),
            ));
        }
        if runs.iter().any(|r| !r.online_val.is_empty()) {
            rows.push(Row::Series(
                Sample::LineMarker(Shape::Circle),
                "validation during training".into(),
            ));
        }
        for (dataset, shape) in dataset_shapes(runs) {
            rows.push(Row::Series(
                Sample::Hollow(shape),
                format!("validate: {dataset}"),
            ));
        }
        if runs.iter().any(|r| r.offline.len() >= 2) {
            rows.push(Row::Series(
                Sample::DashedMarker(Shape::Diamond),
                "validate: mean of datasets".into(),
            ));
        }
        Legend { rows }
    }

    fn text_style(size: f64) -> TextStyle<'static> {
        (FAMILY, size)
            .into_font()
            .color(&INK)
            .pos(Pos::new(HPos::Left, VPos::Center))
    }

    /// Panel width that fits the longest label (capped).
    fn width<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
    ) -> Result<u32, DrawingAreaErrorKind<DB::ErrorType>> {
        let style = Self::text_style(15.0);
        let mut widest = 0;
        for row in &self.rows {
            let text = match row {
                Row::Header(t) => t.to_string(),
                Row::Run(_, t) | Row::Series(_, t) => t.clone(),
            };
            widest = widest.max(root.estimate_text_size(&text, &style)?.0);
        }
        Ok(widest.min(MAX_TEXT) + (2 * PAD + SWATCH + GAP) as u32 + 16)
    }

    /// Draw the panel, its top aligned with the chart's top at `top` (pixels).
    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>, top: i32) -> DrawResult<DB> {
        let (w, h) = area.dim_in_pixel();
        let (w, h) = (w as i32, h as i32);
        let root_top = area.get_base_pixel().1;
        let top = (top - root_top).max(0);
        let available = h - top - 10;
        let n = self.rows.len() as i32;
        let row_h = ((available - PAD) / n.max(1)).clamp(14, 26);
        let font = (row_h as f64 * 0.62).clamp(11.0, 15.0);
        let shown = ((available - PAD) / row_h).clamp(1, n) as usize;
        let (right, bottom) = (w - 16, top + shown as i32 * row_h + PAD);
        let panel = [(0, top), (right, bottom)];
        area.draw(&Rectangle::new(panel, RGBColor(250, 250, 250).filled()))?;
        area.draw(&Rectangle::new(
            panel,
            RGBColor(200, 200, 200).stroke_width(1),
        ))?;
        let text_x = PAD + SWATCH + GAP;
        let max_text = (right - text_x - 6).max(40) as u32;
        let header = Self::text_style(font).color(&RGBColor(110, 110, 110));
        for (k, row) in self.rows.iter().take(shown).enumerate() {
            let y = top + PAD / 2 + k as i32 * row_h + row_h / 2;
            if k + 1 == shown && shown < self.rows.len() {
                let more = format!("… {} more", self.rows.len() - k);
                area.draw(&Text::new(more, (PAD, y), header.clone()))?;
                break;
            }
            match row {
                Row::Header(t) => area.draw(&Text::new(*t, (PAD, y), header.clone()))?,
                Row::Run(colour, text) => {
                    let swatch = vec![(PAD, y), (PAD + SWATCH, y)];
                    area.draw(&PathElement::new(swatch, colour.stroke_width(4)))?;
                    let text = fit(area, text, font, max_text)?;
                    area.draw(&Text::new(text, (text_x, y), Self::text_style(font)))?;
                }
                Row::Series(sample, text) => {
                    draw_sample(area, sample, (PAD, y))?;
                    let text = fit(area, text, font, max_text)?;
                    area.draw(&Text::new(text, (text_x, y), Self::text_style(font)))?;
                }
            }
        }
        Ok(())
    }
}

/// `text`, cut with an ellipsis to fit `max` pixels.
fn fit<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    text: &str,
    font: f64,
    max: u32,
) -> Result<String, DrawingAreaErrorKind<DB::ErrorType>> {
    let style = Legend::text_style(font);
    if area.estimate_text_size(text, &style)?.0 <= max {
        return Ok(text.to_string());
    }
    let chars: Vec<char> = text.chars().collect();
    for keep in (1..chars.len()).rev() {
        // Keep the end: run names differ at their end more often than at their start.
        let cut: String = std::iter::once('…')
            .chain(chars[chars.len() - keep..].iter().copied())
            .collect();
        if area.estimate_text_size(&cut, &style)?.0 <= max {
            return Ok(cut);
        }
    }
    Ok("…".into())
}

fn draw_sample<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    sample: &Sample,
    (x, y): (i32, i32),
) -> DrawResult<DB> {
    let mid = (x + SWATCH / 2, y);
    let line = vec![(x, y), (x + SWATCH, y)];
    match sample {
        Sample::Line(width, alpha) => {
            area.draw(&PathElement::new(
                line,
                SAMPLE.mix(*alpha).stroke_width(*width),
            ))?;
        }
        Sample::LineMarker(shape) => {
            area.draw(&PathElement::new(line, SAMPLE.stroke_width(1)))?;
            area.draw(&Marker::new(mid, *shape, 4, SAMPLE.filled()))?;
        }
        Sample::Hollow(shape) => {
            area.draw(&Marker::new(mid, *shape, 5, SAMPLE.stroke_width(2)))?;
        }
        Sample::DashedMarker(shape) => {
            area.draw(&DashedPathElement::new(line, 7, 5, SAMPLE.stroke_width(2)))?;
            area.draw(&Marker::new(mid, *shape, 6, SAMPLE.filled()))?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Markers

/// Marker shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Circle,
    TriangleUp,
    TriangleDown,
    Square,
    Diamond,
    Cross,
    Plus,
}

impl Shape {
    /// Shapes of offline datasets, in order (filled circles and diamonds are taken by
    /// online validation and the offline mean).
    const FOR_DATASETS: [Shape; 7] = [
        Shape::TriangleUp,
        Shape::Square,
        Shape::TriangleDown,
        Shape::Circle,
        Shape::Cross,
        Shape::Plus,
        Shape::Diamond,
    ];
}

/// A marker of `size` pixels (radius) at `at`; filled if the style is, else a white-filled
/// outline so that it stays readable over lines.
struct Marker<C> {
    at: C,
    shape: Shape,
    size: i32,
    style: ShapeStyle,
}

impl<C> Marker<C> {
    fn new(at: C, shape: Shape, size: i32, style: impl Into<ShapeStyle>) -> Self {
        Marker {
            at,
            shape,
            size,
            style: style.into(),
        }
    }
}

impl<'a, C: 'a> PointCollection<'a, C> for &'a Marker<C> {
    type Point = &'a C;
    type IntoIter = std::iter::Once<&'a C>;
    fn point_iter(self) -> Self::IntoIter {
        std::iter::once(&self.at)
    }
}

impl<C, DB: DrawingBackend> Drawable<DB> for Marker<C> {
    fn draw<I: Iterator<Item = BackendCoord>>(
        &self,
        mut pos: I,
        backend: &mut DB,
        _: (u32, u32),
    ) -> Result<(), DrawingErrorKind<DB::ErrorType>> {
        let Some((x, y)) = pos.next() else {
            return Ok(());
        };
        let r = self.size;
        let style = &self.style;
        let white = WHITE.filled();
        let polygon: Vec<BackendCoord> = match self.shape {
            Shape::Circle => {
                if !style.filled {
                    backend.draw_circle((x, y), r as u32, &white, true)?;
                }
                return backend.draw_circle((x, y), r as u32, style, style.filled);
            }
            Shape::Cross | Shape::Plus => {
                let (a, b) = if self.shape == Shape::Cross {
                    ((r, r), (r, -r))
                } else {
                    ((r, 0), (0, r))
                };
                backend.draw_line((x - a.0, y - a.1), (x + a.0, y + a.1), style)?;
                return backend.draw_line((x - b.0, y - b.1), (x + b.0, y + b.1), style);
            }
            Shape::Square => {
                let s = r * 4 / 5;
                vec![
                    (x - s, y - s),
                    (x + s, y - s),
                    (x + s, y + s),
                    (x - s, y + s),
                ]
            }
            Shape::Diamond => vec![(x, y - r), (x + r, y), (x, y + r), (x - r, y)],
            Shape::TriangleUp => vec![(x, y - r), (x + r, y + r * 3 / 4), (x - r, y + r * 3 / 4)],
            Shape::TriangleDown => {
                vec![(x, y + r), (x + r, y - r * 3 / 4), (x - r, y - r * 3 / 4)]
            }
        };
        if style.filled {
            backend.fill_polygon(polygon, style)
        } else {
            backend.fill_polygon(polygon.clone(), &white)?;
            let mut closed = polygon.clone();
            closed.push(polygon[0]);
            backend.draw_path(closed, style)
        }
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
        let t = (v - self.lo) / (self.hi - self.lo);
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
    fn the_embedded_font_loads() {
        assert!(ab_glyph_ok());
    }

    fn ab_glyph_ok() -> bool {
        plotters::style::register_font("lit-claire-test", FontStyle::Normal, FONT).is_ok()
    }

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
