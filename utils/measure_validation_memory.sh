#!/usr/bin/env bash
# Peak memory (max RSS) of validation inside a training run against offline `validate`
# and `perplexity` on the same model and data, on the real model of
# utils/make_real_model.py (SmolLM2-135M, 30 layers, vocabulary 49,152):
#
#     python3 utils/make_real_model.py                  # once: tests/fixtures/real/smollm2-135m
#     cargo build --release
#     utils/measure_validation_memory.sh [BINARY] [TOKENS]
#
# BINARY defaults to target/release/lit-claire, TOKENS (per sample) to 2048. The run is
# LoRA r8 on q and v, micro-batch 1, activation checkpointing of every block, f32, one
# step with validation at its end (the run's own, which scores the validation split with
# the adapter's variables live). Each command runs under /usr/bin/time; its max RSS is
# printed, with wall time. Everything goes to a temporary folder, removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(realpath "${1:-target/release/lit-claire}")
tokens=${2:-2048}
model=tests/fixtures/real/smollm2-135m
[ -x "$bin" ] || { echo "error: no binary at $bin (cargo build --release)"; exit 1; }
[ -f "$model/model.safetensors" ] || { echo "error: $model is missing (python3 utils/make_real_model.py)"; exit 1; }
[ -x /usr/bin/time ] || { echo "error: /usr/bin/time is missing (apt-get install time)"; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-2}

# Text: the sample corpus three times over, enough for a few validation samples.
mkdir -p "$work/raw/pt"
for _ in 1 2 3; do cat data/sample/fortunes-br.txt; done > "$work/raw/pt/train.txt"
head -c 60000 data/sample/fortunes-br.txt > "$work/raw/pt/validation.txt"

measure() { # label, command...
    local label=$1; shift
    /usr/bin/time -f "%M %e" -o "$work/time" "$@" > "$work/$label.out" 2>&1 ||
        { cat "$work/$label.out"; echo "error: $label failed"; exit 1; }
    read -r kb secs < "$work/time"
    printf '%-34s max RSS %7.1f MB  %6.1f s\n' "$label" "$(echo "$kb / 1024" | bc -l)" "$secs"
}

"$bin" prepare-data --source-path "$work/raw" --checkpoint-dir "$model" \
    --destination-path "$work/data" --max-length "$tokens" > /dev/null
measure "pretrain, 1 step + validation" "$bin" pretrain --checkpoint-dir "$model" \
    --data-dir "$work/data" --out-dir "$work/run" --device cpu --precision 32-true \
    --micro-batch-size 1 --batch-size 1 --max-steps 1 --eval-interval 1 \
    --eval-max-batches 4 --activation-checkpointing 1 --lora-r 8 --lora-query --lora-value
measure "validate (offline, same data)" "$bin" validate --out-dir "$work/run" \
    --data-dir "$work/data" --max 4 --batch-size 1
measure "perplexity --context $tokens" "$bin" perplexity --checkpoint-dir "$model" \
    --adapter "$work/run/final" --input "$work/raw/pt/validation.txt" --context "$tokens" \
    --batch-size 1
