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

/// One tensor of the GGUF file: where its values come from and how they change.
#[derive(Debug, Clone)]
struct Entry {
    /// Its GGUF name (`blk.3.attn_q.weight`).
    gguf: String,
    /// The checkpoint tensor it is made of.
    hf: String,
    /// The checkpoint tensor's shape (row-major).
    shape: Vec<usize>,
    transform: Transform,
    /// The output head, or the tied embeddings that serve as head: kept at `q8_0`
    /// under `q4_0`.
    head: bool,
}

/// The GGUF tensors of a checkpoint of `cfg`, in file order, as [`Entry`]s: the
/// name table of the module's documentation, written out.
fn tensor_map(cfg: &Config, names: &WeightNames) -> Vec<Entry> {
    let mut map = TensorMap::default();
    let (c, ln) = (cfg.hidden_size, cfg.norm == NormKind::LayerNorm);
    map.head(
        "token_embd",
        names.embed,
        cfg.vocab_size,
        c,
        cfg.tie_embeddings,
    );
    for i in 0..cfg.n_layer {
        norm_entries(&mut map, cfg, names, i);
        attention_entries(&mut map, cfg, names, i);
        mlp_entries(&mut map, cfg, names, i);
    }
    map.module(
        "output_norm",
        names.final_norm,
        vec![c],
        Transform::None,
        ln,
    );
    if !cfg.tie_embeddings {
        map.head("output", names.lm_head, cfg.vocab_size, c, true);
    }
    map.0
}

/// The [`Entry`]s of [`tensor_map`], as they are listed.
#[derive(Default)]
struct TensorMap(Vec<Entry>);

impl TensorMap {
    /// `{gguf}.weight` from `{hf}.weight` of `shape` and, with `bias`, `{gguf}.bias`
    /// from `{hf}.bias` (one value per output row), both changed by `transform`.
    fn module(
        &mut self,
        gguf: &str,
        hf: &str,
        shape: Vec<usize>,
        transform: Transform,
        bias: bool,
    ) {
        let rows = shape[0];
        self.0.push(Entry {
            gguf: format!("{gguf}.weight"),
            hf: format!("{hf}.weight"),
            shape,
            transform,
            head: false,
        });
        if bias {
            self.0.push(Entry {
                gguf: format!("{gguf}.bias"),
                hf: format!("{hf}.bias"),
                shape: vec![rows],
                transform,
                head: false,
            });
        }
    }

    /// A `(vocab, c)` matrix of embeddings or output head, `head` when it serves as
    /// the output head.
    fn head(&mut self, gguf: &str, hf: &str, vocab: usize, c: usize, head: bool) {
        self.0.push(Entry {
            gguf: format!("{gguf}.weight"),
            hf: format!("{hf}.weight"),
            shape: vec![vocab, c],
            transform: Transform::None,
            head,
        });
    }
}

/// Layer `i`'s norms: the attention norm, and the MLP's own norm unless a parallel
/// block shares one (`attn_norm_2` in Falcon's new decoder, `ffn_norm` elsewhere).
fn norm_entries(map: &mut TensorMap, cfg: &Config, names: &WeightNames, i: usize) {
    let ln = cfg.norm == NormKind::LayerNorm;
    let shape = vec![cfg.hidden_size];
    let attn_norm = names.in_layer(i, names.attn_norm);
    let gguf = format!("blk.{i}.attn_norm");
    map.module(&gguf, &attn_norm, shape.clone(), Transform::None, ln);
    let shared = cfg.residual == Residual::Parallel && cfg.shared_attention_norm;
    if let Some(n) = names.mlp_norm.filter(|_| !shared) {
        let key = if cfg.family == Family::Falcon {
            "attn_norm_2"
        } else {
            "ffn_norm"
        };
        let hf = names.in_layer(i, n);
        map.module(&format!("blk.{i}.{key}"), &hf, shape, Transform::None, ln);
    }
}

/// Layer `i`'s attention: query, key and value (separate, their rotary rows
/// permuted, or one fused projection, regrouped when grouped per key/value head),
/// and the output projection.
fn attention_entries(map: &mut TensorMap, cfg: &Config, names: &WeightNames, i: usize) {
    let (c, hd) = (cfg.hidden_size, cfg.head_dim);
    let (q_w, kv_w) = (cfg.n_head * hd, cfg.n_kv_head * hd);
    let blk = |s: &str| format!("blk.{i}.{s}");
    match cfg.qkv_layout {
        QkvLayout::Separate => {
            let parts = [
                ("attn_q", names.q, q_w, Transform::Rotary(cfg.n_head)),
                ("attn_k", names.k, kv_w, Transform::Rotary(cfg.n_kv_head)),
                ("attn_v", names.v, kv_w, Transform::None),
            ];
            for (g, m, width, tr) in parts {
                let hf = names.in_layer(i, m);
                map.module(&blk(g), &hf, vec![width, c], tr, cfg.qkv_bias);
            }
        }
        QkvLayout::FusedGrouped | QkvLayout::FusedBlocked => {
            let tr = if cfg.qkv_layout == QkvLayout::FusedGrouped {
                Transform::Ungroup
            } else {
                Transform::None
            };
            let hf = names.in_layer(i, names.qkv);
            map.module(&blk("attn_qkv"), &hf, vec![cfg.qkv_width(), c], tr, false);
        }
    }
    let hf = names.in_layer(i, names.attn_out);
    let out = blk("attn_output");
    map.module(&out, &hf, vec![c, q_w], Transform::None, cfg.attn_out_bias);
}

/// Layer `i`'s MLP: gate (when gated), up and down projections.
fn mlp_entries(map: &mut TensorMap, cfg: &Config, names: &WeightNames, i: usize) {
    let (c, f) = (cfg.hidden_size, cfg.intermediate_size);
    let mut mlp = vec![
        ("ffn_up", names.mlp_up, vec![f, c]),
        ("ffn_down", names.mlp_down, vec![c, f]),
    ];
    if cfg.mlp == MlpKind::Gated {
        mlp.insert(0, ("ffn_gate", names.mlp_gate, vec![f, c]));
    }
    for (g, m, shape) in mlp {
        let hf = names.in_layer(i, m);
        map.module(
            &format!("blk.{i}.{g}"),
            &hf,
            shape,
            Transform::None,
            cfg.mlp_bias,
        );
    }
}

/// The type `e` is stored as: f32 for vectors, `ty` for matrices (`q8_0` for the head
/// under `q4_0`), f16 when their rows do not split into `ty`'s blocks (said in
/// `fallbacks`). `dims` is in ggml order.
fn storage_type(e: &Entry, dims: &[u64], ty: QuantType, fallbacks: &mut Vec<String>) -> GgmlType {
    if e.shape.len() == 1 {
        return GgmlType::F32;
    }
    let want = if e.head && ty == QuantType::Q4_0 {
        GgmlType::Q8_0
    } else {
        ty.ggml()
    };
    let (blk, _) = want.block();
    if dims[0] % blk != 0 {
        fallbacks.push(format!(
            "{}: rows of {} values are not a multiple of {blk}; stored as f16",
            e.gguf, dims[0]
        ));
        GgmlType::F16
    } else {
        want
    }
}

/// The GGUF tensor of `e`: its values are read from `w` and transformed only when
/// the file writer reaches it, so one tensor at a time is in memory.
fn gguf_tensor(
    e: &Entry,
    cfg: &Config,
    w: &Arc<Weights>,
    ty: QuantType,
    fallbacks: &mut Vec<String>,
) -> GgufTensor {
    let dims: Vec<u64> = e.shape.iter().rev().map(|&d| d as u64).collect();
    let gty = storage_type(e, &dims, ty, fallbacks);
    let (w, cfg) = (w.clone(), cfg.clone());
    let (hf, shape, tr) = (e.hf.clone(), e.shape.clone(), e.transform);
    GgufTensor {
        name: e.gguf.clone(),
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
                    ungroup_qkv(&x, cfg.n_kv_head, cfg.q_per_kv(), cfg.head_dim, cols)
                }
            })
        }),
    }
}

/// Every tensor of the GGUF file of checkpoint `w` (of `cfg`), matrices as `ty`
/// (`fallbacks` names those that could not be). Every source tensor's shape is
/// checked, and every checkpoint tensor must be used, before anything is written.
fn tensors(
    cfg: &Config,
    w: Arc<Weights>,
    ty: QuantType,
    fallbacks: &mut Vec<String>,
) -> Result<Vec<GgufTensor>> {
    let map = tensor_map(cfg, &WeightNames::for_config(cfg));
    let mut out: Vec<GgufTensor> = map
        .iter()
        .map(|e| gguf_tensor(e, cfg, &w, ty, fallbacks))
        .collect();
    for e in &map {
        w.check(&e.hf, &e.shape)?;
    }
    let used: Vec<String> = map.into_iter().map(|e| e.hf).collect();
    w.check_all_used(&used, cfg.tie_embeddings)?;
    out.extend(rope_freqs(cfg));
    Ok(out)
}

/// LLaMA-3's `rope_freqs.weight`, for a model whose rope scaling needs it.
fn rope_freqs(cfg: &Config) -> Option<GgufTensor> {
    let PositionKind::Rotary(r) = &cfg.position else {
        return None;
    };
    let RopeScaling::Llama3 { .. } = r.scaling else {
        return None;
    };
    let factors = llama3_rope_factors(r.base, r.rotary_dims, &r.scaling);
    Some(GgufTensor {
        name: "rope_freqs.weight".into(),
        dims: vec![factors.len() as u64],
        ty: GgmlType::F32,
        produce: Box::new(move || Ok(factors.clone())),
    })
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
