//! `lit-claire demo`, as a new user runs it: the built-in model, pretrained on English
//! fortunes, is moved toward the Portuguese sample corpus, and the run's evidence (the
//! convergence plot, the validation CSV, demo.json) is written and named.

use std::process::Command;

use crate::common::*;

#[test]
fn demo_lowers_the_validation_loss_clearly_and_names_its_outputs() {
    let dir = temp_dir();
    let out_dir = dir.path().join("demo");
    let run = |extra: &[&str]| {
        Command::new(bin())
            .arg("demo")
            .arg("--out-dir")
            .arg(&out_dir)
            .args(extra)
            .env("RAYON_NUM_THREADS", "2")
            .output()
            .unwrap()
    };
    let o = run(&[]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );

    let report = read_json(&out_dir.join("demo.json"));
    let (before, after) = (
        report["base_val_loss"].as_f64().unwrap(),
        report["tuned_val_loss"].as_f64().unwrap(),
    );
    // A drop a person notices, not noise.
    assert!(before - after > 0.5, "validation loss {before} -> {after}");

    // Each output exists and is named at the end of the output.
    let plot = out_dir.join("convergence.png");
    let csv = out_dir.join("run/validation_results.csv");
    for p in [&plot, &csv, &out_dir.join("demo.json")] {
        assert!(p.is_file(), "{} missing", p.display());
        assert!(
            stdout.contains(&p.display().to_string()),
            "{} not named in:\n{stdout}",
            p.display()
        );
    }
    assert!(
        stdout.contains(&format!("{before:.4} -> {after:.4}")),
        "{stdout}"
    );
    let png = std::fs::read(&plot).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");

    // The CSV: the base at step 0, then every checkpoint, the last being the final loss.
    let text = std::fs::read_to_string(&csv).unwrap();
    let rows: Vec<Vec<&str>> = text
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    assert_eq!(&rows[0][..3], &["base", "0", "fortunes"], "{text}");
    assert!(rows.len() >= 3, "{text}");
    let fin = rows.iter().find(|r| r[0] == "final").expect("final scored");
    assert_eq!(fin[3].parse::<f64>().unwrap(), after, "{text}");
    assert_eq!(rows[0][3].parse::<f64>().unwrap(), before, "{text}");

    // A second demo into the same folder is refused without --overwrite.
    let o = run(&["--max-steps", "1"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--overwrite"), "{err}");
}
