//! Helpers of the prepare-data tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use lit_claire::Result;
use lit_claire::data::documents::{DocFormat, TextLayout, records};
use lit_claire::data::prepare::{PrepareOptions, PrepareReport, prepare_data};
use lit_claire::data::reader::Split;
use lit_claire::tokenizer::Tokenizer;

use crate::common::reference_dir;

/// `data/sample/fortunes-br.txt`.
pub fn fortunes_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample/fortunes-br.txt")
}

/// The sample corpus' documents.
pub fn fortunes() -> Vec<String> {
    let fmt = DocFormat::Text(TextLayout::Separator("%".into()));
    records(&fortunes_path(), fmt, false)
        .unwrap()
        .map(|r| r.unwrap().text)
        .collect()
}

/// The llama fixture: a model folder with a 512-token byte-level BPE.
pub fn model_dir() -> PathBuf {
    reference_dir("llama")
}

pub fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(&model_dir()).unwrap()
}

/// A source folder holding the sample corpus as dataset `fortunes-br`.
pub fn fortunes_source(root: &Path) -> PathBuf {
    let src = root.join("raw");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::copy(fortunes_path(), src.join("fortunes-br.txt")).unwrap();
    src
}

/// Options for `src` -> `dest` with the fixture model, `%`-separated documents, a
/// 64-token context (so many documents are cut) and one document per padded sample
/// (tests of packing, the default, set `padding = false`).
pub fn options(src: &Path, dest: &Path) -> PrepareOptions {
    let mut o = PrepareOptions::new(src, &model_dir(), dest);
    o.padding = true;
    o.read.layout = TextLayout::Separator("%".into());
    o.max_length = Some(64);
    o
}

pub fn prepare(opts: &PrepareOptions) -> Result<PrepareReport> {
    prepare_data(opts)
}

/// All samples of a split, in order.
pub fn samples(split: &Split) -> Vec<Vec<u32>> {
    (0..split.len()).map(|i| split.sample(i).unwrap()).collect()
}

/// A token stream cut after every `eos`.
pub fn split_docs(stream: &[u32], eos: u32) -> Vec<Vec<u32>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    for &t in stream {
        cur.push(t);
        if t == eos {
            out.push(std::mem::take(&mut cur));
        }
    }
    assert!(cur.is_empty(), "stream does not end with EOS");
    out
}

/// Every file under `dir` with its bytes, by relative path.
pub fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Names of the entries of `dir`.
pub fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Dialogues: `turns` turns of a few words each, between speakers numbered 1..=3.
pub fn dialogue(seed: usize, turns: usize) -> String {
    let words = [
        "bom", "dia", "como", "vai", "você", "tudo", "bem", "obrigado", "e", "a", "casa", "está",
        "muito", "bonita", "hoje",
    ];
    let mut s = String::new();
    for t in 0..turns {
        if t > 0 {
            s.push(' ');
        }
        s.push_str(&format!("[Intervenant {}:]", (seed + t) % 3 + 1));
        for w in 0..(2 + (seed * 7 + t * 3) % 4) {
            s.push(' ');
            s.push_str(words[(seed * 13 + t * 5 + w) % words.len()]);
        }
    }
    s
}
