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
    let m = estimate(&tiny(), &run(2), 8).unwrap();
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
    let m = estimate(&model, &run(2), 8).unwrap();
    assert!(m.validation * 10 < m.activations, "{m:?}");
    assert_eq!(
        m.total,
        m.params + m.grads + m.optimizer + m.activations + m.workspace
    );
}

#[test]
fn checkpointing_keeps_only_block_inputs_and_attention_outputs() {
    let model = tiny();
    let plain = estimate(&model, &run(2), 8).unwrap();
    let mut every = run(2);
    every.activation_checkpointing = 1;
    let every = estimate(&model, &every, 8).unwrap();
    // 3 × (input and attention output, 16·(64 + 64)·4 B, and the attention
    // statistics), plus one full block live again in the backward.
    let kept = 8_192 + 512;
    assert_eq!(every.activations, 3 * kept + (49_152 + 512));
    let mut second = run(2);
    second.activation_checkpointing = 2;
    let second = estimate(&model, &second, 8).unwrap();
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
    let (ddp, zero) = (
        estimate(&model, &ddp, 8).unwrap(),
        estimate(&model, &zero, 8).unwrap(),
    );
    assert_eq!(zero.optimizer * 4, ddp.optimizer);
    // ddp also holds two blocks' f32 gradient sums in flight (43,136 parameters a block).
    assert_eq!(
        (zero.params, zero.grads + 2 * 4 * 43_136),
        (ddp.params, ddp.grads)
    );
}

#[test]
fn lora_trains_only_its_matrices() {
    let model = tiny();
    let mut cfg = run(2);
    cfg.lora_r = 4;
    cfg.lora_mlp = true;
    cfg.precision = Precision::Bf16True;
    let m = estimate(&model, &cfg, 8).unwrap();
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
    let full = estimate(&model, &run(2), 8).unwrap();
    let f32_per_block = (full.activations / 3 - 512) / 4;
    assert_eq!(
        m.activations,
        3 * (2 * (f32_per_block + 16 * (5 * 4 + 4 * 64 + 160)) + 512)
    );
    cfg.lora_dropout = 0.0;
    let m = estimate(&model, &cfg, 8).unwrap();
    assert_eq!(m.activations, 3 * (2 * (f32_per_block + 16 * 5 * 4) + 512));
    // The head's masked input, N·C, only with LoRA on the head and dropout.
    let base_workspace = m.workspace;
    cfg.lora_head = true;
    assert_eq!(estimate(&model, &cfg, 8).unwrap().workspace, base_workspace);
    cfg.lora_dropout = 0.1;
    assert_eq!(
        estimate(&model, &cfg, 8).unwrap().workspace,
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
    let need = estimate(&model, &cfg, 32).unwrap().total;
    assert_eq!(does_not_fit(&model, &cfg, 32, need).unwrap(), None);
    let half = estimate(&model, &run(4), 32).unwrap().total;
    let why = does_not_fit(&model, &cfg, 32, half).unwrap().unwrap();
    assert!(why.contains("--micro-batch-size 4"), "{why}");
    assert!(!why.contains('\n'), "{why}");
    let why = does_not_fit(&model, &cfg, 32, 1000).unwrap().unwrap();
    assert!(why.contains("even --micro-batch-size 1"), "{why}");
}

#[test]
fn table_is_aligned() {
    let m = estimate(&tiny(), &run(2), 8).unwrap();
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
    let flash = estimate(&tiny(), &run(2), 8).unwrap();
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
        let m = estimate(&tiny(), &cfg, 8).unwrap();
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
            .unwrap()
            .assumed
            .contains("without a flash kernel")
    );
    assert!(
        flash.assumed.contains("by the flash kernel"),
        "{}",
        flash.assumed
    );
}

/// Issue 23, case 17: the largest shapes a config may have are planned without
/// wrapping (the optimizer state stays twice the parameters), and a plan past 2^64
/// bytes is an error naming its sizes, not a small number.
#[test]
fn huge_plans_are_exact_or_refused() {
    // 2^20 wide, 16 layers: 4.8e14 bytes of parameters in f32, well inside a u64.
    let mut big = tiny();
    big.hidden_size = 1 << 20;
    big.intermediate_size = 1 << 20;
    big.n_head = 1 << 10;
    big.n_kv_head = 1 << 10;
    big.head_dim = 1 << 10;
    big.n_layer = 16;
    big.windows = vec![crate::config::AttentionWindow::Global; 16];
    assert!(big.param_count().unwrap() < crate::config::families::MAX_PARAMS);
    let m = estimate(&big, &run(1), 8).unwrap();
    assert_eq!(m.optimizer, 2 * m.params, "{m}");
    assert_eq!(m.grads, m.params);
    assert_eq!(m.params, 4 * big.param_count().unwrap() as u64);
    assert!(m.to_string().contains("GiB"), "{m}");
    // A micro-batch and a context no machine holds: the activations pass 2^64 bytes.
    let mut cfg = run(1 << 30);
    cfg.batch_size = 1 << 30;
    let e = estimate(&tiny(), &cfg, 1 << 40).unwrap_err().to_string();
    assert!(
        e.contains("past 2^64 bytes")
            && e.contains("--micro-batch-size")
            && e.contains(&format!("{} tokens", 1u64 << 40))
            && !e.contains('\n'),
        "{e}"
    );
    // LoRA of a rank no machine holds.
    let mut lora = run(1);
    lora.lora_r = usize::MAX;
    let e = estimate(&tiny(), &lora, 8).unwrap_err().to_string();
    assert!(e.contains("--lora-r"), "{e}");
    // Counts saturate instead of wrapping.
    assert_eq!(kv_cache_bytes(&tiny(), 4, usize::MAX, usize::MAX), u64::MAX);
}

/// The advice of a run that does not fit looks for a smaller micro-batch without a
/// list (or a loop) as long as the micro-batch: 2^40 answers at once.
#[test]
fn advice_for_a_huge_micro_batch_is_found_at_once() {
    let model = tiny();
    let mut cfg = run(1 << 40);
    cfg.batch_size = 3 << 40;
    let one = estimate(&model, &run(1), 32).unwrap().total;
    let start = std::time::Instant::now();
    let why = does_not_fit(&model, &cfg, 32, one).unwrap().unwrap();
    assert!(start.elapsed().as_secs() < 5, "{:?}", start.elapsed());
    assert!(why.contains("--micro-batch-size 1 ("), "{why}");
    // A fit that is not a divisor of the batch size walks down to one that is.
    let mut cfg = run(8);
    cfg.batch_size = 8;
    let seven = estimate(&model, &run(7), 32).unwrap().total;
    let why = does_not_fit(&model, &cfg, 32, seven).unwrap().unwrap();
    assert!(why.contains("--micro-batch-size 4 ("), "{why}");
}

/// Issue 23, case 25: CPU ranks are threads of one process, each with its own copy
/// of every part, so the plan's total counts them; GPU ranks each have a device.
#[test]
fn cpu_thread_ranks_multiply_the_total() {
    let one = estimate(&tiny(), &run(2), 8).unwrap();
    assert_eq!(one.ranks, 1);
    let mut cfg = run(2);
    cfg.devices = 4;
    let four = estimate(&tiny(), &cfg, 8).unwrap();
    assert_eq!(four.ranks, 4);
    assert_eq!(
        (four.params, four.activations),
        (one.params, one.activations)
    );
    // Each ddp rank also holds two blocks' f32 gradient sums in flight (43,136
    // parameters a block), which one rank does not.
    assert_eq!(four.total, 4 * (one.total + 2 * 4 * 43_136));
    let text = four.to_string();
    assert!(
        text.contains("ranks (threads)") && text.contains("× 4"),
        "{text}"
    );
    assert!(text.contains("threads of one process"), "{text}");
    assert!(!one.to_string().contains("ranks (threads)"));
    cfg.device = DeviceSpec::Cuda(0);
    let gpus = estimate(&tiny(), &cfg, 8).unwrap();
    // On GPUs, their flat inputs too.
    assert_eq!((gpus.ranks, gpus.total), (1, one.total + 4 * 4 * 43_136));
}

/// Issue 26: per-rank parameters, gradients and optimizer state under each strategy,
/// by hand, full fine-tuning in f32 on 4 ranks. Outer unit: embeddings 256·64, head
/// 256·64, final norm 64 = 32,832; one block 43,136; all 162,240.
#[test]
fn fsdp_shards_parameters_gradients_and_optimizer_state_full() {
    let mut cfg = run(2);
    cfg.devices = 4;
    let plans = by_strategy(&tiny(), &cfg, 8).unwrap();
    let parts: Vec<(StrategyKind, u64, u64, u64)> = plans
        .iter()
        .map(|(k, m)| (*k, m.params, m.grads, m.optimizer))
        .collect();
    assert_eq!(
        parts,
        [
            // ddp's gradients: its buffers, and two blocks' f32 sums in flight.
            (
                StrategyKind::Ddp,
                4 * 162_240,
                4 * 162_240 + 2 * 4 * 43_136,
                8 * 162_240,
            ),
            // The moments of zero1's shards are f32: 2 · 4 · 162,240 / 4.
            (StrategyKind::Zero1, 4 * 162_240, 4 * 162_240, 324_480),
            (
                StrategyKind::Fsdp,
                // shards 4 · 162,240 / 4, + the outer unit and one block gathered.
                162_240 + 4 * (32_832 + 43_136),
                // f32 gradient shards, + the outer's and one block's gradient buffers,
                // + the f32 flat copy of the larger (a block) reduce-scattered.
                162_240 + 4 * (32_832 + 43_136) + 4 * 43_136,
                324_480,
            ),
        ]
    );
    // Activations and the rest do not depend on the strategy.
    for (_, m) in &plans {
        assert_eq!(m.activations, plans[0].1.activations);
        assert_eq!(m.workspace, plans[0].1.workspace);
    }
    // One rank: zero1 is ddp (its state stays whole); fsdp runs its sharded code, each
    // shard the whole buffer, and plans the outer unit and one block gathered, with
    // their gradient buffers, on top.
    let one = by_strategy(&tiny(), &run(2), 8).unwrap();
    assert_eq!(one[1].1.total, one[0].1.total);
    let (ddp, fsdp) = (&one[0].1, &one[2].1);
    assert_eq!(fsdp.params, ddp.params + 4 * (32_832 + 43_136));
    assert_eq!(fsdp.optimizer, ddp.optimizer);
    assert!(fsdp.assumed.contains("1 rank, fsdp"), "{}", fsdp.assumed);
}

/// The same for LoRA (r4 on q, v and the MLP) in bf16-true on 2 ranks: the frozen base
/// is sharded too; only the adapters have gradients and moments.
#[test]
fn fsdp_shards_the_frozen_base_of_lora() {
    let mut cfg = run(2);
    cfg.devices = 2;
    cfg.lora_r = 4;
    cfg.lora_mlp = true;
    cfg.precision = Precision::Bf16True;
    cfg.strategy = StrategyKind::Fsdp;
    let m = estimate(&tiny(), &cfg, 8).unwrap();
    let lora_block = 512 + 384 + 3 * 896;
    let lora = 3 * lora_block;
    // 2 bytes · (base + LoRA) / 2, + the outer unit and one block with its adapters.
    assert_eq!(
        m.params,
        162_240 + lora + 2 * (32_832 + 43_136 + lora_block)
    );
    // f32 shards of the adapters' gradients, one block's adapter gradients (the outer
    // unit has no adapter here) and their f32 flat copy.
    assert_eq!(m.grads, 4 * lora / 2 + 2 * lora_block + 4 * lora_block);
    assert_eq!(m.optimizer, 2 * 4 * lora / 2);
    assert!(
        m.assumed
            .contains("2 ranks, parameters, gradients and optimizer state sharded (fsdp")
    );
}

/// The least sharded strategy that fits is named: a device just above ddp's total
/// takes ddp; one between fsdp's and zero1's takes fsdp; one below fsdp's takes fsdp
/// with activation checkpointing; one below everything takes nothing.
#[test]
fn the_least_sharded_strategy_that_fits_is_named() {
    let mut model = tiny();
    model.n_layer = 12;
    let mut cfg = run(2);
    cfg.devices = 8;
    let totals: Vec<u64> = by_strategy(&model, &cfg, 8)
        .unwrap()
        .iter()
        .map(|(_, m)| m.total)
        .collect();
    assert!(totals[0] > totals[1] && totals[1] > totals[2], "{totals:?}");
    let fit = |free| smallest_fitting(&model, &cfg, 8, free).unwrap();
    assert_eq!(fit(totals[0]), Some((StrategyKind::Ddp, 0, totals[0])));
    assert_eq!(
        fit(totals[0] - 1),
        Some((StrategyKind::Zero1, 0, totals[1]))
    );
    assert_eq!(fit(totals[1] - 1), Some((StrategyKind::Fsdp, 0, totals[2])));
    // Below fsdp's total as given: fsdp with checkpointing (this tiny model's
    // activations are too small for checkpointing to save ddp or zero1).
    let with_ckpt = fit(totals[2] - 1).unwrap();
    assert_eq!((with_ckpt.0, with_ckpt.1), (StrategyKind::Fsdp, 1));
    assert!(with_ckpt.2 < totals[2]);
    assert_eq!(fit(1000), None);
    let report = strategy_report(&model, &cfg, 8, Some(totals[1] - 1)).unwrap();
    assert!(report.contains("--strategy fsdp ("), "{report}");
    assert!(report.contains("one rank of 8, by strategy"), "{report}");
}

/// ddp on several ranks sums each block's gradients as its backward ends: a block's
/// f32 sums wait until the next block's are queued (two blocks' worth held), and on a
/// GPU their flat inputs too, read by NCCL's side stream (four). One rank sums nothing.
#[test]
fn ddp_on_several_ranks_counts_the_gradient_sums_in_flight() {
    let mut cfg = run(2);
    let one = estimate(&tiny(), &cfg, 8).unwrap();
    cfg.devices = 2;
    let cpu = estimate(&tiny(), &cfg, 8).unwrap();
    // 43_136 parameters a block: q 64·64, k and v 64·32, o 64·64, MLP 3·64·160, 2 norms.
    assert_eq!(cpu.grads, one.grads + 2 * 4 * 43_136);
    cfg.device = DeviceSpec::Cuda(0);
    let gpu = estimate(&tiny(), &cfg, 8).unwrap();
    assert_eq!(gpu.grads, one.grads + 4 * 4 * 43_136);
    // LoRA (r4 on q and v): a block's adapters only.
    cfg.device = DeviceSpec::Cpu;
    cfg.lora_r = 4;
    let lora = estimate(&tiny(), &cfg, 8).unwrap();
    cfg.devices = 1;
    let lora_one = estimate(&tiny(), &cfg, 8).unwrap();
    assert_eq!(lora.grads, lora_one.grads + 2 * 4 * (512 + 384));
}
