//! Where each weight of the decoder lives in a family's Hugging Face checkpoint.
//!
//! One table per family; `{i}` in a layer path is the layer index. A linear layer's
//! weight is `<module>.weight` (and `<module>.bias`); a norm's likewise.

use crate::config::{Config, Family, Residual};

/// Module paths of one family. Layer entries are relative to `layer`.
#[derive(Debug, Clone)]
pub struct WeightNames {
    pub embed: &'static str,
    pub pos_embed: Option<&'static str>,
    pub layer: &'static str,
    pub attn_norm: &'static str,
    /// None when attention and MLP share the first norm (Falcon-7B).
    pub mlp_norm: Option<&'static str>,
    pub q: &'static str,
    pub k: &'static str,
    pub v: &'static str,
    /// The fused projection, for families that store one.
    pub qkv: &'static str,
    pub attn_out: &'static str,
    pub mlp_up: &'static str,
    pub mlp_gate: &'static str,
    pub mlp_down: &'static str,
    pub final_norm: &'static str,
    pub lm_head: &'static str,
    /// Another name the head goes by (transformers 5 calls GPT-NeoX's `embed_out` `lm_head`).
    pub lm_head_alias: Option<&'static str>,
    /// GPT-2 stores linear weights as Conv1D, `(in, out)`.
    pub conv1d: bool,
}

impl WeightNames {
    /// The table for `cfg`'s family (Falcon's norm names depend on its block layout).
    pub fn for_config(cfg: &Config) -> WeightNames {
        match cfg.family {
            Family::Llama | Family::Mistral => WeightNames {
                embed: "model.embed_tokens",
                pos_embed: None,
                layer: "model.layers.{i}",
                attn_norm: "input_layernorm",
                mlp_norm: Some("post_attention_layernorm"),
                q: "self_attn.q_proj",
                k: "self_attn.k_proj",
                v: "self_attn.v_proj",
                qkv: "",
                attn_out: "self_attn.o_proj",
                mlp_up: "mlp.up_proj",
                mlp_gate: "mlp.gate_proj",
                mlp_down: "mlp.down_proj",
                final_norm: "model.norm",
                lm_head: "lm_head",
                lm_head_alias: None,
                conv1d: false,
            },
            Family::Falcon => {
                let (attn_norm, mlp_norm) = match (cfg.residual, cfg.shared_attention_norm) {
                    (Residual::Parallel, true) => ("input_layernorm", None),
                    (Residual::Parallel, false) => ("ln_attn", Some("ln_mlp")),
                    (Residual::Sequential, _) => {
                        ("input_layernorm", Some("post_attention_layernorm"))
                    }
                };
                WeightNames {
                    embed: "transformer.word_embeddings",
                    pos_embed: None,
                    layer: "transformer.h.{i}",
                    attn_norm,
                    mlp_norm,
                    q: "",
                    k: "",
                    v: "",
                    qkv: "self_attention.query_key_value",
                    attn_out: "self_attention.dense",
                    mlp_up: "mlp.dense_h_to_4h",
                    mlp_gate: "",
                    mlp_down: "mlp.dense_4h_to_h",
                    final_norm: "transformer.ln_f",
                    lm_head: "lm_head",
                    lm_head_alias: None,
                    conv1d: false,
                }
            }
            Family::Gpt2 => WeightNames {
                embed: "transformer.wte",
                pos_embed: Some("transformer.wpe"),
                layer: "transformer.h.{i}",
                attn_norm: "ln_1",
                mlp_norm: Some("ln_2"),
                q: "",
                k: "",
                v: "",
                qkv: "attn.c_attn",
                attn_out: "attn.c_proj",
                mlp_up: "mlp.c_fc",
                mlp_gate: "",
                mlp_down: "mlp.c_proj",
                final_norm: "transformer.ln_f",
                lm_head: "lm_head",
                lm_head_alias: None,
                conv1d: true,
            },
            Family::GptNeox => WeightNames {
                embed: "gpt_neox.embed_in",
                pos_embed: None,
                layer: "gpt_neox.layers.{i}",
                attn_norm: "input_layernorm",
                mlp_norm: Some("post_attention_layernorm"),
                q: "",
                k: "",
                v: "",
                qkv: "attention.query_key_value",
                attn_out: "attention.dense",
                mlp_up: "mlp.dense_h_to_4h",
                mlp_gate: "",
                mlp_down: "mlp.dense_4h_to_h",
                final_norm: "gpt_neox.final_layer_norm",
                lm_head: "embed_out",
                lm_head_alias: Some("lm_head"),
                conv1d: false,
            },
            Family::GptNeo => WeightNames {
                embed: "transformer.wte",
                pos_embed: Some("transformer.wpe"),
                layer: "transformer.h.{i}",
                attn_norm: "ln_1",
                mlp_norm: Some("ln_2"),
                q: "attn.attention.q_proj",
                k: "attn.attention.k_proj",
                v: "attn.attention.v_proj",
                qkv: "",
                attn_out: "attn.attention.out_proj",
                mlp_up: "mlp.c_fc",
                mlp_gate: "",
                mlp_down: "mlp.c_proj",
                final_norm: "transformer.ln_f",
                lm_head: "lm_head",
                lm_head_alias: None,
                conv1d: false,
            },
        }
    }

    /// Our name for a module path that may use an alias (`lm_head` → `embed_out` for GPT-NeoX).
    pub fn canonical(&self, module: &str) -> String {
        match self.lm_head_alias {
            Some(alias) if module == alias => self.lm_head.to_string(),
            _ => module.to_string(),
        }
    }

    /// Full path of a module of layer `i`.
    pub fn in_layer(&self, i: usize, module: &str) -> String {
        format!("{}.{module}", self.layer.replace("{i}", &i.to_string()))
    }
}
