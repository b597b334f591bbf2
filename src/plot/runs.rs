//! What a run directory holds, read tolerantly: `metrics.csv`, `validation_results.csv`
//! and the checkpoints' `training_state.json`; and the best checkpoint of a run.
//!
//! A run may still be training while it is read: `metrics.csv` may end in a row being
//! written, and checkpoints appear over time. Unknown columns and fields are kept or
//! ignored, never an error; a value that is there but is not a number is an error naming
//! the file, line and column.
//!
//! ```text
//! RUN/metrics.csv                 step,epoch,tokens,loss,...,val_loss,val_ppl,val_bpb[,val_loss/<dataset>...]
//! RUN/validation_results.csv      checkpoint,step,dataset,loss,perplexity,tokens,batch_size,elapsed_s,peak_memory_mb,data,bits_per_byte
//! RUN/step-00000100/training_state.json   {"step": 100, "tokens": 409600, "val_loss": 2.31 | null, ...}
//! RUN/final/training_state.json
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, IoContext, Result};

/// File name of the training log inside a run directory.
pub const METRICS_FILE: &str = "metrics.csv";
/// File name of `lit-claire validate`'s results inside a run directory.
pub const VALIDATION_FILE: &str = "validation_results.csv";
/// File name of a checkpoint's training state.
pub const STATE_FILE: &str = "training_state.json";

/// One row of `metrics.csv`: one logged optimizer step (or an evaluation).
///
/// Every column but `step` may be empty; `val_loss` and `val_ppl` are set only on
/// evaluation rows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricsRow {
    /// Optimizer step, counted from 1.
    pub step: u64,
    pub epoch: Option<f64>,
    /// Training tokens seen so far.
    pub tokens: Option<u64>,
    /// Training loss (mean cross-entropy, nats/token).
    pub loss: Option<f64>,
    pub learning_rate: Option<f64>,
    pub grad_norm: Option<f64>,
    pub tokens_per_s: Option<f64>,
    /// Wall-clock seconds since the run started.
    pub elapsed_s: Option<f64>,
    pub val_loss: Option<f64>,
    pub val_ppl: Option<f64>,
    /// Validation bits per byte (runs of older versions have none).
    pub val_bpb: Option<f64>,
    /// Non-empty values of the other columns (`val_loss/<dataset>`, ...), by header.
    pub extra: BTreeMap<String, String>,
}

/// Read `metrics.csv`. A last row shorter than the header (being written right now) is
/// left out; a repeated header line (a resumed run that wrote one again) is skipped.
pub fn read_metrics(path: impl AsRef<Path>) -> Result<Vec<MetricsRow>> {
    let path = path.as_ref();
    let table = Table::read(
        path,
        "is this a run directory written by `lit-claire pretrain`?",
    )?;
    let [step_name, rest @ ..] = crate::train::metrics::COLUMNS;
    let step = table.require(path, step_name)?;
    let known = rest.map(|name| table.column(name));
    let [
        epoch,
        tokens,
        loss,
        lr,
        grad_norm,
        tps,
        elapsed,
        val_loss,
        val_ppl,
        val_bpb,
    ] = known;
    let mut rows = Vec::with_capacity(table.records.len());
    for rec in &table.records {
        let mut extra = BTreeMap::new();
        for (i, name) in table.header.iter().enumerate() {
            let is_known = Some(i) == Some(step) || known.contains(&Some(i));
            if !is_known && !rec.field(i).is_empty() {
                extra.insert(name.clone(), rec.field(i).to_string());
            }
        }
        rows.push(MetricsRow {
            step: rec.required_u64(path, step, "step")?,
            epoch: rec.f64(path, epoch, "epoch")?,
            tokens: rec.u64(path, tokens, "tokens")?,
            loss: rec.f64(path, loss, "loss")?,
            learning_rate: rec.f64(path, lr, "learning_rate")?,
            grad_norm: rec.f64(path, grad_norm, "grad_norm")?,
            tokens_per_s: rec.f64(path, tps, "tokens_per_s")?,
            elapsed_s: rec.f64(path, elapsed, "elapsed_s")?,
            val_loss: rec.f64(path, val_loss, "val_loss")?,
            val_ppl: rec.f64(path, val_ppl, "val_ppl")?,
            val_bpb: rec.f64(path, val_bpb, "val_bpb")?,
            extra,
        });
    }
    Ok(rows)
}

/// One row of `validation_results.csv`: one checkpoint scored on one dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidationRow {
    /// Checkpoint folder name (`step-00000100`, `final`).
    pub checkpoint: String,
    pub step: u64,
    pub dataset: String,
    /// Mean cross-entropy, nats/token.
    pub loss: f64,
    pub perplexity: Option<f64>,
    /// Tokens scored (not training tokens).
    pub tokens: Option<u64>,
    pub batch_size: Option<u64>,
    /// Seconds the scoring took.
    pub elapsed_s: Option<f64>,
    pub peak_memory_mb: Option<f64>,
    /// Fingerprint of the prepared data the row was scored on (`data` column; empty for
    /// files written before it, or data made in memory).
    pub data: String,
    /// Bits per byte (`bits_per_byte` column; None for files written before it).
    pub bits_per_byte: Option<f64>,
}

/// Read `validation_results.csv` as `lit-claire validate` writes it. The checkpoint
/// column is reduced to its folder name, so absolute paths match too.
pub fn read_validation_results(path: impl AsRef<Path>) -> Result<Vec<ValidationRow>> {
    let path = path.as_ref();
    let table = Table::read(path, "write it with `lit-claire validate`")?;
    let [ckpt, step, dataset, loss] =
        ["checkpoint", "step", "dataset", "loss"].map(|c| table.require(path, c));
    let (ckpt, step, dataset, loss) = (ckpt?, step?, dataset?, loss?);
    let [ppl, tokens, bs, elapsed, mem, data, bpb] = [
        "perplexity",
        "tokens",
        "batch_size",
        "elapsed_s",
        "peak_memory_mb",
        "data",
        "bits_per_byte",
    ]
    .map(|c| table.column(c));
    let mut rows = Vec::with_capacity(table.records.len());
    for rec in &table.records {
        let name = rec.field(ckpt);
        let checkpoint = Path::new(name)
            .file_name()
            .map_or(name.to_string(), |n| n.to_string_lossy().into_owned());
        rows.push(ValidationRow {
            checkpoint,
            step: rec.required_u64(path, step, "step")?,
            dataset: rec.field(dataset).to_string(),
            loss: rec
                .f64(path, Some(loss), "loss")?
                .ok_or_else(|| rec.error(path, "loss", "is empty"))?,
            perplexity: rec.f64(path, ppl, "perplexity")?,
            tokens: rec.u64(path, tokens, "tokens")?,
            batch_size: rec.u64(path, bs, "batch_size")?,
            elapsed_s: rec.f64(path, elapsed, "elapsed_s")?,
            peak_memory_mb: rec.f64(path, mem, "peak_memory_mb")?,
            data: data.map_or("", |i| rec.field(i)).to_string(),
            bits_per_byte: rec.f64(path, bpb, "bits_per_byte")?,
        });
    }
    Ok(rows)
}

/// A checkpoint folder of a run and what its `training_state.json` says.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointInfo {
    /// Folder name (`step-00000100`, `final`).
    pub name: String,
    pub path: PathBuf,
    /// From the state file, else from a `step-N` folder name.
    pub step: Option<u64>,
    /// Training tokens seen when it was written.
    pub tokens: Option<u64>,
    /// Validation loss measured during training at this step, if any.
    pub val_loss: Option<f64>,
}

/// The checkpoints of a run: its sub-folders holding a `training_state.json`, by step.
pub fn list_checkpoints(run: &Path) -> Result<Vec<CheckpointInfo>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(run).at(run)? {
        let dir = entry.at(run)?.path();
        let state_path = dir.join(STATE_FILE);
        if !state_path.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&state_path).at(&state_path)?;
        let state: Value = serde_json::from_str(&text)
            .map_err(|e| Error::bad_file(&state_path, format!("not valid JSON: {e}")))?;
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let from_name = name.strip_prefix("step-").and_then(|s| s.parse().ok());
        out.push(CheckpointInfo {
            step: state.get("step").and_then(json_u64).or(from_name),
            tokens: state.get("tokens").and_then(json_u64),
            val_loss: state
                .get("val_loss")
                .and_then(Value::as_f64)
                .filter(|v| v.is_finite()),
            name,
            path: dir,
        });
    }
    out.sort_by(|a, b| (a.step, &a.name).cmp(&(b.step, &b.name)));
    Ok(out)
}

fn json_u64(v: &Value) -> Option<u64> {
    v.as_u64()
        .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f.round() as u64))
}

/// Where a validation loss comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossSource {
    /// Mean over datasets of `validation_results.csv` (`lit-claire validate`).
    OfflineMean,
    /// Measured by the trainer (`training_state.json` or `metrics.csv`).
    Online,
}

/// The checkpoint of a run with the lowest validation loss.
#[derive(Debug, Clone, PartialEq)]
pub struct BestCheckpoint {
    /// Folder name (`step-00000100`, `final`).
    pub checkpoint: String,
    pub path: PathBuf,
    pub step: u64,
    pub val_loss: f64,
    pub source: LossSource,
}

/// The best checkpoint of `run`, among the checkpoint folders that still exist: the lowest
/// mean offline validation loss over datasets when `validation_results.csv` scores any
/// checkpoint on every dataset it names, else the lowest validation loss measured during
/// training (`training_state.json`, or `metrics.csv` at the checkpoint's step). Ties go
/// to the earlier step. `None` when no checkpoint has a validation loss.
pub fn best_checkpoint(run: &Path) -> Result<Option<BestCheckpoint>> {
    if !run.is_dir() {
        return Err(Error::missing(
            run,
            "give a run directory (the --out-dir of `lit-claire pretrain`)",
        ));
    }
    let checkpoints = list_checkpoints(run)?;
    let validation = run.join(VALIDATION_FILE);
    if validation.is_file() {
        let rows = read_validation_results(&validation)?;
        let means = offline_means(&rows);
        let best = checkpoints
            .iter()
            .filter_map(|c| means.get(&c.name).map(|&(step, loss)| (c, step, loss)))
            .min_by(|a, b| a.2.total_cmp(&b.2).then(a.1.cmp(&b.1)));
        if let Some((c, step, loss)) = best {
            return Ok(Some(BestCheckpoint {
                checkpoint: c.name.clone(),
                path: c.path.clone(),
                step,
                val_loss: loss,
                source: LossSource::OfflineMean,
            }));
        }
    }
    let metrics_path = run.join(METRICS_FILE);
    let metrics = if metrics_path.is_file() {
        read_metrics(&metrics_path)?
    } else {
        Vec::new()
    };
    let best = checkpoints
        .iter()
        .filter_map(|c| {
            let step = c.step?;
            let online = c.val_loss.or_else(|| {
                metrics
                    .iter()
                    .rev()
                    .find(|r| r.step == step && r.val_loss.is_some_and(f64::is_finite))
                    .and_then(|r| r.val_loss)
            });
            online.map(|loss| (c, step, loss))
        })
        .min_by(|a, b| a.2.total_cmp(&b.2).then(a.1.cmp(&b.1)));
    Ok(best.map(|(c, step, loss)| BestCheckpoint {
        checkpoint: c.name.clone(),
        path: c.path.clone(),
        step,
        val_loss: loss,
        source: LossSource::Online,
    }))
}

/// The rows scored on each dataset's newest data: a dataset name re-prepared since
/// (another `data` fingerprint) keeps only the rows of its last fingerprint, as scores of
/// the old data are not comparable with scores of the new.
pub fn newest_data_rows(rows: &[ValidationRow]) -> Vec<&ValidationRow> {
    let newest: BTreeMap<&str, &str> = rows
        .iter()
        .map(|r| (r.dataset.as_str(), r.data.as_str()))
        .collect();
    rows.iter()
        .filter(|r| newest[r.dataset.as_str()] == r.data)
        .collect()
}

/// Mean offline loss per checkpoint, `checkpoint -> (step, mean)`, over the checkpoints
/// scored on every dataset of the file (a mean over fewer datasets is not comparable),
/// on each dataset's newest data (`newest_data_rows`). A (checkpoint, dataset) pair
/// scored twice counts with its last row.
pub fn offline_means(rows: &[ValidationRow]) -> BTreeMap<String, (u64, f64)> {
    let rows = newest_data_rows(rows);
    let datasets: BTreeSet<&str> = rows.iter().map(|r| r.dataset.as_str()).collect();
    let mut per_ckpt: BTreeMap<&str, (u64, BTreeMap<&str, f64>)> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.loss.is_finite()) {
        let e = per_ckpt
            .entry(&r.checkpoint)
            .or_insert((r.step, BTreeMap::new()));
        e.0 = r.step;
        e.1.insert(&r.dataset, r.loss);
    }
    per_ckpt
        .into_iter()
        .filter(|(_, (_, losses))| losses.len() == datasets.len())
        .map(|(name, (step, losses))| {
            let mean = losses.values().sum::<f64>() / losses.len() as f64;
            (name.to_string(), (step, mean))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// A small tolerant CSV table.

struct Table {
    header: Vec<String>,
    records: Vec<Record>,
}

struct Record {
    line: u64,
    fields: csv::StringRecord,
}

impl Table {
    fn read(path: &Path, hint: &str) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::missing(path, hint));
        }
        let mut reader = csv::ReaderBuilder::new()
            .flexible(true)
            .has_headers(true)
            .from_path(path)
            .map_err(|e| Error::bad_file(path, e))?;
        let header: Vec<String> = reader
            .headers()
            .map_err(|e| Error::bad_file(path, e))?
            .iter()
            .map(|h| h.trim().to_string())
            .collect();
        if header.iter().all(String::is_empty) {
            return Err(Error::bad_file(path, "empty file: no header row"));
        }
        let mut records = Vec::new();
        let mut short_line = None;
        for rec in reader.records() {
            let fields = rec.map_err(|e| Error::bad_file(path, e))?;
            let line = fields.position().map_or(0, |p| p.line());
            if let Some(l) = short_line {
                return Err(Error::bad_file(
                    path,
                    format!("line {l} has fewer fields than the header"),
                ));
            }
            if fields.len() < header.len() {
                // Only the last row may be short: it is being written.
                short_line = Some(line);
                continue;
            }
            if fields.iter().zip(&header).all(|(f, h)| f.trim() == h) {
                continue;
            }
            records.push(Record { line, fields });
        }
        Ok(Table { header, records })
    }

    fn column(&self, name: &str) -> Option<usize> {
        self.header.iter().position(|h| h == name)
    }

    fn require(&self, path: &Path, name: &str) -> Result<usize> {
        self.column(name).ok_or_else(|| {
            Error::bad_file(
                path,
                format!("no `{name}` column (header: {})", self.header.join(",")),
            )
        })
    }
}

impl Record {
    fn field(&self, i: usize) -> &str {
        self.fields.get(i).unwrap_or("").trim()
    }

    fn error(&self, path: &Path, column: &str, msg: &str) -> Error {
        Error::bad_file(
            path,
            format!("line {}, column `{column}`: {msg}", self.line),
        )
    }

    fn f64(&self, path: &Path, i: Option<usize>, column: &str) -> Result<Option<f64>> {
        let Some(i) = i else { return Ok(None) };
        let s = self.field(i);
        if s.is_empty() {
            return Ok(None);
        }
        s.parse::<f64>()
            .map(Some)
            .map_err(|_| self.error(path, column, &format!("`{s}` is not a number")))
    }

    fn u64(&self, path: &Path, i: Option<usize>, column: &str) -> Result<Option<u64>> {
        let Some(i) = i else { return Ok(None) };
        let s = self.field(i);
        if s.is_empty() {
            return Ok(None);
        }
        if let Ok(v) = s.parse::<u64>() {
            return Ok(Some(v));
        }
        // Counts written as floats (`1.2e6`, `4096.0`).
        match s.parse::<f64>() {
            Ok(v) if v >= 0.0 && v.is_finite() => Ok(Some(v.round() as u64)),
            _ => Err(self.error(
                path,
                column,
                &format!("`{s}` is not a non-negative integer"),
            )),
        }
    }

    fn required_u64(&self, path: &Path, i: usize, column: &str) -> Result<u64> {
        self.u64(path, Some(i), column)?
            .ok_or_else(|| self.error(path, column, "is empty"))
    }
}
