//! What a LoRA run trains of the embeddings and head (`--train-embeddings`), settled
//! before any weights load.
//!
//! A model folder made by `adapt-vocab` records which token ids are new in
//! `vocab_adaptation.json` ([`VocabRecord::new_token_ids`]). Their rows start as
//! initialised guesses, so a LoRA run on such a folder trains them by
//! default (`new`); on any other folder it trains neither matrix (`none`). Full
//! fine-tuning trains every row of both anyway.

use std::path::Path;

use super::config::TrainConfig;
use crate::error::{Error, Result};
use crate::lora::TrainEmbeddings;
use crate::vocab::{RECORD_FILE, VocabRecord};

/// The new token ids that `vocab_adaptation.json` in the model folder `dir` lists
/// (None: no record).
pub fn new_token_ids(dir: &Path) -> Result<Option<Vec<u32>>> {
    Ok(VocabRecord::read(dir)?.map(|r| r.new_token_ids))
}

/// What a LoRA run trains of its embeddings and head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddingPlan {
    pub mode: TrainEmbeddings,
    /// The token ids `new` trains (the record's; empty for the other modes).
    pub new_ids: Vec<u32>,
}

/// The embeddings plan of run `cfg`: `--train-embeddings` as given, else the mode the
/// resumed checkpoint trained with (`resumed`), else `new` on a folder with new tokens
/// and `none` otherwise. None without LoRA (full fine-tuning trains every row; only
/// `all` says so and is accepted). One-line errors for a mode that cannot be.
pub fn plan(cfg: &TrainConfig, resumed: Option<TrainEmbeddings>) -> Result<Option<EmbeddingPlan>> {
    let given = cfg.train_embeddings;
    if cfg.lora_r == 0 {
        return match given {
            None | Some(TrainEmbeddings::All) => Ok(None),
            Some(m) => Err(Error::Usage(format!(
                "--train-embeddings {m} is for LoRA runs (--lora-r > 0); full fine-tuning trains every row of the embeddings and head"
            ))),
        };
    }
    let ids = new_token_ids(&cfg.checkpoint_dir)?.unwrap_or_default();
    let mode = given.or(resumed).unwrap_or(if ids.is_empty() {
        TrainEmbeddings::None
    } else {
        TrainEmbeddings::New
    });
    if mode == TrainEmbeddings::New && ids.is_empty() {
        return Err(Error::Usage(format!(
            "--train-embeddings new: {} has no new tokens (no {RECORD_FILE} listing new_token_ids, as `lit-claire adapt-vocab` writes); use --train-embeddings all or none",
            cfg.checkpoint_dir.display()
        )));
    }
    if mode != TrainEmbeddings::None && cfg.lora_head {
        return Err(Error::Usage(format!(
            "--lora-head with --train-embeddings {mode}{}: the head would train twice; drop --lora-head (--lora-head false overrides a recipe) or use --train-embeddings none",
            if given.is_none() {
                " (the default on a folder adapt-vocab made)"
            } else {
                ""
            }
        )));
    }
    Ok(Some(EmbeddingPlan {
        new_ids: if mode == TrainEmbeddings::New {
            ids
        } else {
            Vec::new()
        },
        mode,
    }))
}

/// Parameters the plan of `cfg` trains in the embeddings and head of a model with
/// `vocab` rows of `hidden` numbers (`tied`: the head is the embeddings), for the
/// memory plan: the rows of the new tokens (held apart from the matrices, so they are
/// parameters of their own too: both numbers), or both matrices (the model's own:
/// the second number is 0). Zeros without LoRA (the base counts them) and when the
/// plan cannot be made (the run will say why).
pub fn trained_params(cfg: &TrainConfig, vocab: usize, hidden: usize, tied: bool) -> (u64, u64) {
    let matrices = if tied { 1 } else { 2 };
    match plan(cfg, None) {
        Ok(Some(p)) => match p.mode {
            TrainEmbeddings::New => {
                let n = (p.new_ids.len() * hidden * matrices) as u64;
                (n, n)
            }
            TrainEmbeddings::All => ((vocab * hidden * matrices) as u64, 0),
            TrainEmbeddings::None => (0, 0),
        },
        _ => (0, 0),
    }
}
