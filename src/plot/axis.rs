//! Axis ranges, scales, tick positions and tick labels.
//!
//! The chart is drawn on linear coordinates; a log-scaled loss axis is the linear axis of
//! `ln(loss)`, with ticks chosen at round loss values and labelled with them. This keeps
//! one drawing path and gives ticks such as `2, 3, 4, 6, 8, 10` instead of powers of ten
//! only, which is what a loss spanning 10 → 2 needs.

/// Which quantity the x axis shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum XAxis {
    /// Optimizer step.
    #[default]
    Step,
    /// Training tokens seen.
    Tokens,
    /// Wall-clock hours since the run started (`elapsed_s / 3600`).
    Hours,
}

impl XAxis {
    /// Axis title, with its unit.
    pub fn label(self) -> &'static str {
        match self {
            XAxis::Step => "optimizer step",
            XAxis::Tokens => "training tokens",
            XAxis::Hours => "wall-clock time (hours)",
        }
    }

    /// The `metrics.csv` column the axis is read from.
    pub fn column(self) -> &'static str {
        match self {
            XAxis::Step => "step",
            XAxis::Tokens => "tokens",
            XAxis::Hours => "elapsed_s",
        }
    }
}

impl std::str::FromStr for XAxis {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "step" | "steps" => Ok(XAxis::Step),
            "tokens" => Ok(XAxis::Tokens),
            "hours" | "time" => Ok(XAxis::Hours),
            _ => Err(crate::Error::Usage(format!(
                "--x {s}: unknown x axis; use step, tokens or hours"
            ))),
        }
    }
}

/// Losses spanning more than this ratio are drawn on a log scale.
pub const LOG_RATIO: f64 = 3.0;

/// The loss axis: its range in loss units, its scale and its ticks.
#[derive(Debug, Clone, PartialEq)]
pub struct YScale {
    pub lo: f64,
    pub hi: f64,
    pub log: bool,
    /// Tick values in loss units.
    pub ticks: Vec<f64>,
}

impl YScale {
    /// The scale for data spanning `[data_lo, data_hi]`, bounded by the user's
    /// `--min-loss`/`--max-loss` where given. Log when the shown range is positive and
    /// spans more than `LOG_RATIO`; unbounded ends get a little padding.
    pub fn new(data_lo: f64, data_hi: f64, min: Option<f64>, max: Option<f64>) -> Self {
        let (mut lo, mut hi) = (min.unwrap_or(data_lo), max.unwrap_or(data_hi));
        if hi <= lo {
            // A flat curve (or bounds that exclude the data): show a band around it.
            let mid = if min.is_some() { lo } else { hi };
            let half = (mid.abs() * 0.05).max(0.05);
            if min.is_none() {
                lo = mid - half;
            }
            if max.is_none() || hi <= lo {
                hi = lo + 2.0 * half;
            }
        }
        let log = lo > 0.0 && hi / lo > LOG_RATIO;
        // Each end scaled before the difference: 1e308 − (−1e308) would be infinite.
        let pad = 0.04 * to_axis(hi, log) - 0.04 * to_axis(lo, log);
        if min.is_none() {
            lo = from_axis(to_axis(lo, log) - pad, log);
            if !log && data_lo >= 0.0 {
                lo = lo.max(0.0);
            }
        }
        if max.is_none() {
            hi = from_axis(to_axis(hi, log) + pad, log);
        }
        // Padding near the ends of f64 (a loss of 1e300 on a log axis) must not reach
        // infinity or zero: every tick and pixel below is computed from these.
        lo = if log {
            lo.max(f64::MIN_POSITIVE)
        } else {
            lo.max(-f64::MAX)
        };
        hi = hi.min(f64::MAX);
        let ticks = if log {
            log_ticks(lo, hi)
        } else {
            linear_ticks(lo, hi, 8)
        };
        YScale { lo, hi, log, ticks }
    }

    /// Position of a loss on the drawn axis.
    pub fn to_axis(&self, v: f64) -> f64 {
        to_axis(v, self.log)
    }

    /// Whether a loss lies inside the shown range.
    pub fn contains(&self, v: f64) -> bool {
        v.is_finite() && v >= self.lo && v <= self.hi && (!self.log || v > 0.0)
    }

    /// The drawn range, in axis units.
    pub fn axis_range(&self) -> (f64, f64) {
        (self.to_axis(self.lo), self.to_axis(self.hi))
    }

    /// Label of an axis position.
    pub fn label(&self, axis_value: f64) -> String {
        let v = from_axis(axis_value, self.log);
        if self.log {
            // Log ticks are round values of different magnitudes: each with its own digits.
            format_short(round_sig(v, 6))
        } else {
            let step = tick_step(&self.ticks).unwrap_or(self.hi / 5.0 - self.lo / 5.0);
            let largest = self.lo.abs().max(self.hi.abs());
            if largest >= 1e7 {
                // 1e20 is not written out in 21 digits: a mantissa with the digits the
                // spacing needs, and the power of ten the whole axis shares.
                let exp = largest.log10().floor() as i32;
                let unit = 10f64.powi(exp);
                format!("{}e{exp}", format_decimal(v / unit, step / unit))
            } else {
                format_decimal(v, step)
            }
        }
    }
}

fn to_axis(v: f64, log: bool) -> f64 {
    if log { v.ln() } else { v }
}

fn from_axis(v: f64, log: bool) -> f64 {
    if log { v.exp() } else { v }
}

/// The x range shown for data spanning `[lo, hi]`: from 0 when the data starts near it,
/// with a little room on the right.
pub fn x_range(lo: f64, hi: f64) -> (f64, f64) {
    let lo = if lo >= 0.0 && lo <= 0.25 * hi {
        0.0
    } else {
        lo
    };
    let span = hi - lo;
    if span <= 0.0 {
        let half = (hi.abs() * 0.1).max(1.0);
        return ((lo - half).max(0.0), hi + half);
    }
    (lo, hi + 0.02 * span)
}

/// About `target` round ticks (1, 2, 2.5 or 5 times a power of ten apart) in `[lo, hi]`.
pub fn linear_ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    if hi <= lo || !lo.is_finite() || !hi.is_finite() {
        return vec![lo];
    }
    let t = target.max(1) as f64;
    // Each end divided first: the span of −1e308..1e308 is not a finite number.
    let raw = hi / t - lo / t;
    ticks_every(lo, hi, raw)
}

/// The ticks of the x axis: as [`linear_ticks`], whole numbers for steps and tokens.
pub fn x_ticks(axis: XAxis, lo: f64, hi: f64) -> Vec<f64> {
    let min_step = if axis == XAxis::Hours { 0.0 } else { 1.0 };
    let raw = (hi / 10.0 - lo / 10.0).max(min_step);
    if hi <= lo || !lo.is_finite() || !hi.is_finite() {
        return vec![lo];
    }
    ticks_every(lo, hi, raw)
}

/// Multiples in `[lo, hi]` of the roundest spacing (1, 2, 2.5 or 5 times a power of ten)
/// of at least `raw`.
fn ticks_every(lo: f64, hi: f64, raw: f64) -> Vec<f64> {
    if !(raw.is_finite() && raw > 0.0) {
        return vec![lo];
    }
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    // `step` is at least the span over the number of ticks wanted, so this is about
    // that many; the bound only guards against float surprises.
    (first..=last)
        .take(MAX_LINEAR_TICKS)
        .map(|k| round_sig(k as f64 * step, 12))
        .filter(|v| v.is_finite())
        .collect()
}

/// Most ticks a linear axis computes.
const MAX_LINEAR_TICKS: usize = 100;

/// Ticks of a log axis on `[lo, hi]` (`lo > 0`): the sparsest of a few sets of round
/// mantissas per decade that gives at least 5 ticks and leaves neither end of the axis
/// more than 25% from a tick (the bulk of a loss curve lies near its low end), unless
/// that takes more than [`MAX_LOG_TICKS`].
pub fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    const SETS: [&[f64]; 5] = [
        &[1.0],
        &[1.0, 2.0, 5.0],
        &[1.0, 2.0, 3.0, 5.0],
        &[1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0],
        &[
            1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 7.0, 8.0, 9.0,
        ],
    ];
    if !(lo > 0.0 && hi >= lo && hi.is_finite()) {
        return vec![lo];
    }
    let covers = |t: &[f64]| t.len() >= 5 && t[0] / lo <= 1.25 && hi / t[t.len() - 1] <= 1.25;
    // More decades than labels (a loss of 1e300 beside one of 2): powers of ten every
    // few decades, never one label per decade of hundreds.
    let (first, last) = (lo.log10().floor() as i32, hi.log10().floor() as i32);
    let decades = (last - first + 1) as usize;
    if decades > MAX_LOG_TICKS {
        let stride = decades.div_ceil(MAX_LOG_TICKS) as i32;
        return (first.div_euclid(stride)..=last.div_euclid(stride) + 1)
            .map(|k| round_sig(10f64.powi(k * stride), 6))
            .filter(|v| *v >= lo && *v <= hi)
            .collect();
    }
    let mut best: Vec<f64> = Vec::new();
    for set in SETS {
        let mut ticks = Vec::new();
        let mut decade = 10f64.powi(first);
        while decade <= hi && decade.is_finite() {
            for m in set {
                // Round away float noise such as 0.30000000000000004.
                let v = round_sig(m * decade, 6);
                if v >= lo && v <= hi {
                    ticks.push(v);
                }
            }
            decade *= 10.0;
        }
        if ticks.len() > MAX_LOG_TICKS && best.len() >= 3 {
            // Crowded labels are worse than a loose end.
            break;
        }
        best = ticks;
        if covers(&best) {
            break;
        }
    }
    best
}

/// Most labelled ticks on a log axis.
const MAX_LOG_TICKS: usize = 12;

fn round_sig(v: f64, digits: i32) -> f64 {
    if v == 0.0 {
        return 0.0;
    }
    let scale = 10f64.powi(digits - 1 - v.abs().log10().floor() as i32);
    let rounded = (v * scale).round() / scale;
    // Near the ends of f64 the scale itself overflows or underflows: keep `v`.
    if rounded.is_finite() && rounded != 0.0 {
        rounded
    } else {
        v
    }
}

/// The shortest decimal form of `v` (`2`, `1.5`, `0.25`); `1e300`, `2e-12` beyond a
/// million or below 1e-4.
fn format_short(v: f64) -> String {
    if v != 0.0 && !(1e-4..1e6).contains(&v.abs()) {
        // Six significant digits at most, trailing zeros dropped: `1e300`, `2.5e-12`.
        let s = format!("{v:.5e}");
        let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
        let mantissa = mantissa.trim_end_matches('0').trim_end_matches('.');
        return format!("{mantissa}e{exp}");
    }
    let s = format!("{v:.6}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_string()
}

fn tick_step(ticks: &[f64]) -> Option<f64> {
    (ticks.len() >= 2).then(|| ticks[1] - ticks[0])
}

/// `v` with as many decimals as a tick spacing of `step` needs (trailing zeros kept so
/// that neighbouring labels line up).
pub fn format_decimal(v: f64, step: f64) -> String {
    let decimals = if step > 0.0 && step.is_finite() {
        (-(step.log10() + 1e-9).floor()).clamp(0.0, 6.0) as usize
    } else {
        2
    };
    // 2.5 apart needs one more digit than its magnitude says.
    let units = step * 10f64.powi(decimals as i32);
    let decimals = if step > 0.0 && (units - units.round()).abs() > 1e-6 {
        decimals + 1
    } else {
        decimals
    };
    let s = format!("{v:.decimals$}");
    if s.starts_with('-') && s[1..].chars().all(|c| c == '0' || c == '.') {
        s[1..].to_string()
    } else {
        s
    }
}

/// A count in SI units: `0`, `500k`, `1.5M`, `2B`, with the decimals the tick spacing
/// `step` needs.
pub fn format_si(v: f64, step: f64) -> String {
    let units = [(1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")];
    let reference = v.abs().max(step.abs());
    if v == 0.0 {
        return "0".into();
    }
    for (scale, suffix) in units {
        if reference >= scale {
            return format!("{}{suffix}", format_decimal(v / scale, step / scale));
        }
    }
    format_decimal(v, step.max(1.0))
}

/// Label of an x value.
pub fn format_x(axis: XAxis, v: f64, step: f64) -> String {
    match axis {
        XAxis::Step => {
            if step >= 1000.0 && v.abs() >= 10_000.0 {
                format_si(v, step)
            } else {
                format_decimal(v, step.max(1.0))
            }
        }
        XAxis::Tokens => format_si(v, step),
        XAxis::Hours => format_decimal(v, step),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_when_the_loss_spans_a_lot() {
        let y = YScale::new(2.0, 10.0, None, None);
        assert!(y.log);
        assert!(y.lo < 2.0 && y.hi > 10.0);
        assert!(y.ticks.len() >= 5, "{:?}", y.ticks);
        assert!(y.ticks.contains(&2.0) && y.ticks.contains(&10.0));
        let y = YScale::new(2.0, 4.0, None, None);
        assert!(!y.log);
        // Bounds decide: 1.5..4 is linear even though the data spans 2..10.
        let y = YScale::new(2.0, 10.0, Some(1.5), Some(4.0));
        assert!(!y.log);
        assert_eq!((y.lo, y.hi), (1.5, 4.0));
        // A zero lower bound cannot be log.
        assert!(!YScale::new(2.0, 10.0, Some(0.0), None).log);
    }

    #[test]
    fn flat_or_inverted_ranges_still_give_an_axis() {
        let y = YScale::new(3.0, 3.0, None, None);
        assert!(y.lo < 3.0 && y.hi > 3.0);
        let y = YScale::new(3.0, 5.0, Some(6.0), None);
        assert!(y.hi > y.lo);
    }

    #[test]
    fn ticks_are_round() {
        assert_eq!(
            linear_ticks(0.0, 10.0, 5),
            vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
        );
        let t = linear_ticks(1.93, 2.61, 7);
        assert_eq!(t.len(), 7, "{t:?}");
        assert!(
            (t[0] - 2.0).abs() < 1e-9 && (t[6] - 2.6).abs() < 1e-9,
            "{t:?}"
        );
        let t = log_ticks(1.9, 11.0);
        assert!(t.len() >= 5 && t.len() <= 10, "{t:?}");
        assert_eq!((t[0], *t.last().unwrap()), (2.0, 10.0), "{t:?}");
        assert_eq!(
            log_ticks(0.5, 200.0),
            vec![0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0]
        );
        let t = log_ticks(1.55, 19.0);
        assert!(t.len() <= MAX_LOG_TICKS && t.contains(&2.0), "{t:?}");
    }

    /// Issue 23, case 10: a loss of 1e300 padded the log axis to infinity and the
    /// tick loop never ended. Ends stay finite, ticks few, labels short, at every
    /// extreme.
    #[test]
    fn extreme_ranges_give_a_few_finite_ticks() {
        for (lo, hi, min, max) in [
            (2.0, 1e300, None, None),
            (2.0, f64::MAX, None, None),
            (f64::MIN_POSITIVE, f64::MAX, None, None),
            (1e-300, 3.0, None, None),
            (2.0, 1e100, None, None),
            (-f64::MAX, f64::MAX, Some(-f64::MAX), None),
            (1e300, 1.1e300, None, None),
            (0.5, 0.5, None, None),
        ] {
            let start = std::time::Instant::now();
            let y = YScale::new(lo, hi, min, max);
            assert!(y.lo.is_finite() && y.hi.is_finite() && y.lo < y.hi, "{y:?}");
            assert!(!y.log || y.lo > 0.0, "{y:?}");
            assert!(
                !y.ticks.is_empty() && y.ticks.len() <= 100,
                "{lo} {hi}: {y:?}"
            );
            assert!(y.ticks.iter().all(|t| t.is_finite()), "{y:?}");
            for t in &y.ticks {
                let label = y.label(y.to_axis(*t));
                assert!(label.len() <= 12, "{lo} {hi}: {label}");
            }
            assert!(
                start.elapsed().as_secs() < 2,
                "{lo} {hi}: {:?}",
                start.elapsed()
            );
        }
        let y = YScale::new(2.0, 1e300, None, None);
        assert!(y.log && y.ticks.len() <= MAX_LOG_TICKS, "{:?}", y.ticks);
        assert_eq!(y.label(1e300f64.ln()), "1e300");
        let y = YScale::new(1e20, 2e20, None, None);
        assert!(!y.log);
        assert!(y.label(1.5e20).ends_with("e20"), "{}", y.label(1.5e20));
        let t = linear_ticks(-f64::MAX, f64::MAX, 8);
        assert!(
            (3..=12).contains(&t.len()) && t.iter().all(|v| v.is_finite()),
            "{t:?}"
        );
        assert_eq!(log_ticks(1.0, f64::INFINITY), vec![1.0]);
    }

    #[test]
    fn labels() {
        assert_eq!(format_decimal(2.5, 0.5), "2.5");
        assert_eq!(format_decimal(2.0, 0.5), "2.0");
        assert_eq!(format_decimal(2.25, 0.25), "2.25");
        assert_eq!(format_decimal(300.0, 100.0), "300");
        assert_eq!(format_decimal(3.6, 0.19999999999999973), "3.6");
        assert_eq!(format_decimal(-0.0001, 0.1), "0.0");
        assert_eq!(format_si(1_500_000.0, 500_000.0), "1.5M");
        assert_eq!(format_si(2_000_000.0, 500_000.0), "2.0M");
        assert_eq!(format_si(250_000.0, 250_000.0), "250k");
        assert_eq!(format_si(0.0, 250_000.0), "0");
        assert_eq!(format_x(XAxis::Step, 1200.0, 200.0), "1200");
        assert_eq!(format_x(XAxis::Hours, 0.75, 0.25), "0.75");
        let y = YScale::new(2.0, 10.0, None, None);
        assert_eq!(y.label(2f64.ln()), "2");
        assert_eq!(y.label(1.5f64.ln()), "1.5");
    }
}
