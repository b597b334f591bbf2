//! GGUF v3 files for llama.cpp: `lit-claire quantize`.
//!
//! Layout (all little-endian; a string is a u64 length then UTF-8 bytes):
//!
//! ```text
//! "GGUF" | version u32 = 3 | tensor count u64 | metadata count u64
//! metadata:     key string | value type u32 | value        (arrays: type u32, len u64, items)
//! tensor infos: name string | n_dims u32 | dims u64 × n_dims (ne[0] = row length first)
//!               | ggml type u32 | offset u64 (from the data start, a multiple of 32)
//! padding to `general.alignment` (32), then each tensor's bytes, each padded to 32
//! ```
//!
//! A PyTorch matrix `(out, in)` is the GGUF tensor `[in, out]`. Offsets depend only
//! on shapes and types, so the header is written first and every tensor is then
//! computed, encoded and written one at a time: a 7B model is never in memory whole.
//!
//! [`llama_cpp`] maps LLaMA/Mistral (architecture `llama`) and Falcon (`falcon`)
//! checkpoints onto llama.cpp's names and metadata; [`quant`] holds the encoders;
//! `tokenizer` writes the byte-level BPE tokenizer.

pub mod llama_cpp;
pub mod quant;
mod tokenizer;

use std::io::{BufWriter, Write};
use std::path::Path;

use crate::error::{Error, IoContext, Result};

/// `"GGUF"` read as a little-endian u32.
pub const MAGIC: u32 = 0x4655_4747;
pub const VERSION: u32 = 3;
pub const ALIGNMENT: u64 = 32;

/// The encodings a tensor can be stored in (ggml's type ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q8_0 = 8,
}

impl GgmlType {
    /// `(values per block, bytes per block)`.
    pub fn block(self) -> (u64, u64) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 => (1, 2),
            GgmlType::Q4_0 => (quant::QK as u64, quant::Q4_0_BLOCK as u64),
            GgmlType::Q8_0 => (quant::QK as u64, quant::Q8_0_BLOCK as u64),
        }
    }

    /// Bytes of a tensor of `dims` (ggml order) in this type.
    pub fn nbytes(self, dims: &[u64]) -> u64 {
        let (blk, size) = self.block();
        let n: u64 = dims.iter().product();
        n / blk * size
    }

    /// Encode f32 values.
    pub fn encode(self, x: &[f32]) -> Vec<u8> {
        match self {
            GgmlType::F32 => quant::f32_bytes(x),
            GgmlType::F16 => quant::f16_bytes(x),
            GgmlType::Q4_0 => quant::q4_0(x),
            GgmlType::Q8_0 => quant::q8_0(x),
        }
    }
}

/// The `--type` of `quantize`: how matrices are stored (norms and biases stay f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantType {
    F16,
    Q8_0,
    Q4_0,
}

impl std::str::FromStr for QuantType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f16" => Ok(QuantType::F16),
            "q8_0" => Ok(QuantType::Q8_0),
            "q4_0" => Ok(QuantType::Q4_0),
            _ => Err(Error::Usage(format!(
                "unknown quantization type {s:?}; choose f16, q8_0 or q4_0"
            ))),
        }
    }
}

impl QuantType {
    /// llama.cpp's `general.file_type` (`LLAMA_FTYPE_MOSTLY_*`).
    pub fn file_type(self) -> u32 {
        match self {
            QuantType::F16 => 1,
            QuantType::Q4_0 => 2,
            QuantType::Q8_0 => 7,
        }
    }

    pub fn ggml(self) -> GgmlType {
        match self {
            QuantType::F16 => GgmlType::F16,
            QuantType::Q8_0 => GgmlType::Q8_0,
            QuantType::Q4_0 => GgmlType::Q4_0,
        }
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    StrArray(Vec<String>),
    I32Array(Vec<i32>),
    F32Array(Vec<f32>),
}

impl Value {
    fn type_id(&self) -> u32 {
        match self {
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
            Value::StrArray(_) | Value::I32Array(_) | Value::F32Array(_) => 9,
        }
    }
}

/// A tensor to write: its values come from `produce` when its turn comes.
pub struct GgufTensor {
    pub name: String,
    /// ggml order: `dims[0]` is the row length.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    #[allow(clippy::type_complexity)]
    pub produce: Box<dyn Fn() -> Result<Vec<f32>> + Send + Sync>,
}

impl std::fmt::Debug for GgufTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufTensor")
            .field("name", &self.name)
            .field("dims", &self.dims)
            .field("ty", &self.ty)
            .finish()
    }
}

fn put_str(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn put_value(w: &mut impl Write, v: &Value) -> std::io::Result<()> {
    w.write_all(&v.type_id().to_le_bytes())?;
    match v {
        Value::U32(x) => w.write_all(&x.to_le_bytes()),
        Value::I32(x) => w.write_all(&x.to_le_bytes()),
        Value::F32(x) => w.write_all(&x.to_le_bytes()),
        Value::Bool(x) => w.write_all(&[*x as u8]),
        Value::Str(s) => put_str(w, s),
        Value::StrArray(a) => {
            w.write_all(&8u32.to_le_bytes())?;
            w.write_all(&(a.len() as u64).to_le_bytes())?;
            a.iter().try_for_each(|s| put_str(w, s))
        }
        Value::I32Array(a) => {
            w.write_all(&5u32.to_le_bytes())?;
            w.write_all(&(a.len() as u64).to_le_bytes())?;
            a.iter().try_for_each(|x| w.write_all(&x.to_le_bytes()))
        }
        Value::F32Array(a) => {
            w.write_all(&6u32.to_le_bytes())?;
            w.write_all(&(a.len() as u64).to_le_bytes())?;
            a.iter().try_for_each(|x| w.write_all(&x.to_le_bytes()))
        }
    }
}

fn pad(w: &mut impl Write, written: u64) -> std::io::Result<u64> {
    let n = (ALIGNMENT - written % ALIGNMENT) % ALIGNMENT;
    w.write_all(&vec![0u8; n as usize])?;
    Ok(n)
}

/// Counts bytes on their way to the file.
struct Counting<W> {
    inner: W,
    n: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let k = self.inner.write(buf)?;
        self.n += k as u64;
        Ok(k)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Write a GGUF file at `path` atomically; returns its size in bytes.
pub fn write_gguf(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[GgufTensor],
) -> Result<u64> {
    for t in tensors {
        let (blk, _) = t.ty.block();
        if t.dims.first().is_none_or(|d| d % blk != 0) {
            return Err(Error::Weights(format!(
                "tensor {} has rows of {:?} values, not a multiple of the {:?} block of {blk}",
                t.name,
                t.dims.first(),
                t.ty
            )));
        }
    }
    let tmp = crate::io::temp_beside(path)?;
    let mut w = Counting {
        inner: BufWriter::with_capacity(1 << 20, tmp.as_file()),
        n: 0,
    };
    let io = |e| Error::io(path, e);
    w.write_all(&MAGIC.to_le_bytes()).map_err(io)?;
    w.write_all(&VERSION.to_le_bytes()).map_err(io)?;
    w.write_all(&(tensors.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&(metadata.len() as u64).to_le_bytes())
        .map_err(io)?;
    for (k, v) in metadata {
        put_str(&mut w, k).map_err(io)?;
        put_value(&mut w, v).map_err(io)?;
    }
    let mut offset = 0u64;
    for t in tensors {
        put_str(&mut w, &t.name).map_err(io)?;
        w.write_all(&(t.dims.len() as u32).to_le_bytes())
            .map_err(io)?;
        for d in &t.dims {
            w.write_all(&d.to_le_bytes()).map_err(io)?;
        }
        w.write_all(&(t.ty as u32).to_le_bytes()).map_err(io)?;
        w.write_all(&offset.to_le_bytes()).map_err(io)?;
        let n = t.ty.nbytes(&t.dims);
        offset += n + (ALIGNMENT - n % ALIGNMENT) % ALIGNMENT;
    }
    let here = w.n;
    pad(&mut w, here).map_err(io)?;
    let bar = crate::hf::shards::progress_bar(tensors.len() as u64, "quantizing");
    for t in tensors {
        let values = (t.produce)()?;
        let expected: u64 = t.dims.iter().product();
        if values.len() as u64 != expected {
            return Err(Error::Weights(format!(
                "tensor {} produced {} values, expected {expected}",
                t.name,
                values.len()
            )));
        }
        let bytes = t.ty.encode(&values);
        w.write_all(&bytes).map_err(io)?;
        pad(&mut w, bytes.len() as u64).map_err(io)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    w.flush().map_err(io)?;
    let size = w.n;
    drop(w);
    tmp.as_file().sync_all().at(path)?;
    crate::hf::export::make_shareable(tmp.path())?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(size)
}
