//! The model against PyTorch on checkpoints it was not written against
//! (`tests/fixtures/extra/`, made by `utils/make_fixtures.py` with transformers' own
//! classes): other widths, head sizes and head layouts, rope bases and scalings,
//! windows, block layouts, bf16 storage and shards, and (`utils/make_massive_fixture.py`)
//! the massive activations and confident large-vocabulary rows of trained models. Each gets the checks of the six
//! reference checkpoints: logits and loss within 1e-4, every gradient within 1e-4 of
//! its tensor's largest value, greedy ids identical, 8 training steps' losses within
//! 1e-3 relative (batches with padding); and the commands a user runs,
//! `lit-claire perplexity` (a text longer than the context, so several windows) and
//! `lit-claire generate --temperature 0`, print what PyTorch computes.

use std::process::Command;

use serde_json::Value;

use lit_claire::config::{
    Activation, AttentionWindow, Config, PositionKind, Residual, RopeScaling, RotaryConfig,
    load_config,
};
use lit_claire::model::weights::{Weights, weight_files};

use crate::checks::{check_forward_and_grads, check_greedy, expected_of};
use crate::common::*;

/// Every checkpoint of `tests/fixtures/extra/` (checked by `every_fixture_is_tested`).
const EXTRA: [&str; 11] = [
    "llama_gqa_bias",
    "llama3_tied",
    "mistral_swa5",
    "falcon_new_gqa",
    "falcon_sequential",
    "gpt_neox_sequential",
    "gpt2_inverse_layer",
    "gpt_neo_local5",
    "mistral_bf16",
    "falcon_sharded",
    "llama_massive",
];

macro_rules! extra_tests {
    ($($name:ident),*) => {$(
        mod $name {
            use super::*;
            #[test]
            fn logits_loss_and_gradients() {
                check_forward_and_grads(&extra_dir(stringify!($name)));
            }
            #[test]
            fn greedy_tokens() {
                check_greedy(&extra_dir(stringify!($name)));
            }
            #[test]
            fn training_losses() {
                crate::train_parity::check_training(&extra_dir(stringify!($name)));
            }
            #[test]
            fn cli_perplexity_and_generate() {
                check_cli(stringify!($name));
            }
        }
    )*};
}

extra_tests!(
    llama_gqa_bias,
    llama3_tied,
    mistral_swa5,
    falcon_new_gqa,
    falcon_sequential,
    gpt_neox_sequential,
    gpt2_inverse_layer,
    gpt_neo_local5,
    mistral_bf16,
    falcon_sharded,
    llama_massive
);

/// Run `lit-claire ARGS`, expecting success; its stdout as JSON.
fn run_json(args: &[&str]) -> Value {
    let out = Command::new(bin()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "lit-claire {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{args:?}: stdout is not JSON ({e})"))
}

/// `perplexity` and greedy `generate` through the binary, against `expected.json`'s `cli`.
fn check_cli(name: &str) {
    let dir = extra_dir(name);
    let dir_arg = dir.to_str().unwrap();
    let exp = &expected_of(&dir)["cli"];

    let tmp = temp_dir();
    let input = tmp.path().join("text.txt");
    std::fs::write(&input, exp["perplexity"]["text"].as_str().unwrap()).unwrap();
    let got = run_json(&[
        "perplexity",
        "--checkpoint-dir",
        dir_arg,
        "--input",
        input.to_str().unwrap(),
        "--format",
        "json",
    ]);
    assert_eq!(got["tokens"], exp["perplexity"]["tokens"], "{name}: tokens");
    let (l, want) = (
        got["loss"].as_f64().unwrap(),
        exp["perplexity"]["loss"].as_f64().unwrap(),
    );
    assert!(
        (l - want).abs() < 1e-4,
        "{name}: perplexity loss {l} vs {want}"
    );

    let g = &exp["generate"];
    let max_new = g["max_new_tokens"].to_string();
    let got = run_json(&[
        "generate",
        "--checkpoint-dir",
        dir_arg,
        "--prompt",
        g["prompt"].as_str().unwrap(),
        "--temperature",
        "0",
        "--max-new-tokens",
        &max_new,
        "--format",
        "json",
    ]);
    assert_eq!(
        ids(&got["new_token_ids"]),
        ids(&g["new_ids"]),
        "{name}: generated ids"
    );
}

#[test]
fn every_fixture_is_tested() {
    let root = extra_dir("");
    let mut found: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("expected.json").exists())
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    found.sort();
    let mut listed: Vec<String> = EXTRA.iter().map(|s| s.to_string()).collect();
    listed.sort();
    assert_eq!(found, listed, "tests/fixtures/extra and EXTRA disagree");
}

fn cfg(name: &str) -> Config {
    load_config(&extra_dir(name)).unwrap()
}

fn rotary(c: &Config) -> &RotaryConfig {
    match &c.position {
        PositionKind::Rotary(r) => r,
        PositionKind::Learned => panic!("{:?} has learned positions", c.family),
    }
}

/// Each fixture is read as the layout it was made to exercise, so the agreement above
/// means what `utils/make_fixtures.py` says it means.
#[test]
fn fixtures_are_read_as_the_layouts_they_exercise() {
    let c = cfg("llama_gqa_bias");
    assert_eq!(
        (c.n_head, c.n_kv_head, c.head_dim, c.hidden_size),
        (6, 2, 12, 36)
    );
    assert!(c.qkv_bias && c.attn_out_bias && !c.tie_embeddings);
    assert_eq!(rotary(&c).base, 500000.0);

    let c = cfg("llama3_tied");
    assert!(c.tie_embeddings);
    assert_eq!((c.n_head, c.head_dim, rotary(&c).rotary_dims), (2, 24, 24));
    assert!(matches!(
        rotary(&c).scaling,
        RopeScaling::Llama3 {
            original_max_position_embeddings: 64,
            ..
        }
    ));

    let c = cfg("mistral_swa5");
    assert_eq!((c.n_head, c.n_kv_head, c.head_dim), (8, 1, 8));
    assert!(c.windows.iter().all(|w| *w == AttentionWindow::Sliding(5)));

    let c = cfg("falcon_new_gqa");
    assert_eq!((c.n_head, c.n_kv_head), (8, 2));
    assert!(c.residual == Residual::Parallel && !c.shared_attention_norm && c.qkv_bias);

    let c = cfg("falcon_sequential");
    assert_eq!((c.n_head, c.n_kv_head), (4, 4));
    assert!(c.residual == Residual::Sequential && !c.tie_embeddings);

    let c = cfg("gpt_neox_sequential");
    assert_eq!(
        (c.head_dim, rotary(&c).rotary_dims, rotary(&c).base),
        (12, 6, 500.0)
    );
    assert!(c.residual == Residual::Sequential && c.activation == Activation::GeluTanh);

    let c = cfg("gpt2_inverse_layer");
    assert!(c.scale_by_inverse_layer && c.n_layer == 3);
    assert_eq!(
        (c.intermediate_size, c.activation),
        (56, Activation::GeluErf)
    );

    let c = cfg("gpt_neo_local5");
    let (l, g) = (AttentionWindow::Sliding(5), AttentionWindow::Global);
    assert_eq!(c.windows, vec![l, g, l]);

    let c = cfg("mistral_bf16");
    assert!(c.windows.iter().all(|w| *w == AttentionWindow::Global));
    let w = Weights::open(&extra_dir("mistral_bf16")).unwrap();
    assert_eq!(w.stored_dtype(), candle_core::DType::BF16);

    // Made by utils/make_massive_fixture.py (issue 9).
    let c = cfg("llama_massive");
    assert_eq!((c.vocab_size, c.n_head, c.n_kv_head), (3072, 2, 1));
    assert!(!c.tie_embeddings);

    let files = weight_files(&extra_dir("falcon_sharded")).unwrap();
    assert!(
        files.len() > 1,
        "falcon_sharded has {} file(s)",
        files.len()
    );

    // Windows are shorter than the sequences they are checked on.
    for name in ["mistral_swa5", "gpt_neo_local5"] {
        let exp = expected_of(&extra_dir(name));
        assert!(ids(&exp["input_ids"]).len() > 5 * 2);
        let n = ids(&exp["greedy_prompt_ids"]).len() + ids(&exp["greedy_new_ids"]).len();
        assert!(n > 5 * 2, "{name}: greedy run of {n} tokens");
    }
}
