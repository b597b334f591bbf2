//! From a run's files to the point lists that are drawn: x chosen by [`XAxis`], training
//! loss smoothed, offline validation points placed on the run's x.

use std::collections::BTreeMap;

use super::axis::XAxis;
use super::runs::{CheckpointInfo, MetricsRow, ValidationRow, newest_data_rows, offline_means};

/// A point `(x, loss)`.
pub type Point = (f64, f64);

/// Everything drawn for one run.
#[derive(Debug, Clone, Default)]
pub struct RunSeries {
    /// Run directory name, as the legend shows it.
    pub name: String,
    /// Training loss as logged.
    pub train_raw: Vec<Point>,
    /// Training loss, exponentially smoothed (empty when too few points to need it).
    pub train_smooth: Vec<Point>,
    /// Validation loss measured by the trainer.
    pub online_val: Vec<Point>,
    /// Offline validation loss (`lit-claire validate`), per dataset, by dataset name; one
    /// point per step (`final` is usually the last `step-N` again).
    pub offline: BTreeMap<String, Vec<Point>>,
    /// Mean of `offline` per checkpoint scored on every dataset.
    pub offline_mean: Vec<Point>,
    /// Downstream task metrics (the second panel), by `(task, metric)`.
    pub tasks: BTreeMap<(String, String), Vec<Point>>,
}

impl RunSeries {
    /// Every point drawn.
    pub fn points(&self) -> impl Iterator<Item = Point> + '_ {
        self.train_raw
            .iter()
            .chain(&self.online_val)
            .chain(self.offline.values().flatten())
            .chain(&self.offline_mean)
            .copied()
    }

    pub fn offline_points(&self) -> usize {
        self.offline.values().map(Vec::len).sum()
    }
}

/// Build the series of a run. `metrics` in file order (a resumed run may log a step twice:
/// the last row of a step wins).
pub fn build(
    name: String,
    metrics: &[MetricsRow],
    offline: &[ValidationRow],
    checkpoints: &[CheckpointInfo],
    axis: XAxis,
) -> RunSeries {
    let map = StepMap::new(metrics, axis);
    // Last value of each step wins (a resumed run may log a step twice); an evaluation
    // may have a row of its own.
    let (mut train, mut online) = (BTreeMap::new(), BTreeMap::new());
    for r in metrics {
        if let Some(v) = r.loss.filter(|v| v.is_finite()) {
            train.insert(r.step, v);
        }
        if let Some(v) = r.val_loss.filter(|v| v.is_finite()) {
            online.insert(r.step, v);
        }
    }
    let on_x = |m: BTreeMap<u64, f64>| -> Vec<Point> {
        m.into_iter()
            .filter_map(|(step, v)| Some((map.at(step)?, v)))
            .collect()
    };
    let train_raw = on_x(train);
    let online_val = on_x(online);

    // Offline points: a checkpoint's own token count is exact; otherwise interpolate.
    let ckpt_tokens: BTreeMap<&str, u64> = checkpoints
        .iter()
        .filter_map(|c| Some((c.name.as_str(), c.tokens?)))
        .collect();
    let x_of_ckpt = |name: &str, step: u64| match (axis, ckpt_tokens.get(name)) {
        (XAxis::Tokens, Some(&t)) => Some(t as f64),
        _ => map.at(step),
    };
    let mut per_dataset: BTreeMap<String, BTreeMap<u64, Point>> = BTreeMap::new();
    for r in newest_data_rows(offline)
        .into_iter()
        .filter(|r| r.loss.is_finite())
    {
        if let Some(x) = x_of_ckpt(&r.checkpoint, r.step) {
            per_dataset
                .entry(r.dataset.clone())
                .or_default()
                .insert(r.step, (x, r.loss));
        }
    }
    let offline_sets = per_dataset
        .into_iter()
        .map(|(d, pts)| (d, pts.into_values().collect()))
        .collect();
    let means: BTreeMap<u64, Point> = offline_means(offline)
        .into_iter()
        .filter_map(|(name, (step, loss))| Some((step, (x_of_ckpt(&name, step)?, loss))))
        .collect();

    RunSeries {
        name,
        train_smooth: smooth(&train_raw),
        train_raw,
        online_val,
        offline: offline_sets,
        offline_mean: means.into_values().collect(),
        tasks: BTreeMap::new(),
    }
}

/// The task metrics of a run ([`super::tasks::task_values`]) on the x axis: a
/// checkpoint's own token count where it has one, else interpolated by step.
pub fn task_points(
    values: BTreeMap<(String, String), BTreeMap<u64, f64>>,
    metrics: &[MetricsRow],
    checkpoints: &[CheckpointInfo],
    axis: XAxis,
) -> BTreeMap<(String, String), Vec<Point>> {
    let map = StepMap::new(metrics, axis);
    let tokens_at: BTreeMap<u64, u64> = checkpoints
        .iter()
        .filter_map(|c| Some((c.step?, c.tokens?)))
        .collect();
    let x = |step: u64| match (axis, tokens_at.get(&step)) {
        (XAxis::Tokens, Some(&t)) => Some(t as f64),
        (XAxis::Tokens, None) if step == 0 => Some(0.0),
        _ if step == 0 && axis == XAxis::Hours => Some(0.0),
        _ => map.at(step),
    };
    values
        .into_iter()
        .map(|(k, by_step)| {
            let pts = by_step
                .into_iter()
                .filter_map(|(s, v)| Some((x(s)?, v)))
                .collect();
            (k, pts)
        })
        .collect()
}

/// Interpolates a `metrics.csv` column (tokens or elapsed hours) at any step, from the
/// rows that have it; linear extrapolation past either end (tokens grow about linearly
/// in steps).
struct StepMap {
    axis: XAxis,
    known: Vec<(f64, f64)>,
}

impl StepMap {
    fn new(rows: &[MetricsRow], axis: XAxis) -> Self {
        let mut by_step = BTreeMap::new();
        for r in rows {
            let v = match axis {
                XAxis::Step => Some(r.step as f64),
                XAxis::Tokens => r.tokens.map(|t| t as f64),
                XAxis::Hours => r.elapsed_s.filter(|v| v.is_finite()).map(|s| s / 3600.0),
            };
            if let Some(v) = v {
                by_step.insert(r.step, v);
            }
        }
        let known = by_step.into_iter().map(|(s, v)| (s as f64, v)).collect();
        StepMap { axis, known }
    }

    fn at(&self, step: u64) -> Option<f64> {
        let s = step as f64;
        if self.axis == XAxis::Step {
            return Some(s);
        }
        let k = &self.known;
        match k.len() {
            0 => None,
            1 => Some(if k[0].0 > 0.0 {
                k[0].1 * s / k[0].0
            } else {
                k[0].1
            }),
            n => {
                let i = k.partition_point(|p| p.0 < s);
                if i < n && k[i].0 == s {
                    return Some(k[i].1);
                }
                let (a, b) = if i == 0 {
                    (k[0], k[1])
                } else if i >= n {
                    (k[n - 2], k[n - 1])
                } else {
                    (k[i - 1], k[i])
                };
                let t = (s - a.0) / (b.0 - a.0);
                Some((a.1 + t * (b.1 - a.1)).max(0.0))
            }
        }
    }
}

/// Local linear smoothing: at each point, the value at that point of the least-squares
/// line through the points within `h` of it (by index), `h` about 1/80 of the points and
/// at least 2. In the middle of the curve this is the centred moving average; near the
/// ends, where the window is cut, the fitted line keeps the smoothed curve on the trend
/// instead of lagging (as an exponential average does on the steep early fall of the
/// loss) or ending on a raw noisy point. Empty when the curve is too short (< 40 points)
/// to need smoothing.
pub fn smooth(points: &[Point]) -> Vec<Point> {
    let n = points.len();
    if n < 40 {
        return Vec::new();
    }
    let h = (n / 80).max(2);
    // Prefix sums of t, t², y and t·y, with t the point's index.
    let mut sums = vec![[0.0f64; 4]; n + 1];
    for (i, p) in points.iter().enumerate() {
        let t = i as f64;
        let prev = sums[i];
        sums[i + 1] = [
            prev[0] + t,
            prev[1] + t * t,
            prev[2] + p.1,
            prev[3] + t * p.1,
        ];
    }
    (0..n)
        .map(|i| {
            let (a, b) = (i.saturating_sub(h), (i + h + 1).min(n));
            let m = (b - a) as f64;
            let s: Vec<f64> = (0..4).map(|k| sums[b][k] - sums[a][k]).collect();
            let (mean_t, mean_y) = (s[0] / m, s[2] / m);
            let var_t = s[1] / m - mean_t * mean_t;
            let cov = s[3] / m - mean_t * mean_y;
            let slope = if var_t > 1e-12 { cov / var_t } else { 0.0 };
            (points[i].0, mean_y + slope * (i as f64 - mean_t))
        })
        .collect()
}

/// At most about `max` points that keep the envelope of a dense curve: per bucket of x
/// order, its lowest and highest point.
pub fn decimate(points: &[Point], max: usize) -> Vec<Point> {
    if points.len() <= max || max < 4 {
        return points.to_vec();
    }
    let per = points.len().div_ceil(max / 2);
    let mut out = Vec::with_capacity(max + 2);
    for chunk in points.chunks(per) {
        let lo = chunk
            .iter()
            .enumerate()
            .min_by(|a, b| a.1.1.total_cmp(&b.1.1));
        let hi = chunk
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.1.total_cmp(&b.1.1));
        if let (Some((i, &p)), Some((j, &q))) = (lo, hi) {
            match i.cmp(&j) {
                std::cmp::Ordering::Less => out.extend([p, q]),
                std::cmp::Ordering::Greater => out.extend([q, p]),
                std::cmp::Ordering::Equal => out.push(p),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(step: u64, loss: Option<f64>, val: Option<f64>) -> MetricsRow {
        MetricsRow {
            step,
            tokens: Some(step * 100),
            elapsed_s: Some(step as f64 * 36.0),
            loss,
            val_loss: val,
            ..Default::default()
        }
    }

    #[test]
    fn x_axes_and_interpolation() {
        let metrics = vec![
            row(1, Some(9.0), None),
            row(2, Some(8.0), None),
            row(4, Some(6.0), Some(6.5)),
            row(4, Some(6.0), None),
        ];
        let offline = vec![ValidationRow {
            checkpoint: "step-00000003".into(),
            step: 3,
            dataset: "wiki".into(),
            loss: 7.0,
            perplexity: None,
            tokens: None,
            batch_size: None,
            elapsed_s: None,
            peak_memory_mb: None,
            data: String::new(),
            bits_per_byte: None,
        }];
        let s = build("r".into(), &metrics, &offline, &[], XAxis::Tokens);
        assert_eq!(s.train_raw, vec![(100.0, 9.0), (200.0, 8.0), (400.0, 6.0)]);
        assert_eq!(s.online_val, vec![(400.0, 6.5)]);
        assert_eq!(s.offline["wiki"], vec![(300.0, 7.0)]);
        assert_eq!(s.offline_mean, vec![(300.0, 7.0)]);
        let s = build("r".into(), &metrics, &offline, &[], XAxis::Hours);
        assert_eq!(s.train_raw[2], (0.04, 6.0));
        // Past the last logged step: extrapolated.
        let map = StepMap::new(&metrics, XAxis::Tokens);
        assert_eq!(map.at(6), Some(600.0));
    }

    #[test]
    fn smoothing_follows_the_curve() {
        let pts: Vec<Point> = (0..600)
            .map(|i| (i as f64, 3.0 + if i % 2 == 0 { 0.5 } else { -0.5 }))
            .collect();
        let s = smooth(&pts);
        assert_eq!(s.len(), 600);
        assert!(s.iter().all(|p| (p.1 - 3.0).abs() < 0.2), "ends too");
        assert!(s[10..590].iter().all(|p| (p.1 - 3.0).abs() < 0.1));
        // No lag on a straight line, ends included.
        let line: Vec<Point> = (0..600)
            .map(|i| (i as f64, 10.0 - 0.01 * i as f64))
            .collect();
        assert!(
            smooth(&line)
                .iter()
                .zip(&line)
                .all(|(a, b)| (a.1 - b.1).abs() < 1e-6)
        );
        assert!(smooth(&pts[..39]).is_empty());
    }

    #[test]
    fn decimation_keeps_the_envelope() {
        let pts: Vec<Point> = (0..10_000).map(|i| (i as f64, (i % 97) as f64)).collect();
        let d = decimate(&pts, 1000);
        assert!(d.len() <= 1002);
        assert_eq!(d.iter().map(|p| p.1).fold(f64::MIN, f64::max), 96.0);
        assert_eq!(d.iter().map(|p| p.1).fold(f64::MAX, f64::min), 0.0);
        assert!(d.windows(2).all(|w| w[0].0 <= w[1].0));
    }
}
