//! Hugging Face model folders on disk: loading a model (and a PEFT adapter) from one,
//! and writing them back (export, LoRA merge, shards, model card).
//!
//! How tensors are named and read lives with the model ([`crate::model::names`],
//! [`crate::model::weights`]); this module builds on it, never the other way round.

pub mod card;
pub mod export;
pub mod merge;
pub mod peft;
pub mod shards;
pub mod state_dict;

use std::path::Path;

use crate::config::{Config, load_config};
use crate::error::{Error, Result};
use crate::model::weights::Weights;
use crate::model::{BuildOptions, Gpt, TrainableModel, build_model};

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

/// Attach the PEFT adapter stored in `dir` (frozen), with the embeddings and head it
/// trained.
pub fn attach_adapter_dir(model: &mut Gpt, dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        return Err(Error::missing(
            dir,
            "--adapter must be a folder with adapter_config.json",
        ));
    }
    let adapter = peft::load_adapter(dir, model.device())?;
    crate::lora::attach_tensors(model, &adapter.tensors, adapter.scale(), 0.0, false)?;
    let e = &adapter.embeddings;
    crate::lora::apply_embeddings(model, &e.rows, &e.whole)
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
