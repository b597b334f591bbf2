//! `init-model`: a model from scratch, for a tokenizer, initialised as the family's
//! transformers code initialises it (`_init_weights` of `modeling_<family>.py`):
//!
//! ```text
//! linear and embedding weights   normal(0, initializer_range)      (default 0.02)
//! GPT-2's attn.c_proj, mlp.c_proj normal(0, initializer_range / sqrt(2 · n_layer))
//!                                 (the residual projections, scaled by depth)
//! biases                          0
//! norm weights (LayerNorm, RMSNorm) 1     norm biases 0
//! LLaMA / Mistral embedding row of pad_token_id   0    (nn.Embedding's padding_idx)
//! ```
//!
//! `vocab_size` is the tokenizer's size padded to a multiple of 64, and
//! `bos/eos/pad_token_id` are the tokenizer's. The tensors written are exactly those
//! the model loader asks for: their names and shapes come from running
//! [`build_model`] on a source that only records the requests.
//!
//! Values are reproducible from `--seed`: tensor `name` is drawn in blocks of 65536
//! values, block `k` from the ChaCha8 stream `k` of the seed `xxh3(seed, name)`
//! (Box–Muller), so the result does not depend on the thread count or the order of
//! the tensors.

use std::cell::RefCell;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde_json::Value;

use super::adapt::temp_dir_beside;
use super::resize::padded;
use super::set_token_ids;
use super::tokfile::TokenizerFile;
use crate::config::families::parse_config;
use crate::config::{Config, Family};
use crate::error::{Error, IoContext, Result};
use crate::hf::export::{DEFAULT_MAX_SHARD_SIZE, TOKENIZER_FILES, publish_dir};
use crate::hf::shards::{LazyTensor, write_weights};
use crate::model::names::WeightNames;
use crate::model::weights::TensorSource;
use crate::model::{BuildOptions, build_model};

/// Values drawn from one random stream.
const BLOCK: usize = 1 << 16;

/// Options of `init-model`.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// A `config.json` (or a folder holding one) of any supported family.
    pub config: PathBuf,
    /// Folder with the tokenizer's `tokenizer.json`.
    pub tokenizer: PathBuf,
    pub output: PathBuf,
    pub seed: u64,
    /// Dtype of the weights written.
    pub dtype: DType,
    pub pad_to_multiple_of: usize,
    pub overwrite: bool,
}

impl InitOptions {
    pub fn new(
        config: impl Into<PathBuf>,
        tokenizer: impl Into<PathBuf>,
        output: impl Into<PathBuf>,
    ) -> Self {
        InitOptions {
            config: config.into(),
            tokenizer: tokenizer.into(),
            output: output.into(),
            seed: 42,
            dtype: DType::F32,
            pad_to_multiple_of: super::DEFAULT_PAD_MULTIPLE,
            overwrite: false,
        }
    }
}

/// What `init-model` wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InitReport {
    pub output: PathBuf,
    pub family: Family,
    pub vocab_size: usize,
    pub tokenizer_size: usize,
    pub parameters: usize,
    pub tensors: usize,
    pub seed: u64,
}

/// How one tensor starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InitKind {
    Zeros,
    Ones,
    /// Normal with mean 0 and this standard deviation.
    Normal(f64),
}

/// The initialisation transformers gives tensor `name` of a `cfg` model.
pub fn init_kind(cfg: &Config, name: &str, initializer_range: f64) -> InitKind {
    let names = WeightNames::for_config(cfg);
    let Some(module) = name.strip_suffix(".weight") else {
        return InitKind::Zeros; // biases
    };
    let is = |m: &str| !m.is_empty() && (module == m || module.ends_with(&format!(".{m}")));
    if is(names.final_norm) || is(names.attn_norm) || names.mlp_norm.is_some_and(is) {
        return InitKind::Ones;
    }
    if cfg.family == Family::Gpt2 && (is(names.attn_out) || is(names.mlp_down)) {
        return InitKind::Normal(initializer_range / (2.0 * cfg.n_layer as f64).sqrt());
    }
    InitKind::Normal(initializer_range)
}

/// `n` values of tensor `name` as [`InitKind::Normal`] with std 1 draws them.
pub fn standard_normal(seed: u64, name: &str, n: usize) -> Vec<f32> {
    let mut key = seed.to_le_bytes().to_vec();
    key.extend_from_slice(name.as_bytes());
    let tensor_seed = twox_hash::XxHash3_64::oneshot(&key);
    let mut out = vec![0f32; n];
    out.par_chunks_mut(BLOCK)
        .enumerate()
        .for_each(|(k, block)| {
            let mut rng = ChaCha8Rng::seed_from_u64(tensor_seed);
            rng.set_stream(k as u64);
            // Uniform in (0, 1): 53 random bits, centred in their interval.
            let mut uniform =
                || ((rng.next_u64() >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64);
            for pair in block.chunks_mut(2) {
                let (u1, u2) = (uniform(), uniform());
                let r = (-2.0 * u1.ln()).sqrt();
                let t = std::f64::consts::TAU * u2;
                pair[0] = (r * t.cos()) as f32;
                if pair.len() == 2 {
                    pair[1] = (r * t.sin()) as f32;
                }
            }
        });
    out
}

/// A tensor source that hands out shapeless zeros and records what was asked.
struct Recorder {
    asked: RefCell<Vec<(String, Vec<usize>)>>,
    /// The head's name when it is tied (the loader must not find it stored).
    tied_head: Option<String>,
}

impl TensorSource for Recorder {
    fn tensor(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let mut asked = self.asked.borrow_mut();
        if !asked.iter().any(|(n, _)| n == name) {
            asked.push((name.to_string(), shape.to_vec()));
        }
        Ok(Tensor::zeros((), dtype, device)?.broadcast_as(shape)?)
    }

    fn contains(&self, name: &str) -> bool {
        self.tied_head.as_deref() != Some(name)
    }
}

/// The stored names and shapes of every tensor of a `cfg` model, in loading order.
pub fn parameter_shapes(cfg: &Config) -> Result<Vec<(String, Vec<usize>)>> {
    let names = WeightNames::for_config(cfg);
    let rec = Recorder {
        asked: RefCell::new(Vec::new()),
        tied_head: cfg
            .tie_embeddings
            .then(|| format!("{}.weight", names.lm_head)),
    };
    let opts = BuildOptions {
        dtype: DType::U8, // one byte per value for GPT-2's transposed views
        ..BuildOptions::cpu_f32()
    };
    drop(build_model(cfg, &rec, &opts)?);
    Ok(rec.asked.into_inner())
}

/// Write a freshly initialised model for `opts.tokenizer`.
pub fn init_model(opts: &InitOptions) -> Result<InitReport> {
    let mut bad = Vec::new();
    if opts.pad_to_multiple_of == 0 {
        bad.push("--pad-to-multiple-of must be at least 1 (1: no padding)".to_string());
    }
    if opts.output.exists() && !opts.overwrite {
        bad.push(format!(
            "{} already exists; choose another --output-dir or pass --overwrite",
            opts.output.display()
        ));
    }
    if !bad.is_empty() {
        return Err(Error::Usage(format!("init-model: {}", bad.join("; "))));
    }
    let config_path = if opts.config.is_dir() {
        opts.config.join("config.json")
    } else {
        opts.config.clone()
    };
    if !config_path.is_file() {
        return Err(Error::missing(
            &config_path,
            "--config must be a model's config.json (or a folder holding one)",
        ));
    }
    let text = std::fs::read_to_string(&config_path).at(&config_path)?;
    let mut config: Value = serde_json::from_str(&text)
        .map_err(|e| Error::bad_file(&config_path, format!("not JSON: {e}")))?;
    if !config.is_object() {
        return Err(Error::bad_file(
            &config_path,
            "config.json is not an object",
        ));
    }
    let tok = TokenizerFile::open(&opts.tokenizer, "--tokenizer")?;
    let vocab = padded(tok.size(), opts.pad_to_multiple_of);
    config["vocab_size"] = Value::from(vocab);
    set_token_ids(&mut config, &tok.role_ids()?, vocab);
    let dtype_name = Value::from(crate::config::torch_dtype_name(opts.dtype));
    let obj = config.as_object_mut().expect("checked above");
    let mut set = false;
    for key in ["dtype", "torch_dtype"] {
        if obj.contains_key(key) {
            obj.insert(key.into(), dtype_name.clone());
            set = true;
        }
    }
    if !set {
        obj.insert("torch_dtype".into(), dtype_name);
    }
    let cfg = parse_config(&config).map_err(|e| match e {
        Error::Config(m) => Error::bad_file(&config_path, m),
        other => other,
    })?;
    let std = config["initializer_range"].as_f64().unwrap_or(0.02);
    // LLaMA and Mistral build their embedding with padding_idx = pad_token_id.
    let pad_row = match cfg.family {
        Family::Llama | Family::Mistral => config["pad_token_id"]
            .as_u64()
            .map(|p| p as usize)
            .filter(|&p| p < vocab),
        _ => None,
    };
    let embed = format!("{}.weight", WeightNames::for_config(&cfg).embed);

    let shapes = parameter_shapes(&cfg)?;
    let parameters = shapes
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    let tensors: Vec<LazyTensor> = shapes
        .iter()
        .map(|(name, shape)| {
            let kind = init_kind(&cfg, name, std);
            let (name, shape_c, seed) = (name.clone(), shape.clone(), opts.seed);
            let zero_row = pad_row.filter(|_| name == embed);
            LazyTensor::new(name.clone(), shape.clone(), opts.dtype, move || {
                let n: usize = shape_c.iter().product();
                let mut v = match kind {
                    InitKind::Zeros => vec![0f32; n],
                    InitKind::Ones => vec![1f32; n],
                    InitKind::Normal(std) => {
                        let mut v = standard_normal(seed, &name, n);
                        v.iter_mut().for_each(|x| *x = (f64::from(*x) * std) as f32);
                        v
                    }
                };
                if let Some(r) = zero_row {
                    let c = shape_c[1];
                    v[r * c..(r + 1) * c].fill(0.0);
                }
                Ok(Tensor::from_vec(v, shape_c.as_slice(), &Device::Cpu)?)
            })
        })
        .collect();

    let tmp = temp_dir_beside(&opts.output)?;
    let dir = tmp.path();
    write_weights(dir, tensors, DEFAULT_MAX_SHARD_SIZE)?;
    let mut s = serde_json::to_string_pretty(&config).expect("JSON values serialise");
    s.push('\n');
    let p = dir.join("config.json");
    std::fs::write(&p, s).at(&p)?;
    for f in TOKENIZER_FILES {
        let src = opts.tokenizer.join(f);
        if src.is_file() {
            std::fs::copy(&src, dir.join(f)).at(&src)?;
        }
    }
    if !dir.join("tokenizer_config.json").exists() {
        let p = dir.join("tokenizer_config.json");
        std::fs::write(&p, "{\"tokenizer_class\": \"PreTrainedTokenizerFast\"}\n").at(&p)?;
    }
    publish_dir(tmp, &opts.output)?;
    Ok(InitReport {
        output: opts.output.clone(),
        family: cfg.family,
        vocab_size: vocab,
        tokenizer_size: tok.size(),
        parameters,
        tensors: shapes.len(),
        seed: opts.seed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_standard_normal_and_reproducible() {
        let a = standard_normal(7, "w", 200_001);
        assert_eq!(a, standard_normal(7, "w", 200_001));
        assert_ne!(a[..8], standard_normal(8, "w", 8)[..]);
        assert_ne!(a[..8], standard_normal(7, "v", 8)[..]);
        // The first values do not depend on how many are drawn.
        assert_eq!(a[..8], standard_normal(7, "w", 8)[..]);
        let n = a.len() as f64;
        let mean = a.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let var = a
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / n;
        assert!(
            mean.abs() < 0.01 && (var.sqrt() - 1.0).abs() < 0.01,
            "{mean} {var}"
        );
    }
}
