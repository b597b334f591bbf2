//! The decoder: one GPT for every family, configured by [`Config`].
//!
//! ```text
//! ids (B, T) ─ embed ─[+ learned positions]─ Block × n_layer ─ final norm ─ head ─ logits (B, T, V)
//! ```
//!
//! Every operation on the way is differentiable, so the same forward pass serves
//! perplexity, generation (with a [`KvCache`]) and training.

pub mod attention;
pub mod build;
pub mod engine;
pub mod fused;
pub mod linear;
pub mod mlp;
pub mod names;
pub mod norm;
pub mod rope;
pub mod weights;

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor, Var};

pub use attention::{Attention, LayerCache, QkvProj};
pub use build::{BuildOptions, build_model};
pub use linear::{Dropout, Linear, LoraAdapter};
pub use mlp::Mlp;
pub use norm::Norm;

use crate::config::{Config, PositionKind, Residual};
use crate::error::{Error, Result as LcResult};
use rope::RopeTables;

/// One transformer block; see [`Residual`] for the two layouts.
#[derive(Debug, Clone)]
pub struct Block {
    pub norm1: Norm,
    /// None when the MLP reads `norm1`'s output (shared attention norm).
    pub norm2: Option<Norm>,
    pub attn: Attention,
    pub mlp: Mlp,
    pub residual: Residual,
}

impl Block {
    fn forward(
        &self,
        x: &Tensor,
        pos: usize,
        rope: Option<&RopeTables>,
        cache: Option<&mut LayerCache>,
        docs: Option<&Arc<[u32]>>,
        dropout: Option<&Dropout>,
    ) -> Result<Tensor> {
        let n1 = self.norm1.forward(x)?;
        let a = self.attn.forward(&n1, pos, rope, cache, docs, dropout)?;
        match self.residual {
            Residual::Sequential => {
                let h = (x + a)?;
                let norm2 = self
                    .norm2
                    .as_ref()
                    .expect("sequential blocks have two norms");
                let m = self.mlp.forward(&norm2.forward(&h)?, dropout)?;
                h + m
            }
            Residual::Parallel => {
                let n2 = match &self.norm2 {
                    Some(n) => n.forward(x)?,
                    None => n1,
                };
                let m = self.mlp.forward(&n2, dropout)?;
                (x + a)? + m
            }
        }
    }
}

/// Per-layer caches for incremental decoding.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    /// Tokens processed so far: the position of the next one.
    pub pos: usize,
}

impl KvCache {
    pub fn new(n_layer: usize) -> Self {
        KvCache {
            layers: vec![LayerCache::default(); n_layer],
            pos: 0,
        }
    }
}

/// The decoder.
#[derive(Debug, Clone)]
pub struct Gpt {
    pub cfg: Config,
    /// Token embeddings `(V, C)` and their Hugging Face name.
    pub wte: Tensor,
    pub wte_name: String,
    /// Learned positions `(block_size, C)`.
    pub wpe: Option<(String, Tensor)>,
    pub blocks: Vec<Block>,
    pub ln_f: Norm,
    /// Output head; its weight *is* `wte` when embeddings are tied.
    pub lm_head: Linear,
    /// Dtype activations are computed in (the Strategy's precision).
    pub compute_dtype: DType,
}

impl Gpt {
    pub fn device(&self) -> &Device {
        self.wte.device()
    }

    /// Logits `(B, T, V)` in f32 for `ids: (B, T)` at positions `0..T`.
    /// `dropout` is `Some` in training.
    pub fn forward(&self, ids: &Tensor, dropout: Option<&Dropout>) -> Result<Tensor> {
        self.run(ids, 0, None, None, dropout, false)
    }

    /// Logits `(B, T, V)` of packed samples: `docs[b·T + i]` is the index of the first
    /// token of the document token `i` of row `b` belongs to (non-decreasing along a row,
    /// `docs[b·T + i] <= i`). Each token attends only to its own document and sits at
    /// position `i − docs[b·T + i]`, as if its document were run alone. `None` is
    /// [`Gpt::forward`].
    pub fn forward_packed(
        &self,
        ids: &Tensor,
        docs: Option<&Arc<[u32]>>,
        dropout: Option<&Dropout>,
    ) -> Result<Tensor> {
        self.run(ids, 0, None, docs, dropout, false)
    }

    /// Logits for the new `ids` after what `cache` has seen, appending to it.
    /// With `last_only`, only the last position's logits `(B, 1, V)`.
    pub fn forward_cached(
        &self,
        ids: &Tensor,
        cache: &mut KvCache,
        last_only: bool,
    ) -> Result<Tensor> {
        let pos = cache.pos;
        let (_, t) = ids.dims2()?;
        let logits = self.run(ids, pos, Some(&mut cache.layers), None, None, last_only)?;
        cache.pos += t;
        Ok(logits)
    }

    fn run(
        &self,
        ids: &Tensor,
        pos: usize,
        mut caches: Option<&mut Vec<LayerCache>>,
        docs: Option<&Arc<[u32]>>,
        dropout: Option<&Dropout>,
        last_only: bool,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let c = self.cfg.hidden_size;
        // Packed samples: each token's position inside its document.
        let positions = match docs {
            Some(d) => Some(document_positions(d, b, t)?),
            None => None,
        };
        let mut x = self
            .wte
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, c))?
            .to_dtype(self.compute_dtype)?;
        if let Some((_, wpe)) = &self.wpe {
            if pos + t > wpe.dim(0)? {
                candle_core::bail!(
                    "positions up to {} exceed the {} learned positions of this model",
                    pos + t,
                    wpe.dim(0)?
                );
            }
            x = match &positions {
                None => x.broadcast_add(&wpe.narrow(0, pos, t)?.to_dtype(self.compute_dtype)?)?,
                Some(p) => {
                    let p: Vec<u32> = p.iter().map(|&p| p as u32).collect();
                    let p = Tensor::from_vec(p, b * t, ids.device())?;
                    let rows = wpe.index_select(&p, 0)?.reshape((b, t, c))?;
                    (x + rows.to_dtype(self.compute_dtype)?)?
                }
            };
        }
        let rope = match (&self.cfg.position, &positions) {
            (PositionKind::Rotary(r), None) => Some(RopeTables::new(r, pos, t, ids.device())?),
            (PositionKind::Rotary(r), Some(p)) => {
                Some(RopeTables::at_positions(r, p, b, t, ids.device())?)
            }
            (PositionKind::Learned, _) => None,
        };
        for (i, block) in self.blocks.iter().enumerate() {
            let cache = caches.as_deref_mut().map(|c| &mut c[i]);
            x = block.forward(&x, pos, rope.as_ref(), cache, docs, dropout)?;
        }
        if last_only {
            x = x.narrow(1, t - 1, 1)?;
        }
        let x = self.ln_f.forward(&x)?;
        self.lm_head.forward(&x, dropout)?.to_dtype(DType::F32)
    }

    /// Every linear layer, in module order.
    pub fn linears(&self) -> Vec<&Linear> {
        let mut v = Vec::new();
        for b in &self.blocks {
            v.extend(b.attn.qkv.linears());
            v.push(&b.attn.proj);
            v.extend(b.mlp.linears());
        }
        v.push(&self.lm_head);
        v
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut v = Vec::new();
        for b in &mut self.blocks {
            v.extend(b.attn.qkv.linears_mut());
            v.push(&mut b.attn.proj);
            v.extend(b.mlp.linears_mut());
        }
        v.push(&mut self.lm_head);
        v
    }

    /// Every base parameter under its Hugging Face name, in our layout (linear weights
    /// `(out, in)`). A tied head is not listed again.
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![(format!("{}.weight", self.wte_name), self.wte.clone())];
        if let Some((n, t)) = &self.wpe {
            out.push((format!("{n}.weight"), t.clone()));
        }
        let push_norm = |out: &mut Vec<(String, Tensor)>, n: &Norm| {
            out.push((format!("{}.weight", n.name), n.weight.clone()));
            if let Some(b) = &n.bias {
                out.push((format!("{}.bias", n.name), b.clone()));
            }
        };
        let push_linear = |out: &mut Vec<(String, Tensor)>, l: &Linear| {
            out.push((format!("{}.weight", l.name), l.weight.clone()));
            if let Some(b) = &l.bias {
                out.push((format!("{}.bias", l.name), b.clone()));
            }
        };
        for b in &self.blocks {
            push_norm(&mut out, &b.norm1);
            if let Some(n) = &b.norm2 {
                push_norm(&mut out, n);
            }
            for l in b.attn.qkv.linears() {
                push_linear(&mut out, l);
            }
            push_linear(&mut out, &b.attn.proj);
            for l in b.mlp.linears() {
                push_linear(&mut out, l);
            }
        }
        push_norm(&mut out, &self.ln_f);
        if !self.cfg.tie_embeddings {
            push_linear(&mut out, &self.lm_head);
        }
        out
    }
}

/// Position of each token of packed rows inside its document: `i − docs[b·T + i]`,
/// checking that `docs` holds `B·T` starts, each at most its token's index.
fn document_positions(docs: &[u32], b: usize, t: usize) -> Result<Vec<usize>> {
    if docs.len() != b * t {
        candle_core::bail!(
            "packed batch: {} document starts for {b} rows of {t} tokens",
            docs.len()
        );
    }
    docs.iter()
        .enumerate()
        .map(|(n, &d)| {
            let i = n % t;
            match i.checked_sub(d as usize) {
                Some(p) => Ok(p),
                None => candle_core::bail!(
                    "packed batch: token {i} of row {} starts its document at {d}, after itself",
                    n / t
                ),
            }
        })
        .collect()
}

/// A model with the variables an optimizer updates.
pub struct TrainableModel {
    pub model: Gpt,
    /// `(name, var)`: base parameters under their HF names in full fine-tuning, or
    /// `<module>.lora_A.weight` / `<module>.lora_B.weight` with LoRA.
    pub vars: Vec<(String, Var)>,
}

/// Check a batch of ids against the vocabulary and context of `cfg`.
pub fn check_ids(cfg: &Config, ids: &[u32], what: &str) -> LcResult<()> {
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= cfg.vocab_size) {
        return Err(Error::Usage(format!(
            "{what}: token id {bad} is outside the model's vocabulary of {}",
            cfg.vocab_size
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 13: positions restart at each document of a packed row. (Under the
    /// block-diagonal mask, rotary attention depends only on relative positions, so for
    /// rotary families this is visible here, not in the loss; learned positions, GPT-2
    /// and GPT-Neo, show it in the loss too: tests/it/packing.rs.)
    #[test]
    fn positions_restart_at_each_document() {
        // Row 0: documents at 0, 3 and 5 (the last one cut off by the row's end);
        // row 1: one at 0, one at 2.
        let docs = [0, 0, 0, 3, 3, 0, 0, 2, 2, 2];
        let p = document_positions(&docs, 2, 5).unwrap();
        assert_eq!(p, [0, 1, 2, 0, 1, 0, 1, 0, 1, 2]);
        // A start after its token, or the wrong count, is an error.
        assert!(document_positions(&[0, 2, 2, 2, 2], 1, 5).is_err());
        assert!(document_positions(&[0, 0, 0], 1, 5).is_err());
    }
}
