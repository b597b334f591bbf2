//! AdamW with PyTorch's semantics, and global-norm gradient clipping.
//!
//! For each parameter `p` with gradient `g`, at step `t` (1-based):
//!
//! ```text
//! p ← p · (1 − lr·wd)                      decoupled weight decay, every parameter
//! m ← β₁m + (1 − β₁)g
//! v ← β₂v + (1 − β₂)g²
//! p ← p − (lr / (1 − β₁ᵗ)) · m / (√v / √(1 − β₂ᵗ) + ε)
//! ```
//!
//! State (`m`, `v`, `t`) is kept per named variable so it can be saved and restored
//! exactly.

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::model::fused;

/// AdamW hyper-parameters (the learning rate comes with each step).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

/// AdamW over named variables.
pub struct AdamW {
    pub cfg: AdamWConfig,
    vars: Vec<(String, Var)>,
    /// First and second moments, in the variables' dtype.
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Steps taken.
    pub t: u64,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let m = vars
            .iter()
            .map(|(_, v)| v.as_tensor().zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        // Separate buffers: the update writes both in place.
        let v = vars
            .iter()
            .map(|(_, v)| v.as_tensor().zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(AdamW {
            cfg,
            vars,
            m,
            v,
            t: 0,
        })
    }

    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// One update with gradients `grads` (same order as the variables).
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.step_scaled(grads, lr, 1.0)
    }

    /// One update with gradients `grad_scale · grads` (clipping folded into the pass).
    pub fn step_scaled(&mut self, grads: &[Tensor], lr: f64, grad_scale: f64) -> Result<()> {
        if grads.len() != self.vars.len() {
            return Err(Error::Msg(format!(
                "optimizer got {} gradients for {} variables",
                grads.len(),
                self.vars.len()
            )));
        }
        self.t += 1;
        let mut h = self.cfg.at_step(self.t, lr);
        h.grad_scale = grad_scale;
        for (i, ((_, var), g)) in self.vars.iter().zip(grads).enumerate() {
            let p = var.as_tensor();
            let g = g.to_dtype(p.dtype())?;
            if let Some(new) = update(p, &g, &mut self.m[i], &mut self.v[i], &h)? {
                var.set(&new)?;
            }
        }
        Ok(())
    }

    /// State to save: `exp_avg.<name>` and `exp_avg_sq.<name>` tensors. They share
    /// storage with the optimizer, which the next step updates in place: write them
    /// out before that.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.vars.len());
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.push((format!("exp_avg.{name}"), self.m[i].clone()));
            out.push((format!("exp_avg_sq.{name}"), self.v[i].clone()));
        }
        out
    }

    /// Restore moments saved by [`AdamW::state_tensors`] and the step count `t`.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, t: u64) -> Result<()> {
        for (i, (name, var)) in self.vars.iter().enumerate() {
            let get = |k: String| -> Result<Tensor> {
                Ok(saved_moment(tensors, &k, var)?.to_dtype(var.dtype())?)
            };
            self.m[i] = get(format!("exp_avg.{name}"))?;
            self.v[i] = get(format!("exp_avg_sq.{name}"))?;
        }
        self.t = t;
        Ok(())
    }
}

impl AdamWConfig {
    /// The constants of step `t` (1-based) at learning rate `lr`.
    pub fn at_step(&self, t: u64, lr: f64) -> StepConstants {
        StepConstants {
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            lr,
            weight_decay: self.weight_decay,
            step_size: lr / (1.0 - self.beta1.powi(t as i32)),
            bc2_sqrt: (1.0 - self.beta2.powi(t as i32)).sqrt(),
            grad_scale: 1.0,
        }
    }
}

/// What one AdamW step needs besides the tensors.
#[derive(Debug, Clone, Copy)]
pub struct StepConstants {
    beta1: f64,
    beta2: f64,
    eps: f64,
    lr: f64,
    weight_decay: f64,
    /// `lr / (1 − β₁ᵗ)`
    step_size: f64,
    /// `√(1 − β₂ᵗ)`
    bc2_sqrt: f64,
    /// Factor on every gradient (gradient clipping's coefficient).
    pub grad_scale: f64,
}

/// One AdamW update of the parameter `p` with gradient `g` (same dtype) and moments
/// `m`, `v` (updated). An f32 CPU parameter is updated in place by one fused,
/// parallel pass (None is returned); otherwise the new parameter is returned.
/// [`ShardedAdamW`](super::sharded_adamw::ShardedAdamW) calls it on its shard of the
/// flat parameters.
pub fn update(
    p: &Tensor,
    g: &Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
    h: &StepConstants,
) -> Result<Option<Tensor>> {
    let cpu = [p, &*m, &*v]
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous());
    if cpu && g.dtype() == DType::F32 && p.elem_count() == g.elem_count() {
        let g = g.contiguous()?;
        let (b1, b2) = (h.beta1 as f32, h.beta2 as f32);
        let (decay, step, bc2, eps, gs) = (
            (1.0 - h.lr * h.weight_decay) as f32,
            h.step_size as f32,
            h.bc2_sqrt as f32,
            h.eps as f32,
            h.grad_scale as f32,
        );
        // p, m and v updated in place, in one parallel pass (no copies).
        let done = fused::with_values(&g, |g| {
            fused::with_values_mut(p, |p| {
                let inner = fused::with_values_mut(m, |m| {
                    let innermost = fused::with_values_mut(v, |v| {
                        const CHUNK: usize = 1 << 14;
                        p.par_chunks_mut(CHUNK)
                            .zip(g.par_chunks(CHUNK))
                            .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
                            .for_each(|((p, g), (m, v))| {
                                for i in 0..p.len() {
                                    let gi = g[i] * gs;
                                    m[i] = b1 * m[i] + (1.0 - b1) * gi;
                                    v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
                                    let denom = v[i].sqrt() / bc2 + eps;
                                    p[i] = p[i] * decay - step * (m[i] / denom);
                                }
                            });
                        Ok(())
                    })?;
                    check(innermost)
                })?;
                check(inner)
            })
        })
        .transpose()?;
        if done == Some(true) {
            return Ok(None);
        }
    }
    let g = if h.grad_scale != 1.0 {
        (g * h.grad_scale)?
    } else {
        g.clone()
    };
    let new_m = ((&*m * h.beta1)? + (&g * (1.0 - h.beta1))?)?;
    let new_v = ((&*v * h.beta2)? + (g.sqr()? * (1.0 - h.beta2))?)?;
    let decayed = if h.weight_decay != 0.0 {
        (p * (1.0 - h.lr * h.weight_decay))?
    } else {
        p.clone()
    };
    let denom = ((new_v.sqrt()? / h.bc2_sqrt)? + h.eps)?;
    let step = (new_m.div(&denom)? * h.step_size)?;
    *m = new_m;
    *v = new_v;
    Ok(Some((decayed - step)?))
}

/// A nested in-place pass ran (the tensors were checked before).
fn check(ran: bool) -> candle_core::Result<()> {
    if ran {
        Ok(())
    } else {
        Err(candle_core::Error::Msg(
            "adamw: moments are not contiguous f32 CPU tensors".into(),
        ))
    }
}

/// Global L2 norm of `grads` (squares summed in f64 on CPU f32, else in f32).
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut total = 0f64;
    for g in grads {
        if let Some(s) = fused::sum_squares(&g.contiguous()?) {
            total += s;
            continue;
        }
        total += g
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()? as f64;
    }
    Ok(total.sqrt())
}

/// Whether every value of `t` is finite (neither NaN nor infinite), without squaring
/// anything that could overflow: `0 · t` is 0 exactly where `t` is finite.
pub fn all_finite(t: &Tensor) -> Result<bool> {
    let zeros = (t.to_dtype(DType::F32)? * 0.0)?;
    Ok(zeros.sum_all()?.to_scalar::<f32>()? == 0.0)
}

/// The factor that brings gradients of global norm `norm` down to `max_norm`, when
/// they are above it (PyTorch's `clip_grad_norm_`: `max_norm / (norm + 1e-6)` when
/// that is below 1); None without clipping (`max_norm` None) or when none is needed.
/// Both optimizers fold it into the update instead of scaling the gradients first.
pub fn clip_coefficient(norm: f64, max_norm: Option<f64>) -> Option<f64> {
    max_norm.map(|max| max / (norm + 1e-6)).filter(|&c| c < 1.0)
}

/// The saved moment `key` of `var` (from [`AdamW::state_tensors`]), checked against the
/// parameter's shape and moved to its device.
pub(crate) fn saved_moment(
    tensors: &HashMap<String, Tensor>,
    key: &str,
    var: &candle_core::Var,
) -> Result<Tensor> {
    let x = tensors.get(key).ok_or_else(|| {
        Error::Msg(format!(
            "optimizer state has no {key}; was the checkpoint written by another run?"
        ))
    })?;
    if x.dims() != var.dims() {
        return Err(Error::Msg(format!(
            "optimizer state {key} has shape {:?}, the parameter {:?}",
            x.dims(),
            var.dims()
        )));
    }
    Ok(x.to_device(var.device())?)
}
