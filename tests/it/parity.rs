//! The model against PyTorch on the six reference checkpoints: logits, loss,
//! every gradient, greedy decoding, and the PEFT adapter before and after merging.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use lit_claire::checkpoint::{self, hf, peft};
use lit_claire::generate::{Sampling, generate};
use lit_claire::loss::cross_entropy;
use lit_claire::model::{BuildOptions, Gpt, build_model};

use crate::common::*;
use lit_claire::checkpoint::names::WeightNames;

/// `<module>.<weight|bias>` with the module under our name.
fn canonical_param(names: &WeightNames, name: &str) -> String {
    let (module, leaf) = name.rsplit_once('.').unwrap();
    format!("{}.{leaf}", names.canonical(module))
}

fn load(family: &str, trainable: bool) -> lit_claire::model::TrainableModel {
    let dir = reference_dir(family);
    let (cfg, weights) = checkpoint::open(&dir).unwrap();
    let opts = BuildOptions {
        trainable,
        ..BuildOptions::cpu_f32()
    };
    build_model(&cfg, &weights, &opts).unwrap()
}

fn loss_of(model: &Gpt, ids: &[u32]) -> (Tensor, Tensor) {
    let n = ids.len();
    // Logits of every position (the reference's shape); the loss uses all but the last.
    let all = Tensor::from_vec(ids.to_vec(), (1, n), &Device::Cpu).unwrap();
    let logits = model.forward(&all, None).unwrap().squeeze(0).unwrap();
    let targets = Tensor::from_vec(ids[1..].to_vec(), n - 1, &Device::Cpu).unwrap();
    let loss = cross_entropy(&logits.narrow(0, 0, n - 1).unwrap(), &targets, None).unwrap();
    (logits, loss)
}

fn check_forward_and_grads(family: &str) {
    let exp = expected(family);
    let ids = ids(&exp["input_ids"]);
    let tm = load(family, true);
    let (logits, loss) = loss_of(&tm.model, &ids);

    let reference = candle_core::safetensors::load(
        reference_dir(family).join("ref_logits.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let ref_logits = reference["logits"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let ours = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let d = max_abs_diff(&ours, &ref_logits);
    assert!(d < 1e-4, "{family}: logits differ by {d}");

    let l = loss.to_scalar::<f32>().unwrap() as f64;
    let want = exp["loss"].as_f64().unwrap();
    assert!((l - want).abs() < 1e-4, "{family}: loss {l} vs {want}");

    let grads = loss.backward().unwrap();
    let ours = hf::gradients(&tm.model, &tm.vars, &grads).unwrap();
    let ours: HashMap<String, Tensor> = ours.into_iter().collect();
    let reference = candle_core::safetensors::load(
        reference_dir(family).join("ref_grads.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        ours.len(),
        reference.len(),
        "{family}: {} gradients, reference has {}: {:?}",
        ours.len(),
        reference.len(),
        reference
            .keys()
            .filter(|k| !ours.contains_key(*k))
            .collect::<Vec<_>>()
    );
    let names = WeightNames::for_config(&tm.model.cfg);
    for (name, r) in &reference {
        // The reference uses transformers 5's module names (GPT-NeoX's head is `lm_head`).
        let name = &canonical_param(&names, name);
        let g = ours
            .get(name)
            .unwrap_or_else(|| panic!("{family}: no gradient for {name}"));
        assert_eq!(g.dims(), r.dims(), "{family}: {name} shape");
        let r = r.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let scale = r.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
        let rel = max_abs_diff(&g, &r) / scale;
        assert!(
            rel < 1e-4,
            "{family}: gradient of {name} off by {rel} (relative to max {scale})"
        );
    }
}

fn check_greedy(family: &str) {
    let exp = expected(family);
    let prompt = ids(&exp["greedy_prompt_ids"]);
    let want = ids(&exp["greedy_new_ids"]);
    let tm = load(family, false);
    let g = generate(
        &tm.model,
        &prompt,
        want.len(),
        &Sampling::default(),
        &[],
        |_| Ok(true),
    )
    .unwrap();
    assert_eq!(g.new_ids, want, "{family}: greedy tokens");
}

fn check_lora(family: &str) {
    let exp = expected(family);
    let ids = ids(&exp["input_ids"]);
    let mut model = load(family, false).model;
    checkpoint::attach_adapter_dir(&mut model, &reference_dir(family).join("lora")).unwrap();
    let (_, loss) = loss_of(&model, &ids);
    let l = loss.to_scalar::<f32>().unwrap() as f64;
    let want = exp["lora"]["loss"].as_f64().unwrap();
    assert!(
        (l - want).abs() < 1e-4,
        "{family}: adapter loss {l} vs {want}"
    );

    lit_claire::lora::merge_into_base(&mut model).unwrap();
    let (_, loss) = loss_of(&model, &ids);
    let l = loss.to_scalar::<f32>().unwrap() as f64;
    let want = exp["lora"]["merged_loss"].as_f64().unwrap();
    assert!(
        (l - want).abs() < 1e-4,
        "{family}: merged loss {l} vs {want}"
    );

    // The merged weights themselves, against PEFT's merge_and_unload.
    let merged: HashMap<String, Tensor> = hf::state_dict(&model).unwrap().into_iter().collect();
    let reference = candle_core::safetensors::load(
        reference_dir(family).join("lora/ref_merged.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    for (name, r) in &reference {
        // PEFT's state dict lists a tied head again; ours does not.
        let name = if model.cfg.tie_embeddings && name == "lm_head.weight" {
            format!("{}.weight", model.wte_name)
        } else {
            canonical_param(&WeightNames::for_config(&model.cfg), name)
        };
        let ours = merged
            .get(&name)
            .unwrap_or_else(|| panic!("{family}: merged {name} missing"));
        let d = max_abs_diff(
            &ours
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            &r.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert!(d < 1e-5, "{family}: merged {name} differs by {d}");
    }
}

fn check_adapter_metadata(family: &str) {
    let a = peft::load_adapter(&reference_dir(family).join("lora"), &Device::Cpu).unwrap();
    assert_eq!((a.r, a.alpha), (4, 8.0));
}

macro_rules! family_tests {
    ($($fam:ident),*) => {$(
        mod $fam {
            #[test]
            fn logits_loss_and_gradients() {
                super::check_forward_and_grads(stringify!($fam));
            }
            #[test]
            fn greedy_tokens() {
                super::check_greedy(stringify!($fam));
            }
            #[test]
            fn peft_adapter_and_merge() {
                super::check_adapter_metadata(stringify!($fam));
                super::check_lora(stringify!($fam));
            }
        }
    )*};
}

family_tests!(llama, mistral, falcon, gpt2, gpt_neox, gpt_neo);
