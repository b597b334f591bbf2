//! prepare-data on bad input, re-runs, and the command line.

use std::path::Path;
use std::process::Command;

use lit_claire::data::reader::PreparedData;

use crate::common::{bin, temp_dir};
use crate::data_common::*;

/// The error of a run that must fail: one line, and nothing that looks complete in `dest`.
fn fails(
    src: &Path,
    dest: &Path,
    tweak: impl FnOnce(&mut lit_claire::data::PrepareOptions),
) -> String {
    let mut o = options(src, dest);
    tweak(&mut o);
    let err = prepare(&o).unwrap_err().to_string();
    assert!(!err.contains('\n'), "one line: {err}");
    let left = entries(dest);
    assert!(left.is_empty(), "left behind: {left:?}");
    err
}

#[test]
fn data_bad_input_gives_one_line_errors() {
    let tmp = temp_dir();
    let root = tmp.path();
    let dest = root.join("out");

    // An empty dataset file, then one of blank documents.
    let src = root.join("empty");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("nothing.txt"), "").unwrap();
    let err = fails(&src, &dest, |_| {});
    assert!(err.contains("nothing") && err.contains("empty"), "{err}");
    std::fs::write(src.join("nothing.txt"), "%\n\n%\n").unwrap();
    let err = fails(&src, &dest, |_| {});
    assert!(
        err.contains("nothing") && err.contains("no documents"),
        "{err}"
    );

    // A folder without document files.
    let src = root.join("nofiles");
    std::fs::create_dir_all(src.join("ds")).unwrap();
    std::fs::write(src.join("ds/README.md"), "hi").unwrap();
    let err = fails(&src, &dest, |_| {});
    assert!(err.contains("ds") && err.contains(".jsonl"), "{err}");

    // A jsonl line that is not JSON, then one without the key.
    let src = root.join("json");
    std::fs::create_dir_all(&src).unwrap();
    let lines = (0..20).map(|i| format!("{{\"text\": \"frase número {i}\", \"id\": {i}}}"));
    let mut body: Vec<String> = lines.collect();
    body.insert(7, "{not json".into());
    std::fs::write(src.join("web.jsonl"), body.join("\n")).unwrap();
    let err = fails(&src, &dest, |_| {});
    assert!(
        err.contains("web.jsonl:8") && err.contains("--skip-bad-lines"),
        "{err}"
    );
    body[7] = "{\"content\": \"x\"}".into();
    std::fs::write(src.join("web.jsonl"), body.join("\n")).unwrap();
    let err = fails(&src, &dest, |_| {});
    assert!(
        err.contains("web.jsonl:8") && err.contains("\"text\""),
        "{err}"
    );
    // ... or counted and skipped.
    let mut o = options(&src, &dest);
    o.read.skip_bad_lines = true;
    let report = prepare(&o).unwrap();
    let d = &report.datasets[0];
    assert_eq!(d.bad_lines, 1);
    assert_eq!(d.train.documents + d.validation.documents, 20);
    std::fs::remove_dir_all(&dest).unwrap();

    // A model folder without tokenizer.json.
    let src = fortunes_source(root);
    let no_tok = root.join("model");
    std::fs::create_dir_all(&no_tok).unwrap();
    std::fs::copy(model_dir().join("config.json"), no_tok.join("config.json")).unwrap();
    let err = fails(&src, &dest, |o| o.checkpoint_dir = no_tok.clone());
    assert!(err.contains("tokenizer.json"), "{err}");

    // A destination that cannot be created.
    let file = root.join("a-file");
    std::fs::write(&file, "x").unwrap();
    let err = prepare(&options(&src, &file.join("out")))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--destination-path") && !err.contains('\n'),
        "{err}"
    );

    // Bad flags, all named at once.
    let err = fails(&src, &dest, |o| {
        o.val_fraction = 1.5;
        o.multiple_of = 0;
    });
    assert!(
        err.contains("--val-fraction") && err.contains("--multiple-of"),
        "{err}"
    );
    let err = fails(&src, &dest, |o| o.turn_pattern = "[unclosed".into());
    assert!(err.contains("--turn-pattern"), "{err}");

    // No output folder, no data.
    let err = PreparedData::open(&root.join("missing"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("prepare-data"), "{err}");
}

#[test]
fn data_rerun_skips_complete_datasets_and_resumes() {
    let tmp = temp_dir();
    let root = tmp.path();
    let src = fortunes_source(root);
    // A second dataset that fails: the first one completes, metadata.json is not written.
    std::fs::write(src.join("z-broken.jsonl"), "{\"text\": \"ok\"}\nbroken\n").unwrap();
    let dest = root.join("out");
    let err = prepare(&options(&src, &dest)).unwrap_err().to_string();
    assert!(err.contains("z-broken.jsonl:2"), "{err}");
    assert_eq!(entries(&dest), ["fortunes-br"]);
    let err = PreparedData::open(&dest).unwrap_err().to_string();
    assert!(err.contains("incomplete"), "{err}");
    let first = tree(&dest.join("fortunes-br"));

    // Fixed, the re-run keeps the finished dataset and completes the rest.
    std::fs::write(
        src.join("z-broken.jsonl"),
        "{\"text\": \"ok\"}\n{\"text\": \"fine\"}\n",
    )
    .unwrap();
    let report = prepare(&options(&src, &dest)).unwrap();
    let skipped: Vec<(&str, bool)> = report
        .datasets
        .iter()
        .map(|d| (d.name.as_str(), d.skipped))
        .collect();
    assert_eq!(skipped, [("fortunes-br", true), ("z-broken", false)]);
    assert_eq!(tree(&dest.join("fortunes-br")), first);
    assert_eq!(PreparedData::open(&dest).unwrap().datasets.len(), 2);

    // Other settings: refused without --overwrite, redone with it.
    let mut o = options(&src, &dest);
    o.max_length = Some(32);
    let err = prepare(&o).unwrap_err().to_string();
    assert!(
        err.contains("--overwrite") && err.contains("fortunes-br"),
        "{err}"
    );
    o.overwrite = true;
    let report = prepare(&o).unwrap();
    assert!(report.datasets.iter().all(|d| !d.skipped));
    assert_eq!(PreparedData::open(&dest).unwrap().block_size, 33);
    assert_eq!(entries(&dest), ["fortunes-br", "metadata.json", "z-broken"]);
}

#[test]
fn data_cli_prepare_data() {
    let tmp = temp_dir();
    let src = fortunes_source(tmp.path());
    let dest = tmp.path().join("out");
    let out = Command::new(bin())
        .args(["prepare-data", "--source-path"])
        .arg(&src)
        .arg("--checkpoint-dir")
        .arg(model_dir())
        .arg("--destination-path")
        .arg(&dest)
        .args([
            "--doc-separator",
            "%",
            "--padding",
            "false",
            "--multiple-of",
            "4",
            "--format",
            "json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Default --max-length: the model's context (256), so 257 tokens per sample.
    assert_eq!(report["block_size"], 257);
    assert_eq!(
        report["datasets"][0]["train"]["shards"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
    let data = PreparedData::open(&dest).unwrap();
    assert!(!data.metadata.padding);
    assert_eq!(data.datasets[0].train.sample(0).unwrap().len(), 257);

    let out = Command::new(bin())
        .args([
            "prepare-data",
            "--source-path",
            "/nonexistent",
            "--checkpoint-dir",
        ])
        .arg(model_dir())
        .arg("--destination-path")
        .arg(&dest)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("/nonexistent"), "{err}");
}
