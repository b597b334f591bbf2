//! AdamW sharded over the ranks (ZeRO stage 1, `--strategy zero1`): each rank keeps
//! the moments of its shard of the parameters only.
//!
//! The trainable parameters are laid end to end in one f32 buffer, padded to
//! a multiple of the world size `W`; rank `r` owns the `r`-th of `W` equal shards:
//!
//! ```text
//! flat:   [ var 0 | var 1 | … | var n−1 | 0 0 ]      length P = W · S
//! shards: [ rank 0: S ][ rank 1: S ] … [ rank W−1: S ]
//!
//! step:   local gradients ─flatten─ reduce-scatter (Σ over ranks) ─► gradient shard
//!         ‖shard‖² ─all-reduce─► global norm, clip
//!         AdamW on (parameter shard, gradient shard, m shard, v shard)
//!         parameter shards ─all-gather─► flat ─split─► the variables
//! ```
//!
//! AdamW is element-wise, so the update of each element is the one the replicated
//! optimizer makes; only the memory for `m` and `v` is divided by `W`. A checkpoint
//! gathers the shards and holds the moments by variable name, as the replicated
//! optimizer writes them, so it reloads on any world size, sharded or not.

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};

use super::adamw::{AdamWConfig, clip_coefficient, saved_moment, update};
use crate::error::{Error, Result};
use crate::strategy::{Strategy, flatten, unflatten};

/// The error of an update without gradients to apply.
pub(super) fn no_gradients() -> Error {
    Error::Msg("optimizer update without gradients (sync_grads first)".into())
}

/// AdamW whose state covers this rank's shard of the flat parameters.
pub struct ShardedAdamW {
    cfg: AdamWConfig,
    vars: Vec<(String, Var)>,
    /// Length of the padded flat buffer.
    padded: usize,
    /// This rank's part of it.
    shard: std::ops::Range<usize>,
    /// Moments of the shard, f32.
    m: Tensor,
    v: Tensor,
    /// The gradient shard summed over ranks, for the next update.
    pending: Option<Tensor>,
    /// Steps taken.
    t: u64,
}

impl ShardedAdamW {
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamWConfig, strategy: &Strategy) -> Result<Self> {
        let n: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
        let (padded, shard) = strategy.shard_of(n);
        // Two buffers: the update writes both in place.
        let zeros = || Tensor::zeros(shard.len(), DType::F32, &strategy.device);
        Ok(ShardedAdamW {
            cfg,
            vars,
            padded,
            m: zeros()?,
            v: zeros()?,
            shard,
            pending: None,
            t: 0,
        })
    }

    /// The variables it updates, with their names.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    fn tensors(&self) -> Vec<Tensor> {
        self.vars
            .iter()
            .map(|(_, v)| v.as_tensor().clone())
            .collect()
    }

    /// Reduce-scatter this rank's gradients `grads` (in the variables' order) into
    /// this rank's shard of their sum, clipped to global norm `clip`, kept for
    /// [`ShardedAdamW::update`]; returns the global norm before clipping.
    pub fn sync_grads(
        &mut self,
        grads: &[Tensor],
        strategy: &Strategy,
        clip: Option<f64>,
    ) -> Result<f64> {
        if grads.len() != self.vars.len() {
            return Err(Error::Msg(format!(
                "optimizer got {} gradients for {} variables",
                grads.len(),
                self.vars.len()
            )));
        }
        let flat = flatten(grads.iter(), self.padded)?;
        let mut shard = strategy.reduce_scatter_sum(&flat)?;
        let sq = shard.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        let norm = strategy.all_reduce_sum(&[sq])?[0].sqrt();
        if let Some(c) = clip_coefficient(norm, clip) {
            shard = (shard * c)?;
        }
        self.pending = Some(shard);
        Ok(norm)
    }

    /// One AdamW step of this rank's shard at learning rate `lr`, then every rank's
    /// updated shard gathered into the variables.
    pub fn update(&mut self, lr: f64, strategy: &Strategy) -> Result<()> {
        let g = self.pending.take().ok_or_else(no_gradients)?;
        self.t += 1;
        let h = self.cfg.at_step(self.t, lr);
        let params = self.tensors();
        // A copy of this rank's shard of the parameters, updated in place or replaced.
        let mut p = flatten(params.iter(), self.padded)?
            .narrow(0, self.shard.start, self.shard.len())?
            .force_contiguous()?;
        if let Some(new) = update(&p, &g, &mut self.m, &mut self.v, &h)? {
            p = new;
        }
        let full = strategy.all_gather(&p)?;
        for ((_, var), value) in self.vars.iter().zip(unflatten(&full, &params)?) {
            var.set(&value)?;
        }
        Ok(())
    }

    /// Gather the moment shards and split them by variable (in the variables' dtype,
    /// as the replicated optimizer keeps them).
    pub fn state_tensors(&self, strategy: &Strategy) -> Result<Vec<(String, Tensor)>> {
        let params = self.tensors();
        let m = unflatten(&strategy.all_gather(&self.m)?, &params)?;
        let v = unflatten(&strategy.all_gather(&self.v)?, &params)?;
        let mut out = Vec::with_capacity(2 * self.vars.len());
        for (((name, _), m), v) in self.vars.iter().zip(m).zip(v) {
            out.push((format!("exp_avg.{name}"), m));
            out.push((format!("exp_avg_sq.{name}"), v));
        }
        Ok(out)
    }

    /// Moments by variable name: flattened like the parameters, this rank's shard kept.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, t: u64) -> Result<()> {
        let mut ms = Vec::with_capacity(self.vars.len());
        let mut vs = Vec::with_capacity(self.vars.len());
        for (name, var) in &self.vars {
            for (prefix, out) in [("exp_avg", &mut ms), ("exp_avg_sq", &mut vs)] {
                let k = format!("{prefix}.{name}");
                out.push(saved_moment(tensors, &k, var)?);
            }
        }
        let shard = |parts: &[Tensor]| -> Result<Tensor> {
            Ok(flatten(parts.iter(), self.padded)?
                .narrow(0, self.shard.start, self.shard.len())?
                .force_contiguous()?)
        };
        self.m = shard(&ms)?;
        self.v = shard(&vs)?;
        self.t = t;
        Ok(())
    }
}
