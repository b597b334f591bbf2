//! Every checkpoint of a run, and the base model it started from, on downstream tasks
//! ([`crate::eval`]):
//! `evaluate --out-dir RUN`, appending to `RUN/eval_results.csv`.
//!
//! The base model is scored as checkpoint `base` at step 0, so that each task's curve
//! starts where continual pretraining started: what it gained and what it forgot are
//! read against it. LoRA checkpoints are scored as base + adapter (the base loaded
//! once), with the tokenizer of the checkpoint, else of its base.

use std::path::{Path, PathBuf};

use super::checkpoint;
use super::validate::model_of;
use crate::error::{Error, Result};
use crate::eval::output::{EVAL_FILE, append_csv, done_keys};
use crate::eval::task::Task;
use crate::eval::{EvalOptions, TaskResult, evaluate};
use crate::hf::load_model;
use crate::strategy::Strategy;
use crate::tokenizer::Tokenizer;

/// A model to score: its name, its step, and its checkpoint folder and state (None: the
/// run's base model).
type Entry = (String, usize, Option<(PathBuf, checkpoint::TrainingState)>);

/// What to score.
pub struct RunEvaluation<'a> {
    pub run: &'a Path,
    pub tasks: &'a [Task],
    pub opts: &'a EvalOptions,
    /// Default: `RUN/eval_results.csv`.
    pub csv: Option<PathBuf>,
}

/// One scored checkpoint.
pub struct CheckpointResults {
    pub checkpoint: String,
    pub step: usize,
    pub results: Vec<TaskResult>,
}

/// Score each (checkpoint, task) pair not yet in the CSV, appending its rows once
/// all the checkpoint's tasks are scored; `each` sees every checkpoint's results.
pub fn evaluate_run(
    r: &RunEvaluation,
    strategy: &Strategy,
    mut each: impl FnMut(&CheckpointResults) -> Result<()>,
) -> Result<Vec<CheckpointResults>> {
    if !r.run.is_dir() {
        return Err(Error::missing(
            r.run,
            "--out-dir must be a training run folder",
        ));
    }
    let csv = r.csv.clone().unwrap_or_else(|| r.run.join(EVAL_FILE));
    let done = done_keys(&csv)?;
    let checkpoints = checkpoint::list(r.run)?;
    let Some((_, first)) = checkpoints.first() else {
        return Err(Error::Data(format!(
            "{} has no checkpoint yet (step-*/ or final/ folders)",
            r.run.display()
        )));
    };
    let base_dir = first.base_checkpoint_dir.clone();
    let mut entries: Vec<Entry> = vec![("base".to_string(), 0, None)];
    for (dir, state) in checkpoints {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        entries.push((name, state.step, Some((dir, state))));
    }
    let mut base = None;
    let mut out = Vec::new();
    for (name, step, ck) in entries {
        let todo: Vec<Task> = r
            .tasks
            .iter()
            .filter(|t| !done.contains(&(name.clone(), t.name.clone(), t.fingerprint.clone())))
            .cloned()
            .collect();
        if todo.is_empty() {
            continue;
        }
        let (model, tok_dir) = match &ck {
            None => (
                load_model(&base_dir, &strategy.build_options(false), None).map_err(|e| {
                    Error::Msg(format!(
                        "the run's base model {} could not be loaded: {e}",
                        base_dir.display()
                    ))
                })?,
                base_dir.clone(),
            ),
            Some((dir, state)) => {
                let m = model_of(dir, state, &mut base, strategy)?;
                let tok_dir = if dir.join("tokenizer.json").exists() {
                    dir.clone()
                } else {
                    state.base_checkpoint_dir.clone()
                };
                (m, tok_dir)
            }
        };
        let tok = Tokenizer::from_dir(&tok_dir)?;
        let results = evaluate(&model, &tok, &todo, r.opts)?;
        append_csv(&csv, &name, step, &results)?;
        let c = CheckpointResults {
            checkpoint: name,
            step,
            results,
        };
        each(&c)?;
        out.push(c);
    }
    Ok(out)
}
