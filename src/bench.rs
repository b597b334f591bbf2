//! `lit-claire bench`: training and inference throughput on a synthetic model.
//!
//! Builds a LLaMA-shaped model with random weights (no download), runs a few warm-up
//! steps, then times training steps (full or LoRA) or a forward pass, and reports
//! tokens/s and model FLOP utilisation: achieved FLOP/s over the machine's measured
//! dense f32 matmul peak. A training step costs `3 × forward` FLOPs
//! ([`Config::flops_per_token`]); LoRA skips the weight gradients of frozen matrices,
//! so its work is about `2 × forward` — we report MFU with the `3×` convention, as
//! PaLM and Lit-GPT do, and say so.

mod attention;

pub use attention::{
    AttentionAgreement, AttentionReport, AttentionShape, AttentionTiming, attention_check,
};

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::config::Config;
use crate::config::families::parse_config;
use crate::error::{Error, Result};
use crate::lora::{LoraConfig, LoraTargets};
use crate::model::build_model;
use crate::model::weights::TensorSource;
use crate::strategy::Strategy;
use crate::train::adamw::{AdamW, AdamWConfig};
use crate::train::batches::Batch;
use crate::train::step::StepRunner;

/// Tensors drawn at random: norms 1, everything else N(0, std²)-like (uniform).
pub struct RandomSource {
    pub seed: u64,
    pub std: f32,
}

impl TensorSource for RandomSource {
    fn tensor(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let is_norm = name.contains("norm") || name.contains("ln_");
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ fxhash(name));
        let bound = self.std * 3f32.sqrt();
        let v: Vec<f32> = if is_norm && name.ends_with("weight") {
            vec![1.0; n]
        } else {
            (0..n).map(|_| rng.random_range(-bound..bound)).collect()
        };
        Ok(Tensor::from_vec(v, shape, device)?.to_dtype(dtype)?)
    }

    fn contains(&self, _name: &str) -> bool {
        true
    }
}

fn fxhash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Shape of the synthetic LLaMA.
#[derive(Debug, Clone, Serialize)]
pub struct BenchShape {
    pub layers: usize,
    pub width: usize,
    pub heads: usize,
    /// Key/value heads (GQA when fewer than `heads`).
    pub kv_heads: usize,
    /// MLP width.
    pub intermediate: usize,
    pub vocab: usize,
    pub seq: usize,
    pub batch: usize,
}

/// The flags among `counts` that are zero, in one problem ("--a, --b must be at least
/// 1"); `--kv-heads` defaults to `--heads`, so a zero there is `--heads`' alone.
fn zero_counts(counts: &[(&str, usize)], heads: usize) -> Option<String> {
    let zero: Vec<&str> = counts
        .iter()
        .filter(|c| c.1 == 0 && !(c.0 == "--kv-heads" && heads == 0))
        .map(|c| c.0)
        .collect();
    (!zero.is_empty()).then(|| format!("{} must be at least 1", zero.join(", ")))
}

impl BenchShape {
    /// The default MLP width of a `width`-wide bench model (as `utils/bench_torch.py`).
    pub fn default_intermediate(width: usize) -> usize {
        width * 8 / 3 / 64 * 64
    }

    /// Every problem with the shape's flags, in one message naming them, before any
    /// allocation: each count at least 1, heads that split the width into even head
    /// sizes (rotary turns pairs) and share key/value heads evenly, token ids that fit
    /// a u32, and a model of at most [`crate::config::families::MAX_PARAMS`] parameters.
    pub fn check(&self) -> Result<()> {
        let mut problems = Vec::new();
        let counts = [
            ("--layers", self.layers),
            ("--width", self.width),
            ("--heads", self.heads),
            ("--kv-heads", self.kv_heads),
            ("--vocab", self.vocab),
            ("--seq", self.seq),
            ("--batch", self.batch),
        ];
        problems.extend(zero_counts(&counts, self.heads));
        if self.intermediate == 0 {
            problems.push(format!(
                "--intermediate must be at least 1 (its default, --width · 8/3 rounded down to a multiple of 64, is 0 for --width {})",
                self.width
            ));
        }
        if self.heads > 0 && self.width % self.heads != 0 {
            problems.push(format!(
                "--width {} is not a multiple of --heads {}",
                self.width, self.heads
            ));
        } else if self.heads > 0 && (self.width / self.heads) % 2 != 0 {
            problems.push(format!(
                "--width {} / --heads {} is a head size of {}: it must be even (rotary embeddings turn pairs of dimensions)",
                self.width,
                self.heads,
                self.width / self.heads
            ));
        }
        if self.kv_heads > 0 && self.heads % self.kv_heads != 0 {
            problems.push(format!(
                "--kv-heads {} must divide --heads {}",
                self.kv_heads, self.heads
            ));
        }
        let max_layers = crate::config::families::MAX_LAYERS;
        if self.layers as u64 > max_layers {
            problems.push(format!(
                "--layers {} is more than any model has (at most {max_layers})",
                self.layers
            ));
        }
        if self.vocab as u64 > u64::from(u32::MAX) {
            problems.push(format!(
                "--vocab {} is more than token ids (u32) can number",
                self.vocab
            ));
        }
        if !problems.is_empty() {
            return Err(Error::Usage(problems.join("; ")));
        }
        self.config().map(|_| ()).map_err(|e| {
            Error::Usage(format!(
                "the bench model (--width, --intermediate, --vocab, --layers): {e}"
            ))
        })
    }

    pub fn config(&self) -> Result<Config> {
        parse_config(&serde_json::json!({
            "model_type": "llama",
            "vocab_size": self.vocab,
            "hidden_size": self.width,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "max_position_embeddings": self.seq.max(256),
        }))
    }
}

/// What a benchmark measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub mode: String,
    pub shape: BenchShape,
    pub precision: crate::strategy::Precision,
    pub params: usize,
    pub steps: usize,
    pub tokens_per_s: f64,
    pub achieved_gflops: f64,
    pub peak_gflops: f64,
    pub mfu: f64,
    /// Peak resident memory of the process so far (VmHWM), MB: one mode per process
    /// gives that mode's peak.
    pub peak_rss_mb: f64,
    /// Activation checkpointing: every k-th block (0: none).
    pub checkpoint_every: usize,
    /// Wall time of the timed steps.
    pub seconds: f64,
    /// Where that time went (with `--profile`), largest first: thread time, summed
    /// over the parts of a micro-batch when they run at once (`parts`).
    pub profile: Vec<crate::model::engine::profile::Row>,
    /// Parts each micro-batch is split into, one core each ([`StepRunner::parts`]).
    pub parts: usize,
    /// The planned memory of this run (`pretrain --dry-run`'s total), MB.
    pub estimate_mb: f64,
}

/// Dense f32 (or `dtype`) matmul throughput of `n × n` matrices, GFLOP/s (best of a few).
pub fn matmul_gflops(n: usize, dtype: DType, device: &Device) -> Result<f64> {
    let a = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(dtype)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(dtype)?;
    let _ = a.matmul(&b)?;
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let c = a.matmul(&b)?;
        c.device().synchronize()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n as f64).powi(3) / best / 1e9)
}

/// LoRA of rank `r` (alpha 2r, no dropout) on `targets`, a comma-separated list of
/// `q`, `k`, `v`, `o`, `mlp` (the names `utils/bench_torch.py` takes).
pub fn bench_lora(r: usize, targets: &str) -> Result<LoraConfig> {
    let mut t = LoraTargets {
        query: false,
        key: false,
        value: false,
        projection: false,
        mlp: false,
        head: false,
    };
    for name in targets.split(',').map(str::trim) {
        match name {
            "q" => t.query = true,
            "k" => t.key = true,
            "v" => t.value = true,
            "o" => t.projection = true,
            "mlp" => t.mlp = true,
            _ => {
                return Err(Error::Usage(format!(
                    "--lora-targets: unknown target {name:?}; use a comma-separated list of q, k, v, o, mlp"
                )));
            }
        }
    }
    if r == 0 || !t.any() {
        return Err(Error::Usage(
            "--lora-r must be positive and --lora-targets name at least one of q, k, v, o, mlp"
                .into(),
        ));
    }
    Ok(LoraConfig {
        r,
        alpha: 2.0 * r as f64,
        dropout: 0.0,
        targets: t,
        rslora: false,
    })
}

/// A step runner for the synthetic model: full fine-tuning (`lora` None), or LoRA
/// (the default bench: r 16 on every projection and the MLP, as `utils/bench_torch.py`).
pub fn bench_runner(
    shape: &BenchShape,
    strategy: &Strategy,
    lora: Option<&LoraConfig>,
) -> Result<StepRunner> {
    let cfg = shape.config()?;
    let tm = build_model(
        &cfg,
        &RandomSource { seed: 1, std: 0.02 },
        &strategy.build_options(lora.is_none()),
    )?;
    let mut model = tm.model;
    let vars = match lora {
        Some(l) => crate::lora::attach_new(&mut model, l, 0)?,
        None => tm.vars,
    };
    let mut runner = StepRunner::new(
        model,
        AdamW::new(vars, AdamWConfig::default())?.into(),
        strategy.clone(),
    );
    runner.grad_clip = Some(1.0);
    Ok(runner)
}

/// The planned memory ([`crate::train::estimate`]) of the benchmark's run, to set
/// beside its measured peak.
pub fn bench_estimate(
    shape: &BenchShape,
    strategy: &Strategy,
    lora: Option<&LoraConfig>,
    checkpoint_every: usize,
) -> Result<crate::train::estimate::MemoryEstimate> {
    let mut cfg = crate::train::TrainConfig {
        micro_batch_size: shape.batch,
        batch_size: shape.batch,
        precision: strategy.precision,
        activation_checkpointing: checkpoint_every,
        lora_r: 0,
        ..Default::default()
    };
    if let Some(l) = lora {
        cfg.lora_r = l.r;
        cfg.lora_alpha = l.alpha;
        cfg.lora_dropout = f64::from(l.dropout);
        cfg.lora_query = l.targets.query;
        cfg.lora_key = l.targets.key;
        cfg.lora_value = l.targets.value;
        cfg.lora_projection = l.targets.projection;
        cfg.lora_mlp = l.targets.mlp;
        cfg.lora_head = l.targets.head;
    }
    crate::train::estimate::estimate(&shape.config()?, &cfg, shape.seq).map_err(|_| {
        Error::Usage(format!(
            "the bench run's memory plan is past 2^64 bytes, more than any machine holds: --batch {} × --seq {} on a model --width {} wide with {} --layers and --vocab {}{}",
            shape.batch,
            shape.seq,
            shape.width,
            shape.layers,
            shape.vocab,
            lora.map_or(String::new(), |l| format!(", --lora-r {}", l.r))
        ))
    })
}

/// Memory the bench may use on `device`: the machine's (`MemTotal`) on the CPU, the
/// free memory now on CUDA; None where it cannot be read. With its name, for messages.
pub fn machine_memory(device: &Device) -> Result<Option<(u64, &'static str)>> {
    if device.is_cpu() {
        let total = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map(|kib| kib.saturating_mul(1024));
        return Ok(total.map(|t| (t, "this machine has")));
    }
    Ok(crate::train::estimate::free_memory(device)?.map(|f| (f, "the device has free")))
}

/// Refuse a bench whose planned memory (`need` bytes) the device cannot hold.
pub fn check_fits(need: u64, what: &str, device: &Device, lower: &str) -> Result<()> {
    if let Some((have, how)) = machine_memory(device)?
        && need > have
    {
        return Err(Error::Usage(format!(
            "{what} needs about {} but {how} {}: lower {lower}",
            crate::train::estimate::human(need),
            crate::train::estimate::human(have)
        )));
    }
    Ok(())
}

/// A batch of random token rows for the synthetic model.
pub fn random_batch(shape: &BenchShape, rng: &mut ChaCha8Rng, device: &Device) -> Result<Batch> {
    let rows: Vec<Vec<u32>> = (0..shape.batch)
        .map(|_| {
            (0..=shape.seq)
                .map(|_| rng.random_range(0..shape.vocab as u32))
                .collect()
        })
        .collect();
    Batch::from_rows(&rows, None, device)
}

impl BenchRun {
    /// Every problem with the run's flags, in one message naming them.
    pub fn check(&self) -> Result<()> {
        let mut problems = Vec::new();
        if self.steps == 0 {
            problems.push(
                "--steps must be at least 1 (the timed steps: 0 would report 0 tokens/s)"
                    .to_string(),
            );
        }
        if !(self.peak_gflops.is_finite() && self.peak_gflops > 0.0) {
            problems.push(format!(
                "--peak-gflops {} must be a positive number (MFU divides by it)",
                self.peak_gflops
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::Usage(problems.join("; ")))
        }
    }
}

/// How a training benchmark runs.
#[derive(Debug, Clone, Copy)]
pub struct BenchRun {
    pub warmup: usize,
    pub steps: usize,
    /// Peak GFLOP/s for MFU.
    pub peak_gflops: f64,
    /// `--activation-checkpointing`: every k-th block (0: none).
    pub checkpoint_every: usize,
    /// Collect where the timed steps' time goes ([`BenchReport::profile`]).
    pub profile: bool,
}

/// The checks of a training benchmark before anything is allocated: its flags, then
/// its planned memory (`pretrain --dry-run`'s plan) against what the device holds.
pub fn bench_plan(
    shape: &BenchShape,
    strategy: &Strategy,
    lora: Option<&LoraConfig>,
    run: &BenchRun,
) -> Result<crate::train::estimate::MemoryEstimate> {
    shape.check()?;
    run.check()?;
    let estimate = bench_estimate(shape, strategy, lora, run.checkpoint_every)?;
    check_fits(
        estimate.total,
        &format!(
            "the bench run ({}, `pretrain --dry-run`'s plan)",
            if lora.is_some() { "LoRA" } else { "full" }
        ),
        &strategy.device,
        "--batch, --seq, --width, --layers or --vocab",
    )?;
    Ok(estimate)
}

/// Time `steps` training steps (after `warmup`) of the synthetic model.
pub fn bench_train(
    shape: &BenchShape,
    strategy: &Strategy,
    lora: Option<&LoraConfig>,
    run: &BenchRun,
) -> Result<BenchReport> {
    let BenchRun {
        warmup,
        steps,
        peak_gflops,
        ..
    } = *run;
    let estimate = bench_plan(shape, strategy, lora, run)?;
    let cfg = shape.config()?;
    let mut runner = bench_runner(shape, strategy, lora)?;
    runner.activation_checkpointing = run.checkpoint_every;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for _ in 0..warmup {
        let b = random_batch(shape, &mut rng, &strategy.device)?;
        runner.step(&[b], 1e-4)?;
    }
    let batches = (0..steps)
        .map(|_| random_batch(shape, &mut rng, &strategy.device))
        .collect::<Result<Vec<_>>>()?;
    let parts = match batches.first() {
        Some(b) => runner.parts(b)?,
        None => 1,
    };
    crate::model::engine::profile::enable(run.profile);
    let t = Instant::now();
    for b in batches {
        runner.step(&[b], 1e-4)?;
    }
    strategy.device.synchronize()?;
    let secs = t.elapsed().as_secs_f64();
    let mut profile = crate::model::engine::profile::report();
    crate::model::engine::profile::enable(false);
    if run.profile {
        let counted: f64 = profile.iter().map(|r| r.seconds).sum();
        profile.push(crate::model::engine::profile::Row {
            kind: "other (residual adds, reshapes, embeddings, bookkeeping)",
            seconds: (secs * parts as f64 - counted).max(0.0),
            flops: 0.0,
            calls: 0,
        });
    }
    let tokens = (steps * shape.batch * shape.seq) as f64;
    let flops = 3.0 * cfg.flops_per_token(shape.seq) * tokens;
    let achieved = flops / secs / 1e9;
    Ok(BenchReport {
        mode: if lora.is_some() {
            "train-lora"
        } else {
            "train-full"
        }
        .into(),
        shape: shape.clone(),
        precision: strategy.precision,
        params: cfg.num_params(),
        steps,
        tokens_per_s: tokens / secs,
        achieved_gflops: achieved,
        peak_gflops,
        mfu: achieved / peak_gflops,
        peak_rss_mb: crate::train::validate::peak_memory_mb(),
        checkpoint_every: run.checkpoint_every,
        seconds: secs,
        profile,
        parts,
        estimate_mb: estimate.total as f64 / (1u64 << 20) as f64,
    })
}
