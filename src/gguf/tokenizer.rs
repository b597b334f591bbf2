//! The `tokenizer.ggml.*` metadata of a GGUF file from a `tokenizer.json`, in one of
//! llama.cpp's two vocabularies for the families `quantize` writes:
//!
//! - `"gpt2"`: byte-level BPE (Falcon, Llama-3, GPT-2 style): tokens in id order,
//!   merges as `"left right"`, and the pre-tokenizer llama.cpp must apply (`gpt-2`,
//!   `falcon` or `llama-bpe`).
//! - `"llama"`: SentencePiece BPE as Llama-2 and Mistral ship it (a BPE model with
//!   `byte_fallback`, `<0xXX>` byte tokens, `▁` for spaces). llama.cpp merges the
//!   adjacent pair whose merged token scores highest, so each token's score is minus the
//!   rank of the first merge that produces it: the same order as the merges list.
//!   Whether a `▁` is prepended to the text comes from the normalizer or pre-tokenizer.
//!
//! Both: ids the tokenizer lacks up to the model's vocabulary become `[PADi]` (type
//! unused), token types 1 normal, 2 unknown, 3 control (special added tokens),
//! 4 user-defined (other added tokens), 5 unused, 6 byte; special ids; whether BOS is
//! added; the chat template.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value as Json;

use super::Value;
use crate::config::Config;
use crate::error::{Error, IoContext, Result};

const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

fn kind(v: &Json) -> &str {
    v.get("type").and_then(Json::as_str).unwrap_or("")
}

/// The parts of a `Sequence` (or the thing itself).
fn parts<'a>(v: &'a Json, list: &str) -> Vec<&'a Json> {
    match v.get(list).and_then(Json::as_array) {
        Some(a) if kind(v) == "Sequence" => a.iter().collect(),
        _ if v.is_null() => Vec::new(),
        _ => vec![v],
    }
}

/// llama.cpp's pre-tokenizer name for a byte-level `tokenizer.json` pre-tokenizer.
fn pre_tokenizer(pre: &Json) -> Option<&'static str> {
    match kind(pre) {
        "ByteLevel" if pre.get("use_regex").and_then(Json::as_bool) != Some(false) => Some("gpt-2"),
        "Sequence" => {
            let parts = parts(pre, "pretokenizers");
            let kinds: Vec<&str> = parts.iter().map(|p| kind(p)).collect();
            let has = |k: &str| kinds.contains(&k);
            let text = pre.to_string();
            if has("Punctuation") && has("ByteLevel") && has("Digits") {
                Some("falcon")
            } else if text.contains("\\\\p{N}{1,3}")
                && text.contains("(?i:'s|'t|'re|'ve|'m|'ll|'d)")
            {
                Some("llama-bpe")
            } else if kinds == ["ByteLevel"] {
                pre_tokenizer(parts[0])
            } else {
                None
            }
        }
        _ => None,
    }
}

/// Whether a SentencePiece-style tokenizer prepends `▁` to the text: a `Prepend`
/// normalizer (the legacy conversion) or a `Metaspace` pre-tokenizer that does.
fn adds_space_prefix(v: &Json) -> bool {
    let prepends = parts(&v["normalizer"], "normalizers")
        .iter()
        .any(|n| kind(n) == "Prepend");
    let metaspace = parts(&v["pre_tokenizer"], "pretokenizers")
        .into_iter()
        .find(|p| kind(p) == "Metaspace");
    prepends
        || metaspace.is_some_and(|m| match m.get("prepend_scheme").and_then(Json::as_str) {
            Some(scheme) => scheme != "never",
            None => m.get("add_prefix_space").and_then(Json::as_bool) != Some(false),
        })
}

fn merge_pairs(model: &Json) -> Vec<(String, String)> {
    model
        .get("merges")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            Json::String(s) => {
                let (l, r) = s.split_once(' ')?;
                Some((l.to_string(), r.to_string()))
            }
            Json::Array(p) if p.len() == 2 => {
                Some((p[0].as_str()?.to_string(), p[1].as_str()?.to_string()))
            }
            _ => None,
        })
        .collect()
}

fn is_byte_token(t: &str) -> bool {
    t.len() == 6
        && t.starts_with("<0x")
        && t.ends_with('>')
        && t[3..5].bytes().all(|b| b.is_ascii_hexdigit())
}

/// Which of llama.cpp's vocabularies a `tokenizer.json` becomes.
enum Vocabulary {
    /// `"gpt2"`, with llama.cpp's name of the pre-tokenizer.
    ByteLevel { pre: &'static str },
    /// `"llama"`.
    SentencePiece,
}

/// Scores of a SentencePiece vocabulary: minus the rank of the first merge producing a
/// token; tokens no merge produces (characters, bytes, specials) never result from
/// merging, so theirs only need to be lower. Marks byte and unknown tokens in `types`.
fn sentencepiece_scores(
    tokens: &[String],
    types: &mut [i32],
    merges: &[(String, String)],
    unk: Option<&str>,
) -> Vec<f32> {
    let mut rank: HashMap<String, usize> = HashMap::new();
    for (r, (left, right)) in merges.iter().enumerate() {
        rank.entry(format!("{left}{right}")).or_insert(r);
    }
    let mut scores = Vec::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        if types[i] == NORMAL && is_byte_token(t) {
            types[i] = BYTE;
        }
        if Some(t.as_str()) == unk {
            types[i] = UNKNOWN;
        }
        scores.push(match rank.get(t) {
            Some(&r) if types[i] == NORMAL => -(r as f32),
            _ if types[i] == NORMAL => -((merges.len() + i) as f32),
            _ => 0.0,
        });
    }
    scores
}

/// The `tokenizer.ggml.*` keys for the `tokenizer.json` in `dir`.
pub(crate) fn tokenizer_metadata(dir: &Path, cfg: &Config) -> Result<Vec<(String, Value)>> {
    let path = dir.join("tokenizer.json");
    if !path.exists() {
        return Err(Error::missing(
            &path,
            "quantize embeds the tokenizer; the folder needs tokenizer.json",
        ));
    }
    let text = std::fs::read_to_string(&path).at(&path)?;
    let v: Json = serde_json::from_str(&text)
        .map_err(|e| Error::bad_file(&path, format!("not JSON: {e}")))?;
    let model = v.get("model").cloned().unwrap_or(Json::Null);
    let bpe = kind(&model) == "BPE";
    let byte_level = v
        .get("decoder")
        .map(|d| d.to_string().contains("\"ByteLevel\""))
        == Some(true);
    let vocabulary = if bpe && model.get("byte_fallback").and_then(Json::as_bool) == Some(true) {
        Vocabulary::SentencePiece
    } else if bpe && byte_level {
        let pre = v.get("pre_tokenizer").and_then(pre_tokenizer).ok_or_else(|| {
            Error::bad_file(
                &path,
                "its pre_tokenizer matches none that quantize knows for llama.cpp (gpt-2, falcon, llama-bpe)",
            )
        })?;
        Vocabulary::ByteLevel { pre }
    } else {
        return Err(Error::bad_file(
            &path,
            format!(
                "quantize embeds byte-level BPE (GPT-2 style) or SentencePiece BPE (byte_fallback) tokenizers; \
                 this one is a {:?} model{}",
                kind(&model),
                if bpe { " without either" } else { "" }
            ),
        ));
    };
    let n = cfg.vocab_size;
    let mut tokens: Vec<Option<String>> = vec![None; n];
    let mut types = vec![NORMAL; n];
    let vocab = model
        .get("vocab")
        .and_then(Json::as_object)
        .ok_or_else(|| Error::bad_file(&path, "no model.vocab"))?;
    let mut put = |id: usize, tok: &str| -> Result<()> {
        if id >= n {
            return Err(Error::bad_file(
                &path,
                format!("token {tok:?} has id {id}, outside the model's vocabulary of {n}"),
            ));
        }
        tokens[id] = Some(tok.to_string());
        Ok(())
    };
    for (tok, id) in vocab {
        put(id.as_u64().unwrap_or(u64::MAX) as usize, tok)?;
    }
    for a in v
        .get("added_tokens")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
    {
        let (Some(id), Some(content)) = (
            a.get("id").and_then(Json::as_u64),
            a.get("content").and_then(Json::as_str),
        ) else {
            continue;
        };
        put(id as usize, content)?;
        let special = a.get("special").and_then(Json::as_bool).unwrap_or(false);
        types[id as usize] = if special { CONTROL } else { USER_DEFINED };
    }
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            t.unwrap_or_else(|| {
                types[i] = UNUSED;
                format!("[PAD{i}]")
            })
        })
        .collect();
    let merges = merge_pairs(&model);
    let tok = crate::tokenizer::Tokenizer::from_dir(dir)?;
    let mut m: Vec<(String, Value)> = Vec::new();
    match vocabulary {
        Vocabulary::ByteLevel { pre } => {
            m.push(("tokenizer.ggml.model".into(), Value::Str("gpt2".into())));
            m.push(("tokenizer.ggml.pre".into(), Value::Str(pre.into())));
            m.push(("tokenizer.ggml.tokens".into(), Value::StrArray(tokens)));
            m.push(("tokenizer.ggml.token_type".into(), Value::I32Array(types)));
            let merges = merges
                .into_iter()
                .map(|(l, r)| format!("{l} {r}"))
                .collect();
            m.push(("tokenizer.ggml.merges".into(), Value::StrArray(merges)));
        }
        Vocabulary::SentencePiece => {
            let unk = model.get("unk_token").and_then(Json::as_str);
            let scores = sentencepiece_scores(&tokens, &mut types, &merges, unk);
            m.push(("tokenizer.ggml.model".into(), Value::Str("llama".into())));
            m.push(("tokenizer.ggml.tokens".into(), Value::StrArray(tokens)));
            m.push(("tokenizer.ggml.scores".into(), Value::F32Array(scores)));
            m.push(("tokenizer.ggml.token_type".into(), Value::I32Array(types)));
            m.push((
                "tokenizer.ggml.add_space_prefix".into(),
                Value::Bool(adds_space_prefix(&v)),
            ));
            if let Some(u) = unk.and_then(|u| tok.inner().token_to_id(u)) {
                m.push(("tokenizer.ggml.unknown_token_id".into(), Value::U32(u)));
            }
        }
    }
    if let Some(b) = tok.bos_id {
        m.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(b)));
    }
    if let Some(e) = tok.eos_ids.first() {
        m.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(*e)));
    }
    if let Some(p) = tok.pad_id {
        m.push(("tokenizer.ggml.padding_token_id".into(), Value::U32(p)));
    }
    m.push((
        "tokenizer.ggml.add_bos_token".into(),
        Value::Bool(tok.adds_bos),
    ));
    m.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(false)));
    let tok_cfg = dir.join("tokenizer_config.json");
    if let Ok(t) = std::fs::read_to_string(&tok_cfg) {
        if let Some(tpl) = serde_json::from_str::<Json>(&t)
            .ok()
            .and_then(|j| j.get("chat_template")?.as_str().map(String::from))
        {
            m.push(("tokenizer.chat_template".into(), Value::Str(tpl)));
        }
    }
    Ok(m)
}
