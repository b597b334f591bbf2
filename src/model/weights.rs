//! Memory-mapped safetensors weights of a model folder, sharded or not.
//!
//! A folder holds `model.safetensors`, or shards listed in `model.safetensors.index.json`
//! (`weight_map`: tensor name → file). Tensors may be f32, bf16 or f16; they are
//! converted to the dtype asked for and checked against the shape the model expects.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, IoContext, Result};

/// Name of the index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Name of an unsharded checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";

/// Somewhere tensors can be fetched by name, checked and converted.
pub trait TensorSource {
    /// The tensor `name`, of shape `shape`, as `dtype` on `device`.
    fn tensor(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor>;
    /// Whether `name` is present.
    fn contains(&self, name: &str) -> bool;
    /// Fail when the source holds tensors that none of `used` (names as passed to
    /// [`tensor`](Self::tensor)) refers to, beyond the [harmless](is_harmless_extra)
    /// ones: weights the config does not declare, such as biases or extra layers, would
    /// otherwise be dropped in silence. `tied`: the head reuses the embeddings.
    fn check_all_used(&self, _used: &[String], _tied: bool) -> Result<()> {
        Ok(())
    }
}

/// Whether a stored tensor the model does not read is known to carry nothing the model
/// needs: buffers transformers recomputes (rotary `inv_freq`, the causal masks
/// `attn.bias` / `masked_bias` of GPT-2, GPT-Neo and GPT-NeoX), and a copy of the
/// embeddings saved as `lm_head.weight` by a model whose head is tied to them.
pub fn is_harmless_extra(name: &str, tied: bool) -> bool {
    name.ends_with(".inv_freq")
        || name.ends_with(".masked_bias")
        || name.ends_with(".attn.bias")
        || name.ends_with(".attention.bias")
        || (tied && name == "lm_head.weight")
}

/// Whether a stored dtype holds weights (floating point).
fn is_float(d: safetensors::Dtype) -> bool {
    use safetensors::Dtype::*;
    matches!(d, F16 | BF16 | F32 | F64)
}

/// The safetensors files of a model folder.
pub struct Weights {
    st: MmapedSafetensors,
    names: BTreeSet<String>,
    files: Vec<PathBuf>,
    dir: PathBuf,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights")
            .field("files", &self.files)
            .finish()
    }
}

/// The weight files of `dir`: the shards of the index, or `model.safetensors`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join(INDEX_FILE);
    if index.exists() {
        let text = std::fs::read_to_string(&index).at(&index)?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::bad_file(&index, format!("not JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::bad_file(&index, "no \"weight_map\" object"))?;
        let files: BTreeSet<&str> = map.values().filter_map(|f| f.as_str()).collect();
        let files: Vec<PathBuf> = files.into_iter().map(|f| dir.join(f)).collect();
        for f in &files {
            if !f.exists() {
                return Err(Error::missing(f, format!("listed in {}", index.display())));
            }
        }
        return Ok(files);
    }
    let single = dir.join(SINGLE_FILE);
    if single.exists() {
        return Ok(vec![single]);
    }
    let has_bin = dir.join("pytorch_model.bin").exists();
    Err(Error::missing(
        &single,
        if has_bin {
            "this folder only has pytorch_model.bin; lit-claire reads safetensors (save the model \
             with transformers' save_pretrained(safe_serialization=True))"
        } else {
            "no model.safetensors or model.safetensors.index.json in the checkpoint folder"
        },
    ))
}

impl Weights {
    /// Map the weights of the model folder `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let files = weight_files(dir)?;
        Self::from_files(dir, files)
    }

    /// Map the given safetensors files.
    pub fn from_files(dir: &Path, files: Vec<PathBuf>) -> Result<Self> {
        // SAFETY: the files are only read; as with any mmap, a concurrent writer
        // truncating them would be undefined behaviour, which we document.
        let st = unsafe { MmapedSafetensors::multi(&files) }
            .map_err(|e| Error::bad_file(&files[0], format!("not a safetensors file: {e}")))?;
        let names = st.tensors().into_iter().map(|(n, _)| n).collect();
        Ok(Weights {
            st,
            names,
            files,
            dir: dir.to_path_buf(),
        })
    }

    /// Every tensor name in the files.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(String::as_str)
    }

    /// The files mapped.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Stored dtype of the first floating tensor (what `merge`/`convert` write back).
    pub fn stored_dtype(&self) -> DType {
        self.st
            .tensors()
            .iter()
            .map(|(_, v)| v.dtype())
            .find_map(|d| match d {
                safetensors::Dtype::BF16 => Some(DType::BF16),
                safetensors::Dtype::F16 => Some(DType::F16),
                safetensors::Dtype::F32 => Some(DType::F32),
                _ => None,
            })
            .unwrap_or(DType::F32)
    }

    /// The name under which `name` is stored: itself, or without its first path
    /// component (GPT-2 checkpoints saved from the bare `GPT2Model` lack `transformer.`).
    fn resolve<'a>(&'a self, name: &'a str) -> Option<&'a str> {
        if self.names.contains(name) {
            return Some(name);
        }
        let stripped = name.split_once('.').map(|(_, rest)| rest)?;
        self.names.contains(stripped).then_some(stripped)
    }

    /// Load a tensor whatever its shape and dtype (for conversion, which copies
    /// integer buffers as they are).
    pub fn raw(&self, name: &str, device: &Device) -> Result<Tensor> {
        let stored = self.resolve(name).ok_or_else(|| self.missing(name))?;
        Ok(self.st.load(stored, device)?)
    }

    /// The shape of the stored tensor `name`, checking that it exists and holds
    /// floating-point values (an integer tensor cast to float would be scored silently).
    pub fn stored_shape(&self, name: &str) -> Result<Vec<usize>> {
        let stored = self.resolve(name).ok_or_else(|| self.missing(name))?;
        let view = self.st.get(stored)?;
        if !is_float(view.dtype()) {
            return Err(Error::Weights(format!(
                "tensor {stored} in {} is {}; model weights must be floating point (f32, bf16 or f16)",
                self.dir.display(),
                format!("{:?}", view.dtype()).to_lowercase()
            )));
        }
        Ok(view.shape().to_vec())
    }

    /// Check that `name` is stored as a floating-point tensor of `shape`, without
    /// reading it.
    pub fn check(&self, name: &str, shape: &[usize]) -> Result<()> {
        let stored = self.stored_shape(name)?;
        if stored != shape {
            return Err(Error::Weights(format!(
                "tensor {name} in {} has shape {:?}, expected {:?} from config.json",
                self.dir.display(),
                stored,
                shape
            )));
        }
        Ok(())
    }

    fn missing(&self, name: &str) -> Error {
        Error::Weights(format!(
            "tensor {name} not found in {} ({} tensors in {} file(s)); is this checkpoint of the family its config.json says?",
            self.dir.display(),
            self.names.len(),
            self.files.len()
        ))
    }

    /// The stored tensors that none of `used` refers to, harmless ones left out.
    pub fn unused(&self, used: &[String], tied: bool) -> Vec<String> {
        let used: BTreeSet<&str> = used.iter().filter_map(|n| self.resolve(n)).collect();
        self.names
            .iter()
            .filter(|n| !used.contains(n.as_str()) && !is_harmless_extra(n, tied))
            .cloned()
            .collect()
    }
}

impl TensorSource for Weights {
    fn tensor(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        self.check(name, shape)?;
        Ok(self.raw(name, device)?.to_dtype(dtype)?)
    }

    fn contains(&self, name: &str) -> bool {
        self.resolve(name).is_some()
    }

    fn check_all_used(&self, used: &[String], tied: bool) -> Result<()> {
        let unused = self.unused(used, tied);
        if unused.is_empty() {
            return Ok(());
        }
        let shown: Vec<&str> = unused.iter().take(5).map(String::as_str).collect();
        Err(Error::Weights(format!(
            "{} holds {} tensor(s) that config.json gives no place to: {}{}; does config.json match the weights (bias / attention_bias / mlp_bias, number of layers, tie_word_embeddings)?",
            self.dir.display(),
            unused.len(),
            shown.join(", "),
            if unused.len() > shown.len() {
                ", ..."
            } else {
                ""
            }
        )))
    }
}
