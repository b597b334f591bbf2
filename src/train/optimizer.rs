//! The optimizer of a run: AdamW over the trainable variables, its state kept whole
//! on every rank (`--strategy ddp`, and every one-rank run) or sharded over the ranks
//! (`--strategy zero1`, [`ShardedAdamW`]). Both make the same update; the trainer
//! sees one [`Optimizer`] either way.
//!
//! ```text
//! sync_grads   gradients summed over ranks, their global norm, the clipping factor
//! update       one AdamW step with them
//! state_tensors / load_state   the moments by variable name, for checkpoints
//! ```

use std::collections::HashMap;

use candle_core::{Tensor, Var};

use super::adamw::{AdamW, AdamWConfig, clip_coefficient, global_norm};
use super::fsdp::Fsdp;
use super::sharded_adamw::{ShardedAdamW, no_gradients};
use crate::error::{Error, Result};
use crate::strategy::{Strategy, StrategyKind};

/// AdamW over the trainable variables, as the Strategy shares it between ranks.
pub enum Optimizer {
    /// The whole state on every rank (one rank, or `ddp`).
    Replicated {
        adam: AdamW,
        /// The gradients of the last [`Optimizer::sync_grads`], summed over ranks, with
        /// their clipping factor, for the next update.
        pending: Option<(Vec<Tensor>, f64)>,
    },
    /// This rank's shard of the state (`zero1`).
    Sharded(ShardedAdamW),
    /// This rank's shard of the parameters, gradients and state (`fsdp`): the model
    /// itself lives here, and its passes run through [`Fsdp::pass`].
    Fsdp(Box<Fsdp>),
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
    /// AdamW over `vars`, shared between ranks as `strategy.kind` says. `fsdp` shards
    /// the model too, as it loads: [`super::fsdp::FsdpBuilder`].
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamWConfig, strategy: &Strategy) -> Result<Self> {
        Ok(match strategy.kind {
            StrategyKind::Ddp => AdamW::new(vars, cfg)?.into(),
            StrategyKind::Zero1 => Optimizer::Sharded(ShardedAdamW::new(vars, cfg, strategy)?),
            StrategyKind::Fsdp => {
                return Err(Error::Msg(
                    "--strategy fsdp shards the model with its optimizer as it loads (FsdpBuilder; a bug)".into(),
                ));
            }
        })
    }

    /// The trained variables (none for `fsdp`, whose parameters are shards).
    pub fn vars(&self) -> &[(String, Var)] {
        match self {
            Optimizer::Replicated { adam, .. } => adam.vars(),
            Optimizer::Sharded(z) => z.vars(),
            Optimizer::Fsdp(_) => &[],
        }
    }

    /// Number of trained parameters.
    pub fn trained_elements(&self) -> usize {
        match self {
            Optimizer::Fsdp(f) => f.trained_elements(),
            _ => self.vars().iter().map(|(_, v)| v.elem_count()).sum(),
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
            Optimizer::Fsdp(_) => Err(Error::Msg(
                "fsdp reduces its gradients during the backward (Fsdp::sync_grads; a bug)".into(),
            )),
        }
    }

    /// Like [`Optimizer::sync_grads`] for gradients already summed over the ranks
    /// (`ddp` overlapping its all-reduce with the backward).
    pub fn sync_summed_grads(&mut self, grads: Vec<Tensor>, clip: Option<f64>) -> Result<f64> {
        match self {
            Optimizer::Replicated { pending, .. } => {
                let norm = global_norm(&grads)?;
                *pending = Some((grads, clip_coefficient(norm, clip).unwrap_or(1.0)));
                Ok(norm)
            }
            _ => Err(Error::Msg(
                "only ddp sums its gradients during the backward (a bug)".into(),
            )),
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
            Optimizer::Fsdp(f) => f.update(lr),
        }
    }

    /// The moments by variable name (`exp_avg.<name>`, `exp_avg_sq.<name>`). Sharded,
    /// this gathers the shards: every rank must call it.
    pub fn state_tensors(&self, strategy: &Strategy) -> Result<Vec<(String, Tensor)>> {
        match self {
            Optimizer::Replicated { adam, .. } => Ok(adam.state_tensors()),
            Optimizer::Sharded(z) => z.state_tensors(strategy),
            Optimizer::Fsdp(f) => f.state_tensors(strategy),
        }
    }

    /// Restore moments written by [`Optimizer::state_tensors`] (by any world size) and
    /// the step count `t`.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, t: u64) -> Result<()> {
        match self {
            Optimizer::Replicated { adam, .. } => adam.load_state(tensors, t),
            Optimizer::Sharded(z) => z.load_state(tensors, t),
            Optimizer::Fsdp(f) => f.load_state(tensors, t),
        }
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
                    let st = Strategy::cpu().with_collective(c, StrategyKind::Zero1);
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
