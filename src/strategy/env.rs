//! The process group a launcher describes in the environment: SLURM's `srun` or
//! PyTorch's `torchrun`.
//!
//! ```text
//!              rank              world size     local rank       node            rank 0 at
//! torchrun     RANK              WORLD_SIZE     LOCAL_RANK       GROUP_RANK      MASTER_ADDR:MASTER_PORT
//! srun         SLURM_PROCID      SLURM_NTASKS   SLURM_LOCALID    SLURM_NODEID    first host of SLURM_JOB_NODELIST
//! ```
//!
//! One process per GPU: the process with local rank `l` drives GPU `l` of its node.
//! Everything here reads a map of variables, not the process environment, so tests give
//! it whatever they like; [`process_env`] is the map of the real one.

use std::collections::HashMap;

use super::MAX_WORLD_SIZE;
use crate::error::{Error, Result};

/// Who started the processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// `srun`, one task per GPU.
    Slurm,
    /// `torchrun` (or anything that sets `RANK`, `WORLD_SIZE`, `MASTER_ADDR` the same way).
    Torchrun,
}

impl std::fmt::Display for Launcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Launcher::Slurm => "SLURM",
            Launcher::Torchrun => "torchrun",
        })
    }
}

/// This process's place among the processes of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessGroup {
    /// Global rank, in `0..world_size`.
    pub rank: usize,
    pub world_size: usize,
    /// Rank on this node: the GPU this process drives.
    pub local_rank: usize,
    /// Processes on this node.
    pub local_world_size: usize,
    /// This node's index, in `0..num_nodes`.
    pub node: usize,
    pub num_nodes: usize,
    /// GPUs SLURM gave this node (`--gres=gpu:N`), when it says.
    pub gpus_on_node: Option<usize>,
    /// Where rank 0 listens for the others (see [`super::rendezvous`]).
    pub master_addr: String,
    pub master_port: u16,
    pub launcher: Launcher,
    /// Where the counts came from, for messages.
    pub sources: Sources,
}

/// The variable each count of a [`ProcessGroup`] came from, or how it was derived
/// (`SLURM_NTASKS / SLURM_NNODES`), so that a message names what the user can change
/// rather than a flag they never passed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Sources {
    pub world_size: String,
    pub local_world_size: String,
    pub num_nodes: String,
}

/// `MASTER_PORT` when SLURM runs without one: derived from the job id, so every task of a
/// job agrees on it and two jobs sharing a node rarely collide.
pub fn default_slurm_port(job_id: u64) -> u16 {
    20_000 + (job_id % 20_000) as u16
}

/// Port used without a launcher's port (a single process, or `MASTER_PORT` unset).
pub const DEFAULT_PORT: u16 = 29_500;

/// The environment of this process, as a map.
pub fn process_env() -> HashMap<String, String> {
    std::env::vars().collect()
}

/// The process group the environment describes, or `None` when no launcher set one up
/// (a plain command line, or an interactive SLURM shell). torchrun wins over SLURM:
/// torchrun started inside an allocation describes each of its processes, SLURM only
/// the task that ran torchrun.
pub fn process_group(env: &HashMap<String, String>) -> Result<Option<ProcessGroup>> {
    if env.contains_key("RANK") && env.contains_key("WORLD_SIZE") {
        return torchrun_group(env).map(Some);
    }
    // An interactive allocation (`salloc`, `srun --pty bash`) has the job's variables
    // but launched nothing, unless this process is itself a step started by srun.
    let in_step = env.contains_key("SLURM_STEP_ID") || env.contains_key("SLURM_STEPID");
    let interactive = !in_step
        && matches!(
            env.get("SLURM_JOB_NAME").map(String::as_str),
            Some("bash" | "interactive")
        );
    if env.contains_key("SLURM_PROCID") && env.contains_key("SLURM_NTASKS") && !interactive {
        return slurm_group(env).map(Some);
    }
    Ok(None)
}

fn torchrun_group(env: &HashMap<String, String>) -> Result<ProcessGroup> {
    let rank = number(env, "RANK")?;
    let world_size = number(env, "WORLD_SIZE")?;
    let local_rank = optional_number(env, "LOCAL_RANK")?.unwrap_or(rank);
    let (local_world_size, local_source) = match optional_number(env, "LOCAL_WORLD_SIZE")? {
        Some(n) => (n, "LOCAL_WORLD_SIZE"),
        None => (world_size, "WORLD_SIZE (LOCAL_WORLD_SIZE is not set)"),
    };
    let sources = Sources {
        world_size: "WORLD_SIZE".into(),
        local_world_size: local_source.into(),
        num_nodes: "WORLD_SIZE / LOCAL_WORLD_SIZE".into(),
    };
    check_counts(
        (rank, "RANK"),
        world_size,
        (local_rank, "LOCAL_RANK"),
        local_world_size,
        &sources,
    )?;
    let node = optional_number(env, "GROUP_RANK")?.unwrap_or(rank / local_world_size);
    let num_nodes = world_size.div_ceil(local_world_size);
    let master_addr = env
        .get("MASTER_ADDR")
        .cloned()
        .unwrap_or_else(|| "127.0.0.1".into());
    let master_port = match env.get("MASTER_PORT") {
        Some(p) => port(p, "MASTER_PORT")?,
        None => DEFAULT_PORT,
    };
    Ok(ProcessGroup {
        rank,
        world_size,
        local_rank,
        local_world_size,
        node,
        num_nodes,
        gpus_on_node: None,
        master_addr,
        master_port,
        launcher: Launcher::Torchrun,
        sources,
    })
}

fn slurm_group(env: &HashMap<String, String>) -> Result<ProcessGroup> {
    let rank = number(env, "SLURM_PROCID")?;
    let world_size = number(env, "SLURM_NTASKS")?;
    let (num_nodes, nodes_var) = match optional_number(env, "SLURM_NNODES")? {
        Some(n) => (n, "SLURM_NNODES"),
        None => match optional_number(env, "SLURM_JOB_NUM_NODES")? {
            Some(n) => (n, "SLURM_JOB_NUM_NODES"),
            None => (1, "1 node (SLURM_NNODES is not set)"),
        },
    };
    if num_nodes == 0 {
        return Err(Error::Usage(format!(
            "{nodes_var}=0: a job runs on at least one node (set by SLURM; unset it if you set it yourself)"
        )));
    }
    let (local_world_size, local_source) = match optional_number(env, "SLURM_NTASKS_PER_NODE")? {
        Some(n) => (n, "SLURM_NTASKS_PER_NODE".to_string()),
        None => (
            world_size.div_ceil(num_nodes),
            format!(
                "SLURM_NTASKS / {}, rounded up",
                nodes_var.split(' ').next().unwrap_or(nodes_var)
            ),
        ),
    };
    let local_rank = optional_number(env, "SLURM_LOCALID")?.unwrap_or(0);
    let sources = Sources {
        world_size: "SLURM_NTASKS".into(),
        local_world_size: local_source,
        num_nodes: nodes_var.into(),
    };
    check_counts(
        (rank, "SLURM_PROCID"),
        world_size,
        (local_rank, "SLURM_LOCALID"),
        local_world_size,
        &sources,
    )?;
    let node = optional_number(env, "SLURM_NODEID")?.unwrap_or(rank / local_world_size);
    let gpus_on_node = match env.get("SLURM_GPUS_ON_NODE") {
        Some(_) => optional_number(env, "SLURM_GPUS_ON_NODE")?,
        None => env.get("SLURM_GPUS_PER_NODE").and_then(|g| gpu_count(g)),
    };
    let master_addr = match env.get("MASTER_ADDR") {
        Some(a) => a.clone(),
        None => {
            let (var, list) = ["SLURM_JOB_NODELIST", "SLURM_NODELIST"]
                .iter()
                .find_map(|v| env.get(*v).map(|l| (*v, l)))
                .ok_or_else(|| {
                    Error::Usage(
                        "SLURM_JOB_NODELIST is not set: run under srun, or set MASTER_ADDR to the host of rank 0".into(),
                    )
                })?;
            first_host(list).map_err(|e| Error::Usage(format!("{var}={list}: {e}")))?
        }
    };
    let master_port = match (env.get("MASTER_PORT"), env.get("SLURM_JOB_ID")) {
        (Some(p), _) => port(p, "MASTER_PORT")?,
        (None, Some(_)) => default_slurm_port(number(env, "SLURM_JOB_ID")? as u64),
        (None, None) => DEFAULT_PORT,
    };
    Ok(ProcessGroup {
        rank,
        world_size,
        local_rank,
        local_world_size,
        node,
        num_nodes,
        gpus_on_node,
        master_addr,
        master_port,
        launcher: Launcher::Slurm,
        sources,
    })
}

/// A variable that must hold a non-negative integer.
fn number(env: &HashMap<String, String>, var: &str) -> Result<usize> {
    optional_number(env, var)?.ok_or_else(|| Error::Usage(format!("{var} is not set")))
}

fn optional_number(env: &HashMap<String, String>, var: &str) -> Result<Option<usize>> {
    env.get(var)
        .map(|v| {
            v.trim().parse().map_err(|_| {
                Error::Usage(format!(
                    "{var}={v}: expected a non-negative integer (set by the launcher; unset it if you set it yourself)"
                ))
            })
        })
        .transpose()
}

fn port(v: &str, var: &str) -> Result<u16> {
    v.trim()
        .parse()
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(|| Error::Usage(format!("{var}={v}: expected a port number, 1 to 65535")))
}

/// Ranks within their counts, counts from 1 to [`MAX_WORLD_SIZE`], each named by the
/// variable it came from.
fn check_counts(
    (rank, rank_var): (usize, &str),
    world: usize,
    (local_rank, local_var): (usize, &str),
    local_world: usize,
    sources: &Sources,
) -> Result<()> {
    for (n, source) in [
        (world, &sources.world_size),
        (local_world, &sources.local_world_size),
    ] {
        if n == 0 {
            return Err(Error::Usage(format!(
                "{source} is 0: a run has at least one process (set by the launcher; unset it if you set it yourself)"
            )));
        }
        if n > MAX_WORLD_SIZE {
            return Err(Error::Usage(format!(
                "{source} is {n}: more processes than a run can have (at most {MAX_WORLD_SIZE}: rank 0 keeps a connection to every other rank)"
            )));
        }
    }
    if rank >= world {
        return Err(Error::Usage(format!(
            "{rank_var}={rank} but the world size is {world}: ranks run from 0 to {}",
            world - 1
        )));
    }
    if local_rank >= local_world {
        return Err(Error::Usage(format!(
            "{local_var}={local_rank} but this node runs {local_world} processes: local ranks run from 0 to {}",
            local_world - 1
        )));
    }
    Ok(())
}

/// The count in `SLURM_GPUS_PER_NODE`: `8`, `a100:8` or `gpu:a100:8` (`None` when it is
/// not one of these, e.g. a per-node list).
fn gpu_count(spec: &str) -> Option<usize> {
    spec.rsplit(':').next()?.trim().parse().ok()
}

/// The first host of a SLURM host list (`jz[1001-1004,1010],gpu7` → `jz1001`).
pub fn first_host(list: &str) -> std::result::Result<String, String> {
    expand_hosts(list, 1)?
        .into_iter()
        .next()
        .ok_or_else(|| "empty host list".to_string())
}

/// The hosts of a SLURM host list, in order, at most `limit` of them.
///
/// ```text
/// jz[1001-1003,1010],gpu7   →  jz1001 jz1002 jz1003 jz1010 gpu7
/// n[01-02]-ib[1-2]          →  n01-ib1 n01-ib2 n02-ib1 n02-ib2
/// ```
/// Zero padding is kept (`[08-10]` → `08 09 10`).
pub fn expand_hosts(list: &str, limit: usize) -> std::result::Result<Vec<String>, String> {
    let mut hosts = Vec::new();
    for item in split_top_level(list)? {
        if item.is_empty() {
            continue;
        }
        expand_one(item, limit, &mut hosts)?;
        if hosts.len() >= limit {
            hosts.truncate(limit);
            break;
        }
    }
    Ok(hosts)
}

/// `a[1-2],b` → `a[1-2]`, `b`: commas inside brackets do not separate hosts.
fn split_top_level(list: &str) -> std::result::Result<Vec<&str>, String> {
    let mut items = Vec::new();
    let (mut depth, mut start) = (0usize, 0);
    for (i, c) in list.char_indices() {
        match c {
            '[' if depth == 0 => depth = 1,
            '[' => return Err(format!("nested '[' at byte {i}")),
            ']' if depth == 1 => depth = 0,
            ']' => return Err(format!("']' without '[' at byte {i}")),
            ',' if depth == 0 => {
                items.push(list[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("'[' without ']'".into());
    }
    items.push(list[start..].trim());
    Ok(items)
}

/// One host pattern (`n[01-02]-ib[1-2]`): the product of its bracket ranges, in order.
fn expand_one(
    pattern: &str,
    limit: usize,
    out: &mut Vec<String>,
) -> std::result::Result<(), String> {
    let Some(open) = pattern.find('[') else {
        out.push(pattern.to_string());
        return Ok(());
    };
    let close = open
        + pattern[open..]
            .find(']')
            .ok_or_else(|| format!("'[' without ']' in '{pattern}'"))?;
    let (prefix, rest) = (&pattern[..open], &pattern[close + 1..]);
    for part in pattern[open + 1..close].split(',') {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let width = lo.trim().len();
        let bad = || format!("bad range '{part}' in '{pattern}'");
        let lo_n: u64 = lo.trim().parse().map_err(|_| bad())?;
        let hi_n: u64 = hi.trim().parse().map_err(|_| bad())?;
        if hi_n < lo_n {
            return Err(bad());
        }
        for n in lo_n..=hi_n {
            let mut tail = Vec::new();
            expand_one(rest, limit, &mut tail)?;
            for t in tail {
                out.push(format!("{prefix}{n:0width$}{t}"));
                if out.len() >= limit {
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

/// `--devices` (per node) and `--num-nodes` against what the launcher started: a mismatch
/// names the `#SBATCH` line or torchrun flag that disagrees. Every problem in one line.
pub fn check_topology(pg: &ProcessGroup, devices: usize, num_nodes: usize) -> Result<()> {
    check_given_topology(pg, Some(devices), Some(num_nodes))
}

/// [`check_topology`] where the flags may not have been given (`dist-check`): a count
/// not given is the launcher's, and a message names the variable it came from, never a
/// flag the user did not pass.
pub fn check_given_topology(
    pg: &ProcessGroup,
    devices: Option<usize>,
    num_nodes: Option<usize>,
) -> Result<()> {
    let mut problems = Vec::new();
    for (flag, v) in [("--devices", devices), ("--num-nodes", num_nodes)] {
        if v == Some(0) {
            problems.push(format!("{flag} must be positive"));
        }
    }
    let d = devices.unwrap_or(pg.local_world_size);
    let n = num_nodes.unwrap_or(pg.num_nodes);
    match pg.launcher {
        Launcher::Slurm => {
            if pg.local_world_size != d {
                problems.push(format!(
                    "SLURM starts {} tasks on this node (#SBATCH --ntasks-per-node={}) but --devices is {d}",
                    pg.local_world_size, pg.local_world_size
                ));
            }
            if let Some(gpus) = pg.gpus_on_node
                && gpus != d
            {
                let ours = match devices {
                    Some(d) => format!("--devices is {d}"),
                    None => format!(
                        "it starts {d} tasks on this node ({})",
                        pg.sources.local_world_size
                    ),
                };
                problems.push(format!(
                    "SLURM gives this node {gpus} GPUs (#SBATCH --gres=gpu:{gpus}) but {ours}"
                ));
            }
            if pg.num_nodes != n {
                problems.push(format!(
                    "SLURM allocated {} nodes (#SBATCH --nodes={}) but --num-nodes is {n}",
                    pg.num_nodes, pg.num_nodes
                ));
            }
        }
        Launcher::Torchrun => {
            if pg.local_world_size != d {
                problems.push(format!(
                    "torchrun starts {} processes per node (--nproc-per-node {}) but --devices is {d}",
                    pg.local_world_size, pg.local_world_size
                ));
            }
            if pg.num_nodes != n {
                problems.push(format!(
                    "torchrun runs on {} nodes (--nnodes {}) but --num-nodes is {n}",
                    pg.num_nodes, pg.num_nodes
                ));
            }
        }
    }
    let product = d as u128 * n as u128;
    if problems.is_empty() && pg.world_size as u128 != product {
        let per_node = match devices {
            Some(d) => format!("--devices {d}"),
            None => format!("{d} per node ({})", pg.sources.local_world_size),
        };
        let nodes = match num_nodes {
            Some(n) => format!("--num-nodes {n}"),
            None => format!("{n} nodes ({})", pg.sources.num_nodes),
        };
        problems.push(format!(
            "{} starts {} processes in all ({}) but {per_node} × {nodes} is {product}",
            pg.launcher, pg.world_size, pg.sources.world_size
        ));
    }
    if problems.is_empty() {
        return Ok(());
    }
    let fix = match pg.launcher {
        Launcher::Slurm => {
            "keep --devices, #SBATCH --gres=gpu:N and #SBATCH --ntasks-per-node equal, and --num-nodes equal to #SBATCH --nodes"
        }
        Launcher::Torchrun => {
            "keep --devices equal to torchrun's --nproc-per-node and --num-nodes to its --nnodes"
        }
    };
    Err(Error::Usage(format!("{}: {fix}", problems.join("; "))))
}

/// The CUDA ordinal this process drives: its local rank, or 0 when the launcher made
/// exactly one GPU visible to it (`CUDA_VISIBLE_DEVICES` with one entry, as SLURM's
/// `--gpus-per-task=1` does).
pub fn local_cuda_ordinal(pg: &ProcessGroup, env: &HashMap<String, String>) -> Result<usize> {
    let Some(visible) = env.get("CUDA_VISIBLE_DEVICES") else {
        return Ok(pg.local_rank);
    };
    let count = visible.split(',').filter(|d| !d.trim().is_empty()).count();
    if count == 1 {
        Ok(0)
    } else if pg.local_rank < count {
        Ok(pg.local_rank)
    } else {
        Err(Error::Usage(format!(
            "CUDA_VISIBLE_DEVICES={visible} shows {count} GPUs but this is local rank {} of {}: give every task its own GPU (#SBATCH --gres=gpu:N with N = --ntasks-per-node)",
            pg.local_rank, pg.local_world_size
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Task 11 of 2 nodes × 8 GPUs, as `srun` sets it up.
    fn slurm_task() -> HashMap<String, String> {
        env(&[
            ("SLURM_JOB_ID", "123456"),
            ("SLURM_JOB_NAME", "claire"),
            ("SLURM_PROCID", "11"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "3"),
            ("SLURM_NODEID", "1"),
            ("SLURM_NNODES", "2"),
            ("SLURM_NTASKS_PER_NODE", "8"),
            ("SLURM_GPUS_ON_NODE", "8"),
            ("SLURM_JOB_NODELIST", "jz[1001-1002]"),
        ])
    }

    #[test]
    fn host_lists_expand_like_slurm() {
        assert_eq!(first_host("jz[1001-1004,1010],gpu7").unwrap(), "jz1001");
        assert_eq!(first_host("gpu7,jz[1-2]").unwrap(), "gpu7");
        assert_eq!(first_host("node-a").unwrap(), "node-a");
        assert_eq!(
            expand_hosts("jz[1001-1003,1010],gpu7", 100).unwrap(),
            ["jz1001", "jz1002", "jz1003", "jz1010", "gpu7"]
        );
        assert_eq!(
            expand_hosts("n[08-10]", 100).unwrap(),
            ["n08", "n09", "n10"]
        );
        assert_eq!(
            expand_hosts("n[1-2]-ib[3,5]", 100).unwrap(),
            ["n1-ib3", "n1-ib5", "n2-ib3", "n2-ib5"]
        );
        assert_eq!(expand_hosts("n[1-100000000]", 3).unwrap().len(), 3);
        for bad in ["jz[1-", "jz]1", "jz[a-b]", "jz[5-2]", "jz[[1]]", ""] {
            assert!(first_host(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn slurm_task_is_read() {
        let pg = process_group(&slurm_task()).unwrap().unwrap();
        assert_eq!(
            pg,
            ProcessGroup {
                rank: 11,
                world_size: 16,
                local_rank: 3,
                local_world_size: 8,
                node: 1,
                num_nodes: 2,
                gpus_on_node: Some(8),
                master_addr: "jz1001".into(),
                master_port: default_slurm_port(123456),
                launcher: Launcher::Slurm,
                sources: Sources {
                    world_size: "SLURM_NTASKS".into(),
                    local_world_size: "SLURM_NTASKS_PER_NODE".into(),
                    num_nodes: "SLURM_NNODES".into(),
                },
            }
        );
        check_topology(&pg, 8, 2).unwrap();
        let mut e = slurm_task();
        e.insert("MASTER_PORT".into(), "31000".into());
        e.insert("MASTER_ADDR".into(), "10.0.0.1".into());
        e.remove("SLURM_NNODES");
        e.insert("SLURM_JOB_NUM_NODES".into(), "2".into());
        let pg = process_group(&e).unwrap().unwrap();
        assert_eq!(
            (pg.master_addr.as_str(), pg.master_port, pg.num_nodes),
            ("10.0.0.1", 31000, 2)
        );
    }

    #[test]
    fn torchrun_process_is_read() {
        let e = env(&[
            ("RANK", "5"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "4"),
            ("GROUP_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29400"),
            // torchrun inside a SLURM job: torchrun's variables describe this process.
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
        ]);
        let pg = process_group(&e).unwrap().unwrap();
        assert_eq!(pg.launcher, Launcher::Torchrun);
        assert_eq!(
            (pg.rank, pg.world_size, pg.local_rank, pg.node, pg.num_nodes),
            (5, 8, 1, 1, 2)
        );
        assert_eq!((pg.master_addr.as_str(), pg.master_port), ("node0", 29400));
        check_topology(&pg, 4, 2).unwrap();
        let err = check_topology(&pg, 8, 1).unwrap_err().to_string();
        assert!(
            err.contains("--nproc-per-node 4") && err.contains("--nnodes 2"),
            "{err}"
        );
    }

    #[test]
    fn no_launcher_is_none() {
        assert_eq!(process_group(&env(&[("HOME", "/root")])).unwrap(), None);
        // salloc + an interactive shell: the job's variables, but nothing was launched.
        let mut e = slurm_task();
        e.insert("SLURM_JOB_NAME".into(), "bash".into());
        assert_eq!(process_group(&e).unwrap(), None);
        // ...but `srun lit-claire ...` inside that allocation is a launch.
        e.insert("SLURM_STEP_ID".into(), "0".into());
        assert_eq!(process_group(&e).unwrap().unwrap().rank, 11);
    }

    #[test]
    fn bad_values_name_the_variable() {
        let cases = [
            (vec![("RANK", "x"), ("WORLD_SIZE", "2")], "RANK=x"),
            (
                vec![("RANK", "2"), ("WORLD_SIZE", "2")],
                "RANK=2 but the world size is 2",
            ),
            (
                vec![("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "99999")],
                "MASTER_PORT=99999",
            ),
            (
                vec![
                    ("SLURM_PROCID", "0"),
                    ("SLURM_NTASKS", "2"),
                    ("SLURM_JOB_NODELIST", "a[1-"),
                ],
                "SLURM_JOB_NODELIST=a[1-",
            ),
            (
                vec![("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2")],
                "SLURM_JOB_NODELIST is not set",
            ),
        ];
        for (pairs, want) in cases {
            let err = process_group(&env(&pairs)).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }

    /// Issue 23, case 23: `SLURM_NNODES=0` was blamed on `--num-nodes 0`, a flag never
    /// passed. Every count from the environment is named by its variable, and without
    /// the flags a mismatch names the variables it comes from.
    #[test]
    fn counts_from_the_environment_name_their_variable() {
        for (var, value, want) in [
            ("SLURM_NNODES", "0", "SLURM_NNODES=0"),
            ("SLURM_NTASKS_PER_NODE", "0", "SLURM_NTASKS_PER_NODE is 0"),
            ("SLURM_NTASKS", "0", "SLURM_NTASKS is 0"),
            ("SLURM_NTASKS", "1000000000", "SLURM_NTASKS is 1000000000"),
        ] {
            let mut e = slurm_task();
            e.insert(var.into(), value.into());
            if var == "SLURM_NTASKS" {
                e.insert("SLURM_PROCID".into(), "0".into());
            }
            let err = process_group(&e).unwrap_err().to_string();
            assert!(
                err.contains(want) && !err.contains("--num-nodes") && !err.contains('\n'),
                "{var}={value}: {err}"
            );
        }
        let mut e = slurm_task();
        e.remove("SLURM_NNODES");
        e.insert("SLURM_JOB_NUM_NODES".into(), "0".into());
        let err = process_group(&e).unwrap_err().to_string();
        assert!(err.contains("SLURM_JOB_NUM_NODES=0"), "{err}");
        for (pairs, want) in [
            (vec![("RANK", "0"), ("WORLD_SIZE", "0")], "WORLD_SIZE is 0"),
            (
                vec![("RANK", "0"), ("WORLD_SIZE", "1000000000")],
                "WORLD_SIZE is 1000000000: more processes than a run can have (at most 65536",
            ),
            (
                vec![
                    ("RANK", "0"),
                    ("WORLD_SIZE", "2"),
                    ("LOCAL_WORLD_SIZE", "0"),
                ],
                "LOCAL_WORLD_SIZE is 0",
            ),
        ] {
            let err = process_group(&env(&pairs)).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
        // 16 tasks on 3 nodes without --ntasks-per-node: 6 per node, 18 ≠ 16. Without
        // the flags, the message names the variables, not --devices or --num-nodes.
        let mut e = slurm_task();
        e.remove("SLURM_NTASKS_PER_NODE");
        e.remove("SLURM_GPUS_ON_NODE");
        e.insert("SLURM_NNODES".into(), "3".into());
        let pg = process_group(&e).unwrap().unwrap();
        let err = check_given_topology(&pg, None, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("(SLURM_NTASKS)")
                && err.contains("6 per node (SLURM_NTASKS / SLURM_NNODES, rounded up)")
                && err.contains("3 nodes (SLURM_NNODES)")
                && !err.contains("--devices 6")
                && !err.contains("--num-nodes 3"),
            "{err}"
        );
        // Given flags are named as flags.
        let err = check_given_topology(&pg, Some(6), Some(3))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--devices 6 × --num-nodes 3"), "{err}");
        let err = check_given_topology(&pg, Some(0), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--devices must be positive"), "{err}");
    }

    #[test]
    fn topology_mismatch_names_the_sbatch_line() {
        let pg = process_group(&slurm_task()).unwrap().unwrap();
        let err = check_topology(&pg, 4, 2).unwrap_err().to_string();
        assert!(err.contains("#SBATCH --ntasks-per-node=8"), "{err}");
        assert!(err.contains("#SBATCH --gres=gpu:8"), "{err}");
        let err = check_topology(&pg, 8, 1).unwrap_err().to_string();
        assert!(
            err.contains("#SBATCH --nodes=2") && !err.contains("SLURM starts"),
            "{err}"
        );
        let mut e = slurm_task();
        e.insert("SLURM_GPUS_ON_NODE".into(), "4".into());
        let pg = process_group(&e).unwrap().unwrap();
        let err = check_topology(&pg, 8, 2).unwrap_err().to_string();
        assert!(
            err.contains("#SBATCH --gres=gpu:4") && !err.contains("SLURM starts"),
            "{err}"
        );
        e.remove("SLURM_GPUS_ON_NODE");
        e.insert("SLURM_GPUS_PER_NODE".into(), "h100:8".into());
        assert_eq!(process_group(&e).unwrap().unwrap().gpus_on_node, Some(8));
    }

    #[test]
    fn each_rank_finds_its_gpu() {
        let pg = process_group(&slurm_task()).unwrap().unwrap();
        assert_eq!(local_cuda_ordinal(&pg, &env(&[])).unwrap(), 3);
        let all = env(&[("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")]);
        assert_eq!(local_cuda_ordinal(&pg, &all).unwrap(), 3);
        assert_eq!(
            local_cuda_ordinal(&pg, &env(&[("CUDA_VISIBLE_DEVICES", "5")])).unwrap(),
            0
        );
        let err = local_cuda_ordinal(&pg, &env(&[("CUDA_VISIBLE_DEVICES", "0,1")])).unwrap_err();
        assert!(
            err.to_string().contains("CUDA_VISIBLE_DEVICES=0,1"),
            "{err}"
        );
    }
}
