//! Embeddings trained beside a LoRA adapter (`pretrain --train-embeddings`): some rows
//! only (PEFT's trainable tokens), or the whole matrices (PEFT's `modules_to_save`).
//!
//! **Rows.** The trained rows of the embeddings (and of an untied head) are variables
//! of their own, `(n, C)` for `n` token ids, so their gradients and AdamW's moments
//! are `n · C` numbers, not `V · C`. The forward is the model's one forward: it reads
//! the full matrices, into which the rows are written after every update
//! ([`TokenRows::write_into`]). The backward adds into the rows' buffers only what
//! reaches them:
//!
//! ```text
//! embeddings   dE[slot(id)] += dx[position]        for the positions holding a trained id
//! head         dH[slot]     += dlogits[:, ids]ᵀ x  one (rows × n) slice of each chunk
//! tied head    both into the embeddings' rows, as the full matrix would get them
//! ```
//!
//! Nothing else about training changes, and the rows are exactly what PEFT saves as
//! `trainable_tokens_delta` (which holds the rows' values, not differences).
//!
//! **Whole.** The embeddings and head become variables themselves, as in full
//! fine-tuning.

use candle_core::{Result, Tensor};

/// What of the embeddings and head trains beside an adapter.
#[derive(Debug, Clone)]
pub enum TrainedEmbeddings {
    /// Some rows ([`TokenRows`]).
    Rows(TokenRows),
    /// The whole embeddings and head: the model's own tensors are the variables.
    Whole,
}

/// Trained rows of the embeddings and an untied head, for some token ids.
#[derive(Debug, Clone)]
pub struct TokenRows {
    /// Token ids, ascending, without repeats.
    ids: Vec<u32>,
    /// `(n, C)`: the embeddings' rows of `ids`, in their order.
    pub embed: Tensor,
    /// `(n, C)`: an untied head's rows of `ids` (None: the head is the embeddings).
    pub head: Option<Tensor>,
    /// `slot[id]`: the row of `id` in `embed`, or `u32::MAX`.
    slot: Vec<u32>,
}

impl TokenRows {
    /// The rows `embed` (and `head`) of `ids` (ascending, distinct, below `vocab`).
    pub fn new(ids: Vec<u32>, embed: Tensor, head: Option<Tensor>, vocab: usize) -> Result<Self> {
        if ids.windows(2).any(|w| w[0] >= w[1]) {
            candle_core::bail!("trained token ids must be ascending and distinct");
        }
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            candle_core::bail!("trained token id {bad} is outside the vocabulary of {vocab}");
        }
        for t in std::iter::once(&embed).chain(head.as_ref()) {
            if t.dim(0)? != ids.len() {
                candle_core::bail!("{} trained rows for {} token ids", t.dim(0)?, ids.len());
            }
        }
        let mut slot = vec![u32::MAX; vocab];
        for (k, &id) in ids.iter().enumerate() {
            slot[id as usize] = k as u32;
        }
        Ok(TokenRows {
            ids,
            embed,
            head,
            slot,
        })
    }

    /// The trained token ids, ascending.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// The positions of `ids` (a batch's inputs) that hold a trained id, and the row of
    /// each in [`TokenRows::embed`].
    pub fn select(&self, ids: &[u32]) -> (Vec<u32>, Vec<u32>) {
        let mut pos = Vec::new();
        let mut rows = Vec::new();
        for (p, &id) in ids.iter().enumerate() {
            match self.slot.get(id as usize) {
                Some(&s) if s != u32::MAX => {
                    pos.push(p as u32);
                    rows.push(s);
                }
                _ => {}
            }
        }
        (pos, rows)
    }

    /// Runs of consecutive ids: `(first id, its row, length)`.
    fn runs(&self) -> Vec<(usize, usize, usize)> {
        let mut out: Vec<(usize, usize, usize)> = Vec::new();
        for (k, &id) in self.ids.iter().enumerate() {
            match out.last_mut() {
                Some((first, _, len)) if *first + *len == id as usize => *len += 1,
                _ => out.push((id as usize, k, 1)),
            }
        }
        out
    }

    /// Write `rows` (`(n, C)`) over the rows of the ids in the matrix `w` (`(V, C)`), in
    /// place.
    pub fn write_rows(&self, w: &Tensor, rows: &Tensor) -> Result<()> {
        let rows = rows.to_dtype(w.dtype())?;
        for (first, k, len) in self.runs() {
            w.slice_set(&rows.narrow(0, k, len)?.contiguous()?, 0, first)?;
        }
        Ok(())
    }

    /// Write the trained rows into the embeddings `wte` and, when it has rows of its
    /// own, the head's weight `head`, in place (after each update).
    pub fn write_into(&self, wte: &Tensor, head: &Tensor) -> Result<()> {
        self.write_rows(wte, &self.embed)?;
        if let Some(h) = &self.head {
            self.write_rows(head, h)?;
        }
        Ok(())
    }

    /// A copy of `w` with `rows` over the rows of the ids (for a model loaded with an
    /// adapter, whose base may be shared).
    pub fn with_rows(&self, w: &Tensor, rows: &Tensor) -> Result<Tensor> {
        let out = w.copy()?;
        self.write_rows(&out, rows)?;
        Ok(out)
    }
}

/// A copy of `w` (`(V, C)`) with `rows` (`(n, C)`) over the rows of `ids` (in any
/// order; an id given twice takes its first row).
pub fn rows_replaced(w: &Tensor, ids: &[u32], rows: &Tensor) -> Result<Tensor> {
    let mut sorted: Vec<(u32, usize)> = ids.iter().copied().zip(0..).collect();
    sorted.sort_by_key(|&(id, k)| (id, k));
    sorted.dedup_by_key(|(id, _)| *id);
    let order: Vec<u32> = sorted.iter().map(|&(_, k)| k as u32).collect();
    let values = rows.index_select(&Tensor::new(order, rows.device())?, 0)?;
    let ids: Vec<u32> = sorted.into_iter().map(|(id, _)| id).collect();
    let tr = TokenRows::new(ids, values.clone(), None, w.dim(0)?)?;
    tr.with_rows(w, &values)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn rows_are_selected_and_written_by_runs() {
        let dev = Device::Cpu;
        let rows = Tensor::new(&[[1f32, 1.], [2., 2.], [3., 3.]], &dev).unwrap();
        let tr = TokenRows::new(vec![1, 2, 5], rows.clone(), None, 6).unwrap();
        assert_eq!(tr.runs(), vec![(1, 0, 2), (5, 2, 1)]);
        assert_eq!(tr.select(&[5, 0, 2, 2]), (vec![0, 2, 3], vec![2, 1, 1]));
        let w = Tensor::zeros((6, 2), candle_core::DType::F32, &dev).unwrap();
        let out = tr.with_rows(&w, &rows).unwrap();
        assert_eq!(
            out.to_vec2::<f32>().unwrap(),
            vec![
                vec![0., 0.],
                vec![1., 1.],
                vec![2., 2.],
                vec![0., 0.],
                vec![0., 0.],
                vec![3., 3.]
            ]
        );
        // The original is untouched; in place, it changes.
        assert_eq!(w.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        tr.write_into(&w, &w.zeros_like().unwrap()).unwrap();
        assert_eq!(w.sum_all().unwrap().to_scalar::<f32>().unwrap(), 12.0);
        assert!(TokenRows::new(vec![2, 1], rows.clone(), None, 6).is_err());
        // Any order: each id gets its own row.
        let out2 = rows_replaced(&out.zeros_like().unwrap(), &[5, 1, 2], &rows).unwrap();
        assert_eq!(out2.get(5).unwrap().to_vec1::<f32>().unwrap(), vec![1., 1.]);
        assert_eq!(out2.get(1).unwrap().to_vec1::<f32>().unwrap(), vec![2., 2.]);
        assert!(TokenRows::new(vec![1, 2, 6], rows, None, 6).is_err());
    }
}
