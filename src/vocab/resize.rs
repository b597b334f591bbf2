//! Resizing the token embeddings and the output head to a new vocabulary.
//!
//! Every row of the new `(V', C)` matrix comes from the old `(V, C)` one:
//!
//! ```text
//! Copy(i)        row i                         a token both vocabularies share (same id or same text)
//! Mean([i, j])   (row i + row j) / 2           a new token, from the pieces the base cuts it into
//! MeanAll        mean of all V rows            --init mean, and the padding rows
//! ```
//!
//! Means are taken in f32 (f64 for the mean of all rows) and stored in the matrix's
//! dtype. The padding rows, up to a multiple of 64, get the mean of all rows: what
//! transformers' `resize_token_embeddings(pad_to_multiple_of=64)` gives them, less
//! its noise (it samples from a normal around that mean with 1e-9 times the rows'
//! covariance).

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Where one row of the resized matrix comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowSource {
    Copy(u32),
    Mean(Vec<u32>),
    MeanAll,
}

/// `n` rounded up to a multiple of `multiple` (1: unchanged).
pub fn padded(n: usize, multiple: usize) -> usize {
    n.div_ceil(multiple.max(1)) * multiple.max(1)
}

/// The rows of the resized matrix, one per new id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowPlan {
    pub rows: Vec<RowSource>,
}

impl RowPlan {
    /// The plan for `vocab` rows: `tokens` (one source per id of the new tokenizer),
    /// then padding. With `keep_old` (the same tokenizer, extended), a padding row
    /// that existed before keeps its values, as a resize would.
    pub fn new(tokens: Vec<RowSource>, vocab: usize, old_rows: usize, keep_old: bool) -> Self {
        let mut rows = tokens;
        for r in rows.len()..vocab {
            rows.push(if keep_old && r < old_rows {
                RowSource::Copy(r as u32)
            } else {
                RowSource::MeanAll
            });
        }
        RowPlan { rows }
    }

    /// Ids whose row is not a copy: the rows to train first.
    pub fn new_rows(&self) -> Vec<u32> {
        self.rows
            .iter()
            .enumerate()
            .filter(|(_, s)| !matches!(s, RowSource::Copy(_)))
            .map(|(i, _)| i as u32)
            .collect()
    }

    /// The resized matrix of `old: (V, C)`, in `old`'s dtype. `name` is for errors.
    pub fn apply(&self, old: &Tensor, name: &str) -> Result<Tensor> {
        let (v, c) = old.dims2()?;
        let data: Vec<f32> = old.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let row = |i: u32| -> Result<&[f32]> {
            let i = i as usize;
            if i >= v {
                return Err(Error::Weights(format!(
                    "{name}: row {i} asked for, but the matrix has {v} rows"
                )));
            }
            Ok(&data[i * c..(i + 1) * c])
        };
        let mut mean_all = vec![0f64; c];
        for r in data.chunks_exact(c) {
            for (m, x) in mean_all.iter_mut().zip(r) {
                *m += f64::from(*x);
            }
        }
        let mean_all: Vec<f32> = mean_all
            .iter()
            .map(|m| (m / v.max(1) as f64) as f32)
            .collect();
        let mut out = Vec::with_capacity(self.rows.len() * c);
        for src in &self.rows {
            match src {
                RowSource::Copy(i) => out.extend_from_slice(row(*i)?),
                RowSource::MeanAll => out.extend_from_slice(&mean_all),
                RowSource::Mean(ids) if ids.is_empty() => out.extend_from_slice(&mean_all),
                RowSource::Mean(ids) => {
                    let mut acc = vec![0f32; c];
                    for &i in ids {
                        for (a, x) in acc.iter_mut().zip(row(i)?) {
                            *a += x;
                        }
                    }
                    let n = ids.len() as f32;
                    out.extend(acc.into_iter().map(|a| a / n));
                }
            }
        }
        Ok(Tensor::from_vec(out, (self.rows.len(), c), &Device::Cpu)?.to_dtype(old.dtype())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_copied_averaged_and_padded() {
        let old = Tensor::new(&[[1f32, 2.], [3., 4.], [5., 9.]], &Device::Cpu).unwrap();
        let plan = RowPlan::new(
            vec![
                RowSource::Copy(2),
                RowSource::Mean(vec![0, 1]),
                RowSource::MeanAll,
            ],
            5,
            3,
            true,
        );
        assert_eq!(plan.rows[3], RowSource::MeanAll);
        assert_eq!(plan.rows[4], RowSource::MeanAll);
        assert_eq!(plan.new_rows(), [1, 2, 3, 4]);
        let new = plan.apply(&old, "w").unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(new, [[5., 9.], [2., 3.], [3., 5.], [3., 5.], [3., 5.]]);
        // An old padding row that is still padding is kept.
        let keep = RowPlan::new(vec![RowSource::Copy(0)], 3, 3, true);
        assert_eq!(
            keep.rows,
            [RowSource::Copy(0), RowSource::Copy(1), RowSource::Copy(2)]
        );
        // bf16 in, bf16 out.
        let b = plan
            .apply(&old.to_dtype(DType::BF16).unwrap(), "w")
            .unwrap();
        assert_eq!(b.dtype(), DType::BF16);
        assert!(
            RowPlan::new(vec![RowSource::Copy(7)], 1, 3, true)
                .apply(&old, "w")
                .is_err()
        );
        assert_eq!(
            (padded(513, 64), padded(512, 64), padded(7, 1)),
            (576, 512, 7)
        );
    }
}
