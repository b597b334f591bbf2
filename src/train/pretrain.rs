//! Training entry points: a run as its config says, on every rank it asks for.
//!
//! ```text
//! --devices 1                one Trainer in this thread
//! --device cpu --devices N   N threads of this process, a ThreadGroup between them
//! --device cuda, N > 1       this process is one rank of a SLURM/torchrun group (NCCL)
//! ```
//!
//! How the ranks start, and stop together when one fails, is in [`super::ranks`].

use std::time::Duration;

use super::batches::TrainData;
use super::config::CheckedConfig;
use super::config::ToChecked;
use super::data_source::load_train_data;
use super::ranks::{train_process_group, train_threads};
use super::trainer::{TrainSummary, Trainer};
use crate::error::{Error, Result};
use crate::strategy::threads::ThreadGroup;
use crate::strategy::{DeviceSpec, StrategyKind};

/// Train as `cfg` says, on the prepared data of `cfg.data_dir`. A plain
/// [`TrainConfig`](super::config::TrainConfig) is checked first; a
/// [`CheckedConfig`], which
/// [`TrainConfig::resolve`](super::config::TrainConfig::resolve) returns, is not
/// checked again.
pub fn pretrain(cfg: &impl ToChecked) -> Result<TrainSummary> {
    let cfg = cfg.to_checked()?;
    if cfg.device == DeviceSpec::Cpu {
        refuse_launched_cpu_processes()?;
    }
    pretrain_with_data(cfg.as_ref(), load_train_data(&cfg.data_dir)?)
}

/// Train as `cfg` says on `data`, to the end, on every rank `cfg` asks for (devices ×
/// nodes); returns rank 0's summary. `cfg` is checked as in [`pretrain`].
pub fn pretrain_with_data(cfg: &impl ToChecked, data: TrainData) -> Result<TrainSummary> {
    let cfg = cfg.to_checked()?;
    let cfg = cfg.as_ref();
    if cfg.device == DeviceSpec::Cpu {
        refuse_launched_cpu_processes()?;
    }
    let world = cfg.world_size();
    if world == 1 && !(cfg.strategy == StrategyKind::Fsdp && launched_on_gpu(cfg)) {
        return Trainer::new(cfg, data)?.run(None);
    }
    match cfg.device {
        DeviceSpec::Cpu if cfg.num_nodes > 1 => Err(Error::Usage(format!(
            "--device cpu --num-nodes {}: CPU ranks are threads of one process, on one node; use --devices N (or GPUs with NCCL across nodes)",
            cfg.num_nodes
        ))),
        DeviceSpec::Cpu => {
            let group = ThreadGroup::new(world, Duration::from_secs(cfg.collective_timeout));
            train_threads(cfg, data, group.handles())
        }
        DeviceSpec::Cuda(_) => train_process_group(cfg, data),
    }
}

/// One GPU under a launcher (`torchrun --nproc-per-node 1`, `srun --ntasks=1`): with
/// `fsdp`, its gathers and reduce-scatters then go through NCCL (a communicator of
/// one rank), the path several GPUs take; without a launcher, and for `ddp` and
/// `zero1` (which have nothing to exchange on one rank), one rank needs no NCCL.
fn launched_on_gpu(cfg: &CheckedConfig) -> bool {
    matches!(cfg.device, DeviceSpec::Cuda(_))
        && crate::strategy::env::process_group(&crate::strategy::env::process_env())
            .is_ok_and(|pg| pg.is_some())
}

/// A CPU run is one process (its ranks are threads): one of several processes a
/// launcher started (torchrun, srun) is refused before it reads or writes anything,
/// instead of training alone into the run folder the others write too.
fn refuse_launched_cpu_processes() -> Result<()> {
    let env = crate::strategy::env::process_env();
    match crate::strategy::env::process_group(&env)? {
        Some(pg) => match crate::strategy::env::cpu_launch_problem(&pg) {
            Some(problem) => Err(Error::Usage(problem)),
            None => Ok(()),
        },
        None => Ok(()),
    }
}
