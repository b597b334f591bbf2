//! `merge-lora` on the reference checkpoints: PEFT's merge reproduced, perplexity
//! unchanged, dtype kept, a tied head untied, and bad input refused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use lit_claire::hf::export::merge_lora;
use lit_claire::hf::{self, load_model, peft};
use lit_claire::lora::LoraConfig;
use lit_claire::model::BuildOptions;
use lit_claire::tokenizer::Tokenizer;

use crate::common::{FAMILIES, expected, ids, reference_dir, temp_dir};

fn load_st(p: &Path) -> BTreeMap<String, Tensor> {
    candle_core::safetensors::load(p, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Our tensor for a name of PEFT's merged state dict (which lists a tied head as
/// `lm_head.weight` and names GPT-NeoX's head `lm_head`).
fn ours_for<'a>(ours: &'a BTreeMap<String, Tensor>, family: &str, name: &str) -> &'a Tensor {
    if let Some(t) = ours.get(name) {
        return t;
    }
    let alias = match (family, name) {
        ("gpt_neox", "lm_head.weight") => "embed_out.weight",
        ("falcon", "lm_head.weight") => "transformer.word_embeddings.weight",
        ("gpt2" | "gpt_neo", "lm_head.weight") => "transformer.wte.weight",
        _ => panic!("{family}: {name} missing from the merged output"),
    };
    &ours[alias]
}

/// A text of a few hundred tokens from the sample corpus.
fn sample_ids(dir: &Path) -> Vec<u32> {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample/fortunes-br.txt"),
    )
    .unwrap();
    let text: String = text.chars().take(1500).collect();
    Tokenizer::from_dir(dir).unwrap().encode(&text).unwrap()
}

fn loss(dir: &Path, adapter: Option<&Path>, ids: &[u32]) -> f64 {
    let m = load_model(dir, &BuildOptions::cpu_f32(), adapter).unwrap();
    lit_claire::perplexity::perplexity(&m, ids, m.cfg.block_size, 4)
        .unwrap()
        .loss
}

#[test]
fn merge_reproduces_pefts_merged_state_dict_and_perplexity() {
    for fam in FAMILIES {
        let base = reference_dir(fam);
        let out = temp_dir();
        let save = out.path().join("merged");
        let r = merge_lora(&base, &base.join("lora"), &save, false).unwrap();
        assert!(r.merged > 0, "{fam}");
        assert_eq!(r.dtype, DType::F32);
        // A complete folder, nothing else.
        let mut files: Vec<String> = std::fs::read_dir(&save)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        assert_eq!(
            files,
            [
                "config.json",
                "generation_config.json",
                "model.safetensors",
                "tokenizer.json",
                "tokenizer_config.json"
            ],
            "{fam}"
        );
        // PEFT's merge_and_unload, tensor by tensor.
        let reference = load_st(&base.join("lora/ref_merged.safetensors"));
        let ours = load_st(&save.join("model.safetensors"));
        for (name, t) in &reference {
            let d = max_diff(ours_for(&ours, fam, name), t);
            assert!(d <= 1e-5, "{fam} {name}: {d}");
        }
        // The merged model scores like the base with its adapter.
        let text = sample_ids(&base);
        let (merged, adapted) = (
            loss(&save, None, &text),
            loss(&base, Some(&base.join("lora")), &text),
        );
        assert!(
            (merged - adapted).abs() < 1e-4,
            "{fam}: {merged} vs {adapted}"
        );
        let e = expected(fam);
        let merged_ref = e["lora"]["merged_loss"].as_f64().unwrap();
        let mine = loss(&save, None, &ids(&e["input_ids"]));
        assert!(
            (mine - merged_ref).abs() < 1e-4,
            "{fam}: {mine} vs PyTorch {merged_ref}"
        );
    }
}

/// A bf16 copy of the LLaMA reference.
fn bf16_copy(dst: &Path) -> PathBuf {
    let src = reference_dir("llama");
    std::fs::create_dir_all(dst).unwrap();
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let ts: Vec<(String, Tensor)> = load_st(&src.join("model.safetensors"))
        .into_iter()
        .map(|(n, t)| (n, t.to_dtype(DType::BF16).unwrap()))
        .collect();
    lit_claire::io::save_safetensors_atomic(&dst.join("model.safetensors"), &ts, None).unwrap();
    dst.to_path_buf()
}

#[test]
fn a_bf16_base_gives_a_bf16_merge() {
    let tmp = temp_dir();
    let base = bf16_copy(&tmp.path().join("base"));
    let save = tmp.path().join("merged");
    let lora = reference_dir("llama").join("lora");
    let r = merge_lora(&base, &lora, &save, false).unwrap();
    assert_eq!(r.dtype, DType::BF16);
    let (_, w) = hf::open(&save).unwrap();
    assert_eq!(w.stored_dtype(), DType::BF16);
    // W + s·BA computed in f32 from the bf16 weights, then rounded once to bf16.
    let ours = load_st(&save.join("model.safetensors"));
    let base_t = load_st(&base.join("model.safetensors"));
    let reference = load_st(&lora.join("ref_merged.safetensors"));
    for (name, t) in &ours {
        assert_eq!(t.dtype(), DType::BF16, "{name}");
        let d = max_diff(t, &reference[name]);
        assert!(d < 1e-2, "{name}: {d}");
        if !name.contains("q_proj") && !name.contains("v_proj") {
            assert_eq!(max_diff(t, &base_t[name]), 0.0, "{name} untouched");
        }
    }
}

#[test]
fn an_adapter_on_a_tied_head_unties_it() {
    let tmp = temp_dir();
    let base = reference_dir("gpt2");
    let cfg = lit_claire::config::load_config(&base).unwrap();
    let (v, c) = (cfg.vocab_size, cfg.hidden_size);
    let a = Tensor::randn(0f32, 0.1, (4, c), &Device::Cpu).unwrap();
    let b = Tensor::randn(0f32, 0.1, (v, 4), &Device::Cpu).unwrap();
    let adapter = tmp.path().join("adapter");
    let lora = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: Default::default(),
        rslora: false,
    };
    peft::save_adapter(
        &adapter,
        &cfg,
        &lora,
        "gpt2",
        &[
            ("lm_head.lora_A.weight".into(), a),
            ("lm_head.lora_B.weight".into(), b),
        ],
        &Default::default(),
    )
    .unwrap();
    let save = tmp.path().join("merged");
    let r = merge_lora(&base, &adapter, &save, false).unwrap();
    assert!(r.untied_head);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(save.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["tie_word_embeddings"], false);
    let ours = load_st(&save.join("model.safetensors"));
    assert!(ours.contains_key("lm_head.weight"));
    let text = sample_ids(&base);
    let (merged, adapted) = (loss(&save, None, &text), loss(&base, Some(&adapter), &text));
    assert!((merged - adapted).abs() < 1e-4, "{merged} vs {adapted}");
}

#[test]
fn an_adapter_for_another_base_is_refused_by_name_or_shape() {
    let tmp = temp_dir();
    let save = tmp.path().join("merged");
    // LLaMA's k_proj is 64 wide; Mistral's (2 kv heads) 32.
    let e = merge_lora(
        &reference_dir("mistral"),
        &reference_dir("llama").join("lora"),
        &save,
        false,
    );
    let e = e.unwrap_err().to_string();
    assert!(
        e.contains("another base model") && e.contains("proj"),
        "{e}"
    );
    // GPT-2's c_attn does not exist in LLaMA.
    let e = merge_lora(
        &reference_dir("llama"),
        &reference_dir("gpt2").join("lora"),
        &save,
        false,
    );
    let e = e.unwrap_err().to_string();
    assert!(e.contains("c_attn") && e.contains("match no weight"), "{e}");
    assert!(!e.contains('\n'));
    assert!(!save.exists());
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "nothing half-written"
    );
}

#[test]
fn merge_refuses_an_existing_output_unless_overwrite_and_full_weights_as_adapter() {
    let tmp = temp_dir();
    let save = tmp.path().join("merged");
    std::fs::create_dir_all(&save).unwrap();
    std::fs::write(save.join("keep.txt"), "x").unwrap();
    let base = reference_dir("llama");
    let e = merge_lora(&base, &base.join("lora"), &save, false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("already exists") && e.contains("--overwrite"),
        "{e}"
    );
    assert!(save.join("keep.txt").exists());
    merge_lora(&base, &base.join("lora"), &save, true).unwrap();
    assert!(!save.join("keep.txt").exists() && save.join("model.safetensors").exists());
    let e = merge_lora(&base, &base, &tmp.path().join("x"), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a LoRA adapter"), "{e}");
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
