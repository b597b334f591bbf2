//! Forward and backward of each layer, explicit: a forward returns its output and
//! what its backward needs; a backward takes the output gradient, returns the input
//! gradient and adds the trained parameters' gradients into [`Grads`].
//!
//! Parameters are read detached (candle records no graph). The fused CPU f32 kernels
//! are the fast paths; elsewhere the same arithmetic in tensor ops, and for norms,
//! rotary and attention the plain twin differentiated on its own ([`vjp`]).

use std::sync::Arc;

use candle_core::{DType, Result, Tensor, Var};

use super::cache::LayerCache;
use super::grads::Grads;
use super::profile::timed;
use crate::config::{Activation, NormKind};
use crate::model::attention::{Attention, QkvProj};
use crate::model::fused::{self, FlashSaved, MaskSpec};
use crate::model::linear::{Dropout, Linear, LoraAdapter};
use crate::model::mlp::{Mlp, activate};
use crate::model::norm::Norm;
use crate::model::rope::RopeTables;

/// Gradients of `inputs` of `f` for the output gradient `dy`, from candle's autograd
/// on this one operation (the fallback off the fused paths).
pub(super) fn vjp(
    inputs: &[&Tensor],
    dy: &Tensor,
    f: impl FnOnce(&[Tensor]) -> Result<Tensor>,
) -> Result<Vec<Tensor>> {
    let vars = inputs
        .iter()
        .map(|t| Var::from_tensor(&t.detach()))
        .collect::<Result<Vec<_>>>()?;
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts)?;
    let g = (y * dy.to_dtype(ts[0].dtype())?.detach())?
        .sum_all()?
        .backward()?;
    vars.iter()
        .map(|v| match g.get(v.as_tensor()) {
            Some(g) => Ok(g.clone()),
            None => v.as_tensor().zeros_like(),
        })
        .collect()
}

// ------------------------------------------------------------------------- linear

/// `x wᵀ` for `x: (m, k)`, `w: (n, k)`, timed under `kind`.
pub(super) fn mm_nt(kind: &'static str, x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (m, k) = x.dims2()?;
    let n = w.dim(0)?;
    timed(kind, 2.0 * (m * n * k) as f64, || fused::matmul_nt(x, w))
}

/// `a b` for `a: (m, k)`, `b: (k, n)`, timed under `kind`.
pub(super) fn mm(kind: &'static str, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (m, k) = a.dims2()?;
    let n = b.dim(1)?;
    timed(kind, 2.0 * (m * n * k) as f64, || a.matmul(b))
}

pub(super) const MM_FWD: &str = "matmul: forward x·Wᵀ";
pub(super) const MM_DX: &str = "matmul: input gradient dy·W";
pub(super) const MM_DW: &str = "matmul: weight gradient dyᵀ·x";
pub(super) const MM_LORA: &str = "matmul: LoRA (rank r)";

/// What a linear layer's backward needs besides its input: the LoRA input after
/// dropout (when dropout applies) and `u = x_in Aᵀ`.
#[derive(Default)]
pub(super) struct LinearSaved {
    xin: Option<Tensor>,
    u: Option<Tensor>,
}

/// `B ⊙ m`, detached.
pub(super) fn lora_b(l: &LoraAdapter, dtype: DType) -> Result<Tensor> {
    let b = l.b.detach().to_dtype(dtype)?;
    match &l.out_mask {
        Some(m) => b.broadcast_mul(&m.to_dtype(dtype)?),
        None => Ok(b),
    }
}

/// `dst + alpha · op(a) · op(b)` (`op(a)` is `aᵀ` when `a_t`), timed under `kind`:
/// added into `dst` in place on the fused path (None: no temporary, no extra pass),
/// else returned.
fn mm_acc(
    kind: &'static str,
    dst: &Tensor,
    (a, a_t): (&Tensor, bool),
    (b, b_t): (&Tensor, bool),
    alpha: f64,
) -> Result<Option<Tensor>> {
    let (m, n) = dst.dims2()?;
    let k = a.dim(if a_t { 0 } else { 1 })?;
    timed(kind, 2.0 * (m * n * k) as f64, || {
        if fused::gemm_acc(dst, a, a_t, b, b_t, alpha as f32)? {
            return Ok(None);
        }
        let opa = if a_t { a.t()? } else { a.clone() };
        let opb = if b_t { b.t()? } else { b.clone() };
        Ok(Some((dst + (opa.matmul(&opb)? * alpha)?)?))
    })
}

/// `dst + g`, in place when the fused path applies.
fn add_into(dst: Tensor, g: &Tensor) -> Result<Tensor> {
    if fused::add_assign(&dst, g)? {
        Ok(dst)
    } else {
        dst + g
    }
}

/// `x: (N, in)` → `(N, out)`: `x Wᵀ + b`, plus the adapter (see [`Linear`]).
pub(super) fn linear_fwd(
    lin: &Linear,
    x: &Tensor,
    dropout: Option<&Dropout>,
) -> Result<(Tensor, LinearSaved)> {
    let dt = x.dtype();
    let w = lin.weight.detach().to_dtype(dt)?;
    let mut y = mm_nt(MM_FWD, x, &w)?;
    if let Some(b) = &lin.bias {
        y = y.broadcast_add(&b.detach().to_dtype(dt)?)?;
    }
    let (sum, saved) = lora_fwd(lin, x, &y, dropout)?;
    Ok((sum.unwrap_or(y), saved))
}

/// The adapter of `lin` (if any) added onto `y = x Wᵀ (+ b)`: `y += s · u (B ⊙ m)ᵀ` with
/// `u = x_in Aᵀ`, in place into `y` (None) or returned. `y` may be a block of columns
/// of a wider output (one projection's part of a fused q|k|v).
fn lora_fwd(
    lin: &Linear,
    x: &Tensor,
    y: &Tensor,
    dropout: Option<&Dropout>,
) -> Result<(Option<Tensor>, LinearSaved)> {
    let Some(l) = &lin.lora else {
        return Ok((None, LinearSaved::default()));
    };
    let dt = x.dtype();
    let xin = match dropout {
        Some(d) if l.dropout > 0.0 => {
            Some(timed("dropout", 0.0, || d.apply(x, l.dropout, &lin.name))?)
        }
        _ => None,
    };
    let a = l.a.detach().to_dtype(dt)?;
    let u = mm_nt(MM_LORA, xin.as_ref().unwrap_or(x), &a)?;
    let sum = mm_acc(MM_LORA, y, (&u, false), (&lora_b(l, dt)?, true), l.scale)?;
    Ok((sum, LinearSaved { xin, u: Some(u) }))
}

/// Whether the backward of `lin` reads its input (to form a weight's gradient).
pub(super) fn linear_needs_input(lin: &Linear, grads: &Grads) -> bool {
    grads.wants(&lin.weight) || lin.lora.is_some()
}

/// The input gradient of `lin` for `dy: (N, out)`, added onto `acc` (the input
/// gradient so far, in place when the fused path applies) when given; `x` is the
/// forward's input (None only when [`linear_needs_input`] is false).
pub(super) fn linear_bwd(
    lin: &Linear,
    x: Option<&Tensor>,
    saved: &LinearSaved,
    dy: &Tensor,
    acc: Option<Tensor>,
    grads: &mut Grads,
    dropout: Option<&Dropout>,
) -> Result<Tensor> {
    let dt = dy.dtype();
    let dy = dy.contiguous()?;
    let w = lin.weight.detach().to_dtype(dt)?;
    let dx = match acc {
        Some(acc) => mm_acc(MM_DX, &acc, (&dy, false), (&w, false), 1.0)?.unwrap_or(acc),
        None => mm(MM_DX, &dy, &w)?,
    };
    params_bwd(lin, x, &dy, grads)?;
    lora_bwd(lin, x, saved, &dy, dx, grads, dropout)
}

fn missing_input(lin: &Linear) -> candle_core::Error {
    candle_core::Error::Msg(format!("{}: backward without input", lin.name))
}

/// The gradients of the weight and bias of `lin` (where trained) for `dy`.
fn params_bwd(lin: &Linear, x: Option<&Tensor>, dy: &Tensor, grads: &mut Grads) -> Result<()> {
    if grads.wants(&lin.weight) {
        let x = x.ok_or_else(|| missing_input(lin))?;
        grads.add_matmul(MM_DW, &lin.weight, (dy, true), (x, false), 1.0)?;
    }
    if let Some(b) = &lin.bias
        && grads.wants(b)
    {
        grads.add(b, &dy.sum(0)?)?;
    }
    Ok(())
}

/// The adapter's part of the backward of `lin` (if it has one): its gradients into
/// `grads`, and its input gradient added onto `dx` (`dy W`), which is returned.
fn lora_bwd(
    lin: &Linear,
    x: Option<&Tensor>,
    saved: &LinearSaved,
    dy: &Tensor,
    dx: Tensor,
    grads: &mut Grads,
    dropout: Option<&Dropout>,
) -> Result<Tensor> {
    let Some(l) = &lin.lora else {
        return Ok(dx);
    };
    let dt = dy.dtype();
    let u = saved
        .u
        .as_ref()
        .ok_or_else(|| candle_core::Error::Msg(format!("{}: no saved LoRA state", lin.name)))?;
    let xin = match (&saved.xin, x) {
        (Some(t), _) | (None, Some(t)) => t,
        (None, None) => return Err(missing_input(lin)),
    };
    let beff = lora_b(l, dt)?;
    if grads.wants(&l.b) {
        match &l.out_mask {
            // dB = s · dyᵀ u, on the rows the adapter may change.
            None => grads.add_matmul(MM_LORA, &l.b, (dy, true), (u, false), l.scale)?,
            Some(m) => {
                let db = (mm(MM_LORA, &dy.t()?, u)? * l.scale)?.broadcast_mul(&m.to_dtype(dt)?)?;
                grads.add(&l.b, &db)?;
            }
        }
    }
    // du = s · dy (B ⊙ m), the scale applied by gemm.
    let du = Tensor::zeros((dy.dim(0)?, beff.dim(1)?), dt, dy.device())?;
    let du = mm_acc(MM_LORA, &du, (dy, false), (&beff, false), l.scale)?.unwrap_or(du);
    if grads.wants(&l.a) {
        grads.add_matmul(MM_LORA, &l.a, (&du, true), (xin, false), 1.0)?;
    }
    let a = l.a.detach().to_dtype(dt)?;
    if saved.xin.is_some()
        && let Some(d) = dropout
    {
        // The same mask (a pure function of the step, sample and layer).
        let dxin = mm(MM_LORA, &du, &a)?;
        let dxin = timed("dropout", 0.0, || d.apply(&dxin, l.dropout, &lin.name))?;
        return add_into(dx, &dxin);
    }
    Ok(mm_acc(MM_LORA, &dx, (&du, false), (&a, false), 1.0)?.unwrap_or(dx))
}

/// `[W_q; W_k; W_v]` (and their biases, zeros where a layer has none) in `dt`: a copy
/// of the weights per pass, a few MB, against a gemm of `N` times that many FLOPs.
fn qkv_params(lins: &[&Linear; 3], dt: DType) -> Result<(Tensor, Option<Tensor>)> {
    timed("layout", 0.0, || {
        let ws = lins
            .iter()
            .map(|l| l.weight.detach().to_dtype(dt))
            .collect::<Result<Vec<_>>>()?;
        let w = Tensor::cat(&ws, 0)?;
        if lins.iter().all(|l| l.bias.is_none()) {
            return Ok((w, None));
        }
        let bs = lins
            .iter()
            .zip(&ws)
            .map(|(l, w)| match &l.bias {
                Some(b) => b.detach().to_dtype(dt),
                None => Tensor::zeros(w.dim(0)?, dt, w.device()),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((w, Some(Tensor::cat(&bs, 0)?)))
    })
}

/// Rows from which the forward stacks separate q, k, v weights into one gemm
/// ([`qkv_fwd`]). Stacking copies the three weights on every call: for a few rows
/// (generation feeds one token at a time) that copy costs more than the gemm it feeds,
/// so they go through three gemms instead (the same values).
const QKV_STACK_MIN_ROWS: usize = 64;

/// Separate q, k, v projections of `x: (N, C)` as one, `(N, (nh + 2·nkv)·hs)`: one gemm
/// by the stacked weights reads `x` once, and the narrow k and v parts (`nkv·hs`
/// columns) run at a wide gemm's speed. Each adapter is added onto its block of columns.
fn qkv_fwd(
    lins: [&Linear; 3],
    x: &Tensor,
    dropout: Option<&Dropout>,
) -> Result<(Tensor, Vec<LinearSaved>)> {
    let (w, bias) = qkv_params(&lins, x.dtype())?;
    let mut y = mm_nt(MM_FWD, x, &w)?;
    if let Some(b) = bias {
        y = y.broadcast_add(&b)?;
    }
    let mut saved = Vec::with_capacity(3);
    let mut col = 0;
    for l in lins {
        let out = l.weight.dim(0)?;
        let (sum, s) = lora_fwd(l, x, &y.narrow(1, col, out)?, dropout)?;
        if let Some(sum) = sum {
            y.slice_set(&sum.contiguous()?, 1, col)?;
        }
        saved.push(s);
        col += out;
    }
    Ok((y, saved))
}

/// The input gradient of [`qkv_fwd`] for the gradients `dys` of q, k and v, `(N, ·)`
/// each: one gemm of `[dq | dk | dv]` by the stacked weights.
fn qkv_bwd(
    lins: [&Linear; 3],
    x: Option<&Tensor>,
    saved: &[LinearSaved],
    dys: [Tensor; 3],
    grads: &mut Grads,
    dropout: Option<&Dropout>,
) -> Result<Tensor> {
    let (w, _) = qkv_params(&lins, dys[0].dtype())?;
    let dys = dys
        .iter()
        .map(Tensor::contiguous)
        .collect::<Result<Vec<_>>>()?;
    let dy = timed("layout", 0.0, || Tensor::cat(&dys, 1))?;
    let mut dx = mm(MM_DX, &dy, &w)?;
    for ((l, s), dy) in lins.into_iter().zip(saved).zip(&dys) {
        params_bwd(l, x, dy, grads)?;
        dx = lora_bwd(l, x, s, dy, dx, grads, dropout)?;
    }
    Ok(dx)
}

// --------------------------------------------------------------------------- norm

fn norm_params(n: &Norm) -> (Tensor, Option<Tensor>) {
    (n.weight.detach(), n.bias.as_ref().map(Tensor::detach))
}

fn plain_norm(n: &Norm, w: Tensor, b: Option<Tensor>) -> Norm {
    Norm::new(n.name.clone(), n.kind, w, b, n.eps)
}

pub(super) fn norm_fwd(n: &Norm, x: &Tensor) -> Result<Tensor> {
    timed("norm", 0.0, || norm_fwd_inner(n, x))
}

fn norm_fwd_inner(n: &Norm, x: &Tensor) -> Result<Tensor> {
    let (w, b) = norm_params(n);
    let fused = match (n.kind, &b) {
        (NormKind::RmsNorm, _) => fused::rms_norm(x, &w, n.eps)?,
        (NormKind::LayerNorm, Some(b)) => fused::layer_norm(x, &w, b, n.eps)?,
        (NormKind::LayerNorm, None) => None,
    };
    match fused {
        Some(y) => Ok(y),
        None => plain_norm(n, w, b).forward_plain(x),
    }
}

/// The input gradient of a norm at input `x` for `dy`.
pub(super) fn norm_bwd(n: &Norm, x: &Tensor, dy: &Tensor, grads: &mut Grads) -> Result<Tensor> {
    let (dx, dw, db) = timed("norm", 0.0, || norm_bwd_inner(n, x, dy))?;
    grads.add(&n.weight, &dw)?;
    if let (Some(bias), Some(db)) = (&n.bias, db) {
        grads.add(bias, &db)?;
    }
    Ok(dx)
}

type NormGrads = (Tensor, Tensor, Option<Tensor>);

fn norm_bwd_inner(n: &Norm, x: &Tensor, dy: &Tensor) -> Result<NormGrads> {
    let (w, b) = norm_params(n);
    let fused = match (n.kind, &b) {
        (NormKind::RmsNorm, _) => {
            fused::rms_norm_backward(x, &w, n.eps, dy)?.map(|(dx, dw)| (dx, dw, None))
        }
        (NormKind::LayerNorm, Some(b)) => {
            fused::layer_norm_backward(x, &w, b, n.eps, dy)?.map(|(dx, dw, db)| (dx, dw, Some(db)))
        }
        (NormKind::LayerNorm, None) => None,
    };
    let (dx, dw, db) = match fused {
        Some(r) => r,
        None => {
            let mut inputs = vec![x, &w];
            inputs.extend(b.as_ref());
            let g = vjp(&inputs, dy, |t| {
                plain_norm(n, t[1].clone(), t.get(2).cloned()).forward_plain(&t[0])
            })?;
            (g[0].clone(), g[1].clone(), g.get(2).cloned())
        }
    };
    Ok((dx, dw, db))
}

// ---------------------------------------------------------------------- attention

/// Rotary tables for the forward and their inverse rotation for the backward.
pub(super) struct Rotary {
    pub fwd: RopeTables,
    pub bwd: RopeTables,
}

impl Rotary {
    pub fn new(t: RopeTables) -> Result<Self> {
        let bwd = RopeTables {
            cos: t.cos.clone(),
            sin: t.sin.neg()?,
            rotary_dims: t.rotary_dims,
        };
        Ok(Rotary { fwd: t, bwd })
    }
}

pub(super) struct AttnSaved {
    qkv: Vec<LinearSaved>,
    /// `(B, heads, T, hs)`, after the rotation.
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// `(B, nh, T, hs)`.
    o: Tensor,
    flash: Option<FlashSaved>,
    proj: LinearSaved,
}

/// Per-layer inputs shared by the blocks of a pass.
pub(super) struct Ctx<'a> {
    /// Absolute position of the pass's first token (after what a KV cache holds; 0 in
    /// training).
    pub pos: usize,
    pub rope: Option<&'a Rotary>,
    pub docs: Option<&'a Arc<[u32]>>,
    pub dropout: Option<&'a Dropout>,
}

/// The mask of queries at `ctx.pos ..` over keys from absolute position `k_start`.
fn mask_of(at: &Attention, ctx: &Ctx, k_start: usize) -> MaskSpec {
    MaskSpec {
        q_start: ctx.pos,
        k_start,
        window: at.window,
        docs: ctx.docs.cloned(),
    }
}

/// The attention's own output and row statistics, kept by a checkpointed block so that
/// its recomputation skips the attention itself (the costliest part of a long-context
/// forward): `N · nh · hs` values and two floats per query row.
pub(super) struct AttnKept {
    o: Tensor,
    flash: Option<FlashSaved>,
}

impl AttnSaved {
    /// What a checkpointed block keeps of this (the rest is recomputed).
    pub fn kept(self) -> AttnKept {
        AttnKept {
            o: self.o,
            flash: self.flash,
        }
    }
}

/// `x: (B, T, C)` (the first norm's output) → `(B, T, C)`; with `kept`, the attention
/// output of an earlier identical forward is reused instead of recomputed. With a
/// `cache` (generation), the queries also attend to the keys and values of earlier
/// calls, and this call's are appended to it.
pub(super) fn attn_fwd(
    at: &Attention,
    x: &Tensor,
    ctx: &Ctx,
    kept: Option<AttnKept>,
    cache: Option<&mut LayerCache>,
) -> Result<(Tensor, AttnSaved)> {
    let (b, t, c) = x.dims3()?;
    let (nh, nkv, hs) = (at.n_head, at.n_kv_head, at.head_dim);
    let x2 = x.reshape((b * t, c))?;
    let mut saved_qkv = Vec::new();
    let (q, k, v) = match &at.qkv {
        QkvProj::Separate { q, k, v } if b * t >= QKV_STACK_MIN_ROWS => {
            let (y, s) = qkv_fwd([q, k, v], &x2, ctx.dropout)?;
            saved_qkv = s;
            // Views; the copy to the heads-first layout below is the only one.
            let y = y.reshape((b, t, nh + 2 * nkv, hs))?;
            (
                y.narrow(2, 0, nh)?,
                y.narrow(2, nh, nkv)?,
                y.narrow(2, nh + nkv, nkv)?,
            )
        }
        _ => at.split_qkv(b, t, |l| {
            let (y, s) = linear_fwd(l, &x2, ctx.dropout)?;
            saved_qkv.push(s);
            Ok(y)
        })?,
    };
    let (mut q, mut k, v) = timed("layout", 0.0, || -> Result<_> {
        Ok((
            q.transpose(1, 2)?.contiguous()?,
            k.transpose(1, 2)?.contiguous()?,
            v.transpose(1, 2)?.contiguous()?,
        ))
    })?;
    if let Some(r) = ctx.rope {
        (q, k) = timed("rotary", 0.0, || -> Result<_> {
            Ok((r.fwd.apply(&q)?, r.fwd.apply(&k)?))
        })?;
    }
    let (k, v, k_start) = match cache {
        Some(c) => c.extend(k, v, ctx.pos, at.window)?,
        None => (k, v, ctx.pos),
    };
    let mask = mask_of(at, ctx, k_start);
    let (o, flash) = match kept {
        Some(AttnKept { o, flash }) => (o, flash),
        None => timed("attention forward", 0.0, || -> Result<_> {
            Ok(match fused::flash_forward(&q, &k, &v, at.scale, &mask)? {
                Some((o, s)) => (o, Some(s)),
                None => (fused::attention_plain(&q, &k, &v, at.scale, &mask)?, None),
            })
        })?,
    };
    let y = timed("layout", 0.0, || {
        o.transpose(1, 2)?.reshape((b * t, nh * hs))
    })?;
    let (out, proj) = linear_fwd(&at.proj, &y, ctx.dropout)?;
    let saved = AttnSaved {
        qkv: saved_qkv,
        q,
        k,
        v,
        o,
        flash,
        proj,
    };
    Ok((out.reshape((b, t, c))?, saved))
}

/// The gradient of the attention's input `x` (the first norm's output) for `dy`.
pub(super) fn attn_bwd(
    at: &Attention,
    x: &Tensor,
    s: &AttnSaved,
    dy: &Tensor,
    ctx: &Ctx,
    grads: &mut Grads,
) -> Result<Tensor> {
    let (b, t, c) = x.dims3()?;
    let (nh, nkv, hs) = (at.n_head, at.n_kv_head, at.head_dim);
    let n = b * t;
    let y = if linear_needs_input(&at.proj, grads) {
        Some(timed("layout", 0.0, || {
            s.o.transpose(1, 2)?.reshape((n, nh * hs))
        })?)
    } else {
        None
    };
    let dyo = linear_bwd(
        &at.proj,
        y.as_ref(),
        &s.proj,
        &dy.reshape((n, c))?,
        None,
        grads,
        ctx.dropout,
    )?;
    let dout = timed("layout", 0.0, || {
        dyo.reshape((b, t, nh, hs))?.transpose(1, 2)?.contiguous()
    })?;
    let (mut dq, mut dk, dv) = timed("attention backward", 0.0, || match &s.flash {
        Some(f) => f.backward(&s.q, &s.k, &s.v, &s.o, &dout),
        None => {
            let mask = mask_of(at, ctx, ctx.pos);
            let g = vjp(&[&s.q, &s.k, &s.v], &dout, |t| {
                fused::attention_plain(&t[0], &t[1], &t[2], at.scale, &mask)
            })?;
            Ok((g[0].clone(), g[1].clone(), g[2].clone()))
        }
    })?;
    if let Some(r) = ctx.rope {
        (dq, dk) = timed("rotary", 0.0, || -> Result<_> {
            Ok((
                r.bwd.apply(&dq.contiguous()?)?,
                r.bwd.apply(&dk.contiguous()?)?,
            ))
        })?;
    }
    // (B, heads, T, hs) → (B, T, heads, hs): the copies happen in the reshapes below.
    let dq = dq.transpose(1, 2)?;
    let dk = dk.transpose(1, 2)?;
    let dv = dv.transpose(1, 2)?;
    let x2 = x.reshape((n, c))?;
    let needs = at
        .qkv
        .linears()
        .iter()
        .any(|l| linear_needs_input(l, grads));
    let xin = needs.then_some(&x2);
    let dx = match &at.qkv {
        QkvProj::Separate { q, k, v } => {
            let dys = timed("layout", 0.0, || -> Result<_> {
                Ok([
                    dq.reshape((n, nh * hs))?,
                    dk.reshape((n, nkv * hs))?,
                    dv.reshape((n, nkv * hs))?,
                ])
            })?;
            qkv_bwd([q, k, v], xin, &s.qkv, dys, grads, ctx.dropout)?
        }
        QkvProj::Blocked(l) => {
            let d = Tensor::cat(
                &[
                    dq.reshape((n, nh * hs))?,
                    dk.reshape((n, nkv * hs))?,
                    dv.reshape((n, nkv * hs))?,
                ],
                1,
            )?;
            linear_bwd(l, xin, &s.qkv[0], &d, None, grads, ctx.dropout)?
        }
        QkvProj::Grouped(l) => {
            let g = nh / nkv;
            let d = Tensor::cat(
                &[
                    dq.reshape((b, t, nkv, g, hs))?,
                    dk.reshape((b, t, nkv, 1, hs))?,
                    dv.reshape((b, t, nkv, 1, hs))?,
                ],
                3,
            )?
            .reshape((n, (nh + 2 * nkv) * hs))?;
            linear_bwd(l, xin, &s.qkv[0], &d, None, grads, ctx.dropout)?
        }
    };
    dx.reshape((b, t, c))
}

// ---------------------------------------------------------------------------- mlp

pub(super) struct MlpSaved {
    /// Pre-activation (gate projection for gated MLPs).
    pre: Tensor,
    /// Up projection (gated only).
    up: Option<Tensor>,
    lin: Vec<LinearSaved>,
    down: LinearSaved,
}

fn act_fwd(x: &Tensor, a: Activation) -> Result<Tensor> {
    match fused::act_forward(x, a)? {
        Some(y) => Ok(y),
        None => activate(x, a),
    }
}

/// `x: (B, T, C)` → `(B, T, C)`.
pub(super) fn mlp_fwd(m: &Mlp, x: &Tensor, ctx: &Ctx) -> Result<(Tensor, MlpSaved)> {
    let (b, t, c) = x.dims3()?;
    let x2 = x.reshape((b * t, c))?;
    let (saved, h) = match &m.gate {
        Some(gate) => {
            let (g, sg) = linear_fwd(gate, &x2, ctx.dropout)?;
            let (u, su) = linear_fwd(&m.up, &x2, ctx.dropout)?;
            let h = timed("activation", 0.0, || -> Result<_> {
                Ok(match fused::gated_forward(&g, &u, m.activation)? {
                    Some(h) => h,
                    None => (activate(&g, m.activation)? * &u)?,
                })
            })?;
            let saved = MlpSaved {
                pre: g,
                up: Some(u),
                lin: vec![sg, su],
                down: LinearSaved::default(),
            };
            (saved, h)
        }
        None => {
            let (p, sp) = linear_fwd(&m.up, &x2, ctx.dropout)?;
            let h = timed("activation", 0.0, || act_fwd(&p, m.activation))?;
            let saved = MlpSaved {
                pre: p,
                up: None,
                lin: vec![sp],
                down: LinearSaved::default(),
            };
            (saved, h)
        }
    };
    let (y, down) = linear_fwd(&m.down, &h, ctx.dropout)?;
    Ok((y.reshape((b, t, c))?, MlpSaved { down, ..saved }))
}

/// The gradient of the MLP's input `x` for `dy`.
pub(super) fn mlp_bwd(
    m: &Mlp,
    x: &Tensor,
    s: &MlpSaved,
    dy: &Tensor,
    ctx: &Ctx,
    grads: &mut Grads,
) -> Result<Tensor> {
    let (b, t, c) = x.dims3()?;
    let x2 = x.reshape((b * t, c))?;
    let a = m.activation;
    // The down projection's input, recomputed when its backward reads it.
    let h = if linear_needs_input(&m.down, grads) {
        Some(timed("activation", 0.0, || -> Result<_> {
            Ok(match &s.up {
                Some(u) => match fused::gated_forward(&s.pre, u, a)? {
                    Some(h) => h,
                    None => (activate(&s.pre, a)? * u)?,
                },
                None => act_fwd(&s.pre, a)?,
            })
        })?)
    } else {
        None
    };
    let dh = linear_bwd(
        &m.down,
        h.as_ref(),
        &s.down,
        &dy.reshape((b * t, c))?,
        None,
        grads,
        ctx.dropout,
    )?;
    let dx = match (&m.gate, &s.up) {
        (Some(gate), Some(u)) => {
            let (dg, du) = timed("activation", 0.0, || -> Result<_> {
                Ok(match fused::gated_backward(&s.pre, u, &dh, a)? {
                    Some(r) => r,
                    None => {
                        let g = vjp(&[&s.pre, u], &dh, |t| activate(&t[0], a)? * &t[1])?;
                        (g[0].clone(), g[1].clone())
                    }
                })
            })?;
            let needs = linear_needs_input(gate, grads) || linear_needs_input(&m.up, grads);
            let xin = needs.then_some(&x2);
            let dx = linear_bwd(gate, xin, &s.lin[0], &dg, None, grads, ctx.dropout)?;
            linear_bwd(&m.up, xin, &s.lin[1], &du, Some(dx), grads, ctx.dropout)?
        }
        _ => {
            let dp = timed("activation", 0.0, || -> Result<_> {
                Ok(match fused::act_backward(&s.pre, &dh, a)? {
                    Some(d) => d,
                    None => vjp(&[&s.pre], &dh, |t| activate(&t[0], a))?.remove(0),
                })
            })?;
            let xin = linear_needs_input(&m.up, grads).then_some(&x2);
            linear_bwd(&m.up, xin, &s.lin[0], &dp, None, grads, ctx.dropout)?
        }
    };
    dx.reshape((b, t, c))
}
