//! Data parallelism on CPU threads: 2 ranks are the same computation as 1 rank with
//! the same global batch (full and LoRA, `ddp` and `zero1`); a checkpoint written by 2
//! ranks resumes on 1 and on 4; a rank that dies, fails or sees a NaN stops every rank
//! with a message naming it, and nothing half-written is left behind.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use lit_claire::error::{Error, Result};
use lit_claire::strategy::threads::ThreadGroup;
use lit_claire::strategy::{Collective, ReduceOp, StrategyKind};
use lit_claire::tokenizer::Tokenizer;
use lit_claire::train::batches::{TrainData, TrainDataset};
use lit_claire::train::ranks::train_threads;
use lit_claire::train::{TrainConfig, pretrain_with_data};

use crate::common::*;

use crate::trainer::corpus_samples;

/// Two datasets, one of them of shorter (padded) samples: 28 draws an epoch, so 10
/// steps of global batch 4 cross an epoch boundary.
pub(crate) fn data() -> TrainData {
    let tok = Tokenizer::from_dir(&reference_dir("llama")).unwrap();
    TrainData {
        block_size: 33,
        tokenizer_hash: Some(tok.hash),
        origin: None,
        datasets: vec![
            TrainDataset {
                name: "fortunes".into(),
                weight: 1.0,
                train: Arc::new(corpus_samples(33, 24, 0)),
                validation: Arc::new(corpus_samples(33, 4, 400)),
            },
            TrainDataset {
                name: "short".into(),
                weight: 0.5,
                train: Arc::new(corpus_samples(13, 8, 200)),
                validation: Arc::new(corpus_samples(13, 2, 500)),
            },
        ],
    }
}

/// 10 steps of a global batch of 4 samples: `devices` ranks of `4 / devices` samples,
/// `micro` samples per forward pass.
pub(crate) fn config(out: &Path, devices: usize, micro: usize) -> TrainConfig {
    TrainConfig {
        data_dir: "in-memory".into(),
        checkpoint_dir: reference_dir("llama"),
        out_dir: out.to_path_buf(),
        devices,
        micro_batch_size: micro,
        batch_size: 4 / devices,
        max_steps: Some(10),
        learning_rate: 3e-3,
        min_lr: 3e-4,
        warmup_steps: 2,
        eval_interval: 5,
        save_interval: 4,
        collective_timeout: 60,
        ..Default::default()
    }
}

pub(crate) fn lora(mut cfg: TrainConfig, dropout: f64) -> TrainConfig {
    cfg.lora_r = 4;
    cfg.lora_alpha = 8.0;
    // A sample's dropout masks depend on the seed, step, sample and layer alone, so
    // even with dropout, ranks and micro-batches do not change the computation.
    cfg.lora_dropout = dropout;
    cfg.lora_mlp = true;
    cfg
}

/// `(step, loss, val_loss)` rows of `metrics.csv`.
pub(crate) fn rows(run: &Path) -> Vec<(usize, f64, Option<f64>)> {
    std::fs::read_to_string(run.join("metrics.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let c: Vec<&str> = l.split(',').collect();
            (
                c[0].parse().unwrap(),
                c[3].parse().unwrap(),
                c[8].parse().ok(),
            )
        })
        .collect()
}

/// The trained tensors of a checkpoint (the model, or the adapter).
pub(crate) fn weights(ck: &Path) -> HashMap<String, Vec<f32>> {
    let file = ["model.safetensors", "adapter_model.safetensors"]
        .iter()
        .map(|f| ck.join(f))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("no weights in {}", ck.display()));
    candle_core::safetensors::load(file, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, t)| {
            let t = t.to_dtype(candle_core::DType::F32).unwrap();
            (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        })
        .collect()
}

/// Largest relative difference of the losses (train and validation) of two runs, and
/// largest absolute difference of their final weights; the runs must have the same rows.
pub(crate) fn compare(a: &Path, b: &Path) -> (f64, f32) {
    let (ra, rb) = (rows(a), rows(b));
    assert_eq!(ra.len(), rb.len(), "{ra:?}\n{rb:?}");
    let rel = |x: f64, y: f64| (x - y).abs() / x.abs().max(1e-12);
    let mut loss = 0f64;
    for (x, y) in ra.iter().zip(&rb) {
        assert_eq!(x.0, y.0);
        loss = loss.max(rel(x.1, y.1));
        assert_eq!(x.2.is_some(), y.2.is_some(), "step {}", x.0);
        if let (Some(u), Some(v)) = (x.2, y.2) {
            loss = loss.max(rel(u, v));
        }
    }
    let (wa, wb) = (weights(&a.join("final")), weights(&b.join("final")));
    assert_eq!(wa.len(), wb.len());
    let mut w = 0f32;
    for (k, x) in &wa {
        w = w.max(max_abs_diff(x, &wb[k]));
    }
    (loss, w)
}

pub(crate) fn assert_same(what: &str, a: &Path, b: &Path) {
    let (loss, w) = compare(a, b);
    eprintln!("{what}: max relative loss difference {loss:.2e}, max weight difference {w:.2e}");
    assert!(loss < 1e-5, "{what}: losses differ by {loss:e} (relative)");
    assert!(w < 1e-5, "{what}: final weights differ by {w:e}");
}

/// 1 rank × micro-batch 4 against 2 ranks × micro-batch 2, with ddp and zero1
/// (`lora_dropout`: None for full training); returns the 1-rank run.
fn two_ranks_are_one_rank(lora_dropout: Option<f64>) -> tempfile::TempDir {
    let lora_on = lora_dropout.is_some();
    let kind = match lora_dropout {
        None => "full".to_string(),
        Some(p) => format!("LoRA (dropout {p})"),
    };
    let tweak = |c: TrainConfig| match lora_dropout {
        Some(p) => lora(c, p),
        None => c,
    };
    let one = temp_dir();
    let s = pretrain_with_data(&tweak(config(one.path(), 1, 4)), data()).unwrap();
    assert_eq!(s.steps, 10);
    // The runs move the weights far enough for a difference to show.
    let moved = weights(&one.path().join("final"))
        .iter()
        .filter(|(k, _)| !lora_on || k.contains("lora_B"))
        .map(|(_, w)| w.iter().fold(0f32, |m, x| m.max(x.abs())))
        .fold(0f32, f32::max);
    assert!(moved > 1e-3, "{kind}: {moved}");
    for strategy in [StrategyKind::Ddp, StrategyKind::Zero1] {
        let two = temp_dir();
        let mut cfg = tweak(config(two.path(), 2, 2));
        cfg.strategy = strategy;
        let s = pretrain_with_data(&cfg, data()).unwrap();
        assert_eq!(s.final_checkpoint, Some(two.path().join("final")));
        assert_same(
            &format!("{kind}, 2 ranks {strategy} vs 1 rank"),
            one.path(),
            two.path(),
        );
        // Rank 0 alone wrote the run folder; every checkpoint is complete.
        let log = std::fs::read_to_string(two.path().join("train.log")).unwrap();
        assert!(
            log.contains(&format!("cpu × 2 ranks ({strategy})")),
            "{log}"
        );
        assert_eq!(log.matches("starting").count(), 1, "{log}");
        for ck in ["step-00000004", "step-00000008", "final"] {
            assert!(two.path().join(ck).join("optimizer.safetensors").exists());
        }
        assert_no_partial_files(two.path());
    }
    one
}

#[test]
fn two_ranks_give_the_losses_and_weights_of_one_full() {
    two_ranks_are_one_rank(None);
}

#[test]
fn two_ranks_give_the_losses_and_weights_of_one_lora() {
    two_ranks_are_one_rank(Some(0.0));
}

/// Issue 10: dropout masks were drawn per rank, so 2 ranks × m and 1 rank × 2m were
/// only statistically equal with LoRA dropout on.
#[test]
fn two_ranks_give_the_losses_and_weights_of_one_lora_with_dropout() {
    let one = two_ranks_are_one_rank(Some(0.25));
    // The dropout did something: the losses are not those of a run without it.
    let plain = temp_dir();
    pretrain_with_data(&lora(config(plain.path(), 1, 4), 0.0), data()).unwrap();
    let (loss, _) = compare(one.path(), plain.path());
    assert!(loss > 1e-4, "dropout changed the losses by only {loss:e}");
    // Stopped at step 4 and resumed on 2 ranks: the same masks, the same run.
    let (_keep, resumed) = stopped_at(one.path(), 4);
    let mut cfg = lora(config(&resumed, 2, 1), 0.25);
    cfg.resume = Some("auto".into());
    assert_eq!(pretrain_with_data(&cfg, data()).unwrap().steps, 10);
    assert_same(
        "LoRA with dropout, resumed at step 4 on 2 ranks",
        one.path(),
        &resumed,
    );
}

pub(crate) fn assert_no_partial_files(run: &Path) {
    for e in std::fs::read_dir(run).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().to_string();
        assert!(
            !name.starts_with(".tmp-"),
            "{name} left in {}",
            run.display()
        );
    }
}

/// `run`'s files up to checkpoint `step`, copied into a fresh folder, as a run stopped
/// there would have left them.
pub(crate) fn stopped_at(run: &Path, step: usize) -> (tempfile::TempDir, PathBuf) {
    let dir = temp_dir();
    let name = format!("step-{step:08}");
    let to = dir.path().join(&name);
    std::fs::create_dir_all(&to).unwrap();
    for e in std::fs::read_dir(run.join(&name)).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
    for f in ["hyperparameters.toml", "metrics.csv", "train.log"] {
        std::fs::copy(run.join(f), dir.path().join(f)).unwrap();
    }
    let path = dir.path().to_path_buf();
    (dir, path)
}

#[test]
fn a_checkpoint_of_two_ranks_resumes_on_one_and_on_four() {
    // Written by 2 ranks with sharded optimizer state...
    let two = temp_dir();
    let mut cfg = config(two.path(), 2, 2);
    cfg.strategy = StrategyKind::Zero1;
    pretrain_with_data(&cfg, data()).unwrap();
    // ...it resumes on 1 rank (batch 4) and on 4 ranks (batch 1, ddp): the same
    // global batch, the same continuation.
    for (devices, micro) in [(1, 2), (4, 1)] {
        let (_keep, resumed) = stopped_at(two.path(), 4);
        let mut cfg = config(&resumed, devices, micro);
        cfg.resume = Some("auto".into());
        let s = pretrain_with_data(&cfg, data()).unwrap();
        assert_eq!(s.steps, 10);
        let log = std::fs::read_to_string(resumed.join("train.log")).unwrap();
        assert!(log.contains("resuming"), "{log}");
        assert_same(
            &format!("2 ranks (zero1) resumed at step 4 on {devices}"),
            two.path(),
            &resumed,
        );
    }
}

/// What a test does to one rank.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    /// After `n` calls the rank is gone: it never arrives again, and tells no one.
    Dies,
    /// After `n` calls the rank gets an error of its own.
    Fails,
    /// The first all-gather of one value (the step's loss) carries a NaN.
    Nan,
    /// After `n` calls the rank issues one all-reduce of one value that the others
    /// do not (a collective under `if rank == 1`).
    Extra,
}

/// A rank's collective with a fault injected.
struct Faulty {
    inner: Arc<dyn Collective>,
    group: ThreadGroup,
    fault: Fault,
    after: usize,
    calls: AtomicUsize,
}

impl Faulty {
    /// Whether this call is after the fault; a dead rank waits until the others have
    /// given up on it (a thread cannot vanish like a process).
    fn gone(&self) -> Result<()> {
        if self.fault == Fault::Nan || self.calls.fetch_add(1, Ordering::SeqCst) < self.after {
            return Ok(());
        }
        if self.fault == Fault::Extra {
            if self.calls.load(Ordering::SeqCst) == self.after + 1 {
                let one = Tensor::new(&[1f64], &Device::Cpu)?;
                self.inner.all_reduce(&one, ReduceOp::Sum)?;
            }
            return Ok(());
        }
        if self.fault == Fault::Dies {
            while self.group.failure().is_none() {
                std::thread::sleep(Duration::from_millis(10));
            }
            return Err(Error::Msg("killed".into()));
        }
        Err(Error::Msg("disk full".into()))
    }
}

impl Collective for Faulty {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_reduce(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        self.gone()?;
        self.inner.all_reduce(x, op)
    }
    fn reduce_scatter(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        self.gone()?;
        self.inner.reduce_scatter(x, op)
    }
    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        self.gone()?;
        if self.fault == Fault::Nan
            && x.elem_count() == 1
            && self.calls.fetch_add(1, Ordering::SeqCst) == self.after
        {
            return self.inner.all_gather(&(x * f64::NAN)?);
        }
        self.inner.all_gather(x)
    }
    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        self.gone()?;
        self.inner.broadcast(x, root)
    }
    fn barrier(&self) -> Result<()> {
        self.gone()?;
        self.inner.barrier()
    }
    fn end_step(&self, step: u64) -> Result<()> {
        self.gone()?;
        self.inner.end_step(step)
    }
    fn abort(&self, reason: &str) {
        // The dead tell no one.
        if self.fault != Fault::Dies {
            self.inner.abort(reason)
        }
    }
}

/// A 2-rank full run (timeout `timeout_s`) whose rank 1 suffers `fault` after `after`
/// calls; returns the error and how long the run took.
fn faulty_run(dir: &Path, fault: Fault, after: usize, timeout_s: u64) -> (String, Duration) {
    let mut cfg = config(dir, 2, 2);
    cfg.collective_timeout = timeout_s;
    let group = ThreadGroup::new(2, Duration::from_secs(timeout_s));
    let mut handles = group.handles();
    handles[1] = Arc::new(Faulty {
        inner: handles[1].clone(),
        group: group.clone(),
        fault,
        after,
        calls: AtomicUsize::new(0),
    });
    let t0 = Instant::now();
    let e = train_threads(&cfg, data(), handles)
        .unwrap_err()
        .to_string();
    eprintln!(
        "{fault:?} after {after} calls: {e} ({:.1} s)",
        t0.elapsed().as_secs_f64()
    );
    (e, t0.elapsed())
}

#[test]
fn a_killed_rank_stops_the_others_within_the_timeout() {
    let dir = temp_dir();
    // Rank 1 dies in the middle of the run (after a checkpoint or two).
    let (e, took) = faulty_run(dir.path(), Fault::Dies, 20, 2);
    assert!(
        e.starts_with("rank 0 failed:")
            && e.contains("timed out")
            && e.contains("waiting for rank 1"),
        "{e}"
    );
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert!(!e.contains('\n'), "{e}");
    assert_no_partial_files(dir.path());
    // Every checkpoint it left is complete, and the run resumes from the newest.
    let mut cfg = config(dir.path(), 2, 2);
    cfg.resume = Some("auto".into());
    assert_eq!(pretrain_with_data(&cfg, data()).unwrap().steps, 10);

    // A rank that never shows up at all (a rendezvous that times out).
    let dir = temp_dir();
    let (e, _) = faulty_run(dir.path(), Fault::Dies, 0, 1);
    assert!(e.contains("waiting for rank 1"), "{e}");
}

#[test]
fn a_failing_rank_stops_the_others_with_its_reason() {
    let dir = temp_dir();
    let (e, took) = faulty_run(dir.path(), Fault::Fails, 20, 60);
    // The step depends on how many collectives a step makes (the 20th call fails).
    assert!(
        e.starts_with("rank 1 failed: step ") && e.ends_with(": disk full"),
        "{e}"
    );
    // No waiting for the timeout: the others were told.
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert_no_partial_files(dir.path());
}

#[test]
fn a_nan_on_one_rank_stops_every_rank_naming_it() {
    let dir = temp_dir();
    // The third step's loss on rank 1 is NaN.
    let (e, _) = faulty_run(dir.path(), Fault::Nan, 2, 60);
    assert!(
        e.starts_with("step 3:") && e.contains("NaN on rank 1") && e.contains("--resume auto"),
        "{e}"
    );
    assert_no_partial_files(dir.path());
    // The weights were not updated with it: nothing but complete checkpoints exist.
    assert!(!dir.path().join("final").exists());
}

/// Issue 26: a planted extra all-reduce on rank 1 stops both ranks with one line
/// naming the rank, the collective where the two records part, and the step; nothing
/// half-written is left.
#[test]
fn a_planted_extra_all_reduce_stops_the_run_naming_the_rank_and_the_step() {
    let dir = temp_dir();
    let (e, took) = faulty_run(dir.path(), Fault::Extra, 20, 60);
    assert!(
        e.contains("ranks out of step: rank 1 and rank 0 issued different collectives: rank 1's collective #")
            && e.contains("was all_reduce (sum) of 1 f64, where rank 0's was"),
        "{e}"
    );
    assert!(e.contains("(after step "), "{e}");
    assert!(!e.contains('\n'), "{e}");
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert_no_partial_files(dir.path());
}

#[test]
fn setups_data_parallel_cannot_do_are_refused_before_any_work() {
    let dir = temp_dir();
    let mut cfg = config(dir.path(), 2, 2);
    cfg.num_nodes = 2;
    let e = pretrain_with_data(&cfg, data()).unwrap_err().to_string();
    assert!(
        e.contains("--num-nodes 2") && e.contains("--devices"),
        "{e}"
    );
    // A user error found on rank 0 reaches the caller once, naming the rank.
    let mut cfg = config(dir.path(), 2, 2);
    cfg.batch_size = 64;
    let e = pretrain_with_data(&cfg, data()).unwrap_err().to_string();
    assert!(e.contains("fewer than one batch"), "{e}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn the_cli_trains_on_cpu_threads() {
    use crate::pipeline::{lit, prepared, s};
    let root = temp_dir();
    let data = prepared(root.path());
    let run = root.path().join("run");
    let model = reference_dir("llama");
    let out = lit(&[
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
        "2",
        "--strategy",
        "zero1",
        "--max-steps",
        "3",
        "--batch-size",
        "2",
        "--micro-batch-size",
        "1",
        "--eval-interval",
        "3",
        "--eval-max-batches",
        "1",
    ]);
    assert_eq!(out.trim(), s(&run.join("final")));
    assert_eq!(rows(&run).len(), 3);
    let hp = std::fs::read_to_string(run.join("hyperparameters.toml")).unwrap();
    assert!(
        hp.contains("strategy = \"zero1\"") && hp.contains("devices = 2"),
        "{hp}"
    );
    let log = std::fs::read_to_string(run.join("train.log")).unwrap();
    assert!(
        log.contains("cpu × 2 ranks (zero1)") && log.contains("steps of 4 samples"),
        "{log}"
    );
}

/// Issue 26: `pretrain --device cpu` started as two processes by a launcher (torchrun's
/// variables) ignored them, and both trained alone into the same run folder. Each
/// process now stops with one line naming the variables and the fix, before it
/// writes anything.
#[test]
fn issue26_cpu_processes_started_by_a_launcher_are_refused() {
    use crate::pipeline::{prepared, s};
    let root = temp_dir();
    let data = prepared(root.path());
    let run = root.path().join("run");
    let model = reference_dir("llama");
    let children: Vec<_> = (0..2)
        .map(|rank| {
            std::process::Command::new(bin())
                .args(["pretrain", "--data-dir", s(&data), "--checkpoint-dir"])
                .args([s(&model), "--out-dir", s(&run), "--device", "cpu"])
                .args([
                    "--max-steps",
                    "1",
                    "--batch-size",
                    "2",
                    "--micro-batch-size",
                    "1",
                ])
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", "2")
                .env("LOCAL_RANK", rank.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", "29500")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (rank, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "rank {rank} trained: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(
            err.contains(&format!(
                "RANK={rank} WORLD_SIZE=2 (torchrun): this process is one of 2"
            )) && err.contains("--device cpu --devices 2"),
            "{err}"
        );
    }
    assert!(!run.exists(), "a refused process wrote {}", run.display());
}
