//! Collective operations between the ranks of a run: the one interface data-parallel
//! training talks to, whatever carries the data.
//!
//! ```text
//! all_reduce      every rank: Σ_r x_r            (or the mean)
//! reduce_scatter  rank r:     chunk r of Σ_r x_r  (x flat, length a multiple of world)
//! all_gather      every rank: x_0 ‖ x_1 ‖ … ‖ x_{w−1}
//! broadcast       every rank: x_root
//! barrier         returns once every rank has called it
//! ```
//!
//! Backends: [`Single`] (one process, world size 1: every operation is the identity),
//! threads in one process (CPU; every line of the data-parallel logic runs in CI), and
//! NCCL (`cuda` feature). Every call is collective: all ranks make the same calls in the
//! same order with tensors of the same shape. A rank that fails calls [`Collective::abort`]
//! so that the others stop with its reason instead of waiting for it.

use candle_core::Tensor;

use crate::error::Result;

/// How values are combined across ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Mean,
}

/// Communication between the ranks of one run.
pub trait Collective: Send + Sync {
    /// This process's (or thread's) rank, in `0..world_size()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// `op` over ranks of `x`; every rank gets the result (same shape as `x`).
    fn all_reduce(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor>;
    /// `op` over ranks of the flat `x` (length a multiple of the world size); rank `r`
    /// gets the `r`-th of `world_size()` equal chunks.
    fn reduce_scatter(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor>;
    /// The flat `x` of every rank, concatenated in rank order.
    fn all_gather(&self, x: &Tensor) -> Result<Tensor>;
    /// `root`'s `x` on every rank.
    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor>;
    /// Wait until every rank gets here.
    fn barrier(&self) -> Result<()>;
    /// Tell the other ranks that this one failed (their pending and later calls return
    /// an error naming this rank and `reason`, or, between processes, they stop with
    /// it).
    fn abort(&self, reason: &str);
    /// Step `step` (counted from 1) ended on this rank: the ranks check that they
    /// issued the same collectives so far ([`desync`](super::desync)), and later
    /// messages name the step. By default a [`barrier`](Collective::barrier), where
    /// backends that record their calls compare them; a wrapper that does not forward
    /// this still makes the same calls as the rank it wraps.
    fn end_step(&self, step: u64) -> Result<()> {
        let _ = step;
        self.barrier()
    }
    /// This rank made its last call: its process ending from now on is not a failure
    /// (between processes, the [`watchdog`](super::watchdog) hears a goodbye).
    fn finish(&self) {}
}

/// One rank: every operation is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce(&self, x: &Tensor, _op: ReduceOp) -> Result<Tensor> {
        Ok(x.clone())
    }
    fn reduce_scatter(&self, x: &Tensor, _op: ReduceOp) -> Result<Tensor> {
        Ok(x.clone())
    }
    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.clone())
    }
    fn broadcast(&self, x: &Tensor, _root: usize) -> Result<Tensor> {
        Ok(x.clone())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, _reason: &str) {}
}
