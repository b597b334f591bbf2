//! In-place accumulation into gradient buffers (CPU f32): `dst += α·op(A)·op(B)`
//! straight through gemm, `dst += g`, and `dst[idᵢ] += gᵢ` for embeddings.
//!
//! A weight's gradient from each micro-batch (and each head chunk) lands in one
//! buffer allocated once, with no temporary of the weight's size.

use std::sync::Mutex;

use candle_core::{
    CpuStorage, CustomOp2, InplaceOp1, InplaceOp2, InplaceOp3, Layout, Result, Shape, Storage,
    Tensor,
};
use rayon::prelude::*;

use super::{fusable, not_fused};

fn slice<'a>(name: &str, s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, e))) => Ok(&v[a..e]),
        _ => Err(not_fused(name)),
    }
}

fn slice_mut<'a>(name: &str, s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, e))) => Ok(&mut v[a..e]),
        _ => Err(not_fused(name)),
    }
}

/// The values of an `(m, n)` f32 matrix whose rows are contiguous and `ld` apart (a
/// column block of a wider matrix, such as one projection's part of a fused q|k|v
/// output), from its first element to its last, and `ld`.
fn rows_mut<'a>(
    name: &str,
    s: &'a mut CpuStorage,
    l: &Layout,
    (m, n): (usize, usize),
) -> Result<(&'a mut [f32], usize)> {
    let CpuStorage::F32(v) = s else {
        return Err(not_fused(name));
    };
    let (start, ld) = (l.start_offset(), l.stride()[0]);
    if l.dims() != [m, n] || l.stride()[1] != 1 || ld < n {
        candle_core::bail!("{name}: destination is not {m}×{n} with contiguous rows");
    }
    let len = if m == 0 { 0 } else { (m - 1) * ld + n };
    match v.get_mut(start..start + len) {
        Some(d) => Ok((d, ld)),
        None => candle_core::bail!("{name}: destination out of its storage"),
    }
}

fn parallelism() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

struct GemmAcc {
    m: usize,
    n: usize,
    k: usize,
    a_t: bool,
    b_t: bool,
    alpha: f32,
}

impl InplaceOp3 for GemmAcc {
    fn name(&self) -> &'static str {
        "lc-gemm-acc"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let (m, n, k) = (self.m, self.n, self.k);
        let (dst, ld) = rows_mut(self.name(), s1, l1, (m, n))?;
        let a = slice(self.name(), s2, l2)?;
        let b = slice(self.name(), s3, l3)?;
        if a.len() != m * k || b.len() != k * n {
            candle_core::bail!("gemm accumulate: sizes do not match {m}×{k}·{k}×{n}");
        }
        // Column and row strides of the logical A (m × k) and B (k × n).
        let (a_cs, a_rs) = if self.a_t { (m, 1) } else { (1, k) };
        let (b_cs, b_rs) = if self.b_t { (k, 1) } else { (1, n) };
        // SAFETY: dst holds m rows of n values, ld apart (its length checked by
        // rows_mut); A and B are read through in-bounds strides of their own slices,
        // checked above.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.as_mut_ptr(),
                1,
                ld as isize,
                true,
                a.as_ptr(),
                a_cs as isize,
                a_rs as isize,
                b.as_ptr(),
                b_cs as isize,
                b_rs as isize,
                1f32,
                self.alpha,
                false,
                false,
                false,
                parallelism(),
            );
        }
        Ok(())
    }
}

/// `dst += alpha · op(a) · op(b)` in place, where `op(a)` is `aᵀ` when `a_t`; `dst`
/// is `(m, n)`, contiguous or a column block of a wider matrix (`narrow(1, ..)` of a
/// contiguous one). Returns false (and does nothing) when the fused path does not
/// apply.
pub fn gemm_acc(
    dst: &Tensor,
    a: &Tensor,
    a_t: bool,
    b: &Tensor,
    b_t: bool,
    alpha: f32,
) -> Result<bool> {
    let rows_contiguous = dst.rank() == 2 && dst.stride()[1] == 1;
    let ready = [dst, a, b].iter().all(|t| fusable(t))
        && rows_contiguous
        && a.is_contiguous()
        && b.is_contiguous();
    if !ready {
        return Ok(false);
    }
    let (m, n) = dst.dims2()?;
    let (a0, a1) = a.dims2()?;
    let (b0, b1) = b.dims2()?;
    let (am, ak) = if a_t { (a1, a0) } else { (a0, a1) };
    let (bk, bn) = if b_t { (b1, b0) } else { (b0, b1) };
    if am != m || bn != n || ak != bk {
        candle_core::bail!(
            "gemm accumulate: {:?} += {:?}{} · {:?}{}",
            dst.dims(),
            a.dims(),
            if a_t { "ᵀ" } else { "" },
            b.dims(),
            if b_t { "ᵀ" } else { "" }
        );
    }
    dst.inplace_op3(
        a,
        b,
        &GemmAcc {
            m,
            n,
            k: ak,
            a_t,
            b_t,
            alpha,
        },
    )?;
    Ok(true)
}

struct AddAssign;

impl InplaceOp2 for AddAssign {
    fn name(&self) -> &'static str {
        "lc-add-assign"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let dst = slice_mut(self.name(), s1, l1)?;
        let g = slice(self.name(), s2, l2)?;
        if dst.len() != g.len() {
            candle_core::bail!("add in place: {} += {} values", dst.len(), g.len());
        }
        dst.par_chunks_mut(1 << 14)
            .zip(g.par_chunks(1 << 14))
            .for_each(|(d, g)| d.iter_mut().zip(g).for_each(|(d, g)| *d += g));
        Ok(())
    }
}

/// `dst += g` in place (same number of elements); false when the fused path does not
/// apply.
pub fn add_assign(dst: &Tensor, g: &Tensor) -> Result<bool> {
    if !(fusable(dst) && fusable(g) && dst.is_contiguous() && g.is_contiguous()) {
        return Ok(false);
    }
    dst.inplace_op2(g, &AddAssign)?;
    Ok(true)
}

struct Add;

impl CustomOp2 for Add {
    fn name(&self) -> &'static str {
        "lc-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let a = slice(self.name(), s1, l1)?;
        let b = slice(self.name(), s2, l2)?;
        if a.len() != b.len() {
            candle_core::bail!("add: {} + {} values", a.len(), b.len());
        }
        let mut out = Vec::<f32>::with_capacity(a.len());
        out.spare_capacity_mut()[..a.len()]
            .par_chunks_mut(1 << 14)
            .zip(a.par_chunks(1 << 14).zip(b.par_chunks(1 << 14)))
            .for_each(|(o, (a, b))| {
                for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
                    o.write(a + b);
                }
            });
        // SAFETY: every one of the a.len() values was written just above.
        unsafe { out.set_len(a.len()) };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `a + b` for tensors of one shape: on the calling thread's rayon pool for contiguous
/// CPU f32 (candle's own CPU add runs on a process-wide pool that concurrent callers
/// take in turn), a plain add elsewhere.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if fusable(a) && fusable(b) && a.is_contiguous() && b.is_contiguous() && a.dims() == b.dims() {
        a.apply_op2_no_bwd(b, &Add)
    } else {
        a + b
    }
}

struct RowsAdd {
    ids: Vec<u32>,
}

impl InplaceOp2 for RowsAdd {
    fn name(&self) -> &'static str {
        "lc-rows-add"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let dst = slice_mut(self.name(), s1, l1)?;
        let g = slice(self.name(), s2, l2)?;
        let c = g.len() / self.ids.len().max(1);
        let rows = dst.len() / c.max(1);
        if g.len() != self.ids.len() * c {
            candle_core::bail!("row add: {} values for {} ids", g.len(), self.ids.len());
        }
        // In order, one row after the other: the same sum whatever the threads.
        for (i, &id) in self.ids.iter().enumerate() {
            let id = id as usize;
            if id >= rows {
                candle_core::bail!("row add: id {id} outside {rows} rows");
            }
            dst[id * c..(id + 1) * c]
                .iter_mut()
                .zip(&g[i * c..(i + 1) * c])
                .for_each(|(d, g)| *d += g);
        }
        Ok(())
    }
}

/// `dst[ids[i]] += g[i]` for the rows of `g: (len(ids), C)` into `dst: (rows, C)`;
/// false when the fused path does not apply.
pub fn rows_add(dst: &Tensor, ids: &[u32], g: &Tensor) -> Result<bool> {
    if !(fusable(dst) && fusable(g) && dst.is_contiguous() && g.is_contiguous()) {
        return Ok(false);
    }
    dst.inplace_op2(g, &RowsAdd { ids: ids.to_vec() })?;
    Ok(true)
}

struct WithMut<F>(Mutex<Option<F>>);

impl<F: FnOnce(&mut [f32]) -> Result<()>> InplaceOp1 for WithMut<F> {
    fn name(&self) -> &'static str {
        "lc-with-mut"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let f = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| candle_core::Error::Msg("lc-with-mut: called twice".into()))?;
        f(slice_mut(self.name(), s, l)?)
    }
}

/// Run `f` on the values of a contiguous f32 CPU tensor, mutably, in place (the
/// tensor's storage is locked meanwhile: `f` must not touch `t` itself). False, and
/// `f` not run, when `t` is not such a tensor.
pub fn with_values_mut(t: &Tensor, f: impl FnOnce(&mut [f32]) -> Result<()>) -> Result<bool> {
    if !(t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && t.is_contiguous()) {
        return Ok(false);
    }
    t.inplace_op1(&WithMut(Mutex::new(Some(f))))?;
    Ok(true)
}

/// Run `f` on the values of a contiguous f32 CPU tensor; None when `t` is not one.
pub fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    if !(t.device().is_cpu() && t.dtype() == candle_core::DType::F32) {
        return None;
    }
    let (st, l) = t.storage_and_layout();
    let (a, e) = l.contiguous_offsets()?;
    match &*st {
        Storage::Cpu(CpuStorage::F32(v)) => Some(f(&v[a..e])),
        _ => None,
    }
}

/// `Σ x²` of a contiguous f32 CPU tensor, in parallel blocks summed in f64 in a fixed
/// order; None when `t` is not such a tensor.
pub fn sum_squares(t: &Tensor) -> Option<f64> {
    with_values(t, |x| {
        x.par_chunks(1 << 16)
            .map(|c| super::vectorized(|| super::flash::sum_lanes_f64_sq(c)))
            .collect::<Vec<f64>>()
            .iter()
            .sum()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fused::testing::close;
    use candle_core::Device;

    #[test]
    fn accumulations_equal_their_tensor_op_twins() {
        let dev = Device::Cpu;
        let r = |s: (usize, usize)| Tensor::randn(0f32, 1.0, s, &dev).unwrap();
        let (m, n, k) = (7, 5, 9);
        for (a_t, b_t) in [(false, false), (true, false), (false, true), (true, true)] {
            let a = if a_t { r((k, m)) } else { r((m, k)) };
            let b = if b_t { r((n, k)) } else { r((k, n)) };
            let dst = r((m, n));
            let opa = if a_t { a.t().unwrap() } else { a.clone() };
            let opb = if b_t { b.t().unwrap() } else { b.clone() };
            let want = (&dst + (opa.matmul(&opb).unwrap() * 0.5).unwrap()).unwrap();
            let acc = dst.copy().unwrap();
            assert!(gemm_acc(&acc, &a, a_t, &b, b_t, 0.5).unwrap());
            close(&acc, &want, 1e-5);
            // Into columns 2..2+n of a wider matrix, the others untouched.
            let wide = r((m, n + 4));
            let before = wide.copy().unwrap();
            let block = wide.narrow(1, 2, n).unwrap();
            let want = (&block + (opa.matmul(&opb).unwrap() * 0.5).unwrap()).unwrap();
            assert!(gemm_acc(&block, &a, a_t, &b, b_t, 0.5).unwrap());
            close(&wide.narrow(1, 2, n).unwrap(), &want, 1e-5);
            for c in [0, n + 2] {
                let cols = |t: &Tensor| t.narrow(1, c, 2).unwrap().to_vec2::<f32>().unwrap();
                assert_eq!(cols(&wide), cols(&before));
            }
        }
        let dst = r((4, 3));
        let g = r((4, 3));
        let want = (&dst + &g).unwrap();
        assert!(add_assign(&dst, &g).unwrap());
        close(&dst, &want, 1e-6);

        let dst = r((5, 3));
        let g = r((4, 3));
        let ids = [4u32, 0, 4, 2];
        let idt = Tensor::new(&ids, &dev).unwrap();
        let want = dst.index_add(&idt, &g, 0).unwrap();
        assert!(rows_add(&dst, &ids, &g).unwrap());
        close(&dst, &want, 1e-6);
        assert!(rows_add(&dst, &[9, 0, 0, 0], &g).is_err());
    }
}
