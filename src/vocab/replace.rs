//! Rows for a different tokenizer: which base row each new token starts from.
//!
//! Tokens are compared by what they stand for, not by spelling (see
//! [`super::forms`]): the byte-level `Ġcasa` of one vocabulary is the metaspace
//! `▁casa` of another. For each id of the new tokenizer:
//!
//! 1. an added or special token takes the base row of the same string, else of the
//!    base token with the same role (`bos`, `eos`, `pad`, `unk` in
//!    `tokenizer_config.json`), else the mean of all rows;
//! 2. another token takes the base row of the first base token with the same bytes;
//! 3. else its bytes are spelled as the base spells them and cut by the base's model:
//!    the mean of those pieces' rows (`--init mean`, or a cut with an unknown token:
//!    the mean of all rows).

use std::collections::HashMap;

use tokenizers::Model;

use super::Init;
use super::resize::RowSource;
use super::tokfile::TokenizerFile;
use crate::error::Result;

/// How the new tokenizer's rows were found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Matching {
    /// One source per id of the new tokenizer.
    #[serde(skip)]
    pub rows: Vec<RowSource>,
    /// Tokens found in the base with the same text (added tokens by string).
    pub same_text: usize,
    /// Special tokens matched by role.
    pub same_role: usize,
    /// Tokens started from the mean of their pieces' rows.
    pub from_pieces: usize,
    /// Tokens started from the mean of all rows.
    pub from_mean: usize,
}

/// The base pieces of `bytes`: spelled as `base` spells text, cut by its model.
/// `None` when it cannot be spelled or a piece is the unknown token.
pub fn pieces_of(base: &TokenizerFile, bytes: &[u8]) -> Option<Vec<u32>> {
    let mut ids = Vec::new();
    for part in base.forms.spell(bytes)? {
        if base.forms.is_fallback_byte(&part) {
            ids.push(base.id(&part)?);
            continue;
        }
        for t in base.tokenizer.get_model().tokenize(&part).ok()? {
            if Some(t.id) == base.unk_id {
                return None;
            }
            ids.push(t.id);
        }
    }
    (!ids.is_empty()).then_some(ids)
}

/// Where each row of `new`'s vocabulary comes from in `base`.
pub fn match_rows(base: &TokenizerFile, new: &TokenizerFile, init: Init) -> Result<Matching> {
    let mut by_bytes: HashMap<Vec<u8>, u32> = HashMap::new();
    for (id, t) in base.tokens.iter().enumerate() {
        let Some(t) = t else { continue };
        if base.added.contains_key(&(id as u32)) {
            continue;
        }
        if let Some(b) = base.forms.surface(t) {
            by_bytes.entry(b).or_insert(id as u32);
        }
    }
    let base_roles = base.role_ids()?;
    let new_roles = new.role_ids()?;
    let mut m = Matching::default();
    for (id, t) in new.tokens.iter().enumerate() {
        let id = id as u32;
        let src = match t {
            None => None,
            Some(t) if new.added.contains_key(&id) => match base.id(t) {
                Some(b) => {
                    m.same_text += 1;
                    Some(RowSource::Copy(b))
                }
                None => {
                    let role = new_roles.iter().find(|(_, i)| **i == id).map(|(r, _)| r);
                    let b = role.and_then(|r| base_roles.get(r));
                    b.map(|&b| {
                        m.same_role += 1;
                        RowSource::Copy(b)
                    })
                }
            },
            Some(t) => {
                let bytes = new.forms.surface(t);
                match bytes.as_ref().and_then(|b| by_bytes.get(b)) {
                    Some(&b) => {
                        m.same_text += 1;
                        Some(RowSource::Copy(b))
                    }
                    None if init == Init::Pieces => {
                        bytes.and_then(|b| pieces_of(base, &b)).map(|p| {
                            m.from_pieces += 1;
                            RowSource::Mean(p)
                        })
                    }
                    None => None,
                }
            }
        };
        m.rows.push(src.unwrap_or_else(|| {
            m.from_mean += 1;
            RowSource::MeanAll
        }));
    }
    Ok(m)
}
