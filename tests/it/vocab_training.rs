//! Training the rows of new tokens (`pretrain --train-embeddings`) and bits per byte.
//!
//! An adapted base is a reference checkpoint grown from 512 to 576 rows (8 new tokens,
//! 512..519, then padding) with `vocab_adaptation.json`, built here from
//! `tests/fixtures/vocab_training/` as `utils/make_vocab_fixtures.py` builds it for PyTorch:
//! - PEFT's own adapter with trainable tokens gives PEFT's loss, and merged,
//!   transformers' (llama untied, gpt2 tied, gpt_neox untied with `lm_head`);
//! - an adapter we trained loads in PEFT with our loss, and merged in transformers;
//!   we still write adapters of that form;
//! - the rows' gradients are the full matrices' rows; full fine-tuning trains them,
//!   `new` only them, `all` both matrices; defaults and refusals; resume, zero1 on two
//!   thread ranks, fsdp on two and four (and its checkpoints resuming on one) and the
//!   memory plan know the rows; GGUF holds the new tokens; a run on a folder
//!   `adapt-vocab` made trains its new tokens by default;
//! - bits per byte by hand, in perplexity, metrics.csv, validation_results.csv (older
//!   files upgraded) and `plot --y bpb`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use lit_claire::config::load_config;
use lit_claire::hf::export::merge_lora;
use lit_claire::hf::load_model;
use lit_claire::lora::TrainEmbeddings;
use lit_claire::model::engine::{Grads, PassInput, train_pass};
use lit_claire::model::weights::Weights;
use lit_claire::model::{BuildOptions, build_model};
use lit_claire::strategy::StrategyKind;
use lit_claire::tokenizer::{TokenBytes, Tokenizer, bits_per_byte};
use lit_claire::train::batches::{Batch, TrainData, TrainDataset};
use lit_claire::train::{TrainConfig, Trainer, pretrain_with_data};

use crate::common::*;
use crate::trainer::corpus_samples;

/// The new token ids of the adapted bases.
const NEW: [u32; 8] = [512, 513, 514, 515, 516, 517, 518, 519];
const VOCAB: usize = 576;
const FAMILIES: [&str; 3] = ["llama", "gpt2", "gpt_neox"];

fn vocab_dir(family: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/vocab_training")
        .join(family)
}

/// The adapted base of `family` in `dest` (as `utils/make_vocab_fixtures.py` builds it).
fn adapted(family: &str, dest: &Path) -> PathBuf {
    let src = reference_dir(family);
    std::fs::create_dir_all(dest).unwrap();
    for f in ["generation_config.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), dest.join(f)).unwrap();
    }
    std::fs::copy(
        vocab_dir(family).join("../tokenizer.json"),
        dest.join("tokenizer.json"),
    )
    .unwrap();
    let mut config = read_json(&src.join("config.json"));
    config["vocab_size"] = VOCAB.into();
    std::fs::write(dest.join("config.json"), config.to_string()).unwrap();
    let dev = Device::Cpu;
    let mut tensors = candle_core::safetensors::load(src.join("model.safetensors"), &dev).unwrap();
    let rows = candle_core::safetensors::load(vocab_dir(family).join("new_rows.safetensors"), &dev)
        .unwrap();
    let stored = match family {
        "llama" => vec![
            ("model.embed_tokens.weight", "embed"),
            ("lm_head.weight", "head"),
        ],
        "gpt2" => vec![("transformer.wte.weight", "embed")],
        _ => vec![
            ("gpt_neox.embed_in.weight", "embed"),
            ("embed_out.weight", "head"),
        ],
    };
    for (name, key) in stored {
        let w = &tensors[name];
        let pad = Tensor::zeros(
            (VOCAB - 512 - NEW.len(), w.dim(1).unwrap()),
            DType::F32,
            &dev,
        )
        .unwrap();
        let grown = Tensor::cat(&[w, &rows[key], &pad], 0).unwrap();
        tensors.insert(name.to_string(), grown);
    }
    candle_core::safetensors::save(&tensors, dest.join("model.safetensors")).unwrap();
    let record = serde_json::json!({
        "mode": "extend", "init": "mean", "base_model": family, "base_vocab_size": 512,
        "base_tokenizer_size": 512, "vocab_size": VOCAB, "tokenizer_size": 520,
        "new_token_ids": NEW, "new_merges": 0, "copied_rows": 0, "tokens_per_byte": null,
    });
    std::fs::write(dest.join("vocab_adaptation.json"), record.to_string()).unwrap();
    dest.to_path_buf()
}

/// `ids` with some replaced by new ids, so that the new rows are read and predicted.
fn with_new_ids(ids: &[u32]) -> Vec<u32> {
    ids.iter()
        .map(|&i| if i % 7 == 3 { NEW[(i % 8) as usize] } else { i })
        .collect()
}

/// Two datasets of corpus samples of `block` tokens holding new ids.
fn data(block: usize) -> TrainData {
    let samples = |b: usize, n: usize, skip: usize| -> Vec<Vec<u32>> {
        corpus_samples(b, n, skip)
            .iter()
            .map(|s| with_new_ids(s))
            .collect()
    };
    TrainData {
        block_size: block,
        tokenizer_hash: None,
        origin: None,
        datasets: vec![
            TrainDataset {
                name: "fortunes".into(),
                weight: 1.0,
                train: Arc::new(samples(block, 16, 0)),
                validation: Arc::new(samples(block, 4, 400)),
            },
            TrainDataset {
                name: "short".into(),
                weight: 0.5,
                train: Arc::new(samples(block / 2, 8, 200)),
                validation: Arc::new(samples(block / 2, 2, 500)),
            },
        ],
    }
}

/// LoRA r4 (query, value) without dropout on `base`, 6 steps of 4 samples.
fn lora_config(base: &Path, out: &Path) -> TrainConfig {
    TrainConfig {
        data_dir: "in-memory".into(),
        checkpoint_dir: base.to_path_buf(),
        out_dir: out.to_path_buf(),
        micro_batch_size: 2,
        batch_size: 4,
        max_steps: Some(6),
        learning_rate: 1e-2,
        min_lr: 1e-3,
        warmup_steps: 1,
        eval_interval: 3,
        save_interval: 2,
        lora_r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.0,
        ..Default::default()
    }
}

fn loss_of(model: &lit_claire::model::Gpt, ids: &[u32]) -> f64 {
    lit_claire::perplexity::perplexity(model, ids, ids.len(), 1)
        .unwrap()
        .loss
}

fn cpu() -> BuildOptions {
    BuildOptions::cpu_f32()
}

fn close(what: &str, got: f64, want: f64) {
    assert!(
        (got - want).abs() < 1e-4,
        "{what}: {got} vs PyTorch's {want}"
    );
}

/// `(name → values)` of a safetensors file.
fn tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn rows_of(t: &Tensor, ids: &[u32]) -> Vec<Vec<f32>> {
    let idx = Tensor::new(ids, &Device::Cpu).unwrap();
    t.to_dtype(DType::F32)
        .unwrap()
        .index_select(&idx, 0)
        .unwrap()
        .to_vec2()
        .unwrap()
}

// ---- against PEFT and transformers ----

/// PEFT's adapter with LoRA and trainable new tokens (random values) gives PEFT's loss
/// on the adapted base, and merged, transformers' loss; the merged folder keeps the
/// new vocabulary and tokenizer.
#[test]
fn peft_adapter_with_trainable_tokens_gives_peft_loss_and_merges() {
    for family in FAMILIES {
        let tmp = temp_dir();
        let base = adapted(family, &tmp.path().join("base"));
        let exp = read_json(&vocab_dir(family).join("expected.json"));
        let ids = crate::common::ids(&exp["input_ids"]);
        let plain = load_model(&base, &cpu(), None).unwrap();
        close(
            &format!("{family} adapted base"),
            loss_of(&plain, &ids),
            exp["loss"].as_f64().unwrap(),
        );
        let adapter = vocab_dir(family).join("peft");
        let with = load_model(&base, &cpu(), Some(&adapter)).unwrap();
        close(
            &format!("{family} + PEFT's adapter"),
            loss_of(&with, &ids),
            exp["peft_loss"].as_f64().unwrap(),
        );
        let merged = tmp.path().join("merged");
        let r = merge_lora(&base, &adapter, &merged, false).unwrap();
        assert!(!r.untied_head, "{family}: a tied head stays tied");
        let m = load_model(&merged, &cpu(), None).unwrap();
        close(
            &format!("{family} merged"),
            loss_of(&m, &ids),
            exp["peft_merged_loss"].as_f64().unwrap(),
        );
        assert_eq!(load_config(&merged).unwrap().vocab_size, VOCAB);
        assert_eq!(
            std::fs::read(merged.join("tokenizer.json")).unwrap(),
            std::fs::read(base.join("tokenizer.json")).unwrap(),
            "{family}: the tokenizer with the new tokens"
        );
    }
}

/// What `write_our_adapters` trains: 3 steps of `--train-embeddings new` (the default
/// on an adapted base) on `base`, into `out`; the final checkpoint.
fn train_ours(base: &Path, out: &Path) -> PathBuf {
    let mut cfg = lora_config(base, out);
    cfg.max_steps = Some(3);
    cfg.eval_interval = 100;
    cfg.save_interval = 100;
    let s = pretrain_with_data(&cfg, data(17)).unwrap();
    s.final_checkpoint.unwrap()
}

/// The adapter files of a checkpoint, as the fixture keeps them (the base model's
/// path, a temporary folder, replaced by the family).
fn adapter_files(ck: &Path, family: &str) -> (serde_json::Value, HashMap<String, Tensor>) {
    let mut config = read_json(&ck.join("adapter_config.json"));
    config["base_model_name_or_path"] = family.into();
    (config, tensors(&ck.join("adapter_model.safetensors")))
}

/// Writes `tests/fixtures/vocab_training/<family>/ours/`: the second step of
/// `utils/make_vocab_fixtures.py`.
#[test]
#[ignore]
fn write_our_adapters() {
    if let Ok(dir) = std::env::var("LIT_CLAIRE_ALL_ADAPTERS") {
        // `--train-embeddings all` adapters into `dir`, to check by hand with
        // `utils/make_vocab_fixtures.py check`.
        for family in FAMILIES {
            let dest = Path::new(&dir).join(family);
            let base = adapted(family, &dest.join("base"));
            let mut cfg = lora_config(&base, &dest.join("run"));
            cfg.train_embeddings = Some(TrainEmbeddings::All);
            cfg.max_steps = Some(3);
            let s = pretrain_with_data(&cfg, data(17)).unwrap();
            let model = load_model(&base, &cpu(), s.final_checkpoint.as_deref()).unwrap();
            let exp = read_json(&vocab_dir(family).join("expected.json"));
            let ids = crate::common::ids(&exp["input_ids"]);
            eprintln!("{family}: {}", loss_of(&model, &ids));
        }
        return;
    }
    for family in FAMILIES {
        let tmp = temp_dir();
        let base = adapted(family, &tmp.path().join("base"));
        let ck = train_ours(&base, &tmp.path().join("run"));
        let (config, _) = adapter_files(&ck, family);
        let dest = vocab_dir(family).join("ours");
        std::fs::create_dir_all(&dest).unwrap();
        std::fs::write(
            dest.join("adapter_config.json"),
            serde_json::to_string_pretty(&config).unwrap(),
        )
        .unwrap();
        std::fs::copy(
            ck.join("adapter_model.safetensors"),
            dest.join("adapter_model.safetensors"),
        )
        .unwrap();
    }
}

/// An adapter we trained with new tokens, loaded by PEFT, gives PEFT the loss we
/// compute with it, and merged (by PEFT, saved, loaded again by transformers with the
/// tokenizer) the loss we compute after our merge. Training again writes an adapter
/// of the same form: the same tensors and shapes, the same config.
#[test]
fn our_adapter_with_new_tokens_loads_in_peft_with_our_loss() {
    for family in FAMILIES {
        let tmp = temp_dir();
        let base = adapted(family, &tmp.path().join("base"));
        let exp = read_json(&vocab_dir(family).join("expected.json"));
        let ids = crate::common::ids(&exp["input_ids"]);
        let ours = vocab_dir(family).join("ours");
        let with = load_model(&base, &cpu(), Some(&ours)).unwrap();
        let loss = loss_of(&with, &ids);
        close(
            &format!("{family}: ours in PEFT"),
            loss,
            exp["ours_loss"].as_f64().unwrap(),
        );
        // The trained rows count: without them, another loss.
        let mut lora_only = load_model(&base, &cpu(), None).unwrap();
        let a = lit_claire::hf::peft::load_adapter(&ours, &Device::Cpu).unwrap();
        lit_claire::lora::attach_tensors(&mut lora_only, &a.tensors, a.scale(), 0.0, false)
            .unwrap();
        assert_eq!(
            a.embeddings.rows.len(),
            if family == "gpt2" { 1 } else { 2 }
        );
        assert!(
            (loss - loss_of(&lora_only, &ids)).abs() > 1e-3,
            "{family}: the rows change the loss"
        );
        let merged = tmp.path().join("merged");
        merge_lora(&base, &ours, &merged, false).unwrap();
        let m = load_model(&merged, &cpu(), None).unwrap();
        close(
            &format!("{family}: ours merged"),
            loss_of(&m, &ids),
            exp["ours_merged_loss"].as_f64().unwrap(),
        );

        let ck = train_ours(&base, &tmp.path().join("run"));
        let (config, fresh) = adapter_files(&ck, family);
        let (want_config, want) = adapter_files(&ours, family);
        assert_eq!(config, want_config, "{family}: adapter_config.json");
        let shapes = |m: &HashMap<String, Tensor>| {
            let mut v: Vec<(String, Vec<usize>)> = m
                .iter()
                .map(|(k, t)| (k.clone(), t.dims().to_vec()))
                .collect();
            v.sort();
            v
        };
        assert_eq!(shapes(&fresh), shapes(&want), "{family}: adapter tensors");
    }
}

// ---- the engine ----

/// The gradient the trained rows get is the full matrices' gradient at their rows
/// (a tied head's and the embeddings' added), and nothing else of the model trains.
#[test]
fn trained_rows_get_the_rows_of_the_full_gradient() {
    for family in ["llama", "gpt2"] {
        let tmp = temp_dir();
        let base = adapted(family, tmp.path());
        let cfg = load_config(&base).unwrap();
        let weights = Weights::open(&base).unwrap();
        let rows: Vec<Vec<u32>> = corpus_samples(17, 3, 0)
            .iter()
            .map(|s| with_new_ids(s))
            .collect();
        let batch = Batch::from_rows(&rows, None, &Device::Cpu).unwrap();
        let input = PassInput {
            ids: &batch.inputs,
            targets: &batch.targets,
            mask: &batch.mask,
            docs: None,
            dropout: None,
            grad_scale: 1.0 / batch.tokens as f64,
            checkpoint_every: 0,
        };
        let full = build_model(
            &cfg,
            &weights,
            &BuildOptions {
                trainable: true,
                ..cpu()
            },
        )
        .unwrap();
        let mut g = Grads::new(&full.vars);
        let full_loss = train_pass(&full.model, &input, &mut g).unwrap();
        let g: HashMap<String, Tensor> = full
            .vars
            .iter()
            .map(|(n, _)| n.clone())
            .zip(g.take(&full.vars).unwrap())
            .collect();

        let mut model = build_model(&cfg, &weights, &cpu()).unwrap().model;
        let vars =
            lit_claire::lora::attach_embeddings(&mut model, TrainEmbeddings::New, &NEW).unwrap();
        model.write_token_rows().unwrap();
        let mut gr = Grads::new(&vars);
        let loss = train_pass(&model, &input, &mut gr).unwrap();
        assert_eq!(loss, full_loss, "{family}: one forward");
        let got = gr.take(&vars).unwrap();
        let (embed, head) = match family {
            "llama" => ("model.embed_tokens", Some("lm_head")),
            _ => ("transformer.wte", None),
        };
        let mut want = vec![(
            format!("{embed}.token_adapter.trainable_tokens_delta"),
            format!("{embed}.weight"),
        )];
        if let Some(h) = head {
            want.push((
                format!("{h}.token_adapter.trainable_tokens_delta"),
                format!("{h}.weight"),
            ));
        }
        let names: Vec<&String> = vars.iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            want.iter().map(|(a, _)| a).collect::<Vec<_>>(),
            "{family}"
        );
        for ((_, full_name), g_rows) in want.iter().zip(&got) {
            let w = rows_of(&g[full_name], &NEW);
            let r: Vec<Vec<f32>> = g_rows.to_vec2().unwrap();
            let scale = w.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
            assert!(
                scale > 0.0,
                "{family} {full_name}: the new rows get a gradient"
            );
            let d = max_abs_diff(&r.concat(), &w.concat());
            assert!(
                d <= 1e-5 * scale,
                "{family} {full_name}: rows differ by {d} (scale {scale})"
            );
        }
    }
}

/// Full fine-tuning trains the new rows (embeddings, untied head, tied head), and
/// `--train-embeddings new` (the default on an adapted base) only them: every other
/// row of both matrices stays as it was, bit for bit, and the adapter holds the rows
/// as PEFT names them.
#[test]
fn full_training_and_new_rows_train_the_new_tokens() {
    for family in ["llama", "gpt2"] {
        let tmp = temp_dir();
        let base = adapted(family, &tmp.path().join("base"));
        let before = tensors(&base.join("model.safetensors"));
        let matrices: Vec<&str> = match family {
            "llama" => vec!["model.embed_tokens.weight", "lm_head.weight"],
            _ => vec!["transformer.wte.weight"],
        };
        // Full fine-tuning.
        let mut cfg = lora_config(&base, &tmp.path().join("full"));
        cfg.lora_r = 0;
        cfg.max_steps = Some(2);
        let s = pretrain_with_data(&cfg, data(17)).unwrap();
        let after = tensors(&s.final_checkpoint.unwrap().join("model.safetensors"));
        for m in &matrices {
            let (a, b) = (rows_of(&before[*m], &NEW), rows_of(&after[*m], &NEW));
            for (k, (x, y)) in a.iter().zip(&b).enumerate() {
                assert!(
                    max_abs_diff(x, y) > 0.0,
                    "{family} full: {m} row {} unchanged",
                    NEW[k]
                );
            }
        }
        // LoRA with the new rows (the default here).
        let run = tmp.path().join("new");
        let mut t = Trainer::new(&lora_config(&base, &run), data(17)).unwrap();
        let s = t.run(None).unwrap();
        let hp = std::fs::read_to_string(run.join("hyperparameters.toml")).unwrap();
        assert!(hp.contains("train_embeddings = \"new\""), "{hp}");
        let model = t.model();
        let untouched: Vec<u32> = (0..VOCAB as u32).filter(|i| !NEW.contains(i)).collect();
        let now = [&model.wte, &model.lm_head.weight];
        for (m, w) in matrices.iter().zip(now) {
            assert_eq!(
                rows_of(w, &untouched),
                rows_of(&before[*m], &untouched),
                "{family}: {m}"
            );
            let (a, b) = (rows_of(&before[*m], &NEW), rows_of(w, &NEW));
            assert!(
                max_abs_diff(&a.concat(), &b.concat()) > 1e-3,
                "{family}: {m} new rows"
            );
        }
        let fin = s.final_checkpoint.unwrap();
        let saved = tensors(&fin.join("adapter_model.safetensors"));
        let config = read_json(&fin.join("adapter_config.json"));
        let tokens: Vec<&String> = saved.keys().filter(|k| !k.contains(".lora_")).collect();
        assert_eq!(tokens.len(), matrices.len(), "{family}: {tokens:?}");
        assert!(
            tokens
                .iter()
                .all(|k| k.ends_with(".token_adapter.trainable_tokens_delta"))
        );
        let indices = config["trainable_token_indices"].as_object().unwrap();
        assert_eq!(indices.len(), matrices.len(), "{config}");
        assert!(
            indices.values().all(|v| crate::common::ids(v) == NEW),
            "{config}"
        );
        // The saved adapter scores as the model that trained it, and so does the
        // folder convert-to-hf makes of it, with the new tokenizer.
        let ids = with_new_ids(&corpus_samples(33, 1, 700)[0]);
        let trained = loss_of(model, &ids);
        let back = load_model(&base, &cpu(), Some(&fin)).unwrap();
        assert!((loss_of(&back, &ids) - trained).abs() < 1e-5, "{family}");
        let hf = tmp.path().join("hf");
        lit_claire::hf::export::convert_to_hf(&lit_claire::hf::export::ConvertOptions {
            input: fin.clone(),
            output_dir: hf.clone(),
            base: None,
            dtype: None,
            max_shard_size: lit_claire::hf::export::DEFAULT_MAX_SHARD_SIZE,
            overwrite: false,
            license: None,
            repo_id: None,
        })
        .unwrap();
        let converted = load_model(&hf, &cpu(), None).unwrap();
        assert!(
            (loss_of(&converted, &ids) - trained).abs() < 1e-4,
            "{family} convert-to-hf"
        );
        let tok = Tokenizer::from_dir(&hf).unwrap();
        assert_eq!(tok.inner().id_to_token(512).as_deref(), Some("ção"));
    }
}

/// `--train-embeddings all` trains both matrices whole and saves them as PEFT's
/// `modules_to_save` (a tied head under both names, with `ensure_weight_tying`);
/// `none` trains neither; the saved adapters score and merge as trained.
#[test]
fn all_trains_both_matrices_and_none_neither() {
    for family in ["llama", "gpt2"] {
        let tmp = temp_dir();
        let base = adapted(family, &tmp.path().join("base"));
        let ids = with_new_ids(&corpus_samples(33, 1, 700)[0]);
        let mut cfg = lora_config(&base, &tmp.path().join("all"));
        cfg.train_embeddings = Some(TrainEmbeddings::All);
        cfg.max_steps = Some(2);
        let mut t = Trainer::new(&cfg, data(17)).unwrap();
        let fin = t.run(None).unwrap().final_checkpoint.unwrap();
        let config = read_json(&fin.join("adapter_config.json"));
        let (embed, tied) = match family {
            "llama" => ("embed_tokens", false),
            _ => ("wte", true),
        };
        assert_eq!(
            config["modules_to_save"],
            serde_json::json!([embed, "lm_head"])
        );
        assert_eq!(config["ensure_weight_tying"], tied);
        assert!(config["trainable_token_indices"].is_null());
        let saved = tensors(&fin.join("adapter_model.safetensors"));
        let whole: Vec<&String> = saved.keys().filter(|k| !k.contains(".lora_")).collect();
        assert_eq!(whole.len(), 2, "{whole:?}");
        let trained = loss_of(t.model(), &ids);
        let back = load_model(&base, &cpu(), Some(&fin)).unwrap();
        assert!(
            (loss_of(&back, &ids) - trained).abs() < 1e-5,
            "{family} all"
        );
        let merged = tmp.path().join("merged");
        let r = merge_lora(&base, &fin, &merged, false).unwrap();
        assert!(!r.untied_head, "{family}");
        let m = load_model(&merged, &cpu(), None).unwrap();
        assert!(
            (loss_of(&m, &ids) - trained).abs() < 1e-4,
            "{family} all merged"
        );

        let mut cfg = lora_config(&base, &tmp.path().join("none"));
        cfg.train_embeddings = Some(TrainEmbeddings::None);
        cfg.max_steps = Some(1);
        let fin = pretrain_with_data(&cfg, data(17))
            .unwrap()
            .final_checkpoint
            .unwrap();
        let saved = tensors(&fin.join("adapter_model.safetensors"));
        assert!(saved.keys().all(|k| k.contains(".lora_")), "{family} none");
    }
}

/// Defaults and refusals, before any file is written: `none` on a base without new
/// tokens, `new` refused there in one line, and beside `--lora-head`, and without
/// LoRA; `--strategy fsdp` takes either mode.
#[test]
fn train_embeddings_defaults_and_refusals() {
    let tmp = temp_dir();
    let reference = reference_dir("llama");
    let plain = |c: &TrainConfig| lit_claire::train::embeddings::plan(c, None);
    let cfg = lora_config(&reference, &tmp.path().join("a"));
    assert_eq!(plain(&cfg).unwrap().unwrap().mode, TrainEmbeddings::None);
    let mut new = cfg.clone();
    new.train_embeddings = Some(TrainEmbeddings::New);
    let e = Trainer::new(&new, data(17)).err().unwrap().to_string();
    assert!(
        e.contains("--train-embeddings new") && e.contains("no new tokens") && !e.contains('\n'),
        "{e}"
    );
    let e = lit_claire::train::estimate::dry_run(&new)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no new tokens"), "{e}");
    let base = adapted("llama", &tmp.path().join("base"));
    let mut head = lora_config(&base, &tmp.path().join("b"));
    head.lora_head = true;
    let e = Trainer::new(&head, data(17)).err().unwrap().to_string();
    assert!(
        e.contains("--lora-head") && e.contains("the default on a folder adapt-vocab made"),
        "{e}"
    );
    // fsdp shards the rows as every other strategy trains them.
    let mut sharded = lora_config(&base, &tmp.path().join("b"));
    sharded.strategy = StrategyKind::Fsdp;
    sharded.devices = 2;
    for (given, want) in [
        (None, TrainEmbeddings::New),
        (Some(TrainEmbeddings::New), TrainEmbeddings::New),
        (Some(TrainEmbeddings::All), TrainEmbeddings::All),
    ] {
        sharded.train_embeddings = given;
        let p = plain(&sharded).unwrap().unwrap();
        assert_eq!(p.mode, want, "fsdp, --train-embeddings {given:?}");
    }
    let mut full = lora_config(&base, &tmp.path().join("c"));
    full.lora_r = 0;
    full.train_embeddings = Some(TrainEmbeddings::New);
    let e = Trainer::new(&full, data(17)).err().unwrap().to_string();
    assert!(e.contains("for LoRA runs"), "{e}");
    for d in ["a", "b", "c"] {
        assert!(!tmp.path().join(d).exists(), "{d} was written");
    }
}

/// Resuming a run that trains the new rows gives the losses of a run that never
/// stopped; a flag contradicting the checkpoint's setting is refused.
#[test]
fn resume_with_new_rows_gives_the_uninterrupted_losses() {
    let tmp = temp_dir();
    let base = adapted("gpt_neox", &tmp.path().join("base"));
    let straight = tmp.path().join("straight");
    pretrain_with_data(&lora_config(&base, &straight), data(17)).unwrap();
    let broken = tmp.path().join("broken");
    let mut cfg = lora_config(&base, &broken);
    Trainer::new(&cfg, data(17)).unwrap().run(Some(3)).unwrap();
    cfg.resume = Some("auto".into());
    let mut wrong = cfg.clone();
    wrong.train_embeddings = Some(TrainEmbeddings::All);
    let e = Trainer::new(&wrong, data(17)).err().unwrap().to_string();
    assert!(e.contains("--train-embeddings new"), "{e}");
    pretrain_with_data(&cfg, data(17)).unwrap();
    let rows = |run: &Path| -> Vec<String> {
        std::fs::read_to_string(run.join("metrics.csv"))
            .unwrap()
            .lines()
            .map(|l| {
                // Every column but the timings.
                let c: Vec<&str> = l.split(',').collect();
                [&c[..6], &c[8..]].concat().join(",")
            })
            .collect()
    };
    assert_eq!(rows(&straight), rows(&broken));
    let a = tensors(&straight.join("final/adapter_model.safetensors"));
    let b = tensors(&broken.join("final/adapter_model.safetensors"));
    for (k, t) in &a {
        let d = max_abs_diff(
            &t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            &b[k].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert!(d < 1e-6, "{k}: {d}");
    }
}

/// zero1 on two thread ranks trains the new rows as one rank does.
#[test]
fn zero1_on_two_ranks_trains_the_rows_as_one_rank() {
    let tmp = temp_dir();
    let base = adapted("llama", &tmp.path().join("base"));
    let mut one = lora_config(&base, &tmp.path().join("one"));
    one.micro_batch_size = 4;
    one.max_steps = Some(4);
    let mut two = one.clone();
    two.out_dir = tmp.path().join("two");
    two.devices = 2;
    two.batch_size = 2;
    two.micro_batch_size = 2;
    two.strategy = StrategyKind::Zero1;
    pretrain_with_data(&one, data(17)).unwrap();
    pretrain_with_data(&two, data(17)).unwrap();
    let a = tensors(&one.out_dir.join("final/adapter_model.safetensors"));
    let b = tensors(&two.out_dir.join("final/adapter_model.safetensors"));
    assert_eq!(a.len(), b.len());
    let rows = a.keys().filter(|k| k.contains("trainable_tokens")).count();
    assert_eq!(rows, 2);
    for (k, t) in &a {
        let (x, y) = (
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b[k].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        let d = max_abs_diff(&x, &y);
        assert!(d < 1e-5, "{k}: 2 ranks differ by {d}");
    }
    let moved = max_abs_diff(
        &a["base_model.model.lm_head.token_adapter.trainable_tokens_delta"]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        &rows_of(
            &tensors(&base.join("model.safetensors"))["lm_head.weight"],
            &NEW,
        )
        .concat(),
    );
    assert!(moved > 1e-3, "{moved}");
}

/// `cfg` written to `out` on `devices` thread ranks of `strategy`, with the global
/// batch of 4 samples (micro-batches of at most 2).
fn on_ranks(cfg: &TrainConfig, out: &Path, devices: usize, strategy: StrategyKind) -> TrainConfig {
    TrainConfig {
        out_dir: out.to_path_buf(),
        devices,
        batch_size: 4 / devices,
        micro_batch_size: (4 / devices).min(2),
        strategy,
        collective_timeout: 60,
        ..cfg.clone()
    }
}

/// The trained embeddings of an adapter (its tensors but LoRA's) by name, and how far
/// the largest of them moved from the base's values in `base` (the rows of the new
/// tokens for `new`; a tied head's copy under the head's name is left out there).
fn trained_embeddings(ck: &Path, base: &Path) -> (Vec<String>, f32) {
    let adapter = tensors(&ck.join("adapter_model.safetensors"));
    let start = tensors(&base.join("model.safetensors"));
    let mut names = Vec::new();
    let mut moved = 0f32;
    for (k, t) in &adapter {
        if k.contains(".lora_") {
            continue;
        }
        names.push(k.clone());
        let module = k.trim_start_matches("base_model.model.");
        let (was, now) = match module.strip_suffix(lit_claire::lora::TOKEN_ROWS_SUFFIX) {
            Some(m) => (
                rows_of(&start[&format!("{m}.weight")], &NEW).concat(),
                rows_of(t, &(0..NEW.len() as u32).collect::<Vec<_>>()).concat(),
            ),
            None => match start.get(module) {
                Some(w) => (
                    w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                ),
                None => continue,
            },
        };
        moved = moved.max(max_abs_diff(&was, &now));
    }
    names.sort();
    (names, moved)
}

/// fsdp on 2 and 4 thread ranks trains the new rows (`new`) and both matrices whole
/// (`all`) as 1 rank does over 6 steps: the same losses (1e-5 relative), the same
/// adapter (its rows or matrices too, 1e-5) and adapter config; an untied head
/// (llama) and a tied one (gpt2, whose head reads the embeddings' trained rows).
/// 7 Dec 2026: losses within 2.5e-8, weights within 6.8e-6 (llama's head under `all`
/// on 4 ranks, exactly as far as ddp on 4 ranks moves it from 1 rank; the rest below
/// 6.3e-7).
#[test]
fn fsdp_on_two_and_four_ranks_trains_the_embeddings_as_one_rank() {
    use crate::data_parallel::assert_same;
    let tmp = temp_dir();
    for family in ["llama", "gpt2"] {
        let base = adapted(family, &tmp.path().join(family));
        for mode in [TrainEmbeddings::New, TrainEmbeddings::All] {
            let mut cfg = lora_config(&base, tmp.path());
            cfg.train_embeddings = Some(mode);
            let what = format!("{family}, --train-embeddings {mode}");
            let one = temp_dir();
            pretrain_with_data(&on_ranks(&cfg, one.path(), 1, StrategyKind::Ddp), data(17))
                .unwrap();
            let (names, moved) = trained_embeddings(&one.path().join("final"), &base);
            let want = match (mode, family) {
                (TrainEmbeddings::New, "gpt2") => 1,
                _ => 2,
            };
            assert_eq!(names.len(), want, "{what}: {names:?}");
            assert!(moved > 1e-3, "{what}: the embeddings moved by {moved}");
            let config = |run: &Path| {
                let mut c = read_json(&run.join("final/adapter_config.json"));
                let c = c.as_object_mut().unwrap();
                (
                    c.remove("trainable_token_indices"),
                    c.remove("modules_to_save"),
                )
            };
            for devices in [2, 4] {
                let run = temp_dir();
                let cfg = on_ranks(&cfg, run.path(), devices, StrategyKind::Fsdp);
                pretrain_with_data(&cfg, data(17)).unwrap();
                let log = std::fs::read_to_string(run.path().join("train.log")).unwrap();
                assert!(
                    log.contains(&format!("cpu × {devices} ranks (fsdp)")),
                    "{log}"
                );
                assert_eq!(
                    trained_embeddings(&run.path().join("final"), &base).0,
                    names,
                    "{what}"
                );
                assert_eq!(config(run.path()), config(one.path()), "{what}");
                assert!(run.path().join("final/optimizer.safetensors").exists());
                assert_same(
                    &format!("{what}, {devices} ranks fsdp vs 1 rank"),
                    one.path(),
                    run.path(),
                );
            }
        }
    }
}

/// A checkpoint of 2 fsdp ranks training the new rows (their values in the adapter,
/// their moments by name) resumes on 1 rank (ddp) and on 4 fsdp ranks as the run
/// that never stopped went on.
#[test]
fn a_checkpoint_of_two_fsdp_ranks_with_new_rows_resumes_on_one_and_on_four() {
    use crate::data_parallel::{assert_same, stopped_at};
    let tmp = temp_dir();
    let base = adapted("llama", &tmp.path().join("base"));
    let cfg = lora_config(&base, tmp.path());
    let two = temp_dir();
    pretrain_with_data(&on_ranks(&cfg, two.path(), 2, StrategyKind::Fsdp), data(17)).unwrap();
    let saved = tensors(&two.path().join("step-00000004/optimizer.safetensors"));
    assert!(
        saved
            .keys()
            .any(|k| k.starts_with("exp_avg.") && k.ends_with(lit_claire::lora::TOKEN_ROWS_SUFFIX)),
        "{:?}",
        saved.keys()
    );
    for (devices, strategy) in [(1, StrategyKind::Ddp), (4, StrategyKind::Fsdp)] {
        let (_keep, resumed) = stopped_at(two.path(), 4);
        let mut cfg = on_ranks(&cfg, &resumed, devices, strategy);
        cfg.resume = Some("auto".into());
        assert_eq!(pretrain_with_data(&cfg, data(17)).unwrap().steps, 6);
        let log = std::fs::read_to_string(resumed.join("train.log")).unwrap();
        assert!(log.contains("resuming"), "{log}");
        assert_same(
            &format!("new rows, 2 ranks (fsdp) resumed at step 4 on {devices} ({strategy})"),
            two.path(),
            &resumed,
        );
    }
}

/// The memory plan counts the trained rows: `n · C` per matrix for `new` (held apart,
/// so in the parameters too), `V · C` per matrix for `all`; under fsdp too.
#[test]
fn memory_plan_counts_the_trained_rows() {
    use lit_claire::train::estimate::{ParamCounts, estimate};
    let tmp = temp_dir();
    for (family, matrices) in [("llama", 2u64), ("gpt2", 1)] {
        let base = adapted(family, &tmp.path().join(family));
        let model = load_config(&base).unwrap();
        let mut cfg = lora_config(&base, &tmp.path().join("run"));
        let none = {
            let mut c = cfg.clone();
            c.train_embeddings = Some(TrainEmbeddings::None);
            estimate(&model, &c, 16).unwrap()
        };
        let lora = ParamCounts::of(&model, cfg.lora().as_ref()).lora;
        let new = estimate(&model, &cfg, 16).unwrap();
        let rows = 8 * 64 * matrices;
        assert_eq!(new.grads, 4 * (lora + rows), "{family}");
        assert_eq!(new.optimizer, 4 * 2 * (lora + rows), "{family}");
        assert_eq!(new.params, none.params + 4 * rows, "{family}");
        assert!(
            new.assumed.contains("rows of new tokens"),
            "{}",
            new.assumed
        );
        cfg.train_embeddings = Some(TrainEmbeddings::All);
        let all = estimate(&model, &cfg, 16).unwrap();
        let whole = VOCAB as u64 * 64 * matrices;
        assert_eq!(all.grads, 4 * (lora + whole), "{family}");
        assert_eq!(all.params, none.params, "{family}");

        // fsdp on 2 ranks: each keeps half of the rows (and of their gradients and
        // moments) and gathers them whole with the embeddings for a pass, where their
        // gradient buffers are whole too; `all` trains the matrices the ranks hold anyway.
        let mut sharded = cfg.clone();
        sharded.devices = 2;
        sharded.strategy = StrategyKind::Fsdp;
        let of = |mode| {
            let mut c = sharded.clone();
            c.train_embeddings = Some(mode);
            estimate(&model, &c, 16).unwrap()
        };
        let (none, new, all) = (
            of(TrainEmbeddings::None),
            of(TrainEmbeddings::New),
            of(TrainEmbeddings::All),
        );
        assert_eq!(
            new.params,
            none.params + 4 * rows / 2 + 4 * rows,
            "{family}"
        );
        assert_eq!(new.optimizer, none.optimizer + 4 * 2 * rows / 2, "{family}");
        assert!(
            new.grads >= none.grads + 4 * rows / 2 + 4 * rows,
            "{family}: {} vs {}",
            new.grads,
            none.grads
        );
        assert_eq!(all.params, none.params, "{family}");
        assert_eq!(
            all.optimizer,
            none.optimizer + 4 * 2 * whole / 2,
            "{family}"
        );
        assert!(
            all.grads >= none.grads + 4 * whole / 2 + 4 * whole,
            "{family}: {} vs {}",
            all.grads,
            none.grads
        );
    }
}

/// The merged adapted model's GGUF holds every token, the new ones by their text.
#[test]
fn gguf_of_a_merged_adapted_model_holds_the_new_tokens() {
    let tmp = temp_dir();
    let base = adapted("llama", &tmp.path().join("base"));
    let merged = tmp.path().join("merged");
    merge_lora(&base, &vocab_dir("llama").join("peft"), &merged, false).unwrap();
    let out = tmp.path().join("m.gguf");
    lit_claire::gguf::llama_cpp::quantize(&merged, &out, lit_claire::gguf::QuantType::F16, false)
        .unwrap();
    let g = crate::publish_gguf::parse(&out);
    let crate::publish_gguf::Val::Arr(_, tokens) = g.meta("tokenizer.ggml.tokens") else {
        panic!("no token list")
    };
    assert_eq!(tokens.len(), VOCAB);
    let text = |v: &crate::publish_gguf::Val| match v {
        crate::publish_gguf::Val::Str(s) => s.clone(),
        v => panic!("{v:?}"),
    };
    assert_eq!(text(&tokens[512]), "ção");
    assert_eq!(text(&tokens[519]), "ência");
}

// ---- bits per byte ----

/// Bits per byte by hand: the bytes of a text's ids are the text's bytes (plus the
/// space a SentencePiece tokenizer puts before it), for byte-level BPE and
/// SentencePiece with byte fallback; perplexity's bits per byte is its summed loss /
/// ln 2 / the bytes of the predicted tokens, in the library and in `perplexity`'s
/// text and JSON.
#[test]
fn bits_per_byte_by_hand() {
    let tok = Tokenizer::from_dir(&reference_dir("llama")).unwrap();
    let tb = tok.token_bytes();
    let text = "Olá, mundo! Tudo bem? Ação e coração.";
    let ids = tok.encode(text).unwrap();
    // Byte-level BPE: one byte per character of the tokens' strings ("Ã¡" is á).
    assert_eq!(tb.sum(ids.iter().copied()), text.len() as u64, "{ids:?}");
    assert_eq!(text.len(), 42);
    assert_eq!(tb.sum(tok.encode("Olá").unwrap()), 4); // "O" 1 + "l" 1 + "Ã¡" 2
    // Special tokens are not text.
    assert_eq!(tb.of(0) + tb.of(1) + tb.of(2), 0);
    // SentencePiece: ▁ is a space, <0xNN> one byte.
    let spm_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/spm_tokenizer");
    let spm = tokenizers::Tokenizer::from_file(spm_dir.join("tokenizer.json")).unwrap();
    let stb = TokenBytes::of_tokenizer(&spm);
    let rare = "Olá 漢字 ✓";
    let e = spm.encode(rare, false).unwrap();
    assert!(
        e.get_tokens().iter().any(|t| t.starts_with("<0x")),
        "{:?}",
        e.get_tokens()
    );
    assert_eq!(
        stb.sum(e.get_ids().iter().copied()),
        (rare.len() + 1) as u64
    );

    // Perplexity: the summed loss over the bytes of every token but the first.
    let model = load_model(&reference_dir("llama"), &cpu(), None).unwrap();
    let r = lit_claire::perplexity::perplexity_with_bytes(&model, &ids, 256, 1, Some(&tb)).unwrap();
    let scored = tok.inner().decode(&ids[1..], true).unwrap();
    assert_eq!(r.bytes, Some(scored.len() as u64), "{scored:?}");
    let nats = r.loss * (ids.len() - 1) as f64;
    let by_hand = nats / std::f64::consts::LN_2 / scored.len() as f64;
    assert!((r.bits_per_byte.unwrap() - by_hand).abs() < 1e-12);
    assert_eq!(bits_per_byte(nats, scored.len() as u64), r.bits_per_byte);
    assert_eq!(bits_per_byte(1.0, 0), None);

    let tmp = temp_dir();
    let input = tmp.path().join("t.txt");
    std::fs::write(&input, text).unwrap();
    let json = perplexity_json(&reference_dir("llama"), &input);
    let cli = json["bits_per_byte"].as_f64().unwrap();
    assert!((cli - by_hand).abs() < 1e-5, "{cli} vs {by_hand}");
    let out = std::process::Command::new(bin())
        .args(["perplexity", "--checkpoint-dir"])
        .arg(reference_dir("llama"))
        .arg("--input")
        .arg(&input)
        .output()
        .unwrap();
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(line.contains(&format!("bits per byte {cli:.6}")), "{line}");
}

/// A run logs validation bits per byte in metrics.csv and TensorBoard (the summed loss
/// of every dataset over their bytes); `validate` adds the column to
/// validation_results.csv, upgrading files of both older layouts without losing a
/// row; `plot --y bpb` draws them, and says so when a run has none.
#[test]
fn bits_per_byte_in_metrics_validation_and_plot() {
    use lit_claire::plot::{PlotOptions, YAxis, plot_runs, read_metrics, read_validation_results};
    use lit_claire::train::validate::{ValidateOptions, validate_run};
    let tmp = temp_dir();
    let base = adapted("gpt2", &tmp.path().join("base"));
    let run = tmp.path().join("run");
    let mut cfg = lora_config(&base, &run);
    cfg.max_steps = Some(4);
    cfg.eval_interval = 2;
    cfg.logger = vec![
        lit_claire::train::loggers::Logger::Csv,
        lit_claire::train::loggers::Logger::Tensorboard,
    ];
    let d = data(17);
    pretrain_with_data(&cfg, d.clone()).unwrap();
    let rows = read_metrics(run.join("metrics.csv")).unwrap();
    let evals: Vec<_> = rows.iter().filter(|r| r.val_loss.is_some()).collect();
    assert_eq!(evals.len(), 2);
    // By hand: every validation sample's loss and bytes, over both datasets.
    let model = load_model(&base, &cpu(), Some(&run.join("final"))).unwrap();
    let tb = Tokenizer::from_dir(&base).unwrap().token_bytes();
    let (mut nats, mut bytes) = (0.0, 0u64);
    for ds in &d.datasets {
        for i in 0..ds.validation.len() {
            let s = ds.validation.sample(i).unwrap();
            let b =
                Batch::from_samples(std::slice::from_ref(&s), d.block_size, &Device::Cpu).unwrap();
            nats += lit_claire::train::evaluate::loss_sum(&model, &b).unwrap();
            bytes += tb.sum(s[1..].iter().copied());
        }
    }
    let want = nats / std::f64::consts::LN_2 / bytes as f64;
    let got = evals[1].val_bpb.unwrap();
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    let tags: Vec<String> = lit_claire::train::tensorboard::event_files(&run)
        .unwrap()
        .iter()
        .flat_map(|f| lit_claire::train::tensorboard::read_events(f).unwrap())
        .filter_map(|e| e.summary)
        .flat_map(|s| s.value.into_iter().map(|v| v.tag))
        .collect();
    assert!(tags.iter().any(|t| t == "val/bpb"), "{tags:?}");

    // validation_results.csv of both older layouts, then validate.
    let old = [
        "checkpoint,step,dataset,loss,perplexity,tokens,batch_size,elapsed_s,peak_memory_mb\nold,1,x,2.0,7.39,10,1,0.1,1.0\n",
        "checkpoint,step,dataset,loss,perplexity,tokens,batch_size,elapsed_s,peak_memory_mb,data\nold,1,x,2.0,7.39,10,1,0.1,1.0,abc\n",
    ];
    for (k, text) in old.iter().enumerate() {
        let csv = tmp.path().join(format!("v{k}.csv"));
        std::fs::write(&csv, text).unwrap();
        let opts = ValidateOptions {
            run: run.clone(),
            max_batches: None,
            batch_size: 2,
            csv: Some(csv.clone()),
            watch: None,
            cross_document_attention: None,
        };
        let scored = validate_run(&opts, &d, &lit_claire::strategy::Strategy::cpu()).unwrap();
        let rows = read_validation_results(&csv).unwrap();
        assert_eq!(rows.len(), 1 + scored.len());
        assert_eq!(
            (rows[0].checkpoint.as_str(), rows[0].bits_per_byte),
            ("old", None)
        );
        assert_eq!(rows[0].data, if k == 0 { "" } else { "abc" });
        let fin = rows
            .iter()
            .find(|r| r.checkpoint == "final" && r.dataset == "fortunes")
            .unwrap();
        assert!(fin.bits_per_byte.unwrap() > 0.0);
        let text = std::fs::read_to_string(&csv).unwrap();
        assert!(text.starts_with("checkpoint,step,dataset,loss,perplexity,tokens,batch_size,elapsed_s,peak_memory_mb,data,bits_per_byte\n"), "{text}");
        assert!(text.lines().all(|l| l.split(',').count() == 11), "{text}");
    }
    std::fs::copy(
        tmp.path().join("v1.csv"),
        run.join("validation_results.csv"),
    )
    .unwrap();
    let png = tmp.path().join("bpb.png");
    let opts = PlotOptions {
        y: YAxis::Bpb,
        ..PlotOptions::new(&png)
    };
    let s = plot_runs(std::slice::from_ref(&run), &opts).unwrap();
    assert_eq!(s.runs[0].train_points, 0);
    assert_eq!(s.runs[0].online_val_points, 2);
    assert!(s.runs[0].offline_points >= 2);
    assert!(s.y.lo < want && want < s.y.hi);
    // A run of an older version, without bits per byte.
    let old_run = tmp.path().join("old");
    std::fs::create_dir_all(&old_run).unwrap();
    std::fs::write(
        old_run.join("metrics.csv"),
        "step,epoch,tokens,loss,learning_rate,grad_norm,tokens_per_s,elapsed_s,val_loss,val_ppl\n1,0,10,3.0,0.1,1.0,5.0,1.0,2.9,18.2\n",
    )
    .unwrap();
    let e = plot_runs(&[old_run], &opts).unwrap_err().to_string();
    assert!(e.contains("no bits per byte"), "{e}");
}

/// End to end on a folder `adapt-vocab` makes: a LoRA run trains the new tokens' rows by
/// default (as many as the record lists), the text it trains on uses them, and the
/// merged model scores as base + adapter.
#[test]
fn a_lora_run_on_an_adapt_vocab_folder_trains_its_new_tokens() {
    use lit_claire::vocab::{AdaptOptions, VocabSource, adapt_vocab};
    let tmp = temp_dir();
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample/fortunes-br.txt");
    let base = tmp.path().join("base");
    let record = adapt_vocab(&AdaptOptions::new(
        reference_dir("gpt2"),
        &base,
        VocabSource::Extend {
            corpus: corpus.clone(),
            new_tokens: 32,
            min_frequency: 2,
        },
    ))
    .unwrap();
    assert_eq!(record.new_token_ids.len(), 32);
    let tok = Tokenizer::from_dir(&base).unwrap();
    let text = std::fs::read_to_string(&corpus).unwrap();
    let mut stream = Vec::new();
    for doc in text.split("\n%\n").take(200) {
        stream.extend(tok.encode_document(doc).unwrap());
    }
    assert!(stream.iter().any(|&i| i >= 512), "the new tokens are used");
    let samples: Vec<Vec<u32>> = stream.chunks(17).map(|c| c.to_vec()).collect();
    let d = TrainData {
        block_size: 17,
        tokenizer_hash: Some(tok.hash.clone()),
        origin: None,
        datasets: vec![TrainDataset {
            name: "fortunes".into(),
            weight: 1.0,
            train: Arc::new(samples[..40].to_vec()),
            validation: Arc::new(samples[40..48].to_vec()),
        }],
    };
    let run = tmp.path().join("run");
    let mut cfg = lora_config(&base, &run);
    cfg.max_steps = Some(2);
    let fin = pretrain_with_data(&cfg, d)
        .unwrap()
        .final_checkpoint
        .unwrap();
    let config = read_json(&fin.join("adapter_config.json"));
    assert_eq!(
        crate::common::ids(&config["trainable_token_indices"]["wte"]),
        record.new_token_ids
    );
    let metrics = lit_claire::plot::read_metrics(run.join("metrics.csv")).unwrap();
    assert!(metrics.last().unwrap().val_bpb.unwrap() > 0.0);
    let ids: Vec<u32> = samples[48..50].concat();
    let with = load_model(&base, &cpu(), Some(&fin)).unwrap();
    let merged = tmp.path().join("merged");
    merge_lora(&base, &fin, &merged, false).unwrap();
    let m = load_model(&merged, &cpu(), None).unwrap();
    assert!((loss_of(&m, &ids) - loss_of(&with, &ids)).abs() < 1e-4);
}
