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

/// Turn a parsed `config.json` into a [`Config`].
pub fn parse_config(value: &Value) -> Result<Config> {
    let model_type = value
        .get("model_type")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::Config("no \"model_type\" field".into()))?;
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
    check_config(&cfg)?;
    Ok(cfg)
}

fn from_value<T: for<'de> Deserialize<'de>>(value: &Value) -> Result<T> {
    T::deserialize(value).map_err(|e| Error::Config(format!("unexpected config: {e}")))
}

fn check_config(cfg: &Config) -> Result<()> {
    let fail = |m: String| Err(Error::Config(m));
    if cfg.n_head == 0 || cfg.n_kv_head == 0 || cfg.n_head % cfg.n_kv_head != 0 {
        return fail(format!(
            "{} attention heads cannot be shared by {} key/value heads",
            cfg.n_head, cfg.n_kv_head
        ));
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
    }
    if cfg.vocab_size == 0 || cfg.hidden_size == 0 || cfg.n_layer == 0 {
        return fail("vocab_size, hidden_size and the number of layers must be positive".into());
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
        let head_dim = self
            .head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads);
        // MistralConfig defaults the window to 4096 when the key is absent; null means none.
        let window = match (family, raw.get("sliding_window")) {
            (Family::Mistral, None) => Some(4096),
            (_, Some(Value::Number(n))) => n.as_u64().map(|n| n as usize),
            _ => None,
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
        let head_dim = self.head_dim.unwrap_or(self.hidden_size / n_head);
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
            intermediate_size: self.ffn_hidden_size.unwrap_or(4 * self.hidden_size),
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
        Ok(Config {
            family: Family::Gpt2,
            vocab_size: self.vocab_size,
            hidden_size: self.n_embd,
            n_layer: self.n_layer,
            block_size: self.n_positions,
            n_head: self.n_head,
            n_kv_head: self.n_head,
            head_dim: self.n_embd / self.n_head,
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
            intermediate_size: self.n_inner.unwrap_or(4 * self.n_embd),
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
        let head_dim = self.hidden_size / self.num_attention_heads;
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
        // `attention_layers` is the expanded list; `attention_types` is
        // `[[["global", "local"], repeat], ...]`.
        let kinds: Vec<String> = match (self.attention_layers, self.attention_types) {
            (Some(l), _) if !l.is_empty() => l,
            (_, Some(types)) => types
                .into_iter()
                .flat_map(|(pattern, n)| (0..n).flat_map(move |_| pattern.clone()))
                .collect(),
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
            head_dim: self.hidden_size / self.num_heads,
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
            intermediate_size: self.intermediate_size.unwrap_or(4 * self.hidden_size),
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
        let v = json!({"model_type": "gpt_neo", "hidden_size": 64, "num_heads": 4, "num_layers": 4,
            "window_size": 8, "attention_types": [[["global", "local"], 2]]});
        let c = parse_config(&v).unwrap();
        assert_eq!(c.windows[1], AttentionWindow::Sliding(8));
        assert_eq!(c.windows[2], AttentionWindow::Global);
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
}
