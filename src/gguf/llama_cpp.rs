//! LLaMA/Mistral and Falcon checkpoints as llama.cpp reads them: tensor names,
//! layouts, hyper-parameters and the tokenizer, as llama.cpp's `convert_hf_to_gguf.py`
//! writes them.
//!
//! Names (`N` the layer):
//!
//! ```text
//! HF (LLaMA / Mistral)             GGUF                HF (Falcon)
//! model.embed_tokens               token_embd          transformer.word_embeddings
//! layers.N.input_layernorm         blk.N.attn_norm     h.N.input_layernorm | ln_attn (+ bias)
//!                                  blk.N.attn_norm_2   h.N.ln_mlp (new decoder, + bias)
//! layers.N.self_attn.{q,k,v}_proj  blk.N.attn_{q,k,v}  h.N.self_attention.query_key_value → attn_qkv
//! layers.N.self_attn.o_proj        blk.N.attn_output   h.N.self_attention.dense
//! layers.N.post_attention_layernorm blk.N.ffn_norm
//! layers.N.mlp.{gate,up,down}_proj blk.N.ffn_{gate,up,down}  h.N.mlp.dense_h_to_4h / dense_4h_to_h → ffn_up / ffn_down
//! model.norm                       output_norm         transformer.ln_f (+ bias)
//! lm_head                          output (absent when tied: llama.cpp reuses token_embd)
//! ```
//!
//! Two layouts change. LLaMA's query and key rows are permuted per head from Hugging
//! Face's half-split rotary layout to llama.cpp's interleaved pairs:
//! `new[h, 2i + j] = old[h, j·hd/2 + i]` (heads of `hd` rows). Falcon's fused
//! projection, stored per key/value group `[q heads…, k, v]`, is regrouped as
//! `[all q | all k | all v]` (`tensor_data_layout = "jploski"`).
//!
//! Matrices are stored in the chosen type (row lengths not a multiple of 32 fall back
//! to f16, as the converter does); norms, biases and `rope_freqs` stay f32. With
//! `q4_0`, the output head (or the tied embeddings that serve as head) is kept at
//! `q8_0`, as llama-quantize keeps it at a higher precision.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device};

use super::{GgmlType, GgufTensor, QuantType, Value, write_gguf};
use crate::config::{
    Activation, AttentionWindow, Config, Family, MlpKind, NormKind, PositionKind, QkvLayout,
    Residual, RopeScaling,
};
use crate::error::{Error, Result};
use crate::model::names::WeightNames;
use crate::model::weights::{TensorSource, Weights};

/// What `quantize` wrote.
#[derive(Debug, Clone)]
pub struct QuantizeReport {
    pub arch: &'static str,
    pub bytes: u64,
    pub tensors: usize,
    /// Matrices that could not take the type asked for, and what they got.
    pub fallbacks: Vec<String>,
}

/// Write the checkpoint in `dir` as a GGUF file at `output`, matrices as `ty`. An
/// existing `output` is replaced only with `overwrite`.
pub fn quantize(
    dir: &Path,
    output: &Path,
    ty: QuantType,
    overwrite: bool,
) -> Result<QuantizeReport> {
    check_not_an_input(dir, output)?;
    if output.exists() && !overwrite {
        return Err(Error::Usage(format!(
            "--output {} exists; pass --overwrite to replace it",
            output.display()
        )));
    }
    if output.is_dir() {
        return Err(Error::Usage(format!(
            "--output {} is a folder; name the .gguf file to write",
            output.display()
        )));
    }
    let (cfg, weights) = crate::hf::open(dir)?;
    let arch = check_supported(&cfg)?;
    let name = dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".into());
    let mut meta = hyper_parameters(&cfg, arch, &name, ty)?;
    meta.extend(super::tokenizer::tokenizer_metadata(dir, &cfg)?);
    let mut fallbacks = Vec::new();
    let tensors = tensors(&cfg, Arc::new(weights), ty, &mut fallbacks)?;
    let bytes = write_gguf(output, &meta, &tensors)?;
    Ok(QuantizeReport {
        arch,
        bytes,
        tensors: tensors.len(),
        fallbacks,
    })
}

/// Refuse an `output` that is one of the checkpoint's own files (even with
/// `--overwrite`, as `merge-lora` and `convert-to-hf` refuse their input): the weights,
/// config and tokenizer quantize reads, compared by canonical path, so a symlink to
/// one, or a symlink in the folder pointing at the output, is caught too. Other files
/// of the folder (an earlier `.gguf`) may be replaced; a new file may be written there.
fn check_not_an_input(dir: &Path, output: &Path) -> Result<()> {
    let Ok(out) = output.canonicalize() else {
        // Nothing there yet (or a dangling link): nothing it could replace.
        return Ok(());
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(()); // `hf::open` names the folder's problem.
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let is_gguf = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
        if is_gguf {
            continue;
        }
        if path.canonicalize().is_ok_and(|p| p == out) {
            return Err(Error::Usage(format!(
                "--output {} is {}, a file of --checkpoint-dir {} that quantize reads; write the GGUF file elsewhere (e.g. {}), --overwrite does not replace an input",
                output.display(),
                path.display(),
                dir.display(),
                dir.join("model.gguf").display()
            )));
        }
    }
    Ok(())
}

/// The llama.cpp architecture for `cfg`, or why llama.cpp cannot run it.
pub fn check_supported(cfg: &Config) -> Result<&'static str> {
    let fam = cfg.family.model_type();
    let unsupported = |why: &str| {
        Err(Error::Usage(format!(
            "quantize cannot write this {fam} checkpoint for llama.cpp: {why}"
        )))
    };
    let PositionKind::Rotary(rope) = &cfg.position else {
        return unsupported("it has no rotary embeddings");
    };
    if rope.rotary_dims != cfg.head_dim {
        return unsupported("its rotary embeddings cover only part of each head");
    }
    match cfg.family {
        Family::Llama | Family::Mistral => {
            if cfg.mlp != MlpKind::Gated || cfg.norm != NormKind::RmsNorm {
                return unsupported("llama.cpp's llama architecture needs RMSNorm and a gated MLP");
            }
            if cfg.activation != Activation::Silu {
                return unsupported("llama.cpp's llama architecture uses SiLU");
            }
            if let Some(AttentionWindow::Sliding(w)) =
                cfg.windows.iter().find(|w| **w != AttentionWindow::Global)
            {
                if *w < cfg.block_size {
                    eprintln!(
                        "note: llama.cpp's llama architecture attends globally; this model's \
                         sliding window of {w} tokens is not applied (outputs agree up to {w} tokens)"
                    );
                }
            }
            Ok("llama")
        }
        Family::Falcon => {
            if cfg.residual != Residual::Parallel {
                return unsupported("llama.cpp's falcon architecture needs parallel attention");
            }
            if cfg.qkv_bias || cfg.attn_out_bias || cfg.mlp_bias {
                return unsupported("llama.cpp's falcon architecture has no linear biases");
            }
            Ok("falcon")
        }
        _ => Err(Error::Usage(format!(
            "quantize writes llama.cpp files for the llama, mistral and falcon families; \
             {fam} is not supported (llama.cpp's convert_hf_to_gguf.py handles other families)"
        ))),
    }
}

fn hyper_parameters(
    cfg: &Config,
    arch: &str,
    name: &str,
    ty: QuantType,
) -> Result<Vec<(String, Value)>> {
    let PositionKind::Rotary(rope) = &cfg.position else {
        unreachable!("checked by check_supported")
    };
    let u = |n: usize| Value::U32(n as u32);
    let k = |key: &str| format!("{arch}.{key}");
    let mut m = vec![
        ("general.architecture".to_string(), Value::Str(arch.into())),
        ("general.name".into(), Value::Str(name.into())),
        ("general.file_type".into(), Value::U32(ty.file_type())),
        ("general.quantization_version".into(), Value::U32(2)),
        (
            "general.alignment".into(),
            Value::U32(super::ALIGNMENT as u32),
        ),
        (k("vocab_size"), u(cfg.vocab_size)),
        (k("context_length"), u(cfg.block_size)),
        (k("embedding_length"), u(cfg.hidden_size)),
        (k("block_count"), u(cfg.n_layer)),
        (k("feed_forward_length"), u(cfg.intermediate_size)),
        (k("attention.head_count"), u(cfg.n_head)),
        (k("attention.head_count_kv"), u(cfg.n_kv_head)),
        (k("attention.key_length"), u(cfg.head_dim)),
        (k("attention.value_length"), u(cfg.head_dim)),
        (k("rope.dimension_count"), u(rope.rotary_dims)),
        (k("rope.freq_base"), Value::F32(rope.base as f32)),
    ];
    match cfg.norm {
        NormKind::RmsNorm => m.push((
            k("attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.norm_eps as f32),
        )),
        NormKind::LayerNorm => m.push((
            k("attention.layer_norm_epsilon"),
            Value::F32(cfg.norm_eps as f32),
        )),
    }
    if cfg.family == Family::Falcon {
        m.push((k("tensor_data_layout"), Value::Str("jploski".into())));
    }
    if let RopeScaling::Linear { factor } = rope.scaling {
        m.push((k("rope.scaling.type"), Value::Str("linear".into())));
        m.push((k("rope.scaling.factor"), Value::F32(factor as f32)));
    }
    Ok(m)
}

/// Rows of each head reordered from half-split to interleaved rotary pairs
/// (`x` is `(n_heads·hd, cols)` row-major).
pub fn permute_rotary_rows(x: &[f32], n_heads: usize, cols: usize) -> Vec<f32> {
    let hd = x.len() / cols / n_heads;
    let mut out = vec![0f32; x.len()];
    for h in 0..n_heads {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let src = (h * hd + j * hd / 2 + i) * cols;
                let dst = (h * hd + 2 * i + j) * cols;
                out[dst..dst + cols].copy_from_slice(&x[src..src + cols]);
            }
        }
    }
    out
}

/// A grouped fused projection `groups × [q_per_group q | k | v]` (rows of `hd`)
/// regrouped as `[all q | all k | all v]`.
pub fn ungroup_qkv(
    x: &[f32],
    groups: usize,
    q_per_group: usize,
    hd: usize,
    cols: usize,
) -> Vec<f32> {
    let rows_per_group = (q_per_group + 2) * hd;
    let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
    for g in 0..groups {
        let at =
            |r: usize| &x[(g * rows_per_group + r) * cols..(g * rows_per_group + r + 1) * cols];
        for r in 0..q_per_group * hd {
            q.extend_from_slice(at(r));
        }
        for r in 0..hd {
            k.extend_from_slice(at(q_per_group * hd + r));
            v.extend_from_slice(at((q_per_group + 1) * hd + r));
        }
    }
    q.extend(k);
    q.extend(v);
    q
}

/// How a tensor's values change on the way.
#[derive(Debug, Clone, Copy)]
enum Transform {
    None,
    /// LLaMA rotary permutation over this many heads.
    Rotary(usize),
    /// Falcon grouped → blocked.
    Ungroup,
}

fn tensors(
    cfg: &Config,
    w: Arc<Weights>,
    ty: QuantType,
    fallbacks: &mut Vec<String>,
) -> Result<Vec<GgufTensor>> {
    let names = WeightNames::for_config(cfg);
    let (c, f, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    let (q_w, kv_w) = (cfg.n_head * hd, cfg.n_kv_head * hd);
    let mut out = Vec::new();
    // Every source tensor with its shape, checked before anything is written.
    let mut sources: Vec<(String, Vec<usize>)> = Vec::new();
    let mut add = |gguf: String, hf: String, shape: Vec<usize>, tr: Transform, head: bool| {
        sources.push((hf.clone(), shape.clone()));
        let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        let gty = if shape.len() == 1 {
            GgmlType::F32
        } else {
            let want = if head && ty == QuantType::Q4_0 {
                GgmlType::Q8_0
            } else {
                ty.ggml()
            };
            let (blk, _) = want.block();
            if dims[0] % blk != 0 {
                fallbacks.push(format!(
                    "{gguf}: rows of {} values are not a multiple of {blk}; stored as f16",
                    dims[0]
                ));
                GgmlType::F16
            } else {
                want
            }
        };
        let (w, cfg2) = (w.clone(), cfg.clone());
        out.push(GgufTensor {
            name: gguf,
            dims,
            ty: gty,
            produce: Box::new(move || {
                let t = w.tensor(&hf, &shape, DType::F32, &Device::Cpu)?;
                let x: Vec<f32> = t.flatten_all()?.to_vec1()?;
                let cols = if shape.len() == 2 { shape[1] } else { 1 };
                Ok(match tr {
                    Transform::None => x,
                    Transform::Rotary(heads) => permute_rotary_rows(&x, heads, cols),
                    Transform::Ungroup => {
                        ungroup_qkv(&x, cfg2.n_kv_head, cfg2.q_per_kv(), cfg2.head_dim, cols)
                    }
                })
            }),
        });
    };
    let wt = |m: &str| format!("{m}.weight");
    let bs = |m: &str| format!("{m}.bias");
    let ln = cfg.norm == NormKind::LayerNorm;
    add(
        "token_embd.weight".into(),
        wt(names.embed),
        vec![cfg.vocab_size, c],
        Transform::None,
        cfg.tie_embeddings,
    );
    for i in 0..cfg.n_layer {
        let at = |m: &str| names.in_layer(i, m);
        let blk = |s: &str| format!("blk.{i}.{s}");
        let shared = cfg.residual == Residual::Parallel && cfg.shared_attention_norm;
        add(
            blk("attn_norm.weight"),
            wt(&at(names.attn_norm)),
            vec![c],
            Transform::None,
            false,
        );
        if ln {
            add(
                blk("attn_norm.bias"),
                bs(&at(names.attn_norm)),
                vec![c],
                Transform::None,
                false,
            );
        }
        let mlp_norm = names.mlp_norm.filter(|_| !shared);
        if let Some(n) = mlp_norm {
            let key = if cfg.family == Family::Falcon {
                "attn_norm_2"
            } else {
                "ffn_norm"
            };
            add(
                blk(&format!("{key}.weight")),
                wt(&at(n)),
                vec![c],
                Transform::None,
                false,
            );
            if ln {
                add(
                    blk(&format!("{key}.bias")),
                    bs(&at(n)),
                    vec![c],
                    Transform::None,
                    false,
                );
            }
        }
        match cfg.qkv_layout {
            QkvLayout::Separate => {
                let parts = [
                    ("attn_q", names.q, q_w, Transform::Rotary(cfg.n_head)),
                    ("attn_k", names.k, kv_w, Transform::Rotary(cfg.n_kv_head)),
                    ("attn_v", names.v, kv_w, Transform::None),
                ];
                for (g, m, width, tr) in parts {
                    add(
                        blk(&format!("{g}.weight")),
                        wt(&at(m)),
                        vec![width, c],
                        tr,
                        false,
                    );
                    if cfg.qkv_bias {
                        add(
                            blk(&format!("{g}.bias")),
                            bs(&at(m)),
                            vec![width],
                            tr,
                            false,
                        );
                    }
                }
            }
            QkvLayout::FusedGrouped | QkvLayout::FusedBlocked => {
                let tr = if cfg.qkv_layout == QkvLayout::FusedGrouped {
                    Transform::Ungroup
                } else {
                    Transform::None
                };
                add(
                    blk("attn_qkv.weight"),
                    wt(&at(names.qkv)),
                    vec![cfg.qkv_width(), c],
                    tr,
                    false,
                );
            }
        }
        add(
            blk("attn_output.weight"),
            wt(&at(names.attn_out)),
            vec![c, q_w],
            Transform::None,
            false,
        );
        if cfg.attn_out_bias {
            add(
                blk("attn_output.bias"),
                bs(&at(names.attn_out)),
                vec![c],
                Transform::None,
                false,
            );
        }
        let mut mlp = vec![
            ("ffn_up", names.mlp_up, vec![f, c]),
            ("ffn_down", names.mlp_down, vec![c, f]),
        ];
        if cfg.mlp == MlpKind::Gated {
            mlp.insert(0, ("ffn_gate", names.mlp_gate, vec![f, c]));
        }
        for (g, m, shape) in mlp {
            let out_dim = shape[0];
            add(
                blk(&format!("{g}.weight")),
                wt(&at(m)),
                shape,
                Transform::None,
                false,
            );
            if cfg.mlp_bias {
                add(
                    blk(&format!("{g}.bias")),
                    bs(&at(m)),
                    vec![out_dim],
                    Transform::None,
                    false,
                );
            }
        }
    }
    add(
        "output_norm.weight".into(),
        wt(names.final_norm),
        vec![c],
        Transform::None,
        false,
    );
    if ln {
        add(
            "output_norm.bias".into(),
            bs(names.final_norm),
            vec![c],
            Transform::None,
            false,
        );
    }
    if !cfg.tie_embeddings {
        add(
            "output.weight".into(),
            wt(names.lm_head),
            vec![cfg.vocab_size, c],
            Transform::None,
            true,
        );
    }
    for (name, shape) in &sources {
        w.check(name, shape)?;
    }
    let used: Vec<String> = sources.into_iter().map(|(n, _)| n).collect();
    w.check_all_used(&used, cfg.tie_embeddings)?;
    if let PositionKind::Rotary(r) = &cfg.position {
        if let RopeScaling::Llama3 { .. } = r.scaling {
            let factors = llama3_rope_factors(r.base, r.rotary_dims, &r.scaling);
            out.push(GgufTensor {
                name: "rope_freqs.weight".into(),
                dims: vec![factors.len() as u64],
                ty: GgmlType::F32,
                produce: Box::new(move || Ok(factors.clone())),
            });
        }
    }
    Ok(out)
}

/// Per-frequency divisors of LLaMA-3's rope scaling (llama.cpp's `rope_freqs`).
fn llama3_rope_factors(base: f64, dims: usize, s: &RopeScaling) -> Vec<f32> {
    let RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings,
    } = *s
    else {
        return vec![];
    };
    let old = original_max_position_embeddings as f64;
    let (low_wl, high_wl) = (old / low_freq_factor, old / high_freq_factor);
    (0..dims / 2)
        .map(|i| {
            let freq = 1.0 / base.powf((2 * i) as f64 / dims as f64);
            let wl = 2.0 * std::f64::consts::PI / freq;
            let f = if wl < high_wl {
                1.0
            } else if wl > low_wl {
                factor
            } else {
                let smooth = (old / wl - low_freq_factor) / (high_freq_factor - low_freq_factor);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            f as f32
        })
        .collect()
}
