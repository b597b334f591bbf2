//! The training loop: full fine-tuning or LoRA, with periodic logging, validation,
//! checkpoints, early stopping and exact resume.
//!
//! Everything device-, precision- or rank-related goes through the [`Strategy`];
//! everything that makes a step goes through the [`StepRunner`].

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::batches::{Batch, DataPosition, TrainData};
use super::checkpoint::{self, TrainingState};
use super::config::{IntervalUnit, TrainConfig};
use super::evaluate::evaluate;
use super::metrics::{METRICS_FILE, MetricsRow, MetricsWriter};
use super::optim::{AdamW, AdamWConfig};
use super::schedule::Schedule;
use super::step::{LossScaler, StepRunner};
use crate::checkpoint::weights::Weights;
use crate::config::load_config;
use crate::error::{Error, IoContext, Result};
use crate::lora::LoraConfig;
use crate::model::{Dropout, build_model};
use crate::strategy::{DeviceSpec, Precision, Strategy};
use crate::tokenizer::Tokenizer;

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSummary {
    pub steps: usize,
    pub tokens: u64,
    pub final_loss: Option<f64>,
    pub val_loss: Option<f64>,
    pub stopped_early: bool,
    /// The `final/` checkpoint, when the run finished.
    pub final_checkpoint: Option<PathBuf>,
}

/// A run in progress.
pub struct Trainer {
    cfg: TrainConfig,
    data: TrainData,
    runner: StepRunner,
    lora: Option<LoraConfig>,
    schedule: Schedule,
    state: TrainingState,
    metrics: Option<MetricsWriter>,
    log: Option<std::fs::File>,
    /// Order of the current epoch (for this rank).
    order: Vec<(u32, u32)>,
    order_epoch: Option<usize>,
}

/// Train as `cfg` says on `data`, to the end.
pub fn pretrain_with_data(cfg: &TrainConfig, data: TrainData) -> Result<TrainSummary> {
    Trainer::new(cfg, data)?.run(None)
}

fn strategy_for(cfg: &TrainConfig) -> Result<Strategy> {
    let spec: DeviceSpec = cfg.device.parse()?;
    let precision: Precision = cfg.precision.parse()?;
    if cfg.devices * cfg.num_nodes > 1 {
        return Err(Error::Usage(format!(
            "--devices {} --num-nodes {}: data parallel training is not available in this build; train on one device",
            cfg.devices, cfg.num_nodes
        )));
    }
    Strategy::new(spec, precision)
}

/// Whether `dir` already holds a run.
fn holds_run(dir: &Path) -> bool {
    dir.join("hyperparameters.toml").exists()
        || dir.join(METRICS_FILE).exists()
        || checkpoint::list(dir)
            .map(|l| !l.is_empty())
            .unwrap_or(false)
}

impl Trainer {
    /// Check everything, then set up model, optimizer and data (from scratch or from
    /// the checkpoint `cfg.resume` names). Every user error surfaces here, before any
    /// training work.
    pub fn new(cfg: &TrainConfig, data: TrainData) -> Result<Self> {
        cfg.validate()?;
        let strategy = strategy_for(cfg)?;
        let out = &cfg.out_dir;

        // Where to resume from, and refusing to mix runs.
        let mut warnings = Vec::new();
        let (resume_from, resumed) = match cfg.resume.as_deref() {
            None => {
                if holds_run(out) {
                    return Err(Error::Usage(format!(
                        "{} holds another run; continue it with --resume auto or choose another --out-dir",
                        out.display()
                    )));
                }
                (None, None)
            }
            Some("auto") => {
                let (found, notes) = checkpoint::newest_complete(out)?;
                warnings.extend(notes);
                found.map_or((None, None), |(p, s)| (Some(p), Some(s)))
            }
            Some(p) => {
                let dir = PathBuf::from(p);
                let state = checkpoint::check(&dir)?;
                (Some(dir), Some(state))
            }
        };

        if let (Some(dir), Some(state)) = (&resume_from, &resumed) {
            check_resume(cfg, dir, state)?;
        }

        // metrics.csv must still hold the rows logged before the checkpoint.
        if let (Some(s), true) = (&resumed, strategy.is_global_zero()) {
            if let Some(expected) = s.metrics_rows {
                warnings.extend(super::metrics::check_rows(out, s.step, expected)?);
            }
        }

        // The base model and its tokenizer must match the data.
        let model_cfg = load_config(&cfg.checkpoint_dir)?;
        let tokenizer = Tokenizer::from_dir(&cfg.checkpoint_dir)?;
        data.check_tokenizer(&tokenizer)?;
        data.check_context(model_cfg.block_size)?;
        data.check_weights()?;
        let world = strategy.world_size;
        let epoch_len = data.epoch_len(world);
        if epoch_len < cfg.batch_size {
            let sizes: Vec<String> = data
                .datasets
                .iter()
                .map(|d| {
                    format!(
                        "{} ({} samples, weight {})",
                        d.name,
                        d.train.len(),
                        d.weight
                    )
                })
                .collect();
            return Err(Error::Data(format!(
                "the training data gives {epoch_len} samples per device per epoch, fewer than one batch of {}: {}; lower --batch-size or add data",
                cfg.batch_size,
                sizes.join(", ")
            )));
        }

        // Model: the base, frozen for LoRA; or the checkpoint's own weights.
        let lora = cfg.lora();
        let full_source = match (&resume_from, &lora) {
            (Some(dir), None) => dir.clone(),
            _ => cfg.checkpoint_dir.clone(),
        };
        let weights = Weights::open(&full_source)?;
        let tm = build_model(
            &model_cfg,
            &weights,
            &strategy.build_options(lora.is_none()),
        )?;
        let mut model = tm.model;
        let vars = match &lora {
            None => tm.vars,
            Some(l) => {
                let vars = crate::lora::attach_new(&mut model, l, cfg.seed)?;
                if let Some(dir) = &resume_from {
                    restore_adapter(dir, &vars, &strategy)?;
                }
                vars
            }
        };
        let adam = AdamWConfig {
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
        };
        let mut opt = AdamW::new(vars, adam)?;

        let steps_per_epoch = epoch_len / cfg.batch_size;
        let tokens_per_step = (cfg.batch_size * world * (data.block_size - 1)) as u64;
        let total_steps = [
            cfg.max_steps,
            cfg.num_epochs.map(|e| e * steps_per_epoch),
            cfg.max_tokens.map(|t| t.div_ceil(tokens_per_step) as usize),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(steps_per_epoch);
        let schedule = Schedule::new(
            cfg.lr_schedule,
            cfg.learning_rate,
            cfg.min_lr,
            cfg.warmup_steps,
            total_steps,
            cfg.restarts,
        )?;

        let needs_dropout = lora.as_ref().is_some_and(|l| l.dropout > 0.0);
        let state = match resumed {
            Some(s) => {
                let moments = checkpoint::load_optimizer(
                    resume_from.as_ref().expect("resumed from a folder"),
                    &strategy.device,
                )?;
                opt.load_state(&moments, s.step as u64)?;
                s
            }
            None => TrainingState {
                step: 0,
                position: DataPosition::default(),
                tokens: 0,
                elapsed_s: 0.0,
                train_loss: None,
                val_loss: None,
                best_val_loss: None,
                evals_without_improvement: 0,
                metrics_rows: Some(0),
                loss_scaler: strategy.precision.uses_loss_scaling().then(LossScaler::new),
                dropout_rng: needs_dropout.then(|| {
                    ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_add(strategy.rank as u64))
                }),
                kind: if lora.is_some() { "lora" } else { "full" }.into(),
                base_checkpoint_dir: cfg.checkpoint_dir.clone(),
                hyperparameters: cfg.clone(),
                lit_claire_version: env!("CARGO_PKG_VERSION").into(),
            },
        };
        let dropout = state.dropout_rng.clone().map(Dropout::new);
        let runner = StepRunner {
            model,
            opt,
            grad_clip: (cfg.grad_clip > 0.0).then_some(cfg.grad_clip),
            scaler: state.loss_scaler,
            dropout,
            strategy,
        };

        let (metrics, log) = if runner.strategy.is_global_zero() {
            std::fs::create_dir_all(out).at(out)?;
            checkpoint::clean_partial(out)?;
            cfg.save(out)?;
            let names: Vec<String> = data.datasets.iter().map(|d| d.name.clone()).collect();
            let resume_step = resume_from.as_ref().map(|_| state.step);
            let metrics = MetricsWriter::open(out, &names, resume_step)?;
            let log_path = out.join("train.log");
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .at(&log_path)?;
            (Some(metrics), Some(log))
        } else {
            (None, None)
        };

        let mut t = Trainer {
            cfg: cfg.clone(),
            data,
            runner,
            lora,
            schedule,
            state,
            metrics,
            log,
            order: Vec::new(),
            order_epoch: None,
        };
        let n_params: usize = t
            .runner
            .opt
            .vars()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum();
        t.note(&format!(
            "{} {} from {} on {} ({}), {} trainable parameters, {} steps of {} samples{}",
            if resume_from.is_some() {
                "resuming"
            } else {
                "starting"
            },
            if t.lora.is_some() {
                "LoRA"
            } else {
                "full fine-tuning"
            },
            cfg.checkpoint_dir.display(),
            t.runner.strategy.spec,
            t.runner.strategy.precision,
            n_params,
            total_steps,
            cfg.batch_size,
            match &resume_from {
                Some(p) => format!(", from {} (step {})", p.display(), t.state.step),
                None => String::new(),
            }
        ))?;
        for w in warnings {
            t.note(&w)?;
        }
        Ok(t)
    }

    /// A line for the log file (and stderr).
    fn note(&mut self, line: &str) -> Result<()> {
        if let Some(f) = self.log.as_mut() {
            writeln!(f, "{line}").at(self.cfg.out_dir.join("train.log"))?;
            eprintln!("{line}");
        }
        Ok(())
    }

    /// The next `batch_size` samples of this rank, moving to the next epoch when the
    /// current one has less than a batch left.
    fn next_samples(&mut self) -> Result<Vec<Vec<u32>>> {
        let world = self.runner.strategy.world_size;
        let rank = self.runner.strategy.rank;
        let bs = self.cfg.batch_size;
        if self.state.position.offset + bs > self.data.epoch_len(world) {
            self.state.position = DataPosition {
                epoch: self.state.position.epoch + 1,
                offset: 0,
            };
        }
        if self.order_epoch != Some(self.state.position.epoch) {
            self.order =
                self.data
                    .epoch_order(self.cfg.seed, self.state.position.epoch, rank, world);
            self.order_epoch = Some(self.state.position.epoch);
        }
        let start = self.state.position.offset;
        let picks = self.order[start..start + bs].to_vec();
        self.state.position.offset += bs;
        picks
            .into_iter()
            .map(|(d, i)| self.data.datasets[d as usize].train.sample(i as usize))
            .collect()
    }

    /// Validation loss per dataset and overall (token-weighted).
    fn validate(&mut self) -> Result<(Option<f64>, Vec<Option<f64>>)> {
        let mut per = Vec::new();
        let (mut sum, mut tokens) = (0f64, 0usize);
        for ds in &self.data.datasets {
            let r = evaluate(
                &self.runner.model,
                ds.validation.as_ref(),
                self.data.block_size,
                self.cfg.micro_batch_size,
                self.cfg.eval_max_batches,
                &self.runner.strategy.device,
            )?;
            if let Some(r) = r {
                sum += r.loss * r.tokens as f64;
                tokens += r.tokens;
            }
            per.push(r.map(|r| r.loss));
        }
        let overall = (tokens > 0).then(|| sum / tokens as f64);
        Ok((
            overall
                .map(|v| self.runner.strategy.all_reduce_mean(v))
                .transpose()?,
            per,
        ))
    }

    fn save(&mut self, name: &str) -> Result<PathBuf> {
        // Never a checkpoint of broken weights (the last update can overflow them).
        for (var_name, var) in self.runner.opt.vars() {
            if !super::optim::all_finite(var.as_tensor())? {
                return Err(Error::Msg(format!(
                    "step {}: {var_name} holds NaN or infinite values after the update; {name} was not saved. Lower --learning-rate (or set --grad-clip), then --resume auto continues from the last checkpoint",
                    self.state.step
                )));
            }
        }
        self.state.loss_scaler = self.runner.scaler;
        self.state.dropout_rng = self.runner.dropout.as_ref().map(|d| d.rng());
        let dir = checkpoint::save(
            &self.cfg.out_dir,
            name,
            &self.runner.model,
            self.lora.as_ref(),
            &self.runner.opt.state_tensors(),
            &self.state,
        )?;
        if let Some(keep) = self.cfg.max_checkpoints {
            for removed in checkpoint::rotate(&self.cfg.out_dir, keep)? {
                self.note(&format!("removed old checkpoint {}", removed.display()))?;
            }
        }
        self.note(&format!("saved {}", dir.display()))?;
        Ok(dir)
    }

    /// Train until the schedule ends (or early stopping, or `stop_after` steps, for
    /// tests of interrupted runs).
    pub fn run(&mut self, stop_after: Option<usize>) -> Result<TrainSummary> {
        let total = self.schedule.total_steps;
        let is_zero = self.runner.strategy.is_global_zero();
        let bar = if is_zero {
            ProgressBar::new(total as u64)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .expect("valid template"),
        );
        bar.set_position(self.state.step as u64);
        let started = Instant::now();
        let base_elapsed = self.state.elapsed_s;
        let (mut last_log, mut last_eval, mut last_save) = (0.0f64, 0.0f64, 0.0f64);
        let mut interval_tokens = 0u64;
        let mut interval_start = 0.0f64;
        let mut stopped_early = false;
        let micro = self.cfg.micro_batch_size;
        let device = self.runner.strategy.device.clone();
        let max_tokens = self.cfg.max_tokens;

        while self.state.step < total && max_tokens.is_none_or(|m| self.state.tokens < m) {
            if stop_after.is_some_and(|s| self.state.step >= s) {
                bar.abandon();
                return Ok(self.summary(false, None));
            }
            let samples = self.next_samples()?;
            let micro_batches = samples
                .chunks(micro)
                .map(|c| Batch::from_samples(c, self.data.block_size, &device))
                .collect::<Result<Vec<_>>>()?;
            let lr = self.schedule.lr(self.state.step);
            let stats = self
                .runner
                .step(&micro_batches, lr)
                .map_err(|e| Error::Msg(format!("step {}: {e}", self.state.step + 1)))?;
            self.state.step += 1;
            let step_tokens = stats.tokens as u64 * self.runner.strategy.world_size as u64;
            self.state.tokens += step_tokens;
            interval_tokens += step_tokens;
            self.state.train_loss = Some(stats.loss);
            let now = started.elapsed().as_secs_f64();
            self.state.elapsed_s = base_elapsed + now;
            if stats.skipped {
                self.note(&format!(
                    "step {}: gradient overflow, update skipped, loss scale now {}",
                    self.state.step,
                    self.runner.scaler.map_or(0.0, |s| s.scale)
                ))?;
            }

            let due = |interval: u64, last: f64| match self.cfg.interval_unit {
                IntervalUnit::Step => self.state.step % interval as usize == 0,
                IntervalUnit::Time => now - last >= interval as f64,
            };
            let last_step =
                self.state.step == total || max_tokens.is_some_and(|m| self.state.tokens >= m);
            let eval_due = due(self.cfg.eval_interval, last_eval) || last_step;
            let log_due = due(self.cfg.log_interval, last_log) || eval_due;
            let save_due = due(self.cfg.save_interval, last_save) && !last_step;

            let (val, per) = if eval_due {
                last_eval = now;
                self.validate()?
            } else {
                (None, Vec::new())
            };
            if let Some(v) = val {
                self.state.val_loss = Some(v);
                match self.state.best_val_loss {
                    Some(b) if v >= b => self.state.evals_without_improvement += 1,
                    _ => {
                        self.state.best_val_loss = Some(v);
                        self.state.evals_without_improvement = 0;
                    }
                }
            }
            let tps = interval_tokens as f64 / (now - interval_start).max(1e-9);
            bar.set_position(self.state.step as u64);
            bar.set_message(format!(
                "loss {:.4} | lr {:.2e} | {:.0} tok/s",
                stats.loss, lr, tps
            ));
            if log_due {
                last_log = now;
                let row = MetricsRow {
                    step: self.state.step,
                    epoch: self.state.position.epoch,
                    tokens: self.state.tokens,
                    loss: stats.loss,
                    learning_rate: lr,
                    grad_norm: stats.grad_norm,
                    tokens_per_s: tps,
                    elapsed_s: self.state.elapsed_s,
                    val_loss: val,
                    val_per_dataset: if val.is_some() {
                        per
                    } else {
                        vec![None; self.data.datasets.len()]
                    },
                };
                if let Some(m) = self.metrics.as_mut() {
                    m.write(&row)?;
                    self.state.metrics_rows = Some(self.state.metrics_rows.unwrap_or(0) + 1);
                }
                if bar.is_hidden() && is_zero {
                    eprintln!(
                        "step {}/{total} loss {:.4} lr {lr:.3e} grad_norm {:.3} {tps:.0} tok/s{}",
                        self.state.step,
                        stats.loss,
                        stats.grad_norm,
                        val.map(|v| format!(" val_loss {v:.4}")).unwrap_or_default()
                    );
                }
                interval_tokens = 0;
                interval_start = now;
            }
            if let Some(v) = val {
                self.note(&format!(
                    "step {}: validation loss {v:.4} (perplexity {:.2})",
                    self.state.step,
                    v.exp()
                ))?;
            }
            if let Some(n) = self.cfg.early_stopping {
                if self.state.evals_without_improvement >= n {
                    self.note(&format!(
                        "early stopping: {n} evaluations without improvement"
                    ))?;
                    stopped_early = true;
                    break;
                }
            }
            if save_due && is_zero {
                last_save = now;
                self.save(&checkpoint::step_dir_name(self.state.step))?;
            }
        }
        bar.finish();
        let final_dir = if is_zero {
            Some(self.save("final")?)
        } else {
            None
        };
        let s = self.summary(stopped_early, final_dir);
        self.note(&format!(
            "done: {} steps, {} tokens, train loss {}, validation loss {}",
            s.steps,
            s.tokens,
            s.final_loss.map_or("-".into(), |l| format!("{l:.4}")),
            s.val_loss.map_or("-".into(), |l| format!("{l:.4}"))
        ))?;
        Ok(s)
    }

    /// The model being trained.
    pub fn model(&self) -> &crate::model::Gpt {
        &self.runner.model
    }

    /// Where the run stands.
    pub fn state(&self) -> &TrainingState {
        &self.state
    }

    fn summary(&self, stopped_early: bool, final_checkpoint: Option<PathBuf>) -> TrainSummary {
        TrainSummary {
            steps: self.state.step,
            tokens: self.state.tokens,
            final_loss: self.state.train_loss,
            val_loss: self.state.val_loss,
            stopped_early,
            final_checkpoint,
        }
    }
}

/// A checkpoint continues only a run of its own kind and model: full fine-tuning or
/// LoRA with the same rank, alpha and targets (another alpha or rank would rescale
/// what the adapter computes), from a base model of the same configuration.
fn check_resume(cfg: &TrainConfig, dir: &Path, state: &TrainingState) -> Result<()> {
    let was = &state.hyperparameters;
    let lora_then = state.kind == "lora";
    if (cfg.lora_r > 0) != lora_then {
        return Err(Error::Usage(format!(
            "{} is a checkpoint of {}; resume it with --lora-r {} (or its run's recipe)",
            dir.display(),
            if lora_then {
                "a LoRA run"
            } else {
                "full fine-tuning"
            },
            if lora_then { was.lora_r } else { 0 }
        )));
    }
    if lora_then {
        let mut diffs = Vec::new();
        if cfg.lora_r != was.lora_r {
            diffs.push(format!(
                "--lora-r {} (checkpoint: {})",
                cfg.lora_r, was.lora_r
            ));
        }
        if cfg.lora_alpha != was.lora_alpha {
            diffs.push(format!(
                "--lora-alpha {} (checkpoint: {})",
                cfg.lora_alpha, was.lora_alpha
            ));
        }
        if cfg.lora_targets() != was.lora_targets() {
            diffs.push(format!(
                "LoRA targets {:?} (checkpoint: {:?})",
                cfg.lora_targets(),
                was.lora_targets()
            ));
        }
        if !diffs.is_empty() {
            return Err(Error::Usage(format!(
                "{} was trained with other LoRA settings: {}; resume with the checkpoint's values",
                dir.display(),
                diffs.join(", ")
            )));
        }
    }
    if dir.join("config.json").exists() && load_config(dir)? != load_config(&cfg.checkpoint_dir)? {
        return Err(Error::Usage(format!(
            "{} was trained from another base model than --checkpoint-dir {} (their config.json differ)",
            dir.display(),
            cfg.checkpoint_dir.display()
        )));
    }
    Ok(())
}

/// Set fresh adapter variables to the values saved in checkpoint `dir`.
fn restore_adapter(
    dir: &Path,
    vars: &[(String, candle_core::Var)],
    strategy: &Strategy,
) -> Result<()> {
    let adapter = crate::checkpoint::peft::load_adapter(dir, &strategy.device)?;
    for (name, var) in vars {
        let (module, which) = name
            .rsplit_once(".lora_")
            .ok_or_else(|| Error::Msg(format!("unexpected adapter variable {name}")))?;
        let (a, b) = adapter.tensors.get(module).ok_or_else(|| {
            Error::bad_file(
                dir,
                format!("the adapter has no {module}; was it written by another run?"),
            )
        })?;
        let t = if which.starts_with('A') { a } else { b };
        if t.dims() != var.dims() {
            return Err(Error::bad_file(
                dir,
                format!("{name} has shape {:?}, expected {:?}", t.dims(), var.dims()),
            ));
        }
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    Ok(())
}
