//! PEFT adapters: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! Tensor names are `base_model.model.<module>.lora_A.weight` (`(r, in)`) and
//! `...lora_B.weight` (`(out, r)`), whatever `fan_in_fan_out` says: that flag only
//! tells PEFT the *base* layer is a Conv1D (GPT-2), which our loader already handles.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde_json::{Value, json};

use crate::config::{Config, Family};
use crate::error::{Error, IoContext, Result};
use crate::lora::LoraConfig;

/// Prefix PEFT puts before module paths.
pub const PEFT_PREFIX: &str = "base_model.model.";
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// An adapter read from disk.
#[derive(Debug)]
pub struct PeftAdapter {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub rslora: bool,
    pub target_modules: Vec<String>,
    /// Module path → `(A, B)`.
    pub tensors: BTreeMap<String, (Tensor, Tensor)>,
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

/// Read the adapter in `dir`.
pub fn load_adapter(dir: &Path, device: &Device) -> Result<PeftAdapter> {
    let cfg_path = dir.join(ADAPTER_CONFIG);
    if !cfg_path.exists() {
        return Err(Error::missing(
            &cfg_path,
            "an adapter folder holds adapter_config.json and adapter_model.safetensors (PEFT format)",
        ));
    }
    let text = std::fs::read_to_string(&cfg_path).at(&cfg_path)?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::bad_file(&cfg_path, format!("not JSON: {e}")))?;
    let bad = |m: &str| Error::bad_file(&cfg_path, m);
    if let Some(t) = v.get("peft_type").and_then(Value::as_str) {
        if t != "LORA" {
            return Err(bad(&format!(
                "peft_type {t} is not supported; only LORA adapters are"
            )));
        }
    }
    if v.get("use_dora").and_then(Value::as_bool) == Some(true) {
        return Err(bad("DoRA adapters (use_dora: true) are not supported"));
    }
    if let Some(b) = v.get("bias").and_then(Value::as_str) {
        if b != "none" {
            return Err(bad(&format!(
                "adapters with trained biases (bias: {b}) are not supported"
            )));
        }
    }
    let r = v
        .get("r")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad("no rank \"r\" (a positive integer)"))? as usize;
    if r == 0 {
        return Err(bad(
            "r is 0; a LoRA adapter has a positive rank (that of its lora_A / lora_B matrices)",
        ));
    }
    let alpha = match v.get("lora_alpha") {
        None | Some(Value::Null) => 8.0,
        Some(a) => a
            .as_f64()
            .ok_or_else(|| bad(&format!("lora_alpha {a} is not a number")))?,
    };
    if !(alpha.is_finite() && alpha > 0.0) {
        return Err(bad(&format!(
            "lora_alpha is {alpha}; the adapter's update is scaled by lora_alpha / r, so it must be positive (0 makes the adapter do nothing)"
        )));
    }
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
    if let Some(k) = v
        .get("rank_pattern")
        .and_then(Value::as_object)
        .and_then(|m| m.keys().next())
    {
        return Err(bad(&format!(
            "per-module ranks (rank_pattern: {k}) are not supported"
        )));
    }
    if let Some(k) = v
        .get("alpha_pattern")
        .and_then(Value::as_object)
        .and_then(|m| m.keys().next())
    {
        return Err(bad(&format!(
            "per-module alphas (alpha_pattern: {k}) are not supported"
        )));
    }

    let w_path = dir.join(ADAPTER_WEIGHTS);
    if !w_path.exists() {
        return Err(Error::missing(
            &w_path,
            "the adapter's weights (PEFT saves them as adapter_model.safetensors)",
        ));
    }
    let raw = candle_core::safetensors::load(&w_path, device)
        .map_err(|e| Error::bad_file(&w_path, format!("not a safetensors file: {e}")))?;
    let mut a_map = BTreeMap::new();
    let mut b_map = BTreeMap::new();
    for (name, t) in raw {
        if !t.dtype().is_float() {
            return Err(Error::bad_file(
                &w_path,
                format!(
                    "tensor {name} is {:?}; LoRA matrices must be floating point",
                    t.dtype()
                ),
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
            return Err(Error::bad_file(
                &w_path,
                format!(
                    "tensor {name} has shape {:?}, but {ADAPTER_CONFIG} says r = {r} (lora_A is (r, in), lora_B (out, r)); fix r or the weights",
                    t.dims()
                ),
            ));
        }
        let inner = name.strip_prefix(PEFT_PREFIX).unwrap_or(&name);
        let inner = inner.replace(".default.", ".");
        if let Some(m) = inner.strip_suffix(".lora_A.weight") {
            a_map.insert(m.to_string(), t);
        } else if let Some(m) = inner.strip_suffix(".lora_B.weight") {
            b_map.insert(m.to_string(), t);
        } else {
            return Err(Error::bad_file(
                &w_path,
                format!(
                    "tensor {name} is not a LoRA matrix (lora_A / lora_B); other adapter kinds are not supported"
                ),
            ));
        }
    }
    let mut tensors = BTreeMap::new();
    for (m, a) in a_map {
        let b = b_map
            .remove(&m)
            .ok_or_else(|| Error::bad_file(&w_path, format!("{m} has lora_A but no lora_B")))?;
        tensors.insert(m, (a, b));
    }
    if let Some(m) = b_map.keys().next() {
        return Err(Error::bad_file(
            &w_path,
            format!("{m} has lora_B but no lora_A"),
        ));
    }
    Ok(PeftAdapter {
        r,
        alpha,
        dropout,
        rslora,
        target_modules,
        tensors,
    })
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
/// each file atomically. `tensors` are keyed `<module>.lora_{A,B}.weight`.
pub fn save_adapter(
    dir: &Path,
    model_cfg: &Config,
    lora: &LoraConfig,
    base_model: &str,
    tensors: &[(String, Tensor)],
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
        "modules_to_save": null,
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
