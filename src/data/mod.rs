//! Data: raw documents in, memory-mapped training shards out, and the corpus tools
//! around it.
//!
//! - [`documents`]: streaming `.txt` / `.jsonl` (`.gz`) records, from files found and
//!   opened by [`files`] (one walk for every command: loops and non-regular files refused).
//! - [`prepare`]: `prepare-data`, built from [`sources`] (datasets of a folder), a
//!   streaming tokenizer pipeline, [`chunk`] (turn-aware cutting), [`augment`]
//!   (speaker-tag rewriting), [`groups`] (sampling weights), [`writer`] (split streams
//!   cut into shards) and [`megatron`] (the `.bin` / `.idx` format); [`metadata`] is
//!   what it writes beside the shards, [`doc_starts`] where packed documents meet.
//! - [`reader`]: random access to prepared samples for training and validation.
//! - [`train_tokenizer`]: byte-level BPE training; [`dedup`] with [`minhash`]: exact and
//!   near-duplicate removal.

pub mod augment;
pub mod chunk;
pub mod dedup;
mod destination;
pub mod doc_starts;
pub mod documents;
pub mod files;
pub mod groups;
pub mod megatron;
pub mod metadata;
pub mod minhash;
pub mod pieces;
mod pipeline;
pub mod prepare;
pub mod reader;
pub mod sources;
pub mod train_tokenizer;
pub mod writer;

pub use prepare::{PrepareOptions, PrepareReport, prepare_data};
pub use reader::{PreparedData, PreparedDataset, Split};
