//! RMSNorm and LayerNorm written with differentiable tensor ops.
//!
//! candle's fused `ops::rms_norm` / `ops::layer_norm` have no backward pass, so these
//! are our own: a fused kernel with its backward for f32 on the CPU
//! ([`super::fused`]), else composed from `sqr`, `mean`, `sqrt` and friends. Statistics
//! are computed in f32 whatever the activation dtype, as transformers does.

use candle_core::{D, DType, Result, Tensor};

use crate::config::NormKind;

/// A normalisation layer over the last dimension.
#[derive(Debug, Clone)]
pub struct Norm {
    /// Hugging Face module path.
    pub name: String,
    pub kind: NormKind,
    /// Scale, shape `(hidden)`.
    pub weight: Tensor,
    /// Shift, shape `(hidden)`; LayerNorm only.
    pub bias: Option<Tensor>,
    pub eps: f64,
}

impl Norm {
    /// `weight`, then `bias` when there is one.
    pub fn params_mut(&mut self) -> Vec<&mut Tensor> {
        let mut v = vec![&mut self.weight];
        v.extend(self.bias.as_mut());
        v
    }

    pub fn new(
        name: String,
        kind: NormKind,
        weight: Tensor,
        bias: Option<Tensor>,
        eps: f64,
    ) -> Self {
        Norm {
            name,
            kind,
            weight,
            bias,
            eps,
        }
    }

    /// `x`: `(..., hidden)` → same shape and dtype, from differentiable tensor ops (any
    /// device and dtype): the fused kernels' twin.
    pub fn forward_plain(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x32 = x.to_dtype(DType::F32)?;
        let normed = match self.kind {
            // x / sqrt(mean(x²) + eps)
            NormKind::RmsNorm => {
                let ms = x32.sqr()?.mean_keepdim(D::Minus1)?;
                x32.broadcast_div(&(ms + self.eps)?.sqrt()?)?
            }
            // (x - mean) / sqrt(var + eps), biased variance
            NormKind::LayerNorm => {
                let mean = x32.mean_keepdim(D::Minus1)?;
                let centered = x32.broadcast_sub(&mean)?;
                let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
                centered.broadcast_div(&(var + self.eps)?.sqrt()?)?
            }
        };
        let normed = normed.to_dtype(dtype)?;
        let y = normed.broadcast_mul(&self.weight.to_dtype(dtype)?)?;
        match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(dtype)?),
            None => Ok(y),
        }
    }
}
