//! MLP activations and their derivatives in one parallel pass (CPU f32).
//!
//! ```text
//! plain   h = act(x)                 dx = dh ⊙ act'(x)
//! gated   h = act(g) ⊙ u             dg = dh ⊙ u ⊙ act'(g),  du = dh ⊙ act(g)
//! ```
//!
//! The values follow candle's unary ops (same formulas, same `erf`), with the
//! exponential of [`super::exp_approx`] (within ~2 ulp; it vectorises, libm's does
//! not), so a forward here equals `Tensor::silu` / `gelu` / `gelu_erf` / `relu` to
//! an ulp or two.

use std::mem::MaybeUninit;

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::{exp_approx, fusable, vectorized};
use crate::config::Activation;

const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;
const INV_SQRT_TWO_PI: f32 = 0.398_942_3;

/// One activation, as a type: the kernels below are compiled once per activation, so
/// their loops have no branch on it and vectorise.
trait Act {
    fn value(x: f32) -> f32;
    /// `act(x)` and `act'(x)`.
    fn value_and_slope(x: f32) -> (f32, f32);
}

struct Silu;
struct GeluErf;
struct GeluTanh;
struct Relu;

impl Act for Silu {
    #[inline(always)]
    fn value(x: f32) -> f32 {
        x / (1.0 + exp_approx(-x))
    }
    #[inline(always)]
    fn value_and_slope(x: f32) -> (f32, f32) {
        let s = 1.0 / (1.0 + exp_approx(-x));
        (x * s, s * (1.0 + x * (1.0 - s)))
    }
}

impl Act for GeluErf {
    #[inline(always)]
    fn value(x: f32) -> f32 {
        (candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5 * x
    }
    #[inline(always)]
    fn value_and_slope(x: f32) -> (f32, f32) {
        let cdf = (candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5;
        (
            x * cdf,
            cdf + x * INV_SQRT_TWO_PI * exp_approx(-0.5 * x * x),
        )
    }
}

impl Act for GeluTanh {
    #[inline(always)]
    fn value(x: f32) -> f32 {
        0.5 * x * (1.0 + (SQRT_TWO_OVER_PI * x * (1.0 + 0.044715 * x * x)).tanh())
    }
    #[inline(always)]
    fn value_and_slope(x: f32) -> (f32, f32) {
        let inner = SQRT_TWO_OVER_PI * x * (1.0 + 0.044715 * x * x);
        let t = inner.tanh();
        let d_inner = SQRT_TWO_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x);
        (
            0.5 * x * (1.0 + t),
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * d_inner,
        )
    }
}

impl Act for Relu {
    #[inline(always)]
    fn value(x: f32) -> f32 {
        x.max(0.0)
    }
    #[inline(always)]
    fn value_and_slope(x: f32) -> (f32, f32) {
        (x.max(0.0), if x > 0.0 { 1.0 } else { 0.0 })
    }
}

/// Call `$f::<A>($args)` for the type `A` of activation `$a`.
macro_rules! dispatch {
    ($a:expr, $f:ident($($args:expr),*)) => {
        match $a {
            Activation::Silu => $f::<Silu>($($args),*),
            Activation::GeluErf => $f::<GeluErf>($($args),*),
            Activation::GeluTanh => $f::<GeluTanh>($($args),*),
            Activation::Relu => $f::<Relu>($($args),*),
        }
    };
}

// The kernels write their outputs into memory not yet initialised (see `filled`): each
// writes every element of its output chunk, whose length equals its inputs'.

fn forward_chunk<A: Act>(y: &mut [MaybeUninit<f32>], x: &[f32]) {
    vectorized(|| {
        y.iter_mut().zip(x).for_each(|(o, &v)| {
            o.write(A::value(v));
        })
    })
}

fn backward_chunk<A: Act>(d: &mut [MaybeUninit<f32>], x: &[f32], g: &[f32]) {
    vectorized(|| {
        for ((o, &v), &gv) in d.iter_mut().zip(x).zip(g) {
            o.write(gv * A::value_and_slope(v).1);
        }
    })
}

fn gated_chunk<A: Act>(h: &mut [MaybeUninit<f32>], g: &[f32], u: &[f32]) {
    vectorized(|| {
        for ((o, &gv), &uv) in h.iter_mut().zip(g).zip(u) {
            o.write(A::value(gv) * uv);
        }
    })
}

fn gated_backward_chunk<A: Act>(
    dg: &mut [MaybeUninit<f32>],
    du: &mut [MaybeUninit<f32>],
    g: &[f32],
    u: &[f32],
    dh: &[f32],
) {
    vectorized(|| {
        let n = g
            .len()
            .min(u.len())
            .min(dh.len())
            .min(dg.len())
            .min(du.len());
        for i in 0..n {
            let (y, s) = A::value_and_slope(g[i]);
            dg[i].write(dh[i] * u[i] * s);
            du[i].write(dh[i] * y);
        }
    })
}

/// Contiguous f32 values of `t` on the CPU when the fused kernels apply, for `f`.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    if !fusable(t) || !t.is_contiguous() {
        return None;
    }
    super::with_values(t, f)
}

const CHUNK: usize = 4096;

/// `len` values, chunk `i` of [`CHUNK`] written by `fill(i, chunk)`, in parallel. The
/// buffer is not zeroed first: that would be a pass over the output for nothing, in
/// memory the allocator hands back already used.
///
/// # Safety
///
/// `fill` must write every element of the chunk it is given.
unsafe fn filled(len: usize, fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    v.spare_capacity_mut()[..len]
        .par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(i, c)| fill(i, c));
    // SAFETY: the chunks cover the first `len` elements, and `fill` wrote all of them.
    unsafe { v.set_len(len) };
    v
}

/// The `i`-th chunk of `x` as [`filled`] cuts its output: `len` values from `i · CHUNK`.
fn chunk(x: &[f32], i: usize, len: usize) -> &[f32] {
    &x[i * CHUNK..i * CHUNK + len]
}

/// `act(x)`; None when the fused path does not apply.
pub fn act_forward(x: &Tensor, a: Activation) -> Result<Option<Tensor>> {
    let Some(y) = with_f32(x, |x| {
        // SAFETY: forward_chunk writes all of y, as long as its input chunk.
        unsafe {
            filled(x.len(), |i, y| {
                dispatch!(a, forward_chunk(y, chunk(x, i, y.len())))
            })
        }
    }) else {
        return Ok(None);
    };
    Ok(Some(Tensor::from_vec(y, x.shape(), x.device())?))
}

/// `dh ⊙ act'(x)`; None when the fused path does not apply.
pub fn act_backward(x: &Tensor, dh: &Tensor, a: Activation) -> Result<Option<Tensor>> {
    let out = with_f32(x, |x| {
        with_f32(dh, |dh| {
            if x.len() != dh.len() {
                return None;
            }
            // SAFETY: backward_chunk writes all of d, as long as its input chunks.
            Some(unsafe {
                filled(x.len(), |i, d| {
                    let n = d.len();
                    dispatch!(a, backward_chunk(d, chunk(x, i, n), chunk(dh, i, n)))
                })
            })
        })
    });
    match out {
        Some(Some(Some(dx))) if x.dims() == dh.dims() => {
            Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
        }
        _ => Ok(None),
    }
}

/// `act(g) ⊙ u`; None when the fused path does not apply.
pub fn gated_forward(g: &Tensor, u: &Tensor, a: Activation) -> Result<Option<Tensor>> {
    let out = with_f32(g, |g| {
        with_f32(u, |u| {
            if g.len() != u.len() {
                return None;
            }
            // SAFETY: gated_chunk writes all of h, as long as its input chunks.
            Some(unsafe {
                filled(g.len(), |i, h| {
                    let n = h.len();
                    dispatch!(a, gated_chunk(h, chunk(g, i, n), chunk(u, i, n)))
                })
            })
        })
    });
    match out {
        Some(Some(Some(h))) if g.dims() == u.dims() => {
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
                let n = g.len();
                if u.len() != n || dh.len() != n {
                    return None;
                }
                // Not zeroed, as in `filled`.
                let mut dg = Vec::with_capacity(n);
                let mut du = Vec::with_capacity(n);
                dg.spare_capacity_mut()[..n]
                    .par_chunks_mut(CHUNK)
                    .zip(du.spare_capacity_mut()[..n].par_chunks_mut(CHUNK))
                    .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
                    .zip(dh.par_chunks(CHUNK))
                    .for_each(|(((dg, du), (g, u)), dh)| {
                        dispatch!(a, gated_backward_chunk(dg, du, g, u, dh))
                    });
                // SAFETY: the chunks cover the first n elements of dg and du, and
                // gated_backward_chunk writes all of both (all five chunks are as long).
                unsafe {
                    dg.set_len(n);
                    du.set_len(n);
                }
                Some((dg, du))
            })
        })
    });
    match out {
        Some(Some(Some(Some((dg, du))))) => Ok(Some((
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
