//! What a plot shows ([`Scene`]) and the look shared by the chart and its legend:
//! the embedded font, the palette, one marker shape per offline dataset.

use std::sync::Once;

use plotters::prelude::*;

use super::axis::{XAxis, YScale};
use super::marker::Shape;
use super::series::RunSeries;

/// DejaVu Sans (Bitstream Vera licence, see `assets/fonts/LICENSE-DejaVu.txt`).
static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
pub(super) const FAMILY: &str = "sans-serif";

/// Tableau 10: distinct, colour-blind-friendlier than the primaries.
pub(super) const PALETTE: [RGBColor; 10] = [
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
pub(super) const INK: RGBColor = RGBColor(40, 40, 40);

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
    /// The y axis's title, with its unit, on a linear and on a log scale.
    pub y_labels: (&'static str, &'static str),
    pub runs: &'a [RunSeries],
    pub x_axis: XAxis,
    pub x_range: (f64, f64),
    pub x_ticks: Vec<f64>,
    pub y: YScale,
}

pub(super) type DrawResult<DB> =
    Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

/// The marker shape of each offline dataset, the same in every run.
pub(super) fn dataset_shapes(runs: &[RunSeries]) -> Vec<(String, Shape)> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_font_loads() {
        assert!(plotters::style::register_font("lit-claire-test", FontStyle::Normal, FONT).is_ok());
    }
}
