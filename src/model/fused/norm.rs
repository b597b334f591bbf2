//! RMSNorm and LayerNorm over the last dimension, fused with their backward.
//!
//! The backward kernels return `dx` and the parameter gradients stacked in one tensor
//! `(rows + k, C)` (a kernel has one output); the caller splits it with `narrow`.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{ROW_BLOCK, fusable, rows, sum_f64};

/// Column sums of `rows × cols` values produced per row by `f`, in fixed blocks.
fn column_sums(
    rows: usize,
    cols: usize,
    k: usize,
    f: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    let partial: Vec<Vec<f32>> = (0..rows.div_ceil(ROW_BLOCK))
        .into_par_iter()
        .map(|b| {
            let mut acc = vec![0f32; k * cols];
            for r in b * ROW_BLOCK..((b + 1) * ROW_BLOCK).min(rows) {
                f(r, &mut acc);
            }
            acc
        })
        .collect();
    let mut total = vec![0f32; k * cols];
    for p in partial {
        total.iter_mut().zip(p).for_each(|(t, v)| *t += v);
    }
    total
}

// ---------------------------------------------------------------- RMSNorm

struct RmsNorm {
    eps: f32,
}

/// `1 / sqrt(mean(x²) + eps)` of a row.
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ms = sum_f64(x.iter().map(|v| v * v)) / x.len() as f64;
    (1.0 / (ms + f64::from(eps)).sqrt()) as f32
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "lc-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, c) = rows(self.name(), s1, l1)?;
        let (w, _) = rows(self.name(), s2, l2)?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(c)
            .zip(x.par_chunks(c))
            .for_each(|(yr, xr)| {
                let r = inv_rms(xr, self.eps);
                for ((o, &v), &wv) in yr.iter_mut().zip(xr).zip(w) {
                    *o = v * r * wv;
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let c = w.dim(0)?;
        let rows = x.elem_count() / c;
        let both = x.contiguous()?.apply_op3_no_bwd(
            w,
            &g.contiguous()?,
            &RmsNormBackward { eps: self.eps },
        )?;
        let dx = both.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dw = both.narrow(0, rows, 1)?.reshape(c)?;
        Ok((Some(dx), Some(dw)))
    }
}

struct RmsNormBackward {
    eps: f32,
}

impl CustomOp3 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "lc-rms-norm-bwd"
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
        let (x, c) = rows(self.name(), s1, l1)?;
        let (w, _) = rows(self.name(), s2, l2)?;
        let (g, _) = rows(self.name(), s3, l3)?;
        let rows = x.len() / c;
        let mut out = vec![0f32; (rows + 1) * c];
        let (dx, _) = out.split_at_mut(rows * c);
        dx.par_chunks_mut(c)
            .zip(x.par_chunks(c).zip(g.par_chunks(c)))
            .for_each(|(d, (xr, gr))| {
                let r = inv_rms(xr, self.eps);
                // mean(dn ⊙ n) with dn = g ⊙ w, n = x·r
                let dot = (sum_f64(
                    xr.iter()
                        .zip(gr)
                        .zip(w)
                        .map(|((xv, gv), wv)| gv * wv * xv * r),
                ) / c as f64) as f32;
                for (((o, &xv), &gv), &wv) in d.iter_mut().zip(xr).zip(gr).zip(w) {
                    *o = r * (gv * wv - xv * r * dot);
                }
            });
        let dw = column_sums(rows, c, 1, |row, acc| {
            let xr = &x[row * c..(row + 1) * c];
            let gr = &g[row * c..(row + 1) * c];
            let r = inv_rms(xr, self.eps);
            for ((a, &xv), &gv) in acc.iter_mut().zip(xr).zip(gr) {
                *a += gv * xv * r;
            }
        });
        out[rows * c..].copy_from_slice(&dw);
        Ok((CpuStorage::F32(out), Shape::from((rows + 1, c))))
    }
}

// ---------------------------------------------------------------- LayerNorm

struct LayerNorm {
    eps: f32,
}

/// Mean and `1/σ` of a row (biased variance).
fn moments(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f64;
    let mean = sum_f64(x.iter().copied()) / n;
    let var = x
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n;
    (mean as f32, (1.0 / (var + f64::from(eps)).sqrt()) as f32)
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "lc-layer-norm"
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
        let (x, c) = rows(self.name(), s1, l1)?;
        let (w, _) = rows(self.name(), s2, l2)?;
        let (b, _) = rows(self.name(), s3, l3)?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(c)
            .zip(x.par_chunks(c))
            .for_each(|(yr, xr)| {
                let (mean, r) = moments(xr, self.eps);
                for (((o, &v), &wv), &bv) in yr.iter_mut().zip(xr).zip(w).zip(b) {
                    *o = (v - mean) * r * wv + bv;
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = w.dim(0)?;
        let rows = x.elem_count() / c;
        let all = x.contiguous()?.apply_op3_no_bwd(
            w,
            &g.contiguous()?,
            &LayerNormBackward { eps: self.eps },
        )?;
        let dx = all.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dw = all.narrow(0, rows, 1)?.reshape(c)?;
        let db = all.narrow(0, rows + 1, 1)?.reshape(c)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

struct LayerNormBackward {
    eps: f32,
}

impl CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "lc-layer-norm-bwd"
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
        let (x, c) = rows(self.name(), s1, l1)?;
        let (w, _) = rows(self.name(), s2, l2)?;
        let (g, _) = rows(self.name(), s3, l3)?;
        let rows = x.len() / c;
        let n = c as f64;
        let mut out = vec![0f32; (rows + 2) * c];
        let (dx, _) = out.split_at_mut(rows * c);
        dx.par_chunks_mut(c)
            .zip(x.par_chunks(c).zip(g.par_chunks(c)))
            .for_each(|(d, (xr, gr))| {
                let (mean, r) = moments(xr, self.eps);
                let (mut sum_dn, mut sum_dn_n) = (0f64, 0f64);
                for ((&xv, &gv), &wv) in xr.iter().zip(gr).zip(w) {
                    let dn = gv * wv;
                    sum_dn += f64::from(dn);
                    sum_dn_n += f64::from(dn * (xv - mean) * r);
                }
                let (m_dn, m_dn_n) = ((sum_dn / n) as f32, (sum_dn_n / n) as f32);
                for (((o, &xv), &gv), &wv) in d.iter_mut().zip(xr).zip(gr).zip(w) {
                    let nv = (xv - mean) * r;
                    *o = r * (gv * wv - m_dn - nv * m_dn_n);
                }
            });
        let sums = column_sums(rows, c, 2, |row, acc| {
            let xr = &x[row * c..(row + 1) * c];
            let gr = &g[row * c..(row + 1) * c];
            let (mean, r) = moments(xr, self.eps);
            let (dw, db) = acc.split_at_mut(c);
            for (((a, bacc), &xv), &gv) in dw.iter_mut().zip(db.iter_mut()).zip(xr).zip(gr) {
                *a += gv * (xv - mean) * r;
                *bacc += gv;
            }
        });
        out[rows * c..].copy_from_slice(&sums);
        Ok((CpuStorage::F32(out), Shape::from((rows + 2, c))))
    }
}

/// Fused `x / rms(x) ⊙ w` when `x` and `w` are f32 on the CPU; None otherwise.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    if !(fusable(x) && fusable(w)) {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op2(
        &w.contiguous()?,
        RmsNorm { eps: eps as f32 },
    )?))
}

/// Fused `(x − μ)/σ ⊙ w + b` when all are f32 on the CPU; None otherwise.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    if !(fusable(x) && fusable(w) && fusable(b)) {
        return Ok(None);
    }
    let op = LayerNorm { eps: eps as f32 };
    Ok(Some(x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        op,
    )?))
}

/// `(dx, dw)` of the fused RMSNorm for the output gradient `dy` (CPU f32; None
/// otherwise).
pub fn rms_norm_backward(
    x: &Tensor,
    w: &Tensor,
    eps: f64,
    dy: &Tensor,
) -> Result<Option<(Tensor, Tensor)>> {
    if !(fusable(x) && fusable(w) && fusable(dy)) {
        return Ok(None);
    }
    match (RmsNorm { eps: eps as f32 }).bwd(x, w, x, dy)? {
        (Some(dx), Some(dw)) => Ok(Some((dx, dw))),
        _ => candle_core::bail!("rms norm: backward gave no gradient"),
    }
}

/// `(dx, dw, db)` of the fused LayerNorm for the output gradient `dy` (CPU f32; None
/// otherwise).
pub fn layer_norm_backward(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
    dy: &Tensor,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    if !(fusable(x) && fusable(w) && fusable(b) && fusable(dy)) {
        return Ok(None);
    }
    match (LayerNorm { eps: eps as f32 }).bwd(x, w, b, x, dy)? {
        (Some(dx), Some(dw), Some(db)) => Ok(Some((dx, dw, db))),
        _ => candle_core::bail!("layer norm: backward gave no gradient"),
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::agree;
    use super::*;
    use candle_core::{D, Device, Var};

    fn var(mean: f32, std: f32, shape: &[usize]) -> Var {
        Var::from_tensor(&Tensor::randn(mean, std, shape, &Device::Cpu).unwrap()).unwrap()
    }

    #[test]
    fn fused_rms_norm_matches_plain() {
        let (x, w) = (var(0.3, 2.0, &[3, 70, 9]), var(1.0, 0.2, &[9]));
        let (xs, ws) = (x.as_tensor(), w.as_tensor());
        let fused = rms_norm(xs, ws, 1e-5).unwrap().unwrap();
        let ms = xs.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let plain = xs
            .broadcast_div(&(ms + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(ws)
            .unwrap();
        agree(&[&x, &w], &fused, &plain, 1e-5, 1e-3);
    }

    #[test]
    fn fused_layer_norm_matches_plain() {
        let (x, w, b) = (
            var(0.3, 2.0, &[3, 70, 9]),
            var(1.0, 0.2, &[9]),
            var(0.0, 0.1, &[9]),
        );
        let (xs, ws, bs) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
        let fused = layer_norm(xs, ws, bs, 1e-5).unwrap().unwrap();
        let cen = xs
            .broadcast_sub(&xs.mean_keepdim(D::Minus1).unwrap())
            .unwrap();
        let var = cen.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let plain = cen
            .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(ws)
            .unwrap()
            .broadcast_add(bs)
            .unwrap();
        agree(&[&x, &w, &b], &fused, &plain, 1e-5, 1e-3);
    }

    /// Issue 9: a row of a real model's residual stream at the first token, one massive
    /// channel (2.2e4) and 575 ordinary ones. After the massive square (4.8e8, ulp 32),
    /// a running f32 sum dropped (RMS) or rounded the same way (LayerNorm) every small
    /// square: the statistics were off by 1e-5 relative.
    #[test]
    fn a_massive_activation_keeps_the_small_channels_in_the_statistics() {
        let c = 576;
        let mut row = vec![3f32; c];
        row[0] = 22000.0;
        let x = Tensor::from_vec(row.clone(), (1, c), &Device::Cpu).unwrap();
        let w = Tensor::ones(c, candle_core::DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::zeros(c, candle_core::DType::F32, &Device::Cpu).unwrap();
        let r64: Vec<f64> = row.iter().map(|&v| v as f64).collect();
        let n = c as f64;

        let ms = r64.iter().map(|v| v * v).sum::<f64>() / n;
        let want = r64[1] / (ms + 1e-5).sqrt();
        let y = rms_norm(&x, &w, 1e-5).unwrap().unwrap();
        let got = y.flatten_all().unwrap().to_vec1::<f32>().unwrap()[1] as f64;
        assert!(
            ((got - want) / want).abs() < 1e-6,
            "rms norm {got} vs {want}"
        );

        let mean = r64.iter().sum::<f64>() / n;
        let var = r64.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
        let want = (r64[1] - mean) / (var + 1e-5).sqrt();
        let y = layer_norm(&x, &w, &b, 1e-5).unwrap().unwrap();
        let got = y.flatten_all().unwrap().to_vec1::<f32>().unwrap()[1] as f64;
        assert!(
            ((got - want) / want).abs() < 1e-6,
            "layer norm {got} vs {want}"
        );
    }
}
