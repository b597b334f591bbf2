#!/bin/bash
# How long a checkpoint save blocks training, with --background-save true and false
# (docs/parallel.md, "Checkpoints in the background"). Builds an 85.7M-parameter LLaMA
# with init-model (the demo's tokenizer, 768 wide, 12 blocks), prepares the sample
# corpus for it, and trains it on the CPU, full fine-tuning, saving every 2 steps (each
# checkpoint about 1 GB: weights and AdamW moments), REPS times in each mode, in turn.
# Prints, per run, the seconds training waited at each save and the run's wall time.
#     utils/bench_save_stall.sh [WORK_DIR] [REPS]
set -euo pipefail
WORK=${1:-/tmp/lit-claire-save-stall}
REPS=${2:-2}
BIN=${LIT_CLAIRE:-target/debug/lit-claire}
TINY=data/models/tiny-llama-fortunes
mkdir -p "$WORK/raw/fortunes"
if [ ! -f "$WORK/model/model.safetensors" ]; then
    python3 - "$TINY/config.json" "$WORK/config.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
c.update(hidden_size=768, intermediate_size=2048, num_attention_heads=12,
         num_key_value_heads=12, num_hidden_layers=12)
json.dump(c, open(sys.argv[2], "w"), indent=2)
PY
    "$BIN" init-model --config "$WORK/config.json" --tokenizer "$TINY" --output-dir "$WORK/model" --seed 42
fi
if [ ! -f "$WORK/data/metadata.json" ]; then
    cp data/sample/fortunes-br.txt "$WORK/raw/fortunes/"
    "$BIN" prepare-data --source-path "$WORK/raw" --checkpoint-dir "$WORK/model" \
        --destination-path "$WORK/data" --doc-separator % --max-length 64 >/dev/null
fi
for rep in $(seq "$REPS"); do
    for bg in false true; do
        run="$WORK/run-$bg"
        rm -rf "$run"
        start=$(date +%s.%N)
        "$BIN" pretrain --data-dir "$WORK/data" --checkpoint-dir "$WORK/model" --out-dir "$run" \
            --device cpu --max-steps 9 --micro-batch-size 1 --batch-size 1 --warmup-steps 1 \
            --save-interval 2 --eval-interval 100 --eval-max-batches 1 \
            --background-save "$bg" 2>/dev/null >/dev/null
        end=$(date +%s.%N)
        waits=$(grep -o 'training waited [0-9.]* s' "$run/train.log" | awk '{print $3}' | tr '\n' ' ')
        # In the background: of which waiting for the previous write / copying.
        split=$(grep -o '([0-9.]* s for the previous write, [0-9.]* s to copy' "$run/train.log" \
            | awk '{printf "%s/%s ", substr($1, 2), $7}' || true)
        printf 'background-save %-5s rep %s: waited %s(s per save: steps 2 4 6 8, final), wall %.1f s\n' \
            "$bg" "$rep" "$waits" "$(echo "$end - $start" | bc)"
        if [ -n "$split" ]; then echo "    of which previous write / copy: $split"; fi
    done
done
