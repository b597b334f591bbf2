//! 8 steps of full fine-tuning against PyTorch's losses (expected.json `train`), on the
//! reference checkpoints here and on the extra ones in `unseen`.

use std::path::Path;

use candle_core::Device;
use lit_claire::hf;
use lit_claire::model::{BuildOptions, build_model};
use lit_claire::strategy::Strategy;
use lit_claire::train::adamw::{AdamW, AdamWConfig};
use lit_claire::train::batches::Batch;
use lit_claire::train::step::StepRunner;
use serde_json::Value;

use crate::common::*;

fn rows(v: &Value) -> Vec<Vec<u32>> {
    v.as_array().unwrap().iter().map(ids).collect()
}

/// Train the checkpoint of `dir` as its expected.json's `train` says; compare the losses.
pub fn check_training(dir: &Path) {
    let family = crate::checks::label(dir);
    let exp = crate::checks::expected_of(dir);
    let tr = &exp["train"];
    let (cfg, weights) = hf::open(dir).unwrap();
    let opts = BuildOptions {
        trainable: true,
        ..BuildOptions::cpu_f32()
    };
    let tm = build_model(&cfg, &weights, &opts).unwrap();
    let betas = tr["betas"].as_array().unwrap();
    let adam = AdamWConfig {
        beta1: betas[0].as_f64().unwrap(),
        beta2: betas[1].as_f64().unwrap(),
        eps: tr["eps"].as_f64().unwrap(),
        weight_decay: tr["weight_decay"].as_f64().unwrap(),
    };
    let mut runner = StepRunner::new(
        tm.model,
        AdamW::new(tm.vars, adam).unwrap().into(),
        Strategy::cpu(),
    );
    runner.grad_clip = Some(tr["clip_grad_norm"].as_f64().unwrap());
    let batches: Vec<Vec<Vec<u32>>> = tr["batches"].as_array().unwrap().iter().map(rows).collect();
    let want: Vec<f64> = tr["losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let lr = tr["lr"].as_f64().unwrap();
    for (k, w) in want.iter().enumerate() {
        let batch = Batch::from_rows(&batches[k % batches.len()], Some(0), &Device::Cpu).unwrap();
        let stats = runner.step(&[batch], lr).unwrap();
        let rel = (stats.loss - w).abs() / w.abs();
        assert!(
            rel < 1e-3,
            "{family}: step {k} loss {} vs PyTorch {w} (rel {rel:.2e})",
            stats.loss
        );
    }
}

macro_rules! training_tests {
    ($($fam:ident),*) => {$(
        #[test]
        fn $fam() {
            check_training(&reference_dir(stringify!($fam)));
        }
    )*};
}

training_tests!(llama, mistral, falcon, gpt2, gpt_neox, gpt_neo);
