//! Perplexity of a text under a model.
//!
//! The text is tokenized as the tokenizer does by itself; the loss is the mean
//! next-token cross-entropy over every token but the first. A text longer than the
//! context is scored in consecutive context-sized windows that overlap by one token,
//! so that every token after the first is predicted exactly once.
//!
//! Bits per byte, beside the loss, put models of different tokenizers on one scale:
//! the summed loss in nats over ln 2 over the UTF-8 bytes of the text scored, the
//! bytes of every predicted token ([`TokenBytes`]: all of the text but its first
//! token, or all of it after a BOS).

use candle_core::Tensor;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::engine;
use crate::model::{Gpt, check_ids};
use crate::tokenizer::{TokenBytes, bits_per_byte};

/// What `lit-claire perplexity` prints.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PerplexityReport {
    /// Mean next-token cross-entropy (nats).
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Tokens in the text.
    pub tokens: usize,
    /// UTF-8 bytes of the predicted tokens (None: not known).
    pub bytes: Option<u64>,
    /// Summed loss / ln 2 / `bytes` (None: no bytes known).
    pub bits_per_byte: Option<f64>,
}

/// Score `ids` with windows of at most `context` tokens, `batch` windows at a time.
pub fn perplexity(
    model: &Gpt,
    ids: &[u32],
    context: usize,
    batch: usize,
) -> Result<PerplexityReport> {
    perplexity_with_bytes(model, ids, context, batch, None)
}

/// [`perplexity`], with bits per byte when the bytes of each token are known.
pub fn perplexity_with_bytes(
    model: &Gpt,
    ids: &[u32],
    context: usize,
    batch: usize,
    token_bytes: Option<&TokenBytes>,
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
        let targets = rows
            .narrow(1, 1, len - 1)?
            .flatten_all()?
            .to_vec1::<u32>()?;
        let scores = engine::score(model, &inputs, None, &targets)?;
        total += scores.nll.iter().map(|&l| f64::from(l)).sum::<f64>();
        count += scores.nll.len() as f64;
        i = j;
    }
    let loss = total / count;
    if !loss.is_finite() {
        return Err(Error::Msg(format!(
            "the loss is {loss}: the model's weights hold NaN or infinite values, or overflow in this precision"
        )));
    }
    let bytes = token_bytes.map(|b| b.sum(ids[1..].iter().copied()));
    Ok(PerplexityReport {
        loss,
        perplexity: loss.exp(),
        tokens: ids.len(),
        bytes,
        bits_per_byte: bytes.and_then(|b| bits_per_byte(total, b)),
    })
}

/// One family of [`reference_check`].
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ReferenceLoss {
    pub family: String,
    /// PyTorch's loss on the fixture's `input_ids`.
    pub expected: f64,
    /// Ours, on the strategy's device and precision.
    pub loss: f64,
    pub abs_diff: f64,
}

/// The loss of every reference checkpoint under `fixtures` (folders holding
/// `expected.json` with `input_ids` and `loss`, as `tests/fixtures/reference/`) on the
/// strategy's device: the model's parity outside the test suite, e.g. on a GPU machine
/// without Rust. Fails, naming the families, when one is off by more than `tolerance`.
pub fn reference_check(
    fixtures: &std::path::Path,
    strategy: &crate::strategy::Strategy,
    tolerance: f64,
) -> Result<Vec<ReferenceLoss>> {
    let entries = std::fs::read_dir(fixtures).map_err(|e| Error::io(fixtures, e))?;
    let mut dirs: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("expected.json").is_file())
        .collect();
    dirs.sort();
    if dirs.is_empty() {
        return Err(Error::missing(
            fixtures.join("*/expected.json"),
            "--fixtures must be a folder like tests/fixtures/reference",
        ));
    }
    let mut rows = Vec::new();
    for dir in dirs {
        let path = dir.join("expected.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let exp: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::bad_file(&path, e))?;
        let ids: Option<Vec<u32>> = exp["input_ids"]
            .as_array()
            .and_then(|a| a.iter().map(|v| v.as_u64().map(|x| x as u32)).collect());
        let (Some(ids), Some(expected)) = (ids, exp["loss"].as_f64()) else {
            return Err(Error::bad_file(
                &path,
                "expected `input_ids` (integers) and `loss`",
            ));
        };
        let model = crate::hf::load_model(&dir, &strategy.build_options(false), None)?;
        let loss = perplexity(&model, &ids, ids.len(), 1)?.loss;
        let family = dir
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        rows.push(ReferenceLoss {
            family,
            expected,
            loss,
            abs_diff: (loss - expected).abs(),
        });
    }
    let off: Vec<String> = rows
        .iter()
        .filter(|r| r.abs_diff.is_nan() || r.abs_diff > tolerance)
        .map(|r| format!("{} {:.6} vs {:.6}", r.family, r.loss, r.expected))
        .collect();
    if !off.is_empty() {
        return Err(Error::Msg(format!(
            "losses differ from PyTorch's by more than {tolerance} on {}: {}",
            strategy.spec,
            off.join(", ")
        )));
    }
    Ok(rows)
}
