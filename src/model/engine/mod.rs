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
//! What each block keeps ([`layers`]): its input, the norms' outputs, the rotated
//! q, k, v, the attention output and its row statistics (never the `(T, T)`
//! probabilities), the MLP's pre-activations and each LoRA's `x Aᵀ`. The head and the
//! cross-entropy run on chunks of [`head_chunk_rows`] rows, so the `(tokens × vocab)`
//! logits are never held at once. Gradients of trained parameters are added in place
//! into [`Grads`]; frozen weights get no gradient work, and a LoRA layer computes
//! only what `A` and `B` need.
//!
//! Evaluation and generation use [`crate::model::Gpt::forward`]; this pass gives the
//! same loss and the gradients autograd would give through it (tests/it against the
//! PyTorch references).

mod grads;
mod layers;
pub mod profile;

use std::sync::Arc;

use candle_core::{DType, Result, Tensor};

pub use grads::Grads;
use layers::{AttnKept, AttnSaved, Ctx, MlpSaved, Rotary};

use super::fused;
use super::rope::RopeTables;
use super::{Block, Dropout, Gpt};
use crate::config::{PositionKind, Residual};

/// Rows of logits computed at once by the head: the tokens in equal chunks of at most
/// `max(64, HEAD_CHUNK_LOGITS / V)` rows (2048 tokens over 49,152 ids: 4 chunks of 512
/// rather than 3 of 682 and one of 2).
///
/// The head's matmuls (`x Wᵀ`, `dlogits W`, and `dlogitsᵀ x` for a trained head) are
/// slow on thin chunks: at ~170 rows they ran at about half of the gemm's speed on
/// larger shapes, and a trained head's gradient reads and writes all of `dW` once per
/// chunk.
pub fn head_chunk_rows(vocab: usize, tokens: usize) -> usize {
    let max = (HEAD_CHUNK_LOGITS / vocab.max(1)).max(64);
    let tokens = tokens.max(1);
    tokens.div_ceil(tokens.div_ceil(max))
}

/// The most logits [`head_chunk_rows`] computes at once (but for 64 rows of a larger
/// vocabulary): 128 MiB in f32, which their gradient overwrites in place.
pub const HEAD_CHUNK_LOGITS: usize = 1 << 25;

/// One micro-batch for [`train_pass`].
pub struct PassInput<'a> {
    /// `(B, T)` u32 token ids.
    pub ids: &'a Tensor,
    /// `(B·T)` u32 next-token targets.
    pub targets: &'a Tensor,
    /// `(B·T)` 0/1: which targets count.
    pub mask: &'a Tensor,
    /// Document starts of packed rows ([`Gpt::forward_packed`]).
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

fn block_fwd(
    blk: &Block,
    x: &Tensor,
    ctx: &Ctx,
    kept: Option<AttnKept>,
) -> Result<(Tensor, BlockSaved)> {
    let n1 = layers::norm_fwd(&blk.norm1, x)?;
    let (a, attn) = layers::attn_fwd(&blk.attn, &n1, ctx, kept)?;
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

/// Per-token positions of packed rows, as [`Gpt::forward_packed`] computes them.
fn positions(inp: &PassInput) -> Result<Option<Vec<usize>>> {
    let (b, t) = inp.ids.dims2()?;
    inp.docs
        .map(|d| super::document_positions(d, b, t))
        .transpose()
}

/// Forward and backward of one micro-batch: returns `Σ nll` over the counted tokens
/// and adds `grad_scale · ∂(Σ nll)/∂p` into `grads` for every trained parameter `p`.
pub fn train_pass(model: &Gpt, inp: &PassInput, grads: &mut Grads) -> Result<f64> {
    let (b, t) = inp.ids.dims2()?;
    let c = model.cfg.hidden_size;
    let n = b * t;
    let dt = model.compute_dtype;
    let dev = inp.ids.device();
    let pos = positions(inp)?;

    // Embedding.
    let ids = inp.ids.flatten_all()?;
    let mut x = model
        .wte
        .detach()
        .index_select(&ids, 0)?
        .reshape((b, t, c))?
        .to_dtype(dt)?;
    let mut pos_ids = None;
    if let Some((_, wpe)) = &model.wpe {
        if t > wpe.dim(0)? {
            candle_core::bail!(
                "positions up to {t} exceed the {} learned positions of this model",
                wpe.dim(0)?
            );
        }
        let p: Vec<u32> = match &pos {
            Some(p) => p.iter().map(|&p| p as u32).collect(),
            None => (0..n).map(|i| (i % t) as u32).collect(),
        };
        let p = Tensor::from_vec(p, n, dev)?;
        let rows = wpe.detach().index_select(&p, 0)?.reshape((b, t, c))?;
        x = (x + rows.to_dtype(dt)?)?;
        pos_ids = Some(p);
    }
    let rope = match (&model.cfg.position, &pos) {
        (PositionKind::Rotary(r), None) => Some(Rotary::new(RopeTables::new(r, 0, t, dev)?)?),
        (PositionKind::Rotary(r), Some(p)) => {
            Some(Rotary::new(RopeTables::at_positions(r, p, b, t, dev)?)?)
        }
        (PositionKind::Learned, _) => None,
    };
    let ctx = Ctx {
        rope: rope.as_ref(),
        docs: inp.docs,
        dropout: inp.dropout,
    };

    // Blocks.
    let k = inp.checkpoint_every;
    let mut kept = Vec::with_capacity(model.blocks.len());
    for (i, blk) in model.blocks.iter().enumerate() {
        let (y, saved) = block_fwd(blk, &x, &ctx, None)?;
        if k > 0 && i % k == 0 {
            kept.push(Kept::Checkpoint(x, saved.attn.kept()));
        } else {
            kept.push(Kept::All(Box::new(saved)));
        }
        x = y;
    }

    // Final norm, head and cross-entropy, by chunks of rows.
    let (loss, dxf) = head_pass(model, &x, inp, grads)?;
    let mut dx = layers::norm_bwd(&model.ln_f, &x, &dxf, grads)?;
    drop(x);

    // Blocks, backwards.
    for (blk, kept) in model.blocks.iter().zip(kept).rev() {
        let saved = match kept {
            Kept::All(s) => *s,
            Kept::Checkpoint(x, attn) => block_fwd(blk, &x, &ctx, Some(attn))?.1,
        };
        dx = block_bwd(blk, &saved, &dx, &ctx, grads)?;
    }

    // Embeddings.
    let dx = dx.reshape((n, c))?;
    if grads.wants(&model.wte) {
        grads.add_rows(&model.wte, &ids, &dx)?;
    }
    if let (Some((_, wpe)), Some(p)) = (&model.wpe, &pos_ids)
        && grads.wants(wpe)
    {
        grads.add_rows(wpe, p, &dx)?;
    }
    Ok(loss)
}

/// The final norm, the head and the cross-entropy on chunks of rows: `Σ nll` and the
/// gradient of the final norm's output.
fn head_pass(model: &Gpt, x: &Tensor, inp: &PassInput, grads: &mut Grads) -> Result<(f64, Tensor)> {
    let (b, t, c) = x.dims3()?;
    let n = b * t;
    let dt = x.dtype();
    let xf = layers::norm_fwd(&model.ln_f, x)?.reshape((n, c))?;
    let head = &model.lm_head;
    let vocab = head.out_features();
    let targets = inp.targets.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    let mask = inp.mask.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    if targets.len() != n || mask.len() != n {
        candle_core::bail!(
            "{} targets and {} mask values for {n} tokens",
            targets.len(),
            mask.len()
        );
    }
    let weights: Vec<f32> = mask
        .iter()
        .map(|&m| (f64::from(m) * inp.grad_scale) as f32)
        .collect();
    // The LoRA input of the head, dropped out over all rows at once (the masks are
    // drawn per sample).
    let lora_in = match (&head.lora, inp.dropout) {
        (Some(l), Some(d)) if l.dropout > 0.0 => Some(d.apply(&xf, l.dropout, &head.name)?),
        _ => None,
    };
    let w = head.weight.detach().to_dtype(dt)?;
    let rows = head_chunk_rows(vocab, n);
    let mut loss = 0f64;
    // Each chunk's input gradient is added straight into its rows of one zeroed buffer
    // (the head's LoRA part too), instead of parts concatenated at the end. With LoRA
    // dropout the LoRA part is masked over all rows at once, so it collects in a
    // buffer of its own first.
    let mut dxf = Tensor::zeros((n, c), dt, x.device())?;
    let mut dxin = match &lora_in {
        Some(_) => Some(Tensor::zeros((n, c), dt, x.device())?),
        None => None,
    };
    let mut r0 = 0;
    while r0 < n {
        let len = rows.min(n - r0);
        let xc = xf.narrow(0, r0, len)?.contiguous()?;
        let xin = match &lora_in {
            Some(t) => Some(t.narrow(0, r0, len)?.contiguous()?),
            None => None,
        };
        // logits = x Wᵀ + b + s · (x_in Aᵀ) Bᵀ
        let mut logits = layers::mm_nt("matmul: head forward", &xc, &w)?;
        if let Some(bias) = &head.bias {
            logits = logits.broadcast_add(&bias.detach().to_dtype(dt)?)?;
        }
        let mut lora_u = None;
        if let Some(l) = &head.lora {
            let a = l.a.detach().to_dtype(dt)?;
            let u = layers::mm_nt(layers::MM_LORA, xin.as_ref().unwrap_or(&xc), &a)?;
            let beff = layers::lora_b(l, dt)?;
            let flops = 2.0 * (len * vocab * u.dim(1)?) as f64;
            let added = profile::timed(layers::MM_LORA, flops, || {
                super::fused::gemm_acc(&logits, &u, false, &beff, true, l.scale as f32)
            })?;
            if !added {
                logits = (logits + (layers::mm_nt(layers::MM_LORA, &u, &beff)? * l.scale)?)?;
            }
            lora_u = Some(u);
        }
        let logits = logits.to_dtype(DType::F32)?;
        let (tg, wt, mk) = (
            &targets[r0..r0 + len],
            &weights[r0..r0 + len],
            &mask[r0..r0 + len],
        );
        let (nll, dlogits) =
            profile::timed("cross-entropy", 0.0, || cross_entropy_chunk(logits, tg, wt))?;
        loss += nll
            .iter()
            .zip(mk)
            .map(|(&l, &m)| f64::from(l) * f64::from(m))
            .sum::<f64>();
        let dl = dlogits.to_dtype(dt)?;
        drop(dlogits);
        mm_into_rows("matmul: head input gradient", &mut dxf, r0, &dl, &w)?;
        if grads.wants(&head.weight) {
            grads.add_matmul(
                "matmul: head weight gradient",
                &head.weight,
                (&dl, true),
                (&xc, false),
                1.0,
            )?;
        }
        if let Some(bias) = &head.bias
            && grads.wants(bias)
        {
            grads.add(bias, &dl.sum(0)?)?;
        }
        if let (Some(l), Some(u)) = (&head.lora, &lora_u) {
            let beff = layers::lora_b(l, dt)?;
            if grads.wants(&l.b) {
                let db = (layers::mm(layers::MM_LORA, &dl.t()?, u)? * l.scale)?;
                let db = match &l.out_mask {
                    Some(m) => db.broadcast_mul(&m.to_dtype(dt)?)?,
                    None => db,
                };
                grads.add(&l.b, &db)?;
            }
            let du = (layers::mm(layers::MM_LORA, &dl, &beff)? * l.scale)?;
            if grads.wants(&l.a) {
                grads.add_matmul(
                    layers::MM_LORA,
                    &l.a,
                    (&du, true),
                    (xin.as_ref().unwrap_or(&xc), false),
                    1.0,
                )?;
            }
            let a = l.a.detach().to_dtype(dt)?;
            let dst = dxin.as_mut().unwrap_or(&mut dxf);
            mm_into_rows(layers::MM_LORA, dst, r0, &du, &a)?;
        }
        r0 += len;
    }
    if let (Some(l), Some(d), Some(dxin)) = (&head.lora, inp.dropout, dxin) {
        let dxin = d.apply(&dxin, l.dropout, &head.name)?;
        if !super::fused::add_assign(&dxf, &dxin)? {
            dxf = (dxf + dxin)?;
        }
    }
    Ok((loss, dxf.reshape((b, t, c))?))
}

/// Rows `r0..` of `dst: (N, n)` `+= a b` (`a: (m, k)`, `b: (k, n)`): in place on the
/// fused path (gemm straight into those rows), timed under `kind`.
fn mm_into_rows(
    kind: &'static str,
    dst: &mut Tensor,
    r0: usize,
    a: &Tensor,
    b: &Tensor,
) -> Result<()> {
    let (m, k) = a.dims2()?;
    let n = b.dim(1)?;
    let rows = dst.narrow(0, r0, m)?;
    let done = profile::timed(kind, 2.0 * (m * n * k) as f64, || {
        super::fused::gemm_acc(&rows, a, false, b, false, 1.0)
    })?;
    if !done {
        let sum = (rows + a.matmul(b)?)?;
        *dst = dst.slice_assign(&[r0..r0 + m, 0..n], &sum)?;
    }
    Ok(())
}

/// Per-row `nll` and the weighted gradient of `logits: (R, V)` (f32), which the fused
/// path writes over the logits.
fn cross_entropy_chunk(
    logits: Tensor,
    targets: &[u32],
    weights: &[f32],
) -> Result<(Vec<f32>, Tensor)> {
    if let Some(nll) = super::fused::cross_entropy_grad_in_place(&logits, targets, weights)? {
        return Ok((nll, logits));
    }
    let dev = logits.device();
    let tg = Tensor::new(targets, dev)?;
    let nll = super::fused::nll_plain(&logits.detach(), &tg)?;
    let w = Tensor::new(weights, dev)?;
    let g = layers::vjp(&[&logits], &w, |x| super::fused::nll_plain(&x[0], &tg))?;
    Ok((
        nll.to_vec1::<f32>()?,
        g.into_iter().next().expect("one input"),
    ))
}
