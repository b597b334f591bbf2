//! The whole pipeline through the binary: prepare-data → pretrain (LoRA) → validate →
//! plot → convert-to-hf → perplexity; and a run killed with SIGKILL that resumes to the
//! losses of a run that never stopped.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;

pub fn lit(args: &[&str]) -> String {
    let out = Command::new(bin()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Prepared sample corpus (blocks of 33 tokens) in `root/data`.
pub fn prepared(root: &Path) -> PathBuf {
    let raw = root.join("raw/fortunes");
    std::fs::create_dir_all(&raw).unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample/fortunes-br.txt"),
        raw.join("fortunes-br.txt"),
    )
    .unwrap();
    let data = root.join("data");
    let model = reference_dir("llama");
    lit(&[
        "prepare-data",
        "--source-path",
        s(&root.join("raw")),
        "--checkpoint-dir",
        s(&model),
        "--destination-path",
        s(&data),
        "--doc-separator",
        "%",
        "--max-length",
        "32",
        "--padding",
        "false",
        "--multiple-of",
        "2",
    ]);
    data
}

fn train_args<'a>(data: &'a str, model: &'a str, out: &'a str, steps: &'a str) -> Vec<&'a str> {
    vec![
        "pretrain",
        "--data-dir",
        data,
        "--checkpoint-dir",
        model,
        "--out-dir",
        out,
        "--lora-r",
        "4",
        "--lora-dropout",
        "0.1",
        "--max-steps",
        steps,
        "--batch-size",
        "4",
        "--micro-batch-size",
        "2",
        "--learning-rate",
        "0.003",
        "--warmup-steps",
        "2",
        "--eval-interval",
        "5",
        "--save-interval",
        "5",
        "--eval-max-batches",
        "2",
    ]
}

fn losses(run: &Path) -> Vec<String> {
    std::fs::read_to_string(run.join("metrics.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let c: Vec<&str> = l.split(',').collect();
            format!("{} {} {}", c[0], c[3], c[8])
        })
        .collect()
}

#[test]
fn prepare_train_validate_plot_convert() {
    let root = temp_dir();
    let data = prepared(root.path());
    let model = reference_dir("llama");
    let run = root.path().join("run");
    let out = lit(&train_args(s(&data), s(&model), s(&run), "10"));
    assert_eq!(out.trim(), s(&run.join("final")));
    for f in [
        "hyperparameters.toml",
        "metrics.csv",
        "train.log",
        "step-00000005",
        "final",
    ] {
        assert!(run.join(f).exists(), "{f} missing");
    }
    lit(&[
        "validate",
        "--out-dir",
        s(&run),
        "--data-dir",
        s(&data),
        "--max",
        "2",
        "--batch-size",
        "2",
    ]);
    let csv = std::fs::read_to_string(run.join("validation_results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3, "{csv}"); // header + step-5 + final
    let best = lit(&[
        "plot",
        s(&run),
        "--output",
        s(&root.path().join("c.png")),
        "--best",
    ]);
    assert!(best.contains("\t"), "{best}");
    let hf = root.path().join("hf");
    lit(&[
        "convert-to-hf",
        "--input-path",
        s(&run.join("final")),
        "--output-dir",
        s(&hf),
    ]);
    let text = root.path().join("t.txt");
    std::fs::write(&text, "Quem tudo quer, tudo perde.\n").unwrap();
    let ppl = |args: &[&str]| -> f64 {
        let out = lit(&[
            &["perplexity", "--input", s(&text), "--format", "json"],
            args,
        ]
        .concat());
        serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()["loss"]
            .as_f64()
            .unwrap()
    };
    let merged = ppl(&["--checkpoint-dir", s(&hf)]);
    let adapter = ppl(&[
        "--checkpoint-dir",
        s(&model),
        "--adapter",
        s(&run.join("final")),
    ]);
    let base = ppl(&["--checkpoint-dir", s(&model)]);
    assert!((merged - adapter).abs() < 1e-4, "{merged} vs {adapter}");
    assert!(merged != base);
}

#[test]
fn a_run_killed_with_sigkill_resumes_exactly() {
    let root = temp_dir();
    let data = prepared(root.path());
    let model = reference_dir("llama");
    let straight = root.path().join("straight");
    lit(&train_args(s(&data), s(&model), s(&straight), "40"));

    let killed = root.path().join("killed");
    let args = train_args(s(&data), s(&model), s(&killed), "40");
    let mut child = Command::new(bin())
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once it has logged step 12 (checkpoints at 5 and 10), mid-interval.
    let start = Instant::now();
    loop {
        let rows = std::fs::read_to_string(killed.join("metrics.csv")).unwrap_or_default();
        if rows.lines().count() > 12 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the run did not progress"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !killed.join("final").exists(),
        "the run finished before it was killed"
    );

    let mut resume = args.clone();
    resume.extend(["--resume", "auto"]);
    lit(&resume);
    assert_eq!(losses(&straight), losses(&killed));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn validate_watches_a_run_until_its_final_checkpoint() {
    let root = temp_dir();
    let data = prepared(root.path());
    let model = reference_dir("llama");
    let done = root.path().join("done");
    lit(&train_args(s(&data), s(&model), s(&done), "6"));
    // A "running" run: one checkpoint so far.
    let run = root.path().join("run");
    copy_dir(&done.join("step-00000005"), &run.join("step-00000005"));
    let mut child = Command::new(bin())
        .args([
            "validate",
            "--out-dir",
            s(&run),
            "--data-dir",
            s(&data),
            "--max",
            "1",
            "--watch",
            "1",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let csv = run.join("validation_results.csv");
    let wait_for = |what: &str| {
        let start = Instant::now();
        while !std::fs::read_to_string(&csv)
            .unwrap_or_default()
            .contains(what)
        {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{what} never validated"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for("step-00000005");
    assert!(
        child.try_wait().unwrap().is_none(),
        "validate stopped before the final checkpoint"
    );
    // The run finishes: its final checkpoint appears (atomically, as the trainer writes it).
    copy_dir(&done.join("final"), &root.path().join(".tmp-final"));
    std::fs::rename(root.path().join(".tmp-final"), run.join("final")).unwrap();
    wait_for("final,");
    let status = child.wait().unwrap();
    assert!(status.success());
}
