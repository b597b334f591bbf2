//! PEFT adapters: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! Tensor names are `base_model.model.<module>.lora_A.weight` (`(r, in)`) and
//! `...lora_B.weight` (`(out, r)`), whatever `fan_in_fan_out` says: that flag only
//! tells PEFT the *base* layer is a Conv1D (GPT-2), which our loader already handles.
//!
//! Beside them, the embeddings and head an adapter trains ([`AdapterEmbeddings`]):
//!
//! ```text
//! trainable_token_indices {"embed_tokens": ids, "lm_head": ids}   (or a list: the embeddings)
//!   base_model.model.<module>.token_adapter.trainable_tokens_delta   (n, C): the rows' values
//! modules_to_save ["embed_tokens", "lm_head"]
//!   base_model.model.<module>.weight                                 (V, C): the whole matrix
//! ```
//!
//! A tied head is the embeddings: trainable tokens name only the embeddings (PEFT ties
//! the head to them), `modules_to_save` both, with `ensure_weight_tying`.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde_json::{Value, json};

use crate::config::{Config, Family};
use crate::error::{Error, IoContext, Result};
use crate::lora::{EmbeddingsConfig, LoraConfig, TOKEN_ROWS_SUFFIX};

/// Prefix PEFT puts before module paths.
pub const PEFT_PREFIX: &str = "base_model.model.";
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// LoRA matrices by module path: `(A, B)`.
pub type LoraMatrices = BTreeMap<String, (Tensor, Tensor)>;

/// An adapter read from disk.
#[derive(Debug)]
pub struct PeftAdapter {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub rslora: bool,
    pub target_modules: Vec<String>,
    /// Module path → `(A, B)`.
    pub tensors: LoraMatrices,
    /// The embeddings and head it trained.
    pub embeddings: AdapterEmbeddings,
}

/// The embeddings and head an adapter trained beside its LoRA matrices.
#[derive(Debug, Clone, Default)]
pub struct AdapterEmbeddings {
    /// Trainable tokens: module path, token ids, their rows `(n, C)`.
    pub rows: Vec<(String, Vec<u32>, Tensor)>,
    /// `modules_to_save`: module path, its whole weight.
    pub whole: Vec<(String, Tensor)>,
}

impl AdapterEmbeddings {
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.whole.is_empty()
    }
}

impl PeftAdapter {
    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

/// Whether `dir` holds a PEFT adapter.
pub fn is_adapter_dir(dir: &Path) -> bool {
    dir.join(ADAPTER_CONFIG).exists()
}

/// Read the adapter in `dir`: its settings from `adapter_config.json`, its matrices
/// from `adapter_model.safetensors`, both checked against what a plain LoRA adapter is.
pub fn load_adapter(dir: &Path, device: &Device) -> Result<PeftAdapter> {
    let cfg = read_adapter_config(&dir.join(ADAPTER_CONFIG))?;
    let (tensors, embeddings) = read_tensors(&dir.join(ADAPTER_WEIGHTS), &cfg, device)?;
    Ok(PeftAdapter {
        r: cfg.r,
        alpha: cfg.alpha,
        dropout: cfg.dropout,
        rslora: cfg.rslora,
        target_modules: cfg.target_modules,
        tensors,
        embeddings,
    })
}

/// What `adapter_config.json` says about an adapter.
struct AdapterConfig {
    r: usize,
    alpha: f64,
    dropout: f32,
    rslora: bool,
    target_modules: Vec<String>,
    /// `trainable_token_indices`.
    token_indices: TokenIndices,
    /// `modules_to_save`.
    modules_to_save: Vec<String>,
}

/// PEFT's `trainable_token_indices`.
#[derive(Debug, Clone, Default)]
enum TokenIndices {
    #[default]
    None,
    /// Ids of the input embeddings.
    Embeddings(Vec<u32>),
    /// Module name → ids.
    Modules(BTreeMap<String, Vec<u32>>),
}

impl TokenIndices {
    /// The ids of the module at `path` (a module name matches a path it ends).
    fn of(&self, path: &str) -> Option<Vec<u32>> {
        match self {
            TokenIndices::None => None,
            TokenIndices::Embeddings(ids) => Some(ids.clone()),
            TokenIndices::Modules(m) => m
                .iter()
                .find(|(k, _)| path == k.as_str() || path.ends_with(&format!(".{k}")))
                .map(|(_, v)| v.clone()),
        }
    }
}

/// `trainable_token_indices` of the adapter config `v`: null, a list of ids, or module
/// names with their lists.
fn config_token_indices(v: &Value) -> std::result::Result<TokenIndices, String> {
    let ids = |a: &Value| -> std::result::Result<Vec<u32>, String> {
        a.as_array()
            .and_then(|a| {
                a.iter()
                    .map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()))
                    .collect::<Option<Vec<u32>>>()
            })
            .ok_or_else(|| format!("trainable_token_indices holds {a}, not a list of token ids"))
    };
    match v.get("trainable_token_indices") {
        None | Some(Value::Null) => Ok(TokenIndices::None),
        Some(a @ Value::Array(_)) => Ok(TokenIndices::Embeddings(ids(a)?)),
        Some(Value::Object(m)) => Ok(TokenIndices::Modules(
            m.iter()
                .map(|(k, a)| Ok((k.clone(), ids(a)?)))
                .collect::<std::result::Result<_, String>>()?,
        )),
        Some(other) => Err(format!(
            "trainable_token_indices is {other}; expected a list of token ids or module names with theirs"
        )),
    }
}

/// Read and check the adapter's `adapter_config.json` at `path`: a LoRA adapter
/// (no DoRA, no trained biases) of one positive rank and alpha for every module.
fn read_adapter_config(path: &Path) -> Result<AdapterConfig> {
    if !path.exists() {
        return Err(Error::missing(
            path,
            "an adapter folder holds adapter_config.json and adapter_model.safetensors (PEFT format)",
        ));
    }
    let text = std::fs::read_to_string(path).at(path)?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| Error::bad_file(path, format!("not JSON: {e}")))?;
    let bad = |m: &str| Error::bad_file(path, m);
    check_plain_lora(&v).map_err(|m| bad(&m))?;
    let r = config_rank(&v).map_err(|m| bad(&m))?;
    let alpha = config_alpha(&v).map_err(|m| bad(&m))?;
    let dropout = v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0) as f32;
    let rslora = v
        .get("use_rslora")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let target_modules = match v.get("target_modules") {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|s| s.as_str().map(String::from))
            .collect(),
        Some(Value::String(s)) => vec![s.clone()],
        _ => vec![],
    };
    check_uniform(&v).map_err(|m| bad(&m))?;
    let token_indices = config_token_indices(&v).map_err(|m| bad(&m))?;
    let modules_to_save = match v.get("modules_to_save") {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|s| s.as_str().map(String::from))
            .collect(),
        _ => vec![],
    };
    Ok(AdapterConfig {
        r,
        alpha,
        dropout,
        rslora,
        target_modules,
        token_indices,
        modules_to_save,
    })
}

/// Why the adapter config `v` is not a plain LoRA adapter (another PEFT type, DoRA,
/// trained biases), if it is not.
fn check_plain_lora(v: &Value) -> std::result::Result<(), String> {
    if let Some(t) = v.get("peft_type").and_then(Value::as_str) {
        if t != "LORA" {
            return Err(format!(
                "peft_type {t} is not supported; only LORA adapters are"
            ));
        }
    }
    if v.get("use_dora").and_then(Value::as_bool) == Some(true) {
        return Err("DoRA adapters (use_dora: true) are not supported".into());
    }
    if let Some(b) = v.get("bias").and_then(Value::as_str) {
        if b != "none" {
            return Err(format!(
                "adapters with trained biases (bias: {b}) are not supported"
            ));
        }
    }
    Ok(())
}

/// The adapter's rank `r`, a positive integer.
fn config_rank(v: &Value) -> std::result::Result<usize, String> {
    let r = v
        .get("r")
        .and_then(Value::as_u64)
        .ok_or("no rank \"r\" (a positive integer)")? as usize;
    if r == 0 {
        return Err(
            "r is 0; a LoRA adapter has a positive rank (that of its lora_A / lora_B matrices)"
                .into(),
        );
    }
    Ok(r)
}

/// The adapter's `lora_alpha` (PEFT's default 8 when absent), positive and finite.
fn config_alpha(v: &Value) -> std::result::Result<f64, String> {
    let alpha = match v.get("lora_alpha") {
        None | Some(Value::Null) => 8.0,
        Some(a) => a
            .as_f64()
            .ok_or_else(|| format!("lora_alpha {a} is not a number"))?,
    };
    if !(alpha.is_finite() && alpha > 0.0) {
        return Err(format!(
            "lora_alpha is {alpha}; the adapter's update is scaled by lora_alpha / r, so it must be positive (0 makes the adapter do nothing)"
        ));
    }
    Ok(alpha)
}

/// Per-module ranks or alphas (`rank_pattern`, `alpha_pattern`) are refused: every
/// module is read with the one `r` and `lora_alpha`.
fn check_uniform(v: &Value) -> std::result::Result<(), String> {
    let first_key = |field: &str| {
        v.get(field)
            .and_then(Value::as_object)
            .and_then(|m| m.keys().next().cloned())
    };
    if let Some(k) = first_key("rank_pattern") {
        return Err(format!(
            "per-module ranks (rank_pattern: {k}) are not supported"
        ));
    }
    if let Some(k) = first_key("alpha_pattern") {
        return Err(format!(
            "per-module alphas (alpha_pattern: {k}) are not supported"
        ));
    }
    Ok(())
}

/// The LoRA matrices of `adapter_model.safetensors` at `path`, by module path, each
/// `(A, B)` of rank `cfg.r`, and the embeddings it trained (as `cfg` names them); a
/// tensor that is not one of a pair, or not what `cfg` says, is refused.
fn read_tensors(
    path: &Path,
    cfg: &AdapterConfig,
    device: &Device,
) -> Result<(LoraMatrices, AdapterEmbeddings)> {
    if !path.exists() {
        return Err(Error::missing(
            path,
            "the adapter's weights (PEFT saves them as adapter_model.safetensors)",
        ));
    }
    let raw = candle_core::safetensors::load(path, device)
        .map_err(|e| Error::bad_file(path, format!("not a safetensors file: {e}")))?;
    let mut a_map = BTreeMap::new();
    let mut b_map = BTreeMap::new();
    let mut embeddings = AdapterEmbeddings::default();
    for (name, t) in raw {
        if let Some(e) = embedding_tensor(&name, &t, cfg).map_err(|m| Error::bad_file(path, m))? {
            match e {
                Embedding::Rows(module, ids) => embeddings.rows.push((module, ids, t)),
                Embedding::Whole(module) => embeddings.whole.push((module, t)),
            }
            continue;
        }
        let (module, is_a) = lora_matrix(&name, &t, cfg.r).map_err(|m| Error::bad_file(path, m))?;
        if is_a {
            a_map.insert(module, t);
        } else {
            b_map.insert(module, t);
        }
    }
    let mut tensors = BTreeMap::new();
    for (m, a) in a_map {
        let b = b_map
            .remove(&m)
            .ok_or_else(|| Error::bad_file(path, format!("{m} has lora_A but no lora_B")))?;
        tensors.insert(m, (a, b));
    }
    if let Some(m) = b_map.keys().next() {
        return Err(Error::bad_file(
            path,
            format!("{m} has lora_B but no lora_A"),
        ));
    }
    Ok((tensors, embeddings))
}

/// An adapter tensor of the embeddings or head.
enum Embedding {
    /// Trainable tokens of the module, with their ids.
    Rows(String, Vec<u32>),
    /// The module's whole weight (`modules_to_save`).
    Whole(String),
}

/// What the adapter tensor `name` is of the embeddings and head, as `cfg` says (None:
/// not theirs); why not, when it is not what `cfg` says.
fn embedding_tensor(
    name: &str,
    t: &Tensor,
    cfg: &AdapterConfig,
) -> std::result::Result<Option<Embedding>, String> {
    let inner = name.strip_prefix(PEFT_PREFIX).unwrap_or(name);
    let inner = inner.replace(".default.", ".");
    let floating = || {
        if t.dtype().is_float() && t.rank() == 2 {
            Ok(())
        } else {
            Err(format!(
                "tensor {name} is a {:?} of shape {:?}; trained embedding rows are a floating point matrix",
                t.dtype(),
                t.dims()
            ))
        }
    };
    if let Some(module) = inner.strip_suffix(TOKEN_ROWS_SUFFIX) {
        floating()?;
        let ids = cfg.token_indices.of(module).ok_or_else(|| {
            format!("tensor {name} holds trainable token rows, but trainable_token_indices of {ADAPTER_CONFIG} names no ids for {module}")
        })?;
        if t.dim(0).ok() != Some(ids.len()) {
            return Err(format!(
                "tensor {name} has {:?} rows for {} token ids of trainable_token_indices",
                t.dims(),
                ids.len()
            ));
        }
        return Ok(Some(Embedding::Rows(module.to_string(), ids)));
    }
    if let Some(module) = inner.strip_suffix(".weight") {
        let saved = cfg
            .modules_to_save
            .iter()
            .any(|m| module == m || module.ends_with(&format!(".{m}")));
        if saved {
            floating()?;
            return Ok(Some(Embedding::Whole(module.to_string())));
        }
    }
    Ok(None)
}

/// The module path of the adapter tensor `name` (PEFT's prefix and `.default.` taken
/// out) and whether it is `lora_A` (else `lora_B`); why not, when `t` is no floating
/// point LoRA matrix of rank `r`.
fn lora_matrix(name: &str, t: &Tensor, r: usize) -> std::result::Result<(String, bool), String> {
    if !t.dtype().is_float() {
        return Err(format!(
            "tensor {name} is {:?}; LoRA matrices must be floating point",
            t.dtype()
        ));
    }
    // lora_A is (r, in) and lora_B (out, r), with the r of adapter_config.json: the
    // update is scaled by alpha / r, so another rank would scale it wrongly.
    let (is_a, is_b) = (
        name.ends_with(".lora_A.weight"),
        name.ends_with(".lora_B.weight"),
    );
    let rank = match t.dims() {
        [a, _] if is_a => Some(*a),
        [_, b] if is_b => Some(*b),
        _ => None,
    };
    if (is_a || is_b) && rank != Some(r) {
        return Err(format!(
            "tensor {name} has shape {:?}, but {ADAPTER_CONFIG} says r = {r} (lora_A is (r, in), lora_B (out, r)); fix r or the weights",
            t.dims()
        ));
    }
    let inner = name.strip_prefix(PEFT_PREFIX).unwrap_or(name);
    let inner = inner.replace(".default.", ".");
    if let Some(m) = inner.strip_suffix(".lora_A.weight") {
        Ok((m.to_string(), true))
    } else if let Some(m) = inner.strip_suffix(".lora_B.weight") {
        Ok((m.to_string(), false))
    } else {
        Err(format!(
            "tensor {name} is not a LoRA matrix (lora_A / lora_B); other adapter kinds are not supported"
        ))
    }
}

/// The `target_modules` to write: each adapted module's path below its layer
/// (`self_attn.q_proj`, `mlp.c_proj`), so that PEFT's suffix match finds exactly them.
pub fn target_modules(module_paths: &[String]) -> Vec<String> {
    let mut set = std::collections::BTreeSet::new();
    for p in module_paths {
        let parts: Vec<&str> = p.split('.').collect();
        // After the layer index: "model.layers.3.self_attn.q_proj" → "self_attn.q_proj".
        let tail = match parts.iter().position(|s| s.parse::<usize>().is_ok()) {
            Some(i) => parts[i + 1..].join("."),
            None => p.clone(),
        };
        set.insert(tail);
    }
    set.into_iter().collect()
}

/// Write `adapter_config.json` + `adapter_model.safetensors` into `dir` (created),
/// each file atomically. `tensors` are keyed `<module>.lora_{A,B}.weight`, and for the
/// embeddings and head `embeddings` says they trained, as
/// [`crate::lora::adapter_tensors`] names them.
pub fn save_adapter(
    dir: &Path,
    model_cfg: &Config,
    lora: &LoraConfig,
    base_model: &str,
    tensors: &[(String, Tensor)],
    embeddings: &EmbeddingsConfig,
) -> Result<()> {
    std::fs::create_dir_all(dir).at(dir)?;
    let modules: Vec<String> = tensors
        .iter()
        .filter_map(|(n, _)| n.strip_suffix(".lora_A.weight").map(String::from))
        .collect();
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": target_modules(&modules),
        "fan_in_fan_out": model_cfg.family == Family::Gpt2,
        "bias": "none",
        "use_rslora": lora.rslora,
        "use_dora": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": if embeddings.modules_to_save.is_empty() {
            Value::Null
        } else {
            json!(embeddings.modules_to_save)
        },
        "trainable_token_indices": if embeddings.token_indices.is_empty() {
            Value::Null
        } else {
            json!(embeddings.token_indices)
        },
        "ensure_weight_tying": embeddings.tied && !embeddings.modules_to_save.is_empty(),
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    });
    let text = serde_json::to_string_pretty(&config).expect("JSON of plain values");
    crate::io::write_atomic(&dir.join(ADAPTER_CONFIG), text.as_bytes())?;
    let named: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| (format!("{PEFT_PREFIX}{n}"), t.clone()))
        .collect();
    crate::io::save_safetensors_atomic(&dir.join(ADAPTER_WEIGHTS), &named, None)
}
