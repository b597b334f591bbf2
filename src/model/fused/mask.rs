//! Which keys each query of causal attention sees: causal order, sliding windows and
//! packed documents, as one contiguous range of keys per query.
//!
//! Packed samples hold several documents back to back; with [`MaskSpec::docs`] each
//! query sees only the keys of its own document, a block-diagonal causal mask:
//!
//! ```text
//!            keys →  a a a b b c        docs (row b) = [0 0 0 3 3 5]
//! query a0           x . . . . .
//!       a1           x x . . . .        x visible, . hidden
//!       a2           x x x . . .
//!       b0           . . . x . .
//!       b1           . . . x x .
//!       c0           . . . . . x
//! ```
//!
//! The fused kernels find each row's visible keys as one range
//! ([`MaskSpec::visible_keys`]) and never build a mask tensor.

use std::ops::Range;

use candle_core::{Device, Result, Tensor};

use crate::config::AttentionWindow;

/// Which entries of a `(…, T, S)` score tensor are visible: query `i` sits at position
/// `q_start + i`, key `j` at `k_start + j`; a key is visible when it is not later than
/// the query, with a window `w` when `q − k < w`, and with `docs` when it is not
/// before the first token of the query's document.
#[derive(Debug, Clone, PartialEq)]
pub struct MaskSpec {
    pub q_start: usize,
    pub k_start: usize,
    pub window: AttentionWindow,
    /// Packed samples: for batch row `b` and query `i`, `docs[b * T + i]` is the absolute
    /// position of the first token of that query's document; keys before it are hidden.
    /// `None`: one document per row.
    pub docs: Option<std::sync::Arc<[u32]>>,
}

impl MaskSpec {
    /// The keys `j` (of `s`) visible to query `i` of batch row `b`, in scores of `t`
    /// queries per row: always one contiguous range.
    pub fn visible_keys(&self, t: usize, b: usize, i: usize, s: usize) -> Range<usize> {
        let q = self.q_start + i;
        let mut lo = match self.window {
            AttentionWindow::Global => 0,
            AttentionWindow::Sliding(w) => (q + 1).saturating_sub(w),
        };
        if let Some(d) = &self.docs {
            lo = lo.max(d[b * t + i] as usize);
        }
        let lo = lo.saturating_sub(self.k_start).min(s);
        let hi = (q + 1).saturating_sub(self.k_start).min(s);
        lo..hi.max(lo)
    }

    /// Whether key `j` is visible to query `i` of batch row `b` (`t` queries per row).
    pub fn visible(&self, t: usize, b: usize, i: usize, j: usize) -> bool {
        self.visible_keys(t, b, i, j + 1).contains(&j)
    }

    /// Batch rows the mask describes: `docs.len() / t`, or None without documents.
    pub(super) fn rows_of(&self, t: usize) -> Option<usize> {
        self.docs.as_ref().map(|d| d.len() / t.max(1))
    }

    /// Fail unless `docs` fits scores of shape `dims` `(B, H, T, S)`.
    pub(super) fn check(&self, dims: &[usize]) -> Result<()> {
        let Some(d) = &self.docs else { return Ok(()) };
        let t = dims[dims.len() - 2];
        if dims.len() != 4 || d.len() != dims[0] * t {
            candle_core::bail!(
                "attention mask: {} document starts for scores of shape {dims:?}; expected B·T = (B, H, T, S)[0] · T",
                d.len()
            );
        }
        Ok(())
    }

    /// The additive mask, 0 where visible and −∞ elsewhere: `(T, S)`, or `(B, 1, T, S)`
    /// with documents.
    pub fn tensor(&self, t: usize, s: usize, device: &Device) -> Result<Tensor> {
        let b = self.rows_of(t).unwrap_or(1);
        let mut m = vec![f32::NEG_INFINITY; b * t * s];
        for (row, chunk) in m.chunks_mut(s).enumerate() {
            let (r, i) = (row / t, row % t);
            chunk[self.visible_keys(t, r, i, s)].fill(0.0);
        }
        match self.docs {
            None => Tensor::from_vec(m, (t, s), device),
            Some(_) => Tensor::from_vec(m, (b, 1, t, s), device),
        }
    }
}
