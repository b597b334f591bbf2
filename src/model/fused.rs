//! Fused CPU kernels that carry their own backward pass.
//!
//! Composed from tensor ops, a softmax or a cross-entropy over a `(rows, V)` tensor
//! walks the data five to ten times, one thread each; these kernels do one parallel pass
//! forward and one backward. Each has a plain twin built from differentiable ops
//! ([`softmax_plain`], [`crate::loss`]) and a test that values and gradients agree.
//! They run for contiguous f32 tensors on the CPU; anything else takes the plain path.
//!
//! ```text
//! softmax:        y = exp(x − max) / Σ exp(x − max)      dx = y ⊙ (dy − Σ dy ⊙ y)
//! cross-entropy:  ℓᵢ = log Σⱼ exp(xᵢⱼ) − xᵢ,tᵢ            dxᵢ = dℓᵢ · (softmax(xᵢ) − onehot(tᵢ))
//! ```

use candle_core::{CpuStorage, CustomOp1, CustomOp2, D, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Rows of a contiguous f32 storage, or None when the fused path does not apply.
fn f32_rows<'a>(s: &'a CpuStorage, l: &Layout) -> Option<(&'a [f32], usize)> {
    let CpuStorage::F32(v) = s else { return None };
    let (start, end) = l.contiguous_offsets()?;
    let cols = *l.dims().last()?;
    Some((&v[start..end], cols))
}

fn not_fused(name: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "{name}: fused kernel needs a contiguous f32 CPU tensor"
    ))
}

fn softmax_row(x: &[f32], y: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for (o, &v) in y.iter_mut().zip(x) {
        *o = (v - max).exp();
        sum += *o;
    }
    let inv = 1.0 / sum;
    y.iter_mut().for_each(|o| *o *= inv);
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "lc-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, cols) = f32_rows(s, l).ok_or_else(|| not_fused(self.name()))?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(cols)
            .zip(x.par_chunks(cols))
            .for_each(|(yr, xr)| softmax_row(xr, yr));
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBackward)?,
        ))
    }
}

struct SoftmaxBackward;

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "lc-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, cols) = f32_rows(s1, l1).ok_or_else(|| not_fused(self.name()))?;
        let (g, _) = f32_rows(s2, l2).ok_or_else(|| not_fused(self.name()))?;
        let mut dx = vec![0f32; y.len()];
        dx.par_chunks_mut(cols)
            .zip(y.par_chunks(cols).zip(g.par_chunks(cols)))
            .for_each(|(d, (yr, gr))| {
                let dot: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
                for ((o, &yv), &gv) in d.iter_mut().zip(yr).zip(gr) {
                    *o = yv * (gv - dot);
                }
            });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// The plain, differentiable softmax over the last dimension (any device, any dtype).
pub fn softmax_plain(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Softmax over the last dimension, fused on CPU f32, with backward.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1(Softmax)
    } else {
        softmax_plain(x)
    }
}

struct CrossEntropy {
    targets: Vec<u32>,
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "lc-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, cols) = f32_rows(s, l).ok_or_else(|| not_fused(self.name()))?;
        let rows = x.len() / cols;
        if rows != self.targets.len() {
            candle_core::bail!(
                "cross-entropy: {rows} rows for {} targets",
                self.targets.len()
            );
        }
        let nll: Vec<f32> = x
            .par_chunks(cols)
            .zip(self.targets.par_iter())
            .map(|(r, &t)| {
                let max = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = r.iter().map(|v| (v - max).exp()).sum();
                sum.ln() + max - r[t as usize]
            })
            .collect();
        Ok((CpuStorage::F32(nll), Shape::from(rows)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = CrossEntropyBackward {
            targets: self.targets.clone(),
        };
        Ok(Some(
            arg.contiguous()?
                .apply_op2_no_bwd(&grad.contiguous()?, &op)?,
        ))
    }
}

struct CrossEntropyBackward {
    targets: Vec<u32>,
}

impl CustomOp2 for CrossEntropyBackward {
    fn name(&self) -> &'static str {
        "lc-cross-entropy-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, cols) = f32_rows(s1, l1).ok_or_else(|| not_fused(self.name()))?;
        let CpuStorage::F32(g) = s2 else {
            return Err(not_fused(self.name()));
        };
        let (gs, ge) = l2
            .contiguous_offsets()
            .ok_or_else(|| not_fused(self.name()))?;
        let g = &g[gs..ge];
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(cols)
            .zip(x.par_chunks(cols))
            .zip(g.par_iter().zip(self.targets.par_iter()))
            .for_each(|((d, r), (&gi, &t))| {
                softmax_row(r, d);
                d.iter_mut().for_each(|v| *v *= gi);
                d[t as usize] -= gi;
            });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Per-row negative log-likelihood `(N)` of `targets` under `logits: (N, V)`, fused on
/// CPU f32 with backward; None when the fused path does not apply.
pub fn cross_entropy_rows(logits: &Tensor, targets: &Tensor) -> Result<Option<Tensor>> {
    if !(logits.device().is_cpu() && logits.dtype() == DType::F32) {
        return Ok(None);
    }
    let targets = targets.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    let v = logits.dim(D::Minus1)?;
    if let Some(&bad) = targets.iter().find(|&&t| t as usize >= v) {
        candle_core::bail!("target id {bad} outside a vocabulary of {v}");
    }
    Ok(Some(
        logits.contiguous()?.apply_op1(CrossEntropy { targets })?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let d = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(d < tol, "max difference {d}");
    }

    #[test]
    fn fused_softmax_matches_plain_forward_and_backward() {
        let x = Var::from_tensor(&(Tensor::randn(0f32, 3.0, (3, 5, 17), &Device::Cpu).unwrap()))
            .unwrap();
        let w = Tensor::randn(0f32, 1.0, (3, 5, 17), &Device::Cpu).unwrap();
        let fused = softmax_last_dim(x.as_tensor()).unwrap();
        let plain = softmax_plain(x.as_tensor()).unwrap();
        close(&fused, &plain, 1e-6);
        let gf = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gp = (plain * &w).unwrap().sum_all().unwrap().backward().unwrap();
        close(
            gf.get(x.as_tensor()).unwrap(),
            gp.get(x.as_tensor()).unwrap(),
            1e-6,
        );
    }

    #[test]
    fn fused_cross_entropy_matches_plain_forward_and_backward() {
        let x =
            Var::from_tensor(&(Tensor::randn(0f32, 2.0, (7, 11), &Device::Cpu).unwrap())).unwrap();
        let t = Tensor::new(&[0u32, 3, 10, 4, 4, 1, 9], &Device::Cpu).unwrap();
        let w = Tensor::randn(0f32, 1.0, 7, &Device::Cpu).unwrap();
        let fused = cross_entropy_rows(x.as_tensor(), &t).unwrap().unwrap();
        // Plain: log-sum-exp minus the picked logit.
        let xs = x.as_tensor();
        let m = xs.max_keepdim(1).unwrap().detach();
        let sh = xs.broadcast_sub(&m).unwrap();
        let lse = sh.exp().unwrap().sum_keepdim(1).unwrap().log().unwrap();
        let plain = (lse - sh.gather(&t.unsqueeze(1).unwrap(), 1).unwrap())
            .unwrap()
            .squeeze(1)
            .unwrap();
        close(&fused, &plain, 1e-5);
        let gf = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gp = (plain * &w).unwrap().sum_all().unwrap().backward().unwrap();
        close(gf.get(xs).unwrap(), gp.get(xs).unwrap(), 1e-6);
    }
}
