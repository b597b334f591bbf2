//! `lit-claire demo`: continual pretraining end to end, on the built-in tiny model and
//! the sample corpus, in about a minute on a laptop CPU.
//!
//! The built-in model was pretrained on English fortunes only; the sample corpus is
//! Portuguese fortunes. The demo moves the model toward the new corpus:
//! prepare-data → validation loss of the base → pretrain (LoRA) → validate every
//! checkpoint → convergence plot → generate from the adapted model. Everything lands in
//! the output folder: the model, the raw and prepared data, the run (metrics,
//! checkpoints, log, `validation_results.csv`), `convergence.png` and `demo.json` with
//! the numbers.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::data::documents::TextLayout;
use crate::data::prepare::{PrepareOptions, PrepareReport, prepare_data};
use crate::error::{Error, IoContext, Result};
use crate::generate::{Sampling, generate};
use crate::hf::{attach_adapter_dir, load_model};
use crate::plot::{PlotOptions, plot_runs};
use crate::strategy::Strategy;
use crate::tokenizer::Tokenizer;
use crate::train::batches::TrainData;
use crate::train::evaluate::{EvalResult, Scoring, evaluate_split};
use crate::train::validate::{VALIDATION_FILE, ValidateOptions, ValidationRow, validate_run};
use crate::train::{TrainConfig, TrainSummary, load_train_data, pretrain_with_data};

/// The built-in model (see data/models/tiny-llama-fortunes/README.md).
const MODEL_FILES: &[(&str, &[u8])] = &[
    (
        "config.json",
        include_bytes!("../data/models/tiny-llama-fortunes/config.json"),
    ),
    (
        "generation_config.json",
        include_bytes!("../data/models/tiny-llama-fortunes/generation_config.json"),
    ),
    (
        "model.safetensors",
        include_bytes!("../data/models/tiny-llama-fortunes/model.safetensors"),
    ),
    (
        "tokenizer.json",
        include_bytes!("../data/models/tiny-llama-fortunes/tokenizer.json"),
    ),
    (
        "tokenizer_config.json",
        include_bytes!("../data/models/tiny-llama-fortunes/tokenizer_config.json"),
    ),
];
/// The sample corpus (GPL-2.0-or-later, see data/sample/LICENSE-fortunes-br.md).
const CORPUS: &[u8] = include_bytes!("../data/sample/fortunes-br.txt");
/// The training recipe of the demo.
const RECIPE: &str = include_str!("../lit_recipes/tiny-lora.toml");
/// Validation micro-batch.
const EVAL_BATCH: usize = 8;

/// What to run.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub out_dir: PathBuf,
    /// Override the recipe's number of steps.
    pub max_steps: Option<usize>,
    pub prompt: String,
    pub overwrite: bool,
}

/// What the demo did.
#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    pub model_dir: PathBuf,
    pub data_dir: PathBuf,
    pub run_dir: PathBuf,
    pub train_tokens: u64,
    pub steps: usize,
    pub base_val_loss: f64,
    pub tuned_val_loss: f64,
    /// Offline validation of the base (step 0) and of every checkpoint.
    pub validation_csv: PathBuf,
    /// Training and validation loss against step.
    pub plot: PathBuf,
    /// This report, as JSON.
    pub report: PathBuf,
    pub prompt: String,
    /// What the base model writes after the prompt, and what the adapted one does.
    pub base_completion: String,
    pub completion: String,
    pub seconds: f64,
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).at(dir)?;
    }
    crate::io::write_atomic(path, bytes)
}

/// Run the demo into `opts.out_dir`: the five steps of the module's documentation,
/// then `demo.json`.
pub fn run_demo(opts: &DemoOptions) -> Result<DemoReport> {
    let start = Instant::now();
    let out = &opts.out_dir;
    empty_out_dir(out, opts.overwrite)?;
    let model_dir = unpack(out)?;

    eprintln!("[1/5] prepare-data: the sample corpus, tokenized into blocks of 129 tokens");
    let data_dir = out.join("data");
    let prepared = prepare(&out.join("raw"), &model_dir, &data_dir)?;

    let strategy = Strategy::cpu();
    let data = load_train_data(&data_dir)?;
    let base = load_model(&model_dir, &strategy.build_options(false), None)?;
    let scored = Instant::now();
    let token_bytes = Tokenizer::from_dir(&model_dir)?.token_bytes();
    let how = Scoring {
        block_size: data.block_size,
        micro_batch_size: EVAL_BATCH,
        max_batches: None,
        cross_document: false,
        token_bytes: Some(&token_bytes),
    };
    let base_score = evaluate_split(
        &base,
        data.datasets[0].validation.as_ref(),
        &how,
        &strategy.device,
    )?;
    let base_secs = scored.elapsed().as_secs_f64();
    let base_val_loss = base_score.as_ref().map_or(f64::NAN, |r| r.loss);
    eprintln!(
        "[2/5] validation loss of the base model (pretrained on English fortunes): {base_val_loss:.4}"
    );

    eprintln!("[3/5] pretrain: LoRA on the Portuguese fortunes (lit_recipes/tiny-lora.toml)");
    let run_dir = out.join("run");
    let summary = train(&data_dir, &model_dir, &run_dir, opts.max_steps, &data)?;
    let final_dir = summary
        .final_checkpoint
        .clone()
        .ok_or_else(|| Error::Msg("the demo run wrote no final checkpoint".into()))?;

    eprintln!("[4/5] validate every checkpoint, plot the losses");
    // The base, as step 0 of the run's offline validation, then every checkpoint.
    let validation_csv = run_dir.join(VALIDATION_FILE);
    if let Some(r) = &base_score {
        record_base(&validation_csv, &data, r, base_secs)?;
    }
    let tuned_val_loss = validate_checkpoints(&run_dir, &validation_csv, &data, &strategy)?;
    let plot = out.join("convergence.png");
    plot_run(&run_dir, &plot)?;

    eprintln!(
        "[5/5] generate from base + adapter ({})",
        final_dir.display()
    );
    let mut tuned = base.clone();
    attach_adapter_dir(&mut tuned, &final_dir)?;
    let tokenizer = Tokenizer::from_dir(&model_dir)?;
    let base_completion = complete(&base, &tokenizer, &opts.prompt)?;
    let completion = complete(&tuned, &tokenizer, &opts.prompt)?;

    let report = DemoReport {
        model_dir,
        data_dir,
        run_dir,
        train_tokens: prepared.datasets.iter().map(|d| d.train.tokens).sum(),
        steps: summary.steps,
        base_val_loss,
        tuned_val_loss,
        validation_csv,
        plot,
        report: out.join("demo.json"),
        prompt: opts.prompt.clone(),
        base_completion,
        completion,
        seconds: start.elapsed().as_secs_f64(),
    };
    crate::io::write_json_atomic(
        &report.report,
        &serde_json::to_value(&report).expect("plain data"),
    )?;
    Ok(report)
}

/// Make sure `out` is empty: a folder that holds anything is refused, or with
/// `overwrite` removed.
fn empty_out_dir(out: &Path, overwrite: bool) -> Result<()> {
    if out.exists() && std::fs::read_dir(out).at(out)?.next().is_some() {
        if !overwrite {
            return Err(Error::Usage(format!(
                "{} is not empty (a previous demo?); pass --overwrite or another --out-dir",
                out.display()
            )));
        }
        std::fs::remove_dir_all(out).at(out)?;
    }
    Ok(())
}

/// Write the built-in model to `out/model` and the sample corpus to `out/raw`; returns
/// the model's folder.
fn unpack(out: &Path) -> Result<PathBuf> {
    let model_dir = out.join("model");
    for (name, bytes) in MODEL_FILES {
        write(&model_dir.join(name), bytes)?;
    }
    write(&out.join("raw/fortunes/fortunes-br.txt"), CORPUS)?;
    Ok(model_dir)
}

/// `prepare-data` of the raw corpus in `raw` (fortunes separated by `%` lines) into
/// `data_dir`, packed in samples of 129 tokens.
fn prepare(raw: &Path, model_dir: &Path, data_dir: &Path) -> Result<PrepareReport> {
    let mut prep = PrepareOptions::new(raw, model_dir, data_dir);
    prep.read.layout = TextLayout::Separator("%".into());
    prep.max_length = Some(128);
    prep.padding = false;
    prep.multiple_of = 1;
    prep.progress = true;
    prepare_data(&prep)
}

/// The demo's LoRA run: the built-in recipe, its steps overridden by `max_steps`.
fn train(
    data_dir: &Path,
    model_dir: &Path,
    run_dir: &Path,
    max_steps: Option<usize>,
    data: &TrainData,
) -> Result<TrainSummary> {
    let mut flags = toml::Table::new();
    flags.insert("data_dir".into(), data_dir.display().to_string().into());
    flags.insert(
        "checkpoint_dir".into(),
        model_dir.display().to_string().into(),
    );
    flags.insert("out_dir".into(), run_dir.display().to_string().into());
    if let Some(s) = max_steps {
        flags.insert("max_steps".into(), (s as i64).into());
    }
    let recipe: toml::Table = toml::from_str(RECIPE).expect("the built-in recipe parses");
    let cfg = TrainConfig::resolve_tables(Some(recipe), flags)?;
    pretrain_with_data(&cfg, data.clone())
}

/// The base model's validation `score` (taking `secs`), as the row `base` at step 0 of
/// the run's offline validation `csv`, so the plot starts from it.
fn record_base(csv: &Path, data: &TrainData, score: &EvalResult, secs: f64) -> Result<()> {
    crate::train::validate::append(
        csv,
        &ValidationRow {
            checkpoint: "base".into(),
            step: 0,
            dataset: data.datasets[0].name.clone(),
            loss: score.loss,
            perplexity: score.perplexity(),
            tokens: score.tokens,
            batch_size: EVAL_BATCH,
            elapsed_s: secs,
            peak_memory_mb: crate::train::validate::peak_memory_mb(),
            data: data
                .origin
                .as_ref()
                .map(|o| o.fingerprint.clone())
                .unwrap_or_default(),
            bits_per_byte: score.bits_per_byte(),
        },
    )
}

/// Validate every checkpoint of the run in `run_dir` into `csv`; returns the final
/// checkpoint's loss (NaN if it was not scored).
fn validate_checkpoints(
    run_dir: &Path,
    csv: &Path,
    data: &TrainData,
    strategy: &Strategy,
) -> Result<f64> {
    let rows = validate_run(
        &ValidateOptions {
            run: run_dir.to_path_buf(),
            max_batches: None,
            batch_size: EVAL_BATCH,
            csv: Some(csv.to_path_buf()),
            watch: None,
            cross_document_attention: None,
        },
        data,
        strategy,
    )?;
    Ok(rows
        .iter()
        .find(|r| r.checkpoint == "final")
        .map_or(f64::NAN, |r| r.loss))
}

/// The run's training and validation losses against step, as the image `plot`.
fn plot_run(run_dir: &Path, plot: &Path) -> Result<()> {
    plot_runs(
        std::slice::from_ref(&run_dir.to_path_buf()),
        &PlotOptions {
            title: Some(
                "lit-claire demo: LoRA continual pretraining on Portuguese fortunes".into(),
            ),
            ..PlotOptions::new(plot)
        },
    )?;
    Ok(())
}

/// Up to 60 tokens `model` writes after `prompt`, sampled with a fixed seed (so the
/// base and the adapted model are compared on the same draws).
fn complete(model: &crate::model::Gpt, tokenizer: &Tokenizer, prompt: &str) -> Result<String> {
    let prompt_ids = tokenizer.encode(prompt)?;
    let sampling = Sampling {
        temperature: 0.7,
        top_k: Some(40),
        top_p: Some(0.95),
        repetition_penalty: 1.1,
        seed: 42,
    };
    let g = generate(
        model,
        &prompt_ids,
        60,
        &sampling,
        &tokenizer.eos_ids,
        |_| Ok(true),
    )?;
    tokenizer.decode_after(&prompt_ids, &g.new_ids)
}
