//! A linear layer that is plain or carries a LoRA adapter.
//!
//! ```text
//! y = x Wᵀ + b                                  plain
//! y = x Wᵀ + b + s · (dropout(x) Aᵀ) (B ⊙ m)ᵀ    LoRA, s = alpha / r
//! ```
//!
//! `W: (out, in)` stays frozen during LoRA training; `A: (r, in)` and `B: (out, r)` are
//! the trainable matrices PEFT calls `lora_A` and `lora_B`. `m: (out, 1)` is an optional
//! 0/1 row mask: on a fused query/key/value layer it keeps the adapter off the parts
//! (say, keys) that were not targeted, so the saved `B` holds zeros there and the
//! adapter stays in plain PEFT format.
//!
//! Every layer keeps the Hugging Face path of its module (`model.layers.0.self_attn.q_proj`),
//! which names its weights in checkpoints, gradients and adapters.

use std::cell::Cell;

use candle_core::{DType, Result, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Dropout masks for training; `None` everywhere means evaluation.
///
/// The mask of one sample at one layer (a dropout *site*, named by the layer's path) is
/// a pure function of `(seed, optimizer step, sample, site)`, where `sample` is the
/// sample's index in the step's global batch: the same whatever the number of ranks,
/// the split into micro-batches or the resume point. Each draws a ChaCha8 stream
/// keyed by those four numbers, one value per `(position, feature)` in order, so a
/// longer padded row only adds values at its end.
#[derive(Debug)]
pub struct Dropout {
    seed: u64,
    /// Optimizer step, and the global index of this rank's next sample in it.
    next: Cell<(u64, u64)>,
    /// Optimizer step, and the global index of the first sample of the micro-batch
    /// being computed, and its number of samples.
    current: Cell<(u64, u64, usize)>,
}

impl Dropout {
    pub fn new(seed: u64) -> Self {
        Dropout {
            seed,
            next: Cell::new((0, 0)),
            current: Cell::new((0, 0, 1)),
        }
    }

    /// Optimizer step `step` begins; this rank's samples start at `first` in the
    /// step's global batch.
    pub fn begin_step(&self, step: u64, first: u64) {
        self.next.set((step, first));
    }

    /// The next `n` samples of this rank (a micro-batch) are about to be computed.
    pub fn next_micro_batch(&self, n: usize) {
        let (step, first) = self.next.get();
        self.current.set((step, first, n));
        self.next.set((step, first + n as u64));
    }

    /// The masks of samples `offset..offset + n` of the micro-batch being computed,
    /// for a part of it computed on its own (the same masks as in the whole).
    pub fn for_part(&self, offset: usize, n: usize) -> Dropout {
        let (step, first, _) = self.current.get();
        Dropout {
            seed: self.seed,
            next: Cell::new(self.next.get()),
            current: Cell::new((step, first + offset as u64, n)),
        }
    }

    /// Zero each element of `x: (B·T, in)` (the micro-batch's rows, sample-major) with
    /// probability `p`, scale the rest by `1/(1-p)`; `site` names the layer.
    pub fn apply(&self, x: &Tensor, p: f32, site: &str) -> Result<Tensor> {
        if p <= 0.0 {
            return Ok(x.clone());
        }
        let (rows, n_in) = x.dims2()?;
        let (step, first, samples) = self.current.get();
        if samples == 0 || rows % samples != 0 {
            candle_core::bail!(
                "dropout at {site}: {rows} rows do not split into {samples} samples (a bug)"
            );
        }
        let per_sample = rows / samples * n_in;
        let keep = 1.0 / (1.0 - p);
        let site_key = twox_hash::XxHash3_64::oneshot(site.as_bytes());
        let mut mask = Vec::with_capacity(rows * n_in);
        for s in 0..samples as u64 {
            let mut key = [0u8; 32];
            for (i, v) in [self.seed, step, first + s, site_key].iter().enumerate() {
                key[8 * i..8 * i + 8].copy_from_slice(&v.to_le_bytes());
            }
            let mut rng = ChaCha8Rng::from_seed(key);
            mask.extend((0..per_sample).map(|_| if rng.random::<f32>() < p { 0.0 } else { keep }));
        }
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x.mul(&mask)
    }
}

/// The low-rank adapter of a [`Linear`].
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// `(r, in)`
    pub a: Tensor,
    /// `(out, r)`
    pub b: Tensor,
    /// `alpha / r` (or `alpha / sqrt(r)` for rsLoRA).
    pub scale: f64,
    pub dropout: f32,
    /// `(out, 1)` of 0/1, rows of the output the adapter may change.
    pub out_mask: Option<Tensor>,
}

impl LoraAdapter {
    /// `B ⊙ m`: the `B` that is used, and saved.
    pub fn effective_b(&self) -> Result<Tensor> {
        match &self.out_mask {
            Some(m) => self.b.broadcast_mul(&m.to_dtype(self.b.dtype())?),
            None => Ok(self.b.clone()),
        }
    }

    /// `s · B A`, shape `(out, in)`, in f32: what merging adds to `W`.
    pub fn delta_weight(&self) -> Result<Tensor> {
        let b = self.effective_b()?.to_dtype(DType::F32)?;
        let a = self.a.to_dtype(DType::F32)?;
        b.matmul(&a)? * self.scale
    }
}

/// A linear layer `(…, in) → (…, out)`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// Hugging Face module path.
    pub name: String,
    /// `(out, in)`
    pub weight: Tensor,
    /// `(out)`
    pub bias: Option<Tensor>,
    pub lora: Option<LoraAdapter>,
}

impl Linear {
    pub fn new(name: String, weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear {
            name,
            weight,
            bias,
            lora: None,
        }
    }

    /// `weight`, `bias`, `lora_A`, `lora_B` (those it has), in this order.
    pub fn params_mut(&mut self) -> Vec<&mut Tensor> {
        let mut v = vec![&mut self.weight];
        v.extend(self.bias.as_mut());
        if let Some(l) = &mut self.lora {
            v.push(&mut l.a);
            v.push(&mut l.b);
        }
        v
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }
}
