//! Marker shapes drawn at data points and in the legend.

use plotters::element::{Drawable, PointCollection};
use plotters::prelude::*;
use plotters_backend::{BackendCoord, DrawingErrorKind};

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
    pub(super) const FOR_DATASETS: [Shape; 7] = [
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
pub(super) struct Marker<C> {
    at: C,
    shape: Shape,
    size: i32,
    style: ShapeStyle,
}

impl<C> Marker<C> {
    pub(super) fn new(at: C, shape: Shape, size: i32, style: impl Into<ShapeStyle>) -> Self {
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
