//! The command-line front end: clap structs, each resolved once into library types
//! and handed to one library function.

mod corpus_cmds;
mod model_cmds;

use clap::{Parser, Subcommand, ValueEnum};

use crate::error::Result;
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
    /// Perplexity of a checkpoint (optionally with a LoRA adapter) on a text file.
    Perplexity(model_cmds::PerplexityArgs),
    /// Generate a continuation of a prompt.
    Generate(model_cmds::GenerateArgs),
    /// Talk with a model interactively (dialogue models such as Claire).
    Chat(model_cmds::ChatArgs),
    /// Train a byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json) on raw text.
    TrainTokenizer(corpus_cmds::TrainTokenizerArgs),
    /// Remove exact and near-duplicate documents (MinHash LSH) from a raw corpus.
    Dedup(corpus_cmds::DedupArgs),
}

/// Parse the command line and run the command.
pub fn run() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Perplexity(a) => model_cmds::perplexity(a),
        Command::Generate(a) => model_cmds::generate(a),
        Command::Chat(a) => model_cmds::chat(a),
        Command::TrainTokenizer(a) => corpus_cmds::train_tokenizer(a),
        Command::Dedup(a) => corpus_cmds::dedup(a),
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
    pub device: String,
    /// 32-true, bf16-true, bf16-mixed or 16-mixed.
    #[arg(long, default_value = "32-true")]
    pub precision: String,
}

impl RuntimeArgs {
    pub fn strategy(&self) -> Result<Strategy> {
        let spec: DeviceSpec = self.device.parse()?;
        let precision: Precision = self.precision.parse()?;
        Strategy::new(spec, precision)
    }
}
