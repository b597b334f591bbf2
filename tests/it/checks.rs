//! The checks against PyTorch that every checkpoint folder with references gets.
//!
//! A folder holds a Hugging Face checkpoint plus what PyTorch computed on it in float32
//! (the format of `tests/fixtures/reference/README.md`): `expected.json` (`input_ids`,
//! `loss`, `greedy_prompt_ids`, `greedy_new_ids`), `ref_logits.safetensors` (`logits`,
//! `[T, vocab]`) and `ref_grads.safetensors` (d loss / d parameter under the
//! checkpoint's names). Used by `parity` (the six reference checkpoints) and `unseen`
//! (the extra ones of `tests/fixtures/extra/`).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor, Var};
use lit_claire::generate::{Sampling, generate};
use lit_claire::hf::{self, state_dict};
use lit_claire::model::engine::{self, Grads, PassInput, train_pass};
use lit_claire::model::names::WeightNames;
use lit_claire::model::{BuildOptions, Gpt, TrainableModel, build_model};
use serde_json::Value;

use crate::common::*;

/// Logits and loss: absolute tolerance. Gradients: relative to each tensor's largest value.
pub const TOL: f32 = 1e-4;

/// A short label for messages: the folder's name.
pub fn label(dir: &Path) -> String {
    dir.file_name().unwrap().to_string_lossy().into_owned()
}

/// `dir/expected.json`.
pub fn expected_of(dir: &Path) -> Value {
    read_json(&dir.join("expected.json"))
}

/// A safetensors file of `dir`, on the CPU.
pub fn safetensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `<module>.<weight|bias>` with the module under our name.
pub fn canonical_param(names: &WeightNames, name: &str) -> String {
    let (module, leaf) = name.rsplit_once('.').unwrap();
    format!("{}.{leaf}", names.canonical(module))
}

/// The model of `dir` in f32 on the CPU (every parameter a variable if `trainable`).
pub fn load(dir: &Path, trainable: bool) -> TrainableModel {
    let (cfg, weights) = hf::open(dir).unwrap();
    let opts = BuildOptions {
        trainable,
        ..BuildOptions::cpu_f32()
    };
    build_model(&cfg, &weights, &opts).unwrap()
}

/// Mean next-token loss of `ids` and every variable's gradient (under its name, in
/// Hugging Face layout) from the training engine, checkpointing every
/// `checkpoint_every`-th block (0: none).
pub fn engine_loss_and_grads(
    model: &Gpt,
    vars: &[(String, Var)],
    ids: &[u32],
    checkpoint_every: usize,
) -> (f64, HashMap<String, Tensor>) {
    let n = ids.len();
    let dev = Device::Cpu;
    let inputs = Tensor::from_vec(ids.to_vec(), (1, n), &dev).unwrap();
    let mut t = ids[1..].to_vec();
    t.push(0);
    let targets = Tensor::from_vec(t, n, &dev).unwrap();
    let mut m = vec![1f32; n];
    m[n - 1] = 0.0;
    let mask = Tensor::from_vec(m, n, &dev).unwrap();
    let input = PassInput {
        ids: &inputs,
        targets: &targets,
        mask: &mask,
        docs: None,
        dropout: None,
        grad_scale: 1.0 / (n - 1) as f64,
        checkpoint_every,
    };
    let mut grads = Grads::new(vars);
    let sum = train_pass(model, &input, &mut grads).unwrap();
    let g = grads.take(vars).unwrap();
    let named = state_dict::named_gradients(model, vars, &g).unwrap();
    (sum / (n - 1) as f64, named.into_iter().collect())
}

/// Logits `(T, V)` of every position of `ids` ([`engine::logits`]), and the mean
/// next-token loss over all but the last (labels = inputs shifted by one, as
/// transformers does), scored by [`engine::score`].
pub fn loss_of(model: &Gpt, ids: &[u32]) -> (Tensor, f64) {
    let n = ids.len();
    let all = Tensor::from_vec(ids.to_vec(), (1, n), &Device::Cpu).unwrap();
    let logits = engine::logits(model, &all, None, false)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let inputs = all.narrow(1, 0, n - 1).unwrap();
    let scores = engine::score(model, &inputs, None, &ids[1..]).unwrap();
    let loss = scores.nll.iter().map(|&l| f64::from(l)).sum::<f64>() / (n - 1) as f64;
    (logits, loss)
}

/// Flattened f32 values of a tensor.
pub fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(candle_core::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// Assert `ours` equals `reference` in shape and within `tol` of the reference's
/// largest magnitude.
pub fn assert_rel_close(what: &str, ours: &Tensor, reference: &Tensor, tol: f32) {
    assert_eq!(ours.dims(), reference.dims(), "{what}: shape");
    let r = values(reference);
    let scale = r.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
    let rel = max_abs_diff(&values(ours), &r) / scale;
    assert!(
        rel < tol,
        "{what}: off by {rel} relative to its max {scale}"
    );
}

/// Compare every gradient in `ours` (keyed like `reference` after `rename`) with
/// `reference`: the same set of names, each within [`TOL`] relative.
pub fn assert_grads_match(
    what: &str,
    ours: &HashMap<String, Tensor>,
    reference: &HashMap<String, Tensor>,
    rename: impl Fn(&str) -> String,
) {
    let missing: Vec<&String> = reference
        .keys()
        .filter(|k| !ours.contains_key(&rename(k)))
        .collect();
    assert!(
        missing.is_empty() && ours.len() == reference.len(),
        "{what}: {} gradients, reference has {}; ours lack {missing:?}",
        ours.len(),
        reference.len()
    );
    for (name, r) in reference {
        let g = &ours[&rename(name)];
        assert_rel_close(&format!("{what}: gradient of {name}"), g, r, TOL);
    }
}

/// Logits, loss and every parameter's gradient on `input_ids` against PyTorch's.
pub fn check_forward_and_grads(dir: &Path) {
    let what = label(dir);
    let exp = expected_of(dir);
    let ids = ids(&exp["input_ids"]);
    let tm = load(dir, true);
    let (logits, loss) = loss_of(&tm.model, &ids);

    let reference = safetensors(&dir.join("ref_logits.safetensors"));
    let d = max_abs_diff(&values(&logits), &values(&reference["logits"]));
    assert_eq!(
        logits.dims(),
        reference["logits"].dims(),
        "{what}: logits shape"
    );
    assert!(d < TOL, "{what}: logits differ by {d}");

    let l = loss;
    let want = exp["loss"].as_f64().unwrap();
    assert!((l - want).abs() < TOL as f64, "{what}: loss {l} vs {want}");

    // The training engine, with and without activation checkpointing (every block,
    // every other block).
    let reference = safetensors(&dir.join("ref_grads.safetensors"));
    // References use transformers 5's module names (GPT-NeoX's head is `lm_head`).
    let names = WeightNames::for_config(&tm.model.cfg);
    for every in [0, 1, 2] {
        let (engine_loss, ours) = engine_loss_and_grads(&tm.model, &tm.vars, &ids, every);
        assert!(
            (engine_loss - want).abs() < TOL as f64,
            "{what}: training loss {engine_loss} vs {want} (checkpointing {every})"
        );
        let what = format!("{what} (checkpointing every {every})");
        assert_grads_match(&what, &ours, &reference, |n| canonical_param(&names, n));
    }
}

/// Greedy decoding (through the KV cache) gives PyTorch's ids.
pub fn check_greedy(dir: &Path) {
    let exp = expected_of(dir);
    let prompt = ids(&exp["greedy_prompt_ids"]);
    let want = ids(&exp["greedy_new_ids"]);
    let tm = load(dir, false);
    let g = generate(
        &tm.model,
        &prompt,
        want.len(),
        &Sampling::default(),
        &[],
        |_| Ok(true),
    )
    .unwrap();
    assert_eq!(g.new_ids, want, "{}: greedy tokens", label(dir));
}
