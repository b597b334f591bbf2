//! With the `cuda` feature: compile the CUDA flash-attention kernels
//! (src/model/fused/flash/kernel/flash.cu) to PTX with nvcc, as candle does its own kernels.
//! The PTX is loaded by the driver at run time (src/model/fused/flash/cuda.rs).
//! `CUDA_COMPUTE_CAP` (e.g. 90) picks the virtual architecture, default 75 (the oldest
//! CUDA 13 compiles for; the driver compiles it on for newer GPUs). `NVCC`, then
//! `$CUDA_ROOT/bin/nvcc`, then `nvcc` on PATH is the compiler.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src/model/fused/flash/kernel/flash.cu");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=NVCC");
    println!("cargo::rerun-if-env-changed=CUDA_ROOT");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out =
        PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("flash.ptx");
    let cap = std::env::var("CUDA_COMPUTE_CAP")
        .ok()
        .map(|c| c.trim().trim_start_matches("sm_").replace('.', ""))
        .filter(|c| !c.is_empty() && c.chars().all(|ch| ch.is_ascii_digit()))
        .unwrap_or_else(|| "75".into());
    let nvcc = std::env::var_os("NVCC")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("CUDA_ROOT")
                .map(|r| PathBuf::from(r).join("bin/nvcc"))
                .filter(|p| p.exists())
        })
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("-o")
        .arg(&out)
        .arg("src/model/fused/flash/kernel/flash.cu")
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!(
            "{} failed ({s}) compiling src/model/fused/flash/kernel/flash.cu for compute_{cap}",
            nvcc.display()
        ),
        Err(e) => panic!(
            "the cuda feature needs nvcc: {} could not run ({e}); put it on PATH or set NVCC (utils/cuda_toolchain.sh installs one)",
            nvcc.display()
        ),
    }
}
