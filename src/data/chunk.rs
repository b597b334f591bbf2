//! Turn-aware cutting of long documents into chunks of at most `block_size` tokens
//! (padding mode: each chunk becomes one sample).
//!
//! A document's ids are `lead` special ids (BOS), the text's tokens, then EOS. Cutting
//! "at `c`" ends a chunk before id `c`. From a chunk start `s`, while more than
//! `block_size` ids remain, the window is `s .. s + block_size` and the cut is, in order
//! of preference,
//! 1. the last speaker-turn start (a match of the turn pattern, e.g. `[Intervenant 2:]`)
//!    in the last `turn_window` fraction of the window,
//! 2. else the last word boundary in the window: a token boundary with whitespace just
//!    before or just after it (so never inside a word, nor inside a character split
//!    over byte tokens),
//! 3. else the end of the window (one "word" longer than the window: a hard cut).
//!
//! Cuts leave at least two ids on each side where the block allows it (a one-token
//! sample has no target).
//! Chunks are consecutive slices of the ids: no token is dropped or repeated.

use regex::Regex;

use crate::error::{Error, Result};

/// Matches tags such as `[Intervenant 1:]`, `[speaker001:]`, `[Speaker 2:]`, `[-:]`.
pub const DEFAULT_TURN_PATTERN: &str = r"\[[^\[\]\n]{1,48}:\]";

/// Cuts documents into chunks.
#[derive(Debug, Clone)]
pub struct Chunker {
    block_size: usize,
    turn: Option<Regex>,
    /// Ids at the end of the window where a turn start may cut.
    search: usize,
}

impl Chunker {
    /// `turn_pattern` empty disables turn cuts; `turn_window` is in (0, 1].
    pub fn new(block_size: usize, turn_pattern: &str, turn_window: f64) -> Result<Self> {
        if block_size < 2 {
            return Err(Error::Usage(format!(
                "--max-length must be at least 1 (block size {block_size})"
            )));
        }
        if !(turn_window > 0.0 && turn_window <= 1.0) {
            return Err(Error::Usage(format!(
                "--turn-window {turn_window}: must lie in (0, 1]"
            )));
        }
        let turn = if turn_pattern.is_empty() {
            None
        } else {
            Some(Regex::new(turn_pattern).map_err(|e| {
                Error::Usage(format!(
                    "--turn-pattern {turn_pattern:?} is not a regular expression: {}",
                    e.to_string().replace('\n', " ")
                ))
            })?)
        };
        let search = ((block_size as f64 * turn_window).ceil() as usize).clamp(1, block_size);
        Ok(Chunker {
            block_size,
            turn,
            search,
        })
    }

    /// The turn pattern, if any.
    pub fn turn_pattern(&self) -> Option<&Regex> {
        self.turn.as_ref()
    }

    /// Lengths of the chunks of a document of `total` ids whose text tokens, starting at
    /// id `lead`, span the byte ranges `offsets` of `text`.
    pub fn chunks(
        &self,
        text: &str,
        offsets: &[(usize, usize)],
        lead: usize,
        total: usize,
    ) -> Vec<u32> {
        let bs = self.block_size;
        if total <= bs {
            return vec![total as u32];
        }
        let m = offsets.len();
        // A token boundary that does not fall inside a token or a character.
        let clean = |p: usize| {
            p == 0
                || (offsets[p - 1].1 <= offsets[p].0
                    && offsets[p - 1].0 < offsets[p].0
                    && text.is_char_boundary(offsets[p].0))
        };
        let word_cut = |c: usize| {
            if c < lead {
                return false;
            }
            let p = c - lead;
            if p == 0 || p >= m {
                return true;
            }
            if !clean(p) {
                return false;
            }
            let b = offsets[p].0;
            let before = text[..b]
                .chars()
                .next_back()
                .is_some_and(char::is_whitespace);
            let after = text[b..].chars().next().is_some_and(char::is_whitespace);
            before || after
        };
        let mut turn_cuts: Vec<usize> = Vec::new();
        if let Some(re) = &self.turn {
            for mat in re.find_iter(text) {
                // The token holding the tag's first byte starts the turn.
                let p = offsets.partition_point(|o| o.1 <= mat.start());
                if p > 0 && p < m && clean(p) && turn_cuts.last() != Some(&(lead + p)) {
                    turn_cuts.push(lead + p);
                }
            }
        }

        let mut out = Vec::with_capacity(total / bs + 2);
        let mut s = 0;
        while total - s > bs {
            // Chunks of one token teach nothing: cut in s+2 ..= hi so that both sides
            // keep two ids (when the block allows it).
            let e = s + bs;
            let hi = e.min(total - 2);
            let first = s + 2;
            let c = if hi < first {
                e
            } else {
                let lo = first.max(e - self.search);
                let i = turn_cuts.partition_point(|&t| t <= hi);
                match i.checked_sub(1).map(|i| turn_cuts[i]) {
                    Some(t) if t >= lo => t,
                    _ => (first..=hi).rev().find(|&c| word_cut(c)).unwrap_or(hi),
                }
            };
            out.push((c - s) as u32);
            s = c;
        }
        out.push((total - s) as u32);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One "token" per word and per space: offsets of `text` split on spaces.
    fn words(text: &str) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let mut start = 0;
        for (i, ch) in text.char_indices() {
            if ch == ' ' {
                if i > start {
                    out.push((start, i));
                }
                out.push((i, i + 1));
                start = i + 1;
            }
        }
        if start < text.len() {
            out.push((start, text.len()));
        }
        out
    }

    #[test]
    fn cuts_at_turn_else_word_else_hard() {
        let text = "[A:] aa bb cc [B:] dd ee";
        let offs = words(text);
        // 13 tokens + EOS; "[B:]" is token 8, the last word boundary of a 10-id window 10.
        let turns = Chunker::new(10, DEFAULT_TURN_PATTERN, 0.5).unwrap();
        assert_eq!(turns.chunks(text, &offs, 0, 14), [8, 6]);
        let plain = Chunker::new(10, "", 0.5).unwrap();
        assert_eq!(plain.chunks(text, &offs, 0, 14), [10, 4]);
        // A turn too early in the window does not cut.
        let narrow = Chunker::new(10, DEFAULT_TURN_PATTERN, 0.1).unwrap();
        assert_eq!(narrow.chunks(text, &offs, 0, 14), [10, 4]);

        let text = "abcdefghijklmnop";
        let offs: Vec<_> = (0..16).map(|i| (i, i + 1)).collect();
        let got = Chunker::new(5, "", 0.5).unwrap().chunks(text, &offs, 0, 17);
        assert_eq!(got, [5, 5, 5, 2]);
    }
}
