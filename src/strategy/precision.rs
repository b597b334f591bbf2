//! Precision settings, named as Lightning Fabric names them.

use candle_core::DType;

use super::DeviceSpec;
use crate::error::{Error, Result};

/// How parameters are stored and activations computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// Everything in f32.
    True32,
    /// Parameters, optimizer state and compute in bf16.
    Bf16True,
    /// f32 master parameters and optimizer state, bf16 compute.
    Bf16Mixed,
    /// f32 master parameters, f16 compute, dynamic loss scaling.
    F16Mixed,
}

impl Precision {
    pub const ALL: [Precision; 4] = [
        Precision::True32,
        Precision::Bf16True,
        Precision::Bf16Mixed,
        Precision::F16Mixed,
    ];

    /// Dtype of stored parameters and optimizer state.
    pub fn param_dtype(self) -> DType {
        match self {
            Precision::Bf16True => DType::BF16,
            _ => DType::F32,
        }
    }

    /// Dtype of activations.
    pub fn compute_dtype(self) -> DType {
        match self {
            Precision::True32 => DType::F32,
            Precision::Bf16True | Precision::Bf16Mixed => DType::BF16,
            Precision::F16Mixed => DType::F16,
        }
    }

    /// Whether the loss is scaled to keep f16 gradients from underflowing.
    pub fn uses_loss_scaling(self) -> bool {
        self == Precision::F16Mixed
    }

    /// Precisions a device can do. candle's CPU backend computes in f32, bf16 and f16
    /// (f16 through the same gemm kernels), so all four work on CPU too.
    pub fn supported_on(_device: &DeviceSpec) -> Vec<Precision> {
        Precision::ALL.to_vec()
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::True32 => "32-true",
            Precision::Bf16True => "bf16-true",
            Precision::Bf16Mixed => "bf16-mixed",
            Precision::F16Mixed => "16-mixed",
        })
    }
}

impl std::str::FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "32-true" | "32" | "f32" => Ok(Precision::True32),
            "bf16-true" => Ok(Precision::Bf16True),
            "bf16-mixed" | "bf16" => Ok(Precision::Bf16Mixed),
            "16-mixed" | "16" => Ok(Precision::F16Mixed),
            other => Err(Error::Usage(format!(
                "--precision {other}: expected one of 32-true, bf16-true, bf16-mixed, 16-mixed"
            ))),
        }
    }
}
