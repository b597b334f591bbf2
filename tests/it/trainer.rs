//! The trainer on in-memory data: LoRA leaves the base untouched, exact resume,
//! micro-batching, checkpoint rotation, early stopping, and errors before any work.

use std::path::Path;
use std::sync::Arc;

use candle_core::DType;
use lit_claire::strategy::StrategyKind;
use lit_claire::tokenizer::Tokenizer;
use lit_claire::train::batches::{TrainData, TrainDataset};
use lit_claire::train::{TrainConfig, Trainer, pretrain_with_data};

use crate::common::*;

/// Samples of `block` tokens from the sample corpus, tokenized with the llama fixture.
pub(crate) fn corpus_samples(block: usize, n: usize, skip: usize) -> Vec<Vec<u32>> {
    let tok = Tokenizer::from_dir(&reference_dir("llama")).unwrap();
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample/fortunes-br.txt"),
    )
    .unwrap();
    let mut stream = Vec::new();
    for doc in text.split("\n%\n").skip(skip).take(4 * n) {
        stream.extend(tok.encode_document(doc).unwrap());
    }
    stream.chunks(block).take(n).map(|c| c.to_vec()).collect()
}

pub(crate) fn data(block: usize) -> TrainData {
    let tok = Tokenizer::from_dir(&reference_dir("llama")).unwrap();
    TrainData {
        block_size: block,
        tokenizer_hash: Some(tok.hash),
        origin: None,
        datasets: vec![
            TrainDataset {
                name: "fortunes".into(),
                weight: 1.0,
                train: Arc::new(corpus_samples(block, 24, 0)),
                validation: Arc::new(corpus_samples(block, 4, 400)),
            },
            TrainDataset {
                name: "short".into(),
                weight: 0.5,
                // Shorter samples: padding.
                train: Arc::new(corpus_samples(block / 2, 8, 200)),
                validation: Arc::new(corpus_samples(block / 2, 2, 500)),
            },
        ],
    }
}

pub(crate) fn config(out: &Path) -> TrainConfig {
    TrainConfig {
        data_dir: "in-memory".into(),
        checkpoint_dir: reference_dir("llama"),
        out_dir: out.to_path_buf(),
        micro_batch_size: 2,
        batch_size: 4,
        max_steps: Some(12),
        learning_rate: 3e-3,
        min_lr: 3e-4,
        warmup_steps: 2,
        eval_interval: 4,
        save_interval: 3,
        ..Default::default()
    }
}

fn losses(run: &Path) -> Vec<(String, String, String)> {
    let text = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    text.lines()
        .skip(1)
        .map(|l| {
            let c: Vec<&str> = l.split(',').collect();
            (c[0].to_string(), c[3].to_string(), c[8].to_string())
        })
        .collect()
}

#[test]
fn lora_trains_only_the_adapter_and_leaves_base_bits_identical() {
    let dir = temp_dir();
    let mut cfg = config(dir.path());
    cfg.lora_r = 4;
    cfg.lora_alpha = 8.0;
    cfg.lora_dropout = 0.1;
    cfg.lora_mlp = true;
    let before = candle_core::safetensors::load(
        reference_dir("llama").join("model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let mut t = Trainer::new(&cfg, data(33)).unwrap();
    let s = t.run(None).unwrap();
    assert_eq!(s.steps, 12);
    let first = losses(dir.path())[0].1.parse::<f64>().unwrap();
    assert!(
        s.final_loss.unwrap() < first,
        "loss went from {first} to {:?}",
        s.final_loss
    );
    // In memory: every base tensor unchanged, bit for bit.
    for (name, t0) in lit_claire::hf::state_dict::state_dict(t.model()).unwrap() {
        let a = t0
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = before[&name]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(
            a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{name} changed"
        );
    }
    // On disk: only adapter tensors.
    let fin = s.final_checkpoint.unwrap();
    assert!(!fin.join("model.safetensors").exists());
    let adapter = candle_core::safetensors::load(
        fin.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(!adapter.is_empty());
    assert!(
        adapter
            .keys()
            .all(|k| k.contains(".lora_A.") || k.contains(".lora_B.")),
        "{:?}",
        adapter.keys()
    );
}

fn check_resume(lora: bool) {
    let straight = temp_dir();
    let broken = temp_dir();
    let mut cfg = config(straight.path());
    if lora {
        cfg.lora_r = 4;
        cfg.lora_dropout = 0.2;
    }
    pretrain_with_data(&cfg, data(33)).unwrap();

    let mut cfg2 = cfg.clone();
    cfg2.out_dir = broken.path().to_path_buf();
    // Stop after step 7: the newest checkpoint is step 6, step 7's row is in metrics.csv.
    Trainer::new(&cfg2, data(33)).unwrap().run(Some(7)).unwrap();
    assert!(broken.path().join("step-00000006").is_dir());
    cfg2.resume = Some("auto".into());
    pretrain_with_data(&cfg2, data(33)).unwrap();

    let want = losses(straight.path());
    assert!(want.len() > 7, "{want:?}");
    assert_eq!(want, losses(broken.path()));
}

#[test]
fn resume_gives_the_losses_of_an_uninterrupted_run_full() {
    check_resume(false);
}

#[test]
fn resume_gives_the_losses_of_an_uninterrupted_run_lora() {
    check_resume(true);
}

#[test]
fn micro_batching_does_not_change_the_step() {
    let a = temp_dir();
    let b = temp_dir();
    let mut cfg = config(a.path());
    cfg.max_steps = Some(3);
    cfg.micro_batch_size = 4;
    pretrain_with_data(&cfg, data(33)).unwrap();
    cfg.out_dir = b.path().to_path_buf();
    cfg.micro_batch_size = 1;
    pretrain_with_data(&cfg, data(33)).unwrap();
    let (la, lb) = (losses(a.path()), losses(b.path()));
    assert_eq!(la.len(), 3, "{la:?}");
    assert_eq!(la.len(), lb.len());
    for (x, y) in la.iter().zip(lb) {
        let (x, y) = (x.1.parse::<f64>().unwrap(), y.1.parse::<f64>().unwrap());
        assert!((x - y).abs() < 1e-4, "{x} vs {y}");
    }
}

/// `--activation-checkpointing` reaches the engine and changes nothing: the same losses,
/// bit for bit, full and LoRA (with dropout).
#[test]
fn activation_checkpointing_gives_the_same_run() {
    for lora in [false, true] {
        let a = temp_dir();
        let b = temp_dir();
        let mut cfg = config(a.path());
        cfg.max_steps = Some(3);
        if lora {
            cfg.lora_r = 4;
            cfg.lora_dropout = 0.2;
        }
        pretrain_with_data(&cfg, data(33)).unwrap();
        cfg.out_dir = b.path().to_path_buf();
        cfg.activation_checkpointing = 1;
        pretrain_with_data(&cfg, data(33)).unwrap();
        let (la, lb) = (losses(a.path()), losses(b.path()));
        assert_eq!(la.len(), 3, "{la:?}");
        let loss =
            |r: &[(String, String, String)]| r.iter().map(|x| x.1.clone()).collect::<Vec<_>>();
        assert_eq!(loss(&la), loss(&lb), "lora {lora}");
        let saved = std::fs::read_to_string(b.path().join("hyperparameters.toml")).unwrap();
        assert!(saved.contains("activation_checkpointing = 1"), "{saved}");
    }
}

#[test]
fn rotation_keeps_newest_and_best() {
    let dir = temp_dir();
    let mut cfg = config(dir.path());
    cfg.save_interval = 1;
    cfg.eval_interval = 1;
    cfg.max_checkpoints = Some(2);
    pretrain_with_data(&cfg, data(33)).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("step-"))
        .collect();
    names.sort();
    assert!(names.len() == 2 || names.len() == 3, "{names:?}");
    assert!(
        names.contains(&"step-00000011".to_string())
            && names.contains(&"step-00000010".to_string()),
        "{names:?}"
    );
    assert!(dir.path().join("final").is_dir());
}

#[test]
fn early_stopping_stops_a_diverging_run() {
    let dir = temp_dir();
    let mut cfg = config(dir.path());
    cfg.learning_rate = 3.0;
    cfg.min_lr = 3.0;
    cfg.warmup_steps = 0;
    cfg.eval_interval = 1;
    cfg.early_stopping = Some(2);
    cfg.max_steps = Some(40);
    let s = pretrain_with_data(&cfg, data(33)).unwrap();
    assert!(s.stopped_early && s.steps < 40, "{s:?}");
}

/// `--strategy zero1` asks to shard the optimizer state over the ranks; on one rank
/// there is nothing to shard, and the run says so in its output and its log.
#[test]
fn zero1_on_one_rank_is_said() {
    let dir = temp_dir();
    let mut cfg = config(dir.path());
    cfg.strategy = StrategyKind::Zero1;
    cfg.max_steps = Some(1);
    pretrain_with_data(&cfg, data(33)).unwrap();
    let note = "--strategy zero1 on one rank: nothing to shard, the optimizer state stays whole";
    let log = std::fs::read_to_string(dir.path().join("train.log")).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert!(lines[0].starts_with("starting"), "{log}");
    assert_eq!(lines[1], note, "{log}");
    // ddp, the default, says nothing of it.
    let dir = temp_dir();
    let mut cfg = config(dir.path());
    cfg.max_steps = Some(1);
    pretrain_with_data(&cfg, data(33)).unwrap();
    let log = std::fs::read_to_string(dir.path().join("train.log")).unwrap();
    assert!(!log.contains("zero1"), "{log}");
    // fsdp on one rank runs its sharded code (each shard the whole model), named in
    // the start line, with no note.
    let dir = temp_dir();
    let mut cfg = config(dir.path());
    cfg.strategy = StrategyKind::Fsdp;
    cfg.max_steps = Some(1);
    pretrain_with_data(&cfg, data(33)).unwrap();
    let log = std::fs::read_to_string(dir.path().join("train.log")).unwrap();
    assert!(!log.contains("nothing to shard"), "{log}");
    assert!(
        log.lines()
            .next()
            .unwrap()
            .contains("on cpu × 1 rank (fsdp)"),
        "{log}"
    );
}

#[test]
fn bad_setups_fail_before_any_work() {
    let dir = temp_dir();
    let mut cfg = config(dir.path());
    cfg.batch_size = 5;
    let e = Trainer::new(&cfg, data(33)).err().unwrap().to_string();
    assert!(e.contains("not a multiple"), "{e}");

    let mut cfg = config(dir.path());
    cfg.batch_size = 64;
    cfg.micro_batch_size = 4;
    let e = Trainer::new(&cfg, data(33)).err().unwrap().to_string();
    assert!(
        e.contains("fewer than one batch") && e.contains("fortunes"),
        "{e}"
    );

    let mut d = data(33);
    d.tokenizer_hash = Some("0000".into());
    let e = Trainer::new(&config(dir.path()), d)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("another tokenizer"), "{e}");

    let e = Trainer::new(&config(dir.path()), data(300))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("context"), "{e}");

    // Nothing was written by the failed attempts...
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    // ...and a finished run is not overwritten by a new one.
    let mut cfg = config(dir.path());
    cfg.max_steps = Some(1);
    pretrain_with_data(&cfg, data(33)).unwrap();
    let e = Trainer::new(&cfg, data(33)).err().unwrap().to_string();
    assert!(
        e.contains("holds another run") && e.contains("--resume auto"),
        "{e}"
    );
}

#[test]
fn every_precision_trains() {
    // f32 is the reference; the reduced precisions must stay close on the first step
    // and keep learning (16-mixed exercises the loss scaler).
    let mut first = Vec::new();
    for precision in ["32-true", "bf16-mixed", "bf16-true", "16-mixed"] {
        let dir = temp_dir();
        let mut cfg = config(dir.path());
        cfg.precision = precision.parse().unwrap();
        cfg.max_steps = Some(6);
        cfg.eval_interval = 6;
        let s = pretrain_with_data(&cfg, data(33)).unwrap();
        let rows = losses(dir.path());
        let l0: f64 = rows[0].1.parse().unwrap();
        assert!(
            s.final_loss.unwrap().is_finite() && s.final_loss.unwrap() < l0,
            "{precision}: {rows:?}"
        );
        first.push((precision, l0));
    }
    let f32_loss = first[0].1;
    for (p, l) in &first[1..] {
        assert!(
            (l - f32_loss).abs() < 0.05,
            "{p}: first loss {l} vs f32 {f32_loss}"
        );
    }
}

#[test]
fn time_intervals_log_evaluate_and_save() {
    let dir = temp_dir();
    let mut cfg = config(dir.path());
    cfg.interval_unit = lit_claire::train::config::IntervalUnit::Time;
    cfg.log_interval = 1000;
    cfg.eval_interval = 1000;
    cfg.save_interval = 1000;
    cfg.max_steps = Some(4);
    pretrain_with_data(&cfg, data(33)).unwrap();
    // Nothing is due within 1000 s but the end: one row (with validation), no step checkpoint.
    let rows = losses(dir.path());
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].0, "4");
    assert!(!rows[0].2.is_empty());
    assert!(dir.path().join("final").is_dir());
    assert!(!dir.path().join("step-00000004").exists());

    let dir = temp_dir();
    let mut cfg = config(dir.path());
    cfg.interval_unit = lit_claire::train::config::IntervalUnit::Time;
    cfg.log_interval = 0;
    let e = Trainer::new(&cfg, data(33)).err().unwrap().to_string();
    assert!(e.contains("--log-interval"), "{e}");
}

#[test]
fn every_recipe_resolves() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("lit_recipes");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let mut flags = toml::Table::new();
        for k in ["data_dir", "out_dir", "checkpoint_dir"] {
            flags.insert(k.into(), "x".into());
        }
        let cfg = TrainConfig::resolve(Some(&path), flags)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(cfg.batch_size % cfg.micro_batch_size == 0);
        n += 1;
    }
    assert!(n >= 7, "{n} recipes");
}
