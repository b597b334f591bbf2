//! The legend panel beside the chart: run colours, then one sample per kind of series.
//! Long names are cut at the front with an ellipsis; rows that do not fit are counted.

use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::marker::{Marker, Shape};
use super::scene::{DrawResult, FAMILY, INK, PALETTE, Scene, dataset_shapes};

/// Colour of the series samples (the series' own colour is the run's).
const SAMPLE: RGBColor = RGBColor(70, 70, 70);

/// How a kind of series is shown in the legend.
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

/// One line of the legend.
enum Row {
    Header(&'static str),
    Run(RGBColor, String),
    Series(Sample, String),
}

pub(super) struct Legend {
    rows: Vec<Row>,
}

/// Inner padding of the panel, pixels.
const PAD: i32 = 14;
/// Length of a colour swatch or series sample.
const SWATCH: i32 = 30;
/// Space between sample and text.
const GAP: i32 = 10;
/// Widest label before it is cut.
const MAX_TEXT: u32 = 330;

impl Legend {
    pub(super) fn new(scene: &Scene) -> Self {
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
    pub(super) fn width<DB: DrawingBackend>(
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
    pub(super) fn draw<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, Shift>,
        top: i32,
    ) -> DrawResult<DB> {
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
