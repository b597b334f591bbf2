//! Low-rank adaptation: which layers get an adapter, and attaching one.
//!
//! Targets are named the way Lit-GPT names them (query, key, value, projection, mlp,
//! head) and mapped to each family's modules. On a fused query/key/value layer
//! (Falcon, GPT-2, GPT-NeoX) targeting a subset masks the rows of `B` that belong to
//! the other parts, so the adapter stays a plain PEFT adapter of the fused module.
//!
//! Initialisation follows PEFT: `A ~ U(−1/√in, 1/√in)` (Kaiming-uniform with a = √5),
//! `B = 0`, so a fresh adapter leaves the model unchanged.
//!
//! Beside the adapter, the embeddings and head may train ([`TrainEmbeddings`],
//! [`attach_embeddings`]): the rows of some tokens, as PEFT's trainable tokens (the
//! rows start as the model's, so nothing changes either), or the whole matrices, as
//! PEFT's `modules_to_save`.

use std::collections::BTreeMap;

use candle_core::{Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::{Config, QkvLayout};
use crate::error::{Error, Result};
use crate::model::names::WeightNames;
use crate::model::token_rows::rows_replaced;
use crate::model::{Block, Gpt, Linear, LoraAdapter, TokenRows, TrainedEmbeddings};

/// What a LoRA run trains of the embeddings and head (`--train-embeddings`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TrainEmbeddings {
    /// The rows of the new tokens, in the embeddings and in the head (PEFT's
    /// `trainable_token_indices`).
    New,
    /// The whole embeddings and head (PEFT's `modules_to_save`).
    All,
    /// Neither.
    None,
}

impl std::fmt::Display for TrainEmbeddings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TrainEmbeddings::New => "new",
            TrainEmbeddings::All => "all",
            TrainEmbeddings::None => "none",
        })
    }
}

/// Suffix PEFT gives the rows of a module's trainable tokens.
pub const TOKEN_ROWS_SUFFIX: &str = ".token_adapter.trainable_tokens_delta";

/// The head's module path as PEFT names it: transformers' name of today (GPT-NeoX's
/// `embed_out` is `lm_head` in transformers 5).
pub fn head_module(names: &WeightNames) -> &'static str {
    names.lm_head_alias.unwrap_or(names.lm_head)
}

/// Make the embeddings and head of `model` (frozen, LoRA or not) train as `mode` says,
/// `new_ids` being the tokens [`TrainEmbeddings::New`] trains. Returns the variables,
/// named as a PEFT adapter stores them: `<embeddings>.token_adapter.trainable_tokens_delta`
/// and `<head>.token_adapter.trainable_tokens_delta` (an untied head), or
/// `<embeddings>.weight` and `<head>.weight` (an untied head) for the whole matrices.
pub fn attach_embeddings(
    model: &mut Gpt,
    mode: TrainEmbeddings,
    new_ids: &[u32],
) -> Result<Vec<(String, Var)>> {
    let names = WeightNames::for_config(&model.cfg);
    let head = head_module(&names);
    let tied = model.cfg.tie_embeddings;
    let embed = model.wte_name.clone();
    let mut vars = Vec::new();
    match mode {
        TrainEmbeddings::None => {}
        TrainEmbeddings::New => {
            if new_ids.is_empty() {
                return Err(Error::Usage(
                    "--train-embeddings new: the model has no new tokens to train".into(),
                ));
            }
            let mut ids = new_ids.to_vec();
            ids.sort_unstable();
            ids.dedup();
            let vocab = model.cfg.vocab_size;
            if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
                return Err(Error::Usage(format!(
                    "new token id {bad} is outside the model's vocabulary of {vocab}"
                )));
            }
            let idx = Tensor::new(ids.as_slice(), model.device())?;
            let rows =
                |w: &Tensor| -> Result<Var> { Ok(Var::from_tensor(&w.index_select(&idx, 0)?)?) };
            let e = rows(&model.wte)?;
            vars.push((format!("{embed}{TOKEN_ROWS_SUFFIX}"), e.clone()));
            let h = if tied {
                None
            } else {
                let h = rows(&model.lm_head.weight)?;
                vars.push((format!("{head}{TOKEN_ROWS_SUFFIX}"), h.clone()));
                Some(h.as_tensor().clone())
            };
            let tr = TokenRows::new(ids, e.as_tensor().clone(), h, vocab)?;
            model.trained_embeddings = Some(TrainedEmbeddings::Rows(tr));
        }
        TrainEmbeddings::All => {
            let e = Var::from_tensor(&model.wte)?;
            model.wte = e.as_tensor().clone();
            vars.push((format!("{embed}.weight"), e.clone()));
            if tied {
                model.lm_head.weight = e.as_tensor().clone();
            } else {
                let h = Var::from_tensor(&model.lm_head.weight)?;
                model.lm_head.weight = h.as_tensor().clone();
                vars.push((format!("{head}.weight"), h));
            }
            model.trained_embeddings = Some(TrainedEmbeddings::Whole);
        }
    }
    Ok(vars)
}

/// What a saved adapter says of the embeddings and head it trained: the config
/// entries of [`crate::hf::peft::save_adapter`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EmbeddingsConfig {
    /// PEFT's `trainable_token_indices`: module name → token ids.
    pub token_indices: BTreeMap<String, Vec<u32>>,
    /// PEFT's `modules_to_save`.
    pub modules_to_save: Vec<String>,
    /// The head is the embeddings (PEFT's `ensure_weight_tying`).
    pub tied: bool,
}

/// The last component of a module path, which PEFT matches module names by.
fn leaf(path: &str) -> String {
    path.rsplit('.').next().unwrap_or(path).to_string()
}

/// What `model` trains of its embeddings and head, as an adapter's config says it.
pub fn embeddings_config(model: &Gpt) -> EmbeddingsConfig {
    let names = WeightNames::for_config(&model.cfg);
    let (embed, head) = (leaf(&model.wte_name), leaf(head_module(&names)));
    let tied = model.cfg.tie_embeddings;
    let mut out = EmbeddingsConfig {
        tied,
        ..Default::default()
    };
    match &model.trained_embeddings {
        None => {}
        Some(TrainedEmbeddings::Rows(tr)) => {
            out.token_indices.insert(embed, tr.ids().to_vec());
            if tr.head.is_some() {
                out.token_indices.insert(head, tr.ids().to_vec());
            }
        }
        Some(TrainedEmbeddings::Whole) => out.modules_to_save = vec![embed, head],
    }
    out
}

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
/// with masked rows of `B` zeroed, and its trained embeddings (named as
/// [`attach_embeddings`] names them; a tied head's whole matrix under the head's name
/// too): what a PEFT adapter file stores.
pub fn adapter_tensors(model: &Gpt) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    for lin in model.linears() {
        if let Some(l) = &lin.lora {
            out.push((format!("{}.lora_A.weight", lin.name), l.a.clone()));
            out.push((format!("{}.lora_B.weight", lin.name), l.effective_b()?));
        }
    }
    let names = WeightNames::for_config(&model.cfg);
    let head = head_module(&names);
    match &model.trained_embeddings {
        None => {}
        Some(TrainedEmbeddings::Rows(tr)) => {
            let embed = format!("{}{TOKEN_ROWS_SUFFIX}", model.wte_name);
            out.push((embed, tr.embed.clone()));
            if let Some(h) = &tr.head {
                out.push((format!("{head}{TOKEN_ROWS_SUFFIX}"), h.clone()));
            }
        }
        Some(TrainedEmbeddings::Whole) => {
            out.push((format!("{}.weight", model.wte_name), model.wte.clone()));
            out.push((format!("{head}.weight"), model.lm_head.weight.clone()));
        }
    }
    Ok(out)
}

/// Which matrix an adapter's module path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VocabMatrix {
    Embeddings,
    Head,
}

/// The matrix the adapter module `module` names in a model of `names` (exactly, or
/// without its first component, as bare GPT-2 checkpoints name them), if any.
pub fn vocab_matrix(names: &WeightNames, module: &str) -> Option<VocabMatrix> {
    let module = names.canonical(module);
    let is =
        |ours: &str| module == ours || ours.split_once('.').is_some_and(|(_, rest)| rest == module);
    if is(names.embed) {
        Some(VocabMatrix::Embeddings)
    } else if is(names.lm_head) {
        Some(VocabMatrix::Head)
    } else {
        None
    }
}

/// Put an adapter's trained embeddings into `model` (frozen; the base's matrices are
/// copied, not changed, since a base may be shared): `rows` (module path, token ids,
/// `(n, C)` values) over their rows, `whole` (module path, `(V, C)`) in place of the
/// matrix. A tied head follows the embeddings unless the adapter gives it values of
/// its own.
pub fn apply_embeddings(
    model: &mut Gpt,
    rows: &[(String, Vec<u32>, Tensor)],
    whole: &[(String, Tensor)],
) -> Result<()> {
    if rows.is_empty() && whole.is_empty() {
        return Ok(());
    }
    let names = WeightNames::for_config(&model.cfg);
    let (vocab, c) = model.wte.dims2()?;
    let (mut embed, mut head) = (model.wte.clone(), None::<Tensor>);
    let part = |module: &str| {
        vocab_matrix(&names, module).ok_or_else(|| {
            Error::Weights(format!(
                "adapter module {module} is neither the embeddings {} nor the head of this {} model; is the adapter for another base model?",
                names.embed,
                model.cfg.family.model_type()
            ))
        })
    };
    let fit = |module: &str, t: &Tensor, want: (usize, usize)| -> Result<Tensor> {
        if t.dims() != [want.0, want.1] {
            return Err(Error::Weights(format!(
                "adapter tensor of {module} has shape {:?}, expected {want:?}; is the adapter for another base model?",
                t.dims()
            )));
        }
        Ok(t.to_device(model.device())?.to_dtype(model.wte.dtype())?)
    };
    for (module, t) in whole {
        let t = fit(module, t, (vocab, c))?;
        match part(module)? {
            VocabMatrix::Embeddings => embed = t,
            VocabMatrix::Head => head = Some(t),
        }
    }
    for (module, ids, t) in rows {
        let t = fit(module, t, (ids.len(), c))?;
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(Error::Weights(format!(
                "adapter rows of {module}: token id {bad} is outside the model's vocabulary of {vocab}"
            )));
        }
        match part(module)? {
            VocabMatrix::Embeddings => embed = rows_replaced(&embed, ids, &t)?,
            VocabMatrix::Head => {
                let base = head.clone().unwrap_or_else(|| model.lm_head.weight.clone());
                head = Some(rows_replaced(&base, ids, &t)?);
            }
        }
    }
    model.wte = embed;
    match head {
        Some(h) => model.lm_head.weight = h,
        None if model.cfg.tie_embeddings => model.lm_head.weight = model.wte.clone(),
        None => {}
    }
    Ok(())
}
