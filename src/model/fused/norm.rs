//! RMSNorm and LayerNorm over the last dimension, fused with their backward.
//!
//! The backward kernels return `dx` and the parameter gradients stacked in one tensor
//! `(rows + k, C)` (a kernel has one output); the caller splits it with `narrow`.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{ROW_BLOCK, fusable, rows};

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

fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    1.0 / (ms + eps).sqrt()
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
                let dot = xr
                    .iter()
                    .zip(gr)
                    .zip(w)
                    .map(|((xv, gv), wv)| gv * wv * xv * r)
                    .sum::<f32>()
                    / c as f32;
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
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
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
        let n = c as f32;
        let mut out = vec![0f32; (rows + 2) * c];
        let (dx, _) = out.split_at_mut(rows * c);
        dx.par_chunks_mut(c)
            .zip(x.par_chunks(c).zip(g.par_chunks(c)))
            .for_each(|(d, (xr, gr))| {
                let (mean, r) = moments(xr, self.eps);
                let (mut sum_dn, mut sum_dn_n) = (0f32, 0f32);
                for ((&xv, &gv), &wv) in xr.iter().zip(gr).zip(w) {
                    let dn = gv * wv;
                    sum_dn += dn;
                    sum_dn_n += dn * (xv - mean) * r;
                }
                let (m_dn, m_dn_n) = (sum_dn / n, sum_dn_n / n);
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
}
