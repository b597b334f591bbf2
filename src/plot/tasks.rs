//! The second panel: each run's downstream task metrics (`lit-claire evaluate` into
//! `RUN/eval_results.csv`, and `pretrain --eval-tasks` into `metrics.csv`'s
//! `task/<task>/<metric>` columns) on the loss chart's x axis.
//!
//! One line per run and task, of the task's headline metric: `acc` for choices and
//! continuations, `exact_match` for generation, `bits_per_byte` for documents scored
//! whole (else the first metric it has). The `base` checkpoint sits at step 0, so each
//! line starts where continual pretraining started.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, IoContext, Result};

use super::runs::MetricsRow;

/// The run's `evaluate` results.
pub const EVAL_FILE: &str = "eval_results.csv";

/// Metrics in the order one is picked to stand for its task.
const HEADLINE: [&str; 8] = [
    "acc",
    "exact_match",
    "bits_per_byte",
    "acc_norm",
    "perplexity",
    "word_perplexity",
    "byte_perplexity",
    "acc_bytes",
];

/// One row of `eval_results.csv`.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalRow {
    pub checkpoint: String,
    pub step: u64,
    pub task: String,
    pub metric: String,
    pub value: f64,
}

/// Read `eval_results.csv` (`checkpoint,step,task,metric,value,...`).
pub fn read_eval_results(path: &Path) -> Result<Vec<EvalRow>> {
    let text = std::fs::read_to_string(path).at(path)?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or("").split(',').collect();
    if header.get(..5) != Some(&["checkpoint", "step", "task", "metric", "value"][..]) {
        return Err(Error::bad_file(
            path,
            "not an eval_results.csv of `lit-claire evaluate` (its header starts checkpoint,step,task,metric,value)",
        ));
    }
    let mut rows = Vec::new();
    for (i, l) in lines.enumerate() {
        let c: Vec<&str> = l.split(',').collect();
        let bad = || {
            Error::bad_file(
                path,
                format!("line {}: {l:?} is not a row of 8 fields", i + 2),
            )
        };
        if c.len() < 5 {
            return Err(bad());
        }
        rows.push(EvalRow {
            checkpoint: c[0].to_string(),
            step: c[1].parse().map_err(|_| bad())?,
            task: c[2].to_string(),
            metric: c[3].to_string(),
            value: c[4].parse().map_err(|_| bad())?,
        });
    }
    Ok(rows)
}

/// `(task, metric) → (step → value)` of a run: `metrics.csv`'s task columns and the
/// rows of `eval_results.csv` (the newest row of a step wins), headline metrics only.
pub fn task_values(
    metrics: &[MetricsRow],
    evals: &[EvalRow],
) -> BTreeMap<(String, String), BTreeMap<u64, f64>> {
    let mut all: BTreeMap<(String, String), BTreeMap<u64, f64>> = BTreeMap::new();
    for r in metrics {
        for (col, v) in &r.extra {
            let Some((task, metric)) = col.strip_prefix("task/").and_then(|c| c.rsplit_once('/'))
            else {
                continue;
            };
            if let Ok(v) = v.parse::<f64>()
                && v.is_finite()
            {
                all.entry((task.to_string(), metric.to_string()))
                    .or_default()
                    .insert(r.step, v);
            }
        }
    }
    for e in evals.iter().filter(|e| e.value.is_finite()) {
        all.entry((e.task.clone(), e.metric.clone()))
            .or_default()
            .insert(e.step, e.value);
    }
    let rank = |m: &str| {
        HEADLINE
            .iter()
            .position(|h| *h == m)
            .unwrap_or(HEADLINE.len())
    };
    let mut best: BTreeMap<String, String> = BTreeMap::new();
    for (task, metric) in all.keys() {
        let e = best.entry(task.clone()).or_insert_with(|| metric.clone());
        if rank(metric) < rank(e) {
            *e = metric.clone();
        }
    }
    all.into_iter()
        .filter(|((t, m), _)| best.get(t) == Some(m))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_headline_metric_per_task_online_and_offline() {
        let mut extra = BTreeMap::new();
        extra.insert("task/pt_text/bits_per_byte".to_string(), "3.5".to_string());
        extra.insert("task/pt_text/word_perplexity".to_string(), "90".to_string());
        let metrics = vec![MetricsRow {
            step: 10,
            extra,
            ..Default::default()
        }];
        let evals = vec![
            EvalRow {
                checkpoint: "base".into(),
                step: 0,
                task: "pt_text".into(),
                metric: "bits_per_byte".into(),
                value: 5.0,
            },
            EvalRow {
                checkpoint: "base".into(),
                step: 0,
                task: "en_mc".into(),
                metric: "acc_norm".into(),
                value: 0.5,
            },
            EvalRow {
                checkpoint: "base".into(),
                step: 0,
                task: "en_mc".into(),
                metric: "acc".into(),
                value: 0.4,
            },
        ];
        let v = task_values(&metrics, &evals);
        let keys: Vec<_> = v.keys().cloned().collect();
        assert_eq!(
            keys,
            vec![
                ("en_mc".to_string(), "acc".to_string()),
                ("pt_text".to_string(), "bits_per_byte".to_string())
            ]
        );
        assert_eq!(
            v[&("pt_text".to_string(), "bits_per_byte".to_string())].len(),
            2
        );
    }
}
