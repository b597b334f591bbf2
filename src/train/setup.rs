//! Setting up a run, before its first step: every check a user can fail, before any
//! weights load ([`Plan`]: a 7B model costs minutes and gigabytes to load); then the
//! model, its optimizer and the state the run starts from ([`build_runner`]); then
//! rank 0's files in the run folder ([`open_outputs`]).

use super::adamw::AdamWConfig;
use super::batches::{DataPosition, TrainData};
use super::checkpoint::{self, TrainingState};
use super::config::{CheckedConfig, TrainConfig};
use super::embeddings::EmbeddingPlan;
use super::fsdp::{Fsdp, FsdpBuilder};
use super::loggers::Loggers;
use super::optimizer::Optimizer;
use super::resume::{
    Resume, plan_resume, restore_adapter, restore_adapter_from, restore_optimizer,
};
use super::schedule::Schedule;
use super::step::{LossScaler, StepRunner};
use crate::config::{Config, load_config};
use crate::error::{Error, IoContext, Result};
use crate::eval::TaskSet;
use crate::lora::LoraConfig;
use crate::model::weights::Weights;
use crate::model::{Dropout, build_model};
use crate::strategy::{Strategy, StrategyKind};
use crate::tokenizer::{TokenBytes, Tokenizer};

/// What a new [`Trainer`](super::trainer::Trainer) settles before any weights load:
/// every check a user can fail, and what follows from the config and the data alone.
pub(super) struct Plan {
    /// This rank's device, precision and collective.
    pub strategy: Strategy,
    /// The base model's configuration.
    pub model_cfg: Config,
    /// The checkpoint the run continues, if any, and what follows from it.
    pub resume: Resume,
    pub lora: Option<LoraConfig>,
    pub schedule: Schedule,
    /// The downstream tasks of `--eval-tasks`, read now so that a bad one stops the
    /// run before it starts.
    pub eval_tasks: Option<TaskSet>,
    /// The bytes each token id of the base's tokenizer stands for (validation's bits
    /// per byte).
    pub token_bytes: TokenBytes,
    /// What a LoRA run trains of the embeddings and head (None: full fine-tuning).
    pub embeddings: Option<EmbeddingPlan>,
}

impl Plan {
    /// Settle the run `cfg` on `data` for the rank of `strategy`: the checkpoint it
    /// resumes, whether the data and the device fit the model, and its schedule.
    pub fn new(cfg: &CheckedConfig, data: &TrainData, strategy: Strategy) -> Result<Plan> {
        let resume = plan_resume(cfg, strategy.is_global_zero())?;
        let embeddings = super::embeddings::plan(cfg, resume.train_embeddings)?;
        let model_cfg = load_config(&cfg.checkpoint_dir)?;
        let tokenizer = check_data_fits(cfg, data, &model_cfg)?;
        // A GPU that cannot hold the run refuses it now, not minutes into loading.
        super::estimate::check_device_memory(
            &model_cfg,
            cfg,
            data.block_size - 1,
            &strategy.device,
        )?;
        let total_steps = total_steps(cfg, data, strategy.world_size)?;
        let schedule = Schedule::new(
            cfg.lr_schedule,
            cfg.learning_rate,
            cfg.min_lr,
            cfg.warmup_steps,
            total_steps,
            cfg.restarts,
        )?;
        if let Some((dir, state)) = &resume.from {
            super::resume::check_state(cfg, data, strategy.world_size, dir, state, total_steps)?;
        }
        let eval_tasks = match &cfg.eval_tasks {
            Some(p) => Some(TaskSet::load(std::slice::from_ref(p), &cfg.checkpoint_dir)?),
            None => None,
        };
        Ok(Plan {
            strategy,
            model_cfg,
            resume,
            lora: cfg.lora(),
            schedule,
            eval_tasks,
            token_bytes: tokenizer.token_bytes(),
            embeddings,
        })
    }
}

/// The data must come from the base model's tokenizer (returned), fit its context,
/// and weigh its datasets sanely.
fn check_data_fits(cfg: &TrainConfig, data: &TrainData, model_cfg: &Config) -> Result<Tokenizer> {
    let tokenizer = Tokenizer::from_dir(&cfg.checkpoint_dir)?;
    data.check_tokenizer(&tokenizer)?;
    data.check_context(model_cfg.block_size)?;
    data.check_sample_memory(
        cfg.micro_batch_size,
        model_cfg,
        cfg.device == crate::strategy::DeviceSpec::Cpu,
        "--micro-batch-size",
    )?;
    data.check_vocab(&tokenizer, model_cfg.vocab_size, &cfg.checkpoint_dir)?;
    data.check_weights()?;
    Ok(tokenizer)
}

/// Optimizer steps of the run: the smallest of --max-steps, --num-epochs and
/// --max-tokens, one epoch when none is given.
fn total_steps(cfg: &TrainConfig, data: &TrainData, world: usize) -> Result<usize> {
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
    let steps_per_epoch = epoch_len / cfg.batch_size;
    let tokens_per_step = (cfg.batch_size * world * (data.block_size - 1)) as u64;
    Ok([
        cfg.max_steps,
        cfg.num_epochs.map(|e| e * steps_per_epoch),
        cfg.max_tokens.map(|t| t.div_ceil(tokens_per_step) as usize),
    ]
    .into_iter()
    .flatten()
    .min()
    .unwrap_or(steps_per_epoch))
}

/// The model (the base, frozen under a new or resumed adapter for LoRA; the
/// checkpoint's own weights when resuming full training), its optimizer, and the state
/// the run starts from.
pub(super) fn build_runner(cfg: &CheckedConfig, plan: Plan) -> Result<(StepRunner, TrainingState)> {
    let Plan {
        strategy,
        model_cfg,
        resume,
        lora,
        embeddings,
        ..
    } = plan;
    let resume = resume.from;
    let resume_dir = resume.as_ref().map(|(d, _)| d.as_path());
    let weights_dir = match (resume_dir, &lora) {
        (Some(dir), None) => dir,
        _ => cfg.checkpoint_dir.as_path(),
    };
    let adam = AdamWConfig {
        beta1: cfg.beta1,
        beta2: cfg.beta2,
        eps: cfg.eps,
        weight_decay: cfg.weight_decay,
    };
    let weights = Weights::open(weights_dir)?;
    let options = strategy.build_options(lora.is_none());
    let (model, mut opt) = if strategy.kind == StrategyKind::Fsdp {
        let adapter = match (resume_dir, &lora) {
            (Some(dir), Some(_)) => {
                Some((dir, crate::hf::peft::load_adapter(dir, &strategy.device)?))
            }
            _ => None,
        };
        let f = build_sharded(
            &model_cfg,
            &weights,
            &options,
            lora.as_ref(),
            embeddings.as_ref(),
            cfg.seed,
            adapter,
            adam,
            &strategy,
        )?;
        (f.shell().clone(), Optimizer::Fsdp(Box::new(f)))
    } else {
        let tm = build_model(&model_cfg, &weights, &options)?;
        let mut model = tm.model;
        let vars = match &lora {
            None => tm.vars,
            Some(l) => {
                let mut vars = crate::lora::attach_new(&mut model, l, cfg.seed)?;
                if let Some(e) = &embeddings {
                    vars.extend(crate::lora::attach_embeddings(
                        &mut model, e.mode, &e.new_ids,
                    )?);
                }
                if let Some(dir) = resume_dir {
                    restore_adapter(dir, &vars, &strategy)?;
                }
                vars
            }
        };
        // Every rank starts from rank 0's trained values.
        let trained: Vec<candle_core::Var> = vars.iter().map(|(_, v)| v.clone()).collect();
        strategy.broadcast_vars(&trained)?;
        drop(trained);
        // Trained rows (fresh, restored or broadcast) into the matrices the forward reads.
        model.write_token_rows()?;
        (model, Optimizer::new(vars, adam, &strategy)?)
    };
    let state = match resume {
        Some((dir, mut s)) => {
            restore_optimizer(&dir, &s, &mut opt, &strategy)?;
            // Checked against the base in plan_resume: from now on, this one.
            s.base_checkpoint_dir = absolute(&cfg.checkpoint_dir);
            s.base_fingerprint = Some(crate::hf::merge::base_fingerprint(&cfg.checkpoint_dir)?);
            s
        }
        None => fresh_state(cfg, &strategy, lora.as_ref())?,
    };
    let mut runner = StepRunner::new(model, opt, strategy);
    runner.grad_clip = (cfg.grad_clip > 0.0).then_some(cfg.grad_clip);
    runner.scaler = state.loss_scaler;
    runner.dropout = lora
        .as_ref()
        .filter(|l| l.dropout > 0.0)
        .map(|_| Dropout::new(state.dropout_seed.unwrap_or(state.hyperparameters.seed)));
    runner.activation_checkpointing = cfg.activation_checkpointing;
    Ok((runner, state))
}

/// The model loaded block by block and sharded as it comes (`--strategy fsdp`): each
/// block gets its fresh adapters (LoRA, from one seeded stream as
/// [`crate::lora::attach_new`] draws them) or `adapter`'s (resuming LoRA), takes rank
/// 0's trained values, and only this rank's shard of it is kept before the next block
/// loads. Whole at once: the embeddings, final norm and head, and one block. The
/// embeddings and head train as `embeddings` says (fresh, or `adapter`'s), as
/// [`crate::lora::attach_embeddings`] makes them train in a whole model; their
/// variables are sharded with the outer unit.
#[allow(clippy::too_many_arguments)]
fn build_sharded(
    model_cfg: &Config,
    weights: &Weights,
    options: &crate::model::BuildOptions,
    lora: Option<&LoraConfig>,
    embeddings: Option<&EmbeddingPlan>,
    seed: u64,
    adapter: Option<(&std::path::Path, crate::hf::peft::PeftAdapter)>,
    adam: AdamWConfig,
    strategy: &Strategy,
) -> Result<Fsdp> {
    let mut fresh = lora
        .map(|l| crate::lora::FreshAdapters::new(model_cfg, l, seed))
        .transpose()?;
    // LoRA's variables of a part (a block, or the head), set from the adapter when
    // resuming, then rank 0's on every rank.
    let trained =
        |vars: Vec<(String, candle_core::Var)>| -> Result<Vec<(String, candle_core::Var)>> {
            if let Some((dir, a)) = &adapter {
                restore_adapter_from(dir, a, &vars)?;
            }
            let values: Vec<candle_core::Var> = vars.iter().map(|(_, v)| v.clone()).collect();
            strategy.broadcast_vars(&values)?;
            Ok(vars)
        };
    let mut builder = FsdpBuilder::new(strategy);
    let mut on_block = |mut blk: crate::model::Block, mut vars: Vec<(String, candle_core::Var)>| {
        if let Some(f) = fresh.as_mut() {
            vars.extend(f.attach_block(&mut blk)?);
        }
        let vars = trained(vars)?;
        builder.shard_block(blk, vars)
    };
    let tm = crate::model::build_model_by_block(model_cfg, weights, options, Some(&mut on_block))?;
    let mut model = tm.model;
    let mut vars = tm.vars;
    if let Some(f) = fresh.as_mut() {
        vars.extend(f.attach_head(&mut model.lm_head)?);
    }
    if let (Some(_), Some(e)) = (lora, embeddings) {
        vars.extend(crate::lora::attach_embeddings(
            &mut model, e.mode, &e.new_ids,
        )?);
    }
    let vars = trained(vars)?;
    builder.finish(model, vars, adam)
}

/// `--strategy zero1` on one rank: nothing to shard (the one-rank [`Strategy`] keeps
/// the optimizer whole), said rather than silently ignored. `fsdp` on one rank runs its
/// sharded code (each shard the whole buffer), so that one device exercises it: no note.
pub(super) fn unsharded_note(cfg: &TrainConfig, strategy: &Strategy) -> Option<String> {
    match (cfg.strategy, strategy.world_size) {
        (StrategyKind::Zero1, 1) => Some(
            "--strategy zero1 on one rank: nothing to shard, the optimizer state stays whole"
                .to_string(),
        ),
        _ => None,
    }
}

/// `path` made absolute (symbolic links resolved where it exists), so that a state
/// read from another folder still finds it.
pub(super) fn absolute(path: &std::path::Path) -> std::path::PathBuf {
    std::fs::canonicalize(path)
        .or_else(|_| std::path::absolute(path))
        .unwrap_or_else(|_| path.to_path_buf())
}

/// The state of a run at step 0.
fn fresh_state(
    cfg: &CheckedConfig,
    strategy: &Strategy,
    lora: Option<&LoraConfig>,
) -> Result<TrainingState> {
    let needs_dropout = lora.is_some_and(|l| l.dropout > 0.0);
    Ok(TrainingState {
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
        dropout_seed: needs_dropout.then_some(cfg.seed),
        base_checkpoint_dir: absolute(&cfg.checkpoint_dir),
        base_fingerprint: Some(crate::hf::merge::base_fingerprint(&cfg.checkpoint_dir)?),
        data_fingerprint: None,
        hyperparameters: cfg.config().clone(),
        lit_claire_version: env!("CARGO_PKG_VERSION").into(),
    })
}

/// Rank 0's files in the run folder: the hyper-parameters, the loggers' files
/// (continued after `resume = (step, tokens)` when resuming) and `train.log`; and the
/// leftovers of interrupted checkpoint writes and deletions swept (returned).
pub(super) fn open_outputs(
    cfg: &CheckedConfig,
    data: &TrainData,
    tasks: &[String],
    resume: Option<(usize, u64)>,
) -> Result<(Loggers, std::fs::File, Vec<std::path::PathBuf>)> {
    let out = &cfg.out_dir;
    std::fs::create_dir_all(out).at(out)?;
    let swept = checkpoint::clean_partial(out)?;
    cfg.save(out)?;
    let names: Vec<String> = data.datasets.iter().map(|d| d.name.clone()).collect();
    let metrics = Loggers::open(out, &names, tasks, &cfg.logger, resume)?;
    let log_path = out.join("train.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .at(&log_path)?;
    Ok((metrics, log, swept))
}
