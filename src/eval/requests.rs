//! From text requests to token requests, by lm-evaluation-harness 0.4's rules
//! (`TemplateLM._encode_pair`, `loglikelihood`, `HFLM.tok_encode`,
//! `_loglikelihood_tokens`, `utils.get_rolling_token_windows`, `make_disjoint_window`).
//!
//! **Encoding a text** (`tok_encode`): the tokenizer with its own special tokens (a
//! LLaMA tokenizer puts BOS first; a byte-level GPT-2 one adds nothing), unless the
//! text already starts with the prefix token's text (then without them).
//!
//! **The prefix token** is the tokenizer's BOS as `tokenizer_config.json` names it,
//! else its EOS (what `tokenizer.bos_token_id` / `eos_token_id` say in transformers;
//! `generation_config.json` plays no part).
//!
//! **A context and a continuation** are encoded together:
//! 1. trailing whitespace of the context moves to the front of the continuation
//!    (`"Answer: " + "Paris"` is scored as `"Answer:" + " Paris"`), so that a word
//!    keeps the space its tokens carry;
//! 2. `whole = encode(context + continuation)`, `ctx = encode(context)`, and the
//!    continuation's tokens are `whole[len(ctx):]` (not `encode(continuation)`: a
//!    token may straddle the boundary, and the split is by count);
//! 3. an empty context becomes `[prefix]` and the continuation is encoded alone,
//!    without special tokens; if its first token already is the prefix, that token is
//!    the context instead.
//!
//! **Scoring** `(ctx, cont)`: the model reads `inp = (ctx + cont)[-(L+1):][:-1]` (L the
//! context window) and the last `len(cont)` positions predict `cont`. A pair longer
//! than `L + 1` tokens thus loses tokens from the left of its context.
//!
//! **A document scored whole** (rolling log-likelihood) is `tokens = encode(text)`
//! split into disjoint windows of at most L predicted tokens: the first predicts
//! `tokens[0..L]` from `[prefix] + tokens[0..L-1]`; each next one predicts the next (at
//! most) L tokens and reads the L tokens before its last. Its context is what it reads
//! before its first predicted token (`make_disjoint_window`): one token for a full
//! window, more for a short last one. Every token is predicted once:
//!
//! ```text
//! tokens      t0 t1 t2 t3 t4 t5 t6 t7 t8 t9        L = 4
//! window 1    ctx [P]           predicts t0 t1 t2 t3   (reads P t0 t1 t2)
//! window 2    ctx [t3]          predicts t4 t5 t6 t7   (reads t3 t4 t5 t6)
//! window 3    ctx [t5 t6 t7]    predicts t8 t9         (reads t5 t6 t7 t8)
//! ```

use crate::error::Result;
use crate::tokenizer::Tokenizer;

use super::metrics::py_isspace;

/// Token-level view of a model's tokenizer with the harness's conventions.
pub struct Encoder<'a> {
    tok: &'a Tokenizer,
    /// The token conditioning an empty context and the first rolling window.
    pub prefix: u32,
    /// `decode(prefix)` with special tokens kept.
    prefix_text: String,
    /// The context window L.
    pub max_len: usize,
}

/// One scoring request in tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    pub context: Vec<u32>,
    pub continuation: Vec<u32>,
}

impl TokenRequest {
    /// Tokens in context and continuation together.
    pub fn len(&self) -> usize {
        self.context.len() + self.continuation.len()
    }

    /// Whether it has no token at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What the model reads, `(ctx + cont)[-(L+1):][:-1]`, and whether tokens were
    /// cut from the left to fit `max_len`.
    pub fn input(&self, max_len: usize) -> (Vec<u32>, bool) {
        let all: Vec<u32> = [self.context.as_slice(), &self.continuation].concat();
        let cut = all.len().saturating_sub(max_len + 1);
        let mut inp = all[cut..].to_vec();
        inp.pop();
        (inp, cut > 0)
    }
}

impl<'a> Encoder<'a> {
    /// `tok` with the harness's prefix token, scoring with a window of `max_len`.
    pub fn new(tok: &'a Tokenizer, max_len: usize) -> Result<Self> {
        let prefix = tok
            .named_bos
            .or(tok.named_eos)
            .or(tok.bos_id)
            .or(tok.eos_ids.first().copied())
            .ok_or_else(|| {
                crate::Error::Msg(format!(
                    "{}: the tokenizer names neither a BOS nor an EOS token (tokenizer_config.json), so an empty context has nothing to condition on",
                    tok.path().display()
                ))
            })?;
        let prefix_text = tok.inner().decode(&[prefix], false)?;
        Ok(Encoder {
            tok,
            prefix,
            prefix_text,
            max_len,
        })
    }

    /// `tok_encode(text)`: with the tokenizer's special tokens unless the text already
    /// starts with the prefix token's text.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        if !self.prefix_text.is_empty() && text.starts_with(&self.prefix_text) {
            self.tok.encode_plain(text)
        } else {
            self.tok.encode(text)
        }
    }

    /// A context and its continuation, encoded by the rules above.
    pub fn pair(&self, context: &str, continuation: &str) -> Result<TokenRequest> {
        if context.is_empty() {
            let cont = self.tok.encode_plain(continuation)?;
            return Ok(match cont.first() {
                Some(&first) if first == self.prefix => TokenRequest {
                    context: vec![first],
                    continuation: cont[1..].to_vec(),
                },
                _ => TokenRequest {
                    context: vec![self.prefix],
                    continuation: cont,
                },
            });
        }
        let trimmed = context.trim_end_matches(py_isspace);
        let moved = &context[trimmed.len()..];
        let (context, continuation) = (trimmed, format!("{moved}{continuation}"));
        let whole = self.encode(&format!("{context}{continuation}"))?;
        let ctx = self.encode(context)?;
        let n = ctx.len().min(whole.len());
        Ok(TokenRequest {
            continuation: whole[n..].to_vec(),
            context: ctx,
        })
    }

    /// The disjoint rolling windows of a document (see the module doc).
    pub fn rolling(&self, text: &str) -> Result<Vec<TokenRequest>> {
        let tokens = self.encode(text)?;
        Ok(rolling_windows(&tokens, self.prefix, self.max_len))
    }
}

/// `map(make_disjoint_window, get_rolling_token_windows(tokens, prefix, max_len, 1))`.
pub fn rolling_windows(tokens: &[u32], prefix: u32, max_len: usize) -> Vec<TokenRequest> {
    let mut out = Vec::new();
    if tokens.is_empty() || max_len == 0 {
        return out;
    }
    let disjoint = |ctx: Vec<u32>, pred: Vec<u32>| {
        let keep = ctx.len() + 1 - pred.len();
        TokenRequest {
            context: ctx[..keep].to_vec(),
            continuation: pred,
        }
    };
    let first = max_len.min(tokens.len());
    let ctx: Vec<u32> = std::iter::once(prefix)
        .chain(tokens[..first - 1].iter().copied())
        .collect();
    out.push(disjoint(ctx, tokens[..first].to_vec()));
    let mut predicted = first;
    while predicted < tokens.len() {
        let pred_len = (tokens.len() - predicted).min(max_len);
        let end = predicted + pred_len;
        let ctx = tokens[end - max_len - 1..end - 1].to_vec();
        out.push(disjoint(ctx, tokens[end - pred_len..end].to_vec()));
        predicted += pred_len;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(c: &[u32], p: &[u32]) -> TokenRequest {
        TokenRequest {
            context: c.to_vec(),
            continuation: p.to_vec(),
        }
    }

    /// `list(map(make_disjoint_window, get_rolling_token_windows(list(range(10)),
    /// prefix_token=99, max_seq_len=4, context_len=1)))` in lm_eval 0.4.
    #[test]
    fn rolling_windows_are_the_harness_ones() {
        let toks: Vec<u32> = (0..10).collect();
        assert_eq!(
            rolling_windows(&toks, 99, 4),
            vec![
                req(&[99], &[0, 1, 2, 3]),
                req(&[3], &[4, 5, 6, 7]),
                req(&[5, 6, 7], &[8, 9]),
            ]
        );
        assert_eq!(
            rolling_windows(&toks[..3], 99, 4),
            vec![req(&[99], &[0, 1, 2])]
        );
        assert!(rolling_windows(&[], 99, 4).is_empty());
    }

    #[test]
    fn long_pairs_lose_tokens_from_the_left() {
        let r = req(&[1, 2, 3, 4, 5], &[6, 7]);
        assert_eq!(r.input(4), (vec![3, 4, 5, 6], true));
        assert_eq!(r.input(6), (vec![1, 2, 3, 4, 5, 6], false));
    }
}
