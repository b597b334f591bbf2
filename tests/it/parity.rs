//! The model against PyTorch on the six reference checkpoints: logits, loss,
//! every gradient, greedy decoding, and the PEFT adapter before and after merging.

use candle_core::Device;
use lit_claire::hf::export::merge_lora;
use lit_claire::hf::{self, peft};

use crate::checks::loss_of;
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
    hf::attach_adapter_dir(&mut model, &reference_dir(family).join("lora")).unwrap();
    let (_, l) = loss_of(&model, &ids);
    let want = exp["lora"]["loss"].as_f64().unwrap();
    assert!(
        (l - want).abs() < 1e-4,
        "{family}: adapter loss {l} vs {want}"
    );

    // `merge-lora`'s folder scores what PEFT's merge_and_unload scored (its tensors are
    // compared with PEFT's one by one in publish_merge.rs).
    let out = temp_dir();
    let merged_dir = out.path().join("merged");
    merge_lora(
        &reference_dir(family),
        &reference_dir(family).join("lora"),
        &merged_dir,
        false,
    )
    .unwrap();
    let merged = crate::checks::load(&merged_dir, false).model;
    let (_, l) = loss_of(&merged, &ids);
    let want = exp["lora"]["merged_loss"].as_f64().unwrap();
    assert!(
        (l - want).abs() < 1e-4,
        "{family}: merged loss {l} vs {want}"
    );
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
/// the reference too. The switch is per thread, so tests running beside this one keep
/// their fused kernels.
#[test]
fn plain_kernels_match_the_reference() {
    lit_claire::model::fused::with_plain_kernels(|| {
        for family in ["llama", "gpt_neox", "falcon"] {
            check_forward_and_grads(family);
        }
    });
}
