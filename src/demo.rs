//! `lit-claire demo`: the whole pipeline on the built-in tiny model and the sample
//! corpus, end to end, in a couple of minutes on a laptop CPU.
//!
//! prepare-data → validation loss of the base → pretrain (LoRA) → validation loss of
//! the adapted model → generate from it. Everything lands in the output folder: the
//! model, the raw and prepared data, the run (metrics, checkpoints, log), and
//! `demo.json` with the numbers.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::data::documents::TextLayout;
use crate::data::prepare::{PrepareOptions, prepare_data};
use crate::error::{Error, IoContext, Result};
use crate::generate::{Sampling, generate};
use crate::hf::{attach_adapter_dir, load_model};
use crate::strategy::Strategy;
use crate::tokenizer::Tokenizer;
use crate::train::evaluate::evaluate;
use crate::train::{TrainConfig, load_train_data, pretrain_with_data};

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
    pub prompt: String,
    pub completion: String,
    pub seconds: f64,
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).at(dir)?;
    }
    crate::io::write_atomic(path, bytes)
}

/// Run the demo into `opts.out_dir`.
pub fn run_demo(opts: &DemoOptions) -> Result<DemoReport> {
    let start = std::time::Instant::now();
    let out = &opts.out_dir;
    if out.exists() && std::fs::read_dir(out).at(out)?.next().is_some() {
        if !opts.overwrite {
            return Err(Error::Usage(format!(
                "{} is not empty (a previous demo?); pass --overwrite or another --out-dir",
                out.display()
            )));
        }
        std::fs::remove_dir_all(out).at(out)?;
    }
    let model_dir = out.join("model");
    for (name, bytes) in MODEL_FILES {
        write(&model_dir.join(name), bytes)?;
    }
    write(&out.join("raw/fortunes/fortunes-br.txt"), CORPUS)?;

    eprintln!("[1/4] prepare-data: the sample corpus, tokenized into blocks of 129 tokens");
    let data_dir = out.join("data");
    let mut prep = PrepareOptions::new(&out.join("raw"), &model_dir, &data_dir);
    prep.read.layout = TextLayout::Separator("%".into());
    prep.max_length = Some(128);
    prep.padding = false;
    prep.multiple_of = 1;
    prep.progress = true;
    let prepared = prepare_data(&prep)?;

    let strategy = Strategy::cpu();
    let data = load_train_data(&data_dir)?;
    let val = data.datasets[0].validation.clone();
    let score = |model: &crate::model::Gpt| -> Result<f64> {
        let r = evaluate(
            model,
            val.as_ref(),
            data.block_size,
            8,
            None,
            &strategy.device,
        )?;
        Ok(r.map_or(f64::NAN, |r| r.loss))
    };
    let base = load_model(&model_dir, &strategy.build_options(false), None)?;
    let base_val_loss = score(&base)?;
    eprintln!("[2/4] base model validation loss {base_val_loss:.4}");

    eprintln!("[3/4] pretrain: LoRA on the sample corpus (lit_recipes/tiny-lora.toml)");
    let run_dir = out.join("run");
    let mut flags = toml::Table::new();
    flags.insert("data_dir".into(), data_dir.display().to_string().into());
    flags.insert(
        "checkpoint_dir".into(),
        model_dir.display().to_string().into(),
    );
    flags.insert("out_dir".into(), run_dir.display().to_string().into());
    if let Some(s) = opts.max_steps {
        flags.insert("max_steps".into(), (s as i64).into());
    }
    let recipe: toml::Table = toml::from_str(RECIPE).expect("the built-in recipe parses");
    let cfg = TrainConfig::resolve_tables(Some(recipe), flags)?;
    let summary = pretrain_with_data(&cfg, data.clone())?;
    let final_dir = summary
        .final_checkpoint
        .clone()
        .ok_or_else(|| Error::Msg("the demo run wrote no final checkpoint".into()))?;

    let mut tuned = base;
    attach_adapter_dir(&mut tuned, &final_dir)?;
    let tuned_val_loss = score(&tuned)?;
    eprintln!(
        "[4/4] generate from base + adapter ({})",
        final_dir.display()
    );
    let tokenizer = Tokenizer::from_dir(&model_dir)?;
    let prompt_ids = tokenizer.encode(&opts.prompt)?;
    let sampling = Sampling {
        temperature: 0.7,
        top_k: Some(40),
        top_p: Some(0.95),
        repetition_penalty: 1.1,
        seed: 42,
    };
    let g = generate(
        &tuned,
        &prompt_ids,
        60,
        &sampling,
        &tokenizer.eos_ids,
        |_| Ok(true),
    )?;
    let completion = tokenizer.decode_after(&prompt_ids, &g.new_ids)?;

    let report = DemoReport {
        model_dir,
        data_dir,
        run_dir,
        train_tokens: prepared.datasets.iter().map(|d| d.train.tokens).sum(),
        steps: summary.steps,
        base_val_loss,
        tuned_val_loss,
        prompt: opts.prompt.clone(),
        completion,
        seconds: start.elapsed().as_secs_f64(),
    };
    crate::io::write_json_atomic(
        &out.join("demo.json"),
        &serde_json::to_value(&report).expect("plain data"),
    )?;
    Ok(report)
}
