//! `RUN/metrics.csv`: one row per logged optimizer step.
//!
//! Columns: `step, epoch, tokens, loss, learning_rate, grad_norm, tokens_per_s,
//! elapsed_s, val_loss, val_ppl, val_bpb`, then `val_loss/<dataset>` for each dataset,
//! then `task/<task>/<metric>` for each metric of the downstream tasks (`--eval-tasks`).
//! `step` counts optimizer steps from 1; validation and task columns are empty except
//! on rows where an evaluation ran (`val_bpb`: bits per byte, the summed validation loss
//! / ln 2 / the UTF-8 bytes of the text scored). On resume, rows after the checkpoint's
//! step are dropped first, so a resumed run's file reads like that of a run that never
//! stopped; rows of a file written with other columns (before `val_bpb`) are moved
//! under the header's by name.
//!
//! [`super::loggers::Loggers`] sends each row here and to the other loggers of
//! `--logger`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

pub const METRICS_FILE: &str = "metrics.csv";

/// One row of `metrics.csv`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricsRow {
    pub step: usize,
    pub epoch: usize,
    pub tokens: u64,
    pub loss: f64,
    pub learning_rate: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
    pub val_loss: Option<f64>,
    /// Validation bits per byte.
    pub val_bpb: Option<f64>,
    /// Validation loss per dataset, in the header's order.
    pub val_per_dataset: Vec<Option<f64>>,
    /// Downstream task metrics, in the header's order (empty: none this row).
    pub tasks: Vec<Option<f64>>,
}

/// Appends rows to `metrics.csv`.
pub struct MetricsWriter {
    path: PathBuf,
    file: File,
}

/// The columns of `metrics.csv` before the per-dataset `val_loss/<dataset>` ones.
pub const COLUMNS: [&str; 11] = [
    "step",
    "epoch",
    "tokens",
    "loss",
    "learning_rate",
    "grad_norm",
    "tokens_per_s",
    "elapsed_s",
    "val_loss",
    "val_ppl",
    "val_bpb",
];

fn header(datasets: &[String], tasks: &[String]) -> String {
    let mut cols: Vec<String> = COLUMNS.iter().map(|s| s.to_string()).collect();
    cols.extend(datasets.iter().map(|d| format!("val_loss/{d}")));
    cols.extend(tasks.iter().map(|t| format!("task/{t}")));
    cols.join(",")
}

fn opt(x: Option<f64>) -> String {
    x.map(|v| v.to_string()).unwrap_or_default()
}

/// The step of a row (its first column).
fn row_step(line: &str) -> Option<usize> {
    line.split(',').next().and_then(|s| s.parse().ok())
}

/// Rows of `run/metrics.csv` at or before `step` (None when there is no file).
fn rows_up_to(path: &Path, step: usize) -> Result<Option<usize>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).at(path)?;
    Ok(Some(
        text.lines()
            .skip(1)
            .filter(|l| row_step(l).is_some_and(|s| s <= step))
            .count(),
    ))
}

/// Before resuming at `step`: `run/metrics.csv` must still hold the `expected` rows
/// logged up to then. Fewer rows (a file truncated or edited by hand) is an error, as
/// resuming would silently make the loss permanent; no file at all (a run resumed into
/// another folder, or a file deleted on purpose) gives back a warning to show.
pub fn check_rows(run: &Path, step: usize, expected: usize) -> Result<Option<String>> {
    let path = run.join(METRICS_FILE);
    match rows_up_to(&path, step)? {
        Some(n) if n < expected => Err(Error::bad_file(
            &path,
            format!(
                "{n} rows up to step {step}, but the run logged {expected}: {} rows are missing (truncated or edited?). Restore the file, or delete it to continue with a new metrics.csv from step {step}",
                expected - n
            ),
        )),
        None if expected > 0 => Ok(Some(format!(
            "warning: {} does not exist; it starts again at step {step} without the {expected} rows logged before",
            path.display()
        ))),
        _ => Ok(None),
    }
}

/// `line`, a row under the header `old`, as a row under `new`: each value under its
/// column's name, empty where `old` lacks the column (the same line when the headers
/// are equal).
fn realign(line: &str, old: &str, new: &str) -> String {
    if old == new {
        return line.to_string();
    }
    let names: Vec<&str> = old.split(',').collect();
    let values: Vec<&str> = line.split(',').collect();
    new.split(',')
        .map(|col| {
            names
                .iter()
                .position(|n| *n == col)
                .and_then(|i| values.get(i))
                .copied()
                .unwrap_or("")
        })
        .collect::<Vec<_>>()
        .join(",")
}

impl MetricsWriter {
    /// Open `run/metrics.csv`: a new file with a header, or, when resuming at step
    /// `resume_step`, the existing file without its rows after that step. `tasks`:
    /// the `task/metric` columns of the downstream tasks.
    pub fn open(
        run: &Path,
        datasets: &[String],
        tasks: &[String],
        resume_step: Option<usize>,
    ) -> Result<Self> {
        let path = run.join(METRICS_FILE);
        let head = header(datasets, tasks);
        let mut kept = vec![head.clone()];
        if let (Some(step), true) = (resume_step, path.exists()) {
            let text = std::fs::read_to_string(&path).at(&path)?;
            let mut lines = text.lines();
            let old = lines.next().unwrap_or_default();
            kept.extend(
                lines
                    .filter(|l| row_step(l).is_some_and(|s| s <= step))
                    .map(|l| realign(l, old, &head)),
            );
        }
        let mut content = kept.join("\n");
        content.push('\n');
        crate::io::write_atomic(&path, content.as_bytes())?;
        let file = OpenOptions::new().append(true).open(&path).at(&path)?;
        Ok(MetricsWriter { path, file })
    }

    pub fn write(&mut self, r: &MetricsRow) -> Result<()> {
        let mut cols = vec![
            r.step.to_string(),
            r.epoch.to_string(),
            r.tokens.to_string(),
            r.loss.to_string(),
            r.learning_rate.to_string(),
            r.grad_norm.to_string(),
            format!("{:.1}", r.tokens_per_s),
            format!("{:.3}", r.elapsed_s),
            opt(r.val_loss),
            opt(r.val_loss.map(f64::exp)),
            opt(r.val_bpb),
        ];
        cols.extend(r.val_per_dataset.iter().map(|v| opt(*v)));
        cols.extend(r.tasks.iter().map(|v| opt(*v)));
        writeln!(self.file, "{}", cols.join(",")).at(&self.path)?;
        self.file.flush().at(&self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run resumed from a file of the layout before `val_bpb` keeps its rows, each
    /// value under its column.
    #[test]
    fn older_rows_move_under_the_new_header() {
        let dir = tempfile::tempdir().unwrap();
        let old = "step,epoch,tokens,loss,learning_rate,grad_norm,tokens_per_s,elapsed_s,val_loss,val_ppl,val_loss/a\n\
                   1,0,10,3.0,0.1,1.0,5.0,1.0,,,\n\
                   2,0,20,2.5,0.1,1.0,5.0,2.0,2.4,11.0,2.4\n\
                   3,0,30,2.0,0.1,1.0,5.0,3.0,,,\n";
        std::fs::write(dir.path().join(METRICS_FILE), old).unwrap();
        drop(MetricsWriter::open(dir.path(), &["a".into()], &[], Some(2)).unwrap());
        let text = std::fs::read_to_string(dir.path().join(METRICS_FILE)).unwrap();
        assert_eq!(
            text,
            "step,epoch,tokens,loss,learning_rate,grad_norm,tokens_per_s,elapsed_s,val_loss,val_ppl,val_bpb,val_loss/a\n\
             1,0,10,3.0,0.1,1.0,5.0,1.0,,,,\n\
             2,0,20,2.5,0.1,1.0,5.0,2.0,2.4,11.0,,2.4\n"
        );
    }
}
