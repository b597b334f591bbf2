//! Validation loss of a model on token samples.

use std::sync::Arc;

use candle_core::{Device, Tensor};

use super::batches::{Batch, SampleSet, sample_with_starts};
use crate::error::Result;
use crate::model::{Gpt, engine};

/// Loss over (part of) a split.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalResult {
    /// Mean next-token cross-entropy over the counted tokens.
    pub loss: f64,
    pub tokens: usize,
    /// Samples scored.
    pub samples: usize,
}

impl EvalResult {
    pub fn perplexity(&self) -> f64 {
        self.loss.exp()
    }
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
    let mut scorer = |b: &Batch| loss_sum(model, b);
    evaluate_with(
        &mut scorer,
        split,
        block_size,
        micro_batch_size,
        max_batches,
        cross_document,
        device,
    )
}

/// [`evaluate`] with each batch's `Σ nll` from `loss_sum` (`--strategy fsdp` scores
/// with its shards, see [`loss_sum_of`]).
pub fn evaluate_with(
    loss_sum: &mut dyn FnMut(&Batch) -> Result<f64>,
    split: &dyn SampleSet,
    block_size: usize,
    micro_batch_size: usize,
    max_batches: Option<usize>,
    cross_document: bool,
    device: &Device,
) -> Result<Option<EvalResult>> {
    let n = split.len();
    let limit = max_batches.map_or(n, |m| (m * micro_batch_size).min(n));
    if limit == 0 {
        return Ok(None);
    }
    let mut sum = 0f64;
    let mut tokens = 0usize;
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
        i = end;
    }
    Ok(Some(EvalResult {
        loss: sum / tokens.max(1) as f64,
        tokens,
        samples: limit,
    }))
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
