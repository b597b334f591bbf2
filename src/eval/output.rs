//! What `evaluate` prints and writes: a table, JSON lines, logged samples and the run's
//! `eval_results.csv`.
//!
//! `eval_results.csv` has one row per checkpoint × task × metric:
//! `checkpoint,step,task,metric,value,stderr,samples,task_fingerprint` (`stderr` empty
//! where the harness reports none; `task_fingerprint`: 16 hex digits of SHA-256 of the
//! task file and its data, so an edited task is scored again). It is appended to the
//! way `validation_results.csv` is: a (checkpoint, task, fingerprint) already in it is
//! not scored again.

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;

use serde_json::json;

use super::TaskResult;
use crate::error::{Error, IoContext, Result};

pub const EVAL_FILE: &str = "eval_results.csv";
pub const HEADER: &str = "checkpoint,step,task,metric,value,stderr,samples,task_fingerprint";

/// One JSON object per task and metric: `task`, `metric`, `value`, `stderr` (null
/// where none), `samples`, and `checkpoint` when given.
pub fn json_lines(results: &[TaskResult], checkpoint: Option<&str>) -> Vec<String> {
    results
        .iter()
        .flat_map(|r| &r.metrics)
        .map(|m| {
            let mut o = json!({
                "task": m.task,
                "metric": m.metric,
                "value": finite(m.value),
                "stderr": m.stderr.map(finite),
                "samples": m.samples,
            });
            if let Some(c) = checkpoint {
                o["checkpoint"] = json!(c);
            }
            o.to_string()
        })
        .collect()
}

/// JSON has no NaN or infinity: those are null.
fn finite(x: f64) -> serde_json::Value {
    if x.is_finite() {
        json!(x)
    } else {
        serde_json::Value::Null
    }
}

/// A table for people.
pub fn table(results: &[TaskResult], checkpoint: Option<&str>) -> String {
    let mut s = String::new();
    if let Some(c) = checkpoint {
        s.push_str(&format!("{c}\n"));
    }
    let w = results
        .iter()
        .map(|r| r.task.len())
        .max()
        .unwrap_or(4)
        .max(4);
    s.push_str(&format!(
        "{:<w$}  {:<16} {:>12}   {:>10}  {:>7}\n",
        "task", "metric", "value", "stderr", "samples"
    ));
    for m in results.iter().flat_map(|r| &r.metrics) {
        let se = m.stderr.map_or("N/A".to_string(), |e| format!("{e:.4}"));
        s.push_str(&format!(
            "{:<w$}  {:<16} {:>12.4} ± {:>10}  {:>7}\n",
            m.task, m.metric, m.value, se, m.samples
        ));
    }
    s
}

/// The samples as JSON Lines (`checkpoint` added when given).
pub fn samples_jsonl(results: &[TaskResult], checkpoint: Option<&str>) -> String {
    let mut out = String::new();
    for s in results.iter().flat_map(|r| &r.samples) {
        let mut v = serde_json::to_value(s).expect("plain values");
        if let Some(c) = checkpoint {
            v["checkpoint"] = json!(c);
        }
        out.push_str(&v.to_string());
        out.push('\n');
    }
    out
}

/// `(checkpoint, task, fingerprint)` already in `csv`.
pub fn done_keys(csv: &Path) -> Result<HashSet<(String, String, String)>> {
    if !csv.exists() {
        return Ok(HashSet::new());
    }
    let text = std::fs::read_to_string(csv).at(csv)?;
    let mut lines = text.lines();
    match lines.next() {
        Some(h) if h.trim() == HEADER => {}
        None => return Ok(HashSet::new()),
        Some(h) => {
            return Err(Error::bad_file(
                csv,
                format!("unexpected header {h:?}; pass --csv with another file"),
            ));
        }
    }
    Ok(lines
        .filter_map(|l| {
            let c: Vec<&str> = l.split(',').collect();
            Some((
                c.first()?.to_string(),
                c.get(2)?.to_string(),
                c.get(7)?.to_string(),
            ))
        })
        .collect())
}

/// Append the rows of `results` for `checkpoint` at `step`, the header first into a
/// new file.
pub fn append_csv(csv: &Path, checkpoint: &str, step: usize, results: &[TaskResult]) -> Result<()> {
    let new = !csv.exists();
    let mut text = String::new();
    if new {
        text.push_str(HEADER);
        text.push('\n');
    }
    for r in results {
        for m in &r.metrics {
            text.push_str(&format!(
                "{checkpoint},{step},{},{},{},{},{},{}\n",
                m.task,
                m.metric,
                m.value,
                m.stderr.map(|e| e.to_string()).unwrap_or_default(),
                m.samples,
                r.fingerprint
            ));
        }
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(csv)
        .at(csv)?;
    f.write_all(text.as_bytes()).at(csv)
}
