//! The model against PyTorch on the six reference checkpoints: logits, loss,
//! every gradient, greedy decoding, and the PEFT adapter before and after merging.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use lit_claire::checkpoint::names::WeightNames;
use lit_claire::checkpoint::{self, hf, peft};

use crate::checks::{canonical_param, loss_of, safetensors, values};
use crate::common::*;

fn check_forward_and_grads(family: &str) {
    crate::checks::check_forward_and_grads(&reference_dir(family));
}

fn check_greedy(family: &str) {
    crate::checks::check_greedy(&reference_dir(family));
}

fn check_lora(family: &str) {
    let exp = expected(family);
    let ids = ids(&exp["input_ids"]);
    let mut model = crate::checks::load(&reference_dir(family), false).model;
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
    let reference = safetensors(&reference_dir(family).join("lora/ref_merged.safetensors"));
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
        let d = max_abs_diff(&values(ours), &values(r));
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

/// The plain tensor-op twins of the fused CPU kernels (what other devices run) against
/// the reference too. Tests in parallel may briefly run plain kernels as well: both
/// paths must agree with PyTorch, so that is harmless.
#[test]
fn plain_kernels_match_the_reference() {
    lit_claire::model::fused::set_enabled(false);
    for family in ["llama", "gpt_neox", "falcon"] {
        check_forward_and_grads(family);
    }
    lit_claire::model::fused::set_enabled(true);
}
