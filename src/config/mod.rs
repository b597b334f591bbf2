//! One configuration for every model family.
//!
//! Each Hugging Face family (LLaMA, Mistral, Falcon, GPT-2, GPT-NeoX, GPT-Neo) is a
//! *configuration* of the single decoder in [`crate::model`]: which norm, which MLP,
//! where the residuals go, how positions are encoded and how the attention projection
//! is laid out. Family quirks live in [`families`], which reads `config.json` into a
//! [`Config`]; the model never looks at the family name.

pub mod families;

use serde::{Deserialize, Serialize};

pub use families::{SUPPORTED_MODEL_TYPES, load_config};

/// The Hugging Face family a checkpoint comes from. Only the weight-name tables, the
/// LoRA target names and the writers of `config.json` / GGUF look at it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    Llama,
    Mistral,
    Falcon,
    Gpt2,
    GptNeox,
    GptNeo,
}

impl Family {
    /// The `model_type` transformers writes for this family.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Falcon => "falcon",
            Family::Gpt2 => "gpt2",
            Family::GptNeox => "gpt_neox",
            Family::GptNeo => "gpt_neo",
        }
    }
}

/// Normalisation layer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum NormKind {
    /// `x / sqrt(mean(x²) + eps) * w`
    RmsNorm,
    /// `(x - mean) / sqrt(var + eps) * w + b`
    LayerNorm,
}

/// Shape of the feed-forward block.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum MlpKind {
    /// `proj(act(fc(x)))` (GPT-2, GPT-NeoX, GPT-Neo, Falcon).
    Plain,
    /// `down(act(gate(x)) * up(x))` (LLaMA, Mistral: SwiGLU).
    Gated,
}

/// Element-wise activation of the MLP.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Activation {
    /// `x * sigmoid(x)`
    Silu,
    /// `0.5 x (1 + erf(x / sqrt 2))`, PyTorch's `nn.GELU()`.
    GeluErf,
    /// The tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    /// `max(x, 0)`
    Relu,
}

/// How token positions enter the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PositionKind {
    /// Learned absolute position embeddings added to the token embeddings (GPT-2, GPT-Neo).
    Learned,
    /// Rotary embeddings on the first `rotary_dims` of every query/key head.
    Rotary(RotaryConfig),
}

/// Rotary embedding parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RotaryConfig {
    /// Number of dimensions of each head that rotate (even, `<= head_dim`).
    pub rotary_dims: usize,
    /// The base θ of the inverse frequencies `θ^(-2i/d)`.
    pub base: f64,
    /// Frequency scaling (for long-context variants of LLaMA).
    pub scaling: RopeScaling,
}

/// Rotary frequency scaling, as `rope_scaling` / `rope_parameters.rope_type` names it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// LLaMA-3's smooth interpolation between low and high frequencies.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// Which keys a query may attend to, besides causality.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttentionWindow {
    /// Every earlier position.
    Global,
    /// Only the last `n` positions, itself included (`i - j < n`).
    Sliding(usize),
}

/// How query, key and value projections are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum QkvLayout {
    /// Three separate linear layers (LLaMA, Mistral, GPT-Neo).
    Separate,
    /// One linear layer whose output is `[q heads | k heads | v heads]` (GPT-2).
    FusedBlocked,
    /// One linear layer whose output is grouped per key/value head:
    /// `groups × [q_per_group q heads, 1 k head, 1 v head]` (GPT-NeoX with one query
    /// per group, Falcon multi-query with one group, Falcon-40B with one group per kv head).
    FusedGrouped,
}

/// Where residual connections go in a block.
///
/// ```text
/// sequential (LLaMA, GPT-2, GPT-Neo)      parallel (GPT-NeoX, Falcon)
///   x ─┬─ norm1 ─ attn ─┐                   x ─┬─ norm1 ─ attn ─┐
///      └────────────── (+) ─ h                 ├─ norm2 ─ mlp ──(+)─ out
///   h ─┬─ norm2 ─ mlp ──┐                      └───────────────(+)
///      └────────────── (+) ─ out          (Falcon-7B: norm2 is norm1, shared)
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Residual {
    Sequential,
    Parallel,
}

/// Everything the decoder needs to know. Derived values (head size, query groups)
/// are filled in by [`families`] once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Family of the checkpoint: names of weights, LoRA targets, export only.
    pub family: Family,

    // --- size ---
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub n_layer: usize,
    /// Longest sequence the model was trained on (`max_position_embeddings`).
    pub block_size: usize,

    // --- attention ---
    pub n_head: usize,
    /// Number of key/value heads (`n_head` for multi-head, 1 for multi-query).
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub qkv_layout: QkvLayout,
    /// Bias on the query/key/value projection(s).
    pub qkv_bias: bool,
    /// Bias on the attention output projection.
    pub attn_out_bias: bool,
    pub position: PositionKind,
    /// Window of each layer (length `n_layer`).
    pub windows: Vec<AttentionWindow>,
    /// Multiply scores by `1/sqrt(head_dim)` (false for GPT-Neo).
    pub scale_scores: bool,
    /// Also divide scores by `layer_idx + 1` (GPT-2's `scale_attn_by_inverse_layer_idx`).
    pub scale_by_inverse_layer: bool,

    // --- block structure ---
    pub norm: NormKind,
    pub norm_eps: f64,
    pub residual: Residual,
    /// In a parallel block, one norm feeds both attention and MLP (Falcon-7B).
    pub shared_attention_norm: bool,

    // --- MLP ---
    pub mlp: MlpKind,
    pub intermediate_size: usize,
    pub activation: Activation,
    pub mlp_bias: bool,

    // --- head ---
    /// The output head reuses the token embedding matrix.
    pub tie_embeddings: bool,
}

impl Config {
    /// Queries per key/value head.
    pub fn q_per_kv(&self) -> usize {
        self.n_head / self.n_kv_head
    }

    /// Output width of a fused query/key/value projection.
    pub fn qkv_width(&self) -> usize {
        (self.n_head + 2 * self.n_kv_head) * self.head_dim
    }

    /// Factor applied to `q·k` scores in layer `layer`.
    pub fn score_scale(&self, layer: usize) -> f64 {
        let mut s = 1.0;
        if self.scale_scores {
            s /= (self.head_dim as f64).sqrt();
        }
        if self.scale_by_inverse_layer {
            s /= (layer + 1) as f64;
        }
        s
    }

    /// Number of parameters (counting tied matrices once). Saturates at `usize::MAX`
    /// rather than wrapping; [`families::parse_config`] refuses a shape of more than
    /// [`families::MAX_PARAMS`], so a loaded config never gets near it.
    pub fn num_params(&self) -> usize {
        self.param_count()
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(usize::MAX)
    }

    /// Number of parameters (counting tied matrices once) in checked arithmetic: `None`
    /// when even a `u128` cannot hold it.
    pub fn param_count(&self) -> Option<u128> {
        let u = |x: usize| x as u128;
        let h = u(self.hidden_size);
        let norm = if self.norm == NormKind::LayerNorm {
            h.checked_mul(2)?
        } else {
            h
        };
        let qkv_width = u(self.n_kv_head)
            .checked_mul(2)?
            .checked_add(u(self.n_head))?
            .checked_mul(u(self.head_dim))?;
        let qkv =
            h.checked_mul(qkv_width)?
                .checked_add(if self.qkv_bias { qkv_width } else { 0 })?;
        let out = h
            .checked_mul(u(self.n_head))?
            .checked_mul(u(self.head_dim))?
            .checked_add(if self.attn_out_bias { h } else { 0 })?;
        let mlp_mats: u128 = match self.mlp {
            MlpKind::Plain => 2,
            MlpKind::Gated => 3,
        };
        let i = u(self.intermediate_size);
        let mlp = h
            .checked_mul(i)?
            .checked_mul(mlp_mats)?
            .checked_add(if self.mlp_bias {
                i.checked_mul(mlp_mats - 1)?.checked_add(h)?
            } else {
                0
            })?;
        let norms: u128 = if self.residual == Residual::Parallel && self.shared_attention_norm {
            1
        } else {
            2
        };
        let layer = qkv
            .checked_add(out)?
            .checked_add(mlp)?
            .checked_add(norms.checked_mul(norm)?)?;
        let emb = u(self.vocab_size).checked_mul(h)?;
        let pos = if self.position == PositionKind::Learned {
            u(self.block_size).checked_mul(h)?
        } else {
            0
        };
        let head = if self.tie_embeddings { 0 } else { emb };
        emb.checked_add(pos)?
            .checked_add(u(self.n_layer).checked_mul(layer)?)?
            .checked_add(norm)?
            .checked_add(head)
    }

    /// Floating point operations of one forward pass, per token of a `seq_len`-long
    /// sequence, as PaLM's MFU counts them: `2 × (matrix parameters)` plus
    /// `4 × layers × seq_len × (heads × head_dim)` for scores and mixing (causality not
    /// discounted). A training step costs three times this.
    pub fn flops_per_token(&self, seq_len: usize) -> f64 {
        // In f64: a count never wraps (a bench may ask for any sequence length).
        let h = self.hidden_size as f64;
        let pos_lookup = if self.position == PositionKind::Learned {
            self.block_size as f64 * h
        } else {
            0.0
        };
        // Tied: the one matrix is both lookup and head, a matmul. Untied: the input
        // embedding is only a lookup.
        let tok_lookup = if self.tie_embeddings {
            0.0
        } else {
            self.vocab_size as f64 * h
        };
        let params = self.param_count().map_or(f64::INFINITY, |n| n as f64);
        let matmul_params = params - pos_lookup - tok_lookup;
        2.0 * matmul_params
            + 4.0 * self.n_layer as f64 * seq_len as f64 * self.n_head as f64 * self.head_dim as f64
    }
}

/// The `torch_dtype` / `dtype` string of a candle dtype.
pub fn torch_dtype_name(d: candle_core::DType) -> &'static str {
    match d {
        candle_core::DType::BF16 => "bfloat16",
        candle_core::DType::F16 => "float16",
        _ => "float32",
    }
}
