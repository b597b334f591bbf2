//! Where a training step's time goes on the bench model: forward, backward, optimizer.
//!
//!     RAYON_NUM_THREADS=2 cargo run --release --example profile_step [-- lora]

use std::time::Instant;

use lit_claire::bench::{BenchShape, RandomSource};
use lit_claire::loss::cross_entropy_sum;
use lit_claire::model::build_model;
use lit_claire::strategy::Strategy;
use lit_claire::train::batches::Batch;
use lit_claire::train::optim::{AdamW, AdamWConfig};

fn main() -> lit_claire::Result<()> {
    let lora = std::env::args().any(|a| a == "lora");
    let shape = BenchShape {
        layers: 4,
        width: 512,
        heads: 8,
        vocab: 8192,
        seq: 256,
        batch: 4,
    };
    let cfg = shape.config()?;
    let strategy = Strategy::cpu();
    let tm = build_model(
        &cfg,
        &RandomSource { seed: 1, std: 0.02 },
        &strategy.build_options(!lora),
    )?;
    let mut model = tm.model;
    let vars = if lora {
        let l = lit_claire::lora::LoraConfig {
            r: 16,
            alpha: 32.0,
            dropout: 0.0,
            targets: lit_claire::lora::LoraTargets {
                query: true,
                key: true,
                value: true,
                projection: true,
                mlp: true,
                head: false,
            },
            rslora: false,
        };
        lit_claire::lora::attach_new(&mut model, &l, 0)?
    } else {
        tm.vars
    };
    let mut opt = AdamW::new(vars, AdamWConfig::default())?;
    let rows: Vec<Vec<u32>> = (0..4)
        .map(|r| (0..257).map(|i| ((i * 31 + r * 7) % 8192) as u32).collect())
        .collect();
    let batch = Batch::from_rows(&rows, None, &strategy.device)?;
    for it in 0..4 {
        let t0 = Instant::now();
        let logits = model.forward(&batch.inputs, None)?;
        let (b, t, v) = logits.dims3()?;
        let (sum, n) = cross_entropy_sum(
            &logits.reshape((b * t, v))?,
            &batch.targets,
            Some(&batch.mask),
        )?;
        let loss = (sum / n)?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        let g: Vec<_> = opt
            .vars()
            .iter()
            .map(|(_, v)| grads.get(v.as_tensor()).unwrap().clone())
            .collect();
        opt.step(&g, 1e-4)?;
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
