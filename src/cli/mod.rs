//! The command-line front end: clap structs, each resolved once into library types
//! and handed to one library function.

mod bench_cmds;
mod corpus_cmds;
mod data_cmds;
mod demo_cmds;
mod dist_cmds;
mod eval_cmds;
mod model_cmds;
mod plot_cmds;
mod publish_cmds;
mod train_cmds;
mod vocab_cmds;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::error::{Error, Result};
use crate::strategy::{DeviceSpec, Precision, Strategy};

/// Continual pretraining of open LLMs (Falcon, Mistral, LLaMA, GPT-2/NeoX/Neo) with optional LoRA.
#[derive(Debug, Parser)]
#[command(name = "lit-claire", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The whole pipeline on the built-in tiny model and sample corpus (prepare-data →
    /// pretrain with LoRA → generate), in a couple of minutes on a CPU.
    Demo(demo_cmds::DemoArgs),
    /// Download a model's weights, config and tokenizer into checkpoints/ORG/NAME.
    Download(publish_cmds::DownloadArgs),
    /// Raw text to memory-mapped training shards (Megatron .bin/.idx + metadata.json).
    PrepareData(data_cmds::PrepareDataArgs),
    /// Train a byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json) on raw text.
    TrainTokenizer(corpus_cmds::TrainTokenizerArgs),
    /// Remove exact and near-duplicate documents (MinHash LSH) from a raw corpus.
    Dedup(corpus_cmds::DedupArgs),
    /// A base model with a new vocabulary: tokens learned on a corpus, or another
    /// tokenizer; embeddings and head resized, a complete Hugging Face folder.
    AdaptVocab(vocab_cmds::AdaptVocabArgs),
    /// A model from scratch for a tokenizer, initialised as its family's transformers code does.
    InitModel(vocab_cmds::InitModelArgs),
    /// Continual pretraining: full fine-tuning or LoRA on prepared data.
    Pretrain(Box<train_cmds::PretrainArgs>),
    /// Validate every checkpoint of a run on every dataset, appending to a CSV.
    Validate(train_cmds::ValidateArgs),
    /// Downstream tasks scored as lm-evaluation-harness scores them (multiple choice,
    /// log-likelihoods, perplexities, generation), for one model or every checkpoint of a run.
    Evaluate(eval_cmds::EvaluateArgs),
    /// Loss curves of one or several runs (PNG or SVG), and their best checkpoints.
    Plot(plot_cmds::PlotArgs),
    /// Merge a LoRA adapter into its base model: a complete Hugging Face folder.
    MergeLora(publish_cmds::MergeLoraArgs),
    /// A training checkpoint as a Hugging Face model folder (LoRA merged, sharded, model card).
    ConvertToHf(publish_cmds::ConvertArgs),
    /// Upload a folder to a Hugging Face model repository in one commit.
    Upload(publish_cmds::UploadArgs),
    /// Write a LLaMA/Mistral/Falcon checkpoint as a GGUF file for llama.cpp.
    Quantize(publish_cmds::QuantizeArgs),
    /// Generate a continuation of a prompt.
    Generate(model_cmds::GenerateArgs),
    /// Talk with a model interactively (dialogue models such as Claire).
    Chat(model_cmds::ChatArgs),
    /// Perplexity of a checkpoint (optionally with a LoRA adapter) on a text file.
    Perplexity(model_cmds::PerplexityArgs),
    /// Training throughput (tokens/s, MFU) on a synthetic LLaMA.
    Bench(bench_cmds::BenchArgs),
    /// Check the process group, rendezvous and NCCL collectives of data-parallel training.
    #[command(hide = true)]
    DistCheck(dist_cmds::DistCheckArgs),
    /// Losses on the reference checkpoints against PyTorch's, on any device and precision.
    #[command(hide = true)]
    ReferenceCheck(model_cmds::ReferenceCheckArgs),
    /// The device's attention kernel against the plain attention, values, gradients,
    /// time and memory (the flash kernels' check on a GPU).
    #[command(hide = true)]
    AttentionCheck(bench_cmds::AttentionCheckArgs),
}

/// Parse the command line and run the command; its exit status (0, or
/// [`EXIT_PREEMPTED`](crate::train::preempt::EXIT_PREEMPTED) for a run stopped by a
/// signal).
pub fn run() -> Result<ExitCode> {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => return Err(Error::Usage(clap_error_line(&e))),
    };
    match cli.command {
        // The one command with an exit status of its own.
        Command::Pretrain(a) => train_cmds::pretrain(*a),
        command => run_command(command).map(|()| ExitCode::SUCCESS),
    }
}

fn run_command(command: Command) -> Result<()> {
    match command {
        Command::Demo(a) => demo_cmds::demo(a),
        Command::Perplexity(a) => model_cmds::perplexity(a),
        Command::Generate(a) => model_cmds::generate(a),
        Command::Chat(a) => model_cmds::chat(a),
        Command::Pretrain(a) => train_cmds::pretrain(*a).map(drop),
        Command::Validate(a) => train_cmds::validate(a),
        Command::Evaluate(a) => eval_cmds::evaluate_cmd(a),
        Command::Bench(a) => bench_cmds::bench(a),
        Command::DistCheck(a) => dist_cmds::dist_check_cmd(a),
        Command::ReferenceCheck(a) => model_cmds::reference_check(a),
        Command::AttentionCheck(a) => bench_cmds::attention_check_cmd(a),
        Command::Plot(a) => plot_cmds::plot(a),
        Command::MergeLora(a) => publish_cmds::merge(a),
        Command::ConvertToHf(a) => publish_cmds::convert(a),
        Command::Upload(a) => publish_cmds::upload(a),
        Command::Download(a) => publish_cmds::download(a),
        Command::Quantize(a) => publish_cmds::quantize(a),
        Command::PrepareData(a) => data_cmds::prepare_data(a),
        Command::TrainTokenizer(a) => corpus_cmds::train_tokenizer(a),
        Command::Dedup(a) => corpus_cmds::dedup(a),
        Command::AdaptVocab(a) => vocab_cmds::adapt_vocab(a),
        Command::InitModel(a) => vocab_cmds::init_model(a),
    }
}

/// How raw files hold their documents (prepare-data, train-tokenizer, dedup).
#[derive(Debug, Clone, clap::Args)]
pub struct InputFormatArgs {
    /// Field of the text in .jsonl files (other fields are ignored, and kept by dedup).
    #[arg(long, default_value = "text")]
    pub json_key: String,
    /// Line that separates documents in .txt files ("" for a blank line, "%" for
    /// fortune files); without it every line is a document.
    #[arg(long)]
    pub doc_separator: Option<String>,
    /// Count and drop .jsonl lines that are not JSON or lack the text field, instead of
    /// stopping at the first.
    #[arg(long)]
    pub skip_bad_lines: bool,
    /// Longest line, and longest document, read (bytes): a longer one stops the command
    /// naming its file and line, so one huge line cannot take all the memory.
    #[arg(long, default_value_t = crate::data::documents::DEFAULT_MAX_DOCUMENT_BYTES)]
    pub max_document_bytes: usize,
}

impl InputFormatArgs {
    pub fn read_options(self) -> crate::data::documents::ReadOptions {
        crate::data::documents::ReadOptions {
            layout: crate::data::documents::TextLayout::from_separator(self.doc_separator),
            json_key: self.json_key,
            skip_bad_lines: self.skip_bad_lines,
            max_document_bytes: self.max_document_bytes,
        }
    }
}

/// Output format of commands that report numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// Where and how to compute.
#[derive(Debug, Clone, clap::Args)]
pub struct RuntimeArgs {
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// 32-true, bf16-true, bf16-mixed or 16-mixed.
    #[arg(long, default_value = "32-true")]
    pub precision: Precision,
}

impl RuntimeArgs {
    pub fn strategy(&self) -> Result<Strategy> {
        Strategy::new(self.device, self.precision)
    }
}

/// A clap error in one line, like every other error (clap's own spans several, with
/// a usage block and a hint to try --help).
fn clap_error_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let body: Vec<&str> = text
        .lines()
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let line = body.join(" ");
    let line = line.strip_prefix("error: ").unwrap_or(&line);
    format!("{line} (see --help)")
}
