//! Offline validation: every checkpoint of a run on every dataset's validation split,
//! appended to a CSV.
//!
//! Rows: `checkpoint, step, dataset, loss, perplexity, tokens, batch_size, elapsed_s,
//! peak_memory_mb, data, bits_per_byte` (`data`: the prepared folder's fingerprint, so
//! the same dataset names in other data are scored again; followed by
//! `+cross-document` when packed documents attended to each other, so the two ways of
//! scoring are kept apart; `bits_per_byte`: the summed loss / ln 2 / the UTF-8 bytes of
//! the text scored, by the checkpoint's tokenizer). A file of an older layout (without
//! `data`, or without `bits_per_byte`) gets the missing columns, empty, before rows are
//! appended. Triples already in the CSV are skipped, so
//! the command can run again and again while training goes on (`watch` keeps looking for new checkpoints until
//! the run's `final/` one is scored). LoRA checkpoints are scored as base + adapter,
//! without writing a merged copy; the base is loaded once.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::batches::TrainData;
use super::checkpoint::{self, TrainingState};
use super::evaluate::{Scoring, evaluate_split};
use crate::error::{Error, IoContext, Result};
use crate::hf::{attach_adapter_dir, load_model};
use crate::model::Gpt;
use crate::strategy::Strategy;
use crate::tokenizer::TokenBytes;

pub const VALIDATION_FILE: &str = "validation_results.csv";
const HEADER: &str = "checkpoint,step,dataset,loss,perplexity,tokens,batch_size,elapsed_s,peak_memory_mb,data,bits_per_byte";
/// The headers of files written before, each with the columns it lacks: before the
/// `data` column, and before `bits_per_byte`.
const OLD_HEADERS: [(&str, &str); 2] = [
    (
        "checkpoint,step,dataset,loss,perplexity,tokens,batch_size,elapsed_s,peak_memory_mb",
        ",,",
    ),
    (
        "checkpoint,step,dataset,loss,perplexity,tokens,batch_size,elapsed_s,peak_memory_mb,data",
        ",",
    ),
];

/// The shortest `--watch` interval: each look lists the run's checkpoints, so a
/// shorter one (0) only spins a core.
pub const MIN_WATCH: Duration = Duration::from_secs(1);

/// Refuse a `--watch` interval below [`MIN_WATCH`], naming the flag.
pub fn check_watch(watch: Option<Duration>) -> Result<()> {
    match watch {
        Some(every) if every < MIN_WATCH => Err(Error::Usage(format!(
            "--watch {}: the interval between looks for new checkpoints must be at least {} s",
            every.as_secs_f64(),
            MIN_WATCH.as_secs()
        ))),
        _ => Ok(()),
    }
}

/// What to validate and how.
#[derive(Debug, Clone)]
pub struct ValidateOptions {
    pub run: PathBuf,
    /// Batches per dataset (None: the whole split).
    pub max_batches: Option<usize>,
    pub batch_size: usize,
    /// Default: `RUN/validation_results.csv`.
    pub csv: Option<PathBuf>,
    /// Poll for new checkpoints every this often until `final/` is scored; at least
    /// [`MIN_WATCH`] (0 would poll in a busy loop).
    pub watch: Option<Duration>,
    /// Let packed documents attend to each other (`--cross-document-attention`). None:
    /// as each checkpoint's run trained (false for runs that do not say).
    pub cross_document_attention: Option<bool>,
}

/// One scored (checkpoint, dataset) pair.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidationRow {
    pub checkpoint: String,
    pub step: usize,
    pub dataset: String,
    pub loss: f64,
    pub perplexity: f64,
    pub tokens: usize,
    pub batch_size: usize,
    pub elapsed_s: f64,
    pub peak_memory_mb: f64,
    /// Fingerprint of the prepared data (empty for data made in memory).
    pub data: String,
    /// Summed loss / ln 2 / UTF-8 bytes of the text scored.
    pub bits_per_byte: Option<f64>,
}

/// Peak resident memory of this process in MB (Linux; 0 elsewhere).
pub fn peak_memory_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// `(checkpoint, dataset, data)` triples already in `csv`. A file of an older layout
/// (no `data` or no `bits_per_byte` column) is rewritten with empty ones: its rows
/// stay, and are not mistaken for scores of the data at hand.
fn done_triples(csv: &Path) -> Result<HashSet<(String, String, String)>> {
    if !csv.exists() {
        return Ok(HashSet::new());
    }
    let text = std::fs::read_to_string(csv).at(csv)?;
    let mut lines = text.lines();
    match lines.next() {
        Some(h) if h.trim() == HEADER => {}
        Some(h) if OLD_HEADERS.iter().any(|(old, _)| h.trim() == *old) => {
            let (_, missing) = OLD_HEADERS
                .iter()
                .find(|(old, _)| h.trim() == *old)
                .expect("matched above");
            let mut new = format!("{HEADER}\n");
            for l in lines.clone() {
                new.push_str(l);
                new.push_str(missing);
                new.push('\n');
            }
            crate::io::write_atomic(csv, new.as_bytes())?;
        }
        Some(h) => {
            return Err(Error::bad_file(
                csv,
                format!("unexpected header {h:?}; pass --csv with another file"),
            ));
        }
        None => return Ok(HashSet::new()),
    }
    Ok(lines
        .filter_map(|l| {
            let c: Vec<&str> = l.split(',').collect();
            let data = c.get(9).copied().unwrap_or("");
            Some((
                c.first()?.to_string(),
                c.get(2)?.to_string(),
                data.to_string(),
            ))
        })
        .collect())
}

/// The bytes each token id of the checkpoint in `dir` stands for, after checking that
/// it reads `data` with the tokenizer it was prepared with: its own tokenizer files,
/// else those of its base model (None when neither has one and the data does not say
/// which it was prepared with).
fn checked_tokenizer(
    dir: &Path,
    state: &TrainingState,
    data: &TrainData,
) -> Result<Option<TokenBytes>> {
    let tok_dir = if dir.join("tokenizer.json").exists() {
        dir
    } else {
        state.base_checkpoint_dir.as_path()
    };
    if data.tokenizer_hash.is_none() && !tok_dir.join("tokenizer.json").exists() {
        return Ok(None);
    }
    let tokenizer = crate::tokenizer::Tokenizer::from_dir(tok_dir)?;
    data.check_tokenizer(&tokenizer)?;
    Ok(Some(tokenizer.token_bytes()))
}

/// The model of a checkpoint: its own weights, or `base` + its adapter.
pub fn model_of(
    dir: &Path,
    state: &TrainingState,
    base: &mut Option<(PathBuf, Gpt)>,
    strategy: &Strategy,
) -> Result<Gpt> {
    if crate::hf::peft::is_adapter_dir(dir) {
        let base_dir = &state.base_checkpoint_dir;
        if base.as_ref().is_none_or(|(p, _)| p != base_dir) {
            if let Some(expected) = &state.base_fingerprint {
                crate::hf::merge::check_base_fingerprint(
                    dir,
                    base_dir,
                    expected,
                    "put the base model it was trained on back in that folder",
                )?;
            }
            let m = load_model(base_dir, &strategy.build_options(false), None).map_err(|e| {
                Error::Msg(format!(
                    "{}: the base model of this LoRA checkpoint could not be loaded from {}: {e}",
                    dir.display(),
                    base_dir.display()
                ))
            })?;
            *base = Some((base_dir.clone(), m));
        }
        let mut m = base.as_ref().expect("set above").1.clone();
        attach_adapter_dir(&mut m, dir)?;
        Ok(m)
    } else {
        load_model(dir, &strategy.build_options(false), None)
    }
}

/// Score every not-yet-scored (checkpoint, dataset) pair of the run, appending rows.
pub fn validate_run(
    opts: &ValidateOptions,
    data: &TrainData,
    strategy: &Strategy,
) -> Result<Vec<ValidationRow>> {
    if !opts.run.is_dir() {
        return Err(Error::missing(
            &opts.run,
            "--out-dir must be a training run folder",
        ));
    }
    if opts.batch_size == 0 {
        return Err(Error::Usage("--batch-size must be positive".into()));
    }
    if opts.max_batches == Some(0) {
        return Err(Error::Usage(
            "--max 0 would score no batch; give at least 1, or leave --max out to score the whole split".into(),
        ));
    }
    check_watch(opts.watch)?;
    let csv = opts
        .csv
        .clone()
        .unwrap_or_else(|| opts.run.join(VALIDATION_FILE));
    let mut done = done_triples(&csv)?;
    let fingerprint = data
        .origin
        .as_ref()
        .map(|o| o.fingerprint.clone())
        .unwrap_or_default();
    let data_label = |cross: bool| match cross {
        true => format!("{fingerprint}+cross-document"),
        false => fingerprint.clone(),
    };
    let key =
        |ckpt: &str, ds: &str, cross: bool| (ckpt.to_string(), ds.to_string(), data_label(cross));
    let mut rows = Vec::new();
    let mut base = None;
    // The model vocabulary the validation splits' ids were checked against.
    let mut vocab_checked = None;
    loop {
        let checkpoints = checkpoint::list(&opts.run)?;
        if checkpoints.is_empty() && opts.watch.is_none() {
            return Err(Error::Data(format!(
                "{} has no checkpoint yet (step-*/ or final/ folders)",
                opts.run.display()
            )));
        }
        let mut finished = false;
        for (dir, state) in &checkpoints {
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            finished |= name == "final";
            let cross = opts
                .cross_document_attention
                .or(state.hyperparameters.cross_document_attention)
                .unwrap_or(false);
            let todo: Vec<_> = data
                .datasets
                .iter()
                .filter(|d| !done.contains(&key(&name, &d.name, cross)))
                .collect();
            if todo.is_empty() {
                continue;
            }
            let token_bytes = checked_tokenizer(dir, state, data)?;
            let cfg_dir = if dir.join("config.json").exists() {
                dir.as_path()
            } else {
                state.base_checkpoint_dir.as_path()
            };
            let model_cfg = crate::config::load_config(cfg_dir)?;
            data.check_context(model_cfg.block_size)?;
            data.check_sample_memory(
                opts.batch_size,
                &model_cfg,
                strategy.device.is_cpu(),
                "--batch-size",
            )?;
            let model = model_of(dir, state, &mut base, strategy)?;
            if vocab_checked != Some(model.cfg.vocab_size) {
                data.check_ids_below(model.cfg.vocab_size, dir, false)?;
                vocab_checked = Some(model.cfg.vocab_size);
            }
            let how = Scoring {
                block_size: data.block_size,
                micro_batch_size: opts.batch_size,
                max_batches: opts.max_batches,
                cross_document: cross,
                token_bytes: token_bytes.as_ref(),
            };
            for ds in todo {
                let start = Instant::now();
                let r = evaluate_split(&model, ds.validation.as_ref(), &how, &strategy.device)?;
                let Some(r) = r else {
                    eprintln!(
                        "{name}: dataset {} has no validation samples, skipped",
                        ds.name
                    );
                    done.insert(key(&name, &ds.name, cross));
                    continue;
                };
                let row = ValidationRow {
                    checkpoint: name.clone(),
                    step: state.step,
                    dataset: ds.name.clone(),
                    loss: r.loss,
                    perplexity: r.perplexity(),
                    tokens: r.tokens,
                    batch_size: opts.batch_size,
                    elapsed_s: start.elapsed().as_secs_f64(),
                    peak_memory_mb: peak_memory_mb(),
                    data: data_label(cross),
                    bits_per_byte: r.bits_per_byte(),
                };
                append(&csv, &row)?;
                eprintln!(
                    "{name} {}: loss {:.4} perplexity {:.2} bits per byte {}",
                    ds.name,
                    row.loss,
                    row.perplexity,
                    row.bits_per_byte.map_or("-".into(), |b| format!("{b:.4}"))
                );
                done.insert(key(&name, &ds.name, cross));
                rows.push(row);
            }
        }
        match opts.watch {
            Some(every) if !finished => std::thread::sleep(every),
            _ => return Ok(rows),
        }
    }
}

/// Append `r` to `csv`, writing the header first into a new file.
pub fn append(csv: &Path, r: &ValidationRow) -> Result<()> {
    let new = !csv.exists();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(csv)
        .at(csv)?;
    if new {
        writeln!(f, "{HEADER}").at(csv)?;
    }
    writeln!(
        f,
        "{},{},{},{},{},{},{},{:.3},{:.1},{},{}",
        r.checkpoint,
        r.step,
        r.dataset,
        r.loss,
        r.perplexity,
        r.tokens,
        r.batch_size,
        r.elapsed_s,
        r.peak_memory_mb,
        r.data,
        r.bits_per_byte.map(|b| b.to_string()).unwrap_or_default()
    )
    .at(csv)
}
