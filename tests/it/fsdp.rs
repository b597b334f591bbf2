//! `--strategy fsdp` (ZeRO-3) on CPU threads: 2 and 4 ranks holding shards of the
//! model are the same computation as 1 rank holding all of it (full and LoRA, with and
//! without activation checkpointing); a checkpoint written by 2 fsdp ranks resumes on
//! 1 and on 4; each rank holds its share of the parameters between steps.

use std::time::Duration;

use lit_claire::strategy::threads::ThreadGroup;
use lit_claire::strategy::{Strategy, StrategyKind};
use lit_claire::train::{TrainConfig, Trainer, pretrain_with_data};

use crate::common::*;
use crate::data_parallel::{assert_no_partial_files, assert_same, config, data, lora, stopped_at};

/// 1 rank × micro-batch 4 (ddp, every parameter whole) against fsdp on 2 ranks ×
/// micro-batch 2 and 4 ranks × micro-batch 1, each without and with activation
/// checkpointing.
fn fsdp_is_one_rank(tweak: impl Fn(TrainConfig) -> TrainConfig, kind: &str) {
    let one = temp_dir();
    let s = pretrain_with_data(&tweak(config(one.path(), 1, 4)), data()).unwrap();
    assert_eq!(s.steps, 10);
    for (devices, micro) in [(2, 2), (4, 1)] {
        for checkpointing in [0, 1] {
            let run = temp_dir();
            let mut cfg = tweak(config(run.path(), devices, micro));
            cfg.strategy = StrategyKind::Fsdp;
            cfg.activation_checkpointing = checkpointing;
            let s = pretrain_with_data(&cfg, data()).unwrap();
            assert_eq!(s.final_checkpoint, Some(run.path().join("final")));
            assert_same(
                &format!(
                    "{kind}, {devices} ranks fsdp (activation checkpointing {checkpointing}) vs 1 rank"
                ),
                one.path(),
                run.path(),
            );
            let log = std::fs::read_to_string(run.path().join("train.log")).unwrap();
            assert!(
                log.contains(&format!("cpu × {devices} ranks (fsdp)")),
                "{log}"
            );
            for ck in ["step-00000004", "step-00000008", "final"] {
                assert!(run.path().join(ck).join("optimizer.safetensors").exists());
            }
            assert_no_partial_files(run.path());
        }
    }
}

#[test]
fn fsdp_on_two_and_four_ranks_gives_the_losses_and_weights_of_one_full() {
    fsdp_is_one_rank(|c| c, "full");
}

#[test]
fn fsdp_on_two_and_four_ranks_gives_the_losses_and_weights_of_one_lora() {
    fsdp_is_one_rank(|c| lora(c, 0.25), "LoRA (dropout 0.25)");
}

#[test]
fn a_checkpoint_of_two_fsdp_ranks_resumes_on_one_and_on_four() {
    let two = temp_dir();
    let mut cfg = config(two.path(), 2, 2);
    cfg.strategy = StrategyKind::Fsdp;
    pretrain_with_data(&cfg, data()).unwrap();
    // 1 rank (ddp, the whole model) and 4 fsdp ranks: the same continuation.
    for (devices, micro, strategy) in [(1, 2, StrategyKind::Ddp), (4, 1, StrategyKind::Fsdp)] {
        let (_keep, resumed) = stopped_at(two.path(), 4);
        let mut cfg = config(&resumed, devices, micro);
        cfg.strategy = strategy;
        cfg.resume = Some("auto".into());
        let s = pretrain_with_data(&cfg, data()).unwrap();
        assert_eq!(s.steps, 10);
        let log = std::fs::read_to_string(resumed.join("train.log")).unwrap();
        assert!(log.contains("resuming"), "{log}");
        assert_same(
            &format!("2 ranks (fsdp) resumed at step 4 on {devices} ({strategy})"),
            two.path(),
            &resumed,
        );
    }
}

/// Bytes of parameters each of `devices` thread ranks holds after 2 steps of `cfg`.
fn held_bytes(cfg: &TrainConfig, devices: usize) -> Vec<usize> {
    let group = ThreadGroup::new(devices, Duration::from_secs(60));
    std::thread::scope(|s| {
        let hs: Vec<_> = group
            .handles()
            .into_iter()
            .map(|c| {
                let st = Strategy::cpu().with_collective(c, cfg.strategy);
                s.spawn(move || {
                    let mut t = Trainer::on_rank(cfg, data(), st).unwrap();
                    t.run(Some(2)).unwrap();
                    t.held_parameter_bytes()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Between steps an fsdp rank holds its shard of every parameter, the frozen base of
/// a LoRA run too: the bytes of the tensors it keeps are those of the whole model
/// divided by the number of ranks (up to the padding of each unit), where a ddp rank
/// keeps all of them.
#[test]
fn an_fsdp_rank_holds_its_share_of_the_parameters() {
    for lora_on in [false, true] {
        let tweak = |c: TrainConfig| if lora_on { lora(c, 0.0) } else { c };
        let dir = temp_dir();
        let mut cfg = tweak(config(dir.path(), 2, 2));
        let ddp = held_bytes(&cfg, 2);
        let whole = ddp[0];
        assert!(whole > 100_000, "{whole}");
        assert!(ddp.iter().all(|&b| b == whole), "{ddp:?}");
        for devices in [2, 4] {
            let dir = temp_dir();
            cfg = tweak(config(dir.path(), devices, 4 / devices));
            cfg.strategy = StrategyKind::Fsdp;
            let held = held_bytes(&cfg, devices);
            // Each unit (a block, or the embeddings with norm and head) pads its
            // frozen and trained buffers to a multiple of the ranks: at most
            // 2 · (devices − 1) values of 4 bytes each.
            let units = 2 + 1; // the reference model's blocks, and the outer unit
            let pad = units * 2 * (devices - 1) * 4;
            for (r, &b) in held.iter().enumerate() {
                assert!(
                    b * devices >= whole && b * devices <= whole + devices * pad,
                    "lora {lora_on}, rank {r} of {devices}: holds {b} bytes of a {whole}-byte model"
                );
            }
        }
    }
}
