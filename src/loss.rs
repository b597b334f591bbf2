//! Next-token cross-entropy, differentiable, with ignored positions.

use candle_core::{D, DType, Result, Tensor};

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
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let log_z = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?; // (N, 1)
    let picked = shifted.gather(&targets.unsqueeze(1)?, 1)?; // (N, 1)
    let nll = (log_z - picked)?.squeeze(1)?; // (N)
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

/// Inputs and targets of a language-modelling batch `rows: (B, T+1)`: inputs are
/// `rows[:, :-1]`, targets `rows[:, 1:]`; a target equal to `ignore` (padding) does not count.
/// Returns `(inputs (B, T), targets (B·T), mask (B·T))`.
pub fn shift_batch(rows: &Tensor, ignore: Option<u32>) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let (_, t1) = rows.dims2()?;
    let inputs = rows.narrow(1, 0, t1 - 1)?.contiguous()?;
    let targets = rows.narrow(1, 1, t1 - 1)?.flatten_all()?;
    let mask = match ignore {
        Some(id) => Some(targets.ne(id)?.to_dtype(DType::F32)?),
        None => None,
    };
    Ok((inputs, targets, mask))
}
