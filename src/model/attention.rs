//! Causal self-attention with grouped/multi-query heads, windows and a KV cache.
//!
//! Shapes: `B` batch, `T` new tokens, `S` keys (cached + new), `nh` query heads,
//! `nkv` key/value heads, `g = nh / nkv` queries per key/value head, `hs` head size.
//!
//! The attention itself is [`super::fused::attention`]: on CPU f32, and on CUDA with heads
//! up to 128 wide, a flash kernel with its own backward that never holds the `(T, S)`
//! scores (candle's `sdpa` has no backward), elsewhere a composition of tensor ops. None
//! copies grouped heads.

use std::sync::Arc;

use candle_core::{Result, Tensor};

use super::fused::{MaskSpec, attention};
use super::linear::{Dropout, Linear};
use super::rope::RopeTables;
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

/// Keys and values seen so far by one layer during generation.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    /// `(B, nkv, S, hs)`
    k: Option<Tensor>,
    v: Option<Tensor>,
    /// Absolute position of the first cached key (windows drop old ones).
    start: usize,
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

    /// Split the projection of `x: (B, T, C)` into `q: (B, T, nh, hs)`,
    /// `k, v: (B, T, nkv, hs)`.
    fn project(&self, x: &Tensor, dropout: Option<&Dropout>) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        self.split_qkv(b, t, |l| l.forward(x, dropout))
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

    /// `x: (B, T, C)` at absolute positions `pos .. pos + T` → `(B, T, C)`.
    ///
    /// `rope` covers those positions (None for learned positions). With a cache, keys
    /// and values of earlier calls are attended to and this call's are appended.
    /// `docs` (packed samples, `B·T` document starts, see [`MaskSpec::docs`]) hides
    /// other documents' keys; generation passes None.
    pub fn forward(
        &self,
        x: &Tensor,
        pos: usize,
        rope: Option<&RopeTables>,
        cache: Option<&mut LayerCache>,
        docs: Option<&Arc<[u32]>>,
        dropout: Option<&Dropout>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, hs) = (self.n_head, self.head_dim);
        let (q, k, v) = self.project(x, dropout)?;
        // (B, heads, T, hs)
        let mut q = q.transpose(1, 2)?.contiguous()?;
        let mut k = k.transpose(1, 2)?.contiguous()?;
        let v = v.transpose(1, 2)?.contiguous()?;
        if let Some(rope) = rope {
            q = rope.apply(&q)?;
            k = rope.apply(&k)?;
        }
        let (k, v, key_start) = match cache {
            None => (k, v, pos),
            Some(c) => {
                let (k, v) = match (&c.k, &c.v) {
                    (Some(ck), Some(cv)) => {
                        (Tensor::cat(&[ck, &k], 2)?, Tensor::cat(&[cv, &v], 2)?)
                    }
                    _ => {
                        c.start = pos;
                        (k, v)
                    }
                };
                let start = c.start;
                // Keep only what a later query can still see: a windowed layer's query
                // at position p sees keys after p - w.
                let len = k.dim(2)?;
                let keep = match self.window {
                    AttentionWindow::Sliding(w) => len.min(w.saturating_sub(1)),
                    AttentionWindow::Global => len,
                };
                c.k = Some(k.narrow(2, len - keep, keep)?);
                c.v = Some(v.narrow(2, len - keep, keep)?);
                c.start = start + len - keep;
                (k, v, start)
            }
        };
        let mask = MaskSpec {
            q_start: pos,
            k_start: key_start,
            window: self.window,
            docs: docs.cloned(),
        };
        let y = attention(&q, &k, &v, self.scale, &mask)?; // (B, nh, T, hs)
        let y = y.transpose(1, 2)?.reshape((b, t, nh * hs))?;
        self.proj.forward(&y, dropout)
    }
}
