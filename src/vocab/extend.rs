//! Continuing a BPE tokenizer's merges on a new corpus.
//!
//! BPE applies its merges by rank, lowest first. Merges appended after the base's
//! therefore only ever act on what the base's merges leave: on any text, the extended
//! tokenizer first cuts exactly as the base does, then joins further. So learning
//! continues BPE training from the base's cut of every word ([`super::corpus`]):
//!
//! ```text
//! repeat N times:  the most frequent adjacent pair (a, b) over all units, counted with
//!                  multiplicity (ties: the smaller ids), becomes the token a+b with the
//!                  next id, and every occurrence is joined, left to right
//! ```
//!
//! A pair is only taken if it was seen at least `min_frequency` times and `a+b` is not a
//! token already. The second rule keeps every new merge a new token, so no base merge
//! can fire on a merge's result: the base's cut stays the first stage of the new one.
//!
//! The result is written into `tokenizer.json` as JSON: the new tokens into
//! `model.vocab` from the first free id (after the base's added tokens too, so none
//! collides), the merges after the base's in its own spelling (`"a b"` strings, or
//! `[a, b]` pairs when the file uses them or a token holds a space). Added tokens kept
//! outside the model's vocabulary (LLaMA-3's specials, after it) are entered into it
//! under their ids:
//!
//! ```text
//! base      model.vocab 0..127999   added_tokens 128000..128255
//! extended  model.vocab 0..127999, 128000..128255 (the added tokens), 128256.. (new)
//! ```
//!
//! since on loading, the tokenizers library numbers the added tokens it does not find
//! in the model's vocabulary from the vocabulary's size, which the new tokens change.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};

use serde_json::{Value, json};

use super::corpus::UnitCounts;
use super::tokfile::TokenizerFile;

/// New merges learned on a corpus.
#[derive(Debug, Clone, PartialEq)]
pub struct Extension {
    /// Id of the first new token (the base tokenizer's size).
    pub first_id: u32,
    /// Merges in rank order, as pairs of ids; merge `k` makes token `first_id + k`.
    pub merges: Vec<(u32, u32)>,
    /// The new tokens' strings, in id order.
    pub tokens: Vec<String>,
    /// For each new token, the base tokens it joins, left to right: how the base
    /// tokenizer cuts its text.
    pub pieces: Vec<Vec<u32>>,
    /// Tokens of the corpus once the new merges are applied.
    pub tokens_after: u64,
}

/// Learn up to `n` new merges on `counts` (the corpus as `base` cuts it). Fewer come
/// back when no pair is left that occurs `min_frequency` times.
pub fn learn(base: &TokenizerFile, counts: &UnitCounts, n: usize, min_frequency: u64) -> Extension {
    let first_id = base.size() as u32;
    let mut taken: HashSet<String> = base.tokens.iter().flatten().cloned().collect();
    let mut words: Vec<Vec<u32>> = Vec::with_capacity(counts.units.len());
    let mut freq: Vec<u64> = Vec::with_capacity(counts.units.len());
    // Deterministic word order, whatever the hash map's.
    let mut units: Vec<(&Box<[u32]>, &u64)> = counts.units.iter().collect();
    units.sort_unstable();
    for (w, &c) in units {
        words.push(w.to_vec());
        freq.push(c);
    }
    let mut pair_count: HashMap<(u32, u32), u64> = HashMap::new();
    let mut where_: HashMap<(u32, u32), Vec<usize>> = HashMap::new();
    for (i, w) in words.iter().enumerate() {
        for p in w.windows(2) {
            let p = (p[0], p[1]);
            *pair_count.entry(p).or_insert(0) += freq[i];
            let at = where_.entry(p).or_default();
            if at.last() != Some(&i) {
                at.push(i);
            }
        }
    }
    let mut heap: BinaryHeap<(u64, Reverse<(u32, u32)>)> =
        pair_count.iter().map(|(&p, &c)| (c, Reverse(p))).collect();

    let mut ext = Extension {
        first_id,
        merges: Vec::new(),
        tokens: Vec::new(),
        pieces: Vec::new(),
        tokens_after: counts.size.tokens,
    };
    let text_of = |ext: &Extension, id: u32| -> String {
        match id.checked_sub(first_id) {
            Some(k) => ext.tokens[k as usize].clone(),
            None => base.tokens[id as usize].clone().unwrap_or_default(),
        }
    };
    let pieces_of = |ext: &Extension, id: u32| -> Vec<u32> {
        match id.checked_sub(first_id) {
            Some(k) => ext.pieces[k as usize].clone(),
            None => vec![id],
        }
    };
    while ext.merges.len() < n {
        let Some((c, Reverse(pair))) = heap.pop() else {
            break;
        };
        let now = pair_count.get(&pair).copied().unwrap_or(0);
        if now != c {
            if now > 0 {
                heap.push((now, Reverse(pair)));
            }
            continue;
        }
        if c < min_frequency.max(1) {
            break; // the most frequent pair left is too rare
        }
        let (a, b) = pair;
        let joined = text_of(&ext, a) + &text_of(&ext, b);
        if !taken.insert(joined.clone()) {
            pair_count.remove(&pair);
            continue;
        }
        let new_id = first_id + ext.tokens.len() as u32;
        let mut pieces = pieces_of(&ext, a);
        pieces.extend(pieces_of(&ext, b));
        ext.merges.push(pair);
        ext.tokens.push(joined);
        ext.pieces.push(pieces);

        let mut delta: HashMap<(u32, u32), i64> = HashMap::new();
        for wi in where_.remove(&pair).unwrap_or_default() {
            let w = &words[wi];
            if !w.windows(2).any(|p| (p[0], p[1]) == pair) {
                continue; // the pair left this word in an earlier merge
            }
            let mut joined_w = Vec::with_capacity(w.len());
            let mut i = 0;
            while i < w.len() {
                if i + 1 < w.len() && (w[i], w[i + 1]) == pair {
                    joined_w.push(new_id);
                    i += 2;
                } else {
                    joined_w.push(w[i]);
                    i += 1;
                }
            }
            let f = freq[wi] as i64;
            for p in w.windows(2) {
                *delta.entry((p[0], p[1])).or_insert(0) -= f;
            }
            for p in joined_w.windows(2) {
                let p = (p[0], p[1]);
                *delta.entry(p).or_insert(0) += f;
                if p.0 == new_id || p.1 == new_id {
                    let at = where_.entry(p).or_default();
                    if at.last() != Some(&wi) {
                        at.push(wi);
                    }
                }
            }
            ext.tokens_after -= freq[wi] * (w.len() - joined_w.len()) as u64;
            words[wi] = joined_w;
        }
        let mut changed: Vec<((u32, u32), i64)> = delta.into_iter().filter(|d| d.1 != 0).collect();
        changed.sort_unstable();
        for (p, d) in changed {
            let c = pair_count.entry(p).or_insert(0);
            *c = (*c as i64 + d).max(0) as u64;
            if *c == 0 {
                pair_count.remove(&p);
            } else if d > 0 {
                heap.push((*c, Reverse(p)));
            }
        }
    }
    ext
}

/// The base's `tokenizer.json` with `ext`'s tokens and merges added. `Err` names what
/// the file lacks.
pub fn extended_json(
    base: &Value,
    ext: &Extension,
    base_tok: &TokenizerFile,
) -> Result<Value, String> {
    let mut out = base.clone();
    let model = out
        .get_mut("model")
        .and_then(Value::as_object_mut)
        .ok_or("no \"model\" object")?;
    let vocab = model
        .get_mut("vocab")
        .and_then(Value::as_object_mut)
        .ok_or("the BPE model has no \"vocab\" object")?;
    // The tokenizers library gives an added token that is not in the model's vocabulary
    // the id after the vocabulary's *count* when it loads the file: with new tokens
    // after them, such tokens (LLaMA-3's specials) would move. Listed in the
    // vocabulary under their own ids, they keep them.
    for (&id, content) in &base_tok.added {
        if !vocab.contains_key(content) {
            vocab.insert(content.clone(), json!(id));
        }
    }
    for (k, t) in ext.tokens.iter().enumerate() {
        vocab.insert(t.clone(), json!(ext.first_id + k as u32));
    }
    let text = |id: u32| -> String {
        match id.checked_sub(ext.first_id) {
            Some(k) => ext.tokens[k as usize].clone(),
            None => base_tok.tokens[id as usize].clone().unwrap_or_default(),
        }
    };
    let new: Vec<(String, String)> = ext
        .merges
        .iter()
        .map(|&(a, b)| (text(a), text(b)))
        .collect();
    let merges = model
        .get_mut("merges")
        .and_then(Value::as_array_mut)
        .ok_or("the BPE model has no \"merges\" list")?;
    let strings = merges.first().is_some_and(Value::is_string);
    let spaced = new.iter().any(|(a, b)| a.contains(' ') || b.contains(' '));
    if strings && spaced {
        // "a b" cannot hold a token with a space: the whole list becomes pairs.
        for m in merges.iter_mut() {
            let s = m.as_str().ok_or("merges mix strings and pairs")?;
            let (a, b) = s
                .split_once(' ')
                .ok_or_else(|| format!("merge {s:?} is not \"a b\""))?;
            *m = json!([a, b]);
        }
    }
    for (a, b) in new {
        merges.push(if strings && !spaced {
            json!(format!("{a} {b}"))
        } else {
            json!([a, b])
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab::corpus::CorpusSize;
    use std::path::Path;

    /// A byte-level-free toy BPE: characters a, b, c, d and the merge "a b".
    fn toy() -> TokenizerFile {
        let text = r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"},
            "post_processor": null, "decoder": null,
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": {"a": 0, "b": 1, "c": 2, "d": 3, "ab": 4},
                "merges": ["a b"]}}"#;
        TokenizerFile::from_text(Path::new("."), text).unwrap()
    }

    fn counts(units: &[(&[u32], u64)]) -> UnitCounts {
        let tokens = units.iter().map(|(u, c)| u.len() as u64 * c).sum();
        UnitCounts {
            units: units.iter().map(|(u, c)| (Box::from(*u), *c)).collect(),
            size: CorpusSize {
                documents: 1,
                bytes: tokens,
                tokens,
            },
        }
    }

    #[test]
    fn most_frequent_pairs_become_tokens_after_the_base() {
        let base = toy();
        // "abc" ×5 (base cut: ab c), "cd" ×3, "abcd" ×2 (ab c d).
        let c = counts(&[(&[4, 2], 5), (&[2, 3], 3), (&[4, 2, 3], 2)]);
        let ext = learn(&base, &c, 10, 2);
        // (ab, c) 7 times → "abc" = 5; then (c, d) 3 → "cd" = 6; then (abc, d) 2 → "abcd" = 7.
        assert_eq!(ext.first_id, 5);
        assert_eq!(ext.tokens, ["abc", "cd", "abcd"]);
        assert_eq!(ext.merges, [(4, 2), (2, 3), (5, 3)]);
        assert_eq!(ext.pieces, [vec![4, 2], vec![2, 3], vec![4, 2, 3]]);
        // 5·2 + 3·2 + 2·3 = 22 tokens become 5 + 3 + 2.
        assert_eq!((c.size.tokens, ext.tokens_after), (22, 10));
        // At most n, and no pair below the minimum frequency.
        assert_eq!(learn(&base, &c, 1, 2).tokens, ["abc"]);
        assert_eq!(learn(&base, &c, 10, 4).tokens, ["abc"]);
    }

    #[test]
    fn a_pair_spelling_an_existing_token_is_skipped() {
        let base = toy();
        // (a, b) spells "ab", a base token: never a new merge.
        let c = counts(&[(&[0, 1], 9), (&[2, 3], 2)]);
        assert_eq!(learn(&base, &c, 5, 2).tokens, ["cd"]);
    }

    #[test]
    fn added_tokens_after_the_vocabulary_keep_their_ids() {
        // "<x>" is id 5, outside the model's vocabulary (0..=4), as LLaMA-3's specials.
        let mut json = toy().json;
        json["added_tokens"] = json!([{"id": 5, "content": "<x>", "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": true}]);
        let base = TokenizerFile::from_text(Path::new("."), &json.to_string()).unwrap();
        assert_eq!((base.size(), base.id("<x>")), (6, Some(5)));
        let ext = learn(&base, &counts(&[(&[4, 2], 5)]), 1, 2);
        assert_eq!(ext.first_id, 6);
        let v = extended_json(&base.json, &ext, &base).unwrap();
        let t = TokenizerFile::from_text(Path::new("."), &v.to_string()).unwrap();
        assert_eq!((t.id("<x>"), t.id("abc"), t.size()), (Some(5), Some(6), 7));
        assert_eq!(
            t.tokenizer.encode("abc<x>", false).unwrap().get_ids(),
            [6, 5]
        );
    }

    #[test]
    fn merges_keep_the_files_spelling() {
        let base = toy();
        let c = counts(&[(&[4, 2], 5)]);
        let ext = learn(&base, &c, 1, 2);
        let v = extended_json(&base.json, &ext, &base).unwrap();
        assert_eq!(v["model"]["merges"], json!(["a b", "ab c"]));
        assert_eq!(v["model"]["vocab"]["abc"], json!(5));
        let text = serde_json::to_string(&v).unwrap();
        let t = TokenizerFile::from_text(Path::new("."), &text).unwrap();
        assert_eq!(
            t.tokenizer.encode("abc abcd", false).unwrap().get_ids(),
            [5, 5, 3]
        );
        // Pairs stay pairs; a space in a token turns strings into pairs.
        let mut pairs = base.json.clone();
        pairs["model"]["merges"] = json!([["a", "b"]]);
        let v = extended_json(&pairs, &ext, &base).unwrap();
        assert_eq!(v["model"]["merges"], json!([["a", "b"], ["ab", "c"]]));
        let spaced = Extension {
            tokens: vec!["ab c".into()],
            ..ext.clone()
        };
        let mut with_space = base.clone();
        with_space.tokens[2] = Some(" c".into());
        let v = extended_json(&base.json, &spaced, &with_space).unwrap();
        assert_eq!(v["model"]["merges"], json!([["a", "b"], ["ab", " c"]]));
    }
}
