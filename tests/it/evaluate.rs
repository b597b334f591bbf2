//! `evaluate` against lm-evaluation-harness 0.4 and on bad input.
//!
//! The expected numbers in `tests/fixtures/eval/expected/` are the harness's own
//! (`lm_eval --model hf --log_samples`, float32, `max_length=32` so that rolling
//! windows and truncation happen), written by `utils/check_lm_eval.py` for the tasks
//! of `tests/fixtures/eval/tasks/`: JSON Lines tasks of ours (each turned into a
//! harness YAML by the script) and harness YAMLs (JSON and CSV data, Jinja templates).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use candle_core::Tensor;
use lit_claire::eval::{EvalOptions, TaskResult, evaluate, load_tasks};
use lit_claire::hf::load_model;
use lit_claire::model::BuildOptions;
use lit_claire::model::engine::{self, KvCache};
use lit_claire::tokenizer::Tokenizer;
use serde_json::Value;

use crate::common::*;

const FAMILIES: [&str; 6] = ["llama", "mistral", "falcon", "gpt2", "gpt_neox", "gpt_neo"];

fn tasks_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/eval/tasks")
}

fn expected_of(name: &str) -> Value {
    read_json(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/eval/expected")
            .join(format!("{name}.json")),
    )
}

fn run_tasks(dir: &Path, max_length: Option<usize>, batch_size: usize) -> Vec<TaskResult> {
    let model = load_model(dir, &BuildOptions::cpu_f32(), None).unwrap();
    let tok = Tokenizer::from_dir(dir).unwrap();
    let tasks = load_tasks(&[tasks_dir()]).unwrap();
    let opts = EvalOptions {
        batch_size,
        max_length,
        ..EvalOptions::default()
    };
    evaluate(&model, &tok, &tasks, &opts).unwrap()
}

/// Every request's log-likelihood within 1e-4 of the harness's, `is_greedy`, generated
/// texts and the accuracies (acc, acc_norm, exact match) identical with their standard
/// errors. A perplexity is `exp` of a mean log-likelihood, and the harness's are
/// float32 sums: ours agree to 1e-5 relative (word perplexity of a 4-word text moves
/// by 2.5e-5 relative per 1e-4 of log-likelihood), and so do their bootstrap errors.
fn assert_parity(name: &str, results: &[TaskResult], exp: &Value) {
    assert_parity_within(name, results, exp, 1e-4, 1e-5)
}

/// [`assert_parity`] with log-likelihoods within `tol` and perplexities within `ppl_tol`
/// relative.
fn assert_parity_within(name: &str, results: &[TaskResult], exp: &Value, tol: f64, ppl_tol: f64) {
    let mut over = Vec::new();
    let mut worst = 0f64;
    let mut n = 0;
    for s in exp["samples"].as_array().unwrap() {
        let (task, doc, index) = (
            s["task"].as_str().unwrap(),
            s["doc_id"].as_u64().unwrap() as usize,
            s["index"].as_u64().unwrap() as usize,
        );
        let r = results
            .iter()
            .find(|r| r.task == task)
            .unwrap_or_else(|| panic!("{name}: no task {task}"));
        let ours = r
            .samples
            .iter()
            .find(|x| x.doc_id == doc && x.index == index)
            .unwrap_or_else(|| panic!("{name}: no sample {task}/{doc}/{index}"));
        if let Some(ll) = s["loglikelihood"].as_f64() {
            let d = (ours.loglikelihood.unwrap() - ll).abs();
            if d >= 1e-4 {
                over.push(format!("{task}/{doc}/{index}: {d:.1e}"));
            }
            assert!(
                d < tol,
                "{name} {task} doc {doc} choice {index}: ours {:?} harness {ll}",
                ours.loglikelihood
            );
            worst = worst.max(d);
        }
        if let Some(g) = s["is_greedy"].as_bool() {
            assert_eq!(
                ours.is_greedy,
                Some(g),
                "{name} {task} doc {doc} choice {index}: is_greedy"
            );
        }
        if let Some(t) = s["response"].as_str() {
            assert_eq!(
                ours.response.as_deref(),
                Some(t),
                "{name} {task} doc {doc}: generated text"
            );
        }
        n += 1;
    }
    eprintln!(
        "{name}: {n} requests, max |Δ loglikelihood| {worst:.2e}; {} over 1e-4: {over:?}",
        over.len()
    );
    for m in exp["metrics"].as_array().unwrap() {
        let (task, metric) = (m["task"].as_str().unwrap(), m["metric"].as_str().unwrap());
        let r = results.iter().find(|r| r.task == task).unwrap();
        let ours = r
            .metrics
            .iter()
            .find(|x| x.metric == metric)
            .unwrap_or_else(|| panic!("{name}: no {task} {metric}"));
        let want = m["value"].as_f64().unwrap();
        let tol = if metric.contains("perplexity") || metric == "bits_per_byte" {
            ppl_tol
        } else {
            1e-12
        };
        assert!(
            (ours.value - want).abs() <= tol * want.abs().max(1.0),
            "{name} {task} {metric}: ours {} harness {want}",
            ours.value
        );
        match m["stderr"].as_f64() {
            Some(se) => {
                let got = ours
                    .stderr
                    .unwrap_or_else(|| panic!("{name} {task} {metric}: no stderr"));
                assert!(
                    (got - se).abs() <= tol * se.abs().max(1.0),
                    "{name} {task} {metric} stderr: ours {got} harness {se}"
                );
            }
            None => assert_eq!(
                ours.stderr, None,
                "{name} {task} {metric}: the harness reports no stderr"
            ),
        }
    }
}

#[test]
fn scores_as_lm_evaluation_harness_does_on_every_family() {
    for family in FAMILIES {
        let exp = expected_of(family);
        let max_len = exp["max_length"]
            .as_u64()
            .map(|n| n as usize)
            .filter(|&n| n > 0);
        // Two batch sizes: batching must not change a number.
        let results = run_tasks(&reference_dir(family), max_len, 3);
        assert_parity(family, &results, &exp);
        if family == "llama" {
            let again = run_tasks(&reference_dir(family), max_len, 64);
            assert_parity(family, &again, &exp);
        }
    }
}

/// A prefix run once into a KV cache, expanded to several rows and continued, scores
/// each continuation as the full rows do.
#[test]
fn shared_prefix_scores_as_full_rows_on_every_family() {
    for family in FAMILIES {
        let model = load_model(&reference_dir(family), &BuildOptions::cpu_f32(), None).unwrap();
        let prefix: Vec<u32> = (0..13).map(|i| (i * 37 + 5) % 500).collect();
        let tails: [Vec<u32>; 3] = [
            vec![7, 8, 9, 10],
            vec![100, 200, 300, 400],
            vec![42, 43, 44, 45],
        ];
        let targets: Vec<u32> = tails
            .iter()
            .flat_map(|t| t.iter().map(|x| (x + 1) % 500))
            .collect();
        let dev = model.device().clone();
        // Full rows.
        let full: Vec<u32> = tails
            .iter()
            .flat_map(|t| prefix.iter().chain(t).copied())
            .collect();
        let full_t: Vec<u32> = tails
            .iter()
            .flat_map(|t| {
                let mut v = vec![0u32; prefix.len()];
                v.extend(t.iter().map(|x| (x + 1) % 500));
                v
            })
            .collect();
        let n = prefix.len() + 4;
        let whole = engine::score(
            &model,
            &Tensor::from_vec(full, (3, n), &dev).unwrap(),
            None,
            &full_t,
        )
        .unwrap();
        // Prefix once, then the three tails.
        let mut cache = KvCache::new(model.cfg.n_layer);
        engine::prefill(
            &model,
            &Tensor::from_vec(prefix.clone(), (1, prefix.len()), &dev).unwrap(),
            &mut cache,
        )
        .unwrap();
        let mut rows = cache.select_rows(&[0, 0, 0]).unwrap();
        let ids: Vec<u32> = tails.iter().flatten().copied().collect();
        let after = engine::score_after(
            &model,
            &Tensor::from_vec(ids, (3, 4), &dev).unwrap(),
            &mut rows,
            &targets,
        )
        .unwrap();
        for r in 0..3 {
            for i in 0..4 {
                let (a, b) = (whole.nll[r * n + prefix.len() + i], after.nll[r * 4 + i]);
                assert!(
                    (a - b).abs() < 1e-4,
                    "{family} row {r} token {i}: {a} vs {b}"
                );
                assert_eq!(
                    whole.greedy[r * n + prefix.len() + i],
                    after.greedy[r * 4 + i],
                    "{family}"
                );
            }
        }
    }
}

/// The bad inputs: each stops with one line naming the file and line, and nothing is
/// written for the task.
fn refused(files: &[(&str, &str)], wants: &[&str]) {
    let tmp = temp_dir();
    for (name, text) in files {
        std::fs::write(tmp.path().join(name), text).unwrap();
    }
    let target = tmp.path().join(files[0].0);
    let e = load_tasks(std::slice::from_ref(&target))
        .unwrap_err()
        .to_string();
    assert!(!e.contains('\n'), "not one line: {e}");
    for w in wants {
        assert!(e.contains(w), "{e:?} lacks {w:?}");
    }
    // Through the binary: a non-zero exit, the same line, no CSV.
    let csv = tmp.path().join("eval.csv");
    let out = Command::new(bin())
        .args(["evaluate", "--checkpoint-dir"])
        .arg(reference_dir("llama"))
        .arg("--tasks")
        .arg(&target)
        .arg("--csv")
        .arg(&csv)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&e), "{err}");
    assert!(!csv.exists());
}

#[test]
fn an_empty_choice_list_is_refused_at_its_line() {
    refused(
        &[(
            "t.jsonl",
            "{\"task\": \"t\", \"type\": \"multiple_choice\", \"context\": \"a\", \"choices\": [\" b\"], \"gold\": 0}\n\n{\"task\": \"t\", \"type\": \"multiple_choice\", \"context\": \"a\", \"choices\": [], \"gold\": 0}\n",
        )],
        &["t.jsonl:3:", "choice list is empty"],
    );
    refused(
        &[
            (
                "t.yaml",
                "task: t\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: d.jsonl\ntest_split: test\noutput_type: multiple_choice\ndoc_to_text: q\ndoc_to_target: 0\ndoc_to_choice: c\n",
            ),
            (
                "d.jsonl",
                "{\"q\": \"a\", \"c\": [\"x\"]}\n{\"q\": \"b\", \"c\": []}\n",
            ),
        ],
        &["d.jsonl:2:", "choice list is empty", "t.yaml:10"],
    );
}

#[test]
fn a_gold_index_out_of_range_is_refused_at_its_line() {
    refused(
        &[(
            "t.jsonl",
            "{\"task\": \"t\", \"type\": \"multiple_choice\", \"context\": \"a\", \"choices\": [\" b\", \" c\"], \"gold\": 2}\n",
        )],
        &["t.jsonl:1:", "gold index 2 is out of range"],
    );
    refused(
        &[
            (
                "t.yaml",
                "task: t\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: d.jsonl\ntest_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{q}}\"\ndoc_to_target: \"{{g}}\"\ndoc_to_choice: \"{{c}}\"\n",
            ),
            (
                "d.jsonl",
                "{\"q\": \"a\", \"c\": [\"x\", \"y\"], \"g\": 1}\n{\"q\": \"a\", \"c\": [\"x\", \"y\"], \"g\": 5}\n",
            ),
        ],
        &[
            "d.jsonl:2:",
            "gold index 5 is out of range",
            "doc_to_target",
        ],
    );
}

#[test]
fn a_template_naming_a_missing_field_is_refused_at_its_line() {
    refused(
        &[
            (
                "t.yaml",
                "task: t\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: d.jsonl\ntest_split: test\noutput_type: loglikelihood\ndoc_to_text: \"Pergunta: {{pergunta}}\"\ndoc_to_target: \"{{resposta}}\"\n",
            ),
            ("d.jsonl", "{\"question\": \"a\", \"resposta\": \" b\"}\n"),
        ],
        &[
            "d.jsonl:1:",
            "\"pergunta\"",
            "which the data lack",
            "t.yaml:8",
        ],
    );
}

#[test]
fn a_file_in_neither_format_is_refused() {
    refused(&[("t.txt", "\nsome text\n")], &["t.txt:2:", "neither"]);
    refused(
        &[("t.jsonl", "{\"text\": \"a\"}\n")],
        &["t.jsonl:1:", "neither"],
    );
    refused(
        &[("t.yaml", "name: x\nvalue: 3\n")],
        &["t.yaml:1:", "neither"],
    );
}

#[test]
fn python_functions_and_parquet_are_refused_naming_the_key() {
    refused(
        &[(
            "t.yaml",
            "task: t\ndataset_path: json\nprocess_docs: !function utils.process_docs\n",
        )],
        &["t.yaml:3:", "`process_docs`", "!function"],
    );
    refused(
        &[(
            "t.yaml",
            "task: t\ndataset_path: parquet\ndataset_kwargs:\n  data_files:\n    test: d.parquet\ntest_split: test\n",
        )],
        &["t.yaml:2:", "Parquet"],
    );
}

/// A request longer than the window is cut from the left as the harness cuts it (the
/// parity fixtures hold such requests at `max_length` 32), and said once per task.
#[test]
fn a_request_longer_than_the_window_is_truncated_and_said_once() {
    let tmp = temp_dir();
    let long = "palavra ".repeat(60);
    let lines: String = (0..3)
        .map(|_| format!("{{\"task\": \"t\", \"type\": \"multiple_choice\", \"context\": \"{long}\", \"choices\": [\" a\", \" b\"], \"gold\": 0}}\n"))
        .collect();
    let f = tmp.path().join("t.jsonl");
    std::fs::write(&f, lines).unwrap();
    let csv = tmp.path().join("eval.csv");
    let out = Command::new(bin())
        .args([
            "evaluate",
            "--max-length",
            "16",
            "--format",
            "json",
            "--checkpoint-dir",
        ])
        .arg(reference_dir("gpt2"))
        .arg("--tasks")
        .arg(&f)
        .arg("--csv")
        .arg(&csv)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.matches("longer than the context window").count(),
        1,
        "{err}"
    );
    assert!(err.contains("t.jsonl:1:"), "{err}");
    let csv = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(csv.lines().count(), 3, "{csv}");
    let json: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(json.len(), 2);
    for k in ["task", "metric", "value", "stderr", "samples"] {
        assert!(json[0].get(k).is_some(), "{k} missing: {}", json[0]);
    }
}

/// `evaluate --out-dir RUN` scores the base and every checkpoint once, appends to
/// eval_results.csv, and a second call scores nothing new.
#[test]
fn a_run_is_scored_checkpoint_by_checkpoint_without_duplicates() {
    use lit_claire::train::batches::{TrainData, TrainDataset};
    use lit_claire::train::{TrainConfig, pretrain_with_data};
    let tmp = temp_dir();
    let run = tmp.path().join("run");
    let tok = Tokenizer::from_dir(&reference_dir("llama")).unwrap();
    let data = TrainData {
        block_size: 33,
        tokenizer_hash: Some(tok.hash),
        origin: None,
        datasets: vec![TrainDataset {
            name: "fortunes".into(),
            weight: 1.0,
            train: Arc::new(crate::trainer::corpus_samples(33, 8, 0)),
            validation: Arc::new(crate::trainer::corpus_samples(33, 2, 400)),
        }],
    };
    let cfg = TrainConfig {
        data_dir: "in-memory".into(),
        checkpoint_dir: reference_dir("llama"),
        out_dir: run.clone(),
        micro_batch_size: 2,
        batch_size: 2,
        max_steps: Some(2),
        eval_interval: 100,
        save_interval: 1,
        ..Default::default()
    };
    pretrain_with_data(&cfg, data).unwrap();
    let tasks = tasks_dir().join("mixed.jsonl");
    let call = || {
        Command::new(bin())
            .args(["evaluate", "--format", "json", "--limit", "2", "--out-dir"])
            .arg(&run)
            .arg("--tasks")
            .arg(&tasks)
            .output()
            .unwrap()
    };
    let out = call();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let csv = std::fs::read_to_string(run.join("eval_results.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows[0], lit_claire::eval::output::HEADER);
    let checkpoints: std::collections::BTreeSet<&str> = rows[1..]
        .iter()
        .map(|r| r.split(',').next().unwrap())
        .collect();
    assert!(
        checkpoints.contains("base") && checkpoints.contains("final"),
        "{checkpoints:?}"
    );
    let per = rows[1..].iter().filter(|r| r.starts_with("base,")).count();
    assert_eq!(per, 8, "{csv}"); // pt_mc 2, pt_ll 2, pt_roll 3, pt_gen 1
    let again = call();
    assert!(again.status.success());
    assert_eq!(
        std::fs::read_to_string(run.join("eval_results.csv")).unwrap(),
        csv
    );
}

/// SmolLM2-135M (git-ignored; see tests/it/real_model.rs) against the harness at its
/// full context of 8192: `utils/check_lm_eval.py --models tests/fixtures/real/smollm2-135m
/// --max-length 0` wrote the expected numbers. Choices, continuations, `is_greedy`,
/// accuracies and generated texts are the harness's; 38 of the 40 log-likelihoods are
/// within 1e-4 of the harness's, and two documents scored whole within 7e-4 and 1.8e-4.
/// Those are the harness's own float32 error more than ours: against transformers in
/// float64 (`utils/check_rolling_f64.py`), the harness's values of the six documents
/// are up to 6.5e-4 off (the 97-token one), ours up to 1.8e-4. Perplexities, `exp` of
/// those sums, then agree to 1e-4 relative.
#[test]
#[ignore = "needs tests/fixtures/real/smollm2-135m (python3 utils/make_real_model.py)"]
fn real_model_scores_as_lm_evaluation_harness_does() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/real/smollm2-135m");
    assert!(
        dir.join("model.safetensors").is_file(),
        "{} is missing: run python3 utils/make_real_model.py",
        dir.display()
    );
    let exp = expected_of("smollm2-135m");
    let max_len = exp["max_length"]
        .as_u64()
        .map(|n| n as usize)
        .filter(|&n| n > 0);
    let results = run_tasks(&dir, max_len, 16);
    assert_parity_within("smollm2-135m", &results, &exp, 1e-3, 1e-4);
}

/// `pretrain --eval-tasks`: the tasks are scored at each validation into
/// `task/<task>/<metric>` columns of metrics.csv (empty on other rows) and train.log;
/// `evaluate --out-dir` then adds eval_results.csv, and `plot` draws both in its
/// second panel.
#[test]
fn tasks_scored_during_training_go_to_metrics_csv_and_the_plot() {
    use lit_claire::train::batches::{TrainData, TrainDataset};
    use lit_claire::train::{TrainConfig, pretrain_with_data};
    let tmp = temp_dir();
    let run = tmp.path().join("run");
    let tok = Tokenizer::from_dir(&reference_dir("llama")).unwrap();
    let data = TrainData {
        block_size: 33,
        tokenizer_hash: Some(tok.hash),
        origin: None,
        datasets: vec![TrainDataset {
            name: "fortunes".into(),
            weight: 1.0,
            train: Arc::new(crate::trainer::corpus_samples(33, 8, 0)),
            validation: Arc::new(crate::trainer::corpus_samples(33, 2, 400)),
        }],
    };
    let tasks = tasks_dir().join("mixed.jsonl");
    let cfg = TrainConfig {
        data_dir: "in-memory".into(),
        checkpoint_dir: reference_dir("llama"),
        out_dir: run.clone(),
        micro_batch_size: 2,
        batch_size: 2,
        max_steps: Some(4),
        log_interval: 1,
        eval_interval: 2,
        save_interval: 2,
        eval_tasks: Some(tasks.clone()),
        ..Default::default()
    };
    pretrain_with_data(&cfg, data).unwrap();
    let csv = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = header
        .iter()
        .position(|c| *c == "task/pt_roll/word_perplexity")
        .unwrap_or_else(|| panic!("{header:?}"));
    assert!(header.contains(&"task/pt_mc/acc_norm") && header.contains(&"task/pt_gen/exact_match"));
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 4);
    for r in &rows {
        assert_eq!(r.len(), header.len());
        let evaluated = !r[header.iter().position(|c| *c == "val_loss").unwrap()].is_empty();
        assert_eq!(!r[col].is_empty(), evaluated, "{r:?}");
    }
    let log = std::fs::read_to_string(run.join("train.log")).unwrap();
    assert!(
        log.contains("tasks (") && log.contains("pt_mc/acc"),
        "{log}"
    );

    let out = Command::new(bin())
        .args(["evaluate", "--limit", "2", "--out-dir"])
        .arg(&run)
        .arg("--tasks")
        .arg(&tasks)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = tmp.path().join("curves.png");
    let s = lit_claire::plot::plot_runs(&[run], &lit_claire::plot::PlotOptions::new(&png)).unwrap();
    assert!(png.is_file());
    assert_eq!(
        s.runs[0].tasks,
        vec![
            "pt_gen exact_match",
            "pt_ll acc",
            "pt_mc acc",
            "pt_roll bits_per_byte"
        ]
    );
}
