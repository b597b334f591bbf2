//! Low-rank adaptation: which layers get an adapter, and attaching one.
//!
//! Targets are named the way Lit-GPT names them (query, key, value, projection, mlp,
//! head) and mapped to each family's modules. On a fused query/key/value layer
//! (Falcon, GPT-2, GPT-NeoX) targeting a subset masks the rows of `B` that belong to
//! the other parts, so the adapter stays a plain PEFT adapter of the fused module.
//!
//! Initialisation follows PEFT: `A ~ U(−1/√in, 1/√in)` (Kaiming-uniform with a = √5),
//! `B = 0`, so a fresh adapter leaves the model unchanged.

use std::collections::BTreeMap;

use candle_core::{Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::{Config, QkvLayout};
use crate::error::{Error, Result};
use crate::model::{Block, Gpt, Linear, LoraAdapter};

/// Which parts of the model get adapters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoraTargets {
    pub query: bool,
    pub key: bool,
    pub value: bool,
    pub projection: bool,
    pub mlp: bool,
    pub head: bool,
}

impl LoraTargets {
    pub fn any(&self) -> bool {
        self.query || self.key || self.value || self.projection || self.mlp || self.head
    }
}

/// Hyper-parameters of an adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub targets: LoraTargets,
    /// rsLoRA: scale by `alpha / sqrt(r)` instead of `alpha / r`.
    #[serde(default)]
    pub rslora: bool,
}

impl LoraConfig {
    /// The factor on `B A x`.
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

/// What a linear layer is, for targeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Query,
    Key,
    Value,
    FusedQkv,
    Projection,
    Mlp,
    Head,
}

/// Every linear layer of `model` with its role: the blocks' in order, then the head.
fn roles(model: &mut Gpt) -> Vec<(Role, QkvLayout, &mut Linear)> {
    let mut out = Vec::new();
    for b in &mut model.blocks {
        out.extend(block_roles(b));
    }
    out.push((Role::Head, QkvLayout::Separate, &mut model.lm_head));
    out
}

/// Every linear layer of one block with its role, in [`roles`]'s order.
fn block_roles(b: &mut Block) -> Vec<(Role, QkvLayout, &mut Linear)> {
    let mut out = Vec::new();
    let layout = b.attn.qkv.layout();
    match &mut b.attn.qkv {
        crate::model::QkvProj::Separate { q, k, v } => {
            out.push((Role::Query, layout, q));
            out.push((Role::Key, layout, k));
            out.push((Role::Value, layout, v));
        }
        crate::model::QkvProj::Blocked(l) | crate::model::QkvProj::Grouped(l) => {
            out.push((Role::FusedQkv, layout, l));
        }
    }
    out.push((Role::Projection, layout, &mut b.attn.proj));
    for l in b.mlp.linears_mut() {
        out.push((Role::Mlp, layout, l));
    }
    out
}

/// Row mask `(out, 1)` of a fused projection keeping the targeted parts, or None
/// when all three are targeted.
fn fused_mask(cfg: &Config, layout: QkvLayout, t: &LoraTargets) -> Option<Vec<f32>> {
    if t.query && t.key && t.value {
        return None;
    }
    let hs = cfg.head_dim;
    let (q, k, v) = (
        t.query as u8 as f32,
        t.key as u8 as f32,
        t.value as u8 as f32,
    );
    let mut m = Vec::with_capacity(cfg.qkv_width());
    match layout {
        QkvLayout::FusedBlocked => {
            m.extend(std::iter::repeat_n(q, cfg.n_head * hs));
            m.extend(std::iter::repeat_n(k, cfg.n_kv_head * hs));
            m.extend(std::iter::repeat_n(v, cfg.n_kv_head * hs));
        }
        QkvLayout::FusedGrouped => {
            for _ in 0..cfg.n_kv_head {
                m.extend(std::iter::repeat_n(q, cfg.q_per_kv() * hs));
                m.extend(std::iter::repeat_n(k, hs));
                m.extend(std::iter::repeat_n(v, hs));
            }
        }
        QkvLayout::Separate => return None,
    }
    Some(m)
}

/// Attach fresh adapters (PEFT initialisation, seeded) to the targeted layers of
/// `model`. Returns the trainable `(name, var)` pairs, named as PEFT names them
/// without the `base_model.model.` prefix: `<module>.lora_A.weight`, `<module>.lora_B.weight`.
pub fn attach_new(model: &mut Gpt, cfg: &LoraConfig, seed: u64) -> Result<Vec<(String, Var)>> {
    let mut init = FreshAdapters::new(&model.cfg, cfg, seed)?;
    let mut vars = Vec::new();
    for (role, layout, lin) in roles(model) {
        vars.extend(init.attach(role, layout, lin)?);
    }
    Ok(vars)
}

/// [`attach_new`] one block at a time, in order, then the head: the same adapters
/// (one seeded stream, drawn in the same order), for a model loaded block by block.
pub struct FreshAdapters {
    model: Config,
    cfg: LoraConfig,
    rng: ChaCha8Rng,
}

impl FreshAdapters {
    /// Fails, saying what to set, on a rank of 0 or no target.
    pub fn new(model: &Config, cfg: &LoraConfig, seed: u64) -> Result<Self> {
        if cfg.r == 0 {
            return Err(Error::Usage(
                "--lora-r must be positive to train LoRA".into(),
            ));
        }
        if !cfg.targets.any() {
            return Err(Error::Usage(
                "LoRA needs at least one target: --lora-query, --lora-key, --lora-value, --lora-projection, --lora-mlp or --lora-head".into(),
            ));
        }
        Ok(FreshAdapters {
            model: model.clone(),
            cfg: cfg.clone(),
            rng: ChaCha8Rng::seed_from_u64(seed),
        })
    }

    /// Adapters on the targeted layers of the next block.
    pub fn attach_block(&mut self, b: &mut Block) -> Result<Vec<(String, Var)>> {
        let mut vars = Vec::new();
        for (role, layout, lin) in block_roles(b) {
            vars.extend(self.attach(role, layout, lin)?);
        }
        Ok(vars)
    }

    /// The head's adapter, when targeted (after every block).
    pub fn attach_head(&mut self, head: &mut Linear) -> Result<Vec<(String, Var)>> {
        self.attach(Role::Head, QkvLayout::Separate, head)
    }

    fn attach(
        &mut self,
        role: Role,
        layout: QkvLayout,
        lin: &mut Linear,
    ) -> Result<Vec<(String, Var)>> {
        let (cfg, t) = (&self.cfg, self.cfg.targets);
        let (wanted, mask) = match role {
            Role::Query => (t.query, None),
            Role::Key => (t.key, None),
            Role::Value => (t.value, None),
            Role::FusedQkv => (
                t.query || t.key || t.value,
                fused_mask(&self.model, layout, &t),
            ),
            Role::Projection => (t.projection, None),
            Role::Mlp => (t.mlp, None),
            Role::Head => (t.head, None),
        };
        if !wanted {
            return Ok(Vec::new());
        }
        let (n_out, n_in) = (lin.out_features(), lin.in_features());
        let dev = lin.weight.device().clone();
        let dtype = lin.weight.dtype();
        let bound = 1.0 / (n_in as f32).sqrt();
        let rng = &mut self.rng;
        let a: Vec<f32> = (0..cfg.r * n_in)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        let a = Var::from_tensor(&Tensor::from_vec(a, (cfg.r, n_in), &dev)?.to_dtype(dtype)?)?;
        let b = Var::zeros((n_out, cfg.r), dtype, &dev)?;
        let out_mask = match mask {
            Some(m) => Some(Tensor::from_vec(m, (n_out, 1), &dev)?),
            None => None,
        };
        lin.lora = Some(LoraAdapter {
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            scale: cfg.scale(),
            dropout: cfg.dropout,
            out_mask,
        });
        Ok(vec![
            (format!("{}.lora_A.weight", lin.name), a),
            (format!("{}.lora_B.weight", lin.name), b),
        ])
    }
}

/// Attach adapters from tensors keyed by module path (`A: (r, in)`, `B: (out, r)`).
/// Every entry must match a linear layer of the model with compatible shapes.
/// With `trainable`, the matrices become variables, returned like [`attach_new`].
pub fn attach_tensors(
    model: &mut Gpt,
    adapters: &BTreeMap<String, (Tensor, Tensor)>,
    scale: f64,
    dropout: f32,
    trainable: bool,
) -> Result<Vec<(String, Var)>> {
    let names = crate::model::names::WeightNames::for_config(&model.cfg);
    let adapters: BTreeMap<String, &(Tensor, Tensor)> = adapters
        .iter()
        .map(|(k, v)| (names.canonical(k), v))
        .collect();
    let mut vars = Vec::new();
    let mut used = 0;
    for (_, _, lin) in roles(model) {
        let Some((a, b)) = adapters.get(&lin.name) else {
            continue;
        };
        used += 1;
        let (n_out, n_in) = (lin.out_features(), lin.in_features());
        let (r, a_in) = a.dims2()?;
        let (b_out, rb) = b.dims2()?;
        if a_in != n_in || b_out != n_out || rb != r {
            return Err(Error::Weights(format!(
                "adapter for {}: lora_A {:?} and lora_B {:?} do not fit a ({n_out}, {n_in}) layer \
                 (expected ({r}, {n_in}) and ({n_out}, {r})); is the adapter for another base model?",
                lin.name,
                a.dims(),
                b.dims()
            )));
        }
        let dtype = lin.weight.dtype();
        let dev = lin.weight.device().clone();
        let (a, b) = (
            a.to_device(&dev)?.to_dtype(dtype)?,
            b.to_device(&dev)?.to_dtype(dtype)?,
        );
        let (a, b) = if trainable {
            let (va, vb) = (Var::from_tensor(&a)?, Var::from_tensor(&b)?);
            let ts = (va.as_tensor().clone(), vb.as_tensor().clone());
            vars.push((format!("{}.lora_A.weight", lin.name), va));
            vars.push((format!("{}.lora_B.weight", lin.name), vb));
            ts
        } else {
            (a, b)
        };
        lin.lora = Some(LoraAdapter {
            a,
            b,
            scale,
            dropout,
            out_mask: None,
        });
    }
    if used != adapters.len() {
        let names: Vec<String> = model.linears().iter().map(|l| l.name.clone()).collect();
        let stray: Vec<&String> = adapters.keys().filter(|k| !names.contains(k)).collect();
        return Err(Error::Weights(format!(
            "adapter modules {stray:?} match no layer of this {} model; is the adapter for another base model?",
            model.cfg.family.model_type()
        )));
    }
    Ok(vars)
}

/// The adapters of `model`, keyed by `<module>.lora_A.weight` / `.lora_B.weight`,
/// with masked rows of `B` zeroed: what a PEFT adapter file stores.
pub fn adapter_tensors(model: &Gpt) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    for lin in model.linears() {
        if let Some(l) = &lin.lora {
            out.push((format!("{}.lora_A.weight", lin.name), l.a.clone()));
            out.push((format!("{}.lora_B.weight", lin.name), l.effective_b()?));
        }
    }
    Ok(out)
}
