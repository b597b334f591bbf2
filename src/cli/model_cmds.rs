//! `perplexity`, `generate` and `chat`.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use clap::Args;
use serde_json::json;

use super::{Format, RuntimeArgs};
use crate::error::{Error, IoContext, Result};
use crate::generate::{Sampling, TextStream, generate as run_generate};
use crate::hf::load_model;
use crate::model::Gpt;
use crate::tokenizer::Tokenizer;

#[derive(Debug, Args)]
pub struct PerplexityArgs {
    /// Hugging Face model folder (config.json, *.safetensors, tokenizer.json).
    #[arg(long)]
    pub checkpoint_dir: PathBuf,
    /// Text file to score, taken exactly as stored.
    #[arg(long)]
    pub input: PathBuf,
    /// PEFT adapter folder to apply on top of the checkpoint.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Window length in tokens (default: the model's context).
    #[arg(long)]
    pub context: Option<usize>,
    /// Windows scored together.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

#[derive(Debug, Args)]
pub struct SamplingArgs {
    /// Most tokens to generate.
    #[arg(long, default_value_t = 50)]
    pub max_new_tokens: usize,
    /// 0 is greedy decoding.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

impl SamplingArgs {
    fn sampling(&self) -> Result<Sampling> {
        let s = Sampling {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
        };
        s.check()?;
        Ok(s)
    }
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[arg(long)]
    pub checkpoint_dir: PathBuf,
    #[arg(long)]
    pub prompt: String,
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

#[derive(Debug, Args)]
pub struct ChatArgs {
    #[arg(long)]
    pub checkpoint_dir: PathBuf,
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Tag that starts the user's turns.
    #[arg(long, default_value = "[Intervenant 1:]")]
    pub user_tag: String,
    /// Tag that starts the model's turns.
    #[arg(long, default_value = "[Intervenant 2:]")]
    pub bot_tag: String,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

fn load(dir: &Path, adapter: Option<&PathBuf>, runtime: &RuntimeArgs) -> Result<(Gpt, Tokenizer)> {
    let strategy = runtime.strategy()?;
    // The model first: a wrong folder is reported as such, not as a missing tokenizer.
    let model = load_model(
        dir,
        &strategy.build_options(false),
        adapter.map(|p| p.as_path()),
    )?;
    let tokenizer = Tokenizer::from_dir(dir)?;
    Ok((model, tokenizer))
}

pub fn perplexity(a: PerplexityArgs) -> Result<()> {
    // A regular file only: /dev/zero or a FIFO would be read forever.
    let mut text = String::new();
    std::io::Read::read_to_string(&mut crate::io::open_regular(&a.input)?, &mut text).map_err(
        |e| match e.kind() {
            std::io::ErrorKind::InvalidData => {
                Error::bad_file(&a.input, "not UTF-8 text; --input must be a text file")
            }
            _ => Error::io(&a.input, e),
        },
    )?;
    let (model, tokenizer) = load(&a.checkpoint_dir, a.adapter.as_ref(), &a.runtime)?;
    let ids = tokenizer.encode(&text)?;
    let context = a.context.unwrap_or(model.cfg.block_size);
    let start = std::time::Instant::now();
    let report = crate::perplexity::perplexity_with_bytes(
        &model,
        &ids,
        context,
        a.batch_size,
        Some(&tokenizer.token_bytes()),
    )?;
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "scored {} tokens in {:.2}s ({:.0} tokens/s)",
        report.tokens,
        secs,
        report.tokens as f64 / secs.max(1e-9)
    );
    match a.format {
        Format::Json => println!("{}", serde_json::to_string(&report).expect("plain numbers")),
        Format::Text => println!(
            "loss {:.6}  perplexity {:.4}  bits per byte {}  tokens {}",
            report.loss,
            report.perplexity,
            report
                .bits_per_byte
                .map_or("-".into(), |b| format!("{b:.6}")),
            report.tokens
        ),
    }
    Ok(())
}

pub fn generate(a: GenerateArgs) -> Result<()> {
    let sampling = a.sampling.sampling()?;
    let (model, tokenizer) = load(&a.checkpoint_dir, a.adapter.as_ref(), &a.runtime)?;
    let prompt = tokenizer.encode(&a.prompt)?;
    crate::generate::check_prompt(&model, &prompt)?;
    let mut stream = TextStream::after(&tokenizer, &prompt)?;
    let mut out = std::io::stdout().lock();
    let text_mode = a.format == Format::Text;
    if text_mode {
        write!(out, "{}", a.prompt).at("stdout")?;
        out.flush().at("stdout")?;
    }
    let g = run_generate(
        &model,
        &prompt,
        a.sampling.max_new_tokens,
        &sampling,
        &tokenizer.eos_ids,
        |id| {
            if text_mode {
                write!(out, "{}", stream.push(id)?).at("stdout")?;
                out.flush().at("stdout")?;
            }
            Ok(true)
        },
    )?;
    if text_mode {
        writeln!(out).at("stdout")?;
        eprintln!(
            "{} new tokens, {:.1} tokens/s, KV cache {}",
            g.new_ids.len(),
            g.tokens_per_s,
            crate::train::estimate::human(g.kv_cache_bytes as u64)
        );
    } else {
        let v = json!({
            "completion": tokenizer.decode_after(&prompt, &g.new_ids)?,
            "new_token_ids": g.new_ids,
            "tokens_per_s": g.tokens_per_s,
            "kv_cache_bytes": g.kv_cache_bytes,
        });
        writeln!(out, "{v}").at("stdout")?;
    }
    Ok(())
}

pub fn chat(a: ChatArgs) -> Result<()> {
    let sampling = a.sampling.sampling()?;
    let (model, tokenizer) = load(&a.checkpoint_dir, a.adapter.as_ref(), &a.runtime)?;
    let mut session =
        crate::chat::ChatSession::new(&model, &tokenizer, sampling, a.sampling.max_new_tokens);
    session.user_tag = a.user_tag;
    session.bot_tag = a.bot_tag;
    eprintln!(
        "Chatting with {} (empty line or Ctrl-D to quit).",
        a.checkpoint_dir.display()
    );
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    loop {
        write!(out, "{} ", session.user_tag).at("stdout")?;
        out.flush().at("stdout")?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line).at("stdin")? == 0 || line.trim().is_empty() {
            writeln!(out).at("stdout")?;
            return Ok(());
        }
        write!(out, "{} ", session.bot_tag).at("stdout")?;
        session.respond(&line, |piece| {
            write!(out, "{piece}").at("stdout")?;
            out.flush().at("stdout")
        })?;
        writeln!(out).at("stdout")?;
    }
}

/// `reference-check` (hidden): the model's losses on the reference checkpoints against
/// PyTorch's, on any device.
#[derive(Debug, Args)]
pub struct ReferenceCheckArgs {
    /// Folder of reference checkpoints, each with an expected.json.
    #[arg(long, default_value = "tests/fixtures/reference")]
    pub fixtures: PathBuf,
    /// Largest difference allowed, in nats.
    #[arg(long, default_value_t = 1e-4)]
    pub tolerance: f64,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

pub fn reference_check(a: ReferenceCheckArgs) -> Result<()> {
    let strategy = a.runtime.strategy()?;
    let rows = crate::perplexity::reference_check(&a.fixtures, &strategy, a.tolerance)?;
    for r in rows {
        println!("{}", serde_json::to_string(&r).expect("plain data"));
    }
    Ok(())
}
