//! The final norm, the output head and the next-token cross-entropy: the one place the
//! loss is computed, for training ([`head_pass`], with its gradient) and for scoring
//! ([`head_scores`], without).
//!
//! ```text
//! x (N, C) ─ final norm ─┬ rows 0..R   ─ logits (R, V) = x Wᵀ + b + s·(x Aᵀ)Bᵀ ─ nll, dlogits
//!                         ├ rows R..2R  ─ …
//!                         └ …
//! nllᵢ = log Σⱼ exp(logitsᵢⱼ) − logitsᵢ,tᵢ     (max-shifted, summed in f64)
//! ```
//!
//! Rows go through in chunks ([`head_chunk_rows`]), so the `(tokens × vocab)` logits are
//! never held at once.

use candle_core::{DType, Result, Tensor};

use super::grads::Grads;
use super::layers;
use super::profile;
use super::{Gpt, PassInput};
use crate::model::fused;
use crate::model::linear::Linear;

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

/// The final norm, the head and the cross-entropy on chunks of rows: `Σ nll` and the
/// gradient of the final norm's output.
pub(super) fn head_pass(
    model: &Gpt,
    x: &Tensor,
    inp: &PassInput,
    grads: &mut Grads,
) -> Result<(f64, Tensor)> {
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
    let trained_rows = trained_head_rows(model, grads, x.device())?;
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
        let (logits, lora_u) = chunk_logits(head, &w, &xc, xin.as_ref())?;
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
        if let Some((param, ids)) = &trained_rows {
            // The trained rows' columns of the logits' gradient: (rows, n)ᵀ x.
            let dl_rows = dl.index_select(ids, 1)?;
            grads.add_matmul(
                "matmul: head weight gradient",
                param,
                (&dl_rows, true),
                (&xc, false),
                1.0,
            )?;
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
        if !fused::add_assign(&dxf, &dxin)? {
            dxf = (dxf + dxin)?;
        }
    }
    Ok((loss, dxf.reshape((b, t, c))?))
}

/// The variable the head's trained rows go into (an untied head's rows, else the
/// embeddings' rows, which a tied head is) and their token ids, when some rows of
/// the head train.
fn trained_head_rows(
    model: &Gpt,
    grads: &Grads,
    dev: &candle_core::Device,
) -> Result<Option<(Tensor, Tensor)>> {
    let Some(tr) = model.token_rows() else {
        return Ok(None);
    };
    let param = match (&tr.head, model.cfg.tie_embeddings) {
        (Some(h), _) => h,
        (None, true) => &tr.embed,
        (None, false) => return Ok(None),
    };
    if !grads.wants(param) {
        return Ok(None);
    }
    let ids = Tensor::new(tr.ids(), dev)?;
    Ok(Some((param.clone(), ids)))
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
        fused::gemm_acc(&rows, a, false, b, false, 1.0)
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
    if let Some(nll) = fused::cross_entropy_grad_in_place(&logits, targets, weights)? {
        return Ok((nll, logits));
    }
    let dev = logits.device();
    let tg = Tensor::new(targets, dev)?;
    let nll = fused::nll_plain(&logits.detach(), &tg)?;
    let w = Tensor::new(weights, dev)?;
    let g = layers::vjp(&[&logits], &w, |x| fused::nll_plain(&x[0], &tg))?;
    Ok((
        nll.to_vec1::<f32>()?,
        g.into_iter().next().expect("one input"),
    ))
}

/// Logits `(R, V)` of one chunk of rows `xc: (R, C)` (in their dtype): `x Wᵀ + b`, plus
/// the adapter's `s · (x_in Aᵀ) (B ⊙ m)ᵀ` with `x_in` the dropped-out rows (`xin`) or
/// `xc`; also `u = x_in Aᵀ`, which the adapter's backward reads. `w` is the head's weight
/// in the rows' dtype.
fn chunk_logits(
    head: &Linear,
    w: &Tensor,
    xc: &Tensor,
    xin: Option<&Tensor>,
) -> Result<(Tensor, Option<Tensor>)> {
    let dt = xc.dtype();
    let mut logits = layers::mm_nt("matmul: head forward", xc, w)?;
    if let Some(bias) = &head.bias {
        logits = logits.broadcast_add(&bias.detach().to_dtype(dt)?)?;
    }
    let Some(l) = &head.lora else {
        return Ok((logits, None));
    };
    let a = l.a.detach().to_dtype(dt)?;
    let u = layers::mm_nt(layers::MM_LORA, xin.unwrap_or(xc), &a)?;
    let beff = layers::lora_b(l, dt)?;
    let flops = 2.0 * (xc.dim(0)? * w.dim(0)? * u.dim(1)?) as f64;
    let added = profile::timed(layers::MM_LORA, flops, || {
        fused::gemm_acc(&logits, &u, false, &beff, true, l.scale as f32)
    })?;
    if !added {
        logits = (logits + (layers::mm_nt(layers::MM_LORA, &u, &beff)? * l.scale)?)?;
    }
    Ok((logits, Some(u)))
}

/// What scoring gives for each token: its next-token loss and whether it is the
/// model's first choice.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scores {
    /// `−log p(targetᵢ | tokens ≤ i)`, nats, one per input token (row-major).
    pub nll: Vec<f32>,
    /// Whether `targetᵢ` has the largest logit (the first such id on ties).
    pub greedy: Vec<bool>,
}

/// Per-row `nll` of `logits: (R, V)` (f32) against `targets`.
fn row_nll(logits: &Tensor, targets: &[u32]) -> Result<Vec<f32>> {
    let tg = Tensor::new(targets, logits.device())?;
    let nll = match fused::cross_entropy_rows(logits, &tg)? {
        Some(nll) => nll,
        None => fused::nll_plain(logits, &tg)?,
    };
    nll.to_vec1::<f32>()
}

/// The final norm, the head and the loss of every row of `x: (B, T, C)` against
/// `targets` (`B·T` ids), on chunks of rows, without gradients.
pub(super) fn head_scores(model: &Gpt, x: &Tensor, targets: &[u32]) -> Result<Scores> {
    let (b, t, c) = x.dims3()?;
    let n = b * t;
    let head = &model.lm_head;
    let vocab = head.out_features();
    if targets.len() != n {
        candle_core::bail!("{} targets for {n} tokens", targets.len());
    }
    if let Some(bad) = targets.iter().find(|&&id| id as usize >= vocab) {
        candle_core::bail!("target id {bad} is outside the model's vocabulary of {vocab}");
    }
    let xf = layers::norm_fwd(&model.ln_f, x)?.reshape((n, c))?;
    let w = head.weight.detach().to_dtype(x.dtype())?;
    let rows = head_chunk_rows(vocab, n);
    let mut out = Scores {
        nll: Vec::with_capacity(n),
        greedy: Vec::with_capacity(n),
    };
    let mut r0 = 0;
    while r0 < n {
        let len = rows.min(n - r0);
        let xc = xf.narrow(0, r0, len)?.contiguous()?;
        let logits = chunk_logits(head, &w, &xc, None)?.0.to_dtype(DType::F32)?;
        let tg = &targets[r0..r0 + len];
        out.nll.extend(profile::timed("cross-entropy", 0.0, || {
            row_nll(&logits, tg)
        })?);
        let best = logits.argmax(1)?.to_vec1::<u32>()?;
        out.greedy.extend(best.iter().zip(tg).map(|(a, b)| a == b));
        r0 += len;
    }
    Ok(out)
}
