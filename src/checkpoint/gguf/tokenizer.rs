//! The `tokenizer.ggml.*` metadata of a GGUF file from a byte-level BPE
//! `tokenizer.json` (llama.cpp's `"gpt2"` tokenizer model): tokens in id order (ids
//! the tokenizer lacks up to the model's vocabulary become `[PADi]`, type unused),
//! token types (1 normal, 3 control for special added tokens, 4 user-defined for
//! other added tokens, 5 unused), merges as `"left right"`, special ids, and the
//! pre-tokenizer llama.cpp must apply (`gpt-2`, `falcon` or `llama-bpe`).

use std::path::Path;

use serde_json::Value as Json;

use super::Value;
use crate::config::Config;
use crate::error::{Error, IoContext, Result};

/// llama.cpp's pre-tokenizer name for a `tokenizer.json` pre-tokenizer.
fn pre_tokenizer(pre: &Json) -> Option<&'static str> {
    let kind = |v: &Json| {
        v.get("type")
            .and_then(Json::as_str)
            .unwrap_or("")
            .to_string()
    };
    match kind(pre).as_str() {
        "ByteLevel" if pre.get("use_regex").and_then(Json::as_bool) != Some(false) => Some("gpt-2"),
        "Sequence" => {
            let parts: Vec<&Json> = pre
                .get("pretokenizers")
                .and_then(Json::as_array)
                .map(|a| a.iter().collect())
                .unwrap_or_default();
            let kinds: Vec<String> = parts.iter().map(|p| kind(p)).collect();
            let has = |k: &str| kinds.iter().any(|x| x == k);
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

/// The `tokenizer.ggml.*` keys of a byte-level BPE `tokenizer.json`.
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
    let byte_level = v
        .get("decoder")
        .map(|d| d.to_string().contains("\"ByteLevel\""))
        == Some(true);
    if model.get("type").and_then(Json::as_str) != Some("BPE") || !byte_level {
        return Err(Error::bad_file(
            &path,
            "quantize embeds byte-level BPE tokenizers (GPT-2 style, llama.cpp's \"gpt2\" model); \
             this one is not (SentencePiece-style tokenizers need llama.cpp's convert_hf_to_gguf.py)",
        ));
    }
    let pre = v.get("pre_tokenizer").and_then(pre_tokenizer).ok_or_else(|| {
        Error::bad_file(
            &path,
            "its pre_tokenizer matches none that quantize knows for llama.cpp (gpt-2, falcon, llama-bpe)",
        )
    })?;
    let n = cfg.vocab_size;
    let mut tokens: Vec<Option<String>> = vec![None; n];
    let mut types = vec![1i32; n];
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
        types[id as usize] = if special { 3 } else { 4 };
    }
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            t.unwrap_or_else(|| {
                types[i] = 5;
                format!("[PAD{i}]")
            })
        })
        .collect();
    let merges: Vec<String> = model
        .get("merges")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            Json::String(s) => Some(s.clone()),
            Json::Array(p) if p.len() == 2 => {
                Some(format!("{} {}", p[0].as_str()?, p[1].as_str()?))
            }
            _ => None,
        })
        .collect();
    let tok = crate::tokenizer::Tokenizer::from_dir(dir)?;
    let mut m = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::Str("gpt2".into()),
        ),
        ("tokenizer.ggml.pre".into(), Value::Str(pre.into())),
        ("tokenizer.ggml.tokens".into(), Value::StrArray(tokens)),
        ("tokenizer.ggml.token_type".into(), Value::I32Array(types)),
        ("tokenizer.ggml.merges".into(), Value::StrArray(merges)),
    ];
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
