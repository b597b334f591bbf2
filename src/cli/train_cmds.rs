//! `pretrain`: flags (and a recipe) resolved into a [`TrainConfig`], then the trainer.

use std::path::PathBuf;

use clap::Args;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::train::TrainConfig;
use crate::train::config::IntervalUnit;
use crate::train::schedule::ScheduleKind;

/// Every flag is optional: a recipe (`--recipe`) or the defaults fill the rest.
/// Field names are those of [`TrainConfig`].
#[derive(Debug, Args, Serialize)]
pub struct PretrainArgs {
    /// A TOML recipe (see lit_recipes/); flags override it.
    #[arg(long)]
    #[serde(skip)]
    pub recipe: Option<PathBuf>,
    /// Prepared data (lit-claire prepare-data).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Base model: a Hugging Face folder.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint_dir: Option<PathBuf>,
    /// Run folder (metrics, checkpoints).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub out_dir: Option<PathBuf>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub micro_batch_size: Option<usize>,
    /// Samples per optimizer step per device (accumulation = batch / micro batch).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_epochs: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub learning_rate: Option<f64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_lr: Option<f64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_steps: Option<usize>,
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr_schedule: Option<ScheduleKind>,
    /// Cycles of cosine-restarts.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restarts: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_decay: Option<f64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beta1: Option<f64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beta2: Option<f64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eps: Option<f64>,
    /// Global gradient-norm clipping (0: off).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_clip: Option<f64>,
    /// cpu, cuda or cuda:N.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// 32-true, bf16-true, bf16-mixed or 16-mixed.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub precision: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub devices: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_nodes: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// LoRA rank; > 0 trains a LoRA adapter instead of all weights.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_r: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_alpha: Option<f64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_dropout: Option<f32>,
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_query: Option<bool>,
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_key: Option<bool>,
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_value: Option<bool>,
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_projection: Option<bool>,
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_mlp: Option<bool>,
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_head: Option<bool>,
    /// Unit of the intervals: optimizer steps or seconds.
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval_unit: Option<IntervalUnit>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_interval: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_interval: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub save_interval: Option<u64>,
    /// Keep the newest N step checkpoints (and the best).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_checkpoints: Option<usize>,
    /// Stop after N evaluations without improvement.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub early_stopping: Option<usize>,
    /// Validation micro-batches per dataset (default: the whole split).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_max_batches: Option<usize>,
    /// `auto` (the run's newest checkpoint) or a checkpoint folder.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume: Option<String>,
}

impl PretrainArgs {
    /// Defaults ← recipe ← flags.
    pub fn resolve(&self) -> Result<TrainConfig> {
        let flags =
            toml::Table::try_from(self).map_err(|e| Error::Usage(format!("bad flags: {e}")))?;
        TrainConfig::resolve(self.recipe.as_deref(), flags)
    }
}

pub fn pretrain(a: PretrainArgs) -> Result<()> {
    let cfg = a.resolve()?;
    let summary = crate::train::pretrain(&cfg)?;
    if let Some(dir) = summary.final_checkpoint {
        println!("{}", dir.display());
    }
    Ok(())
}

/// Offline validation of every checkpoint of a run.
#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// The run folder (its checkpoints are scored).
    #[arg(long)]
    pub out_dir: PathBuf,
    /// Prepared data whose validation splits are used.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// At most this many batches per dataset (default: the whole split).
    #[arg(long)]
    pub max: Option<usize>,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// CSV to append to (default RUN/validation_results.csv).
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Keep watching for new checkpoints every SECONDS until the run's final one is scored.
    #[arg(long)]
    pub watch: Option<u64>,
    #[command(flatten)]
    pub runtime: super::RuntimeArgs,
}

pub fn validate(a: ValidateArgs) -> Result<()> {
    let strategy = a.runtime.strategy()?;
    let data = crate::train::load_train_data(&a.data_dir)?;
    let opts = crate::train::validate::ValidateOptions {
        run: a.out_dir,
        max_batches: a.max,
        batch_size: a.batch_size,
        csv: a.csv,
        watch: a.watch.map(std::time::Duration::from_secs),
    };
    let rows = crate::train::validate::validate_run(&opts, &data, &strategy)?;
    eprintln!("{} new validation rows", rows.len());
    Ok(())
}
