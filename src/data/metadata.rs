//! What `prepare-data` writes besides the shards, and the folder layout:
//!
//! ```text
//! OUT/
//!   metadata.json                 Metadata: written last, lists every dataset
//!   <dataset>/
//!     dataset.json                DatasetRecord: written last inside the dataset folder
//!     train/shard-00000.{bin,idx} Megatron shards (see `megatron`)
//!     train/shard-00000.docs      packed splits: where documents start inside each
//!                                 sample (see `doc_starts`), when `document_starts`
//!     ...
//!     validation/shard-00000.{bin,idx}
//! ```
//!
//! A dataset folder is built under `OUT/.tmp-prepare-*` and renamed into place when
//! complete, so `OUT/<dataset>/` exists only complete. `metadata.json` repeats each
//! dataset's record and adds its group and sampling weight; readers need only it.

use serde::{Deserialize, Serialize};

use super::megatron::TokenDtype;
use super::writer::SplitStats;

/// Name of the top-level metadata file.
pub const METADATA_FILE: &str = "metadata.json";
/// Name of a dataset's record, its completion marker.
pub const DATASET_FILE: &str = "dataset.json";
/// `format` field of the metadata.
pub const FORMAT: &str = "lit-claire-prepared-data";
/// Layout version.
pub const VERSION: u32 = 1;

/// Everything that changes a dataset's output: re-runs with other settings must not
/// mistake an old output for a finished one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub tokenizer_hash: String,
    pub block_size: usize,
    pub padding: bool,
    /// `None`: one document per line; `Some(sep)`: documents separated by `sep` lines.
    pub doc_separator: Option<String>,
    pub json_key: String,
    pub val_fraction: f64,
    pub seed: u64,
    pub turn_pattern: String,
    pub turn_window: f64,
    pub augment: usize,
    pub multiple_of: usize,
    pub shard_tokens: u64,
    pub skip_bad_lines: bool,
    /// Packed shards carry `.docs` files of document starts (false for padded data,
    /// and for packed data prepared before they existed).
    #[serde(default)]
    pub document_starts: bool,
}

/// One raw file of a dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceFile {
    /// Path relative to the source folder.
    pub path: String,
    pub bytes: u64,
    /// `train` or `validation`; with `--val-fraction`, a file feeds both (`train`).
    pub split: String,
}

/// `OUT/<dataset>/dataset.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetRecord {
    pub name: String,
    pub settings: Settings,
    pub sources: Vec<SourceFile>,
    /// jsonl lines skipped with `--skip-bad-lines`.
    pub bad_lines: u64,
    pub train: SplitStats,
    pub validation: SplitStats,
}

/// One dataset in `metadata.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetMeta {
    pub name: String,
    /// Folder relative to the output root.
    pub dir: String,
    pub group: String,
    pub weight: f64,
    pub sources: Vec<SourceFile>,
    pub bad_lines: u64,
    pub train: SplitStats,
    pub validation: SplitStats,
}

/// `OUT/metadata.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    pub format: String,
    pub version: u32,
    /// Tokens per sample: `max_length + 1`.
    pub block_size: usize,
    pub max_length: usize,
    /// Whether samples are single chunks of documents (true) or packed (false).
    pub padding: bool,
    /// Packed samples record where their documents start (a `.docs` file beside each
    /// shard, see [`doc_starts`](super::doc_starts)), so that training can keep them
    /// apart. Absent (false) in packed data prepared before: each sample is then taken
    /// as one document.
    #[serde(default)]
    pub document_starts: bool,
    pub tokenizer_hash: String,
    pub vocab_size: usize,
    pub dtype: TokenDtype,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub pad_id: Option<u32>,
    pub datasets: Vec<DatasetMeta>,
}
