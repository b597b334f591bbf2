//! `--strategy fsdp` (ZeRO-3) on CPU threads: 2 and 4 ranks holding shards of the
//! model are the same computation as 1 rank holding all of it (full and LoRA, with and
//! without activation checkpointing); 1 fsdp rank (the sharded code, every shard the
//! whole buffer) is 1 ddp rank; a checkpoint written by 2 fsdp ranks resumes on 1 and
//! on 4, and one written by 1 fsdp rank resumes; each rank holds its share of the
//! parameters between steps; queued gradient reductions (NCCL's side stream) are read
//! only after their wait.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::{Tensor, Var};
use lit_claire::error::Result;
use lit_claire::strategy::threads::ThreadGroup;
use lit_claire::strategy::{Collective, Pending, Ready, ReduceOp, Strategy, StrategyKind};
use lit_claire::tokenizer::Tokenizer;
use lit_claire::train::batches::{PackedSamples, TrainData, TrainDataset};
use lit_claire::train::{TrainConfig, Trainer, pretrain_with_data};

use crate::common::*;
use crate::data_parallel::{
    assert_no_partial_files, assert_same, compare, config, data, lora, stopped_at, weights,
};

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

/// fsdp on one rank runs the sharded code (the runner's model is the shell of
/// placeholders, every shard the whole buffer, the collectives the one-rank identity)
/// and is ddp's run on one rank: the same losses (1e-5 relative) and final weights.
fn fsdp_on_one_rank_is_ddp(tweak: impl Fn(TrainConfig) -> TrainConfig, kind: &str) {
    let ddp = temp_dir();
    pretrain_with_data(&tweak(config(ddp.path(), 1, 2)), data()).unwrap();
    let fsdp = temp_dir();
    let mut cfg = tweak(config(fsdp.path(), 1, 2));
    cfg.strategy = StrategyKind::Fsdp;
    // The sharded path, not the replicated one: every parameter of the runner's model
    // is a placeholder of 0 elements.
    let probe = temp_dir();
    let mut probe_cfg = cfg.clone();
    probe_cfg.out_dir = probe.path().to_path_buf();
    let t = Trainer::new(&probe_cfg, data()).unwrap();
    let params = t.model().named_parameters();
    assert!(!params.is_empty());
    for (name, p) in &params {
        assert_eq!(p.elem_count(), 0, "{kind}: {name} is not sharded");
    }
    drop(t);
    let s = pretrain_with_data(&cfg, data()).unwrap();
    assert_eq!(s.steps, 10);
    let log = std::fs::read_to_string(fsdp.path().join("train.log")).unwrap();
    assert!(log.contains("on cpu × 1 rank (fsdp)"), "{log}");
    assert!(!log.contains("nothing to shard"), "{log}");
    assert_same(
        &format!("{kind}, 1 rank fsdp vs 1 rank ddp"),
        ddp.path(),
        fsdp.path(),
    );
}

#[test]
fn fsdp_on_one_rank_gives_the_losses_and_weights_of_ddp_on_one_rank_full() {
    fsdp_on_one_rank_is_ddp(|c| c, "full");
}

#[test]
fn fsdp_on_one_rank_gives_the_losses_and_weights_of_ddp_on_one_rank_lora() {
    fsdp_on_one_rank_is_ddp(|c| lora(c, 0.25), "LoRA (dropout 0.25)");
}

/// A checkpoint of a one-rank fsdp run (full and LoRA) resumes on one fsdp rank, and
/// on two, as the run that was not stopped.
#[test]
fn a_checkpoint_of_one_fsdp_rank_resumes() {
    for lora_on in [false, true] {
        let tweak = |c: TrainConfig| if lora_on { lora(c, 0.25) } else { c };
        let one = temp_dir();
        let mut cfg = tweak(config(one.path(), 1, 2));
        cfg.strategy = StrategyKind::Fsdp;
        pretrain_with_data(&cfg, data()).unwrap();
        for (devices, micro) in [(1, 4), (2, 2)] {
            let (_keep, resumed) = stopped_at(one.path(), 4);
            let mut cfg = tweak(config(&resumed, devices, micro));
            cfg.strategy = StrategyKind::Fsdp;
            cfg.resume = Some("auto".into());
            assert_eq!(pretrain_with_data(&cfg, data()).unwrap().steps, 10);
            let log = std::fs::read_to_string(resumed.join("train.log")).unwrap();
            assert!(log.contains("resuming"), "{log}");
            assert_same(
                &format!("LoRA {lora_on}: 1 fsdp rank resumed at step 4 on {devices} (fsdp)"),
                one.path(),
                &resumed,
            );
        }
    }
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
            eprintln!(
                "lora {lora_on}: ddp rank holds {whole} bytes, fsdp ranks of {devices}: {held:?}"
            );
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

/// A rank's collective that writes down each call: its kind and length.
struct Recording {
    inner: Arc<dyn Collective>,
    calls: Mutex<Vec<(&'static str, usize)>>,
}

impl Recording {
    fn note(&self, what: &'static str, x: &Tensor) {
        self.calls.lock().unwrap().push((what, x.elem_count()));
    }
}

impl Collective for Recording {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_reduce(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        self.note("all_reduce", x);
        self.inner.all_reduce(x, op)
    }
    fn reduce_scatter(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        self.note("reduce_scatter", x);
        self.inner.reduce_scatter(x, op)
    }
    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        self.note("all_gather", x);
        self.inner.all_gather(x)
    }
    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        self.note("broadcast", x);
        self.inner.broadcast(x, root)
    }
    fn barrier(&self) -> Result<()> {
        self.inner.barrier()
    }
    fn abort(&self, reason: &str) {
        self.inner.abort(reason)
    }
}

/// The calls of each of `devices` ranks training `cfg` for one step (every one of
/// more than 16 values: the parameters' and gradients', not the losses').
fn recorded(cfg: &TrainConfig, devices: usize) -> Vec<Vec<(&'static str, usize)>> {
    let group = ThreadGroup::new(devices, Duration::from_secs(60));
    let recs: Vec<Arc<Recording>> = group
        .handles()
        .into_iter()
        .map(|inner| {
            Arc::new(Recording {
                inner,
                calls: Mutex::new(Vec::new()),
            })
        })
        .collect();
    std::thread::scope(|s| {
        for r in &recs {
            let c: Arc<dyn Collective> = r.clone();
            let st = Strategy::cpu().with_collective(c, cfg.strategy);
            s.spawn(move || {
                let mut t = Trainer::on_rank(cfg, data(), st).unwrap();
                r.calls.lock().unwrap().clear();
                t.run(Some(1)).unwrap();
            });
        }
    });
    recs.iter()
        .map(|r| {
            let calls = r.calls.lock().unwrap();
            calls.iter().filter(|(_, n)| *n > 16).copied().collect()
        })
        .collect()
}

/// Issue 26: each block's parameters are gathered just before its forward and again
/// for its backward, and its gradients reduce-scattered as soon as its backward ends,
/// just after the previous block's parameters are gathered for theirs (so that on NCCL,
/// which runs one communicator's operations in order, that backward does not wait for
/// the reduce-scatter); the embeddings and head (the outer unit) are gathered first and
/// reduced last. Two micro-batches a step: twice. Validation
/// and checkpoints gather one unit at a time too.
#[test]
fn fsdp_gathers_each_block_for_its_forward_and_backward_and_reduces_it_at_once() {
    let dir = temp_dir();
    let mut cfg = config(dir.path(), 2, 1);
    cfg.strategy = StrategyKind::Fsdp;
    cfg.max_steps = Some(1);
    for calls in recorded(&cfg, 2) {
        // Full fine-tuning: one trained buffer a unit; every shard is half of its
        // unit's padded buffer.
        let gather = |i: usize| calls[i].0 == "all_gather";
        let (outer, block) = (calls[0].1, calls[1].1);
        assert_ne!(outer, block, "{calls:?}");
        let g = |n| ("all_gather", n);
        let r = |n: usize| ("reduce_scatter", 2 * n);
        let pass = [
            g(outer),
            g(block), // block 0 forward
            g(block), // block 1 forward
            g(block), // block 1 backward
            g(block), // block 0 backward, gathered before block 1's reduce-scatter
            r(block), // block 1's gradients
            r(block), // block 0's
            r(outer),
        ];
        let want: Vec<_> = pass.iter().chain(&pass).copied().collect();
        assert!(gather(0));
        assert_eq!(calls[..16], want[..], "{calls:?}");
        // Then the update gathers nothing. The final validation gathers each block for
        // its forward, one at a time, batch after batch (4 and 2 samples, micro-batch
        // 1: 6 batches); the checkpoint each unit's moments (m, v), then its
        // parameters: one unit at a time, never the model at once. No more gradients.
        let scoring = [g(outer), g(block), g(block)];
        let validation: Vec<_> = scoring.iter().cycle().take(18).copied().collect();
        assert_eq!(calls[16..34], validation[..], "{calls:?}");
        let (moments, params) = (
            [g(block), g(block), g(block), g(block), g(outer), g(outer)],
            [g(block), g(block), g(outer)],
        );
        assert_eq!(calls[34..40], moments[..], "{calls:?}");
        assert_eq!(calls[40..], params[..], "{calls:?}");
    }
}

/// The fortunes packed back to back into samples of 33 tokens, documents marked.
fn packed_data() -> TrainData {
    let tok = Tokenizer::from_dir(&reference_dir("llama")).unwrap();
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample/fortunes-br.txt"),
    )
    .unwrap();
    let docs = |skip: usize, n: usize| -> Vec<Vec<u32>> {
        let d = text.split("\n%\n").skip(skip).take(n);
        d.map(|d| tok.encode_document(d).unwrap()).collect()
    };
    let train = PackedSamples::pack(&docs(0, 60), 33);
    assert!(train.starts.iter().any(|s| !s.is_empty()));
    TrainData {
        block_size: 33,
        tokenizer_hash: Some(tok.hash.clone()),
        origin: None,
        datasets: vec![TrainDataset {
            name: "packed".into(),
            weight: 1.0,
            train: Arc::new(train),
            validation: Arc::new(PackedSamples::pack(&docs(400, 12), 33)),
        }],
    }
}

/// Packed samples (documents kept apart) in every precision: fsdp on 2 ranks against
/// zero1 on 2 ranks (the same sharded AdamW in f32, one micro-batch a step), LoRA with
/// dropout: the same run to 1e-5 (on 7 Dec 2026, bit for bit in all four).
#[test]
fn fsdp_trains_packed_samples_in_every_precision() {
    for precision in ["32-true", "bf16-true", "bf16-mixed", "16-mixed"] {
        let run = |strategy: StrategyKind| {
            let dir = temp_dir();
            let mut cfg = lora(config(dir.path(), 2, 2), 0.1);
            cfg.strategy = strategy;
            cfg.precision = precision.parse().unwrap();
            cfg.max_steps = Some(6);
            pretrain_with_data(&cfg, packed_data()).unwrap();
            dir
        };
        let (zero, fsdp) = (run(StrategyKind::Zero1), run(StrategyKind::Fsdp));
        let (loss, w) = compare(zero.path(), fsdp.path());
        eprintln!("{precision}: fsdp vs zero1, packed: loss {loss:.2e}, weights {w:.2e}");
        assert!(
            loss < 1e-5 && w < 1e-5,
            "{precision}: loss {loss:e}, weights {w:e}"
        );
    }
}

/// The same with LoRA (dropout 0.25): the adapter and its moments of a 2-rank fsdp
/// run resume on 1 rank and on 4 fsdp ranks, with the same dropout masks.
#[test]
fn a_lora_checkpoint_of_two_fsdp_ranks_resumes_on_one_and_on_four() {
    let two = temp_dir();
    let mut cfg = lora(config(two.path(), 2, 2), 0.25);
    cfg.strategy = StrategyKind::Fsdp;
    pretrain_with_data(&cfg, data()).unwrap();
    for (devices, micro, strategy) in [(1, 4, StrategyKind::Ddp), (4, 1, StrategyKind::Fsdp)] {
        let (_keep, resumed) = stopped_at(two.path(), 4);
        let mut cfg = lora(config(&resumed, devices, micro), 0.25);
        cfg.strategy = strategy;
        cfg.resume = Some("auto".into());
        assert_eq!(pretrain_with_data(&cfg, data()).unwrap().steps, 10);
        assert_same(
            &format!("LoRA, 2 ranks (fsdp) resumed at step 4 on {devices} ({strategy})"),
            two.path(),
            &resumed,
        );
    }
}

/// `pretrain --strategy fsdp` from the command line, on prepared data, with LoRA: the
/// run folder names the strategy and its final checkpoint is a PEFT adapter.
#[test]
fn the_cli_trains_with_fsdp_on_cpu_threads() {
    use crate::pipeline::{lit, prepared, s};
    let root = temp_dir();
    let data = prepared(root.path());
    let run = root.path().join("run");
    let model = reference_dir("llama");
    let args = |devices: &str, steps: &str, micro: &str| -> Vec<String> {
        [
            "pretrain",
            "--data-dir",
            s(&data),
            "--checkpoint-dir",
            s(&model),
            "--out-dir",
            s(&run),
            "--device",
            "cpu",
            "--devices",
            devices,
            "--strategy",
            "fsdp",
            "--max-steps",
            steps,
            "--batch-size",
            "2",
            "--micro-batch-size",
            micro,
            "--eval-interval",
            "3",
            "--eval-max-batches",
            "1",
            "--lora-r",
            "4",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };
    let run_with = |a: Vec<String>| {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        lit(&a)
    };
    let out = run_with(args("2", "3", "1"));
    assert_eq!(out.trim(), s(&run.join("final")));
    let hp = std::fs::read_to_string(run.join("hyperparameters.toml")).unwrap();
    assert!(hp.contains("strategy = \"fsdp\""), "{hp}");
    let log = std::fs::read_to_string(run.join("train.log")).unwrap();
    assert!(log.contains("cpu × 2 ranks (fsdp)"), "{log}");
    assert!(run.join("final/adapter_model.safetensors").exists());
}

/// Tied heads, learned positions, LayerNorm biases, Conv1D weights (GPT-2) and a fused
/// query/key/value with a parallel residual (Falcon), full and LoRA on every target, the
/// head included (tied to the sharded embeddings): fsdp on 2 ranks gives 1 rank's
/// losses, and ddp's weights on 2 ranks.
///
/// Against 1 rank, a few weights move apart under ddp as much as under fsdp (7 Dec
/// 2026: up to 3.0e-5 in Falcon's second MLP output, 3.3e-4 in GPT-2's key biases,
/// whose gradient is 0 but for rounding, which AdamW turns into steps of the learning
/// rate's size whose sign depends on the order of the sums); so the weights are
/// compared with ddp's on the same ranks, the key biases left out.
#[test]
fn fsdp_handles_tied_heads_and_fused_layers() {
    for family in ["gpt2", "falcon"] {
        for lora_on in [false, true] {
            let tweak = |mut c: TrainConfig| {
                c.checkpoint_dir = reference_dir(family);
                if lora_on {
                    c = lora(c, 0.0);
                    c.lora_key = true;
                    c.lora_projection = true;
                    c.lora_head = true;
                }
                c
            };
            let mut d = data();
            d.tokenizer_hash = None;
            let one = temp_dir();
            pretrain_with_data(&tweak(config(one.path(), 1, 4)), d.clone()).unwrap();
            let run = |strategy: StrategyKind| {
                let dir = temp_dir();
                let mut cfg = tweak(config(dir.path(), 2, 2));
                cfg.strategy = strategy;
                pretrain_with_data(&cfg, d.clone()).unwrap();
                dir
            };
            let (ddp, fsdp) = (run(StrategyKind::Ddp), run(StrategyKind::Fsdp));
            let what = format!("{family} (LoRA {lora_on}), 2 ranks fsdp");
            let (loss, _) = compare(one.path(), fsdp.path());
            assert!(loss < 1e-5, "{what} vs 1 rank: losses differ by {loss:e}");
            let (loss, _) = compare(ddp.path(), fsdp.path());
            assert!(loss < 1e-5, "{what} vs ddp: losses differ by {loss:e}");
            let (a, b) = (
                weights(&ddp.path().join("final")),
                weights(&fsdp.path().join("final")),
            );
            let mut w = 0f32;
            for (k, x) in a.iter().filter(|(k, _)| !k.ends_with("attn.c_attn.bias")) {
                w = w.max(max_abs_diff(x, &b[k]));
            }
            eprintln!("{what}: losses {loss:.2e} from ddp's, weights {w:.2e}");
            assert!(w < 1e-5, "{what}: final weights differ from ddp's by {w:e}");
        }
    }
}

/// The `task/…` columns of a run's metrics.csv: each column's values by row (None
/// where the row scored no task).
fn task_columns(run: &Path) -> Vec<(String, Vec<Option<f64>>)> {
    let csv = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    header
        .iter()
        .enumerate()
        .filter(|(_, c)| c.starts_with("task/"))
        .map(|(i, c)| {
            let values = rows
                .iter()
                .map(|r| (!r[i].is_empty()).then(|| r[i].parse::<f64>().unwrap()))
                .collect();
            (c.to_string(), values)
        })
        .collect()
}

/// `--eval-tasks` under fsdp: every rank scores the tasks in lockstep (choices,
/// log-likelihoods, rolling windows and greedy generation), gathering the embeddings
/// and head once and each block for each forward; the task columns of metrics.csv are
/// those of ddp on as many ranks, and of one rank, within 1e-5, full and LoRA. One
/// fsdp rank too.
fn fsdp_scores_tasks_as_ddp(tweak: impl Fn(TrainConfig) -> TrainConfig, kind: &str) {
    let tasks = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/eval/tasks/mixed.jsonl");
    let run = |devices: usize, strategy: StrategyKind| {
        let dir = temp_dir();
        let mut cfg = tweak(config(dir.path(), devices, 2));
        cfg.strategy = strategy;
        cfg.max_steps = Some(4);
        cfg.eval_interval = 2;
        cfg.eval_max_batches = Some(1);
        cfg.eval_tasks = Some(tasks.clone());
        pretrain_with_data(&cfg, data()).unwrap();
        dir
    };
    let ddp = run(2, StrategyKind::Ddp);
    let want = task_columns(ddp.path());
    let names: Vec<&str> = want.iter().map(|(c, _)| c.as_str()).collect();
    for c in [
        "task/pt_mc/acc_norm",
        "task/pt_ll/acc",
        "task/pt_roll/word_perplexity",
        "task/pt_gen/exact_match",
    ] {
        assert!(names.contains(&c), "{names:?}");
    }
    // The model moved between the two validations: the scores did too.
    let (_, roll) = want
        .iter()
        .find(|(c, _)| c == "task/pt_roll/word_perplexity")
        .unwrap();
    let roll: Vec<f64> = roll.iter().flatten().copied().collect();
    assert!(roll.len() == 2 && roll[0] != roll[1], "{kind}: {roll:?}");
    for (devices, strategy) in [
        (2, StrategyKind::Fsdp),
        (1, StrategyKind::Fsdp),
        (1, StrategyKind::Ddp),
    ] {
        let got = run(devices, strategy);
        let log = std::fs::read_to_string(got.path().join("train.log")).unwrap();
        assert!(log.contains("step 4: tasks ("), "{log}");
        let got = task_columns(got.path());
        assert_eq!(got.len(), want.len());
        let mut worst = 0f64;
        for ((c, a), (d, b)) in want.iter().zip(&got) {
            assert_eq!(c, d);
            assert_eq!(a.len(), b.len(), "{c}");
            assert_eq!(a.iter().flatten().count(), 2, "{c}: {a:?}");
            for (x, y) in a.iter().zip(b) {
                assert_eq!(x.is_some(), y.is_some(), "{c}: {a:?} vs {b:?}");
                if let (Some(x), Some(y)) = (x, y) {
                    let rel = (x - y).abs() / x.abs().max(1e-12);
                    assert!(
                        rel < 1e-5 || (x - y).abs() < 1e-9,
                        "{kind}, {c}, {devices} ranks ({strategy}): {y} vs ddp's {x}"
                    );
                    worst = worst.max(rel);
                }
            }
        }
        eprintln!(
            "{kind}: tasks on {devices} ranks ({strategy}) vs 2 ddp ranks: largest relative difference {worst:.2e}"
        );
    }
}

#[test]
fn fsdp_scores_downstream_tasks_as_ddp_does_full() {
    fsdp_scores_tasks_as_ddp(|c| c, "full");
}

#[test]
fn fsdp_scores_downstream_tasks_as_ddp_does_lora() {
    fsdp_scores_tasks_as_ddp(|c| lora(c, 0.25), "LoRA (dropout 0.25)");
}

/// An fsdp model (2 thread ranks, shards of the tiny LLaMA) scores and generates
/// through [`Fsdp::infer`](lit_claire::train::fsdp::Fsdp::infer), each block gathered
/// for each forward: scores (plain, and after a KV cache) and greedy tokens are the
/// whole model's on every rank.
#[test]
fn fsdp_scores_and_generates_as_the_whole_model() {
    use lit_claire::generate::{Sampling, generate, generate_with};
    use lit_claire::model::engine::{self, KvCache};
    use lit_claire::model::weights::Weights;
    use lit_claire::model::{BuildOptions, build_model, build_model_by_block};
    use lit_claire::train::adamw::AdamWConfig;
    use lit_claire::train::fsdp::FsdpBuilder;

    let dir = reference_dir("llama");
    let cfg = lit_claire::config::load_config(&dir).unwrap();
    let weights = Weights::open(&dir).unwrap();
    let opts = BuildOptions {
        dtype: candle_core::DType::F32,
        compute_dtype: candle_core::DType::F32,
        device: candle_core::Device::Cpu,
        trainable: true,
    };
    let prompt: Vec<u32> = vec![1, 17, 40, 9, 33, 2, 71];
    let ids = Tensor::new(prompt.as_slice(), &candle_core::Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let targets: Vec<u32> = prompt.iter().map(|t| (t * 7 + 3) % 100).collect();
    let head = ids.narrow(1, 0, 4).unwrap();
    let tail = ids.narrow(1, 4, 3).unwrap();
    // What a run computes: scores, scores after a prefilled cache, greedy tokens.
    type Out = (Vec<f32>, Vec<f32>, Vec<u32>);
    let compute = |m: &mut engine::Infer<'_>| -> lit_claire::error::Result<Out> {
        let plain = m.score(&ids, None, &targets)?.nll;
        let mut cache = KvCache::new(m.n_layer());
        m.prefill(&head, &mut cache)?;
        let after = m.score_after(&tail, &mut cache, &targets[4..])?.nll;
        let sampling = Sampling::default();
        let generated = generate_with(m, &prompt, 12, &sampling, &[], |_| Ok(true))?;
        Ok((plain, after, generated.new_ids))
    };
    let whole = build_model(&cfg, &weights, &opts).unwrap().model;
    let want = compute(&mut engine::Infer::whole(&whole)).unwrap();
    let sampling = Sampling::default();
    let plain = generate(&whole, &prompt, 12, &sampling, &[], |_| Ok(true)).unwrap();
    assert_eq!(plain.new_ids, want.2);
    assert_eq!(want.2.len(), 12);

    let group = ThreadGroup::new(2, Duration::from_secs(60));
    let outs: Vec<Out> = std::thread::scope(|s| {
        let hs: Vec<_> = group
            .handles()
            .into_iter()
            .map(|c| {
                let (cfg, weights, opts, compute) = (&cfg, &weights, &opts, &compute);
                s.spawn(move || {
                    let st = Strategy::cpu().with_collective(c, StrategyKind::Fsdp);
                    let mut builder = FsdpBuilder::new(&st);
                    let mut on_block = |blk, vars| builder.shard_block(blk, vars);
                    let tm = build_model_by_block(cfg, weights, opts, Some(&mut on_block)).unwrap();
                    let mut f = builder
                        .finish(tm.model, tm.vars, AdamWConfig::default())
                        .unwrap();
                    f.infer(|m| compute(m)).unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (rank, (plain, after, tokens)) in outs.iter().enumerate() {
        assert_eq!(tokens, &want.2, "rank {rank}: generated tokens");
        for (got, exp, what) in [
            (plain, &want.0, "scores"),
            (after, &want.1, "scores after a cache"),
        ] {
            assert_eq!(got.len(), exp.len());
            let d = got
                .iter()
                .zip(exp)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(d < 1e-5, "rank {rank}: {what} differ by {d}");
        }
    }
}

/// A rank's collective whose queued reductions ([`Collective::all_reduce_queued`],
/// [`Collective::reduce_scatter_queued`]) hold NaN until they are waited for, as a
/// result on NCCL's side stream is unwritten until candle's stream waits for it: a
/// read before the wait would spread NaN into the losses and weights.
struct LateResults {
    inner: Arc<dyn Collective>,
    queued: AtomicUsize,
}

/// The value a [`LateResults`] reduction writes when it is waited for.
struct Late {
    var: Var,
    value: Option<Tensor>,
}

impl Ready for Late {
    fn wait(&mut self) -> Result<()> {
        if let Some(v) = self.value.take() {
            self.var.set(&v)?;
        }
        Ok(())
    }
}

impl LateResults {
    fn late(&self, result: Tensor) -> Result<Pending> {
        self.queued.fetch_add(1, Ordering::Relaxed);
        let var = Var::from_tensor(&result.ones_like()?.affine(0.0, f64::NAN)?)?;
        Ok(Pending::new(
            var.as_tensor().detach(),
            Box::new(Late {
                var,
                value: Some(result),
            }),
        ))
    }
}

impl Collective for LateResults {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_reduce(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        self.inner.all_reduce(x, op)
    }
    fn reduce_scatter(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        self.inner.reduce_scatter(x, op)
    }
    fn all_reduce_queued(&self, x: &Tensor, op: ReduceOp) -> Result<Pending> {
        self.late(self.inner.all_reduce(x, op)?)
    }
    fn reduce_scatter_queued(&self, x: &Tensor, op: ReduceOp) -> Result<Pending> {
        self.late(self.inner.reduce_scatter(x, op)?)
    }
    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        self.inner.all_gather(x)
    }
    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        self.inner.broadcast(x, root)
    }
    fn barrier(&self) -> Result<()> {
        self.inner.barrier()
    }
    fn abort(&self, reason: &str) {
        self.inner.abort(reason)
    }
}

/// ddp's and fsdp's backward read their queued gradient reductions only after waiting
/// for them: with results that are NaN until then, 2 ranks (2 micro-batches a step)
/// give the losses and weights of the same ranks with results there at once.
#[test]
fn queued_gradient_reductions_are_read_only_after_their_wait() {
    for strategy in [StrategyKind::Ddp, StrategyKind::Fsdp] {
        let at_once = temp_dir();
        let mut cfg = config(at_once.path(), 2, 1);
        cfg.strategy = strategy;
        pretrain_with_data(&cfg, data()).unwrap();
        let late = temp_dir();
        let mut cfg = config(late.path(), 2, 1);
        cfg.strategy = strategy;
        let group = ThreadGroup::new(2, Duration::from_secs(60));
        let ranks: Vec<Arc<LateResults>> = group
            .handles()
            .into_iter()
            .map(|inner| {
                Arc::new(LateResults {
                    inner,
                    queued: AtomicUsize::new(0),
                })
            })
            .collect();
        std::thread::scope(|s| {
            for r in &ranks {
                let c: Arc<dyn Collective> = r.clone();
                let st = Strategy::cpu().with_collective(c, strategy);
                let cfg = &cfg;
                s.spawn(move || {
                    Trainer::on_rank(cfg, data(), st)
                        .unwrap()
                        .run(None)
                        .unwrap();
                });
            }
        });
        for r in &ranks {
            // Every step: each block's gradients (and fsdp's outer unit's).
            assert!(r.queued.load(Ordering::Relaxed) >= 20, "{strategy}");
        }
        assert_same(
            &format!("{strategy}, queued results late"),
            at_once.path(),
            late.path(),
        );
    }
}
