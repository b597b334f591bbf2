//! One optimizer step: forward and backward over micro-batches, gradient
//! accumulation, loss scaling, clipping, AdamW.
//!
//! The loss of a step is the mean next-token cross-entropy over *all* counted tokens
//! of the step's micro-batches, on all ranks: each micro-batch contributes
//! `Σ nll / N_step`, where `N_step` counts the tokens of every rank, so splitting a
//! batch into micro-batches, or over ranks, does not change the gradient (the ranks'
//! gradients are summed once per step, not averaged).

use candle_core::{Tensor, Var};

use super::batches::Batch;
use super::optimizer::Optimizer;
use super::overlap::overlapped_pass;
use crate::error::{Error, Result};
use crate::model::engine::profile::timed;
use crate::model::engine::{Grads, PassInput, train_pass};
use crate::model::{Dropout, Gpt};
use crate::strategy::Strategy;

/// Dynamic loss scaling for 16-mixed (PyTorch `GradScaler` defaults).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossScaler {
    pub scale: f64,
    /// Consecutive steps without overflow.
    pub good_steps: u64,
    pub growth_interval: u64,
}

impl LossScaler {
    pub fn new() -> Self {
        LossScaler {
            scale: 65536.0,
            good_steps: 0,
            growth_interval: 2000,
        }
    }

    /// After a step: halve on overflow, double after `growth_interval` good steps.
    fn update(&mut self, overflow: bool) {
        if overflow {
            self.scale *= 0.5;
            self.good_steps = 0;
        } else {
            self.good_steps += 1;
            if self.good_steps >= self.growth_interval {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
        }
    }
}

impl Default for LossScaler {
    fn default() -> Self {
        Self::new()
    }
}

/// What a step reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Mean loss over the step's counted tokens.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub lr: f64,
    /// Counted tokens, on all ranks.
    pub tokens: usize,
    /// The update was skipped (16-mixed overflow).
    pub skipped: bool,
}

/// Model, optimizer and the strategy that runs them.
pub struct StepRunner {
    pub model: Gpt,
    pub opt: Optimizer,
    pub strategy: Strategy,
    /// Global-norm clipping threshold (None: no clipping).
    pub grad_clip: Option<f64>,
    pub scaler: Option<LossScaler>,
    /// LoRA dropout; the caller says which step and samples each [`StepRunner::step`]
    /// computes ([`Dropout::begin_step`]).
    pub dropout: Option<Dropout>,
    /// Activation checkpointing: every k-th block keeps only its input (0: none).
    pub activation_checkpointing: usize,
    /// Gradient buffers, allocated at the first step and reused.
    grads: Option<Grads>,
    /// What splitting micro-batches over the cores keeps ([`StepRunner::parts`]).
    split: Split,
}

/// What a runner keeps for micro-batches split over the cores.
#[derive(Default)]
struct Split {
    /// One one-thread pool per part.
    pools: Vec<rayon::ThreadPool>,
    /// The gradient buffers of every part but the first (which uses the runner's).
    grads: Vec<Grads>,
    /// Whether the trained parameters are under 1/16 of the model's (LoRA), decided once.
    trains_few: Option<bool>,
}

impl StepRunner {
    /// A runner without clipping, loss scaling, dropout or checkpointing (set the
    /// fields to change that).
    pub fn new(model: Gpt, opt: Optimizer, strategy: Strategy) -> Self {
        StepRunner {
            model,
            opt,
            strategy,
            grad_clip: None,
            scaler: None,
            dropout: None,
            activation_checkpointing: 0,
            grads: None,
            split: Split::default(),
        }
    }

    /// Into how many parts, computed at once on their own cores, a micro-batch is
    /// split (by samples; 1: not split).
    ///
    /// Cores sharing one matmul wait on each other; cores with matmuls of their own do not.
    /// On the 2-core CI machine a projection-sized product (512 × 576 × 960, cold operands,
    /// the gemm crate) ran at 150–200 GFLOP/s on both cores, and at 86–128 on each core
    /// when two ran at once in single-threaded processes; a LoRA step at 2 × 256 tokens of
    /// the real-model shape went from 178–195 to 202–218 tokens/s split (alternating, same
    /// binary otherwise). Each extra part holds its own gradient buffers, so only on a
    /// multi-core CPU in f32 with the fused kernels, one rank, two samples or more, and
    /// trained parameters under 1/16 of the model's (LoRA); full fine-tuning, measured on
    /// the bench model, gained nothing for about 20% more memory.
    pub fn parts(&mut self, batch: &Batch) -> Result<usize> {
        let samples = batch.inputs.dim(0)?;
        let threads = rayon::current_num_threads();
        let fused = crate::model::fused::kernels_on()
            && crate::model::fused::serves(
                batch.inputs.device().is_cpu(),
                self.model.compute_dtype,
            );
        // Ranks on the CPU already share its cores; fsdp passes gather their blocks.
        let fsdp = matches!(self.opt, Optimizer::Fsdp(_));
        if fsdp || !fused || self.strategy.world_size > 1 || threads < 2 || samples < 2 {
            return Ok(1);
        }
        let (model, vars) = (&self.model, self.opt.vars());
        let trains_few = *self.split.trains_few.get_or_insert_with(|| {
            let trained: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
            let weights: usize = model
                .named_parameters()
                .iter()
                .map(|(_, t)| t.elem_count())
                .sum();
            trained * 16 <= weights
        });
        Ok(if trains_few { threads.min(samples) } else { 1 })
    }

    /// [`train_pass`] over `parts` consecutive groups of the micro-batch's samples at
    /// once, each on a one-thread pool, their gradients then summed in order into
    /// `grads`. The dropout masks are those of the whole (keyed by sample).
    fn split_pass(
        model: &Gpt,
        vars: &[(String, Var)],
        split: &mut Split,
        input: &PassInput,
        grads: &mut Grads,
        parts: usize,
    ) -> Result<f64> {
        let Split {
            pools,
            grads: part_grads,
            ..
        } = split;
        while pools.len() < parts {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .thread_name(|_| "lc-part".into())
                .build()
                .map_err(|e| Error::Msg(format!("cannot start a training thread: {e}")))?;
            pools.push(pool);
        }
        while part_grads.len() < parts - 1 {
            part_grads.push(Grads::new(vars));
        }
        let (b, t) = input.ids.dims2()?;
        type Piece = (
            Tensor,
            Tensor,
            Tensor,
            Option<std::sync::Arc<[u32]>>,
            Option<Dropout>,
        );
        let mut pieces: Vec<Piece> = Vec::with_capacity(parts);
        for p in 0..parts {
            let (lo, hi) = (b * p / parts, b * (p + 1) / parts);
            let docs: Option<std::sync::Arc<[u32]>> = input
                .docs
                .map(|d| d[lo * t..hi * t].iter().copied().collect());
            pieces.push((
                input.ids.narrow(0, lo, hi - lo)?,
                input.targets.narrow(0, lo * t, (hi - lo) * t)?,
                input.mask.narrow(0, lo * t, (hi - lo) * t)?,
                docs,
                input.dropout.map(|d| d.for_part(lo, hi - lo)),
            ));
        }
        let (grad_scale, checkpoint_every) = (input.grad_scale, input.checkpoint_every);
        let run = |(ids, targets, mask, docs, dropout): Piece,
                   grads: &mut Grads|
         -> candle_core::Result<f64> {
            let part = PassInput {
                ids: &ids,
                targets: &targets,
                mask: &mask,
                docs: docs.as_ref(),
                dropout: dropout.as_ref(),
                grad_scale,
                checkpoint_every,
            };
            train_pass(model, &part, grads)
        };
        let pools = &pools[..];
        let mut pieces = pieces.into_iter();
        let first = pieces.next().expect("at least two parts");
        let results: Vec<candle_core::Result<f64>> = std::thread::scope(|scope| {
            let handles: Vec<_> = pieces
                .zip(part_grads.iter_mut())
                .zip(&pools[1..])
                .map(|((piece, g), pool)| scope.spawn(move || pool.install(|| run(piece, g))))
                .collect();
            let mut out = vec![pools[0].install(|| run(first, grads))];
            for h in handles {
                out.push(h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
            }
            out
        });
        let mut total = 0f64;
        for r in results {
            total += r?;
        }
        for g in part_grads.iter_mut().take(parts - 1) {
            grads.absorb(g)?;
        }
        Ok(total)
    }

    /// One optimizer step over `micro_batches` (this rank's share of the global
    /// batch) at learning rate `lr`.
    pub fn step(&mut self, micro_batches: &[Batch], lr: f64) -> Result<StepStats> {
        // Every kernel of the step on a worker of rayon's pool (`on_pool`). Not with
        // ranks: ranks that are threads of one process would queue for the pool's
        // workers, and one waiting in a collective would hold a worker the others need.
        let cpu = self.strategy.world_size == 1 && self.model.device().is_cpu();
        crate::model::fused::on_pool(cpu, || self.step_here(micro_batches, lr))
    }

    /// With `fsdp`, the shards: validation and downstream tasks score with them, every
    /// rank gathering one block at a time (None for the other strategies).
    pub fn fsdp_mut(&mut self) -> Option<&mut super::fsdp::Fsdp> {
        match &mut self.opt {
            Optimizer::Fsdp(f) => Some(f),
            _ => None,
        }
    }

    /// What a checkpoint writes of the model, on rank 0 (None on the others): the model
    /// itself, or with `fsdp` a copy gathered unit by unit into host memory, its frozen
    /// base left out for a LoRA adapter (`trained_only`). Every rank must call it.
    pub fn checkpoint_model(&mut self, trained_only: bool) -> Result<Option<Gpt>> {
        match &mut self.opt {
            Optimizer::Fsdp(f) => f.gather_to_host(trained_only),
            _ => Ok(self.strategy.is_global_zero().then(|| self.model.clone())),
        }
    }

    /// Whether every trained parameter holds finite values only (with `fsdp`, every
    /// rank must call it).
    pub fn trained_finite(&self) -> Result<Option<String>> {
        if let Optimizer::Fsdp(f) = &self.opt {
            return Ok((!f.all_finite(&self.strategy)?).then(|| "a trained parameter".into()));
        }
        for (name, var) in self.opt.vars() {
            if !super::adamw::all_finite(var.as_tensor())? {
                return Ok(Some(name.clone()));
            }
        }
        Ok(None)
    }

    /// Bytes of parameter values the runner holds between steps: the model's tensors
    /// (LoRA matrices included), or with `fsdp` this rank's shards.
    pub fn held_parameter_bytes(&mut self) -> usize {
        if let Optimizer::Fsdp(f) = &mut self.opt {
            return f.held_parameter_bytes();
        }
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let mut n = 0;
        let model = &mut self.model;
        for blk in &mut model.blocks {
            n += blk
                .params_mut()
                .into_iter()
                .map(|t| bytes(t))
                .sum::<usize>();
        }
        n + model
            .outer_params_mut()
            .into_iter()
            .map(|t| bytes(t))
            .sum::<usize>()
    }

    /// Forward and backward of every micro-batch into the runner's gradient buffers:
    /// `Σ nll`, this rank's gradients (unscaled, in the variables' order), and whether
    /// they are already summed over the ranks. With `ddp` on several ranks they are:
    /// the last micro-batch sums each block's as its backward ends ([`overlap`]), and
    /// the rest after it.
    ///
    /// [`overlap`]: super::overlap
    fn passes(
        &mut self,
        micro_batches: &[Batch],
        scale: f64,
        denom: f64,
    ) -> Result<(f64, Vec<Tensor>, bool)> {
        let mut grads = self
            .grads
            .take()
            .unwrap_or_else(|| Grads::new(self.opt.vars()));
        let overlap =
            self.strategy.world_size > 1 && matches!(self.opt, Optimizer::Replicated { .. });
        let mut reduced = Vec::new();
        let mut passes = || -> Result<f64> {
            let mut total = 0f64;
            for (k, batch) in micro_batches.iter().enumerate() {
                if let Some(d) = &self.dropout {
                    d.next_micro_batch(batch.inputs.dim(0)?);
                }
                let parts = self.parts(batch)?;
                let input = pass_input(
                    batch,
                    self.dropout.as_ref(),
                    scale / denom,
                    self.activation_checkpointing,
                );
                total += if overlap && k + 1 == micro_batches.len() {
                    let (loss, slots) =
                        overlapped_pass(&self.model, &self.strategy, &input, &mut grads)?;
                    reduced = slots;
                    loss
                } else if parts > 1 {
                    Self::split_pass(
                        &self.model,
                        self.opt.vars(),
                        &mut self.split,
                        &input,
                        &mut grads,
                        parts,
                    )?
                } else {
                    train_pass(&self.model, &input, &mut grads)?
                };
            }
            Ok(total)
        };
        let passed = passes();
        let grads = self.grads.insert(grads);
        let total = passed?;
        let mut grads = grads.take(self.opt.vars())?;
        if overlap {
            // What the blocks' backwards did not sum: the embeddings, final norm, head.
            let (mut rest, at): (Vec<Tensor>, Vec<usize>) = (0..grads.len())
                .filter(|i| !reduced.contains(i))
                .map(|i| (grads[i].clone(), i))
                .unzip();
            self.strategy.all_reduce_grads(&mut rest)?;
            for (g, i) in rest.into_iter().zip(at) {
                grads[i] = g;
            }
        }
        if scale != 1.0 {
            for g in grads.iter_mut() {
                *g = (&*g / scale)?;
            }
        }
        Ok((total, grads, overlap))
    }

    /// [`StepRunner::step`] on this thread.
    fn step_here(&mut self, micro_batches: &[Batch], lr: f64) -> Result<StepStats> {
        let local_tokens: usize = micro_batches.iter().map(|b| b.tokens).sum();
        let total_tokens = self.strategy.all_reduce_sum(&[local_tokens as f64])?[0] as usize;
        let denom = total_tokens.max(1) as f64;
        let scale = self.scaler.map_or(1.0, |s| s.scale);
        let (total, grads) = match &mut self.opt {
            Optimizer::Fsdp(f) => {
                let mut total = 0f64;
                for batch in micro_batches {
                    if let Some(d) = &self.dropout {
                        d.next_micro_batch(batch.inputs.dim(0)?);
                    }
                    let input = pass_input(
                        batch,
                        self.dropout.as_ref(),
                        scale / denom,
                        self.activation_checkpointing,
                    );
                    total += f.pass(&input, &self.strategy)?;
                }
                (total, None)
            }
            _ => {
                let (total, grads, summed) = self.passes(micro_batches, scale, denom)?;
                (total, Some((grads, summed)))
            }
        };
        // Every rank learns every rank's loss, so all stop together on a bad one (under
        // 16-mixed, an overflow only skips the step and lowers the loss scale).
        let per_rank = self.strategy.all_gather_f64(total)?;
        let bad_rank = per_rank.iter().position(|l| !l.is_finite());
        if let (Some(r), None) = (bad_rank, self.scaler) {
            let on_rank = match per_rank.len() {
                1 => String::new(),
                w => format!(" on rank {r} (of {w})"),
            };
            return Err(Error::Msg(format!(
                "the loss is {}{on_rank}; training stopped before updating the weights. Lower --learning-rate (or set --grad-clip), then --resume auto continues from the last checkpoint",
                per_rank[r],
            )));
        }
        let loss = per_rank.iter().sum::<f64>() / denom;
        let norm = timed("optimizer", 0.0, || match (&mut self.opt, grads) {
            (Optimizer::Fsdp(f), _) => f.sync_grads(scale, &self.strategy, self.grad_clip),
            (opt, Some((grads, true))) => opt.sync_summed_grads(grads, self.grad_clip),
            (opt, Some((grads, false))) => opt.sync_grads(grads, &self.strategy, self.grad_clip),
            (_, None) => Err(super::sharded_adamw::no_gradients()),
        })?;
        let overflow = !norm.is_finite() || bad_rank.is_some();
        if let Some(s) = self.scaler.as_mut() {
            s.update(overflow);
        }
        let skipped = overflow && self.scaler.is_some();
        // Outside 16-mixed's skipped steps, a non-finite loss or gradient would turn
        // every weight into NaN: stop before the update instead (the norm is global, so
        // every rank decides the same).
        let finite = loss.is_finite() && norm.is_finite();
        if !(skipped || finite) {
            return Err(Error::Msg(format!(
                "the loss is {loss} and the gradient norm {norm} at learning rate {lr:e}; training stopped before updating the weights. Lower --learning-rate (or set --grad-clip), then --resume auto continues from the last checkpoint"
            )));
        }
        if !skipped {
            timed("optimizer", 0.0, || self.opt.update(lr, &self.strategy))?;
            // Updated rows into the matrices the next forward reads (fsdp's model is a
            // shell: each gathered copy gets them, Fsdp::gather_outer).
            if !matches!(self.opt, Optimizer::Fsdp(_)) {
                self.model.write_token_rows()?;
            }
        } else if let Optimizer::Fsdp(f) = &mut self.opt {
            f.skip();
        }
        Ok(StepStats {
            loss,
            grad_norm: norm,
            lr,
            tokens: total_tokens,
            skipped,
        })
    }
}

/// The engine's input for `batch`: its loss scaled by `grad_scale`, with `dropout`'s
/// masks, checkpointing every `checkpoint_every`-th block.
fn pass_input<'a>(
    batch: &'a Batch,
    dropout: Option<&'a Dropout>,
    grad_scale: f64,
    checkpoint_every: usize,
) -> PassInput<'a> {
    PassInput {
        ids: &batch.inputs,
        targets: &batch.targets,
        mask: &batch.mask,
        docs: batch.docs.as_ref(),
        dropout,
        grad_scale,
        checkpoint_every,
    }
}
