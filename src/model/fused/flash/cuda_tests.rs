//! The CUDA kernel's source (`cuda/flash.cu`), run on the CPU by `cuda/emulate.h` with
//! the launch geometry of `launch.rs`, against the definition of masked attention:
//! values and gradients, f32 within 1e-5 of the largest value, bf16 and f16 within their
//! rounding. The emulator runs each block's threads one at a time, switching at barriers,
//! in two orders whose results must agree bit for bit (a missing `__syncthreads` or two
//! blocks writing one element shows as a difference); shared memory and outputs start as
//! NaN (an element no thread writes, or a read of shared memory no thread wrote, shows);
//! a barrier not every thread reaches and a write past the shared memory stop it.
//! `cuda/emulate_selftest.cpp` checks that the emulator finds each of these. Needs Linux
//! (ucontext) and a C++20 compiler (`CXX`, else g++); no GPU.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::launch::{Kernel, THREADS, self_check_tolerance};
use super::tests::{reference, rel_close};
use super::*;

/// `src/model/fused/flash/kernel/{source}` compiled into `dir`, with `extra` flags.
fn compile(dir: &Path, source: &str, extra: &[&str]) -> PathBuf {
    let bin = dir.join(source.trim_end_matches(".cpp"));
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/model/fused/flash/kernel");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    let out = Command::new(&cxx)
        .args(["-std=c++20", "-O2", "-Wall", "-Wextra", "-Werror"])
        .args(extra)
        .arg("-o")
        .arg(&bin)
        .arg(src.join(source))
        .output()
        .unwrap_or_else(|e| panic!("{cxx} (a C++20 compiler) could not run: {e}"));
    assert!(
        out.status.success(),
        "{cxx} failed on {source}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    bin
}

/// The emulator, compiled once per test run.
fn emulator() -> &'static Path {
    static BIN: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, bin) = BIN.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let bin = compile(dir.path(), "emulate_main.cpp", &[]);
        (dir, bin)
    });
    bin
}

/// Flags of the sanitized emulator: every out-of-bounds access to an input, output or
/// shared memory and every undefined operation of the kernels stops it.
const SANITIZERS: [&str; 3] = [
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=all",
    "-fno-omit-frame-pointer",
];

#[derive(Clone, Copy)]
struct Case {
    dtype: DType,
    b: usize,
    nh: usize,
    nkv: usize,
    t: usize,
    /// Keys; 0: as many as queries.
    s: usize,
    hs: usize,
    q_start: usize,
    window: usize,
    docs: bool,
}

const BASE: Case = Case {
    dtype: DType::F32,
    b: 2,
    nh: 4,
    nkv: 2,
    t: 40,
    s: 0,
    hs: 16,
    q_start: 0,
    window: 0,
    docs: false,
};

/// Values rounded to `dtype` (as the kernel reads them), kept in f32.
fn rounded(v: Vec<f32>, shape: (usize, usize, usize, usize), dtype: DType) -> Tensor {
    Tensor::from_vec(v, shape, &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .and_then(|t| t.to_dtype(DType::F32))
        .unwrap()
}

fn run(emulator: &Path, c: &Case, seed: u64) {
    let c = &Case {
        s: if c.s == 0 { c.t } else { c.s },
        ..*c
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut randn = |shape: (usize, usize, usize, usize)| {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
        rounded(v, shape, c.dtype)
    };
    let q = randn((c.b, c.nh, c.t, c.hs));
    let k = randn((c.b, c.nkv, c.s, c.hs));
    let v = randn((c.b, c.nkv, c.s, c.hs));
    let dout = randn((c.b, c.nh, c.t, c.hs));
    // As the KV cache uses them: the last query sits on the last key.
    let k_start = c.q_start + c.t - c.s;
    let docs: Option<Vec<u32>> = c.docs.then(|| {
        let mut d = Vec::new();
        for _ in 0..c.b {
            let mut start = 0;
            for i in 0..c.t {
                if rng.random_bool(0.08) {
                    start = c.q_start + i;
                }
                d.push(start as u32);
            }
        }
        d
    });
    let scale = 1.0 / (c.hs as f64).sqrt();

    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in"), dir.path().join("out"));
    let mut bytes = Vec::new();
    let code = match c.dtype {
        DType::F32 => 0,
        DType::BF16 => 1,
        _ => 2,
    };
    let header = [
        code,
        c.b,
        c.nh,
        c.nkv,
        c.t,
        c.s,
        c.hs,
        c.q_start,
        k_start,
        c.window,
        usize::from(docs.is_some()),
    ];
    for h in header {
        bytes.extend((h as i32).to_le_bytes());
    }
    // The geometry cuda.rs launches with.
    for kernel in Kernel::ALL {
        let grid = kernel.grid(c.b, c.nh, c.nkv, c.t, c.s);
        let launch = [grid[0], grid[1], grid[2], THREADS, kernel.smem(c.hs) as u32];
        for x in launch {
            bytes.extend((x as i32).to_le_bytes());
        }
    }
    bytes.extend((scale as f32).to_le_bytes());
    for t in [&q, &k, &v, &dout] {
        for x in t.flatten_all().unwrap().to_vec1::<f32>().unwrap() {
            bytes.extend(x.to_le_bytes());
        }
    }
    for d in docs.iter().flatten() {
        bytes.extend(d.to_le_bytes());
    }
    std::fs::write(&input, bytes).unwrap();
    let out = Command::new(emulator)
        .arg(&input)
        .arg(&output)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Vec<f32> = std::fs::read(&output)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let (nq, nk, rows) = (q.elem_count(), k.elem_count(), c.b * c.nh * c.t);
    assert_eq!(
        got.len(),
        2 * nq + 2 * rows + 2 * nk,
        "emulator output size"
    );
    let part = |from: usize, len: usize, dims: &[usize]| {
        Tensor::from_vec(got[from..from + len].to_vec(), dims, &Device::Cpu).unwrap()
    };
    let o = part(0, nq, q.dims());
    let dsum = part(nq + rows, rows, &[c.b, c.nh, c.t]);
    let dq = part(nq + 2 * rows, nq, q.dims());
    let dk = part(2 * nq + 2 * rows, nk, k.dims());
    let dv = part(2 * nq + 2 * rows + nk, nk, k.dims());

    let mask = MaskSpec {
        q_start: c.q_start,
        k_start,
        window: if c.window > 0 {
            AttentionWindow::Sliding(c.window)
        } else {
            AttentionWindow::Global
        },
        docs: docs.map(Into::into),
    };
    let vars = [&q, &k, &v].map(|t| Var::from_tensor(t).unwrap());
    let want = reference(
        vars[0].as_tensor(),
        vars[1].as_tensor(),
        vars[2].as_tensor(),
        scale,
        &mask,
    );
    let grads = (&want * &dout)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let tol = match c.dtype {
        DType::F32 => 1e-5,
        DType::F16 => 2e-3,
        _ => 1e-2,
    };
    let what = |x: &str| {
        format!(
            "{x} ({:?} b{} nh{} nkv{} t{} s{} hs{} q_start{} window{} docs{})",
            c.dtype, c.b, c.nh, c.nkv, c.t, c.s, c.hs, c.q_start, c.window, c.docs
        )
    };
    rel_close(&what("output"), &o, &want, tol);
    let want_dsum = (&dout * &want).unwrap().sum(3).unwrap();
    rel_close(&what("dsum"), &dsum, &want_dsum, tol);
    for (name, got, var) in [
        ("dq", &dq, &vars[0]),
        ("dk", &dk, &vars[1]),
        ("dv", &dv, &vars[2]),
    ] {
        rel_close(&what(name), got, grads.get(var.as_tensor()).unwrap(), tol);
    }
    if c.dtype != DType::F32 {
        // What the check before a GPU's first use compares: the plain attention computed
        // in the dtype. The kernel must pass it with room to spare (half its tolerance).
        let low = [&q, &k, &v].map(|t| Var::from_tensor(&t.to_dtype(c.dtype).unwrap()).unwrap());
        let plain = attention_plain(
            low[0].as_tensor(),
            low[1].as_tensor(),
            low[2].as_tensor(),
            scale,
            &mask,
        )
        .unwrap();
        let g = (plain.to_dtype(DType::F32).unwrap() * &dout)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let f32_of = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let margin = self_check_tolerance(c.dtype) / 2.0;
        rel_close(&what("output vs plain"), &o, &f32_of(&plain), margin);
        for (name, got, var) in [
            ("dq", &dq, &low[0]),
            ("dk", &dk, &low[1]),
            ("dv", &dv, &low[2]),
        ] {
            let want = f32_of(g.get(var.as_tensor()).unwrap());
            rel_close(&what(&format!("{name} vs plain")), got, &want, margin);
        }
    }
}

/// Shapes that cover every path of the kernels.
const CASES: [Case; 10] = [
    // Causal, T not a multiple of the 32-row tiles, GQA 2:1.
    Case { t: 70, ..BASE },
    // Head size not a multiple of 8 (the threads' column stride), one kv head (MQA).
    Case {
        t: 45,
        hs: 24,
        nkv: 1,
        ..BASE
    },
    // Windows shorter and longer than a tile, head size 64.
    Case {
        t: 67,
        hs: 64,
        window: 5,
        ..BASE
    },
    Case {
        t: 80,
        nh: 3,
        nkv: 3,
        window: 40,
        ..BASE
    },
    // Packed documents.
    Case {
        t: 75,
        docs: true,
        ..BASE
    },
    // Queries after cached keys (generation), with and without a window.
    Case {
        t: 9,
        s: 41,
        q_start: 32,
        ..BASE
    },
    Case {
        t: 20,
        s: 50,
        q_start: 70,
        window: 16,
        ..BASE
    },
    // The largest head size the kernel takes.
    Case {
        b: 1,
        nh: 2,
        nkv: 1,
        t: 35,
        hs: 128,
        ..BASE
    },
    // bf16 and f16 storage, f32 arithmetic.
    Case {
        dtype: DType::BF16,
        t: 45,
        hs: 32,
        docs: true,
        ..BASE
    },
    Case {
        dtype: DType::F16,
        t: 45,
        hs: 32,
        window: 7,
        ..BASE
    },
];

/// Every case of [`CASES`] through `emulator`, each with its own seed.
fn run_cases(emulator: &Path) {
    for (i, c) in CASES.iter().enumerate() {
        run(emulator, c, 100 + i as u64);
    }
}

#[test]
fn cuda_kernel_source_matches_the_definition_in_emulation() {
    run_cases(emulator());
}

/// The same with the emulator built with AddressSanitizer and UndefinedBehaviorSanitizer
/// (4–5× slower; needs g++'s libasan and libubsan). ASan warns once per run that it
/// does not fully support swapcontext; it reported nothing on these shapes.
#[test]
#[ignore = "the emulator under C++ sanitizers: slower, needs libasan and libubsan"]
fn cuda_kernel_source_under_sanitizers() {
    let dir = tempfile::tempdir().unwrap();
    run_cases(&compile(dir.path(), "emulate_main.cpp", &SANITIZERS));
}

/// The emulator finds what the test above relies on it to find, each with its own exit
/// status and message: races between threads and between blocks (5), a barrier not every
/// thread reaches (4), a write past the shared memory (3); and runs a correct exchange
/// through shared memory and shuffles to the expected values under both orders (0).
#[test]
fn cuda_emulator_finds_races_stuck_barriers_and_overflows() {
    let dir = tempfile::tempdir().unwrap();
    let bin = compile(dir.path(), "emulate_selftest.cpp", &[]);
    for (case, status, says) in [
        ("ordered", 0, ""),
        (
            "race",
            5,
            "out element 0 is nan with threads and blocks in order, 101",
        ),
        (
            "blocks",
            5,
            "out element 0 is 1 with threads and blocks in order, 0",
        ),
        (
            "diverge",
            4,
            "ended, 32 wait at __syncthreads, 0 at a warp shuffle",
        ),
        (
            "shuffle",
            4,
            "ended, 0 wait at __syncthreads, 32 at a warp shuffle",
        ),
        ("overflow", 3, "wrote past its 256 bytes of shared memory"),
    ] {
        let out = Command::new(&bin).arg(case).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(status), "{case}: {stderr}");
        assert!(stderr.contains(says), "{case}: {stderr}");
    }
}
