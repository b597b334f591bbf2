//! Model folders on disk: reading Hugging Face checkpoints and PEFT adapters, and
//! writing them back.

pub mod card;
pub mod export;
pub mod gguf;
pub mod hf;
pub mod merge;
pub mod names;
pub mod peft;
pub mod shards;
pub mod weights;

use std::path::Path;

use crate::config::{Config, load_config};
use crate::error::{Error, Result};
use crate::model::{BuildOptions, Gpt, TrainableModel, build_model};
use weights::Weights;

/// Load the model of the Hugging Face folder `dir`, with the PEFT adapter in
/// `adapter` attached if given.
pub fn load_model(dir: &Path, opts: &BuildOptions, adapter: Option<&Path>) -> Result<Gpt> {
    let cfg = load_config(dir)?;
    let weights = Weights::open(dir)?;
    let TrainableModel { mut model, .. } = build_model(&cfg, &weights, opts)?;
    if let Some(a) = adapter {
        attach_adapter_dir(&mut model, a)?;
    }
    Ok(model)
}

/// Attach the PEFT adapter stored in `dir` (frozen).
pub fn attach_adapter_dir(model: &mut Gpt, dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        return Err(Error::missing(
            dir,
            "--adapter must be a folder with adapter_config.json",
        ));
    }
    let adapter = peft::load_adapter(dir, model.device())?;
    crate::lora::attach_tensors(model, &adapter.tensors, adapter.scale(), 0.0, false)?;
    Ok(())
}

/// Load config and weights of `dir` (for commands that build the model themselves).
pub fn open(dir: &Path) -> Result<(Config, Weights)> {
    if !dir.is_dir() {
        return Err(Error::missing(
            dir,
            "--checkpoint-dir must be a Hugging Face model folder; `lit-claire download --repo-id ORG/NAME` fetches one",
        ));
    }
    let cfg = load_config(dir)?;
    let weights = Weights::open(dir)?;
    Ok((cfg, weights))
}
