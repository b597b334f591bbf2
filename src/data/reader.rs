//! Reading prepared data: random access to any sample in O(1) over memory-mapped shards.
//!
//! A sample is at most `block_size` (= max_length + 1) real tokens; a consumer trains on
//! `inputs = sample[..len-1]`, `targets = sample[1..]` and pads shorter samples itself,
//! ignoring the padding in the loss. Samples of a split are numbered across its shards in
//! order; `shard_sample_range` gives each shard's share for rank sharding.
//!
//! ```no_run
//! # fn main() -> lit_claire::Result<()> {
//! use lit_claire::data::reader::PreparedData;
//! let data = PreparedData::open(std::path::Path::new("out/prepared"))?;
//! for ds in &data.datasets {
//!     let first = ds.train.sample(0)?; // Vec<u32>, 1..=block_size tokens
//!     println!("{} ({}, weight {}): {} samples", ds.name, ds.group, ds.weight, ds.train.len());
//! #   let _ = first;
//! }
//! # Ok(()) }
//! ```

use std::ops::Range;
use std::path::{Path, PathBuf};

use super::doc_starts::DocStarts;
use super::megatron::IndexedShard;
use super::metadata::{DATASET_FILE, FORMAT, METADATA_FILE, Metadata, VERSION};
use super::writer::SplitStats;
use crate::error::{Error, Result};

/// A prepared output folder.
#[derive(Debug)]
pub struct PreparedData {
    pub root: PathBuf,
    /// Tokens per sample: max_length + 1 (inputs are sample[..-1], targets sample[1..]).
    pub block_size: usize,
    /// sha256 of the tokenizer.json used (same as crate::tokenizer::Tokenizer::hash).
    pub tokenizer_hash: String,
    pub datasets: Vec<PreparedDataset>,
    /// Everything `metadata.json` says.
    pub metadata: Metadata,
    /// Identity of the data: the first 16 hex digits of the sha256 of `metadata.json`,
    /// which lists every dataset's sources, settings, shards and sizes.
    pub fingerprint: String,
}

/// One dataset of a prepared folder.
#[derive(Debug)]
pub struct PreparedDataset {
    pub name: String,
    /// Group name from the groups file (the dataset's own name when no group matched).
    pub group: String,
    /// Sampling weight of this dataset (from the groups file, default 1.0).
    pub weight: f64,
    pub train: Split,
    pub validation: Split,
}

/// The samples of one split of one dataset.
#[derive(Debug)]
pub struct Split {
    shards: Vec<IndexedShard>,
    /// Packed splits: each shard's document starts (see `doc_starts`).
    starts_of: Option<Vec<DocStarts>>,
    /// `starts[s]`: global index of shard `s`'s first sample; `starts[S]` = len.
    starts: Vec<usize>,
    tokens: u64,
    block_size: usize,
}

impl PreparedData {
    /// Open `dir` as written by `prepare-data`.
    pub fn open(dir: &Path) -> Result<PreparedData> {
        if !dir.is_dir() {
            return Err(Error::missing(
                dir,
                "no prepared data there; run lit-claire prepare-data first",
            ));
        }
        let meta_path = dir.join(METADATA_FILE);
        if !meta_path.exists() {
            return Err(Error::Data(format!(
                "{}: incomplete output, {METADATA_FILE} is missing (it is written last); re-run lit-claire prepare-data with the same arguments to finish it",
                dir.display()
            )));
        }
        let text = super::files::read_regular(&meta_path, 1 << 30, "prepare-data metadata")?;
        let fingerprint = {
            use sha2::Digest;
            crate::tokenizer::hex(&sha2::Sha256::digest(&text))[..16].to_string()
        };
        let metadata: Metadata = serde_json::from_slice(&text)
            .map_err(|e| Error::bad_file(&meta_path, format!("not prepare-data metadata: {e}")))?;
        if metadata.format != FORMAT || metadata.version != VERSION {
            return Err(Error::bad_file(
                &meta_path,
                format!(
                    "format {:?} version {}, this build reads {FORMAT:?} version {VERSION}",
                    metadata.format, metadata.version
                ),
            ));
        }
        if metadata.block_size < 2
            || metadata.max_length.checked_add(1) != Some(metadata.block_size)
        {
            return Err(Error::bad_file(
                &meta_path,
                format!(
                    "block_size {} with max_length {}: samples hold max_length + 1 >= 2 tokens; re-run prepare-data with --overwrite",
                    metadata.block_size, metadata.max_length
                ),
            ));
        }
        if metadata.datasets.is_empty() {
            return Err(Error::bad_file(
                &meta_path,
                "lists no dataset; re-run prepare-data with --overwrite",
            ));
        }
        if !metadata.padding && !metadata.document_starts {
            eprintln!(
                "note: {} was packed before prepare-data recorded document starts: each sample is taken as one document, so its documents attend to each other; re-run prepare-data --padding false --overwrite to keep them apart",
                dir.display()
            );
        }
        let starts = metadata.document_starts;
        let mut datasets = Vec::with_capacity(metadata.datasets.len());
        for d in &metadata.datasets {
            let ds_dir = dir.join(&d.dir);
            if !ds_dir.join(DATASET_FILE).exists() {
                return Err(Error::Data(format!(
                    "{}: incomplete output, dataset {:?} has no {DATASET_FILE}; re-run lit-claire prepare-data",
                    ds_dir.display(),
                    d.name
                )));
            }
            datasets.push(PreparedDataset {
                name: d.name.clone(),
                group: d.group.clone(),
                weight: d.weight,
                train: Split::open(&ds_dir, &d.train, metadata.block_size, starts)?,
                validation: Split::open(&ds_dir, &d.validation, metadata.block_size, starts)?,
            });
        }
        Ok(PreparedData {
            root: dir.to_path_buf(),
            block_size: metadata.block_size,
            tokenizer_hash: metadata.tokenizer_hash.clone(),
            datasets,
            metadata,
            fingerprint,
        })
    }

    /// Fail unless the data was tokenized by `tokenizer` (same `tokenizer.json` bytes).
    pub fn check_tokenizer(&self, tokenizer: &crate::tokenizer::Tokenizer) -> Result<()> {
        check_tokenizer_hash(&self.root, &self.tokenizer_hash, tokenizer)
    }

    /// The dataset called `name`.
    pub fn dataset(&self, name: &str) -> Option<&PreparedDataset> {
        self.datasets.iter().find(|d| d.name == name)
    }
}

/// Fail unless data prepared in `root` with the tokenizer of sha256 `data_hash` was
/// tokenized by `tokenizer`: ids of another vocabulary would be scored or trained on
/// as if they meant something. Training and validation both check with this.
pub fn check_tokenizer_hash(
    root: &Path,
    data_hash: &str,
    tokenizer: &crate::tokenizer::Tokenizer,
) -> Result<()> {
    if tokenizer.hash == data_hash {
        return Ok(());
    }
    let dir = tokenizer.path().parent().unwrap_or(Path::new("."));
    Err(Error::Data(format!(
        "{} was prepared with another tokenizer than {} (sha256 {} vs {}); run prepare-data with --checkpoint-dir {}",
        root.display(),
        tokenizer.path().display(),
        &data_hash[..12.min(data_hash.len())],
        &tokenizer.hash[..12.min(tokenizer.hash.len())],
        dir.display()
    )))
}

impl Split {
    /// Map the shards listed in `stats`, under the dataset folder `dir`, with their
    /// document starts when `document_starts` (packed data that records them).
    pub fn open(
        dir: &Path,
        stats: &SplitStats,
        block_size: usize,
        document_starts: bool,
    ) -> Result<Split> {
        let mut shards = Vec::with_capacity(stats.shards.len());
        let mut starts_of = document_starts.then(Vec::new);
        let mut starts = vec![0];
        for info in &stats.shards {
            let shard = IndexedShard::open(&dir.join(&info.prefix))?;
            if shard.len() as u64 != info.samples {
                return Err(Error::Data(format!(
                    "{}: {} samples, metadata says {}; the output is damaged, re-run prepare-data with --overwrite",
                    shard.prefix().display(),
                    shard.len(),
                    info.samples
                )));
            }
            // prepare-data writes exactly the tokens, or one unused token in an empty shard.
            let want = info.tokens.max(1) * shard.dtype().size() as u64;
            if shard.bin_len() as u64 != want {
                return Err(Error::Data(format!(
                    "{}.bin: {} bytes, metadata says {want} ({} tokens); the output is damaged, re-run prepare-data with --overwrite",
                    shard.prefix().display(),
                    shard.bin_len(),
                    info.tokens
                )));
            }
            starts.push(starts.last().copied().unwrap_or(0) + shard.len());
            if let Some(v) = starts_of.as_mut() {
                v.push(DocStarts::open(&dir.join(&info.prefix), shard.len())?);
            }
            shards.push(shard);
        }
        Ok(Split {
            shards,
            starts_of,
            starts,
            tokens: stats.tokens,
            block_size,
        })
    }

    /// Number of samples over all shards.
    pub fn len(&self) -> usize {
        *self.starts.last().expect("starts holds 0")
    }

    /// Whether the split holds no sample.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Real (non-padding) tokens.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Tokens per full sample.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Number of shards (a multiple of `--multiple-of`; some may be empty).
    pub fn num_shards(&self) -> usize {
        self.shards.len()
    }

    /// Global sample indices of shard `shard`.
    pub fn shard_sample_range(&self, shard: usize) -> Range<usize> {
        self.starts[shard]..self.starts[shard + 1]
    }

    /// Append the tokens of sample `i` (1 ..= block_size of them) to `out`.
    pub fn sample_into(&self, i: usize, out: &mut Vec<u32>) -> Result<()> {
        if i >= self.len() {
            return Err(Error::Data(format!(
                "sample {i} out of range: the split has {} samples",
                self.len()
            )));
        }
        // The last shard starting at or before i; empty shards share starts and are skipped.
        let s = self.starts.partition_point(|&start| start <= i) - 1;
        self.shards[s].get_into(i - self.starts[s], out)
    }

    /// Where documents start inside sample `i` besides offset 0 (packed data that
    /// records it; empty otherwise).
    pub fn doc_starts(&self, i: usize) -> Result<Vec<u32>> {
        let Some(all) = &self.starts_of else {
            return Ok(Vec::new());
        };
        if i >= self.len() {
            return Err(Error::Data(format!(
                "sample {i} out of range: the split has {} samples",
                self.len()
            )));
        }
        let s = self.starts.partition_point(|&start| start <= i) - 1;
        all[s].get(i - self.starts[s])
    }

    /// Whether the samples record their document starts.
    pub fn has_doc_starts(&self) -> bool {
        self.starts_of.is_some()
    }

    /// The tokens of sample `i`; fewer than `block_size` means the rest is padding.
    pub fn sample(&self, i: usize) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(self.block_size);
        self.sample_into(i, &mut out)?;
        Ok(out)
    }
}
