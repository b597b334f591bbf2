//! Rotary embedding of `(B, H, T, D)` heads, fused with its backward (the same
//! rotation by the opposite angle).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{fusable, rows};

struct Rope {
    /// `(T, rd/2)` each, or `(B, T, rd/2)` for per-token positions.
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// Rotated dimensions (the rest of the head passes through).
    rd: usize,
    t: usize,
    /// Per-token tables: rows (of `x`) per batch row, `H·T`; None when every batch row
    /// shares the `(T, rd/2)` tables.
    per_batch: Option<usize>,
    /// +1 forward, −1 for the backward rotation.
    sign: f32,
}

impl Rope {
    fn rotate(&self, x: &[f32], d: usize) -> Vec<f32> {
        let half = self.rd / 2;
        let mut y = x.to_vec();
        y.par_chunks_mut(d).enumerate().for_each(|(row, yr)| {
            // The table row of this (batch, head, position) row of x.
            let p = match self.per_batch {
                Some(n) => (row / n) * self.t + row % self.t,
                None => row % self.t,
            };
            let (c, s) = (
                &self.cos[p * half..(p + 1) * half],
                &self.sin[p * half..(p + 1) * half],
            );
            for i in 0..half {
                let (a, b) = (yr[i], yr[half + i]);
                let sn = self.sign * s[i];
                yr[i] = a * c[i] - b * sn;
                yr[half + i] = b * c[i] + a * sn;
            }
        });
        y
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "lc-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, d) = rows(self.name(), s, l)?;
        Ok((CpuStorage::F32(self.rotate(x, d)), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let back = Rope {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            rd: self.rd,
            t: self.t,
            per_batch: self.per_batch,
            sign: -self.sign,
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&back)?))
    }
}

/// Rotate the first `rd` dimensions of each head of `x: (B, H, T, D)` (`cos`, `sin`:
/// `(T, rd/2)`, or `(B, T, rd/2)` for per-token positions); fused on CPU f32, None
/// otherwise.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Option<Tensor>> {
    if !(fusable(x) && fusable(cos)) {
        return Ok(None);
    }
    let (b, h, _, _) = x.dims4()?;
    let (t, half, per_batch) = match cos.dims() {
        &[t, half] => (t, half, None),
        &[cb, t, half] if cb == b => (t, half, Some(h * t)),
        d => candle_core::bail!(
            "rotary tables of shape {d:?} for heads of shape {:?}",
            x.dims()
        ),
    };
    let op = Rope {
        cos: cos.flatten_all()?.to_vec1()?,
        sin: sin.flatten_all()?.to_vec1()?,
        rd: 2 * half,
        t,
        per_batch,
        sign: 1.0,
    };
    Ok(Some(x.contiguous()?.apply_op1(op)?))
}

#[cfg(test)]
mod tests {
    use super::super::testing::agree;
    use super::*;
    use crate::config::{RopeScaling, RotaryConfig};
    use crate::model::rope::RopeTables;
    use candle_core::{Device, Var};

    #[test]
    fn fused_rope_matches_plain_for_full_and_partial_rotation() {
        let dev = Device::Cpu;
        for rd in [8, 4] {
            let cfg = RotaryConfig {
                rotary_dims: rd,
                base: 100.0,
                scaling: RopeScaling::None,
            };
            let tables = RopeTables::new(&cfg, 3, 5, &dev).unwrap();
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &dev).unwrap()).unwrap();
            let fused = rope(x.as_tensor(), &tables.cos, &tables.sin)
                .unwrap()
                .unwrap();
            let plain = tables.apply_plain(x.as_tensor()).unwrap();
            agree(&[&x], &fused, &plain, 1e-6, 1e-6);
        }
    }

    /// Per-token positions (`(B, T)`, restarting inside a row) rotate each token by its
    /// own angle, in the fused kernel and its plain twin, and equal shared tables where
    /// the positions are the same.
    #[test]
    fn per_token_positions_match_plain_and_shared_tables() {
        let dev = Device::Cpu;
        let cfg = RotaryConfig {
            rotary_dims: 4,
            base: 100.0,
            scaling: RopeScaling::None,
        };
        let positions = [0, 1, 2, 0, 1, 3, 4, 5, 6, 7];
        let tables = RopeTables::at_positions(&cfg, &positions, 2, 5, &dev).unwrap();
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &dev).unwrap()).unwrap();
        let fused = rope(x.as_tensor(), &tables.cos, &tables.sin)
            .unwrap()
            .unwrap();
        agree(
            &[&x],
            &fused,
            &tables.apply_plain(x.as_tensor()).unwrap(),
            1e-6,
            1e-6,
        );
        // Row 1 holds positions 3..8: the shared tables from 3 rotate it the same.
        let shared = RopeTables::new(&cfg, 3, 5, &dev).unwrap();
        let row1 = x.as_tensor().narrow(0, 1, 1).unwrap();
        let want = rope(&row1, &shared.cos, &shared.sin).unwrap().unwrap();
        super::super::testing::close(&fused.narrow(0, 1, 1).unwrap(), &want, 1e-7);
        // Row 0 restarts at its 4th token: that token turns like the first.
        let t0 = fused.narrow(0, 0, 1).unwrap().narrow(2, 0, 1).unwrap();
        let t3 = fused.narrow(0, 0, 1).unwrap().narrow(2, 3, 1).unwrap();
        let x0 = x
            .as_tensor()
            .narrow(0, 0, 1)
            .unwrap()
            .narrow(2, 0, 1)
            .unwrap();
        let x3 = x
            .as_tensor()
            .narrow(0, 0, 1)
            .unwrap()
            .narrow(2, 3, 1)
            .unwrap();
        // Position 0 is the identity.
        super::super::testing::close(&t0, &x0, 1e-7);
        super::super::testing::close(&t3, &x3, 1e-7);
    }
}
