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
    /// Where `master_port` came from, for messages: `MASTER_PORT`, `LIT_CLAIRE_PORT`,
    /// or how it was derived ([`rendezvous_port`]).
    pub port_source: String,
    pub launcher: Launcher,
    /// Where the counts came from, for messages.
    pub sources: Sources,
    /// What every process of this job knows and a stranger does not: the rendezvous
    /// admits only a hello that carries it.
    pub secret: JobSecret,
}

/// Where a [`JobSecret`] came from, in order of preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretSource {
    /// No launcher variable: any process that speaks the protocol is admitted.
    None,
    /// `LIT_CLAIRE_JOB_SECRET`, set by the job script (`slurm/` sets a random one).
    Explicit,
    /// `SLURM_JOB_ID`: every task of the job has it.
    SlurmJobId,
    /// `TORCHELASTIC_RUN_ID`: torchrun's `--rdzv-id` (a fresh id under `--standalone`).
    TorchrunRunId,
}

impl SecretSource {
    /// The variable, as messages name it.
    pub fn variable(self) -> &'static str {
        match self {
            SecretSource::None => "no job variable",
            SecretSource::Explicit => "LIT_CLAIRE_JOB_SECRET",
            SecretSource::SlurmJobId => "SLURM_JOB_ID",
            SecretSource::TorchrunRunId => "TORCHELASTIC_RUN_ID",
        }
    }

    /// Its byte in the rendezvous hello.
    pub fn code(self) -> u8 {
        match self {
            SecretSource::None => 0,
            SecretSource::Explicit => 1,
            SecretSource::SlurmJobId => 2,
            SecretSource::TorchrunRunId => 3,
        }
    }

    pub fn from_code(b: u8) -> Option<Self> {
        [
            SecretSource::None,
            SecretSource::Explicit,
            SecretSource::SlurmJobId,
            SecretSource::TorchrunRunId,
        ]
        .into_iter()
        .find(|s| s.code() == b)
    }
}

/// The job's secret as the rendezvous greeting carries it: a SHA-256 digest of the
/// variable's name and value (the value itself never travels), compared in constant
/// time. Its `Debug` shows only where it came from.
#[derive(Clone)]
pub struct JobSecret {
    pub source: SecretSource,
    digest: [u8; 32],
}

impl JobSecret {
    /// The secret `value` of `source`.
    pub fn new(source: SecretSource, value: &str) -> Self {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(b"lit-claire rendezvous job secret\0");
        h.update(source.variable().as_bytes());
        h.update(b"\0");
        h.update(value.as_bytes());
        JobSecret {
            source,
            digest: h.finalize().into(),
        }
    }

    /// No secret: what a process started without a launcher has.
    pub fn none() -> Self {
        Self::new(SecretSource::None, "")
    }

    /// `LIT_CLAIRE_JOB_SECRET` if set (and not empty), else the launcher's own job id
    /// (`TORCHELASTIC_RUN_ID` under torchrun, `SLURM_JOB_ID` under SLURM), else the
    /// other one, else none.
    pub fn from_env(env: &HashMap<String, String>, launcher: Launcher) -> Self {
        let job_ids = match launcher {
            Launcher::Torchrun => [SecretSource::TorchrunRunId, SecretSource::SlurmJobId],
            Launcher::Slurm => [SecretSource::SlurmJobId, SecretSource::TorchrunRunId],
        };
        std::iter::once(SecretSource::Explicit)
            .chain(job_ids)
            .find_map(|s| {
                env.get(s.variable())
                    .filter(|v| !v.trim().is_empty())
                    .map(|v| Self::new(s, v.trim()))
            })
            .unwrap_or_else(Self::none)
    }

    /// The 32 bytes a hello carries.
    pub fn digest(&self) -> &[u8; 32] {
        &self.digest
    }

    /// Whether `digest` is this secret's, in time that does not depend on where they
    /// differ (a stranger learns nothing from how fast it is refused).
    pub fn matches(&self, digest: &[u8]) -> bool {
        if digest.len() != self.digest.len() {
            return false;
        }
        let diff = self
            .digest
            .iter()
            .zip(digest)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(diff) == 0
    }
}

impl PartialEq for JobSecret {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source && self.matches(&other.digest)
    }
}

impl Eq for JobSecret {}

impl std::fmt::Debug for JobSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JobSecret(from {})", self.source.variable())
    }
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

/// Variable that sets the port of rank 0's rendezvous whatever the launcher says.
pub const PORT_VAR: &str = "LIT_CLAIRE_PORT";

/// The port rank 0's rendezvous listens on, and where it came from:
///
/// ```text
/// LIT_CLAIRE_PORT                                     that port
/// torchrun, TORCHELASTIC_USE_AGENT_STORE=True         MASTER_PORT + 1
/// MASTER_PORT                                         MASTER_PORT
/// SLURM without MASTER_PORT                           derived from SLURM_JOB_ID
/// nothing                                             29500
/// ```
///
/// torchrun's agent keeps its own store listening on `MASTER_PORT` (on rank 0's
/// host) for as long as the workers run, and says so to them with
/// `TORCHELASTIC_USE_AGENT_STORE`: rank 0 cannot listen there, so it takes the next
/// port, which every rank derives alike.
pub fn rendezvous_port(env: &HashMap<String, String>, launcher: Launcher) -> Result<(u16, String)> {
    if let Some(p) = env.get(PORT_VAR) {
        return Ok((port(p, PORT_VAR)?, PORT_VAR.to_string()));
    }
    let agent_store = launcher == Launcher::Torchrun
        && env
            .get("TORCHELASTIC_USE_AGENT_STORE")
            .is_some_and(|v| matches!(v.trim(), "True" | "true" | "1"));
    match env.get("MASTER_PORT") {
        Some(p) if agent_store => {
            let store = port(p, "MASTER_PORT")?;
            let ours = store.checked_add(1).ok_or_else(|| {
                Error::Usage(format!(
                    "MASTER_PORT={store}: torchrun's store listens there and lit-claire's rendezvous takes the next port, past 65535; set {PORT_VAR} to a free port (the same on every rank)"
                ))
            })?;
            Ok((
                ours,
                "MASTER_PORT + 1: torchrun's own store listens on MASTER_PORT".to_string(),
            ))
        }
        Some(p) => Ok((port(p, "MASTER_PORT")?, "MASTER_PORT".to_string())),
        None => match (launcher, env.get("SLURM_JOB_ID")) {
            (Launcher::Slurm, Some(_)) => Ok((
                default_slurm_port(number(env, "SLURM_JOB_ID")? as u64),
                "derived from SLURM_JOB_ID, MASTER_PORT being unset".to_string(),
            )),
            _ => Ok((
                DEFAULT_PORT,
                "the default, MASTER_PORT being unset".to_string(),
            )),
        },
    }
}

/// Why this process must not train on the CPU, if a launcher started it as one of
/// several: CPU ranks are threads of one process, so each of the launcher's processes
/// would train alone, all into the same run folder. One line naming the variables and
/// what to run instead.
pub fn cpu_launch_problem(pg: &ProcessGroup) -> Option<String> {
    if pg.world_size <= 1 {
        return None;
    }
    let (rank_var, one_process) = match pg.launcher {
        Launcher::Torchrun => ("RANK", "one process without torchrun"),
        Launcher::Slurm => ("SLURM_PROCID", "one task (srun --ntasks=1)"),
    };
    Some(format!(
        "{rank_var}={} {}={} ({}): this process is one of {} that {} started, but on --device cpu the ranks of a run are threads of one process, so each would train alone into the same --out-dir; start {one_process} with --device cpu --devices {}, or train on GPUs with --device cuda (one process per GPU)",
        pg.rank,
        pg.sources.world_size,
        pg.world_size,
        pg.launcher,
        pg.world_size,
        pg.launcher,
        pg.world_size
    ))
}

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
    let (master_port, port_source) = rendezvous_port(env, Launcher::Torchrun)?;
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
        port_source,
        launcher: Launcher::Torchrun,
        sources,
        secret: JobSecret::from_env(env, Launcher::Torchrun),
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
    let (master_port, port_source) = rendezvous_port(env, Launcher::Slurm)?;
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
        port_source,
        launcher: Launcher::Slurm,
        sources,
        secret: JobSecret::from_env(env, Launcher::Slurm),
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
    fn the_rendezvous_port_steps_aside_from_torchruns_store() {
        let env = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let port = |pairs: &[(&str, &str)], l| rendezvous_port(&env(pairs), l).map(|p| p.0);
        let store = ("TORCHELASTIC_USE_AGENT_STORE", "True");
        let master = ("MASTER_PORT", "29400");
        assert_eq!(port(&[master], Launcher::Torchrun).unwrap(), 29400);
        assert_eq!(port(&[master, store], Launcher::Torchrun).unwrap(), 29401);
        assert_eq!(
            port(
                &[master, ("TORCHELASTIC_USE_AGENT_STORE", "False")],
                Launcher::Torchrun
            )
            .unwrap(),
            29400
        );
        // Only torchrun's agent keeps a store there.
        assert_eq!(port(&[master, store], Launcher::Slurm).unwrap(), 29400);
        // LIT_CLAIRE_PORT wins over everything.
        assert_eq!(
            port(
                &[master, store, ("LIT_CLAIRE_PORT", "31000")],
                Launcher::Torchrun
            )
            .unwrap(),
            31000
        );
        assert_eq!(port(&[], Launcher::Torchrun).unwrap(), DEFAULT_PORT);
        assert_eq!(
            port(&[("SLURM_JOB_ID", "123456")], Launcher::Slurm).unwrap(),
            default_slurm_port(123456)
        );
        let err = port(&[("MASTER_PORT", "65535"), store], Launcher::Torchrun)
            .unwrap_err()
            .to_string();
        assert!(err.contains("set LIT_CLAIRE_PORT"), "{err}");
        for bad in ["0", "70000", "x"] {
            let err = port(&[("LIT_CLAIRE_PORT", bad)], Launcher::Torchrun)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(&format!("LIT_CLAIRE_PORT={bad}")), "{err}");
        }
        // The process group carries it, and says where it came from.
        let pg = process_group(&env(&[("RANK", "1"), ("WORLD_SIZE", "2"), master, store]))
            .unwrap()
            .unwrap();
        assert_eq!(pg.master_port, 29401);
        assert!(
            pg.port_source.contains("torchrun's own store"),
            "{}",
            pg.port_source
        );
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
                port_source: "derived from SLURM_JOB_ID, MASTER_PORT being unset".into(),
                launcher: Launcher::Slurm,
                sources: Sources {
                    world_size: "SLURM_NTASKS".into(),
                    local_world_size: "SLURM_NTASKS_PER_NODE".into(),
                    num_nodes: "SLURM_NNODES".into(),
                },
                secret: JobSecret::new(SecretSource::SlurmJobId, "123456"),
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

    /// Issue 26: the rendezvous secret comes from the job script's variable first, then
    /// the launcher's own job id; it never shows in `Debug`, and equal values from
    /// different variables are different secrets.
    #[test]
    fn the_job_secret_comes_from_the_script_or_the_launcher() {
        let mut e = slurm_task();
        let pg = process_group(&e).unwrap().unwrap();
        assert_eq!(pg.secret.source, SecretSource::SlurmJobId);
        e.insert("LIT_CLAIRE_JOB_SECRET".into(), "s3cr3t-value".into());
        let pg = process_group(&e).unwrap().unwrap();
        assert_eq!(
            pg.secret,
            JobSecret::new(SecretSource::Explicit, "s3cr3t-value")
        );
        assert!(!format!("{pg:?}").contains("s3cr3t"), "{pg:?}");
        // torchrun in a SLURM job: torchrun's run id before the job id.
        let t = env(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("TORCHELASTIC_RUN_ID", "abc"),
            ("SLURM_JOB_ID", "7"),
        ]);
        let s = process_group(&t).unwrap().unwrap().secret;
        assert_eq!(s, JobSecret::new(SecretSource::TorchrunRunId, "abc"));
        let s = JobSecret::from_env(&env(&[("SLURM_JOB_ID", "7")]), Launcher::Torchrun);
        assert_eq!(s.source, SecretSource::SlurmJobId);
        assert_eq!(
            JobSecret::from_env(&env(&[]), Launcher::Slurm),
            JobSecret::none()
        );
        let (a, b) = (
            JobSecret::new(SecretSource::SlurmJobId, "7"),
            JobSecret::new(SecretSource::TorchrunRunId, "7"),
        );
        assert!(!a.matches(b.digest()) && a.matches(a.digest()) && !a.matches(&[0; 31]));
        for c in 0..4 {
            assert_eq!(SecretSource::from_code(c).unwrap().code(), c);
        }
        assert_eq!(SecretSource::from_code(9), None);
    }

    /// Issue 26: processes a launcher started are refused on the CPU with the
    /// variables that say so; a launcher's single process is not.
    #[test]
    fn cpu_processes_of_a_launcher_are_refused_naming_the_variables() {
        let pg = process_group(&slurm_task()).unwrap().unwrap();
        let e = cpu_launch_problem(&pg).unwrap();
        assert!(
            e.starts_with("SLURM_PROCID=11 SLURM_NTASKS=16 (SLURM): this process is one of 16")
                && e.contains("--device cpu --devices 16"),
            "{e}"
        );
        let t = env(&[("RANK", "0"), ("WORLD_SIZE", "1")]);
        assert_eq!(
            cpu_launch_problem(&process_group(&t).unwrap().unwrap()),
            None
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
