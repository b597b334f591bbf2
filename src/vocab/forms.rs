//! How a tokenizer spells text in its token strings, and the bytes a token stands for.
//!
//! The same piece of text is a different string in different vocabularies:
//!
//! ```text
//! text " casa"   byte-level (GPT-2, Falcon, LLaMA-3)   "Ġcasa"   each byte one printable char
//!                metaspace (LLaMA-2, Mistral)          "▁casa"   U+2581 for a space
//!                plain                                  " casa"
//! byte 0xE2      byte fallback                          "<0xE2>"  for text outside the vocabulary
//! ```
//!
//! Comparing two vocabularies (`adapt-vocab --tokenizer`) compares surfaces, the bytes
//! each token decodes to; cutting a token of one vocabulary into pieces of another
//! goes back from bytes to the other's spelling ([`TokenForms::spell`]).

use std::collections::HashMap;

use serde_json::Value;

/// The metaspace character SentencePiece writes for a space.
pub const METASPACE: char = '\u{2581}';

/// How text is spelled in a tokenizer's token strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextForm {
    /// GPT-2's byte-to-character map: each byte is one printable character.
    ByteLevel,
    /// Spaces written as `▁` (SentencePiece).
    Metaspace,
    /// Text as it is.
    Plain,
}

/// What a tokenizer's token strings mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenForms {
    pub text: TextForm,
    /// `<0xXX>` tokens stand for single bytes (BPE `byte_fallback`).
    pub byte_fallback: bool,
}

impl TokenForms {
    /// The forms of a parsed `tokenizer.json`: byte-level when its pre-tokenizer or
    /// decoder is `ByteLevel`, metaspace when its normalizer, pre-tokenizer or decoder
    /// mentions `▁`.
    pub fn of_tokenizer_json(v: &Value) -> TokenForms {
        let parts = [&v["pre_tokenizer"], &v["decoder"], &v["normalizer"]];
        let text = if parts.iter().any(|p| has_type(p, "ByteLevel")) {
            TextForm::ByteLevel
        } else if parts
            .iter()
            .any(|p| has_type(p, "Metaspace") || mentions(p, &METASPACE.to_string()))
        {
            TextForm::Metaspace
        } else {
            TextForm::Plain
        };
        TokenForms {
            text,
            byte_fallback: v["model"]["byte_fallback"].as_bool() == Some(true),
        }
    }

    /// The bytes a (non-special) token stands for; `None` for a byte-level string with
    /// a character outside the byte alphabet.
    pub fn surface(&self, token: &str) -> Option<Vec<u8>> {
        if self.byte_fallback {
            if let Some(b) = fallback_byte(token) {
                return Some(vec![b]);
            }
        }
        match self.text {
            TextForm::ByteLevel => {
                let map = char_to_byte();
                token.chars().map(|c| map.get(&c).copied()).collect()
            }
            TextForm::Metaspace => Some(token.replace(METASPACE, " ").into_bytes()),
            TextForm::Plain => Some(token.as_bytes().to_vec()),
        }
    }

    /// `bytes` in this tokenizer's spelling, as pieces its model can cut: one string for
    /// text, and one `<0xXX>` token per byte that is not valid UTF-8 (with byte
    /// fallback; `None` without it).
    pub fn spell(&self, bytes: &[u8]) -> Option<Vec<String>> {
        if self.text == TextForm::ByteLevel {
            let map = byte_to_char();
            return Some(vec![bytes.iter().map(|&b| map[b as usize]).collect()]);
        }
        let mut out = Vec::new();
        for chunk in bytes.utf8_chunks() {
            let valid = chunk.valid();
            if !valid.is_empty() {
                out.push(match self.text {
                    TextForm::Metaspace => valid.replace(' ', &METASPACE.to_string()),
                    _ => valid.to_string(),
                });
            }
            if !chunk.invalid().is_empty() {
                if !self.byte_fallback {
                    return None;
                }
                out.extend(chunk.invalid().iter().map(|b| format!("<0x{b:02X}>")));
            }
        }
        Some(out)
    }

    /// Whether `token` is a byte-fallback token (`<0xXX>`).
    pub fn is_fallback_byte(&self, token: &str) -> bool {
        self.byte_fallback && fallback_byte(token).is_some()
    }
}

/// The byte of a `<0xXX>` token.
fn fallback_byte(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// Whether some object under `v` has `"type": ty`.
fn has_type(v: &Value, ty: &str) -> bool {
    match v {
        Value::Object(o) => {
            o.get("type").and_then(Value::as_str) == Some(ty) || o.values().any(|x| has_type(x, ty))
        }
        Value::Array(a) => a.iter().any(|x| has_type(x, ty)),
        _ => false,
    }
}

/// Whether some string under `v` contains `s`.
fn mentions(v: &Value, s: &str) -> bool {
    match v {
        Value::String(x) => x.contains(s),
        Value::Object(o) => o.values().any(|x| mentions(x, s)),
        Value::Array(a) => a.iter().any(|x| mentions(x, s)),
        _ => false,
    }
}

/// GPT-2's map from bytes to printable characters: the printable Latin-1 bytes stand
/// for themselves, the 68 others for the characters from U+0100 on, in byte order.
pub fn byte_to_char() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        map[b as usize] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(next).expect("U+0100..U+0143 are characters");
            next += 1;
            c
        };
    }
    map
}

/// The inverse of [`byte_to_char`].
fn char_to_byte() -> HashMap<char, u8> {
    byte_to_char()
        .iter()
        .enumerate()
        .map(|(b, &c)| (c, b as u8))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn byte_level_map_is_gpt2s() {
        let m = byte_to_char();
        assert_eq!(m[b' ' as usize], 'Ġ');
        assert_eq!(m[b'\n' as usize], 'Ċ');
        assert_eq!(m[b'a' as usize], 'a');
        assert_eq!(m[0xE9], 'é');
        assert_eq!(char_to_byte().len(), 256);
    }

    #[test]
    fn surfaces_of_the_three_spellings_agree() {
        let bl = TokenForms {
            text: TextForm::ByteLevel,
            byte_fallback: false,
        };
        let ms = TokenForms {
            text: TextForm::Metaspace,
            byte_fallback: true,
        };
        assert_eq!(bl.surface("Ġcasa"), Some(b" casa".to_vec()));
        assert_eq!(ms.surface("▁casa"), Some(b" casa".to_vec()));
        assert_eq!(ms.surface("<0xE2>"), Some(vec![0xE2]));
        assert!(ms.is_fallback_byte("<0x0A>") && !bl.is_fallback_byte("<0x0A>"));
        // "é" is two bytes: two byte-level characters.
        assert_eq!(bl.surface("Ã©"), Some("é".as_bytes().to_vec()));
        assert_eq!(bl.spell("é".as_bytes()), Some(vec!["Ã©".to_string()]));
        // A lone continuation byte spells as a fallback token, or not at all.
        assert_eq!(
            ms.spell(&[b' ', b'a', 0xA9]),
            Some(vec!["▁a".to_string(), "<0xA9>".to_string()])
        );
        let plain = TokenForms {
            text: TextForm::Plain,
            byte_fallback: false,
        };
        assert_eq!(plain.spell(&[0xA9]), None);
    }

    #[test]
    fn forms_are_read_from_tokenizer_json() {
        let gpt2 = json!({"pre_tokenizer": {"type": "ByteLevel"}, "model": {"type": "BPE"}});
        let llama3 = json!({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split"}, {"type": "ByteLevel"}]}, "model": {}});
        let llama2 = json!({"normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"}]}, "model": {"byte_fallback": true}});
        assert_eq!(
            TokenForms::of_tokenizer_json(&gpt2).text,
            TextForm::ByteLevel
        );
        assert_eq!(
            TokenForms::of_tokenizer_json(&llama3).text,
            TextForm::ByteLevel
        );
        let f = TokenForms::of_tokenizer_json(&llama2);
        assert_eq!((f.text, f.byte_fallback), (TextForm::Metaspace, true));
    }
}
