//! The Strategy: the one owner of device, precision and ranks.
//!
//! Modelled on Lightning Fabric: commands and the trainer ask the Strategy where
//! tensors live, in which dtype parameters are kept and computed, whether this process
//! is rank 0, and to reduce values across ranks. Nothing else in the crate picks a
//! device or a dtype, or talks to the other ranks.
//!
//! Data parallelism (`--devices`, `--num-nodes`): every rank holds the model and
//! computes gradients on its share of each global batch; the Strategy sums them over
//! ranks once per optimizer step, through a [`Collective`]: [`Single`] for one rank,
//! [`threads::ThreadGroup`] for ranks as threads of one CPU process, NCCL on GPUs.
//! [`StrategyKind`] says whether every rank keeps the whole optimizer state (`ddp`) or
//! only its shard of it (`zero1`), or only its shard of the parameters, gradients and
//! optimizer state (`fsdp`, see [`crate::train::fsdp`]).

pub mod collective;
pub mod desync;
pub mod dist_check;
pub mod env;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod precision;
pub mod rendezvous;
pub mod threads;
pub mod watchdog;

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::model::BuildOptions;
pub use collective::{Collective, Pending, Ready, ReduceOp, Single};
pub use env::{Launcher, ProcessGroup};
pub use precision::Precision;

/// How data-parallel ranks share the optimizer: `--strategy` (the `strategy` of a
/// recipe), kept as [`Strategy::kind`].
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum StrategyKind {
    /// Every rank keeps the whole AdamW state and applies the whole update (PyTorch
    /// DDP): gradients are all-reduced in buckets.
    #[default]
    Ddp,
    /// ZeRO stage 1: gradients are reduce-scattered, each rank keeps the AdamW state
    /// of its shard of the parameters and updates it, then the parameters are
    /// all-gathered (DeepSpeed ZeRO-1, Megatron's distributed optimizer).
    Zero1,
    /// ZeRO stage 3 (PyTorch FSDP, DeepSpeed ZeRO-3): parameters (the frozen base
    /// too), gradients and AdamW state are sharded; each block's parameters are
    /// all-gathered just before its forward and again for its backward, and its
    /// gradients reduce-scattered as soon as its backward ends.
    Fsdp,
}

impl std::fmt::Display for StrategyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StrategyKind::Ddp => "ddp",
            StrategyKind::Zero1 => "zero1",
            StrategyKind::Fsdp => "fsdp",
        })
    }
}

/// Gradients are all-reduced in buckets of at most this many bytes (of f32), so the
/// flat copy of a bucket stays small whatever the model.
pub const BUCKET_BYTES: usize = 4 << 20;

/// Most processes one run may have: rank 0 of the rendezvous keeps a connection (and
/// the watchdog a slot) for every other rank, and a larger count is a typo.
pub const MAX_WORLD_SIZE: usize = 1 << 16;

/// Most thread ranks of a CPU run (`--device cpu --devices N`): 4 per core, and at
/// least 8. Each thread rank holds its own copy of the model, its gradients and
/// optimizer state in this one process, and they take turns on the cores: more ranks
/// only add memory (2000 of them took 9 GB in 4 s).
pub fn max_cpu_ranks() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (4 * cores).max(8)
}

/// What is wrong with `--devices` and `--num-nodes` on `device`, in one line each:
/// counts below 1, more CPU thread ranks than [`max_cpu_ranks`], a world larger than
/// [`MAX_WORLD_SIZE`].
pub fn rank_count_problems(device: DeviceSpec, devices: usize, num_nodes: usize) -> Vec<String> {
    let mut problems = Vec::new();
    if devices == 0 || num_nodes == 0 {
        problems.push("--devices and --num-nodes must be positive".into());
        return problems;
    }
    let world = devices.checked_mul(num_nodes);
    if device == DeviceSpec::Cpu && devices > max_cpu_ranks() {
        problems.push(format!(
            "--device cpu --devices {devices}: CPU ranks are threads of this one process, each with its own copy of the model and optimizer state, sharing {} cores; at most {} (4 per core) make sense",
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            max_cpu_ranks()
        ));
    } else if world.is_none_or(|w| w > MAX_WORLD_SIZE) {
        problems.push(format!(
            "--devices {devices} × --num-nodes {num_nodes} is more ranks than a run can have (at most {MAX_WORLD_SIZE})"
        ));
    }
    problems
}

/// `now + wait`, or a century from now when `wait` is past what an `Instant` holds
/// (`--timeout 1e19`): never the overflow panic of `Instant + Duration`.
pub(crate) fn deadline_after(wait: Duration) -> std::time::Instant {
    let now = std::time::Instant::now();
    now.checked_add(wait)
        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 24 * 3600)))
        .unwrap_or(now)
}

/// Where computation runs, as the user writes it: `cpu`, `cuda`, `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| {
                    Error::Usage(format!(
                        "--device {s}: expected cpu, cuda or cuda:N (N a GPU index)"
                    ))
                }),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Recipes, `hyperparameters.toml` and training states hold devices and precisions as
/// the user writes them (`cuda:1`, `bf16-mixed`), parsed like the flags.
macro_rules! serde_as_string {
    ($($t:ty),*) => {$(
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    )*};
}
serde_as_string!(DeviceSpec, Precision);

/// Device, precision and process group of a run.
#[derive(Clone)]
pub struct Strategy {
    pub spec: DeviceSpec,
    pub device: Device,
    pub precision: Precision,
    /// This rank and the number of ranks (1 without data parallelism), as the
    /// collective says.
    pub rank: usize,
    pub world_size: usize,
    /// How the optimizer is shared between ranks.
    pub kind: StrategyKind,
    /// Largest gradient bucket of [`Strategy::all_reduce_grads`], in bytes.
    pub bucket_bytes: usize,
    collective: Arc<dyn Collective>,
}

impl std::fmt::Debug for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Strategy")
            .field("spec", &self.spec)
            .field("precision", &self.precision)
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("kind", &self.kind)
            .finish()
    }
}

impl Strategy {
    /// A single-process strategy. Refuses a device this build cannot use, and a
    /// precision the device cannot do, saying which ones it can.
    pub fn new(spec: DeviceSpec, precision: Precision) -> Result<Self> {
        let device = match spec {
            DeviceSpec::Cpu => Device::Cpu,
            DeviceSpec::Cuda(n) => cuda_device(n)?,
        };
        let supported = Precision::supported_on(&spec);
        if !supported.contains(&precision) {
            return Err(Error::Usage(format!(
                "--precision {precision} is not available on {spec}; use one of: {}",
                supported
                    .iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(Strategy {
            spec,
            device,
            precision,
            rank: 0,
            world_size: 1,
            kind: StrategyKind::Ddp,
            bucket_bytes: BUCKET_BYTES,
            collective: Arc::new(Single),
        })
    }

    /// This strategy as rank `collective.rank()` of a data-parallel group.
    pub fn with_collective(self, collective: Arc<dyn Collective>, kind: StrategyKind) -> Self {
        Strategy {
            rank: collective.rank(),
            world_size: collective.world_size(),
            kind,
            collective,
            ..self
        }
    }

    /// CPU, full f32: parity tests and quick evaluation.
    pub fn cpu() -> Self {
        Strategy::new(DeviceSpec::Cpu, Precision::True32).expect("f32 on CPU always works")
    }

    /// Only rank 0 logs and writes files.
    pub fn is_global_zero(&self) -> bool {
        self.rank == 0
    }

    /// How to build a model: parameter and compute dtypes from the precision.
    pub fn build_options(&self, trainable: bool) -> BuildOptions {
        BuildOptions {
            dtype: self.precision.param_dtype(),
            compute_dtype: self.precision.compute_dtype(),
            device: self.device.clone(),
            trainable,
        }
    }

    /// Dtype of parameters (and optimizer state).
    pub fn param_dtype(&self) -> DType {
        self.precision.param_dtype()
    }

    /// Mean of `x` over ranks (identity in a single process).
    pub fn all_reduce_mean(&self, x: f64) -> Result<f64> {
        Ok(self.all_reduce_sum(&[x])?[0] / self.world_size as f64)
    }

    /// Element-wise sum of `xs` over ranks, in f64.
    pub fn all_reduce_sum(&self, xs: &[f64]) -> Result<Vec<f64>> {
        if self.world_size == 1 {
            return Ok(xs.to_vec());
        }
        let t = Tensor::new(xs, &self.device)?;
        Ok(self.collective.all_reduce(&t, ReduceOp::Sum)?.to_vec1()?)
    }

    /// `x` of every rank, in rank order (one value per rank).
    pub fn all_gather_f64(&self, x: f64) -> Result<Vec<f64>> {
        if self.world_size == 1 {
            return Ok(vec![x]);
        }
        let t = Tensor::new(&[x], &self.device)?;
        Ok(self.collective.all_gather(&t)?.to_vec1()?)
    }

    /// Rank 0's `xs` on every rank.
    pub fn broadcast_f64(&self, xs: &[f64]) -> Result<Vec<f64>> {
        if self.world_size == 1 {
            return Ok(xs.to_vec());
        }
        let t = Tensor::new(xs, &self.device)?;
        Ok(self.collective.broadcast(&t, 0)?.to_vec1()?)
    }

    /// Wait until every rank gets here.
    pub fn barrier(&self) -> Result<()> {
        self.collective.barrier()
    }

    /// Step `step` ended on this rank: the ranks compare the collectives they issued
    /// so far (see [`desync`]), and a desynchronised rank stops the run, named. Nothing
    /// to do on one rank.
    pub fn end_step(&self, step: usize) -> Result<()> {
        if self.world_size == 1 {
            return Ok(());
        }
        self.collective.end_step(step as u64)
    }

    /// Tell the other ranks that this one failed, so they stop instead of waiting.
    pub fn abort(&self, reason: &str) {
        self.collective.abort(reason)
    }

    /// This rank made its last collective call: its process may end (see
    /// [`Collective::finish`]).
    pub fn finish(&self) {
        self.collective.finish()
    }

    /// Sum gradients over ranks, in place, in buckets of at most
    /// [`Strategy::bucket_bytes`]: each bucket's tensors are flattened into one f32
    /// buffer, all-reduced, and split back. Each rank's gradient must already be its
    /// share of the global loss (normalised by the global token count), so the sum is
    /// the gradient of the global batch.
    pub fn all_reduce_grads(&self, grads: &mut [Tensor]) -> Result<()> {
        if self.world_size == 1 {
            return Ok(());
        }
        for r in buckets(grads.iter().map(Tensor::elem_count), self.bucket_bytes / 4) {
            let bucket = &mut grads[r.clone()];
            let flat = flatten(bucket.iter(), 0)?;
            let summed = self.collective.all_reduce(&flat, ReduceOp::Sum)?;
            let parts = unflatten(&summed, bucket)?;
            for (g, p) in bucket.iter_mut().zip(parts) {
                *g = p;
            }
        }
        Ok(())
    }

    /// [`Strategy::all_reduce_grads`] of `grads`, queued ([`Collective::all_reduce_queued`]):
    /// each bucket's flat copy is all-reduced beside the computation that follows (NCCL:
    /// on its side stream), and [`QueuedGrads::wait`] hands the sums back in `grads`'
    /// order. The same calls, in the same order, as [`Strategy::all_reduce_grads`].
    pub fn all_reduce_grads_queued(&self, grads: &[Tensor]) -> Result<QueuedGrads> {
        if self.world_size == 1 {
            return Ok(QueuedGrads {
                buckets: Vec::new(),
                as_is: grads.to_vec(),
            });
        }
        let mut out = Vec::new();
        for r in buckets(grads.iter().map(Tensor::elem_count), self.bucket_bytes / 4) {
            let bucket = &grads[r];
            let flat = flatten(bucket.iter(), 0)?;
            let summed = self.collective.all_reduce_queued(&flat, ReduceOp::Sum)?;
            let like = bucket
                .iter()
                .map(|t| (t.shape().clone(), t.dtype()))
                .collect();
            out.push((summed, like));
        }
        Ok(QueuedGrads {
            buckets: out,
            as_is: Vec::new(),
        })
    }

    /// Set every variable to rank 0's value (bucketed like the gradients), so all ranks
    /// start from the same weights whatever they loaded.
    pub fn broadcast_vars(&self, vars: &[candle_core::Var]) -> Result<()> {
        if self.world_size == 1 {
            return Ok(());
        }
        let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        for r in buckets(
            tensors.iter().map(Tensor::elem_count),
            self.bucket_bytes / 4,
        ) {
            let flat = flatten(tensors[r.clone()].iter(), 0)?;
            let root = self.collective.broadcast(&flat, 0)?;
            for (v, p) in vars[r.clone()].iter().zip(unflatten(&root, &tensors[r])?) {
                v.set(&p)?;
            }
        }
        Ok(())
    }

    /// For ZeRO-1, a flat buffer of `n` values padded to a multiple of the world size:
    /// its padded length, and the range of it this rank owns.
    pub fn shard_of(&self, n: usize) -> (usize, Range<usize>) {
        let w = self.world_size;
        let padded = n.div_ceil(w) * w;
        let per = padded / w;
        (padded, self.rank * per..(self.rank + 1) * per)
    }

    /// Sum of the flat `x` over ranks; this rank gets its [`Strategy::shard_of`].
    pub fn reduce_scatter_sum(&self, x: &Tensor) -> Result<Tensor> {
        self.collective.reduce_scatter(x, ReduceOp::Sum)
    }

    /// [`Strategy::reduce_scatter_sum`], queued beside the computation that follows
    /// ([`Collective::reduce_scatter_queued`]).
    pub fn reduce_scatter_sum_queued(&self, x: &Tensor) -> Result<Pending> {
        self.collective.reduce_scatter_queued(x, ReduceOp::Sum)
    }

    /// Every rank's flat shard, concatenated in rank order.
    pub fn all_gather(&self, shard: &Tensor) -> Result<Tensor> {
        self.collective.all_gather(shard)
    }
}

/// Gradients being summed over the ranks ([`Strategy::all_reduce_grads_queued`]).
#[must_use = "queued sums are read through QueuedGrads::wait"]
pub struct QueuedGrads {
    /// Each bucket's sum, and the shapes and dtypes of its gradients.
    buckets: Vec<(Pending, Vec<(candle_core::Shape, DType)>)>,
    /// One rank: the gradients themselves.
    as_is: Vec<Tensor>,
}

impl QueuedGrads {
    /// The sums, in the order of the gradients queued.
    pub fn wait(self) -> Result<Vec<Tensor>> {
        let mut out = self.as_is;
        for (summed, like) in self.buckets {
            let flat = summed.wait()?;
            let mut at = 0;
            for (shape, dtype) in like {
                let n = shape.elem_count();
                out.push(flat.narrow(0, at, n)?.reshape(shape)?.to_dtype(dtype)?);
                at += n;
            }
        }
        Ok(out)
    }
}

/// Consecutive index ranges of `sizes` whose sums stay within `cap` (a size above
/// `cap` makes a bucket of its own).
fn buckets(sizes: impl Iterator<Item = usize>, cap: usize) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::new();
    let mut filled = 0;
    for (i, n) in sizes.enumerate() {
        match out.last_mut() {
            Some(last) if filled + n <= cap => {
                last.end = i + 1;
                filled += n;
            }
            _ => {
                out.push(i..i + 1);
                filled = n;
            }
        }
    }
    out
}

/// `tensors` flattened and concatenated in f32, padded with zeros to `len` values.
pub fn flatten<'a>(tensors: impl Iterator<Item = &'a Tensor>, len: usize) -> Result<Tensor> {
    let mut parts = Vec::new();
    let mut n = 0;
    let mut device = Device::Cpu;
    for t in tensors {
        n += t.elem_count();
        device = t.device().clone();
        parts.push(t.flatten_all()?.to_dtype(DType::F32)?);
    }
    if len > n {
        parts.push(Tensor::zeros(len - n, DType::F32, &device)?);
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// The flat `flat` split back into tensors of `like`'s shapes and dtypes (any padding
/// at the end is dropped).
pub fn unflatten(flat: &Tensor, like: &[Tensor]) -> Result<Vec<Tensor>> {
    let mut out = Vec::with_capacity(like.len());
    let mut at = 0;
    for t in like {
        let n = t.elem_count();
        out.push(
            flat.narrow(0, at, n)?
                .reshape(t.shape())?
                .to_dtype(t.dtype())?,
        );
        at += n;
    }
    Ok(out)
}

/// The GPU of this process in a launcher's process group: its local rank's, or the only
/// one `CUDA_VISIBLE_DEVICES` shows it (see [`env::local_cuda_ordinal`]).
pub fn local_device(pg: &ProcessGroup, env: &HashMap<String, String>) -> Result<Device> {
    cuda_device(env::local_cuda_ordinal(pg, env)?)
}

/// NCCL collectives between the processes of `pg`, one GPU each (`device`, from
/// [`local_device`]): meets the other ranks over TCP within `timeout` (see
/// [`rendezvous`]), starts the [`watchdog`] (no collective may take longer than
/// `collective_timeout`), then opens an NCCL communicator on the device's stream.
#[cfg(feature = "cuda")]
pub fn nccl_collective(
    pg: &ProcessGroup,
    device: &Device,
    timeout: Duration,
    collective_timeout: Duration,
) -> Result<Arc<dyn Collective>> {
    nccl::nccl_collective(pg, device, timeout, collective_timeout)
}

/// NCCL collectives need the `cuda` feature.
#[cfg(not(feature = "cuda"))]
pub fn nccl_collective(
    pg: &ProcessGroup,
    _device: &Device,
    _timeout: Duration,
    _collective_timeout: Duration,
) -> Result<Arc<dyn Collective>> {
    Err(Error::Usage(format!(
        "{} started {} processes, but this lit-claire was built without CUDA and NCCL; rebuild with `cargo build --release --features cuda`",
        pg.launcher, pg.world_size
    )))
}

/// Hold `device`'s stream so that nothing queued after it completes (see
/// [`nccl::hold_stream`]): how `dist-check --simulate hang` makes an NCCL collective
/// that only the watchdog can end.
#[cfg(feature = "cuda")]
pub fn hold_stream(device: &Device) -> Result<()> {
    nccl::hold_stream(device)
}

/// Holding a CUDA stream needs the `cuda` feature.
#[cfg(not(feature = "cuda"))]
pub fn hold_stream(_device: &Device) -> Result<()> {
    Err(Error::Usage(
        "holding a CUDA stream needs a lit-claire built with --features cuda".into(),
    ))
}

#[cfg(feature = "cuda")]
fn cuda_device(n: usize) -> Result<Device> {
    Device::new_cuda(n).map_err(|e| Error::Usage(format!("--device cuda:{n}: {e}")))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(n: usize) -> Result<Device> {
    Err(Error::Usage(format!(
        "--device cuda:{n}: this lit-claire was built without CUDA; rebuild with `cargo build --release --features cuda` (needs nvcc)"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// `f(strategy)` on every rank of a thread group of `world`, in rank order.
    fn on_ranks<T: Send>(world: usize, f: impl Fn(Strategy) -> T + Sync) -> Vec<T> {
        let group = threads::ThreadGroup::new(world, Duration::from_secs(10));
        std::thread::scope(|s| {
            let f = &f;
            let hs: Vec<_> = group
                .handles()
                .into_iter()
                .map(|c| {
                    let mut st = Strategy::cpu().with_collective(c, StrategyKind::Ddp);
                    // 10 f32 per bucket: several buckets, and a tensor larger than one.
                    st.bucket_bytes = 40;
                    s.spawn(move || f(st))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// Issue 23, neighbours of cases 5 and 25: rank counts are bounded before anything
    /// is made per rank, and a timeout past what an `Instant` holds is a far deadline,
    /// not an overflow panic.
    #[test]
    fn rank_counts_and_far_deadlines_are_bounded() {
        assert!(rank_count_problems(DeviceSpec::Cpu, 2, 1).is_empty());
        assert!(rank_count_problems(DeviceSpec::Cpu, max_cpu_ranks(), 1).is_empty());
        let p = rank_count_problems(DeviceSpec::Cpu, max_cpu_ranks() + 1, 1);
        assert!(p.len() == 1 && p[0].contains("4 per core"), "{p:?}");
        let p = rank_count_problems(DeviceSpec::Cuda(0), 0, 1);
        assert!(p[0].contains("must be positive"), "{p:?}");
        assert!(rank_count_problems(DeviceSpec::Cuda(0), 8, MAX_WORLD_SIZE / 8).is_empty());
        for (d, n) in [(8, MAX_WORLD_SIZE), (usize::MAX, 2)] {
            let p = rank_count_problems(DeviceSpec::Cuda(0), d, n);
            assert!(p[0].contains("more ranks than a run can have"), "{p:?}");
        }
        let far = deadline_after(Duration::MAX);
        assert!(far > std::time::Instant::now() + Duration::from_secs(3600 * 24 * 365));
        // A thread group with such a timeout still reduces (no `Instant + Duration`
        // overflow in its deadline).
        let group = threads::ThreadGroup::new(2, Duration::from_secs(u64::MAX / 2));
        let sums: Vec<f32> = std::thread::scope(|s| {
            let hs: Vec<_> = group
                .handles()
                .into_iter()
                .map(|c| {
                    s.spawn(move || {
                        let x = Tensor::new(&[1f32], &Device::Cpu).unwrap();
                        let y = c.all_reduce(&x, ReduceOp::Sum).unwrap();
                        y.to_vec1::<f32>().unwrap()[0]
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(sums, [2.0, 2.0]);
    }

    #[test]
    fn buckets_stay_under_the_cap_and_cover_everything_in_order() {
        assert_eq!(
            buckets([3, 4, 3, 12, 1, 9, 1].into_iter(), 10),
            vec![0..3, 3..4, 4..6, 6..7]
        );
        assert!(buckets(std::iter::empty(), 10).is_empty());
    }

    #[test]
    fn gradients_are_summed_bucket_by_bucket_in_their_shapes_and_dtypes() {
        let out = on_ranks(3, |st| {
            let r = st.rank as f32 + 1.0;
            let mut grads = vec![
                Tensor::full(r, (2, 3), &Device::Cpu).unwrap(),
                Tensor::full(r, 12, &Device::Cpu).unwrap(),
                Tensor::full(r, (1, 4), &Device::Cpu)
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap(),
                Tensor::full(10.0 * r, 1, &Device::Cpu).unwrap(),
            ];
            // Queued (as the overlapped backward does), the same calls and sums.
            let queued = st.all_reduce_grads_queued(&grads).unwrap().wait().unwrap();
            st.all_reduce_grads(&mut grads).unwrap();
            assert_eq!(queued.len(), grads.len());
            let values = |t: &Tensor| {
                let v = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
                v.to_vec1::<f32>().unwrap()
            };
            for (q, g) in queued.iter().zip(&grads) {
                assert_eq!(q.dims(), g.dims());
                assert_eq!(q.dtype(), g.dtype());
                assert_eq!(values(q), values(g));
            }
            grads
        });
        for grads in out {
            let shapes: Vec<_> = grads.iter().map(|g| g.dims().to_vec()).collect();
            assert_eq!(shapes, vec![vec![2, 3], vec![12], vec![1, 4], vec![1]]);
            assert_eq!(grads[2].dtype(), DType::BF16);
            for (g, want) in grads.iter().zip([6.0, 6.0, 6.0, 60.0]) {
                let v: Vec<f32> = g
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                assert!(v.iter().all(|&x| x == want), "{v:?} != {want}");
            }
        }
    }

    #[test]
    fn variables_take_rank_zeros_values() {
        let out = on_ranks(2, |st| {
            let vars = [
                candle_core::Var::new(&[st.rank as f32; 7], &Device::Cpu).unwrap(),
                candle_core::Var::new(&[[st.rank as f32 + 5.0; 3]; 5], &Device::Cpu).unwrap(),
            ];
            st.broadcast_vars(&vars).unwrap();
            vars.iter()
                .map(|v| {
                    v.as_tensor()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                })
                .collect::<Vec<_>>()
        });
        for v in out {
            assert_eq!(v, vec![vec![0.0; 7], vec![5.0; 15]]);
        }
    }

    #[test]
    fn shards_split_a_padded_buffer_evenly() {
        let out = on_ranks(4, |st| st.shard_of(10));
        assert_eq!(out, vec![(12, 0..3), (12, 3..6), (12, 6..9), (12, 9..12)]);
        assert_eq!(Strategy::cpu().shard_of(10), (10, 0..10));
    }

    #[test]
    fn scalars_are_reduced_gathered_and_broadcast_in_f64() {
        let out = on_ranks(2, |st| {
            let x = 1.0 + st.rank as f64 * 1e-12;
            (
                st.all_reduce_sum(&[x, 2.0]).unwrap(),
                st.all_reduce_mean(x).unwrap(),
                st.all_gather_f64(x).unwrap(),
                st.broadcast_f64(&[x]).unwrap(),
            )
        });
        for (sum, mean, gathered, root) in out {
            assert_eq!(sum, vec![1.0 + (1.0 + 1e-12), 4.0]);
            assert_eq!(mean, (1.0 + (1.0 + 1e-12)) / 2.0);
            assert_eq!(gathered, vec![1.0, 1.0 + 1e-12]);
            assert_eq!(root, vec![1.0]);
        }
    }
}
