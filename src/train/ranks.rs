//! A run on several ranks: one [`Trainer`] per rank, each with its own [`Strategy`],
//! all joined by one [`Collective`] (threads of this process on CPU, a process group on
//! GPUs; [`pretrain_with_data`](super::pretrain::pretrain_with_data) picks which).
//!
//! A rank that fails (an error or a panic) aborts the collective, so every other rank
//! stops at its next collective call with `rank R failed: reason` instead of waiting.
//! Between processes (NCCL), the [`watchdog`](crate::strategy::watchdog) carries that
//! message, and also names a rank whose process vanished (its connection closed or went
//! silent) or that never reached a collective within `--collective-timeout`; every
//! process then prints that line, aborts its communicator and exits. Rank 0 alone
//! writes files, and each checkpoint is written in a `.tmp-` folder renamed into place
//! complete, so a failure never leaves a half-written one.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::batches::TrainData;
use super::config::{CheckedConfig, ToChecked};
use super::trainer::{TrainSummary, Trainer};
use crate::error::{Error, Result};
use crate::strategy::{Collective, DeviceSpec, Strategy};

/// One thread per handle of `ranks` (rank `r` on `ranks[r]`), all training `cfg` on
/// `data`; returns rank 0's summary, or the error of the first rank that failed.
pub fn train_threads(
    cfg: &impl ToChecked,
    data: TrainData,
    ranks: Vec<Arc<dyn Collective>>,
) -> Result<TrainSummary> {
    let cfg = cfg.to_checked()?;
    let cfg = cfg.as_ref();
    let base = Strategy::new(cfg.device, cfg.precision)?;
    let first_failure: Mutex<Option<(usize, String)>> = Mutex::new(None);
    let results: Vec<Result<TrainSummary>> = std::thread::scope(|s| {
        let threads: Vec<_> = ranks
            .into_iter()
            .map(|c| {
                let strategy = base.clone().with_collective(c, cfg.strategy);
                let (data, first_failure) = (data.clone(), &first_failure);
                s.spawn(move || {
                    let rank = strategy.rank;
                    let record = |why: &str| {
                        let mut f = first_failure.lock().unwrap_or_else(|e| e.into_inner());
                        f.get_or_insert((rank, why.to_string()));
                    };
                    catch_unwind(AssertUnwindSafe(|| {
                        train_rank(cfg, data, strategy.clone(), record)
                    }))
                    .unwrap_or_else(|panic| {
                        let why = format!("panicked: {}", panic_text(&*panic));
                        record(&why);
                        strategy.abort(&why);
                        Err(Error::Msg(why))
                    })
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| Err(Error::Msg("a rank thread panicked".into())))
            })
            .collect()
    });
    let first = first_failure
        .into_inner()
        .unwrap_or_else(|e| e.into_inner());
    summarise(results, first)
}

/// Rank 0's summary when every rank succeeded; the shared message when every rank
/// stopped for the same reason (a decision they took together, such as a NaN loss);
/// otherwise the first failure, naming its rank.
fn summarise(
    results: Vec<Result<TrainSummary>>,
    first: Option<(usize, String)>,
) -> Result<TrainSummary> {
    let errors: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err().map(|e| e.to_string()))
        .collect();
    if errors.is_empty() {
        return results
            .into_iter()
            .next()
            .unwrap_or_else(|| Err(Error::Msg("no ranks".into())));
    }
    if errors.len() == results.len() && errors.iter().all(|e| *e == errors[0]) {
        return Err(Error::Msg(errors[0].clone()));
    }
    let (rank, why) = first.unwrap_or_else(|| (0, errors[0].clone()));
    Err(Error::Msg(format!("rank {rank} failed: {why}")))
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// This rank's whole run. On failure, `on_failure` hears it first, then the other
/// ranks are told (through the collective) so that they stop too.
pub fn train_rank(
    cfg: &CheckedConfig,
    data: TrainData,
    strategy: Strategy,
    on_failure: impl Fn(&str),
) -> Result<TrainSummary> {
    let group = strategy.clone();
    let result = Trainer::on_rank(cfg, data, strategy).and_then(|mut t| t.run(None));
    match &result {
        Err(e) => {
            let why = e.to_string();
            on_failure(&why);
            group.abort(&why);
        }
        Ok(_) => group.finish(),
    }
    result
}

/// Data-parallel training on GPUs: this process is one rank of a process group that
/// SLURM or torchrun started (one process per GPU). The group comes from the launcher's
/// variables ([`crate::strategy::env`]) and is checked against `--devices` and
/// `--num-nodes`; the ranks meet over TCP and open an NCCL communicator
/// ([`crate::strategy::nccl_collective`]). Every rank returns its own summary (rank 0's
/// names the final checkpoint).
pub(super) fn train_process_group(cfg: &CheckedConfig, data: TrainData) -> Result<TrainSummary> {
    let env = crate::strategy::env::process_env();
    let pg = crate::strategy::env::process_group(&env)?.ok_or_else(|| {
        Error::Usage(format!(
            "--device {} --devices {} --num-nodes {}: data-parallel training on GPUs runs one process per GPU; start them with srun (see slurm/) or torchrun, or train on CPU threads with --device cpu --devices N",
            cfg.device, cfg.devices, cfg.num_nodes
        ))
    })?;
    crate::strategy::env::check_topology(&pg, cfg.devices, cfg.num_nodes)?;
    let gpu = crate::strategy::env::local_cuda_ordinal(&pg, &env)?;
    let strategy = Strategy::new(DeviceSpec::Cuda(gpu), cfg.precision)?;
    let timeout = Duration::from_secs(cfg.collective_timeout);
    let nccl = crate::strategy::nccl_collective(&pg, &strategy.device, timeout, timeout)?;
    train_rank(
        cfg,
        data,
        strategy.with_collective(nccl, cfg.strategy),
        |_| {},
    )
}
