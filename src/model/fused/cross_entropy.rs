//! Per-row cross-entropy of logits against target ids.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, D, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{fusable, not_fused, rows, sum_f64};

/// `exp(x − max) / Σ` of one row into `y`.
fn softmax_row(x: &[f32], y: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f64;
    for (o, &v) in y.iter_mut().zip(x) {
        *o = (v - max).exp();
        sum += f64::from(*o);
    }
    let inv = (1.0 / sum) as f32;
    y.iter_mut().for_each(|o| *o *= inv);
}

struct CrossEntropy {
    targets: Vec<u32>,
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "lc-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, cols) = rows(self.name(), s, l)?;
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
                let sum = sum_f64(r.iter().map(|v| (v - max).exp()));
                (sum.ln() + f64::from(max - r[t as usize])) as f32
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
        let (x, cols) = rows(self.name(), s1, l1)?;
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
    if !fusable(logits) {
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

/// Per-row `log Σ exp(x) − x[target]`, `(N)`, from differentiable ops (the max is
/// detached: it cancels out): the plain twin of the fused kernels.
pub fn nll_plain(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let log_z = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?; // (N, 1)
    let picked = shifted.gather(&targets.unsqueeze(1)?, 1)?; // (N, 1)
    (log_z - picked)?.squeeze(1)
}

/// Forward and backward of the cross-entropy of `logits: (N, V)` (contiguous CPU f32)
/// in one pass, in place: per row `nllᵢ = log Σⱼ exp xᵢⱼ − xᵢ,tᵢ`, and `logits` then
/// holds the gradient `wᵢ (softmax xᵢ − onehot tᵢ)`, weighted by `weights` (0 for rows
/// that do not count). Overwriting the logits halves the head's largest buffer and
/// saves allocating (and zeroing) a second one. None, and `logits` untouched, when the
/// fused path does not apply; `logits` must share its storage with no tensor still in
/// use.
pub fn cross_entropy_grad_in_place(
    logits: &Tensor,
    targets: &[u32],
    weights: &[f32],
) -> Result<Option<Vec<f32>>> {
    if !fusable(logits) || !logits.is_contiguous() {
        return Ok(None);
    }
    let (n, v) = logits.dims2()?;
    if targets.len() != n || weights.len() != n {
        candle_core::bail!(
            "cross-entropy: {n} rows for {} targets and {} weights",
            targets.len(),
            weights.len()
        );
    }
    if let Some(&bad) = targets.iter().find(|&&t| t as usize >= v) {
        candle_core::bail!("target id {bad} outside a vocabulary of {v}");
    }
    let mut nll = Vec::new();
    let done = super::with_values_mut(logits, |x| {
        nll = x
            .par_chunks_mut(v)
            .zip(targets.par_iter().zip(weights.par_iter()))
            .map(|(r, (&t, &w))| {
                super::vectorized(|| {
                    let max = super::flash::max_of(r);
                    let picked = r[t as usize];
                    for o in r.iter_mut() {
                        *o = super::exp_approx(*o - max);
                    }
                    let sum = super::flash::sum_lanes_f64(r);
                    let scale = (f64::from(w) / sum) as f32;
                    r.iter_mut().for_each(|o| *o *= scale);
                    r[t as usize] -= w;
                    (sum.ln() + f64::from(max - picked)) as f32
                })
            })
            .collect();
        Ok(())
    })?;
    Ok(done.then_some(nll))
}

#[cfg(test)]
mod tests {
    use super::super::testing::agree;
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn fused_cross_entropy_matches_plain_forward_and_backward() {
        let x =
            Var::from_tensor(&Tensor::randn(0f32, 2.0, (7, 11), &Device::Cpu).unwrap()).unwrap();
        let t = Tensor::new(&[0u32, 3, 10, 4, 4, 1, 9], &Device::Cpu).unwrap();
        let fused = cross_entropy_rows(x.as_tensor(), &t).unwrap().unwrap();
        let plain = nll_plain(x.as_tensor(), &t).unwrap();
        agree(&[&x], &fused, &plain, 1e-5, 1e-6);
    }

    /// Issue 9: a confident row over a real model's vocabulary. After the max's exp(0) = 1,
    /// each exp(-17) = 4.1e-8 is under half an ulp of 1, and a running f32 sum dropped
    /// all 49,151 of them: log-sum-exp came out 2e-3 low, and p(max) 2e-3 high.
    #[test]
    fn tiny_probabilities_of_a_large_vocabulary_are_not_dropped() {
        let v = 49152;
        let mut row = vec![0f32; v];
        row[0] = 17.0;
        let x = Var::from_tensor(&Tensor::from_vec(row, (1, v), &Device::Cpu).unwrap()).unwrap();
        let t = Tensor::new(&[1u32], &Device::Cpu).unwrap();
        let nll = cross_entropy_rows(x.as_tensor(), &t).unwrap().unwrap();
        let tiny_mass = (v - 1) as f64 * (-17f64).exp();
        let exact = 17.0 + tiny_mass.ln_1p();
        let got = nll.to_vec1::<f32>().unwrap()[0] as f64;
        assert!((got - exact).abs() < 1e-5, "loss {got} vs {exact}");

        let g = nll.sum_all().unwrap().backward().unwrap();
        let dx = g.get(x.as_tensor()).unwrap().flatten_all().unwrap();
        let dx = dx.to_vec1::<f32>().unwrap();
        let p0 = 1.0 / (1.0 + tiny_mass);
        assert!((dx[0] as f64 - p0).abs() < 1e-6, "p(max) {} vs {p0}", dx[0]);
        let p1 = (-17f64).exp() * p0;
        assert!(
            ((dx[2] as f64 - p1) / p1).abs() < 1e-5,
            "p(other) {} vs {p1}",
            dx[2]
        );
    }
}
