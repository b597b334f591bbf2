//! Perplexity of a text under a model.
//!
//! The text is tokenized as the tokenizer does by itself; the loss is the mean
//! next-token cross-entropy over every token but the first. A text longer than the
//! context is scored in consecutive context-sized windows that overlap by one token,
//! so that every token after the first is predicted exactly once.

use candle_core::Tensor;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::loss::cross_entropy_sum;
use crate::model::{Gpt, check_ids};

/// What `lit-claire perplexity` prints.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PerplexityReport {
    /// Mean next-token cross-entropy (nats).
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Tokens in the text.
    pub tokens: usize,
}

/// Score `ids` with windows of at most `context` tokens, `batch` windows at a time.
pub fn perplexity(
    model: &Gpt,
    ids: &[u32],
    context: usize,
    batch: usize,
) -> Result<PerplexityReport> {
    if ids.len() < 2 {
        return Err(Error::Usage(format!(
            "the text has {} token(s); perplexity needs at least 2",
            ids.len()
        )));
    }
    if batch == 0 {
        return Err(Error::Usage("--batch-size must be at least 1".into()));
    }
    let max = model.cfg.block_size;
    if context < 2 {
        return Err(Error::Usage(format!(
            "--context {context}: a window must hold at least 2 tokens (the default is the model's max_position_embeddings, {max})"
        )));
    }
    if context > max {
        return Err(Error::Usage(format!(
            "--context {context} is longer than the model's context (max_position_embeddings {max}); use --context {max} or less"
        )));
    }
    check_ids(&model.cfg, ids, "input")?;
    let stride = context - 1;
    let mut windows: Vec<&[u32]> = Vec::new();
    let mut start = 0;
    while start + 1 < ids.len() {
        let end = (start + context).min(ids.len());
        windows.push(&ids[start..end]);
        start += stride;
    }
    let dev = model.device().clone();
    let mut total = 0f64;
    let mut count = 0f64;
    // Windows of equal length go through together.
    let mut i = 0;
    while i < windows.len() {
        let len = windows[i].len();
        let mut j = i;
        while j < windows.len() && j - i < batch && windows[j].len() == len {
            j += 1;
        }
        let rows: Vec<u32> = windows[i..j]
            .iter()
            .flat_map(|w| w.iter().copied())
            .collect();
        let rows = Tensor::from_vec(rows, (j - i, len), &dev)?;
        let inputs = rows.narrow(1, 0, len - 1)?.contiguous()?;
        let targets = rows.narrow(1, 1, len - 1)?.flatten_all()?;
        let logits = model.forward(&inputs, None)?;
        let v = logits.dim(2)?;
        let (sum, n) =
            cross_entropy_sum(&logits.reshape(((j - i) * (len - 1), v))?, &targets, None)?;
        total += sum.to_scalar::<f32>()? as f64;
        count += n;
        i = j;
    }
    let loss = total / count;
    if !loss.is_finite() {
        return Err(Error::Msg(format!(
            "the loss is {loss}: the model's weights hold NaN or infinite values, or overflow in this precision"
        )));
    }
    Ok(PerplexityReport {
        loss,
        perplexity: loss.exp(),
        tokens: ids.len(),
    })
}
