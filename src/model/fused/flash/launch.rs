//! The launch geometry of the CUDA flash kernels (`cuda/flash.cu`): threads, grid and
//! shared memory of each. `cuda.rs` launches with it on a GPU, and the emulation
//! test (`flash/cuda_tests.rs`) launches the same source on the CPU with it, so the
//! geometry is tested without a GPU.

/// Queries and keys per tile, threads per block: `LC_BQ`, `LC_BK`, `LC_THREADS`.
pub(super) const BQ: usize = 32;
pub(super) const BK: usize = 32;
pub(super) const THREADS: u32 = 64;

/// How far the kernel may differ from the plain attention on the same GPU, relative to
/// the largest value, in the check before its first use (`cuda::self_check`): in
/// bf16 and f16 the two round differently (the plain one rounds its scores and
/// probabilities to the dtype, the kernel keeps them in f32).
pub(super) fn self_check_tolerance(dtype: candle_core::DType) -> f32 {
    match dtype {
        candle_core::DType::F32 => 1e-4,
        candle_core::DType::F16 => 1e-2,
        _ => 5e-2,
    }
}

#[derive(Clone, Copy, Debug)]
pub(super) enum Kernel {
    Forward,
    /// `rowsum(dO ⊙ O)`, launched before `Dq` and `Dkv`, which read it.
    Dsum,
    Dq,
    Dkv,
}

impl Kernel {
    #[cfg(test)]
    pub(super) const ALL: [Kernel; 4] = [Kernel::Forward, Kernel::Dsum, Kernel::Dq, Kernel::Dkv];

    /// The kernel's name without its dtype suffix (`_f32`, `_bf16`, `_f16`).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(super) fn name(self) -> &'static str {
        match self {
            Kernel::Forward => "lc_flash_fwd",
            Kernel::Dsum => "lc_flash_bwd_dsum",
            Kernel::Dq => "lc_flash_bwd_dq",
            Kernel::Dkv => "lc_flash_bwd_dkv",
        }
    }

    /// Bytes of shared memory for head size `hs` (the layout each kernel's comment in
    /// flash.cu gives).
    pub(super) fn smem(self, hs: usize) -> usize {
        let (ld, pld) = (hs + 1, BK + 1);
        4 * match self {
            Kernel::Forward => (BQ + BK) * ld + BQ * pld,
            Kernel::Dsum => 0,
            Kernel::Dq => (2 * BQ + BK) * ld + BQ * pld,
            Kernel::Dkv => (2 * BQ + 2 * BK) * ld + 2 * BQ * pld + 2 * BQ,
        }
    }

    /// Blocks for batch `b`, `nh` query and `nkv` key/value heads, `t` queries, `s` keys:
    /// one per (query tile, head, row), or per (key tile, kv head, row) for dk/dv.
    pub(super) fn grid(self, b: usize, nh: usize, nkv: usize, t: usize, s: usize) -> [u32; 3] {
        match self {
            Kernel::Forward | Kernel::Dsum | Kernel::Dq => {
                [t.div_ceil(BQ) as u32, nh as u32, b as u32]
            }
            Kernel::Dkv => [s.div_ceil(BK) as u32, nkv as u32, b as u32],
        }
    }
}
