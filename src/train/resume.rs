//! Continuing a run from a checkpoint: which checkpoint (`--resume auto` or a
//! folder), whether it may continue this run (same kind of training, LoRA settings,
//! base model and document masking), and restoring what the base weights do not hold
//! (the adapter, the optimizer's moments).
//!
//! Everything here that a user can fail runs before any weights load.

use std::path::{Path, PathBuf};

use super::batches::TrainData;
use super::checkpoint::{self, TrainingState};
use super::config::TrainConfig;
use super::metrics::METRICS_FILE;
use super::optimizer::Optimizer;
use crate::config::load_config;
use crate::error::{Error, Result};
use crate::lora::{TOKEN_ROWS_SUFFIX, TrainEmbeddings};
use crate::strategy::Strategy;

/// What a run continues from, settled before any weights load.
pub(super) struct Resume {
    /// The checkpoint to resume from, with its state (None: a new run).
    pub from: Option<(PathBuf, TrainingState)>,
    /// `--cross-document-attention` as this run uses it (a resume keeps its checkpoint's).
    pub cross_document: bool,
    /// What the resumed LoRA checkpoint trained of the embeddings (None: a new run, or
    /// full fine-tuning).
    pub train_embeddings: Option<TrainEmbeddings>,
    /// Lines for the log once it is open (a damaged checkpoint passed over, ...).
    pub warnings: Vec<String>,
}

/// The checkpoint `cfg.resume` names (none for a new run), checked against `cfg`.
/// `global_zero`: this rank owns the run folder and checks that its `metrics.csv`
/// still holds the rows logged before the checkpoint.
pub(super) fn plan_resume(cfg: &TrainConfig, global_zero: bool) -> Result<Resume> {
    let (from, mut warnings) = resume_from(cfg)?;
    let mut cross_document = cfg.cross_document();
    let mut train_embeddings = None;
    if let Some((dir, state)) = &from {
        train_embeddings = resumed_train_embeddings(cfg, dir, state)?;
        check_resume(cfg, dir, state)?;
        let (value, note) = resumed_cross_document(cfg, dir, state)?;
        cross_document = value;
        warnings.extend(note);
        if let (Some(expected), true) = (state.metrics_rows, global_zero) {
            warnings.extend(super::metrics::check_rows(
                &cfg.out_dir,
                state.step,
                expected,
            )?);
        }
    }
    Ok(Resume {
        from,
        cross_document,
        train_embeddings,
        warnings,
    })
}

/// Whether `dir` already holds a run.
fn holds_run(dir: &Path) -> bool {
    dir.join("hyperparameters.toml").exists()
        || dir.join(METRICS_FILE).exists()
        || checkpoint::list(dir)
            .map(|l| !l.is_empty())
            .unwrap_or(false)
}

/// The checkpoint `--resume` names, checked whole, with its state (`auto`: the run's
/// newest complete one, passing over damaged ones with a warning each), refusing to
/// start a second run in a folder that holds one.
fn resume_from(cfg: &TrainConfig) -> Result<(Option<checkpoint::Found>, Vec<String>)> {
    let out = &cfg.out_dir;
    match cfg.resume.as_deref() {
        None if holds_run(out) => Err(Error::Usage(format!(
            "{} holds another run; continue it with --resume auto or choose another --out-dir",
            out.display()
        ))),
        None => Ok((None, Vec::new())),
        Some("auto") => checkpoint::newest_complete(out),
        Some(p) => {
            let dir = PathBuf::from(p);
            let state = checkpoint::check(&dir)?;
            Ok((Some((dir, state)), Vec::new()))
        }
    }
}

/// A checkpoint continues only a run of its own kind and model: full fine-tuning or
/// LoRA with the same rank, alpha and targets (another alpha or rank would rescale
/// what the adapter computes), from a base model of the same configuration.
fn check_resume(cfg: &TrainConfig, dir: &Path, state: &TrainingState) -> Result<()> {
    let was = &state.hyperparameters;
    let lora_then = was.lora_r > 0;
    if (cfg.lora_r > 0) != lora_then {
        return Err(Error::Usage(format!(
            "{} is a checkpoint of {}; resume it with --lora-r {} (or its run's recipe)",
            dir.display(),
            if lora_then {
                "a LoRA run"
            } else {
                "full fine-tuning"
            },
            was.lora_r
        )));
    }
    if lora_then {
        let mut diffs = Vec::new();
        if cfg.lora_r != was.lora_r {
            diffs.push(format!(
                "--lora-r {} (checkpoint: {})",
                cfg.lora_r, was.lora_r
            ));
        }
        if cfg.lora_alpha != was.lora_alpha {
            diffs.push(format!(
                "--lora-alpha {} (checkpoint: {})",
                cfg.lora_alpha, was.lora_alpha
            ));
        }
        if cfg.lora_targets() != was.lora_targets() {
            diffs.push(format!(
                "LoRA targets {:?} (checkpoint: {:?})",
                cfg.lora_targets(),
                was.lora_targets()
            ));
        }
        if !diffs.is_empty() {
            return Err(Error::Usage(format!(
                "{} was trained with other LoRA settings: {}; resume with the checkpoint's values",
                dir.display(),
                diffs.join(", ")
            )));
        }
    }
    if dir.join("config.json").exists() && load_config(dir)? != load_config(&cfg.checkpoint_dir)? {
        return Err(Error::Usage(format!(
            "{} was trained from another base model than --checkpoint-dir {} (their config.json differ)",
            dir.display(),
            cfg.checkpoint_dir.display()
        )));
    }
    // A LoRA checkpoint holds no base weights: the base must be the one it trained on.
    if let (true, Some(expected)) = (lora_then, &state.base_fingerprint) {
        crate::hf::merge::check_base_fingerprint(
            dir,
            &cfg.checkpoint_dir,
            expected,
            "resume it with --checkpoint-dir naming the base model it was trained on",
        )?;
    }
    Ok(())
}

/// Fail unless the state of checkpoint `dir` can be where this run (`total_steps`
/// steps on `data` over `world` ranks) stands: every field of its
/// `training_state.json` that a run could not have written is named, with the fix.
pub(super) fn check_state(
    cfg: &TrainConfig,
    data: &TrainData,
    world: usize,
    dir: &Path,
    state: &TrainingState,
    total_steps: usize,
) -> Result<()> {
    let file = dir.join(checkpoint::STATE_FILE);
    let bad = |msg: String| Err(Error::bad_file(&file, msg));
    if state.step > total_steps {
        return bad(format!(
            "step {} is past the end of this run ({total_steps} steps from --max-steps, --num-epochs, --max-tokens and the data); raise them to continue it, or start a new run",
            state.step
        ));
    }
    let epoch_len = data.epoch_len(1);
    let pos = state.position;
    if pos.offset > epoch_len {
        return bad(format!(
            "data position {} of epoch {} is past the end of an epoch of {} ({epoch_len} samples); was it trained on other data than --data-dir {}?",
            pos.offset,
            pos.epoch,
            data.origin
                .as_ref()
                .map_or("the training data".into(), |o| o.dir.display().to_string()),
            cfg.data_dir.display()
        ));
    }
    // In the middle of an epoch, its order must be the one the checkpoint followed.
    if pos.offset > 0 {
        let now = data.origin.as_ref().map(|o| &o.fingerprint);
        if let (Some(then), Some(now)) = (&state.data_fingerprint, now) {
            if then != now {
                return Err(Error::Usage(format!(
                    "{} stopped at sample {} of epoch {} of other data than --data-dir {} (fingerprint {now}, the checkpoint's {then}); resume on the data it trained on, or start a new run",
                    dir.display(),
                    pos.offset,
                    pos.epoch,
                    cfg.data_dir.display()
                )));
            }
        }
        if cfg.seed != state.hyperparameters.seed {
            return Err(Error::Usage(format!(
                "{} stopped in the middle of epoch {}, drawn in the order of --seed {}; resume with --seed {} (another seed would draw the rest of the epoch in another order)",
                dir.display(),
                pos.epoch,
                state.hyperparameters.seed,
                state.hyperparameters.seed
            )));
        }
    }
    // Every step consumes one global batch; an epoch takes a step at least.
    let was = &state.hyperparameters;
    let most_per_step = (was.batch_size * was.world_size()).max(cfg.batch_size * world);
    if pos.epoch > state.step || pos.offset > state.step.saturating_mul(most_per_step) {
        return bad(format!(
            "data position epoch {} offset {} cannot be reached in {} steps of at most {most_per_step} samples",
            pos.epoch, pos.offset, state.step
        ));
    }
    if state.evals_without_improvement > state.step {
        return bad(format!(
            "evals_without_improvement {} is more than the {} steps done",
            state.evals_without_improvement, state.step
        ));
    }
    if state.step == 0 && state.tokens > 0 {
        return bad(format!("{} tokens counted in 0 steps", state.tokens));
    }
    if !(state.elapsed_s.is_finite() && state.elapsed_s >= 0.0) {
        return bad(format!(
            "elapsed_s {} is not a number of seconds >= 0",
            state.elapsed_s
        ));
    }
    for (name, v) in [
        ("train_loss", state.train_loss),
        ("val_loss", state.val_loss),
        ("best_val_loss", state.best_val_loss),
    ] {
        if v.is_some_and(|v| !v.is_finite()) {
            return bad(format!(
                "{name} {} is not a finite number",
                v.unwrap_or_default()
            ));
        }
    }
    if let Some(s) = &state.loss_scaler {
        if !(s.scale.is_finite() && s.scale > 0.0) {
            return bad(format!(
                "loss_scaler.scale {} is not a finite number > 0",
                s.scale
            ));
        }
    }
    Ok(())
}

/// `--cross-document-attention` of a resumed run: the checkpoint's, which a flag may
/// repeat but not contradict (the loss would change meaning mid-run). A checkpoint from
/// before the flag existed trained with cross-document attention and keeps it unless
/// the flag says otherwise; the returned line says so.
fn resumed_cross_document(
    cfg: &TrainConfig,
    dir: &Path,
    state: &TrainingState,
) -> Result<(bool, Option<String>)> {
    match (
        cfg.cross_document_attention,
        state.hyperparameters.cross_document_attention,
    ) {
        (Some(now), Some(then)) if now != then => Err(Error::Usage(format!(
            "{} was trained with --cross-document-attention {then}; resume it with --cross-document-attention {then} (or leave the flag out), or start a new run to change it",
            dir.display()
        ))),
        (now, Some(then)) => Ok((now.unwrap_or(then), None)),
        (Some(now), None) => Ok((now, None)),
        (None, None) => Ok((
            true,
            Some(format!(
                "{} predates --cross-document-attention: its run let packed documents attend to each other, and so does this one; pass --cross-document-attention false to switch",
                dir.display()
            )),
        )),
    }
}

/// What a LoRA checkpoint trained of the embeddings (an older one without the
/// setting trained none), which a flag may repeat but not contradict. None for full
/// fine-tuning.
fn resumed_train_embeddings(
    cfg: &TrainConfig,
    dir: &Path,
    state: &TrainingState,
) -> Result<Option<TrainEmbeddings>> {
    if state.hyperparameters.lora_r == 0 {
        return Ok(None);
    }
    let then = state
        .hyperparameters
        .train_embeddings
        .unwrap_or(TrainEmbeddings::None);
    match cfg.train_embeddings {
        Some(now) if now != then => Err(Error::Usage(format!(
            "{} was trained with --train-embeddings {then}; resume it with --train-embeddings {then} (or leave the flag out)",
            dir.display()
        ))),
        _ => Ok(Some(then)),
    }
}

/// Set fresh adapter variables (LoRA matrices, trained embeddings) to the values
/// saved in checkpoint `dir`.
pub(super) fn restore_adapter(
    dir: &Path,
    vars: &[(String, candle_core::Var)],
    strategy: &Strategy,
) -> Result<()> {
    let adapter = crate::hf::peft::load_adapter(dir, &strategy.device)?;
    restore_adapter_from(dir, &adapter, vars)
}

/// [`restore_adapter`] from `adapter`, read from checkpoint `dir` already (a model
/// loaded block by block sets each block's variables as it comes).
pub(super) fn restore_adapter_from(
    dir: &Path,
    adapter: &crate::hf::peft::PeftAdapter,
    vars: &[(String, candle_core::Var)],
) -> Result<()> {
    let e = &adapter.embeddings;
    let saved_rows = e
        .rows
        .iter()
        .map(|(m, _, t)| (format!("{m}{TOKEN_ROWS_SUFFIX}"), t));
    let saved_whole = e.whole.iter().map(|(m, t)| (format!("{m}.weight"), t));
    let embeddings: std::collections::HashMap<String, &candle_core::Tensor> =
        saved_rows.chain(saved_whole).collect();
    for (name, var) in vars {
        if let Some(t) = embeddings.get(name) {
            set_saved(dir, name, var, t)?;
            continue;
        }
        if name.ends_with(TOKEN_ROWS_SUFFIX) || !name.contains(".lora_") {
            return Err(Error::bad_file(
                dir,
                format!("the adapter has no {name}; was it written by another run?"),
            ));
        }
        let (module, which) = name
            .rsplit_once(".lora_")
            .ok_or_else(|| Error::Msg(format!("unexpected adapter variable {name}")))?;
        let (a, b) = adapter.tensors.get(module).ok_or_else(|| {
            Error::bad_file(
                dir,
                format!("the adapter has no {module}; was it written by another run?"),
            )
        })?;
        let t = if which.starts_with('A') { a } else { b };
        set_saved(dir, name, var, t)?;
    }
    Ok(())
}

/// `var` (named `name`) set to `t` saved in checkpoint `dir`, of the same shape.
fn set_saved(
    dir: &Path,
    name: &str,
    var: &candle_core::Var,
    t: &candle_core::Tensor,
) -> Result<()> {
    if t.dims() != var.dims() {
        return Err(Error::bad_file(
            dir,
            format!("{name} has shape {:?}, expected {:?}", t.dims(), var.dims()),
        ));
    }
    var.set(&t.to_dtype(var.dtype())?)?;
    Ok(())
}

/// Load the optimizer's moments saved in checkpoint `dir` (by any world size) into
/// `opt`, with the step count of `state`.
pub(super) fn restore_optimizer(
    dir: &Path,
    state: &TrainingState,
    opt: &mut Optimizer,
    strategy: &Strategy,
) -> Result<()> {
    let moments = checkpoint::load_optimizer(dir, &strategy.device)?;
    opt.load_state(&moments, state.step as u64)
}
