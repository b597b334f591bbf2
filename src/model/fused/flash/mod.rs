//! Causal attention in O(T) memory: the flash-attention algorithm on the CPU.
//!
//! Shapes: `B` batch, `T` queries, `S` keys, `nh` query heads, `nkv` key/value heads,
//! query head `h` reading key/value head `h / (nh / nkv)` (never copied), `hs` head size.
//!
//! ```text
//! forward   per (b, h, block of BQ queries), over tiles of BK visible keys:
//!             s = scale · q kᵀ                      (BQ × BK, never (T, S))
//!             m' = max(m, max s)    l = l·e^(m−m') + Σ e^(s−m')     (l in f64)
//!             o = o·e^(m−m') + e^(s−m') v
//!           o /= l; keep m and 1/l per row (the log-sum-exp)
//! backward  D = rowsum(dO ⊙ O)
//!           per (b, h, part of the key blocks), per block of BKV keys, over the
//!             query blocks that see it: recompute p = e^(s−m)/l once,
//!             dv_h += pᵀ dO, dp = dO vᵀ, ds = p ⊙ (dp − D),
//!             dk_h += scale · dsᵀ q, dq_part += scale · ds k
//!           dq = Σ parts in order; dk, dv = Σ over the g query heads in order
//! ```
//!
//! Every output element is written by one task in a fixed order and the partial sums
//! are added in a fixed order, so results do not depend on the number of threads. The tile products go through the gemm crate;
//! the exponentials through a polynomial that vectorises ([`exp_shifted`]).
//! A query's visible keys form one interval (causal, window, document start), so masks
//! are intervals per row, not per element.

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(any(feature = "cuda", test))]
mod launch;

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::mask::MaskSpec;
use super::softmax::masked_softmax;
use super::{exp_approx, fusable, not_fused};
use crate::config::AttentionWindow;

/// Queries per tile, keys per tile of the forward, keys per block of the backward.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tiles {
    pub q: usize,
    pub k: usize,
    pub kv: usize,
}

/// 64 × 256 scores (64 KB) with their key and value tiles stay in a core's L2.
pub const TILES: Tiles = Tiles {
    q: 64,
    k: 256,
    kv: 64,
};

/// `softmax(scale · q kᵀ + mask) v` for `q: (B, nh, T, hs)`, `k, v: (B, nkv, S, hs)`
/// → `(B, nh, T, hs)`. Flash kernel on CPU f32; elsewhere [`attention_plain`].
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: &MaskSpec,
) -> Result<Tensor> {
    if flash_serves(q, k, v)? {
        flash_attention(q, k, v, scale, mask, TILES)
    } else {
        attention_plain(q, k, v, scale, mask)
    }
}

/// The kernel [`attention`] takes for these tensors: "flash (CPU)", "flash (CUDA)" or
/// "plain".
pub fn flash_kernel(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<&'static str> {
    Ok(match (flash_serves(q, k, v)?, q.device().is_cuda()) {
        (false, _) => "plain",
        (true, false) => "flash (CPU)",
        (true, true) => "flash (CUDA)",
    })
}

/// Whether a flash kernel takes this attention: the CPU kernel for f32 on the CPU, the
/// CUDA kernel (`cuda.rs`) where it serves; neither under
/// `LIT_CLAIRE_ATTENTION=plain`.
fn flash_serves(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<bool> {
    if super::plain_attention_requested() {
        return Ok(false);
    }
    if fusable(q) && fusable(k) && fusable(v) {
        return Ok(true);
    }
    #[cfg(feature = "cuda")]
    if super::kernels_on() && cuda::serves(q, k, v)? {
        return Ok(true);
    }
    Ok(false)
}

/// The kernel for these shapes, checked.
fn flash_op(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: &MaskSpec,
    tiles: Tiles,
) -> Result<Flash> {
    let (b, nh, t, hs) = q.dims4()?;
    let (bk, nkv, s, hsk) = k.dims4()?;
    if bk != b || hsk != hs || k.dims() != v.dims() || nkv == 0 || nh % nkv != 0 {
        candle_core::bail!(
            "flash attention: q {:?} does not fit k {:?} / v {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    let docs = mask.docs.as_ref().map_or(b * t, |d| d.len());
    if docs != b * t {
        candle_core::bail!("flash attention: {docs} document starts for {b} × {t} queries");
    }
    Ok(Flash {
        dims: Dims {
            b,
            nh,
            nkv,
            t,
            s,
            hs,
        },
        scale: scale as f32,
        mask: mask.clone(),
        tiles,
        stats: Mutex::new(None),
        #[cfg(feature = "cuda")]
        lse: Mutex::new(None),
    })
}

/// The flash kernel with the given tiles (CPU f32 only), differentiable through
/// candle's autograd.
pub fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: &MaskSpec,
    tiles: Tiles,
) -> Result<Tensor> {
    let op = flash_op(q, k, v, scale, mask, tiles)?;
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// What a flash forward keeps for its backward: the row statistics (max and
/// normaliser, two floats per query row), not the probabilities.
pub struct FlashSaved(Arc<Flash>);

/// Lets the training engine keep the kernel (and its statistics) after the forward.
struct SharedFlash(Arc<Flash>);

impl CustomOp3 for SharedFlash {
    fn name(&self) -> &'static str {
        "lc-flash-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.0.cpu_fwd(s1, l1, s2, l2, s3, l3)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.0.cuda_fwd(s1, l1, s2, l2, s3, l3)
    }
}

/// The flash forward for an explicit backward ([`FlashSaved::backward`]), no autograd:
/// f32 on the CPU, or where the CUDA kernel serves. None when no kernel applies.
pub fn flash_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: &MaskSpec,
) -> Result<Option<(Tensor, FlashSaved)>> {
    if !flash_serves(q, k, v)? {
        return Ok(None);
    }
    let op = Arc::new(flash_op(q, k, v, scale, mask, TILES)?);
    let o = q.contiguous()?.apply_op3_no_bwd(
        &k.contiguous()?,
        &v.contiguous()?,
        &SharedFlash(op.clone()),
    )?;
    Ok(Some((o, FlashSaved(op))))
}

impl FlashSaved {
    /// `(dq, dk, dv)` from the forward's inputs, its output `o` and `do`.
    pub fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        dout: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        match self.0.bwd(q, k, v, o, dout)? {
            (Some(dq), Some(dk), Some(dv)) => Ok((dq, dk, dv)),
            _ => candle_core::bail!("flash attention: backward gave no gradient"),
        }
    }
}

/// The composition of tensor ops the kernel replaces (any device and dtype): the `g`
/// query heads sharing a key/value head are stacked along the sequence, so one batched
/// matmul per key/value head does the work; scores and probabilities are `(B, nh, T, S)`.
pub fn attention_plain(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: &MaskSpec,
) -> Result<Tensor> {
    let (b, nh, t, hs) = q.dims4()?;
    let (_, nkv, s, _) = k.dims4()?;
    let g = nh / nkv;
    // (B, nh, T, hs) = (B, nkv, g, T, hs) → (B, nkv, g·T, hs)
    let q = q.contiguous()?.reshape((b, nkv, g * t, hs))?;
    let scores = q.matmul(&k.t()?)?; // (B, nkv, g·T, S)
    let scores = scores
        .to_dtype(candle_core::DType::F32)?
        .reshape((b, nh, t, s))?;
    let probs = masked_softmax(&scores, scale, Some(mask.clone()))?.to_dtype(v.dtype())?;
    let y = probs.reshape((b, nkv, g * t, s))?.matmul(v)?; // (B, nkv, g·T, hs)
    y.reshape((b, nh, t, hs))
}

#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    nh: usize,
    nkv: usize,
    t: usize,
    s: usize,
    hs: usize,
}

impl Dims {
    fn g(&self) -> usize {
        self.nh / self.nkv
    }
}

/// Per query row of the forward: the running max `m` it subtracted and `1 / l`.
struct Stats {
    m: Vec<f32>,
    inv_l: Vec<f32>,
}

struct Flash {
    dims: Dims,
    scale: f32,
    mask: MaskSpec,
    tiles: Tiles,
    /// Written by the forward, read by the backward.
    stats: Mutex<Option<Arc<Stats>>>,
    /// The CUDA forward's row log-sum-exps, `(B · nh · T)` f32, for its backward.
    #[cfg(feature = "cuda")]
    lse: Mutex<Option<Tensor>>,
}

/// For each batch row `b` and query `i`, the keys `lo..hi` it sees (`b · T + i`).
fn visible_ranges(d: &Dims, mask: &MaskSpec) -> Vec<(usize, usize)> {
    (0..d.b * d.t)
        .map(|bi| {
            let q = mask.q_start + bi % d.t;
            // keys k ≤ q: j < q + 1 − k_start
            let hi = (q + 1).saturating_sub(mask.k_start).min(d.s);
            let mut first = 0; // the first visible absolute key position
            if let AttentionWindow::Sliding(w) = mask.window {
                first = (q + 1).saturating_sub(w);
            }
            if let Some(docs) = &mask.docs {
                first = first.max(docs[bi] as usize);
            }
            let lo = first.saturating_sub(mask.k_start).min(hi);
            (lo, hi)
        })
        .collect()
}

/// The union of the ranges of `rows` (`(0, 0)` when all are empty).
fn span(rows: &[(usize, usize)]) -> (usize, usize) {
    let mut r = (usize::MAX, 0);
    for &(lo, hi) in rows.iter().filter(|(lo, hi)| lo < hi) {
        r = (r.0.min(lo), r.1.max(hi));
    }
    if r.0 >= r.1 { (0, 0) } else { r }
}

/// A matrix inside a slice: element `(r, c)` at `r · rs + c · cs`.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

impl<'a> View<'a> {
    /// `rows × cols` row-major at `data[off..]`.
    fn rows(data: &'a [f32], off: usize, cols: usize) -> Self {
        View {
            data: &data[off..],
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose of `rows × cols` row-major at `data[off..]`.
    fn transposed(data: &'a [f32], off: usize, cols: usize) -> Self {
        View {
            data: &data[off..],
            rs: 1,
            cs: cols,
        }
    }

    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// `dst (m × n, row-major, rows dst_rs apart) = [dst +] beta · a (m × k) · b (k × n)`,
/// on this thread.
#[allow(clippy::too_many_arguments)]
fn mm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    acc: bool,
    a: View,
    b: View,
    beta: f32,
) {
    assert!(
        View {
            data: dst,
            rs: dst_rs,
            cs: 1
        }
        .fits(m, n)
            && a.fits(m, k)
            && b.fits(k, n),
        "flash attention: tile out of bounds"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            (0..m).for_each(|r| dst[r * dst_rs..r * dst_rs + n].fill(0.0));
        }
        return;
    }
    // SAFETY: the three matrices lie inside their slices (checked above); dst is
    // exclusively borrowed, so it does not alias a or b.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            acc,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// `x ← e^(scale·x − m)` over a slice, vectorised where the CPU allows
/// ([`super::vectorized`]: the same arithmetic either way).
fn exp_shifted(x: &mut [f32], scale: f32, m: f32) {
    super::vectorized(|| x.iter_mut().for_each(|v| *v = exp_approx(*v * scale - m)));
}

/// Largest value of a slice (−∞ when empty).
pub(super) fn max_of(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = a.max(v);
        }
    }
    rest.iter()
        .chain(&acc)
        .fold(f32::NEG_INFINITY, |a, &v| a.max(v))
}

/// Σ of a slice in f64 (see [`super::sum_f64`]), in eight fixed lanes so it vectorises.
pub(super) fn sum_lanes_f64(x: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f64::from(v);
        }
    }
    acc.iter().sum::<f64>() + super::sum_f64(rest.iter().copied())
}

/// Σ x² of a slice in f64, in eight fixed lanes.
pub(super) fn sum_lanes_f64_sq(x: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f64::from(v) * f64::from(v);
        }
    }
    acc.iter().sum::<f64>()
        + rest
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
}

/// Turn a tile of raw scores `q kᵀ` (rows `w` wide, keys `j0..j0 + w`) into
/// probabilities `e^(scale·s − m) · inv_l` inside each row's visible range, 0 outside.
fn probabilities(
    tile: &mut [f32],
    w: usize,
    j0: usize,
    ranges: &[(usize, usize)],
    scale: f32,
    m: &[f32],
    inv_l: &[f32],
) {
    for (r, row) in tile.chunks_exact_mut(w).enumerate() {
        let (a, e) = clip(ranges[r], j0, w);
        row[..a].fill(0.0);
        row[e..].fill(0.0);
        let vis = &mut row[a..e];
        exp_shifted(vis, scale, m[r]);
        vis.iter_mut().for_each(|p| *p *= inv_l[r]);
    }
}

/// A row's visible range as offsets into the tile `j0..j0 + w` (`a == e` when empty).
fn clip((lo, hi): (usize, usize), j0: usize, w: usize) -> (usize, usize) {
    let a = lo.clamp(j0, j0 + w) - j0;
    let e = hi.clamp(j0, j0 + w) - j0;
    (a, e.max(a))
}

impl Flash {
    /// One query block of the forward: rows `i0..i0 + n` of head `h` in batch row `b`.
    #[allow(clippy::too_many_arguments)]
    fn forward_block(
        &self,
        (q, k, v): (&[f32], &[f32], &[f32]),
        ranges: &[(usize, usize)],
        (b, h, i0): (usize, usize, usize),
        o: &mut [f32],
        m: &mut [f32],
        inv_l: &mut [f32],
    ) {
        let d = &self.dims;
        let (hs, n) = (d.hs, m.len());
        let kv_off = (b * d.nkv + h / d.g()) * d.s * hs;
        let q_off = ((b * d.nh + h) * d.t + i0) * hs;
        let rows = &ranges[b * d.t + i0..b * d.t + i0 + n];
        let (klo, khi) = span(rows);
        m.fill(f32::NEG_INFINITY);
        o.fill(0.0);
        let mut l = vec![0f64; n];
        let mut tile = vec![0f32; n * self.tiles.k];
        for j0 in (klo..khi).step_by(self.tiles.k) {
            let w = self.tiles.k.min(khi - j0);
            let tile = &mut tile[..n * w];
            let kt = View::transposed(k, kv_off + j0 * hs, hs);
            mm(n, w, hs, tile, w, false, View::rows(q, q_off, hs), kt, 1.0);
            for (r, row) in tile.chunks_exact_mut(w).enumerate() {
                let (a, e) = clip(rows[r], j0, w);
                row[..a].fill(0.0);
                row[e..].fill(0.0);
                if a == e {
                    continue;
                }
                let vis = &mut row[a..e];
                let m_new = m[r].max(max_of(vis) * self.scale);
                if m_new > m[r] {
                    // Rescale what this row has gathered (e^(−∞) = 0 on its first tile).
                    let corr = if m[r] == f32::NEG_INFINITY {
                        0.0
                    } else {
                        exp_approx(m[r] - m_new)
                    };
                    l[r] *= f64::from(corr);
                    o[r * hs..(r + 1) * hs].iter_mut().for_each(|x| *x *= corr);
                    m[r] = m_new;
                }
                exp_shifted(vis, self.scale, m[r]);
                l[r] += sum_lanes_f64(vis);
            }
            mm(
                n,
                hs,
                w,
                o,
                hs,
                true,
                View::rows(tile, 0, w),
                View::rows(v, kv_off + j0 * hs, hs),
                1.0,
            );
        }
        for r in 0..n {
            // A row that sees no key (only possible with a cache that lost it) gives 0.
            let inv = if l[r] > 0.0 { (1.0 / l[r]) as f32 } else { 0.0 };
            inv_l[r] = inv;
            o[r * hs..(r + 1) * hs].iter_mut().for_each(|x| *x *= inv);
        }
    }
}

/// The f32 values of a contiguous CPU tensor, for the duration of `f`.
fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (st, l) = t.storage_and_layout();
    match (&*st, l.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((a, e))) => f(&v[a..e]),
        _ => Err(not_fused("lc-flash-attention")),
    }
}

fn values<'a>(name: &str, s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, e))) => Ok(&v[a..e]),
        _ => Err(not_fused(name)),
    }
}

impl CustomOp3 for Flash {
    fn name(&self) -> &'static str {
        "lc-flash-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (
            values(self.name(), s1, l1)?,
            values(self.name(), s2, l2)?,
            values(self.name(), s3, l3)?,
        );
        let d = self.dims;
        let ranges = visible_ranges(&d, &self.mask);
        let (bq, hs) = (self.tiles.q, d.hs);
        let mut o = vec![0f32; d.b * d.nh * d.t * hs];
        let mut m = vec![0f32; d.b * d.nh * d.t];
        let mut inv_l = vec![0f32; d.b * d.nh * d.t];
        o.par_chunks_mut(d.t * hs)
            .zip(m.par_chunks_mut(d.t).zip(inv_l.par_chunks_mut(d.t)))
            .enumerate()
            .for_each(|(bh, (o, (m, inv_l)))| {
                o.par_chunks_mut(bq * hs)
                    .zip(m.par_chunks_mut(bq).zip(inv_l.par_chunks_mut(bq)))
                    .enumerate()
                    .for_each(|(qb, (o, (m, inv_l)))| {
                        let at = (bh / d.nh, bh % d.nh, qb * bq);
                        self.forward_block((q, k, v), &ranges, at, o, m, inv_l);
                    });
            });
        *self.stats.lock().expect("stats lock") = Some(Arc::new(Stats { m, inv_l }));
        Ok((CpuStorage::F32(o), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let p = cuda::params_of(
            (self.dims.b, self.dims.nh, self.dims.nkv),
            (self.dims.t, self.dims.s, self.dims.hs),
            f64::from(self.scale),
            &self.mask,
        )?;
        let (o, lse) = cuda::forward((s1, l1), (s2, l2), (s3, l3), p, &self.mask)?;
        let rows = self.dims.b * self.dims.nh * self.dims.t;
        let lse = Tensor::from_storage(
            Storage::Cuda(candle_core::CudaStorage::wrap_cuda_slice(
                lse,
                s1.device().clone(),
            )),
            rows,
            candle_core::op::BackpropOp::none(),
            false,
        );
        *self.lse.lock().expect("lse lock") = Some(lse);
        Ok((o, l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if q.device().is_cuda() {
            let lse = self.lse.lock().expect("lse lock").clone().ok_or_else(|| {
                candle_core::Error::Msg("flash attention: backward before forward".into())
            })?;
            let p = cuda::params(q, k, f64::from(self.scale), &self.mask)?;
            let (dq, dk, dv) = cuda::backward(q, k, v, o, grad, &lse, p, &self.mask)?;
            return Ok((Some(dq), Some(dk), Some(dv)));
        }
        let stats = self
            .stats
            .lock()
            .expect("stats lock")
            .clone()
            .ok_or_else(|| {
                candle_core::Error::Msg("flash attention: backward before forward".into())
            })?;
        let grad = grad.contiguous()?;
        let (dq, dk, dv) = with_values(q, |q| {
            with_values(k, |k| {
                with_values(v, |v| {
                    with_values(o, |o| {
                        with_values(&grad, |g| Ok(self.backward((q, k, v), o, g, &stats)))
                    })
                })
            })
        })?;
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}

/// The backward's key blocks of one batch row are cut into this many parts of about
/// equal work; each part accumulates its own `dq`, summed in part order afterwards.
/// A constant (not the thread count), so results do not depend on the threads.
const BWD_PARTS: usize = 4;

/// One task of the backward: query head `h` of batch row `b` over key blocks
/// `kb0..kb1`, with the slices it alone writes.
struct BwdTask<'a> {
    b: usize,
    h: usize,
    kb0: usize,
    kb1: usize,
    /// `dq` of this part: `T × hs` rows of head `h`.
    dq: &'a mut [f32],
    /// `dk`, `dv` of head `h` (before the sum over the query heads of a group), rows of
    /// keys `kb0 · BKV..`.
    dk: &'a mut [f32],
    dv: &'a mut [f32],
}

impl Flash {
    /// `(dq, dk, dv)` from the inputs, the output `o`, its gradient `g` and the stats,
    /// in one pass over the tiles (FlashAttention-2's order): per task, for each key
    /// block, over the query blocks that see it, recompute `p` once and form
    /// `dv += pᵀ dO`, `ds = p ⊙ (dO vᵀ − D)`, `dk += scale · dsᵀ q`, `dq += scale · ds k`.
    fn backward(
        &self,
        qkv: (&[f32], &[f32], &[f32]),
        o: &[f32],
        g: &[f32],
        stats: &Stats,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let d = self.dims;
        let hs = d.hs;
        let ranges = visible_ranges(&d, &self.mask);
        // D = rowsum(dO ⊙ O), one per query row.
        let dd: Vec<f32> = g
            .par_chunks(hs)
            .zip(o.par_chunks(hs))
            .map(|(g, o)| super::sum_f64(g.iter().zip(o).map(|(a, b)| a * b)) as f32)
            .collect();
        let bk = self.tiles.kv;
        let parts: Vec<[usize; BWD_PARTS + 1]> = (0..d.b)
            .map(|b| self.key_parts(&ranges[b * d.t..(b + 1) * d.t]))
            .collect();
        let q_len = qkv.0.len();
        // Part 0 accumulates into dq itself, the others into their own buffers.
        let mut dq = vec![0f32; q_len];
        let mut dq_more = vec![0f32; (BWD_PARTS - 1) * q_len];
        // dk and dv per query head; summed over each group's g heads below (g = 1: final).
        let mut dkh = vec![0f32; d.b * d.nh * d.s * hs];
        let mut dvh = vec![0f32; d.b * d.nh * d.s * hs];
        let mut dq_parts: Vec<Vec<&mut [f32]>> = std::iter::once(&mut dq[..])
            .chain(dq_more.chunks_mut(q_len))
            .map(|p| p.chunks_mut(d.t * hs).collect())
            .collect();
        let mut tasks = Vec::with_capacity(d.b * d.nh * BWD_PARTS);
        for (bh, (dk, dv)) in dkh
            .chunks_mut(d.s * hs)
            .zip(dvh.chunks_mut(d.s * hs))
            .enumerate()
        {
            let (b, h) = (bh / d.nh, bh % d.nh);
            let cuts = &parts[b];
            let (mut dk, mut dv) = (dk, dv);
            for (p, dq_p) in dq_parts.iter_mut().enumerate() {
                let (kb0, kb1) = (cuts[p], cuts[p + 1]);
                let rows = (kb1 * bk).min(d.s) - (kb0 * bk).min(d.s);
                let (dk_p, dk_rest) = dk.split_at_mut(rows * hs);
                let (dv_p, dv_rest) = dv.split_at_mut(rows * hs);
                (dk, dv) = (dk_rest, dv_rest);
                let dq = std::mem::take(&mut dq_p[bh]);
                if kb0 < kb1 {
                    tasks.push(BwdTask {
                        b,
                        h,
                        kb0,
                        kb1,
                        dq,
                        dk: dk_p,
                        dv: dv_p,
                    });
                }
            }
        }
        tasks
            .into_par_iter()
            .with_max_len(1)
            .for_each(|task| self.bwd_task(qkv, g, &dd, stats, &ranges, task));
        drop(dq_parts);
        if BWD_PARTS > 1 {
            dq.par_chunks_mut(4096).enumerate().for_each(|(c, dq)| {
                let (at, len) = (c * 4096, dq.len());
                for part in dq_more.chunks(q_len) {
                    dq.iter_mut()
                        .zip(&part[at..at + len])
                        .for_each(|(a, &b)| *a += b);
                }
            });
        }
        let gq = d.g();
        let (dk, dv) = if gq == 1 {
            (dkh, dvh)
        } else {
            // dk of kv head kh = Σ over its query heads, in head order.
            let group = |src: &[f32]| {
                let mut out = vec![0f32; d.b * d.nkv * d.s * hs];
                out.par_chunks_mut(d.s * hs)
                    .zip(src.par_chunks(gq * d.s * hs))
                    .for_each(|(out, heads)| {
                        for head in heads.chunks(d.s * hs) {
                            out.iter_mut().zip(head).for_each(|(a, &b)| *a += b);
                        }
                    });
                out
            };
            (group(&dkh), group(&dvh))
        };
        (dq, dk, dv)
    }

    /// Where the key blocks of one batch row (`ranges`: its `T` query rows) are cut
    /// into [`BWD_PARTS`] parts of about equal work (tile rows per key block).
    fn key_parts(&self, ranges: &[(usize, usize)]) -> [usize; BWD_PARTS + 1] {
        let (bq, bk) = (self.tiles.q, self.tiles.kv);
        let nkb = self.dims.s.div_ceil(bk);
        let mut work = vec![0usize; nkb];
        for rows in ranges.chunks(bq) {
            let (lo, hi) = span(rows);
            if lo < hi {
                work[lo / bk..hi.div_ceil(bk)]
                    .iter_mut()
                    .for_each(|w| *w += rows.len());
            }
        }
        let total: usize = work.iter().sum();
        let mut cuts = [nkb; BWD_PARTS + 1];
        cuts[0] = 0;
        let (mut kb, mut done) = (0, 0);
        for (p, cut) in cuts.iter_mut().enumerate().take(BWD_PARTS).skip(1) {
            // The part ends at the first block reaching p / PARTS of the work.
            while kb < nkb && done * BWD_PARTS < total * p {
                done += work[kb];
                kb += 1;
            }
            *cut = kb;
        }
        cuts
    }

    /// One [`BwdTask`]: its key blocks in order, each over the query blocks seeing it.
    #[allow(clippy::too_many_arguments)]
    fn bwd_task(
        &self,
        (q, k, v): (&[f32], &[f32], &[f32]),
        g: &[f32],
        dd: &[f32],
        st: &Stats,
        ranges: &[(usize, usize)],
        task: BwdTask,
    ) {
        let d = &self.dims;
        let (hs, bq, bk) = (d.hs, self.tiles.q, self.tiles.kv);
        let BwdTask {
            b,
            h,
            kb0,
            kb1,
            dq,
            dk,
            dv,
        } = task;
        let head_off = (b * d.nkv + h / d.g()) * d.s * hs;
        let mut p = vec![0f32; bq * bk];
        let mut dp = vec![0f32; bq * bk];
        for kb in kb0..kb1 {
            let j0 = kb * bk;
            let w = bk.min(d.s - j0);
            let kv_off = head_off + j0 * hs;
            let at = (j0 - kb0 * bk) * hs;
            let (dk, dv) = (&mut dk[at..at + w * hs], &mut dv[at..at + w * hs]);
            for i0 in (0..d.t).step_by(bq) {
                let n = bq.min(d.t - i0);
                let rows = &ranges[b * d.t + i0..b * d.t + i0 + n];
                let (lo, hi) = span(rows);
                if hi <= j0 || lo >= j0 + w {
                    continue;
                }
                let row0 = (b * d.nh + h) * d.t + i0;
                let q_off = row0 * hs;
                let (p, dp) = (&mut p[..n * w], &mut dp[..n * w]);
                mm(
                    n,
                    w,
                    hs,
                    p,
                    w,
                    false,
                    View::rows(q, q_off, hs),
                    View::transposed(k, kv_off, hs),
                    1.0,
                );
                let (m, il) = (&st.m[row0..row0 + n], &st.inv_l[row0..row0 + n]);
                probabilities(p, w, j0, rows, self.scale, m, il);
                // dv += pᵀ dO
                mm(
                    w,
                    hs,
                    n,
                    dv,
                    hs,
                    true,
                    View::transposed(p, 0, w),
                    View::rows(g, q_off, hs),
                    1.0,
                );
                mm(
                    n,
                    w,
                    hs,
                    dp,
                    w,
                    false,
                    View::rows(g, q_off, hs),
                    View::transposed(v, kv_off, hs),
                    1.0,
                );
                softmax_grad(p, dp, w, &dd[row0..row0 + n]);
                // dk += scale · dsᵀ q
                mm(
                    w,
                    hs,
                    n,
                    dk,
                    hs,
                    true,
                    View::transposed(dp, 0, w),
                    View::rows(q, q_off, hs),
                    self.scale,
                );
                // dq += scale · ds k
                mm(
                    n,
                    hs,
                    w,
                    &mut dq[i0 * hs..(i0 + n) * hs],
                    hs,
                    true,
                    View::rows(dp, 0, w),
                    View::rows(k, kv_off, hs),
                    self.scale,
                );
            }
        }
    }
}

/// `dp ← p ⊙ (dp − D)` row by row (rows `w` wide): the softmax gradient of a tile.
fn softmax_grad(p: &[f32], dp: &mut [f32], w: usize, dd: &[f32]) {
    for ((dp, p), &dd) in dp.chunks_exact_mut(w).zip(p.chunks_exact(w)).zip(dd) {
        dp.iter_mut().zip(p).for_each(|(x, &p)| *x = p * (*x - dd));
    }
}

// The CUDA kernel in emulation: its fibers are glibc's ucontext.
#[cfg(all(test, target_os = "linux"))]
mod cuda_tests;
#[cfg(test)]
mod tests;
