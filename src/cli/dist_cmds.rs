//! `dist-check` (hidden): the process group, rendezvous and NCCL collectives of
//! data-parallel training, checked outside training.

use std::time::Duration;

use clap::Args;

use crate::error::{Error, Result};
use crate::strategy::DeviceSpec;
use crate::strategy::dist_check::{DistCheckOptions, Simulate, dist_check};

/// Start it like `pretrain` (one process per GPU under srun or torchrun); each rank
/// prints one JSON line.
#[derive(Debug, Args)]
pub struct DistCheckArgs {
    /// cpu (rendezvous only) or cuda (NCCL collectives, the queued reductions on
    /// NCCL's side stream too).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// Devices per node, checked against the launcher (default: what it started).
    #[arg(long)]
    pub devices: Option<usize>,
    /// Nodes, checked against the launcher (default: what it started).
    #[arg(long)]
    pub num_nodes: Option<usize>,
    /// Seconds to wait for the other ranks.
    #[arg(long, default_value_t = 60.0)]
    pub timeout: f64,
    /// Seconds a collective may take before the watchdog stops every rank (default:
    /// --timeout).
    #[arg(long)]
    pub collective_timeout: Option<f64>,
    /// Seconds a silent peer is waited for (default: from --collective-timeout, 10 s
    /// to 2 min).
    #[arg(long)]
    pub silence_timeout: Option<f64>,
    /// MiB of the timed all-reduce (CUDA), 0 for none.
    #[arg(long, default_value_t = 256)]
    pub bench_mib: usize,
    /// After the rendezvous, make --faulty-rank fail this way while the others wait in
    /// a collective that never ends (CPU; tests of the watchdog).
    #[arg(long, value_enum)]
    pub simulate: Option<Simulate>,
    /// The rank that fails under --simulate.
    #[arg(long, default_value_t = 1)]
    pub faulty_rank: usize,
}

/// Largest timed all-reduce (`--bench-mib`): 1 TiB, more than any GPU holds.
const MAX_BENCH_MIB: usize = 1 << 20;

/// A `--FLAG SECONDS` value as a duration: a positive number a `Duration` holds, or one
/// line naming the flag (never a panic on `inf` or `1e300`).
fn seconds(flag: &str, v: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(v)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            // 1e300 as 1e300, not in 301 digits.
            let shown = if v.is_finite() && v.abs() >= 1e9 {
                format!("{v:e}")
            } else {
                v.to_string()
            };
            Error::Usage(format!(
                "{flag} {shown}: expected a positive number of seconds"
            ))
        })
}

pub fn dist_check_cmd(a: DistCheckArgs) -> Result<()> {
    if a.bench_mib > MAX_BENCH_MIB {
        return Err(Error::Usage(format!(
            "--bench-mib {} is more than a GPU holds (at most {MAX_BENCH_MIB} MiB; 0 for none)",
            a.bench_mib
        )));
    }
    let opts = DistCheckOptions {
        device: a.device,
        devices: a.devices,
        num_nodes: a.num_nodes,
        timeout: seconds("--timeout", a.timeout)?,
        collective_timeout: match a.collective_timeout {
            Some(s) => seconds("--collective-timeout", s)?,
            None => seconds("--timeout", a.timeout)?,
        },
        silence_timeout: a
            .silence_timeout
            .map(|s| seconds("--silence-timeout", s))
            .transpose()?,
        bench_mib: a.bench_mib,
        simulate: a.simulate.map(|s| (s, a.faulty_rank)),
    };
    let report = dist_check(&crate::strategy::env::process_env(), &opts)?;
    println!("{}", serde_json::to_string(&report).expect("plain data"));
    Ok(())
}
