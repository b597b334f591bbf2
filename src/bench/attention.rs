//! `attention-check`: the attention kernel a device uses (the flash kernel on the CPU in
//! f32 and on CUDA, else the plain composition) against the plain attention on the same
//! device: values and gradients on small problems that exercise every mask, then time
//! and memory of forward + backward at one long shape, for both.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use serde::Serialize;

use super::zero_counts;
use crate::config::AttentionWindow;
use crate::error::{Error, Result};
use crate::model::fused::{MaskSpec, attention, attention_plain, flash_kernel};

/// The long shape: `batch × heads × seq × head_size`, `kv_heads` key/value heads.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct AttentionShape {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub seq: usize,
    pub head_size: usize,
}

impl AttentionShape {
    /// Every problem with the shape's flags, in one message naming them: each count at
    /// least 1, key/value heads that divide the heads.
    pub fn check(&self) -> Result<()> {
        let mut problems = Vec::new();
        let counts = [
            ("--batch", self.batch),
            ("--heads", self.heads),
            ("--kv-heads", self.kv_heads),
            ("--seq", self.seq),
            ("--head-size", self.head_size),
        ];
        problems.extend(zero_counts(&counts, self.heads));
        if self.kv_heads > 0 && self.heads % self.kv_heads != 0 {
            problems.push(format!(
                "--kv-heads {} must divide --heads {}",
                self.kv_heads, self.heads
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::Usage(problems.join("; ")))
        }
    }

    /// Bytes the plain attention's forward and backward hold at this shape in `dtype`:
    /// 14 f32 per score of `(batch, heads, seq, seq)` (as `pretrain --dry-run` counts
    /// it), plus q, k, v, the output, the probe and their gradients. None past 2^64.
    pub fn planned_bytes(&self, dtype: DType) -> Option<u64> {
        let n = |x: usize| x as u128;
        let scores = n(self.batch)
            .checked_mul(n(self.heads))?
            .checked_mul(n(self.seq))?
            .checked_mul(n(self.seq))?
            .checked_mul(56)?;
        let heads = n(self.heads).checked_add(n(self.kv_heads))?;
        let tensors = n(self.batch)
            .checked_mul(heads)?
            .checked_mul(n(self.seq))?
            .checked_mul(n(self.head_size))?
            .checked_mul(n(dtype.size_in_bytes()))?
            .checked_mul(4)?;
        u64::try_from(scores.checked_add(tensors)?).ok()
    }
}

/// One small problem: the largest difference from the plain attention, relative to the
/// largest value of each of output, dq, dk, dv.
#[derive(Debug, Clone, Serialize)]
pub struct AttentionAgreement {
    pub case: String,
    pub max_rel_diff: [f32; 4],
}

/// Forward + backward of one kernel at the long shape.
#[derive(Debug, Clone, Serialize)]
pub struct AttentionTiming {
    pub kernel: String,
    pub forward_ms: f64,
    pub backward_ms: f64,
    /// Device memory (CUDA) taken by the forward and still held for the backward.
    pub held_mb: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AttentionReport {
    pub device: String,
    pub dtype: String,
    /// The kernel `attention` takes here: "flash (CPU)", "flash (CUDA)" or "plain".
    pub kernel: String,
    pub tolerance: f32,
    pub agreement: Vec<AttentionAgreement>,
    pub shape: AttentionShape,
    pub timings: Vec<AttentionTiming>,
}

impl AttentionReport {
    /// Whether every agreement is within the tolerance.
    pub fn agrees(&self) -> bool {
        self.agreement.iter().all(|a| {
            a.max_rel_diff
                .iter()
                .all(|d| d.is_finite() && *d <= self.tolerance)
        })
    }
}

/// Relative tolerance for the kernel against the plain attention in `dtype`.
fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 1e-5,
        DType::F16 => 1e-2,
        _ => 5e-2,
    }
}

fn mask(window: usize, q_start: usize, k_start: usize, docs: Option<Vec<u32>>) -> MaskSpec {
    MaskSpec {
        q_start,
        k_start,
        window: if window > 0 {
            AttentionWindow::Sliding(window)
        } else {
            AttentionWindow::Global
        },
        docs: docs.map(Into::into),
    }
}

fn max_abs(t: &Tensor) -> Result<f32> {
    Ok(t.to_dtype(DType::F32)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?)
}

/// `(output, dq, dk, dv)` of `attention` or `attention_plain` under the probe `dout`.
fn value_and_grads(
    plain: bool,
    vars: &[Var; 3],
    dout: &Tensor,
    scale: f64,
    m: &MaskSpec,
) -> Result<[Tensor; 4]> {
    let (q, k, v) = (
        vars[0].as_tensor(),
        vars[1].as_tensor(),
        vars[2].as_tensor(),
    );
    let o = if plain {
        attention_plain(q, k, v, scale, m)?
    } else {
        attention(q, k, v, scale, m)?
    };
    let g = (o.to_dtype(DType::F32)? * dout.to_dtype(DType::F32)?)?
        .sum_all()?
        .backward()?;
    let grad = |x: &Var| {
        g.get(x.as_tensor())
            .cloned()
            .ok_or_else(|| Error::Msg("attention-check: a gradient is missing".into()))
    };
    Ok([o, grad(&vars[0])?, grad(&vars[1])?, grad(&vars[2])?])
}

fn random(dev: &Device, dtype: DType, shape: (usize, usize, usize, usize)) -> Result<Tensor> {
    Ok(Tensor::randn(0f32, 1.0, shape, dev)?.to_dtype(dtype)?)
}

/// The check on `dev` in `dtype`, timing `steps` forward + backward passes of each kernel
/// at `shape` (after one warm-up).
pub fn attention_check(
    dev: &Device,
    dtype: DType,
    shape: AttentionShape,
    steps: usize,
) -> Result<AttentionReport> {
    shape.check()?;
    if steps == 0 {
        return Err(Error::Usage(
            "--steps must be at least 1 (the timed passes of each kernel)".into(),
        ));
    }
    let lower = "--batch, --heads, --seq or --head-size";
    let need = shape.planned_bytes(dtype).ok_or_else(|| {
        Error::Usage(format!(
            "the long shape's attention needs more than 2^64 bytes: lower {lower}"
        ))
    })?;
    super::check_fits(need, "the plain attention at the long shape", dev, lower)?;
    let tol = tolerance(dtype);
    // (name, B, nh, nkv, T, S, hs, window, q_start, docs)
    type Small = (
        &'static str,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        bool,
    );
    let small: [Small; 5] = [
        ("causal, GQA 4:2, T = 75", 2, 4, 2, 75, 75, 64, 0, 0, false),
        ("MQA, head size 40", 1, 4, 1, 70, 70, 40, 0, 0, false),
        ("sliding window 24", 1, 3, 3, 90, 90, 64, 24, 0, false),
        ("packed documents", 2, 4, 2, 67, 67, 64, 0, 0, true),
        (
            "21 queries after 32 cached keys",
            1,
            4,
            2,
            21,
            53,
            128,
            0,
            32,
            false,
        ),
    ];
    let mut agreement = Vec::new();
    for (name, b, nh, nkv, t, s, hs, w, q_start, docs) in small {
        let vars = [
            Var::from_tensor(&random(dev, dtype, (b, nh, t, hs))?)?,
            Var::from_tensor(&random(dev, dtype, (b, nkv, s, hs))?)?,
            Var::from_tensor(&random(dev, dtype, (b, nkv, s, hs))?)?,
        ];
        let dout = random(dev, dtype, (b, nh, t, hs))?;
        let docs = docs.then(|| {
            (0..b * t)
                .map(|r| if r % t >= 30 { 30 } else { 0 })
                .collect()
        });
        let m = mask(w, q_start, q_start + t - s, docs);
        let scale = 1.0 / (hs as f64).sqrt();
        let got = value_and_grads(false, &vars, &dout, scale, &m)?;
        let want = value_and_grads(true, &vars, &dout, scale, &m)?;
        let mut rel = [0f32; 4];
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let diff = (g.to_dtype(DType::F32)? - w.to_dtype(DType::F32)?)?;
            rel[i] = max_abs(&diff)? / max_abs(w)?.max(1e-6);
        }
        agreement.push(AttentionAgreement {
            case: name.into(),
            max_rel_diff: rel,
        });
    }

    let sh = shape;
    let vars = [
        Var::from_tensor(&random(
            dev,
            dtype,
            (sh.batch, sh.heads, sh.seq, sh.head_size),
        )?)?,
        Var::from_tensor(&random(
            dev,
            dtype,
            (sh.batch, sh.kv_heads, sh.seq, sh.head_size),
        )?)?,
        Var::from_tensor(&random(
            dev,
            dtype,
            (sh.batch, sh.kv_heads, sh.seq, sh.head_size),
        )?)?,
    ];
    let dout = random(dev, dtype, (sh.batch, sh.heads, sh.seq, sh.head_size))?;
    let m = mask(0, 0, 0, None);
    let scale = 1.0 / (sh.head_size as f64).sqrt();
    let kernel = flash_kernel(
        vars[0].as_tensor(),
        vars[1].as_tensor(),
        vars[2].as_tensor(),
    )?;
    let mut timings = Vec::new();
    for plain in [false, true] {
        let name = if plain { "plain" } else { kernel };
        if !plain && kernel == "plain" {
            continue;
        }
        let (mut fwd, mut bwd, mut held) = (Vec::new(), Vec::new(), None);
        for step in 0..=steps {
            dev.synchronize()?;
            let before = device_used_bytes(dev);
            let t0 = Instant::now();
            let (q, k, v) = (
                vars[0].as_tensor(),
                vars[1].as_tensor(),
                vars[2].as_tensor(),
            );
            let o = if plain {
                attention_plain(q, k, v, scale, &m)?
            } else {
                attention(q, k, v, scale, &m)?
            };
            dev.synchronize()?;
            let t1 = Instant::now();
            let after = device_used_bytes(dev);
            let g = (o * &dout)?.sum_all()?.backward()?;
            dev.synchronize()?;
            drop(g);
            if step > 0 {
                fwd.push(t1.duration_since(t0).as_secs_f64() * 1e3);
                bwd.push(t1.elapsed().as_secs_f64() * 1e3);
                if let (Some(a), Some(b)) = (before, after) {
                    held = Some(b.saturating_sub(a) as f64 / 1e6);
                }
            }
        }
        timings.push(AttentionTiming {
            kernel: name.into(),
            forward_ms: median(&mut fwd),
            backward_ms: median(&mut bwd),
            held_mb: held,
        });
    }
    Ok(AttentionReport {
        device: format!("{:?}", dev.location()),
        dtype: format!("{dtype:?}").to_lowercase(),
        kernel: kernel.into(),
        tolerance: tol,
        agreement,
        shape,
        timings,
    })
}

fn median(x: &mut [f64]) -> f64 {
    if x.is_empty() {
        return f64::NAN;
    }
    x.sort_by(f64::total_cmp);
    x[x.len() / 2]
}

/// Bytes in use on a CUDA device (total − free); None on the CPU.
fn device_used_bytes(dev: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = dev {
        use candle_core::cuda_backend::cudarc::driver::result;
        d.cuda_stream().context().bind_to_thread().ok()?;
        let (free, total) = result::mem_get_info().ok()?;
        return Some((total - free) as u64);
    }
    let _ = dev;
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On the CPU in f32 the flash kernel serves and agrees with the plain attention;
    /// in bf16 the plain attention serves (and is only timed against itself).
    #[test]
    fn cpu_check_agrees_and_times_both_kernels() {
        let shape = AttentionShape {
            batch: 1,
            heads: 4,
            kv_heads: 2,
            seq: 96,
            head_size: 32,
        };
        let r = attention_check(&Device::Cpu, DType::F32, shape, 1).unwrap();
        assert_eq!(r.kernel, "flash (CPU)");
        assert!(r.agrees(), "{:?}", r.agreement);
        assert_eq!(r.agreement.len(), 5);
        let kernels: Vec<&str> = r.timings.iter().map(|t| t.kernel.as_str()).collect();
        assert_eq!(kernels, ["flash (CPU)", "plain"]);
        assert!(
            r.timings
                .iter()
                .all(|t| t.forward_ms > 0.0 && t.held_mb.is_none())
        );

        let r = attention_check(&Device::Cpu, DType::BF16, shape, 1).unwrap();
        assert_eq!(r.kernel, "plain");
        assert_eq!(r.timings.len(), 1);
        assert!(r.agrees(), "{:?}", r.agreement);

        let bad = AttentionShape {
            kv_heads: 3,
            ..shape
        };
        let err = attention_check(&Device::Cpu, DType::F32, bad, 1).unwrap_err();
        assert!(err.to_string().contains("--kv-heads 3"), "{err}");
    }
}
