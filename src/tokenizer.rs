//! A model's tokenizer (`tokenizer.json`) with its special token ids.
//!
//! Special ids come from `generation_config.json`, then `config.json`, then the token
//! strings of `tokenizer_config.json`, the order in which transformers lets them win.

use std::path::{Path, PathBuf};

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::io::read_regular;

/// Largest `tokenizer.json` read (the largest published ones are about 35 MB).
const MAX_TOKENIZER_BYTES: u64 = 1 << 30;
/// Largest `config.json`, `generation_config.json` or `tokenizer_config.json` read.
const MAX_CONFIG_BYTES: u64 = 64 << 20;

/// `tokenizer.json` (`bytes`, read from `path`) as a tokenizer, or a one-line error
/// naming the file. The text is checked to be JSON first: the tokenizers crate panics
/// on some damaged files (one cut off inside its "decoder" section fails an `expect`),
/// and a panic it still raises on valid JSON is caught and reported the same way.
pub(crate) fn parse_tokenizer(path: &Path, bytes: &[u8]) -> Result<tokenizers::Tokenizer> {
    if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
        let why = if e.is_eof() { "cut off" } else { "damaged" };
        return Err(Error::bad_file(
            path,
            format!(
                "not a tokenizer, the file is {why} (JSON error: {e}); copy or download tokenizer.json again"
            ),
        ));
    }
    match quiet_catch_unwind(|| tokenizers::Tokenizer::from_bytes(bytes)) {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(Error::bad_file(
            path,
            format!("not a tokenizer: {}", one_line(&e.to_string())),
        )),
        Err(panic) => Err(Error::bad_file(
            path,
            format!(
                "not a tokenizer the tokenizers library can load (it failed with: {}); copy or download tokenizer.json again",
                one_line(&panic_text(&*panic))
            ),
        )),
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic".into()
    }
}

thread_local! {
    /// Set while this thread runs [`quiet_catch_unwind`]: its panics are not printed.
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run `f`, turning a panic into `Err` without the panic message and backtrace the
/// default hook prints (other threads' panics are printed as before).
fn quiet_catch_unwind<T>(f: impl FnOnce() -> T) -> std::thread::Result<T> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(|q| q.get()) {
                previous(info);
            }
        }));
    });
    let was = QUIET.with(|q| q.replace(true));
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET.with(|q| q.set(was));
    out
}

/// A Hugging Face tokenizer plus what the model folder says about its special tokens.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Beginning-of-sequence id, if the model has one.
    pub bos_id: Option<u32>,
    /// End-of-sequence ids (generation stops at any of them); the first is the one
    /// appended after documents.
    pub eos_ids: Vec<u32>,
    /// Padding id, if the model has one.
    pub pad_id: Option<u32>,
    /// Whether the tokenizer itself puts BOS in front of an encoded text.
    pub adds_bos: bool,
    /// The BOS and EOS that `tokenizer_config.json` names by string: what transformers'
    /// tokenizer calls `bos_token_id` and `eos_token_id`, which may differ from the
    /// model config's (lm-evaluation-harness conditions on these).
    pub named_bos: Option<u32>,
    pub named_eos: Option<u32>,
    /// SHA-256 of `tokenizer.json`, to tell data prepared with another tokenizer.
    pub hash: String,
    path: PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .field("bos_id", &self.bos_id)
            .field("eos_ids", &self.eos_ids)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

impl Tokenizer {
    /// Load `dir/tokenizer.json` and the special ids of the model folder `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(Error::missing(
                &path,
                "the model folder needs the Hugging Face fast tokenizer file tokenizer.json",
            ));
        }
        let bytes = read_regular(&path, MAX_TOKENIZER_BYTES, "a tokenizer")?;
        let mut inner = parse_tokenizer(&path, &bytes)?;
        // Truncation or padding saved in tokenizer.json would silently cut or pad every
        // text; we chunk and pad ourselves.
        inner
            .with_truncation(None)
            .map_err(|e| Error::bad_file(&path, format!("cannot disable truncation: {e}")))?;
        inner.with_padding(None);
        let hash = hex(&Sha256::digest(&bytes));

        let read_json = |name: &str| -> Result<Option<Value>> {
            let p = dir.join(name);
            if !p.exists() {
                return Ok(None);
            }
            let bytes = read_regular(&p, MAX_CONFIG_BYTES, "a model configuration")?;
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::bad_file(&p, format!("not JSON: {e}")))
        };
        let gen_cfg = read_json("generation_config.json")?;
        let cfg = read_json("config.json")?;
        let tok_cfg = read_json("tokenizer_config.json")?;

        // tokenizer_config.json names tokens by string (or {"content": ...}).
        let named = |key: &str| -> Option<u32> {
            let name = match tok_cfg.as_ref().and_then(|t| t.get(key)) {
                Some(Value::String(s)) => Some(s.as_str()),
                Some(Value::Object(o)) => o.get("content").and_then(Value::as_str),
                _ => None,
            };
            name.and_then(|s| inner.token_to_id(s))
        };
        let ids_of = |key: &str| -> Result<Vec<u32>> {
            let sources = [("generation_config.json", &gen_cfg), ("config.json", &cfg)];
            for (file, v) in sources {
                let Some(v) = v else { continue };
                // An id past u32 was cut to its low bits: another token, in silence.
                let id = |n: u64| {
                    u32::try_from(n).map_err(|_| {
                        Error::bad_file(
                            dir.join(file),
                            format!("{key} {n} is not a token id (at most {})", u32::MAX),
                        )
                    })
                };
                match v.get(key) {
                    Some(Value::Number(n)) => {
                        return n
                            .as_u64()
                            .map(|n| id(n).map(|i| vec![i]))
                            .unwrap_or(Ok(vec![]));
                    }
                    Some(Value::Array(a)) if !a.is_empty() => {
                        return a.iter().filter_map(Value::as_u64).map(id).collect();
                    }
                    _ => {}
                }
            }
            Ok(named(key.trim_end_matches("_id")).into_iter().collect())
        };
        let bos_id = ids_of("bos_token_id")?.first().copied();
        let eos_ids = ids_of("eos_token_id")?;
        let pad_id = ids_of("pad_token_id")?.first().copied();

        let (named_bos, named_eos) = (named("bos_token"), named("eos_token"));
        let probe = inner.encode("a", true)?;
        let adds_bos = match (bos_id, probe.get_ids().first()) {
            (Some(b), Some(&first)) => b == first,
            _ => false,
        };
        Ok(Tokenizer {
            inner,
            bos_id,
            eos_ids,
            pad_id,
            adds_bos,
            named_bos,
            named_eos,
            hash,
            path,
        })
    }

    /// Encode as the tokenizer does by itself (its own special tokens included).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.inner.encode(text, true)?.get_ids().to_vec())
    }

    /// Encode without any special token.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.inner.encode(text, false)?.get_ids().to_vec())
    }

    /// A document for training: `[BOS] tokens EOS`, BOS only where the model uses one.
    pub fn encode_document(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if self.adds_bos {
            ids.extend(self.bos_id);
        }
        ids.extend(self.encode_plain(text)?);
        ids.extend(self.eos_ids.first());
        Ok(ids)
    }

    /// Decode ids to text, dropping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        Ok(self.inner.decode(ids, true)?)
    }

    /// The text `ids` add after `context` (a prompt): decoded together with the end of
    /// the context, since some tokenizers decode a token differently at the start of a
    /// text (SentencePiece drops the space the text starts with: `▁bem` alone is "bem",
    /// after "tudo" it is " bem").
    pub fn decode_after(&self, context: &[u32], ids: &[u32]) -> Result<String> {
        let ctx = decode_context(context);
        let before = self.decode(ctx)?;
        let all = self.decode(&[ctx, ids].concat())?;
        Ok(match all.strip_prefix(before.as_str()) {
            Some(new) => new.to_string(),
            None => self.decode(ids)?,
        })
    }

    /// Number of ids the tokenizer can produce (added tokens included).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Where `tokenizer.json` was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The UTF-8 bytes of text each id stands for ([`TokenBytes`]).
    pub fn token_bytes(&self) -> TokenBytes {
        TokenBytes::of_tokenizer(&self.inner)
    }
}

/// The UTF-8 bytes of text each token id stands for, read from the vocabulary: what
/// turns a summed loss into bits per byte ([`bits_per_byte`]) for text that is only
/// known as token ids (prepared data).
///
/// ```text
/// byte-level BPE (GPT-2, Falcon, LLaMA-3)   one byte per character of the token string
/// SentencePiece with byte fallback          <0xNN> one byte; ▁ a space, the rest as UTF-8
/// special tokens (BOS, EOS, <pad>, ...)     0: they are not text
/// other added tokens                        their content, as UTF-8
/// ```
///
/// The bytes of a text's ids add up to the text's own bytes under byte-level BPE. A
/// SentencePiece tokenizer that puts a space before the text (`▁` on its first word)
/// counts that space too: one byte more per document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBytes(Vec<u32>);

impl TokenBytes {
    /// From a table: `bytes[id]` (ids past its end count 0).
    pub fn new(bytes: Vec<u32>) -> Self {
        TokenBytes(bytes)
    }

    /// The table of `tok` (see the type's documentation).
    pub fn of_tokenizer(tok: &tokenizers::Tokenizer) -> Self {
        let decoder = tok
            .get_decoder()
            .and_then(|d| serde_json::to_value(d).ok())
            .unwrap_or(Value::Null);
        let kinds = decoder_kinds(&decoder);
        let byte_level = kinds.iter().any(|k| k == "ByteLevel");
        let byte_fallback = kinds.iter().any(|k| k == "ByteFallback");
        let vocab = tok.get_vocab(true);
        let n = vocab.values().max().map_or(0, |&m| m as usize + 1);
        let mut bytes = vec![0u32; n];
        let added = tok.get_added_tokens_decoder();
        for (token, id) in vocab {
            let b = match added.get(&id) {
                Some(a) if a.special => 0,
                Some(a) => a.content.len(),
                None if byte_level => token.chars().count(),
                None if byte_fallback && is_byte_token(&token) => 1,
                None => token.replace('\u{2581}', " ").len(),
            };
            bytes[id as usize] = b as u32;
        }
        TokenBytes(bytes)
    }

    /// The bytes of `id`.
    pub fn of(&self, id: u32) -> u32 {
        self.0.get(id as usize).copied().unwrap_or(0)
    }

    /// The bytes of all of `ids`.
    pub fn sum(&self, ids: impl IntoIterator<Item = u32>) -> u64 {
        ids.into_iter().map(|i| u64::from(self.of(i))).sum()
    }
}

/// `<0xNN>`: a byte-fallback token.
fn is_byte_token(t: &str) -> bool {
    t.len() == 6
        && t.starts_with("<0x")
        && t.ends_with('>')
        && t[3..5].chars().all(|c| c.is_ascii_hexdigit())
}

/// Every `type` in a serialized decoder (a `Sequence` holds others).
fn decoder_kinds(v: &Value) -> Vec<String> {
    let mut out = Vec::new();
    match v {
        Value::Object(o) => {
            if let Some(Value::String(t)) = o.get("type") {
                out.push(t.clone());
            }
            for x in o.values() {
                out.extend(decoder_kinds(x));
            }
        }
        Value::Array(a) => a.iter().for_each(|x| out.extend(decoder_kinds(x))),
        _ => {}
    }
    out
}

/// Bits per byte of a text: its summed loss in nats, over ln 2, over its UTF-8
/// bytes. None for no bytes.
pub fn bits_per_byte(nats: f64, bytes: u64) -> Option<f64> {
    (bytes > 0).then(|| nats / std::f64::consts::LN_2 / bytes as f64)
}

/// The end of `context` that generated tokens are decoded with (its last 16 tokens): see
/// [`Tokenizer::decode_after`].
pub fn decode_context(context: &[u32]) -> &[u32] {
    &context[context.len().saturating_sub(16)..]
}

/// Lower-case hexadecimal of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
