//! The tensors of a checkpoint with a LoRA adapter merged in, computed one at a time.
//!
//! For every adapted module with `A: (r, in)`, `B: (out, r)` and scale `s`
//! (`alpha / r`, or `alpha / sqrt(r)` with rsLoRA):
//!
//! ```text
//! W' = W + s · B A          computed in f32, then stored in the output dtype
//! ```
//!
//! Tensors keep the base checkpoint's names and layout: GPT-2's Conv1D weights are
//! stored `(in, out)`, so they receive `(s · B A)ᵀ`. Tensors no adapter touches are
//! only converted to the output dtype (floating tensors; others are kept as stored).
//! An adapter on a tied head unties it: the merged head is written as a tensor of its
//! own (`lm_head.weight`) and the embeddings stay as they were.
//!
//! Embeddings and head the adapter trained ([`AdapterEmbeddings`]) are written in:
//!
//! ```text
//! E' = whole matrix (modules_to_save), else E;  then E'[ids] = rows (trainable tokens)
//! ```
//!
//! the same for an untied head. A tied head follows its embeddings, and stays tied
//! unless the adapter gives it values of its own (then it is untied as above).
//!
//! Nothing is loaded up front: each tensor is a [`LazyTensor`] read from the
//! memory-mapped base when it is written.
//!
//! An adapter trained by lit-claire records a fingerprint of its base weights
//! ([`base_fingerprint`]); merging it into other weights is refused
//! ([`check_base_fingerprint`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::peft::{AdapterEmbeddings, PeftAdapter};
use super::shards::LazyTensor;
use crate::config::Config;
use crate::error::{Error, IoContext, Result};
use crate::lora::{VocabMatrix, vocab_matrix};
use crate::model::names::WeightNames;
use crate::model::token_rows::rows_replaced;
use crate::model::weights::Weights;

/// Name, shape and dtype of every tensor in safetensors files, read from their
/// headers only.
pub fn stored_tensors(files: &[PathBuf]) -> Result<BTreeMap<String, (Vec<usize>, DType)>> {
    use std::io::Read;
    let mut out = BTreeMap::new();
    for f in files {
        let mut file = std::fs::File::open(f).at(f)?;
        let mut len = [0u8; 8];
        file.read_exact(&mut len).at(f)?;
        let n = u64::from_le_bytes(len);
        if n > 100_000_000 {
            return Err(Error::bad_file(
                f,
                "not a safetensors file (header too large)",
            ));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header).at(f)?;
        let v: serde_json::Value = serde_json::from_slice(&header)
            .map_err(|e| Error::bad_file(f, format!("not a safetensors header: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| Error::bad_file(f, "safetensors header is not an object"))?;
        for (name, info) in obj {
            if name == "__metadata__" {
                continue;
            }
            let shape: Vec<usize> = info
                .get("shape")
                .and_then(|s| s.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|d| d.as_u64())
                        .map(|d| d as usize)
                        .collect()
                })
                .ok_or_else(|| Error::bad_file(f, format!("tensor {name} has no shape")))?;
            let dtype = match info.get("dtype").and_then(|d| d.as_str()) {
                Some("F32") => DType::F32,
                Some("F16") => DType::F16,
                Some("BF16") => DType::BF16,
                Some("F64") => DType::F64,
                Some("I64") => DType::I64,
                Some("U32") => DType::U32,
                Some("U8") | Some("BOOL") => DType::U8,
                other => {
                    return Err(Error::bad_file(
                        f,
                        format!(
                            "tensor {name} has dtype {other:?}, which lit-claire cannot convert"
                        ),
                    ));
                }
            };
            out.insert(name.clone(), (shape, dtype));
        }
    }
    Ok(out)
}

fn is_float(d: DType) -> bool {
    matches!(d, DType::F32 | DType::F16 | DType::BF16 | DType::F64)
}

/// One adapter's contribution to a stored weight.
#[derive(Clone)]
struct Delta {
    a: Tensor,
    b: Tensor,
    scale: f64,
    /// The stored weight is `(in, out)` (Conv1D).
    transposed: bool,
}

impl Delta {
    /// `s · B A` in the stored layout, f32.
    fn weight(&self) -> Result<Tensor> {
        let a = self.a.to_dtype(DType::F32)?;
        let b = self.b.to_dtype(DType::F32)?;
        let d = (b.matmul(&a)? * self.scale)?;
        Ok(if self.transposed {
            d.t()?.contiguous()?
        } else {
            d
        })
    }
}

/// The tensors to write, and what merging changed.
pub struct MergePlan {
    pub tensors: Vec<LazyTensor>,
    /// Number of weights an adapter was merged into.
    pub merged: usize,
    /// The head was tied and an adapter on it made it a tensor of its own.
    pub untied_head: bool,
}

impl std::fmt::Debug for MergePlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MergePlan")
            .field("tensors", &self.tensors.len())
            .field("merged", &self.merged)
            .field("untied_head", &self.untied_head)
            .finish()
    }
}

/// Plan the tensors of the checkpoint in `dir` (config `cfg`) with `adapter` merged
/// in, floating tensors stored as `dtype`. Every adapter module must match a weight
/// of the checkpoint with compatible shapes.
pub fn plan_merge(
    dir: &Path,
    cfg: &Config,
    adapter: Option<&PeftAdapter>,
    dtype: DType,
) -> Result<MergePlan> {
    let weights = Arc::new(Weights::open(dir)?);
    let base = Base {
        dir,
        cfg,
        names: WeightNames::for_config(cfg),
        stored: stored_tensors(weights.files())?,
    };
    let embed = base.embeddings()?;
    let (deltas, head_delta) = match adapter {
        Some(ad) => adapter_deltas(&base, &embed, ad)?,
        None => (BTreeMap::new(), None),
    };
    let (embed_edit, mut head_edit) = match adapter {
        Some(ad) => vocab_edits(&base, &ad.embeddings)?,
        None => Default::default(),
    };
    let head_name = format!("{}.weight", base.names.lm_head);
    let stored_head = match cfg.tie_embeddings {
        true => None,
        false => base.find(base.names.lm_head),
    };
    if let Some(h) = &stored_head
        && deltas.contains_key(h)
        && !head_edit.is_empty()
    {
        return Err(Error::Weights(format!(
            "the adapter trains the head {h} both with LoRA and as embeddings; it cannot be merged"
        )));
    }
    if cfg.tie_embeddings && head_edit.is_copy_of(&embed_edit)? {
        head_edit = VocabEdit::default();
    }
    let edited = !embed_edit.is_empty() as usize + !head_edit.is_empty() as usize;
    let merged = deltas.len() + head_delta.is_some() as usize + edited;
    let mut tensors = merged_tensors(&weights, &base.stored, deltas, dtype);
    if !embed_edit.is_empty() {
        let edit = embed_edit.clone();
        replace_tensor(&mut tensors, &embed, &weights, dtype, move |w| {
            edit.apply(w)
        })?;
    }
    if let (Some(h), false) = (&stored_head, head_edit.is_empty()) {
        let edit = head_edit.clone();
        replace_tensor(&mut tensors, h, &weights, dtype, move |w| edit.apply(w))?;
    } else if !head_edit.is_empty() && !cfg.tie_embeddings {
        return Err(Error::Weights(format!(
            "the adapter trains the head, but {} stores none",
            dir.display()
        )));
    }
    let untied_head = cfg.tie_embeddings && (head_delta.is_some() || !head_edit.is_empty());
    if untied_head {
        // A checkpoint may store its tied head too; the merged one replaces it.
        tensors.retain(|t| t.name != head_name);
        let (shape, _) = base.stored[&embed].clone();
        let w = weights.clone();
        tensors.push(LazyTensor::new(head_name, shape, dtype, move || {
            let base = w.raw(&embed, &Device::Cpu)?.to_dtype(DType::F32)?;
            let head = head_edit.apply(embed_edit.apply(base)?)?;
            Ok(match &head_delta {
                Some(d) => (head + d.weight()?)?,
                None => head,
            })
        }));
    }
    Ok(MergePlan {
        tensors,
        merged,
        untied_head,
    })
}

/// What an adapter writes into the embeddings or the head: a whole matrix, then rows.
#[derive(Debug, Clone, Default)]
struct VocabEdit {
    whole: Option<Tensor>,
    rows: Vec<(Vec<u32>, Tensor)>,
}

impl VocabEdit {
    fn is_empty(&self) -> bool {
        self.whole.is_none() && self.rows.is_empty()
    }

    /// `w` (as stored) with the edit, in f32.
    fn apply(&self, w: Tensor) -> Result<Tensor> {
        let mut w = match &self.whole {
            Some(t) => t.to_dtype(DType::F32)?,
            None => w.to_dtype(DType::F32)?,
        };
        for (ids, rows) in &self.rows {
            w = rows_replaced(&w, ids, &rows.to_dtype(DType::F32)?)?;
        }
        Ok(w)
    }

    /// Whether this (a tied head's) edit only repeats `embed`'s: the same whole
    /// matrix, as `modules_to_save` with `ensure_weight_tying` saves it, and no rows.
    fn is_copy_of(&self, embed: &VocabEdit) -> Result<bool> {
        let (Some(h), Some(e), true) = (&self.whole, &embed.whole, self.rows.is_empty()) else {
            return Ok(false);
        };
        if h.dims() != e.dims() {
            return Ok(false);
        }
        let diff = (h.to_dtype(DType::F32)? - e.to_dtype(DType::F32)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        Ok(diff == 0.0)
    }
}

/// The edits of the embeddings and of the head in `e`, each checked against the
/// stored matrix: `(V, C)` for a whole one, `(n, C)` rows of ids below V.
fn vocab_edits(base: &Base, e: &AdapterEmbeddings) -> Result<(VocabEdit, VocabEdit)> {
    let (mut embed, mut head) = (VocabEdit::default(), VocabEdit::default());
    let embed_name = base.embeddings()?;
    let (shape, _) = &base.stored[&embed_name];
    let (v, c) = match shape.as_slice() {
        [v, c] => (*v, *c),
        _ => {
            return Err(Error::Weights(format!(
                "{embed_name} has shape {shape:?}, not a matrix"
            )));
        }
    };
    let part = |module: &str| {
        vocab_matrix(&base.names, module).ok_or_else(|| {
            Error::Weights(format!(
                "adapter module {module} is neither the embeddings nor the head of the {} checkpoint {}; is the adapter for another base model?",
                base.cfg.family.model_type(),
                base.dir.display()
            ))
        })
    };
    let check = |module: &str, t: &Tensor, want: [usize; 2]| {
        if t.dims() != want {
            return Err(Error::Weights(format!(
                "adapter tensor of {module} has shape {:?}, expected {want:?}; is the adapter for another base model?",
                t.dims()
            )));
        }
        Ok(())
    };
    for (module, t) in &e.whole {
        check(module, t, [v, c])?;
        let target = match part(module)? {
            VocabMatrix::Embeddings => &mut embed,
            VocabMatrix::Head => &mut head,
        };
        target.whole = Some(t.clone());
    }
    for (module, ids, t) in &e.rows {
        check(module, t, [ids.len(), c])?;
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= v) {
            return Err(Error::Weights(format!(
                "adapter rows of {module}: token id {bad} is outside the vocabulary of {v}"
            )));
        }
        let target = match part(module)? {
            VocabMatrix::Embeddings => &mut embed,
            VocabMatrix::Head => &mut head,
        };
        target.rows.push((ids.clone(), t.clone()));
    }
    Ok((embed, head))
}

/// Replace the tensor `name` of `tensors` by `f` of its stored value, written as `dtype`.
fn replace_tensor(
    tensors: &mut [LazyTensor],
    name: &str,
    weights: &Arc<Weights>,
    dtype: DType,
    f: impl Fn(Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<()> {
    let t = tensors
        .iter_mut()
        .find(|t| t.name == name)
        .ok_or_else(|| Error::Weights(format!("the checkpoint has no {name}")))?;
    let (w, n) = (weights.clone(), name.to_string());
    *t = LazyTensor::new(name.to_string(), t.shape.clone(), dtype, move || {
        f(w.raw(&n, &Device::Cpu)?)
    });
    Ok(())
}

/// The base checkpoint an adapter is merged into: its tensors as stored (name →
/// shape, dtype) and its family's weight names.
struct Base<'a> {
    dir: &'a Path,
    cfg: &'a Config,
    names: WeightNames,
    stored: BTreeMap<String, (Vec<usize>, DType)>,
}

impl Base<'_> {
    /// The stored name of a module's weight: exact, without the first path component
    /// (bare GPT-2 checkpoints), or under the head's alias.
    fn find(&self, module: &str) -> Option<String> {
        let mut candidates = vec![format!("{module}.weight")];
        if let Some((_, rest)) = module.split_once('.') {
            candidates.push(format!("{rest}.weight"));
        }
        if module == self.names.lm_head {
            if let Some(alias) = self.names.lm_head_alias {
                candidates.push(format!("{alias}.weight"));
            }
        }
        candidates.into_iter().find(|c| self.stored.contains_key(c))
    }

    /// The stored name of the token embeddings, which every checkpoint has.
    fn embeddings(&self) -> Result<String> {
        self.find(self.names.embed).ok_or_else(|| {
            Error::Weights(format!(
                "{} has no token embeddings {}.weight; is it a {} checkpoint?",
                self.dir.display(),
                self.names.embed,
                self.cfg.family.model_type()
            ))
        })
    }

    /// Whether the adapter matrices `a`, `b` of `module` fit the stored weight
    /// `target` (stored `(in, out)` when `transposed`): a floating point matrix of
    /// `(out, in)` with `a: (r, in)` and `b: (out, r)`.
    fn check_fit(
        &self,
        module: &str,
        target: &str,
        (a, b): (&Tensor, &Tensor),
        transposed: bool,
    ) -> Result<()> {
        let (shape, stored_dtype) = &self.stored[target];
        if !is_float(*stored_dtype) {
            return Err(Error::Weights(format!(
                "{target} in {} is {stored_dtype:?}; model weights must be floating point (f32, bf16 or f16)",
                self.dir.display()
            )));
        }
        let (n_out, n_in) = match (shape.as_slice(), transposed) {
            ([o, i], false) => (*o, *i),
            ([i, o], true) => (*o, *i),
            _ => {
                return Err(Error::Weights(format!(
                    "adapter module {module} targets {target} of shape {shape:?}, which is not a matrix"
                )));
            }
        };
        let (r, a_in) = a.dims2()?;
        let (b_out, rb) = b.dims2()?;
        if a_in != n_in || b_out != n_out || rb != r {
            return Err(Error::Weights(format!(
                "adapter for {module}: lora_A {:?} and lora_B {:?} do not fit {target} of shape {shape:?} \
                 (expected ({r}, {n_in}) and ({n_out}, {r})); is the adapter for another base model?",
                a.dims(),
                b.dims()
            )));
        }
        Ok(())
    }
}

/// The updates of adapter `ad`: by the stored weight each one goes into, and the one
/// on a tied head (whose base is the embeddings `embed`), if any. Every module must
/// fit a weight of `base`.
fn adapter_deltas(
    base: &Base,
    embed: &str,
    ad: &PeftAdapter,
) -> Result<(BTreeMap<String, Delta>, Option<Delta>)> {
    let mut deltas: BTreeMap<String, Delta> = BTreeMap::new();
    let mut head_delta: Option<Delta> = None;
    let mut stray = Vec::new();
    for (module, (a, b)) in &ad.tensors {
        let canonical = base.names.canonical(module);
        let is_head = canonical == base.names.lm_head;
        let tied_head = is_head && base.cfg.tie_embeddings;
        let target = if tied_head {
            Some(embed.to_string())
        } else {
            base.find(&canonical)
        };
        let Some(target) = target else {
            stray.push(module.clone());
            continue;
        };
        let transposed = base.names.conv1d && !is_head;
        base.check_fit(module, &target, (a, b), transposed)?;
        let delta = Delta {
            a: a.clone(),
            b: b.clone(),
            scale: ad.scale(),
            transposed,
        };
        if tied_head {
            head_delta = Some(delta);
        } else {
            deltas.insert(target, delta);
        }
    }
    if !stray.is_empty() {
        return Err(Error::Weights(format!(
            "adapter modules {stray:?} match no weight of the {} checkpoint {}; is the adapter for another base model?",
            base.cfg.family.model_type(),
            base.dir.display()
        )));
    }
    Ok((deltas, head_delta))
}

/// Every stored tensor, in name order, as it will be written: floating ones as
/// `dtype` (others as stored), each with its delta added when `deltas` has one.
fn merged_tensors(
    weights: &Arc<Weights>,
    stored: &BTreeMap<String, (Vec<usize>, DType)>,
    mut deltas: BTreeMap<String, Delta>,
    dtype: DType,
) -> Vec<LazyTensor> {
    let mut tensors = Vec::with_capacity(stored.len() + 1);
    for (name, (shape, stored_dtype)) in stored {
        let out_dtype = if is_float(*stored_dtype) {
            dtype
        } else {
            *stored_dtype
        };
        let delta = deltas.remove(name);
        let (w, n) = (weights.clone(), name.clone());
        tensors.push(LazyTensor::new(
            name.clone(),
            shape.clone(),
            out_dtype,
            move || match &delta {
                None => Ok(w.raw(&n, &Device::Cpu)?),
                Some(d) => {
                    let base = w.raw(&n, &Device::Cpu)?.to_dtype(DType::F32)?;
                    Ok((base + d.weight()?)?)
                }
            },
        ));
    }
    tensors
}

/// Bytes read at each of [`FINGERPRINT_SAMPLES`] places of a weight file.
const FINGERPRINT_CHUNK: u64 = 4096;
const FINGERPRINT_SAMPLES: u64 = 16;

/// A cheap fingerprint of the weights in the model folder `dir`: per weight file, its
/// name, size, safetensors header and 16 chunks of 4 KiB spread over its data, hashed.
/// Another model of the same shapes (another fine-tune, other precision) differs.
pub fn base_fingerprint(dir: &Path) -> Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut bytes = Vec::new();
    for f in crate::model::weights::weight_files(dir)? {
        let mut file = std::fs::File::open(&f).at(&f)?;
        let size = file.metadata().at(&f)?.len();
        let name = f.file_name().map(|n| n.to_string_lossy().into_owned());
        bytes.extend(name.unwrap_or_default().as_bytes());
        bytes.extend(size.to_le_bytes());
        let mut len = [0u8; 8];
        file.read_exact(&mut len).at(&f)?;
        let header = u64::from_le_bytes(len);
        if header > 100_000_000 || 8 + header > size {
            return Err(Error::bad_file(
                &f,
                "not a safetensors file (bad header length)",
            ));
        }
        let mut buf = vec![0u8; header as usize];
        file.read_exact(&mut buf).at(&f)?;
        bytes.extend(&buf);
        let data = 8 + header;
        let span = size - data;
        for i in 0..FINGERPRINT_SAMPLES {
            let at = data + span * i / FINGERPRINT_SAMPLES;
            file.seek(SeekFrom::Start(at)).at(&f)?;
            let mut chunk = Vec::new();
            (&mut file)
                .take(FINGERPRINT_CHUNK.min(size - at))
                .read_to_end(&mut chunk)
                .at(&f)?;
            bytes.extend(&chunk);
        }
    }
    Ok(format!(
        "xxh3-128:{:032x}",
        twox_hash::XxHash3_128::oneshot(&bytes)
    ))
}

/// Fail unless the weights in `base` are those a checkpoint was trained on
/// (`expected`: its `training_state.json`'s `base_fingerprint`). `what`: the checkpoint, and `fix`,
/// for the message.
pub fn check_base_fingerprint(what: &Path, base: &Path, expected: &str, fix: &str) -> Result<()> {
    let found = base_fingerprint(base)?;
    if found != expected {
        return Err(Error::Usage(format!(
            "{} was trained on other base weights than those in {} (fingerprint {found}, its training_state.json says {expected}); {fix}",
            what.display(),
            base.display()
        )));
    }
    Ok(())
}
