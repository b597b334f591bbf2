//! The flash kernel on CUDA: `cuda/flash.cu` (compiled to PTX by `build.rs`), launched
//! through cudarc on candle's own stream. The same algorithm as the CPU kernel
//! (`mod.rs`): O(T) memory, forward keeps one f32 log-sum-exp per query row, the
//! backward recomputes probabilities per tile; f32, bf16 and f16 inputs, f32 arithmetic.
//!
//! Before a device first uses it for a dtype, [`serves`] runs it once on a small problem
//! (GQA, a window, documents, a KV-cache offset) against the plain attention on the same
//! device, values and gradients; a kernel that disagrees is refused with an error, never
//! used. `LIT_CLAIRE_ATTENTION=plain` turns it off.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, DeviceId};
use candle_core::op::BackpropOp;
use candle_core::{D, DType, Device, Layout, Result, Storage, Tensor, Var};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::super::mask::MaskSpec;
use crate::config::AttentionWindow;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash.ptx"));
const MODULE: &str = "lc_flash_attention";

use super::launch::{Kernel, THREADS};

/// The largest head size, `LC_HS_MAX` of flash.cu.
const HS_MAX: usize = super::super::CUDA_FLASH_HEAD_MAX;

/// Shared memory the kernel sizes a launch without opting in to more.
const SMEM_DEFAULT: usize = 48 * 1024;

/// `LcParams` of flash.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(super) struct Params {
    b: i32,
    nh: i32,
    nkv: i32,
    t: i32,
    s: i32,
    hs: i32,
    q_start: i32,
    k_start: i32,
    window: i32,
    has_docs: i32,
    scale: f32,
}

// SAFETY: a plain `#[repr(C)]` struct of i32 and f32, laid out as flash.cu's LcParams.
unsafe impl DeviceRepr for Params {}

impl Params {
    /// Query rows, `b · nh · t`: the length of `lse` and `dsum` (in usize: the product of
    /// three i32 can pass i32's range).
    fn rows(&self) -> usize {
        self.b as usize * self.nh as usize * self.t as usize
    }
}

/// Whether the CUDA kernel takes this attention: q, k, v on one CUDA device, f32, bf16 or
/// f16, head size at most [`HS_MAX`], the device's shared memory large enough, and the
/// kernel passed its check on this device and dtype (run here the first time). The
/// caller has already declined `LIT_CLAIRE_ATTENTION=plain`.
pub(super) fn serves(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<bool> {
    let Device::Cuda(dev) = q.device() else {
        return Ok(false);
    };
    let hs = q.dim(D::Minus1)?;
    let same = |t: &Tensor| t.device().same_device(q.device()) && t.dtype() == q.dtype();
    // The same rule as the memory plan's (`flash_serves_run`), then the device's.
    if !(super::super::flash_serves_run(true, q.dtype(), hs) && same(k) && same(v)) {
        return Ok(false);
    }
    checked(dev, q.dtype())
}

/// Whether the kernel serves `dtype` on `dev`, decided once per device and dtype and kept:
/// false when the device's shared memory is too small; else the kernels are allowed the
/// shared memory they need and [`self_check`] runs, and a failure is an error.
fn checked(dev: &CudaDevice, dtype: DType) -> Result<bool> {
    type Verdicts = Mutex<HashMap<(DeviceId, DType), std::result::Result<bool, String>>>;
    static DONE: OnceLock<Verdicts> = OnceLock::new();
    let mut done = DONE
        .get_or_init(Default::default)
        .lock()
        .map_err(|_| candle_core::Error::Msg("flash attention: check lock poisoned".into()))?;
    let verdict = match done.get(&(dev.id(), dtype)) {
        Some(v) => v.clone(),
        None => {
            let v = prepare(dev, dtype).map_err(|e| e.to_string());
            done.insert((dev.id(), dtype), v.clone());
            v
        }
    };
    verdict.map_err(|e| {
        candle_core::Error::Msg(format!(
            "the CUDA flash-attention kernel failed its check on this GPU ({dtype:?}): {e}; set LIT_CLAIRE_ATTENTION=plain to train with the plain attention (O(T²) memory) and report this"
        ))
    })
}

/// The first use on a device and dtype: false when the device lacks the shared memory
/// the kernels need at the largest head size; else allow each kernel that much and run
/// [`self_check`].
fn prepare(dev: &CudaDevice, dtype: DType) -> Result<bool> {
    let max = dev
        .cuda_stream()
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .map_err(|e| {
            candle_core::Error::Msg(format!("flash attention: device attribute: {e:?}"))
        })?;
    if (max.max(0) as usize) < Kernel::Dkv.smem(HS_MAX) {
        return Ok(false);
    }
    for kernel in [Kernel::Forward, Kernel::Dq, Kernel::Dkv] {
        let smem = kernel.smem(HS_MAX);
        if smem > SMEM_DEFAULT {
            function(dev, kernel, suffix(dtype)?)?
                .set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem as i32,
                )
                .map_err(|e| {
                    candle_core::Error::Msg(format!(
                        "flash attention (CUDA): {smem} bytes of shared memory: {e:?}"
                    ))
                })?;
        }
    }
    self_check(&Device::Cuda(dev.clone()), dtype)?;
    Ok(true)
}

/// The kernel against the plain attention on `dev`, values and gradients, on two small
/// problems (every mask feature, head sizes 64 and 40, T not a multiple of the tiles).
pub fn self_check(dev: &Device, dtype: DType) -> Result<f32> {
    let tol = super::launch::self_check_tolerance(dtype);
    let cases = [
        // (B, nh, nkv, T, S, hs, q_start, k_start, window, docs)
        (2, 4, 2, 75, 75, 64, 0, 0, 0, true),
        (1, 3, 1, 21, 53, 40, 40, 8, 24, false),
    ];
    let mut worst = 0f32;
    for (i, &(b, nh, nkv, t, s, hs, q_start, k_start, w, docs)) in cases.iter().enumerate() {
        // Drawn on the host from a fixed seed: the check never touches the device's own
        // random state (a resumed run must draw what the original drew).
        let mut rng = ChaCha8Rng::seed_from_u64(17 + i as u64);
        let mut rand = |shape: (usize, usize, usize, usize)| -> Result<Tensor> {
            let n = shape.0 * shape.1 * shape.2 * shape.3;
            let v: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
            Tensor::from_vec(v, shape, dev)?.to_dtype(dtype)
        };
        let (q, k, v) = (
            rand((b, nh, t, hs))?,
            rand((b, nkv, s, hs))?,
            rand((b, nkv, s, hs))?,
        );
        let dout = rand((b, nh, t, hs))?;
        let mask = MaskSpec {
            q_start,
            k_start,
            window: if w > 0 {
                AttentionWindow::Sliding(w)
            } else {
                AttentionWindow::Global
            },
            docs: docs.then(|| {
                (0..b * t)
                    .map(|r| if r % t >= 30 { 30 } else { 0 })
                    .collect::<Vec<u32>>()
                    .into()
            }),
        };
        let scale = 1.0 / (hs as f64).sqrt();
        let p = params(&q, &k, scale, &mask)?;
        let (o, lse) = forward_tensors(&q, &k, &v, p, &mask)?;
        let (dq, dk, dv) = backward(&q, &k, &v, &o, &dout, &lse, p, &mask)?;
        let vars = [
            Var::from_tensor(&q)?,
            Var::from_tensor(&k)?,
            Var::from_tensor(&v)?,
        ];
        let want = super::attention_plain(&vars[0], &vars[1], &vars[2], scale, &mask)?;
        let grads = (want.to_dtype(DType::F32)? * dout.to_dtype(DType::F32)?)?
            .sum_all()?
            .backward()?;
        let grad = |i: usize| {
            grads.get(vars[i].as_tensor()).cloned().ok_or_else(|| {
                candle_core::Error::Msg("flash attention check: no plain gradient".into())
            })
        };
        let (gq, gk, gv) = (grad(0)?, grad(1)?, grad(2)?);
        for (what, got, want) in [
            ("output", &o, &want),
            ("dq", &dq, &gq),
            ("dk", &dk, &gk),
            ("dv", &dv, &gv),
        ] {
            let got = got.to_dtype(DType::F32)?;
            let want = want.to_dtype(DType::F32)?;
            let size = want.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6);
            let diff = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()? / size;
            if !diff.is_finite() || diff > tol {
                candle_core::bail!(
                    "case {i}: {what} differs from the plain attention by {diff:.2e} of its largest value (tolerance {tol:.0e})"
                );
            }
            worst = worst.max(diff);
        }
    }
    Ok(worst)
}

/// The kernel's parameters for `q: (B, nh, T, hs)`, `k: (B, nkv, S, hs)`.
pub(super) fn params(q: &Tensor, k: &Tensor, scale: f64, mask: &MaskSpec) -> Result<Params> {
    let (b, nh, t, hs) = q.dims4()?;
    let (_, nkv, s, _) = k.dims4()?;
    params_of((b, nh, nkv), (t, s, hs), scale, mask)
}

/// The kernel's parameters for batch `b`, `nh` query and `nkv` key/value heads, `t`
/// queries, `s` keys of head size `hs`.
pub(super) fn params_of(
    (b, nh, nkv): (usize, usize, usize),
    (t, s, hs): (usize, usize, usize),
    scale: f64,
    mask: &MaskSpec,
) -> Result<Params> {
    let int = |x: usize, what: &str| -> Result<i32> {
        i32::try_from(x).map_err(|_| {
            candle_core::Error::Msg(format!("flash attention (CUDA): {what} {x} is too large"))
        })
    };
    Ok(Params {
        b: int(b, "batch")?,
        nh: int(nh, "heads")?,
        nkv: int(nkv, "kv heads")?,
        t: int(t, "queries")?,
        s: int(s, "keys")?,
        hs: int(hs, "head size")?,
        q_start: int(mask.q_start, "query offset")?,
        k_start: int(mask.k_start, "key offset")?,
        window: match mask.window {
            AttentionWindow::Global => 0,
            AttentionWindow::Sliding(w) => int(w.max(1), "window")?,
        },
        has_docs: i32::from(mask.docs.is_some()),
        scale: scale as f32,
    })
}

/// A contiguous storage's elements as a view.
fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
    let (a, b) = l.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg(format!("flash attention (CUDA): {what} is not contiguous"))
    })?;
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

/// The document starts on the device (one unused element without documents).
fn docs_on(dev: &CudaDevice, mask: &MaskSpec) -> Result<CudaSlice<u32>> {
    match &mask.docs {
        Some(d) => dev.clone_htod(&d[..]),
        None => dev.alloc_zeros::<u32>(1),
    }
}

/// The function `kernel` for dtype suffix `name` (allowed its shared memory by
/// [`prepare`]).
fn function(dev: &CudaDevice, kernel: Kernel, name: &str) -> Result<CudaFunction> {
    Ok(dev
        .get_or_load_custom_func(&format!("{}_{name}", kernel.name()), MODULE, PTX)?
        .into_cuda_function())
}

/// Threads, blocks and shared memory of `kernel` for the problem `p`.
fn launch_config(kernel: Kernel, p: &Params) -> LaunchConfig {
    let [x, y, z] = kernel.grid(
        p.b as usize,
        p.nh as usize,
        p.nkv as usize,
        p.t as usize,
        p.s as usize,
    );
    LaunchConfig {
        grid_dim: (x, y, z),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: kernel.smem(p.hs as usize) as u32,
    }
}

fn launch_err(e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("flash attention (CUDA): launch failed: {e:?}"))
}

fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        other => candle_core::bail!("flash attention (CUDA): {other:?} is not supported"),
    })
}

/// The forward from storages (`Flash::cuda_fwd`): the output and the row log-sum-exps.
pub(super) fn forward(
    (q, ql): (&CudaStorage, &Layout),
    (k, kl): (&CudaStorage, &Layout),
    (v, vl): (&CudaStorage, &Layout),
    p: Params,
    mask: &MaskSpec,
) -> Result<(CudaStorage, CudaSlice<f32>)> {
    match q.dtype() {
        DType::F32 => forward_t::<f32>((q, ql), (k, kl), (v, vl), p, mask),
        DType::BF16 => forward_t::<half::bf16>((q, ql), (k, kl), (v, vl), p, mask),
        DType::F16 => forward_t::<half::f16>((q, ql), (k, kl), (v, vl), p, mask),
        other => candle_core::bail!("flash attention (CUDA): {other:?} is not supported"),
    }
}

fn forward_t<T: CudaDType + DeviceRepr>(
    (q, ql): (&CudaStorage, &Layout),
    (k, kl): (&CudaStorage, &Layout),
    (v, vl): (&CudaStorage, &Layout),
    p: Params,
    mask: &MaskSpec,
) -> Result<(CudaStorage, CudaSlice<f32>)> {
    let dev = q.device().clone();
    let rows = p.rows();
    let (qv, kv, vv) = (
        view::<T>(q, ql, "q")?,
        view::<T>(k, kl, "k")?,
        view::<T>(v, vl, "v")?,
    );
    let docs = docs_on(&dev, mask)?;
    // SAFETY: the kernel writes every element of o and lse.
    let mut o = unsafe { dev.alloc::<T>(rows * p.hs as usize)? };
    let mut lse = unsafe { dev.alloc::<f32>(rows)? };
    let f = function(&dev, Kernel::Forward, suffix(q.dtype())?)?;
    let cfg = launch_config(Kernel::Forward, &p);
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(&qv)
        .arg(&kv)
        .arg(&vv)
        .arg(&mut o)
        .arg(&mut lse)
        .arg(&docs)
        .arg(&p);
    // SAFETY: the arguments match the kernel's signature; the views and buffers hold
    // the sizes `p` describes (checked by flash_op and the allocations above).
    unsafe { b.launch(cfg) }.map_err(launch_err)?;
    Ok((CudaStorage::wrap_cuda_slice(o, dev), lse))
}

/// A new tensor of `shape` on `dev` from a kernel's output.
fn tensor<T: CudaDType>(s: CudaSlice<T>, dev: &CudaDevice, shape: &[usize]) -> Tensor {
    Tensor::from_storage(
        Storage::Cuda(CudaStorage::wrap_cuda_slice(s, dev.clone())),
        shape,
        BackpropOp::none(),
        false,
    )
}

/// The forward on tensors (for [`self_check`]): `(o, lse)`.
fn forward_tensors(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    p: Params,
    mask: &MaskSpec,
) -> Result<(Tensor, Tensor)> {
    let Device::Cuda(dev) = q.device() else {
        candle_core::bail!("flash attention (CUDA): q is not on a CUDA device")
    };
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (Storage::Cuda(qs), Storage::Cuda(ks), Storage::Cuda(vs)) = (&*qs, &*ks, &*vs) else {
        candle_core::bail!("flash attention (CUDA): q, k, v must be CUDA tensors")
    };
    let (o, lse) = forward((qs, ql), (ks, kl), (vs, vl), p, mask)?;
    let o = Tensor::from_storage(Storage::Cuda(o), q.shape(), BackpropOp::none(), false);
    Ok((o, tensor(lse, dev, &[p.rows()])))
}

/// `(dq, dk, dv)` from the forward's inputs, output, row log-sum-exps `lse` and `dout`.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    dout: &Tensor,
    lse: &Tensor,
    p: Params,
    mask: &MaskSpec,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (o, dout) = (o.contiguous()?, dout.contiguous()?);
    match q.dtype() {
        DType::F32 => backward_t::<f32>(q, k, v, &o, &dout, lse, p, mask),
        DType::BF16 => backward_t::<half::bf16>(q, k, v, &o, &dout, lse, p, mask),
        DType::F16 => backward_t::<half::f16>(q, k, v, &o, &dout, lse, p, mask),
        other => candle_core::bail!("flash attention (CUDA): {other:?} is not supported"),
    }
}

#[allow(clippy::too_many_arguments)]
fn backward_t<T: CudaDType + DeviceRepr>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    dout: &Tensor,
    lse: &Tensor,
    p: Params,
    mask: &MaskSpec,
) -> Result<(Tensor, Tensor, Tensor)> {
    let Device::Cuda(dev) = q.device() else {
        candle_core::bail!("flash attention (CUDA): q is not on a CUDA device")
    };
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let guards = [&q, &k, &v, dout, lse, o].map(|t| t.storage_and_layout());
    let mut s = Vec::with_capacity(6);
    for (g, l) in &guards {
        let Storage::Cuda(c) = &**g else {
            candle_core::bail!("flash attention (CUDA): the backward's tensors must be on CUDA")
        };
        s.push((c, *l));
    }
    let (qv, kv, vv, dov) = (
        view::<T>(s[0].0, s[0].1, "q")?,
        view::<T>(s[1].0, s[1].1, "k")?,
        view::<T>(s[2].0, s[2].1, "v")?,
        view::<T>(s[3].0, s[3].1, "dout")?,
    );
    let (lv, ov) = (
        view::<f32>(s[4].0, s[4].1, "lse")?,
        view::<T>(s[5].0, s[5].1, "o")?,
    );
    let docs = docs_on(dev, mask)?;
    let name = suffix(q.dtype())?;
    // SAFETY: the kernels write every element of dsum, dq, dk and dv.
    let mut dsum = unsafe { dev.alloc::<f32>(p.rows())? };
    let mut dq = unsafe { dev.alloc::<T>(q.elem_count())? };
    let mut dk = unsafe { dev.alloc::<T>(k.elem_count())? };
    let mut dv = unsafe { dev.alloc::<T>(v.elem_count())? };
    let stream = dev.cuda_stream();

    // D = rowsum(dO ⊙ O), one f32 per query row, which both kernels after it read.
    {
        let f = function(dev, Kernel::Dsum, name)?;
        let cfg = launch_config(Kernel::Dsum, &p);
        let mut b = stream.launch_builder(&f);
        b.arg(&ov).arg(&dov).arg(&mut dsum).arg(&p);
        // SAFETY: as in forward_t.
        unsafe { b.launch(cfg) }.map_err(launch_err)?;
    }

    let f = function(dev, Kernel::Dq, name)?;
    let cfg = launch_config(Kernel::Dq, &p);
    let mut b = stream.launch_builder(&f);
    b.arg(&qv).arg(&kv).arg(&vv).arg(&dov).arg(&lv).arg(&dsum);
    b.arg(&mut dq).arg(&docs).arg(&p);
    // SAFETY: as in forward_t.
    unsafe { b.launch(cfg) }.map_err(launch_err)?;

    let f = function(dev, Kernel::Dkv, name)?;
    let cfg = launch_config(Kernel::Dkv, &p);
    let mut b = stream.launch_builder(&f);
    b.arg(&qv).arg(&kv).arg(&vv).arg(&dov).arg(&lv).arg(&dsum);
    b.arg(&mut dk).arg(&mut dv).arg(&docs).arg(&p);
    // SAFETY: as in forward_t.
    unsafe { b.launch(cfg) }.map_err(launch_err)?;
    drop(guards);
    Ok((
        tensor(dq, dev, q.dims()),
        tensor(dk, dev, k.dims()),
        tensor(dv, dev, v.dims()),
    ))
}
