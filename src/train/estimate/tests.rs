//! Hand-computed plans of a tiny LLaMA.

use super::*;
use crate::config::families::parse_config;
use crate::strategy::Precision;
use serde_json::json;

/// LLaMA: C 64, 4 heads of 16, 2 kv heads, I 160 (gated), 3 layers, V 256, context 32.
fn tiny() -> Config {
    parse_config(&json!({
        "model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 160, "num_hidden_layers": 3,
        "vocab_size": 256, "max_position_embeddings": 32, "tie_word_embeddings": false
    }))
    .unwrap()
}

fn run(micro: usize) -> TrainConfig {
    TrainConfig {
        micro_batch_size: micro,
        batch_size: 8,
        ..TrainConfig::default()
    }
}

/// Every number worked out by hand for micro-batch 2 × 8 tokens in f32.
#[test]
fn full_fine_tuning_by_hand() {
    let m = estimate(&tiny(), &run(2), 8);
    // params: emb 256·64 + head 256·64 + final norm 64 + 3 × (q 64·64 + k 64·32 +
    // v 64·32 + o 64·64 + 3·64·160 + 2 norms of 64) = 32832 + 3·43136 = 162240
    assert_eq!(ParamCounts::of(&tiny(), None).base, 162_240);
    assert_eq!(m.params, 4 * 162_240);
    assert_eq!(m.grads, 4 * 162_240);
    assert_eq!(m.optimizer, 2 * 4 * 162_240);
    // N = 16; per token: x 64 + n1 64 + qkv 128 + attn 64 + h 64 + n2 64 + 2·160
    // = 768 → 16·768·4 = 49152 B, + stats 2·2·4·8·4 = 512 B; × 3 blocks.
    assert_eq!(m.activations, 3 * (49_152 + 512));
    // 16·(128 + 320 + 128)·4 + 16·64·4 + rows 16 (2^23/256 > N): 2·16·256·4 + 16·64·4
    assert_eq!(m.workspace, 36_864 + 4_096 + 32_768 + 4_096);
    // Validation: one block's set 49152 + 512, its input and the final norm's output
    // 2·16·64·4, one chunk of logits 16·256·4.
    assert_eq!(m.validation, 49_152 + 512 + 8_192 + 16_384);
    assert_eq!(
        m.total,
        m.params + m.grads + m.optimizer + m.activations + m.workspace
    );
}

/// Validation holds one block at a time, so it is far below training's activations
/// for a deep model (the scoring pass never adds to a training step's peak).
#[test]
fn validation_holds_one_block() {
    let mut model = tiny();
    model.n_layer = 30;
    let m = estimate(&model, &run(2), 8);
    assert!(m.validation * 10 < m.activations, "{m:?}");
    assert_eq!(
        m.total,
        m.params + m.grads + m.optimizer + m.activations + m.workspace
    );
}

#[test]
fn checkpointing_keeps_only_block_inputs_and_attention_outputs() {
    let model = tiny();
    let plain = estimate(&model, &run(2), 8);
    let mut every = run(2);
    every.activation_checkpointing = 1;
    let every = estimate(&model, &every, 8);
    // 3 × (input and attention output, 16·(64 + 64)·4 B, and the attention
    // statistics), plus one full block live again in the backward.
    let kept = 8_192 + 512;
    assert_eq!(every.activations, 3 * kept + (49_152 + 512));
    let mut second = run(2);
    second.activation_checkpointing = 2;
    let second = estimate(&model, &second, 8);
    // Blocks 0 and 2 checkpointed, block 1 whole, plus one.
    assert_eq!(second.activations, 2 * kept + 2 * (49_152 + 512));
    assert!(every.activations < second.activations);
    assert!(second.activations < plain.activations);
    assert_eq!(every.params, plain.params);
    assert_eq!(every.workspace, plain.workspace);
}

#[test]
fn zero1_divides_the_optimizer_state() {
    let model = tiny();
    let mut ddp = run(2);
    ddp.devices = 4;
    let mut zero = ddp.clone();
    zero.strategy = StrategyKind::Zero1;
    let (ddp, zero) = (estimate(&model, &ddp, 8), estimate(&model, &zero, 8));
    assert_eq!(zero.optimizer * 4, ddp.optimizer);
    assert_eq!((zero.params, zero.grads), (ddp.params, ddp.grads));
}

#[test]
fn lora_trains_only_its_matrices() {
    let model = tiny();
    let mut cfg = run(2);
    cfg.lora_r = 4;
    cfg.lora_mlp = true;
    cfg.precision = Precision::Bf16True;
    let m = estimate(&model, &cfg, 8);
    // q: 4·(64+64), v: 4·(64+32), MLP: 2 × 4·(64+160) + 4·(160+64) per block.
    let per_block = 512 + 384 + 3 * 896;
    assert_eq!(
        ParamCounts::of(&model, cfg.lora().as_ref()).lora,
        3 * per_block
    );
    assert_eq!(m.grads, 2 * 3 * per_block);
    assert_eq!(m.params, 2 * (162_240 + 3 * per_block));
    assert!(m.grads * 10 < m.params, "{m}");
    // 5 adapted linears: + 5·r per token, in bf16; with dropout (0.05 by default)
    // also each one's masked input: q 64, v 64, gate 64, up 64, down 160.
    let full = estimate(&model, &run(2), 8);
    let f32_per_block = (full.activations / 3 - 512) / 4;
    assert_eq!(
        m.activations,
        3 * (2 * (f32_per_block + 16 * (5 * 4 + 4 * 64 + 160)) + 512)
    );
    cfg.lora_dropout = 0.0;
    let m = estimate(&model, &cfg, 8);
    assert_eq!(m.activations, 3 * (2 * (f32_per_block + 16 * 5 * 4) + 512));
    // The head's masked input, N·C, only with LoRA on the head and dropout.
    let base_workspace = m.workspace;
    cfg.lora_head = true;
    assert_eq!(estimate(&model, &cfg, 8).workspace, base_workspace);
    cfg.lora_dropout = 0.1;
    assert_eq!(
        estimate(&model, &cfg, 8).workspace,
        base_workspace + 2 * 16 * 64
    );
}

#[test]
fn head_chunks() {
    assert_eq!(head_chunk_rows(65_024, 16_384), 512);
    assert_eq!(head_chunk_rows(256, 16), 16);
    assert_eq!(head_chunk_rows(1 << 20, 1_000), 63);
    assert_eq!(head_chunk_rows(32_000, 100), 100);
}

#[test]
fn a_run_too_large_names_what_fits() {
    let model = tiny();
    let cfg = run(8);
    let need = estimate(&model, &cfg, 32).total;
    assert_eq!(does_not_fit(&model, &cfg, 32, need), None);
    let half = estimate(&model, &run(4), 32).total;
    let why = does_not_fit(&model, &cfg, 32, half).unwrap();
    assert!(why.contains("--micro-batch-size 4"), "{why}");
    assert!(!why.contains('\n'), "{why}");
    let why = does_not_fit(&model, &cfg, 32, 1000).unwrap();
    assert!(why.contains("even --micro-batch-size 1"), "{why}");
}

#[test]
fn table_is_aligned() {
    let m = estimate(&tiny(), &run(2), 8);
    let text = m.to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 8, "{text}");
    assert!(
        lines[..7].iter().all(|l| l.len() == lines[0].len()),
        "{text}"
    );
    assert!(lines[5].starts_with("validation"), "{text}");
    assert!(lines[7].starts_with("assumes full fine-tuning"), "{text}");
    assert_eq!(human(3 << 30), "3.00 GiB");
    assert_eq!(human(3 << 19), "1.5 MiB");
    assert_eq!(grouped(6_921_720_704), "6,921,720,704");
}

/// Off the flash kernels (bf16 on the CPU, heads wider than 128 on CUDA) one block's
/// backward holds its plain attention: 14 f32 per score of (micro_batch, nh, T, T), in
/// the workspace. On CUDA with heads up to 128, in every precision, the flash kernel.
#[test]
fn plain_attention_is_counted_off_the_flash_kernel() {
    let flash = estimate(&tiny(), &run(2), 8);
    assert!(uses_flash_kernel(&run(2), &tiny()));
    for precision in [Precision::True32, Precision::Bf16True, Precision::F16Mixed] {
        let cfg = TrainConfig {
            device: DeviceSpec::Cuda(0),
            precision,
            ..run(2)
        };
        assert!(uses_flash_kernel(&cfg, &tiny()), "{precision:?}");
    }
    let scores = 2 * 4 * 8 * 8;
    for (device, precision) in [
        (DeviceSpec::Cpu, Precision::Bf16True),
        (DeviceSpec::Cpu, Precision::F16Mixed),
    ] {
        let cfg = TrainConfig {
            device,
            precision,
            ..run(2)
        };
        assert!(!uses_flash_kernel(&cfg, &tiny()));
        let m = estimate(&tiny(), &cfg, 8);
        let e = precision.compute_dtype().size_in_bytes() as u64;
        // The rest of the workspace scales with the activations' width.
        let rest = flash.workspace - 2 * 16 * 256 * 4;
        assert_eq!(
            m.workspace,
            rest / 4 * e + 2 * 16 * 256 * 4 + 4 * 14 * scores,
            "{device:?} {precision:?}"
        );
        assert!(
            m.assumed.contains("without a flash kernel"),
            "{}",
            m.assumed
        );
    }
    // Heads of 256 on CUDA: wider than the CUDA kernel takes.
    let wide = parse_config(&json!({
        "model_type": "llama", "hidden_size": 512, "num_attention_heads": 2,
        "num_key_value_heads": 2, "intermediate_size": 160, "num_hidden_layers": 1,
        "vocab_size": 256, "max_position_embeddings": 32, "tie_word_embeddings": false
    }))
    .unwrap();
    assert_eq!(wide.head_dim, 256);
    let cuda = TrainConfig {
        device: DeviceSpec::Cuda(0),
        precision: Precision::Bf16True,
        ..run(2)
    };
    assert!(!uses_flash_kernel(&cuda, &wide));
    assert!(
        estimate(&wide, &cuda, 8)
            .assumed
            .contains("without a flash kernel")
    );
    assert!(
        flash.assumed.contains("by the flash kernel"),
        "{}",
        flash.assumed
    );
}
