//! The decoder: one GPT for every family, configured by [`Config`].
//!
//! ```text
//! ids (B, T) ─ embed ─[+ learned positions]─ Block × n_layer ─ final norm ─ head ─ logits (B, T, V)
//! ```
//!
//! This module holds the model's weights and its shape; the computation, one forward
//! pass (with or without a backward) for every use, is [`engine`]: training
//! ([`engine::train_pass`]), scoring ([`engine::score`]) and logits, with a
//! [`engine::KvCache`] for generation ([`engine::logits`]).

pub mod attention;
pub mod build;
pub mod engine;
pub mod fused;
pub mod linear;
pub mod mlp;
pub mod names;
pub mod norm;
pub mod rope;
pub mod token_rows;
pub mod weights;

use candle_core::{DType, Device, Result, Tensor, Var};

pub use attention::{Attention, QkvProj};
pub use build::{BuildOptions, OnBlock, build_model, build_model_by_block};
pub use linear::{Dropout, Linear, LoraAdapter};
pub use mlp::Mlp;
pub use norm::Norm;
pub use token_rows::{TokenRows, TrainedEmbeddings};

use crate::config::{Config, Residual};
use crate::error::{Error, Result as LcResult};

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
    /// Every parameter tensor of the block, LoRA matrices included (not their row
    /// masks, which are constants), in one fixed order: norms, attention, MLP; in
    /// each linear `weight`, `bias`, `lora_A`, `lora_B`.
    pub fn params_mut(&mut self) -> Vec<&mut Tensor> {
        let mut v = self.norm1.params_mut();
        if let Some(n) = &mut self.norm2 {
            v.extend(n.params_mut());
        }
        for l in self.attn.qkv.linears_mut() {
            v.extend(l.params_mut());
        }
        v.extend(self.attn.proj.params_mut());
        for l in self.mlp.linears_mut() {
            v.extend(l.params_mut());
        }
        v
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
    /// What of the embeddings and head trains beside a LoRA adapter (None: nothing,
    /// or full fine-tuning, where everything does).
    pub trained_embeddings: Option<TrainedEmbeddings>,
}

impl Gpt {
    pub fn device(&self) -> &Device {
        self.wte.device()
    }

    /// The trained rows of the embeddings and head, if only some rows train.
    pub fn token_rows(&self) -> Option<&TokenRows> {
        match &self.trained_embeddings {
            Some(TrainedEmbeddings::Rows(r)) => Some(r),
            _ => None,
        }
    }

    /// Write the trained rows' values into the embeddings and head, which the
    /// forward reads (after every update of the rows; nothing without trained rows).
    pub fn write_token_rows(&self) -> Result<()> {
        match self.token_rows() {
            Some(r) => r.write_into(&self.wte, &self.lm_head.weight),
            None => Ok(()),
        }
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

    /// Every parameter tensor outside the blocks, in one fixed order: embeddings,
    /// learned positions, final norm, head (its weight only when it is not the
    /// embeddings'; its LoRA matrices), then the trained rows of the embeddings and of
    /// an untied head when only some rows train (held apart from the matrices).
    pub fn outer_params_mut(&mut self) -> Vec<&mut Tensor> {
        let mut v = vec![&mut self.wte];
        if let Some((_, t)) = &mut self.wpe {
            v.push(t);
        }
        v.extend(self.ln_f.params_mut());
        let head = &mut self.lm_head;
        if !self.cfg.tie_embeddings {
            v.push(&mut head.weight);
        }
        v.extend(head.bias.as_mut());
        if let Some(l) = &mut head.lora {
            v.push(&mut l.a);
            v.push(&mut l.b);
        }
        if let Some(TrainedEmbeddings::Rows(tr)) = &mut self.trained_embeddings {
            v.push(&mut tr.embed);
            v.extend(tr.head.as_mut());
        }
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
pub(crate) fn document_positions(docs: &[u32], b: usize, t: usize) -> Result<Vec<usize>> {
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
