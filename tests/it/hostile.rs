//! Issue 9, "no panic, no silent wrong answer": hostile inputs each give a one-line
//! error naming the file, flag or tensor at fault, and write nothing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use lit_claire::data::prepare::prepare_data;
use lit_claire::data::reader::PreparedData;
use lit_claire::gguf::QuantType;
use lit_claire::gguf::llama_cpp::quantize;
use lit_claire::hf::{load_model, peft};
use lit_claire::model::BuildOptions;
use lit_claire::tokenizer::Tokenizer;
use lit_claire::train::batches::{TrainData, TrainDataset};
use lit_claire::train::validate::{ValidateOptions, validate_run};
use lit_claire::train::{TrainConfig, Trainer, load_train_data, pretrain_with_data};
use serde_json::Value;

use crate::common::*;
use crate::data_common::{fortunes_source, options};

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

/// A copy of the llama fixture in `root/name`, without its adapter.
fn llama_copy(root: &Path, name: &str) -> PathBuf {
    let dir = root.join(name);
    copy_files(&reference_dir("llama"), &dir);
    dir
}

/// Change `dir/config.json` with `edit`.
fn edit_json(path: &Path, edit: impl FnOnce(&mut Value)) {
    let mut v = read_json(path);
    edit(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// Rewrite `file` (safetensors) with `edit` applied to its tensors.
fn edit_tensors(file: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let mut t = candle_core::safetensors::load(file, &Device::Cpu).unwrap();
    edit(&mut t);
    candle_core::safetensors::save(&t, file).unwrap();
}

/// Run the binary; it must fail with one line on stderr (no panic). Returns that line.
fn cli_fails(args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(bin()).args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert!(!out.status.success(), "{args:?} succeeded: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{args:?} panicked: {err}"
    );
    assert_eq!(err.lines().count(), 1, "{args:?}: not one line: {err}");
    err
}

fn os(s: &str) -> &std::ffi::OsStr {
    std::ffi::OsStr::new(s)
}

fn load(dir: &Path) -> lit_claire::Result<lit_claire::model::Gpt> {
    load_model(dir, &BuildOptions::cpu_f32(), None)
}

#[test]
fn issue9_zero_heads_is_an_error_not_a_panic_in_every_family() {
    let tmp = temp_dir();
    for fam in FAMILIES {
        let dir = tmp.path().join(fam);
        copy_files(&reference_dir(fam), &dir);
        let key = match fam {
            "gpt2" => "n_head",
            "gpt_neo" => "num_heads",
            _ => "num_attention_heads",
        };
        edit_json(&dir.join("config.json"), |v| v[key] = 0.into());
        let e = load(&dir).unwrap_err().to_string();
        assert!(e.contains(key) && e.contains("config.json"), "{fam}: {e}");
        let input = tmp.path().join("text.txt");
        std::fs::write(&input, "bom dia a todos").unwrap();
        let e = cli_fails(&[
            os("perplexity"),
            os("--checkpoint-dir"),
            dir.as_os_str(),
            os("--input"),
            input.as_os_str(),
        ]);
        assert!(e.contains(key), "{fam}: {e}");
    }
}

#[test]
fn issue9_integer_weights_are_refused_naming_the_tensor() {
    let tmp = temp_dir();
    let dir = llama_copy(tmp.path(), "int");
    edit_tensors(&dir.join("model.safetensors"), |t| {
        let w = t["model.norm.weight"].to_dtype(DType::I64).unwrap();
        t.insert("model.norm.weight".into(), w);
    });
    let e = load(&dir).unwrap_err().to_string();
    assert!(
        e.contains("model.norm.weight") && e.contains("i64") && e.contains("floating point"),
        "{e}"
    );
    let out = tmp.path().join("m.gguf");
    let e = quantize(&dir, &out, QuantType::Q8_0, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.norm.weight") && e.contains("i64"), "{e}");
    assert!(!out.exists());
}

#[test]
fn issue9_unused_checkpoint_tensors_are_named() {
    let tmp = temp_dir();
    // Biases the config does not declare (attention_bias: false).
    let dir = llama_copy(tmp.path(), "bias");
    edit_tensors(&dir.join("model.safetensors"), |t| {
        t.insert(
            "model.layers.0.self_attn.q_proj.bias".into(),
            Tensor::ones(64, DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let e = load(&dir).unwrap_err().to_string();
    assert!(
        e.contains("model.layers.0.self_attn.q_proj.bias") && e.contains("attention_bias"),
        "{e}"
    );
    let e = quantize(&dir, &tmp.path().join("b.gguf"), QuantType::Q8_0, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("q_proj.bias"), "{e}");
    // A layer the config does not count.
    let dir = llama_copy(tmp.path(), "layers");
    edit_json(&dir.join("config.json"), |v| {
        v["num_hidden_layers"] = 1.into()
    });
    let e = load(&dir).unwrap_err().to_string();
    assert!(e.contains("model.layers.1."), "{e}");
    // Buffers transformers recomputes are harmless.
    let dir = llama_copy(tmp.path(), "buffers");
    edit_tensors(&dir.join("model.safetensors"), |t| {
        t.insert(
            "model.layers.0.self_attn.rotary_emb.inv_freq".into(),
            Tensor::ones(8, DType::F32, &Device::Cpu).unwrap(),
        );
    });
    load(&dir).unwrap();
    let dir = tmp.path().join("gpt2");
    copy_files(&reference_dir("gpt2"), &dir);
    edit_tensors(&dir.join("model.safetensors"), |t| {
        t.insert(
            "transformer.h.0.attn.bias".into(),
            Tensor::ones((1, 1, 4, 4), DType::U8, &Device::Cpu).unwrap(),
        );
    });
    load(&dir).unwrap();
}

/// The llama fixture's PEFT adapter, copied to `root/name` and edited.
fn adapter_copy(root: &Path, name: &str, edit: impl FnOnce(&mut Value)) -> PathBuf {
    let dir = root.join(name);
    copy_files(&reference_dir("llama").join("lora"), &dir);
    edit_json(&dir.join(peft::ADAPTER_CONFIG), edit);
    dir
}

#[test]
fn issue9_adapter_rank_and_alpha_are_checked() {
    let tmp = temp_dir();
    let cases: [(&str, Value, &str); 4] = [
        ("r", 0.into(), "r is 0"),
        ("r", 8.into(), "r = 8"),
        ("lora_alpha", 0.into(), "lora_alpha"),
        ("lora_alpha", "big".into(), "lora_alpha"),
    ];
    for (i, (key, value, want)) in cases.into_iter().enumerate() {
        let dir = adapter_copy(tmp.path(), &format!("a{i}"), |v| v[key] = value.clone());
        let e = peft::load_adapter(&dir, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(want) && e.contains("adapter_"),
            "{key}={value}: {e}"
        );
        let e = load_model(
            &reference_dir("llama"),
            &BuildOptions::cpu_f32(),
            Some(&dir),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains(want), "{key}={value}: {e}");
    }
    // The unedited adapter loads.
    let dir = adapter_copy(tmp.path(), "ok", |_| {});
    peft::load_adapter(&dir, &Device::Cpu).unwrap();
}

#[test]
fn issue9_training_refuses_lora_alpha_zero() {
    let mut flags = toml::Table::new();
    for k in ["data_dir", "out_dir", "checkpoint_dir"] {
        flags.insert(k.into(), "x".into());
    }
    flags.insert("lora_r".into(), 8.into());
    flags.insert("lora_alpha".into(), 0.0.into());
    let e = TrainConfig::resolve(None, flags).unwrap_err().to_string();
    assert!(e.contains("--lora-alpha 0"), "{e}");
}

#[test]
fn issue9_every_training_option_is_checked_before_the_model_loads() {
    let tmp = temp_dir();
    let cfg = TrainConfig {
        data_dir: "in-memory".into(),
        // Loading this would fail: the option errors must come first.
        checkpoint_dir: tmp.path().join("no-such-model"),
        out_dir: tmp.path().join("run"),
        learning_rate: 1e-4,
        min_lr: 1e-3,
        beta2: 1.5,
        eval_max_batches: Some(0),
        ..Default::default()
    };
    let data = TrainData {
        block_size: 4,
        tokenizer_hash: None,
        origin: None,
        datasets: vec![],
    };
    let e = Trainer::new(&cfg, data).err().unwrap().to_string();
    assert!(
        e.contains("--min-lr") && e.contains("--beta2 (1.5)") && e.contains("--eval-max-batches"),
        "{e}"
    );
    assert!(!e.contains("no-such-model"), "{e}");
    assert!(!tmp.path().join("run").exists());
}

#[test]
fn issue9_constant_schedule_accepts_a_learning_rate_below_min_lr() {
    let mut flags = toml::Table::new();
    for k in ["data_dir", "out_dir", "checkpoint_dir"] {
        flags.insert(k.into(), "x".into());
    }
    flags.insert("lr_schedule".into(), "constant".into());
    flags.insert("learning_rate".into(), 1e-5.into());
    TrainConfig::resolve(None, flags.clone()).unwrap();
    flags.insert("lr_schedule".into(), "cosine".into());
    let e = TrainConfig::resolve(None, flags).unwrap_err().to_string();
    assert!(e.contains("--min-lr"), "{e}");
}

use crate::trainer::corpus_samples as samples;

fn memory_data() -> TrainData {
    let tok = Tokenizer::from_dir(&reference_dir("llama")).unwrap();
    TrainData {
        block_size: 33,
        tokenizer_hash: Some(tok.hash),
        origin: None,
        datasets: vec![TrainDataset {
            name: "fortunes".into(),
            weight: 1.0,
            train: Arc::new(samples(33, 24, 0)),
            validation: Arc::new(samples(33, 4, 400)),
        }],
    }
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

#[test]
fn issue9_a_non_finite_loss_stops_the_run_without_a_checkpoint() {
    let tmp = temp_dir();
    let mut cfg = train_config(tmp.path());
    cfg.learning_rate = 1e30;
    cfg.min_lr = 0.0;
    cfg.save_interval = 1;
    let e = pretrain_with_data(&cfg, memory_data())
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("step ") && (e.contains("NaN") || e.contains("inf")),
        "{e}"
    );
    assert!(e.contains("--learning-rate"), "{e}");
    assert!(!tmp.path().join("final").exists());
    // Every checkpoint written holds finite weights.
    for (dir, _) in lit_claire::train::checkpoint::list(tmp.path()).unwrap() {
        let sd =
            candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
        for (name, t) in sd {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            assert!(v.iter().all(|x| x.is_finite()), "{}: {name}", dir.display());
        }
    }
}

#[test]
fn issue9_truncated_metrics_are_not_lost_in_silence_on_resume() {
    let tmp = temp_dir();
    let mut cfg = train_config(tmp.path());
    Trainer::new(&cfg, memory_data())
        .unwrap()
        .run(Some(5))
        .unwrap();
    let metrics = tmp.path().join("metrics.csv");
    let text = std::fs::read_to_string(&metrics).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 6, "{text}");
    // Cut by hand to the header and the first two rows.
    std::fs::write(&metrics, lines[..3].join("\n") + "\n").unwrap();
    cfg.resume = Some("auto".into());
    let e = Trainer::new(&cfg, memory_data()).err().unwrap().to_string();
    assert!(
        e.contains("metrics.csv") && e.contains("2 rows up to step 4") && e.contains("logged 4"),
        "{e}"
    );
    // Untouched by the refusal.
    assert_eq!(
        std::fs::read_to_string(&metrics).unwrap(),
        lines[..3].join("\n") + "\n"
    );
    // Deleting it on purpose goes on, with a new file from the checkpoint's step.
    std::fs::remove_file(&metrics).unwrap();
    pretrain_with_data(&cfg, memory_data()).unwrap();
    let rows = std::fs::read_to_string(&metrics).unwrap();
    assert!(rows.lines().nth(1).unwrap().starts_with("5,"), "{rows}");
}

#[test]
fn issue9_resume_auto_falls_back_from_a_damaged_newest_checkpoint() {
    let tmp = temp_dir();
    let mut cfg = train_config(tmp.path());
    Trainer::new(&cfg, memory_data())
        .unwrap()
        .run(Some(5))
        .unwrap();
    let newest = tmp.path().join("step-00000004");
    let opt = newest.join("optimizer.safetensors");
    let bytes = std::fs::read(&opt).unwrap();
    std::fs::write(&opt, &bytes[..bytes.len() / 2]).unwrap();
    cfg.resume = Some("auto".into());
    let t = Trainer::new(&cfg, memory_data()).unwrap();
    assert_eq!(t.state().step, 2, "resumed from step-00000002");
    let log = std::fs::read_to_string(tmp.path().join("train.log")).unwrap();
    assert!(
        log.contains("step-00000004 is damaged") && log.contains(".damaged-step-00000004"),
        "{log}"
    );
    assert!(tmp.path().join(".damaged-step-00000004").is_dir());
    // Named explicitly, a damaged checkpoint is an error.
    let mut cfg2 = cfg.clone();
    cfg2.resume = Some(
        tmp.path()
            .join(".damaged-step-00000004")
            .to_string_lossy()
            .into_owned(),
    );
    let e = Trainer::new(&cfg2, memory_data())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("optimizer.safetensors"), "{e}");
}

#[test]
fn issue9_perplexity_context_is_bounded_by_the_model() {
    let model = load(&reference_dir("llama")).unwrap();
    let ids: Vec<u32> = (1..300).collect();
    let e = lit_claire::perplexity::perplexity(&model, &ids, 100_000, 2)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--context 100000") && e.contains("max_position_embeddings 256"),
        "{e}"
    );
    let e = lit_claire::perplexity::perplexity(&model, &ids, 1, 2)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--context 1") && e.contains("max_position_embeddings"),
        "{e}"
    );
    lit_claire::perplexity::perplexity(&model, &ids, 256, 2).unwrap();
}

#[test]
fn issue9_nan_weights_give_an_error_not_a_null_loss() {
    let tmp = temp_dir();
    let dir = llama_copy(tmp.path(), "nan");
    edit_tensors(&dir.join("model.safetensors"), |t| {
        let w = (t["model.norm.weight"].clone() * f64::NAN).unwrap();
        t.insert("model.norm.weight".into(), w);
    });
    let model = load(&dir).unwrap();
    let ids: Vec<u32> = (1..40).collect();
    let e = lit_claire::perplexity::perplexity(&model, &ids, 256, 2)
        .unwrap_err()
        .to_string();
    assert!(e.contains("NaN"), "{e}");
    let e = lit_claire::generate::generate(
        &model,
        &ids,
        3,
        &lit_claire::generate::Sampling::default(),
        &[],
        |_| Ok(true),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("NaN"), "{e}");
}

#[test]
fn issue9_quantize_refuses_to_overwrite_without_the_flag() {
    let tmp = temp_dir();
    let out = tmp.path().join("m.gguf");
    std::fs::write(&out, "keep me").unwrap();
    let e = quantize(&reference_dir("llama"), &out, QuantType::Q8_0, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--overwrite"), "{e}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "keep me");
    quantize(&reference_dir("llama"), &out, QuantType::Q8_0, true).unwrap();
    assert_ne!(std::fs::read(&out).unwrap(), b"keep me");
}

/// The sample corpus prepared with the llama fixture (64-token samples) in `root/out`.
fn prepared(root: &Path) -> (PathBuf, PathBuf) {
    let src = fortunes_source(root);
    let dest = root.join("out");
    let mut o = options(&src, &dest);
    o.multiple_of = 2;
    prepare_data(&o).unwrap();
    (src, dest)
}

#[test]
fn issue9_prepare_data_does_not_keep_a_damaged_dataset() {
    let tmp = temp_dir();
    let (src, dest) = prepared(tmp.path());
    let shard = dest.join("fortunes-br/train/shard-00001.bin");
    let full = std::fs::read(&shard).unwrap();
    // Truncated: the reader refuses to open it (not at the step that reads its end)...
    std::fs::write(&shard, &full[..full.len() - 2]).unwrap();
    let e = PreparedData::open(&dest).unwrap_err().to_string();
    assert!(e.contains("shard-00001") && e.contains("bytes"), "{e}");
    // ...and a re-run rebuilds it instead of saying "kept".
    let mut o = options(&src, &dest);
    o.multiple_of = 2;
    let r = prepare_data(&o).unwrap();
    assert!(!r.datasets[0].skipped);
    assert_eq!(std::fs::read(&shard).unwrap(), full);
    // Same for a missing shard.
    std::fs::remove_file(dest.join("fortunes-br/validation/shard-00000.idx")).unwrap();
    let r = prepare_data(&o).unwrap();
    assert!(!r.datasets[0].skipped);
    PreparedData::open(&dest).unwrap();
    assert!(prepare_data(&o).unwrap().datasets[0].skipped);
}

#[test]
fn issue9_prepare_data_refuses_a_destination_inside_the_source() {
    let tmp = temp_dir();
    let src = fortunes_source(tmp.path());
    let dest = src.join("prepared");
    let e = prepare_data(&options(&src, &dest)).unwrap_err().to_string();
    assert!(
        e.contains("--destination-path") && e.contains("inside --source-path"),
        "{e}"
    );
    assert!(!dest.exists());
}

#[test]
fn issue9_a_failed_prepare_data_leaves_no_destination_folder() {
    let tmp = temp_dir();
    let src = tmp.path().join("raw");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("empty.txt"), "").unwrap();
    let dest = tmp.path().join("out");
    assert!(prepare_data(&options(&src, &dest)).is_err());
    assert!(!dest.exists());
    // A destination that existed before stays.
    std::fs::create_dir_all(&dest).unwrap();
    assert!(prepare_data(&options(&src, &dest)).is_err());
    assert!(dest.is_dir());
}

#[test]
fn issue9_absurd_shard_counts_are_refused() {
    let tmp = temp_dir();
    let src = fortunes_source(tmp.path());
    let dest = tmp.path().join("out");
    let mut o = options(&src, &dest);
    o.multiple_of = 100_000;
    let e = prepare_data(&o).unwrap_err().to_string();
    assert!(
        e.contains("--multiple-of 100000") && e.contains("fortunes-br") && e.contains("shards"),
        "{e}"
    );
    assert!(!dest.exists());
}

#[test]
fn issue9_validate_checks_the_tokenizer_and_keys_rows_by_data() {
    let tmp = temp_dir();
    let (src, data) = prepared(tmp.path());
    // A short full fine-tuning run on the prepared data: step-00000002 and final.
    let run = tmp.path().join("run");
    let mut cfg = train_config(&run);
    cfg.max_steps = Some(3);
    cfg.data_dir = data.clone();
    pretrain_with_data(&cfg, load_train_data(&data).unwrap()).unwrap();
    let opts = ValidateOptions {
        run: run.clone(),
        max_batches: Some(1),
        batch_size: 2,
        csv: None,
        watch: None,
        cross_document_attention: None,
    };
    let strategy = lit_claire::strategy::Strategy::new(
        lit_claire::strategy::DeviceSpec::Cpu,
        lit_claire::strategy::Precision::True32,
    )
    .unwrap();
    let rows = validate_run(&opts, &load_train_data(&data).unwrap(), &strategy).unwrap();
    assert_eq!(rows.len(), 2);
    assert!(
        validate_run(&opts, &load_train_data(&data).unwrap(), &strategy)
            .unwrap()
            .is_empty()
    );

    // Other data under the same dataset name: scored, not "0 new rows".
    let other = tmp.path().join("other");
    let mut o = options(&src, &other);
    o.multiple_of = 2;
    o.max_length = Some(32);
    prepare_data(&o).unwrap();
    let rows = validate_run(&opts, &load_train_data(&other).unwrap(), &strategy).unwrap();
    assert_eq!(rows.len(), 2);
    assert_ne!(rows[0].data, "");

    // Data of another tokenizer: refused, as pretrain refuses it.
    let mut d = load_train_data(&other).unwrap();
    d.tokenizer_hash = Some("0123456789abcdef".into());
    let fresh = ValidateOptions {
        csv: Some(tmp.path().join("fresh.csv")),
        ..opts.clone()
    };
    let e = validate_run(&fresh, &d, &strategy).unwrap_err().to_string();
    assert!(e.contains("another tokenizer"), "{e}");
}

#[test]
fn issue9_a_tiny_temperature_samples_the_best_token_not_the_worst() {
    use rand::SeedableRng;
    let s = lit_claire::generate::Sampling {
        temperature: 1e-40,
        ..Default::default()
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let next = lit_claire::generate::pick(vec![0.5, 3.0, -1.0, 2.0], &[], &s, &mut rng);
    assert_eq!(next, 1);
}

#[test]
fn issue9_probe_a_tied_config_over_a_head_of_its_own_is_an_error() {
    let tmp = temp_dir();
    let dir = llama_copy(tmp.path(), "tied");
    edit_json(&dir.join("config.json"), |v| {
        v["tie_word_embeddings"] = true.into()
    });
    let e = load(&dir).unwrap_err().to_string();
    assert!(
        e.contains("tie_word_embeddings") && e.contains("lm_head.weight"),
        "{e}"
    );
    // A stored copy of the embeddings is fine.
    edit_tensors(&dir.join("model.safetensors"), |t| {
        let e = t["model.embed_tokens.weight"].clone();
        t.insert("lm_head.weight".into(), e);
    });
    load(&dir).unwrap();
}

#[test]
fn issue9_probe_perplexity_refuses_batch_size_zero() {
    let model = load(&reference_dir("llama")).unwrap();
    let ids: Vec<u32> = (1..40).collect();
    let e = lit_claire::perplexity::perplexity(&model, &ids, 16, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--batch-size"), "{e}");
}

/// Edit `dest/metadata.json` (a prepared folder) with `edit`.
fn edit_metadata(dest: &Path, edit: impl FnOnce(&mut Value)) {
    edit_json(&dest.join("metadata.json"), edit);
}

#[test]
fn issue9_probe_hand_edited_metadata_is_refused_before_training() {
    let tmp = temp_dir();
    let (_, dest) = prepared(tmp.path());
    let original = std::fs::read(dest.join("metadata.json")).unwrap();
    let restore = || std::fs::write(dest.join("metadata.json"), &original).unwrap();
    for (edit, want) in [
        (
            Box::new(|v: &mut Value| v["block_size"] = 0.into()) as Box<dyn Fn(&mut Value)>,
            "block_size 0",
        ),
        (
            Box::new(|v| v["datasets"] = Value::Array(vec![])),
            "no dataset",
        ),
    ] {
        edit_metadata(&dest, edit);
        let e = PreparedData::open(&dest).unwrap_err().to_string();
        assert!(e.contains(want) && e.contains("metadata.json"), "{e}");
        restore();
    }
    // A weight out of proportion: an error, not an epoch of 10^303 draws.
    edit_metadata(&dest, |v| v["datasets"][0]["weight"] = 1e300.into());
    let run = tmp.path().join("run");
    let mut cfg = train_config(&run);
    cfg.data_dir = dest.clone();
    let e = Trainer::new(&cfg, load_train_data(&dest).unwrap())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("sampling weights") && e.contains("groups file"),
        "{e}"
    );
}

#[test]
fn issue9_probe_validate_refuses_data_longer_than_the_model_context() {
    let tmp = temp_dir();
    let (src, data) = prepared(tmp.path());
    let run = tmp.path().join("run");
    let mut cfg = train_config(&run);
    cfg.max_steps = Some(2);
    cfg.data_dir = data.clone();
    pretrain_with_data(&cfg, load_train_data(&data).unwrap()).unwrap();
    let long = tmp.path().join("long");
    let mut o = options(&src, &long);
    o.multiple_of = 2;
    o.max_length = Some(300);
    prepare_data(&o).unwrap();
    let opts = ValidateOptions {
        run,
        max_batches: Some(1),
        batch_size: 2,
        csv: None,
        watch: None,
        cross_document_attention: None,
    };
    let strategy = lit_claire::strategy::Strategy::new(
        lit_claire::strategy::DeviceSpec::Cpu,
        lit_claire::strategy::Precision::True32,
    )
    .unwrap();
    let e = validate_run(&opts, &load_train_data(&long).unwrap(), &strategy)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("301 tokens") && e.contains("context is 256"),
        "{e}"
    );
}

#[test]
fn issue9_probe_resume_refuses_another_kind_lora_setting_or_base() {
    let tmp = temp_dir();
    let mut cfg = train_config(tmp.path());
    cfg.lora_r = 4;
    Trainer::new(&cfg, memory_data())
        .unwrap()
        .run(Some(3))
        .unwrap();
    cfg.resume = Some("auto".into());
    let mut full = cfg.clone();
    full.lora_r = 0;
    let mut alpha = cfg.clone();
    alpha.lora_alpha = 64.0;
    let mut base = cfg.clone();
    base.checkpoint_dir = reference_dir("mistral");
    for (c, want) in [
        (full, "--lora-r 4"),
        (alpha, "--lora-alpha 64 (checkpoint: 16)"),
        (base, "another base model"),
    ] {
        let e = Trainer::new(&c, memory_data()).err().unwrap().to_string();
        assert!(e.contains(want) && e.contains("step-00000002"), "{e}");
    }
    Trainer::new(&cfg, memory_data()).unwrap();
}

#[test]
fn issue9_probe_betas_that_round_to_one_in_f32_are_refused() {
    let mut flags = toml::Table::new();
    for k in ["data_dir", "out_dir", "checkpoint_dir"] {
        flags.insert(k.into(), "x".into());
    }
    flags.insert("beta2".into(), 0.999_999_999_99.into());
    let e = TrainConfig::resolve(None, flags.clone())
        .unwrap_err()
        .to_string();
    assert!(e.contains("--beta2 (0.99999999999)"), "{e}");
    flags.insert("beta2".into(), 0.9999999.into());
    TrainConfig::resolve(None, flags).unwrap();
}

#[test]
fn issue9_probe_a_flag_beyond_toml_integers_is_named() {
    let e = cli_fails(&[
        os("pretrain"),
        os("--data-dir"),
        os("d"),
        os("--checkpoint-dir"),
        os("c"),
        os("--out-dir"),
        os("o"),
        os("--seed"),
        os("18446744073709551615"),
    ]);
    assert!(
        e.contains("--seed 18446744073709551615 is too large"),
        "{e}"
    );
}
