//! Training checkpoints: written atomically, rotated, found again on resume.
//!
//! `RUN/step-00000100/` (and `RUN/final/`) holds
//! - full fine-tuning: a complete Hugging Face folder (`model.safetensors`,
//!   `config.json`, tokenizer files), loadable by every command;
//! - LoRA: a PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`) and the
//!   tokenizer files; the base weights are never written;
//! - `optimizer.safetensors`: AdamW moments by variable name;
//! - `training_state.json`: step, data position, RNG, loss scale, losses, the base
//!   model's folder and the full hyper-parameters.
//!
//! A checkpoint is written into `RUN/.tmp-<name>/` and renamed into place, so a folder
//! named `step-*` is always complete.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::{Deserialize, Serialize};

use super::batches::DataPosition;
use super::config::TrainConfig;
use super::step::LossScaler;
use crate::error::{Error, IoContext, Result};
use crate::lora::LoraConfig;
use crate::model::Gpt;

/// Files copied from the base model folder into every checkpoint (with the tokenizer's,
/// [`TOKENIZER_FILES`](crate::hf::export::TOKENIZER_FILES)).
pub const SIDE_FILES: &[&str] = &["config.json", "generation_config.json"];

pub const STATE_FILE: &str = "training_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// Where a run stands; saved in `training_state.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainingState {
    /// Optimizer steps done.
    pub step: usize,
    pub position: DataPosition,
    /// Counted training tokens so far (all ranks).
    pub tokens: u64,
    /// Wall seconds of training so far (across resumes).
    pub elapsed_s: f64,
    /// Loss of the last step.
    pub train_loss: Option<f64>,
    /// Validation loss of the last evaluation.
    pub val_loss: Option<f64>,
    pub best_val_loss: Option<f64>,
    pub evals_without_improvement: usize,
    /// Rows written to `metrics.csv` up to this step (None in checkpoints of older
    /// versions): on resume, fewer rows in the file means some were lost.
    #[serde(default)]
    pub metrics_rows: Option<usize>,
    pub loss_scaler: Option<LossScaler>,
    /// Seed of the LoRA dropout masks (None without dropout): a mask is a function of
    /// it, the step and the sample (see [`crate::model::Dropout`]), so nothing else
    /// needs saving. Checkpoints of older versions held a generator's state instead.
    #[serde(default)]
    pub dropout_seed: Option<u64>,
    /// The base model's folder, absolute (checkpoints of older versions may hold it as
    /// typed, relative to where that run started).
    pub base_checkpoint_dir: PathBuf,
    /// [`base_fingerprint`](crate::hf::merge::base_fingerprint) of the base model's weights (None in checkpoints of older
    /// versions): merging an adapter into other weights found at that path is refused.
    #[serde(default)]
    pub base_fingerprint: Option<String>,
    /// Fingerprint of the prepared data the run trains on (None for data made in
    /// memory, and in checkpoints of older versions): a resume in the middle of an
    /// epoch on other data would go on in another order.
    #[serde(default)]
    pub data_fingerprint: Option<String>,
    pub hyperparameters: TrainConfig,
    pub lit_claire_version: String,
}

/// Name of the folder of step `step`.
pub fn step_dir_name(step: usize) -> String {
    format!("step-{step:08}")
}

/// Write a checkpoint of `model` (and optimizer state) as `run/name`, now.
pub fn save(
    run: &Path,
    name: &str,
    model: &Gpt,
    lora: Option<&LoraConfig>,
    optimizer: &[(String, candle_core::Tensor)],
    state: &TrainingState,
) -> Result<PathBuf> {
    Snapshot::take(model, lora, optimizer, state, false)?.write(run, name)
}

/// Everything a checkpoint holds, taken from the run at one step: the trained
/// tensors (the model in Hugging Face layout, or the adapter), the optimizer state
/// and the training state. Taken as copies in host memory ([`Snapshot::take`] with
/// `copy`), it no longer changes as training goes on, so a thread can write it
/// ([`super::saver`]).
pub struct Snapshot {
    weights: Vec<(String, candle_core::Tensor)>,
    optimizer: Vec<(String, candle_core::Tensor)>,
    state: TrainingState,
    /// The model's config, the adapter's and that of its trained embeddings, for a
    /// LoRA checkpoint.
    adapter: Option<(
        crate::config::Config,
        LoraConfig,
        crate::lora::EmbeddingsConfig,
    )>,
}

impl Snapshot {
    /// The checkpoint of `model` at `state`. With `copy`, every tensor is copied into
    /// fresh host memory (the optimizer updates weights and moments in place);
    /// without, the tensors are shared with the run, which must not step until
    /// [`Snapshot::write`] is done.
    pub fn take(
        model: &Gpt,
        lora: Option<&LoraConfig>,
        optimizer: &[(String, candle_core::Tensor)],
        state: &TrainingState,
        copy: bool,
    ) -> Result<Self> {
        let weights = match lora {
            Some(_) => crate::lora::adapter_tensors(model)?,
            None => crate::hf::state_dict::state_dict(model)?,
        };
        let own = |ts: Vec<(String, candle_core::Tensor)>| -> Result<Vec<_>> {
            if !copy {
                return Ok(ts);
            }
            ts.into_iter()
                .map(|(n, t)| Ok((n, host_copy(&t)?)))
                .collect()
        };
        Ok(Snapshot {
            weights: own(weights)?,
            optimizer: own(optimizer.to_vec())?,
            state: state.clone(),
            adapter: lora.map(|l| {
                (
                    model.cfg.clone(),
                    l.clone(),
                    crate::lora::embeddings_config(model),
                )
            }),
        })
    }

    /// Bytes of tensor data it holds.
    pub fn bytes(&self) -> usize {
        self.weights
            .iter()
            .chain(&self.optimizer)
            .map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    /// Write it as `run/name`: into `run/.tmp-name/`, renamed into place complete. On
    /// failure (a full disk, say) the temporary folder is removed and every existing
    /// checkpoint is left as it was.
    pub fn write(&self, run: &Path, name: &str) -> Result<PathBuf> {
        let tmp = run.join(format!(".tmp-{name}"));
        let r = self.write_in(run, name, &tmp);
        if r.is_err() && tmp.exists() {
            // Frees the space a full disk needs back; what is left is swept at the
            // next start anyway.
            let _ = std::fs::remove_dir_all(&tmp);
        }
        r
    }

    fn write_in(&self, run: &Path, name: &str, tmp: &Path) -> Result<PathBuf> {
        let final_dir = run.join(name);
        let state = &self.state;
        if tmp.exists() {
            std::fs::remove_dir_all(tmp).at(tmp)?;
        }
        std::fs::create_dir_all(tmp).at(tmp)?;
        for f in SIDE_FILES.iter().chain(crate::hf::export::TOKENIZER_FILES) {
            let src = state.base_checkpoint_dir.join(f);
            if src.exists() {
                std::fs::copy(&src, tmp.join(f)).at(tmp.join(f))?;
            }
        }
        match &self.adapter {
            Some((model_cfg, l, embeddings)) => {
                crate::hf::peft::save_adapter(
                    tmp,
                    model_cfg,
                    l,
                    &state.base_checkpoint_dir.display().to_string(),
                    &self.weights,
                    embeddings,
                )?;
            }
            None => {
                crate::io::save_safetensors_atomic(
                    &tmp.join("model.safetensors"),
                    &self.weights,
                    None,
                )?;
            }
        }
        crate::io::save_safetensors_atomic(&tmp.join(OPTIMIZER_FILE), &self.optimizer, None)?;
        let json = serde_json::to_value(state).expect("state serialises");
        crate::io::write_json_atomic(&tmp.join(STATE_FILE), &json)?;
        // A checkpoint being replaced (`final/` of a resumed run) goes aside first, so a
        // signal leaves either it or the new one in place, and at worst a trash folder
        // that the next start sweeps.
        let old = final_dir.exists().then(|| trash_name(run, name));
        if let Some(trash) = &old {
            move_to_trash(&final_dir, trash)?;
        }
        std::fs::rename(tmp, &final_dir).at(&final_dir)?;
        if let Some(trash) = old {
            std::fs::remove_dir_all(&trash).at(&trash)?;
        }
        Ok(final_dir)
    }
}

/// `t` in fresh, contiguous host memory, whatever its device and layout.
fn host_copy(t: &candle_core::Tensor) -> Result<candle_core::Tensor> {
    Ok(match t.device() {
        Device::Cpu => t.force_contiguous()?,
        _ => t.contiguous()?.to_device(&Device::Cpu)?,
    })
}

/// Read `training_state.json` of a checkpoint folder.
pub fn load_state(dir: &Path) -> Result<TrainingState> {
    let p = dir.join(STATE_FILE);
    if !p.exists() {
        return Err(Error::missing(
            &p,
            "not a lit-claire training checkpoint (no training_state.json)",
        ));
    }
    let text = std::fs::read_to_string(&p).at(&p)?;
    serde_json::from_str(&text)
        .map_err(|e| Error::bad_file(&p, format!("unreadable training state: {e}")))
}

/// Optimizer moments of a checkpoint folder.
pub fn load_optimizer(dir: &Path, device: &Device) -> Result<HashMap<String, candle_core::Tensor>> {
    let p = dir.join(OPTIMIZER_FILE);
    candle_core::safetensors::load(&p, device).map_err(|e| Error::bad_file(&p, e))
}

/// Read a checkpoint's state and check that its weight and optimizer files are whole
/// (safetensors headers that match the file sizes), without loading them.
pub fn check(dir: &Path) -> Result<TrainingState> {
    let state = load_state(dir)?;
    let mut files = vec![dir.join(OPTIMIZER_FILE)];
    if crate::hf::peft::is_adapter_dir(dir) {
        files.push(dir.join(crate::hf::peft::ADAPTER_WEIGHTS));
    } else {
        files.extend(crate::model::weights::weight_files(dir)?);
    }
    for f in files {
        if !f.exists() {
            return Err(Error::missing(&f, "the checkpoint is incomplete"));
        }
        // SAFETY: read-only mapping of a file no one writes (checkpoints are renamed
        // into place complete); only its header is parsed here.
        unsafe { candle_core::safetensors::MmapedSafetensors::new(&f) }
            .map_err(|e| Error::bad_file(&f, format!("damaged: {e}")))?;
    }
    Ok(state)
}

/// A checkpoint folder and its state.
pub type Found = (PathBuf, TrainingState);

/// The checkpoint `--resume auto` continues from: the newest of `run` that
/// [`check`] accepts. Damaged newer ones are moved aside to `.damaged-<name>` (kept,
/// but no longer listed); each gives a line saying so.
pub fn newest_complete(run: &Path) -> Result<(Option<Found>, Vec<String>)> {
    let mut candidates = Vec::new();
    if run.is_dir() {
        for entry in std::fs::read_dir(run).at(run)? {
            let path = entry.at(run)?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if (name.starts_with("step-") || name == "final") && path.join(STATE_FILE).exists() {
                candidates.push(path);
            }
        }
    }
    // step-00000100 < step-00000200 < final, as written.
    candidates.sort_by_key(|p| {
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
        (name.as_deref() == Some("final"), name)
    });
    let mut notes = Vec::new();
    while let Some(dir) = candidates.pop() {
        match check(&dir) {
            Ok(state) => return Ok((Some((dir, state)), notes)),
            Err(e) => {
                let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
                let aside = run.join(format!(".damaged-{}", name.unwrap_or_default()));
                if aside.exists() {
                    std::fs::remove_dir_all(&aside).at(&aside)?;
                }
                std::fs::rename(&dir, &aside).at(&dir)?;
                notes.push(format!(
                    "warning: {} is damaged ({e}); moved aside to {} and resuming from the previous complete checkpoint",
                    dir.display(),
                    aside.display()
                ));
            }
        }
    }
    Ok((None, notes))
}

/// The checkpoints of a run (complete ones only), oldest first, with their states.
pub fn list(run: &Path) -> Result<Vec<(PathBuf, TrainingState)>> {
    let mut out = Vec::new();
    if !run.is_dir() {
        return Ok(out);
    }
    for entry in std::fs::read_dir(run).at(run)? {
        let path = entry.at(run)?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !(name.starts_with("step-") || name == "final") || !path.join(STATE_FILE).exists() {
            continue;
        }
        out.push((path.clone(), load_state(&path)?));
    }
    out.sort_by(|a, b| {
        (a.1.step, a.0.file_name().map(|n| n == "final"))
            .cmp(&(b.1.step, b.0.file_name().map(|n| n == "final")))
    });
    Ok(out)
}

/// Delete step checkpoints beyond the newest `keep`, sparing the one with the best
/// validation loss.
pub fn rotate(run: &Path, keep: usize) -> Result<Vec<PathBuf>> {
    let steps: Vec<(PathBuf, TrainingState)> = list(run)?
        .into_iter()
        .filter(|(p, _)| p.file_name().is_some_and(|n| n != "final"))
        .collect();
    let best = steps
        .iter()
        .filter_map(|(p, s)| s.val_loss.map(|v| (p.clone(), v)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(p, _)| p);
    let mut removed = Vec::new();
    let n = steps.len();
    for (i, (p, _)) in steps.into_iter().enumerate() {
        if i + keep >= n || Some(&p) == best.as_ref() {
            continue;
        }
        // Renamed first, then deleted: an interrupted deletion leaves a `.trash-*`
        // folder, never a half-deleted `step-*` one; the next start sweeps it.
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
        let trash = trash_name(run, &name.unwrap_or_default());
        move_to_trash(&p, &trash)?;
        std::fs::remove_dir_all(&trash).at(&trash)?;
        removed.push(p);
    }
    Ok(removed)
}

/// Prefix of checkpoint folders on their way out.
const TRASH_PREFIX: &str = ".trash-";

fn trash_name(run: &Path, name: &str) -> PathBuf {
    run.join(format!("{TRASH_PREFIX}{name}"))
}

/// Rename `dir` to `trash` (removing an older trash of that name first).
fn move_to_trash(dir: &Path, trash: &Path) -> Result<()> {
    if trash.exists() {
        std::fs::remove_dir_all(trash).at(trash)?;
    }
    std::fs::rename(dir, trash).at(dir)
}

/// Remove leftovers of checkpoints whose writing or deletion was interrupted:
/// `.tmp-*` (being written), `.trash-*` (being deleted), and `step-*` folders without
/// `training_state.json` (half deleted by versions that deleted in place; a
/// checkpoint is renamed into place whole, so such a folder is never one being
/// written). Returns what was removed.
pub fn clean_partial(run: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    if !run.is_dir() {
        return Ok(removed);
    }
    for entry in std::fs::read_dir(run).at(run)? {
        let path = entry.at(run)?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let leftover = name.starts_with(".tmp-")
            || name.starts_with(TRASH_PREFIX)
            || (name.starts_with("step-") && path.is_dir() && !path.join(STATE_FILE).exists());
        if !leftover {
            continue;
        }
        if path.is_dir() {
            std::fs::remove_dir_all(&path).at(&path)?;
        } else {
            std::fs::remove_file(&path).at(&path)?;
        }
        removed.push(path);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use candle_core::{Tensor, Var};

    use super::*;

    /// What the background writer gets must not follow the optimizer's in-place
    /// updates (`Var::set`), whatever the layout of the tensor it was given.
    #[test]
    fn a_host_copy_does_not_change_when_the_variable_does() {
        let v = Var::from_tensor(
            &Tensor::arange(0f32, 6., &Device::Cpu)
                .unwrap()
                .reshape((2, 3))
                .unwrap(),
        )
        .unwrap();
        let plain = host_copy(v.as_tensor()).unwrap();
        let transposed = host_copy(&v.as_tensor().t().unwrap()).unwrap();
        let shared = v.as_tensor().clone();
        v.set(&Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        // A clone shares the storage: it sees the update (why copies are needed)...
        assert_eq!(shared.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        // ...the copies do not.
        assert_eq!(
            plain.to_vec2::<f32>().unwrap(),
            [[0., 1., 2.], [3., 4., 5.]]
        );
        assert!(transposed.is_contiguous());
        assert_eq!(
            transposed.to_vec2::<f32>().unwrap(),
            [[0., 3.], [1., 4.], [2., 5.]]
        );
    }
}
