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
    /// Samples per forward/backward pass per device [default: 4].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub micro_batch_size: Option<usize>,
    /// Samples per optimizer step per device; accumulation = batch / micro batch [default: 16].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// Optimizer steps (the smallest of --max-steps, --num-epochs and --max-tokens wins; default: one epoch).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<usize>,
    /// Passes over the (weighted) training data.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_epochs: Option<usize>,
    /// Stop after this many training tokens.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    /// Peak learning rate [default: 3e-4].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub learning_rate: Option<f64>,
    /// Learning rate at the end of the decay [default: 3e-5].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_lr: Option<f64>,
    /// Linear warmup steps [default: 100].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_steps: Option<usize>,
    /// Decay after warmup [default: cosine].
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr_schedule: Option<ScheduleKind>,
    /// Cycles of cosine-restarts.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restarts: Option<usize>,
    /// Decoupled weight decay of AdamW [default: 0.1].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_decay: Option<f64>,
    /// AdamW β₁ [default: 0.9].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beta1: Option<f64>,
    /// AdamW β₂ [default: 0.95].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beta2: Option<f64>,
    /// AdamW ε [default: 1e-8].
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
    /// Devices per node [default: 1].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub devices: Option<usize>,
    /// Nodes [default: 1].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_nodes: Option<usize>,
    /// Seed of data order, LoRA initialisation and dropout [default: 42].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// LoRA rank; > 0 trains a LoRA adapter instead of all weights.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_r: Option<usize>,
    /// LoRA scaling numerator: the update is alpha/r · B·A [default: 16].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_alpha: Option<f64>,
    /// Dropout on the LoRA input [default: 0.05].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_dropout: Option<f64>,
    /// LoRA on the query projection [default: true].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_query: Option<bool>,
    /// LoRA on the key projection [default: false].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_key: Option<bool>,
    /// LoRA on the value projection [default: true].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_value: Option<bool>,
    /// LoRA on the attention output projection [default: false].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_projection: Option<bool>,
    /// LoRA on the MLP layers [default: false].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_mlp: Option<bool>,
    /// LoRA on the output head [default: false].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_head: Option<bool>,
    /// Unit of the intervals: optimizer steps or seconds.
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval_unit: Option<IntervalUnit>,
    /// Write a metrics row every N steps (or seconds) [default: 1].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_interval: Option<u64>,
    /// Validate every N steps (or seconds) [default: 100].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_interval: Option<u64>,
    /// Checkpoint every N steps (or seconds) [default: 100].
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
        // TOML integers are i64: name a flag beyond them rather than "bad flags".
        if let Ok(serde_json::Value::Object(m)) = serde_json::to_value(self) {
            for (k, v) in m {
                if v.as_u64().is_some_and(|n| n > i64::MAX as u64) {
                    return Err(Error::Usage(format!(
                        "--{} {v} is too large (at most {})",
                        k.replace('_', "-"),
                        i64::MAX
                    )));
                }
            }
        }
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// The `[default: X]` written in the help of each flag is the value the trainer uses.
    #[test]
    fn help_defaults_match_the_config_defaults() {
        let cmd = crate::cli::Cli::command();
        let pretrain = cmd.find_subcommand("pretrain").expect("pretrain exists");
        let defaults = toml::Table::try_from(crate::train::TrainConfig::default()).unwrap();
        let mut checked = 0;
        for arg in pretrain.get_arguments() {
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            let Some(start) = help.find("[default: ") else {
                continue;
            };
            let shown = &help[start + 10..help[start..].find(']').unwrap() + start];
            let key = arg.get_id().as_str();
            let actual = &defaults[key];
            let same = match actual {
                toml::Value::Float(f) => shown
                    .parse::<f64>()
                    .map(|s| (s - f).abs() < 1e-12)
                    .unwrap_or(false),
                toml::Value::String(s) => s == shown,
                other => other.to_string() == shown,
            };
            assert!(same, "--{key}: help says {shown}, default is {actual}");
            checked += 1;
        }
        assert!(checked >= 20, "{checked}");
    }
}
