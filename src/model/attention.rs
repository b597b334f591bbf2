//! A causal self-attention layer's weights and shape: grouped/multi-query heads,
//! windows, and the layouts of the query/key/value projection checkpoints store.
//!
//! Shapes: `B` batch, `T` tokens, `nh` query heads, `nkv` key/value heads,
//! `g = nh / nkv` queries per key/value head, `hs` head size.
//!
//! Its computation is the engine's ([`super::engine`]): the projection split here
//! ([`Attention::split_qkv`]), rotary positions, then the flash kernel (CPU f32; CUDA with
//! heads up to 128 wide) or the plain attention ([`super::fused::attention_plain`]),
//! neither of which copies grouped heads.

use candle_core::{Result, Tensor};

use super::linear::Linear;
use crate::config::{AttentionWindow, Config, QkvLayout};

/// The query/key/value projection, as the checkpoint stores it.
#[derive(Debug, Clone)]
pub enum QkvProj {
    /// `q_proj`, `k_proj`, `v_proj`.
    Separate { q: Linear, k: Linear, v: Linear },
    /// One layer, output `[q (nh·hs) | k (nkv·hs) | v (nkv·hs)]`.
    Blocked(Linear),
    /// One layer, output `nkv × [g q heads | k | v]`, each `hs` wide.
    Grouped(Linear),
}

impl QkvProj {
    /// The linear layers of this projection.
    pub fn linears(&self) -> Vec<&Linear> {
        match self {
            QkvProj::Separate { q, k, v } => vec![q, k, v],
            QkvProj::Blocked(l) | QkvProj::Grouped(l) => vec![l],
        }
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        match self {
            QkvProj::Separate { q, k, v } => vec![q, k, v],
            QkvProj::Blocked(l) | QkvProj::Grouped(l) => vec![l],
        }
    }

    pub fn layout(&self) -> QkvLayout {
        match self {
            QkvProj::Separate { .. } => QkvLayout::Separate,
            QkvProj::Blocked(_) => QkvLayout::FusedBlocked,
            QkvProj::Grouped(_) => QkvLayout::FusedGrouped,
        }
    }
}

/// One attention layer.
#[derive(Debug, Clone)]
pub struct Attention {
    pub qkv: QkvProj,
    pub proj: Linear,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub window: AttentionWindow,
    pub scale: f64,
}

impl Attention {
    pub fn new(cfg: &Config, layer: usize, qkv: QkvProj, proj: Linear) -> Self {
        Attention {
            qkv,
            proj,
            n_head: cfg.n_head,
            n_kv_head: cfg.n_kv_head,
            head_dim: cfg.head_dim,
            window: cfg.windows[layer],
            scale: cfg.score_scale(layer),
        }
    }

    /// `q: (B, T, nh, hs)`, `k, v: (B, T, nkv, hs)` from the projection layers, each
    /// applied by `apply` (to `B·T` rows) in module order, split as the layout stores
    /// them. The training engine passes its own forward, which keeps what its backward
    /// reads.
    pub fn split_qkv(
        &self,
        b: usize,
        t: usize,
        mut apply: impl FnMut(&Linear) -> Result<Tensor>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (nh, nkv, hs) = (self.n_head, self.n_kv_head, self.head_dim);
        match &self.qkv {
            QkvProj::Separate { q, k, v } => Ok((
                apply(q)?.reshape((b, t, nh, hs))?,
                apply(k)?.reshape((b, t, nkv, hs))?,
                apply(v)?.reshape((b, t, nkv, hs))?,
            )),
            QkvProj::Blocked(l) => {
                let y = apply(l)?.reshape((b, t, (nh + 2 * nkv) * hs))?;
                Ok((
                    y.narrow(2, 0, nh * hs)?.reshape((b, t, nh, hs))?,
                    y.narrow(2, nh * hs, nkv * hs)?.reshape((b, t, nkv, hs))?,
                    y.narrow(2, (nh + nkv) * hs, nkv * hs)?
                        .reshape((b, t, nkv, hs))?,
                ))
            }
            QkvProj::Grouped(l) => {
                let g = nh / nkv;
                // (B, T, nkv, g + 2, hs): per group, g query heads then one key, one value.
                let y = apply(l)?.reshape((b, t, nkv, g + 2, hs))?;
                Ok((
                    y.narrow(3, 0, g)?.reshape((b, t, nh, hs))?,
                    y.narrow(3, g, 1)?.reshape((b, t, nkv, hs))?,
                    y.narrow(3, g + 1, 1)?.reshape((b, t, nkv, hs))?,
                ))
            }
        }
    }
}
