//! `x Wᵀ` straight into gemm: no transposed copy of the weight, the output written once.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::not_fused;

/// `x Wᵀ` without autograd (the engine writes the backward out).
struct FrozenMatmul {
    /// `(out, in)`, in `x`'s dtype.
    w: Tensor,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "lc-frozen-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| not_fused(self.name()))?;
        let dims = l.dims();
        let (out, k) = self.w.dims2()?;
        let rows = (end - start) / k;
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("at least one dimension") = out;
        if let CpuStorage::F32(x) = s {
            // Straight into gemm: no copy of x, y written once.
            let (ws, wl) = self.w.storage_and_layout();
            let candle_core::Storage::Cpu(CpuStorage::F32(w)) = &*ws else {
                return Err(not_fused(self.name()));
            };
            let (w0, w1) = wl
                .contiguous_offsets()
                .ok_or_else(|| not_fused(self.name()))?;
            let (x, w) = (&x[start..end], &w[w0..w1]);
            // Not zeroed: gemm writes every element (read_dst = false), and zeroing a
            // reused allocation first is a pass over the output for nothing.
            let mut y = Vec::<f32>::with_capacity(rows * out);
            let threads = rayon::current_num_threads();
            let par = if threads > 1 {
                gemm::Parallelism::Rayon(threads)
            } else {
                gemm::Parallelism::None
            };
            // SAFETY: y has capacity rows × out, x is rows × k, w out × k, all row-major
            // and in bounds; y[i, j] = Σ_c x[i, c] · w[j, c] (rhs element (c, j) at
            // w + j·k + c). With read_dst = false gemm only writes y, through the raw
            // pointer (no reference to its uninitialised values), and writes all of it
            // (zeros when k = 0), so its length can then be set to rows × out.
            unsafe {
                gemm::gemm(
                    rows,
                    out,
                    k,
                    y.as_mut_ptr(),
                    1,
                    out as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    w.as_ptr(),
                    k as isize,
                    1,
                    0f32,
                    1f32,
                    false,
                    false,
                    false,
                    par,
                );
                y.set_len(rows * out);
            }
            return Ok((CpuStorage::F32(y), Shape::from(shape)));
        }
        let dev = candle_core::Device::Cpu;
        macro_rules! run {
            ($v:expr, $variant:ident, $t:ty) => {{
                let x = Tensor::from_slice(&$v[start..end], dims, &dev)?;
                let y = x.matmul(&self.w.t()?)?;
                Ok((
                    CpuStorage::$variant(y.flatten_all()?.to_vec1::<$t>()?),
                    Shape::from(shape),
                ))
            }};
        }
        match s {
            CpuStorage::BF16(v) => run!(v, BF16, half::bf16),
            CpuStorage::F16(v) => run!(v, F16, half::f16),
            _ => Err(not_fused(self.name())),
        }
    }
}

/// `x Wᵀ` without autograd for `x: (rows, in)` and `w: (out, in)`: straight into gemm
/// on CPU f32 (no transposed copy of `w`), a plain matmul elsewhere.
pub fn matmul_nt(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if super::fusable(x) && super::fusable(w) && w.is_contiguous() {
        x.contiguous()?
            .apply_op1_no_bwd(&FrozenMatmul { w: w.clone() })
    } else {
        x.matmul(&w.t()?)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::close;
    use super::*;
    use candle_core::Device;

    #[test]
    fn matmul_nt_matches_matmul() {
        let x = Tensor::randn(0f32, 1.0, (6, 5), &Device::Cpu).unwrap();
        let w = Tensor::randn(0f32, 1.0, (3, 5), &Device::Cpu).unwrap();
        let fused = matmul_nt(&x, &w).unwrap();
        let plain = x.matmul(&w.t().unwrap()).unwrap();
        close(&fused, &plain, 1e-5);
    }
}
