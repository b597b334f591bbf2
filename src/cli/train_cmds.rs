//! `pretrain`: flags (and a recipe) resolved into a [`TrainConfig`], then the trainer.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::error::{Error, Result};
use crate::train::TrainConfig;
use crate::train::config::TrainFlags;

/// Every flag is optional: a recipe (`--recipe`) or the defaults fill the rest.
#[derive(Debug, Args)]
pub struct PretrainArgs {
    /// A TOML recipe (see lit_recipes/); flags override it.
    #[arg(long)]
    pub recipe: Option<PathBuf>,
    #[command(flatten)]
    pub flags: TrainFlags,
    /// Print the memory the run plans for (parameters, gradients, optimizer state,
    /// activations, workspace) and exit: reads only the checkpoint's config.json (and
    /// the prepared data's metadata.json, if there), writes nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// With --dry-run: memory per device in GiB (80 for an H100 80GB), to name the
    /// least sharded --strategy that fits (on a CUDA device, its free memory otherwise).
    #[arg(long, value_name = "GIB", requires = "dry_run")]
    pub device_memory: Option<f64>,
}

impl PretrainArgs {
    /// Defaults ← recipe ← flags, not checked yet: a run checks them all
    /// ([`TrainConfig::checked`]), `--dry-run` only what it reads.
    pub fn resolve(&self) -> Result<TrainConfig> {
        // TOML integers are i64: name a flag beyond them rather than "bad flags".
        if let Ok(serde_json::Value::Object(m)) = serde_json::to_value(&self.flags) {
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
        let flags = toml::Table::try_from(&self.flags)
            .map_err(|e| Error::Usage(format!("bad flags: {e}")))?;
        TrainConfig::resolve_unchecked(self.recipe.as_deref(), flags)
    }
}

/// A run: prints the final checkpoint and succeeds; stopped by SIGUSR1 or SIGTERM, it
/// prints nothing and exits with [`EXIT_PREEMPTED`](crate::train::preempt::EXIT_PREEMPTED)
/// once its checkpoint is written.
pub fn pretrain(a: PretrainArgs) -> Result<ExitCode> {
    // First: a signal from here on stops the run after a step, with a checkpoint.
    crate::train::preempt::install_signal_handlers()?;
    let cfg = a.resolve()?;
    if a.dry_run {
        cfg.check_needing(&["--checkpoint-dir"])?;
        let bytes = match a.device_memory {
            Some(g) if g.is_finite() && g > 0.0 && g < 1e9 => {
                Some((g * (1u64 << 30) as f64) as u64)
            }
            Some(g) => {
                return Err(Error::Usage(format!(
                    "--device-memory {g}: expected a positive number of GiB (80 for an 80 GB GPU)"
                )));
            }
            None => None,
        };
        println!("{}", crate::train::estimate::dry_run_on(&cfg, bytes)?);
        return Ok(ExitCode::SUCCESS);
    }
    let summary = crate::train::pretrain(&cfg.checked()?)?;
    if let Some(dir) = summary.final_checkpoint {
        println!("{}", dir.display());
    }
    if summary.preempted.is_some() {
        return Ok(ExitCode::from(crate::train::preempt::EXIT_PREEMPTED));
    }
    Ok(ExitCode::SUCCESS)
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
    /// Keep watching for new checkpoints every SECONDS (at least 1) until the run's
    /// final one is scored.
    #[arg(long, value_name = "SECONDS")]
    pub watch: Option<u64>,
    /// Let the documents packed in a sample attend to each other and run on positions
    /// across them. Default: as each checkpoint's run trained (false when it does not say).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub cross_document_attention: Option<bool>,
    #[command(flatten)]
    pub runtime: super::RuntimeArgs,
}

pub fn validate(a: ValidateArgs) -> Result<()> {
    let watch = a.watch.map(std::time::Duration::from_secs);
    // Before the data loads: a bad flag is refused at once.
    crate::train::validate::check_watch(watch)?;
    let strategy = a.runtime.strategy()?;
    let data = crate::train::load_train_data(&a.data_dir)?;
    let opts = crate::train::validate::ValidateOptions {
        run: a.out_dir,
        max_batches: a.max,
        batch_size: a.batch_size,
        csv: a.csv,
        watch,
        cross_document_attention: a.cross_document_attention,
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
                toml::Value::Array(a) => {
                    let items: Vec<&str> = a.iter().filter_map(|v| v.as_str()).collect();
                    items.join(",") == shown
                }
                other => other.to_string() == shown,
            };
            assert!(same, "--{key}: help says {shown}, default is {actual}");
            checked += 1;
        }
        assert!(checked >= 20, "{checked}");
    }
}
