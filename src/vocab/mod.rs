//! A model's vocabulary changed or chosen: `adapt-vocab` (new tokens on a pretrained
//! base, or a different tokenizer under it) and `init-model` (a model from scratch for
//! a tokenizer).
//!
//! - [`forms`]: how tokenizers spell text in tokens (byte-level, metaspace, byte fallback).
//! - [`tokfile`]: a `tokenizer.json`, loaded and as JSON.
//! - [`corpus`]: a corpus as the base tokenizer cuts it; tokens per byte.
//! - [`extend`]: continuing the base's BPE merges on that corpus.
//! - [`replace`]: which base row each token of another tokenizer starts from.
//! - [`resize`]: the new embedding and head matrices, row by row.
//! - [`adapt`]: the `adapt-vocab` folder, written in one go.
//! - [`init_model`](mod@init_model): weights initialised as each family's transformers code does.
//!
//! The adapted folder records what changed in [`RECORD_FILE`] ([`VocabRecord`]):
//! training reads its `new_token_ids` to know which rows are new.

pub mod adapt;
pub mod corpus;
pub mod extend;
pub mod forms;
pub mod init_model;
pub mod replace;
pub mod resize;
pub mod tokfile;

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, IoContext, Result};

pub use adapt::{AdaptOptions, VocabSource, adapt_vocab};
pub use init_model::{InitOptions, InitReport, init_model};

/// The record `adapt-vocab` writes into the folder it makes.
pub const RECORD_FILE: &str = "vocab_adaptation.json";

/// Vocabulary sizes are padded to a multiple of this, as the families' own
/// checkpoints are (LLaMA-3 128256, Pythia 50304) for fast matrix products.
pub const DEFAULT_PAD_MULTIPLE: usize = 64;

/// How the rows of new tokens start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Init {
    /// The mean of the base rows of the pieces the base tokenizer cuts the token into.
    Pieces,
    /// The mean of all base rows.
    Mean,
}

/// How the vocabulary changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The base tokenizer with new merges and tokens after its own.
    Extend,
    /// Another tokenizer.
    Replace,
}

/// Tokens per byte of a corpus under the base and the new tokenizer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokensPerByte {
    pub corpus: String,
    pub documents: u64,
    pub bytes: u64,
    pub base_tokens: u64,
    pub new_tokens: u64,
    pub base: f64,
    pub new: f64,
}

/// `vocab_adaptation.json`: what `adapt-vocab` changed.
///
/// ```text
/// ids  [0, base_tokenizer_size)        the base's tokens (extend: same ids and strings)
///      new_token_ids                    rows initialised, not copied: the rows to train
///      [tokenizer_size, vocab_size)    padding rows, never produced by the tokenizer
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VocabRecord {
    pub mode: Mode,
    pub init: Init,
    /// The base model folder, as given.
    pub base_model: String,
    /// The base's `config.json` `vocab_size` (rows of its embeddings).
    pub base_vocab_size: usize,
    /// Ids of the base tokenizer (largest id + 1).
    pub base_tokenizer_size: usize,
    /// The new `config.json` `vocab_size`: `tokenizer_size` padded.
    pub vocab_size: usize,
    /// Ids of the new tokenizer.
    pub tokenizer_size: usize,
    /// Ids below `tokenizer_size` whose rows were initialised rather than copied from
    /// a base row, ascending (extend: the new tokens).
    pub new_token_ids: Vec<u32>,
    /// Merges appended to the base's (extend only).
    pub new_merges: usize,
    /// Tokens of the other tokenizer found in the base by text or role (replace only).
    pub copied_rows: usize,
    pub tokens_per_byte: Option<TokensPerByte>,
}

impl VocabRecord {
    /// The record of model folder `dir`, if it has one.
    pub fn read(dir: &Path) -> Result<Option<VocabRecord>> {
        let path = dir.join(RECORD_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).at(&path)?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::bad_file(&path, format!("not a vocabulary record: {e}")))
    }
}

/// Set `<role>_token_id` in a `config.json` or `generation_config.json` value to the
/// tokenizer's ids; a role the tokenizer lacks keeps its id if it is below `vocab`,
/// else loses it.
pub fn set_token_ids(v: &mut Value, roles: &BTreeMap<&str, u32>, vocab: usize) {
    let Some(obj) = v.as_object_mut() else {
        return;
    };
    for role in ["bos", "eos", "pad"] {
        let key = format!("{role}_token_id");
        match roles.get(role) {
            Some(&id) => {
                obj.insert(key, Value::from(id));
            }
            None => {
                let stale = match obj.get(&key) {
                    Some(Value::Number(n)) => n.as_u64().is_none_or(|n| n as usize >= vocab),
                    Some(Value::Array(a)) => a
                        .iter()
                        .any(|n| n.as_u64().is_none_or(|n| n as usize >= vocab)),
                    _ => false,
                };
                if stale {
                    obj.insert(key, Value::Null);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn token_ids_follow_the_tokenizer() {
        let mut cfg = json!({"bos_token_id": 1, "eos_token_id": [2, 700], "pad_token_id": 3});
        let roles = BTreeMap::from([("bos", 5u32)]);
        set_token_ids(&mut cfg, &roles, 640);
        assert_eq!(
            cfg,
            json!({"bos_token_id": 5, "eos_token_id": null, "pad_token_id": 3})
        );
    }
}
