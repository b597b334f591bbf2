//! The training pass: the decoder's forward and backward, written out layer by layer
//! instead of recorded by candle's autograd (in the manner of llm.c).
//!
//! ```text
//! forward   embed ─ block₀ … blockₗ₋₁ ─ final norm ─┬ head+CE over rows 0..R   ─┐
//!             each block keeps what its backward      ├ head+CE over rows R..2R  ─┤ loss
//!             reads (checkpointed: its input and      └ …                        ─┘
//!             its attention output only)
//! backward  the head's chunks give d(final norm) ─ blockₗ₋₁ … block₀ ─ embed
//!             a checkpointed block first recomputes its forward from its input,
//!             all but the attention itself (the costliest part at long contexts)
//! ```
//!
//! What each block keeps (`layers`): its input, the norms' outputs, the rotated
//! q, k, v, the attention output and its row statistics (never the `(T, T)`
//! probabilities), the MLP's pre-activations and each LoRA's `x Aᵀ`. The head and the
//! cross-entropy run on chunks of [`head_chunk_rows`] rows, so the `(tokens × vocab)`
//! logits are never held at once. Gradients of trained parameters are added in place
//! into [`Grads`]; frozen weights get no gradient work, and a LoRA layer computes
//! only what `A` and `B` need. Trained rows of the embeddings and head
//! ([`super::TokenRows`]) get only their rows' gradients.
//!
//! The same block forward serves every pass without a backward ([`infer`]:
//! validation, perplexity, task scoring, generation with a [`KvCache`]): there each
//! block's kept state is dropped as soon as the block is done. Losses and gradients
//! match the PyTorch references (tests/it).

mod cache;
mod grads;
mod head;
pub mod infer;
mod layers;
pub mod profile;

use std::sync::Arc;

use candle_core::{Result, Tensor};

pub use cache::{KvCache, LayerCache};
pub use grads::Grads;
pub use head::{HEAD_CHUNK_LOGITS, Scores, head_chunk_rows};
pub use infer::{Infer, logits, prefill, score, score_after};
use layers::{AttnKept, AttnSaved, Ctx, MlpSaved, Rotary};

use super::fused;
use super::rope::RopeTables;
use super::{Block, Dropout, Gpt};
use crate::config::{PositionKind, Residual};

/// One micro-batch for [`train_pass`].
pub struct PassInput<'a> {
    /// `(B, T)` u32 token ids.
    pub ids: &'a Tensor,
    /// `(B·T)` u32 next-token targets.
    pub targets: &'a Tensor,
    /// `(B·T)` 0/1: which targets count.
    pub mask: &'a Tensor,
    /// Document starts of packed rows: `docs[b·T + i]` is the index of the first token
    /// of the document token `i` of row `b` belongs to (see [`crate::model::fused::MaskSpec`]).
    pub docs: Option<&'a Arc<[u32]>>,
    pub dropout: Option<&'a Dropout>,
    /// The loss gradient of each counted token (the loss is `grad_scale · Σ nll`).
    pub grad_scale: f64,
    /// Checkpoint every k-th block (blocks `0, k, 2k, …`); 0: none.
    pub checkpoint_every: usize,
}

/// What the forward kept of a block.
enum Kept {
    /// Everything its backward reads.
    All(Box<BlockSaved>),
    /// Only its input and its attention output (activation checkpointing): the
    /// backward recomputes the rest.
    Checkpoint(Tensor, AttnKept),
}

struct BlockSaved {
    x: Tensor,
    n1: Tensor,
    attn: AttnSaved,
    /// `x + attention` (sequential blocks: the second norm's input).
    h: Option<Tensor>,
    /// The MLP's input when it is not `n1`.
    n2: Option<Tensor>,
    mlp: MlpSaved,
}

/// One block's forward ([`Residual`] shows the two layouts): its output and what its
/// backward reads. `kept`: the attention output of an earlier identical forward
/// (activation checkpointing); `cache`: the layer's keys and values of earlier calls
/// (generation).
fn block_fwd(
    blk: &Block,
    x: &Tensor,
    ctx: &Ctx,
    kept: Option<AttnKept>,
    cache: Option<&mut LayerCache>,
) -> Result<(Tensor, BlockSaved)> {
    let n1 = layers::norm_fwd(&blk.norm1, x)?;
    let (a, attn) = layers::attn_fwd(&blk.attn, &n1, ctx, kept, cache)?;
    let (out, h, n2, mlp) = match blk.residual {
        Residual::Sequential => {
            let h = profile::timed("residual", 0.0, || fused::add(x, &a))?;
            let norm2 = blk.norm2.as_ref().ok_or_else(|| {
                candle_core::Error::Msg("a sequential block without a second norm".into())
            })?;
            let n2 = layers::norm_fwd(norm2, &h)?;
            let (m, mlp) = layers::mlp_fwd(&blk.mlp, &n2, ctx)?;
            let out = profile::timed("residual", 0.0, || fused::add(&h, &m))?;
            (out, Some(h), Some(n2), mlp)
        }
        Residual::Parallel => {
            let n2 = match &blk.norm2 {
                Some(n) => Some(layers::norm_fwd(n, x)?),
                None => None,
            };
            let (m, mlp) = layers::mlp_fwd(&blk.mlp, n2.as_ref().unwrap_or(&n1), ctx)?;
            let out = profile::timed("residual", 0.0, || fused::add(&fused::add(x, &a)?, &m))?;
            (out, None, n2, mlp)
        }
    };
    let saved = BlockSaved {
        x: x.clone(),
        n1,
        attn,
        h,
        n2,
        mlp,
    };
    Ok((out, saved))
}

fn block_bwd(
    blk: &Block,
    s: &BlockSaved,
    dout: &Tensor,
    ctx: &Ctx,
    grads: &mut Grads,
) -> Result<Tensor> {
    match blk.residual {
        Residual::Sequential => {
            let (h, n2, norm2) = match (&s.h, &s.n2, &blk.norm2) {
                (Some(h), Some(n2), Some(norm2)) => (h, n2, norm2),
                _ => candle_core::bail!("a sequential block without its second norm's state"),
            };
            let dn2 = layers::mlp_bwd(&blk.mlp, n2, &s.mlp, dout, ctx, grads)?;
            let dn = layers::norm_bwd(norm2, h, &dn2, grads)?;
            let dh = profile::timed("residual", 0.0, || fused::add(dout, &dn))?;
            let dn1 = layers::attn_bwd(&blk.attn, &s.n1, &s.attn, &dh, ctx, grads)?;
            let dn = layers::norm_bwd(&blk.norm1, &s.x, &dn1, grads)?;
            profile::timed("residual", 0.0, || fused::add(&dh, &dn))
        }
        Residual::Parallel => {
            let dn1 = layers::attn_bwd(&blk.attn, &s.n1, &s.attn, dout, ctx, grads)?;
            let m_in = s.n2.as_ref().unwrap_or(&s.n1);
            let dm = layers::mlp_bwd(&blk.mlp, m_in, &s.mlp, dout, ctx, grads)?;
            match (&blk.norm2, &s.n2) {
                (Some(norm2), Some(_)) => {
                    let d1 = layers::norm_bwd(&blk.norm1, &s.x, &dn1, grads)?;
                    let d2 = layers::norm_bwd(norm2, &s.x, &dm, grads)?;
                    profile::timed("residual", 0.0, || fused::add(&fused::add(dout, &d1)?, &d2))
                }
                _ => {
                    let dn = profile::timed("residual", 0.0, || fused::add(&dn1, &dm))?;
                    let d = layers::norm_bwd(&blk.norm1, &s.x, &dn, grads)?;
                    profile::timed("residual", 0.0, || fused::add(dout, &d))
                }
            }
        }
    }
}

/// The input of the first block, and what the blocks and the embeddings' backward need.
struct Embedded {
    /// `(B, T, C)` in the compute dtype.
    x: Tensor,
    /// `(B·T)` u32 rows of the learned positions that were added (None: rotary).
    pos_ids: Option<Tensor>,
    rope: Option<Rotary>,
}

/// Token embeddings of `ids: (B, T)` plus the positions: `pos ..` for plain rows (`pos`
/// is what a KV cache already holds), or each token's position inside its document for
/// packed rows (`docs`, see [`super::document_positions`]).
fn embed(model: &Gpt, ids: &Tensor, pos: usize, docs: Option<&Arc<[u32]>>) -> Result<Embedded> {
    let (b, t) = ids.dims2()?;
    let (c, n) = (model.cfg.hidden_size, b * t);
    let dev = ids.device();
    let in_doc = docs
        .map(|d| super::document_positions(d, b, t))
        .transpose()?;
    let mut x = model
        .wte
        .detach()
        .index_select(&ids.flatten_all()?, 0)?
        .reshape((b, t, c))?
        .to_dtype(model.compute_dtype)?;
    let mut pos_ids = None;
    if let Some((_, wpe)) = &model.wpe {
        if pos + t > wpe.dim(0)? {
            candle_core::bail!(
                "positions up to {} exceed the {} learned positions of this model",
                pos + t,
                wpe.dim(0)?
            );
        }
        let p: Vec<u32> = match &in_doc {
            Some(p) => p.iter().map(|&p| p as u32).collect(),
            None => (0..n).map(|i| (pos + i % t) as u32).collect(),
        };
        let p = Tensor::from_vec(p, n, dev)?;
        let rows = wpe.detach().index_select(&p, 0)?.reshape((b, t, c))?;
        x = (x + rows.to_dtype(model.compute_dtype)?)?;
        pos_ids = Some(p);
    }
    let rope = match (&model.cfg.position, &in_doc) {
        (PositionKind::Rotary(r), None) => Some(Rotary::new(RopeTables::new(r, pos, t, dev)?)?),
        (PositionKind::Rotary(r), Some(p)) => {
            Some(Rotary::new(RopeTables::at_positions(r, p, b, t, dev)?)?)
        }
        (PositionKind::Learned, _) => None,
    };
    Ok(Embedded { x, pos_ids, rope })
}

/// Where a training pass gets each block's parameters, and whom it tells that a
/// block's gradients are complete.
///
/// ```text
/// forward   fetch(0) fwd ─ fetch(1) fwd ─ … ─ fetch(L−1) fwd          (each dropped after)
/// backward  fetch(L−1) bwd ─ fetch(L−2) done(L−1) bwd ─ … ─ fetch(0) done(1) bwd ─ done(0)
/// ```
///
/// In the backward, block `i − 1` is fetched after block `i`'s backward is queued and
/// before `done(i)`: at most two blocks are held at once there.
///
/// A model holding its blocks ([`Gpt`]) hands out its own and ignores `done`; `--strategy
/// fsdp` all-gathers a block's shards in `fetch` (binding its trained tensors into the
/// pass's [`Grads`]) and reduce-scatters its gradients in `done`.
pub trait BlockSource {
    /// Number of blocks.
    fn count(&self) -> usize;
    /// Block `i`'s parameters, just before its forward and again for its backward.
    fn fetch(&mut self, i: usize, grads: &mut Grads) -> Result<Block>;
    /// Block `i`'s backward has ended: its gradients in `grads` are complete for this
    /// pass.
    fn done(&mut self, _i: usize, _grads: &mut Grads) -> Result<()> {
        Ok(())
    }
    /// Rank 0's `xs` on every rank that fetches blocks alike (with `fsdp`, a broadcast;
    /// [`Infer::agree`]: a token generated from what they computed, so that every rank
    /// goes on with the same one). The identity by default.
    fn agree(&mut self, xs: &[f64]) -> Result<Vec<f64>> {
        Ok(xs.to_vec())
    }
}

impl BlockSource for &Gpt {
    fn count(&self) -> usize {
        self.blocks.len()
    }
    fn fetch(&mut self, i: usize, _grads: &mut Grads) -> Result<Block> {
        Ok(self.blocks[i].clone())
    }
}

/// Forward and backward of one micro-batch: returns `Σ nll` over the counted tokens
/// and adds `grad_scale · ∂(Σ nll)/∂p` into `grads` for every trained parameter `p`.
pub fn train_pass(model: &Gpt, inp: &PassInput, grads: &mut Grads) -> Result<f64> {
    train_pass_with(model, &mut { model }, inp, grads)
}

/// [`train_pass`] with the blocks' parameters from `blocks` (the embeddings, final norm
/// and head from `model`, whose own blocks are not read).
pub fn train_pass_with(
    model: &Gpt,
    blocks: &mut dyn BlockSource,
    inp: &PassInput,
    grads: &mut Grads,
) -> Result<f64> {
    let (b, t) = inp.ids.dims2()?;
    let c = model.cfg.hidden_size;
    let n = b * t;
    let Embedded {
        mut x,
        pos_ids,
        rope,
    } = embed(model, inp.ids, 0, inp.docs)?;
    let ids = inp.ids.flatten_all()?;
    let ctx = Ctx {
        pos: 0,
        rope: rope.as_ref(),
        docs: inp.docs,
        dropout: inp.dropout,
    };

    // Blocks.
    let k = inp.checkpoint_every;
    let n_blocks = blocks.count();
    let mut kept = Vec::with_capacity(n_blocks);
    for i in 0..n_blocks {
        let blk = blocks.fetch(i, grads)?;
        let (y, saved) = block_fwd(&blk, &x, &ctx, None, None)?;
        if k > 0 && i % k == 0 {
            kept.push(Kept::Checkpoint(x, saved.attn.kept()));
        } else {
            kept.push(Kept::All(Box::new(saved)));
        }
        x = y;
    }

    // Final norm, head and cross-entropy, by chunks of rows.
    let (loss, dxf) = head::head_pass(model, &x, inp, grads)?;
    let mut dx = layers::norm_bwd(&model.ln_f, &x, &dxf, grads)?;
    drop(x);

    // Blocks, backwards. The block before is fetched once this one's backward is
    // queued and before `done` reduces its gradients: on a device where `done` queues
    // the reduction beside the computation, the next backward then does not wait for
    // it (NCCL runs one communicator's operations in the order they are issued).
    let mut next = match n_blocks {
        0 => None,
        n => Some(blocks.fetch(n - 1, grads)?),
    };
    for (i, kept) in kept.into_iter().enumerate().rev() {
        let blk = next
            .take()
            .ok_or_else(|| candle_core::Error::Msg(format!("block {i} was not fetched (a bug)")))?;
        let saved = match kept {
            Kept::All(s) => *s,
            Kept::Checkpoint(x, attn) => block_fwd(&blk, &x, &ctx, Some(attn), None)?.1,
        };
        dx = block_bwd(&blk, &saved, &dx, &ctx, grads)?;
        drop((blk, saved));
        if i > 0 {
            next = Some(blocks.fetch(i - 1, grads)?);
        }
        blocks.done(i, grads)?;
    }

    // Embeddings.
    let dx = dx.reshape((n, c))?;
    if grads.wants(&model.wte) {
        grads.add_rows(&model.wte, &ids, &dx)?;
    }
    if let Some(tr) = model.token_rows()
        && grads.wants(&tr.embed)
    {
        // Only the positions holding a trained id reach the trained rows.
        let (pos, rows) = tr.select(&ids.to_vec1::<u32>()?);
        if !pos.is_empty() {
            let k = pos.len();
            let g = dx.index_select(&Tensor::from_vec(pos, k, dx.device())?, 0)?;
            grads.add_rows(&tr.embed, &Tensor::from_vec(rows, k, dx.device())?, &g)?;
        }
    }
    if let (Some((_, wpe)), Some(p)) = (&model.wpe, &pos_ids)
        && grads.wants(wpe)
    {
        grads.add_rows(wpe, p, &dx)?;
    }
    Ok(loss)
}
