//! `train-tokenizer`: a byte-level BPE trained on the sample corpus loads back through
//! our `Tokenizer`, honours the vocabulary size and special tokens, and decodes every
//! document to itself. (By hand, transformers' AutoTokenizer loads the same output and
//! gives the same ids on all 2506 fortunes; CI has no Python.)

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use lit_claire::Error;
use lit_claire::data::documents::{DocFormat, TextLayout, records};
use lit_claire::data::train_tokenizer::{TrainTokenizerOptions, train_tokenizer};
use lit_claire::tokenizer::Tokenizer;
use serde_json::Value;

use crate::common::*;

fn sample() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample/fortunes-br.txt")
}

fn fortunes() -> Vec<String> {
    let fmt = DocFormat::Text(TextLayout::Separator("%".into()));
    records(&sample(), fmt, false)
        .unwrap()
        .map(|r| r.unwrap().text)
        .collect()
}

fn fortune_opts(out: &Path, vocab: usize) -> TrainTokenizerOptions {
    let mut o = TrainTokenizerOptions::new(vec![sample()], out, vocab);
    o.read.layout = TextLayout::Separator("%".into());
    o
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn trained_tokenizer_loads_back_and_round_trips_the_sample_corpus() {
    let tmp = temp_dir();
    let out = tmp.path().join("tok");
    let t = train_tokenizer(&fortune_opts(&out, 600)).unwrap();
    assert_eq!(t.documents, 2506);
    assert_eq!(t.vocab_size, 600);
    assert_eq!(t.merges, 600 - 256 - 4);
    let ids: Vec<(&str, u32)> = t
        .special_tokens
        .iter()
        .map(|s| (s.token.as_str(), s.id))
        .collect();
    assert_eq!(ids, [("<pad>", 0), ("<s>", 1), ("</s>", 2), ("<unk>", 3)]);

    let tok = Tokenizer::from_dir(&out).unwrap();
    assert_eq!(tok.vocab_size(), 600);
    assert_eq!(tok.pad_id, Some(0));
    assert_eq!(tok.bos_id, Some(1));
    assert_eq!(tok.eos_ids, vec![2]);
    assert!(!tok.adds_bos, "the tokenizer itself adds no BOS");
    assert_eq!(tok.inner().token_to_id("<unk>"), Some(3));
    assert_eq!(tok.encode_plain("<s></s>").unwrap(), vec![1, 2]);

    let (mut bytes, mut tokens) = (0, 0);
    for doc in fortunes() {
        let ids = tok.encode_plain(&doc).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), doc);
        assert!(ids.iter().all(|&i| i >= 4 && (i as usize) < 600));
        bytes += doc.len();
        tokens += ids.len();
    }
    // The merges are learnt from this text: it must compress well below a byte a token.
    assert!(
        (tokens as f64) < 0.5 * bytes as f64,
        "{tokens} tokens for {bytes} bytes"
    );
    // Text the corpus never saw (emoji, other scripts) still encodes, byte by byte.
    for s in ["😀 ∑ 日本", "\t\r\n  two  spaces", "ÇÃÕ"] {
        assert_eq!(tok.decode(&tok.encode_plain(s).unwrap()).unwrap(), s);
    }

    let cfg = read_json(&out.join("tokenizer_config.json"));
    assert_eq!(cfg["tokenizer_class"], "PreTrainedTokenizerFast");
    assert_eq!(cfg["model_max_length"], 2048);
    assert_eq!(cfg["unk_token"], "<unk>");
    assert_eq!(cfg["added_tokens_decoder"]["2"]["content"], "</s>");
    assert_eq!(cfg["clean_up_tokenization_spaces"], false);
    let tj = read_json(&out.join("tokenizer.json"));
    assert_eq!(tj["model"]["type"], "BPE");
    assert_eq!(tj["pre_tokenizer"]["type"], "ByteLevel");
    assert_eq!(tj["decoder"]["type"], "ByteLevel");
    // Nothing else left in the output's parent.
    let names: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert_eq!(names.len(), 1);
}

#[test]
fn jsonl_gz_input_custom_specials_and_determinism() {
    let tmp = temp_dir();
    let raw = tmp.path().join("raw");
    std::fs::create_dir(&raw).unwrap();
    let f = std::fs::File::create(raw.join("dialogues.jsonl.gz")).unwrap();
    let mut gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
    for (i, doc) in fortunes().iter().enumerate() {
        let text = format!("[Intervenant 1:] {doc}\n[Intervenant 2:] sim");
        writeln!(gz, "{}", serde_json::json!({"id": i, "content": text})).unwrap();
    }
    gz.finish().unwrap();
    std::fs::write(raw.join("README.md"), "not a corpus file").unwrap();

    let train = |out: &Path| {
        let mut o = TrainTokenizerOptions::new(vec![raw.clone()], out, 500);
        o.read.json_key = "content".into();
        o.pad_token = None;
        o.unk_token = None;
        o.bos_token = Some("<|begin|>".into());
        o.eos_token = Some("<|end|>".into());
        o.special_tokens = vec!["[Intervenant 1:]".into(), "[Intervenant 2:]".into()];
        o.model_max_length = 1024;
        train_tokenizer(&o).unwrap()
    };
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let t = train(&a);
    train(&b);
    let read = |d: &Path| std::fs::read(d.join("tokenizer.json")).unwrap();
    assert_eq!(read(&a), read(&b), "training is deterministic");

    assert_eq!(t.documents, 2506);
    assert_eq!(t.bos.as_ref().map(|s| s.id), Some(0));
    assert_eq!(t.eos.as_ref().map(|s| s.id), Some(1));
    assert!(t.pad.is_none() && t.unk.is_none());
    let tok = Tokenizer::from_dir(&a).unwrap();
    assert_eq!(tok.vocab_size(), 500);
    assert_eq!(
        (tok.bos_id, tok.eos_ids.clone(), tok.pad_id),
        (Some(0), vec![1], None)
    );
    let ids = tok.encode_plain("[Intervenant 2:] olá").unwrap();
    assert_eq!(ids[0], 3, "a special token is one id, never split");
    assert_eq!(
        tok.decode(&ids).unwrap(),
        " olá",
        "decode drops special tokens"
    );
    let cfg = read_json(&a.join("tokenizer_config.json"));
    assert_eq!(cfg["pad_token"], Value::Null);
    assert_eq!(cfg["bos_token"], "<|begin|>");
    assert_eq!(cfg["model_max_length"], 1024);
    assert_eq!(
        cfg["additional_special_tokens"],
        serde_json::json!(["[Intervenant 1:]", "[Intervenant 2:]"])
    );
}

#[test]
fn bad_inputs_give_one_line_errors_and_write_nothing() {
    let tmp = temp_dir();
    let out = tmp.path().join("tok");

    let err = train_tokenizer(&fortune_opts(&out, 100)).unwrap_err();
    assert!(matches!(err, Error::Usage(_)), "{err}");
    assert!(
        err.to_string()
            .contains("--vocab-size must be at least 260"),
        "{err}"
    );

    let missing = tmp.path().join("nope");
    let err = train_tokenizer(&TrainTokenizerOptions::new(vec![missing], &out, 300)).unwrap_err();
    assert!(err.to_string().contains("nope not found"), "{err}");

    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"ok\"}\n{\"text\": \"ok\"\n").unwrap();
    let err =
        train_tokenizer(&TrainTokenizerOptions::new(vec![bad.clone()], &out, 300)).unwrap_err();
    assert!(err.to_string().contains("bad.jsonl:2: not JSON"), "{err}");
    assert!(!out.exists(), "nothing written after an error");

    let mut skip = TrainTokenizerOptions::new(vec![bad], &out, 300);
    skip.read.skip_bad_lines = true;
    let t = train_tokenizer(&skip).unwrap();
    assert_eq!((t.documents, t.skipped_lines), (1, 1));
    // An existing tokenizer is kept unless --overwrite.
    let err = train_tokenizer(&skip).unwrap_err();
    assert!(err.to_string().contains("--overwrite"), "{err}");
    skip.overwrite = true;
    train_tokenizer(&skip).unwrap();

    // Through the binary: one line on stderr, non-zero exit, no output folder.
    let out2 = tmp.path().join("tok2");
    let run = Command::new(bin())
        .args(["train-tokenizer", "--vocab-size", "10", "--output"])
        .arg(&out2)
        .arg("--input")
        .arg(sample())
        .output()
        .unwrap();
    assert!(!run.status.success());
    let stderr = String::from_utf8(run.stderr).unwrap();
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--vocab-size"), "{stderr}");
    assert!(!out2.exists());
}
