//! DDP's gradient all-reduce overlapped with the backward: in the last micro-batch of
//! a step, each block's gradients are summed over the ranks as soon as its backward
//! ends, while the blocks before it are still to be computed; what is left (the
//! embeddings, final norm and head) after the pass.
//!
//! ```text
//! backward  block L−1 ─ all-reduce(L−1's buckets) ─ block L−2 ─ all-reduce(…) ─ … ─ block 0
//!           ─ all-reduce(0's buckets) ─ embeddings ─ all-reduce(the rest)
//! ```
//!
//! The sums are the same as after the backward (each element is summed over the ranks
//! in rank order either way), so the run is unchanged. On the thread backend the calls
//! run in this order on the computing thread. On NCCL each block's all-reduces are
//! queued on the communicator's side stream (see `strategy::nccl`) and run
//! there while the next block's backward runs on candle's stream; that stream waits for
//! a block's sums only once the next block's backward is queued (when they are put back
//! into the gradient buffers), and for the last ones at the end of the pass.
//!
//! ```text
//! candle's stream  bwd(L−1) ─ flatten ─ bwd(L−2) ─ flatten ─ wait(L−1) ─ bwd(L−3) …
//! side stream                 └─ all-reduce(L−1) ─┘└─ all-reduce(L−2) ─┘
//! ```

use candle_core::Tensor;

use crate::model::engine::{BlockSource, Grads, PassInput, train_pass_with};
use crate::model::{Block, Gpt};
use crate::strategy::{QueuedGrads, Strategy};

/// The model's own blocks; each block's gradients all-reduced when its backward ends.
struct Overlapped<'a> {
    model: &'a Gpt,
    strategy: &'a Strategy,
    /// Gradient buffers already summed over the ranks (or being summed).
    reduced: Vec<usize>,
    /// The block whose sums are queued and not yet put back into the buffers.
    queued: Option<(usize, QueuedGrads)>,
}

fn candle(e: crate::error::Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl Overlapped<'_> {
    fn params(&self, i: usize) -> Vec<Tensor> {
        let mut blk = self.model.blocks[i].clone();
        blk.params_mut().into_iter().map(|t| t.clone()).collect()
    }

    /// Block `i`'s queued sums, waited for and put in place of its buffers.
    fn settle(
        &self,
        (i, queued): (usize, QueuedGrads),
        grads: &mut Grads,
    ) -> candle_core::Result<()> {
        let sums = queued.wait().map_err(candle)?;
        grads.replace_buffers(&self.params(i), |bufs| {
            if bufs.len() != sums.len() {
                candle_core::bail!(
                    "block {i}: {} gradient buffers, {} sums (a bug)",
                    bufs.len(),
                    sums.len()
                );
            }
            for (b, s) in bufs.iter_mut().zip(sums) {
                *b = s;
            }
            Ok(())
        })?;
        Ok(())
    }
}

impl BlockSource for Overlapped<'_> {
    fn count(&self) -> usize {
        self.model.blocks.len()
    }

    fn fetch(&mut self, i: usize, _grads: &mut Grads) -> candle_core::Result<Block> {
        Ok(self.model.blocks[i].clone())
    }

    fn done(&mut self, i: usize, grads: &mut Grads) -> candle_core::Result<()> {
        let strategy = self.strategy;
        let mut queued = None;
        let slots = grads.replace_buffers(&self.params(i), |bufs| {
            queued = Some(strategy.all_reduce_grads_queued(bufs).map_err(candle)?);
            Ok(())
        })?;
        self.reduced.extend(slots);
        // The previous block's sums, waited for only now that this block's backward
        // and reductions are queued ahead of the wait.
        if let Some(previous) = std::mem::replace(&mut self.queued, queued.map(|q| (i, q))) {
            self.settle(previous, grads)?;
        }
        Ok(())
    }
}

/// [`crate::model::engine::train_pass`] with each block's gradients (accumulated over
/// the step's micro-batches) summed over the ranks as its backward ends: `Σ nll`, and
/// the indices of the gradient buffers summed.
pub(super) fn overlapped_pass(
    model: &Gpt,
    strategy: &Strategy,
    input: &PassInput,
    grads: &mut Grads,
) -> crate::error::Result<(f64, Vec<usize>)> {
    let mut blocks = Overlapped {
        model,
        strategy,
        reduced: Vec::new(),
        queued: None,
    };
    let loss = train_pass_with(model, &mut blocks, input, grads)?;
    if let Some(last) = blocks.queued.take() {
        blocks.settle(last, grads)?;
    }
    Ok((loss, blocks.reduced))
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use candle_core::Device;

    use super::*;
    use crate::config::load_config;
    use crate::error::Result;
    use crate::model::build_model;
    use crate::model::weights::Weights;
    use crate::strategy::threads::ThreadGroup;
    use crate::strategy::{Collective, ReduceOp, StrategyKind};
    use crate::train::batches::Batch;

    type Log = Arc<Mutex<Vec<String>>>;

    /// A rank's collective writing each all-reduce of gradients into `log`.
    struct Logged {
        inner: Arc<dyn Collective>,
        log: Log,
    }

    impl Collective for Logged {
        fn rank(&self) -> usize {
            self.inner.rank()
        }
        fn world_size(&self) -> usize {
            self.inner.world_size()
        }
        fn all_reduce(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
            self.log
                .lock()
                .unwrap()
                .push(format!("all-reduce {}", x.elem_count()));
            self.inner.all_reduce(x, op)
        }
        fn reduce_scatter(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
            self.inner.reduce_scatter(x, op)
        }
        fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
            self.inner.all_gather(x)
        }
        fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
            self.inner.broadcast(x, root)
        }
        fn barrier(&self) -> Result<()> {
            self.inner.barrier()
        }
        fn abort(&self, reason: &str) {
            self.inner.abort(reason)
        }
    }

    /// [`Overlapped`], writing into `log` when each block's backward begins.
    struct Watched<'a> {
        inner: Overlapped<'a>,
        log: Log,
        fetched: Vec<bool>,
    }

    impl BlockSource for Watched<'_> {
        fn count(&self) -> usize {
            self.inner.count()
        }
        fn fetch(&mut self, i: usize, grads: &mut Grads) -> candle_core::Result<Block> {
            if std::mem::replace(&mut self.fetched[i], true) {
                self.log.lock().unwrap().push(format!("backward {i}"));
            }
            self.inner.fetch(i, grads)
        }
        fn done(&mut self, i: usize, grads: &mut Grads) -> candle_core::Result<()> {
            self.inner.done(i, grads)
        }
    }

    fn values(ts: &[Tensor]) -> Vec<Vec<f32>> {
        ts.iter()
            .map(|t| t.flatten_all().unwrap().to_vec1().unwrap())
            .collect()
    }

    /// Issue 26: each block's gradients are all-reduced as soon as its backward ends,
    /// before the next block's backward begins, and the sums are those of one
    /// all-reduce after the whole backward.
    #[test]
    fn each_block_is_reduced_between_the_backwards_and_the_sums_are_unchanged() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference/llama");
        let cfg = load_config(&dir).unwrap();
        let mut opts = crate::model::BuildOptions::cpu_f32();
        opts.trainable = true;
        let weights = Weights::open(&dir).unwrap();
        let group = ThreadGroup::new(2, Duration::from_secs(30));
        /// A rank's log, and its gradients summed after and during the backward.
        type Seen = (Vec<String>, Vec<Vec<f32>>, Vec<Vec<f32>>);
        let out: Vec<Seen> = std::thread::scope(|s| {
            let hs: Vec<_> = group
                .handles()
                .into_iter()
                .map(|c| {
                    let (cfg, opts, weights) = (&cfg, &opts, &weights);
                    s.spawn(move || {
                        let log: Log = Arc::default();
                        let logged = Arc::new(Logged {
                            inner: c,
                            log: log.clone(),
                        });
                        let st = crate::strategy::Strategy::cpu()
                            .with_collective(logged, StrategyKind::Ddp);
                        let tm = build_model(cfg, weights, opts).unwrap();
                        let r = st.rank as u32;
                        let sample: Vec<u32> = (0..9).map(|i| (7 * i + 3 * r + 1) % 200).collect();
                        let batch = Batch::from_samples(&[sample], 9, &Device::Cpu).unwrap();
                        let input = PassInput {
                            ids: &batch.inputs,
                            targets: &batch.targets,
                            mask: &batch.mask,
                            docs: None,
                            dropout: None,
                            grad_scale: 0.1,
                            checkpoint_every: 0,
                        };
                        // After the backward: one all-reduce of everything.
                        let mut grads = Grads::new(&tm.vars);
                        crate::model::engine::train_pass(&tm.model, &input, &mut grads).unwrap();
                        let mut after = grads.take(&tm.vars).unwrap();
                        st.all_reduce_grads(&mut after).unwrap();
                        log.lock().unwrap().clear();
                        // Overlapped, then the rest.
                        let mut grads = Grads::new(&tm.vars);
                        let mut watched = Watched {
                            inner: Overlapped {
                                model: &tm.model,
                                strategy: &st,
                                reduced: Vec::new(),
                                queued: None,
                            },
                            log: log.clone(),
                            fetched: vec![false; tm.model.blocks.len()],
                        };
                        train_pass_with(&tm.model, &mut watched, &input, &mut grads).unwrap();
                        if let Some(last) = watched.inner.queued.take() {
                            watched.inner.settle(last, &mut grads).unwrap();
                        }
                        let reduced = watched.inner.reduced;
                        let mut during = grads.take(&tm.vars).unwrap();
                        let rest: Vec<usize> =
                            (0..during.len()).filter(|i| !reduced.contains(i)).collect();
                        let mut others: Vec<Tensor> =
                            rest.iter().map(|&i| during[i].clone()).collect();
                        st.all_reduce_grads(&mut others).unwrap();
                        for (&i, g) in rest.iter().zip(others) {
                            during[i] = g;
                        }
                        let log = log.lock().unwrap().clone();
                        (log, values(&after), values(&during))
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // The reference model's 2 blocks: one bucket each (under 4 MB), reduced right
        // after their backward: block 1's once block 0 is fetched for its backward
        // (the engine fetches the block before ahead of `done`) and before that
        // backward runs, block 0's after it.
        for (log, after, during) in out {
            assert_eq!(log.len(), 5, "{log:?}");
            assert_eq!(log[0], "backward 1");
            assert_eq!(log[1], "backward 0");
            assert!(log[2].starts_with("all-reduce "), "{log:?}");
            assert_eq!(log[3], log[2], "{log:?}");
            // Then the embeddings, final norm and head, after the pass.
            assert!(
                log[4].starts_with("all-reduce ") && log[4] != log[2],
                "{log:?}"
            );
            assert_eq!(after, during);
        }
    }
}
