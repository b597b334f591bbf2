//! Hyper-parameters of a training run.
//!
//! Resolved once from three layers: built-in defaults, a recipe file
//! (`lit_recipes/*.toml`, any subset of the fields), and command-line flags (which win).
//! The resolved values are written to `RUN/hyperparameters.toml` and into every
//! checkpoint.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::schedule::{Schedule, ScheduleKind};
use crate::error::{Error, IoContext, Result};
use crate::lora::{LoraConfig, LoraTargets};
use crate::strategy::{DeviceSpec, Precision};

/// Unit of the log/eval/save intervals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum IntervalUnit {
    /// Optimizer steps.
    Step,
    /// Seconds of wall time (for clusters with wall-time limits).
    Time,
}

/// Everything that defines a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    // --- where ---
    /// Prepared data (`lit-claire prepare-data`).
    pub data_dir: PathBuf,
    /// The base model: a Hugging Face folder.
    pub checkpoint_dir: PathBuf,
    /// The run's folder.
    pub out_dir: PathBuf,

    // --- how much ---
    /// Samples per forward/backward pass, per device.
    pub micro_batch_size: usize,
    /// Samples per optimizer step, per device (a multiple of the micro batch).
    pub batch_size: usize,
    pub max_steps: Option<usize>,
    pub num_epochs: Option<usize>,
    pub max_tokens: Option<u64>,

    // --- optimizer and schedule ---
    pub learning_rate: f64,
    pub min_lr: f64,
    pub warmup_steps: usize,
    pub lr_schedule: ScheduleKind,
    /// Cycles of `cosine-restarts`.
    pub restarts: usize,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global gradient-norm clipping (0: none).
    pub grad_clip: f64,

    // --- strategy ---
    pub device: String,
    pub precision: String,
    /// Devices per node.
    pub devices: usize,
    pub num_nodes: usize,
    pub seed: u64,

    // --- LoRA (lora_r > 0 enables it) ---
    pub lora_r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub lora_query: bool,
    pub lora_key: bool,
    pub lora_value: bool,
    pub lora_projection: bool,
    pub lora_mlp: bool,
    pub lora_head: bool,

    // --- intervals, checkpoints, validation ---
    pub interval_unit: IntervalUnit,
    pub log_interval: u64,
    pub eval_interval: u64,
    pub save_interval: u64,
    /// Keep the newest N step checkpoints (and the best one).
    pub max_checkpoints: Option<usize>,
    /// Stop after N evaluations without improvement.
    pub early_stopping: Option<usize>,
    /// Validation micro-batches per dataset (None: the whole split).
    pub eval_max_batches: Option<usize>,
    /// `auto` (newest checkpoint of out_dir) or a checkpoint folder.
    pub resume: Option<String>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            data_dir: PathBuf::new(),
            checkpoint_dir: PathBuf::new(),
            out_dir: PathBuf::new(),
            micro_batch_size: 4,
            batch_size: 16,
            max_steps: None,
            num_epochs: None,
            max_tokens: None,
            learning_rate: 3e-4,
            min_lr: 3e-5,
            warmup_steps: 100,
            lr_schedule: ScheduleKind::Cosine,
            restarts: 1,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            device: "cpu".into(),
            precision: "32-true".into(),
            devices: 1,
            num_nodes: 1,
            seed: 42,
            lora_r: 0,
            lora_alpha: 16.0,
            lora_dropout: 0.05,
            lora_query: true,
            lora_key: false,
            lora_value: true,
            lora_projection: false,
            lora_mlp: false,
            lora_head: false,
            interval_unit: IntervalUnit::Step,
            log_interval: 1,
            eval_interval: 100,
            save_interval: 100,
            max_checkpoints: None,
            early_stopping: None,
            eval_max_batches: None,
            resume: None,
        }
    }
}

impl TrainConfig {
    /// Defaults, overlaid with the recipe at `recipe` (if any), overlaid with `flags`
    /// (a table holding only the flags given on the command line).
    pub fn resolve(recipe: Option<&Path>, flags: toml::Table) -> Result<Self> {
        let recipe = match recipe {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => Error::missing(
                        path,
                        "--recipe must be a TOML file such as lit_recipes/tiny-lora.toml",
                    ),
                    _ => Error::io(path, e),
                })?;
                let table: toml::Table = toml::from_str(&text)
                    .map_err(|e| Error::bad_file(path, one_line(&e.to_string())))?;
                Some(table)
            }
        };
        Self::resolve_tables(recipe, flags)
    }

    /// [`TrainConfig::resolve`] with the recipe already parsed.
    pub fn resolve_tables(recipe: Option<toml::Table>, flags: toml::Table) -> Result<Self> {
        let mut table = toml::Table::try_from(TrainConfig::default()).expect("defaults serialise");
        // Relative paths in a recipe are relative to the working directory, as flags are.
        table.extend(recipe.unwrap_or_default());
        table.extend(flags);
        let cfg: TrainConfig = table.try_into().map_err(|e: toml::de::Error| {
            Error::Usage(format!("bad training option: {}", one_line(&e.to_string())))
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Every problem with the values, in one message.
    pub fn validate(&self) -> Result<()> {
        let mut problems = Vec::new();
        for (flag, p) in [
            ("--data-dir", &self.data_dir),
            ("--checkpoint-dir", &self.checkpoint_dir),
            ("--out-dir", &self.out_dir),
        ] {
            if p.as_os_str().is_empty() {
                problems.push(format!("{flag} is required"));
            }
        }
        if self.micro_batch_size == 0 || self.batch_size == 0 {
            problems.push("--batch-size and --micro-batch-size must be positive".into());
        } else if self.batch_size % self.micro_batch_size != 0 {
            problems.push(format!(
                "--batch-size {} is not a multiple of --micro-batch-size {}",
                self.batch_size, self.micro_batch_size
            ));
        }
        if self.max_steps == Some(0) || self.num_epochs == Some(0) || self.max_tokens == Some(0) {
            problems.push(
                "--max-steps, --num-epochs and --max-tokens must be positive when given".into(),
            );
        }
        // The fused update runs in f32: a beta that rounds to 1 there never updates
        // its moment (0.99999999999 trained to a loss of 250).
        let beta_ok = |b: f64| b >= 0.0 && (b as f32) < 1.0;
        if !(beta_ok(self.beta1) && beta_ok(self.beta2)) {
            problems.push(format!(
                "--beta1 ({}) and --beta2 ({}) must be in [0, 1), at most 0.9999999 (f32 rounds closer values to 1)",
                self.beta1, self.beta2
            ));
        }
        let eps_ok = self.eps.is_finite() && self.eps > 0.0;
        let not_negative = |x: f64| x.is_finite() && x >= 0.0;
        if !(eps_ok && not_negative(self.weight_decay) && not_negative(self.grad_clip)) {
            problems.push(format!(
                "--eps ({}) must be positive, --weight-decay ({}) and --grad-clip ({}) finite and not negative",
                self.eps, self.weight_decay, self.grad_clip
            ));
        }
        problems.extend(Schedule::problems(
            self.lr_schedule,
            self.learning_rate,
            self.min_lr,
            self.restarts,
        ));
        if let Err(e) = self.device.parse::<DeviceSpec>() {
            problems.push(e.to_string());
        }
        if let Err(e) = self.precision.parse::<Precision>() {
            problems.push(e.to_string());
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            problems.push(format!(
                "--lora-dropout {} must be in [0, 1)",
                self.lora_dropout
            ));
        }
        if self.lora_r > 0 && !(self.lora_alpha.is_finite() && self.lora_alpha > 0.0) {
            problems.push(format!(
                "--lora-alpha {} must be positive: the adapter's update is scaled by alpha / r, so 0 would train nothing",
                self.lora_alpha
            ));
        }
        if self.lora_r > 0 && !self.lora_targets().any() {
            problems.push("LoRA needs a target: --lora-query, --lora-key, --lora-value, --lora-projection, --lora-mlp or --lora-head".into());
        }
        if self.devices == 0 || self.num_nodes == 0 {
            problems.push("--devices and --num-nodes must be positive".into());
        }
        if self.log_interval == 0 || self.eval_interval == 0 || self.save_interval == 0 {
            problems.push(
                "--log-interval, --eval-interval and --save-interval must be positive".into(),
            );
        }
        if self.max_checkpoints == Some(0) {
            problems.push("--max-checkpoints must be at least 1".into());
        }
        if self.early_stopping == Some(0) {
            problems.push(
                "--early-stopping must be at least 1 (evaluations without improvement before stopping)"
                    .into(),
            );
        }
        if self.eval_max_batches == Some(0) {
            problems
                .push("--eval-max-batches must be at least 1 (omit it for the whole split)".into());
        }
        if let Some(r) = &self.resume {
            if r != "auto" && !Path::new(r).is_dir() {
                problems.push(format!(
                    "--resume {r}: expected `auto` or a checkpoint folder"
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::Usage(problems.join("; ")))
        }
    }

    pub fn lora_targets(&self) -> LoraTargets {
        LoraTargets {
            query: self.lora_query,
            key: self.lora_key,
            value: self.lora_value,
            projection: self.lora_projection,
            mlp: self.lora_mlp,
            head: self.lora_head,
        }
    }

    /// The LoRA settings, when LoRA is on.
    pub fn lora(&self) -> Option<LoraConfig> {
        (self.lora_r > 0).then(|| LoraConfig {
            r: self.lora_r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout as f32,
            targets: self.lora_targets(),
            rslora: false,
        })
    }

    /// Micro-batches per optimizer step.
    pub fn accumulation(&self) -> usize {
        self.batch_size / self.micro_batch_size
    }

    /// As TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("hyper-parameters serialise")
    }

    /// Write `hyperparameters.toml` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).at(dir)?;
        crate::io::write_atomic(&dir.join("hyperparameters.toml"), self.to_toml().as_bytes())
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(pairs: &[(&str, toml::Value)]) -> toml::Table {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    fn base() -> Vec<(&'static str, toml::Value)> {
        vec![
            ("data_dir", "d".into()),
            ("checkpoint_dir", "c".into()),
            ("out_dir", "o".into()),
        ]
    }

    #[test]
    fn flags_override_recipe_override_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let recipe = dir.path().join("r.toml");
        std::fs::write(
            &recipe,
            "learning_rate = 1e-3\nbatch_size = 8\nlora_r = 4\n",
        )
        .unwrap();
        let mut f = base();
        f.push(("batch_size", 32.into()));
        let c = TrainConfig::resolve(Some(&recipe), flags(&f)).unwrap();
        assert_eq!((c.learning_rate, c.batch_size, c.lora_r), (1e-3, 32, 4));
        assert_eq!(c.micro_batch_size, 4);
    }

    #[test]
    fn all_problems_in_one_message() {
        let mut f = base();
        f.push(("batch_size", 10.into()));
        f.push(("micro_batch_size", 4.into()));
        f.push(("lora_dropout", 1.5.into()));
        let e = TrainConfig::resolve(None, flags(&f))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not a multiple") && e.contains("--lora-dropout"),
            "{e}"
        );
    }

    #[test]
    fn unknown_recipe_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let recipe = dir.path().join("r.toml");
        std::fs::write(&recipe, "learnin_rate = 1e-3\n").unwrap();
        let e = TrainConfig::resolve(Some(&recipe), flags(&base()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("learnin_rate"), "{e}");
    }
}
