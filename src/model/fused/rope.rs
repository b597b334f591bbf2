//! Rotary embedding of `(B, H, T, D)` heads, fused with its backward (the same
//! rotation by the opposite angle).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{fusable, rows};

struct Rope {
    /// `(T, rd/2)` each.
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// Rotated dimensions (the rest of the head passes through).
    rd: usize,
    t: usize,
    /// +1 forward, −1 for the backward rotation.
    sign: f32,
}

impl Rope {
    fn rotate(&self, x: &[f32], d: usize) -> Vec<f32> {
        let half = self.rd / 2;
        let mut y = x.to_vec();
        y.par_chunks_mut(d).enumerate().for_each(|(row, yr)| {
            let p = row % self.t;
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
            sign: -self.sign,
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&back)?))
    }
}

/// Rotate the first `cos.dim(1) * 2` dimensions of each head of `x: (B, H, T, D)`
/// (`cos`, `sin`: `(T, rd/2)`); fused on CPU f32, None otherwise.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Option<Tensor>> {
    if !(fusable(x) && fusable(cos)) {
        return Ok(None);
    }
    let (t, half) = cos.dims2()?;
    let op = Rope {
        cos: cos.flatten_all()?.to_vec1()?,
        sin: sin.flatten_all()?.to_vec1()?,
        rd: 2 * half,
        t,
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
}
