#!/usr/bin/env bash
# The Portuguese sample corpus on the demo's English model, with and without a vocabulary
# of its own: validation bits per byte after the same number of training bytes.
#
#   utils/measure_vocab_runs.sh [OUT]        # OUT defaults to out/vocab-runs
#
# Runs, all on data/sample/fortunes-br.txt in blocks of 128 tokens (packed), the demo's
# recipe (lit_recipes/tiny-lora.toml: 8 blocks a step, rate 1e-2 cosine):
#   lora-base      LoRA on the base vocabulary (the demo), 60 steps
#   lora-new       LoRA + the 512 new tokens' rows (--train-embeddings new), pieces init
#   lora-new-mean  the same with adapt-vocab --init mean
#   full-base      full fine-tuning on the base vocabulary (rate 1e-3)
#   full-new       full fine-tuning of the extended model (rate 1e-3), pieces init
# A run on the extended vocabulary takes fewer steps, so that every run reads the same
# bytes of text: steps = 60 x (extended tokens / base tokens) of the training split.
# The head's adapter (--lora-head) is off in the runs with new rows (their head rows
# train as trainable tokens) and on in lora-base (the demo's recipe).
# Prints one line per run: final validation loss (nats/token) and bits per byte.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/lit-claire}
OUT=${1:-out/vocab-runs}
BASE=data/models/tiny-llama-fortunes
N=${NEW_TOKENS:-512}
STEPS=${STEPS:-60}
rm -rf "$OUT" && mkdir -p "$OUT/raw"
cp data/sample/fortunes-br.txt "$OUT/raw/"
q() { "$BIN" "$@" >>"$OUT/log.txt" 2>&1 || { tail -5 "$OUT/log.txt"; exit 1; }; }

q adapt-vocab --checkpoint-dir "$BASE" --output-dir "$OUT/pt" \
    --extend-from "$OUT/raw" --doc-separator % --new-tokens "$N"
q adapt-vocab --checkpoint-dir "$BASE" --output-dir "$OUT/pt-mean" \
    --extend-from "$OUT/raw" --doc-separator % --new-tokens "$N" --init mean
for m in base pt pt-mean; do
  dir=$BASE; [ "$m" != base ] && dir=$OUT/$m
  q prepare-data --source-path "$OUT/raw" --checkpoint-dir "$dir" \
      --destination-path "$OUT/data-$m" --doc-separator % --max-length 128 \
      --padding false --multiple-of 1
done
tokens() { python3 -c "import json,sys; m=json.load(open(sys.argv[1])); print(sum(d['train']['tokens'] for d in m['datasets']))" "$OUT/data-$1/metadata.json"; }
tb=$(tokens base); tn=$(tokens pt)
ext_steps=$(( (STEPS * tn + tb / 2) / tb ))
echo "training tokens: base $tb, extended $tn; steps: base $STEPS, extended $ext_steps" | tee "$OUT/summary.txt"

run() { # name model data steps extra flags...
  local name=$1 model=$2 data=$3 steps=$4; shift 4
  q pretrain --recipe lit_recipes/tiny-lora.toml --checkpoint-dir "$model" \
      --data-dir "$OUT/data-$data" --out-dir "$OUT/$name" --max-steps "$steps" \
      --eval-interval "$steps" --save-interval "$steps" "$@"
  python3 - "$OUT/$name/metrics.csv" "$name" <<'PY' | tee -a "$OUT/summary.txt"
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r.get("val_loss")]
r = rows[-1]
print(f"{sys.argv[2]:14s} step {r['step']:>3s}  val_loss {float(r['val_loss']):.4f}  val_bpb {float(r['val_bpb']):.4f}")
PY
}
run lora-base "$BASE" base "$STEPS"
run lora-new "$OUT/pt" pt "$ext_steps" --lora-head false --train-embeddings new
run lora-new-mean "$OUT/pt-mean" pt-mean "$ext_steps" --lora-head false --train-embeddings new
run lora-new-none "$OUT/pt" pt "$ext_steps" --lora-head false --train-embeddings none
run full-base "$BASE" base "$STEPS" --lora-r 0 --learning-rate 1e-3 --min-lr 1e-4
run full-new "$OUT/pt" pt "$ext_steps" --lora-r 0 --learning-rate 1e-3 --min-lr 1e-4
run full-new-mean "$OUT/pt-mean" pt-mean "$ext_steps" --lora-r 0 --learning-rate 1e-3 --min-lr 1e-4
