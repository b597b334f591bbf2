//! `convert-to-hf` on training checkpoints fabricated as the trainer writes them
//! (full and LoRA): merged, sharded, carded, and equal in loss to the checkpoint.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use lit_claire::hf::export::{ConvertOptions, convert_to_hf};
use lit_claire::hf::shards::{parse_size, plan_shards};
use lit_claire::hf::{self, load_model};
use lit_claire::model::BuildOptions;
use serde_json::{Value, json};

use crate::common::{bin, expected, ids, reference_dir, temp_dir};

const SIDE: [&str; 3] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
];

/// `run/final` as the trainer writes it, for `family`, full or LoRA, with its base at
/// `base` (the reference folder).
fn fabricate_run(run: &Path, family: &str, lora: bool) -> PathBuf {
    let base = reference_dir(family);
    let ck = run.join("final");
    std::fs::create_dir_all(&ck).unwrap();
    if lora {
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(base.join("lora").join(f), ck.join(f)).unwrap();
        }
    } else {
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(base.join(f), ck.join(f)).unwrap();
        }
    }
    for f in SIDE {
        std::fs::copy(base.join(f), ck.join(f)).unwrap();
    }
    let state = json!({
        "base_checkpoint_dir": base.display().to_string(),
        "step": 120,
        "tokens": 61440,
        "train_loss": 5.4321,
        "val_loss": 5.6789,
        "hyperparameters": {"data_dir": "data/fortunes", "learning_rate": 0.0003},
    });
    std::fs::write(ck.join("training_state.json"), state.to_string()).unwrap();
    let opt = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
    opt.save_safetensors("exp_avg", ck.join("optimizer.safetensors"))
        .unwrap();
    std::fs::write(run.join("hyperparameters.toml"), "learning_rate = 0.0003\n").unwrap();
    std::fs::write(run.join("metrics.csv"), "step,loss\n1,6.0\n").unwrap();
    ck
}

fn opts(input: &Path, out: &Path) -> ConvertOptions {
    ConvertOptions {
        input: input.to_path_buf(),
        output_dir: out.to_path_buf(),
        base: None,
        dtype: None,
        max_shard_size: parse_size("5GB").unwrap(),
        overwrite: false,
        license: None,
        repo_id: None,
    }
}

fn logits(dir: &Path, adapter: Option<&Path>, ids: &[u32]) -> Vec<f32> {
    let m = load_model(dir, &BuildOptions::cpu_f32(), adapter).unwrap();
    let x = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    lit_claire::model::engine::logits(&m, &x, None, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_lora_run_converts_to_a_merged_folder_with_a_model_card() {
    let tmp = temp_dir();
    let run = tmp.path().join("run");
    fabricate_run(&run, "mistral", true);
    let out = tmp.path().join("hf");
    // The run folder itself: its final/ is taken, the base comes from training_state.json.
    let r = convert_to_hf(&opts(&run, &out)).unwrap();
    assert_eq!(r.merged, 8);
    assert_eq!(
        names_in(&out),
        [
            "README.md",
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    let e = expected("mistral");
    let x = ids(&e["input_ids"]);
    let base = reference_dir("mistral");
    let a = logits(&out, None, &x);
    let b = logits(&base, Some(&base.join("lora")), &x);
    let d = a
        .iter()
        .zip(&b)
        .map(|(p, q)| (p - q).abs())
        .fold(0f32, f32::max);
    assert!(d < 1e-4, "logits differ by {d}");
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    for needle in [
        "base_model: mistral",
        "data/fortunes",
        "| Optimizer steps | 120 |",
        "| Tokens seen | 61440 |",
        "5.4321",
        "5.6789",
        "r = 4, alpha = 8",
        "AutoModelForCausalLM.from_pretrained",
        "license: other",
    ] {
        assert!(card.contains(needle), "card lacks {needle:?}:\n{card}");
    }
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["dtype"], "float32");
}

#[test]
fn a_tiny_shard_size_splits_the_weights_and_reloads_identically() {
    let tmp = temp_dir();
    let ck = fabricate_run(&tmp.path().join("run"), "llama", false);
    let out = tmp.path().join("hf");
    let mut o = opts(&ck, &out);
    o.max_shard_size = parse_size("100KB").unwrap();
    let r = convert_to_hf(&o).unwrap();
    let n = r.weights.files.len();
    assert!(n >= 5, "{n} shards");
    let index: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let map = index["weight_map"].as_object().unwrap();
    assert_eq!(map.len(), 21);
    let mut total = 0;
    for k in 1..=n {
        let f = format!("model-{k:05}-of-{n:05}.safetensors");
        assert!(out.join(&f).exists(), "{f}");
        assert!(map.values().any(|v| v == &json!(f)));
        let st = candle_core::safetensors::load(out.join(&f), &Device::Cpu).unwrap();
        let bytes: usize = st.values().map(|t| t.elem_count() * 4).sum();
        assert!(bytes <= 100_000 || st.len() == 1, "{f} holds {bytes} bytes");
        total += bytes;
    }
    assert_eq!(index["metadata"]["total_size"], json!(total));
    assert!(!out.join("model.safetensors").exists());
    assert!(
        !out.join("optimizer.safetensors").exists() && !out.join("training_state.json").exists()
    );
    let x = ids(&expected("llama")["input_ids"]);
    assert_eq!(
        logits(&out, None, &x),
        logits(&reference_dir("llama"), None, &x)
    );
}

#[test]
fn dtype_option_sets_weights_and_config() {
    let tmp = temp_dir();
    let ck = fabricate_run(&tmp.path().join("run"), "gpt_neox", false);
    let out = tmp.path().join("hf");
    let mut o = opts(&ck, &out);
    o.dtype = Some(DType::BF16);
    convert_to_hf(&o).unwrap();
    let (_, w) = hf::open(&out).unwrap();
    assert_eq!(w.stored_dtype(), DType::BF16);
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["torch_dtype"], "bfloat16");
    assert!(cfg.get("dtype").is_none(), "a 4.x config keeps its key");
    // Still loads and scores like the f32 checkpoint, up to bf16 rounding.
    let x = ids(&expected("gpt_neox")["input_ids"]);
    let (a, b) = (
        logits(&out, None, &x),
        logits(&reference_dir("gpt_neox"), None, &x),
    );
    let d = a
        .iter()
        .zip(&b)
        .map(|(p, q)| (p - q).abs())
        .fold(0f32, f32::max);
    assert!(d < 0.1, "{d}");
}

#[test]
fn converted_loss_equals_lit_claire_perplexity_through_the_cli() {
    let tmp = temp_dir();
    let ck = fabricate_run(&tmp.path().join("run"), "gpt2", true);
    let out = tmp.path().join("hf");
    let text = tmp.path().join("text.txt");
    let corpus = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample/fortunes-br.txt"),
    )
    .unwrap();
    std::fs::write(&text, corpus.chars().take(2000).collect::<String>()).unwrap();
    let run = |args: &[&str]| {
        let o = Command::new(bin()).args(args).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let s = |p: &Path| p.to_str().unwrap().to_string();
    run(&[
        "convert-to-hf",
        "--input-path",
        &s(&ck),
        "--output-dir",
        &s(&out),
        "--max-shard-size",
        "200KB",
    ]);
    let ppl = |args: &[&str]| -> f64 {
        let v: Value = serde_json::from_str(&run(args)).unwrap();
        v["loss"].as_f64().unwrap()
    };
    let converted = ppl(&[
        "perplexity",
        "--checkpoint-dir",
        &s(&out),
        "--input",
        &s(&text),
        "--format",
        "json",
    ]);
    let base = reference_dir("gpt2");
    let adapted = ppl(&[
        "perplexity",
        "--checkpoint-dir",
        &s(&base),
        "--adapter",
        &s(&ck),
        "--input",
        &s(&text),
        "--format",
        "json",
    ]);
    assert!(
        (converted - adapted).abs() < 1e-4,
        "{converted} vs {adapted}"
    );
}

#[test]
fn bad_inputs_are_refused_in_one_line_and_nothing_is_written() {
    let tmp = temp_dir();
    let out = tmp.path().join("hf");
    let check = |o: ConvertOptions, needles: &[&str]| {
        let e = convert_to_hf(&o).unwrap_err().to_string();
        for n in needles {
            assert!(e.contains(n), "{e:?} lacks {n:?}");
        }
        assert!(!e.contains('\n'), "{e}");
        assert!(!out.exists());
    };
    // A checkpoint folder without weights.
    let empty = tmp.path().join("run/step-00000010");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("training_state.json"), "{}").unwrap();
    check(
        opts(&empty, &out),
        &["holds no weights", "model.safetensors"],
    );
    // A LoRA checkpoint with no way to find its base.
    let lora = tmp.path().join("lora");
    std::fs::create_dir_all(&lora).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(reference_dir("llama").join("lora").join(f), lora.join(f)).unwrap();
    }
    check(opts(&lora, &out), &["--checkpoint-dir"]);
    // An adapter for another base: shape mismatch named.
    let mut o = opts(&lora, &out);
    o.base = Some(reference_dir("mistral"));
    check(o, &["v_proj", "[32, 64]", "another base model"]);
    // A base that does not exist.
    let mut o = opts(&lora, &out);
    o.base = Some(tmp.path().join("nope"));
    check(o, &["nope", "not found"]);
    // An existing output folder.
    let ck = fabricate_run(&tmp.path().join("run2"), "llama", false);
    std::fs::create_dir_all(&out).unwrap();
    let e = convert_to_hf(&opts(&ck, &out)).unwrap_err().to_string();
    assert!(
        e.contains("already exists") && e.contains("--overwrite"),
        "{e}"
    );
    let mut o = opts(&ck, &out);
    o.overwrite = true;
    convert_to_hf(&o).unwrap();
    // Overwriting a folder that holds the input is refused.
    let mut o = opts(&ck, &tmp.path().join("run2"));
    o.overwrite = true;
    let e = convert_to_hf(&o).unwrap_err().to_string();
    assert!(e.contains("holds the input"), "{e}");
    assert!(ck.join("model.safetensors").exists());
    // Sizes.
    for bad in ["5XB", "", "GB", "0"] {
        let e = parse_size(bad).unwrap_err().to_string();
        assert!(e.contains("--max-shard-size"), "{e}");
    }
    assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
    assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
    assert_eq!(parse_size("1.5 MB").unwrap(), 1_500_000);
    let hidden: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(hidden.is_empty(), "{hidden:?}");
}

#[test]
fn shards_fill_greedily_in_order() {
    assert_eq!(
        plan_shards(&[4, 4, 4, 10, 1], 8),
        vec![0..2, 2..3, 3..4, 4..5]
    );
    assert_eq!(plan_shards(&[1, 1, 1], 100), vec![0..3]);
    assert_eq!(plan_shards(&[], 8), Vec::<std::ops::Range<usize>>::new());
}
