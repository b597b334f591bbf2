#!/usr/bin/env bash
# The GPU checks of lit-claire, for a GPU machine that has CUDA's libraries and NCCL in
# its Python site-packages (nvidia/*/lib, as PyTorch's wheels install them) but no Rust
# and no network. It runs a release binary built elsewhere with `--features cuda` (see
# docs/cuda.md, "Checking a GPU machine"):
#
#     utils/device_check.sh [--bin device-bin/lit-claire] [--out DIR] [--device cuda:0]
#
# (`--bin PATH` also takes `PATH.xz`, as utils/build_device_bin.sh writes it.)
#
#   1. reference  losses of the six reference checkpoints (tests/fixtures/reference) in
#                 32-true against PyTorch's                   → reference.jsonl
#   2. bench      bf16-true training of a ~1.1B-parameter LLaMA shape: tokens/s, MFU, and
#                 peak GPU memory sampled with nvidia-smi     → bench.jsonl, gpu_memory.csv
#   3. attention  the flash kernel against the plain attention, values and gradients,
#                 then both timed at 32 heads × 2048 tokens × 128, f32 and bf16
#                                                             → attention.jsonl
#   4. nccl       NCCL init, every collective checked, all-reduce bandwidth (world size 1);
#                 the backward's queued reductions on NCCL's side stream checked against
#                 known values while candle's stream is busy around them; again with
#                 LIT_CLAIRE_NCCL_SIDE_STREAM=0 (one stream)
#                                                             → nccl.json, nccl-one-stream.json
#   5. watchdog   an NCCL all-reduce behind a stream held on the GPU never completes: the
#                 watchdog must abort the communicator and stop the process within
#                 --collective-timeout, exit status 1, one line naming the collective
#                 and the step                                → watchdog.log
#   6. fsdp       4 steps of pretrain on the tiny LLaMA reference checkpoint in 32-true,
#                 --strategy ddp then --strategy fsdp on one rank (fsdp's sharded code,
#                 every shard whole), then fsdp under torchrun's variables (NCCL, one
#                 rank): every step's loss within 1e-5 relative of ddp's
#                                                             → fsdp.json, fsdp/
# Everything goes to DIR (default $OUT, else out/device-check): one log per step and
# summary.txt. Each step has a time limit; the exit code is non-zero if any failed.
# `--device cpu` runs the same steps on the CPU with a small shape (to test the script).
set -uo pipefail
cd "$(dirname "$0")/.."

BIN=device-bin/lit-claire
DIR=${OUT:-out/device-check}
DEVICE=cuda:0
STEP_TIMEOUT=${STEP_TIMEOUT:-600}
usage="usage: utils/device_check.sh [--bin PATH] [--out DIR] [--device cuda:N|cpu]"
while [ $# -gt 0 ]; do
    case "$1" in
        --bin) BIN=${2:?--bin needs a path}; shift 2 ;;
        --out) DIR=${2:?--out needs a folder}; shift 2 ;;
        --device) DEVICE=${2:?--device needs cuda:N or cpu}; shift 2 ;;
        -h|--help) echo "$usage"; exit 0 ;;
        *) echo "error: unknown argument $1; $usage" >&2; exit 2 ;;
    esac
done
case "$DEVICE" in
    cpu|cuda|cuda:[0-9]*) ;;
    *) echo "error: --device $DEVICE: expected cuda:N or cpu" >&2; exit 2 ;;
esac
# A stripped CUDA binary is ~75 MB, more than the 64 MiB a GPU session may carry:
# utils/build_device_bin.sh ships it xz-compressed (~15 MB); unpack it beside the results.
if [ ! -x "$BIN" ] && [ -f "$BIN.xz" ]; then
    mkdir -p "$DIR" || { echo "error: cannot create $DIR" >&2; exit 2; }
    unpacked="$DIR/bin/lit-claire"
    mkdir -p "$DIR/bin"
    if command -v xz >/dev/null; then
        xz -dc "$BIN.xz" >"$unpacked.partial"
    else
        python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$BIN.xz" "$unpacked.partial"
    fi || { echo "error: could not unpack $BIN.xz (needs xz or python3)" >&2; exit 2; }
    chmod +x "$unpacked.partial" && mv "$unpacked.partial" "$unpacked"
    BIN=$unpacked
fi
if [ ! -x "$BIN" ]; then
    echo "error: $BIN is not an executable lit-claire; build it with --features cuda as docs/cuda.md's \"Checking a GPU machine\" says, or pass --bin" >&2
    exit 2
fi
mkdir -p "$DIR" || { echo "error: cannot create $DIR" >&2; exit 2; }
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")
SUMMARY="$DIR/summary.txt"
: >"$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }

# CUDA's and NCCL's libraries from the Python wheels (nvidia/<lib>/lib, nvidia/cu13/lib).
python=$(command -v python3 || command -v python || true)
sites=()
if [ -n "$python" ]; then
    mapfile -t sites < <("$python" -c 'import site; print("\n".join(site.getsitepackages() + [site.getusersitepackages()]))' 2>/dev/null)
fi
sites+=(/usr/lib/python3*/site-packages /usr/local/lib/python3*/dist-packages /usr/local/lib/python3*/site-packages)
libdirs=""
for s in "${sites[@]}"; do
    for d in "$s"/nvidia/*/lib; do
        [ -d "$d" ] && case ":$libdirs:" in *":$d:"*) ;; *) libdirs="$libdirs${libdirs:+:}$d" ;; esac
    done
done
export LD_LIBRARY_PATH="$libdirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
{
    echo "date: $(date -u +%FT%TZ)"
    echo "binary: $BIN"
    echo "device: $DEVICE"
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    command -v nvidia-smi >/dev/null && nvidia-smi
    echo "== ldd"
    ldd "$BIN"
} >"$DIR/environment.txt" 2>&1
if [ "$DEVICE" != cpu ] && ldd "$BIN" | grep -q "not found"; then
    note "warning: libraries not found (see environment.txt): $(ldd "$BIN" | awk '/not found/ {print $1}' | tr '\n' ' ')"
fi

failed=0
# step NAME OUTPUT COMMAND...: run with a time limit, stdout to OUTPUT, stderr to NAME.log.
step() {
    local name=$1 output=$2; shift 2
    local t0=$SECONDS
    timeout --kill-after=10 "$STEP_TIMEOUT" "$@" >"$DIR/$output" 2>"$DIR/$name.log"
    local rc=$?
    if [ $rc -eq 0 ]; then
        note "PASS $name ($((SECONDS - t0)) s)"
    else
        [ $rc -eq 124 ] && echo "timed out after $STEP_TIMEOUT s" >>"$DIR/$name.log"
        note "FAIL $name (exit $rc, $((SECONDS - t0)) s): $(tail -n 1 "$DIR/$name.log")"
        failed=1
    fi
}

# 1. Parity with PyTorch on the device, full precision.
step reference reference.jsonl "$BIN" reference-check --fixtures tests/fixtures/reference \
    --device "$DEVICE" --precision 32-true

# 2. Throughput of full training in bf16 on a TinyLlama-1.1B shape (22 layers, width
#    2048, 32 heads, vocabulary 32000, 2048-token sequences), peak memory sampled.
if [ "$DEVICE" = cpu ]; then
    shape=(--layers 2 --width 128 --heads 4 --vocab 1024 --seq 64 --batch 2 --warmup 1 --steps 2)
else
    shape=(--layers 22 --width 2048 --heads 32 --vocab 32000 --seq 2048 --batch 4 --warmup 2 --steps 5)
fi
sampler=""
if [ "$DEVICE" != cpu ] && command -v nvidia-smi >/dev/null; then
    index=${DEVICE#cuda}; index=${index#:}; index=${index:-0}
    nvidia-smi -i "$index" --query-gpu=timestamp,memory.used,utilization.gpu \
        --format=csv,noheader,nounits -lms 200 >"$DIR/gpu_memory.csv" 2>/dev/null &
    sampler=$!
fi
step bench bench.jsonl "$BIN" bench --mode full --precision bf16-true --device "$DEVICE" --json "${shape[@]}"
if [ -n "$sampler" ]; then
    kill "$sampler" 2>/dev/null
    wait "$sampler" 2>/dev/null
    peak=$(awk -F', *' '$2+0 > m {m = $2+0} END {print m+0}' "$DIR/gpu_memory.csv")
    note "peak GPU memory during bench: $peak MiB"
fi
[ -s "$DIR/bench.jsonl" ] && note "bench: $(tr '\n' ' ' <"$DIR/bench.jsonl")"

# 3. The attention kernels: the flash kernel against the plain attention on the device,
#    values and gradients (every mask, GQA, MQA, a KV-cache offset), then both timed at
#    a Llama-2-7B layer's shape (32 heads of 128, 2048 tokens), in f32 and bf16.
if [ "$DEVICE" = cpu ]; then
    ashape=(--heads 4 --kv-heads 2 --seq 256 --head-size 64 --steps 2)
else
    ashape=(--heads 32 --seq 2048 --head-size 128 --steps 5)
fi
: >"$DIR/attention.jsonl"
for precision in 32-true bf16-true; do
    step "attention-$precision" attention-$precision.json "$BIN" attention-check --device "$DEVICE" \
        --precision "$precision" --json "${ashape[@]}"
    [ -s "$DIR/attention-$precision.json" ] && cat "$DIR/attention-$precision.json" >>"$DIR/attention.jsonl" &&
        note "attention $precision: $(tr '\n' ' ' <"$DIR/attention-$precision.json")"
done

# 4. NCCL on one rank: init through the rendezvous, every collective, bandwidth, and
#    the queued reductions (an all-reduce and a reduce-scatter on the side stream, their
#    inputs written just before and dropped at once, candle's stream filling buffers
#    and multiplying matrices while they run, results checked). Then the same on one
#    stream (LIT_CLAIRE_NCCL_SIDE_STREAM=0), the bandwidth of both side by side.
#    (On the CPU only the rendezvous runs.) No launcher variables: world size 1.
step nccl nccl.json env -u RANK -u WORLD_SIZE -u SLURM_PROCID -u SLURM_NTASKS \
    MASTER_PORT="${MASTER_PORT:-29517}" "$BIN" dist-check --device "$DEVICE" --timeout 60 --bench-mib 256
[ -s "$DIR/nccl.json" ] && note "nccl: $(cat "$DIR/nccl.json")"
if [ "$DEVICE" != cpu ]; then
    if grep -q '"side_stream":true' "$DIR/nccl.json" && grep -q 'queued all_reduce sum' "$DIR/nccl.json"; then
        note "PASS nccl side stream: the queued reductions were right"
    else
        note "FAIL nccl side stream: nccl.json has no side_stream true and queued check"
        failed=1
    fi
    step nccl-one-stream nccl-one-stream.json env -u RANK -u WORLD_SIZE -u SLURM_PROCID -u SLURM_NTASKS \
        LIT_CLAIRE_NCCL_SIDE_STREAM=0 MASTER_PORT="${MASTER_PORT:-29519}" "$BIN" dist-check \
        --device "$DEVICE" --timeout 60 --bench-mib 256
    [ -s "$DIR/nccl-one-stream.json" ] && note "nccl, one stream: $(cat "$DIR/nccl-one-stream.json")"
fi

# 5. The collective watchdog on the NCCL path. `dist-check --simulate hang` queues an
#    all-reduce behind a stream held on the GPU (cuStreamWaitValue32 on a word that stays
#    0), then waits for it: only the watchdog can end that, by ncclCommAbort and exit 1
#    with one line. (On the CPU the same line comes from the watchdog alone.)
#    NCCL_DEBUG=INFO: NCCL's own log of the abort lands in watchdog.log too.
t0=$SECONDS
timeout --kill-after=10 120 env -u RANK -u WORLD_SIZE -u SLURM_PROCID -u SLURM_NTASKS \
    NCCL_DEBUG=INFO MASTER_PORT="${MASTER_PORT:-29518}" "$BIN" dist-check --device "$DEVICE" \
    --timeout 60 --collective-timeout 5 --bench-mib 0 --simulate hang --faulty-rank 0 \
    >"$DIR/watchdog.json" 2>"$DIR/watchdog.log"
rc=$?
took=$((SECONDS - t0))
verdict=$(grep -E '^error: collective #[0-9]+ \(all_reduce, after step 1\) did not complete within 5 s on rank 0' "$DIR/watchdog.log")
if [ $rc -eq 1 ] && [ "$(printf '%s\n' "$verdict" | grep -c .)" -eq 1 ] && [ $took -lt 100 ]; then
    note "PASS watchdog ($took s): $verdict"
    if [ "$DEVICE" != cpu ]; then
        if grep -qi "abort" "$DIR/watchdog.log"; then
            note "watchdog: NCCL logged the abort: $(grep -i "abort" "$DIR/watchdog.log" | tail -n 1)"
        else
            note "watchdog: NCCL logged no abort line (NCCL_DEBUG=INFO)"
        fi
    fi
else
    [ $rc -eq 124 ] && echo "timed out after 120 s: the watchdog did not stop the hung collective" >>"$DIR/watchdog.log"
    note "FAIL watchdog (exit $rc, $took s): $(grep '^error:' "$DIR/watchdog.log" | tail -n 1)"
    failed=1
fi

# 6. fsdp on one device: 4 steps of pretrain on the tiny LLaMA reference checkpoint in
#    32-true, --strategy ddp then --strategy fsdp, on data prepared here from the
#    fortunes. On one rank fsdp runs its sharded code (every shard the whole buffer,
#    every gather and reduce-scatter through the one-rank collective), as ddp runs its
#    own: no launcher variables (one rank is one process without NCCL, for both), so they
#    are unset as in step 4. PASS when every step's loss agrees within 1e-5 relative.
fsdp_dir="$DIR/fsdp"
model=tests/fixtures/reference/llama
rm -rf "$fsdp_dir" && mkdir -p "$fsdp_dir/raw/fortunes" &&
    cp data/sample/fortunes-br.txt "$fsdp_dir/raw/fortunes/"
step fsdp-data fsdp-data.out "$BIN" prepare-data --source-path "$fsdp_dir/raw" \
    --checkpoint-dir "$model" --destination-path "$fsdp_dir/data" --doc-separator % \
    --max-length 32 --padding false --multiple-of 2
fsdp_args=(pretrain --data-dir "$fsdp_dir/data" --checkpoint-dir "$model" --device "$DEVICE"
    --precision 32-true --max-steps 4 --batch-size 4 --micro-batch-size 2
    --learning-rate 3e-3 --warmup-steps 1 --eval-interval 4 --eval-max-batches 1)
for strategy in ddp fsdp; do
    step "fsdp-$strategy" "fsdp-$strategy.out" env -u RANK -u WORLD_SIZE -u SLURM_PROCID \
        -u SLURM_NTASKS "$BIN" "${fsdp_args[@]}" --out-dir "$fsdp_dir/$strategy" \
        --strategy "$strategy"
done
# On a GPU, fsdp once more as torchrun starts one process: its all-gathers and
# reduce-scatters then go through NCCL (a communicator of one rank).
if [ "$DEVICE" != cpu ]; then
    step fsdp-nccl fsdp-nccl.out env -u SLURM_PROCID -u SLURM_NTASKS RANK=0 WORLD_SIZE=1 \
        LOCAL_RANK=0 LOCAL_WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 \
        MASTER_PORT="${MASTER_PORT:-29519}" TORCHELASTIC_RUN_ID=device-check \
        "$BIN" "${fsdp_args[@]}" --out-dir "$fsdp_dir/fsdp-nccl" --strategy fsdp
fi
# The loss column of each metrics.csv, by step; fsdp.json names both and the largest
# relative difference.
losses() { awk -F, 'NR == 1 {for (i = 1; i <= NF; i++) if ($i == "loss") c = i; next}
    c {printf "%s%s", (n++ ? "," : ""), $c} END {print ""}' "$1"; }
# The largest relative difference of two such lists ("mismatch" if their lengths differ
# or they hold fewer than 4 steps).
max_rel_diff() {
    awk -v a="$1" -v b="$2" 'BEGIN {
        n = split(a, x, ","); m = split(b, y, ",")
        if (n != m || n < 4) {print "mismatch"; exit}
        w = 0
        for (i = 1; i <= n; i++) {
            d = x[i] - y[i]; if (d < 0) d = -d
            s = x[i] < 0 ? -x[i] : x[i]; if (s < 1e-12) s = 1e-12
            if (d / s > w) w = d / s
        }
        printf "%.3e", w }'
}
if [ -s "$fsdp_dir/ddp/metrics.csv" ] && [ -s "$fsdp_dir/fsdp/metrics.csv" ]; then
    ddp_losses=$(losses "$fsdp_dir/ddp/metrics.csv")
    fsdp_losses=$(losses "$fsdp_dir/fsdp/metrics.csv")
    worst=$(max_rel_diff "$ddp_losses" "$fsdp_losses")
    nccl_losses=""
    if [ "$DEVICE" != cpu ] && [ -s "$fsdp_dir/fsdp-nccl/metrics.csv" ]; then
        nccl_losses=$(losses "$fsdp_dir/fsdp-nccl/metrics.csv")
        nccl_worst=$(max_rel_diff "$ddp_losses" "$nccl_losses")
        if [ "$nccl_worst" != mismatch ] && awk -v w="$nccl_worst" 'BEGIN {exit !(w + 0 <= 1e-5)}'; then
            note "PASS fsdp-nccl-vs-ddp: losses agree within $nccl_worst relative: [$nccl_losses]"
        else
            note "FAIL fsdp-nccl-vs-ddp: losses differ ($nccl_worst relative): [$nccl_losses]"
            failed=1
        fi
    fi
    echo "{\"ddp\": [$ddp_losses], \"fsdp\": [$fsdp_losses], \"fsdp_nccl\": [$nccl_losses], \"max_rel_diff\": \"$worst\"}" >"$DIR/fsdp.json"
    if ! grep -q "× 1 rank (fsdp)" "$fsdp_dir/fsdp/train.log"; then
        note "FAIL fsdp-vs-ddp: the fsdp run did not name the sharded path in its train.log"
        failed=1
    elif [ "$worst" != mismatch ] && awk -v w="$worst" 'BEGIN {exit !(w + 0 <= 1e-5)}'; then
        note "PASS fsdp-vs-ddp: losses agree within $worst relative: ddp [$ddp_losses], fsdp [$fsdp_losses]"
    else
        note "FAIL fsdp-vs-ddp: losses differ ($worst relative): ddp [$ddp_losses], fsdp [$fsdp_losses]"
        failed=1
    fi
else
    note "FAIL fsdp-vs-ddp: a run wrote no metrics.csv (see fsdp-ddp.log, fsdp-fsdp.log)"
    failed=1
fi

if [ $failed -eq 0 ]; then note "all device checks passed"; else note "some device checks FAILED"; fi
exit $failed
