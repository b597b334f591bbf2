//! The key/value cache of incremental decoding.
//!
//! ```text
//! call 1   prompt  p₀ … pₙ₋₁   keys/values of every layer: (B, nkv, n, hs), kept
//! call 2   token   pₙ          its query attends to the n kept keys and its own;
//!                              its key and value are appended
//! ```
//!
//! A layer with a sliding window of `w` keeps only the last `w − 1` keys: a later query
//! at position `p` sees keys after `p − w`, so older ones can never be read again.

use candle_core::{Result, Tensor};

use crate::config::AttentionWindow;

/// Keys and values seen so far by one layer.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    /// `(B, nkv, S, hs)`, after the rotation.
    k: Option<Tensor>,
    v: Option<Tensor>,
    /// Absolute position of the first cached key.
    start: usize,
}

impl LayerCache {
    /// The keys and values a query block at absolute positions `pos ..` attends to: the
    /// cached ones followed by the new `k, v: (B, nkv, T, hs)`, and the absolute position
    /// of the first of them. Keeps what a later query can still see.
    pub(super) fn extend(
        &mut self,
        k: Tensor,
        v: Tensor,
        pos: usize,
        window: AttentionWindow,
    ) -> Result<(Tensor, Tensor, usize)> {
        let (k, v) = match (&self.k, &self.v) {
            (Some(ck), Some(cv)) => (Tensor::cat(&[ck, &k], 2)?, Tensor::cat(&[cv, &v], 2)?),
            _ => {
                self.start = pos;
                (k, v)
            }
        };
        let start = self.start;
        let len = k.dim(2)?;
        let keep = match window {
            AttentionWindow::Sliding(w) => len.min(w.saturating_sub(1)),
            AttentionWindow::Global => len,
        };
        self.k = Some(k.narrow(2, len - keep, keep)?);
        self.v = Some(v.narrow(2, len - keep, keep)?);
        self.start = start + len - keep;
        Ok((k, v, start))
    }

    /// Bytes held by this layer's keys and values.
    pub fn bytes(&self) -> usize {
        [&self.k, &self.v]
            .into_iter()
            .flatten()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }
}

/// Per-layer caches for incremental decoding ([`super::logits`] with a cache).
#[derive(Debug, Clone)]
pub struct KvCache {
    pub(super) layers: Vec<LayerCache>,
    /// Tokens processed so far: the position of the next one.
    pub pos: usize,
}

impl KvCache {
    pub fn new(n_layer: usize) -> Self {
        KvCache {
            layers: vec![LayerCache::default(); n_layer],
            pos: 0,
        }
    }

    /// Bytes held by the cached keys and values of every layer.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(LayerCache::bytes).sum()
    }

    /// A cache whose row `i` is row `rows[i]` of this one: one context's keys and
    /// values repeated for each of its continuations (`rows = [0, 0, 0]`), or several
    /// contexts' for theirs (`[0, 0, 1, 1, 1]`). Rows are copied; `self` is unchanged.
    pub fn select_rows(&self, rows: &[u32]) -> Result<KvCache> {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let pick = |t: &Option<Tensor>| -> Result<Option<Tensor>> {
                    match t {
                        Some(t) => {
                            let idx = Tensor::new(rows, t.device())?;
                            Some(t.contiguous()?.index_select(&idx, 0)).transpose()
                        }
                        None => Ok(None),
                    }
                };
                Ok(LayerCache {
                    k: pick(&l.k)?,
                    v: pick(&l.v)?,
                    start: l.start,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache {
            layers,
            pos: self.pos,
        })
    }
}
