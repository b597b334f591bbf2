//! A check of the machinery of data-parallel training, outside training: the process
//! group read from the launcher's environment, the rendezvous, and (on CUDA) NCCL's
//! collectives with their results verified and the all-reduce bandwidth measured.
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
