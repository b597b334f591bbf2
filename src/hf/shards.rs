//! Writing weights the way Hugging Face does: one `model.safetensors`, or, past a
//! maximum shard size, shards `model-0000k-of-0000n.safetensors` listed in
//! `model.safetensors.index.json` (`metadata.total_size` = bytes of all tensors,
//! `weight_map`: tensor name → shard file).
//!
//! Tensors are [`LazyTensor`]s: a name, a shape, a dtype and a closure that computes
//! the values. A shard's header needs only shapes and dtypes, so each tensor is
//! produced when its bytes are written and dropped right after: converting or merging
//! a 7B model holds one tensor in memory at a time, not the model.
//!
//! Shards are filled greedily in the given order, as transformers' `save_pretrained`
//! does: a tensor that would push the current shard past the limit starts a new one;
//! a tensor larger than the limit gets a shard of its own.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Tensor};
use serde_json::json;

use crate::error::{Error, Result};
use crate::model::weights::{INDEX_FILE, SINGLE_FILE};

/// A tensor computed when it is written.
pub struct LazyTensor {
    pub name: String,
    pub shape: Vec<usize>,
    /// Dtype written to disk (the closure's result is converted to it).
    pub dtype: DType,
    #[allow(clippy::type_complexity)]
    produce: Box<dyn Fn() -> Result<Tensor> + Send + Sync>,
}

impl std::fmt::Debug for LazyTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyTensor")
            .field("name", &self.name)
            .field("shape", &self.shape)
            .field("dtype", &self.dtype)
            .finish()
    }
}

impl LazyTensor {
    pub fn new(
        name: impl Into<String>,
        shape: Vec<usize>,
        dtype: DType,
        produce: impl Fn() -> Result<Tensor> + Send + Sync + 'static,
    ) -> Self {
        LazyTensor {
            name: name.into(),
            shape,
            dtype,
            produce: Box::new(produce),
        }
    }

    /// Bytes on disk.
    pub fn nbytes(&self) -> u64 {
        (self.shape.iter().product::<usize>() * self.dtype.size_in_bytes()) as u64
    }

    /// Compute the tensor, checked against the announced shape, in the announced dtype.
    pub fn materialize(&self) -> Result<Tensor> {
        let t = (self.produce)()?;
        if t.dims() != self.shape.as_slice() {
            return Err(Error::Weights(format!(
                "tensor {} came out with shape {:?}, expected {:?}",
                self.name,
                t.dims(),
                self.shape
            )));
        }
        Ok(t.to_dtype(self.dtype)?.contiguous()?)
    }
}

/// Parse a size such as `5GB`, `500MB`, `10KB`, `2GiB` or `1000` (bytes). Units are
/// decimal (KB = 1000 B) as in transformers' `max_shard_size`; KiB/MiB/GiB are binary.
pub fn parse_size(text: &str) -> Result<u64> {
    let s = text.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let bad = || {
        Error::Usage(format!(
            "--max-shard-size {text:?} is not a size; write e.g. 5GB, 500MB, 100KB or 2GiB"
        ))
    };
    let value: f64 = num.parse().map_err(|_| bad())?;
    let factor: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(bad()),
    };
    let bytes = (value * factor).round();
    if bytes.is_nan() || bytes < 1.0 {
        return Err(Error::Usage(format!(
            "--max-shard-size {text:?} must be at least one byte"
        )));
    }
    Ok(bytes as u64)
}

/// Split tensors of `sizes` bytes, in order, into consecutive shards of at most
/// `max` bytes (a larger tensor alone). Returns the index ranges.
pub fn plan_shards(sizes: &[u64], max: u64) -> Vec<std::ops::Range<usize>> {
    let mut shards = Vec::new();
    let (mut start, mut used) = (0, 0u64);
    for (i, &s) in sizes.iter().enumerate() {
        if i > start && used + s > max {
            shards.push(start..i);
            start = i;
            used = 0;
        }
        used += s;
    }
    if start < sizes.len() {
        shards.push(start..sizes.len());
    }
    shards
}

/// What [`write_weights`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct WrittenWeights {
    /// Files written, in shard order.
    pub files: Vec<PathBuf>,
    /// Bytes of tensor data (the index's `total_size`).
    pub total_size: u64,
}

/// Write `tensors` into `dir` as `model.safetensors`, or as shards of at most
/// `max_shard_size` bytes with an index. Tensor names must be unique.
pub fn write_weights(
    dir: &Path,
    tensors: Vec<LazyTensor>,
    max_shard_size: u64,
) -> Result<WrittenWeights> {
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = tensors.iter().find(|t| !seen.insert(t.name.as_str())) {
        return Err(Error::Weights(format!(
            "tensor {} would be written twice",
            dup.name
        )));
    }
    let sizes: Vec<u64> = tensors.iter().map(LazyTensor::nbytes).collect();
    let total_size = sizes.iter().sum();
    let plan = plan_shards(&sizes, max_shard_size);
    let n = plan.len();
    let bar = progress_bar(tensors.len() as u64, "writing weights");
    let mut tensors: Vec<Option<LazyTensor>> = tensors.into_iter().map(Some).collect();
    let mut files = Vec::with_capacity(n);
    let mut weight_map = serde_json::Map::new();
    for (k, range) in plan.into_iter().enumerate() {
        let file = if n == 1 {
            SINGLE_FILE.to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", k + 1)
        };
        let shard: Vec<LazyTensor> = range
            .map(|i| tensors[i].take().expect("each tensor is in one shard"))
            .collect();
        for t in &shard {
            weight_map.insert(t.name.clone(), json!(file));
        }
        let path = dir.join(&file);
        write_shard(&path, shard, &bar)?;
        files.push(path);
    }
    bar.finish_and_clear();
    if n > 1 {
        let index = json!({
            "metadata": { "total_size": total_size },
            "weight_map": weight_map,
        });
        crate::io::write_json_atomic(&dir.join(INDEX_FILE), &index)?;
    }
    Ok(WrittenWeights { files, total_size })
}

/// A progress bar on stderr (drawn only on a terminal).
pub(crate) fn progress_bar(len: u64, msg: &'static str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_message(msg);
    bar
}

/// A tensor the safetensors serializer pulls bytes from when it writes them.
struct Pending<'a> {
    tensor: LazyTensor,
    dtype: safetensors::Dtype,
    /// The first error of any tensor of the file: the serializer cannot return ours.
    error: &'a Mutex<Option<Error>>,
    bar: &'a indicatif::ProgressBar,
}

impl safetensors::View for Pending<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.tensor.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let bytes = self
            .tensor
            .materialize()
            .map(|t| <Tensor as safetensors::View>::data(&t).into_owned());
        self.bar.inc(1);
        match bytes {
            Ok(b) => Cow::Owned(b),
            Err(e) => {
                let mut slot = self.error.lock().expect("no panics while holding it");
                slot.get_or_insert(e);
                Cow::Owned(vec![0; self.data_len()])
            }
        }
    }
    fn data_len(&self) -> usize {
        self.tensor.nbytes() as usize
    }
}

fn write_shard(path: &Path, shard: Vec<LazyTensor>, bar: &indicatif::ProgressBar) -> Result<()> {
    let error = Mutex::new(None);
    let views: Vec<(String, Pending)> = shard
        .into_iter()
        .map(|t| {
            let dtype = t.dtype.into();
            (
                t.name.clone(),
                Pending {
                    tensor: t,
                    dtype,
                    error: &error,
                    bar,
                },
            )
        })
        .collect();
    let tmp = crate::io::temp_beside(path)?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    safetensors::serialize_to_file(views, Some(meta), tmp.path())
        .map_err(|e| Error::io(path, std::io::Error::other(e.to_string())))?;
    if let Some(e) = error.into_inner().expect("no panics while holding it") {
        return Err(e);
    }
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}
