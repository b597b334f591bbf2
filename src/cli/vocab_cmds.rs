//! `adapt-vocab` and `init-model`: a model's vocabulary changed, or a model from scratch.

use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, ValueEnum};

use super::publish_cmds::OutDtype;
use crate::error::Result;
use crate::vocab::{self, AdaptOptions, Init, InitOptions, VocabSource};

/// How the rows of new tokens start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InitArg {
    /// The mean of the rows of the pieces the base tokenizer cuts the token into.
    Pieces,
    /// The mean of all rows.
    Mean,
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("source").required(true).args(["extend_from", "tokenizer"]))]
pub struct AdaptVocabArgs {
    /// Base model folder (config.json, safetensors weights, tokenizer.json).
    #[arg(long)]
    pub checkpoint_dir: PathBuf,
    /// Folder to write: a complete Hugging Face model folder.
    #[arg(long)]
    pub output_dir: PathBuf,
    /// Learn new tokens on this corpus (a .txt/.jsonl file or folder, optionally .gz) by
    /// continuing the base tokenizer's BPE merges; base ids and strings are kept.
    #[arg(long, requires = "new_tokens")]
    pub extend_from: Option<PathBuf>,
    /// Number of tokens to learn with --extend-from.
    #[arg(long)]
    pub new_tokens: Option<usize>,
    /// Replace the tokenizer with the one in this folder (tokenizer.json); rows of
    /// tokens both vocabularies share are copied.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// How new rows start.
    #[arg(long, value_enum, default_value = "pieces")]
    pub init: InitArg,
    /// Least count of a pair to merge it (--extend-from).
    #[arg(long, default_value_t = 2)]
    pub min_frequency: u64,
    /// Pad vocab_size to a multiple of this (1: no padding).
    #[arg(long, default_value_t = vocab::DEFAULT_PAD_MULTIPLE)]
    pub pad_to_multiple_of: usize,
    /// Corpus on which to report tokens per byte (default: --extend-from's).
    #[arg(long)]
    pub measure_on: Option<PathBuf>,
    #[command(flatten)]
    pub format: super::InputFormatArgs,
    /// Replace --output-dir if it exists.
    #[arg(long)]
    pub overwrite: bool,
}

pub fn adapt_vocab(a: AdaptVocabArgs) -> Result<()> {
    let source = match (a.extend_from, a.tokenizer) {
        (Some(corpus), _) => VocabSource::Extend {
            corpus,
            new_tokens: a.new_tokens.unwrap_or(0),
            min_frequency: a.min_frequency,
        },
        (None, Some(tokenizer)) => VocabSource::Replace { tokenizer },
        (None, None) => unreachable!("clap requires one of them"),
    };
    let mut opts = AdaptOptions::new(a.checkpoint_dir, a.output_dir, source);
    opts.init = match a.init {
        InitArg::Pieces => Init::Pieces,
        InitArg::Mean => Init::Mean,
    };
    opts.pad_to_multiple_of = a.pad_to_multiple_of;
    opts.measure_on = a.measure_on;
    opts.read = a.format.read_options();
    opts.overwrite = a.overwrite;
    let start = Instant::now();
    let r = vocab::adapt_vocab(&opts)?;
    eprintln!(
        "{} tokens ({} new rows), vocab_size {} -> {} in {:.1}s -> {}",
        r.tokenizer_size,
        r.new_token_ids.len(),
        r.base_vocab_size,
        r.vocab_size,
        start.elapsed().as_secs_f64(),
        opts.output.display()
    );
    if let Some(t) = &r.tokens_per_byte {
        eprintln!(
            "tokens per byte of {}: {:.4} (base) -> {:.4} (new), {:+.1}%",
            t.corpus,
            t.base,
            t.new,
            100.0 * (t.new / t.base - 1.0)
        );
    }
    let mut summary = serde_json::to_value(&r).expect("plain data serialises");
    summary["new_token_ids"] = serde_json::json!(r.new_token_ids.len());
    summary["output"] = serde_json::json!(opts.output);
    println!("{summary}");
    Ok(())
}

#[derive(Debug, Args)]
pub struct InitModelArgs {
    /// A model's config.json (any supported family), or a folder holding one; its
    /// vocab_size and bos/eos/pad ids are replaced by the tokenizer's.
    #[arg(long)]
    pub config: PathBuf,
    /// Folder with the tokenizer (tokenizer.json, tokenizer_config.json).
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// Folder to write: a complete Hugging Face model folder.
    #[arg(long)]
    pub output_dir: PathBuf,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Weights dtype.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: OutDtype,
    /// Pad vocab_size to a multiple of this (1: no padding).
    #[arg(long, default_value_t = vocab::DEFAULT_PAD_MULTIPLE)]
    pub pad_to_multiple_of: usize,
    /// Replace --output-dir if it exists.
    #[arg(long)]
    pub overwrite: bool,
}

pub fn init_model(a: InitModelArgs) -> Result<()> {
    let mut opts = InitOptions::new(a.config, a.tokenizer, a.output_dir);
    opts.seed = a.seed;
    opts.dtype = a.dtype.dtype();
    opts.pad_to_multiple_of = a.pad_to_multiple_of;
    opts.overwrite = a.overwrite;
    let start = Instant::now();
    let r = vocab::init_model(&opts)?;
    eprintln!(
        "initialised a {} model of {:.2}M parameters (vocab_size {} for {} tokens, seed {}) in {:.1}s -> {}",
        r.family.model_type(),
        r.parameters as f64 / 1e6,
        r.vocab_size,
        r.tokenizer_size,
        r.seed,
        start.elapsed().as_secs_f64(),
        r.output.display()
    );
    println!(
        "{}",
        serde_json::to_string(&r).expect("plain data serialises")
    );
    Ok(())
}
