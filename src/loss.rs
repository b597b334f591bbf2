//! Next-token cross-entropy, differentiable, with ignored positions.

use candle_core::{DType, Result, Tensor};

/// Mean of `−log softmax(logits)[target]` over the positions where `mask` is 1.
///
/// `logits: (N, V)`, `targets: (N)` u32, `mask: (N)` of 0/1 (None: all count).
/// Computed in f32 with the max subtracted (detached; it cancels out).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let (sum, count) = cross_entropy_sum(logits, targets, mask)?;
    sum / count
}

/// Sum of the token losses and the number of tokens counted.
pub fn cross_entropy_sum(
    logits: &Tensor,
    targets: &Tensor,
    mask: Option<&Tensor>,
) -> Result<(Tensor, f64)> {
    let logits = logits.to_dtype(DType::F32)?;
    let nll = match crate::model::fused::cross_entropy_rows(&logits, targets)? {
        Some(nll) => nll,
        None => nll_plain(&logits, targets)?,
    };
    match mask {
        Some(m) => {
            let m = m.to_dtype(DType::F32)?;
            let count = m.sum_all()?.to_scalar::<f32>()? as f64;
            Ok(((nll * m)?.sum_all()?, count))
        }
        None => {
            let n = nll.dim(0)? as f64;
            Ok((nll.sum_all()?, n))
        }
    }
}

pub use crate::model::fused::nll_plain;
