//! Fused CPU kernels that carry their own backward pass.
//!
//! Composed from tensor ops, a norm, a rotation or a softmax walks its data five to
//! fifteen times forward and more backward, mostly on one thread; each kernel here does
//! one parallel pass each way. Every kernel has a plain twin built from differentiable
//! tensor ops (the one used on other devices and dtypes) and a test that values and
//! gradients agree. They apply to contiguous f32 tensors on the CPU.
//!
//! ```text
//! softmax        y = softmax(s·x + mask)            dx = s · y ⊙ (dy − Σ dy ⊙ y)
//! attention      o = softmax(s·q kᵀ + mask) v       flash: tiles, never (T, S); see flash/mod.rs
//! cross-entropy  ℓᵢ = log Σⱼ exp xᵢⱼ − xᵢ,tᵢ         dxᵢ = dℓᵢ (softmax xᵢ − onehot tᵢ)
//! rms norm       n = x / rms(x), y = n ⊙ w          dx = (dn − n·mean(dn ⊙ n)) / rms,  dn = dy ⊙ w
//! layer norm     n = (x − μ)/σ, y = n ⊙ w + b       dx = (dn − mean dn − n·mean(dn ⊙ n)) / σ
//! rotary         rotate pairs by +θ                 rotate the gradient by −θ
//! linear         y = x Wᵀ straight into gemm         (the engine writes its backward)
//! ```
//!
//! Flash attention lives in `flash/`: the CPU kernel (`flash/mod.rs`), the CUDA kernel
//! (`flash/kernel/flash.cu`) with its launcher (`flash/cuda.rs`, `cuda` feature) and
//! launch geometry (`flash/launch.rs`), and the CPU emulator that runs the CUDA source
//! in the tests (`flash/kernel/emulate*.{h,cpp}`, `flash/cuda_tests.rs`); on a GPU the
//! CUDA kernel is also checked against the plain attention before its first use.
//!
//! Reductions over rows (the weight gradients of norms) are summed in fixed blocks and
//! combined in order, so results do not depend on the number of threads. Reductions
//! along a row (softmax and log-sum-exp normalisers, norm statistics) accumulate in f64:
//! see `sum_f64`.

mod accumulate;
mod act;
mod cross_entropy;
mod flash;
mod linear;
mod mask;
mod norm;
mod rope;
mod softmax;

pub use accumulate::{
    add, add_assign, gemm_acc, rows_add, sum_squares, with_values, with_values_mut,
};
pub use act::{act_backward, act_forward, gated_backward, gated_forward};
pub use cross_entropy::{cross_entropy_grad_in_place, cross_entropy_rows, nll_plain};
pub use flash::{
    FlashSaved, TILES, Tiles, attention, attention_plain, flash_attention, flash_forward,
    flash_kernel,
};
pub use linear::matmul_nt;
pub use mask::MaskSpec;
pub use norm::{layer_norm, layer_norm_backward, rms_norm, rms_norm_backward};
pub use rope::rope;
pub use softmax::{masked_softmax, softmax_plain};

use std::cell::Cell;

use candle_core::{CpuStorage, DType, Layout, Tensor};

/// The values of a contiguous f32 storage and its row length (last dimension), or an
/// error naming the kernel `name`.
fn rows<'a>(name: &str, s: &'a CpuStorage, l: &Layout) -> candle_core::Result<(&'a [f32], usize)> {
    let slice = match (s, l.contiguous_offsets(), l.dims().last()) {
        (CpuStorage::F32(v), Some((start, end)), Some(&cols)) => Some((&v[start..end], cols)),
        _ => None,
    };
    slice.ok_or_else(|| not_fused(name))
}

fn not_fused(name: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "{name}: fused kernel needs contiguous f32 CPU tensors"
    ))
}

thread_local! {
    /// Whether this thread's ops may take the fused kernels (see [`with_plain_kernels`]).
    static ENABLED: Cell<bool> = const { Cell::new(true) };
}

/// Run `f` with the fused kernels off on this thread: every op it dispatches takes the
/// plain tensor-op twin, as on devices without kernels (for tests and benchmarks).
/// Other threads are unaffected, and the kernels come back on even if `f` panics.
pub fn with_plain_kernels<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ENABLED.with(|e| e.set(self.0));
        }
    }
    let _restore = Restore(ENABLED.with(|e| e.replace(false)));
    f()
}

/// Run `f` on a worker of rayon's global pool when `cpu` and this thread is not one,
/// with this thread's kernel switch ([`with_plain_kernels`]) carried over.
///
/// From a thread outside the pool (the main thread), every parallel kernel hands its
/// work to the pool and sleeps until it is done: two wake-ups per kernel, thousands per
/// second, on a VM each a trip through the hypervisor. A worker takes its share of each
/// kernel and does not sleep between them. `f` must not wait on another thread that
/// needs the pool (a collective of ranks that are threads of this process).
pub fn on_pool<R: Send>(cpu: bool, f: impl FnOnce() -> R + Send) -> R {
    if !cpu || rayon::current_thread_index().is_some() {
        return f();
    }
    let plain = !kernels_on();
    rayon::scope(|_| if plain { with_plain_kernels(f) } else { f() })
}

/// Whether the fused kernels are on for this thread (see [`with_plain_kernels`]).
pub fn kernels_on() -> bool {
    ENABLED.with(Cell::get)
}

/// Whether the fused kernels serve a device and dtype: the CPU (`cpu`) in f32.
pub fn serves(cpu: bool, dtype: DType) -> bool {
    cpu && dtype == DType::F32
}

/// The largest head size the CUDA flash kernel takes (larger heads: plain attention).
pub const CUDA_FLASH_HEAD_MAX: usize = 128;

/// Whether `LIT_CLAIRE_ATTENTION=plain` asks for the plain attention everywhere (the flash
/// kernels off, on every device).
pub fn plain_attention_requested() -> bool {
    static PLAIN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PLAIN.get_or_init(|| std::env::var("LIT_CLAIRE_ATTENTION").is_ok_and(|v| v == "plain"))
}

/// Whether a flash kernel takes the attention of a run on CUDA (`cuda`) or the CPU in
/// `dtype` with heads of `head_dim`: the CPU kernel in f32, the CUDA kernel in f32, bf16
/// and f16 up to [`CUDA_FLASH_HEAD_MAX`] (on GPUs with 75 KB of shared memory per block,
/// compute capability 7.0 and 8.0 on), unless [`plain_attention_requested`].
pub fn flash_serves_run(cuda: bool, dtype: DType, head_dim: usize) -> bool {
    if plain_attention_requested() {
        return false;
    }
    if cuda {
        matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
            && (1..=CUDA_FLASH_HEAD_MAX).contains(&head_dim)
    } else {
        serves(true, dtype)
    }
}

/// Whether the fused kernels apply to `x` (decided on the thread that dispatches the op).
fn fusable(x: &Tensor) -> bool {
    ENABLED.with(Cell::get) && serves(x.device().is_cpu(), x.dtype())
}

/// Σ of f32 terms, accumulated in f64.
///
/// A running f32 sum drops every term under half an ulp of what it already holds. After
/// the max of a softmax row (exp 0 = 1), each exp(x − max) < 2⁻²⁴ vanishes: on a trained
/// model's 49,152-token rows that lost ~1e-4 of log-sum-exp in every row, the loss came out
/// 1.1e-4 low. After a massive activation's square (2.2e4² = 4.8e8, ulp 32), an
/// RMSNorm row's ordinary squares vanish the same way. In f64 the threshold is 2⁻⁵³ of
/// the sum, 2²⁹ times lower.
fn sum_f64(terms: impl Iterator<Item = f32>) -> f64 {
    terms.map(f64::from).sum()
}

/// `e^x` within ~2 ulp, 0 below −87: `2ⁿ · e^r` with `n = round(x / ln 2)`,
/// `|r| ≤ ln 2 / 2`, and Cephes' `expf` polynomial for `e^r`. Branch-free, so loops of
/// it vectorise (libm's `expf` is a call per element).
#[inline(always)]
pub(crate) fn exp_approx(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2²³: adding it rounds to an integer
    let xc = x.clamp(-87.0, 88.0);
    let t = xc * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let ni = t.to_bits() as i32 - MAGIC.to_bits() as i32;
    let r = xc - n * (355.0 / 512.0) + n * 2.121_944_4e-4; // ln 2 = 355/512 − 2.12e-4
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let y = y * f32::from_bits(((ni + 127) as u32) << 23);
    if x < -87.0 { 0.0 } else { y }
}

/// Run `f` compiled for AVX-512 or AVX2 when the CPU has it (loops of [`exp_approx`]
/// inlined into `f` then vectorise, 16 or 8 lanes); the arithmetic is the same either
/// way (no fused multiply-adds).
#[inline(always)]
fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        #[target_feature(enable = "avx512f")]
        fn avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        // SAFETY: the CPU has AVX-512F (checked just above).
        return unsafe { avx512(f) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        #[target_feature(enable = "avx2")]
        fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { avx2(f) };
    }
    f()
}

/// Rows per block when summing over rows (fixed, for thread-count independence).
const ROW_BLOCK: usize = 64;

#[cfg(test)]
pub(crate) mod testing {
    use candle_core::{Tensor, Var};

    /// A fused kernel and its plain twin agree: values within `tol`, and the gradients
    /// of `inputs` under a random linear probe of the output within `grad_tol`.
    pub fn agree(inputs: &[&Var], fused: &Tensor, plain: &Tensor, tol: f32, grad_tol: f32) {
        close(fused, plain, tol);
        let probe = Tensor::randn(0f32, 1.0, fused.shape(), fused.device()).unwrap();
        let gf = (fused * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gp = (plain * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in inputs {
            close(
                gf.get(v.as_tensor()).unwrap(),
                gp.get(v.as_tensor()).unwrap(),
                grad_tol,
            );
        }
    }

    /// Largest absolute difference, asserted below `tol`.
    pub fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a.len(), b.len());
        // f32::max drops a NaN operand: a NaN (or an infinity the other side lacks) fails.
        let bad = a
            .iter()
            .zip(&b)
            .position(|(x, y)| !(x.is_finite() && y.is_finite()) && x != y);
        assert!(bad.is_none(), "element {bad:?} is not finite on one side");
        let d = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(d < tol, "max difference {d}");
    }
}
