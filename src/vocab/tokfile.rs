//! A `tokenizer.json` read two ways: as the `tokenizers` crate runs it, and as JSON to
//! inspect and edit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::forms::TokenForms;
use crate::error::{Error, IoContext, Result};

/// The role tokens `tokenizer_config.json` may name.
pub const ROLES: [&str; 4] = ["bos", "eos", "pad", "unk"];

/// A tokenizer folder's `tokenizer.json`.
#[derive(Clone)]
pub struct TokenizerFile {
    /// The folder.
    pub dir: PathBuf,
    pub json: Value,
    /// Loaded, with truncation and padding switched off.
    pub tokenizer: tokenizers::Tokenizer,
    pub forms: TokenForms,
    /// The string of every id (`None` for an id nothing uses), added tokens included.
    pub tokens: Vec<Option<String>>,
    /// Added tokens (matched before the model runs): id → content.
    pub added: BTreeMap<u32, String>,
    /// The model's unknown token.
    pub unk_id: Option<u32>,
}

impl std::fmt::Debug for TokenizerFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenizerFile")
            .field("dir", &self.dir)
            .field("size", &self.size())
            .field("forms", &self.forms)
            .finish()
    }
}

impl TokenizerFile {
    /// Read `dir/tokenizer.json`; `what` names the folder in errors (`--tokenizer`).
    pub fn open(dir: &Path, what: &str) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(Error::missing(
                &path,
                format!("{what} must be a folder holding a Hugging Face tokenizer.json"),
            ));
        }
        let text = std::fs::read_to_string(&path).at(&path)?;
        Self::from_text(dir, &text)
            .map_err(|e| Error::bad_file(&path, format!("{what} is not a tokenizer: {e}")))
    }

    /// A tokenizer from the text of a `tokenizer.json` (for folder `dir`); the error is
    /// what the `tokenizers` crate or the JSON parser says.
    pub fn from_text(dir: &Path, text: &str) -> std::result::Result<Self, String> {
        let json: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let mut tokenizer: tokenizers::Tokenizer = text.parse().map_err(|e| format!("{e}"))?;
        tokenizer
            .with_truncation(None)
            .map_err(|e| format!("cannot disable truncation: {e}"))?;
        tokenizer.with_padding(None);
        let vocab = tokenizer.get_vocab(true);
        let size = vocab.values().max().map_or(0, |&m| m as usize + 1);
        let mut tokens = vec![None; size];
        for (t, id) in vocab {
            tokens[id as usize] = Some(t);
        }
        let added = tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .map(|(id, t)| (id, t.content))
            .collect();
        let unk_id = json["model"]["unk_token"]
            .as_str()
            .and_then(|u| tokenizer.token_to_id(u));
        Ok(TokenizerFile {
            dir: dir.to_path_buf(),
            forms: TokenForms::of_tokenizer_json(&json),
            json,
            tokenizer,
            tokens,
            added,
            unk_id,
        })
    }

    /// Number of ids: the largest id plus one (ids may have gaps).
    pub fn size(&self) -> usize {
        self.tokens.len()
    }

    /// The model's type (`BPE`, `Unigram`, `WordPiece`, `WordLevel`).
    pub fn model_type(&self) -> &str {
        self.json["model"]["type"].as_str().unwrap_or("BPE")
    }

    /// The id of `token`, added tokens included.
    pub fn id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// Role → token string, as `tokenizer_config.json` names them (`bos_token`: a
    /// string or `{"content": ...}`); roles it does not name are left out.
    pub fn role_tokens(&self) -> Result<BTreeMap<&'static str, String>> {
        let path = self.dir.join("tokenizer_config.json");
        let mut out = BTreeMap::new();
        if !path.is_file() {
            return Ok(out);
        }
        let text = std::fs::read_to_string(&path).at(&path)?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::bad_file(&path, format!("not JSON: {e}")))?;
        for role in ROLES {
            let t = match &v[format!("{role}_token")] {
                Value::String(s) => Some(s.clone()),
                Value::Object(o) => o.get("content").and_then(Value::as_str).map(String::from),
                _ => None,
            };
            if let Some(t) = t {
                out.insert(role, t);
            }
        }
        Ok(out)
    }

    /// Role → id, for the roles whose token is in the vocabulary.
    pub fn role_ids(&self) -> Result<BTreeMap<&'static str, u32>> {
        Ok(self
            .role_tokens()?
            .into_iter()
            .filter_map(|(r, t)| self.id(&t).map(|id| (r, id)))
            .collect())
    }
}
