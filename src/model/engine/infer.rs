//! The forward pass without a backward: validation, perplexity, task scoring and
//! generation.
//!
//! ```text
//! ids ─ embed ─ block₀ ─ … ─ blockₗ₋₁ ─ final norm ─ head ─ logits        (logits)
//!               each block's kept state is           └ by chunks of rows ─ nll (score)
//!               dropped when the block is done
//! ```
//!
//! It is the training pass's own block forward (`block_fwd`), with the flash
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

/// A model for the passes without a backward: the model whole ([`Infer::whole`]), or
/// its embeddings, final norm and head with each block's parameters from a
/// [`BlockSource`] ([`Infer::with_blocks`]: `--strategy fsdp` gathers each block for
/// its forward only, and every rank must then make the same calls in the same order).
pub struct Infer<'a> {
    model: &'a Gpt,
    blocks: Option<(&'a mut dyn BlockSource, &'a mut Grads)>,
}

impl<'a> Infer<'a> {
    /// `model` with its own blocks.
    pub fn whole(model: &'a Gpt) -> Self {
        Infer {
            model,
            blocks: None,
        }
    }

    /// The embeddings, final norm and head of `outer` (whose own blocks are not read),
    /// the blocks from `blocks`; `grads` only takes the bindings of their trained
    /// tensors.
    pub fn with_blocks(
        outer: &'a Gpt,
        blocks: &'a mut dyn BlockSource,
        grads: &'a mut Grads,
    ) -> Self {
        Infer {
            model: outer,
            blocks: Some((blocks, grads)),
        }
    }

    /// The model's configuration, device and outer parameters (with [`Infer::with_blocks`],
    /// no blocks).
    pub fn model(&self) -> &'a Gpt {
        self.model
    }

    /// Number of blocks.
    pub fn n_layer(&self) -> usize {
        match &self.blocks {
            Some((b, _)) => b.count(),
            None => self.model.blocks.len(),
        }
    }

    /// Rank 0's `id` on every rank computing with the blocks' source (a choice made from
    /// what they computed, such as a generated token, so that they go on alike); `id`
    /// itself for a whole model.
    pub fn agree(&mut self, id: u32) -> Result<u32> {
        match &mut self.blocks {
            Some((b, _)) => Ok(b.agree(&[f64::from(id)])?[0] as u32),
            None => Ok(id),
        }
    }

    /// See [`logits`].
    pub fn logits(
        &mut self,
        ids: &Tensor,
        cache: Option<&mut KvCache>,
        last_only: bool,
    ) -> Result<Tensor> {
        let x = self.hidden(ids, None, cache)?;
        let model = self.model;
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

    /// See [`score`].
    pub fn score(
        &mut self,
        ids: &Tensor,
        docs: Option<&Arc<[u32]>>,
        targets: &[u32],
    ) -> Result<Scores> {
        let x = self.hidden(ids, docs, None)?;
        head_scores(self.model, &x, targets)
    }

    /// See [`prefill`].
    pub fn prefill(&mut self, ids: &Tensor, cache: &mut KvCache) -> Result<()> {
        self.hidden(ids, None, Some(cache)).map(drop)
    }

    /// See [`score_after`].
    pub fn score_after(
        &mut self,
        ids: &Tensor,
        cache: &mut KvCache,
        targets: &[u32],
    ) -> Result<Scores> {
        let x = self.hidden(ids, None, Some(cache))?;
        head_scores(self.model, &x, targets)
    }

    /// The final hidden states `(B, T, C)` (the final norm's input) of `ids: (B, T)`:
    /// at positions `0..T`, or after what `cache` holds (which then takes this call's
    /// keys and values), or packed rows' documents apart (`docs`, without a cache).
    /// Blocks from a source are fetched one at a time, each dropped after its forward.
    fn hidden(
        &mut self,
        ids: &Tensor,
        docs: Option<&Arc<[u32]>>,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let model = self.model;
        let (_, t) = ids.dims2()?;
        let pos = cache.as_ref().map_or(0, |c| c.pos);
        if docs.is_some() && pos > 0 {
            candle_core::bail!("packed rows cannot follow a KV cache");
        }
        let n = self.n_layer();
        if let Some(c) = &cache
            && c.layers.len() != n
        {
            candle_core::bail!("a KV cache of {} layers for a model of {n}", c.layers.len());
        }
        let Embedded { mut x, rope, .. } = embed(model, ids, pos, docs)?;
        let ctx = Ctx {
            pos,
            rope: rope.as_ref(),
            docs,
            dropout: None,
        };
        for i in 0..n {
            let lc = cache.as_mut().map(|c| &mut c.layers[i]);
            x = match &mut self.blocks {
                Some((src, grads)) => {
                    let blk = src.fetch(i, grads)?;
                    block_fwd(&blk, &x, &ctx, None, lc)?.0
                }
                None => block_fwd(&model.blocks[i], &x, &ctx, None, lc)?.0,
            };
        }
        if let Some(c) = cache {
            c.pos += t;
        }
        Ok(x)
    }
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
    Infer::whole(model).logits(ids, cache, last_only)
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
    Infer::whole(model).score(ids, docs, targets)
}

/// Run `ids: (B, T)` into `cache` (after what it holds) without the head: the first
/// half of a pass whose second half is [`score_after`] or [`logits`] with that cache.
pub fn prefill(model: &Gpt, ids: &Tensor, cache: &mut KvCache) -> Result<()> {
    Infer::whole(model).prefill(ids, cache)
}

/// [`score`] of `ids: (B, T)` continuing what `cache` holds (its rows, one per row of
/// `ids`; see [`KvCache::select_rows`]), which takes this call's keys and values.
pub fn score_after(
    model: &Gpt,
    ids: &Tensor,
    cache: &mut KvCache,
    targets: &[u32],
) -> Result<Scores> {
    Infer::whole(model).score_after(ids, cache, targets)
}
