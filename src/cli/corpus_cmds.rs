//! `train-tokenizer` and `dedup`: the corpus tools around prepare-data.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;

use crate::data::dedup::{DedupOptions, dedup as run_dedup};
use crate::data::train_tokenizer::{TrainTokenizerOptions, train_tokenizer as run_train};
use crate::error::Result;

#[derive(Debug, Args)]
pub struct TrainTokenizerArgs {
    /// Files or folders of .txt/.jsonl documents (optionally .gz).
    #[arg(long, required = true, num_args = 1..)]
    pub input: Vec<PathBuf>,
    /// Vocabulary size, including the 256 byte tokens and the special tokens.
    #[arg(long)]
    pub vocab_size: usize,
    /// Folder for tokenizer.json and tokenizer_config.json.
    #[arg(long)]
    pub output: PathBuf,
    /// Extra special tokens (e.g. speaker tags), after pad, bos, eos and unk.
    #[arg(long, num_args = 1..)]
    pub special_tokens: Vec<String>,
    /// Padding token ("" for none).
    #[arg(long, default_value = "<pad>")]
    pub pad_token: String,
    /// Beginning-of-sequence token ("" for none).
    #[arg(long, default_value = "<s>")]
    pub bos_token: String,
    /// End-of-sequence token ("" for none).
    #[arg(long, default_value = "</s>")]
    pub eos_token: String,
    /// Unknown token ("" for none; byte-level BPE never produces it).
    #[arg(long, default_value = "<unk>")]
    pub unk_token: String,
    /// Least count of a pair to merge it.
    #[arg(long, default_value_t = 2)]
    pub min_frequency: u64,
    /// Context length written into tokenizer_config.json.
    #[arg(long, default_value_t = 2048)]
    pub model_max_length: usize,
    #[command(flatten)]
    pub format: super::InputFormatArgs,
    /// Replace a tokenizer.json already in --output.
    #[arg(long)]
    pub overwrite: bool,
}

pub fn train_tokenizer(a: TrainTokenizerArgs) -> Result<()> {
    let role = |t: &str| (!t.is_empty()).then(|| t.to_string());
    let mut opts = TrainTokenizerOptions::new(a.input, a.output, a.vocab_size);
    opts.pad_token = role(&a.pad_token);
    opts.bos_token = role(&a.bos_token);
    opts.eos_token = role(&a.eos_token);
    opts.unk_token = role(&a.unk_token);
    opts.special_tokens = a.special_tokens;
    opts.min_frequency = a.min_frequency;
    opts.model_max_length = a.model_max_length;
    opts.read = a.format.read_options();
    opts.overwrite = a.overwrite;
    opts.progress = true;
    let start = Instant::now();
    let t = run_train(&opts)?;
    eprintln!(
        "trained a {}-token byte-level BPE on {} documents ({:.1} MB) in {:.1}s -> {}",
        t.vocab_size,
        t.documents,
        t.text_bytes as f64 / 1e6,
        start.elapsed().as_secs_f64(),
        t.output.display()
    );
    if t.vocab_size < opts.vocab_size {
        eprintln!(
            "warning: the corpus only allowed {} of the {} requested entries; lower --min-frequency or add text",
            t.vocab_size, opts.vocab_size
        );
    }
    println!(
        "{}",
        serde_json::to_string(&t).expect("plain data serialises")
    );
    Ok(())
}

#[derive(Debug, Args)]
pub struct DedupArgs {
    /// Folder of datasets (sub-folders or files of .txt/.jsonl, optionally .gz), or one file.
    #[arg(long)]
    pub input: PathBuf,
    /// Folder to create with the kept documents under the same relative paths, plus
    /// dedup_report.json and dedup_clusters.ndjson.
    #[arg(long)]
    pub output: PathBuf,
    /// MinHash permutations: more is more precise and slower.
    #[arg(long, default_value_t = 64)]
    pub num_perm: usize,
    /// Words per shingle.
    #[arg(long, default_value_t = 5)]
    pub ngram: usize,
    /// Jaccard similarity of word n-grams from which documents are near duplicates.
    #[arg(long, default_value_t = 0.85)]
    pub threshold: f64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[command(flatten)]
    pub format: super::InputFormatArgs,
    /// Replace --output if it exists.
    #[arg(long)]
    pub overwrite: bool,
}

pub fn dedup(a: DedupArgs) -> Result<()> {
    let mut opts = DedupOptions::new(a.input, a.output);
    opts.num_perm = a.num_perm;
    opts.ngram = a.ngram;
    opts.threshold = a.threshold;
    opts.seed = a.seed;
    opts.read = a.format.read_options();
    opts.overwrite = a.overwrite;
    opts.progress = true;
    let start = Instant::now();
    let r = run_dedup(&opts)?;
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    eprintln!(
        "{} documents: kept {}, removed {} ({} exact, {} near) in {} clusters; {:.1}s, {:.0} docs/s -> {}",
        r.totals.documents,
        r.totals.kept,
        r.totals.removed,
        r.totals.exact_duplicates,
        r.totals.near_duplicates,
        r.clusters,
        secs,
        r.totals.documents as f64 / secs,
        opts.output.display()
    );
    let summary = serde_json::json!({
        "output": r.output,
        "documents": r.totals.documents,
        "kept": r.totals.kept,
        "removed": r.totals.removed,
        "exact_duplicates": r.totals.exact_duplicates,
        "near_duplicates": r.totals.near_duplicates,
        "clusters": r.clusters,
        "bands": r.parameters["bands"],
        "rows": r.parameters["rows"],
        "seconds": secs,
    });
    println!("{summary}");
    Ok(())
}
