//! The forward pass without a backward: validation, perplexity, task scoring and
//! generation.
//!
//! ```text
//! ids ─ embed ─ block₀ ─ … ─ blockₗ₋₁ ─ final norm ─ head ─ logits        (logits)
//!               each block's kept state is           └ by chunks of rows ─ nll (score)
//!               dropped when the block is done
//! ```
//!
//! It is the training pass's own block forward ([`super::block_fwd`]), with the flash
//! kernel and the fused kernels where they serve, reading every parameter detached: no
//! autograd graph is recorded even when some weights are trained variables (LoRA
//! during a run), so a pass holds one block's activations at a time, not the model's.
//! [`score`] runs the head on chunks of rows and never holds the `(tokens × vocab)`
//! logits; [`logits`] returns them (generation asks for the last position only).
//! [`prefill`] and [`score_after`] split a pass in two: a shared prefix into a
//! [`KvCache`] (no head at all), then rows that continue it, scored (task scoring runs
//! a context once and its choices after it).

use std::sync::Arc;

use candle_core::{DType, Result, Tensor};

use super::cache::KvCache;
use super::head::{Scores, head_scores};
use super::layers::{self, Ctx};
use super::{BlockSource, Embedded, Grads, block_fwd, embed};
use crate::model::Gpt;

/// The final hidden states `(B, T, C)` (the final norm's input) of `ids: (B, T)`: at
/// positions `0..T`, or after what `cache` holds (which then takes this call's keys and
/// values), or packed rows' documents apart (`docs`, without a cache).
fn hidden(
    model: &Gpt,
    ids: &Tensor,
    docs: Option<&Arc<[u32]>>,
    cache: Option<&mut KvCache>,
) -> Result<Tensor> {
    let (_, t) = ids.dims2()?;
    let pos = cache.as_ref().map_or(0, |c| c.pos);
    if docs.is_some() && pos > 0 {
        candle_core::bail!("packed rows cannot follow a KV cache");
    }
    let Embedded { mut x, rope, .. } = embed(model, ids, pos, docs)?;
    let ctx = Ctx {
        pos,
        rope: rope.as_ref(),
        docs,
        dropout: None,
    };
    match cache {
        Some(c) => {
            if c.layers.len() != model.blocks.len() {
                candle_core::bail!(
                    "a KV cache of {} layers for a model of {}",
                    c.layers.len(),
                    model.blocks.len()
                );
            }
            for (blk, lc) in model.blocks.iter().zip(&mut c.layers) {
                x = block_fwd(blk, &x, &ctx, None, Some(lc))?.0;
            }
            c.pos += t;
        }
        None => {
            for blk in &model.blocks {
                x = block_fwd(blk, &x, &ctx, None, None)?.0;
            }
        }
    }
    Ok(x)
}

/// Logits `(B, T, V)` in f32 of `ids: (B, T)` at positions `0..T`, or, with a `cache`,
/// after the tokens it has seen (appending this call's keys and values). With
/// `last_only`, the last position's only: `(B, 1, V)`.
pub fn logits(
    model: &Gpt,
    ids: &Tensor,
    cache: Option<&mut KvCache>,
    last_only: bool,
) -> Result<Tensor> {
    let x = hidden(model, ids, None, cache)?;
    let (b, t, c) = x.dims3()?;
    let (x, t) = if last_only {
        (x.narrow(1, t - 1, 1)?, 1)
    } else {
        (x, t)
    };
    let xf = layers::norm_fwd(&model.ln_f, &x)?.reshape((b * t, c))?;
    let (y, _) = layers::linear_fwd(&model.lm_head, &xf, None)?;
    let v = y.dim(1)?;
    y.reshape((b, t, v))?.to_dtype(DType::F32)
}

/// The next-token loss of every token of `ids: (B, T)` against `targets` (`B·T` ids,
/// row-major) and whether each target is the model's first choice. Packed rows
/// (`docs`, see [`crate::model::Gpt`]'s document starts) are scored document by
/// document, positions restarting at each.
pub fn score(
    model: &Gpt,
    ids: &Tensor,
    docs: Option<&Arc<[u32]>>,
    targets: &[u32],
) -> Result<Scores> {
    let x = hidden(model, ids, docs, None)?;
    head_scores(model, &x, targets)
}

/// [`score`] with the blocks' parameters from `blocks` (the embeddings, final norm
/// and head from `model`): `--strategy fsdp`'s validation, which gathers one block at
/// a time. `grads` only takes the bindings of the blocks' trained tensors.
pub fn score_with(
    model: &Gpt,
    blocks: &mut dyn BlockSource,
    grads: &mut Grads,
    ids: &Tensor,
    docs: Option<&Arc<[u32]>>,
    targets: &[u32],
) -> Result<Scores> {
    let Embedded { mut x, rope, .. } = embed(model, ids, 0, docs)?;
    let ctx = Ctx {
        pos: 0,
        rope: rope.as_ref(),
        docs,
        dropout: None,
    };
    for i in 0..blocks.count() {
        let blk = blocks.fetch(i, grads)?;
        x = block_fwd(&blk, &x, &ctx, None, None)?.0;
    }
    head_scores(model, &x, targets)
}

/// Run `ids: (B, T)` into `cache` (after what it holds) without the head: the first
/// half of a pass whose second half is [`score_after`] or [`logits`] with that cache.
pub fn prefill(model: &Gpt, ids: &Tensor, cache: &mut KvCache) -> Result<()> {
    hidden(model, ids, None, Some(cache)).map(drop)
}

/// [`score`] of `ids: (B, T)` continuing what `cache` holds (its rows, one per row of
/// `ids`; see [`KvCache::select_rows`]), which takes this call's keys and values.
pub fn score_after(
    model: &Gpt,
    ids: &Tensor,
    cache: &mut KvCache,
    targets: &[u32],
) -> Result<Scores> {
    let x = hidden(model, ids, None, Some(cache))?;
    head_scores(model, &x, targets)
}
