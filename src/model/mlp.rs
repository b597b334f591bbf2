//! The feed-forward block.
//!
//! ```text
//! Plain:  proj(act(fc(x)))            (GPT-2, GPT-NeoX, GPT-Neo, Falcon)
//! Gated:  down(act(gate(x)) ⊙ up(x))  (LLaMA, Mistral: SwiGLU)
//! ```
//!
//! Its computation is the engine's ([`super::engine`]); [`activate`] is the plain twin
//! of the fused activation kernels.

use candle_core::{Result, Tensor};

use super::linear::Linear;
use crate::config::Activation;

#[derive(Debug, Clone)]
pub struct Mlp {
    /// `fc` / `up_proj` / `dense_h_to_4h`: hidden → intermediate.
    pub up: Linear,
    /// `gate_proj` for gated MLPs.
    pub gate: Option<Linear>,
    /// `c_proj` / `down_proj` / `dense_4h_to_h`: intermediate → hidden.
    pub down: Linear,
    pub activation: Activation,
}

impl Mlp {
    pub fn linears(&self) -> Vec<&Linear> {
        let mut v = vec![&self.up];
        v.extend(self.gate.as_ref());
        v.push(&self.down);
        v
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut v = vec![&mut self.up];
        v.extend(self.gate.as_mut());
        v.push(&mut self.down);
        v
    }
}

/// Apply an activation; every variant has a backward pass in candle.
pub fn activate(x: &Tensor, a: Activation) -> Result<Tensor> {
    match a {
        Activation::Silu => x.silu(),
        Activation::GeluErf => x.gelu_erf(),
        Activation::GeluTanh => x.gelu(),
        Activation::Relu => x.relu(),
    }
}
