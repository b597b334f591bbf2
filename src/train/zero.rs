//! The optimizer of a run, replicated on every rank or sharded over them (ZeRO-1).
//!
//! Sharded, the trainable parameters are laid end to end in one f32 buffer, padded to
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

use super::optim::{AdamW, AdamWConfig, global_norm, update};
use crate::error::{Error, Result};
use crate::strategy::{DataParallel, Strategy, flatten, unflatten};

/// AdamW over the trainable variables, as the Strategy shares it between ranks.
pub enum Optimizer {
    /// The whole state on every rank (one rank, or `ddp`).
    Replicated {
        adam: AdamW,
        /// Gradients summed over ranks by [`Optimizer::sync_grads`], for the next update.
        /// Gradients of the last sync and their clipping factor.
        pending: Option<(Vec<Tensor>, f64)>,
    },
    /// This rank's shard of the state (`zero1`).
    Sharded(ShardedAdamW),
}

impl From<AdamW> for Optimizer {
    fn from(adam: AdamW) -> Self {
        Optimizer::Replicated {
            adam,
            pending: None,
        }
    }
}

impl Optimizer {
    /// AdamW over `vars`, shared between ranks as `strategy.parallel` says.
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamWConfig, strategy: &Strategy) -> Result<Self> {
        Ok(match strategy.parallel {
            DataParallel::Ddp => AdamW::new(vars, cfg)?.into(),
            DataParallel::Zero1 => Optimizer::Sharded(ShardedAdamW::new(vars, cfg, strategy)?),
        })
    }

    pub fn vars(&self) -> &[(String, Var)] {
        match self {
            Optimizer::Replicated { adam, .. } => adam.vars(),
            Optimizer::Sharded(z) => &z.vars,
        }
    }

    /// Sum this rank's gradients `grads` (in the variables' order) over ranks, keep
    /// them for [`Optimizer::update`], clip them to global norm `clip`; returns the
    /// global norm before clipping.
    pub fn sync_grads(
        &mut self,
        mut grads: Vec<Tensor>,
        strategy: &Strategy,
        clip: Option<f64>,
    ) -> Result<f64> {
        match self {
            Optimizer::Replicated { pending, .. } => {
                strategy.all_reduce_grads(&mut grads)?;
                let norm = global_norm(&grads)?;
                // Clipping scales the gradients inside the update's pass.
                *pending = Some((grads, clip_coefficient(norm, clip).unwrap_or(1.0)));
                Ok(norm)
            }
            Optimizer::Sharded(z) => z.sync_grads(&grads, strategy, clip),
        }
    }

    /// One AdamW step at learning rate `lr` with the gradients of the last
    /// [`Optimizer::sync_grads`].
    pub fn update(&mut self, lr: f64, strategy: &Strategy) -> Result<()> {
        match self {
            Optimizer::Replicated { adam, pending } => {
                let (grads, scale) = pending.take().ok_or_else(no_gradients)?;
                adam.step_scaled(&grads, lr, scale)
            }
            Optimizer::Sharded(z) => z.update(lr, strategy),
        }
    }

    /// The moments by variable name (`exp_avg.<name>`, `exp_avg_sq.<name>`). Sharded,
    /// this gathers the shards: every rank must call it.
    pub fn state_tensors(&self, strategy: &Strategy) -> Result<Vec<(String, Tensor)>> {
        match self {
            Optimizer::Replicated { adam, .. } => Ok(adam.state_tensors()),
            Optimizer::Sharded(z) => z.state_tensors(strategy),
        }
    }

    /// Restore moments written by [`Optimizer::state_tensors`] (by any world size) and
    /// the step count `t`.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, t: u64) -> Result<()> {
        match self {
            Optimizer::Replicated { adam, .. } => adam.load_state(tensors, t),
            Optimizer::Sharded(z) => z.load_state(tensors, t),
        }
    }
}

fn no_gradients() -> Error {
    Error::Msg("optimizer update without gradients (sync_grads first)".into())
}

/// PyTorch's `clip_grad_norm_` factor `max / (norm + 1e-6)`, when it is below 1.
fn clip_coefficient(norm: f64, clip: Option<f64>) -> Option<f64> {
    clip.map(|max| max / (norm + 1e-6)).filter(|&c| c < 1.0)
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

    fn tensors(&self) -> Vec<Tensor> {
        self.vars
            .iter()
            .map(|(_, v)| v.as_tensor().clone())
            .collect()
    }

    fn sync_grads(
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

    fn update(&mut self, lr: f64, strategy: &Strategy) -> Result<()> {
        let g = self.pending.take().ok_or_else(no_gradients)?;
        self.t += 1;
        let h = self.cfg.at_step(self.t, lr);
        let params = self.tensors();
        // A copy of this rank's shard of the parameters, updated in place or replaced.
        let mut p = flatten(params.iter(), self.padded)?
            .narrow(0, self.shard.start, self.shard.len())?
            .copy()?;
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
    fn state_tensors(&self, strategy: &Strategy) -> Result<Vec<(String, Tensor)>> {
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
    fn load_state(&mut self, tensors: &HashMap<String, Tensor>, t: u64) -> Result<()> {
        let mut ms = Vec::with_capacity(self.vars.len());
        let mut vs = Vec::with_capacity(self.vars.len());
        for (name, var) in &self.vars {
            for (prefix, out) in [("exp_avg", &mut ms), ("exp_avg_sq", &mut vs)] {
                let k = format!("{prefix}.{name}");
                out.push(super::optim::saved_moment(tensors, &k, var)?);
            }
        }
        let shard = |parts: &[Tensor]| -> Result<Tensor> {
            Ok(flatten(parts.iter(), self.padded)?
                .narrow(0, self.shard.start, self.shard.len())?
                .copy()?)
        };
        self.m = shard(&ms)?;
        self.v = shard(&vs)?;
        self.t = t;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use candle_core::Device;

    use super::*;
    use crate::strategy::threads::ThreadGroup;

    fn vars() -> Vec<(String, Var)> {
        let t = |n: usize, shape: &[usize]| {
            let v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
        };
        vec![
            ("a".into(), t(5, &[5])),
            ("b".into(), t(6, &[2, 3])),
            ("c".into(), t(4, &[4, 1])),
        ]
    }

    /// Rank `r`'s gradients at step `k`; their sum over ranks is `grads(k, world)`.
    fn grads(k: usize, r: usize) -> Vec<Tensor> {
        vars()
            .iter()
            .map(|(_, v)| {
                ((v.as_tensor().cos().unwrap() * (k as f64 + 1.0)).unwrap() * (r as f64 + 1.0))
                    .unwrap()
            })
            .collect()
    }

    fn values(ts: &[(String, Tensor)]) -> Vec<(String, Vec<f32>)> {
        ts.iter()
            .map(|(n, t)| (n.clone(), t.flatten_all().unwrap().to_vec1().unwrap()))
            .collect()
    }

    /// `f` on every rank of a thread group of `world` with a `zero1` strategy.
    fn on_ranks<T: Send>(world: usize, f: impl Fn(Strategy) -> T + Sync) -> Vec<T> {
        let group = ThreadGroup::new(world, Duration::from_secs(10));
        std::thread::scope(|s| {
            let f = &f;
            let hs: Vec<_> = group
                .handles()
                .into_iter()
                .map(|c| {
                    let st = Strategy::cpu().with_collective(c, DataParallel::Zero1);
                    s.spawn(move || f(st))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn sharded_steps_equal_replicated_ones_and_the_state_reloads_on_any_world() {
        let cfg = AdamWConfig::default();
        let world = 3;
        // One rank, replicated, with the gradients summed over the 3 ranks.
        let single = Strategy::cpu();
        let mut rep: Optimizer = AdamW::new(vars(), cfg).unwrap().into();
        for k in 0..2 {
            let mut sum = grads(k, 0);
            for r in 1..world {
                for (s, g) in sum.iter_mut().zip(grads(k, r)) {
                    *s = (&*s + g).unwrap();
                }
            }
            rep.sync_grads(sum, &single, Some(0.5)).unwrap();
            rep.update(1e-2, &single).unwrap();
        }
        let want_params: Vec<Vec<f32>> = rep
            .vars()
            .iter()
            .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
            .collect();
        let want_state = values(&rep.state_tensors(&single).unwrap());
        // Three ranks, sharded (15 values padded to 15: 5 a rank).
        let out = on_ranks(world, |st| {
            let mut z = Optimizer::new(vars(), cfg, &st).unwrap();
            for k in 0..2 {
                z.sync_grads(grads(k, st.rank), &st, Some(0.5)).unwrap();
                z.update(1e-2, &st).unwrap();
            }
            let params: Vec<Vec<f32>> = z
                .vars()
                .iter()
                .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
                .collect();
            (params, z.state_tensors(&st).unwrap())
        });
        let state = out[0].1.clone();
        for (params, s) in &out {
            for (p, w) in params.iter().zip(&want_params) {
                let d = p
                    .iter()
                    .zip(w)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(d < 1e-6, "parameters differ by {d}");
            }
            for ((n, a), (m, b)) in values(s).iter().zip(&want_state) {
                assert_eq!(n, m);
                let d = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                assert!(d < 1e-6, "{n} differs by {d}");
            }
        }
        // The gathered state reloads on 2 ranks (15 values padded to 16) and on 1.
        let map: HashMap<String, Tensor> = state.into_iter().collect();
        for w in [2, 1] {
            let back = on_ranks(w, |st| {
                let mut z = Optimizer::new(vars(), cfg, &st).unwrap();
                z.load_state(&map, 2).unwrap();
                values(&z.state_tensors(&st).unwrap())
            });
            let mut want: Vec<(String, Vec<f32>)> = map
                .iter()
                .map(|(n, t)| (n.clone(), t.flatten_all().unwrap().to_vec1().unwrap()))
                .collect();
            want.sort_by(|a, b| a.0.cmp(&b.0));
            for mut got in back {
                got.sort_by(|a, b| a.0.cmp(&b.0));
                assert_eq!(got, want, "world {w}");
            }
        }
        // A state missing a variable is named.
        let mut partial = map.clone();
        partial.remove("exp_avg.b");
        let e = on_ranks(2, |st| {
            let mut z = Optimizer::new(vars(), cfg, &st).unwrap();
            z.load_state(&partial, 2).unwrap_err().to_string()
        });
        assert!(e[0].contains("exp_avg.b"), "{}", e[0]);
    }
}
