//! `prepare-data`: raw text to memory-mapped training shards.
//!
//! For each dataset (see [`sources`](super::sources)), one streaming pass
//! (`pipeline`) tokenizes its documents into two split writers
//! ([`writer`](super::writer)), which cut them into Megatron shards.
//!
//! - Each document is `Tokenizer::encode_document(text)`: BOS where the model uses one,
//!   EOS after it. Concatenating a split's samples in order gives back its documents'
//!   token streams exactly (see [`writer`](super::writer) for padding vs packing).
//! - Validation: the dataset's own validation files, else each document independently
//!   with probability `val_fraction`, drawn from a hash of (seed, dataset, document
//!   index); if none was drawn, the last training document moves to validation.
//! - The output is byte-identical whatever the thread count.
//! - A dataset is built in `OUT/.tmp-prepare-*` and renamed into place when complete;
//!   `metadata.json` is removed when a run starts changing things and written last.
//!   Datasets already complete with the same settings and sources are skipped.

use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use super::augment::Augmenter;
use super::chunk::{Chunker, DEFAULT_TURN_PATTERN};
use super::destination::{
    RemoveIfEmpty, build_dataset, damage, existing_record, prepare_destination,
};
use super::documents::ReadOptions;
use super::files::resolve;
use super::groups::Groups;
use super::megatron::TokenDtype;
use super::metadata::{
    DatasetMeta, DatasetRecord, FORMAT, METADATA_FILE, Metadata, Settings, SourceFile, VERSION,
};
use super::pieces::{PIECE_BYTES, Pieces};
use super::pipeline::Ctx;
use super::sources::{DatasetSource, discover};
use super::writer::SplitStats;
use crate::error::{Error, IoContext, Result};
use crate::io::write_json_atomic;
use crate::tokenizer::Tokenizer;

/// Everything `prepare-data` takes.
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// Folder of datasets (or one file).
    pub source: PathBuf,
    /// Model folder: `tokenizer.json` and, unless `max_length` is given, `config.json`.
    pub checkpoint_dir: PathBuf,
    pub destination: PathBuf,
    /// Tokens a model sees at once; samples hold `max_length + 1`. Default: the model's context.
    pub max_length: Option<usize>,
    /// true: one chunk of one document per sample; false: documents packed back to back.
    pub padding: bool,
    /// How `.txt` and `.jsonl` files hold documents.
    pub read: ReadOptions,
    pub val_fraction: f64,
    pub seed: u64,
    /// Regex of a speaker tag starting a turn; empty: cut at word boundaries only.
    pub turn_pattern: String,
    /// Fraction of the window, at its end, where a turn start may cut.
    pub turn_window: f64,
    /// Extra variants of each training dialogue with rewritten speaker tags.
    pub augment: usize,
    /// Groups and weights file.
    pub groups: Option<PathBuf>,
    /// Shard counts are multiples of this.
    pub multiple_of: usize,
    /// Target tokens per shard (more shards when a split is larger).
    pub shard_tokens: u64,
    /// Documents longer than this many bytes are encoded in pieces cut between words
    /// (see [`super::pieces`]); the same ids, in bounded memory.
    pub piece_bytes: usize,
    pub overwrite: bool,
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

impl PrepareOptions {
    /// The defaults of the command line.
    pub fn new(source: &Path, checkpoint_dir: &Path, destination: &Path) -> Self {
        PrepareOptions {
            source: source.to_path_buf(),
            checkpoint_dir: checkpoint_dir.to_path_buf(),
            destination: destination.to_path_buf(),
            max_length: None,
            padding: false,
            read: ReadOptions::default(),
            val_fraction: 0.05,
            seed: 42,
            turn_pattern: DEFAULT_TURN_PATTERN.into(),
            turn_window: 0.25,
            augment: 0,
            groups: None,
            multiple_of: 8,
            shard_tokens: 100_000_000,
            piece_bytes: PIECE_BYTES,
            overwrite: false,
            progress: false,
        }
    }

    fn check(&self) -> Result<()> {
        let mut problems = Vec::new();
        if !(self.val_fraction > 0.0 && self.val_fraction < 1.0) {
            problems.push(format!(
                "--val-fraction {} must lie in (0, 1)",
                self.val_fraction
            ));
        }
        if self.multiple_of == 0 {
            problems.push("--multiple-of must be at least 1".to_string());
        }
        if self.shard_tokens == 0 {
            problems.push("--shard-tokens must be at least 1".to_string());
        }
        if self.max_length == Some(0) {
            problems.push("--max-length must be at least 1".to_string());
        }
        if let Some(p) = self.read.problem() {
            problems.push(p.to_string());
        }
        if let Err(e) = Chunker::new(2, &self.turn_pattern, self.turn_window) {
            problems.push(e.to_string());
        }
        // An output inside the source would be read as a dataset by the next run.
        let (src, dest) = (resolve(&self.source), resolve(&self.destination));
        if dest.starts_with(&src) && !self.source.is_file() {
            problems.push(format!(
                "--destination-path {} lies inside --source-path {}; a re-run would read the output as a dataset: write it elsewhere",
                self.destination.display(),
                self.source.display()
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::Usage(problems.join("; ")))
        }
    }
}

/// What a run did to one dataset.
#[derive(Debug, Clone, Serialize)]
pub struct DatasetReport {
    pub name: String,
    /// Already complete with the same settings: left as it was.
    pub skipped: bool,
    pub group: String,
    pub weight: f64,
    pub train: SplitStats,
    pub validation: SplitStats,
    pub bad_lines: u64,
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct PrepareReport {
    pub destination: PathBuf,
    pub block_size: usize,
    pub datasets: Vec<DatasetReport>,
    /// Raw bytes read and tokens written by this run (skipped datasets excluded).
    pub bytes_read: u64,
    pub tokens_written: u64,
    pub seconds: f64,
}

/// The longest context `--max-length` defaults to: beyond it, a model's
/// `max_position_embeddings` is no length a sample can be trained at (the longest
/// real contexts are about 10M tokens).
pub const MAX_DEFAULT_LENGTH: usize = 1 << 24;

/// `--max-length` by default: the model's context, unless no machine could train on
/// samples that long.
fn default_max_length(model_dir: &Path) -> Result<usize> {
    let context = crate::config::load_config(model_dir)?.block_size;
    if context > MAX_DEFAULT_LENGTH {
        return Err(Error::Usage(format!(
            "{}: the model's context (max_position_embeddings) is {context} tokens, too long for samples (at most {MAX_DEFAULT_LENGTH} by default); pass --max-length with the length to train at",
            model_dir.join("config.json").display()
        )));
    }
    Ok(context)
}

/// Turn raw datasets into shards under `opts.destination`.
pub fn prepare_data(opts: &PrepareOptions) -> Result<PrepareReport> {
    let started = Instant::now();
    opts.check()?;
    let tok = Tokenizer::from_dir(&opts.checkpoint_dir)?;
    // EOS is written after every document: an id the tokenizer does not have would be
    // trained on as a token of no text, or fail in the embedding. (BOS is written only
    // when the tokenizer itself produces it.)
    if let Some(&eos) = tok.eos_ids.first()
        && eos as usize >= tok.vocab_size()
    {
        return Err(Error::Data(format!(
            "{}: eos_token_id {eos} is not a token of its tokenizer.json ({} tokens); fix generation_config.json / config.json",
            opts.checkpoint_dir.display(),
            tok.vocab_size()
        )));
    }
    let max_length = match opts.max_length {
        Some(n) => n,
        None => default_max_length(&opts.checkpoint_dir)?,
    };
    let block_size = max_length + 1;
    let (chunker, augmenter) = chunking(opts, block_size)?;
    let groups = match &opts.groups {
        Some(p) => Groups::load(p)?,
        None => Groups::default(),
    };
    let sources = discover(&opts.source)?;
    let dest = &opts.destination;
    // A destination this run creates is removed again if the run fails before any
    // dataset is complete: a failed command leaves nothing behind.
    let mut created = RemoveIfEmpty::new(dest);
    prepare_destination(dest)?;
    let ctx = pipeline_context(opts, &tok, block_size, chunker, augmenter)?;
    let settings = settings(opts, &tok, block_size);
    let plans = plan_datasets(opts, &sources, &settings)?;
    let to_read: u64 = plans
        .iter()
        .filter(|p| p.done.is_none())
        .flat_map(|p| p.files.iter().map(|f| f.bytes))
        .sum();
    let pb = progress_bar(opts.progress, to_read);
    let built = build_datasets(&ctx, opts, &settings, &groups, plans, &pb)?;
    pb.finish_and_clear();
    let names: Vec<String> = built.metas.iter().map(|m| m.name.clone()).collect();
    for g in groups.unused(&names) {
        eprintln!("warning: group {g:?} of the groups file matches no dataset");
    }
    let metadata = Metadata {
        format: FORMAT.into(),
        version: VERSION,
        block_size,
        max_length,
        padding: opts.padding,
        document_starts: !opts.padding,
        tokenizer_hash: tok.hash.clone(),
        vocab_size: tok.vocab_size(),
        dtype: ctx.dtype,
        bos_id: ctx.bos,
        eos_id: ctx.eos,
        pad_id: tok.pad_id,
        datasets: built.metas,
    };
    let value = serde_json::to_value(&metadata).expect("metadata serialises");
    write_json_atomic(&dest.join(METADATA_FILE), &value)?;
    created.disarm();
    let seconds = started.elapsed().as_secs_f64();
    let (bytes_read, tokens_written) = (built.bytes_read, built.tokens_written);
    if tokens_written > 0 {
        eprintln!(
            "prepared {tokens_written} tokens from {:.1} MB in {seconds:.1} s ({:.0} tokens/s)",
            bytes_read as f64 / 1e6,
            tokens_written as f64 / seconds
        );
    }
    Ok(PrepareReport {
        destination: dest.clone(),
        block_size,
        datasets: built.reports,
        bytes_read,
        tokens_written,
        seconds,
    })
}

/// How documents are cut into samples of `block_size` tokens (at turn starts when
/// `--turn-pattern` finds them), and the augmenter of `--augment`, which needs that
/// pattern to find speaker tags.
fn chunking(opts: &PrepareOptions, block_size: usize) -> Result<(Chunker, Option<Augmenter>)> {
    let chunker = Chunker::new(block_size, &opts.turn_pattern, opts.turn_window)?;
    let augmenter = match (opts.augment, chunker.turn_pattern()) {
        (0, _) => None,
        (n, Some(re)) => Some(Augmenter::new(re.clone(), n)),
        (_, None) => {
            return Err(Error::Usage(
                "--augment needs a --turn-pattern to find speaker tags".into(),
            ));
        }
    };
    Ok((chunker, augmenter))
}

/// What the tokenizing pass needs: the tokenizer without truncation or padding (a
/// document is cut into samples afterwards), its BOS and EOS, and the token dtype
/// of the shards. Warns when the tokenizer has no EOS to separate documents.
fn pipeline_context(
    opts: &PrepareOptions,
    tok: &Tokenizer,
    block_size: usize,
    chunker: Chunker,
    augmenter: Option<Augmenter>,
) -> Result<Ctx> {
    let mut inner = tok.inner().clone();
    inner
        .with_truncation(None)
        .map_err(|e| Error::Msg(format!("tokenizer: {e}")))?;
    inner.with_padding(None);
    if tok.eos_ids.is_empty() {
        eprintln!(
            "warning: {} names no EOS token: documents will not be separated",
            opts.checkpoint_dir.display()
        );
    }
    let pieces = Pieces::probe(
        opts.piece_bytes,
        |t| Ok(inner.encode_fast(t, false)?.get_ids().to_vec()),
        |ids| Ok(inner.decode(ids, false)?),
    )?;
    if pieces.mode.is_none() {
        eprintln!(
            "note: {} cannot be cut between words without changing its ids, so each document is encoded whole: memory grows with the longest document (at most --max-document-bytes {})",
            tok.path().display(),
            opts.read.max_document_bytes
        );
    }
    Ok(Ctx {
        tokenizer: inner,
        block_size,
        bos: if tok.adds_bos { tok.bos_id } else { None },
        eos: tok.eos_ids.first().copied(),
        dtype: TokenDtype::for_vocab(tok.vocab_size()),
        padding: opts.padding,
        chunker,
        augmenter,
        pieces,
        read: opts.read.clone(),
        val_fraction: opts.val_fraction,
        seed: opts.seed,
        shard_tokens: opts.shard_tokens,
        multiple_of: opts.multiple_of,
    })
}

/// The settings a prepared dataset records: another run with the same settings and
/// sources keeps it as it is.
fn settings(opts: &PrepareOptions, tok: &Tokenizer, block_size: usize) -> Settings {
    Settings {
        tokenizer_hash: tok.hash.clone(),
        block_size,
        padding: opts.padding,
        doc_separator: opts.read.layout.separator().map(String::from),
        json_key: opts.read.json_key.clone(),
        val_fraction: opts.val_fraction,
        seed: opts.seed,
        turn_pattern: opts.turn_pattern.clone(),
        turn_window: opts.turn_window,
        augment: opts.augment,
        multiple_of: opts.multiple_of,
        shard_tokens: opts.shard_tokens,
        skip_bad_lines: opts.read.skip_bad_lines,
        document_starts: !opts.padding,
    }
}

/// What a run does with one dataset.
struct DatasetPlan<'a> {
    src: &'a DatasetSource,
    files: Vec<SourceFile>,
    /// Its record, when it is already complete with the same settings and sources
    /// (it is kept); None when it is to be built.
    done: Option<DatasetRecord>,
}

/// Decide what to do with each dataset before changing anything: an empty one, or
/// one prepared otherwise without `--overwrite`, stops the run. When any is to be
/// built, `metadata.json` is removed first (it is written again last).
fn plan_datasets<'a>(
    opts: &PrepareOptions,
    sources: &'a [DatasetSource],
    settings: &Settings,
) -> Result<Vec<DatasetPlan<'a>>> {
    let dest = &opts.destination;
    let mut plans = Vec::with_capacity(sources.len());
    for src in sources {
        let files = source_files(&opts.source, src)?;
        if files.iter().all(|f| f.bytes == 0) {
            return Err(Error::Data(format!(
                "dataset {:?} ({}) is empty; remove it from --source-path",
                src.name,
                src.path.display()
            )));
        }
        let existing = existing_record(dest, &src.name)?;
        let done = match existing {
            Some(rec) if rec.settings == *settings && rec.sources == files => {
                match damage(&dest.join(&src.name), &rec) {
                    None => Some(rec),
                    Some(why) => {
                        eprintln!("rebuilding {}: {why}", src.name);
                        None
                    }
                }
            }
            Some(_) if !opts.overwrite => {
                return Err(Error::Usage(format!(
                    "{} was prepared from other sources or with other settings; pass --overwrite to redo it, or choose another --destination-path",
                    dest.join(&src.name).display()
                )));
            }
            _ => None,
        };
        let done = done.filter(|_| !opts.overwrite);
        plans.push(DatasetPlan { src, files, done });
    }
    if plans.iter().any(|p| p.done.is_none()) {
        let meta = dest.join(METADATA_FILE);
        if meta.exists() {
            std::fs::remove_file(&meta).at(&meta)?;
        }
    }
    Ok(plans)
}

/// A progress bar over `total` bytes to read (hidden unless `shown`).
fn progress_bar(shown: bool, total: u64) -> ProgressBar {
    if !shown {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:20} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb
}

/// What [`build_datasets`] did: a report and a metadata entry per dataset, and the
/// bytes read and tokens written by this run.
struct Built {
    reports: Vec<DatasetReport>,
    metas: Vec<DatasetMeta>,
    bytes_read: u64,
    tokens_written: u64,
}

/// Build every dataset of `plans` that is not done (keeping the others), each with
/// its group and weight, saying a line for each.
fn build_datasets(
    ctx: &Ctx,
    opts: &PrepareOptions,
    settings: &Settings,
    groups: &Groups,
    plans: Vec<DatasetPlan>,
    pb: &ProgressBar,
) -> Result<Built> {
    let mut built = Built {
        reports: Vec::with_capacity(plans.len()),
        metas: Vec::with_capacity(plans.len()),
        bytes_read: 0,
        tokens_written: 0,
    };
    for DatasetPlan { src, files, done } in plans {
        let (group, weight) = groups.assign(&src.name);
        let skipped = done.is_some();
        let rec = match done {
            Some(rec) => rec,
            None => {
                pb.set_message(src.name.clone());
                let base = pb.position();
                let rec = build_dataset(ctx, &opts.destination, settings, src, files, pb)?;
                built.bytes_read += pb.position() - base;
                built.tokens_written += rec.train.tokens + rec.validation.tokens;
                rec
            }
        };
        let line = summary_line(&rec, skipped);
        pb.suspend(|| eprintln!("{line}"));
        built.reports.push(DatasetReport {
            name: rec.name.clone(),
            skipped,
            group: group.clone(),
            weight,
            train: rec.train.clone(),
            validation: rec.validation.clone(),
            bad_lines: rec.bad_lines,
        });
        built.metas.push(DatasetMeta {
            dir: rec.name.clone(),
            name: rec.name,
            group,
            weight,
            sources: rec.sources,
            bad_lines: rec.bad_lines,
            train: rec.train,
            validation: rec.validation,
        });
    }
    Ok(built)
}

/// The files of a dataset as recorded in its metadata.
fn source_files(root: &Path, src: &DatasetSource) -> Result<Vec<SourceFile>> {
    src.files()
        .map(|(p, val)| {
            let bytes = super::files::regular_len(p)?;
            let rel = p.strip_prefix(root).unwrap_or(p);
            let rel = if rel.as_os_str().is_empty() {
                p.file_name().map(Path::new).unwrap_or(p)
            } else {
                rel
            };
            Ok(SourceFile {
                path: rel.to_string_lossy().into_owned(),
                bytes,
                split: if val { "validation" } else { "train" }.into(),
            })
        })
        .collect()
}

fn summary_line(rec: &DatasetRecord, skipped: bool) -> String {
    let (t, v) = (&rec.train, &rec.validation);
    format!(
        "{} {}: train {} docs, {} samples, {} tokens ({} padding) in {} shards; validation {} docs, {} samples, {} tokens{}",
        if skipped { "kept" } else { "prepared" },
        rec.name,
        t.documents,
        t.samples,
        t.tokens,
        t.padded_tokens,
        t.shards.len(),
        v.documents,
        v.samples,
        v.tokens,
        if rec.bad_lines > 0 {
            format!("; {} bad lines skipped", rec.bad_lines)
        } else {
            String::new()
        }
    )
}
