//! The training loop: full fine-tuning or LoRA, with periodic logging, validation,
//! checkpoints, early stopping and exact resume.
//!
//! Everything device-, precision- or rank-related goes through the [`Strategy`];
//! everything that makes a step goes through the [`StepRunner`].

mod checkpoints;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use super::batches::{Batch, DataPosition, TrainData, sample_with_starts};
use super::checkpoint::{self, TrainingState};
use super::config::{CheckedConfig, IntervalUnit, ToChecked};
use super::evaluate::{Scoring, evaluate_split};
use super::loggers::Loggers;
use super::metrics::MetricsRow;
use super::preempt::EXIT_PREEMPTED;
use super::saver::Saver;
use super::schedule::Schedule;
use super::setup::{Plan, build_runner, open_outputs, unsharded_note};
use super::step::{StepRunner, StepStats};
use crate::error::{Error, IoContext, Result};
use crate::eval::TaskSet;
use crate::lora::LoraConfig;
use crate::strategy::{Single, Strategy, StrategyKind};

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
    /// The checkpoint written when a signal (or the config's
    /// [`StopFlag`](super::preempt::StopFlag)) stopped the run before its end; `pretrain`
    /// then exits with [`EXIT_PREEMPTED`].
    pub preempted: Option<PathBuf>,
}

/// A run in progress.
pub struct Trainer {
    cfg: CheckedConfig,
    data: TrainData,
    runner: StepRunner,
    lora: Option<LoraConfig>,
    schedule: Schedule,
    state: TrainingState,
    metrics: Option<Loggers>,
    log: Option<std::fs::File>,
    /// Order of the current epoch (for this rank).
    order: Vec<(u32, u32)>,
    order_epoch: Option<usize>,
    /// Rank 0's lock on the run folder, held until the trainer is dropped.
    lock: Option<super::lock::RunLock>,
    /// Downstream tasks scored at each validation (`--eval-tasks`), and their
    /// `task/metric` columns.
    eval_tasks: Option<TaskSet>,
    task_columns: Vec<String>,
    /// Rank 0's checkpoint writer.
    saver: Option<Saver>,
    /// The bytes of each token id (validation's bits per byte).
    token_bytes: crate::tokenizer::TokenBytes,
}

/// The device, and the ranks when there are several or the model is sharded: `cpu`,
/// `cpu × 2 ranks (ddp)`, `cpu × 1 rank (fsdp)`.
fn ranks_label(s: &Strategy) -> String {
    match s.world_size {
        1 if s.kind == StrategyKind::Fsdp => format!("{} × 1 rank (fsdp)", s.spec),
        1 => s.spec.to_string(),
        w => format!("{} × {w} ranks ({})", s.spec, s.kind),
    }
}

impl Trainer {
    /// Check everything (`cfg` too, unless it is a [`CheckedConfig`] already), then
    /// set up model, optimizer and data (from scratch or from the checkpoint
    /// `cfg.resume` names), on one device. Every user error surfaces before any
    /// weights load. Runs on several devices start one trainer per rank with
    /// [`Trainer::on_rank`] ([`pretrain_with_data`](super::pretrain_with_data) does).
    pub fn new(cfg: &impl ToChecked, data: TrainData) -> Result<Self> {
        let cfg = cfg.to_checked()?;
        if cfg.world_size() > 1 {
            return Err(Error::Usage(format!(
                "--devices {} --num-nodes {}: a Trainer is one rank; train with pretrain_with_data, which starts every rank",
                cfg.devices, cfg.num_nodes
            )));
        }
        // One rank: ddp and zero1 keep everything whole (zero1 says so); fsdp runs its
        // sharded code, each shard the whole buffer, through the one-rank collective.
        let mut strategy = Strategy::new(cfg.device, cfg.precision)?;
        if cfg.strategy == StrategyKind::Fsdp {
            strategy = strategy.with_collective(Arc::new(Single), StrategyKind::Fsdp);
        }
        Self::on_rank(cfg.as_ref(), data, strategy)
    }

    /// [`Trainer::new`] for the rank of `strategy` (`cfg` checked the same way).
    /// Rank 0 settles the run folder first (which checkpoint to resume, metrics,
    /// hyper-parameters); the others start once it has, so none reads a folder being
    /// changed.
    pub fn on_rank(cfg: &impl ToChecked, data: TrainData, strategy: Strategy) -> Result<Self> {
        let cfg = cfg.to_checked()?;
        let zero = strategy.is_global_zero();
        let group = strategy.clone();
        if !zero {
            group.barrier()?;
        }
        // Before reading the run folder: a second run there is refused at once.
        let lock = if zero {
            let lock = super::lock::RunLock::acquire(&cfg.out_dir)?;
            super::preempt::clear_stop_record(&cfg.out_dir)?;
            Some(lock)
        } else {
            None
        };
        let plan = Plan::new(&cfg, &data, strategy)?;
        if zero {
            group.barrier()?;
        }
        let resumed_from = plan.resume.from.as_ref().map(|(d, s)| (d.clone(), s.step));
        let (lora, schedule) = (plan.lora.clone(), plan.schedule.clone());
        let eval_tasks = plan.eval_tasks.clone();
        let token_bytes = plan.token_bytes.clone();
        let task_columns = eval_tasks
            .as_ref()
            .map(TaskSet::columns)
            .unwrap_or_default();
        let mut warnings = plan.resume.warnings.clone();
        warnings.extend(unsharded_note(&cfg, &plan.strategy));
        // The setting as used goes into hyperparameters.toml and every checkpoint.
        let cfg = cfg
            .into_owned()
            .with_cross_document_attention(plan.resume.cross_document)
            .with_train_embeddings(plan.embeddings.as_ref().map(|e| e.mode));
        let cfg = &cfg;
        let (runner, mut state) = build_runner(cfg, plan)?;
        state.hyperparameters.cross_document_attention = cfg.cross_document_attention;
        state.hyperparameters.train_embeddings = cfg.train_embeddings;
        state.data_fingerprint = data.origin.as_ref().map(|o| o.fingerprint.clone());
        let (metrics, log, swept) = if zero {
            let resume = resumed_from.as_ref().map(|_| (state.step, state.tokens));
            let (m, l, swept) = open_outputs(cfg, &data, &task_columns, resume)?;
            (Some(m), Some(l), swept)
        } else {
            (None, None, Vec::new())
        };
        warnings.extend(swept.iter().map(|p| {
            format!(
                "removed {}, left by an interrupted checkpoint write or deletion",
                p.display()
            )
        }));
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
            lock,
            eval_tasks,
            task_columns,
            saver: zero.then(|| Saver::new(&cfg.out_dir, cfg.max_checkpoints, cfg.background_save)),
            token_bytes,
        };
        let line = t.start_line(resumed_from.as_ref().map(|(d, _)| d.as_path()));
        t.note(&line)?;
        for w in warnings {
            t.note(&w)?;
        }
        Ok(t)
    }

    /// What the run is about to do, for the log.
    fn start_line(&self, resumed_from: Option<&Path>) -> String {
        let n_params = self.runner.opt.trained_elements();
        format!(
            "{} {} from {} on {} ({}), {} trainable parameters, {} steps of {} samples{}",
            if resumed_from.is_some() {
                "resuming"
            } else {
                "starting"
            },
            if self.lora.is_some() {
                "LoRA"
            } else {
                "full fine-tuning"
            },
            self.cfg.checkpoint_dir.display(),
            ranks_label(&self.runner.strategy),
            self.runner.strategy.precision,
            n_params,
            self.schedule.total_steps,
            self.cfg.batch_size * self.runner.strategy.world_size,
            match resumed_from {
                Some(p) => format!(", from {} (step {})", p.display(), self.state.step),
                None => String::new(),
            }
        )
    }

    /// A line for the log file (and stderr).
    fn note(&mut self, line: &str) -> Result<()> {
        if let Some(f) = self.log.as_mut() {
            writeln!(f, "{line}").at(self.cfg.out_dir.join("train.log"))?;
            eprintln!("{line}");
        }
        Ok(())
    }

    /// This rank's `batch_size` samples of the next global batch (`batch_size` ×
    /// ranks samples of the epoch's order) with their document starts, moving to the
    /// next epoch when the current one has less than a global batch left.
    fn next_samples(&mut self) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
        let world = self.runner.strategy.world_size;
        let bs = self.cfg.batch_size;
        if self.state.position.offset + bs * world > self.data.epoch_len(1) {
            self.state.position = DataPosition {
                epoch: self.state.position.epoch + 1,
                offset: 0,
            };
        }
        if self.order_epoch != Some(self.state.position.epoch) {
            self.order = self
                .data
                .epoch_order(self.cfg.seed, self.state.position.epoch);
            self.order_epoch = Some(self.state.position.epoch);
        }
        let share = self.state.position.share(bs, self.runner.strategy.rank);
        let picks = self.order[share].to_vec();
        self.state.position.offset += bs * world;
        let cross = self.cfg.cross_document();
        picks
            .into_iter()
            .map(|(d, i)| {
                let set = self.data.datasets[d as usize].train.as_ref();
                sample_with_starts(set, i as usize, cross)
            })
            .collect()
    }

    /// Validation loss per dataset and overall (token-weighted) and bits per byte, and
    /// the downstream tasks' metrics, computed by rank 0; the other ranks wait, and get
    /// the overall loss (they need it to stop early together).
    fn evaluate_validation(&mut self) -> Result<Validation> {
        let mut per = Vec::new();
        let (mut sum, mut tokens, mut bytes) = (0f64, 0usize, 0u64);
        let global_zero = self.runner.strategy.is_global_zero();
        let device = self.runner.strategy.device.clone();
        let how = Scoring {
            block_size: self.data.block_size,
            micro_batch_size: self.cfg.micro_batch_size,
            max_batches: self.cfg.eval_max_batches,
            cross_document: self.cfg.cross_document(),
            token_bytes: Some(&self.token_bytes),
        };
        if let Some(f) = self.runner.fsdp_mut() {
            // fsdp: every rank scores the same batches, gathering one block at a time.
            for ds in &self.data.datasets {
                let mut scorer = |b: &super::batches::Batch| {
                    super::evaluate::loss_sum_of(b, |ids, docs, targets| {
                        f.score(ids, docs, targets)
                    })
                };
                let r = super::evaluate::evaluate_with(
                    &mut scorer,
                    ds.validation.as_ref(),
                    &how,
                    &device,
                )?;
                if let Some(r) = r {
                    sum += r.loss * r.tokens as f64;
                    tokens += r.tokens;
                    bytes += r.bytes.unwrap_or(0);
                }
                per.push(r.map(|r| r.loss));
            }
        } else if global_zero {
            for ds in &self.data.datasets {
                let r = evaluate_split(&self.runner.model, ds.validation.as_ref(), &how, &device)?;
                if let Some(r) = r {
                    sum += r.loss * r.tokens as f64;
                    tokens += r.tokens;
                    bytes += r.bytes.unwrap_or(0);
                }
                per.push(r.map(|r| r.loss));
            }
        }
        let mut tasks = Vec::new();
        let start = Instant::now();
        if let Some(values) = self.score_tasks()? {
            let line = self
                .task_columns
                .iter()
                .zip(&values)
                .map(|(c, v)| format!("{c} {v:.4}"))
                .collect::<Vec<_>>()
                .join(", ");
            self.note(&format!(
                "step {}: tasks ({:.1}s) {line}",
                self.state.step,
                start.elapsed().as_secs_f64()
            ))?;
            tasks = values.into_iter().map(Some).collect();
        }
        let overall = (tokens > 0).then(|| sum / tokens as f64);
        // [has a value, value], from rank 0.
        let got = self
            .runner
            .strategy
            .broadcast_f64(&[overall.is_some() as u8 as f64, overall.unwrap_or(0.0)])?;
        Ok(Validation {
            loss: (got[0] > 0.0).then_some(got[1]),
            bpb: crate::tokenizer::bits_per_byte(sum, bytes),
            per_dataset: per,
            tasks,
        })
    }

    /// The downstream tasks' values (`--eval-tasks`, in the order of their columns), on
    /// rank 0; None on the other ranks and without tasks. Rank 0 scores its whole
    /// model; with fsdp every rank scores the same requests in lockstep, gathering the
    /// embeddings and head once and each block for each forward (generation included),
    /// never the model at once. Every rank must call it.
    pub fn score_tasks(&mut self) -> Result<Option<Vec<f64>>> {
        let Some(ts) = &self.eval_tasks else {
            return Ok(None);
        };
        let rows = self.cfg.micro_batch_size;
        let zero = self.runner.strategy.is_global_zero();
        Ok(match self.runner.fsdp_mut() {
            Some(f) => {
                let values = f.infer(|m| ts.score_with(m, rows))?;
                zero.then_some(values)
            }
            None if zero => Some(ts.score(&self.runner.model, rows)?),
            None => None,
        })
    }

    /// Train until the schedule ends (or early stopping, or `stop_after` steps, for
    /// tests of interrupted runs).
    pub fn run(&mut self, stop_after: Option<usize>) -> Result<TrainSummary> {
        let r = self.run_locked(stop_after);
        // A checkpoint being written is finished, even when the run failed, before
        // the run folder is free again (the trainer may live on).
        let written = self.finish_writes();
        self.lock = None;
        let s = r?;
        written?;
        Ok(s)
    }

    /// [`Trainer::run`], holding the run folder's lock.
    fn run_locked(&mut self, stop_after: Option<usize>) -> Result<TrainSummary> {
        let total = self.schedule.total_steps;
        let bar = self.progress_bar();
        let mut clock = Clock::new(self.state.elapsed_s);
        let mut stopped_early = false;
        while self.state.step < total && !self.token_budget_spent() {
            if stop_after.is_some_and(|s| self.state.step >= s) {
                bar.abandon();
                return Ok(self.summary(false, None));
            }
            let (stats, lr) = self.train_step()?;
            let now = clock.step(&mut self.state, stats.tokens);
            // Time intervals follow rank 0's clock, so all ranks validate and save together.
            let now = match self.cfg.interval_unit {
                IntervalUnit::Time => self.runner.strategy.broadcast_f64(&[now])?[0],
                IntervalUnit::Step => now,
            };
            let last_step = self.state.step == total || self.token_budget_spent();
            let eval_due = clock.due(
                self.cfg.interval_unit,
                self.cfg.eval_interval,
                clock.last_eval,
                self.state.step,
                now,
            ) || last_step;
            let log_due = clock.due(
                self.cfg.interval_unit,
                self.cfg.log_interval,
                clock.last_log,
                self.state.step,
                now,
            ) || eval_due;
            let save_due = clock.due(
                self.cfg.interval_unit,
                self.cfg.save_interval,
                clock.last_save,
                self.state.step,
                now,
            ) && !last_step;

            let validation = if eval_due {
                clock.last_eval = now;
                self.evaluate_validation()?
            } else {
                Validation::default()
            };
            let (val, bpb) = (validation.loss, validation.bpb);
            if let Some(v) = val {
                self.record_validation(v);
            }
            let tps = clock.tokens_per_s(now);
            bar.set_position(self.state.step as u64);
            bar.set_message(format!(
                "loss {:.4} | lr {:.2e} | {:.0} tok/s",
                stats.loss, lr, tps
            ));
            if log_due {
                clock.last_log = now;
                self.log_metrics(&stats, lr, tps, validation, bar.is_hidden())?;
                clock.restart_interval(now);
            }
            if let Some(v) = val {
                let bpb = bpb
                    .map(|b| format!(", {b:.4} bits per byte"))
                    .unwrap_or_default();
                self.note(&format!(
                    "step {}: validation loss {v:.4} (perplexity {:.2}{bpb})",
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
            // Every step, so that all ranks stop after the same one.
            let stop = self.stop_here()? && !last_step;
            if stop {
                let name = checkpoint::step_dir_name(self.state.step);
                let dir = self.cfg.out_dir.join(&name);
                self.note(&format!(
                    "step {}: {} received: saving {} and stopping; --resume auto continues from it (exit code {EXIT_PREEMPTED})",
                    self.state.step,
                    self.cfg.stop().reason(),
                    dir.display()
                ))?;
                self.save(&name)?;
                self.finish_checkpoint()?;
                if self.runner.strategy.is_global_zero() {
                    super::preempt::write_stop_record(
                        &self.cfg.out_dir,
                        self.state.step,
                        &dir,
                        &self.cfg.stop().reason(),
                    )?;
                }
                bar.abandon();
                let mut s = self.summary(false, None);
                s.preempted = Some(dir);
                return Ok(s);
            }
            if save_due {
                clock.last_save = now;
                self.save(&checkpoint::step_dir_name(self.state.step))?;
            }
        }
        bar.finish();
        let final_dir = self.save("final")?;
        self.finish_checkpoint()?;
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

    /// A progress bar on rank 0 (hidden elsewhere, and when stderr is no terminal).
    fn progress_bar(&self) -> ProgressBar {
        let bar = if self.runner.strategy.is_global_zero() {
            ProgressBar::new(self.schedule.total_steps as u64)
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
        bar
    }

    fn token_budget_spent(&self) -> bool {
        self.cfg.max_tokens.is_some_and(|m| self.state.tokens >= m)
    }

    /// One optimizer step on the next batch; returns its statistics and learning rate.
    fn train_step(&mut self) -> Result<(StepStats, f64)> {
        let device = self.runner.strategy.device.clone();
        let (samples, starts): (Vec<_>, Vec<_>) = self.next_samples()?.into_iter().unzip();
        let mb = self.cfg.micro_batch_size;
        let micro_batches = samples
            .chunks(mb)
            .zip(starts.chunks(mb))
            .map(|(s, d)| Batch::from_packed(s, d, self.data.block_size, &device))
            .collect::<Result<Vec<_>>>()?;
        let lr = self.schedule.lr(self.state.step);
        if let Some(d) = &self.runner.dropout {
            // This rank's samples start at rank × batch size in the global batch.
            let first = self.runner.strategy.rank * self.cfg.batch_size;
            d.begin_step(self.state.step as u64, first as u64);
        }
        let stats = self
            .runner
            .step(&micro_batches, lr)
            .map_err(|e| Error::Msg(format!("step {}: {e}", self.state.step + 1)))?;
        self.state.step += 1;
        // The ranks compare the collectives they issued (a desynchronised rank stops
        // the run here, named, instead of mixing buffers or hanging later).
        self.runner
            .strategy
            .end_step(self.state.step)
            .map_err(|e| Error::Msg(format!("step {}: {e}", self.state.step)))?;
        self.state.train_loss = Some(stats.loss);
        if stats.skipped {
            self.note(&format!(
                "step {}: gradient overflow, update skipped, loss scale now {}",
                self.state.step,
                self.runner.scaler.map_or(0.0, |s| s.scale)
            ))?;
        }
        Ok((stats, lr))
    }

    /// Keep the best validation loss and count evaluations without improvement.
    fn record_validation(&mut self, v: f64) {
        self.state.val_loss = Some(v);
        match self.state.best_val_loss {
            Some(b) if v >= b => self.state.evals_without_improvement += 1,
            _ => {
                self.state.best_val_loss = Some(v);
                self.state.evals_without_improvement = 0;
            }
        }
    }

    /// A row of `metrics.csv` (and a line on stderr when there is no progress bar).
    fn log_metrics(
        &mut self,
        stats: &StepStats,
        lr: f64,
        tps: f64,
        validation: Validation,
        no_bar: bool,
    ) -> Result<()> {
        let Validation {
            loss: val,
            bpb,
            per_dataset: per,
            tasks,
        } = validation;
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
            val_bpb: bpb.filter(|_| val.is_some()),
            val_per_dataset: if val.is_some() {
                per
            } else {
                vec![None; self.data.datasets.len()]
            },
            tasks: if tasks.is_empty() {
                vec![None; self.task_columns.len()]
            } else {
                tasks
            },
        };
        if let Some(m) = self.metrics.as_mut() {
            m.write(&row)?;
            self.state.metrics_rows = Some(self.state.metrics_rows.unwrap_or(0) + 1);
        }
        if no_bar && self.runner.strategy.is_global_zero() {
            eprintln!(
                "step {}/{} loss {:.4} lr {lr:.3e} grad_norm {:.3} {tps:.0} tok/s{}",
                self.state.step,
                self.schedule.total_steps,
                stats.loss,
                stats.grad_norm,
                val.map(|v| format!(" val_loss {v:.4}")).unwrap_or_default()
            );
        }
        Ok(())
    }

    /// The model being trained (with `fsdp`, its shell: names and layout, every
    /// parameter an empty placeholder; the weights are the ranks' shards).
    pub fn model(&self) -> &crate::model::Gpt {
        &self.runner.model
    }

    /// Bytes of parameter values this rank holds between steps (with `fsdp`: its
    /// shards).
    pub fn held_parameter_bytes(&mut self) -> usize {
        self.runner.held_parameter_bytes()
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
            preempted: None,
        }
    }
}

/// What a validation gave (on rank 0; the other ranks know only the loss).
#[derive(Debug, Default)]
struct Validation {
    /// Token-weighted over the datasets.
    loss: Option<f64>,
    /// Bits per byte over the datasets.
    bpb: Option<f64>,
    per_dataset: Vec<Option<f64>>,
    /// The downstream tasks' metrics, in the order of the `task/metric` columns.
    tasks: Vec<Option<f64>>,
}

/// Wall time of a run (continuing a resumed run's), and when logging, validation and
/// checkpoints last happened, for `--interval-unit time`.
struct Clock {
    started: Instant,
    base_elapsed: f64,
    last_log: f64,
    last_eval: f64,
    last_save: f64,
    /// Tokens since the last metrics row, and when that interval started.
    interval_tokens: u64,
    interval_start: f64,
}

impl Clock {
    fn new(base_elapsed: f64) -> Self {
        Clock {
            started: Instant::now(),
            base_elapsed,
            last_log: 0.0,
            last_eval: 0.0,
            last_save: 0.0,
            interval_tokens: 0,
            interval_start: 0.0,
        }
    }

    /// Count a step's tokens (over all ranks) into `state`; returns seconds since start.
    fn step(&mut self, state: &mut TrainingState, tokens: usize) -> f64 {
        let step_tokens = tokens as u64;
        state.tokens += step_tokens;
        self.interval_tokens += step_tokens;
        let now = self.started.elapsed().as_secs_f64();
        state.elapsed_s = self.base_elapsed + now;
        now
    }

    /// Whether something done every `interval` (steps or seconds), last at `last`, is due.
    fn due(&self, unit: IntervalUnit, interval: u64, last: f64, step: usize, now: f64) -> bool {
        match unit {
            IntervalUnit::Step => step % interval as usize == 0,
            IntervalUnit::Time => now - last >= interval as f64,
        }
    }

    fn tokens_per_s(&self, now: f64) -> f64 {
        self.interval_tokens as f64 / (now - self.interval_start).max(1e-9)
    }

    fn restart_interval(&mut self, now: f64) {
        self.interval_tokens = 0;
        self.interval_start = now;
    }
}
