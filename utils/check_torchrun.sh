#!/bin/bash
# lit-claire under the real torchrun (PyTorch's launcher), on the CPU (docs/parallel.md,
# "torchrun"). Needs a Python with torch; the tests only use torchrun's variables.
#     utils/check_torchrun.sh [WORK_DIR]        (PYTHON=/path/to/python, LIT_CLAIRE=binary)
#
#   1. rendezvous   `dist-check` as 2 and 3 processes under torchrun's three rendezvous
#                   (static --master-port, --standalone, c10d): every process meets,
#                   beside the store torchrun's agent keeps on MASTER_PORT
#   2. agent signal SIGUSR1 to torchrun's agent, with --signals-to-handle ...,SIGUSR1:
#                   the agent passes it on, the worker saves and exits 75, torchrun
#                   exits 1; stopped.json is written, slurm/requeue.sh (with a stand-in
#                   scontrol) requeues; the resumed run ends as the uninterrupted one
#   2b. SIGTERM    to the agent with default flags: passed on, the worker saves, 1
#   3. worker signal SIGUSR1 to the worker alone, --max-restarts 2: torchrun restarts it,
#                   it resumes from its checkpoint and ends as the uninterrupted run
#   4. plain USR1   SIGUSR1 to an agent without --signals-to-handle: the agent dies at
#                   once (shown, not a failure: the reason the flag is needed)
# Prints PASS/FAIL per check; exit status 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/lit-claire-torchrun}
PYTHON=${PYTHON:-python3}
BIN=$(realpath "${LIT_CLAIRE:-target/debug/lit-claire}")
TORCHRUN=("$PYTHON" -m torch.distributed.run)
MODEL=data/models/tiny-llama-fortunes
"$PYTHON" -c "import torch" 2>/dev/null || { echo "error: $PYTHON has no torch (set PYTHON)" >&2; exit 2; }
[ -x "$BIN" ] || { echo "error: $BIN is not built (cargo build, or set LIT_CLAIRE)" >&2; exit 2; }
rm -rf "$WORK" && mkdir -p "$WORK/raw/pt" "$WORK/fake-slurm"
failed=0
pass() { echo "PASS $*"; }
fail() { echo "FAIL $*"; failed=1; }

cp data/sample/fortunes-br.txt "$WORK/raw/pt/"
"$BIN" prepare-data --source-path "$WORK/raw" --checkpoint-dir "$MODEL" \
    --destination-path "$WORK/data" --doc-separator % --max-length 128 >/dev/null 2>&1 ||
    { echo "error: prepare-data failed" >&2; exit 2; }

# 1. rendezvous
free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }
for n in 2 3; do
    for how in "--master-port $(free_port)" "--standalone" "--rdzv-backend c10d --rdzv-endpoint localhost:$(free_port)"; do
        # shellcheck disable=SC2086
        log="$WORK/dist-$n-${how%% *}.log"
        if timeout 120 "${TORCHRUN[@]}" $how --nproc-per-node "$n" --no-python "$BIN" \
            dist-check --device cpu --timeout 30 >"$log" 2>&1 &&
            [ "$(grep -c '"world_size":'"$n" "$log")" -eq "$n" ]; then
            pass "rendezvous: $n processes, torchrun $how"
        else
            fail "rendezvous: $n processes, torchrun $how: $(grep -m1 '^error' "$log")"
        fi
    done
done

# A LoRA run long enough to be signalled mid-way (about 10 s on a 2-core VM).
train() { # OUT [torchrun flags...] -- started in the background, pid in $!
    local out=$1; shift
    "${TORCHRUN[@]}" "$@" --nproc-per-node 1 --no-python "$BIN" pretrain \
        --checkpoint-dir "$MODEL" --data-dir "$WORK/data" --out-dir "$out" --device cpu \
        --lora-r 8 --max-steps 400 --micro-batch-size 4 --batch-size 4 --eval-interval 200 \
        --eval-max-batches 2 --save-interval 1000 --resume auto >>"$out.log" 2>&1
}
rows() { cut -d, -f1-6,9- "$1/metrics.csv"; }
same_as_straight() { # RUN WHAT
    if [ "$(rows "$WORK/straight")" = "$(rows "$1")" ] &&
        cmp -s "$WORK/straight/final/adapter_model.safetensors" "$1/final/adapter_model.safetensors"; then
        pass "$2: metrics rows and final adapter equal the uninterrupted run's"
    else
        fail "$2: differs from the uninterrupted run"
    fi
}
agent_of() { # RUN: pid of the torchrun agent training into RUN
    pgrep -f -- "torch.distributed.run .*--out-dir $1 " | head -n 1
}
wait_rows() { # RUN N: until metrics.csv has N rows
    for _ in $(seq 600); do
        [ "$(wc -l <"$1/metrics.csv" 2>/dev/null || echo 0)" -gt "$2" ] && return 0
        sleep 0.05
    done
    return 1
}
train "$WORK/straight" || fail "uninterrupted run: $(tail -n 1 "$WORK/straight.log")"

# 2. agent signal, then slurm/requeue.sh decides
printf '#!/bin/sh\necho "$*" >> %s\n[ "$1" = show ] && echo "JobId=$3 JobState=RUNNING"\nexit 0\n' \
    "$WORK/scontrol.log" >"$WORK/fake-slurm/scontrol"
chmod +x "$WORK/fake-slurm/scontrol"
run="$WORK/agent"
(
    export PATH="$WORK/fake-slurm:$PATH" SLURM_JOB_ID=4242
    # shellcheck disable=SC1091
    source slurm/requeue.sh
    run_requeueing "${TORCHRUN[@]}" --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
        --shutdown-timeout 120 --nproc-per-node 1 --no-python "$BIN" pretrain \
        --checkpoint-dir "$MODEL" --data-dir "$WORK/data" --out-dir "$run" --device cpu \
        --lora-r 8 --max-steps 400 --micro-batch-size 4 --batch-size 4 --eval-interval 200 \
        --eval-max-batches 2 --save-interval 1000 --resume auto >"$run.log" 2>&1
    echo "run_requeueing returned $?" >>"$run.log"
) &
shell=$!
wait_rows "$run" 100
agent=$(pgrep -f "torch.distributed.run --signals-to-handle" | head -n 1)
kill -USR1 "$agent"
wait "$shell"
if grep -q "requeue 4242" "$WORK/scontrol.log" 2>/dev/null && [ -f "$run/stopped.json" ] &&
    grep -q "launcher exited with 1" "$run.log"; then
    pass "agent signal: worker exited 75, torchrun $(grep -o 'launcher exited with [0-9]*' "$run.log"), job requeued ($(tr -d '\n ' <"$run/stopped.json"))"
else
    fail "agent signal: not requeued (see $run.log)"
fi
train "$run" && [ ! -f "$run/stopped.json" ] || fail "agent signal: the resumed run failed or kept stopped.json"
same_as_straight "$run" "agent signal, resumed"

# 2b. SIGTERM to an agent with the default flags: passed on, the worker saves
run="$WORK/term"
train "$run" &
agent=$!
wait_rows "$run" 100
kill -TERM "$(agent_of "$run")"
wait "$agent"
status=$?
if [ $status -eq 1 ] && grep -q '"reason": "SIGTERM"' "$run/stopped.json" 2>/dev/null; then
    pass "agent SIGTERM: passed on, the worker saved ($(tr -d '\n ' <"$run/stopped.json")), torchrun exited $status"
    train "$run" && same_as_straight "$run" "agent SIGTERM, resumed"
else
    fail "agent SIGTERM: torchrun exited $status, no stop record (see $run.log)"
fi

# 3. worker signal, torchrun restarts it
run="$WORK/worker"
train "$run" --max-restarts 2 &
agent=$!
wait_rows "$run" 100
worker=$(pgrep -f -- "--out-dir $run " | while read -r p; do
    [ "$(ps -o comm= -p "$p")" = lit-claire ] && echo "$p"; done | head -n 1)
kill -USR1 "$worker"
if wait "$agent" && grep -q "exitcode: 75" "$run.log" && grep -q "^resuming" "$run.log"; then
    pass "worker signal: exit 75, restarted by torchrun, resumed"
    same_as_straight "$run" "worker signal, restarted"
else
    fail "worker signal: torchrun did not restart it (see $run.log)"
fi

# 4. SIGUSR1 to an agent that does not handle it
run="$WORK/plain"
train "$run" &
agent=$!
wait_rows "$run" 100
kill -USR1 "$(agent_of "$run")"
wait "$agent"
status=$?
sleep 1
left=$(pgrep -f -- "--out-dir $run " | wc -l)
echo "note: without --signals-to-handle ...,SIGUSR1, SIGUSR1 ends torchrun's agent with status $status and leaves $left worker(s) training"
pkill -f -- "--out-dir $run " 2>/dev/null

[ $failed -eq 0 ] && echo "all torchrun checks passed" || echo "some torchrun checks FAILED"
exit $failed
