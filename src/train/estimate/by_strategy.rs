//! The plan of one rank under each `--strategy`, and the smallest strategy that fits a
//! device: what `pretrain --dry-run` prints for a run of several ranks.
//!
//! "Smallest" is the least sharding, in the order `ddp`, `zero1`, `fsdp`: each shards
//! more of the state and communicates more per step (`zero1` adds an all-gather of the
//! parameters after the update, `fsdp` gathers every block twice per micro-batch), so
//! the first that fits is the one to take. Each is tried as given, then (when the run
//! does not checkpoint activations) with `--activation-checkpointing 1`.

use super::{MemoryEstimate, estimate, human, part_rows};
use crate::config::Config;
use crate::error::Result;
use crate::strategy::StrategyKind;
use crate::train::TrainConfig;

/// The strategies, least sharded first.
pub const STRATEGIES: [StrategyKind; 3] =
    [StrategyKind::Ddp, StrategyKind::Zero1, StrategyKind::Fsdp];

/// `cfg`'s plan under each of [`STRATEGIES`].
pub fn by_strategy(
    model: &Config,
    cfg: &TrainConfig,
    seq_len: usize,
) -> Result<Vec<(StrategyKind, MemoryEstimate)>> {
    STRATEGIES
        .iter()
        .map(|&k| {
            let mut c = cfg.clone();
            c.strategy = k;
            Ok((k, estimate(model, &c, seq_len)?))
        })
        .collect()
}

/// What fits a device of `per_device` bytes: the first of [`STRATEGIES`] whose plan
/// fits as given, else the first that fits with `--activation-checkpointing 1`; with
/// the plan's total. None when nothing does.
pub fn smallest_fitting(
    model: &Config,
    cfg: &TrainConfig,
    seq_len: usize,
    per_device: u64,
) -> Result<Option<(StrategyKind, usize, u64)>> {
    let mut tries = vec![cfg.activation_checkpointing];
    if cfg.activation_checkpointing != 1 {
        tries.push(1);
    }
    for ckpt in tries {
        for &k in &STRATEGIES {
            let mut c = cfg.clone();
            c.strategy = k;
            c.activation_checkpointing = ckpt;
            let m = estimate(model, &c, seq_len)?;
            if m.total <= per_device {
                return Ok(Some((k, ckpt, m.total)));
            }
        }
    }
    Ok(None)
}

/// The per-strategy table of `cfg` and, when `per_device` is known, the line naming the
/// smallest strategy that fits it.
pub fn strategy_report(
    model: &Config,
    cfg: &TrainConfig,
    seq_len: usize,
    per_device: Option<u64>,
) -> Result<String> {
    let plans = by_strategy(model, cfg, seq_len)?;
    let world = cfg.devices.saturating_mul(cfg.num_nodes);
    let names: Vec<String> = plans
        .iter()
        .map(|(k, _)| format!("--strategy {k}"))
        .collect();
    let columns: Vec<(&str, &MemoryEstimate)> = names
        .iter()
        .zip(&plans)
        .map(|(n, (_, m))| (n.as_str(), m))
        .collect();
    let mut out = format!("one rank of {world}, by strategy:\n");
    out.push_str(&part_rows(&columns));
    if cfg.activation_checkpointing != 1 {
        let mut c = cfg.clone();
        c.activation_checkpointing = 1;
        let ckpt = by_strategy(model, &c, seq_len)?;
        out.push_str(&format!("{:16}", "total, ckpt 1"));
        for ((n, _), (_, m)) in columns.iter().zip(&ckpt) {
            let width = n.len().max(10);
            out.push_str(&format!("  {:>width$}", human(m.total)));
        }
        out.push('\n');
    }
    match per_device {
        None => out.push_str(
            "the smallest strategy that fits is named with --device-memory GIB (or, on a CUDA device, from its free memory)",
        ),
        Some(free) => out.push_str(&match smallest_fitting(model, cfg, seq_len, free)? {
            Some((k, ckpt, total)) => format!(
                "fits {} per device: --strategy {k}{} ({}), the least sharded that fits",
                human(free),
                if ckpt != cfg.activation_checkpointing {
                    " --activation-checkpointing 1"
                } else {
                    ""
                },
                human(total)
            ),
            None => format!(
                "nothing fits {} per device, even --strategy fsdp --activation-checkpointing 1: add --devices/--num-nodes, lower --micro-batch-size, or train LoRA",
                human(free)
            ),
        }),
    }
    Ok(out)
}
