//! Memory of the scoring pass, counted by the allocator: validation inside a training
//! run (a model whose LoRA matrices are trained variables) holds no more than offline
//! validation of the same model with plain tensors, one block's activations at a time.
//!
//! A test binary of its own: the counting allocator sees every allocation of the
//! process, so nothing else may run beside it.

use std::sync::atomic::Ordering;

use candle_core::Device;
use lit_claire::bench::{BenchShape, bench_lora, bench_runner};
use lit_claire::model::Gpt;
use lit_claire::strategy::Strategy;
use lit_claire::train::batches::SampleSet;
use lit_claire::train::evaluate::evaluate;
use rand::{Rng, SeedableRng};

#[path = "support/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::{LIVE, PEAK};

/// Random samples of `len` tokens.
struct Samples(Vec<Vec<u32>>);

impl SampleSet for Samples {
    fn len(&self) -> usize {
        self.0.len()
    }

    fn sample(&self, i: usize) -> lit_claire::Result<Vec<u32>> {
        Ok(self.0[i].clone())
    }
}

/// Bytes allocated at the peak of `f` beyond what was live before it.
fn peak_of(f: impl FnOnce()) -> usize {
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    f();
    PEAK.load(Ordering::Relaxed) - before
}

/// The validation loss and the peak bytes of scoring `data` with `model`.
fn validate(model: &Gpt, data: &Samples, seq: usize) -> (f64, usize) {
    let mut loss = 0.0;
    let peak = peak_of(|| {
        let r = evaluate(model, data, seq + 1, 2, None, false, &Device::Cpu)
            .unwrap()
            .unwrap();
        loss = r.loss;
    });
    (loss, peak)
}

#[test]
fn validation_in_a_run_needs_no_more_memory_than_offline() {
    let shape = BenchShape {
        layers: 12,
        width: 128,
        heads: 4,
        kv_heads: 2,
        intermediate: 256,
        vocab: 512,
        seq: 512,
        batch: 2,
    };
    let lora = bench_lora(4, "q,v").unwrap();
    let runner = bench_runner(&shape, &Strategy::cpu(), Some(&lora)).unwrap();
    // The model as a run holds it: LoRA A and B are the optimizer's variables.
    let in_run = runner.model.clone();
    assert!(
        in_run
            .linears()
            .iter()
            .any(|l| l.lora.as_ref().is_some_and(|a| a.a.is_variable())),
        "the run's adapters should be variables"
    );
    // The model as `validate` loads it: the same values as plain tensors.
    let mut offline = in_run.clone();
    for l in offline.linears_mut() {
        if let Some(a) = &mut l.lora {
            a.a = a.a.detach().copy().unwrap();
            a.b = a.b.detach().copy().unwrap();
        }
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let data = Samples(
        (0..4)
            .map(|_| {
                (0..=shape.seq)
                    .map(|_| rng.random_range(0..shape.vocab as u32))
                    .collect()
            })
            .collect(),
    );
    // Once first, so one-time allocations (thread pools, tables) count in neither.
    validate(&offline, &data, shape.seq);
    let (loss_offline, peak_offline) = validate(&offline, &data, shape.seq);
    let (loss_in_run, peak_in_run) = validate(&in_run, &data, shape.seq);
    assert_eq!(loss_offline.to_bits(), loss_in_run.to_bits());
    eprintln!("peak bytes: offline {peak_offline}, in a run {peak_in_run}");

    // What keeping every block's activations would take: the forward's per-token
    // set (x, two norms, q k v, attention output, MLP) of 2 × 512 tokens, 12 blocks.
    let (n, c, i) = (2 * shape.seq, shape.width, shape.intermediate);
    let per_block = 4 * n * (4 * c + (shape.heads + 2 * shape.kv_heads) * 32 + c + 2 * i);
    let all_blocks = shape.layers * per_block;
    assert!(
        peak_in_run as f64 <= 1.3 * peak_offline as f64,
        "in-run validation peaked at {peak_in_run} B, offline at {peak_offline} B"
    );
    assert!(
        peak_in_run < all_blocks / 3,
        "in-run validation peaked at {peak_in_run} B, about every block's activations ({all_blocks} B)"
    );
}
