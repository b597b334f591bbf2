//! Hyper-parameters of a training run.
//!
//! Resolved once from three layers: built-in defaults, a recipe file
//! (`lit_recipes/*.toml`, any subset of the fields), and command-line flags (which win).
//! The resolved values are written to `RUN/hyperparameters.toml` and into every
//! checkpoint.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::loggers::Logger;
use super::preempt::StopFlag;
use super::schedule::{Schedule, ScheduleKind};
use crate::error::{Error, IoContext, Result};
use crate::lora::{LoraConfig, LoraTargets, TrainEmbeddings};
use crate::strategy::{DeviceSpec, Precision, StrategyKind};

/// Unit of the log/eval/save intervals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum IntervalUnit {
    /// Optimizer steps.
    Step,
    /// Seconds of wall time (for clusters with wall-time limits).
    Time,
}

/// Declares every training option once. Each entry becomes a field of [`TrainConfig`]
/// (with its default; an entry without `= default` is an `Option`, `None` by default)
/// and an optional flag of [`TrainFlags`] named after it (`--learning-rate`), which
/// overrides the recipe when given. A doc line's `[default: X]` is checked against the
/// default by a test in `cli::train_cmds`.
macro_rules! train_options {
    ($(
        $(#[doc = $doc:literal])*
        $(#[arg($($arg:tt)*)])?
        $name:ident : $ty:ty $(= $default:expr)?;
    )*) => {
        /// Everything that defines a run.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct TrainConfig {
            $( $(#[doc = $doc])* pub $name: train_options!(@field $ty $(, $default)?), )*
        }

        impl Default for TrainConfig {
            fn default() -> Self {
                TrainConfig { $( $name: train_options!(@default $($default)?), )* }
            }
        }

        /// The command-line flags of [`TrainConfig`]: each one given overrides the recipe
        /// and the defaults ([`TrainConfig::resolve`]).
        #[derive(Debug, Default, Clone, clap::Args, Serialize)]
        pub struct TrainFlags {
            $(
                $(#[doc = $doc])*
                #[arg(long $(, $($arg)*)?)]
                #[serde(skip_serializing_if = "Option::is_none")]
                pub $name: Option<$ty>,
            )*
        }
    };
    (@field $ty:ty) => { Option<$ty> };
    (@field $ty:ty, $default:expr) => { $ty };
    (@default) => { None };
    (@default $default:expr) => { $default };
}

train_options! {
    // --- where ---
    /// Prepared data (`lit-claire prepare-data`).
    data_dir: PathBuf = PathBuf::new();
    /// Base model: a Hugging Face folder.
    checkpoint_dir: PathBuf = PathBuf::new();
    /// Run folder (metrics, checkpoints).
    out_dir: PathBuf = PathBuf::new();

    // --- how much ---
    /// Samples per forward/backward pass per device [default: 4].
    micro_batch_size: usize = 4;
    /// Samples per optimizer step per device; accumulation = batch / micro batch [default: 16].
    batch_size: usize = 16;
    /// Optimizer steps (the smallest of --max-steps, --num-epochs and --max-tokens wins; default: one epoch).
    max_steps: usize;
    /// Passes over the (weighted) training data.
    num_epochs: usize;
    /// Stop after this many training tokens.
    max_tokens: u64;

    // --- optimizer and schedule ---
    /// Peak learning rate [default: 3e-4].
    learning_rate: f64 = 3e-4;
    /// Learning rate at the end of the decay [default: 3e-5].
    min_lr: f64 = 3e-5;
    /// Linear warmup steps [default: 100].
    warmup_steps: usize = 100;
    /// Decay after warmup [default: cosine].
    #[arg(value_enum)]
    lr_schedule: ScheduleKind = ScheduleKind::Cosine;
    /// Cycles of cosine-restarts [default: 1].
    restarts: usize = 1;
    /// Decoupled weight decay of AdamW [default: 0.1].
    weight_decay: f64 = 0.1;
    /// AdamW β₁ [default: 0.9].
    beta1: f64 = 0.9;
    /// AdamW β₂ [default: 0.95].
    beta2: f64 = 0.95;
    /// AdamW ε [default: 1e-8].
    eps: f64 = 1e-8;
    /// Global gradient-norm clipping, 0 for none [default: 1].
    grad_clip: f64 = 1.0;

    // --- strategy ---
    /// cpu, cuda or cuda:N [default: cpu].
    device: DeviceSpec = DeviceSpec::Cpu;
    /// 32-true, bf16-true, bf16-mixed or 16-mixed [default: 32-true].
    precision: Precision = Precision::True32;
    /// Devices per node [default: 1].
    devices: usize = 1;
    /// Nodes [default: 1].
    num_nodes: usize = 1;
    /// With several devices: ddp (every rank keeps the whole model and optimizer state), zero1 (each rank keeps its shard of the optimizer state) or fsdp (each rank keeps its shard of the parameters, gradients and optimizer state; for models larger than one device; on one device it runs the same sharded code, each shard whole) [default: ddp].
    #[arg(value_enum)]
    strategy: StrategyKind = StrategyKind::Ddp;
    /// Seconds a rank waits for the others (at a gradient sync, a checkpoint, a validation) before the run stops with an error naming them [default: 1800].
    collective_timeout: u64 = 1800;
    /// Seed of data order, LoRA initialisation and dropout [default: 42].
    seed: u64 = 42;

    /// Activation checkpointing: keep only the input of every k-th block through the
    /// forward and recompute its activations during the backward (gradients are
    /// unchanged; peak memory falls, time rises); 1 checkpoints every block, 0 none
    /// [default: 0].
    activation_checkpointing: usize = 0;

    // --- LoRA (lora_r > 0 enables it) ---
    /// LoRA rank; > 0 trains a LoRA adapter instead of all weights [default: 0].
    lora_r: usize = 0;
    /// LoRA scaling numerator: the update is alpha/r · B·A [default: 16].
    lora_alpha: f64 = 16.0;
    /// Dropout on the LoRA input [default: 0.05].
    lora_dropout: f64 = 0.05;
    /// LoRA on the query projection [default: true].
    #[arg(num_args = 0..=1, default_missing_value = "true")]
    lora_query: bool = true;
    /// LoRA on the key projection [default: false].
    #[arg(num_args = 0..=1, default_missing_value = "true")]
    lora_key: bool = false;
    /// LoRA on the value projection [default: true].
    #[arg(num_args = 0..=1, default_missing_value = "true")]
    lora_value: bool = true;
    /// LoRA on the attention output projection [default: false].
    #[arg(num_args = 0..=1, default_missing_value = "true")]
    lora_projection: bool = false;
    /// LoRA on the MLP layers [default: false].
    #[arg(num_args = 0..=1, default_missing_value = "true")]
    lora_mlp: bool = false;
    /// LoRA on the output head [default: false].
    #[arg(num_args = 0..=1, default_missing_value = "true")]
    lora_head: bool = false;
    /// With LoRA, what trains of the embeddings and head: `new` (only the rows of the
    /// tokens adapt-vocab added, as PEFT's trainable tokens), `all` (both matrices, as
    /// PEFT's modules_to_save) or `none`. Default: new on a folder made by adapt-vocab,
    /// none otherwise (a resumed run keeps its checkpoint's).
    #[arg(value_enum)]
    train_embeddings: TrainEmbeddings;

    // --- intervals, checkpoints, validation ---
    /// Unit of the intervals: optimizer steps or seconds [default: step].
    #[arg(value_enum)]
    interval_unit: IntervalUnit = IntervalUnit::Step;
    /// Write a metrics row every N steps (or seconds) [default: 1].
    log_interval: u64 = 1;
    /// Validate every N steps (or seconds) [default: 100].
    eval_interval: u64 = 100;
    /// Checkpoint every N steps (or seconds) [default: 100].
    save_interval: u64 = 100;
    /// Write checkpoints from a thread while training goes on: a save stops training
    /// only while the weights and optimizer state are copied to host memory (which
    /// needs room for that copy); false writes them before the next step [default: true].
    #[arg(num_args = 0..=1, default_missing_value = "true")]
    background_save: bool = true;
    /// Keep the newest N step checkpoints (and the best one).
    max_checkpoints: usize;
    /// Stop after N evaluations without improvement.
    early_stopping: usize;
    /// Validation micro-batches per dataset (default: the whole split).
    eval_max_batches: usize;
    /// Downstream tasks scored at each validation (a task file or folder, as `evaluate
    /// --tasks` reads them): their metrics go to metrics.csv and TensorBoard.
    eval_tasks: PathBuf;
    /// `auto` (the run's newest checkpoint) or a checkpoint folder.
    resume: String;
    /// Let the documents packed in one sample (`prepare-data --padding false`) attend to
    /// each other and run on positions across them. Default: false
    /// (each document sees only itself and starts at position 0); a resumed run keeps
    /// its checkpoint's setting.
    #[arg(num_args = 0..=1, default_missing_value = "true")]
    cross_document_attention: bool;
    /// Where metrics go: `csv` (RUN/metrics.csv, always on) and `tensorboard` (event
    /// files in RUN/) [default: csv].
    #[arg(value_enum, value_delimiter = ',')]
    logger: Vec<Logger> = vec![Logger::Csv];
}

impl TrainConfig {
    /// Defaults, overlaid with the recipe at `recipe` (if any), overlaid with `flags`
    /// (a table holding only the flags given on the command line), checked.
    pub fn resolve(recipe: Option<&Path>, flags: toml::Table) -> Result<CheckedConfig> {
        Self::resolve_unchecked(recipe, flags)?.checked()
    }

    /// [`TrainConfig::resolve`] without the check, for callers that need only some of
    /// the options (`pretrain --dry-run` reads no data and writes no run), or that
    /// check later ([`TrainConfig::checked`]).
    pub fn resolve_unchecked(recipe: Option<&Path>, flags: toml::Table) -> Result<Self> {
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
        Self::merge_tables(recipe, flags)
    }

    /// [`TrainConfig::resolve`] with the recipe already parsed.
    pub fn resolve_tables(
        recipe: Option<toml::Table>,
        flags: toml::Table,
    ) -> Result<CheckedConfig> {
        Self::merge_tables(recipe, flags)?.checked()
    }

    /// Defaults ← recipe ← flags, unchecked.
    fn merge_tables(recipe: Option<toml::Table>, flags: toml::Table) -> Result<Self> {
        let mut table = toml::Table::try_from(TrainConfig::default()).expect("defaults serialise");
        // Relative paths in a recipe are relative to the working directory, as flags are.
        table.extend(recipe.unwrap_or_default());
        table.extend(flags);
        table.try_into().map_err(|e: toml::de::Error| {
            Error::Usage(format!("bad training option: {}", one_line(&e.to_string())))
        })
    }

    /// Whether packed documents attend to each other (`--cross-document-attention`;
    /// false unless set).
    pub fn cross_document(&self) -> bool {
        self.cross_document_attention.unwrap_or(false)
    }

    /// This config, once its values pass every check, as a [`CheckedConfig`]; else
    /// every problem with them, in one message.
    pub fn checked(self) -> Result<CheckedConfig> {
        self.check_needing(&["--data-dir", "--checkpoint-dir", "--out-dir"])?;
        Ok(CheckedConfig(self, StopFlag::signals()))
    }

    /// Every problem with the values, in one message, requiring only the folders whose
    /// flags `required` names (`pretrain --dry-run` needs only `--checkpoint-dir`;
    /// a run needs all three, see [`TrainConfig::checked`]).
    pub fn check_needing(&self, required: &[&str]) -> Result<()> {
        let mut problems = Vec::new();
        for (flag, p) in [
            ("--data-dir", &self.data_dir),
            ("--checkpoint-dir", &self.checkpoint_dir),
            ("--out-dir", &self.out_dir),
        ] {
            if p.as_os_str().is_empty() && required.contains(&flag) {
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
        problems.extend(crate::strategy::rank_count_problems(
            self.device,
            self.devices,
            self.num_nodes,
        ));
        if self.collective_timeout == 0 {
            problems.push("--collective-timeout must be positive (seconds)".into());
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
        if !self.logger.contains(&Logger::Csv) {
            problems.push(
                "--logger must include csv (metrics.csv is always written: plot and resume read it), e.g. --logger csv,tensorboard".into(),
            );
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

    /// Ranks of the run: devices × nodes.
    pub fn world_size(&self) -> usize {
        self.devices * self.num_nodes
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

/// A [`TrainConfig`] whose values passed its checks: what a run is made of. Only
/// [`TrainConfig::checked`] makes one (the resolvers call it), so a config reaches
/// the trainer checked, and checked once. It reads as the [`TrainConfig`] it holds.
/// It also carries what stops the run early with a checkpoint (SIGUSR1 and SIGTERM
/// unless [`CheckedConfig::with_stop`] says otherwise; see [`super::preempt`]).
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedConfig(TrainConfig, StopFlag);

impl std::ops::Deref for CheckedConfig {
    type Target = TrainConfig;

    fn deref(&self) -> &TrainConfig {
        &self.0
    }
}

impl CheckedConfig {
    /// The config it holds.
    pub fn config(&self) -> &TrainConfig {
        &self.0
    }

    /// This config with `--cross-document-attention` settled to `on` (a resumed run
    /// keeps its checkpoint's); either value passes the checks.
    pub fn with_cross_document_attention(mut self, on: bool) -> Self {
        self.0.cross_document_attention = Some(on);
        self
    }

    /// This config stopping (after a step, with a checkpoint) when `stop` is raised,
    /// instead of on the signals.
    pub fn with_stop(mut self, stop: StopFlag) -> Self {
        self.1 = stop;
        self
    }

    /// What stops the run early, with a checkpoint.
    pub fn stop(&self) -> StopFlag {
        self.1
    }

    /// This config with `--train-embeddings` settled to `mode` (the default or a
    /// resumed run's, as the run trains; None without LoRA).
    pub fn with_train_embeddings(mut self, mode: Option<TrainEmbeddings>) -> Self {
        self.0.train_embeddings = mode;
        self
    }
}

/// What the training entry points take: a [`TrainConfig`], checked on the way in,
/// or a [`CheckedConfig`], taken as it is. Either way a run's options are checked
/// once, by the outermost entry point that sees them.
pub trait ToChecked {
    /// The config, checked.
    fn to_checked(&self) -> Result<Cow<'_, CheckedConfig>>;
}

impl ToChecked for TrainConfig {
    fn to_checked(&self) -> Result<Cow<'_, CheckedConfig>> {
        Ok(Cow::Owned(self.clone().checked()?))
    }
}

impl ToChecked for CheckedConfig {
    fn to_checked(&self) -> Result<Cow<'_, CheckedConfig>> {
        Ok(Cow::Borrowed(self))
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

    /// A plain config is checked on its way into a run; a checked one is taken as it
    /// is, not checked again.
    #[test]
    fn a_config_is_checked_once() {
        let mut bad = TrainConfig::resolve_unchecked(None, flags(&base())).unwrap();
        bad.batch_size = 10;
        let e = bad.to_checked().unwrap_err().to_string();
        assert!(e.contains("not a multiple"), "{e}");
        let checked = TrainConfig::resolve(None, flags(&base())).unwrap();
        assert!(matches!(checked.to_checked().unwrap(), Cow::Borrowed(_)));
        let plain = checked.config().clone();
        assert_eq!(*plain.to_checked().unwrap(), checked);
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
