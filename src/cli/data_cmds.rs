//! `prepare-data`.

use std::path::PathBuf;

use clap::{ArgAction, Args};

use super::Format;
use crate::data::chunk::DEFAULT_TURN_PATTERN;
use crate::data::prepare::{PrepareOptions, prepare_data as run_prepare};
use crate::error::Result;

/// Raw text to memory-mapped training shards (Megatron `.bin`/`.idx` + metadata.json).
#[derive(Debug, Args)]
pub struct PrepareDataArgs {
    /// Folder with one sub-folder or .txt/.jsonl(.gz) file per dataset.
    #[arg(long)]
    pub source_path: PathBuf,
    /// Model folder: its tokenizer.json, and config.json for the default --max-length.
    #[arg(long)]
    pub checkpoint_dir: PathBuf,
    /// Output folder.
    #[arg(long)]
    pub destination_path: PathBuf,
    /// Tokens the model sees at once (samples hold one more); default: the model's context.
    #[arg(long)]
    pub max_length: Option<usize>,
    /// false (default): documents packed back to back into full samples, kept apart in
    /// training by a block-diagonal mask; true: one chunk of one document per sample
    /// (padded by training).
    #[arg(long, action = ArgAction::Set, default_value_t = false)]
    pub padding: bool,
    #[command(flatten)]
    pub input: super::InputFormatArgs,
    /// Share of documents for validation when a dataset has no test/dev/validation file.
    #[arg(long, default_value_t = 0.05)]
    pub val_fraction: f64,
    /// Seed of the --val-fraction draw and of --augment.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Regex of a speaker tag starting a turn ('' to cut at word boundaries only).
    #[arg(long, default_value = DEFAULT_TURN_PATTERN)]
    pub turn_pattern: String,
    /// Fraction of a window, at its end, where a turn start may end a chunk.
    #[arg(long, default_value_t = 0.25)]
    pub turn_window: f64,
    /// Extra variants of each training dialogue with its speaker tags rewritten.
    #[arg(long, default_value_t = 0)]
    pub augment: usize,
    /// JSON file of dataset groups and sampling weights (see data/dataset_groups.json).
    #[arg(long)]
    pub groups: Option<PathBuf>,
    /// Shard counts are multiples of this, so 1, 2, 4 or 8 ranks get equal shares.
    #[arg(long, default_value_t = 8)]
    pub multiple_of: usize,
    /// Target tokens per shard; larger splits get more shards.
    #[arg(long, default_value_t = 100_000_000)]
    pub shard_tokens: u64,
    /// Redo datasets that are already complete.
    #[arg(long)]
    pub overwrite: bool,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

/// Run `prepare-data`.
pub fn prepare_data(a: PrepareDataArgs) -> Result<()> {
    let mut opts = PrepareOptions::new(&a.source_path, &a.checkpoint_dir, &a.destination_path);
    opts.max_length = a.max_length;
    opts.padding = a.padding;
    opts.read = a.input.read_options();
    opts.val_fraction = a.val_fraction;
    opts.seed = a.seed;
    opts.turn_pattern = a.turn_pattern;
    opts.turn_window = a.turn_window;
    opts.augment = a.augment;
    opts.groups = a.groups;
    opts.multiple_of = a.multiple_of;
    opts.shard_tokens = a.shard_tokens;
    opts.overwrite = a.overwrite;
    opts.progress = true;
    let report = run_prepare(&opts)?;
    match a.format {
        Format::Json => println!(
            "{}",
            serde_json::to_string(&report).expect("report serialises")
        ),
        Format::Text => {
            for d in &report.datasets {
                println!(
                    "{}\t{}\tweight {}\ttrain {} samples / {} tokens\tvalidation {} samples / {} tokens{}",
                    d.name,
                    d.group,
                    d.weight,
                    d.train.samples,
                    d.train.tokens,
                    d.validation.samples,
                    d.validation.tokens,
                    if d.skipped { "\t(kept)" } else { "" }
                );
            }
            println!("{}", report.destination.display());
        }
    }
    Ok(())
}
