//! Scoring token requests with the model: a log-likelihood and whether the
//! continuation is the greedy one, for each; greedy generation.
//!
//! ```text
//! request   inp = (ctx + cont)[-(L+1):][:-1]  =  prefix ‖ tail,  |tail| = |cont|
//!
//! group     requests with the same prefix (the choices of one question)
//! batch     groups with the same prefix length, at most `rows` tails:
//!             prefill   prefixes (G, P)           → KV cache         (no head)
//!             expand    cache rows → one per tail (KvCache::select_rows)
//!             score     tails (N, max |tail|), right-padded, after the cache:
//!                       −log p(cont) and argmax = cont at the |tail| positions
//! ```
//!
//! A context is run once for all its choices, and the head runs only on the
//! continuation positions. Requests whose prefix is empty (the windows of rolling
//! documents, one-token contexts) are independent rows, sorted by length and batched.
//! Right padding changes nothing: a causal row never sees the positions after it.

use std::collections::HashMap;

use candle_core::Tensor;

use crate::error::Result;
use crate::generate::{Sampling, generate_with};
use crate::model::engine::{Infer, KvCache};
use crate::tokenizer::Tokenizer;

use super::requests::TokenRequest;

/// The score of one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    /// `Σ log p(cont_i | …)` in nats.
    pub loglikelihood: f64,
    /// Whether every continuation token is the model's first choice.
    pub is_greedy: bool,
}

/// Score `reqs` with a context window of `max_len`, at most `rows` continuations per
/// forward pass. `progress(done)` is called after each batch. The batches and their
/// shapes follow from `reqs` alone, so ranks scoring the same requests with blocks
/// gathered on demand make the same calls in the same order.
pub fn score_requests(
    model: &mut Infer<'_>,
    reqs: &[TokenRequest],
    max_len: usize,
    rows: usize,
    mut progress: impl FnMut(usize),
) -> Result<Vec<Scored>> {
    let rows = rows.max(1);
    // Split each request into prefix and tail.
    let split: Vec<(Vec<u32>, Vec<u32>)> = reqs
        .iter()
        .map(|r| {
            let (inp, _) = r.input(max_len);
            let p = inp.len() - r.continuation.len().min(inp.len());
            (inp[..p].to_vec(), inp[p..].to_vec())
        })
        .collect();
    // Groups by prefix; the empty prefix's members are each their own group.
    let mut index: HashMap<&[u32], usize> = HashMap::new();
    let mut groups: Vec<(usize, Vec<usize>)> = Vec::new(); // (prefix length, members)
    for (i, (prefix, _)) in split.iter().enumerate() {
        if prefix.is_empty() {
            groups.push((0, vec![i]));
            continue;
        }
        match index.get(prefix.as_slice()) {
            Some(&g) => groups[g].1.push(i),
            None => {
                index.insert(prefix.as_slice(), groups.len());
                groups.push((prefix.len(), vec![i]));
            }
        }
    }
    // Longest first, then by tail length, so that batches hold like lengths.
    let tail_len =
        |g: &(usize, Vec<usize>)| g.1.iter().map(|&i| split[i].1.len()).max().unwrap_or(0);
    groups.sort_by(|a, b| b.0.cmp(&a.0).then(tail_len(b).cmp(&tail_len(a))));

    let mut out: Vec<Option<Scored>> = vec![None; reqs.len()];
    let mut done = 0;
    let mut g = 0;
    while g < groups.len() {
        // Groups of this prefix length that fit in `rows` tails (a larger group is
        // split into chunks that share its prefill).
        let plen = groups[g].0;
        let mut end = g + 1;
        let mut n = groups[g].1.len();
        while end < groups.len() && groups[end].0 == plen && n + groups[end].1.len() <= rows {
            n += groups[end].1.len();
            end += 1;
        }
        let batch = &groups[g..end];
        let cache = if plen > 0 {
            let ids: Vec<u32> = batch
                .iter()
                .flat_map(|(_, m)| split[m[0]].0.iter().copied())
                .collect();
            let ids = Tensor::from_vec(ids, (batch.len(), plen), model.model().device())?;
            let mut cache = KvCache::new(model.n_layer());
            model.prefill(&ids, &mut cache)?;
            Some(cache)
        } else {
            None
        };
        let members: Vec<(u32, usize)> = batch
            .iter()
            .enumerate()
            .flat_map(|(gi, (_, m))| m.iter().map(move |&i| (gi as u32, i)))
            .collect();
        for chunk in members.chunks(rows) {
            let t = chunk
                .iter()
                .map(|&(_, i)| split[i].1.len())
                .max()
                .unwrap_or(0);
            let mut ids = Vec::with_capacity(chunk.len() * t);
            let mut targets = Vec::with_capacity(chunk.len() * t);
            for &(_, i) in chunk {
                let tail = &split[i].1;
                let cont = &reqs[i].continuation;
                let pad = t - tail.len();
                ids.extend_from_slice(tail);
                ids.extend(std::iter::repeat_n(tail[tail.len() - 1], pad));
                // The last |tail| continuation tokens are what the tail predicts.
                targets.extend_from_slice(&cont[cont.len() - tail.len()..]);
                targets.extend(std::iter::repeat_n(0, pad));
            }
            let ids = Tensor::from_vec(ids, (chunk.len(), t), model.model().device())?;
            let scores = match &cache {
                Some(c) => {
                    let sel: Vec<u32> = chunk.iter().map(|&(gi, _)| gi).collect();
                    let mut c = c.select_rows(&sel)?;
                    model.score_after(&ids, &mut c, &targets)?
                }
                None => model.score(&ids, None, &targets)?,
            };
            for (r, &(_, i)) in chunk.iter().enumerate() {
                let len = split[i].1.len();
                let span = r * t..r * t + len;
                let nll: f64 = scores.nll[span.clone()].iter().map(|&x| f64::from(x)).sum();
                out[i] = Some(Scored {
                    loglikelihood: -nll,
                    is_greedy: scores.greedy[span].iter().all(|&g| g),
                });
            }
            done += chunk.len();
            progress(done);
        }
        g = end;
    }
    Ok(out
        .into_iter()
        .map(|s| s.expect("every request scored"))
        .collect())
}

/// Greedy generation as the harness's Hugging Face backend does it: at most
/// `max_gen_toks` tokens after `context` (its last `max_len − max_gen_toks` tokens),
/// stopping at an end-of-sequence id or once the text holds a stop string; the
/// new tokens decoded alone (special tokens dropped) and cut before the first of each
/// stop string in turn.
pub fn generate_until(
    model: &mut Infer<'_>,
    tok: &Tokenizer,
    context: &[u32],
    until: &[String],
    max_gen_toks: usize,
    max_len: usize,
) -> Result<String> {
    let keep = max_len.saturating_sub(max_gen_toks).max(1);
    let ctx = &context[context.len().saturating_sub(keep)..];
    let mut ids: Vec<u32> = Vec::new();
    let stops: Vec<&String> = until.iter().filter(|s| !s.is_empty()).collect();
    let sampling = Sampling {
        temperature: 0.0,
        ..Sampling::default()
    };
    let mut failed = None;
    generate_with(model, ctx, max_gen_toks, &sampling, &tok.eos_ids, |id| {
        ids.push(id);
        match tok.decode(&ids) {
            Ok(text) => Ok(!stops.iter().any(|s| text.contains(s.as_str()))),
            Err(e) => {
                failed = Some(e);
                Ok(false)
            }
        }
    })?;
    if let Some(e) = failed {
        return Err(e);
    }
    let mut text = tok.decode(&ids)?;
    for s in &stops {
        if let Some(i) = text.find(s.as_str()) {
            text.truncate(i);
        }
    }
    Ok(text)
}
