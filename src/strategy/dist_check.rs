//! A check of the machinery of data-parallel training, outside training: the process
//! group read from the launcher's environment, the rendezvous, and (on CUDA) NCCL's
//! collectives with their results verified, the backward's queued reductions checked
//! on NCCL's side stream with candle's stream busy around them (`check_queued`), and
//! the all-reduce bandwidth measured.
//!
//! Run by the hidden `lit-claire dist-check`: under `srun`/`torchrun` on a cluster, by
//! `utils/device_check.sh` on one GPU, and by the tests with real processes on CPU
//! (where the rendezvous and the [`Watchdog`] run). `--simulate` makes one rank fail
//! after the rendezvous while the others wait in a collective that never ends, which
//! only the watchdog can end: see [`Simulate`].

use std::collections::HashMap;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use rand::RngCore;
use serde::Serialize;

use super::collective::{Collective, ReduceOp};
use super::desync::{self, Call, CallKind, Ledger};
use super::env::{self, DEFAULT_PORT, ProcessGroup};
use super::rendezvous::Rendezvous;
use super::watchdog::{Watchdog, WatchdogConfig};
use super::{DeviceSpec, hold_stream, local_device, nccl_collective};
use crate::error::{Error, Result};

/// What to check.
#[derive(Debug, Clone)]
pub struct DistCheckOptions {
    /// `cpu`: the rendezvous alone; `cuda[:N]`: NCCL (N is used without a launcher).
    pub device: DeviceSpec,
    /// `--devices` and `--num-nodes` to check against the launcher, if given.
    pub devices: Option<usize>,
    pub num_nodes: Option<usize>,
    pub timeout: Duration,
    /// How long a collective may take before the watchdog stops every rank.
    pub collective_timeout: Duration,
    /// How long a silent peer is waited for (default: from the collective timeout,
    /// see [`WatchdogConfig::new`]).
    pub silence_timeout: Option<Duration>,
    /// Size of the timed all-reduce (CUDA), 0 for none.
    pub bench_mib: usize,
    /// A failure to stage after the rendezvous (CPU only), and the rank that fails.
    pub simulate: Option<(Simulate, usize)>,
}

/// What the failing rank of `dist-check --simulate` does after the rendezvous, while
/// every other rank waits in a collective that never completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Simulate {
    /// Enter the collective, then die by SIGKILL (as the out-of-memory killer does).
    Kill,
    /// Stay alive but never reach the collective (a rank stuck in its own work).
    Stall,
    /// Report a NaN loss of its own and exit with that error.
    Nan,
    /// Enter the collective, then freeze (SIGSTOP): alive, connections open, silent.
    Freeze,
    /// Enter the collective like every other rank: all are in it, none completes.
    Hang,
    /// Every rank records three steps of the same collectives and compares them with
    /// the others' at each step's end (as the NCCL backend does); the faulty rank
    /// issues one all-reduce more in step 2.
    Desync,
    /// As `desync`, but the ranks never reach the end of step 2: all wait in a
    /// collective that never completes (as NCCL may when it pairs calls of different
    /// sizes), and rank 0 finds the cause in the records the heartbeats carry.
    DesyncHang,
}

/// What one rank found.
#[derive(Debug, Clone, Serialize)]
pub struct DistCheckReport {
    /// `SLURM`, `torchrun` or `none`.
    pub launcher: String,
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub node: usize,
    pub num_nodes: usize,
    /// `MASTER_ADDR:MASTER_PORT`.
    pub master: String,
    /// `tcp` (rendezvous only) or `nccl`.
    pub backend: String,
    /// First bytes of the payload rank 0 shared (the same on every rank).
    pub shared_digest: String,
    /// Collectives whose results were right.
    pub checks: Vec<String>,
    /// Bus bandwidth of the timed all-reduce, GB/s (NCCL's `busbw`).
    pub all_reduce_busbw_gbs: Option<f64>,
    /// Whether the backward's reductions were queued on NCCL's side stream (None: no
    /// NCCL); the `queued` checks say how they were checked.
    pub side_stream: Option<bool>,
    pub seconds: f64,
}

/// Run the check as this process's rank (a single rank without a launcher).
pub fn dist_check(
    vars: &HashMap<String, String>,
    opts: &DistCheckOptions,
) -> Result<DistCheckReport> {
    let start = Instant::now();
    let launched = env::process_group(vars)?;
    let pg = launched.clone().unwrap_or_else(|| ProcessGroup {
        rank: 0,
        world_size: 1,
        local_rank: 0,
        local_world_size: 1,
        node: 0,
        num_nodes: 1,
        gpus_on_node: None,
        master_addr: "127.0.0.1".into(),
        master_port: vars
            .get("MASTER_PORT")
            .and_then(|p| p.parse().ok())
            .unwrap_or(DEFAULT_PORT),
        port_source: "MASTER_PORT".into(),
        launcher: env::Launcher::Torchrun,
        sources: env::Sources::default(),
        secret: env::JobSecret::none(),
    });
    if let Some(launched) = &launched {
        env::check_given_topology(launched, opts.devices, opts.num_nodes)?;
    }
    let mut report = DistCheckReport {
        launcher: launched
            .as_ref()
            .map_or("none".to_string(), |p| p.launcher.to_string()),
        rank: pg.rank,
        world_size: pg.world_size,
        local_rank: pg.local_rank,
        node: pg.node,
        num_nodes: pg.num_nodes,
        master: format!("{}:{}", pg.master_addr, pg.master_port),
        backend: String::new(),
        shared_digest: String::new(),
        checks: Vec::new(),
        all_reduce_busbw_gbs: None,
        side_stream: None,
        seconds: 0.0,
    };
    match opts.simulate {
        Some((what, _)) if opts.device != DeviceSpec::Cpu && what != Simulate::Hang => {
            return Err(Error::Usage(
                "dist-check --simulate runs on --device cpu (the watchdog alone); on cuda, only --simulate hang (a collective that never completes on the GPU)".into(),
            ));
        }
        Some((_, r)) if r >= pg.world_size => {
            return Err(Error::Usage(format!(
                "--faulty-rank {r}: ranks run from 0 to {}",
                pg.world_size - 1
            )));
        }
        _ => {}
    }
    match opts.device {
        DeviceSpec::Cpu => {
            report.backend = "tcp".into();
            let mut payload = [0u8; 128];
            rand::rng().fill_bytes(&mut payload);
            let own = (pg.rank == 0).then_some(&payload[..]);
            let (shared, links) = Rendezvous::new(&pg, opts.timeout).share_and_keep(own)?;
            report.shared_digest = hex(&shared[..shared.len().min(8)]);
            report
                .checks
                .push(format!("rendezvous: {} bytes from rank 0", shared.len()));
            let mut cfg = WatchdogConfig::new(opts.collective_timeout);
            if let Some(silence) = opts.silence_timeout {
                cfg.silence_timeout = silence;
                cfg.heartbeat = cfg.heartbeat.min(silence / 10);
            }
            let watchdog = Watchdog::start(pg.rank, pg.world_size, links, cfg)?;
            if let Some((what, faulty)) = opts.simulate {
                simulate(&watchdog, pg.rank, what, faulty)?;
            }
            // One round of the ranks' comparison of their collectives, through rank 0.
            desync::check_through(&watchdog, pg.rank, &Ledger::default())?;
            report.checks.push("desync check".into());
            watchdog.finish();
            report.checks.push("watchdog".into());
        }
        DeviceSpec::Cuda(n) => {
            report.backend = "nccl".into();
            let device = match launched {
                Some(_) => local_device(&pg, vars)?,
                None => super::cuda_device(n)?,
            };
            let comm = nccl_collective(&pg, &device, opts.timeout, opts.collective_timeout)?;
            check_collectives(comm.as_ref(), &device, &mut report.checks)?;
            report.side_stream = Some(comm.queues_beside());
            check_queued(
                comm.as_ref(),
                &device,
                &QueuedShape::GPU,
                &mut report.checks,
            )?;
            if opts.bench_mib > 0 {
                report.all_reduce_busbw_gbs =
                    Some(all_reduce_busbw(comm.as_ref(), &device, opts.bench_mib)?);
            }
            comm.barrier()?;
            report.checks.push("barrier".into());
            if let Some((Simulate::Hang, _)) = opts.simulate {
                // As in training after its first step: an all-reduce queued behind a
                // stream held on the GPU never completes; the watchdog must stop this
                // process (ncclCommAbort, one line, exit status 1) within the
                // collective timeout.
                comm.end_step(1)?;
                hold_stream(&device)?;
                let x = Tensor::ones(4, DType::F32, &device)?;
                comm.all_reduce(&x, ReduceOp::Sum)?.to_vec1::<f32>()?;
                return Err(Error::Msg(format!(
                    "an all-reduce behind a held stream completed, or the watchdog did not stop it within --collective-timeout {} s",
                    opts.collective_timeout.as_secs_f64()
                )));
            }
            comm.finish();
        }
    }
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// Rank `faulty` does `what`; every other rank enters a collective that never
/// completes. Only an error of the faulty rank returns: the watchdog ends the others.
fn simulate(watchdog: &Watchdog, rank: usize, what: Simulate, faulty: usize) -> Result<()> {
    if what == Simulate::DesyncHang {
        // What the NCCL backend tells the watchdog: each call with its record's hash.
        let mut ledger = Ledger::default();
        let issue = |ledger: &mut Ledger, call: Call, name: &'static str| {
            ledger.record(call);
            watchdog.track_hashed(name, Some(ledger.hash()), || true);
        };
        let grads = Call::new(CallKind::AllReduce(ReduceOp::Sum), 4096, DType::F32);
        for step in 1..=2u64 {
            issue(&mut ledger, grads, "all_reduce");
            if rank == faulty && step == 2 {
                let one = Call::new(CallKind::AllReduce(ReduceOp::Sum), 1, DType::F32);
                issue(&mut ledger, one, "all_reduce");
            }
            issue(
                &mut ledger,
                Call::new(CallKind::AllGather, 1, DType::F64),
                "all_gather",
            );
            if step == 1 {
                ledger.set_step(step);
                watchdog.set_step(step);
                desync::check_through(watchdog, rank, &ledger)?;
            }
        }
        ledger.record(grads);
        let _in_flight = watchdog.enter_hashed("all_reduce", Some(ledger.hash()));
        loop {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    if what == Simulate::Desync {
        let mut ledger = Ledger::default();
        for step in 1..=3u64 {
            ledger.record(Call::new(
                CallKind::AllReduce(ReduceOp::Sum),
                4096,
                DType::F32,
            ));
            if rank == faulty && step == 2 {
                // The planted one.
                ledger.record(Call::new(CallKind::AllReduce(ReduceOp::Sum), 1, DType::F32));
            }
            ledger.record(Call::new(CallKind::AllGather, 1, DType::F64));
            ledger.set_step(step);
            watchdog.set_step(step);
            desync::check_through(watchdog, rank, &ledger)?;
        }
        return Ok(());
    }
    // As in training after its first step: the verdicts name the step.
    watchdog.set_step(1);
    let endless = |w: &Watchdog| -> ! {
        let _in_flight = w.enter("all_reduce");
        loop {
            std::thread::sleep(Duration::from_secs(1));
        }
    };
    if rank != faulty || what == Simulate::Hang {
        endless(watchdog);
    }
    let signal = |name: &str| {
        let _ = std::process::Command::new("kill")
            .args([name, &std::process::id().to_string()])
            .status();
    };
    match what {
        Simulate::Kill => {
            let _in_flight = watchdog.enter("all_reduce");
            // SIGKILL: no destructor, no goodbye; the kernel closes the sockets.
            signal("-KILL");
            std::process::abort()
        }
        Simulate::Freeze => {
            let _in_flight = watchdog.enter("all_reduce");
            // Every thread stops, the watchdog's too; whoever started us must kill us.
            signal("-STOP");
            endless(watchdog)
        }
        Simulate::Hang => unreachable!("every rank entered the endless collective"),
        Simulate::Desync | Simulate::DesyncHang => unreachable!("handled first"),
        Simulate::Stall => loop {
            std::thread::sleep(Duration::from_secs(1));
        },
        Simulate::Nan => {
            let why = "the loss is NaN (simulated by dist-check)";
            watchdog.report_failure(why);
            Err(Error::Msg(format!("rank {rank} failed: {why}")))
        }
    }
}

/// Every collective on small tensors whose results are known exactly, in f32 and bf16.
fn check_collectives(c: &dyn Collective, device: &Device, checks: &mut Vec<String>) -> Result<()> {
    let (r, w) = (c.rank() as f32, c.world_size() as f32);
    let n = 4 * c.world_size();
    let sum = w * (w + 1.0) / 2.0;
    for dtype in [DType::F32, DType::BF16] {
        let x = Tensor::full(r + 1.0, n, device)?.to_dtype(dtype)?;
        let cases: [(&str, Tensor, Vec<f32>); 5] = [
            (
                "all_reduce sum",
                c.all_reduce(&x, ReduceOp::Sum)?,
                vec![sum; n],
            ),
            (
                "all_reduce mean",
                c.all_reduce(&x, ReduceOp::Mean)?,
                vec![sum / w; n],
            ),
            (
                "reduce_scatter sum",
                c.reduce_scatter(&x, ReduceOp::Sum)?,
                vec![sum; 4],
            ),
            (
                "all_gather",
                c.all_gather(&x.narrow(0, 0, 2)?)?,
                (0..c.world_size())
                    .flat_map(|k| [k as f32 + 1.0; 2])
                    .collect(),
            ),
            ("broadcast from 0", c.broadcast(&x, 0)?, vec![1.0; n]),
        ];
        for (name, got, want) in cases {
            let got = got.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            if got != want {
                return Err(Error::Msg(format!(
                    "rank {}: {name} in {dtype:?} gave {got:?}, expected {want:?}",
                    c.rank()
                )));
            }
            checks.push(format!("{name} {dtype:?}"));
        }
    }
    Ok(())
}

/// The sizes of [`check_queued`]: `chunk` values per rank in each reduction, `side` the
/// side of the square matrices multiplied on the computation's stream around them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueuedShape {
    pub chunk: usize,
    pub side: usize,
    /// Matrix products before the inputs are written, and after the reductions are
    /// queued (each beside a fresh buffer of the inputs' size, filled with −1).
    pub busy: usize,
}

impl QueuedShape {
    /// 16 MiB of f32 per rank and reduction; 2048² matrices (some milliseconds each
    /// batch of products on an H100).
    pub const GPU: QueuedShape = QueuedShape {
        chunk: 1 << 22,
        side: 2048,
        busy: 8,
    };
}

/// The queued reductions of a backward ([`Collective::all_reduce_queued`],
/// [`Collective::reduce_scatter_queued`]; NCCL's side stream) against known values,
/// with the computation's stream busy before, between and after them:
///
/// 1. each input is written by the last kernel of a chain of matrix products, just
///    before it is queued: a side stream that did not wait for it (E_in) would read
///    it unwritten;
/// 2. the inputs are dropped at once, and the computation's stream allocates buffers
///    of their size, fills them with −1 and multiplies matrices while the reductions
///    run: inputs freed before the side stream read them would be those buffers;
/// 3. the results are read after [`Pending::wait`](super::Pending::wait), the second
///    first; then a third reduction is read right after its wait, its result likely
///    in the memory of a −1-filled buffer just freed: a computation's stream that did
///    not wait (E_out) would read it unwritten.
///
/// Between the two, a blocking all-gather on the computation's stream (as FSDP's next
/// block's gather) must also see its own values.
pub(crate) fn check_queued(
    c: &dyn Collective,
    device: &Device,
    shape: &QueuedShape,
    checks: &mut Vec<String>,
) -> Result<()> {
    let (rank, w) = (c.rank(), c.world_size());
    let n = shape.chunk * w;
    let pattern = |i: usize| (i % 251) as f32;
    let base = Tensor::from_vec((0..n).map(pattern).collect::<Vec<f32>>(), n, device)?;
    let m = Tensor::randn(0f32, 1f32, (shape.side, shape.side), device)?;
    let m = (&m / (shape.side as f64).sqrt())?;
    let busy = |k: usize| -> Result<Tensor> {
        let mut a = m.clone();
        for _ in 0..k {
            a = a.matmul(&m)?;
        }
        Ok(a)
    };
    // x_k = pattern + rank + k, written after `busy` products on the same stream.
    let input = |k: usize| -> Result<Tensor> {
        let after = busy(shape.busy)?;
        let x = base.affine(1.0, (rank + k) as f64)?;
        drop(after);
        Ok(x)
    };
    let x0 = input(0)?;
    let summed = c.all_reduce_queued(&x0, ReduceOp::Sum)?;
    drop(x0);
    let x1 = input(1)?;
    let scattered = c.reduce_scatter_queued(&x1, ReduceOp::Sum)?;
    drop(x1);
    let mut junk = Vec::with_capacity(shape.busy);
    for _ in 0..shape.busy {
        junk.push(Tensor::full(-1f32, n, device)?);
        junk.push(busy(1)?);
    }
    // A blocking collective between the queued ones and their wait.
    let gathered = c.all_gather(&Tensor::full(rank as f32, 3, device)?)?;
    let scattered = scattered.wait()?.to_vec1::<f32>()?;
    let summed = summed.wait()?.to_vec1::<f32>()?;
    let gathered = gathered.to_vec1::<f32>()?;
    drop(junk);
    // Read at once: a buffer of the result's size filled with −1 and freed just before,
    // whose memory the result likely gets; candle's stream reads the result right
    // after the wait, so one that did not wait would likely read −1.
    let x2 = input(2)?;
    drop(Tensor::full(-1f32, n, device)?);
    let at_once = c.all_reduce_queued(&x2, ReduceOp::Sum)?;
    drop(x2);
    let at_once = at_once.wait()?.to_vec1::<f32>()?;
    let offset = (w * (w - 1) / 2) as f32;
    let sum_at = |i: usize, k: usize| w as f32 * (pattern(i) + k as f32) + offset;
    let first_wrong = |got: &[f32], want: &dyn Fn(usize) -> f32| {
        got.iter()
            .enumerate()
            .find(|&(i, &g)| g != want(i))
            .map(|(i, &g)| (i, g, want(i)))
    };
    let expect = |name: &str, got: &[f32], len: usize, want: &dyn Fn(usize) -> f32| {
        if got.len() != len {
            return Err(Error::Msg(format!(
                "rank {rank}: queued {name} gave {} values, expected {len}",
                got.len()
            )));
        }
        match first_wrong(got, want) {
            Some((i, g, v)) => Err(Error::Msg(format!(
                "rank {rank}: queued {name}: element {i} is {g}, expected {v} (the streams' order is broken)"
            ))),
            None => Ok(()),
        }
    };
    expect("all_reduce sum", &summed, n, &|i| sum_at(i, 0))?;
    expect("reduce_scatter sum", &scattered, shape.chunk, &|i| {
        sum_at(rank * shape.chunk + i, 1)
    })?;
    expect("all_gather between", &gathered, 3 * w, &|i| (i / 3) as f32)?;
    expect("all_reduce sum read at once", &at_once, n, &|i| {
        sum_at(i, 2)
    })?;
    let how = if c.queues_beside() {
        "side stream"
    } else {
        "in order"
    };
    checks.push(format!(
        "queued all_reduce sum and reduce_scatter sum F32 ({how}): {n} values each, inputs written after {} matrix products of {}², then dropped while −1-filled buffers of their size and more products were queued, an all_gather between, waited for in reverse order; a third read right after its wait, into memory just freed from −1s",
        shape.busy, shape.side
    ));
    Ok(())
}

/// Bus bandwidth of an all-reduce of `mib` MiB of f32 (5 timed after 2 warm-up),
/// as NCCL's tests report it: data size / time × 2(w−1)/w.
fn all_reduce_busbw(c: &dyn Collective, device: &Device, mib: usize) -> Result<f64> {
    let n = mib * (1 << 20) / 4;
    let x = Tensor::ones(n, DType::F32, device)?;
    for _ in 0..2 {
        c.all_reduce(&x, ReduceOp::Sum)?;
    }
    device.synchronize()?;
    let start = Instant::now();
    let reps = 5;
    for _ in 0..reps {
        c.all_reduce(&x, ReduceOp::Sum)?;
    }
    device.synchronize()?;
    let t = start.elapsed().as_secs_f64() / reps as f64;
    let w = c.world_size() as f64;
    let factor = if w > 1.0 { 2.0 * (w - 1.0) / w } else { 1.0 };
    Ok((n * 4) as f64 / t * factor / 1e9)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::Single;
    use crate::strategy::threads::ThreadGroup;

    const SMALL: QueuedShape = QueuedShape {
        chunk: 300,
        side: 16,
        busy: 2,
    };

    /// The ordering check of the queued reductions holds on the CPU backends (which
    /// compute them in the call): one rank, and three thread ranks.
    #[test]
    fn the_queued_reductions_check_passes_on_cpu_ranks() {
        let mut checks = Vec::new();
        check_queued(&Single, &Device::Cpu, &SMALL, &mut checks).unwrap();
        assert!(checks[0].contains("(in order)"), "{checks:?}");
        let group = ThreadGroup::new(3, Duration::from_secs(30));
        std::thread::scope(|s| {
            for c in group.handles() {
                s.spawn(move || {
                    let mut checks = Vec::new();
                    check_queued(c.as_ref(), &Device::Cpu, &SMALL, &mut checks).unwrap();
                    assert_eq!(checks.len(), 1);
                });
            }
        });
    }

    /// One rank whose queued reduction reads a buffer overwritten with −1 (what a side
    /// stream that read its input too early, or too late, would see).
    struct Overwritten;

    impl Collective for Overwritten {
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
            Ok((x.ones_like()? * -1.0)?)
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

    #[test]
    fn the_queued_reductions_check_catches_an_overwritten_input() {
        let mut checks = Vec::new();
        let err = check_queued(&Overwritten, &Device::Cpu, &SMALL, &mut checks).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("queued reduce_scatter sum: element 0 is -1, expected 1"),
            "{msg}"
        );
        assert!(checks.is_empty());
    }
}
