//! Document boundaries inside packed samples: a sidecar file `P.docs` beside each
//! Megatron shard `P.bin` / `P.idx` of a packed split (`prepare-data --padding false`).
//!
//! Packing lays documents back to back and cuts every `block_size` tokens, so a sample
//! holds the end of one document, whole documents, and the start of another. The
//! Megatron index cannot say where they meet: its document index groups whole
//! *sequences* (samples), and splitting samples into one sequence per piece would
//! change what a sequence means between padded and packed folders, and Megatron would
//! then shuffle and re-pack the pieces. So the `.bin` / `.idx` stay exactly as before
//! (Megatron-LM and NeMo read them unchanged and ignore this file; their own
//! `--reset-attention-mask --reset-position-ids` find the EOS tokens instead), and the
//! starts live here. All numbers little-endian:
//!
//! ```text
//! offset   size          field
//! 0        8             magic b"LCDOCS\x00\x00"
//! 8        8     u64     version = 1
//! 16       8     u64     S = number of sequences (the .idx's)
//! 24       8     u64     N = number of starts
//! 32       8*(S+1) u64   offsets: sequence j's starts are starts[off[j] .. off[j+1]]
//! ..       4*N   u32     starts: token offsets inside the sequence, ascending, in
//!                        1..len, where a document begins (offset 0 is implicit)
//! ```
//!
//! A sequence with no start is one document, or one piece of a document.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{Error, IoContext, Result};

/// The magic.
pub const MAGIC: &[u8; 8] = b"LCDOCS\x00\x00";
/// The only version.
pub const VERSION: u64 = 1;
const HEADER_LEN: usize = 32;

/// `P.docs` of a shard prefix.
pub fn docs_path(prefix: &Path) -> PathBuf {
    let mut p = prefix.as_os_str().to_owned();
    p.push(".docs");
    PathBuf::from(p)
}

/// Write the sidecar of a shard: `counts[j]` starts for sequence `j`, taken in order
/// from `starts`.
pub fn write(path: &Path, counts: &[u32], starts: &[u32]) -> Result<()> {
    let n: u64 = counts.iter().map(|&c| c as u64).sum();
    debug_assert_eq!(n, starts.len() as u64);
    let mut out = Vec::with_capacity(HEADER_LEN + 8 * (counts.len() + 1) + 4 * starts.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(counts.len() as u64).to_le_bytes());
    out.extend_from_slice(&n.to_le_bytes());
    let mut off = 0u64;
    out.extend_from_slice(&off.to_le_bytes());
    for &c in counts {
        off += c as u64;
        out.extend_from_slice(&off.to_le_bytes());
    }
    for &s in starts {
        out.extend_from_slice(&s.to_le_bytes());
    }
    let mut f = File::create(path).at(path)?;
    f.write_all(&out).at(path)
}

/// A shard's sidecar, memory-mapped.
#[derive(Debug)]
pub struct DocStarts {
    map: Mmap,
    sequences: usize,
    starts: usize,
}

impl DocStarts {
    /// Map `P.docs` of a shard of `sequences` sequences and check its layout.
    pub fn open(prefix: &Path, sequences: usize) -> Result<Self> {
        let path = docs_path(prefix);
        let file = File::open(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::missing(
                &path,
                "metadata.json says the packed samples record their document starts; the output is damaged, re-run prepare-data with --overwrite",
            ),
            _ => Error::io(&path, e),
        })?;
        // SAFETY: as the shards: written once, renamed into place, never modified.
        let map = unsafe { Mmap::map(&file) }.at(&path)?;
        let bad = |msg: String| {
            Error::bad_file(
                &path,
                format!("{msg}; re-run prepare-data with --overwrite"),
            )
        };
        if map.len() < HEADER_LEN || &map[..8] != MAGIC {
            return Err(bad("not a document-starts file (no LCDOCS header)".into()));
        }
        let u64_at = |o: usize| u64::from_le_bytes(map[o..o + 8].try_into().expect("8 bytes"));
        if u64_at(8) != VERSION {
            return Err(bad(format!(
                "version {}, this build reads {VERSION}",
                u64_at(8)
            )));
        }
        let (s, n) = (u64_at(16) as usize, u64_at(24) as usize);
        if s != sequences {
            return Err(bad(format!(
                "{s} sequences, the shard's index has {sequences}"
            )));
        }
        let want = HEADER_LEN as u128 + 8 * (s as u128 + 1) + 4 * n as u128;
        if map.len() as u128 != want {
            return Err(bad(format!(
                "{} bytes for {s} sequences and {n} starts, expected {want}",
                map.len()
            )));
        }
        let d = DocStarts {
            map,
            sequences: s,
            starts: n,
        };
        if d.offset(0) != 0 || d.offset(s) != n as u64 {
            return Err(bad(
                "offsets do not run from 0 to the number of starts".into()
            ));
        }
        Ok(d)
    }

    fn offset(&self, j: usize) -> u64 {
        let o = HEADER_LEN + 8 * j;
        u64::from_le_bytes(self.map[o..o + 8].try_into().expect("8 bytes"))
    }

    /// The document starts inside sequence `j`.
    pub fn get(&self, j: usize) -> Result<Vec<u32>> {
        let (lo, hi) = (self.offset(j), self.offset(j + 1));
        if j >= self.sequences || lo > hi || hi > self.starts as u64 {
            return Err(Error::Data(format!(
                "document starts of sequence {j}: offsets {lo}..{hi} out of range; the output is damaged, re-run prepare-data with --overwrite"
            )));
        }
        let base = HEADER_LEN + 8 * (self.sequences + 1);
        Ok(self.map[base + 4 * lo as usize..base + 4 * hi as usize]
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }
}
