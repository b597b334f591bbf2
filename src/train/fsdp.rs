//! Fully sharded data parallelism (ZeRO stage 3, `--strategy fsdp`): each rank holds
//! `1/W` of every parameter (the frozen base of a LoRA run too), of its gradient and
//! of AdamW's moments, and gathers a block's parameters only while it computes it.
//!
//! The model is cut into units, one per block plus one for everything outside the
//! blocks (embeddings, learned positions, final norm, head). A unit's parameters are
//! laid end to end in two flat buffers, the frozen ones and the trained ones, each
//! padded to a multiple of `W`; rank `r` keeps the `r`-th of `W` equal shards of each
//! (as in [`ShardedAdamW`](super::sharded_adamw::ShardedAdamW)):
//!
//! ```text
//! unit:    [ p₀ | p₁ | … | pₖ | 0 0 ]             length W · S
//! rank r:  shard r (S values) + its gradient shard + AdamW m, v of it
//!
//! pass     gather(outer)
//!          block 0 … L−1:   gather(block) ─ forward ─ free
//!          head + loss
//!          block L−1 … 0:   [recompute] ─ backward ─ free ─ gather(block before)
//!                           ─ reduce-scatter(its gradients) ─► += gradient shard
//!                           (block L−1 gathered before the loop)
//!          reduce-scatter(outer gradients); free outer
//! step     ‖gradient shards‖² ─all-reduce─► global norm, clip
//!          AdamW on (parameter shard, gradient shard, m, v), nothing gathered
//! ```
//!
//! The outer unit stays gathered through a pass (as PyTorch FSDP's root unit): the
//! embeddings are read by the first and the last operation of the pass, and a tied
//! head uses them in between.
//!
//! Embeddings a LoRA run trains (`--train-embeddings`) are trained parameters of the
//! outer unit like any other: the whole matrices (`all`), or the rows of the new
//! tokens, held apart from the matrices (`new`), which stay frozen. Each gathered copy
//! of the outer unit gets the rows written into its embeddings and untied head
//! (which a tied head is), as the replicated model does after every update; the
//! shards of the matrices keep the base's rows.
//!
//! On the thread backend the collectives run in this order on the computing thread.
//! On NCCL the all-gathers run on candle's stream, and each block's reduce-scatter is
//! queued on the communicator's side stream (see `strategy::nccl`) as soon as
//! its backward ends; candle's stream waits for its result only when the next block's
//! backward is queued (the shard is then added to the gradient shard), and for the
//! last one at the end of the pass. NCCL itself runs one communicator's kernels one at
//! a time, whatever their streams: so the engine gathers the block before once this
//! block's backward is queued and before its reduce-scatter (a prefetch one block
//! ahead), and that block's backward, needing only the gather, runs beside the
//! reduce-scatter.
//!
//! A model is sharded as it loads ([`FsdpBuilder`]): each block is sharded, and freed,
//! before the next is read. Validation gathers one block at a time as the training
//! forward does ([`Fsdp::score`]), and so do downstream tasks, scoring and generating
//! ([`Fsdp::infer`]: every forward, a generated token's included, gathers each block
//! in turn); a checkpoint gathers one unit at a time into rank
//! 0's host memory ([`Fsdp::gather_to_host`], [`Fsdp::state_tensors`]): the same files
//! `ddp` and `zero1` write (the moments by variable name), so they resume on any world
//! size and strategy.
//!
//! AdamW is element-wise and a unit's flat buffer holds every element once, so the
//! update is the one the replicated optimizer makes.

use std::collections::HashMap;

use candle_core::{DType, Tensor, TensorId, Var};

use super::adamw::{AdamWConfig, all_finite, clip_coefficient, update};
use super::sharded_adamw::no_gradients;
use crate::error::{Error, Result};
use crate::model::engine::{BlockSource, Grads, Infer, PassInput, train_pass_with};
use crate::model::{Block, Gpt};
use crate::strategy::{Pending, Strategy};

/// One parameter of a unit.
#[derive(Debug, Clone)]
struct Param {
    dims: Vec<usize>,
    dtype: DType,
    /// Its index among the trained parameters (None: frozen).
    slot: Option<usize>,
}

impl Param {
    fn len(&self) -> usize {
        self.dims.iter().product()
    }
}

/// This rank's shard of a flat buffer of parameters.
struct Part {
    /// `S` values, in `dtype`.
    shard: Tensor,
    /// Length of the whole buffer, padded (`W · S`).
    padded: usize,
}

/// The parameters of a block (or of the outer unit), sharded.
struct Unit {
    params: Vec<Param>,
    frozen: Option<Part>,
    trained: Option<Part>,
    /// This step's gradient shard, summed over ranks and micro-batches (f32).
    grad: Option<Tensor>,
    /// AdamW's moments of the trained shard (f32).
    m: Option<Tensor>,
    v: Option<Tensor>,
}

/// The model and its AdamW state, sharded over the ranks.
pub struct Fsdp {
    /// The model with every parameter an empty placeholder: names, layout, LoRA
    /// scales and row masks, no weights.
    shell: Gpt,
    /// Blocks `0..L`, then the outer unit.
    units: Vec<Unit>,
    /// Gradient buffers of the trained parameters, bound to each gathered copy.
    grads: Grads,
    /// Trained parameters' names (their optimizer state's keys), by slot.
    names: Vec<String>,
    cfg: AdamWConfig,
    /// Steps taken.
    t: u64,
    /// The clipping factor of the gradients of the last [`Fsdp::sync_grads`].
    pending: Option<f64>,
    /// The ranks it is sharded over.
    strategy: Strategy,
}

/// The value `t` stands for once sharded: 0 elements of its dtype, on the CPU (never
/// computed with; no zero-byte device allocation).
fn placeholder(t: &Tensor) -> Result<Tensor> {
    Ok(Tensor::zeros(0, t.dtype(), &candle_core::Device::Cpu)?)
}

/// `tensors` flattened into one buffer of `dtype`, padded with zeros to the next
/// multiple of the world size, of which this rank's shard is kept (a copy, so the
/// whole is freed).
fn shard_of(tensors: &[Tensor], dtype: DType, strategy: &Strategy) -> Result<Part> {
    let n: usize = tensors.iter().map(Tensor::elem_count).sum();
    let (padded, range) = strategy.shard_of(n);
    let mut parts = Vec::with_capacity(tensors.len() + 1);
    // Detached: ops on a trained variable record it, and the shard would keep the
    // whole variable (and the buffer cut from it) alive through its graph.
    for t in tensors {
        parts.push(t.detach().flatten_all()?.to_dtype(dtype)?);
    }
    let device = &strategy.device;
    if padded > n {
        parts.push(Tensor::zeros(padded - n, dtype, device)?);
    }
    let flat = Tensor::cat(&parts, 0)?;
    drop(parts);
    // `force_contiguous`, not `copy`: a copy of a view clones its whole storage.
    let shard = flat
        .narrow(0, range.start, range.len())?
        .force_contiguous()?;
    Ok(Part { shard, padded })
}

/// One dtype for a part: the parameters' own, or f32 when they differ.
fn part_dtype<'a>(params: impl Iterator<Item = &'a Param>) -> DType {
    let mut dt = None;
    for p in params {
        match dt {
            None => dt = Some(p.dtype),
            Some(d) if d != p.dtype => return DType::F32,
            _ => {}
        }
    }
    dt.unwrap_or(DType::F32)
}

impl Unit {
    /// Shard `tensors` (the unit's parameters in order, replaced by placeholders in
    /// the shell); `slots` maps trained tensors to their slot.
    fn shard(
        tensors: Vec<&mut Tensor>,
        slots: &HashMap<TensorId, usize>,
        strategy: &Strategy,
    ) -> Result<Self> {
        let mut params = Vec::with_capacity(tensors.len());
        let (mut frozen, mut trained) = (Vec::new(), Vec::new());
        for t in tensors {
            let slot = slots.get(&t.id()).copied();
            params.push(Param {
                dims: t.dims().to_vec(),
                dtype: t.dtype(),
                slot,
            });
            let value = std::mem::replace(t, placeholder(t)?);
            match slot {
                Some(_) => trained.push(value),
                None => frozen.push(value),
            }
        }
        let frozen_dt = part_dtype(params.iter().filter(|p| p.slot.is_none()));
        let trained_dt = part_dtype(params.iter().filter(|p| p.slot.is_some()));
        let frozen = (!frozen.is_empty())
            .then(|| shard_of(&frozen, frozen_dt, strategy))
            .transpose()?;
        let trained = (!trained.is_empty())
            .then(|| shard_of(&trained, trained_dt, strategy))
            .transpose()?;
        let zeros = |p: &Part| Tensor::zeros(p.shard.elem_count(), DType::F32, p.shard.device());
        let (m, v) = match &trained {
            Some(p) => (Some(zeros(p)?), Some(zeros(p)?)),
            None => (None, None),
        };
        Ok(Unit {
            params,
            frozen,
            trained,
            grad: None,
            m,
            v,
        })
    }

    /// Every parameter of the unit, whole, in order: the shards of every rank
    /// all-gathered.
    fn gather(&self, strategy: &Strategy) -> Result<Vec<Tensor>> {
        let gather = |p: &Option<Part>| -> Result<Option<Tensor>> {
            p.as_ref()
                .map(|p| strategy.all_gather(&p.shard))
                .transpose()
        };
        let (frozen, trained) = (gather(&self.frozen)?, gather(&self.trained)?);
        let (mut at_frozen, mut at_trained) = (0, 0);
        let mut out = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let (flat, at) = match p.slot {
                Some(_) => (&trained, &mut at_trained),
                None => (&frozen, &mut at_frozen),
            };
            let flat = flat
                .as_ref()
                .ok_or_else(|| Error::Msg("fsdp: a parameter without its buffer (a bug)".into()))?;
            let n = p.len();
            out.push(
                flat.narrow(0, *at, n)?
                    .reshape(p.dims.as_slice())?
                    .to_dtype(p.dtype)?,
            );
            *at += n;
        }
        Ok(out)
    }

    /// The unit's trained gradients of this pass (taken from `grads`, their buffers
    /// freed), summed over ranks: this rank's shard is added to [`Unit::grad`].
    fn reduce_grads(&mut self, grads: &mut Grads, strategy: &Strategy) -> Result<()> {
        match self.queue_grads(grads, strategy)? {
            Some(shard) => self.add_grad(shard.wait()?),
            None => Ok(()),
        }
    }

    /// [`Unit::reduce_grads`], the reduce-scatter queued
    /// ([`Strategy::reduce_scatter_sum_queued`]): its shard, for [`Unit::add_grad`]
    /// (None: nothing trained in the unit).
    fn queue_grads(&mut self, grads: &mut Grads, strategy: &Strategy) -> Result<Option<Pending>> {
        let Some(part) = &self.trained else {
            return Ok(None);
        };
        let mut local = Vec::new();
        for p in &self.params {
            if let Some(s) = p.slot {
                local.push(grads.take_freed(s, &strategy.device)?);
            }
        }
        let flat = crate::strategy::flatten(local.iter(), part.padded)?;
        drop(local);
        // The queued reduction keeps `flat` alive until it has been read.
        Ok(Some(strategy.reduce_scatter_sum_queued(&flat)?))
    }

    /// This step's gradient shard `+= shard`.
    fn add_grad(&mut self, shard: Tensor) -> Result<()> {
        self.grad = Some(match self.grad.take() {
            Some(g) => (g + shard)?,
            None => shard,
        });
        Ok(())
    }
}

/// Bind the trained tensors among `tensors` (a unit's gathered parameters) into `grads`.
fn bind(params: &[Param], tensors: &[Tensor], grads: &mut Grads) -> Result<()> {
    for (p, t) in params.iter().zip(tensors) {
        if let Some(s) = p.slot {
            grads.bind(s, t)?;
        }
    }
    Ok(())
}

/// The blocks of a pass, gathered on demand.
struct Blocks<'a> {
    shell: &'a Gpt,
    units: &'a mut [Unit],
    strategy: &'a Strategy,
    /// The block whose gradients' reduce-scatter is queued, not yet added to its shard.
    queued: Option<(usize, Pending)>,
}

impl Blocks<'_> {
    /// The queued reduce-scatter, if any, waited for and added to its unit's shard.
    fn settle(&mut self) -> Result<()> {
        match self.queued.take() {
            Some((i, shard)) => self.units[i].add_grad(shard.wait()?),
            None => Ok(()),
        }
    }
}

fn candle(e: Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl BlockSource for Blocks<'_> {
    fn count(&self) -> usize {
        self.shell.blocks.len()
    }

    fn fetch(&mut self, i: usize, grads: &mut Grads) -> candle_core::Result<Block> {
        let unit = &self.units[i];
        let values = unit.gather(self.strategy).map_err(candle)?;
        bind(&unit.params, &values, grads).map_err(candle)?;
        let mut blk = self.shell.blocks[i].clone();
        for (slot, v) in blk.params_mut().into_iter().zip(values) {
            *slot = v;
        }
        Ok(blk)
    }

    fn done(&mut self, i: usize, grads: &mut Grads) -> candle_core::Result<()> {
        let shard = self.units[i]
            .queue_grads(grads, self.strategy)
            .map_err(candle)?;
        // The previous block's shard, waited for only now that this block's backward
        // and reduce-scatter are queued ahead of the wait.
        self.settle().map_err(candle)?;
        self.queued = shard.map(|s| (i, s));
        Ok(())
    }

    fn agree(&mut self, xs: &[f64]) -> candle_core::Result<Vec<f64>> {
        self.strategy.broadcast_f64(xs).map_err(candle)
    }
}

/// An [`Fsdp`] made block by block as a model loads, so that no rank ever holds more
/// than one block whole besides the parts outside the blocks.
pub struct FsdpBuilder {
    strategy: Strategy,
    units: Vec<Unit>,
    /// Trained parameters' names and their `(shape, dtype)`, by slot.
    names: Vec<String>,
    shapes: Vec<(Vec<usize>, DType)>,
    /// The slot of each trained tensor registered.
    slots: HashMap<TensorId, usize>,
}

impl FsdpBuilder {
    pub fn new(strategy: &Strategy) -> Self {
        FsdpBuilder {
            strategy: strategy.clone(),
            units: Vec::new(),
            names: Vec::new(),
            shapes: Vec::new(),
            slots: HashMap::new(),
        }
    }

    /// `vars` as the next trained slots.
    fn register(&mut self, vars: Vec<(String, Var)>) {
        for (name, v) in vars {
            self.slots.insert(v.as_tensor().id(), self.names.len());
            self.shapes.push((v.dims().to_vec(), v.dtype()));
            self.names.push(name);
        }
    }

    /// The next block, with its trained variables `vars` (already rank 0's values on
    /// every rank): this rank keeps its shard; the block returned holds placeholders.
    pub fn shard_block(&mut self, mut blk: Block, vars: Vec<(String, Var)>) -> Result<Block> {
        self.register(vars);
        let unit = Unit::shard(blk.params_mut(), &self.slots, &self.strategy)?;
        self.units.push(unit);
        Ok(blk)
    }

    /// The outer unit of `model` (whose blocks went through [`FsdpBuilder::shard_block`]),
    /// with the trained variables outside the blocks `vars`: the sharded model and its
    /// AdamW.
    pub fn finish(
        mut self,
        mut model: Gpt,
        vars: Vec<(String, Var)>,
        cfg: AdamWConfig,
    ) -> Result<Fsdp> {
        if self.units.len() != model.blocks.len() {
            return Err(Error::Msg(format!(
                "fsdp: {} of {} blocks sharded (a bug)",
                self.units.len(),
                model.blocks.len()
            )));
        }
        self.register(vars);
        let unit = Unit::shard(model.outer_params_mut(), &self.slots, &self.strategy)?;
        self.units.push(unit);
        if model.cfg.tie_embeddings {
            model.lm_head.weight = model.wte.clone();
        }
        let found: usize = self
            .units
            .iter()
            .map(|u| u.params.iter().filter(|p| p.slot.is_some()).count())
            .sum();
        if found != self.names.len() {
            return Err(Error::Msg(format!(
                "fsdp: {found} of the {} trained variables are parameters of the model (a bug)",
                self.names.len()
            )));
        }
        Ok(Fsdp {
            shell: model,
            units: self.units,
            grads: Grads::unbound(self.shapes),
            names: self.names,
            cfg,
            t: 0,
            pending: None,
            strategy: self.strategy,
        })
    }
}

impl Fsdp {
    /// Number of trained parameters (whole, not this rank's share).
    pub fn trained_elements(&self) -> usize {
        let units = self.units.iter().flat_map(|u| &u.params);
        units.filter(|p| p.slot.is_some()).map(Param::len).sum()
    }

    /// The model with every parameter a placeholder of 0 elements.
    pub fn shell(&self) -> &Gpt {
        &self.shell
    }

    /// The outer unit gathered: the shell without blocks, with its embeddings, final
    /// norm and head.
    fn gather_outer(&mut self, strategy: &Strategy) -> Result<Gpt> {
        let outer = self.units.last().expect("the outer unit");
        let values = outer.gather(strategy)?;
        bind(&outer.params, &values, &mut self.grads)?;
        let mut model = Gpt {
            blocks: Vec::new(),
            ..self.shell.clone()
        };
        for (slot, v) in model.outer_params_mut().into_iter().zip(values) {
            *slot = v;
        }
        if model.cfg.tie_embeddings {
            model.lm_head.weight = model.wte.clone();
        }
        // Trained rows into this copy's matrices (fresh from the gather: the shards
        // keep the base's rows).
        model.write_token_rows()?;
        Ok(model)
    }

    /// What a checkpoint writes of the model, gathered unit by unit (every rank must
    /// call it): on rank 0, a copy in host memory, with only the trained parameters
    /// when `trained_only` (a LoRA adapter; the frozen base stays placeholders); None
    /// on the other ranks, which drop each gathered unit at once. No device holds more
    /// than one unit whole.
    pub fn gather_to_host(&mut self, trained_only: bool) -> Result<Option<Gpt>> {
        let strategy = self.strategy.clone();
        let zero = strategy.is_global_zero();
        let host = candle_core::Device::Cpu;
        let keep = |unit: &Unit, values: Vec<Tensor>| -> Result<Vec<Tensor>> {
            let mut out = Vec::with_capacity(values.len());
            for (p, v) in unit.params.iter().zip(values) {
                out.push(if trained_only && p.slot.is_none() {
                    placeholder(&v)?
                } else {
                    v.to_device(&host)?
                });
            }
            Ok(out)
        };
        let mut model = Gpt {
            blocks: Vec::new(),
            ..self.shell.clone()
        };
        for (i, blk) in self.shell.blocks.iter().enumerate() {
            let values = self.units[i].gather(&strategy)?;
            if !zero {
                continue;
            }
            let mut blk = blk.clone();
            let values = keep(&self.units[i], values)?;
            for (slot, v) in blk.params_mut().into_iter().zip(values) {
                *slot = v;
            }
            model.blocks.push(blk);
        }
        let outer = self.units.last().expect("the outer unit");
        let values = outer.gather(&strategy)?;
        if !zero {
            return Ok(None);
        }
        for (slot, v) in model
            .outer_params_mut()
            .into_iter()
            .zip(keep(outer, values)?)
        {
            *slot = v;
        }
        if model.cfg.tie_embeddings {
            model.lm_head.weight = model.wte.clone();
        }
        if !trained_only {
            // The whole model as the forward reads it: trained rows in the matrices.
            model.write_token_rows()?;
        }
        for lin in model.linears_mut() {
            if let Some(l) = &mut lin.lora
                && let Some(m) = &l.out_mask
            {
                l.out_mask = Some(m.to_device(&host)?);
            }
        }
        Ok(Some(model))
    }

    /// The scores of `ids` against `targets` (the validation's forward), gathering each
    /// block for its forward only (every rank must call it, with its own or the same
    /// batch).
    pub fn score(
        &mut self,
        ids: &Tensor,
        docs: Option<&std::sync::Arc<[u32]>>,
        targets: &[u32],
    ) -> Result<crate::model::engine::Scores> {
        self.infer(|m| Ok(m.score(ids, docs, targets)?))
    }

    /// `f` run with the model for passes without a backward (downstream tasks: scoring
    /// and generation): the outer unit gathered for the whole of `f`, each block
    /// gathered for each forward only, never the model at once (every rank must call
    /// it, and make the same calls in `f`; a token generated is rank 0's on every rank).
    pub fn infer<R>(&mut self, f: impl FnOnce(&mut Infer<'_>) -> Result<R>) -> Result<R> {
        let strategy = self.strategy.clone();
        let outer = self.gather_outer(&strategy)?;
        let n = self.units.len();
        let mut src = Blocks {
            shell: &self.shell,
            units: &mut self.units[..n - 1],
            strategy: &strategy,
            queued: None,
        };
        f(&mut Infer::with_blocks(&outer, &mut src, &mut self.grads))
    }

    /// Forward and backward of one micro-batch, gathering each unit when it is
    /// needed; its gradients are added to this rank's gradient shards. Returns `Σ nll`.
    pub fn pass(&mut self, inp: &PassInput, strategy: &Strategy) -> Result<f64> {
        let outer = self.gather_outer(strategy)?;
        let n = self.units.len();
        let (blocks, last) = self.units.split_at_mut(n - 1);
        let mut src = Blocks {
            shell: &self.shell,
            units: blocks,
            strategy,
            queued: None,
        };
        let loss = train_pass_with(&outer, &mut src, inp, &mut self.grads)?;
        src.settle()?;
        drop(outer);
        last[0].reduce_grads(&mut self.grads, strategy)?;
        Ok(loss)
    }

    /// After a step's passes: the gradient shards divided by `scale` (16-mixed's loss
    /// scale), their global norm, and the clipping factor kept for [`Fsdp::update`].
    pub fn sync_grads(
        &mut self,
        scale: f64,
        strategy: &Strategy,
        clip: Option<f64>,
    ) -> Result<f64> {
        let mut sq = 0f64;
        for u in &mut self.units {
            let Some(part) = &u.trained else { continue };
            let mut g = match u.grad.take() {
                Some(g) => g,
                None => Tensor::zeros(part.shard.elem_count(), DType::F32, &strategy.device)?,
            };
            if scale != 1.0 {
                g = (g / scale)?;
            }
            sq += g
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            u.grad = Some(g);
        }
        let norm = strategy.all_reduce_sum(&[sq])?[0].sqrt();
        self.pending = Some(clip_coefficient(norm, clip).unwrap_or(1.0));
        Ok(norm)
    }

    /// Forget the gradients of a skipped step.
    pub fn skip(&mut self) {
        self.pending = None;
        for u in &mut self.units {
            u.grad = None;
        }
    }

    /// One AdamW step of this rank's shards at learning rate `lr`; nothing is gathered.
    pub fn update(&mut self, lr: f64) -> Result<()> {
        let scale = self.pending.take().ok_or_else(no_gradients)?;
        self.t += 1;
        let mut h = self.cfg.at_step(self.t, lr);
        h.grad_scale = scale;
        for u in &mut self.units {
            let (Some(part), Some(m), Some(v)) = (&mut u.trained, &mut u.m, &mut u.v) else {
                continue;
            };
            let g = u.grad.take().ok_or_else(no_gradients)?;
            let dtype = part.shard.dtype();
            // f32 for the update; an f32 shard is updated in place.
            let mut p = part.shard.to_dtype(DType::F32)?;
            if let Some(new) = update(&p, &g, m, v, &h)? {
                p = new;
            }
            part.shard = p.to_dtype(dtype)?;
        }
        Ok(())
    }

    /// Whether every rank's trained shards hold finite values only (every rank must
    /// call it).
    pub fn all_finite(&self, strategy: &Strategy) -> Result<bool> {
        let mut bad = 0f64;
        for u in &self.units {
            if let Some(p) = &u.trained
                && !all_finite(&p.shard)?
            {
                bad = 1.0;
            }
        }
        Ok(strategy.all_reduce_sum(&[bad])?[0] == 0.0)
    }

    /// Bytes of parameter values this rank holds between steps: its shards and the
    /// shell's placeholders (whose parameters hold none).
    pub fn held_parameter_bytes(&mut self) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let mut n = 0;
        for u in &self.units {
            for p in [&u.frozen, &u.trained].into_iter().flatten() {
                n += bytes(&p.shard);
            }
        }
        for blk in &mut self.shell.blocks {
            n += blk
                .params_mut()
                .into_iter()
                .map(|t| bytes(t))
                .sum::<usize>();
        }
        n + self
            .shell
            .outer_params_mut()
            .into_iter()
            .map(|t| bytes(t))
            .sum::<usize>()
    }

    /// The moments by variable name (`exp_avg.<name>`, `exp_avg_sq.<name>`), gathered
    /// unit by unit and split like the parameters: what the replicated optimizer
    /// writes, in rank 0's host memory (the other ranks, which write nothing, get none
    /// and drop each gathered unit at once). Every rank must call it.
    pub fn state_tensors(&self, strategy: &Strategy) -> Result<Vec<(String, Tensor)>> {
        let zero = strategy.is_global_zero();
        let mut m_of = vec![None; self.names.len()];
        let mut v_of = vec![None; self.names.len()];
        for u in &self.units {
            let (Some(m), Some(v)) = (&u.m, &u.v) else {
                continue;
            };
            let trained: Vec<&Param> = u.params.iter().filter(|p| p.slot.is_some()).collect();
            for (moment, out) in [(m, &mut m_of), (v, &mut v_of)] {
                let flat = strategy.all_gather(moment)?;
                if !zero {
                    continue;
                }
                let flat = flat.to_device(&candle_core::Device::Cpu)?;
                let mut at = 0;
                for p in &trained {
                    let n = p.len();
                    let t = flat
                        .narrow(0, at, n)?
                        .reshape(p.dims.as_slice())?
                        .to_dtype(p.dtype)?;
                    out[p.slot.expect("trained")] = Some(t);
                    at += n;
                }
            }
        }
        if !zero {
            return Ok(Vec::new());
        }
        let mut out = Vec::with_capacity(2 * self.names.len());
        for ((name, m), v) in self.names.iter().zip(m_of).zip(v_of) {
            let missing = || Error::Msg(format!("fsdp: no moments of {name} (a bug)"));
            out.push((format!("exp_avg.{name}"), m.ok_or_else(missing)?));
            out.push((format!("exp_avg_sq.{name}"), v.ok_or_else(missing)?));
        }
        Ok(out)
    }

    /// Moments by variable name (written by any strategy on any world size): this
    /// rank's shard of each unit kept; and the step count `t`.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, t: u64) -> Result<()> {
        let strategy = &self.strategy;
        for u in &mut self.units {
            if u.trained.is_none() {
                continue;
            }
            let trained: Vec<&Param> = u.params.iter().filter(|p| p.slot.is_some()).collect();
            let mut shards = Vec::with_capacity(2);
            for prefix in ["exp_avg", "exp_avg_sq"] {
                let mut parts = Vec::with_capacity(trained.len());
                for p in &trained {
                    let name = &self.names[p.slot.expect("trained")];
                    let key = format!("{prefix}.{name}");
                    let x = tensors.get(&key).ok_or_else(|| {
                        Error::Msg(format!(
                            "optimizer state has no {key}; was the checkpoint written by another run?"
                        ))
                    })?;
                    if x.dims() != p.dims.as_slice() {
                        return Err(Error::Msg(format!(
                            "optimizer state {key} has shape {:?}, the parameter {:?}",
                            x.dims(),
                            p.dims
                        )));
                    }
                    parts.push(x.to_device(&strategy.device)?);
                }
                shards.push(shard_of(&parts, DType::F32, strategy)?.shard);
            }
            u.v = shards.pop();
            u.m = shards.pop();
        }
        self.t = t;
        Ok(())
    }
}
