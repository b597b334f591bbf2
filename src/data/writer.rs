//! Writing one split of one dataset: samples stream into three temporary files, which
//! are then cut into shards of equal sample counts.
//!
//! While documents arrive we do not know how many samples there will be, so we cannot
//! know where shard boundaries fall. Each split therefore streams
//! - its tokens, already in the shard dtype (`.<split>.tokens.tmp`),
//! - one `i32` length per sample (`.<split>.lengths.tmp`, the bytes of an `.idx` lengths
//!   section),
//! - one `u64` per document: the number of samples written when it ended
//!   (`.<split>.docs.tmp`),
//!
//! and [`SplitWriter::finish`] copies them into `S` shards, `S` a multiple of
//! `multiple_of`, shard `s` holding samples `s*n/S .. (s+1)*n/S`. Memory stays bounded
//! whatever the corpus size; the disk holds the split twice for a moment.
//!
//! Samples never contain padding. With padding, each sample is one chunk of one document
//! and a Megatron document is a source document (its chunks). With packing, documents
//! are laid back to back and cut every `block_size` tokens (consecutive samples are
//! disjoint slices of the token stream, the last one may be shorter) and each sample is
//! its own Megatron document; where documents start inside a sample is streamed too
//! (`.<split>.counts.tmp`: one `u32` per sample, `.<split>.starts.tmp`: the offsets)
//! and written beside each shard ([`doc_starts`](super::doc_starts)).

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::megatron::{TokenDtype, shard_paths, write_index_header};
use crate::error::{Error, IoContext, Result};

/// What one split of a dataset holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SplitStats {
    /// Documents written, augmented variants included.
    pub documents: u64,
    /// Of which augmented variants.
    pub augmented_documents: u64,
    pub samples: u64,
    /// Real tokens.
    pub tokens: u64,
    /// Padding a consumer adds to make every sample `block_size` long: Σ (block_size - len).
    pub padded_tokens: u64,
    pub shards: Vec<ShardInfo>,
}

/// One shard of a split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// Megatron path prefix relative to the dataset folder, e.g. `train/shard-00003`.
    pub prefix: String,
    pub samples: u64,
    pub tokens: u64,
    pub documents: u64,
}

/// How many shards: enough for `shard_tokens` tokens each, rounded up to `multiple_of`.
pub fn shard_count(tokens: u64, shard_tokens: u64, multiple_of: usize) -> usize {
    let m = multiple_of.max(1);
    let need = tokens.div_ceil(shard_tokens.max(1)).max(1) as usize;
    need.div_ceil(m) * m
}

/// Shards may outnumber samples (some are then empty, so that every GPU gets a share)
/// only up to this many: beyond it, a `--multiple-of` or `--shard-tokens` out of
/// proportion with the data would write thousands of empty files.
pub const MAX_SHARDS_BEYOND_SAMPLES: usize = 1024;

/// Streams the samples of one split to temporary files in a dataset folder.
pub struct SplitWriter {
    dir: PathBuf,
    split: &'static str,
    dtype: TokenDtype,
    block_size: usize,
    padding: bool,
    tokens: BufWriter<File>,
    lengths: BufWriter<File>,
    doc_ends: BufWriter<File>,
    /// Packing: document starts per sample, and the starts themselves.
    start_counts: Option<BufWriter<File>>,
    starts: Option<BufWriter<File>>,
    stats: SplitStats,
    /// Packing: tokens of the sample being filled, and where documents start in it.
    fill: usize,
    fill_starts: Vec<u32>,
    buf: Vec<u8>,
}

fn temp_name(dir: &Path, split: &str, what: &str) -> PathBuf {
    dir.join(format!(".{split}.{what}.tmp"))
}

fn create(path: &Path) -> Result<BufWriter<File>> {
    Ok(BufWriter::with_capacity(
        1 << 20,
        File::create(path).at(path)?,
    ))
}

impl SplitWriter {
    /// Start writing split `split` (`train`, `validation`) into `dir`.
    pub fn create(
        dir: &Path,
        split: &'static str,
        dtype: TokenDtype,
        block_size: usize,
        padding: bool,
    ) -> Result<Self> {
        Ok(SplitWriter {
            dir: dir.to_path_buf(),
            split,
            dtype,
            block_size,
            padding,
            tokens: create(&temp_name(dir, split, "tokens"))?,
            lengths: create(&temp_name(dir, split, "lengths"))?,
            doc_ends: create(&temp_name(dir, split, "docs"))?,
            start_counts: match padding {
                true => None,
                false => Some(create(&temp_name(dir, split, "counts"))?),
            },
            starts: match padding {
                true => None,
                false => Some(create(&temp_name(dir, split, "starts"))?),
            },
            stats: SplitStats::default(),
            fill: 0,
            fill_starts: Vec::new(),
            buf: Vec::new(),
        })
    }

    /// Documents written so far.
    pub fn documents(&self) -> u64 {
        self.stats.documents
    }

    fn io_path(&self) -> PathBuf {
        temp_name(&self.dir, self.split, "tokens")
    }

    fn end_sample(&mut self, len: usize) -> Result<()> {
        let path = self.io_path();
        self.lengths
            .write_all(&(len as i32).to_le_bytes())
            .at(&path)?;
        self.stats.samples += 1;
        self.stats.padded_tokens += (self.block_size - len) as u64;
        if let (Some(counts), Some(starts)) = (self.start_counts.as_mut(), self.starts.as_mut()) {
            let n = self.fill_starts.len() as u32;
            counts.write_all(&n.to_le_bytes()).at(&path)?;
            for s in self.fill_starts.drain(..) {
                starts.write_all(&s.to_le_bytes()).at(&path)?;
            }
        }
        Ok(())
    }

    fn end_document(&mut self) -> Result<()> {
        let path = self.io_path();
        self.doc_ends
            .write_all(&self.stats.samples.to_le_bytes())
            .at(path)
    }

    /// Add one document: its token ids and, with padding, the lengths of its chunks
    /// (each at most `block_size`, summing to `ids.len()`); packing ignores `chunks`.
    pub fn push(&mut self, ids: &[u32], chunks: &[u32], augmented: bool) -> Result<()> {
        self.buf.clear();
        self.dtype.encode_into(ids, &mut self.buf);
        let path = self.io_path();
        self.tokens.write_all(&self.buf).at(&path)?;
        self.stats.documents += 1;
        self.stats.augmented_documents += augmented as u64;
        self.stats.tokens += ids.len() as u64;
        if self.padding {
            debug_assert_eq!(chunks.iter().map(|&c| c as usize).sum::<usize>(), ids.len());
            for &c in chunks {
                self.end_sample(c as usize)?;
            }
            self.end_document()?;
        } else {
            // A document that does not open its sample starts inside it.
            if self.fill > 0 && !ids.is_empty() {
                self.fill_starts.push(self.fill as u32);
            }
            self.fill += ids.len();
            while self.fill >= self.block_size {
                self.fill -= self.block_size;
                self.end_sample(self.block_size)?;
                self.end_document()?;
            }
        }
        Ok(())
    }

    /// Cut the split into shards under `dir/<split>/` and remove the temporary files.
    /// `dataset` names the dataset in errors.
    pub fn finish(
        mut self,
        shard_tokens: u64,
        multiple_of: usize,
        dataset: &str,
    ) -> Result<SplitStats> {
        if self.fill > 0 {
            self.end_sample(self.fill)?;
            self.end_document()?;
            self.fill = 0;
        }
        let tokens_path = temp_name(&self.dir, self.split, "tokens");
        let lengths_path = temp_name(&self.dir, self.split, "lengths");
        let docs_path = temp_name(&self.dir, self.split, "docs");
        let counts_path = temp_name(&self.dir, self.split, "counts");
        let starts_path = temp_name(&self.dir, self.split, "starts");
        self.tokens.flush().at(&tokens_path)?;
        self.lengths.flush().at(&lengths_path)?;
        self.doc_ends.flush().at(&docs_path)?;
        let packed = self.start_counts.is_some();
        if let (Some(c), Some(s)) = (self.start_counts.as_mut(), self.starts.as_mut()) {
            c.flush().at(&counts_path)?;
            s.flush().at(&starts_path)?;
        }
        drop((self.tokens, self.lengths, self.doc_ends));
        drop((self.start_counts, self.starts));

        let n = self.stats.samples;
        let num_shards = shard_count(self.stats.tokens, shard_tokens, multiple_of);
        if num_shards > (n as usize).max(MAX_SHARDS_BEYOND_SAMPLES) {
            return Err(Error::Usage(format!(
                "--multiple-of {multiple_of} with --shard-tokens {shard_tokens} would cut the {n} {} samples of dataset {dataset:?} into {num_shards} shards, most of them empty; use a --multiple-of no larger than the number of GPUs (shards may outnumber samples only up to {MAX_SHARDS_BEYOND_SAMPLES})",
                self.split
            )));
        }
        let out_dir = self.dir.join(self.split);
        std::fs::create_dir_all(&out_dir).at(&out_dir)?;

        let open = |p: &Path| File::open(p).at(p);
        let mut lengths_raw = open(&lengths_path)?;
        let mut lengths = BufReader::with_capacity(1 << 20, open(&lengths_path)?);
        let mut docs = DocEnds::new(open(&docs_path)?, docs_path.clone());
        let mut tokens = open(&tokens_path)?;
        let size = self.dtype.size() as u64;
        let mut start_files = match packed {
            true => Some((
                BufReader::with_capacity(1 << 20, open(&counts_path)?),
                BufReader::with_capacity(1 << 20, open(&starts_path)?),
            )),
            false => None,
        };

        for s in 0..num_shards as u64 {
            let lo = (s as u128 * n as u128 / num_shards as u128) as u64;
            let hi = ((s + 1) as u128 * n as u128 / num_shards as u128) as u64;
            let name = format!("shard-{s:05}");
            let (bin_path, idx_path) = shard_paths(&out_dir.join(&name));
            let count = hi - lo;

            let mut idx = create(&idx_path)?;
            write_index_header(&mut idx, self.dtype, count, 0).at(&idx_path)?;
            // Lengths: the temporary file already holds them as i32.
            let copied =
                std::io::copy(&mut (&mut lengths_raw).take(4 * count), &mut idx).at(&idx_path)?;
            debug_assert_eq!(copied, 4 * count);
            // Pointers.
            let mut ptr = 0u64;
            let mut len = [0u8; 4];
            for _ in 0..count {
                lengths.read_exact(&mut len).at(&lengths_path)?;
                idx.write_all(&(ptr as i64).to_le_bytes()).at(&idx_path)?;
                ptr += i32::from_le_bytes(len) as u64 * size;
            }
            // Document indices: 0, each document end inside the shard, and the shard's
            // end when a document runs on into the next shard.
            idx.write_all(&0i64.to_le_bytes()).at(&idx_path)?;
            let (mut entries, mut last) = (1u64, 0u64);
            while let Some(end) = docs.next_at_most(hi)? {
                last = end - lo;
                idx.write_all(&(last as i64).to_le_bytes()).at(&idx_path)?;
                entries += 1;
            }
            if count > 0 && last != count {
                idx.write_all(&(count as i64).to_le_bytes()).at(&idx_path)?;
                entries += 1;
            }
            let mut idx = idx.into_inner().map_err(|e| e.into_error()).at(&idx_path)?;
            idx.seek(SeekFrom::Start(26)).at(&idx_path)?;
            idx.write_all(&entries.to_le_bytes()).at(&idx_path)?;

            if let Some((counts_in, starts_in)) = start_files.as_mut() {
                let mut counts = vec![0u32; count as usize];
                let mut b4 = [0u8; 4];
                for c in counts.iter_mut() {
                    counts_in.read_exact(&mut b4).at(&counts_path)?;
                    *c = u32::from_le_bytes(b4);
                }
                let n: u64 = counts.iter().map(|&c| c as u64).sum();
                let mut starts = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    starts_in.read_exact(&mut b4).at(&starts_path)?;
                    starts.push(u32::from_le_bytes(b4));
                }
                let prefix = out_dir.join(&name);
                super::doc_starts::write(&super::doc_starts::docs_path(&prefix), &counts, &starts)?;
            }

            let mut bin = File::create(&bin_path).at(&bin_path)?;
            std::io::copy(&mut (&mut tokens).take(ptr), &mut bin).at(&bin_path)?;
            if ptr == 0 {
                // numpy cannot map an empty file: one token no sequence points at.
                bin.write_all(&vec![0u8; size as usize]).at(&bin_path)?;
            }
            self.stats.shards.push(ShardInfo {
                prefix: format!("{}/{name}", self.split),
                samples: count,
                tokens: ptr / size,
                documents: entries - 1,
            });
        }
        drop(start_files);
        for p in [&tokens_path, &lengths_path, &docs_path] {
            std::fs::remove_file(p).at(p)?;
        }
        if packed {
            for p in [&counts_path, &starts_path] {
                std::fs::remove_file(p).at(p)?;
            }
        }
        Ok(self.stats)
    }
}

/// Sequential reader of the document-ends file.
struct DocEnds {
    reader: BufReader<File>,
    path: PathBuf,
    peeked: Option<u64>,
    done: bool,
}

impl DocEnds {
    fn new(file: File, path: PathBuf) -> Self {
        DocEnds {
            reader: BufReader::with_capacity(1 << 20, file),
            path,
            peeked: None,
            done: false,
        }
    }

    /// The next document end if it is at most `limit`.
    fn next_at_most(&mut self, limit: u64) -> Result<Option<u64>> {
        if self.peeked.is_none() && !self.done {
            let mut b = [0u8; 8];
            match self.reader.read_exact(&mut b) {
                Ok(()) => self.peeked = Some(u64::from_le_bytes(b)),
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => self.done = true,
                Err(e) => return Err(e).at(&self.path),
            }
        }
        match self.peeked {
            Some(end) if end <= limit => {
                self.peeked = None;
                Ok(Some(end))
            }
            _ => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_counts_round_up_to_multiple() {
        assert_eq!(shard_count(0, 100, 8), 8);
        assert_eq!(shard_count(1_000, 100, 8), 16);
        assert_eq!(shard_count(800, 100, 8), 8);
        assert_eq!(shard_count(801, 100, 1), 9);
    }
}
