//! The streaming core of `prepare-data`: one dataset's files in, its two split writers
//! filled.
//!
//! ```text
//! reader thread          rayon pool (parallel, order kept)        this thread
//! records -> batches --> augment (train) -> encode -> chunk --> route -> SplitWriter
//!   of ~8 MiB text        [BOS] ids EOS, chunk lengths            train / validation
//! ```
//!
//! Every choice (validation or not, augmentation) is a function of the seed, the
//! dataset's name and the document's position, and results are written in input
//! order, so the output does not depend on the number of threads. Memory: two batches
//! in flight, one being processed, and one held document.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use indicatif::ProgressBar;
use rayon::prelude::*;

use super::augment::Augmenter;
use super::chunk::Chunker;
use super::documents::ReadOptions;
use super::megatron::TokenDtype;
use super::pieces::Pieces;
use super::sources::DatasetSource;
use super::writer::{SplitStats, SplitWriter};
use crate::error::{Error, Result};

/// Text per batch handed to the thread pool.
const BATCH_BYTES: usize = 8 << 20;
/// Documents per batch at most.
const BATCH_DOCS: usize = 16_384;

/// Everything a worker needs to turn a document into samples.
pub(super) struct Ctx {
    pub tokenizer: tokenizers::Tokenizer,
    pub block_size: usize,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub dtype: TokenDtype,
    pub padding: bool,
    pub chunker: Chunker,
    pub augmenter: Option<Augmenter>,
    /// Where long documents are cut for encoding (memory stays bounded).
    pub pieces: Pieces,
    /// How the files hold documents.
    pub read: ReadOptions,
    /// Share of documents drawn for validation when a dataset has no validation file.
    pub val_fraction: f64,
    pub seed: u64,
    /// Target tokens per shard, and the multiple the shard count is rounded to.
    pub shard_tokens: u64,
    pub multiple_of: usize,
}

/// A document as read.
struct RawDoc {
    text: String,
    index: u64,
    validation: bool,
}

/// One encoded document: its ids and, with padding, its chunk lengths.
struct Unit {
    ids: Vec<u32>,
    chunks: Vec<u32>,
}

/// A document and its augmented variants.
struct Processed {
    validation: bool,
    units: Vec<Unit>,
}

enum Msg {
    Batch(Vec<RawDoc>),
    Done { bad_lines: u64 },
}

/// SplitMix64's finaliser: a well-mixed 64-bit hash of `x`.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// FNV-1a of a name: stable across runs and platforms.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Seed of document `index` of a dataset, for purpose `salt`.
fn doc_key(seed: u64, dataset: u64, index: u64, salt: u64) -> u64 {
    mix(mix(mix(seed ^ salt) ^ dataset) ^ index)
}

impl Ctx {
    fn encode(&self, text: &str) -> Result<Unit> {
        // Offsets only for the chunker (padding); encode_fast skips them.
        let mut ids: Vec<u32> = self.bos.into_iter().collect();
        let mut offsets = Vec::new();
        self.pieces.encode_into(text, &mut ids, &mut offsets, |t| {
            if self.padding {
                let e = self.tokenizer.encode(t, false)?;
                Ok((e.get_ids().to_vec(), e.get_offsets().to_vec()))
            } else {
                let e = self.tokenizer.encode_fast(t, false)?;
                Ok((e.get_ids().to_vec(), Vec::new()))
            }
        })?;
        ids.extend(self.eos);
        if let Some(&bad) = ids.iter().find(|&&i| i > self.dtype.max_id()) {
            return Err(Error::Data(format!(
                "token id {bad} does not fit the {:?} shards chosen from the vocabulary size; the tokenizer's vocabulary is inconsistent",
                self.dtype
            )));
        }
        let chunks = if self.padding {
            let lead = self.bos.is_some() as usize;
            self.chunker.chunks(text, &offsets, lead, ids.len())
        } else {
            Vec::new()
        };
        Ok(Unit { ids, chunks })
    }

    fn process(&self, doc: &RawDoc, key: u64) -> Result<Processed> {
        let mut units = vec![self.encode(&doc.text)?];
        if let (Some(aug), false) = (&self.augmenter, doc.validation) {
            for v in aug.variants(&doc.text, key) {
                units.push(self.encode(&v)?);
            }
        }
        Ok(Processed {
            validation: doc.validation,
            units,
        })
    }
}

/// Stream one dataset through the tokenizer into its two split writers.
pub(super) fn tokenize_dataset(
    ctx: &Ctx,
    src: &DatasetSource,
    dir: &Path,
    pb: &ProgressBar,
) -> Result<(SplitStats, SplitStats, u64)> {
    let block_size = ctx.block_size;
    let mut train = SplitWriter::create(dir, "train", ctx.dtype, block_size, ctx.padding)?;
    let mut val = SplitWriter::create(dir, "validation", ctx.dtype, block_size, ctx.padding)?;
    let ds_hash = name_hash(&src.name);
    let by_fraction = src.val_files.is_empty();
    let counter = Arc::new(AtomicU64::new(0));
    let base = pb.position();
    let mut bad_lines = 0;
    // With --val-fraction, the last training document waits here in case validation
    // ends up empty.
    let mut held: Option<Processed> = None;

    let write_train = |w: &mut SplitWriter, p: Processed| -> Result<()> {
        for (k, u) in p.units.iter().enumerate() {
            w.push(&u.ids, &u.chunks, k > 0)?;
        }
        Ok(())
    };

    std::thread::scope(|scope| -> Result<()> {
        let (tx, rx) = sync_channel::<Result<Msg>>(2);
        let reader_counter = counter.clone();
        scope.spawn(move || read_batches(ctx, src, ds_hash, reader_counter, tx));
        let rx: Receiver<Result<Msg>> = rx;
        for msg in rx {
            let docs = match msg? {
                Msg::Batch(docs) => docs,
                Msg::Done { bad_lines: n } => {
                    bad_lines = n;
                    continue;
                }
            };
            let seed = ctx.seed;
            let out: Vec<Result<Processed>> = docs
                .par_iter()
                .map(|d| ctx.process(d, doc_key(seed, ds_hash, d.index, 1)))
                .collect();
            for p in out {
                let p = p?;
                if p.validation {
                    let u = &p.units[0];
                    val.push(&u.ids, &u.chunks, false)?;
                } else if by_fraction {
                    if let Some(prev) = held.replace(p) {
                        write_train(&mut train, prev)?;
                    }
                } else {
                    write_train(&mut train, p)?;
                }
            }
            pb.set_position(base + counter.load(Ordering::Relaxed));
        }
        Ok(())
    })?;
    if let Some(last) = held {
        if val.documents() == 0 {
            let u = &last.units[0];
            val.push(&u.ids, &u.chunks, false)?;
        } else {
            write_train(&mut train, last)?;
        }
    }
    if train.documents() == 0 {
        let why = if val.documents() == 0 {
            "has no documents".to_string()
        } else {
            format!(
                "has {} document(s), all taken for validation; add documents or a validation file (test.txt, dev.txt, validation.jsonl)",
                val.documents()
            )
        };
        return Err(Error::Data(format!(
            "dataset {:?} ({}) {why}; check --doc-separator / --json-key",
            src.name,
            src.path.display()
        )));
    }
    if val.documents() == 0 {
        return Err(Error::Data(format!(
            "dataset {:?}: its validation files hold no documents",
            src.name
        )));
    }
    let train = train.finish(ctx.shard_tokens, ctx.multiple_of, &src.name)?;
    let val = val.finish(ctx.shard_tokens, ctx.multiple_of, &src.name)?;
    Ok((train, val, bad_lines))
}

/// Reader thread: records of every file, in order, in batches.
fn read_batches(
    ctx: &Ctx,
    src: &DatasetSource,
    ds_hash: u64,
    counter: Arc<AtomicU64>,
    tx: SyncSender<Result<Msg>>,
) {
    let by_fraction = src.val_files.is_empty();
    // u64 threshold: document goes to validation when its hash is below it.
    let threshold = (ctx.val_fraction * u64::MAX as f64) as u64;
    let run = || -> Result<u64> {
        let mut index = 0u64;
        let mut bad_lines = 0;
        let mut batch = Vec::new();
        let mut bytes = 0;
        for (path, is_val) in src.files() {
            let mut recs = ctx.read.records_counted(path, counter.clone())?;
            for rec in &mut recs {
                let text = rec?.text;
                let validation = if by_fraction {
                    doc_key(ctx.seed, ds_hash, index, 0) < threshold
                } else {
                    is_val
                };
                bytes += text.len();
                batch.push(RawDoc {
                    text,
                    index,
                    validation,
                });
                index += 1;
                if bytes >= BATCH_BYTES || batch.len() >= BATCH_DOCS {
                    bytes = 0;
                    if tx.send(Ok(Msg::Batch(std::mem::take(&mut batch)))).is_err() {
                        return Ok(bad_lines);
                    }
                }
            }
            bad_lines += recs.skipped as u64;
        }
        if !batch.is_empty() {
            let _ = tx.send(Ok(Msg::Batch(batch)));
        }
        Ok(bad_lines)
    };
    let msg = run().map(|bad_lines| Msg::Done { bad_lines });
    let _ = tx.send(msg);
}
