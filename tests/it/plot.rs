//! `lit-claire plot`: images of fabricated runs, the best checkpoint, bad input.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use lit_claire::plot::{LossSource, PlotOptions, XAxis, best_checkpoint, plot_runs, read_metrics};

use crate::common::{bin, temp_dir};

const TOKENS_PER_STEP: u64 = 4096;
const SECONDS_PER_STEP: f64 = 9.0;

/// A fabricated run: `steps` logged steps of a loss falling from ~10 to `floor`, an
/// evaluation every 50 steps, checkpoints every 100 and at the end.
struct RunSpec {
    steps: u64,
    floor: f64,
    /// Validation during training (and in `training_state.json`).
    online: bool,
    /// `validation_results.csv`: `(checkpoint, step, dataset, loss)`.
    offline: Vec<(String, u64, &'static str, f64)>,
}

fn curve(step: u64, floor: f64) -> f64 {
    floor + (10.0 - floor) * (-(step as f64) / 25.0).exp()
}

fn val_at(step: u64, floor: f64) -> f64 {
    // Falls, then rises a little: overfitting after step 100.
    curve(step, floor) + 0.1 + 0.002 * (step as f64 - 100.0).max(0.0)
}

fn checkpoints(steps: u64) -> Vec<(String, u64)> {
    let mut c: Vec<(String, u64)> = (100..=steps)
        .step_by(100)
        .map(|s| (format!("step-{s:08}"), s))
        .collect();
    c.push(("final".into(), steps));
    c
}

fn write_run(dir: &Path, spec: &RunSpec) {
    std::fs::create_dir_all(dir).unwrap();
    let mut csv = String::from(
        "step,epoch,tokens,loss,learning_rate,grad_norm,tokens_per_s,elapsed_s,val_loss,val_ppl,val_loss/wiki\n",
    );
    let mut seed = 12345u64;
    for step in 1..=spec.steps {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let noise = ((seed >> 33) as f64 / (1u64 << 31) as f64 - 0.5) * 0.2;
        let loss = curve(step, spec.floor) + noise;
        let (val, ppl) = if spec.online && step % 50 == 0 {
            let v = val_at(step, spec.floor);
            (format!("{v:.5}"), format!("{:.3}", v.exp()))
        } else {
            (String::new(), String::new())
        };
        writeln!(
            csv,
            "{step},0,{},{loss:.5},3e-4,1.25,455.1,{:.2},{val},{ppl},{val}",
            step * TOKENS_PER_STEP,
            step as f64 * SECONDS_PER_STEP
        )
        .unwrap();
    }
    std::fs::write(dir.join("metrics.csv"), csv).unwrap();
    for (name, step) in checkpoints(spec.steps) {
        let d = dir.join(&name);
        std::fs::create_dir_all(&d).unwrap();
        let val = if spec.online {
            serde_json::json!(val_at(step, spec.floor))
        } else {
            serde_json::Value::Null
        };
        let state = serde_json::json!({
            "step": step, "tokens": step * TOKENS_PER_STEP, "val_loss": val, "epoch": 0
        });
        std::fs::write(d.join("training_state.json"), state.to_string()).unwrap();
    }
    if !spec.offline.is_empty() {
        let mut csv = String::from(
            "checkpoint,step,dataset,loss,perplexity,tokens,batch_size,elapsed_s,peak_memory_mb\n",
        );
        for (ckpt, step, dataset, loss) in &spec.offline {
            writeln!(
                csv,
                "{ckpt},{step},{dataset},{loss},{:.3},8192,4,3.5,512",
                loss.exp()
            )
            .unwrap();
        }
        std::fs::write(dir.join("validation_results.csv"), csv).unwrap();
    }
}

/// Offline results of every checkpoint on two datasets; the mean is lowest at step 100.
fn offline_rows(steps: u64, floor: f64) -> Vec<(String, u64, &'static str, f64)> {
    let mut rows = Vec::new();
    for (name, step) in checkpoints(steps) {
        let base = val_at(step, floor);
        rows.push((name.clone(), step, "wiki", base - 0.2));
        rows.push((name, step, "news", base + 0.3));
    }
    rows
}

/// `run-a` (online and offline validation, 300 steps, floor 2.0) and `run-b` (online
/// only, 200 steps, floor 2.4).
fn two_runs(root: &Path) -> Vec<PathBuf> {
    let a = root.join("run-a");
    write_run(
        &a,
        &RunSpec {
            steps: 300,
            floor: 2.0,
            online: true,
            offline: offline_rows(300, 2.0),
        },
    );
    let b = root.join("run-b");
    write_run(
        &b,
        &RunSpec {
            steps: 200,
            floor: 2.4,
            online: true,
            offline: vec![],
        },
    );
    vec![a, b]
}

/// Width and height from a PNG's IHDR chunk.
fn png_size(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    assert_eq!(&bytes[12..16], b"IHDR");
    let be = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().unwrap());
    (be(16), be(20))
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp"))
        .collect()
}

#[test]
fn plot_png_of_two_runs() {
    let tmp = temp_dir();
    let runs = two_runs(tmp.path());
    let out = tmp.path().join("img/curves.png");
    let summary = plot_runs(&runs, &PlotOptions::new(&out)).unwrap();
    assert_eq!(png_size(&out), (1200, 700));
    assert!(
        summary.y.log,
        "a loss falling 10 -> 2 is drawn on a log axis"
    );
    assert!(summary.y.lo < 2.0 && summary.y.hi > 10.0, "{:?}", summary.y);
    let names: Vec<&str> = summary.runs.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["run-a", "run-b"]);
    let a = &summary.runs[0];
    assert_eq!((a.train_points, a.online_val_points), (300, 6));
    // step-00000300 and final are the same step: one point each per dataset.
    assert_eq!(a.offline_points, 6, "3 checkpoint steps x 2 datasets");
    assert_eq!(a.datasets, ["news", "wiki"]);
    assert_eq!(summary.runs[1].offline_points, 0);
    assert_eq!(summary.x_range.0, 0.0);
    assert!(summary.x_range.1 >= 300.0 && summary.x_range.1 < 320.0);
    assert!(leftovers(&tmp.path().join("img")).is_empty());
}

#[test]
fn plot_svg_names_runs_series_and_axes() {
    let tmp = temp_dir();
    let mut runs = two_runs(tmp.path());
    let c = tmp.path().join("train-only");
    write_run(
        &c,
        &RunSpec {
            steps: 120,
            floor: 3.0,
            online: false,
            offline: vec![],
        },
    );
    runs.push(c);
    let out = tmp.path().join("curves.svg");
    let summary = plot_runs(&runs, &PlotOptions::new(&out)).unwrap();
    assert_eq!(summary.runs.len(), 3);
    let svg = std::fs::read_to_string(&out).unwrap();
    assert!(svg.starts_with("<svg"), "{}", &svg[..60]);
    for text in [
        "run-a",
        "run-b",
        "train-only",
        "Training and validation loss",
        "optimizer step",
        "loss (nats/token, log scale)",
        "training loss (smoothed)",
        "validation during training",
        "validate: wiki",
        "validate: news",
        "validate: mean of datasets",
    ] {
        assert!(svg.contains(text), "SVG lacks {text:?}");
    }
}

#[test]
fn plot_against_tokens_and_hours() {
    let tmp = temp_dir();
    let runs = two_runs(tmp.path());
    let out = tmp.path().join("tokens.svg");
    let opts = PlotOptions {
        x: XAxis::Tokens,
        ..PlotOptions::new(&out)
    };
    let s = plot_runs(&runs, &opts).unwrap();
    let max_tokens = 300.0 * TOKENS_PER_STEP as f64;
    assert!(s.x_range.1 >= max_tokens && s.x_range.1 < 1.05 * max_tokens);
    let svg = std::fs::read_to_string(&out).unwrap();
    assert!(svg.contains("training tokens"));
    assert!(svg.contains("1.2M"), "token ticks in SI units");

    let out = tmp.path().join("hours.png");
    let opts = PlotOptions {
        x: XAxis::Hours,
        ..PlotOptions::new(&out)
    };
    let s = plot_runs(&runs, &opts).unwrap();
    let hours = 300.0 * SECONDS_PER_STEP / 3600.0;
    assert!(
        s.x_range.1 >= hours && s.x_range.1 < 1.05 * hours,
        "{:?}",
        s.x_range
    );
    assert_eq!(png_size(&out), (1200, 700));
}

#[test]
fn plot_bounds_give_a_linear_axis() {
    let tmp = temp_dir();
    let runs = two_runs(tmp.path());
    let out = tmp.path().join("zoom.png");
    let opts = PlotOptions {
        min_loss: Some(1.8),
        max_loss: Some(3.5),
        ..PlotOptions::new(&out)
    };
    let s = plot_runs(&runs, &opts).unwrap();
    assert!(!s.y.log);
    assert_eq!((s.y.lo, s.y.hi), (1.8, 3.5));
    assert!(s.y.ticks.iter().all(|t| (1.8..=3.5).contains(t)));
    assert!(out.is_file());
}

#[test]
fn best_checkpoint_prefers_the_offline_mean() {
    let tmp = temp_dir();
    let runs = two_runs(tmp.path());
    // run-a: offline mean lowest at step 100 (val rises after it).
    let best = best_checkpoint(&runs[0]).unwrap().unwrap();
    assert_eq!(best.checkpoint, "step-00000100");
    assert_eq!(best.step, 100);
    assert_eq!(best.source, LossSource::OfflineMean);
    let expected = val_at(100, 2.0) + 0.05;
    assert!((best.val_loss - expected).abs() < 1e-9, "{}", best.val_loss);
    // run-b: online validation only.
    let best = best_checkpoint(&runs[1]).unwrap().unwrap();
    assert_eq!(
        (best.checkpoint.as_str(), best.source),
        ("step-00000100", LossSource::Online)
    );
}

#[test]
fn best_checkpoint_online_from_metrics_and_skips_incomplete_or_deleted() {
    let tmp = temp_dir();
    let run = tmp.path().join("run");
    // Offline rows: step-00000200 is scored on one dataset only (validate still running)
    // and a deleted checkpoint looks best: neither may win.
    let mut offline = vec![
        ("step-00000100".to_string(), 100, "wiki", 2.5),
        ("step-00000100".to_string(), 100, "news", 2.7),
        ("step-00000200".to_string(), 200, "wiki", 1.0),
        ("step-00000300".to_string(), 300, "wiki", 2.4),
        ("step-00000300".to_string(), 300, "news", 2.6),
    ];
    offline.push(("/elsewhere/step-00000050".to_string(), 50, "wiki", 0.5));
    offline.push(("/elsewhere/step-00000050".to_string(), 50, "news", 0.5));
    write_run(
        &run,
        &RunSpec {
            steps: 300,
            floor: 2.0,
            online: true,
            offline,
        },
    );
    let best = best_checkpoint(&run).unwrap().unwrap();
    assert_eq!(
        (best.checkpoint.as_str(), best.step),
        ("step-00000300", 300)
    );
    assert!((best.val_loss - 2.5).abs() < 1e-12);

    // Without offline results and with `val_loss: null` in the states, metrics.csv's
    // evaluation rows at the checkpoint steps decide.
    std::fs::remove_file(run.join("validation_results.csv")).unwrap();
    for name in ["step-00000100", "step-00000200", "step-00000300", "final"] {
        let p = run.join(name).join("training_state.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        v["val_loss"] = serde_json::Value::Null;
        std::fs::write(&p, v.to_string()).unwrap();
    }
    let best = best_checkpoint(&run).unwrap().unwrap();
    assert_eq!(
        (best.checkpoint.as_str(), best.source),
        ("step-00000100", LossSource::Online)
    );
    assert!((best.val_loss - val_at(100, 2.0)).abs() < 1e-4);

    // A run with no validation at all has no best checkpoint.
    let c = tmp.path().join("train-only");
    write_run(
        &c,
        &RunSpec {
            steps: 100,
            floor: 3.0,
            online: false,
            offline: vec![],
        },
    );
    assert_eq!(best_checkpoint(&c).unwrap(), None);
}

#[test]
fn metrics_reader_tolerates_a_live_run() {
    let tmp = temp_dir();
    let p = tmp.path().join("metrics.csv");
    std::fs::write(
        &p,
        "step,tokens,loss,val_loss,val_loss/wiki,note\n\
         1,4096,9.5,,,\n\
         2,8192,9.1,9.3,9.2,resumed\n\
         step,tokens,loss,val_loss,val_loss/wiki,note\n\
         3,12288,8.7,,,\n\
         4,16",
    )
    .unwrap();
    let rows = read_metrics(&p).unwrap();
    assert_eq!(
        rows.len(),
        3,
        "repeated header skipped, half-written last row left out"
    );
    assert_eq!(rows[1].val_loss, Some(9.3));
    assert_eq!(
        rows[1].extra.get("val_loss/wiki").map(String::as_str),
        Some("9.2")
    );
    assert_eq!(
        rows[1].extra.get("note").map(String::as_str),
        Some("resumed")
    );
    assert!(rows[0].extra.is_empty());
    assert_eq!(
        (rows[2].step, rows[2].tokens, rows[2].elapsed_s),
        (3, Some(12288), None)
    );

    std::fs::write(&p, "step,loss\n1,9.5\n2,oops\n").unwrap();
    let err = read_metrics(&p).unwrap_err().to_string();
    assert!(
        err.contains("line 3") && err.contains("`loss`") && err.contains("oops"),
        "{err}"
    );
}

/// Run the binary; (exit ok, stdout, stderr).
fn lit_claire(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin()).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn cli_plot_and_best() {
    let tmp = temp_dir();
    let runs = two_runs(tmp.path());
    let (a, b) = (runs[0].to_str().unwrap(), runs[1].to_str().unwrap());
    let out = tmp.path().join("c.png");
    let (ok, stdout, stderr) = lit_claire(&[
        "plot",
        a,
        b,
        "--output",
        out.to_str().unwrap(),
        "--x",
        "tokens",
        "--best",
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(png_size(&out), (1200, 700));
    let lines: Vec<Vec<&str>> = stdout.lines().map(|l| l.split('\t').collect()).collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert_eq!(&lines[0][..3], [a, "step-00000100", "100"]);
    assert_eq!(&lines[1][..3], [b, "step-00000100", "100"]);
    let loss: f64 = lines[0][3].parse().unwrap();
    assert!((loss - (val_at(100, 2.0) + 0.05)).abs() < 1e-5);

    // --best alone prints without drawing.
    let (ok, stdout, _) = lit_claire(&["plot", a, "--best"]);
    assert!(ok);
    assert_eq!(stdout.lines().count(), 1);
}

#[test]
fn cli_bad_input_is_one_line_and_writes_nothing() {
    let tmp = temp_dir();
    let runs = two_runs(tmp.path());
    let no_metrics = tmp.path().join("empty-run");
    std::fs::create_dir_all(&no_metrics).unwrap();
    let a = runs[0].to_str().unwrap();
    let png = tmp.path().join("out/c.png");
    let png = png.to_str().unwrap();
    let missing = tmp.path().join("no-such-run");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![missing.to_str().unwrap(), "--output", png],
            "no-such-run not found",
        ),
        (
            vec![a, no_metrics.to_str().unwrap(), "--output", png],
            "metrics.csv not found",
        ),
        (
            vec![a, "--output", "curves.bmp"],
            "unknown image type `.bmp`",
        ),
        (
            vec![a, "--output", png, "--min-loss", "3", "--max-loss", "2"],
            "--min-loss 3 must be below",
        ),
        (vec![a], "nothing to do"),
    ];
    for (args, expected) in cases {
        let mut full = vec!["plot"];
        full.extend(&args);
        let (ok, stdout, stderr) = lit_claire(&full);
        assert!(!ok, "{args:?} succeeded");
        assert!(stdout.is_empty(), "{args:?}: {stdout}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("error: ") && stderr.contains(expected),
            "{args:?}: {stderr}"
        );
    }
    assert!(!tmp.path().join("out").exists(), "nothing written");
    assert!(!Path::new("curves.bmp").exists());
}

#[test]
fn best_checkpoint_counts_only_the_newest_data_of_a_dataset() {
    // A dataset re-prepared between two `validate` runs, the second one interrupted:
    // step 100 was scored (very low) on the old data only. Not comparable: step 200,
    // the only one scored on the current data, is the best.
    let tmp = temp_dir();
    let run = tmp.path().join("run");
    for step in [100u64, 200] {
        let d = run.join(format!("step-{step:08}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("training_state.json"),
            format!("{{\"step\": {step}}}"),
        )
        .unwrap();
    }
    let csv = "checkpoint,step,dataset,loss,perplexity,tokens,batch_size,elapsed_s,peak_memory_mb,data\n\
               step-00000100,100,wiki,0.5,,,,,,old\n\
               step-00000200,200,wiki,2.5,,,,,,old\n\
               step-00000200,200,wiki,2.0,,,,,,new\n";
    std::fs::write(run.join("validation_results.csv"), csv).unwrap();
    let best = best_checkpoint(&run).unwrap().unwrap();
    assert_eq!(
        (best.checkpoint.as_str(), best.source),
        ("step-00000200", LossSource::OfflineMean)
    );
    assert_eq!(best.val_loss, 2.0);
}
