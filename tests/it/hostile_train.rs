//! Issue 23, training cases: hostile run folders, states and data each give a
//! one-line error naming the file, flag or field at fault and write nothing, or the
//! right answer.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use lit_claire::data::prepare::prepare_data;
use lit_claire::hf::export::{ConvertOptions, convert_to_hf};
use lit_claire::strategy::{DeviceSpec, Precision, Strategy};
use lit_claire::tokenizer::Tokenizer;
use lit_claire::train::batches::{TrainData, TrainDataset};
use lit_claire::train::checkpoint::{self, STATE_FILE};
use lit_claire::train::validate::{ValidateOptions, validate_run};
use lit_claire::train::{TrainConfig, Trainer, load_train_data, pretrain_with_data};
use serde_json::Value;

use crate::common::*;
use crate::data_common::{fortunes_source, options};
use crate::trainer::corpus_samples as samples;

/// A copy of the files of `from` (not recursive) in `to`.
fn copy_files(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
        }
    }
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut Value)) {
    let mut v = read_json(path);
    edit(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn os(s: &str) -> &std::ffi::OsStr {
    std::ffi::OsStr::new(s)
}

/// Stderr of a failed run of the binary: one line, no panic.
fn one_line_failure(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert!(!out.status.success(), "succeeded: {err}");
    assert!(!err.contains("panicked"), "panicked: {err}");
    assert_eq!(err.lines().count(), 1, "not one line: {err}");
    err
}

fn memory_data_with(train: Vec<Vec<u32>>, block_size: usize) -> TrainData {
    let tok = Tokenizer::from_dir(&reference_dir("llama")).unwrap();
    TrainData {
        block_size,
        tokenizer_hash: Some(tok.hash),
        origin: None,
        datasets: vec![TrainDataset {
            name: "fortunes".into(),
            weight: 1.0,
            train: Arc::new(train),
            validation: Arc::new(samples(33, 4, 400)),
        }],
    }
}

fn memory_data() -> TrainData {
    memory_data_with(samples(33, 24, 0), 33)
}

fn train_config(out: &Path) -> TrainConfig {
    TrainConfig {
        data_dir: "in-memory".into(),
        checkpoint_dir: reference_dir("llama"),
        out_dir: out.to_path_buf(),
        micro_batch_size: 2,
        batch_size: 4,
        max_steps: Some(6),
        learning_rate: 3e-3,
        min_lr: 3e-4,
        warmup_steps: 0,
        eval_interval: 3,
        save_interval: 2,
        ..Default::default()
    }
}

fn cpu() -> Strategy {
    Strategy::new(DeviceSpec::Cpu, Precision::True32).unwrap()
}

/// Names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The sample corpus prepared with the model in `model` in `root/name`.
fn prepared_with(root: &Path, model: &Path, name: &str) -> PathBuf {
    let src = fortunes_source(root);
    let dest = root.join(name);
    let mut o = options(&src, &dest);
    o.checkpoint_dir = model.to_path_buf();
    o.multiple_of = 2;
    prepare_data(&o).unwrap();
    dest
}

#[test]
fn issue23_absurd_context_is_refused_before_allocating() {
    let tmp = temp_dir();
    let model = tmp.path().join("huge");
    copy_files(&reference_dir("llama"), &model);
    edit_json(&model.join("config.json"), |v| {
        v["max_position_embeddings"] = 1_000_000_000_000u64.into()
    });
    // prepare-data's default --max-length: refused, naming the field and the flag.
    let src = fortunes_source(tmp.path());
    let dest = tmp.path().join("data");
    let mut o = options(&src, &dest);
    o.checkpoint_dir = model.clone();
    o.max_length = None;
    let e = prepare_data(&o).unwrap_err().to_string();
    assert!(
        e.contains("max_position_embeddings") && e.contains("--max-length"),
        "{e}"
    );
    assert!(!dest.exists());
    // Samples of 1e12 tokens (as that default used to give): refused before the first
    // allocation, naming the data and the model's context; nothing written.
    let data = memory_data_with(samples(33, 24, 0), 1_000_000_000_001);
    let run = tmp.path().join("run");
    let mut cfg = train_config(&run);
    cfg.checkpoint_dir = model.clone();
    let e = Trainer::new(&cfg, data.clone()).err().unwrap().to_string();
    assert!(
        e.contains("1000000000001 tokens")
            && e.contains("max_position_embeddings")
            && e.contains("--max-length"),
        "{e}"
    );
    assert!(!run.exists());
    // validate: the same.
    let run = tmp.path().join("run2");
    let mut cfg = train_config(&run);
    cfg.max_steps = Some(2);
    pretrain_with_data(&cfg, memory_data()).unwrap();
    edit_json(&run.join("final/config.json"), |v| {
        v["max_position_embeddings"] = 1_000_000_000_000u64.into()
    });
    std::fs::remove_dir_all(run.join("step-00000002")).ok();
    let opts = ValidateOptions {
        run: run.clone(),
        max_batches: Some(1),
        batch_size: 2,
        csv: None,
        watch: None,
        cross_document_attention: None,
    };
    let e = validate_run(&opts, &data, &cpu()).unwrap_err().to_string();
    assert!(
        e.contains("1000000000001 tokens") && e.contains("--batch-size"),
        "{e}"
    );
}

#[test]
fn issue23_validate_refuses_max_zero() {
    let tmp = temp_dir();
    let opts = ValidateOptions {
        run: tmp.path().to_path_buf(),
        max_batches: Some(0),
        batch_size: 2,
        csv: None,
        watch: None,
        cross_document_attention: None,
    };
    let e = validate_run(&opts, &memory_data(), &cpu())
        .unwrap_err()
        .to_string();
    assert!(e.contains("--max 0"), "{e}");
    assert!(names(tmp.path()).is_empty());
}

/// A run of 4 steps (checkpoints step-00000002 and step-00000004), interrupted.
fn interrupted_run(out: &Path) -> TrainConfig {
    let mut cfg = train_config(out);
    Trainer::new(&cfg, memory_data())
        .unwrap()
        .run(Some(5))
        .unwrap();
    cfg.resume = Some("auto".into());
    cfg
}

/// A change to a JSON file.
type Edit = Box<dyn Fn(&mut Value)>;

#[test]
fn issue23_a_state_past_the_run_is_refused_on_resume() {
    let tmp = temp_dir();
    let cfg = interrupted_run(tmp.path());
    let state = tmp.path().join("step-00000004").join(STATE_FILE);
    let original = std::fs::read(&state).unwrap();
    let cases: [(&str, Edit, &str); 7] = [
        (
            "step",
            Box::new(|v| v["step"] = 1_000_000_000_000_000u64.into()),
            "step 1000000000000000 is past the end of this run (6 steps",
        ),
        (
            "offset",
            Box::new(|v| v["position"]["offset"] = 10_000.into()),
            "data position 10000 of epoch 0 is past the end of an epoch",
        ),
        (
            "epoch",
            Box::new(|v| v["position"]["epoch"] = 99.into()),
            "epoch 99",
        ),
        (
            "offset in the epoch, beyond the steps",
            Box::new(|v| v["position"]["offset"] = 24.into()),
            "cannot be reached in 4 steps",
        ),
        (
            "evals",
            Box::new(|v| v["evals_without_improvement"] = 50.into()),
            "evals_without_improvement 50",
        ),
        (
            "elapsed",
            Box::new(|v| v["elapsed_s"] = (-5.0).into()),
            "elapsed_s -5",
        ),
        (
            "tokens at step 0",
            Box::new(|v| {
                v["step"] = 0.into();
                v["metrics_rows"] = 0.into();
                v["position"]["offset"] = 0.into();
                v["evals_without_improvement"] = 0.into();
            }),
            "tokens counted in 0 steps",
        ),
    ];
    let before = names(tmp.path());
    let metrics = std::fs::read(tmp.path().join("metrics.csv")).unwrap();
    for (what, edit, want) in cases {
        edit_json(&state, edit);
        let e = Trainer::new(&cfg, memory_data())
            .err()
            .unwrap_or_else(|| panic!("{what}: accepted"))
            .to_string();
        assert!(e.contains(want) && e.contains(STATE_FILE), "{what}: {e}");
        assert_eq!(e.lines().count(), 1, "{e}");
        // Nothing written: no final/, metrics untouched, no lock left.
        assert_eq!(names(tmp.path()), before, "{what}");
        assert_eq!(
            std::fs::read(tmp.path().join("metrics.csv")).unwrap(),
            metrics
        );
        std::fs::write(&state, &original).unwrap();
    }
    // Another seed in the middle of an epoch would draw its rest in another order.
    let mut other_seed = cfg.clone();
    other_seed.seed = 7;
    let e = Trainer::new(&other_seed, memory_data())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("--seed 42"), "{e}");
    // The untouched state resumes and finishes.
    let s = pretrain_with_data(&cfg, memory_data()).unwrap();
    assert_eq!(s.steps, 6);
    // A run finished at its last step resumes to nothing more, not refused.
    let s = pretrain_with_data(&cfg, memory_data()).unwrap();
    assert_eq!(s.steps, 6);
}

#[test]
fn issue23_rotation_renames_before_deleting_and_leftovers_are_swept() {
    let tmp = temp_dir();
    let mut cfg = train_config(tmp.path());
    cfg.max_steps = Some(10);
    cfg.save_interval = 1;
    cfg.eval_interval = 100;
    cfg.max_checkpoints = Some(2);
    Trainer::new(&cfg, memory_data())
        .unwrap()
        .run(Some(5))
        .unwrap();
    let steps = |dir: &Path| -> Vec<String> {
        names(dir)
            .into_iter()
            .filter(|n| n.starts_with("step-"))
            .collect()
    };
    assert_eq!(steps(tmp.path()), ["step-00000004", "step-00000005"]);
    // What a signal during an older version's deletion left: a step folder without
    // its state; and what one during this version's leaves: a trash folder.
    let half = tmp.path().join("step-00000003");
    std::fs::create_dir(&half).unwrap();
    std::fs::write(half.join("optimizer.safetensors"), b"partial").unwrap();
    let trash = tmp.path().join(".trash-step-00000002");
    std::fs::create_dir(&trash).unwrap();
    std::fs::write(trash.join("model.safetensors"), b"partial").unwrap();
    cfg.resume = Some("auto".into());
    let s = pretrain_with_data(&cfg, memory_data()).unwrap();
    assert_eq!(s.steps, 10);
    assert_eq!(steps(tmp.path()), ["step-00000008", "step-00000009"]);
    assert!(!trash.exists());
    assert!(
        !names(tmp.path()).iter().any(|n| n.starts_with('.')),
        "{:?}",
        names(tmp.path())
    );
    let log = std::fs::read_to_string(tmp.path().join("train.log")).unwrap();
    assert!(
        log.contains("step-00000003") && log.contains(".trash-step-00000002"),
        "{log}"
    );
    // A final/ replaced by a later resume goes through the trash too.
    cfg.max_steps = Some(12);
    pretrain_with_data(&cfg, memory_data()).unwrap();
    assert_eq!(
        checkpoint::load_state(&tmp.path().join("final"))
            .unwrap()
            .step,
        12
    );
    assert!(!names(tmp.path()).iter().any(|n| n.starts_with(".trash")));
}

#[test]
fn issue23_out_of_vocabulary_ids_are_refused_before_the_first_step() {
    let tmp = temp_dir();
    // In-memory data with an id one past the model's 512 embeddings.
    let mut train = samples(33, 24, 0);
    train[7][3] = 512;
    let run = tmp.path().join("run");
    let e = Trainer::new(&train_config(&run), memory_data_with(train, 33))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("token id 512") && e.contains("512 token embeddings") && e.contains("llama"),
        "{e}"
    );
    assert!(!run.exists());
    // The issue's case: the tokenizer gained a token the model has no row for, and
    // prepared data holds it.
    let model = tmp.path().join("grown");
    copy_files(&reference_dir("llama"), &model);
    edit_json(&model.join("tokenizer.json"), |v| {
        v["added_tokens"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({
                "id": 512, "content": "quando", "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": false
            }))
    });
    let data = prepared_with(tmp.path(), &model, "data");
    let mut cfg = train_config(&run);
    cfg.checkpoint_dir = model.clone();
    cfg.data_dir = data.clone();
    let e = Trainer::new(&cfg, load_train_data(&data).unwrap())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("token id 512") && e.contains("grown") && e.contains("data"),
        "{e}"
    );
    assert!(!run.exists());
}

/// A LoRA run of 2 steps on `base` (relative to `cwd`) through the binary, in `cwd/run`.
fn lora_run_cli(cwd: &Path, base: &str, data: &Path) {
    let out = Command::new(bin())
        .current_dir(cwd)
        .args([
            os("pretrain"),
            os("--checkpoint-dir"),
            os(base),
            os("--data-dir"),
            data.as_os_str(),
            os("--out-dir"),
            os("run"),
            os("--lora-r"),
            os("4"),
            os("--max-steps"),
            os("2"),
            os("--batch-size"),
            os("2"),
            os("--micro-batch-size"),
            os("2"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn convert(cwd: &Path, input: &str, output: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "convert-to-hf",
        "--input-path",
        input,
        "--output-dir",
        output,
    ];
    args.extend(extra);
    Command::new(bin())
        .current_dir(cwd)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn issue23_an_adapter_is_merged_into_its_own_base_or_refused() {
    let tmp = temp_dir();
    let a = tmp.path().join("A");
    let b = tmp.path().join("B");
    copy_files(&reference_dir("llama"), &a.join("models/llama"));
    copy_files(&reference_dir("llama"), &b.join("models/llama"));
    // B's model: same shapes, other weights.
    let w = b.join("models/llama/model.safetensors");
    let mut t = candle_core::safetensors::load(&w, &candle_core::Device::Cpu).unwrap();
    let name = "model.layers.0.mlp.down_proj.weight";
    let changed = (t[name].clone() * 2.0).unwrap();
    t.insert(name.into(), changed);
    candle_core::safetensors::save(&t, &w).unwrap();
    let data = prepared_with(tmp.path(), &reference_dir("llama"), "data");
    lora_run_cli(&a, "models/llama", &data);
    let state = read_json(&a.join("run/final").join(STATE_FILE));
    let stored = PathBuf::from(state["base_checkpoint_dir"].as_str().unwrap());
    assert!(stored.is_absolute(), "{stored:?}");
    assert!(state["base_fingerprint"].as_str().unwrap().len() > 16);

    // From B, with its own models/llama: merged into A's, as into A's given by hand.
    let out = convert(&b, "../A/run/final", "merged", &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let given = a.join("models/llama");
    let out = convert(
        &b,
        "../A/run/final",
        "by-hand",
        &["--checkpoint-dir", given.to_str().unwrap()],
    );
    assert!(out.status.success());
    assert_eq!(
        std::fs::read(b.join("merged/model.safetensors")).unwrap(),
        std::fs::read(b.join("by-hand/model.safetensors")).unwrap()
    );

    // A state written as older versions did (relative path, no fingerprint) still
    // reads, saying that the path is read from the current folder.
    let final_state = a.join("run/final").join(STATE_FILE);
    let original = std::fs::read(&final_state).unwrap();
    edit_json(&final_state, |v| {
        v["base_checkpoint_dir"] = "models/llama".into();
        v.as_object_mut().unwrap().remove("base_fingerprint");
    });
    let out = convert(&a, "run/final", "old", &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("relative"));
    std::fs::write(&final_state, &original).unwrap();

    // The base at the stored path changed since: refused, nothing written.
    std::fs::copy(&w, a.join("models/llama/model.safetensors")).unwrap();
    let out = convert(&b, "../A/run/final", "wrong", &[]);
    let e = one_line_failure(&out);
    assert!(
        e.contains("other base weights") && e.contains("--checkpoint-dir"),
        "{e}"
    );
    assert!(!b.join("wrong").exists());
    // In-process, the same; and a resume from the changed base is refused too.
    let e = convert_to_hf(&ConvertOptions {
        input: a.join("run/final"),
        output_dir: tmp.path().join("wrong2"),
        base: None,
        dtype: None,
        max_shard_size: 1 << 30,
        overwrite: false,
        license: None,
        repo_id: None,
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("other base weights"), "{e}");
    let mut cfg = train_config(&a.join("run"));
    cfg.checkpoint_dir = a.join("models/llama");
    cfg.data_dir = data.clone();
    cfg.lora_r = 4;
    cfg.batch_size = 2;
    cfg.max_steps = Some(4);
    cfg.resume = Some("auto".into());
    let e = Trainer::new(&cfg, load_train_data(&data).unwrap())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("other base weights"), "{e}");
}

#[test]
fn issue23_a_run_folder_takes_one_run_at_a_time() {
    let tmp = temp_dir();
    let data = prepared_with(tmp.path(), &reference_dir("llama"), "data");
    let run = tmp.path().join("run");
    // Two processes started at once on a new folder: one trains, the other is
    // refused at once (in use, or, if it came late, a folder holding a run).
    let start = || {
        Command::new(bin())
            .args([
                os("pretrain"),
                os("--checkpoint-dir"),
                reference_dir("llama").as_os_str(),
                os("--data-dir"),
                data.as_os_str(),
                os("--out-dir"),
                run.as_os_str(),
                os("--max-steps"),
                os("6"),
                os("--batch-size"),
                os("2"),
                os("--micro-batch-size"),
                os("2"),
                os("--log-interval"),
                os("1"),
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (p1, p2) = (start(), start());
    let outs = [
        p1.wait_with_output().unwrap(),
        p2.wait_with_output().unwrap(),
    ];
    let ok: Vec<_> = outs.iter().filter(|o| o.status.success()).collect();
    assert_eq!(
        ok.len(),
        1,
        "{:?}",
        outs.iter()
            .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
            .collect::<Vec<_>>()
    );
    let loser = outs.iter().find(|o| !o.status.success()).unwrap();
    let e = one_line_failure(loser);
    assert!(
        (e.contains("in use by another run") && e.contains("pid "))
            || e.contains("holds another run"),
        "{e}"
    );
    // The winner's metrics are whole: a header and 6 rows.
    let rows = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    assert_eq!(rows.lines().count(), 7, "{rows}");
    assert!(!run.join(".lock").exists());

    // A lock held by a live process: refused at once, naming it.
    let mut live = Command::new("sleep").arg("60").spawn().unwrap();
    std::fs::write(run.join(".lock"), format!("{}\n", live.id())).unwrap();
    let mut cfg = train_config(&run);
    cfg.data_dir = data.clone();
    cfg.batch_size = 2;
    cfg.max_steps = Some(8);
    cfg.resume = Some("auto".into());
    let e = Trainer::new(&cfg, load_train_data(&data).unwrap())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("in use by another run") && e.contains(&format!("pid {}", live.id())),
        "{e}"
    );
    assert!(run.join(".lock").exists(), "another run's lock is kept");
    live.kill().unwrap();
    live.wait().unwrap();
    // Now that process is gone: its lock does not block the resume.
    let s = pretrain_with_data(&cfg, load_train_data(&data).unwrap()).unwrap();
    assert_eq!(s.steps, 8);
    assert!(!run.join(".lock").exists());
    // A refused new run in a new folder leaves nothing behind.
    let fresh = tmp.path().join("fresh");
    let mut cfg = train_config(&fresh);
    cfg.data_dir = data.clone();
    cfg.batch_size = 10_000;
    let e = Trainer::new(&cfg, load_train_data(&data).unwrap())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("--batch-size"), "{e}");
    assert!(!fresh.exists());
}

#[test]
fn issue23_a_resume_mid_epoch_on_other_data_is_refused() {
    let tmp = temp_dir();
    let data = prepared_with(tmp.path(), &reference_dir("llama"), "data");
    let src = tmp.path().join("raw");
    let other = tmp.path().join("other");
    let mut o = options(&src, &other);
    o.multiple_of = 2;
    o.seed = 1234;
    prepare_data(&o).unwrap();
    let run = tmp.path().join("run");
    let mut cfg = train_config(&run);
    cfg.data_dir = data.clone();
    cfg.max_steps = Some(4);
    Trainer::new(&cfg, load_train_data(&data).unwrap())
        .unwrap()
        .run(Some(2))
        .unwrap();
    let state = checkpoint::load_state(&run.join("step-00000002")).unwrap();
    assert!(state.data_fingerprint.is_some());
    cfg.resume = Some("auto".into());
    cfg.data_dir = other.clone();
    let e = Trainer::new(&cfg, load_train_data(&other).unwrap())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("other data") && e.contains("other"), "{e}");
    cfg.data_dir = data.clone();
    let s = pretrain_with_data(&cfg, load_train_data(&data).unwrap()).unwrap();
    assert_eq!(s.steps, 4);
}

#[test]
fn issue23_validate_refuses_out_of_vocabulary_ids() {
    let tmp = temp_dir();
    let mut cfg = train_config(tmp.path());
    cfg.max_steps = Some(2);
    pretrain_with_data(&cfg, memory_data()).unwrap();
    let mut data = memory_data();
    let mut val = samples(33, 4, 400);
    val[2][5] = 600;
    data.datasets[0].validation = Arc::new(val);
    let opts = ValidateOptions {
        run: tmp.path().to_path_buf(),
        max_batches: Some(1),
        batch_size: 2,
        csv: None,
        watch: None,
        cross_document_attention: None,
    };
    let e = validate_run(&opts, &data, &cpu()).unwrap_err().to_string();
    assert!(
        e.contains("token id 600") && e.contains("validation"),
        "{e}"
    );
    assert!(!tmp.path().join("validation_results.csv").exists());
}
