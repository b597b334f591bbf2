//! Softmax over the last dimension, with an optional score scale and causal/window/
//! document mask computed on the fly.
//!
//! The mask is a [`MaskSpec`]: the kernel finds each row's visible keys as one range
//! and never builds a mask tensor.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, D, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::mask::MaskSpec;
use super::{fusable, rows, sum_f64};

/// The plain, differentiable softmax over the last dimension (any device, any dtype).
pub fn softmax_plain(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

struct MaskedSoftmax {
    scale: f32,
    mask: Option<MaskSpec>,
    /// Rows per (batch, head) block: T.
    t: usize,
    /// Rows per batch row: H·T.
    per_batch: usize,
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "lc-masked-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, cols) = rows(self.name(), s, l)?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(cols)
            .zip(x.par_chunks(cols))
            .enumerate()
            .for_each(|(row, (yr, xr))| {
                let (i, b) = (row % self.t, row / self.per_batch);
                let keys = match &self.mask {
                    Some(m) => m.visible_keys(self.t, b, i, cols),
                    None => 0..cols,
                };
                let mut max = f32::NEG_INFINITY;
                for (j, (o, &v)) in yr.iter_mut().zip(xr).enumerate() {
                    *o = if keys.contains(&j) {
                        v * self.scale
                    } else {
                        f32::NEG_INFINITY
                    };
                    max = max.max(*o);
                }
                let mut sum = 0f64;
                for o in yr.iter_mut() {
                    *o = (*o - max).exp();
                    sum += f64::from(*o);
                }
                let inv = (1.0 / sum) as f32;
                yr.iter_mut().for_each(|o| *o *= inv);
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = SoftmaxBackward { scale: self.scale };
        Ok(Some(res.apply_op2_no_bwd(&grad.contiguous()?, &op)?))
    }
}

struct SoftmaxBackward {
    scale: f32,
}

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
        let (y, cols) = rows(self.name(), s1, l1)?;
        let (g, _) = rows(self.name(), s2, l2)?;
        let mut dx = vec![0f32; y.len()];
        dx.par_chunks_mut(cols)
            .zip(y.par_chunks(cols).zip(g.par_chunks(cols)))
            .for_each(|(d, (yr, gr))| {
                let dot = sum_f64(yr.iter().zip(gr).map(|(a, b)| a * b)) as f32;
                for ((o, &yv), &gv) in d.iter_mut().zip(yr).zip(gr) {
                    *o = self.scale * yv * (gv - dot);
                }
            });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// `softmax(scale · x + mask)` over the last dimension of `x: (…, T, S)` (`(B, H, T, S)`
/// when the mask has documents). Fused on CPU f32; elsewhere built from
/// [`softmax_plain`] and an additive mask.
pub fn masked_softmax(x: &Tensor, scale: f64, mask: Option<MaskSpec>) -> Result<Tensor> {
    let dims = x.dims();
    let (t, s) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    if let Some(m) = &mask {
        m.check(dims)?;
    }
    if fusable(x) {
        let rows = x.elem_count() / s.max(1);
        let op = MaskedSoftmax {
            scale: scale as f32,
            t,
            per_batch: match mask.as_ref().and_then(|m| m.rows_of(t)) {
                Some(b) => (rows / b.max(1)).max(1),
                None => rows.max(1),
            },
            mask,
        };
        return x.contiguous()?.apply_op1(op);
    }
    let mut scaled = (x * scale)?;
    if let Some(m) = mask {
        scaled = scaled.broadcast_add(&m.tensor(t, s, x.device())?.to_dtype(x.dtype())?)?;
    }
    softmax_plain(&scaled)
}

#[cfg(test)]
mod tests {
    use super::super::testing::agree;
    use super::*;
    use crate::config::AttentionWindow;
    use candle_core::Device;
    use candle_core::Var;
    use std::sync::Arc;

    #[test]
    fn fused_masked_softmax_matches_plain_forward_and_backward() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 3.0, (2, 3, 5, 9), &dev).unwrap()).unwrap();
        for mask in [
            None,
            Some(MaskSpec {
                q_start: 4,
                k_start: 0,
                window: AttentionWindow::Global,
                docs: None,
            }),
            Some(MaskSpec {
                q_start: 6,
                k_start: 2,
                window: AttentionWindow::Sliding(3),
                docs: None,
            }),
        ] {
            let fused = masked_softmax(x.as_tensor(), 0.7, mask.clone()).unwrap();
            let mut plain = (x.as_tensor() * 0.7).unwrap();
            if let Some(m) = &mask {
                plain = plain.broadcast_add(&m.tensor(5, 9, &dev).unwrap()).unwrap();
            }
            agree(&[&x], &fused, &softmax_plain(&plain).unwrap(), 1e-6, 1e-6);
        }
    }

    /// Issue 9: a long attention row held by a sink (the first key). Each other key's
    /// exp(-17) is under half an ulp of the sink's 1, so a running f32 sum dropped them
    /// all and every probability came out 3.4e-4 (relative) too high.
    #[test]
    fn a_long_row_after_an_attention_sink_keeps_its_small_terms() {
        let s = 8192;
        let mut row = vec![0f32; s];
        row[0] = 17.0;
        let x = Tensor::from_vec(row, (1, 1, 1, s), &Device::Cpu).unwrap();
        let mask = MaskSpec {
            q_start: s - 1,
            k_start: 0,
            window: AttentionWindow::Global,
            docs: None,
        };
        let p = masked_softmax(&x, 1.0, Some(mask)).unwrap();
        let p = p.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let p0 = 1.0 / (1.0 + (s - 1) as f64 * (-17f64).exp());
        let p1 = (-17f64).exp() * p0;
        assert!(
            ((p[0] as f64 - p0) / p0).abs() < 1e-6,
            "sink {} vs {p0}",
            p[0]
        );
        assert!(
            ((p[1] as f64 - p1) / p1).abs() < 1e-5,
            "other {} vs {p1}",
            p[1]
        );
    }

    /// Documents: the fused kernel and its plain twin agree, with and without a window,
    /// and a query sees exactly the keys of its own document up to itself.
    #[test]
    fn document_mask_is_block_diagonal_in_fused_and_plain() {
        let dev = Device::Cpu;
        let (b, h, t) = (2, 3, 6);
        // Row 0: documents at 0, 3, 5; row 1: one document, then one starting at 4.
        let docs: Arc<[u32]> = vec![0, 0, 0, 3, 3, 5, 0, 0, 0, 0, 4, 4].into();
        let x = Var::from_tensor(&Tensor::randn(0f32, 3.0, (b, h, t, t), &dev).unwrap()).unwrap();
        for window in [AttentionWindow::Global, AttentionWindow::Sliding(2)] {
            let mask = MaskSpec {
                q_start: 0,
                k_start: 0,
                window,
                docs: Some(docs.clone()),
            };
            let fused = masked_softmax(x.as_tensor(), 0.7, Some(mask.clone())).unwrap();
            let plain = (x.as_tensor() * 0.7)
                .unwrap()
                .broadcast_add(&mask.tensor(t, t, &dev).unwrap())
                .unwrap();
            agree(&[&x], &fused, &softmax_plain(&plain).unwrap(), 1e-6, 1e-6);
            let p = fused.reshape((b * h, t, t)).unwrap();
            let p = p.to_vec3::<f32>().unwrap();
            for (bh, rows) in p.iter().enumerate() {
                let r = bh / h;
                for (i, row) in rows.iter().enumerate() {
                    for (j, &v) in row.iter().enumerate() {
                        let start = docs[r * t + i] as usize;
                        let mut want = j <= i && j >= start;
                        if let AttentionWindow::Sliding(w) = window {
                            want &= j > i || i - j < w;
                        }
                        assert_eq!(v > 0.0, want, "row {r} head {} query {i} key {j}", bh % h);
                    }
                }
            }
        }
        // Documents that do not fit the scores are an error, not a wrong answer.
        let bad = MaskSpec {
            q_start: 0,
            k_start: 0,
            window: AttentionWindow::Global,
            docs: Some(vec![0u32; 5].into()),
        };
        assert!(masked_softmax(x.as_tensor(), 1.0, Some(bad)).is_err());
    }
}
