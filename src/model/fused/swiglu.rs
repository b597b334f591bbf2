//! `silu(a) ⊙ u`, the gated MLP's activation, fused with its backward.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{fusable, rows};

const CHUNK: usize = 1 << 12;

fn sigmoid(a: f32) -> f32 {
    1.0 / (1.0 + (-a).exp())
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "lc-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, _) = rows(self.name(), s1, l1)?;
        let (u, _) = rows(self.name(), s2, l2)?;
        let mut y = vec![0f32; a.len()];
        y.par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
            .for_each(|(y, (a, u))| {
                for i in 0..y.len() {
                    y[i] = a[i] * sigmoid(a[i]) * u[i];
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = a.contiguous()?.apply_op3_no_bwd(
            &u.contiguous()?,
            &g.contiguous()?,
            &SwiGluBackward,
        )?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

struct SwiGluBackward;

impl candle_core::CustomOp3 for SwiGluBackward {
    fn name(&self) -> &'static str {
        "lc-swiglu-bwd"
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
        let (a, _) = rows(self.name(), s1, l1)?;
        let (u, _) = rows(self.name(), s2, l2)?;
        let (g, _) = rows(self.name(), s3, l3)?;
        let n = a.len();
        let mut out = vec![0f32; 2 * n];
        let (da, du) = out.split_at_mut(n);
        da.par_chunks_mut(CHUNK)
            .zip(du.par_chunks_mut(CHUNK))
            .zip(
                a.par_chunks(CHUNK)
                    .zip(u.par_chunks(CHUNK))
                    .zip(g.par_chunks(CHUNK)),
            )
            .for_each(|((da, du), ((a, u), g))| {
                for i in 0..da.len() {
                    let s = sigmoid(a[i]);
                    da[i] = g[i] * u[i] * s * (1.0 + a[i] * (1.0 - s));
                    du[i] = g[i] * a[i] * s;
                }
            });
        let mut dims = vec![2];
        dims.extend(l1.dims());
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// `silu(a) ⊙ u`; fused on CPU f32, None otherwise.
pub fn swiglu(a: &Tensor, u: &Tensor) -> Result<Option<Tensor>> {
    if !(fusable(a) && fusable(u)) {
        return Ok(None);
    }
    Ok(Some(a.contiguous()?.apply_op2(&u.contiguous()?, SwiGlu)?))
}

#[cfg(test)]
mod tests {
    use super::super::testing::agree;
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn fused_swiglu_matches_plain() {
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::randn(0f32, 2.0, (7, 33), &dev).unwrap()).unwrap();
        let u = Var::from_tensor(&Tensor::randn(0f32, 2.0, (7, 33), &dev).unwrap()).unwrap();
        let fused = swiglu(a.as_tensor(), u.as_tensor()).unwrap().unwrap();
        let plain = (a.as_tensor().silu().unwrap() * u.as_tensor()).unwrap();
        agree(&[&a, &u], &fused, &plain, 1e-5, 1e-4);
    }
}
