//! `quantize`: the GGUF file parsed by a reader written here from the published GGUF
//! spec (not the writer's code), its metadata and layout checked, and its tensors
//! decoded and compared with the checkpoint's weights within each format's bound.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device};
use half::f16;
use lit_claire::gguf::QuantType;
use lit_claire::gguf::llama_cpp::quantize;
use lit_claire::model::weights::{TensorSource, Weights};

use crate::common::{reference_dir, temp_dir};

// ---- a GGUF reader, from the spec ----

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Val {
    Int(i128),
    Float(f64),
    Bool(bool),
    Str(String),
    Arr(u32, Vec<Val>),
}

impl Val {
    fn int(&self) -> i128 {
        match self {
            Val::Int(i) => *i,
            v => panic!("not an integer: {v:?}"),
        }
    }
    fn float(&self) -> f64 {
        match self {
            Val::Float(f) => *f,
            v => panic!("not a float: {v:?}"),
        }
    }
    fn str(&self) -> &str {
        match self {
            Val::Str(s) => s,
            v => panic!("not a string: {v:?}"),
        }
    }
}

#[derive(Debug)]
struct Info {
    dims: Vec<u64>,
    ty: u32,
    offset: u64,
}

pub(crate) struct Gguf {
    /// key → (type id, value)
    meta: BTreeMap<String, (u32, Val)>,
    tensors: BTreeMap<String, Info>,
    order: Vec<String>,
    data_start: u64,
    bytes: Vec<u8>,
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        s
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take(4).try_into().unwrap())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take(8).try_into().unwrap())
    }
    fn string(&mut self) -> String {
        let n = self.u64() as usize;
        String::from_utf8(self.take(n).to_vec()).expect("UTF-8 string")
    }
    fn value(&mut self, ty: u32) -> Val {
        match ty {
            0 => Val::Int(self.take(1)[0] as i128),
            1 => Val::Int(self.take(1)[0] as i8 as i128),
            2 => Val::Int(u16::from_le_bytes(self.take(2).try_into().unwrap()) as i128),
            3 => Val::Int(i16::from_le_bytes(self.take(2).try_into().unwrap()) as i128),
            4 => Val::Int(self.u32() as i128),
            5 => Val::Int(self.u32() as i32 as i128),
            6 => Val::Float(f32::from_le_bytes(self.take(4).try_into().unwrap()) as f64),
            7 => Val::Bool(match self.take(1)[0] {
                0 => false,
                1 => true,
                b => panic!("bool byte {b}"),
            }),
            8 => Val::Str(self.string()),
            9 => {
                let t = self.u32();
                let n = self.u64();
                Val::Arr(t, (0..n).map(|_| self.value(t)).collect())
            }
            10 => Val::Int(self.u64() as i128),
            11 => Val::Int(self.u64() as i64 as i128),
            12 => Val::Float(f64::from_le_bytes(self.take(8).try_into().unwrap())),
            t => panic!("unknown value type {t}"),
        }
    }
}

pub(crate) fn parse(path: &Path) -> Gguf {
    let bytes = std::fs::read(path).unwrap();
    let mut c = Cursor { b: &bytes, at: 0 };
    assert_eq!(c.take(4), b"GGUF", "magic");
    assert_eq!(c.u32(), 3, "version");
    let n_tensors = c.u64();
    let n_kv = c.u64();
    let mut meta = BTreeMap::new();
    for _ in 0..n_kv {
        let k = c.string();
        let t = c.u32();
        let v = c.value(t);
        assert!(
            meta.insert(k.clone(), (t, v)).is_none(),
            "duplicate key {k}"
        );
    }
    let mut tensors = BTreeMap::new();
    let mut order = Vec::new();
    for _ in 0..n_tensors {
        let name = c.string();
        let nd = c.u32();
        let dims = (0..nd).map(|_| c.u64()).collect();
        let ty = c.u32();
        let offset = c.u64();
        order.push(name.clone());
        tensors.insert(name, Info { dims, ty, offset });
    }
    let align = meta
        .get("general.alignment")
        .map(|(_, v)| v.int() as u64)
        .unwrap_or(32);
    let data_start = (c.at as u64).div_ceil(align) * align;
    assert!(
        bytes[c.at..data_start as usize].iter().all(|b| *b == 0),
        "padding is zeros"
    );
    Gguf {
        meta,
        tensors,
        order,
        data_start,
        bytes,
    }
}

/// (values per block, bytes per block) of ggml types F32, F16, Q4_0, Q8_0.
fn block(ty: u32) -> (u64, u64) {
    match ty {
        0 => (1, 4),
        1 => (1, 2),
        2 => (32, 18),
        8 => (32, 34),
        t => panic!("unexpected ggml type {t}"),
    }
}

impl Gguf {
    pub(crate) fn meta(&self, k: &str) -> &Val {
        &self
            .meta
            .get(k)
            .unwrap_or_else(|| panic!("no metadata {k}"))
            .1
    }
    fn meta_type(&self, k: &str) -> u32 {
        self.meta[k].0
    }
    fn data(&self, name: &str) -> &[u8] {
        let i = &self.tensors[name];
        let (blk, size) = block(i.ty);
        let n: u64 = i.dims.iter().product();
        let start = (self.data_start + i.offset) as usize;
        &self.bytes[start..start + (n / blk * size) as usize]
    }
    /// Decoded values, with the largest error allowed for each one.
    fn decode(&self, name: &str) -> Vec<(f32, f32)> {
        let i = &self.tensors[name];
        let d = self.data(name);
        match i.ty {
            0 => d
                .chunks(4)
                .map(|b| (f32::from_le_bytes(b.try_into().unwrap()), 0.0))
                .collect(),
            1 => d
                .chunks(2)
                .map(|b| {
                    let v = f16::from_le_bytes([b[0], b[1]]).to_f32();
                    (v, v.abs() * 1e-3 + 1e-7)
                })
                .collect(),
            8 => d
                .chunks(34)
                .flat_map(|b| {
                    let s = f16::from_le_bytes([b[0], b[1]]).to_f32();
                    // round(x/d) is within d/2; d itself is rounded to f16.
                    b[2..]
                        .iter()
                        .map(move |q| (*q as i8 as f32 * s, s.abs() * (0.5 + 127.0 / 1024.0)))
                })
                .collect(),
            2 => d
                .chunks(18)
                .flat_map(|b| {
                    let s = f16::from_le_bytes([b[0], b[1]]).to_f32();
                    let lo: Vec<(f32, f32)> = b[2..]
                        .iter()
                        .map(|q| (((q & 15) as f32 - 8.0) * s, s.abs() * (1.0 + 8.0 / 1024.0)))
                        .collect();
                    let hi: Vec<(f32, f32)> = b[2..]
                        .iter()
                        .map(|q| (((q >> 4) as f32 - 8.0) * s, s.abs() * (1.0 + 8.0 / 1024.0)))
                        .collect();
                    lo.into_iter().chain(hi)
                })
                .collect(),
            t => panic!("type {t}"),
        }
    }
}

// ---- the expected tensors, computed independently ----

/// Hugging Face rows `(heads·hd, cols)`, half-split rotary per head, as llama.cpp's
/// interleaved pairs: the pair (i, i + hd/2) becomes rows (2i, 2i + 1).
fn interleave(x: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let hd = x.len() / cols / heads;
    let mut out = Vec::with_capacity(x.len());
    for h in 0..heads {
        for i in 0..hd / 2 {
            for half in [0, hd / 2] {
                let r = h * hd + half + i;
                out.extend_from_slice(&x[r * cols..(r + 1) * cols]);
            }
        }
    }
    out
}

fn hf(w: &Weights, name: &str) -> (Vec<usize>, Vec<f32>) {
    let t = w.raw(name, &Device::Cpu).unwrap();
    let shape = t.dims().to_vec();
    let v = w.tensor(name, &shape, DType::F32, &Device::Cpu).unwrap();
    (shape, v.flatten_all().unwrap().to_vec1().unwrap())
}

fn compare(g: &Gguf, gguf_name: &str, shape: &[usize], want: &[f32]) {
    let info = &g.tensors[gguf_name];
    let dims: Vec<u64> = shape.iter().rev().map(|d| *d as u64).collect();
    assert_eq!(info.dims, dims, "{gguf_name} dims");
    let got = g.decode(gguf_name);
    assert_eq!(got.len(), want.len(), "{gguf_name}");
    for (k, ((v, tol), w)) in got.iter().zip(want).enumerate() {
        assert!(
            (v - w).abs() <= *tol + 1e-7,
            "{gguf_name}[{k}]: {v} vs {w} (tolerance {tol})"
        );
    }
}

fn check_file(family: &str, ty: QuantType, out: &Path) -> Gguf {
    let dir = reference_dir(family);
    let r = quantize(&dir, out, ty, false).unwrap();
    let g = parse(out);
    assert_eq!(r.bytes, g.bytes.len() as u64);
    let cfg = lit_claire::config::load_config(&dir).unwrap();
    let arch = if family == "falcon" {
        "falcon"
    } else {
        "llama"
    };
    assert_eq!(g.meta("general.architecture").str(), arch);
    assert_eq!(g.meta_type("general.architecture"), 8);
    let u32_keys = [
        ("context_length", cfg.block_size),
        ("embedding_length", cfg.hidden_size),
        ("block_count", cfg.n_layer),
        ("feed_forward_length", cfg.intermediate_size),
        ("attention.head_count", cfg.n_head),
        ("attention.head_count_kv", cfg.n_kv_head),
        ("rope.dimension_count", cfg.head_dim),
    ];
    for (k, v) in u32_keys {
        let key = format!("{arch}.{k}");
        assert_eq!(g.meta_type(&key), 4, "{key} is u32");
        assert_eq!(g.meta(&key).int(), v as i128, "{key}");
    }
    let eps_key = if arch == "llama" {
        "llama.attention.layer_norm_rms_epsilon"
    } else {
        "falcon.attention.layer_norm_epsilon"
    };
    assert!((g.meta(eps_key).float() - cfg.norm_eps).abs() < 1e-9);
    assert_eq!(g.meta_type(eps_key), 6);
    assert!((g.meta(&format!("{arch}.rope.freq_base")).float() - 10000.0).abs() < 1e-3);
    let ft = match ty {
        QuantType::F16 => 1,
        QuantType::Q4_0 => 2,
        QuantType::Q8_0 => 7,
    };
    assert_eq!(g.meta("general.file_type").int(), ft);
    // Tokenizer: the 512 tokens of tokenizer.json, ids as in config.json.
    assert_eq!(g.meta("tokenizer.ggml.model").str(), "gpt2");
    assert_eq!(g.meta("tokenizer.ggml.pre").str(), "gpt-2");
    let Val::Arr(8, tokens) = g.meta("tokenizer.ggml.tokens") else {
        panic!("tokens")
    };
    assert_eq!(tokens.len(), 512);
    assert_eq!(tokens[1].str(), "<s>");
    let Val::Arr(5, types) = g.meta("tokenizer.ggml.token_type") else {
        panic!("token types")
    };
    assert_eq!(
        types[..4].iter().map(Val::int).collect::<Vec<_>>(),
        [3, 3, 3, 1]
    );
    let Val::Arr(8, merges) = g.meta("tokenizer.ggml.merges") else {
        panic!("merges")
    };
    assert_eq!(merges[0].str(), "Ġ d");
    assert_eq!(g.meta("tokenizer.ggml.bos_token_id").int(), 1);
    assert_eq!(g.meta("tokenizer.ggml.eos_token_id").int(), 2);
    assert_eq!(g.meta("tokenizer.ggml.padding_token_id").int(), 0);
    // Layout: aligned offsets, in order, no overlap, the file ends after the last tensor.
    let mut end = 0;
    for name in &g.order {
        let i = &g.tensors[name];
        assert_eq!(i.offset % 32, 0, "{name} offset");
        assert!(i.offset >= end, "{name} overlaps");
        let (blk, size) = block(i.ty);
        assert_eq!(i.dims[0] % blk, 0);
        end = i.offset + i.dims.iter().product::<u64>() / blk * size;
        // 1-D tensors stay f32.
        if i.dims.len() == 1 {
            assert_eq!(i.ty, 0, "{name}");
        }
    }
    assert_eq!(g.data_start % 32, 0);
    assert_eq!(g.bytes.len() as u64, g.data_start + end.div_ceil(32) * 32);
    g
}

#[test]
fn llama_and_mistral_gguf_hold_permuted_quantized_weights() {
    for family in ["llama", "mistral"] {
        for ty in [QuantType::F16, QuantType::Q8_0, QuantType::Q4_0] {
            let tmp = temp_dir();
            let out = tmp.path().join("m.gguf");
            let g = check_file(family, ty, &out);
            let dir = reference_dir(family);
            let w = Weights::open(&dir).unwrap();
            let cfg = lit_claire::config::load_config(&dir).unwrap();
            assert_eq!(
                g.tensors.len(),
                3 + cfg.n_layer * 9,
                "embeddings, 9 per layer, norm, head"
            );
            let (s, e) = hf(&w, "model.embed_tokens.weight");
            compare(&g, "token_embd.weight", &s, &e);
            let (s, e) = hf(&w, "lm_head.weight");
            compare(&g, "output.weight", &s, &e);
            let (s, e) = hf(&w, "model.norm.weight");
            compare(&g, "output_norm.weight", &s, &e);
            for i in 0..cfg.n_layer {
                let p = |m: &str| format!("model.layers.{i}.{m}.weight");
                let b = |m: &str| format!("blk.{i}.{m}.weight");
                let (s, q) = hf(&w, &p("self_attn.q_proj"));
                compare(&g, &b("attn_q"), &s, &interleave(&q, cfg.n_head, s[1]));
                let (s, k) = hf(&w, &p("self_attn.k_proj"));
                compare(&g, &b("attn_k"), &s, &interleave(&k, cfg.n_kv_head, s[1]));
                for (m, n) in [
                    ("self_attn.v_proj", "attn_v"),
                    ("self_attn.o_proj", "attn_output"),
                    ("mlp.gate_proj", "ffn_gate"),
                    ("mlp.up_proj", "ffn_up"),
                    ("mlp.down_proj", "ffn_down"),
                    ("input_layernorm", "attn_norm"),
                    ("post_attention_layernorm", "ffn_norm"),
                ] {
                    let (s, x) = hf(&w, &p(m));
                    compare(&g, &b(n), &s, &x);
                }
            }
            let head_ty = g.tensors["output.weight"].ty;
            let mat_ty = g.tensors["blk.0.ffn_up.weight"].ty;
            match ty {
                QuantType::F16 => assert_eq!((mat_ty, head_ty), (1, 1)),
                QuantType::Q8_0 => assert_eq!((mat_ty, head_ty), (8, 8)),
                QuantType::Q4_0 => assert_eq!((mat_ty, head_ty), (2, 8), "head kept at q8_0"),
            }
        }
    }
}

#[test]
fn falcon_gguf_regroups_the_fused_projection() {
    for ty in [QuantType::Q8_0, QuantType::Q4_0] {
        let tmp = temp_dir();
        let out = tmp.path().join("f.gguf");
        let g = check_file("falcon", ty, &out);
        let dir = reference_dir("falcon");
        let w = Weights::open(&dir).unwrap();
        let cfg = lit_claire::config::load_config(&dir).unwrap();
        assert_eq!(g.meta("falcon.tensor_data_layout").str(), "jploski");
        assert_eq!(
            g.meta("falcon.attention.head_count_kv").int(),
            1,
            "multi-query"
        );
        assert!(
            !g.tensors.contains_key("output.weight"),
            "tied head: llama.cpp reuses token_embd"
        );
        // The tied embeddings are the head: q8_0 even when matrices are q4_0.
        assert_eq!(g.tensors["token_embd.weight"].ty, 8);
        let mat = if ty == QuantType::Q4_0 { 2 } else { 8 };
        assert_eq!(g.tensors["blk.0.ffn_up.weight"].ty, mat);
        let hd = cfg.head_dim;
        for i in 0..cfg.n_layer {
            let (s, x) = hf(
                &w,
                &format!("transformer.h.{i}.self_attention.query_key_value.weight"),
            );
            // Stored per kv group: [q heads of the group, k, v]; wanted: [all q | all k | all v].
            let cols = s[1];
            let rows_per_group = (cfg.q_per_kv() + 2) * hd;
            let row = |g: usize, r: usize| {
                &x[(g * rows_per_group + r) * cols..(g * rows_per_group + r + 1) * cols]
            };
            let mut want = Vec::new();
            for part in 0..3 {
                for grp in 0..cfg.n_kv_head {
                    let (from, n) = match part {
                        0 => (0, cfg.q_per_kv() * hd),
                        1 => (cfg.q_per_kv() * hd, hd),
                        _ => ((cfg.q_per_kv() + 1) * hd, hd),
                    };
                    for r in from..from + n {
                        want.extend_from_slice(row(grp, r));
                    }
                }
            }
            compare(&g, &format!("blk.{i}.attn_qkv.weight"), &s, &want);
            for (m, n) in [
                ("self_attention.dense.weight", "attn_output.weight"),
                ("mlp.dense_h_to_4h.weight", "ffn_up.weight"),
                ("mlp.dense_4h_to_h.weight", "ffn_down.weight"),
                ("input_layernorm.weight", "attn_norm.weight"),
                ("input_layernorm.bias", "attn_norm.bias"),
            ] {
                let (s, x) = hf(&w, &format!("transformer.h.{i}.{m}"));
                compare(&g, &format!("blk.{i}.{n}"), &s, &x);
            }
        }
        let (s, x) = hf(&w, "transformer.ln_f.bias");
        compare(&g, "output_norm.bias", &s, &x);
    }
}

#[test]
fn quantize_refuses_other_families_and_unknown_types() {
    let tmp = temp_dir();
    let out = tmp.path().join("x.gguf");
    for fam in ["gpt2", "gpt_neox", "gpt_neo"] {
        let e = quantize(&reference_dir(fam), &out, QuantType::Q8_0, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("llama, mistral and falcon") || e.contains("cannot write"),
            "{fam}: {e}"
        );
        assert!(!e.contains('\n'));
    }
    let e = "q5_k".parse::<QuantType>().unwrap_err().to_string();
    assert!(e.contains("q5_k") && e.contains("f16, q8_0 or q4_0"), "{e}");
    let o = std::process::Command::new(crate::common::bin())
        .args(["quantize", "--checkpoint-dir"])
        .arg(reference_dir("llama"))
        .arg("--output")
        .arg(&out)
        .args(["--type", "q3"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown quantization type"));
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "nothing written"
    );
}

/// llama.cpp's SentencePiece tokenizer as it reads a `"llama"` vocabulary: spaces become
/// `▁` (one prepended when `add_space_prefix`), the text splits into characters, the
/// adjacent pair whose concatenation is a token with the highest score merges first
/// (leftmost on ties) until none is, and what is not a token falls back to `<0xXX>`.
fn llama_cpp_spm(text: &str, tokens: &[String], scores: &[f64], space_prefix: bool) -> Vec<u32> {
    let id: std::collections::HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut s = text.replace(' ', "\u{2581}");
    if space_prefix {
        s.insert(0, '\u{2581}');
    }
    let mut sym: Vec<String> = s.chars().map(String::from).collect();
    loop {
        let mut best: Option<(f64, usize)> = None;
        for i in 0..sym.len().saturating_sub(1) {
            if let Some(&t) = id.get(format!("{}{}", sym[i], sym[i + 1]).as_str()) {
                if best.is_none_or(|(sc, _)| scores[t] > sc) {
                    best = Some((scores[t], i));
                }
            }
        }
        let Some((_, i)) = best else { break };
        let right = sym.remove(i + 1);
        sym[i].push_str(&right);
    }
    sym.iter()
        .flat_map(|s| match id.get(s.as_str()) {
            Some(&t) => vec![t as u32],
            None => s
                .bytes()
                .map(|b| id[format!("<0x{b:02X}>").as_str()] as u32)
                .collect(),
        })
        .collect()
}

#[test]
fn sentencepiece_tokenizer_becomes_llamas_vocabulary_that_tokenizes_the_same() {
    // Llama-2 / Mistral ship a SentencePiece BPE tokenizer.json (byte fallback, `▁`);
    // the fixture is one, converted by utils/make_spm_tokenizer.py and checked there
    // against SentencePiece itself.
    let tmp = temp_dir();
    let ckpt = tmp.path().join("llama-spm");
    std::fs::create_dir(&ckpt).unwrap();
    let spm = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/spm_tokenizer");
    for e in std::fs::read_dir(reference_dir("llama")).unwrap() {
        let p = e.unwrap().path();
        if p.is_file()
            && !p
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("tokenizer")
        {
            std::fs::copy(&p, ckpt.join(p.file_name().unwrap())).unwrap();
        }
    }
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(spm.join(f), ckpt.join(f)).unwrap();
    }
    let out = tmp.path().join("spm.gguf");
    quantize(&ckpt, &out, QuantType::Q8_0, false).unwrap();
    let g = parse(&out);
    assert_eq!(g.meta("tokenizer.ggml.model").str(), "llama");
    assert!(!g.meta.contains_key("tokenizer.ggml.merges"));
    assert!(!g.meta.contains_key("tokenizer.ggml.pre"));
    let Val::Arr(8, tokens) = g.meta("tokenizer.ggml.tokens") else {
        panic!("tokens")
    };
    let tokens: Vec<String> = tokens.iter().map(|t| t.str().to_string()).collect();
    let Val::Arr(6, scores) = g.meta("tokenizer.ggml.scores") else {
        panic!("scores are f32")
    };
    let scores: Vec<f64> = scores.iter().map(Val::float).collect();
    let Val::Arr(5, types) = g.meta("tokenizer.ggml.token_type") else {
        panic!("token types")
    };
    let types: Vec<i128> = types.iter().map(Val::int).collect();
    assert_eq!((tokens.len(), scores.len(), types.len()), (512, 512, 512));
    assert_eq!(&tokens[..4], ["<unk>", "<s>", "</s>", "<0x00>"]);
    assert_eq!(&types[..3], [2, 3, 3], "unknown, control, control");
    assert!(types[3..259].iter().all(|t| *t == 6), "256 byte tokens");
    assert!(types[259..].iter().all(|t| *t == 1));
    assert_eq!(g.meta("tokenizer.ggml.unknown_token_id").int(), 0);
    assert_eq!(g.meta("tokenizer.ggml.bos_token_id").int(), 1);
    assert_eq!(g.meta("tokenizer.ggml.eos_token_id").int(), 2);
    assert_eq!(g.meta("tokenizer.ggml.add_bos_token"), &Val::Bool(true));
    assert_eq!(g.meta("tokenizer.ggml.add_space_prefix"), &Val::Bool(true));

    // What llama.cpp would make of the vocabulary is what the tokenizer gives.
    let hf = tokenizers::Tokenizer::from_file(spm.join("tokenizer.json")).unwrap();
    let corpus = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample/fortunes-br.txt"),
    )
    .unwrap();
    let mut lines: Vec<&str> = corpus.lines().filter(|l| !l.is_empty()).take(400).collect();
    lines.extend([
        "[Intervenant 1:] Olá!  Tudo bem? 1234 日本 \t fim",
        "a  b   c",
    ]);
    let mut checked = 0;
    for line in lines {
        let want = hf.encode(line, false).unwrap().get_ids().to_vec();
        assert_eq!(
            llama_cpp_spm(line, &tokens, &scores, true),
            want,
            "{line:?}"
        );
        checked += want.len();
    }
    assert!(checked > 5000, "{checked} tokens compared");
}
