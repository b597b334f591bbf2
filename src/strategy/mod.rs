//! The Strategy: the one owner of device, precision and ranks.
//!
//! Modelled on Lightning Fabric: commands and the trainer ask the Strategy where
//! tensors live, in which dtype parameters are kept and computed, whether this process
//! is rank 0, and to reduce values across ranks. Nothing else in the crate picks a
//! device or a dtype.

pub mod collective;
pub mod dist_check;
pub mod env;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod precision;
pub mod rendezvous;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device};

use crate::error::{Error, Result};
use crate::model::BuildOptions;
pub use collective::{Collective, ReduceOp};
pub use env::{Launcher, ProcessGroup};
pub use precision::Precision;

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
#[derive(Debug, Clone)]
pub struct Strategy {
    pub spec: DeviceSpec,
    pub device: Device,
    pub precision: Precision,
    /// This process's rank and the number of processes (1 without data parallelism).
    pub rank: usize,
    pub world_size: usize,
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
        })
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
        Ok(x)
    }

    /// Average gradients over ranks, in place (nothing to do in a single process).
    pub fn all_reduce_grads(&self, _grads: &mut [candle_core::Tensor]) -> Result<()> {
        Ok(())
    }
}

/// The GPU of this process in a launcher's process group: its local rank's, or the only
/// one `CUDA_VISIBLE_DEVICES` shows it (see [`env::local_cuda_ordinal`]).
pub fn local_device(pg: &ProcessGroup, env: &HashMap<String, String>) -> Result<Device> {
    cuda_device(env::local_cuda_ordinal(pg, env)?)
}

/// NCCL collectives between the processes of `pg`, one GPU each (`device`, from
/// [`local_device`]): meets the other ranks over TCP within `timeout` (see
/// [`rendezvous`]), then opens an NCCL communicator on the device's stream.
#[cfg(feature = "cuda")]
pub fn nccl_collective(
    pg: &ProcessGroup,
    device: &Device,
    timeout: Duration,
) -> Result<Arc<dyn Collective>> {
    nccl::nccl_collective(pg, device, timeout)
}

/// NCCL collectives need the `cuda` feature.
#[cfg(not(feature = "cuda"))]
pub fn nccl_collective(
    pg: &ProcessGroup,
    _device: &Device,
    _timeout: Duration,
) -> Result<Arc<dyn Collective>> {
    Err(Error::Usage(format!(
        "{} started {} processes, but this lit-claire was built without CUDA and NCCL; rebuild with `cargo build --release --features cuda`",
        pg.launcher, pg.world_size
    )))
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
