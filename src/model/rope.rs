//! Rotary position embeddings, differentiable.
//!
//! For a head vector split as `x = [x₁ | x₂ | pass]` (`x₁`, `x₂` of `rotary_dims/2`
//! each, `pass` untouched), position `p` rotates each pair by the angle `p·θᵢ`:
//!
//! ```text
//! x₁' = x₁ cos − x₂ sin        x₂' = x₂ cos + x₁ sin        θᵢ = base^(−2i/rotary_dims)
//! ```
//!
//! This is the "rotate half" convention of every Hugging Face family we read. candle's
//! `rotary_emb::rope*` kernels have no backward: ours is a fused kernel with one on CPU
//! f32 ([`super::fused`]), else `narrow`, `mul` and `cat`.

use candle_core::{Device, Result, Tensor};

use crate::config::{RopeScaling, RotaryConfig};

/// Inverse frequencies `θᵢ`, `rotary_dims / 2` of them, with any scaling applied.
pub fn inv_freq(cfg: &RotaryConfig) -> Vec<f64> {
    let d = cfg.rotary_dims;
    let base: Vec<f64> = (0..d / 2)
        .map(|i| 1.0 / cfg.base.powf((2 * i) as f64 / d as f64))
        .collect();
    match &cfg.scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let old = *original_max_position_embeddings as f64;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// Cosines and sines, each `(seq, rotary_dims / 2)` for a run of positions shared by
/// every batch row, or `(batch, seq, rotary_dims / 2)` for per-token positions (packed
/// samples, where positions restart at each document).
#[derive(Debug, Clone)]
pub struct RopeTables {
    pub cos: Tensor,
    pub sin: Tensor,
    pub rotary_dims: usize,
}

impl RopeTables {
    /// Tables for positions `start .. start + len`, computed in f32 like PyTorch does.
    pub fn new(cfg: &RotaryConfig, start: usize, len: usize, device: &Device) -> Result<Self> {
        let positions: Vec<usize> = (start..start + len).collect();
        let (cos, sin) = Self::angles(cfg, &positions);
        let half = cfg.rotary_dims / 2;
        Ok(RopeTables {
            cos: Tensor::from_vec(cos, (len, half), device)?,
            sin: Tensor::from_vec(sin, (len, half), device)?,
            rotary_dims: cfg.rotary_dims,
        })
    }

    /// Tables for per-token positions: `positions[b * seq + i]` is the position of token
    /// `i` of batch row `b`; the tables are `(batch, seq, rotary_dims / 2)`.
    pub fn at_positions(
        cfg: &RotaryConfig,
        positions: &[usize],
        batch: usize,
        seq: usize,
        device: &Device,
    ) -> Result<Self> {
        if positions.len() != batch * seq {
            candle_core::bail!(
                "rotary tables: {} positions for {batch} rows of {seq} tokens",
                positions.len()
            );
        }
        let (cos, sin) = Self::angles(cfg, positions);
        let half = cfg.rotary_dims / 2;
        Ok(RopeTables {
            cos: Tensor::from_vec(cos, (batch, seq, half), device)?,
            sin: Tensor::from_vec(sin, (batch, seq, half), device)?,
            rotary_dims: cfg.rotary_dims,
        })
    }

    /// `cos(p·θᵢ)` and `sin(p·θᵢ)` for each position `p` in turn, `rotary_dims / 2` each.
    fn angles(cfg: &RotaryConfig, positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let freqs = inv_freq(cfg);
        let n = positions.len() * freqs.len();
        let (mut cos, mut sin) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for &p in positions {
            for f in &freqs {
                // f32 product, as transformers computes `positions.float() @ inv_freq.float()`.
                let angle = (p as f32) * (*f as f32);
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        (cos, sin)
    }

    /// Rotate `x`: `(batch, heads, seq, head_dim)`; the tables must cover `seq` positions
    /// (of each of the `batch` rows, for per-token tables).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        match super::fused::rope(x, &self.cos, &self.sin)? {
            Some(y) => Ok(y),
            None => self.apply_plain(x),
        }
    }

    /// The same from differentiable tensor ops (any device and dtype).
    pub fn apply_plain(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, _, head_dim) = x.dims4()?;
        let rd = self.rotary_dims;
        let half = rd / 2;
        let (mut cos, mut sin) = (self.cos.to_dtype(x.dtype())?, self.sin.to_dtype(x.dtype())?);
        if cos.rank() == 3 {
            // (B, T, rd/2) → (B, 1, T, rd/2): the same angles for every head.
            cos = cos.unsqueeze(1)?;
            sin = sin.unsqueeze(1)?;
        }
        let x1 = x.narrow(3, 0, half)?;
        let x2 = x.narrow(3, half, half)?;
        let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
        let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
        if rd == head_dim {
            Tensor::cat(&[r1, r2], 3)
        } else {
            let pass = x.narrow(3, rd, head_dim - rd)?;
            Tensor::cat(&[r1, r2, pass], 3)
        }
    }
}
