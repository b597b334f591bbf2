//! Training a byte-level BPE tokenizer on raw documents (GPT-2's scheme, as GlórIA did).
//!
//! Text is split by the GPT-2 regex into words, each mapped byte by byte onto 256
//! printable characters (`ByteLevel`), so every string encodes without an unknown
//! token and `decode(encode(x)) == x`. The BPE trainer of the `tokenizers` crate then
//! merges the most frequent adjacent pairs until the vocabulary holds `vocab_size`
//! entries:
//!
//! ```text
//! ids: [special tokens in order: pad, bos, eos, unk, extras] [256 bytes] [merges...]
//! ```
//!
//! Output, loadable by transformers' `AutoTokenizer.from_pretrained(dir)` and by
//! [`crate::tokenizer::Tokenizer::from_dir`]:
//! - `tokenizer.json`: the fast tokenizer (no BOS/EOS added by the tokenizer itself;
//!   prepare-data puts EOS after each document);
//! - `tokenizer_config.json`: the special tokens' roles, `model_max_length`,
//!   `tokenizer_class: PreTrainedTokenizerFast`.
//!
//! Training streams the documents (files are read once, in order) and keeps only the
//! word counts in memory. The result does not depend on the thread count. A document
//! longer than [`TrainTokenizerOptions::piece_bytes`] is fed in pieces cut before a
//! space or newline (see [`super::pieces`]): the words, and so the counts, are those of
//! the whole document, but the trainer holds one piece at a time (one 50 MB line took
//! 4.2 GB whole). A stretch without any such cut is cut anywhere, which splits one word
//! there.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use serde_json::{Value, json};
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    TokenizerBuilder, TokenizerImpl,
};

use super::dedup::{InputFile, list_inputs};
use super::documents::{ReadOptions, Records};
use super::pieces::{PIECE_BYTES, Pieces};
use crate::error::{Error, IoContext, Result};

/// What to train on and what to produce.
#[derive(Debug, Clone)]
pub struct TrainTokenizerOptions {
    /// Files or folders (read recursively) of `.txt`/`.jsonl`, optionally `.gz`.
    pub inputs: Vec<PathBuf>,
    /// Folder that receives `tokenizer.json` and `tokenizer_config.json`.
    pub output: PathBuf,
    /// Vocabulary size, special tokens and the 256 bytes included.
    pub vocab_size: usize,
    /// A pair must occur this often to be merged.
    pub min_frequency: u64,
    /// Role tokens; `None` for a role the tokenizer does not have.
    pub pad_token: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub unk_token: Option<String>,
    /// More special tokens (never split, dropped by `decode`), after the role tokens.
    pub special_tokens: Vec<String>,
    /// Context length recorded in `tokenizer_config.json`.
    pub model_max_length: usize,
    /// How `.txt` and `.jsonl` files hold documents.
    pub read: ReadOptions,
    /// Replace an existing `tokenizer.json` in `output`.
    pub overwrite: bool,
    pub progress: bool,
    /// Longest text handed to the trainer at once (longer documents go in pieces).
    pub piece_bytes: usize,
}

impl TrainTokenizerOptions {
    /// Defaults: `<pad>` 0, `<s>` 1, `</s>` 2, `<unk>` 3, min frequency 2, 2048 tokens.
    pub fn new(inputs: Vec<PathBuf>, output: impl Into<PathBuf>, vocab_size: usize) -> Self {
        TrainTokenizerOptions {
            inputs,
            output: output.into(),
            vocab_size,
            min_frequency: 2,
            pad_token: Some("<pad>".into()),
            bos_token: Some("<s>".into()),
            eos_token: Some("</s>".into()),
            unk_token: Some("<unk>".into()),
            special_tokens: Vec::new(),
            model_max_length: 2048,
            read: ReadOptions::default(),
            overwrite: false,
            progress: false,
            piece_bytes: PIECE_BYTES,
        }
    }

    /// All special tokens in id order: the role tokens, then the extras, each once.
    pub fn all_special_tokens(&self) -> Vec<String> {
        let mut all: Vec<String> = Vec::new();
        let roles = [
            &self.pad_token,
            &self.bos_token,
            &self.eos_token,
            &self.unk_token,
        ];
        for t in roles.into_iter().flatten().chain(&self.special_tokens) {
            if !all.contains(t) {
                all.push(t.clone());
            }
        }
        all
    }

    /// Every problem with the options, in one message.
    pub fn check(&self) -> Result<()> {
        let mut bad = Vec::new();
        if self.inputs.is_empty() {
            bad.push("give at least one --input file or folder".to_string());
        }
        let specials = self.all_special_tokens();
        let least = 256 + specials.len();
        if self.vocab_size < least || self.vocab_size > u32::MAX as usize {
            bad.push(format!(
                "--vocab-size must be at least {least} (256 bytes + {} special tokens), got {}",
                specials.len(),
                self.vocab_size
            ));
        }
        if specials.iter().any(|t| t.is_empty()) {
            bad.push("special tokens must not be empty strings".into());
        }
        if self.model_max_length == 0 {
            bad.push("--model-max-length must be positive".into());
        }
        if let Some(p) = self.read.problem() {
            bad.push(p.into());
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(Error::Usage(format!("train-tokenizer: {}", bad.join("; "))))
        }
    }
}

/// A special token and its id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SpecialToken {
    pub token: String,
    pub id: u32,
}

/// What was trained.
#[derive(Debug, Clone, Serialize)]
pub struct TrainedTokenizer {
    pub output: PathBuf,
    /// Entries in the vocabulary (may be below the request on a small corpus).
    pub vocab_size: usize,
    pub merges: usize,
    pub special_tokens: Vec<SpecialToken>,
    pub pad: Option<SpecialToken>,
    pub bos: Option<SpecialToken>,
    pub eos: Option<SpecialToken>,
    pub unk: Option<SpecialToken>,
    pub files: usize,
    pub documents: u64,
    pub text_bytes: u64,
    pub skipped_lines: u64,
}

type Bpe = TokenizerImpl<
    BPE,
    NormalizerWrapper,
    PreTokenizerWrapper,
    PostProcessorWrapper,
    DecoderWrapper,
>;

/// Train a byte-level BPE on `opts.inputs` and write it to `opts.output`.
pub fn train_tokenizer(opts: &TrainTokenizerOptions) -> Result<TrainedTokenizer> {
    opts.check()?;
    let mut files = Vec::new();
    for input in &opts.inputs {
        let (mut found, _ignored) = list_inputs(input)?;
        if found.is_empty() {
            return Err(Error::Data(format!(
                "{}: no .txt or .jsonl files (optionally .gz) to train on",
                input.display()
            )));
        }
        files.append(&mut found);
    }
    let tok_path = opts.output.join("tokenizer.json");
    if tok_path.exists() && !opts.overwrite {
        return Err(Error::Usage(format!(
            "train-tokenizer: {} already exists; pass --overwrite to replace it or choose another --output",
            tok_path.display()
        )));
    }

    let specials = opts.all_special_tokens();
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(opts.vocab_size)
        .min_frequency(opts.min_frequency)
        .show_progress(opts.progress)
        .special_tokens(
            specials
                .iter()
                .map(|t| AddedToken::from(t.clone(), true))
                .collect(),
        )
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut bpe: Bpe = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None)
        // GPT-2's layout: no prefix space, offsets trimmed when pre-tokenizing, kept
        // as they are after; the decoder maps the byte characters back.
        .with_pre_tokenizer(Some(ByteLevel::new(false, true, true).into()))
        .with_post_processor(Some(ByteLevel::new(true, false, true).into()))
        .with_decoder(Some(ByteLevel::default().into()))
        .build()?;

    let stats = Stats::default();
    let texts = Texts {
        files: files.iter(),
        current: None,
        long: None,
        pieces: Pieces::byte_level(opts.piece_bytes),
        opts,
        stats: &stats,
        done: false,
    };
    bpe.train(&mut trainer, texts)?;
    if let Some(e) = stats.error.lock().expect("no panics while training").take() {
        return Err(e);
    }
    let documents = stats.documents.load(Ordering::Relaxed);
    if documents == 0 {
        let skipped = stats.skipped.load(Ordering::Relaxed);
        let inputs: Vec<String> = opts
            .inputs
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        return Err(Error::Data(format!(
            "train-tokenizer: no documents in the {} file(s) under {}{}; check --doc-separator / --json-key",
            files.len(),
            inputs.join(", "),
            if skipped > 0 {
                format!(" ({skipped} lines skipped by --skip-bad-lines)")
            } else {
                String::new()
            }
        )));
    }

    let tokenizer: tokenizers::Tokenizer = bpe.into();
    let json_text = tokenizer.to_string(true)?;
    let id_of = |t: &Option<String>| -> Option<SpecialToken> {
        let t = t.as_ref()?;
        tokenizer.token_to_id(t).map(|id| SpecialToken {
            token: t.clone(),
            id,
        })
    };
    let special_tokens: Vec<SpecialToken> = specials
        .iter()
        .filter_map(|t| id_of(&Some(t.clone())))
        .collect();
    let config = tokenizer_config(opts, &special_tokens);
    write_outputs(&opts.output, &json_text, &config)?;

    let merges = serde_json::from_str::<Value>(&json_text)
        .ok()
        .and_then(|v| v["model"]["merges"].as_array().map(|m| m.len()))
        .unwrap_or(0);
    Ok(TrainedTokenizer {
        output: opts.output.clone(),
        vocab_size: tokenizer.get_vocab_size(true),
        merges,
        pad: id_of(&opts.pad_token),
        bos: id_of(&opts.bos_token),
        eos: id_of(&opts.eos_token),
        unk: id_of(&opts.unk_token),
        special_tokens,
        files: files.len(),
        documents,
        text_bytes: stats.bytes.load(Ordering::Relaxed),
        skipped_lines: stats.skipped.load(Ordering::Relaxed),
    })
}

/// `tokenizer_config.json` as transformers reads it.
fn tokenizer_config(opts: &TrainTokenizerOptions, specials: &[SpecialToken]) -> Value {
    let mut added = serde_json::Map::new();
    for s in specials {
        added.insert(
            s.id.to_string(),
            json!({
                "content": s.token, "lstrip": false, "normalized": false,
                "rstrip": false, "single_word": false, "special": true,
            }),
        );
    }
    let role = |t: &Option<String>| t.as_ref().map_or(Value::Null, |t| json!(t));
    let mut config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": role(&opts.bos_token),
        "eos_token": role(&opts.eos_token),
        "unk_token": role(&opts.unk_token),
        "pad_token": role(&opts.pad_token),
        "model_max_length": opts.model_max_length,
        // Keep decode exact: no space removal before punctuation.
        "clean_up_tokenization_spaces": false,
        "added_tokens_decoder": added,
    });
    if !opts.special_tokens.is_empty() {
        // The key transformers 4 writes; transformers 5 reads it too.
        config["additional_special_tokens"] = json!(opts.special_tokens);
    }
    config
}

/// Write both files: into a fresh folder renamed into place when `dir` does not exist,
/// else each one atomically (tokenizer.json first).
fn write_outputs(dir: &Path, tokenizer_json: &str, config: &Value) -> Result<()> {
    let mut config_text = serde_json::to_string_pretty(config).expect("JSON values serialise");
    config_text.push('\n');
    if dir.exists() {
        crate::io::write_atomic(&dir.join("tokenizer.json"), tokenizer_json.as_bytes())?;
        return crate::io::write_atomic(&dir.join("tokenizer_config.json"), config_text.as_bytes());
    }
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(parent).at(parent)?;
    let tmp = tempfile::Builder::new()
        .prefix(".tmp-tokenizer-")
        .tempdir_in(parent)
        .at(parent)?;
    let p = tmp.path().join("tokenizer.json");
    std::fs::write(&p, tokenizer_json).at(&p)?;
    let p = tmp.path().join("tokenizer_config.json");
    std::fs::write(&p, config_text).at(&p)?;
    std::fs::rename(tmp.path(), dir).at(dir)?;
    let _ = tmp.keep();
    Ok(())
}

#[derive(Default)]
struct Stats {
    documents: AtomicU64,
    bytes: AtomicU64,
    skipped: AtomicU64,
    /// The first read error; the text stream ends when it is set.
    error: Mutex<Option<Error>>,
}

/// The documents' texts, file after file, for the trainer.
struct Texts<'a> {
    files: std::slice::Iter<'a, InputFile>,
    current: Option<Records>,
    /// A long document being handed over in pieces: its text and the pieces left.
    long: Option<(String, std::vec::IntoIter<std::ops::Range<usize>>)>,
    pieces: Pieces,
    opts: &'a TrainTokenizerOptions,
    stats: &'a Stats,
    done: bool,
}

impl Texts<'_> {
    fn fail(&mut self, e: Error) -> Option<String> {
        *self.stats.error.lock().expect("no panics while training") = Some(e);
        self.done = true;
        None
    }
}

impl Iterator for Texts<'_> {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        while !self.done {
            if let Some((text, ranges)) = &mut self.long {
                match ranges.next() {
                    Some(r) => return Some(text[r].to_string()),
                    None => self.long = None,
                }
            }
            if let Some(recs) = &mut self.current {
                match recs.next() {
                    Some(Ok(r)) => {
                        self.stats.documents.fetch_add(1, Ordering::Relaxed);
                        self.stats
                            .bytes
                            .fetch_add(r.text.len() as u64, Ordering::Relaxed);
                        if !self.pieces.cuts(&r.text) {
                            return Some(r.text);
                        }
                        let ranges = self.pieces.ranges(&r.text).into_iter();
                        self.long = Some((r.text, ranges));
                        continue;
                    }
                    Some(Err(e)) => return self.fail(e),
                    None => {
                        self.stats
                            .skipped
                            .fetch_add(recs.skipped as u64, Ordering::Relaxed);
                        self.current = None;
                    }
                }
            }
            let Some(f) = self.files.next() else {
                self.done = true;
                break;
            };
            match self.opts.read.records(&f.path) {
                Ok(r) => self.current = Some(r),
                Err(e) => return self.fail(e),
            }
        }
        None
    }
}
