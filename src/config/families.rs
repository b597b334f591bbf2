//! Reading Hugging Face `config.json` files into a [`Config`].
//!
//! One serde struct mirrors each family's `config.json` (field names and defaults as
//! transformers defines them, 4.x and 5.x spellings both accepted); `into_config`
//! turns it into the shared [`Config`]. This is the only place that knows, for
//! example, that Falcon's `multi_query: true` wins over `num_kv_heads`.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::*;
use crate::error::{Error, IoContext, Result};

/// `model_type` values we read, for error messages.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &[
    "llama",
    "mistral",
    "falcon",
    "RefinedWeb",
    "RefinedWebModel",
    "gpt2",
    "gpt_neox",
    "gpt_neo",
];

/// Read `dir/config.json`.
pub fn load_config(dir: &Path) -> Result<Config> {
    let path = dir.join("config.json");
    if !path.exists() {
        return Err(Error::missing(
            &path,
            "--checkpoint-dir must be a Hugging Face model folder (config.json, *.safetensors, \
             tokenizer.json); `lit-claire download --repo-id ORG/NAME` fetches one",
        ));
    }
    let text = std::fs::read_to_string(&path).at(&path)?;
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| Error::bad_file(&path, format!("not JSON: {e}")))?;
    parse_config(&value).map_err(|e| match e {
        Error::Config(msg) => Error::bad_file(&path, msg),
        other => other,
    })
}

/// More layers than any model has: a larger count is a broken `config.json`, and
/// would otherwise ask for a per-layer list of that length before any weight is read.
pub const MAX_LAYERS: u64 = 4096;

/// More parameters than any machine holds (2^48, about 2.8e14: a petabyte in f32):
/// a larger shape is a mistyped `config.json`, and its sizes would overflow the
/// arithmetic of the memory plan and of the tensors themselves.
pub const MAX_PARAMS: u128 = 1 << 48;

/// Turn a parsed `config.json` into a [`Config`].
pub fn parse_config(value: &Value) -> Result<Config> {
    let model_type = value
        .get("model_type")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::Config("no \"model_type\" field".into()))?;
    for key in ["num_hidden_layers", "n_layer", "num_layers"] {
        if let Some(n) = value.get(key).and_then(Value::as_u64) {
            if n > MAX_LAYERS {
                return Err(Error::Config(format!(
                    "{key} {n} is not a plausible number of layers (at most {MAX_LAYERS})"
                )));
            }
        }
    }
    let cfg = match model_type {
        "llama" => from_value::<LlamaHf>(value)?.into_config(Family::Llama, value)?,
        "mistral" => from_value::<LlamaHf>(value)?.into_config(Family::Mistral, value)?,
        "falcon" | "RefinedWeb" | "RefinedWebModel" => {
            from_value::<FalconHf>(value)?.into_config(model_type)?
        }
        "gpt2" => from_value::<Gpt2Hf>(value)?.into_config()?,
        "gpt_neox" => from_value::<GptNeoxHf>(value)?.into_config()?,
        "gpt_neo" => from_value::<GptNeoHf>(value)?.into_config()?,
        other => {
            return Err(Error::Config(format!(
                "model_type \"{other}\" is not supported; supported: {}",
                SUPPORTED_MODEL_TYPES.join(", ")
            )));
        }
    };
    check_size(&cfg, value)?;
    check_config(&cfg)?;
    Ok(cfg)
}

/// Refuse a shape of more than [`MAX_PARAMS`] parameters (counted without
/// overflow), naming the fields of `raw` that size it.
fn check_size(cfg: &Config, raw: &Value) -> Result<()> {
    let count = cfg.param_count();
    if count.is_some_and(|n| n <= MAX_PARAMS) {
        return Ok(());
    }
    // The sizes as config.json spells them (the first of each family's names present).
    let named = |keys: &[&str], value: usize| {
        let key = keys
            .iter()
            .find(|k| raw.get(**k).is_some())
            .unwrap_or(&keys[0]);
        format!("{key} {value}")
    };
    let mut fields = vec![
        named(&["hidden_size", "n_embd", "d_model"], cfg.hidden_size),
        named(
            &["intermediate_size", "n_inner", "ffn_hidden_size"],
            cfg.intermediate_size,
        ),
        named(&["vocab_size"], cfg.vocab_size),
        named(&["num_hidden_layers", "n_layer", "num_layers"], cfg.n_layer),
    ];
    if cfg.position == PositionKind::Learned {
        fields.push(named(
            &["max_position_embeddings", "n_positions"],
            cfg.block_size,
        ));
    }
    if raw.get("head_dim").is_some() {
        fields.push(format!("head_dim {}", cfg.head_dim));
    }
    let how_many = match count {
        Some(n) => format!("{:.3e} parameters", n as f64),
        None => "more parameters than 128 bits can count".into(),
    };
    Err(Error::Config(format!(
        "{} make {how_many}, more than any machine holds (at most 2^48 = {:.2e}); is one of them mistyped?",
        fields.join(", "),
        MAX_PARAMS as f64
    )))
}

fn from_value<T: for<'de> Deserialize<'de>>(value: &Value) -> Result<T> {
    T::deserialize(value).map_err(|e| Error::Config(format!("unexpected config: {e}")))
}

/// The size of one attention head: `width / heads`, read before the shared checks of
/// [`check_config`] can run, so a zero head count is an error here rather than a division
/// by zero. `exact`: the family's layers need `heads × head size = width` (transformers
/// refuses the others too).
fn head_size(
    width: (&str, usize),
    heads: (&str, usize),
    explicit: Option<usize>,
    exact: bool,
) -> Result<usize> {
    let ((wname, w), (hname, h)) = (width, heads);
    if h == 0 {
        return Err(Error::Config(format!(
            "{hname} is 0; a model needs at least one attention head"
        )));
    }
    if let Some(d) = explicit {
        return Ok(d);
    }
    if exact && w % h != 0 {
        return Err(Error::Config(format!(
            "{wname} {w} is not a multiple of {hname} {h}; the heads must split the width evenly"
        )));
    }
    Ok(w / h)
}

fn check_config(cfg: &Config) -> Result<()> {
    let fail = |m: String| Err(Error::Config(m));
    if cfg.vocab_size == 0 || cfg.hidden_size == 0 || cfg.n_layer == 0 {
        return fail(format!(
            "vocab_size {}, hidden size {} and number of layers {} must all be positive",
            cfg.vocab_size, cfg.hidden_size, cfg.n_layer
        ));
    }
    if cfg.block_size == 0 {
        return fail(
            "max_position_embeddings (n_positions) is 0; the model would see no token".into(),
        );
    }
    if cfg.intermediate_size == 0 {
        return fail("the MLP width (intermediate_size, n_inner or ffn_hidden_size) is 0".into());
    }
    if cfg.head_dim == 0 {
        return fail(format!(
            "the head size is 0 (head_dim, or hidden size {} / {} heads)",
            cfg.hidden_size, cfg.n_head
        ));
    }
    if cfg.n_head == 0 || cfg.n_kv_head == 0 || cfg.n_head % cfg.n_kv_head != 0 {
        return fail(format!(
            "{} attention heads cannot be shared by {} key/value heads (num_key_value_heads / num_kv_heads must be positive and divide the number of heads)",
            cfg.n_head, cfg.n_kv_head
        ));
    }
    if !(cfg.norm_eps.is_finite() && cfg.norm_eps >= 0.0) {
        return fail(format!(
            "the norm epsilon {} (rms_norm_eps / layer_norm_eps(ilon)) must be a finite number >= 0",
            cfg.norm_eps
        ));
    }
    if cfg.windows.contains(&AttentionWindow::Sliding(0)) {
        return fail("an attention window (sliding_window / window_size) of 0 tokens sees nothing; use a positive size or null".into());
    }
    if cfg.windows.len() != cfg.n_layer {
        return fail(format!(
            "{} attention layer kinds for {} layers",
            cfg.windows.len(),
            cfg.n_layer
        ));
    }
    if let PositionKind::Rotary(r) = &cfg.position {
        if r.rotary_dims == 0 || r.rotary_dims % 2 != 0 || r.rotary_dims > cfg.head_dim {
            return fail(format!(
                "rotary dimensions {} must be even and at most the head size {}",
                r.rotary_dims, cfg.head_dim
            ));
        }
        if !(r.base.is_finite() && r.base > 0.0) {
            return fail(format!(
                "rope_theta (rotary base) {} must be a positive number",
                r.base
            ));
        }
        let positive = |x: f64| x.is_finite() && x > 0.0;
        match r.scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => {
                if !positive(factor) {
                    return fail(format!("rope scaling factor {factor} must be positive"));
                }
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                if !(positive(factor)
                    && positive(low_freq_factor)
                    && positive(high_freq_factor)
                    && high_freq_factor > low_freq_factor
                    && original_max_position_embeddings > 0)
                {
                    return fail(format!(
                        "llama3 rope scaling needs a positive factor ({factor}), 0 < low_freq_factor ({low_freq_factor}) < high_freq_factor ({high_freq_factor}) and a positive original_max_position_embeddings ({original_max_position_embeddings})"
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Rotary fields, spelled the 4.x way (`rope_theta`, `rope_scaling`) or the 5.x way
/// (`rope_parameters`).
#[derive(Debug, Deserialize, Default)]
struct RopeHf {
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    partial_rotary_factor: Option<f64>,
}

impl RopeHf {
    /// `default_base` / `default_fraction` are the family's defaults (or its own old names).
    /// A `default_fraction` of None marks a family whose rotary always covers the whole
    /// head: transformers' LLaMA, Mistral and Falcon ignore `partial_rotary_factor`.
    fn resolve(
        &self,
        head_dim: usize,
        default_base: f64,
        default_fraction: Option<f64>,
    ) -> Result<RotaryConfig> {
        let params = self.rope_parameters.as_ref();
        let get = |k: &str| params.and_then(|p| p.get(k)).and_then(Value::as_f64);
        let base = get("rope_theta")
            .or(self.rope_theta)
            .unwrap_or(default_base);
        let fraction = match default_fraction {
            Some(default) => get("partial_rotary_factor")
                .or(self.partial_rotary_factor)
                .unwrap_or(default),
            None => 1.0,
        };
        // 5.x keeps the scaling kind in rope_parameters; 4.x in rope_scaling.
        let scaling_src = match params {
            Some(p) if p.get("rope_type").is_some() => Some(p),
            _ => self.rope_scaling.as_ref().filter(|v| !v.is_null()),
        };
        let scaling = match scaling_src {
            None => RopeScaling::None,
            Some(s) => {
                let kind = s
                    .get("rope_type")
                    .or_else(|| s.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                let f = |k: &str, d: f64| s.get(k).and_then(Value::as_f64).unwrap_or(d);
                match kind {
                    "default" => RopeScaling::None,
                    "linear" => RopeScaling::Linear {
                        factor: f("factor", 1.0),
                    },
                    "llama3" => RopeScaling::Llama3 {
                        factor: f("factor", 8.0),
                        low_freq_factor: f("low_freq_factor", 1.0),
                        high_freq_factor: f("high_freq_factor", 4.0),
                        original_max_position_embeddings: f(
                            "original_max_position_embeddings",
                            8192.0,
                        ) as usize,
                    },
                    other => {
                        return Err(Error::Config(format!(
                            "rope type \"{other}\" is not supported (supported: default, linear, llama3)"
                        )));
                    }
                }
            }
        };
        Ok(RotaryConfig {
            rotary_dims: (head_dim as f64 * fraction) as usize,
            base,
            scaling,
        })
    }
}

fn activation(name: &str) -> Result<Activation> {
    Ok(match name {
        "silu" | "swish" => Activation::Silu,
        "gelu" | "gelu_python" => Activation::GeluErf,
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
        "relu" => Activation::Relu,
        other => {
            return Err(Error::Config(format!(
                "activation \"{other}\" is not supported (supported: silu, gelu, gelu_new, gelu_pytorch_tanh, relu)"
            )));
        }
    })
}

fn t() -> bool {
    true
}

// ---------------------------------------------------------------- LLaMA / Mistral

#[derive(Debug, Deserialize)]
struct LlamaHf {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "llama_max_pos")]
    max_position_embeddings: usize,
    #[serde(default = "llama_eps")]
    rms_norm_eps: f64,
    #[serde(default = "silu")]
    hidden_act: String,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(flatten)]
    rope: RopeHf,
}

fn llama_max_pos() -> usize {
    2048
}
fn llama_eps() -> f64 {
    1e-6
}
fn silu() -> String {
    "silu".into()
}

impl LlamaHf {
    fn into_config(self, family: Family, raw: &Value) -> Result<Config> {
        // transformers' LLaMA and Mistral floor the division when head_dim is absent.
        let head_dim = head_size(
            ("hidden_size", self.hidden_size),
            ("num_attention_heads", self.num_attention_heads),
            self.head_dim,
            false,
        )?;
        // MistralConfig defaults the window to 4096 when the key is absent; null means none.
        let window = match (family, raw.get("sliding_window")) {
            (Family::Mistral, None) => Some(4096),
            (_, None | Some(Value::Null)) => None,
            (_, Some(v)) => Some(v.as_u64().ok_or_else(|| {
                Error::Config(format!(
                    "sliding_window {v} is not a number of tokens (a positive integer, or null for none)"
                ))
            })? as usize),
        };
        let window = window.map_or(AttentionWindow::Global, AttentionWindow::Sliding);
        Ok(Config {
            family,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            n_layer: self.num_hidden_layers,
            block_size: self.max_position_embeddings,
            n_head: self.num_attention_heads,
            n_kv_head: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim,
            qkv_layout: QkvLayout::Separate,
            qkv_bias: self.attention_bias,
            attn_out_bias: self.attention_bias,
            position: PositionKind::Rotary(self.rope.resolve(head_dim, 10000.0, None)?),
            windows: vec![window; self.num_hidden_layers],
            scale_scores: true,
            scale_by_inverse_layer: false,
            norm: NormKind::RmsNorm,
            norm_eps: self.rms_norm_eps,
            residual: Residual::Sequential,
            shared_attention_norm: false,
            mlp: MlpKind::Gated,
            intermediate_size: self.intermediate_size,
            activation: activation(&self.hidden_act)?,
            mlp_bias: self.mlp_bias,
            tie_embeddings: self.tie_word_embeddings,
        })
    }
}

// ---------------------------------------------------------------- Falcon

#[derive(Debug, Deserialize)]
struct FalconHf {
    #[serde(default = "falcon_vocab")]
    vocab_size: usize,
    #[serde(default = "falcon_hidden")]
    hidden_size: usize,
    #[serde(alias = "n_layer", default = "falcon_layers")]
    num_hidden_layers: usize,
    #[serde(alias = "n_head", default = "falcon_heads")]
    num_attention_heads: usize,
    #[serde(alias = "n_head_kv")]
    num_kv_heads: Option<usize>,
    #[serde(default = "t")]
    multi_query: bool,
    new_decoder_architecture: Option<bool>,
    #[serde(default = "t")]
    parallel_attn: bool,
    #[serde(default)]
    bias: bool,
    #[serde(default)]
    alibi: bool,
    #[serde(default = "ln_eps")]
    layer_norm_epsilon: f64,
    num_ln_in_parallel_attn: Option<usize>,
    ffn_hidden_size: Option<usize>,
    #[serde(default = "gelu")]
    activation: String,
    #[serde(default = "falcon_max_pos")]
    max_position_embeddings: usize,
    #[serde(default = "t")]
    tie_word_embeddings: bool,
    head_dim: Option<usize>,
    #[serde(flatten)]
    rope: RopeHf,
}

fn falcon_vocab() -> usize {
    65024
}
fn falcon_hidden() -> usize {
    4544
}
fn falcon_layers() -> usize {
    32
}
fn falcon_heads() -> usize {
    71
}
fn falcon_max_pos() -> usize {
    2048
}
fn ln_eps() -> f64 {
    1e-5
}
fn gelu() -> String {
    "gelu".into()
}

impl FalconHf {
    fn into_config(self, model_type: &str) -> Result<Config> {
        if self.alibi {
            return Err(Error::Config(
                "Falcon with ALiBi positions (alibi: true) is not supported; use a rotary Falcon (falcon-7b, falcon-40b, ...)".into(),
            ));
        }
        // The legacy "RefinedWeb" type is the new decoder (Falcon-40B); "RefinedWebModel" the old one.
        let new_arch = self
            .new_decoder_architecture
            .unwrap_or(model_type == "RefinedWeb");
        let n_head = self.num_attention_heads;
        let n_kv_head = if new_arch {
            self.num_kv_heads.unwrap_or(n_head)
        } else if self.multi_query {
            1
        } else {
            n_head
        };
        let head_dim = head_size(
            ("hidden_size", self.hidden_size),
            ("num_attention_heads (n_head)", n_head),
            self.head_dim,
            true,
        )?;
        let n_ln = self
            .num_ln_in_parallel_attn
            .unwrap_or(if new_arch { 2 } else { 1 });
        let parallel = self.parallel_attn || new_arch;
        let shared_norm = parallel && (if new_arch { n_ln == 1 } else { true });
        Ok(Config {
            family: Family::Falcon,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            n_layer: self.num_hidden_layers,
            block_size: self.max_position_embeddings,
            n_head,
            n_kv_head,
            head_dim,
            qkv_layout: QkvLayout::FusedGrouped,
            qkv_bias: self.bias,
            attn_out_bias: self.bias,
            position: PositionKind::Rotary(self.rope.resolve(head_dim, 10000.0, None)?),
            windows: vec![AttentionWindow::Global; self.num_hidden_layers],
            scale_scores: true,
            scale_by_inverse_layer: false,
            norm: NormKind::LayerNorm,
            norm_eps: self.layer_norm_epsilon,
            residual: if parallel {
                Residual::Parallel
            } else {
                Residual::Sequential
            },
            shared_attention_norm: shared_norm,
            mlp: MlpKind::Plain,
            intermediate_size: self
                .ffn_hidden_size
                .unwrap_or(self.hidden_size.saturating_mul(4)),
            activation: activation(&self.activation)?,
            mlp_bias: self.bias,
            tie_embeddings: self.tie_word_embeddings,
        })
    }
}

// ---------------------------------------------------------------- GPT-2

#[derive(Debug, Deserialize)]
struct Gpt2Hf {
    #[serde(default = "gpt2_vocab")]
    vocab_size: usize,
    #[serde(default = "gpt2_pos")]
    n_positions: usize,
    #[serde(default = "gpt2_embd")]
    n_embd: usize,
    #[serde(default = "gpt2_layer")]
    n_layer: usize,
    #[serde(default = "gpt2_head")]
    n_head: usize,
    n_inner: Option<usize>,
    #[serde(default = "gelu_new")]
    activation_function: String,
    #[serde(default = "ln_eps")]
    layer_norm_epsilon: f64,
    #[serde(default = "t")]
    scale_attn_weights: bool,
    #[serde(default)]
    scale_attn_by_inverse_layer_idx: bool,
    #[serde(default = "t")]
    tie_word_embeddings: bool,
}

fn gpt2_vocab() -> usize {
    50257
}
fn gpt2_pos() -> usize {
    1024
}
fn gpt2_embd() -> usize {
    768
}
fn gpt2_layer() -> usize {
    12
}
fn gpt2_head() -> usize {
    12
}
fn gelu_new() -> String {
    "gelu_new".into()
}

impl Gpt2Hf {
    fn into_config(self) -> Result<Config> {
        let head_dim = head_size(("n_embd", self.n_embd), ("n_head", self.n_head), None, true)?;
        Ok(Config {
            family: Family::Gpt2,
            vocab_size: self.vocab_size,
            hidden_size: self.n_embd,
            n_layer: self.n_layer,
            block_size: self.n_positions,
            n_head: self.n_head,
            n_kv_head: self.n_head,
            head_dim,
            qkv_layout: QkvLayout::FusedBlocked,
            qkv_bias: true,
            attn_out_bias: true,
            position: PositionKind::Learned,
            windows: vec![AttentionWindow::Global; self.n_layer],
            scale_scores: self.scale_attn_weights,
            scale_by_inverse_layer: self.scale_attn_by_inverse_layer_idx,
            norm: NormKind::LayerNorm,
            norm_eps: self.layer_norm_epsilon,
            residual: Residual::Sequential,
            shared_attention_norm: false,
            mlp: MlpKind::Plain,
            intermediate_size: self.n_inner.unwrap_or(self.n_embd.saturating_mul(4)),
            activation: activation(&self.activation_function)?,
            mlp_bias: true,
            tie_embeddings: self.tie_word_embeddings,
        })
    }
}

// ---------------------------------------------------------------- GPT-NeoX

#[derive(Debug, Deserialize)]
struct GptNeoxHf {
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    #[serde(default = "gelu")]
    hidden_act: String,
    #[serde(default = "neox_pct")]
    rotary_pct: f64,
    #[serde(default = "neox_base")]
    rotary_emb_base: f64,
    #[serde(default = "falcon_max_pos")]
    max_position_embeddings: usize,
    #[serde(default = "ln_eps")]
    layer_norm_eps: f64,
    #[serde(default = "t")]
    use_parallel_residual: bool,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default = "t")]
    attention_bias: bool,
    #[serde(flatten)]
    rope: RopeHf,
}

fn neox_pct() -> f64 {
    0.25
}
fn neox_base() -> f64 {
    10000.0
}

impl GptNeoxHf {
    fn into_config(self) -> Result<Config> {
        let head_dim = head_size(
            ("hidden_size", self.hidden_size),
            ("num_attention_heads", self.num_attention_heads),
            None,
            true,
        )?;
        let rotary = self
            .rope
            .resolve(head_dim, self.rotary_emb_base, Some(self.rotary_pct))?;
        Ok(Config {
            family: Family::GptNeox,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            n_layer: self.num_hidden_layers,
            block_size: self.max_position_embeddings,
            n_head: self.num_attention_heads,
            n_kv_head: self.num_attention_heads,
            head_dim,
            qkv_layout: QkvLayout::FusedGrouped,
            qkv_bias: self.attention_bias,
            attn_out_bias: self.attention_bias,
            position: PositionKind::Rotary(rotary),
            windows: vec![AttentionWindow::Global; self.num_hidden_layers],
            scale_scores: true,
            scale_by_inverse_layer: false,
            norm: NormKind::LayerNorm,
            norm_eps: self.layer_norm_eps,
            residual: if self.use_parallel_residual {
                Residual::Parallel
            } else {
                Residual::Sequential
            },
            shared_attention_norm: false,
            mlp: MlpKind::Plain,
            intermediate_size: self.intermediate_size,
            activation: activation(&self.hidden_act)?,
            mlp_bias: true,
            tie_embeddings: self.tie_word_embeddings,
        })
    }
}

// ---------------------------------------------------------------- GPT-Neo

#[derive(Debug, Deserialize)]
struct GptNeoHf {
    #[serde(default = "gpt2_vocab")]
    vocab_size: usize,
    #[serde(default = "falcon_max_pos")]
    max_position_embeddings: usize,
    hidden_size: usize,
    num_layers: usize,
    num_heads: usize,
    intermediate_size: Option<usize>,
    #[serde(default = "neo_window")]
    window_size: usize,
    #[serde(default = "gelu_new")]
    activation_function: String,
    #[serde(default = "ln_eps")]
    layer_norm_epsilon: f64,
    #[serde(default = "t")]
    tie_word_embeddings: bool,
    attention_layers: Option<Vec<String>>,
    attention_types: Option<Vec<(Vec<String>, usize)>>,
}

fn neo_window() -> usize {
    256
}

impl GptNeoHf {
    fn into_config(self) -> Result<Config> {
        let head_dim = head_size(
            ("hidden_size", self.hidden_size),
            ("num_heads", self.num_heads),
            None,
            true,
        )?;
        // `attention_layers` is the expanded list; `attention_types` is
        // `[[["global", "local"], repeat], ...]`.
        let kinds: Vec<String> = match (self.attention_layers, self.attention_types) {
            (Some(l), _) if !l.is_empty() => l,
            (_, Some(types)) => {
                let described = types.iter().fold(0u128, |acc, (pattern, n)| {
                    acc + pattern.len() as u128 * *n as u128
                });
                if described != self.num_layers as u128 {
                    return Err(Error::Config(format!(
                        "attention_types describe {described} layers, num_layers is {}",
                        self.num_layers
                    )));
                }
                types
                    .into_iter()
                    .flat_map(|(pattern, n)| (0..n).flat_map(move |_| pattern.clone()))
                    .collect()
            }
            _ => vec!["global".into(); self.num_layers],
        };
        let windows = kinds
            .iter()
            .map(|k| match k.as_str() {
                "global" => Ok(AttentionWindow::Global),
                "local" => Ok(AttentionWindow::Sliding(self.window_size)),
                other => Err(Error::Config(format!(
                    "attention layer kind \"{other}\" is not supported (global, local)"
                ))),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Config {
            family: Family::GptNeo,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            n_layer: self.num_layers,
            block_size: self.max_position_embeddings,
            n_head: self.num_heads,
            n_kv_head: self.num_heads,
            head_dim,
            qkv_layout: QkvLayout::Separate,
            qkv_bias: false,
            attn_out_bias: true,
            position: PositionKind::Learned,
            windows,
            scale_scores: false,
            scale_by_inverse_layer: false,
            norm: NormKind::LayerNorm,
            norm_eps: self.layer_norm_epsilon,
            residual: Residual::Sequential,
            shared_attention_norm: false,
            mlp: MlpKind::Plain,
            intermediate_size: self
                .intermediate_size
                .unwrap_or(self.hidden_size.saturating_mul(4)),
            activation: activation(&self.activation_function)?,
            mlp_bias: true,
            tie_embeddings: self.tie_word_embeddings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn falcon_multi_query_wins_over_num_kv_heads() {
        let v = json!({"model_type": "falcon", "hidden_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": 2, "num_kv_heads": 4, "multi_query": true,
            "new_decoder_architecture": false, "vocab_size": 10});
        let c = parse_config(&v).unwrap();
        assert_eq!(c.n_kv_head, 1);
        assert!(c.shared_attention_norm);
        assert_eq!(c.residual, Residual::Parallel);
    }

    #[test]
    fn falcon_new_decoder_uses_kv_heads_and_two_norms() {
        let v = json!({"model_type": "RefinedWeb", "hidden_size": 64, "n_head": 8,
            "n_layer": 2, "n_head_kv": 2, "vocab_size": 10});
        let c = parse_config(&v).unwrap();
        assert_eq!((c.n_head, c.n_kv_head), (8, 2));
        assert!(!c.shared_attention_norm);
    }

    #[test]
    fn neox_partial_rotary_from_4x_and_5x_names() {
        let mut v = json!({"model_type": "gpt_neox", "hidden_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": 1, "intermediate_size": 256, "vocab_size": 10,
            "rotary_pct": 0.25, "rotary_emb_base": 500.0});
        let c = parse_config(&v).unwrap();
        let PositionKind::Rotary(r) = &c.position else {
            panic!()
        };
        assert_eq!((r.rotary_dims, r.base), (4, 500.0));
        v["rope_parameters"] =
            json!({"rope_theta": 1000.0, "partial_rotary_factor": 0.5, "rope_type": "default"});
        let c = parse_config(&v).unwrap();
        let PositionKind::Rotary(r) = &c.position else {
            panic!()
        };
        assert_eq!((r.rotary_dims, r.base), (8, 1000.0));
    }

    #[test]
    fn llama_rotates_the_whole_head_whatever_partial_rotary_factor_says() {
        // transformers' LLaMA/Mistral/Falcon rotary ignores the factor (found by a
        // utils/make_fixtures.py variant: logits differed by 0.33).
        let v = json!({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": 1, "intermediate_size": 128, "vocab_size": 10,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                "partial_rotary_factor": 0.5}});
        let c = parse_config(&v).unwrap();
        let PositionKind::Rotary(r) = &c.position else {
            panic!()
        };
        assert_eq!(r.rotary_dims, 16);
    }

    #[test]
    fn gpt_neo_expands_attention_types() {
        let mut v = json!({"model_type": "gpt_neo", "hidden_size": 64, "num_heads": 4, "num_layers": 4,
            "window_size": 8, "attention_types": [[["global", "local"], 2]]});
        let c = parse_config(&v).unwrap();
        assert_eq!(c.windows[1], AttentionWindow::Sliding(8));
        assert_eq!(c.windows[2], AttentionWindow::Global);
        // A repeat count out of proportion is an error, not a huge allocation.
        v["attention_types"] = json!([[["global", "local"], 1_000_000_000_000u64]]);
        let e = parse_config(&v).unwrap_err().to_string();
        assert!(e.contains("describe 2000000000000 layers"), "{e}");
    }

    #[test]
    fn unknown_model_type_lists_supported() {
        let err = parse_config(&json!({"model_type": "bert"}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("bert") && err.contains("gpt_neox"), "{err}");
    }

    #[test]
    fn mistral_window_default_and_null() {
        let base = json!({"model_type": "mistral", "hidden_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": 1, "intermediate_size": 128, "vocab_size": 10});
        assert_eq!(
            parse_config(&base).unwrap().windows[0],
            AttentionWindow::Sliding(4096)
        );
        let mut v = base.clone();
        v["sliding_window"] = Value::Null;
        assert_eq!(
            parse_config(&v).unwrap().windows[0],
            AttentionWindow::Global
        );
    }

    /// A small valid config of each family, for the hostile variants below.
    fn base_of(model_type: &str) -> Value {
        match model_type {
            "llama" | "mistral" => json!({"model_type": model_type, "hidden_size": 64,
                "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 128,
                "vocab_size": 10}),
            "falcon" => json!({"model_type": "falcon", "hidden_size": 64,
                "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 10}),
            "gpt2" => json!({"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2,
                "vocab_size": 10}),
            "gpt_neox" => json!({"model_type": "gpt_neox", "hidden_size": 64,
                "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 256,
                "vocab_size": 10}),
            "gpt_neo" => json!({"model_type": "gpt_neo", "hidden_size": 64, "num_heads": 4,
                "num_layers": 2, "vocab_size": 10}),
            other => panic!("{other}"),
        }
    }

    const TYPES: [&str; 6] = ["llama", "mistral", "falcon", "gpt2", "gpt_neox", "gpt_neo"];

    /// The key a family uses for `generic` (heads, width, layers, ...).
    fn key(model_type: &str, generic: &str) -> &'static str {
        match (model_type, generic) {
            ("gpt2", "heads") => "n_head",
            ("gpt_neo", "heads") => "num_heads",
            (_, "heads") => "num_attention_heads",
            ("gpt2", "width") => "n_embd",
            (_, "width") => "hidden_size",
            ("gpt2", "layers") => "n_layer",
            ("gpt_neo", "layers") => "num_layers",
            (_, "layers") => "num_hidden_layers",
            ("gpt2", "positions") => "n_positions",
            (_, "positions") => "max_position_embeddings",
            _ => "vocab_size",
        }
    }

    /// `num_attention_heads: 0` is an error naming the field in every family, not a
    /// division by zero.
    #[test]
    fn zero_heads_is_an_error_naming_the_field_in_every_family() {
        for t in TYPES {
            let mut v = base_of(t);
            assert!(parse_config(&v).is_ok(), "{t}: base config");
            let k = key(t, "heads");
            v[k] = json!(0);
            let e = parse_config(&v).unwrap_err().to_string();
            assert!(e.contains(k) && e.contains("0"), "{t}: {e}");
        }
    }

    #[test]
    fn zero_or_inconsistent_sizes_are_errors_in_every_family() {
        for t in TYPES {
            for (generic, value) in [
                ("width", 0),
                ("width", 66),
                ("layers", 0),
                ("vocab", 0),
                ("positions", 0),
            ] {
                let mut v = base_of(t);
                v[key(t, generic)] = json!(value);
                // LLaMA floors a width that the heads do not divide, as transformers does.
                if generic == "width" && value == 66 && matches!(t, "llama" | "mistral") {
                    continue;
                }
                assert!(parse_config(&v).is_err(), "{t}: {generic} {value} accepted");
            }
        }
    }

    /// Issue 23, case 17: a width of 1e9 or 2^62 made the memory plan wrap around
    /// ("parameters 0.0 MiB"); such a shape is refused, naming its fields.
    #[test]
    fn shapes_no_machine_holds_are_errors_naming_the_field() {
        for t in TYPES {
            for width in [1_000_000_000u64, 1 << 62, u64::MAX - 63] {
                let mut v = base_of(t);
                let k = key(t, "width");
                v[k] = json!(width);
                let e = parse_config(&v).unwrap_err().to_string();
                assert!(
                    e.contains(&format!("{k} {width}")) && e.contains("more than any machine"),
                    "{t} {width}: {e}"
                );
            }
            for vocab in [1u64 << 50, u64::MAX] {
                let mut v = base_of(t);
                v["vocab_size"] = json!(vocab);
                let e = parse_config(&v).unwrap_err().to_string();
                assert!(e.contains(&format!("vocab_size {vocab}")), "{t}: {e}");
            }
        }
        // The count itself never wraps.
        let mut cfg = parse_config(&base_of("llama")).unwrap();
        cfg.hidden_size = 1 << 62;
        assert_eq!(cfg.num_params(), usize::MAX);
        cfg.hidden_size = usize::MAX;
        cfg.head_dim = usize::MAX;
        assert_eq!(cfg.param_count(), None);
        assert_eq!(cfg.num_params(), usize::MAX);
    }

    #[test]
    fn absurd_layer_counts_are_errors_before_any_allocation() {
        for t in TYPES {
            let mut v = base_of(t);
            v[key(t, "layers")] = json!(u64::MAX);
            let e = parse_config(&v).unwrap_err().to_string();
            assert!(e.contains("plausible"), "{t}: {e}");
        }
    }

    #[test]
    fn bad_kv_heads_windows_and_rope_values_are_errors() {
        let mut cases = Vec::new();
        for kv in [0, 3] {
            let mut v = base_of("llama");
            v["num_key_value_heads"] = json!(kv);
            cases.push(v);
            let mut v = base_of("falcon");
            v["new_decoder_architecture"] = json!(true);
            v["num_kv_heads"] = json!(kv);
            cases.push(v);
        }
        for (k, val) in [
            ("head_dim", json!(0)),
            ("intermediate_size", json!(0)),
            ("rms_norm_eps", json!(-1.0)),
            ("rope_theta", json!(0.0)),
            ("rope_theta", json!(-10000.0)),
            ("sliding_window", json!(0)),
            ("sliding_window", json!(-5)),
            ("sliding_window", json!("yes")),
            ("rope_scaling", json!({"type": "linear", "factor": 0.0})),
            (
                "rope_scaling",
                json!({"rope_type": "llama3", "factor": 8.0,
                "low_freq_factor": 4.0, "high_freq_factor": 4.0}),
            ),
        ] {
            let mut v = base_of("mistral");
            v[k] = val;
            cases.push(v);
        }
        let mut v = base_of("gpt_neox");
        v["rotary_pct"] = json!(0.0);
        cases.push(v);
        let mut v = base_of("gpt_neo");
        v["window_size"] = json!(0);
        v["attention_layers"] = json!(["local", "global"]);
        cases.push(v);
        for v in cases {
            assert!(parse_config(&v).is_err(), "accepted {v}");
        }
    }
}
