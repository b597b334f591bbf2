#!/usr/bin/env bash
# Build the release binary with `--features cuda` for utils/device_check.sh, on a machine
# without a GPU: the CUDA 13.0 toolchain and libraries come from PyPI wheels
# (utils/cuda_toolchain.sh --libs, libcuda from a stub), the binary is stripped and
# xz-compressed into device-bin/lit-claire.xz (~15 MB; stripped it is ~75 MB, over the
# 64 MiB a GPU session carries). List device-bin/ in .git/info/exclude and carry it.
#
#     utils/build_device_bin.sh          # ~90 min on 2 busy cores the first time
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=cuda_toolchain.sh
source utils/cuda_toolchain.sh --libs
# Its own target folder: the stub's RUSTFLAGS would rebuild the normal one.
target="${XDG_CACHE_HOME:-$HOME/.cache}/lit-claire/target-cuda-release"
CARGO_TARGET_DIR="$target" cargo build --release --features cuda --bin lit-claire
mkdir -p device-bin
strip -o device-bin/lit-claire.partial "$target/release/lit-claire"
xz -T0 -6 -c device-bin/lit-claire.partial >device-bin/lit-claire.xz.partial
mv device-bin/lit-claire.xz.partial device-bin/lit-claire.xz
rm -f device-bin/lit-claire.partial device-bin/lit-claire
ls -l device-bin/lit-claire.xz
echo "carry device-bin; on the GPU machine: utils/device_check.sh --bin device-bin/lit-claire --out \"\$OUT\""
