//! f32 matrix-multiply throughput through candle, to confirm the `gemm` crate's AVX-512
//! kernels (its `x86-v4` feature, switched on in Cargo.toml) are in use.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo run --release --example matmul_gflops [-- N [ITERS]]
//! ```
//!
//! Prints GFLOP/s of an `N × N` by `N × N` product (`2·N³` flops each, default N = 1024).
//! On the 2-core AVX-512 development machine: about 190 GFLOP/s without `x86-v4`, about
//! 338 with it. A measurement, not a test: nothing here asserts a speed.

use std::time::Instant;

use candle_core::{Device, Tensor};

fn main() -> candle_core::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1024);
    let iters: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20);
    let dev = Device::Cpu;
    let a = Tensor::randn(0f32, 1.0, (n, n), &dev)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), &dev)?;
    // Warm up: thread pool, page faults, packing buffers.
    for _ in 0..3 {
        a.matmul(&b)?;
    }
    let mut best = f64::INFINITY;
    let start = Instant::now();
    for _ in 0..iters {
        let t = Instant::now();
        let c = a.matmul(&b)?;
        // Touch the result so nothing is elided.
        std::hint::black_box(c);
        best = best.min(t.elapsed().as_secs_f64());
    }
    let mean = start.elapsed().as_secs_f64() / iters as f64;
    let flops = 2.0 * (n as f64).powi(3);
    #[cfg(target_arch = "x86_64")]
    let avx512 = std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    let avx512 = false;
    println!(
        "{n}x{n} f32 matmul, {} threads, avx512f {}: mean {:.1} GFLOP/s, best {:.1} GFLOP/s",
        rayon::current_num_threads(),
        if avx512 { "yes" } else { "no" },
        flops / mean / 1e9,
        flops / best / 1e9
    );
    Ok(())
}
