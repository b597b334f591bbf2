//! Validation loss of a model on token samples.

use candle_core::Device;

use super::batches::{Batch, SampleSet, sample_with_starts};
use super::step::StepRunner;
use crate::error::Result;
use crate::model::Gpt;

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
        let (s, t) = StepRunner::eval_loss_sum(model, &batch)?;
        sum += s;
        tokens += t;
        i = end;
    }
    Ok(Some(EvalResult {
        loss: sum / tokens.max(1) as f64,
        tokens,
        samples: limit,
    }))
}
