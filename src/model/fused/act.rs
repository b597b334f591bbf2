//! MLP activations and their derivatives in one parallel pass (CPU f32).
//!
//! ```text
//! plain   h = act(x)                 dx = dh ⊙ act'(x)
//! gated   h = act(g) ⊙ u             dg = dh ⊙ u ⊙ act'(g),  du = dh ⊙ act(g)
//! ```
//!
//! The values are computed as candle's unary ops compute them (same formulas, same
//! `erf`), so a forward here equals `Tensor::silu` / `gelu` / `gelu_erf` / `relu`.

use candle_core::{Result, Storage, Tensor};
use rayon::prelude::*;

use super::fusable;
use crate::config::Activation;

const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;
const INV_SQRT_TWO_PI: f32 = 0.398_942_3;

fn value(a: Activation, x: f32) -> f32 {
    match a {
        Activation::Silu => x / (1.0 + (-x).exp()),
        Activation::GeluErf => {
            (candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5 * x
        }
        Activation::GeluTanh => {
            0.5 * x * (1.0 + (SQRT_TWO_OVER_PI * x * (1.0 + 0.044715 * x * x)).tanh())
        }
        Activation::Relu => x.max(0.0),
    }
}

/// `act(x)` and `act'(x)`.
fn value_and_slope(a: Activation, x: f32) -> (f32, f32) {
    match a {
        Activation::Silu => {
            let s = 1.0 / (1.0 + (-x).exp());
            (x * s, s * (1.0 + x * (1.0 - s)))
        }
        Activation::GeluErf => {
            let cdf =
                (candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5;
            (x * cdf, cdf + x * INV_SQRT_TWO_PI * (-0.5 * x * x).exp())
        }
        Activation::GeluTanh => {
            let inner = SQRT_TWO_OVER_PI * x * (1.0 + 0.044715 * x * x);
            let t = inner.tanh();
            let d_inner = SQRT_TWO_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x);
            (
                0.5 * x * (1.0 + t),
                0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * d_inner,
            )
        }
        Activation::Relu => {
            if x > 0.0 {
                (x, 1.0)
            } else {
                (0.0, 0.0)
            }
        }
    }
}

/// Contiguous f32 values of `t` on the CPU, for the duration of `f`.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    if !fusable(t) || !t.is_contiguous() {
        return None;
    }
    let (st, l) = t.storage_and_layout();
    let (a, e) = l.contiguous_offsets()?;
    match &*st {
        Storage::Cpu(candle_core::CpuStorage::F32(v)) => Some(f(&v[a..e])),
        _ => None,
    }
}

const CHUNK: usize = 4096;

/// `act(x)`; None when the fused path does not apply.
pub fn act_forward(x: &Tensor, a: Activation) -> Result<Option<Tensor>> {
    let Some(y) = with_f32(x, |x| {
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(y, x)| y.iter_mut().zip(x).for_each(|(o, &v)| *o = value(a, v)));
        y
    }) else {
        return Ok(None);
    };
    Ok(Some(Tensor::from_vec(y, x.shape(), x.device())?))
}

/// `dh ⊙ act'(x)`; None when the fused path does not apply.
pub fn act_backward(x: &Tensor, dh: &Tensor, a: Activation) -> Result<Option<Tensor>> {
    let out = with_f32(x, |x| {
        with_f32(dh, |dh| {
            let mut dx = vec![0f32; x.len()];
            dx.par_chunks_mut(CHUNK)
                .zip(x.par_chunks(CHUNK).zip(dh.par_chunks(CHUNK)))
                .for_each(|(d, (x, g))| {
                    for ((o, &v), &gv) in d.iter_mut().zip(x).zip(g) {
                        *o = gv * value_and_slope(a, v).1;
                    }
                });
            dx
        })
    });
    match out {
        Some(Some(dx)) if x.dims() == dh.dims() => {
            Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
        }
        _ => Ok(None),
    }
}

/// `act(g) ⊙ u`; None when the fused path does not apply.
pub fn gated_forward(g: &Tensor, u: &Tensor, a: Activation) -> Result<Option<Tensor>> {
    let out = with_f32(g, |g| {
        with_f32(u, |u| {
            let mut h = vec![0f32; g.len()];
            h.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
                .for_each(|(h, (g, u))| {
                    for ((o, &gv), &uv) in h.iter_mut().zip(g).zip(u) {
                        *o = value(a, gv) * uv;
                    }
                });
            h
        })
    });
    match out {
        Some(Some(h)) if g.dims() == u.dims() => {
            Ok(Some(Tensor::from_vec(h, g.shape(), g.device())?))
        }
        _ => Ok(None),
    }
}

/// `(dg, du)` of `act(g) ⊙ u` for the output gradient `dh`; None when the fused path
/// does not apply.
pub fn gated_backward(
    g: &Tensor,
    u: &Tensor,
    dh: &Tensor,
    a: Activation,
) -> Result<Option<(Tensor, Tensor)>> {
    if g.dims() != u.dims() || g.dims() != dh.dims() {
        return Ok(None);
    }
    let out = with_f32(g, |g| {
        with_f32(u, |u| {
            with_f32(dh, |dh| {
                let mut dg = vec![0f32; g.len()];
                let mut du = vec![0f32; g.len()];
                dg.par_chunks_mut(CHUNK)
                    .zip(du.par_chunks_mut(CHUNK))
                    .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
                    .zip(dh.par_chunks(CHUNK))
                    .for_each(|(((dg, du), (g, u)), dh)| {
                        for i in 0..g.len() {
                            let (y, s) = value_and_slope(a, g[i]);
                            dg[i] = dh[i] * u[i] * s;
                            du[i] = dh[i] * y;
                        }
                    });
                (dg, du)
            })
        })
    });
    match out {
        Some(Some(Some((dg, du)))) => Ok(Some((
            Tensor::from_vec(dg, g.shape(), g.device())?,
            Tensor::from_vec(du, g.shape(), g.device())?,
        ))),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::mlp::activate;
    use candle_core::{Device, Var};

    const ALL: [Activation; 4] = [
        Activation::Silu,
        Activation::GeluErf,
        Activation::GeluTanh,
        Activation::Relu,
    ];

    /// Values equal candle's unary ops (to an ulp or two at |x| ≈ 8); derivatives equal
    /// candle's autograd.
    #[test]
    fn fused_activations_match_candle_values_and_gradients() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (37, 53), &dev).unwrap()).unwrap();
        let u = Tensor::randn(0f32, 1.0, (37, 53), &dev).unwrap();
        let dh = Tensor::randn(0f32, 1.0, (37, 53), &dev).unwrap();
        let xt = x.as_tensor().detach();
        for a in ALL {
            let want = activate(x.as_tensor(), a).unwrap();
            let got = act_forward(&xt, a).unwrap().unwrap();
            crate::model::fused::testing::close(&got, &want, 1e-5);
            let g = (&want * &dh)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let want_dx = g.get(x.as_tensor()).unwrap();
            let got_dx = act_backward(&xt, &dh, a).unwrap().unwrap();
            crate::model::fused::testing::close(&got_dx, want_dx, 1e-5);

            let gated = (activate(x.as_tensor(), a).unwrap() * &u).unwrap();
            let got = gated_forward(&xt, &u, a).unwrap().unwrap();
            crate::model::fused::testing::close(&got, &gated, 1e-5);
            let g = (&gated * &dh)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let (dg, du) = gated_backward(&xt, &u, &dh, a).unwrap().unwrap();
            crate::model::fused::testing::close(&dg, g.get(x.as_tensor()).unwrap(), 1e-5);
            let want_du = (activate(&xt, a).unwrap() * &dh).unwrap();
            crate::model::fused::testing::close(&du, &want_du, 1e-5);
        }
    }
}
