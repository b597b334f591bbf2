# The CUDA 13.0 toolchain from PyPI wheels, for building lit-claire with `--features cuda`
# on a machine without a CUDA install (and without a GPU). Source it from bash:
#
#     source utils/cuda_toolchain.sh          # nvcc & headers: enough for `cargo check`
#     source utils/cuda_toolchain.sh --libs   # + the libraries to link a binary
#
# It installs the wheels once into ${XDG_CACHE_HOME:-$HOME/.cache}/lit-claire/cuda-13.0
# (about 270 MB, 900 MB with --libs; reused afterwards) and exports PATH, CUDA_HOME,
# CUDA_PATH, CUDA_ROOT and CUDA_COMPUTE_CAP (default 90, H100/H200) for candle-kernels'
# and cudarc's build scripts. Everything is pinned to CUDA 13.0: the GPU machines' driver
# (580) runs CUDA 13.0, and PTX from a newer nvcc would not load there.
#
# On failure it prints one line saying what is missing and returns 1.

lit_claire_cuda_toolchain() {
    local want_libs=0
    [ "${1:-}" = "--libs" ] && want_libs=1
    local cache="${XDG_CACHE_HOME:-$HOME/.cache}/lit-claire/cuda-13.0"
    local root="$cache/nvidia/cu13"
    local compiler=(
        nvidia-cuda-nvcc==13.0.88   # bin/nvcc, cudafe++, ptxas, nvlink, fatbinary
        nvidia-nvvm==13.0.88        # nvvm/bin/cicc, libdevice
        nvidia-cuda-crt==13.0.88    # include/crt
        nvidia-cuda-runtime==13.0.96  # cuda_runtime.h, cuda_bf16.h, libcudart.so.13
        nvidia-cuda-cccl==13.0.85   # include/cccl (cub, thrust, libcu++)
    )
    local libs=(
        nvidia-cublas==13.0.2.14
        nvidia-curand==10.4.0.35
        nvidia-cuda-nvrtc==13.0.88
        nvidia-nccl-cu13==2.28.9
    )
    local pip=(python3 -m pip)
    if ! "${pip[@]}" --version >/dev/null 2>&1; then
        if command -v pip3 >/dev/null; then pip=(pip3); else
            echo "error: the CUDA toolchain comes from PyPI wheels and needs pip: install python3-pip (apt-get install python3-pip)" >&2
            return 1
        fi
    fi
    # One folder per set of wheels, installed whole or not at all (a stamp file marks
    # it complete), so an interrupted install is redone instead of half-used.
    _lit_claire_wheels() {
        local dest="$1" stamp="$1/.installed"; shift
        local want="$*"
        [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && return 0
        echo "installing CUDA wheels into $dest: $want" >&2
        rm -rf "$dest.partial"
        if ! "${pip[@]}" install --quiet --no-deps --no-cache-dir --disable-pip-version-check \
            --no-warn-script-location --target "$dest.partial" "$@" >&2; then
            rm -rf "$dest.partial"
            echo "error: could not install the CUDA wheels ($want) from PyPI into $dest; is PyPI reachable (pip config, proxy)?" >&2
            return 1
        fi
        rm -rf "$dest" && mv "$dest.partial" "$dest" && echo "$want" >"$stamp"
    }
    _lit_claire_wheels "$cache" "${compiler[@]}" || return 1
    if [ ! -x "$root/bin/nvcc" ] || ! "$root/bin/nvcc" --version >/dev/null 2>&1; then
        echo "error: $root/bin/nvcc is missing or does not run; delete $cache and source this again" >&2
        return 1
    fi
    export PATH="$root/bin:$PATH"
    export CUDA_HOME="$root" CUDA_PATH="$root" CUDA_ROOT="$root"
    export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
    if [ "$want_libs" = 1 ]; then
        local libroot="$cache-libs"
        _lit_claire_wheels "$libroot" "${libs[@]}" || return 1
        # The linker wants lib<name>.so; the wheels ship lib<name>.so.<major> only.
        # libcuda comes with the GPU driver, not a wheel: link against a stub with its
        # soname (libcuda.so.1) that defines the driver functions cudarc calls, so the
        # binary loads the real one at run time.
        local stub="$libroot/link"
        mkdir -p "$stub"
        local so
        for so in "$root"/lib/lib*.so.* "$libroot"/nvidia/*/lib/lib*.so.*; do
            [ -e "$so" ] || continue
            local base; base="$(basename "$so")"
            ln -sf "$so" "$stub/${base%%.so.*}.so"
        done
        if [ ! -f "$stub/libcuda.so" ] || [ "$stub/libcuda.so" -ot "${BASH_SOURCE[0]}" ]; then
            local sys; sys="$(ls -d "$HOME"/.cargo/registry/src/*/cudarc-0.19.*/src/driver/sys 2>/dev/null | tail -1)"
            if [ -z "$sys" ]; then
                echo "error: cudarc's sources are not in ~/.cargo/registry (run \`cargo fetch\` first): they list the driver functions for the libcuda stub" >&2
                return 1
            fi
            grep -rhoE '\bpub (unsafe )?fn cu[A-Za-z0-9_]+' "$sys" | awk '{print $NF}' | sort -u |
                sed 's/.*/void &(void) {}/' >"$stub/libcuda_stub.c"
            cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub/libcuda.so" "$stub/libcuda_stub.c" || {
                echo "error: could not build the libcuda stub with cc in $stub" >&2
                return 1
            }
        fi
        export LIBRARY_PATH="$stub${LIBRARY_PATH:+:$LIBRARY_PATH}"
        export RUSTFLAGS="${RUSTFLAGS:-} -L native=$stub"
    fi
}
lit_claire_cuda_toolchain "$@"
