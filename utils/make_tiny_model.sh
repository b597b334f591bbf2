#!/usr/bin/env bash
# Recreate data/models/tiny-llama-fortunes, the built-in model of `lit-claire demo`:
# random LLaMA weights, then full pretraining on the sample corpus with lit-claire.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cargo build --release --example init_model
cargo build --release
bin=target/release/lit-claire
target/release/examples/init_model "$work/init" tests/fixtures/reference/llama 4 128 4
mkdir -p "$work/raw/fortunes"
cp data/sample/fortunes-br.txt "$work/raw/fortunes/"
$bin prepare-data --source-path "$work/raw" --checkpoint-dir "$work/init" --destination-path "$work/data" \
    --doc-separator % --max-length 128 --padding false --multiple-of 1
$bin pretrain --data-dir "$work/data" --checkpoint-dir "$work/init" --out-dir "$work/run" \
    --num-epochs 8 --batch-size 16 --micro-batch-size 16 --learning-rate 3e-3 --min-lr 3e-4 \
    --warmup-steps 20 --weight-decay 0.05 --eval-interval 50 --save-interval 100000 --log-interval 10
$bin convert-to-hf --input-path "$work/run/final" --output-dir "$work/hf" --dtype f32
out=data/models/tiny-llama-fortunes
for f in config.json generation_config.json model.safetensors tokenizer.json tokenizer_config.json; do
    cp "$work/hf/$f" "$out/$f"
done
echo "wrote $out"
