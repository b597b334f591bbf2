//! Metrics, their aggregation over a task's documents and their standard errors, as
//! lm-evaluation-harness 0.4 computes them (`lm_eval/api/metrics.py`, `task.py`).
//!
//! Per document, from the log-likelihoods `llᵢ` of its requests:
//!
//! | request kind | metric | per document | aggregated over n documents | stderr |
//! |---|---|---|---|---|
//! | multiple choice | `acc` | `argmax llᵢ ∈ gold` | mean | `s / √n` |
//! | | `acc_norm` | `argmax llᵢ / charsᵢ ∈ gold` (characters of the choice) | mean | `s / √n` |
//! | | `acc_bytes` | `argmax llᵢ / bytesᵢ ∈ gold` (UTF-8 bytes) | mean | `s / √n` |
//! | | `exact_match` | the gold choice is greedy | mean | `s / √n` |
//! | continuation | `perplexity` | `ll` | `exp(−mean ll)` | bootstrap |
//! | | `acc` | `is_greedy` | mean | `s / √n` |
//! | rolling | `word_perplexity` | `(ll, words)` | `exp(−Σll / Σwords)` | none |
//! | | `byte_perplexity` | `(ll, bytes)` | `exp(−Σll / Σbytes)` | none |
//! | | `bits_per_byte` | `(ll, bytes)` | `−Σll / Σbytes / ln 2` | none |
//! | generation | `exact_match` | response = target | mean | `s / √n` |
//!
//! `s` is the sample standard deviation (n − 1). `argmax` takes the first of equal
//! maxima (numpy's). `acc_norm` divides by the choice's length in characters (not
//! bytes: that is `acc_bytes`), without the target delimiter. Words are the pieces of
//! `re.split(r"\s+", text)` (so a leading or trailing space adds an empty piece).
//! The bootstrap of `perplexity` is the harness's, draw for draw: 100 chunks of 1,000
//! resamples, chunk `i` drawn by `random.Random(i)` ([`super::pyrandom`]), and the
//! sample standard deviation of the 100,000 perplexities. The harness reports no
//! standard error for the three rolling metrics (its `N/A`), nor for one document:
//! neither do we.

use super::pyrandom::PyRandom;

/// Bootstrap resamples of the harness's default (`bootstrap_iters=100000`).
pub const BOOTSTRAP_ITERS: usize = 100_000;

/// Python's `str.isspace` (and so `\s` in a `str` pattern of `re`).
pub fn py_isspace(c: char) -> bool {
    matches!(
        c,
        '\t' | '\n'
            | '\u{0b}'
            | '\u{0c}'
            | '\r'
            | '\u{1c}'..='\u{1f}'
            | ' '
            | '\u{85}'
            | '\u{a0}'
            | '\u{1680}'
            | '\u{2000}'..='\u{200a}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{202f}'
            | '\u{205f}'
            | '\u{3000}'
    )
}

/// `len(re.split(r"\s+", text))`: runs of whitespace plus one.
pub fn count_words(text: &str) -> usize {
    let mut runs = 0;
    let mut in_space = false;
    for c in text.chars() {
        let s = py_isspace(c);
        if s && !in_space {
            runs += 1;
        }
        in_space = s;
    }
    runs + 1
}

/// Python's `sum(xs) / len(xs)` (left to right).
pub fn mean(xs: &[f64]) -> f64 {
    xs.iter().fold(0.0, |a, &x| a + x) / xs.len() as f64
}

/// The harness's `sample_stddev`.
fn sample_stddev(xs: &[f64]) -> f64 {
    let mu = mean(xs);
    let ss = xs.iter().fold(0.0, |a, &x| a + (x - mu) * (x - mu));
    (ss / (xs.len() - 1) as f64).sqrt()
}

/// `mean_stderr`: `s / √n`; None for fewer than 2 values (the harness's `N/A`).
pub fn mean_stderr(xs: &[f64]) -> Option<f64> {
    (xs.len() > 1).then(|| sample_stddev(xs) / (xs.len() as f64).sqrt())
}

/// `exp(−mean ll)`.
pub fn perplexity(lls: &[f64]) -> f64 {
    (-mean(lls)).exp()
}

/// The harness's bootstrap standard error of [`perplexity`] with `iters` resamples
/// (chunks of `min(1000, iters)`, chunk `i` from `random.Random(i)`).
pub fn perplexity_stderr(lls: &[f64], iters: usize) -> Option<f64> {
    if lls.len() < 2 || iters == 0 {
        return None;
    }
    let chunk = iters.min(1000);
    let n = lls.len();
    let mut res = Vec::with_capacity(iters);
    let mut sample = vec![0.0; n];
    for i in 0..iters / chunk {
        let mut rnd = PyRandom::new(i as u64);
        for _ in 0..chunk {
            for (s, j) in sample.iter_mut().zip(rnd.choices(n, n)) {
                *s = lls[j];
            }
            res.push(perplexity(&sample));
        }
    }
    Some(sample_stddev(&res))
}

/// `Σ a / Σ b` of `(ll, count)` pairs (the harness's `weighted_mean`).
pub fn weighted_mean(items: &[(f64, usize)]) -> f64 {
    let a = items.iter().fold(0.0, |s, &(x, _)| s + x);
    let b = items.iter().fold(0.0, |s, &(_, c)| s + c as f64);
    a / b
}

/// The index of the first largest value (numpy's `argmax`; NaN wins, as in numpy).
pub fn argmax(xs: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x.is_nan() {
            return i;
        }
        if x > xs[best] {
            best = i;
        }
    }
    best
}

/// Options of `exact_match` (the harness passes a metric's extra YAML keys).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExactMatch {
    /// Regular expressions removed from both strings first.
    pub regexes_to_ignore: Vec<String>,
    pub ignore_case: bool,
    /// Remove ASCII punctuation (`string.punctuation`).
    pub ignore_punctuation: bool,
    /// Remove ASCII digits.
    pub ignore_numbers: bool,
}

impl ExactMatch {
    /// Whether `prediction` matches `reference` under these options, in the harness's
    /// order: regexes, case, punctuation, digits.
    pub fn matches(&self, prediction: &str, reference: &str) -> bool {
        let norm = |s: &str| -> String {
            let mut s = s.to_string();
            for r in &self.regexes_to_ignore {
                if let Ok(re) = regex::Regex::new(r) {
                    s = re.replace_all(&s, "").into_owned();
                }
            }
            if self.ignore_case {
                s = s.to_lowercase();
            }
            if self.ignore_punctuation {
                s.retain(|c| !c.is_ascii_punctuation());
            }
            if self.ignore_numbers {
                s.retain(|c| !c.is_ascii_digit());
            }
            s
        };
        norm(prediction) == norm(reference)
    }
}

/// A metric a task reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Metric {
    Acc,
    AccNorm,
    AccBytes,
    ExactMatch(ExactMatch),
    Perplexity,
    WordPerplexity,
    BytePerplexity,
    BitsPerByte,
}

impl Metric {
    /// The harness's name of the metric.
    pub fn name(&self) -> &'static str {
        match self {
            Metric::Acc => "acc",
            Metric::AccNorm => "acc_norm",
            Metric::AccBytes => "acc_bytes",
            Metric::ExactMatch(_) => "exact_match",
            Metric::Perplexity => "perplexity",
            Metric::WordPerplexity => "word_perplexity",
            Metric::BytePerplexity => "byte_perplexity",
            Metric::BitsPerByte => "bits_per_byte",
        }
    }

    /// Whether a larger value is better (for plots and summaries).
    pub fn higher_is_better(&self) -> bool {
        matches!(
            self,
            Metric::Acc | Metric::AccNorm | Metric::AccBytes | Metric::ExactMatch(_)
        )
    }
}

/// One metric of one task.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricValue {
    pub task: String,
    pub metric: String,
    pub value: f64,
    /// None where the harness reports `N/A`.
    pub stderr: Option<f64>,
    /// Documents scored.
    pub samples: usize,
}

/// Per-document values that a metric aggregates.
#[derive(Debug, Clone, PartialEq)]
pub enum DocValues {
    /// Values averaged (`acc`, `acc_norm`, `exact_match`, ...).
    Mean(Vec<f64>),
    /// Log-likelihoods for `exp(−mean)`.
    Perplexity(Vec<f64>),
    /// `(ll, count)` pairs for the weighted metrics; `bits`: bits per byte rather than
    /// a perplexity.
    Weighted {
        items: Vec<(f64, usize)>,
        bits: bool,
    },
}

impl DocValues {
    /// The aggregate and its standard error.
    pub fn aggregate(&self, bootstrap_iters: usize) -> (f64, Option<f64>) {
        match self {
            DocValues::Mean(xs) => (mean(xs), mean_stderr(xs)),
            DocValues::Perplexity(lls) => {
                (perplexity(lls), perplexity_stderr(lls, bootstrap_iters))
            }
            DocValues::Weighted { items, bits: false } => ((-weighted_mean(items)).exp(), None),
            DocValues::Weighted { items, bits: true } => {
                (-weighted_mean(items) / std::f64::consts::LN_2, None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_python_re_split_pieces() {
        assert_eq!(count_words("a b  c"), 3);
        assert_eq!(count_words(" a b "), 4);
        assert_eq!(count_words(""), 1);
        assert_eq!(count_words("um\u{a0}dois\ttrês\n"), 4);
    }

    #[test]
    fn stderr_of_a_mean_is_the_sample_one() {
        let xs = [1.0, 0.0, 1.0, 1.0];
        let se = mean_stderr(&xs).unwrap();
        assert!((se - 0.25).abs() < 1e-12, "{se}");
        assert_eq!(mean_stderr(&[1.0]), None);
    }

    /// The harness's number for these log-likelihoods (`bootstrap_stderr(perplexity,
    /// [-1.0, -2.0, -0.5, -3.25], 100000)` with DISABLE_MULTIPROC=1, which draws the
    /// same chunks).
    #[test]
    fn perplexity_bootstrap_matches_the_harness() {
        let se = perplexity_stderr(&[-1.0, -2.0, -0.5, -3.25], 2000).unwrap();
        assert_eq!(se, BOOT_2000);
    }
    const BOOT_2000: f64 = 3.6860044398238965;

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
    }

    #[test]
    fn exact_match_options() {
        let em = ExactMatch {
            ignore_case: true,
            ignore_punctuation: true,
            ..Default::default()
        };
        assert!(em.matches("Olá, Mundo!", "olá mundo"));
        assert!(!ExactMatch::default().matches("a", "A"));
    }
}
