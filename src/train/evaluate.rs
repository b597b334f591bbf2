//! Validation loss of a model on token samples, and its bits per byte.
//!
//! Prepared data holds token ids only, so the bytes of the text scored are those the
//! counted targets stand for, read from the tokenizer's vocabulary ([`TokenBytes`]):
//! nothing is stored at prepare time, and folders prepared before bits per byte
//! existed give it too.

use std::sync::Arc;

use candle_core::{Device, Tensor};

use super::batches::{Batch, SampleSet, sample_with_starts};
use crate::error::Result;
use crate::model::{Gpt, engine};
use crate::tokenizer::{TokenBytes, bits_per_byte};

/// Loss over (part of) a split.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalResult {
    /// Mean next-token cross-entropy over the counted tokens.
    pub loss: f64,
    pub tokens: usize,
    /// Samples scored.
    pub samples: usize,
    /// UTF-8 bytes of the counted targets (None: the tokenizer was not given).
    pub bytes: Option<u64>,
}

impl EvalResult {
    pub fn perplexity(&self) -> f64 {
        self.loss.exp()
    }

    /// Summed loss / ln 2 / bytes of the text scored (None: bytes not known or 0).
    pub fn bits_per_byte(&self) -> Option<f64> {
        bits_per_byte(self.loss * self.tokens as f64, self.bytes?)
    }
}

/// How a split is scored.
#[derive(Debug, Clone, Copy)]
pub struct Scoring<'a> {
    /// Tokens per sample.
    pub block_size: usize,
    pub micro_batch_size: usize,
    /// Micro-batches to score (None: all).
    pub max_batches: Option<usize>,
    /// Let packed documents attend to each other.
    pub cross_document: bool,
    /// The bytes of each token id, for bits per byte.
    pub token_bytes: Option<&'a TokenBytes>,
}

/// Score the first `max_batches` micro-batches (all if None) of `split`, in order.
/// Packed samples are scored document by document (block-diagonal attention,
/// positions restarting, see [`Batch::from_packed`]) unless `cross_document`.
/// Returns None for an empty split.
pub fn evaluate(
    model: &Gpt,
    split: &dyn SampleSet,
    block_size: usize,
    micro_batch_size: usize,
    max_batches: Option<usize>,
    cross_document: bool,
    device: &Device,
) -> Result<Option<EvalResult>> {
    let how = Scoring {
        block_size,
        micro_batch_size,
        max_batches,
        cross_document,
        token_bytes: None,
    };
    evaluate_split(model, split, &how, device)
}

/// [`evaluate`] as `how` says, with the bytes of the counted targets when
/// `how.token_bytes` is given.
pub fn evaluate_split(
    model: &Gpt,
    split: &dyn SampleSet,
    how: &Scoring,
    device: &Device,
) -> Result<Option<EvalResult>> {
    let mut scorer = |b: &Batch| loss_sum(model, b);
    evaluate_with(&mut scorer, split, how, device)
}

/// [`evaluate_split`] with each batch's `Σ nll` from `loss_sum` (`--strategy fsdp`
/// scores with its shards, see [`loss_sum_of`]).
pub fn evaluate_with(
    loss_sum: &mut dyn FnMut(&Batch) -> Result<f64>,
    split: &dyn SampleSet,
    how: &Scoring,
    device: &Device,
) -> Result<Option<EvalResult>> {
    let Scoring {
        block_size,
        micro_batch_size,
        max_batches,
        cross_document,
        token_bytes,
    } = *how;
    let n = split.len();
    let limit = max_batches.map_or(n, |m| (m * micro_batch_size).min(n));
    if limit == 0 {
        return Ok(None);
    }
    let mut sum = 0f64;
    let mut tokens = 0usize;
    let mut bytes = 0u64;
    let mut i = 0;
    while i < limit {
        let end = (i + micro_batch_size).min(limit);
        let (samples, starts): (Vec<_>, Vec<_>) = (i..end)
            .map(|j| sample_with_starts(split, j, cross_document))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .unzip();
        let batch = Batch::from_packed(&samples, &starts, block_size, device)?;
        sum += loss_sum(&batch)?;
        tokens += batch.tokens;
        if let Some(tb) = token_bytes {
            bytes += target_bytes(&batch, tb)?;
        }
        i = end;
    }
    Ok(Some(EvalResult {
        loss: sum / tokens.max(1) as f64,
        tokens,
        samples: limit,
        bytes: token_bytes.map(|_| bytes),
    }))
}

/// UTF-8 bytes of a batch's counted targets.
pub fn target_bytes(batch: &Batch, token_bytes: &TokenBytes) -> Result<u64> {
    let targets = batch.targets.to_vec1::<u32>()?;
    let mask = batch.mask.to_vec1::<f32>()?;
    Ok(token_bytes.sum(
        targets
            .iter()
            .zip(&mask)
            .filter(|(_, m)| **m > 0.0)
            .map(|(&t, _)| t),
    ))
}

/// `Σ nll` of a batch's counted tokens, scored by the engine's forward without a
/// backward (packed documents apart, as [`Batch::from_packed`] describes).
pub fn loss_sum(model: &Gpt, batch: &Batch) -> Result<f64> {
    loss_sum_of(batch, |ids, docs, targets| {
        Ok(engine::score(model, ids, docs, targets)?)
    })
}

/// `Σ nll` of a batch's counted tokens, scored by `score(ids, docs, targets)`.
pub fn loss_sum_of(
    batch: &Batch,
    score: impl FnOnce(&Tensor, Option<&Arc<[u32]>>, &[u32]) -> Result<engine::Scores>,
) -> Result<f64> {
    let targets = batch.targets.to_vec1::<u32>()?;
    let mask = batch.mask.to_vec1::<f32>()?;
    let scores = score(&batch.inputs, batch.docs.as_ref(), &targets)?;
    Ok(scores
        .nll
        .iter()
        .zip(&mask)
        .map(|(&l, &m)| f64::from(l) * f64::from(m))
        .sum())
}
