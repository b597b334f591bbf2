//! A matmul by a frozen weight whose backward skips the weight's gradient.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::not_fused;

/// `x Wᵀ` for a weight that is not trained: candle's matmul backward would also
/// compute `dW`, a third of a LoRA step's work for nothing.
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
        let dev = candle_core::Device::Cpu;
        macro_rules! run {
            ($v:expr, $variant:ident, $t:ty) => {{
                let x = Tensor::from_slice(&$v[start..end], dims, &dev)?;
                let y = x.matmul(&self.w.t()?)?;
                let shape = y.shape().clone();
                Ok((
                    CpuStorage::$variant(y.flatten_all()?.to_vec1::<$t>()?),
                    shape,
                ))
            }};
        }
        match s {
            CpuStorage::F32(v) => run!(v, F32, f32),
            CpuStorage::BF16(v) => run!(v, BF16, half::bf16),
            CpuStorage::F16(v) => run!(v, F16, half::f16),
            _ => Err(not_fused(self.name())),
        }
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.w)?))
    }
}

/// `x: (rows, in)` times `wᵀ` (`w: (out, in)`). When `w` is frozen and `x` carries
/// gradients, the backward pass skips `dW` (CPU only; elsewhere a plain matmul).
pub fn linear_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let frozen = !w.track_op();
    if frozen
        && x.track_op()
        && super::ENABLED.load(std::sync::atomic::Ordering::Relaxed)
        && x.device().is_cpu()
    {
        x.contiguous()?.apply_op1(FrozenMatmul { w: w.clone() })
    } else {
        x.matmul(&w.t()?)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::agree;
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn frozen_matmul_matches_matmul_and_skips_the_weight() {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (6, 5), &Device::Cpu).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 1.0, (3, 5), &Device::Cpu).unwrap();
        let fused = linear_matmul(x.as_tensor(), &w).unwrap();
        let plain = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
        agree(&[&x], &fused, &plain, 1e-5, 1e-5);
        let g = fused.sum_all().unwrap().backward().unwrap();
        assert!(g.get(&w).is_none(), "no gradient for the frozen weight");
    }
}
