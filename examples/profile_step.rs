//! Where a training step's time goes on the bench model: forward, backward, optimizer.
//!
//!     RAYON_NUM_THREADS=2 cargo run --release --example profile_step [-- lora] [-- plain]
//!
//! `plain` switches the fused CPU kernels off, to see what they buy.

use std::time::Instant;

use lit_claire::bench::{BenchShape, bench_runner, random_batch};
use lit_claire::strategy::Strategy;
use rand::SeedableRng;

fn main() -> lit_claire::Result<()> {
    lit_claire::allocator::keep_freed_memory();
    let lora = std::env::args().any(|a| a == "lora");
    if std::env::args().any(|a| a == "plain") {
        lit_claire::model::fused::with_plain_kernels(|| profile(lora))
    } else {
        profile(lora)
    }
}

/// Time forward, backward and the optimizer over a few steps of the bench model.
fn profile(lora: bool) -> lit_claire::Result<()> {
    let shape = BenchShape {
        layers: 4,
        width: 512,
        heads: 8,
        kv_heads: 8,
        intermediate: BenchShape::default_intermediate(512),
        vocab: 8192,
        seq: 256,
        batch: 4,
    };
    let strategy = Strategy::cpu();
    let l = lit_claire::bench::bench_lora(16, "q,k,v,o,mlp")?;
    let mut runner = bench_runner(&shape, &strategy, lora.then_some(&l))?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let batch = random_batch(&shape, &mut rng, &strategy.device)?;
    for it in 0..4 {
        let t0 = Instant::now();
        let logits = runner.model.forward(&batch.inputs, None)?;
        let (b, t, v) = logits.dims3()?;
        let (sum, n) = lit_claire::loss::cross_entropy_sum(
            &logits.reshape((b * t, v))?,
            &batch.targets,
            Some(&batch.mask),
        )?;
        let loss = (sum / n)?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        let g: Vec<_> = runner
            .opt
            .vars()
            .iter()
            .map(|(_, v)| {
                grads
                    .get(v.as_tensor())
                    .cloned()
                    .unwrap_or_else(|| v.as_tensor().zeros_like().unwrap())
            })
            .collect();
        runner.opt.sync_grads(g, &strategy, None)?;
        runner.opt.update(1e-4, &strategy)?;
        let t3 = Instant::now();
        if it > 0 {
            println!(
                "forward {:.3}s  backward {:.3}s  optimizer {:.3}s",
                (t1 - t0).as_secs_f64(),
                (t2 - t1).as_secs_f64(),
                (t3 - t2).as_secs_f64()
            );
        }
    }
    Ok(())
}

// As in the binary (src/main.rs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
