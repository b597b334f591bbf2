#!/usr/bin/env bash
# One alternating run of lit-claire's training bench and PyTorch's on the same shape:
# ours, PyTorch, ours, PyTorch, ... (ROUNDS pairs), each mode in its own processes so
# that each peak RSS is that mode's. The load average is printed before each run.
#
#   utils/bench_compare.sh [--rounds N] [--bin PATH] -- BENCH_FLAGS...
#   utils/bench_compare.sh --rounds 2 -- --layers 30 --width 576 --heads 9 --kv-heads 3 \
#       --intermediate 1536 --vocab 49152 --batch 1 --seq 2048 --mode lora --lora-r 8 \
#       --lora-targets q,v --warmup 1 --steps 2
#
# BENCH_FLAGS are the flags both benches take (utils/bench_torch.py and
# `lit-claire bench`); --mode must be full or lora. Flags only ours takes go after
# `--ours`: ... --mode full --ours --activation-checkpointing 1
#
# The last line sums the run up: the speed ratio of each round (ours / PyTorch's
# tokens/s) and that of the mean tokens/s over the rounds.
set -euo pipefail
rounds=2
bin=target/release/lit-claire
while [[ $# -gt 0 ]]; do
    case "$1" in
        --rounds) rounds=$2; shift 2 ;;
        --bin) bin=$2; shift 2 ;;
        --) shift; break ;;
        *) echo "usage: $0 [--rounds N] [--bin PATH] -- BENCH_FLAGS... [--ours OUR_FLAGS...]" >&2; exit 2 ;;
    esac
done
common=()
ours=()
while [[ $# -gt 0 ]]; do
    if [[ "$1" == "--ours" ]]; then shift; ours=("$@"); break; fi
    common+=("$1"); shift
done
threads=${RAYON_NUM_THREADS:-$(nproc)}
python=${PYTHON:-python3}
[[ -x "$bin" ]] || { echo "error: $bin not found: build it with cargo build --release" >&2; exit 1; }
tokens_per_s() { sed -n 's/.*: \([0-9.]*\) tokens\/s.*/\1/p' | tail -1; }
speeds=()
for r in $(seq 1 "$rounds"); do
    echo "# round $r, load $(cut -d' ' -f1 /proc/loadavg)"
    out=$(RAYON_NUM_THREADS=$threads "$bin" bench "${common[@]}" "${ours[@]}" --peak-gflops 1)
    # --peak-gflops 1 skips measuring the peak, so MFU would read as GFLOP/s: drop it.
    sed 's/, MFU [0-9.]*%//; s/^/lit-claire  /' <<<"$out"
    a=$(tokens_per_s <<<"$out")
    echo "# round $r, load $(cut -d' ' -f1 /proc/loadavg)"
    out=$("$python" utils/bench_torch.py "${common[@]}" --threads "$threads" | grep -v '^peak')
    sed 's/^/pytorch     /' <<<"$out"
    speeds+=("${a:-0} $(tokens_per_s <<<"$out")")
done
printf '%s\n' "${speeds[@]}" | awk '{ o += $1; p += $2; r = r sprintf(" %.2f", ($2 > 0) ? $1 / $2 : 0) }
    END { printf "# speed ratio per round:%s; mean tokens/s %.0f vs %.0f, ratio %.2f\n", r, o / NR, p / NR, (p > 0) ? o / p : 0 }'
