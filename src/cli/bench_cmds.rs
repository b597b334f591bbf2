//! `bench`: training throughput and MFU on a synthetic LLaMA.

use clap::{Args, ValueEnum};

use super::RuntimeArgs;
use crate::bench::{
    AttentionShape, BenchRun, BenchShape, attention_check, bench_lora, bench_plan, bench_train,
    matmul_gflops,
};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchMode {
    Full,
    Lora,
    Both,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[arg(long, value_enum, default_value_t = BenchMode::Both)]
    pub mode: BenchMode,
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    #[arg(long, default_value_t = 512)]
    pub width: usize,
    #[arg(long, default_value_t = 8)]
    pub heads: usize,
    /// Key/value heads (default: --heads).
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// MLP width (default: width · 8/3, rounded down to a multiple of 64).
    #[arg(long)]
    pub intermediate: Option<usize>,
    #[arg(long, default_value_t = 8192)]
    pub vocab: usize,
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// LoRA rank (alpha = 2 · rank).
    #[arg(long, default_value_t = 16)]
    pub lora_r: usize,
    /// LoRA targets: comma-separated q, k, v, o, mlp.
    #[arg(long, default_value = "q,k,v,o,mlp")]
    pub lora_targets: String,
    /// Peak GFLOP/s for MFU (default: measured with a 2048² matmul in the compute dtype).
    #[arg(long)]
    pub peak_gflops: Option<f64>,
    /// Activation checkpointing: keep only the input of every k-th block (0: none).
    #[arg(long, default_value_t = 0)]
    pub activation_checkpointing: usize,
    /// Print where the time of the timed steps goes (matmuls with their GFLOP/s, then
    /// each kind of kernel).
    #[arg(long)]
    pub profile: bool,
    /// Print JSON lines instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

pub fn bench(a: BenchArgs) -> Result<()> {
    let lora = bench_lora(a.lora_r, &a.lora_targets)?;
    let strategy = a.runtime.strategy()?;
    let shape = BenchShape {
        layers: a.layers,
        width: a.width,
        heads: a.heads,
        kv_heads: a.kv_heads.unwrap_or(a.heads),
        intermediate: a
            .intermediate
            .unwrap_or_else(|| BenchShape::default_intermediate(a.width)),
        vocab: a.vocab,
        seq: a.seq,
        batch: a.batch,
    };
    let modes = match a.mode {
        BenchMode::Full => vec![None],
        BenchMode::Lora => vec![Some(&lora)],
        BenchMode::Both => vec![None, Some(&lora)],
    };
    let mut run = BenchRun {
        warmup: a.warmup,
        steps: a.steps,
        // Checked now when given; measured below once every check passed.
        peak_gflops: a.peak_gflops.unwrap_or(1.0),
        checkpoint_every: a.activation_checkpointing,
        profile: a.profile,
    };
    // Every flag and every mode's memory before the first allocation.
    for lora in &modes {
        bench_plan(&shape, &strategy, *lora, &run)?;
    }
    run.peak_gflops = match a.peak_gflops {
        Some(p) => p,
        None => matmul_gflops(2048, strategy.precision.compute_dtype(), &strategy.device)?,
    };
    let peak = run.peak_gflops;
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "unset".into());
    eprintln!("peak {peak:.1} GFLOP/s (matmul), RAYON_NUM_THREADS={threads}");
    for lora in modes {
        let r = bench_train(&shape, &strategy, lora, &run)?;
        if a.json {
            println!("{}", serde_json::to_string(&r).expect("plain data"));
        } else {
            println!(
                "{:<11} {} params, {}: {:.0} tokens/s, {:.1} GFLOP/s, MFU {:.1}%, peak RSS {:.0} MB (planned {:.0} MB)",
                r.mode,
                r.params,
                r.precision,
                r.tokens_per_s,
                r.achieved_gflops,
                100.0 * r.mfu,
                r.peak_rss_mb,
                r.estimate_mb
            );
            // Thread time: with the micro-batch split, the parts' threads run at once.
            let thread_s = r.seconds * r.parts as f64;
            if r.parts > 1 && !r.profile.is_empty() {
                println!(
                    "  (each micro-batch in {} parts at once, one core each: times are summed over them, rates are per core)",
                    r.parts
                );
            }
            let (mm_s, mm_f) = r
                .profile
                .iter()
                .filter(|p| p.kind.starts_with("matmul"))
                .fold((0.0, 0.0), |(s, f), p| (s + p.seconds, f + p.flops));
            if mm_s > 0.0 {
                println!(
                    "  {:>5.1}%  {:>8.3} s  all matmuls, {:.1} GFLOP/s",
                    100.0 * mm_s / thread_s.max(1e-12),
                    mm_s,
                    mm_f / mm_s / 1e9
                );
            }
            for p in &r.profile {
                let rate = if p.flops > 0.0 {
                    format!(", {:.1} GFLOP/s", p.flops / p.seconds.max(1e-12) / 1e9)
                } else {
                    String::new()
                };
                println!(
                    "  {:>5.1}%  {:>8.3} s  {}{rate}",
                    100.0 * p.seconds / thread_s.max(1e-12),
                    p.seconds,
                    p.kind
                );
            }
        }
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct AttentionCheckArgs {
    /// Batch of the long shape.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    #[arg(long, default_value_t = 32)]
    pub heads: usize,
    /// Key/value heads (default: --heads).
    #[arg(long)]
    pub kv_heads: Option<usize>,
    #[arg(long, default_value_t = 2048)]
    pub seq: usize,
    #[arg(long, default_value_t = 128)]
    pub head_size: usize,
    /// Timed forward + backward passes of each kernel (after one warm-up).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Print one JSON line instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// `attention-check`: the device's attention kernel against the plain attention (values
/// and gradients), then both timed at one long shape. Fails if they disagree.
pub fn attention_check_cmd(a: AttentionCheckArgs) -> Result<()> {
    let strategy = a.runtime.strategy()?;
    let dtype = strategy.precision.compute_dtype();
    let shape = AttentionShape {
        batch: a.batch,
        heads: a.heads,
        kv_heads: a.kv_heads.unwrap_or(a.heads),
        seq: a.seq,
        head_size: a.head_size,
    };
    let r = attention_check(&strategy.device, dtype, shape, a.steps)?;
    if a.json {
        println!("{}", serde_json::to_string(&r).expect("plain data"));
    } else {
        println!(
            "{} {}: attention takes the {} kernel",
            r.device, r.dtype, r.kernel
        );
        for g in &r.agreement {
            let [o, dq, dk, dv] = g.max_rel_diff;
            println!(
                "  {:<34} vs plain: output {o:.1e}, dq {dq:.1e}, dk {dk:.1e}, dv {dv:.1e}",
                g.case
            );
        }
        let s = r.shape;
        println!(
            "  {} × {} heads ({} kv) × {} tokens × {}:",
            s.batch, s.heads, s.kv_heads, s.seq, s.head_size
        );
        for t in &r.timings {
            let held = t.held_mb.map_or(String::new(), |m| {
                format!(", {m:.0} MB held for the backward")
            });
            println!(
                "  {:<13} forward {:.2} ms, backward {:.2} ms{held}",
                t.kernel, t.forward_ms, t.backward_ms
            );
        }
    }
    if !r.agrees() {
        return Err(Error::Msg(format!(
            "attention-check: the {} kernel differs from the plain attention by more than {:.0e} of the largest value (see above)",
            r.kernel, r.tolerance
        )));
    }
    Ok(())
}
