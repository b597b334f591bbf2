//! LoRA training gradients against PEFT's: the reference adapter of each family is
//! attached as trainable, the loss on `input_ids` is differentiated, and every
//! `lora_A` / `lora_B` gradient is compared with the one PEFT computed
//! (`tests/fixtures/extra/lora_grads/<family>.safetensors`, made by
//! `utils/make_fixtures.py`, keyed by the adapter file's names).

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use lit_claire::hf::peft::{PEFT_PREFIX, load_adapter};
use lit_claire::model::names::WeightNames;

use crate::checks::{assert_grads_match, engine_loss_and_grads, load, loss_of, safetensors};
use crate::common::*;

fn check_lora_grads(family: &str) {
    let dir = reference_dir(family);
    let ids = ids(&expected(family)["input_ids"]);
    let mut model = load(&dir, false).model;
    let adapter = load_adapter(&dir.join("lora"), &Device::Cpu).unwrap();
    let vars =
        lit_claire::lora::attach_tensors(&mut model, &adapter.tensors, adapter.scale(), 0.0, true)
            .unwrap();
    let want = expected(family)["lora"]["loss"].as_f64().unwrap();
    let (_, l) = loss_of(&model, &ids);
    assert!(
        (l - want).abs() < 1e-4,
        "{family}: adapter loss {l} vs {want}"
    );
    for every in [0, 1] {
        check_engine(family, &model, &vars, &ids, every);
    }
}

/// The training engine's LoRA gradients against PEFT's.
fn check_engine(
    family: &str,
    model: &lit_claire::model::Gpt,
    vars: &[(String, candle_core::Var)],
    ids: &[u32],
    every: usize,
) {
    let (l, ours) = engine_loss_and_grads(model, vars, ids, every);
    let want = expected(family)["lora"]["loss"].as_f64().unwrap();
    assert!(
        (l - want).abs() < 1e-4,
        "{family}: training loss {l} vs {want} (checkpointing {every})"
    );
    // The engine names LoRA gradients like the variables, already.
    let ours: HashMap<String, Tensor> = ours;
    let reference = safetensors(&extra_dir("lora_grads").join(format!("{family}.safetensors")));
    // PEFT's `base_model.model.<module>.lora_X.weight` → our `<module>.lora_X.weight`.
    let names = WeightNames::for_config(&model.cfg);
    assert_grads_match(
        &format!("{family} LoRA, checkpointing {every}"),
        &ours,
        &reference,
        |n| {
            let inner = n.strip_prefix(PEFT_PREFIX).unwrap_or(n);
            let (module, leaf) = inner.split_once(".lora_").unwrap();
            format!("{}.lora_{leaf}", names.canonical(module))
        },
    );
}

macro_rules! family_tests {
    ($($fam:ident),*) => {$(
        #[test]
        fn $fam() {
            check_lora_grads(stringify!($fam));
        }
    )*};
}

family_tests!(llama, mistral, falcon, gpt2, gpt_neox, gpt_neo);
