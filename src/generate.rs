//! Sampling text from a model with a KV cache.
//!
//! Temperature 0 is greedy decoding (ties go to the lowest id, as `argmax` does).
//! Otherwise logits are divided by the temperature, optionally cut to the `top_k`
//! largest and to the smallest set whose probability reaches `top_p`, and sampled
//! with a seeded generator, so a seed gives the same text every time.

use std::time::Instant;

use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
use crate::model::engine::{Infer, KvCache};
use crate::model::{Gpt, check_ids};

/// How to pick each next token.
#[derive(Debug, Clone)]
pub struct Sampling {
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    /// > 1 discourages tokens already in the sequence (CTRL / transformers semantics).
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            seed: 42,
        }
    }
}

impl Sampling {
    /// Check the values a user gave.
    pub fn check(&self) -> Result<()> {
        if self.temperature.is_nan() || self.temperature < 0.0 {
            return Err(Error::Usage(format!(
                "--temperature {} must be >= 0",
                self.temperature
            )));
        }
        if self.top_k == Some(0) {
            return Err(Error::Usage("--top-k must be at least 1".into()));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::Usage(format!("--top-p {p} must be in (0, 1]")));
            }
        }
        if self.repetition_penalty.is_nan() || self.repetition_penalty <= 0.0 {
            return Err(Error::Usage(format!(
                "--repetition-penalty {} must be > 0",
                self.repetition_penalty
            )));
        }
        Ok(())
    }
}

/// Result of a generation.
#[derive(Debug, Clone)]
pub struct Generated {
    pub new_ids: Vec<u32>,
    /// New tokens per second, prompt processing included.
    pub tokens_per_s: f64,
    /// Bytes the KV cache held at the end ([`crate::train::estimate::kv_cache_bytes`]
    /// plans the same).
    pub kv_cache_bytes: usize,
}

/// Generate up to `max_new` tokens after `prompt`, stopping after any of `stop_ids`.
/// `on_token` sees each new id as it comes (for streaming) and returns false to stop.
pub fn generate(
    model: &Gpt,
    prompt: &[u32],
    max_new: usize,
    sampling: &Sampling,
    stop_ids: &[u32],
    on_token: impl FnMut(u32) -> Result<bool>,
) -> Result<Generated> {
    generate_with(
        &mut Infer::whole(model),
        prompt,
        max_new,
        sampling,
        stop_ids,
        on_token,
    )
}

/// [`generate`] with `model`'s blocks wherever it takes them (with `--strategy fsdp`,
/// each block gathered for each forward, every rank generating alike: each new token
/// is rank 0's, see [`Infer::agree`]).
pub fn generate_with(
    model: &mut Infer<'_>,
    prompt: &[u32],
    max_new: usize,
    sampling: &Sampling,
    stop_ids: &[u32],
    mut on_token: impl FnMut(u32) -> Result<bool>,
) -> Result<Generated> {
    sampling.check()?;
    check_prompt(model.model(), prompt)?;
    let context = model.model().cfg.block_size;
    let max_new = max_new.min(context - prompt.len());
    let start = Instant::now();
    let mut rng = ChaCha8Rng::seed_from_u64(sampling.seed);
    let mut cache = KvCache::new(model.n_layer());
    let mut seq: Vec<u32> = prompt.to_vec();
    let mut new_ids = Vec::new();
    let dev = model.model().device().clone();
    let mut input = Tensor::from_vec(prompt.to_vec(), (1, prompt.len()), &dev)?;
    for _ in 0..max_new {
        let logits = model.logits(&input, Some(&mut cache), true)?;
        let logits: Vec<f32> = logits.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        if logits.iter().any(|x| x.is_nan()) {
            return Err(Error::Msg(format!(
                "the model's logits are NaN at new token {}: its weights hold NaN or infinite values, or overflow in this precision",
                new_ids.len() + 1
            )));
        }
        let next = model.agree(pick(logits, &seq, sampling, &mut rng))?;
        seq.push(next);
        new_ids.push(next);
        if !on_token(next)? || stop_ids.contains(&next) {
            break;
        }
        input = Tensor::from_vec(vec![next], (1, 1), &dev)?;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(Generated {
        tokens_per_s: new_ids.len() as f64 / secs.max(1e-9),
        kv_cache_bytes: cache.bytes(),
        new_ids,
    })
}

/// A prompt must be non-empty, fit the context and use known ids.
pub fn check_prompt(model: &Gpt, prompt: &[u32]) -> Result<()> {
    let context = model.cfg.block_size;
    if prompt.is_empty() {
        return Err(Error::Usage(
            "the prompt is empty (after tokenization)".into(),
        ));
    }
    if prompt.len() > context {
        return Err(Error::Usage(format!(
            "the prompt has {} tokens, more than the model's context of {context}",
            prompt.len()
        )));
    }
    check_ids(&model.cfg, prompt, "prompt")
}

/// Choose the next id from `logits` given the sequence so far.
pub fn pick(mut logits: Vec<f32>, seq: &[u32], s: &Sampling, rng: &mut ChaCha8Rng) -> u32 {
    if s.repetition_penalty != 1.0 {
        let mut seen = vec![false; logits.len()];
        for &t in seq {
            if let Some(x) = seen.get_mut(t as usize) {
                *x = true;
            }
        }
        for (l, _) in logits.iter_mut().zip(&seen).filter(|(_, s)| **s) {
            *l = if *l < 0.0 {
                *l * s.repetition_penalty
            } else {
                *l / s.repetition_penalty
            };
        }
    }
    if s.temperature == 0.0 {
        return argmax(&logits);
    }
    let mut idx = candidates(&logits, s.top_k);
    let t = s.temperature as f32;
    let max = logits[idx[0]] / t;
    if !max.is_finite() {
        // A temperature so small that the scaled logits overflow: the limit is greedy.
        return idx[0] as u32;
    }
    let mut probs: Vec<f64> = idx
        .iter()
        .map(|&i| ((logits[i] / t - max) as f64).exp())
        .collect();
    let z: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= z);
    if let Some(top_p) = s.top_p {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (n, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= top_p {
                keep = n + 1;
                break;
            }
        }
        probs.truncate(keep);
        idx.truncate(keep);
        let z: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= z);
    }
    let u: f64 = rng.random();
    let mut acc = 0.0;
    for (p, &i) in probs.iter().zip(&idx) {
        acc += p;
        if u < acc {
            return i as u32;
        }
    }
    *idx.last().expect("at least one candidate") as u32
}

/// The ids sampling draws from: sorted by logit, highest first, ties keeping the lower
/// id first; the first `top_k` only. The order is total, so an unstable sort gives the
/// same order, and with `top_k` only the k best are sorted (after a selection: the
/// vocabulary holds 30-250k ids).
fn candidates(logits: &[f32], top_k: Option<usize>) -> Vec<usize> {
    let order = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    if let Some(k) = top_k
        && k >= 1
        && k < idx.len()
    {
        idx.select_nth_unstable_by(k - 1, order);
        idx.truncate(k);
    }
    idx.sort_unstable_by(order);
    idx
}

/// Index of the first maximum.
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Incremental detokenizer: turns ids into the text they add, for streaming.
pub struct TextStream<'a> {
    tok: &'a crate::tokenizer::Tokenizer,
    ids: Vec<u32>,
    printed: usize,
}

impl<'a> TextStream<'a> {
    /// The text of ids that follow `prompt`, decoded with the prompt's last tokens (see
    /// [`Tokenizer::decode_after`](crate::tokenizer::Tokenizer::decode_after)).
    pub fn after(tok: &'a crate::tokenizer::Tokenizer, prompt: &[u32]) -> Result<Self> {
        let ids = crate::tokenizer::decode_context(prompt).to_vec();
        let printed = tok.decode(&ids)?.len();
        Ok(TextStream { tok, ids, printed })
    }

    /// The new text after adding `id` (empty while a multi-byte character is incomplete).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = self.tok.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        match text.get(self.printed..) {
            Some(new) => {
                let new = new.to_string();
                self.printed = text.len();
                Ok(new)
            }
            None => Ok(String::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_are_the_full_stable_sort_cut_to_top_k() {
        let mut draw = ChaCha8Rng::seed_from_u64(7);
        for case in 0..300usize {
            // Few distinct values: many ties, which the order breaks by id.
            let n = 1 + (case * 37) % 300;
            let logits: Vec<f32> = (0..n)
                .map(|_| (draw.random::<f32>() * 8.0).floor() - 4.0)
                .collect();
            let mut full: Vec<usize> = (0..n).collect();
            full.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
            for k in [None, Some(1), Some(5), Some(n), Some(n + 3)] {
                let want = &full[..k.map_or(n, |k| k.min(n))];
                assert_eq!(candidates(&logits, k), want, "case {case}, top_k {k:?}");
            }
        }
    }
}
