//! Complete Hugging Face folders from what training wrote: `merge-lora` and
//! `convert-to-hf`.
//!
//! A training run `RUN` holds checkpoint folders (`step-00000100/`, ..., `final/`).
//! A full fine-tuning checkpoint is already an HF folder (`model.safetensors`,
//! `config.json`, tokenizer files); a LoRA checkpoint holds a PEFT adapter. Both hold
//! `training_state.json` (`base_checkpoint_dir`, `step`, `tokens`, `train_loss`,
//! `val_loss`, `hyperparameters`) and `optimizer.safetensors`, which never leaves.
//!
//! The output folder holds exactly:
//!
//! ```text
//! OUT/config.json               the base's, with dtype (and an untied head) updated
//! OUT/model.safetensors         or model-0000k-of-0000n.safetensors + model.safetensors.index.json
//! OUT/generation_config.json    when the checkpoint or the base has one
//! OUT/tokenizer.json ...        the tokenizer files found
//! OUT/README.md                 model card (convert-to-hf only)
//! ```
//!
//! It is written into a temporary folder beside `OUT` and renamed at the end, so a
//! failure leaves no half-written `OUT`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde_json::Value;

use super::merge::{MergePlan, plan_merge};
use super::peft::{self, PeftAdapter};
use super::shards::{WrittenWeights, write_weights};
use crate::config::load_config;
use crate::error::{Error, IoContext, Result};
use crate::model::weights::{Weights, weight_files};

/// Tokenizer files transformers may need, copied when present.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
];
/// Written by the trainer into every checkpoint.
pub const TRAINING_STATE: &str = "training_state.json";
/// Transformers' default `max_shard_size`.
pub const DEFAULT_MAX_SHARD_SIZE: u64 = 5_000_000_000;

/// What a checkpoint folder holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointKind {
    /// Full weights (an HF folder).
    Full,
    /// A PEFT LoRA adapter, to be merged into its base.
    Lora,
}

/// A checkpoint located and classified.
#[derive(Debug, Clone)]
pub struct ResolvedCheckpoint {
    /// The folder holding the weights or the adapter.
    pub dir: PathBuf,
    pub kind: CheckpointKind,
    /// `training_state.json`, when the trainer wrote one.
    pub training_state: Option<Value>,
    /// The base model folder: given, or from `training_state.json` (may not exist
    /// for a full checkpoint, which does not need it).
    pub base: Option<PathBuf>,
    /// `base` comes from `training_state.json` (not given).
    pub base_from_state: bool,
}

/// Find the checkpoint at `input`: a checkpoint folder, a plain HF folder, a PEFT
/// adapter, or a run folder (its `final/` is taken). `base` overrides
/// `training_state.json`'s `base_checkpoint_dir`.
pub fn resolve_checkpoint(input: &Path, base: Option<&Path>) -> Result<ResolvedCheckpoint> {
    if !input.is_dir() {
        return Err(Error::missing(
            input,
            "give a checkpoint folder (RUN/final, RUN/step-00000100), a run folder or a PEFT adapter folder",
        ));
    }
    let kind = if peft::is_adapter_dir(input) {
        CheckpointKind::Lora
    } else if input.join(crate::model::weights::SINGLE_FILE).exists()
        || input.join(crate::model::weights::INDEX_FILE).exists()
    {
        weight_files(input)?;
        CheckpointKind::Full
    } else if input.join("final").is_dir() {
        eprintln!(
            "{} is a run folder: using its final/ checkpoint",
            input.display()
        );
        return resolve_checkpoint(&input.join("final"), base);
    } else {
        return Err(Error::missing(
            input.join(crate::model::weights::SINGLE_FILE),
            "the checkpoint folder holds no weights: expected model.safetensors (full fine-tuning), \
             adapter_config.json + adapter_model.safetensors (LoRA), or a run folder with final/",
        ));
    };
    let state_path = input.join(TRAINING_STATE);
    let training_state = if state_path.exists() {
        let text = std::fs::read_to_string(&state_path).at(&state_path)?;
        Some(
            serde_json::from_str::<Value>(&text)
                .map_err(|e| Error::bad_file(&state_path, format!("not JSON: {e}")))?,
        )
    } else {
        None
    };
    let base_from_state = base.is_none();
    let base = match base {
        Some(b) => Some(b.to_path_buf()),
        None => training_state
            .as_ref()
            .and_then(|s| s.get("base_checkpoint_dir"))
            .and_then(Value::as_str)
            .map(PathBuf::from),
    };
    Ok(ResolvedCheckpoint {
        dir: input.to_path_buf(),
        kind,
        training_state,
        base,
        base_from_state,
    })
}

/// A LoRA checkpoint's base folder, which must exist.
fn require_base(ck: &ResolvedCheckpoint) -> Result<PathBuf> {
    let base = ck.base.clone().ok_or_else(|| {
        Error::Usage(format!(
            "{} holds a LoRA adapter; pass its base model with --checkpoint-dir BASE \
             (no {TRAINING_STATE} with base_checkpoint_dir beside it)",
            ck.dir.display()
        ))
    })?;
    if !base.is_dir() {
        return Err(Error::missing(
            &base,
            "the adapter's base model folder; pass the right one with --checkpoint-dir",
        ));
    }
    check_base_weights(ck, &base)?;
    Ok(base)
}

/// The base weights an adapter is merged into must be those it was trained on: the
/// fingerprint in `training_state.json` (written since it records one) is checked.
/// A mismatch is refused when the base comes from the state, said when it was given
/// (a copy in another precision is the user's call). A relative base path (states of
/// older versions kept it as typed) is said, since it is read from the current folder.
fn check_base_weights(ck: &ResolvedCheckpoint, base: &Path) -> Result<()> {
    if ck.base_from_state && base.is_relative() {
        eprintln!(
            "warning: {}'s {TRAINING_STATE} names its base model relative to where training ran ({}); read from the current folder; pass --checkpoint-dir to be sure",
            ck.dir.display(),
            base.display()
        );
    }
    let expected = ck
        .training_state
        .as_ref()
        .and_then(|s| s.get("base_fingerprint"))
        .and_then(Value::as_str);
    let Some(expected) = expected else {
        return Ok(());
    };
    match super::merge::check_base_fingerprint(
        &ck.dir,
        base,
        expected,
        "pass the base model it was trained on with --checkpoint-dir",
    ) {
        Err(e) if !ck.base_from_state => {
            eprintln!("warning: {e}");
            Ok(())
        }
        other => other,
    }
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    pub out: PathBuf,
    pub weights: WrittenWeights,
    pub dtype: DType,
    /// Weights an adapter was merged into (0 for a full checkpoint).
    pub merged: usize,
    pub untied_head: bool,
}

/// Options of `convert-to-hf`.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    pub input: PathBuf,
    pub output_dir: PathBuf,
    /// Base model folder (default: `training_state.json`'s `base_checkpoint_dir`).
    pub base: Option<PathBuf>,
    /// Output dtype (default: the base's stored dtype, else the checkpoint's).
    pub dtype: Option<DType>,
    pub max_shard_size: u64,
    pub overwrite: bool,
    /// Licence for the model card (default: the base's README front matter).
    pub license: Option<String>,
    /// Repository the card's loading example names.
    pub repo_id: Option<String>,
}

/// `merge-lora`: merge the adapter at `lora` (an adapter folder, a LoRA checkpoint
/// or a run folder) into `base`; write a complete HF folder at `out` in the base's dtype.
pub fn merge_lora(base: &Path, lora: &Path, out: &Path, overwrite: bool) -> Result<ExportReport> {
    let ck = resolve_checkpoint(lora, Some(base))?;
    if ck.kind != CheckpointKind::Lora {
        return Err(Error::Usage(format!(
            "--lora-path {} holds full weights, not a LoRA adapter; use convert-to-hf for full checkpoints",
            ck.dir.display()
        )));
    }
    let base = require_base(&ck)?;
    let dtype = Weights::open(&base)?.stored_dtype();
    export(&Job {
        ck: &ck,
        weights_dir: &base,
        base: Some(&base),
        dtype,
        max_shard_size: DEFAULT_MAX_SHARD_SIZE,
        out,
        overwrite,
        card: None,
    })
}

/// `convert-to-hf`: a complete HF folder from a training checkpoint (LoRA merged).
pub fn convert_to_hf(opts: &ConvertOptions) -> Result<ExportReport> {
    let ck = resolve_checkpoint(&opts.input, opts.base.as_deref())?;
    let (weights_dir, base) = match ck.kind {
        CheckpointKind::Lora => {
            let b = require_base(&ck)?;
            (b.clone(), Some(b))
        }
        CheckpointKind::Full => (ck.dir.clone(), ck.base.clone().filter(|b| b.is_dir())),
    };
    let dtype = match opts.dtype {
        Some(d) => d,
        None => {
            let from_base = base.as_deref().and_then(|b| Weights::open(b).ok());
            match from_base {
                Some(w) => w.stored_dtype(),
                None => Weights::open(&weights_dir)?.stored_dtype(),
            }
        }
    };
    let license = match &opts.license {
        Some(l) => Some(l.clone()),
        None => base.as_deref().and_then(super::card::license_of),
    };
    export(&Job {
        ck: &ck,
        weights_dir: &weights_dir,
        base: base.as_deref(),
        dtype,
        max_shard_size: opts.max_shard_size,
        out: &opts.output_dir,
        overwrite: opts.overwrite,
        card: Some(CardOptions {
            license,
            repo_id: opts.repo_id.clone(),
            base_named: ck.base.clone(),
        }),
    })
}

struct CardOptions {
    license: Option<String>,
    repo_id: Option<String>,
    base_named: Option<PathBuf>,
}

struct Job<'a> {
    ck: &'a ResolvedCheckpoint,
    /// Folder whose weights are written (the base for LoRA).
    weights_dir: &'a Path,
    base: Option<&'a Path>,
    dtype: DType,
    max_shard_size: u64,
    out: &'a Path,
    overwrite: bool,
    card: Option<CardOptions>,
}

fn export(job: &Job) -> Result<ExportReport> {
    let out = job.out;
    check_out(out, job.overwrite, &[&job.ck.dir, job.weights_dir])?;
    // config.json: the checkpoint's own for full fine-tuning, else the base's.
    let config_dir = if job.ck.dir.join("config.json").exists() {
        job.ck.dir.as_path()
    } else {
        job.base.unwrap_or(job.weights_dir)
    };
    let cfg = load_config(config_dir)?;
    let adapter: Option<PeftAdapter> = match job.ck.kind {
        CheckpointKind::Lora => Some(peft::load_adapter(&job.ck.dir, &Device::Cpu)?),
        CheckpointKind::Full => None,
    };
    // Everything is checked before anything is written.
    let MergePlan {
        tensors,
        merged,
        untied_head,
    } = plan_merge(job.weights_dir, &cfg, adapter.as_ref(), job.dtype)?;

    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).at(&parent)?;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}.tmp-"))
        .tempdir_in(&parent)
        .at(&parent)?;
    let dir = tmp.path();

    let weights = write_weights(dir, tensors, job.max_shard_size)?;
    let config = updated_config(&config_dir.join("config.json"), job.dtype, untied_head)?;
    crate::io::write_json_atomic(&dir.join("config.json"), &config)?;
    let side_dirs: Vec<&Path> = [Some(job.ck.dir.as_path()), job.base]
        .into_iter()
        .flatten()
        .collect();
    copy_side_files(&side_dirs, dir)?;
    if let Some(card) = &job.card {
        let text = super::card::model_card(&super::card::CardInfo {
            family: cfg.family,
            base: card.base_named.as_deref().or(job.base),
            training_state: job.ck.training_state.as_ref(),
            adapter: adapter.as_ref(),
            license: card.license.as_deref(),
            repo_id: card.repo_id.as_deref(),
            dtype: job.dtype,
            out,
        });
        crate::io::write_atomic(&dir.join("README.md"), text.as_bytes())?;
    }
    let files = weights
        .files
        .iter()
        .map(|f| out.join(f.file_name().expect("files have names")))
        .collect();
    publish_dir(tmp, out)?;
    Ok(ExportReport {
        out: out.to_path_buf(),
        weights: WrittenWeights {
            files,
            total_size: weights.total_size,
        },
        dtype: job.dtype,
        merged,
        untied_head,
    })
}

/// Refuse an existing `out` unless `overwrite`, and never one that holds an input.
fn check_out(out: &Path, overwrite: bool, inputs: &[&Path]) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    if !overwrite {
        return Err(Error::Usage(format!(
            "{} already exists; choose another output folder or pass --overwrite to replace it",
            out.display()
        )));
    }
    let o = out.canonicalize().at(out)?;
    for i in inputs {
        let i = i.canonicalize().at(i)?;
        if i.starts_with(&o) {
            return Err(Error::Usage(format!(
                "the output {} holds the input {}; write to another folder",
                out.display(),
                i.display()
            )));
        }
    }
    Ok(())
}

/// Move the finished temporary folder onto `out` (replacing an old one).
pub(crate) fn publish_dir(tmp: tempfile::TempDir, out: &Path) -> Result<()> {
    make_shareable(tmp.path())?;
    if out.exists() {
        let parent = tmp.path().parent().unwrap_or(Path::new(".")).to_path_buf();
        let old = tempfile::Builder::new()
            .prefix(".old-")
            .tempdir_in(&parent)
            .at(&parent)?;
        let old_path = old.path().join("previous");
        std::fs::rename(out, &old_path).at(out)?;
        let tmp_path = tmp.keep();
        if let Err(e) = std::fs::rename(&tmp_path, out) {
            // Put the old folder back; the new one is lost with `tmp_path`.
            let _ = std::fs::rename(&old_path, out);
            let _ = std::fs::remove_dir_all(&tmp_path);
            return Err(Error::io(out, e));
        }
        drop(old);
    } else {
        let tmp_path = tmp.keep();
        if let Err(e) = std::fs::rename(&tmp_path, out) {
            let _ = std::fs::remove_dir_all(&tmp_path);
            return Err(Error::io(out, e));
        }
    }
    Ok(())
}

/// Temporary files and folders are private (0600/0700); a model folder is not.
pub(crate) fn make_shareable(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).at(path)?;
        let mode = if meta.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).at(path)?;
        if meta.is_dir() {
            for e in std::fs::read_dir(path).at(path)? {
                make_shareable(&e.at(path)?.path())?;
            }
        }
    }
    Ok(())
}

/// `config.json` with the output dtype and, if merging untied the head,
/// `tie_word_embeddings: false`.
fn updated_config(path: &Path, dtype: DType, untied_head: bool) -> Result<Value> {
    let text = std::fs::read_to_string(path).at(path)?;
    let mut v: Value =
        serde_json::from_str(&text).map_err(|e| Error::bad_file(path, format!("not JSON: {e}")))?;
    let obj = v
        .as_object_mut()
        .ok_or_else(|| Error::bad_file(path, "config.json is not an object"))?;
    let name = Value::from(crate::config::torch_dtype_name(dtype));
    let mut set = false;
    for key in ["dtype", "torch_dtype"] {
        if obj.contains_key(key) {
            obj.insert(key.into(), name.clone());
            set = true;
        }
    }
    if !set {
        obj.insert("torch_dtype".into(), name);
    }
    if untied_head {
        obj.insert("tie_word_embeddings".into(), Value::Bool(false));
    }
    Ok(v)
}

/// Copy the tokenizer files and `generation_config.json` from the first folder of
/// `dirs` that has them.
fn copy_side_files(dirs: &[&Path], to: &Path) -> Result<()> {
    let tok_dir = dirs.iter().find(|d| d.join("tokenizer.json").exists());
    match tok_dir {
        Some(d) => {
            for f in TOKENIZER_FILES {
                let src = d.join(f);
                if src.exists() {
                    std::fs::copy(&src, to.join(f)).at(&src)?;
                }
            }
        }
        None => eprintln!(
            "warning: no tokenizer.json in {}; the output has no tokenizer",
            dirs.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(" or ")
        ),
    }
    if let Some(d) = dirs
        .iter()
        .find(|d| d.join("generation_config.json").exists())
    {
        let src = d.join("generation_config.json");
        std::fs::copy(&src, to.join("generation_config.json")).at(&src)?;
    }
    Ok(())
}
