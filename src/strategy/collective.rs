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
//!
//! The reductions of a backward's gradients can be *queued*
//! ([`Collective::all_reduce_queued`], [`Collective::reduce_scatter_queued`]): the call
//! returns a [`Pending`] at once and the computation goes on; [`Pending::wait`] hands
//! over the result when something is about to read it. NCCL runs a queued reduction on
//! a CUDA stream of its own, beside the kernels queued after it; the other backends
//! compute it in the call, so the calls, their order and the results are the same.

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
    /// [`all_reduce`](Collective::all_reduce), queued beside the computation that
    /// follows: the result is read through [`Pending::wait`]. `x` must not be written
    /// until then (reading it and dropping it are fine). By default computed in the call.
    fn all_reduce_queued(&self, x: &Tensor, op: ReduceOp) -> Result<Pending> {
        self.all_reduce(x, op).map(Pending::ready)
    }
    /// [`reduce_scatter`](Collective::reduce_scatter), queued as
    /// [`all_reduce_queued`](Collective::all_reduce_queued) is.
    fn reduce_scatter_queued(&self, x: &Tensor, op: ReduceOp) -> Result<Pending> {
        self.reduce_scatter(x, op).map(Pending::ready)
    }
    /// Whether queued reductions run beside the computation (NCCL's side stream) rather
    /// than in the call.
    fn queues_beside(&self) -> bool {
        false
    }
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

/// What [`Pending::wait`] does before handing over a queued collective's result: make
/// what is queued after it on the computation's stream wait for the collective. Its
/// drop must do the same when `wait` was not called (an error on the way), before it
/// lets go of the buffers it keeps alive.
pub trait Ready: Send {
    fn wait(&mut self) -> Result<()>;
}

/// A queued collective's result ([`Collective::all_reduce_queued`]): read it through
/// [`Pending::wait`] only. Dropped unread, it still orders the release of its buffers
/// after the collective.
#[must_use = "a queued collective's result is read through Pending::wait"]
pub struct Pending {
    ready: Option<Box<dyn Ready>>,
    value: Tensor,
}

impl Pending {
    /// A result already there (computed in the call).
    pub fn ready(value: Tensor) -> Self {
        Pending { ready: None, value }
    }

    /// `value`, readable once `ready` has waited.
    pub fn new(value: Tensor, ready: Box<dyn Ready>) -> Self {
        Pending {
            ready: Some(ready),
            value,
        }
    }

    /// The result: from here on, what is queued on the computation's stream runs after
    /// the collective.
    pub fn wait(mut self) -> Result<Tensor> {
        if let Some(mut r) = self.ready.take() {
            r.wait()?;
        }
        Ok(self.value.clone())
    }
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("shape", self.value.shape())
            .field("queued", &self.ready.is_some())
            .finish()
    }
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
