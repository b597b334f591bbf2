//! Issue 23, the data half: hostile corpora and tokenizer files. Each gives a one-line
//! error naming the file (non-zero exit, no panic, nothing written) or the right answer,
//! and never blocks or reads without end: every command runs under a deadline and a
//! memory limit, so a regression fails the test instead of hanging it.

use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lit_claire::data::dedup::{DedupOptions, dedup};
use lit_claire::data::documents::TextLayout;
use lit_claire::data::prepare::prepare_data;
use lit_claire::data::train_tokenizer::{TrainTokenizerOptions, train_tokenizer};
use lit_claire::tokenizer::Tokenizer;
use serde_json::Value;

use crate::common::*;
use crate::data_common::{fortunes, model_dir, options, tree};

/// Longest a command may run here; the hangs of the issue never end.
const DEADLINE: Duration = Duration::from_secs(60);

/// Run the binary with `args` under [`DEADLINE`] and a 4 GB address-space limit
/// (reading `/dev/zero` would otherwise take the machine's memory): (success, stderr).
fn run(args: &[&OsStr]) -> (bool, String) {
    let tmp = temp_dir();
    let err_path = tmp.path().join("stderr");
    let err_file = std::fs::File::create(&err_path).unwrap();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 4000000; exec \"$0\" \"$@\"")
        .arg(bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err_file)
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > DEADLINE {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("{args:?} still running after {DEADLINE:?}: it hangs");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let err = std::fs::read_to_string(&err_path).unwrap();
    (status.success(), err.trim().to_string())
}

/// The command must fail with one line on stderr, without a panic; returns that line.
fn fails(args: &[&OsStr]) -> String {
    let (ok, err) = run(args);
    assert!(!ok, "{args:?} succeeded: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{args:?} panicked: {err}"
    );
    assert_eq!(err.lines().count(), 1, "{args:?}: not one line: {err}");
    assert!(err.starts_with("error: "), "{err}");
    err
}

fn succeeds(args: &[&OsStr]) -> String {
    let (ok, err) = run(args);
    assert!(ok, "{args:?} failed: {err}");
    err
}

/// Arguments from strings and paths.
fn argv(parts: &[&dyn AsRef<OsStr>]) -> Vec<OsString> {
    parts.iter().map(|p| p.as_ref().to_os_string()).collect()
}

fn refs(v: &[OsString]) -> Vec<&OsStr> {
    v.iter().map(|s| s.as_os_str()).collect()
}

/// The three commands that read a corpus `src`, writing under `out` (which must not
/// exist afterwards when they fail): dedup, train-tokenizer, prepare-data.
fn corpus_commands(src: &Path, out: &Path) -> Vec<Vec<OsString>> {
    vec![
        argv(&[&"dedup", &"--input", &src, &"--output", &out.join("dedup")]),
        argv(&[
            &"train-tokenizer",
            &"--input",
            &src,
            &"--vocab-size",
            &"300",
            &"--output",
            &out.join("tok"),
        ]),
        argv(&[
            &"prepare-data",
            &"--source-path",
            &src,
            &"--checkpoint-dir",
            &model_dir(),
            &"--destination-path",
            &out.join("prepared"),
            &"--max-length",
            &"16",
        ]),
    ]
}

/// Every corpus command fails on `src` with one line containing all of `want`, and
/// writes nothing under `out`.
fn every_command_refuses(src: &Path, out: &Path, want: &[&str]) {
    for args in corpus_commands(src, out) {
        let err = fails(&refs(&args));
        for w in want {
            assert!(err.contains(w), "{:?}: {err:?} lacks {w:?}", args[0]);
        }
        assert!(
            !out.exists() || std::fs::read_dir(out).unwrap().next().is_none(),
            "{:?} left {:?}",
            args[0],
            tree(out).iter().map(|(p, _)| p.clone()).collect::<Vec<_>>()
        );
    }
}

fn mkfifo(p: &Path) {
    let st = Command::new("mkfifo").arg(p).status().unwrap();
    assert!(st.success(), "mkfifo {}", p.display());
}

/// A corpus of one dataset `ds` with a few lines.
fn small_corpus(root: &Path) -> PathBuf {
    let src = root.join("raw");
    std::fs::create_dir_all(src.join("ds")).unwrap();
    let text: String = fortunes()
        .iter()
        .take(30)
        .map(|d| d.replace('\n', " ") + "\n")
        .collect();
    std::fs::write(src.join("ds/a.txt"), text).unwrap();
    src
}

/// A copy of the llama fixture's files in `dir`.
fn model_copy(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    for e in std::fs::read_dir(model_dir()).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
        }
    }
    dir.to_path_buf()
}

// ---------------------------------------------------------------------------------
// 1. A tokenizer.json the tokenizers crate panics on.

#[test]
fn issue23_1_a_tokenizer_cut_off_in_its_decoder_is_a_one_line_error() {
    let tmp = temp_dir();
    let model = model_copy(&tmp.path().join("model"));
    let tok = model.join("tokenizer.json");
    let text = std::fs::read_to_string(&tok).unwrap();
    let cut = text.find("\"decoder\"").unwrap() + 30;
    std::fs::write(&tok, &text[..cut]).unwrap();

    let e = Tokenizer::from_dir(&model).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json") && e.contains("cut off"), "{e}");

    let src = small_corpus(tmp.path());
    let dest = tmp.path().join("prepared");
    let err = fails(&refs(&argv(&[
        &"prepare-data",
        &"--source-path",
        &src,
        &"--checkpoint-dir",
        &model,
        &"--destination-path",
        &dest,
    ])));
    assert!(
        err.contains("tokenizer.json") && err.contains("again"),
        "{err}"
    );
    assert!(!dest.exists());
    let err = fails(&refs(&argv(&[
        &"perplexity",
        &"--checkpoint-dir",
        &model,
        &"--input",
        &src.join("ds/a.txt"),
    ])));
    assert!(
        err.contains("tokenizer.json") && err.contains("cut off"),
        "{err}"
    );
}

#[test]
fn issue23_1_a_valid_json_tokenizer_the_crate_panics_on_is_caught() {
    // The tokenizers crate `expect`s a Precompiled normaliser's charsmap to be a string.
    let tmp = temp_dir();
    let model = model_copy(&tmp.path().join("model"));
    let tok = model.join("tokenizer.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&tok).unwrap()).unwrap();
    v["normalizer"] = serde_json::json!({"type": "Precompiled", "precompiled_charsmap": 5});
    std::fs::write(&tok, v.to_string()).unwrap();
    for _ in 0..2 {
        let e = Tokenizer::from_dir(&model).unwrap_err().to_string();
        assert!(
            e.contains("tokenizer.json") && e.contains("not a tokenizer"),
            "{e}"
        );
    }
    let src = small_corpus(tmp.path());
    let err = fails(&refs(&argv(&[
        &"prepare-data",
        &"--source-path",
        &src,
        &"--checkpoint-dir",
        &model,
        &"--destination-path",
        &tmp.path().join("prepared"),
    ])));
    assert!(
        err.contains("tokenizer.json") && err.contains("Precompiled"),
        "{err}"
    );
    // Any other wrong field is an error of the crate, passed on in one line.
    v["normalizer"] = serde_json::json!({"type": "NoSuchNormalizer"});
    std::fs::write(&tok, v.to_string()).unwrap();
    let e = Tokenizer::from_dir(&model).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json") && !e.contains('\n'), "{e}");
}

#[test]
fn issue23_1_neighbours_model_files_that_are_devices_or_fifos_are_refused() {
    let tmp = temp_dir();
    // tokenizer.json -> /dev/zero used to be read until memory ran out.
    let model = model_copy(&tmp.path().join("zero"));
    std::fs::remove_file(model.join("tokenizer.json")).unwrap();
    symlink("/dev/zero", model.join("tokenizer.json")).unwrap();
    let e = Tokenizer::from_dir(&model).unwrap_err().to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("character device"),
        "{e}"
    );
    // A FIFO config.json or tokenizer_config.json used to block.
    for name in [
        "config.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        let model = model_copy(&tmp.path().join(name));
        let _ = std::fs::remove_file(model.join(name));
        mkfifo(&model.join(name));
        let e = Tokenizer::from_dir(&model).unwrap_err().to_string();
        assert!(e.contains(name) && e.contains("FIFO"), "{e}");
    }
    // A --groups file that never ends.
    let src = small_corpus(tmp.path());
    let groups = tmp.path().join("groups.json");
    symlink("/dev/zero", &groups).unwrap();
    let dest = tmp.path().join("prepared");
    let err = fails(&refs(&argv(&[
        &"prepare-data",
        &"--source-path",
        &src,
        &"--checkpoint-dir",
        &model_dir(),
        &"--destination-path",
        &dest,
        &"--groups",
        &groups,
    ])));
    assert!(
        err.contains("groups.json") && err.contains("character device"),
        "{err}"
    );
    assert!(!dest.exists());
}

// ---------------------------------------------------------------------------------
// 6 and 9. Corpus files that are devices or FIFOs.

#[test]
fn issue23_6_a_corpus_file_linked_to_dev_zero_is_refused_by_every_command() {
    let tmp = temp_dir();
    let src = small_corpus(tmp.path());
    // Beside a real file, so prepare-data's "dataset is empty" check does not catch it.
    symlink("/dev/zero", src.join("ds/zero.txt")).unwrap();
    let out = tmp.path().join("out");
    every_command_refuses(&src, &out, &["zero.txt", "character device", "/dev/zero"]);
    // Given as the input itself.
    every_command_refuses(
        &src.join("ds/zero.txt"),
        &out,
        &["zero.txt", "character device"],
    );
    // Compressed: the .gz reader would inflate zeros forever.
    std::fs::remove_file(src.join("ds/zero.txt")).unwrap();
    symlink("/dev/zero", src.join("ds/zero.jsonl.gz")).unwrap();
    every_command_refuses(&src, &out, &["zero.jsonl.gz", "character device"]);
}

#[test]
fn issue23_9_a_fifo_in_a_corpus_folder_is_refused_without_blocking() {
    let tmp = temp_dir();
    let src = small_corpus(tmp.path());
    mkfifo(&src.join("ds/pipe.txt"));
    let out = tmp.path().join("out");
    every_command_refuses(&src, &out, &["pipe.txt", "FIFO"]);
    every_command_refuses(&src.join("ds/pipe.txt"), &out, &["pipe.txt", "FIFO"]);
    // A FIFO that is not a document file is never opened: dedup lists it as ignored.
    std::fs::rename(src.join("ds/pipe.txt"), src.join("ds/pipe")).unwrap();
    let opts = DedupOptions::new(&src, out.join("dedup"));
    let r = dedup(&opts).unwrap();
    assert_eq!(r.ignored_files, ["ds/pipe"]);
    assert_eq!(r.totals.documents, 30);
    let mut t = TrainTokenizerOptions::new(vec![src.clone()], out.join("tok"), 300);
    t.min_frequency = 1;
    assert_eq!(train_tokenizer(&t).unwrap().documents, 30);
    let mut o = options(&src, &out.join("prepared"));
    o.read.layout = TextLayout::LinePerDocument;
    prepare_data(&o).unwrap();
}

// ---------------------------------------------------------------------------------
// 12. Symbolic links: loops, twins, dangling links, outputs inside inputs.

#[test]
fn issue23_12_a_symlink_loop_is_refused_naming_the_looping_path() {
    let tmp = temp_dir();
    let src = small_corpus(tmp.path());
    symlink(".", src.join("ds/self")).unwrap();
    let out = tmp.path().join("out");
    every_command_refuses(&src, &out, &["ds/self", "loop"]);
    // A loop at the top of the corpus: prepare-data would take it for a dataset.
    std::fs::remove_file(src.join("ds/self")).unwrap();
    symlink(".", src.join("again")).unwrap();
    every_command_refuses(&src, &out, &["raw/again", "loop"]);
    // Links that point at each other (the system's ELOOP).
    std::fs::remove_file(src.join("again")).unwrap();
    symlink("b.txt", src.join("ds/a2.txt")).unwrap();
    symlink("a2.txt", src.join("ds/b.txt")).unwrap();
    every_command_refuses(&src, &out, &["a2.txt", "loop"]);
}

#[test]
fn issue23_12_neighbours_twin_and_dangling_links_are_named_and_outside_links_followed() {
    let tmp = temp_dir();
    let src = small_corpus(tmp.path());
    let out = tmp.path().join("out");
    // Two links to one folder would read its documents twice.
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::write(elsewhere.join("b.txt"), "one more line\nand another\n").unwrap();
    symlink(&elsewhere, src.join("ds/x")).unwrap();
    symlink(&elsewhere, src.join("ds/y")).unwrap();
    every_command_refuses(&src, &out, &["ds/y", "same folder as", "ds/x"]);
    // A dangling link is named, with its target.
    std::fs::remove_file(src.join("ds/y")).unwrap();
    symlink("missing.txt", src.join("ds/gone.txt")).unwrap();
    every_command_refuses(
        &src,
        &out,
        &["ds/gone.txt", "missing.txt", "does not exist"],
    );
    // One link to a folder outside the corpus is followed, as before.
    std::fs::remove_file(src.join("ds/gone.txt")).unwrap();
    let r = dedup(&DedupOptions::new(&src, out.join("dedup"))).unwrap();
    assert_eq!(r.totals.documents, 32);
    assert!(out.join("dedup/ds/x/b.txt").is_file());
}

#[test]
fn issue23_12_neighbour_an_output_inside_the_input_through_a_link_is_refused() {
    let tmp = temp_dir();
    let src = small_corpus(tmp.path());
    let link = tmp.path().join("link");
    symlink(&src, &link).unwrap();
    let e = dedup(&DedupOptions::new(&src, link.join("clean")))
        .unwrap_err()
        .to_string();
    assert!(e.contains("overlap"), "{e}");
    let mut o = options(&src, &link.join("prepared"));
    o.read.layout = TextLayout::LinePerDocument;
    let e = prepare_data(&o).unwrap_err().to_string();
    assert!(e.contains("lies inside --source-path"), "{e}");
    assert_eq!(
        std::fs::read_dir(&src).unwrap().count(),
        1,
        "wrote into the source"
    );
}

// ---------------------------------------------------------------------------------
// 25. Memory that grows with input size.

/// One line of `n` bytes of words.
fn long_line(n: usize) -> String {
    let words = [
        "casa", "bonita", "hoje", "muito", "obrigado", "você", "tudo", "bem",
    ];
    let mut s = String::new();
    let mut i = 0;
    while s.len() < n {
        if !s.is_empty() {
            s.push(' ');
        }
        s.push_str(words[(i * 7 + i / 3) % words.len()]);
        i += 1;
    }
    s
}

#[test]
fn issue23_25_a_line_longer_than_max_document_bytes_is_refused_naming_file_and_line() {
    let tmp = temp_dir();
    let src = small_corpus(tmp.path());
    std::fs::write(
        src.join("ds/b.txt"),
        format!("short\n{}\nshort\n", long_line(5000)),
    )
    .unwrap();
    let out = tmp.path().join("out");
    let max = |mut v: Vec<OsString>| {
        v.push("--max-document-bytes".into());
        v.push("1000".into());
        v
    };
    for args in corpus_commands(&src, &out) {
        let err = fails(&refs(&max(args.clone())));
        assert!(
            err.contains("ds/b.txt:2")
                && err.contains("--max-document-bytes")
                && err.contains("1000 bytes"),
            "{err}"
        );
        assert!(!out.exists() || std::fs::read_dir(&out).unwrap().next().is_none());
        // The default limit (64 MiB) lets it through.
        succeeds(&refs(&args));
        std::fs::remove_dir_all(&out).unwrap();
    }
    let e = fails(&refs(&argv(&[
        &"dedup",
        &"--input",
        &src,
        &"--output",
        &out,
        &"--max-document-bytes",
        &"0",
    ])));
    assert!(e.contains("--max-document-bytes"), "{e}");

    // A document of many short lines, and a small .gz that inflates to one long line.
    std::fs::remove_file(src.join("ds/a.txt")).unwrap();
    std::fs::write(src.join("ds/b.txt"), "x\n".repeat(2000)).unwrap();
    let mut o = DedupOptions::new(&src, out.join("dedup"));
    o.read.layout = TextLayout::Separator("%".into());
    o.read.max_document_bytes = 1000;
    let e = dedup(&o).unwrap_err().to_string();
    assert!(
        e.contains("ds/b.txt:1: a document longer than 1000 bytes"),
        "{e}"
    );
    std::fs::remove_file(src.join("ds/b.txt")).unwrap();
    let gz = std::fs::File::create(src.join("ds/b.txt.gz")).unwrap();
    let mut w = flate2::write::GzEncoder::new(gz, flate2::Compression::best());
    w.write_all(&vec![b'a'; 10 << 20]).unwrap();
    w.finish().unwrap();
    let mut t = TrainTokenizerOptions::new(vec![src.clone()], out.join("tok"), 300);
    t.read.max_document_bytes = 1 << 20;
    let e = train_tokenizer(&t).unwrap_err().to_string();
    assert!(e.contains("ds/b.txt.gz:1: a line longer than 1 MiB"), "{e}");
    assert!(!out.exists());
}

/// A corpus of long documents: the sample fortunes joined 40 at a time into one line
/// (about 8 KB each), and the sample as it is (`%`-separated, with newlines).
fn long_corpus(root: &Path) -> PathBuf {
    let src = root.join("long");
    std::fs::create_dir_all(src.join("ds")).unwrap();
    let docs = fortunes();
    let lines: String = docs
        .chunks(40)
        .map(|c| c.join(" ").split_whitespace().collect::<Vec<_>>().join(" ") + "\n")
        .collect();
    std::fs::write(src.join("ds/lines.txt"), lines).unwrap();
    src
}

#[test]
fn issue23_25_long_documents_are_encoded_in_pieces_with_the_very_ids_of_the_whole() {
    let tmp = temp_dir();
    let src = long_corpus(tmp.path());
    let spm = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/spm_tokenizer");
    for model in [model_dir(), spm] {
        for padding in [false, true] {
            let build = |piece: usize, name: &str| {
                let dest = tmp.path().join(name);
                let mut o = options(&src, &dest);
                o.checkpoint_dir = model.clone();
                o.read.layout = TextLayout::LinePerDocument;
                o.padding = padding;
                o.piece_bytes = piece;
                prepare_data(&o).unwrap();
                let t = tree(&dest);
                std::fs::remove_dir_all(&dest).unwrap();
                t
            };
            let whole = build(usize::MAX, "whole");
            let pieces = build(256, "pieces");
            assert!(
                whole == pieces,
                "{} padding {padding}: the pieces changed the output",
                model.display()
            );
        }
    }
}

#[test]
fn issue23_25_train_tokenizer_feeds_long_documents_in_pieces_with_the_same_result() {
    let tmp = temp_dir();
    let src = long_corpus(tmp.path());
    let train = |piece: usize, name: &str| {
        let mut o = TrainTokenizerOptions::new(vec![src.clone()], tmp.path().join(name), 600);
        o.piece_bytes = piece;
        let t = train_tokenizer(&o).unwrap();
        let json = std::fs::read(tmp.path().join(name).join("tokenizer.json")).unwrap();
        (t.documents, t.text_bytes, json)
    };
    let whole = train(usize::MAX, "whole");
    let pieces = train(256, "pieces");
    assert_eq!(whole.0, pieces.0, "documents");
    assert_eq!(whole.1, pieces.1, "bytes");
    assert!(whole.2 == pieces.2, "the pieces changed the tokenizer");
}

// ---------------------------------------------------------------------------------
// Neighbours: encodings, empty corpora, many files, damaged gzip.

#[test]
fn issue23_neighbour_a_corpus_file_that_is_not_utf8_names_file_line_and_fix() {
    let tmp = temp_dir();
    let src = small_corpus(tmp.path());
    let out = tmp.path().join("out");
    // Latin-1 "ação" on line 2.
    std::fs::write(src.join("ds/latin1.txt"), b"fine\na\xe7\xe3o\n").unwrap();
    every_command_refuses(
        &src,
        &out,
        &["ds/latin1.txt:2", "not UTF-8", "column 2", "iconv"],
    );
    std::fs::remove_file(src.join("ds/latin1.txt")).unwrap();
    // UTF-16 with its byte-order mark.
    let mut utf16 = vec![0xff, 0xfe];
    for c in "olá mundo\n".encode_utf16() {
        utf16.extend(c.to_le_bytes());
    }
    std::fs::write(src.join("ds/wide.txt"), utf16).unwrap();
    every_command_refuses(&src, &out, &["ds/wide.txt:1", "UTF-16"]);
    std::fs::remove_file(src.join("ds/wide.txt")).unwrap();

    // jsonl: a bad line is skipped and counted with --skip-bad-lines.
    std::fs::write(
        src.join("ds/b.jsonl"),
        b"\xef\xbb\xbf{\"text\": \"bom first\"}\n{\"text\": \"caf\xe9\"}\n{\"text\": \"last\"}\n",
    )
    .unwrap();
    let mut o = DedupOptions::new(&src, out.join("dedup"));
    let e = dedup(&o).unwrap_err().to_string();
    assert!(e.contains("ds/b.jsonl:2") && e.contains("not UTF-8"), "{e}");
    o.read.skip_bad_lines = true;
    let r = dedup(&o).unwrap();
    let b = r.files.iter().find(|f| f.path == "ds/b.jsonl").unwrap();
    assert_eq!((b.counts.documents, b.counts.skipped_lines), (2, 1));
    // The UTF-8 byte-order mark is dropped, not read as text.
    let kept = std::fs::read_to_string(out.join("dedup/ds/b.jsonl")).unwrap();
    assert_eq!(kept, "{\"text\": \"bom first\"}\n{\"text\": \"last\"}\n");
}

#[test]
fn issue23_neighbour_empty_corpora_are_one_line_errors_that_write_nothing() {
    let tmp = temp_dir();
    let out = tmp.path().join("out");
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    every_command_refuses(&empty, &out, &["empty"]);
    // Files, but no documents in them: dedup used to write an empty corpus and exit 0.
    let blank = tmp.path().join("blank");
    std::fs::create_dir_all(blank.join("ds")).unwrap();
    std::fs::write(blank.join("ds/a.txt"), "").unwrap();
    std::fs::write(blank.join("ds/b.txt"), "\n  \n").unwrap();
    every_command_refuses(&blank, &out, &["blank"]);
    // Every jsonl line dropped by --skip-bad-lines (a wrong --json-key).
    let keyed = tmp.path().join("keyed");
    std::fs::create_dir_all(keyed.join("ds")).unwrap();
    std::fs::write(
        keyed.join("ds/a.jsonl"),
        "{\"content\": \"a\"}\n{\"content\": \"b\"}\n",
    )
    .unwrap();
    for mut args in corpus_commands(&keyed, &out) {
        args.push("--skip-bad-lines".into());
        let err = fails(&refs(&args));
        assert!(err.contains("--json-key"), "{err}");
    }
    assert!(!out.exists());
}

#[test]
fn issue23_neighbour_thousands_of_tiny_files_are_all_read() {
    let tmp = temp_dir();
    let src = tmp.path().join("tiny");
    for d in 0..20 {
        let dir = src.join(format!("ds/part{d:02}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..100 {
            std::fs::write(
                dir.join(format!("{f:03}.txt")),
                format!("document {d} {f} words\n"),
            )
            .unwrap();
        }
    }
    let out = tmp.path().join("out");
    let r = dedup(&DedupOptions::new(&src, out.join("dedup"))).unwrap();
    assert_eq!((r.files.len(), r.totals.kept), (2000, 2000));
    let mut t = TrainTokenizerOptions::new(vec![src.clone()], out.join("tok"), 300);
    t.min_frequency = 1;
    assert_eq!(train_tokenizer(&t).unwrap().documents, 2000);
    let mut o = options(&src, &out.join("prepared"));
    o.read.layout = TextLayout::LinePerDocument;
    let rep = prepare_data(&o).unwrap();
    let d = &rep.datasets[0];
    assert_eq!(d.train.documents + d.validation.documents, 2000);
}

#[test]
fn issue23_neighbour_a_gz_file_that_is_not_gzip_is_named() {
    let tmp = temp_dir();
    let src = small_corpus(tmp.path());
    std::fs::write(src.join("ds/b.txt.gz"), "plain text, not gzip\n").unwrap();
    let out = tmp.path().join("out");
    every_command_refuses(&src, &out, &["ds/b.txt.gz", "cannot decompress"]);
    // Cut off in the middle.
    let gz = std::fs::File::create(src.join("ds/b.txt.gz")).unwrap();
    let mut w = flate2::write::GzEncoder::new(gz, flate2::Compression::default());
    w.write_all(long_line(100_000).as_bytes()).unwrap();
    w.finish().unwrap();
    let bytes = std::fs::read(src.join("ds/b.txt.gz")).unwrap();
    std::fs::write(src.join("ds/b.txt.gz"), &bytes[..bytes.len() / 2]).unwrap();
    every_command_refuses(&src, &out, &["ds/b.txt.gz", "cannot decompress"]);
}

#[test]
fn issue23_neighbour_special_ids_past_the_vocabulary_are_refused_not_cut() {
    let tmp = temp_dir();
    let src = small_corpus(tmp.path());
    // 2^32 + 2 used to become token 2 (`as u32`).
    let model = model_copy(&tmp.path().join("wide"));
    let gen_cfg = model.join("generation_config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&gen_cfg).unwrap()).unwrap();
    v["eos_token_id"] = serde_json::json!(4294967298u64);
    std::fs::write(&gen_cfg, v.to_string()).unwrap();
    let e = Tokenizer::from_dir(&model).unwrap_err().to_string();
    assert!(
        e.contains("generation_config.json") && e.contains("eos_token_id 4294967298"),
        "{e}"
    );
    // An EOS the tokenizer does not have would be written after every document.
    v["eos_token_id"] = serde_json::json!([600, 2]);
    std::fs::write(&gen_cfg, v.to_string()).unwrap();
    let dest = tmp.path().join("prepared");
    let mut o = options(&src, &dest);
    o.checkpoint_dir = model.clone();
    o.read.layout = TextLayout::LinePerDocument;
    let e = prepare_data(&o).unwrap_err().to_string();
    assert!(
        e.contains("eos_token_id 600") && e.contains("512 tokens"),
        "{e}"
    );
    assert!(!dest.exists());
}

/// `perplexity --input` used to read `/dev/zero` until memory ran out, and to block
/// on a FIFO.
#[test]
fn perplexity_input_that_is_a_device_or_fifo_is_refused() {
    let tmp = temp_dir();
    let fifo = tmp.path().join("fifo.txt");
    mkfifo(&fifo);
    for (input, kind) in [
        (Path::new("/dev/zero"), "character device"),
        (fifo.as_path(), "FIFO"),
    ] {
        let err = fails(&refs(&argv(&[
            &"perplexity",
            &"--checkpoint-dir",
            &model_dir(),
            &"--input",
            &input,
        ])));
        assert!(
            err.contains(&*input.to_string_lossy()) && err.contains(kind),
            "{err}"
        );
    }
    let binary = tmp.path().join("binary.txt");
    std::fs::write(&binary, [0xff, 0xfe, 0x00, 0x80]).unwrap();
    let err = fails(&refs(&argv(&[
        &"perplexity",
        &"--checkpoint-dir",
        &model_dir(),
        &"--input",
        &binary,
    ])));
    assert!(err.contains("binary.txt") && err.contains("UTF-8"), "{err}");
}
