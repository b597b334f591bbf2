//! Planned memory (`lit_claire::train::estimate`, `pretrain --dry-run`): the Falcon-7B
//! LoRA recipe worked out by hand on the real Falcon-7B config.json
//! (`tests/fixtures/configs/falcon-7b`), the parameter counts checked against the
//! models the loader builds, and the command line.

use std::path::{Path, PathBuf};
use std::process::Command;

use lit_claire::config::load_config;
use lit_claire::lora::{LoraConfig, LoraTargets};
use lit_claire::train::TrainConfig;
use lit_claire::train::estimate::{
    ParamCounts, estimate, head_chunk_rows, lora_params, uses_flash_kernel,
};

use crate::checks::load;
use crate::common::*;

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn falcon_7b_dir() -> PathBuf {
    repo("tests/fixtures/configs/falcon-7b")
}

/// The Falcon-7B LoRA recipe as `pretrain` resolves it.
fn falcon_lora_recipe() -> TrainConfig {
    let flags: toml::Table = toml::from_str(&format!(
        "checkpoint_dir = {:?}",
        falcon_7b_dir().to_str().unwrap()
    ))
    .unwrap();
    TrainConfig::resolve_unchecked(Some(&repo("lit_recipes/falcon-7b-lora.toml")), flags).unwrap()
}

#[test]
fn falcon_7b_config_reads_as_falcon_7b() {
    let m = load_config(&falcon_7b_dir()).unwrap();
    assert_eq!(
        (m.hidden_size, m.n_head, m.n_kv_head, m.head_dim, m.n_layer),
        (4544, 71, 1, 64, 32)
    );
    assert_eq!(
        (m.vocab_size, m.block_size, m.intermediate_size),
        (65024, 2048, 18176)
    );
    assert!(m.shared_attention_norm && m.tie_embeddings);
}

/// Falcon-7B, LoRA r16 on every target, bf16-true, micro-batch 8 × 2048 tokens.
#[test]
fn falcon_7b_lora_by_hand() {
    let model = load_config(&falcon_7b_dir()).unwrap();
    let cfg = falcon_lora_recipe();
    assert_eq!(cfg.micro_batch_size, 8);
    let counts = ParamCounts::of(&model, cfg.lora().as_ref());
    // emb 65024·4544 + final norm 2·4544 + 32 × (qkv 4544·4672 + dense 4544·4544 +
    // 2·4544·18176 + one shared LayerNorm 2·4544); the head is the embedding.
    assert_eq!(counts.base, 6_921_720_704);
    // Per block r·(in+out): qkv 16·(4544+4672) + dense 16·(4544+4544) + 2 × 16·(4544+18176);
    // head 16·(4544+65024).
    assert_eq!(counts.lora, 32 * 1_019_904 + 1_113_088);
    assert_eq!(counts.trainable, counts.lora);

    let m = estimate(&model, &cfg, 2048).unwrap();
    assert_eq!(m.params, 2 * (6_921_720_704 + 33_750_016)); // 13.9 GB
    assert_eq!(m.grads, 2 * 33_750_016);
    assert_eq!(m.optimizer, 4 * 33_750_016);
    // N = 16384; per token: x, n1, attention output 3·4544 + qkv 4672 + MLP 18176 +
    // 4 adapted linears · 16 + their masked inputs (dropout 0.05): qkv, dense and
    // dense_h_to_4h read 4544, dense_4h_to_h 18176; no h (parallel), no second norm
    // (shared); f32 attention statistics 2 · 8 · 71 · 2048.
    assert_eq!(cfg.lora_dropout, 0.05);
    let dropped = 3 * 4544 + 18_176;
    let block = 2 * 16_384 * (3 * 4544 + 4672 + 18_176 + 4 * 16 + dropped) + 4 * 2 * 8 * 71 * 2048;
    assert_eq!(block, 2_249_064_448);
    assert_eq!(m.activations, 32 * block);
    assert_eq!(head_chunk_rows(65_024, 16_384), 512);
    // one block's backward + final norm + 512 rows of logits and gradient + embedding
    // + the head's masked LoRA input.
    let workspace = 2 * 16_384 * (2 * 4544 + 2 * 18_176 + 4672)
        + 2 * 16_384 * 4544
        + 4 * 2 * 512 * 65_024
        + 2 * 16_384 * 4544
        + 2 * 16_384 * 4544;
    // On CUDA, heads of 64 in bf16: the flash kernel, no (T, T) scores.
    assert!(uses_flash_kernel(&cfg, &model));
    assert_eq!(m.workspace, workspace);
    assert_eq!(m.total, 88_438_605_568);
    // With LIT_CLAIRE_ATTENTION=plain (or without the kernel) one block's backward would
    // hold the (8, 71, 2048, 2048) scores, probabilities and gradients, 14 f32 per score:
    // 124.25 GiB more (`plain_attention_is_counted_off_the_flash_kernel` checks the term).
    assert_eq!(4u64 * 14 * 8 * 71 * 2048 * 2048, 133_412_421_632);

    let mut ckpt = cfg.clone();
    ckpt.activation_checkpointing = 1;
    let c = estimate(&model, &ckpt, 2048).unwrap();
    // Each block keeps its input and its attention output (71 heads of 64) and the
    // attention statistics (2 floats per query row).
    let kept = 2 * 16_384 * (4544 + 71 * 64) + 4 * 2 * 8 * 71 * 2048;
    assert_eq!(c.activations, 32 * kept + block);
    assert_eq!(c.total, 28_544_861_952);
    assert!(c.activations * 5 < m.activations);
}

/// The parameter counts behind the estimate are those of the models the loader
/// builds, with and without LoRA on every target, for every layout we read.
#[test]
fn counts_match_the_built_models() {
    let dirs: Vec<PathBuf> = FAMILIES
        .iter()
        .map(|f| reference_dir(f))
        .chain(
            [
                "falcon_new_gqa",
                "falcon_sequential",
                "llama_gqa_bias",
                "gpt2_inverse_layer",
                "llama3_tied",
            ]
            .into_iter()
            .map(extra_dir),
        )
        .collect();
    let all = LoraTargets {
        query: true,
        key: true,
        value: true,
        projection: true,
        mlp: true,
        head: true,
    };
    for dir in dirs {
        let tm = load(&dir, true);
        let built: usize = tm.vars.iter().map(|(_, v)| v.elem_count()).sum();
        assert_eq!(
            built,
            tm.model.cfg.num_params(),
            "{}: parameters",
            dir.display()
        );
        for targets in [
            all,
            LoraTargets {
                query: true,
                value: true,
                ..Default::default()
            },
        ] {
            let mut model = load(&dir, false).model;
            let lora = LoraConfig {
                r: 3,
                alpha: 6.0,
                dropout: 0.0,
                targets,
                rslora: false,
            };
            let vars = lit_claire::lora::attach_new(&mut model, &lora, 0).unwrap();
            let attached: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
            assert_eq!(
                attached as u64,
                lora_params(&model.cfg, &lora),
                "{}: LoRA {targets:?}",
                dir.display()
            );
        }
    }
}

fn dry_run(extra: &[&str]) -> std::process::Output {
    Command::new(bin())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "pretrain",
            "--recipe",
            "lit_recipes/falcon-7b-lora.toml",
            "--checkpoint-dir",
            "tests/fixtures/configs/falcon-7b",
            "--dry-run",
        ])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn dry_run_prints_the_falcon_7b_plan() {
    let out = dry_run(&[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{stdout}");
    let row = |label: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(label))
            .unwrap_or_else(|| panic!("no {label} row in\n{stdout}"))
            .split_whitespace()
            .skip(label.split_whitespace().count())
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert!(stdout.contains("--activation-checkpointing 1"), "{stdout}");
    assert_eq!(row("parameters"), "12.96 GiB 12.96 GiB");
    assert_eq!(row("activations"), "67.03 GiB 11.25 GiB");
    // On CUDA the flash kernel: no (T, T) scores in the workspace.
    assert_eq!(row("workspace"), "2.19 GiB 2.19 GiB");
    assert_eq!(row("total"), "82.36 GiB 26.58 GiB");
    assert!(stdout.contains("attention by the flash kernel"), "{stdout}");
    assert!(stdout.contains("2048 tokens per sample"), "{stdout}");
    assert!(stdout.contains("LoRA r16"), "{stdout}");

    // Given checkpointing, one column; the flag is the command's, not the run's.
    let out = dry_run(&["--activation-checkpointing", "1", "--micro-batch-size", "4"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("activation checkpointing of every block"),
        "{stdout}"
    );
    assert!(stdout.contains("micro-batch 4 × 2048"), "{stdout}");
}

#[test]
fn dry_run_writes_nothing() {
    let tmp = temp_dir();
    let out_dir = tmp.path().join("run");
    let out = dry_run(&["--out-dir", out_dir.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(!out_dir.exists());
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
}

/// The prepared data's sample length wins over the model's context.
#[test]
fn dry_run_takes_the_data_block_size() {
    let tmp = temp_dir();
    let meta = serde_json::json!({
        "format": "lit-claire-prepared-data", "version": 1, "block_size": 513,
        "max_length": 512, "padding": false, "tokenizer_hash": "x", "vocab_size": 65024,
        "dtype": "uint16", "bos_id": null, "eos_id": 11, "pad_id": null, "datasets": []
    });
    std::fs::write(tmp.path().join("metadata.json"), meta.to_string()).unwrap();
    let out = dry_run(&["--data-dir", tmp.path().to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("512 tokens per sample"), "{stdout}");
    assert!(stdout.contains("micro-batch 8 × 512 tokens"), "{stdout}");
}

#[test]
fn dry_run_without_the_model_says_how_to_get_it() {
    let out = Command::new(bin())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "pretrain",
            "--recipe",
            "lit_recipes/falcon-7b-lora.toml",
            "--checkpoint-dir",
            "nowhere/checkpoints/tiiuae/falcon-7b",
            "--dry-run",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("nowhere/checkpoints/tiiuae/falcon-7b/config.json")
            && stderr.contains("lit-claire download --repo-id tiiuae/falcon-7b"),
        "{stderr}"
    );
}

/// Issue 26: with several devices the plan shows one rank under each strategy, and
/// `--device-memory` names the least sharded that fits; a bad size is one line.
#[test]
fn dry_run_compares_the_strategies_and_names_one_that_fits() {
    let out = dry_run(&["--devices", "8", "--device-memory", "40"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("one rank of 8, by strategy:"), "{stdout}");
    assert!(
        stdout.contains("--strategy ddp  --strategy zero1  --strategy fsdp"),
        "{stdout}"
    );
    // Falcon-7B LoRA at micro-batch 8: 82 GiB as given, 27 with checkpointing on any
    // strategy; fsdp as given is still above 40 (its activations are 67 GiB).
    assert!(
        stdout.contains("fits 40.00 GiB per device: --strategy ddp --activation-checkpointing 1"),
        "{stdout}"
    );
    let out = dry_run(&["--devices", "8", "--device-memory=-3"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--device-memory -3: expected a positive number"),
        "{stderr}"
    );
}
