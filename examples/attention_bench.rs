//! Attention alone, forward + backward, at the 135M model's shape (9 heads of 64,
//! 3 key/value heads): the flash kernel against the old composition (scores, fused
//! masked softmax, matmul), each in its own process so each peak RSS is its own.
//!
//!     RAYON_NUM_THREADS=2 cargo run --release --example attention_bench -- flash 2048
//!     RAYON_NUM_THREADS=2 cargo run --release --example attention_bench -- plain 2048
//!
//! A third number `S` > `T` puts `S − T` cached keys before the `T` queries (a decode
//! step of generation is `T = 1`).

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use lit_claire::config::AttentionWindow;
use lit_claire::model::fused::{MaskSpec, attention, attention_plain};

fn main() -> candle_core::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let flash = args.get(1).is_none_or(|a| a != "plain");
    let t: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(2048);
    let s: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(t).max(t);
    let (nh, nkv, hs) = (9, 3, 64);
    let dev = Device::Cpu;
    let q = Var::randn(0f32, 1.0, (1, nh, t, hs), &dev)?;
    let k = Var::randn(0f32, 1.0, (1, nkv, s, hs), &dev)?;
    let v = Var::randn(0f32, 1.0, (1, nkv, s, hs), &dev)?;
    let probe = Tensor::randn(0f32, 1.0, (1, nh, t, hs), &dev)?;
    let mask = MaskSpec {
        q_start: s - t,
        k_start: 0,
        window: AttentionWindow::Global,
        docs: None,
    };
    let scale = 1.0 / (hs as f64).sqrt();
    let step = || -> candle_core::Result<(f64, f64)> {
        let t0 = Instant::now();
        let (q, k, v) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
        let y = if flash {
            attention(q, k, v, scale, &mask)?
        } else {
            attention_plain(q, k, v, scale, &mask)?
        };
        let t1 = Instant::now();
        let g = (y * &probe)?.sum_all()?.backward()?;
        drop(g);
        Ok((
            t1.duration_since(t0).as_secs_f64(),
            t1.elapsed().as_secs_f64(),
        ))
    };
    step()?;
    let (mut f, mut b) = (0.0, 0.0);
    let n = if t * s >= 1 << 20 { 3 } else { 50 };
    for _ in 0..n {
        let (x, y) = step()?;
        f += x / n as f64;
        b += y / n as f64;
    }
    let peak = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string())
        })
        .unwrap_or_default();
    println!(
        "{} T={t} S={s}: forward {:.1} ms, backward {:.1} ms (mean of {n}), peak RSS {} MB",
        if flash { "flash" } else { "plain" },
        1e3 * f,
        1e3 * b,
        peak.parse::<f64>().unwrap_or(0.0) / 1024.0
    );
    Ok(())
}
