//! `adapt-vocab`: a base model folder with a new vocabulary, written as a complete
//! Hugging Face folder.
//!
//! ```text
//! BASE/ ─┬─ --extend-from raw/ --new-tokens N   tokenizer.json + N merges and tokens (extend)
//!        └─ --tokenizer NEWTOK/                 NEWTOK's tokenizer files (replace)
//!            │
//!            ▼
//! OUT/config.json             vocab_size = tokenizer size padded to a multiple of 64
//!                             (replace: bos/eos/pad ids from NEWTOK)
//! OUT/model.safetensors ...   the base's tensors, embeddings and untied head resized
//!                             (resize.rs), each in its stored dtype, sharded as HF does
//! OUT/tokenizer.json ...      tokenizer files; extend leaves out tokenizer.model,
//!                             vocab.json and merges.txt, which hold the old vocabulary
//! OUT/generation_config.json  the base's (replace: ids from NEWTOK)
//! OUT/vocab_adaptation.json   the record: modes, sizes, new ids, tokens per byte
//! ```
//!
//! Everything is computed and checked before the first file is written; the folder is
//! assembled under a temporary name beside OUT and renamed at the end.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use serde_json::Value;

use super::corpus::{CorpusSize, count_units, measure};
use super::extend::{Extension, extended_json, learn};
use super::replace::match_rows;
use super::resize::{RowPlan, RowSource, padded};
use super::tokfile::TokenizerFile;
use super::{Init, Mode, RECORD_FILE, TokensPerByte, VocabRecord, set_token_ids};
use crate::config::{Config, load_config};
use crate::data::documents::ReadOptions;
use crate::error::{Error, IoContext, Result};
use crate::hf::export::{DEFAULT_MAX_SHARD_SIZE, TOKENIZER_FILES, publish_dir};
use crate::hf::merge::stored_tensors;
use crate::hf::shards::{LazyTensor, write_weights};
use crate::model::names::WeightNames;
use crate::model::weights::Weights;

/// Where the new vocabulary comes from.
#[derive(Debug, Clone)]
pub enum VocabSource {
    /// Continue the base tokenizer's merges on `corpus` (a file or folder of documents).
    Extend {
        corpus: PathBuf,
        new_tokens: usize,
        /// A pair seen fewer times is never merged.
        min_frequency: u64,
    },
    /// The tokenizer of the folder `tokenizer`.
    Replace { tokenizer: PathBuf },
}

/// Options of `adapt-vocab`.
#[derive(Debug, Clone)]
pub struct AdaptOptions {
    pub base: PathBuf,
    pub output: PathBuf,
    pub source: VocabSource,
    pub init: Init,
    pub pad_to_multiple_of: usize,
    /// Corpus to report tokens per byte on (default: the `Extend` corpus).
    pub measure_on: Option<PathBuf>,
    pub read: ReadOptions,
    pub overwrite: bool,
}

impl AdaptOptions {
    pub fn new(base: impl Into<PathBuf>, output: impl Into<PathBuf>, source: VocabSource) -> Self {
        AdaptOptions {
            base: base.into(),
            output: output.into(),
            source,
            init: Init::Pieces,
            pad_to_multiple_of: super::DEFAULT_PAD_MULTIPLE,
            measure_on: None,
            read: ReadOptions::default(),
            overwrite: false,
        }
    }

    /// Every problem with the flags, in one message.
    fn check(&self) -> Result<()> {
        let mut bad = Vec::new();
        if let VocabSource::Extend { new_tokens: 0, .. } = self.source {
            bad.push("--new-tokens must be at least 1".to_string());
        }
        if self.pad_to_multiple_of == 0 {
            bad.push("--pad-to-multiple-of must be at least 1 (1: no padding)".into());
        }
        if let Some(p) = self.read.problem() {
            bad.push(p.into());
        }
        if self.output.exists() && !self.overwrite {
            bad.push(format!(
                "{} already exists; choose another --output-dir or pass --overwrite",
                self.output.display()
            ));
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(Error::Usage(format!("adapt-vocab: {}", bad.join("; "))))
        }
    }
}

/// The new tokenizer and where each of its rows comes from.
struct NewVocab {
    tok: TokenizerFile,
    /// `tokenizer.json` to write.
    json_text: String,
    rows: Vec<RowSource>,
    /// Extend: old padding rows keep their values.
    keep_old: bool,
    new_merges: usize,
    copied: usize,
    base_size: Option<CorpusSize>,
}

/// Make the adapted folder; returns its record.
pub fn adapt_vocab(opts: &AdaptOptions) -> Result<VocabRecord> {
    opts.check()?;
    let base_dir = &opts.base;
    let cfg = load_config(base_dir)?;
    let base_tok = TokenizerFile::open(base_dir, "--checkpoint-dir")?;
    if cfg.vocab_size < base_tok.size() {
        return Err(Error::bad_file(
            base_dir.join("config.json"),
            format!(
                "vocab_size {} is below the {} ids of the folder's tokenizer.json; the weights cannot hold its tokens (fix vocab_size or the tokenizer)",
                cfg.vocab_size,
                base_tok.size()
            ),
        ));
    }
    let weights = Arc::new(Weights::open(base_dir)?);
    let stored = stored_tensors(weights.files())?;
    let matrices = vocab_matrices(&cfg, &stored, base_dir)?;
    if let Some(inside) = [base_dir.as_path()]
        .into_iter()
        .chain(match &opts.source {
            VocabSource::Replace { tokenizer } => Some(tokenizer.as_path()),
            VocabSource::Extend { .. } => None,
        })
        .find(|d| contains(&opts.output, d))
    {
        return Err(Error::Usage(format!(
            "adapt-vocab: --output-dir {} holds the input {}; write to another folder",
            opts.output.display(),
            inside.display()
        )));
    }

    let new = match &opts.source {
        VocabSource::Extend {
            corpus,
            new_tokens,
            min_frequency,
        } => extend_vocab(&base_tok, corpus, *new_tokens, *min_frequency, opts)?,
        VocabSource::Replace { tokenizer } => replace_vocab(&base_tok, tokenizer, opts.init)?,
    };
    let tokenizer_size = new.tok.size();
    let mut vocab = padded(tokenizer_size, opts.pad_to_multiple_of);
    if new.keep_old {
        vocab = vocab.max(cfg.vocab_size);
    }
    let plan = RowPlan::new(new.rows.clone(), vocab, cfg.vocab_size, new.keep_old);

    let corpus = opts.measure_on.clone().or(match &opts.source {
        VocabSource::Extend { corpus, .. } => Some(corpus.clone()),
        VocabSource::Replace { .. } => None,
    });
    let tokens_per_byte = match corpus {
        None => None,
        Some(c) => {
            let before = match (&new.base_size, &opts.measure_on) {
                (Some(s), None) => *s,
                _ => measure(&base_tok, &c, &opts.read)?,
            };
            let after = measure(&new.tok, &c, &opts.read)?;
            Some(TokensPerByte {
                corpus: c.display().to_string(),
                documents: after.documents,
                bytes: after.bytes,
                base_tokens: before.tokens,
                new_tokens: after.tokens,
                base: before.tokens_per_byte(),
                new: after.tokens_per_byte(),
            })
        }
    };
    let record = VocabRecord {
        mode: match opts.source {
            VocabSource::Extend { .. } => Mode::Extend,
            VocabSource::Replace { .. } => Mode::Replace,
        },
        init: opts.init,
        base_model: base_dir.display().to_string(),
        base_vocab_size: cfg.vocab_size,
        base_tokenizer_size: base_tok.size(),
        vocab_size: vocab,
        tokenizer_size,
        new_token_ids: plan
            .new_rows()
            .into_iter()
            .filter(|&i| (i as usize) < tokenizer_size)
            .collect(),
        new_merges: new.new_merges,
        copied_rows: new.copied,
        tokens_per_byte,
    };

    // Tensors: the vocabulary matrices resized, the rest as stored.
    let plan = Arc::new(plan);
    let tensors: Vec<LazyTensor> = stored
        .iter()
        .map(|(name, (shape, dtype))| {
            let (w, n) = (weights.clone(), name.clone());
            if matrices.contains(name) {
                let plan = plan.clone();
                LazyTensor::new(name.clone(), vec![vocab, shape[1]], *dtype, move || {
                    plan.apply(&w.raw(&n, &Device::Cpu)?, &n)
                })
            } else {
                LazyTensor::new(name.clone(), shape.clone(), *dtype, move || {
                    w.raw(&n, &Device::Cpu)
                })
            }
        })
        .collect();
    let mut config = read_json(&base_dir.join("config.json"))?;
    config["vocab_size"] = Value::from(vocab);
    let mut generation = read_json_if(&base_dir.join("generation_config.json"))?;
    if record.mode == Mode::Replace {
        let roles = new.tok.role_ids()?;
        set_token_ids(&mut config, &roles, vocab);
        if let Some(g) = &mut generation {
            set_token_ids(g, &roles, vocab);
        }
    }

    let tmp = temp_dir_beside(&opts.output)?;
    let dir = tmp.path();
    write_weights(dir, tensors, DEFAULT_MAX_SHARD_SIZE)?;
    write_json(&dir.join("config.json"), &config)?;
    if let Some(g) = &generation {
        write_json(&dir.join("generation_config.json"), g)?;
    }
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, &new.json_text).at(&path)?;
    let (from, skip): (&Path, &[&str]) = match record.mode {
        Mode::Extend => (base_dir, &["tokenizer.model", "vocab.json", "merges.txt"]),
        Mode::Replace => (&new.tok.dir, &[]),
    };
    for f in TOKENIZER_FILES {
        let src = from.join(f);
        if *f != "tokenizer.json" && !skip.contains(f) && src.is_file() {
            std::fs::copy(&src, dir.join(f)).at(&src)?;
        }
    }
    if !dir.join("tokenizer_config.json").exists() {
        let minimal = serde_json::json!({"tokenizer_class": "PreTrainedTokenizerFast"});
        write_json(&dir.join("tokenizer_config.json"), &minimal)?;
    }
    write_json(
        &dir.join(RECORD_FILE),
        &serde_json::to_value(&record).expect("plain data serialises"),
    )?;
    publish_dir(tmp, &opts.output)?;
    Ok(record)
}

/// `--extend-from`: learn the merges, check there are enough, build the tokenizer.
fn extend_vocab(
    base: &TokenizerFile,
    corpus: &Path,
    n: usize,
    min_frequency: u64,
    opts: &AdaptOptions,
) -> Result<NewVocab> {
    let tok_path = base.dir.join("tokenizer.json");
    if base.model_type() != "BPE" {
        return Err(Error::bad_file(
            &tok_path,
            format!(
                "a {} tokenizer; --extend-from continues BPE merges only (use --tokenizer to replace it)",
                base.model_type()
            ),
        ));
    }
    for key in ["continuing_subword_prefix", "end_of_word_suffix"] {
        if base.json["model"][key]
            .as_str()
            .is_some_and(|s| !s.is_empty())
        {
            return Err(Error::bad_file(
                &tok_path,
                format!(
                    "its BPE sets {key}, which --extend-from does not continue; use --tokenizer"
                ),
            ));
        }
    }
    let counts = count_units(base, corpus, &opts.read)?;
    let ext: Extension = learn(base, &counts, n, min_frequency);
    if ext.tokens.len() < n {
        return Err(Error::Usage(format!(
            "--new-tokens {n}: {} supplies only {} new tokens (pairs seen at least {min_frequency} times); ask for at most {}, lower --min-frequency or add text",
            corpus.display(),
            ext.tokens.len(),
            ext.tokens.len()
        )));
    }
    let json = extended_json(&base.json, &ext, base)
        .map_err(|e| Error::bad_file(&tok_path, format!("cannot extend it: {e}")))?;
    let text = serde_json::to_string(&json).expect("JSON values serialise");
    let tok = TokenizerFile::from_text(&base.dir, &text)
        .map_err(|e| Error::Msg(format!("the extended tokenizer does not load: {e}")))?;
    if let Some(id) = (0..base.size()).find(|&i| tok.tokens[i] != base.tokens[i]) {
        return Err(Error::Msg(format!(
            "the extended tokenizer moved base token {:?} from id {id}; please report this tokenizer.json",
            base.tokens[id]
        )));
    }
    // Written as the tokenizers library writes it (vocabulary in id order), truncation
    // and padding settings kept.
    let json_text = text
        .parse::<tokenizers::Tokenizer>()
        .and_then(|t| t.to_string(true))
        .map_err(|e| Error::Msg(format!("the extended tokenizer does not serialise: {e}")))?;
    let mut rows: Vec<RowSource> = (0..base.size() as u32).map(RowSource::Copy).collect();
    rows.extend(ext.pieces.iter().map(|p| match opts.init {
        Init::Pieces => RowSource::Mean(p.clone()),
        Init::Mean => RowSource::MeanAll,
    }));
    Ok(NewVocab {
        tok,
        json_text,
        rows,
        keep_old: true,
        new_merges: ext.merges.len(),
        copied: 0,
        base_size: Some(counts.size),
    })
}

/// `--tokenizer`: the other tokenizer and its rows.
fn replace_vocab(base: &TokenizerFile, dir: &Path, init: Init) -> Result<NewVocab> {
    let tok = TokenizerFile::open(dir, "--tokenizer")?;
    if tok.size() == 0 {
        return Err(Error::bad_file(
            dir.join("tokenizer.json"),
            "--tokenizer has an empty vocabulary",
        ));
    }
    let path = dir.join("tokenizer.json");
    let json_text = std::fs::read_to_string(&path).at(&path)?;
    let m = match_rows(base, &tok, init)?;
    Ok(NewVocab {
        tok,
        json_text,
        rows: m.rows,
        keep_old: false,
        new_merges: 0,
        copied: m.same_text + m.same_role,
        base_size: None,
    })
}

/// Stored names of the matrices with a row per token: the embeddings, the untied head,
/// and a tied head a checkpoint stores anyway.
fn vocab_matrices(
    cfg: &Config,
    stored: &std::collections::BTreeMap<String, (Vec<usize>, candle_core::DType)>,
    dir: &Path,
) -> Result<Vec<String>> {
    let names = WeightNames::for_config(cfg);
    let find = |module: &str| -> Option<String> {
        let mut c = vec![format!("{module}.weight")];
        if let Some((_, rest)) = module.split_once('.') {
            c.push(format!("{rest}.weight"));
        }
        c.into_iter().find(|n| stored.contains_key(n))
    };
    let mut out = Vec::new();
    let embed = find(names.embed).ok_or_else(|| {
        Error::Weights(format!(
            "{} has no token embeddings {}.weight; is it a {} checkpoint?",
            dir.display(),
            names.embed,
            cfg.family.model_type()
        ))
    })?;
    out.push(embed);
    let head = find(names.lm_head).or_else(|| names.lm_head_alias.and_then(find));
    match head {
        Some(h) => out.push(h),
        None if !cfg.tie_embeddings => {
            return Err(Error::Weights(format!(
                "{} has no output head {}.weight, and config.json does not tie it to the embeddings",
                dir.display(),
                names.lm_head
            )));
        }
        None => {}
    }
    for n in &out {
        let (shape, _) = &stored[n];
        if shape.len() != 2 || shape[0] != cfg.vocab_size || shape[1] != cfg.hidden_size {
            return Err(Error::Weights(format!(
                "{n} in {} has shape {shape:?}, expected [{}, {}] from config.json",
                dir.display(),
                cfg.vocab_size,
                cfg.hidden_size
            )));
        }
    }
    Ok(out)
}

/// Whether `inner` is `outer` or inside it (paths that exist only).
fn contains(outer: &Path, inner: &Path) -> bool {
    match (outer.canonicalize(), inner.canonicalize()) {
        (Ok(o), Ok(i)) => i.starts_with(o),
        _ => false,
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).at(path)?;
    serde_json::from_str(&text).map_err(|e| Error::bad_file(path, format!("not JSON: {e}")))
}

fn read_json_if(path: &Path) -> Result<Option<Value>> {
    if path.is_file() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let mut s = serde_json::to_string_pretty(v).expect("JSON values serialise");
    s.push('\n');
    std::fs::write(path, s).at(path)
}

/// A temporary folder beside `out`, renamed onto it by `publish_dir`.
pub(crate) fn temp_dir_beside(out: &Path) -> Result<tempfile::TempDir> {
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).at(&parent)?;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    tempfile::Builder::new()
        .prefix(&format!(".{name}.tmp-"))
        .tempdir_in(&parent)
        .at(&parent)
}
