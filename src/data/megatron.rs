//! Megatron-LM's indexed dataset format: a `.bin` of tokens plus an `.idx` index, as
//! written by `megatron/core/datasets/indexed_dataset.py` (and read by NeMo too).
//!
//! A shard is a path prefix `P`: `P.bin` holds every sequence's tokens back to back in
//! one integer type; `P.idx` (all numbers little-endian) is
//!
//! ```text
//! offset  size        field
//! 0       9           magic b"MMIDIDX\x00\x00"
//! 9       8   u64     version = 1
//! 17      1   u8      dtype code (1 u8, 2 i8, 3 i16, 4 i32, 5 i64, 6 f64, 7 f32, 8 u16)
//! 18      8   u64     S = number of sequences
//! 26      8   u64     D = number of document indices (documents + 1)
//! 34      4*S i32     sequence lengths, in tokens
//! ..      8*S i64     sequence pointers: byte offset of each sequence in P.bin
//! ..      8*D i64     document indices: 0, then the sequence index that ends each document
//! ```
//!
//! so document `k` is sequences `doc[k]..doc[k+1]` and `doc[D-1] == S`. We write tokens
//! as `uint16` when the vocabulary has fewer than 65,500 ids (Megatron's own rule) and
//! `int32` otherwise.
//!
//! An empty shard (no sequence) still gets a `.bin` of one zero token that no sequence
//! points at: numpy, and so Megatron, cannot memory-map an empty file.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};

/// The index magic.
pub const INDEX_HEADER: &[u8; 9] = b"MMIDIDX\x00\x00";
/// The only index version Megatron writes.
pub const INDEX_VERSION: u64 = 1;
/// Bytes before the sequence lengths.
pub const HEADER_LEN: usize = 34;
/// Vocabularies smaller than this are stored as uint16 (Megatron's `optimal_dtype`).
pub const UINT16_VOCAB_LIMIT: usize = 65_500;

/// Token storage type of a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TokenDtype {
    #[serde(rename = "uint16")]
    U16,
    #[serde(rename = "int32")]
    I32,
}

impl TokenDtype {
    /// The type Megatron would pick for a vocabulary of `vocab_size` ids.
    pub fn for_vocab(vocab_size: usize) -> Self {
        if vocab_size < UINT16_VOCAB_LIMIT {
            TokenDtype::U16
        } else {
            TokenDtype::I32
        }
    }

    /// Megatron's numeric code.
    pub fn code(self) -> u8 {
        match self {
            TokenDtype::U16 => 8,
            TokenDtype::I32 => 4,
        }
    }

    /// The type of a code, if it is one we store tokens in.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            8 => Some(TokenDtype::U16),
            4 => Some(TokenDtype::I32),
            _ => None,
        }
    }

    /// Bytes per token.
    pub fn size(self) -> usize {
        match self {
            TokenDtype::U16 => 2,
            TokenDtype::I32 => 4,
        }
    }

    /// Largest id this type holds.
    pub fn max_id(self) -> u32 {
        match self {
            TokenDtype::U16 => u16::MAX as u32,
            TokenDtype::I32 => i32::MAX as u32,
        }
    }

    /// Append `ids` little-endian to `out` (ids must be at most [`Self::max_id`]).
    pub fn encode_into(self, ids: &[u32], out: &mut Vec<u8>) {
        out.reserve(ids.len() * self.size());
        match self {
            TokenDtype::U16 => ids
                .iter()
                .for_each(|&i| out.extend_from_slice(&(i as u16).to_le_bytes())),
            TokenDtype::I32 => ids
                .iter()
                .for_each(|&i| out.extend_from_slice(&(i as i32).to_le_bytes())),
        }
    }

    /// Decode little-endian tokens.
    pub fn decode_into(self, bytes: &[u8], out: &mut Vec<u32>) {
        match self {
            TokenDtype::U16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|b| u16::from_le_bytes([b[0], b[1]]) as u32),
            ),
            TokenDtype::I32 => out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u32),
            ),
        }
    }
}

/// `P.bin` and `P.idx` of a prefix.
pub fn shard_paths(prefix: &Path) -> (PathBuf, PathBuf) {
    let mut bin = prefix.as_os_str().to_owned();
    bin.push(".bin");
    let mut idx = prefix.as_os_str().to_owned();
    idx.push(".idx");
    (PathBuf::from(bin), PathBuf::from(idx))
}

/// The fixed header of an index: magic, version, dtype, counts.
pub fn write_index_header(
    w: &mut impl Write,
    dtype: TokenDtype,
    sequences: u64,
    documents_plus_one: u64,
) -> std::io::Result<()> {
    w.write_all(INDEX_HEADER)?;
    w.write_all(&INDEX_VERSION.to_le_bytes())?;
    w.write_all(&[dtype.code()])?;
    w.write_all(&sequences.to_le_bytes())?;
    w.write_all(&documents_plus_one.to_le_bytes())
}

/// One shard, memory-mapped, with random access to its sequences.
#[derive(Debug)]
pub struct IndexedShard {
    prefix: PathBuf,
    idx: Mmap,
    bin: Mmap,
    dtype: TokenDtype,
    sequences: usize,
    documents_plus_one: usize,
}

fn map(path: &Path) -> Result<Mmap> {
    let file = File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::missing(
            path,
            "the prepared data is incomplete; re-run lit-claire prepare-data",
        ),
        _ => Error::io(path, e),
    })?;
    // SAFETY: shards are written once, renamed into place and never modified; a file
    // changed under us by another program can only give wrong tokens, which `get`
    // bounds-checks.
    unsafe { Mmap::map(&file) }.at(path)
}

impl IndexedShard {
    /// Map `prefix.idx` and `prefix.bin` and check that they agree.
    pub fn open(prefix: &Path) -> Result<Self> {
        let (bin_path, idx_path) = shard_paths(prefix);
        let idx = map(&idx_path)?;
        let bin = map(&bin_path)?;
        let bad = |msg: String| Error::bad_file(&idx_path, msg);
        if idx.len() < HEADER_LEN || &idx[..9] != INDEX_HEADER {
            return Err(bad("not a Megatron index (no MMIDIDX header)".into()));
        }
        let u64_at = |o: usize| u64::from_le_bytes(idx[o..o + 8].try_into().expect("8 bytes"));
        let version = u64_at(9);
        if version != INDEX_VERSION {
            return Err(bad(format!("index version {version}, expected 1")));
        }
        let dtype = TokenDtype::from_code(idx[17]).ok_or_else(|| {
            bad(format!(
                "token dtype code {} (only uint16 = 8 and int32 = 4 hold token ids)",
                idx[17]
            ))
        })?;
        let sequences = u64_at(18) as usize;
        let documents_plus_one = u64_at(26) as usize;
        let want = HEADER_LEN as u128 + 12 * sequences as u128 + 8 * documents_plus_one as u128;
        if idx.len() as u128 != want {
            return Err(bad(format!(
                "{} bytes for {sequences} sequences and {documents_plus_one} document indices, expected {want}",
                idx.len()
            )));
        }
        let shard = IndexedShard {
            prefix: prefix.to_path_buf(),
            idx,
            bin,
            dtype,
            sequences,
            documents_plus_one,
        };
        if documents_plus_one == 0 || shard.document_index(documents_plus_one - 1) != sequences {
            return Err(bad("last document index is not the sequence count".into()));
        }
        // A truncated .bin is found here, not at the training step that reads its end.
        if let Some(last) = sequences.checked_sub(1) {
            let end =
                (shard.pointer(last) as u128) + shard.length(last) as u128 * dtype.size() as u128;
            if end > shard.bin.len() as u128 {
                return Err(Error::bad_file(
                    &bin_path,
                    format!(
                        "{} bytes, but its index points up to byte {end}: the shard is truncated; re-run prepare-data with --overwrite",
                        shard.bin.len()
                    ),
                ));
            }
        }
        Ok(shard)
    }

    /// The prefix this shard was opened from.
    pub fn prefix(&self) -> &Path {
        &self.prefix
    }

    /// Token storage type.
    pub fn dtype(&self) -> TokenDtype {
        self.dtype
    }

    /// Size of the `.bin` file in bytes.
    pub fn bin_len(&self) -> usize {
        self.bin.len()
    }

    /// Number of sequences.
    pub fn len(&self) -> usize {
        self.sequences
    }

    /// Whether the shard holds no sequence.
    pub fn is_empty(&self) -> bool {
        self.sequences == 0
    }

    /// Number of documents.
    pub fn num_documents(&self) -> usize {
        self.documents_plus_one - 1
    }

    /// Length in tokens of sequence `j`.
    pub fn length(&self, j: usize) -> usize {
        let o = HEADER_LEN + 4 * j;
        i32::from_le_bytes(self.idx[o..o + 4].try_into().expect("4 bytes")) as usize
    }

    /// Byte offset of sequence `j` in the `.bin`.
    pub fn pointer(&self, j: usize) -> usize {
        let o = HEADER_LEN + 4 * self.sequences + 8 * j;
        i64::from_le_bytes(self.idx[o..o + 8].try_into().expect("8 bytes")) as usize
    }

    /// Document index `k` (0 ..= number of documents).
    pub fn document_index(&self, k: usize) -> usize {
        let o = HEADER_LEN + 12 * self.sequences + 8 * k;
        i64::from_le_bytes(self.idx[o..o + 8].try_into().expect("8 bytes")) as usize
    }

    /// Append the tokens of sequence `j` to `out`.
    pub fn get_into(&self, j: usize, out: &mut Vec<u32>) -> Result<()> {
        if j >= self.sequences {
            return Err(Error::Data(format!(
                "{}: sequence {j} out of range ({} sequences)",
                self.prefix.display(),
                self.sequences
            )));
        }
        let (start, len) = (self.pointer(j), self.length(j) * self.dtype.size());
        let bytes = start
            .checked_add(len)
            .and_then(|end| self.bin.get(start..end))
            .ok_or_else(|| {
                Error::Data(format!(
                    "{}.bin: sequence {j} lies past the end of the file; the shard is damaged, re-run prepare-data with --overwrite",
                    self.prefix.display()
                ))
            })?;
        self.dtype.decode_into(bytes, out);
        Ok(())
    }

    /// The tokens of sequence `j`.
    pub fn get(&self, j: usize) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        self.get_into(j, &mut out)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_codes_match_megatron() {
        assert_eq!(TokenDtype::U16.code(), 8);
        assert_eq!(TokenDtype::I32.code(), 4);
        assert_eq!(TokenDtype::for_vocab(32_000), TokenDtype::U16);
        assert_eq!(TokenDtype::for_vocab(65_500), TokenDtype::I32);
        let mut b = Vec::new();
        TokenDtype::U16.encode_into(&[1, 65_535], &mut b);
        assert_eq!(b, [1, 0, 255, 255]);
        let mut ids = Vec::new();
        TokenDtype::U16.decode_into(&b, &mut ids);
        assert_eq!(ids, [1, 65_535]);
    }
}
