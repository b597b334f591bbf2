//! [`Collective`] over NCCL, one process per GPU (`cuda` feature).
//!
//! NCCL's operations are queued on candle's own CUDA stream of the device, so they run in
//! order with the kernels that produced their inputs and the ones that read their
//! outputs; nothing waits on the host until a value is read back. Each operation is a
//! candle [`CustomOp1`] whose CUDA forward hands the tensor's device memory to NCCL and
//! wraps the buffer NCCL wrote as a new tensor.
//!
//! The backward's reductions ([`Collective::all_reduce_queued`],
//! [`Collective::reduce_scatter_queued`]: ddp's gradient buckets, fsdp's gradient
//! shards) run instead on a side stream of the communicator's own, beside the kernels
//! candle queues after them (`LIT_CLAIRE_NCCL_SIDE_STREAM=0`: on candle's stream, as the
//! other operations). candle's stream is S, the side stream C; three events order them:
//!
//! ```text
//! S: … kernels writing x ─ alloc(y) ─●E_in ─ next block's kernels … ─◆wait(E_out) ─ reads of y, free(x), free(y)
//!                                    │                               ▲
//! C:                                 ◆wait(E_in) ─ nccl(x → y) ─●E_out ─●E_watch
//! ```
//!
//! - E_in, recorded on S after the kernels that wrote the input `x` and after `y`'s
//!   allocation, is waited for by C before NCCL reads `x` and writes `y`. candle
//!   allocates with `cuMemAllocAsync` on S, so `y`'s memory is valid on C only after
//!   that point of S. cudarc's automatic ordering of buffers between streams is not
//!   active (it starts once the context has a stream of cudarc's own, and C is not
//!   one), and it would not order a fresh allocation anyway: these events do it all.
//! - E_out, recorded on C after the operation, is waited for by S in [`Pending::wait`],
//!   before anything reads `y` (the sum into the gradient shard, the gradients' norm,
//!   AdamW, the next use of the buffer). Until then the [`Pending`] keeps `x` and `y`
//!   alive: both return to S's memory pool when dropped, in S's order, which must come
//!   after C is done with them or the next allocation on S could take their memory
//!   while NCCL still reads or writes it. A `Pending` dropped without `wait` (an error
//!   on the way) makes S wait for E_out all the same before it lets go of them.
//! - E_watch, recorded on C, is the watchdog's: the operation is in flight until it
//!   completes (the other operations' is recorded on S).
//!
//! `x` must not be written on S until the wait (the callers hand over fresh flat
//! copies, or gradient buffers they no longer write). S is the per-thread default
//! stream of the thread that uses the device (candle's CUDA device uses it): a
//! `Pending` waited for on another thread waits on the host instead. Operations still
//! go through the one lock and are recorded in the [`Ledger`] in the order the host
//! issues them, the same on every rank; NCCL runs one communicator's kernels in that
//! order whatever their streams (each launch waits for the one before), so the next
//! operation on S (fsdp's next all-gather, a barrier) starts after the queued ones.
//!
//! ```text
//! rank 0: Id::new() ──rendezvous (TCP)──▶ every rank: Id ─▶ Comm::from_rank(stream, rank, world, id)
//!                   (connections kept: the watchdog)
//! ```
//!
//! NCCL waits forever for a rank that died. So the rendezvous connections stay open
//! for the [`Watchdog`], and every operation is tracked until a CUDA event recorded
//! after it completes: one in flight longer than the collective timeout, a peer gone
//! or silent, or a peer's own failure stops every rank with one line naming the rank
//! (or the collective, the step and the ranks that did not arrive) and the cause,
//! after aborting the communicator. The communicator is held here as NCCL's raw handle
//! ([`RawComm`]), not as cudarc's `Comm`, so that the watchdog's thread can call
//! `ncclCommAbort` (cudarc's `result::comm_abort`) while this rank's main thread is
//! blocked inside NCCL holding the lock that serialises the operations.
//!
//! Each rank records the operations it issues ([`Ledger`]); at every barrier and at the
//! end of every step the ranks compare the records through rank 0 over the watchdog's
//! connections ([`desync::check_through`]), before anything more is queued on the
//! device: a rank that issued other collectives stops the run, named, instead of
//! pairing its buffers with the wrong ones.

use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::result::stream as cu_stream;
use candle_core::cuda_backend::cudarc::driver::sys::{self as cu_sys, CUevent_flags};
use candle_core::cuda_backend::cudarc::driver::{
    CudaContext, CudaEvent, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, DriverError,
};
use candle_core::cuda_backend::cudarc::nccl::safe::{Id, NcclType};
use candle_core::cuda_backend::cudarc::nccl::{result as nccl_result, sys as nccl_sys};
use candle_core::cuda_backend::{CudaDType, CudaStorage};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use super::collective::{Collective, Pending, Ready, ReduceOp};
use super::desync::{self, Call, CallKind, Ledger};
use super::env::ProcessGroup;
use super::rendezvous::Rendezvous;
use super::watchdog::{Watchdog, WatchdogConfig};
use crate::error::{Error, Result};

/// NCCL's unique id is 128 bytes.
const ID_BYTES: usize = 128;

/// An NCCL communicator, as NCCL's raw handle. Operations go through [`Nccl::lock`]
/// (NCCL lets any thread use a communicator as long as calls do not overlap);
/// [`RawComm::abort`] does not take that lock: `ncclCommAbort` is what ends an
/// operation that another thread is blocked in.
struct RawComm {
    comm: nccl_sys::ncclComm_t,
    /// candle's stream of this rank's GPU: every operation but the queued reductions is
    /// queued on it.
    stream: Arc<CudaStream>,
    /// Where the queued reductions run (None: on `stream` too,
    /// `LIT_CLAIRE_NCCL_SIDE_STREAM=0`).
    side: Option<SideStream>,
    /// Aborted (by the watchdog's verdict, [`Collective::abort`] or the drop): the
    /// handle is never used again.
    aborted: AtomicBool,
}

// SAFETY: `comm` points to NCCL-owned state that NCCL lets any thread use, provided
// operations do not overlap (they all go through `Nccl::lock`) and `ncclCommAbort` is
// called once (guarded by `aborted`); `Arc<CudaStream>` is Send + Sync, and so is the
// side stream's raw handle (a CUDA stream may be used from any thread).
unsafe impl Send for RawComm {}
unsafe impl Sync for RawComm {}

/// The stream of the queued reductions: created here, non-blocking (no implicit order
/// with any other stream: every order is an event below), of the highest priority,
/// destroyed with the communicator. Not one of cudarc's own streams, which would switch the whole context
/// to cudarc's automatic event tracking (an event wait and record per argument of every
/// kernel candle launches); the few events the side stream needs are placed by hand.
struct SideStream {
    stream: Arc<CudaStream>,
    raw: cu_sys::CUstream,
}

impl SideStream {
    fn new(ctx: &Arc<CudaContext>) -> std::result::Result<Self, DriverError> {
        ctx.bind_to_thread()?;
        // The highest priority the GPU offers: the reduction's thread blocks are
        // scheduled ahead of the backward's still waiting, so it is not left to the
        // end of the backward (as PyTorch's FSDP does with its communication streams).
        let (_, highest) = cu_stream::get_priority_range()?;
        let raw = cu_stream::create_with_priority(cu_stream::StreamKind::NonBlocking, highest)?;
        // SAFETY: `raw` is a stream of `ctx`, destroyed only by this value's drop; the
        // wrapper never leaves it (it is not cloned out of `SideStream`).
        let stream = unsafe { ctx.wrap_borrowed_stream(raw) };
        Ok(SideStream { stream, raw })
    }
}

impl Drop for SideStream {
    fn drop(&mut self) {
        // Work still queued on it completes first: cuStreamDestroy returns at once and
        // the driver releases the stream after that work.
        if self.stream.context().bind_to_thread().is_ok() {
            // SAFETY: created by `SideStream::new`, destroyed once, here.
            let _ = unsafe { cu_stream::destroy(self.raw) };
        }
    }
}

/// Whether `LIT_CLAIRE_NCCL_SIDE_STREAM` asks for the side stream (anything but `0`,
/// `off`, `false` or `no`; unset: yes).
fn side_stream_wanted() -> bool {
    match std::env::var("LIT_CLAIRE_NCCL_SIDE_STREAM") {
        Ok(v) => !matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "0" | "off" | "false" | "no"
        ),
        Err(_) => true,
    }
}

impl RawComm {
    /// `ncclCommInitRank`: waits until every rank of the communicator calls it.
    fn init(
        stream: Arc<CudaStream>,
        side: Option<SideStream>,
        rank: usize,
        world: usize,
        id: [std::ffi::c_char; ID_BYTES],
    ) -> std::result::Result<Self, String> {
        let nranks = i32::try_from(world).map_err(|_| format!("{world} ranks are too many"))?;
        let rank = i32::try_from(rank).map_err(|_| format!("rank {rank} is too large"))?;
        let mut comm = MaybeUninit::uninit();
        // SAFETY: NCCL writes the handle on success; it is read only then.
        let comm = unsafe {
            nccl_result::comm_init_rank(
                comm.as_mut_ptr(),
                nranks,
                nccl_sys::ncclUniqueId { internal: id },
                rank,
            )
            .map_err(|e| format!("{e:?}"))?;
            comm.assume_init()
        };
        Ok(RawComm {
            comm,
            stream,
            side,
            aborted: AtomicBool::new(false),
        })
    }

    /// `ncclCommAbort`, once, from any thread: whatever this process waits on in NCCL
    /// returns, and the handle is not used again.
    fn abort(&self) {
        if !self.aborted.swap(true, Ordering::AcqRel) {
            // SAFETY: `comm` came from ncclCommInitRank and is aborted only here, once.
            let _ = unsafe { nccl_result::comm_abort(self.comm) };
        }
    }

    fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::Acquire)
    }
}

impl Drop for RawComm {
    fn drop(&mut self) {
        // As cudarc's `Comm` does: an abort (a finalize could wait for peers).
        self.abort();
    }
}

/// The ranks of a run, one GPU each, talking through NCCL.
pub struct Nccl {
    rank: usize,
    world_size: usize,
    /// This rank's GPU.
    device: Device,
    /// Shared with the watchdog's abort hook.
    comm: Arc<RawComm>,
    /// Held while an operation is queued: NCCL calls on one communicator must not
    /// overlap.
    lock: Mutex<()>,
    /// Why this rank aborted.
    aborted: Mutex<Option<String>>,
    /// What this rank issued, compared with the others' at barriers and step ends.
    ledger: Mutex<Ledger>,
    watchdog: Watchdog,
}

/// Meet the other ranks within `timeout` (rank 0's NCCL id travels over
/// [`Rendezvous`]), start the [`Watchdog`] (collectives may take `collective_timeout`)
/// and open an NCCL communicator on `device`'s stream. Every rank of `pg` must call it.
pub fn nccl_collective(
    pg: &ProcessGroup,
    device: &Device,
    timeout: Duration,
    collective_timeout: Duration,
) -> Result<Arc<dyn Collective>> {
    let Device::Cuda(dev) = device else {
        return Err(Error::Usage(format!(
            "NCCL needs a CUDA device, not {device:?}: use --device cuda"
        )));
    };
    let own_id = if pg.rank == 0 {
        let id = Id::new().map_err(|e| {
            Error::Msg(format!(
                "rank 0: ncclGetUniqueId failed: {e:?} (is libnccl.so.2 on LD_LIBRARY_PATH?)"
            ))
        })?;
        Some(id.internal().iter().map(|&c| c as u8).collect::<Vec<u8>>())
    } else {
        None
    };
    let (bytes, links) = Rendezvous::new(pg, timeout).share_and_keep(own_id.as_deref())?;
    let watchdog = Watchdog::start(
        pg.rank,
        pg.world_size,
        links,
        WatchdogConfig::new(collective_timeout),
    )?;
    if bytes.len() != ID_BYTES {
        return Err(Error::Msg(format!(
            "rank {}: rank 0 sent an NCCL id of {} bytes, expected {ID_BYTES}",
            pg.rank,
            bytes.len()
        )));
    }
    let mut internal = [0 as std::ffi::c_char; ID_BYTES];
    for (d, s) in internal.iter_mut().zip(&bytes) {
        *d = *s as std::ffi::c_char;
    }
    // ncclCommInitRank waits for every rank: a rank that dies now is caught too.
    let stream = dev.cuda_stream();
    let side = if side_stream_wanted() {
        Some(SideStream::new(stream.context()).map_err(|e| {
            Error::Msg(format!(
                "rank {}: creating the NCCL side stream: {e:?} (LIT_CLAIRE_NCCL_SIDE_STREAM=0 does without)",
                pg.rank
            ))
        })?)
    } else {
        None
    };
    let init = watchdog.enter("ncclCommInitRank");
    let comm = RawComm::init(stream, side, pg.rank, pg.world_size, internal).map_err(|e| {
        let msg = format!(
            "rank {}: ncclCommInitRank ({} ranks, rank 0 at {}:{}) failed: {e}; NCCL_DEBUG=INFO says why",
            pg.rank, pg.world_size, pg.master_addr, pg.master_port
        );
        watchdog.report_failure(&msg);
        Error::Msg(msg)
    })?;
    drop(init);
    let comm = Arc::new(comm);
    let hook = comm.clone();
    // On a verdict: ncclCommAbort, without the operations' lock (the main thread may
    // hold it, blocked in NCCL); whatever this process waits on in NCCL returns.
    watchdog.on_fatal(move || hook.abort());
    Ok(Arc::new(Nccl {
        rank: pg.rank,
        world_size: pg.world_size,
        device: device.clone(),
        comm,
        lock: Mutex::new(()),
        aborted: Mutex::new(None),
        ledger: Mutex::new(Ledger::default()),
        watchdog,
    }))
}

/// One collective, as candle sees it: a unary op on the tensor.
#[derive(Clone, Copy)]
enum Kind {
    AllReduce(ReduceOp),
    ReduceScatter(ReduceOp),
    AllGather,
    Broadcast(usize),
}

struct NcclOpOn<'a> {
    comm: &'a RawComm,
    world: usize,
    kind: Kind,
    /// Run on this stream (the side stream) instead of candle's.
    side: Option<&'a CudaStream>,
}

fn nccl_op(op: ReduceOp) -> nccl_sys::ncclRedOp_t {
    match op {
        ReduceOp::Sum => nccl_sys::ncclRedOp_t::ncclSum,
        ReduceOp::Mean => nccl_sys::ncclRedOp_t::ncclAvg,
    }
}

impl NcclOpOn<'_> {
    /// The collective on elements of type `T`.
    fn run<T: CudaDType + DeviceRepr + NcclType>(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("nccl: the tensor must be contiguous (a bug: call .contiguous())");
        };
        let n = end - start;
        let world = self.world;
        let src = storage.as_cuda_slice::<T>()?.slice(start..end);
        let dev = storage.device().clone();
        let out_len = match self.kind {
            Kind::AllReduce(_) | Kind::Broadcast(_) => n,
            Kind::ReduceScatter(_) => {
                if n % world != 0 {
                    candle_core::bail!(
                        "nccl reduce_scatter: {n} elements do not split into {world} equal chunks"
                    );
                }
                n / world
            }
            Kind::AllGather => n * world,
        };
        // SAFETY: NCCL writes every element of `dst` before anything reads it.
        // Allocated on candle's stream (stream-ordered, cuMemAllocAsync): usable on the
        // side stream once it has waited for `after_inputs` below.
        let mut dst = unsafe { dev.alloc::<T>(out_len)? };
        let stream = match self.side {
            None => &*self.comm.stream,
            Some(side) => {
                // E_in: the side stream starts after everything queued so far on
                // candle's stream, the kernels that wrote `src` and the allocation of
                // `dst` included.
                let driver = |e: DriverError| {
                    candle_core::Error::Msg(format!("nccl {}: side stream: {e:?}", self.name()))
                };
                let after_inputs = self.comm.stream.record_event(None).map_err(driver)?;
                side.wait(&after_inputs).map_err(driver)?;
                side
            }
        };
        let (comm, cu_stream) = (self.comm.comm, stream.cu_stream() as nccl_sys::cudaStream_t);
        let ty = T::as_nccl_type();
        let done = {
            // The guards order the buffers' other uses after NCCL's (cudarc's events).
            let (src_ptr, _src_sync) = src.device_ptr(stream);
            let (dst_ptr, _dst_sync) = dst.device_ptr_mut(stream);
            let (sp, dp) = (
                src_ptr as *const std::ffi::c_void,
                dst_ptr as *mut std::ffi::c_void,
            );
            // SAFETY: `sp` holds `n` elements of `T` and `dp` `out_len`, on this
            // communicator's GPU, alive until the guards drop; NCCL reads and writes
            // them in the order of `stream`, as cudarc's safe `Comm` methods do.
            unsafe {
                match self.kind {
                    Kind::AllReduce(op) => {
                        nccl_result::all_reduce(sp, dp, n, ty, nccl_op(op), comm, cu_stream)
                    }
                    Kind::ReduceScatter(op) => nccl_result::reduce_scatter(
                        sp,
                        dp,
                        out_len,
                        ty,
                        nccl_op(op),
                        comm,
                        cu_stream,
                    ),
                    Kind::AllGather => nccl_result::all_gather(sp, dp, n, ty, comm, cu_stream),
                    Kind::Broadcast(root) => {
                        nccl_result::broadcast(sp, dp, n, ty, root as i32, comm, cu_stream)
                    }
                }
            }
        };
        done.map_err(|e| candle_core::Error::Msg(format!("nccl {}: {e:?}", self.name())))?;
        let shape = match self.kind {
            Kind::AllReduce(_) | Kind::Broadcast(_) => layout.shape().clone(),
            _ => Shape::from(out_len),
        };
        Ok((CudaStorage::wrap_cuda_slice(dst, dev), shape))
    }
}

impl Kind {
    /// What the ranks' records compare.
    fn call(self) -> CallKind {
        match self {
            Kind::AllReduce(op) => CallKind::AllReduce(op),
            Kind::ReduceScatter(op) => CallKind::ReduceScatter(op),
            Kind::AllGather => CallKind::AllGather,
            Kind::Broadcast(root) => CallKind::Broadcast(root),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::AllReduce(_) => "all_reduce",
            Kind::ReduceScatter(_) => "reduce_scatter",
            Kind::AllGather => "all_gather",
            Kind::Broadcast(_) => "broadcast",
        }
    }
}

impl CustomOp1 for NcclOpOn<'_> {
    fn name(&self) -> &'static str {
        self.kind.name()
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!(
            "nccl {}: the tensor is on the CPU; NCCL needs CUDA tensors",
            self.name()
        )
    }

    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        match storage.dtype() {
            DType::F32 => self.run::<f32>(storage, layout),
            DType::BF16 => self.run::<half::bf16>(storage, layout),
            DType::F16 => self.run::<half::f16>(storage, layout),
            DType::F64 => self.run::<f64>(storage, layout),
            other => candle_core::bail!(
                "nccl {}: {other:?} tensors are not supported (f32, bf16, f16, f64)",
                self.name()
            ),
        }
    }
}

impl Nccl {
    /// Queue `kind` on `x` (flattened for the ops whose result is flat) on candle's
    /// stream.
    fn apply(&self, x: &Tensor, kind: Kind) -> Result<Tensor> {
        Ok(self.issue(x, kind, None)?.1)
    }

    /// Queue the reduction `kind` of `x` on the side stream (on candle's stream, and
    /// waited for at once, without one).
    fn apply_queued(&self, x: &Tensor, kind: Kind) -> Result<Pending> {
        let Some(side) = &self.comm.side else {
            return self.apply(x, kind).map(Pending::ready);
        };
        let (input, out, done) = self.issue(x, kind, Some(&side.stream))?;
        let done =
            done.ok_or_else(|| Error::Msg("nccl: no event after a queued op (a bug)".into()))?;
        Ok(Pending::new(
            out.clone(),
            Box::new(Queued {
                compute: self.comm.stream.clone(),
                thread: std::thread::current().id(),
                done,
                keep: vec![input, out],
                waited: false,
            }),
        ))
    }

    /// Queue `kind` on `x` on `side` (else candle's stream): the input as handed to
    /// NCCL, the output, and, on `side`, the event E_out recorded after the operation.
    fn issue(
        &self,
        x: &Tensor,
        kind: Kind,
        side: Option<&CudaStream>,
    ) -> Result<(Tensor, Tensor, Option<CudaEvent>)> {
        if let Some(reason) = self.aborted.lock().map_err(poisoned)?.as_ref() {
            return Err(Error::Msg(format!(
                "rank {} aborted its collectives: {reason}",
                self.rank
            )));
        }
        let x = match kind {
            Kind::AllReduce(_) | Kind::Broadcast(_) => x.contiguous()?,
            _ => x.flatten_all()?.contiguous()?,
        };
        let hash = {
            let mut ledger = self.ledger.lock().map_err(poisoned)?;
            ledger.record(Call::new(kind.call(), x.elem_count(), x.dtype()));
            ledger.hash()
        };
        let guard = self.lock.lock().map_err(poisoned)?;
        if self.comm.is_aborted() {
            return Err(Error::Msg(format!(
                "rank {}: the NCCL communicator was aborted",
                self.rank
            )));
        }
        let out = x.apply_op1_no_bwd(&NcclOpOn {
            comm: &self.comm,
            world: self.world_size,
            kind,
            side,
        })?;
        let recorded = |stream: &CudaStream| {
            stream
                .record_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))
                .map_err(|e| Error::Msg(format!("nccl {}: recording an event: {e:?}", kind.name())))
        };
        // Recorded while the lock is held, so that nothing else is queued before them:
        // E_out for candle's stream to wait on, and the watchdog's event, both on the
        // stream the operation ran on.
        let events = side
            .map(recorded)
            .transpose()
            .and_then(|done| Ok((done, recorded(side.unwrap_or(&self.comm.stream))?)));
        let (done, tracked) = match events {
            Ok(events) => events,
            Err(e) => {
                // No E_out to order the buffers' release by: wait on the host before
                // they go back to candle's stream.
                if let Some(side) = side {
                    let _ = side.synchronize();
                }
                return Err(e);
            }
        };
        drop(guard);
        self.watchdog
            .track_hashed(kind.name(), Some(hash), move || {
                // An error is the main thread's to report, at its next read of the device;
                // only an operation that is still running counts as in flight.
                tracked.context().bind_to_thread().is_err()
                    || tracked.try_is_complete() != Ok(false)
            });
        Ok((x, out, done))
    }
}

/// A reduction queued on the side stream, as [`Pending::wait`] sees it: candle's stream
/// is made to wait for E_out, then the input and output are let go (their memory returns
/// to candle's stream's pool, in that stream's order: after the wait).
struct Queued {
    /// candle's stream: the per-thread default stream of the thread that queued the
    /// reduction (candle's CUDA device uses it), so it is waited on from that thread.
    compute: Arc<CudaStream>,
    thread: std::thread::ThreadId,
    /// E_out: recorded on the side stream after the reduction.
    done: CudaEvent,
    /// The reduction's input and output, kept alive until candle's stream waits.
    keep: Vec<Tensor>,
    waited: bool,
}

impl Queued {
    /// Make what is queued on candle's stream from now on run after the reduction
    /// (cuStreamWaitEvent); from another thread, whose per-thread stream is not the
    /// one that queued it, wait on the host instead.
    fn order(&mut self) -> std::result::Result<(), DriverError> {
        if !self.waited {
            if std::thread::current().id() == self.thread {
                self.compute.wait(&self.done)?;
            } else {
                self.done.synchronize()?;
            }
            self.waited = true;
        }
        Ok(())
    }
}

impl Ready for Queued {
    fn wait(&mut self) -> Result<()> {
        self.order()
            .map_err(|e| Error::Msg(format!("nccl: waiting for a queued reduction: {e:?}")))?;
        self.keep.clear();
        Ok(())
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        // Not waited for (an error on the way): the buffers still must not return to
        // candle's stream before the side stream is done with them.
        if self.order().is_err() {
            let _ = self.done.synchronize();
        }
    }
}

impl Nccl {
    /// Compare this rank's record of collectives with every other rank's, through rank
    /// 0 over the watchdog's connections (never on the device, where a rank out of
    /// step would pair the check with another collective).
    fn check(&self) -> Result<()> {
        let ledger = self.ledger.lock().map_err(poisoned)?.clone();
        desync::check_through(&self.watchdog, self.rank, &ledger)
    }
}

fn poisoned<T>(_: std::sync::PoisonError<T>) -> Error {
    Error::Msg("nccl: a thread panicked while holding the communicator".into())
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world_size
    }
    fn all_reduce(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        self.apply(x, Kind::AllReduce(op))
    }
    fn reduce_scatter(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        self.apply(x, Kind::ReduceScatter(op))
    }
    fn all_reduce_queued(&self, x: &Tensor, op: ReduceOp) -> Result<Pending> {
        self.apply_queued(x, Kind::AllReduce(op))
    }
    fn reduce_scatter_queued(&self, x: &Tensor, op: ReduceOp) -> Result<Pending> {
        self.apply_queued(x, Kind::ReduceScatter(op))
    }
    fn queues_beside(&self) -> bool {
        self.comm.side.is_some()
    }
    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, Kind::AllGather)
    }
    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        if root >= self.world_size {
            return Err(Error::Msg(format!(
                "broadcast from rank {root} in a world of {}",
                self.world_size
            )));
        }
        self.apply(x, Kind::Broadcast(root))
    }
    fn barrier(&self) -> Result<()> {
        self.ledger
            .lock()
            .map_err(poisoned)?
            .record(Call::barrier());
        self.check()?;
        // A one-element all-reduce, read back on the host: returns once every rank's
        // reduction has completed.
        let one = Tensor::ones(1, DType::F32, &self.device)?;
        self.all_reduce(&one, ReduceOp::Sum)?.to_vec1::<f32>()?;
        Ok(())
    }
    fn abort(&self, reason: &str) {
        if let Ok(mut a) = self.aborted.lock() {
            a.get_or_insert_with(|| reason.to_string());
        }
        // The other processes learn it through rank 0 and stop.
        self.watchdog.report_failure(reason);
        // ncclCommAbort: NCCL stops its operations here, and the other ranks' pending
        // ones fail instead of waiting for this rank.
        self.comm.abort();
    }
    fn end_step(&self, step: u64) -> Result<()> {
        self.ledger.lock().map_err(poisoned)?.set_step(step);
        self.watchdog.set_step(step);
        self.check()
    }
    fn finish(&self) {
        // This rank's last operations complete on its GPU before anything may drop
        // the communicator (cudarc's drop is an abort, not a finalize).
        let _ = self.device.synchronize();
        if let Some(side) = &self.comm.side {
            let _ = side.stream.synchronize();
        }
        self.watchdog.finish();
    }
}

/// Hold `device`'s stream on the GPU for good (`cuStreamWaitValue32` on a word that
/// stays 0): every operation queued after it, an NCCL collective included, never
/// completes. Only `dist-check --simulate hang` uses it, to see the watchdog end a
/// collective that cannot finish.
pub fn hold_stream(device: &Device) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let Device::Cuda(dev) = device else {
        return Err(Error::Usage(format!("{device:?} is not a CUDA device")));
    };
    let word = dev
        .alloc_zeros::<u32>(1)
        .map_err(|e| Error::Msg(format!("holding the stream: {e}")))?;
    let stream = dev.cuda_stream();
    {
        let (ptr, _sync) = word.device_ptr(&stream);
        // SAFETY: `ptr` is a live u32 on this stream's device (leaked below, so it
        // outlives the wait); the flags are the driver's own constant.
        unsafe {
            sys::cuStreamWaitValue32_v2(
                stream.cu_stream(),
                ptr,
                1,
                sys::CUstreamWaitValue_flags::CU_STREAM_WAIT_VALUE_EQ as u32,
            )
        }
        .result()
        .map_err(|e| {
            Error::Msg(format!(
                "cuStreamWaitValue32 failed: {e:?} (stream memory operations unsupported on this GPU?)"
            ))
        })?;
    }
    std::mem::forget(word);
    Ok(())
}
