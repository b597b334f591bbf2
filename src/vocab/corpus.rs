//! A corpus as the base tokenizer cuts it: counted units for learning new merges, and
//! tokens per byte.
//!
//! Every document is encoded by the base tokenizer itself (its added tokens, normalizer,
//! pre-tokenizer and merges; no special tokens around it), so that what is learned
//! continues exactly where the base's merges stop. The tokens are then cut into
//! *units*, runs that a new merge may join:
//!
//! ```text
//! " O pão caiu"  byte-level  [Ġ O] [Ġp ão] [Ġca iu]          a unit per pre-tokenized word
//! "▁O▁pão▁caiu"  metaspace   [▁O] [▁p ão] [▁ca iu]           a unit starts at each ▁ (runs of ▁ stay one)
//! ```
//!
//! Added and special tokens, byte-fallback tokens (`<0xXX>`) and the unknown token are
//! never merged and end a unit. Units are counted by their token ids: the corpus is
//! then held as its distinct words, not its text.

use std::collections::HashMap;
use std::path::Path;

use super::forms::{METASPACE, TextForm};
use super::tokfile::TokenizerFile;
use crate::data::dedup::list_inputs;
use crate::data::documents::ReadOptions;
use crate::error::{Error, Result};

/// Documents encoded at once (the tokenizer encodes a batch on all cores).
const BATCH_DOCS: usize = 512;
/// ... or this many bytes of text.
const BATCH_BYTES: usize = 4 << 20;

/// Size of a corpus under a tokenizer.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct CorpusSize {
    pub documents: u64,
    /// UTF-8 bytes of the documents' text.
    pub bytes: u64,
    /// Tokens of all documents, special tokens left out.
    pub tokens: u64,
}

impl CorpusSize {
    /// Tokens per byte of text.
    pub fn tokens_per_byte(&self) -> f64 {
        self.tokens as f64 / self.bytes.max(1) as f64
    }
}

/// The distinct units of a corpus with their counts.
#[derive(Debug, Default)]
pub struct UnitCounts {
    /// Units of two tokens or more (a shorter one holds no pair).
    pub units: HashMap<Box<[u32]>, u64>,
    pub size: CorpusSize,
}

/// Call `each` with the documents of `corpus` (a file or a folder of `.txt`/`.jsonl`,
/// optionally `.gz`) in batches, in file order.
pub fn for_each_batch(
    corpus: &Path,
    read: &ReadOptions,
    mut each: impl FnMut(&[String]) -> Result<()>,
) -> Result<()> {
    let (files, _ignored) = list_inputs(corpus)?;
    if files.is_empty() {
        return Err(Error::Data(format!(
            "{}: no .txt or .jsonl files (optionally .gz) to read",
            corpus.display()
        )));
    }
    let mut batch = Vec::new();
    let mut bytes = 0;
    for f in &files {
        for rec in read.records(&f.path)? {
            let text = rec?.text;
            bytes += text.len();
            batch.push(text);
            if batch.len() >= BATCH_DOCS || bytes >= BATCH_BYTES {
                each(&batch)?;
                batch.clear();
                bytes = 0;
            }
        }
    }
    if !batch.is_empty() {
        each(&batch)?;
    }
    Ok(())
}

/// Refuse a corpus with no text.
fn check_not_empty(corpus: &Path, size: &CorpusSize) -> Result<()> {
    if size.bytes == 0 {
        return Err(Error::Data(format!(
            "{}: the corpus holds no text after reading ({} documents); check --doc-separator / --json-key",
            corpus.display(),
            size.documents
        )));
    }
    Ok(())
}

/// Tokens of `corpus` under `tok`.
pub fn measure(tok: &TokenizerFile, corpus: &Path, read: &ReadOptions) -> Result<CorpusSize> {
    let mut size = CorpusSize::default();
    for_each_batch(corpus, read, |docs| {
        let enc = tok.tokenizer.encode_batch_fast(docs.to_vec(), false)?;
        size.documents += docs.len() as u64;
        size.bytes += docs.iter().map(|d| d.len() as u64).sum::<u64>();
        size.tokens += enc.iter().map(|e| e.len() as u64).sum::<u64>();
        Ok(())
    })?;
    check_not_empty(corpus, &size)?;
    Ok(size)
}

/// Which tokens may be joined, and where units end.
struct Splitter {
    /// By id: may take part in a merge.
    mergeable: Vec<bool>,
    /// By id: starts with `▁` (metaspace tokenizers only; empty otherwise).
    starts_space: Vec<bool>,
    /// By id: is nothing but `▁`.
    all_space: Vec<bool>,
}

impl Splitter {
    fn new(tok: &TokenizerFile) -> Self {
        let n = tok.size();
        let mut mergeable = vec![false; n];
        let mut starts_space = Vec::new();
        let mut all_space = Vec::new();
        let metaspace = tok.forms.text == TextForm::Metaspace;
        if metaspace {
            starts_space = vec![false; n];
            all_space = vec![false; n];
        }
        for (id, t) in tok.tokens.iter().enumerate() {
            let Some(t) = t else { continue };
            mergeable[id] = !tok.added.contains_key(&(id as u32))
                && !tok.forms.is_fallback_byte(t)
                && tok.unk_id != Some(id as u32);
            if metaspace {
                starts_space[id] = t.starts_with(METASPACE);
                all_space[id] = !t.is_empty() && t.chars().all(|c| c == METASPACE);
            }
        }
        Splitter {
            mergeable,
            starts_space,
            all_space,
        }
    }

    /// Whether a unit ends between `prev` and `id` (same pre-tokenized word).
    fn cut_before(&self, prev: u32, id: u32) -> bool {
        if self.starts_space.is_empty() {
            return false;
        }
        let (p, i) = (prev as usize, id as usize);
        self.starts_space[i] && !(self.all_space[i] && self.all_space[p])
    }
}

/// Count the units of `corpus` as the base tokenizer `tok` cuts it.
pub fn count_units(tok: &TokenizerFile, corpus: &Path, read: &ReadOptions) -> Result<UnitCounts> {
    let split = Splitter::new(tok);
    let mut out = UnitCounts::default();
    let mut unit: Vec<u32> = Vec::new();
    let flush = |unit: &mut Vec<u32>, units: &mut HashMap<Box<[u32]>, u64>| {
        if unit.len() >= 2 {
            *units.entry(unit.as_slice().into()).or_insert(0) += 1;
        }
        unit.clear();
    };
    for_each_batch(corpus, read, |docs| {
        // Not `encode_batch_fast`: it leaves the word ids out.
        let enc = tok.tokenizer.encode_batch(docs.to_vec(), false)?;
        out.size.documents += docs.len() as u64;
        out.size.bytes += docs.iter().map(|d| d.len() as u64).sum::<u64>();
        for e in &enc {
            let (ids, words) = (e.get_ids(), e.get_word_ids());
            out.size.tokens += ids.len() as u64;
            for (i, &id) in ids.iter().enumerate() {
                // (Every id the tokenizer produces is below its size.)
                if i > 0 && (words[i] != words[i - 1] || split.cut_before(ids[i - 1], id)) {
                    flush(&mut unit, &mut out.units);
                }
                if split.mergeable[id as usize] {
                    unit.push(id);
                } else {
                    flush(&mut unit, &mut out.units);
                }
            }
            flush(&mut unit, &mut out.units);
        }
        Ok(())
    })?;
    check_not_empty(corpus, &out.size)?;
    Ok(out)
}
